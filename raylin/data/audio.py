"""Recorded speech data sets (``data.name: hub_audio``): a Hugging Face Hub data set or local files,
read with ``datasets`` and decoded with soundfile + soxr (datasets' own audio decoding needs torchcodec
and FFmpeg; raylin does not).

``data.source`` says where the audio is:

| key           | default                    | meaning                                                     |
|---------------|----------------------------|-------------------------------------------------------------|
| path          | (required)                 | Hub id (``distil-whisper/tedlium-prompted``), a local folder of parquet files, or a builder (``csv``, ``json``) with ``data_files`` |
| name          | None                       | the data set's config (``release3``)                         |
| revision      | None                       | Hub revision (``refs/convert/parquet`` for script data sets) |
| data_files    | None                       | ``{train: ..., validation: ...}`` for local manifests        |
| train_split   | train                      | split names as the data set spells them                     |
| eval_split    | validation                 |                                                             |
| audio_column  | audio                      | an Audio feature, ``{bytes, path}`` or a file path           |
| target_column | text (ctc), label (classification) | transcript, or class (ClassLabel, string or int)    |

A local manifest (licensed copies of VoxCeleb1 or SLURP): a CSV with a file-path column and a
target column, ``path: csv`` and ``data_files: {train: train.csv, validation: dev.csv}``.

Clips are decoded when a batch asks for them, so a data set far larger than memory works (datasets
keeps it memory-mapped on disk, once per machine under ``HF_DATASETS_CACHE``). Class targets that
are strings get ids in sorted order of the training split's values; a held-out class unseen in
training is an error. Limits: one target per clip (SLURP's scenario and action heads become one
intent label); clips longer than ``data.max_seconds`` are cropped.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import datasets
import numpy as np

from raylin.data.limits import eval_rows, train_rows
from raylin.tasks import TaskKind

SAMPLING_RATE = 16_000


@dataclass(frozen=True)
class AudioSource:
    path: str
    name: str | None = None
    revision: str | None = None
    data_files: Any = None
    train_split: str = "train"
    eval_split: str = "validation"
    audio_column: str = "audio"
    target_column: str | None = None  # default per task: text (ctc), label (classification)


def audio_source(source: dict[str, Any] | None, task: TaskKind) -> AudioSource:
    """``data.source`` checked: a dict with ``path`` and only the keys of ``AudioSource``."""
    known = [f.name for f in fields(AudioSource)]
    if not isinstance(source, dict) or not source.get("path"):
        raise ValueError("data.name hub_audio needs data.source.path: a Hub data set id, a local folder, or csv/json "
                         "with data.source.data_files (see raylin/data/audio.py).")
    unknown = sorted(set(source) - set(known))
    if unknown:
        raise ValueError(f"Unknown data.source key(s) {unknown}; known: {known}.")
    parsed = AudioSource(**source)
    if parsed.target_column is None:
        parsed = AudioSource(**{**source, "target_column": "text" if task.transcribes else "label"})
    return parsed


class AudioClips(Sequence):
    """The clips of one split, decoded (mono float32 at 16 kHz) on access."""

    def __init__(self, dataset, column: str, rows: list[int] | None = None):
        self.dataset, self.column = dataset, column
        self.rows = list(range(len(dataset))) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_audio(self.dataset[self.rows[index]][self.column])


def decode_audio(value: Any, rate: int = SAMPLING_RATE) -> np.ndarray:
    """Mono float32 audio at ``rate`` from ``{bytes, path}``, ``{array, sampling_rate}`` or a file path."""
    if isinstance(value, dict) and value.get("array") is not None:
        audio, source_rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    else:
        where = io.BytesIO(value["bytes"]) if isinstance(value, dict) and value.get("bytes") else (
            value["path"] if isinstance(value, dict) else value)
        audio, source_rate = read_audio(where)
    return resample(audio, source_rate, rate)


def read_audio(where) -> tuple[np.ndarray, int]:
    """Mono float32 samples (channels averaged) and their rate, from a file path or file object
    (any format libsndfile reads: WAV, FLAC, OGG, MP3)."""
    import soundfile

    audio, rate = soundfile.read(where, dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def resample(audio: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """``audio`` at ``target`` Hz (soxr), float32."""
    if rate == target:
        return np.asarray(audio, dtype=np.float32)
    try:
        import soxr
    except ImportError as error:
        raise ImportError("Speech data needs soxr to resample: `pip install soxr` (or `pip install raylin[speech]`).") from error
    return soxr.resample(audio, rate, target).astype(np.float32)


def load_audio_splits(data, task: TaskKind) -> dict[str, tuple[AudioClips, list]]:
    """``{"train": (clips, targets), "eval": (clips, targets)}`` of ``data.source``; targets are class
    ids (classification) or transcripts (ctc). ``data.max_train_examples`` keeps a seeded random
    subset, ``data.max_eval_examples`` an even spread of the held-out split."""
    source = audio_source(data.source, task)
    splits: dict[str, Any] = {}
    for role, split in (("train", source.train_split), ("eval", source.eval_split)):
        try:
            dataset = datasets.load_dataset(source.path, source.name, split=split, revision=source.revision,
                                            data_files=source.data_files)
        except (ConnectionError, OSError) as error:
            raise FileNotFoundError(
                f"Could not load split {split!r} of {source.path!r}: {error}. A Hub data set needs network access "
                "(and accepted terms where it is gated); offline, point data.source at a local copy."
            ) from error
        for column in (source.audio_column, source.target_column):
            if column not in dataset.column_names:
                raise ValueError(f"{source.path} ({split}) has no column {column!r}; it has {dataset.column_names}. "
                                 "Set data.source.audio_column / target_column.")
        if isinstance(dataset.features[source.audio_column], datasets.Audio):
            dataset = dataset.cast_column(source.audio_column, datasets.Audio(decode=False))
        splits[role] = dataset
    rows = {"train": train_rows(len(splits["train"]), data.max_train_examples, data.seed),
            "eval": eval_rows(len(splits["eval"]), data.max_eval_examples)}
    columns = {role: list(dataset[source.target_column]) for role, dataset in splits.items()}
    targets = {role: [column[i] for i in rows[role]] for role, column in columns.items()}
    if not task.transcribes:  # class names from the whole training split: a capped subset may miss some
        targets = _class_ids(splits["train"].features[source.target_column], columns["train"], targets, source)
    return {role: (AudioClips(splits[role], source.audio_column, rows[role]), targets[role]) for role in splits}


def _class_ids(feature, all_train: list, targets: dict[str, list], source: AudioSource) -> dict[str, list[int]]:
    if isinstance(feature, datasets.ClassLabel) or all(isinstance(t, (int, np.integer)) for t in all_train):
        return {role: [int(t) for t in values] for role, values in targets.items()}
    names = sorted(set(all_train))
    ids = {name: i for i, name in enumerate(names)}
    unseen = sorted(set(targets["eval"]) - set(ids))
    if unseen:
        raise ValueError(f"{source.path}: held-out classes never seen in training: {unseen[:5]} (of {len(unseen)}). "
                         "Use a split where every held-out class is trained on (VoxCeleb1: the SUPERB SI split).")
    return {role: [ids[t] for t in values] for role, values in targets.items()}
