"""The broad-data stage's data (``broad:`` in a run config): unlabeled examples broader than the
task's training set, on which the student learns the teacher's representations.

A teacher's generality lives in its representations, and a task's training set shows only a corner
of them: a student aligned on spoken digits by six espeak-ng accents keeps the teacher there and
loses it on other synthesisers and on real voices. With ``broad.enabled`` the align stage
(raylin.train.align) reads ``broad.examples`` broad examples next to the task's training examples
(indices ``num_train ..`` of its training split; the share of broad data in an align batch is
``examples / (num_train + examples)``), and for speech ``broad.train_copies`` augmented copies of
every training clip join the distillation's training set (labels kept).

| task                      | ``broad.data: auto``                                                      |
|---------------------------|---------------------------------------------------------------------------|
| sequence_classification   | ``passages``: passages of the six Austen novels and of the fortunes corpus |
| utterance_classification, ctc | ``voices``: 1-3 everyday words said by every espeak-ng variant in the training accents, speed and pitch drawn, then augmented (raylin.data.augment: speed, room, channel, noise, level) |
| causal_lm                 | none built in (the fortunes corpus is the language models' evaluation set): give ``broad.source`` |

``broad.source`` takes a local file or folder or a Hub data set in the keys of an evaluation set
(raylin.data.eval_sets: ``path``, ``name``, ``split``, ``text_column``, ``audio_column``).
Examples are drawn with ``broad.seed``; speech augmentation is a pure function of the example's
index, so every worker, the teacher service's activation cache and a resumed run see the same
samples. The synthesised voices are cached like the spoken digits ($RAYLIN_CACHE/spoken_digits/),
and the alignment made with them is shared through ``align.dir`` like any other (the broad
settings are part of its fingerprint).

Limits: broad data feeds the align stage (and, for speech, augmented training copies feed
distillation); unlabeled knowledge distillation on broad data inside the distillation loop is not
implemented. Built-in broad text is literary and aphoristic English, not reviews: it must not
overlap the review sets used as evaluation sets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from raylin.data.augment import augment
from raylin.data.austen import load_austen
from raylin.data.eval_sets import EvalSet, load_lm_documents, manifest_clips, source_problems
from raylin.data.fortunes import load_fortunes
from raylin.data.speech import VoicesRecipe, load_voices
from raylin.tasks import TASK_KINDS, UNLABELED_AUDIO, TaskKind

KINDS = ("auto", "passages", "voices")


def broad_kind(config) -> str | None:
    """The built-in broad data set the run uses (None: ``broad.source`` or none)."""
    if config.broad.source:
        return None
    return config.task_kind.broad_data if config.broad.data == "auto" else config.broad.data


def broad_problems(config) -> list[str]:
    """Every problem with the ``broad`` section, each naming the key and the fix."""
    broad, task = config.broad, config.task_kind
    if not broad.enabled:
        return []
    errors = []
    if broad.data not in KINDS:
        errors.append(f"broad.data {broad.data!r} is unknown; choose one of {list(KINDS)} (or give broad.source).")
    elif not broad.source:
        kind = broad_kind(config)
        if kind is None:
            errors.append(f"broad.data auto has no built-in broad corpus for {task.name} (fortunes is its evaluation set); "
                          "give broad.source: {path: FILE_OR_HUB_ID, text_column: ...}.")
        elif (kind == "voices") != task.speech:
            errors.append(f"broad.data {kind!r} does not fit task.type {task.name}; use broad.data auto.")
    else:
        errors += [f"broad.source: {problem}" for problem in source_problems(broad.source, _source_task(task))]
    if broad.examples < 1:
        errors.append(f"broad.examples must be >= 1, got {broad.examples}.")
    if broad.train_copies < 0:
        errors.append(f"broad.train_copies must be >= 0, got {broad.train_copies}.")
    if broad.train_copies and not task.speech:
        errors.append("broad.train_copies augments speech clips; for text tasks set it to 0.")
    if not config.align.enabled and not broad.train_copies:
        errors.append("broad.enabled feeds the align stage: set align.enabled: true (or, for speech, broad.train_copies).")
    return errors


def _source_task(task: TaskKind) -> TaskKind:
    """A broad source is unlabeled: text needs only its text column, speech only its audio column."""
    return UNLABELED_AUDIO if task.speech else TASK_KINDS["causal_lm"]


def broad_texts(config, max_words: int) -> list[str]:
    """``broad.examples`` unlabeled texts of at most ``max_words`` words (text tasks)."""
    broad = config.broad
    if broad.source:
        documents = load_lm_documents(EvalSet("broad", dict(broad.source), None))
    else:
        documents = list(load_austen().values()) + load_fortunes()
    passages = [" ".join(words[start : start + max_words]) for words in (d.split() for d in documents)
                for start in range(0, len(words), max_words)]
    passages = [p for p in passages if p]
    return random.Random(broad.seed).sample(passages, min(broad.examples, len(passages)))


def broad_clips(config) -> Sequence[np.ndarray]:
    """``broad.examples`` unlabeled clips (speech tasks), augmented when ``broad.augment``."""
    broad = config.broad
    if broad.source:
        clips = manifest_clips(broad.source)
        rows = random.Random(broad.seed).sample(range(len(clips)), min(broad.examples, len(clips)))
        clips = [clips[i] for i in sorted(rows)]
    else:
        clips = load_voices(VoicesRecipe(clips=broad.examples, seed=broad.seed))
    return AugmentedClips(clips, copies=0, seed=broad.seed) if broad.augment else clips


class AugmentedClips(Sequence):
    """``clips`` followed by ``copies`` augmented copies of each (``copies = 0``: every clip augmented
    once, in place). Item ``i`` of a copy is ``augment(clips[i % n], seed=f(seed, i))``: a pure
    function of the index, so it is the same on every worker and after a resume."""

    def __init__(self, clips: Sequence[np.ndarray], copies: int, seed: int):
        self.clips, self.copies, self.seed = clips, copies, seed

    def __len__(self) -> int:
        return len(self.clips) * (self.copies + 1)  # copies = 0: the clips themselves, augmented

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        original = index % len(self.clips)
        if self.copies and index < len(self.clips):
            return self.clips[original]  # with copies, the first len(clips) items are the originals
        return augment(self.clips[original], seed=self.seed * 1_000_003 + index)
