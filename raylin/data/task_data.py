"""A task's data: for each ``task.type``, the data a run trains and scores on, and how one batch is
built from example indices. The model with the task's head is raylin.task_model; the held-out
metric is scored by raylin.scoring; what each task is, raylin.tasks.

| task.type                | data.name                                  | batch                                   | metric     |
|--------------------------|--------------------------------------------|-----------------------------------------|------------|
| sequence_classification  | rotten_tomatoes, imdb (shipped); sst2, qnli, qqp (Hub) | input_ids, attention_mask, labels | accuracy |
| causal_lm                | austen (shipped); pile (Hub, streamed); corpus (local files or a Hub text set) | input_ids, attention_mask | perplexity |
| utterance_classification | spoken_digits (synthesised); hub_audio (Hub or local, raylin.data.audio) | input_features (Whisper) or input_values + attention_mask, labels | accuracy |
| ctc                      | spoken_digits (the digit words); hub_audio | input_values + attention_mask, labels (characters, -100 padded) | wer (and cer) |

Language modelling reads a corpus as one token stream per document and cuts it into
non-overlapping windows of ``data.max_length`` tokens; every window is one example. ``austen``
trains on five novels and holds out ``data.held_out`` (default ``persuasion``); it is small and is
held in memory. ``pile`` and ``corpus`` (``data.source``: raylin.data.shards.CorpusSource) are
tokenised once by Ray Data into token shards and read memory-mapped, so they may be far larger than
memory; their caps keep the first windows in source order (raylin.data.shards). Speech clips are
padded or cropped to ``data.max_seconds``; a Whisper encoder is shortened to match (its positions
are fixed sinusoids, re-made for the first ``50 * max_seconds`` positions: the original table up to
its fp16 storage rounding).

Evaluation sets beyond the held-out split (``eval_sets:``, raylin.data.eval_sets: IMDB for a Rotten
Tomatoes student, flite and Festival for spoken digits, fortunes for an Austen language model, or any
local or Hub source) are extra names in ``TaskData.eval_sets``, scored at the end of a run and
reported as ``eval_<name>_<metric>``. CTC targets are characters of raylin's vocabulary (raylin.data.transcripts);
the held-out word error rate decodes greedily (best path). CTC needs a model class with a CTC head
(Wav2Vec2, HuBERT; raylin.task_model refuses the Whisper encoder, which has none).

Every batch is built on the CPU from example indices only, so any worker, the teacher service and
a resumed run build exactly the same batch for the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from raylin.assets import cache_dir
from raylin.atomic import save_atomic
from raylin.data.audio import SAMPLING_RATE, load_audio_splits
from raylin.data.austen import NOVELS, load_austen
from raylin.data.broad import AugmentedClips, broad_clips, broad_texts
from raylin.data.eval_sets import load_lm_documents, load_speech_set, load_text_set, resolve_eval_sets
from raylin.data.limits import eval_rows, subset_rows, train_rows
from raylin.data.shards import PILE, TokenWindows, corpus_source, corpus_windows
from raylin.data.speech import DIGITS, load_spoken_digits
from raylin.data.text import load_splits, tokenize
from raylin.data.transcripts import encode_transcripts
from raylin.fingerprint import fingerprint
from raylin.models.teachers import load_processor, resolve_teacher_path
from raylin.tasks import TaskKind

SHARDED_CORPORA = ("pile", "corpus")  # read through token shards


# ----- data -------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """A task's examples. ``train_batch(indices)`` / ``eval_batch(name, indices)`` return CPU tensors
    ready for the model (``labels`` included where the task has them), built by ``builder(split,
    indices)``: the task's batch function (``text_classification_batch``, ``language_model_batch``,
    ``speech_batch``) bound to its data."""

    task: TaskKind
    num_train: int
    eval_sets: dict[str, int]  # held-out set name ("" = the main one) -> number of examples
    builder: Any = field(repr=False)

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.builder("train", indices)

    def eval_batch(self, name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.builder(name or "eval", indices)


STAGES = ("distill", "align")
NO_LABEL = -100  # the target of an unlabeled broad example (the align stage reads inputs only)


def load_task_data(config, processor, stage: str = "distill") -> TaskData:
    """The examples of ``config.data`` for ``config.task``, batched with ``processor``. With
    ``broad.enabled`` the ``align`` stage's training split is followed by the broad examples
    (raylin.data.broad) and, for speech, the ``distill`` stage's by ``broad.train_copies``
    augmented copies of every training clip."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
    broad = config.broad.enabled and stage == "align"
    kind = config.task_kind  # data.name was checked against the task's data sets with the config
    if kind.speech:
        copies = config.broad.train_copies if config.broad.enabled and stage == "distill" else 0
        return _speech(config, processor, broad, copies)
    if kind.language_model:
        return _language_modelling(config, processor, broad)
    return _text_classification(config, processor, broad)


def _text_classification(config, tokenizer, broad: bool) -> TaskData:
    data = config.data
    splits = load_splits(data)
    sets = {"train": (splits.train_texts, splits.train_labels), "eval": (splits.eval_texts, splits.eval_labels)}
    if broad:  # passages of about max_length tokens (3 words are about 4 tokens)
        texts = broad_texts(config, max_words=max(8, data.max_length * 3 // 4))
        sets["train"] = (splits.train_texts + texts, splits.train_labels + [NO_LABEL] * len(texts))
    extra = {entry.name: load_text_set(entry, config) for entry in resolve_eval_sets(config)}
    sets |= extra
    return TaskData(config.task_kind, len(sets["train"][0]),
                    {"": len(splits.eval_texts)} | {name: len(texts) for name, (texts, _) in extra.items()},
                    partial(text_classification_batch, sets, tokenizer, data.max_length))


def text_classification_batch(sets: dict[str, tuple[list, list[int]]], tokenizer, max_length: int, name: str,
                              indices: list[int]) -> dict[str, torch.Tensor]:
    """Examples ``indices`` of split ``name`` (texts, labels): token ids, attention mask, labels."""
    texts, labels = sets[name]
    batch = tokenize(tokenizer, [texts[i] for i in indices], max_length)
    batch["labels"] = torch.tensor([labels[i] for i in indices])
    return dict(batch)


def token_windows(token_ids: list[int], length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens (the ragged tail is dropped)."""
    count = len(token_ids) // length
    return torch.tensor(token_ids[: count * length], dtype=torch.long).view(count, length)


def prepare_task_data(config) -> None:
    """What a run's data needs built once, on the driver, before any worker, align task or teacher
    replica starts: the token shards of a sharded corpus (``pile``, ``corpus``), for the tokenizer of
    every model the run reads with (source and target teacher)."""
    data = config.data
    if data.name not in SHARDED_CORPORA:
        return
    source = PILE if data.name == "pile" else corpus_source(data.source)
    for path in dict.fromkeys(p for p in (config.teacher, config.target_teacher) if p):
        tokenizer = load_processor(resolve_teacher_path(path), "text")
        if tokenizer is None:
            raise FileNotFoundError(f"{path} has no tokenizer files: a language model run tokenises its corpus with "
                                    "the teacher's tokenizer; save it next to the weights (tokenizer.save_pretrained).")
        corpus_windows(data, tokenizer, source, "train", data.max_train_examples)
        corpus_windows(data, tokenizer, source, "eval", data.max_eval_examples)


def _language_modelling(config, tokenizer, broad: bool) -> TaskData:
    data = config.data
    if data.name in SHARDED_CORPORA:  # read memory-mapped from token shards (raylin.data.shards)
        source = PILE if data.name == "pile" else corpus_source(data.source)
        windows = {"train": corpus_windows(data, tokenizer, source, "train", data.max_train_examples),
                   "eval": corpus_windows(data, tokenizer, source, "eval", data.max_eval_examples)}
    else:
        windows = {split: token_windows(_token_ids(tokenizer, texts, cache=True), data.max_length)
                   for split, texts in _lm_documents(data).items()}
        windows["train"] = windows["train"][train_rows(len(windows["train"]), data.max_train_examples, data.seed)]
        windows["eval"] = windows["eval"][eval_rows(len(windows["eval"]), data.max_eval_examples)]
    if broad:  # broad.source's documents, cut into windows like the corpus
        stream = token_windows(_token_ids(tokenizer, broad_texts(config, max_words=10**9), cache=True), data.max_length)
        windows["train"] = _Concatenated([windows["train"], stream[: config.broad.examples]])
    extra = {}
    for entry in resolve_eval_sets(config):  # tokenised once per tokenizer and corpus (the token cache)
        stream = token_windows(_token_ids(tokenizer, load_lm_documents(entry), cache=True), data.max_length)
        rows = subset_rows(len(stream), entry.max_examples)
        extra[entry.name] = stream if rows is None else stream[rows]
    windows |= extra
    return TaskData(config.task_kind, len(windows["train"]), {"": len(windows["eval"])} | {k: len(v) for k, v in extra.items()},
                    partial(language_model_batch, windows))


def language_model_batch(windows: dict, name: str, indices: list[int]) -> dict[str, torch.Tensor]:
    """Windows ``indices`` of split ``name``: token ids and an all-ones attention mask."""
    rows = windows[name]
    input_ids = rows[indices] if isinstance(rows, (torch.Tensor, TokenWindows)) else torch.stack([rows[i] for i in indices])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _token_ids(tokenizer, texts: list[str], cache: bool) -> list[int]:
    """``texts`` tokenised and joined, each followed by EOS. With ``cache`` the ids are kept in
    $RAYLIN_CACHE/tokens/, keyed by the tokenizer and the texts: every training worker, the teacher
    replica and the teacher's scoring of a run need the same ids, and the six novels take seconds
    to tokenise on a CPU core."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    path = None
    if cache and getattr(tokenizer, "backend_tokenizer", None) is not None:  # fast tokenizers serialise

        key = fingerprint({"tokenizer": tokenizer.backend_tokenizer.to_str(), "texts": list(texts),
                           "separator": separator}, 24)
        path = cache_dir() / "tokens" / f"{key}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True).tolist()
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    if path is not None:
        save_atomic(path, lambda staging: torch.save(torch.tensor(ids, dtype=torch.int32), staging))
    return ids


def _lm_documents(data) -> dict[str, list[str]]:
    if data.name == "austen":
        held_out = data.held_out or "persuasion"
        if held_out not in NOVELS:
            raise ValueError(f"data.held_out {held_out!r} is not one of Jane Austen's novels here: {NOVELS}.")
        novels = load_austen()
        return {"train": [novels[n] for n in NOVELS if n != held_out], "eval": [novels[held_out]]}
    raise ValueError(f"{data.name!r} is read through token shards, not as documents; report this as a raylin bug.")


def _speech(config, processor, broad: bool, copies: int) -> TaskData:
    """Clips with class ids (utterance_classification) or transcripts (ctc)."""
    data, num_labels = config.data, config.task.num_labels
    kind = config.task_kind
    builtin_sets = {}
    if data.name == "hub_audio":
        sets = load_audio_splits(data, kind)
    else:
        sets, builtin_sets = _spoken_digit_sets(data)
    extra = {entry.name: load_speech_set(entry, config, builtin_sets) for entry in resolve_eval_sets(config)}
    if kind.transcribes:  # spoken digits transcribe the digit words
        sets = {k: (clips, [DIGITS[t] for t in targets]) if data.name == "spoken_digits" else (clips, targets)
                for k, (clips, targets) in sets.items()}
    if kind.classifies:
        classes = 1 + max(max(sets["train"][1], default=0), max(sets["eval"][1], default=0))
        if classes > num_labels:
            raise ValueError(f"data.{data.name} has {classes} classes but task.num_labels is {num_labels}; set "
                             f"task.num_labels: {classes}.")
    clips, targets = sets["train"]
    if copies:  # augmented copies of every training clip, labels kept
        sets["train"] = (AugmentedClips(clips, copies, config.broad.seed), list(targets) * (copies + 1))
    if broad:
        unlabeled = broad_clips(config)
        sets["train"] = (_Concatenated([clips, unlabeled]),
                         list(targets) + ["" if kind.transcribes else NO_LABEL] * len(unlabeled))
    # Classification crops clips to data.max_seconds; CTC never crops (a cropped clip no longer says
    # its transcript), so its batches are as long as their longest clip.
    max_samples = None if kind.transcribes else int(data.max_seconds * SAMPLING_RATE)
    whisper = type(processor).__name__ == "WhisperFeatureExtractor"
    sets |= extra
    eval_sets = {"": len(sets["eval"][0])} | {name: len(sets[name][0]) for name in extra}
    return TaskData(kind, len(sets["train"][0]), eval_sets,
                    partial(speech_batch, sets, processor, max_samples, whisper, kind.transcribes))


def speech_batch(sets: dict, processor, max_samples: int | None, whisper: bool, transcribes: bool, name: str,
                 indices: list[int]) -> dict[str, torch.Tensor]:
    """Clips ``indices`` of split ``name`` (clips, targets), cut to ``max_samples``: Whisper's log-mel
    features, or padded waveforms with a mask; labels are class ids or (``transcribes``) encoded transcripts."""
    audio, targets = sets[name]
    clips = [np.asarray(audio[i][:max_samples], dtype=np.float32) for i in indices]
    if whisper:  # fixed-length log-mel windows, silence after the clip; no mask
        features = processor(clips, sampling_rate=SAMPLING_RATE, return_tensors="pt")
        batch = {"input_features": features["input_features"]}
    else:  # raw waveforms (Wav2Vec2 / HuBERT), right-padded with a mask
        features = processor(clips, sampling_rate=SAMPLING_RATE, padding=True, return_attention_mask=True,
                             return_tensors="pt")
        batch = {"input_values": features["input_values"], "attention_mask": features["attention_mask"]}
    if transcribes:
        batch["labels"] = encode_transcripts([targets[i] for i in indices])
    else:
        batch["labels"] = torch.tensor([targets[i] for i in indices])
    return batch


class _Concatenated:
    """Sequences read as one, without copying them (the training clips, then the broad ones)."""

    def __init__(self, parts: list):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: int):
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


def _spoken_digit_sets(data) -> tuple[dict, dict]:
    """Spoken digits as (clips, digit ids) per split, and the synthesisers' extra sets (flite, festival)."""
    splits = load_spoken_digits(seed=data.seed, quick=data.size == "quick")
    sets = {"train": (splits.train_audio, splits.train_labels), "eval": (splits.eval_audio, splits.eval_labels)}
    extra = dict(splits.extra)
    kept = {"train": train_rows(len(sets["train"][0]), data.max_train_examples, data.seed),
            "eval": eval_rows(len(sets["eval"][0]), data.max_eval_examples)}
    for split, rows in kept.items():
        clips, labels = sets[split]
        sets[split] = ([clips[i] for i in rows], [labels[i] for i in rows])
    return sets, extra

