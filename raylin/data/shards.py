"""Token shards: a language-model corpus tokenised and packed once by Ray Data, read memory-mapped.

A corpus larger than memory (the Pile, a Hub text set, local JSONL / parquet / text files) is never
held by a training worker. It is read as a Ray Data dataset of documents, tokenised by
``map_batches`` tasks spread over the cluster (each document followed by EOS), and packed in
document order into non-overlapping windows of ``data.max_length`` tokens, which the driver writes
as fixed-size shard files:

    <shards_dir>/<key>/manifest.json          format, dtype, window length, rows per shard file
    <shards_dir>/<key>/tokens-00000.bin ...   windows x max_length tokens (uint16, or uint32 for
                                              vocabularies above 65,536), C order, no header

``key`` fingerprints the tokenizer, the source (local files by path, size and modification time;
Hub sets by id, config, split and revision), the window length and the window cap, so a folder is
built once and every worker, teacher replica and resumed run reads the same windows: window ``i``
is a fixed row of a fixed file, and ``raylin.data.batch_order.GlobalBatches`` addresses windows by step.
Readers open the files with ``numpy.memmap``; a batch copies only its own rows, so a worker's
memory does not grow with the corpus.

Caps: ``data.max_train_examples`` and ``data.max_eval_examples`` keep the *first* windows in source
order (the build stops there, so a stream is read only that far), not a seeded subset as for
in-memory corpora: shuffle a corpus before pointing raylin at it if its order is not random (the
Pile's is).

Limits: windows span document boundaries (EOS separates documents) and the last partial window is
dropped. Ray Data reads in parallel but keeps the source order (``preserve_order``), so the
windows depend on the documents only, not on how the work was split. On several machines
``shards_dir`` must be storage every node sees (a shared file system): the driver writes the files;
a worker that does not find them says so. ``shards_dir`` defaults to the run's data cache
(``$RAYLIN_CACHE/token_shards``).
"""

from __future__ import annotations

import functools
import glob
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from filelock import FileLock

from raylin.assets import cache_dir
from raylin.atomic import build_once, write_text_atomic
from raylin.fingerprint import fingerprint

log = logging.getLogger(__name__)

SHARD_FORMAT = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 64 * 2**20  # about this much per shard file
DOCUMENTS_PER_TASK = 256  # documents one tokenising task takes at a time
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class CorpusSource:
    """Where a language-model corpus lives (``data.source`` for ``data.name: corpus``).

    ``path``: a local file, a folder, a glob (``data/*.jsonl``), a Hub data set id, or a ``datasets``
    builder (``json``, ``parquet``, ``text``) with ``data_files`` (``{train: ..., validation: ...}``,
    local paths or URLs). Local files are ``.txt`` (one document per file), ``.jsonl`` / ``.json``
    (records) or ``.parquet``, all of one kind; ``eval_path``: a local corpus's held-out files.
    ``split`` / ``eval_split``: a Hub set's (or builder's) splits, streamed, never downloaded whole.
    ``text_column``: the column holding the text."""

    path: str
    eval_path: str | None = None
    name: str | None = None
    split: str = "train"
    eval_split: str = "validation"
    revision: str | None = None
    data_files: Any = None
    text_column: str = "text"

    @property
    def local(self) -> bool:
        """A local corpus: its path exists, or reads as a path (``./``, ``/``, ``~``, a glob, a file suffix)."""
        return (bool(_expand(self.path)) or self.path.startswith((".", "/", "~")) or "*" in self.path
                or Path(self.path).suffix.lower() in LOCAL_SUFFIXES)


PILE = CorpusSource("monology/pile-uncopyrighted")  # the Pile without its copyrighted parts


def corpus_source(source: dict[str, Any] | None) -> CorpusSource:
    """``data.source`` checked: its keys, and for a local corpus that its files exist and are one kind."""
    known = [f.name for f in fields(CorpusSource)]
    if not isinstance(source, dict) or not source.get("path"):
        raise ValueError("data.name corpus needs data.source.path: local .txt / .jsonl / .json / .parquet files (a file, "
                         "folder or glob) with data.source.eval_path for the held-out text, or a Hub data set id.")
    unknown = sorted(set(source) - set(known))
    if unknown:
        raise ValueError(f"Unknown data.source key(s) {unknown}; known: {known}.")
    parsed = CorpusSource(**source)
    if parsed.local:
        if parsed.eval_path is None:
            raise ValueError("data.source.eval_path is missing: a local corpus needs held-out files for its perplexity "
                             "(files of the same kind as data.source.path).")
        for key in ("path", "eval_path"):
            local_files(getattr(parsed, key), f"data.source.{key}")
    elif parsed.eval_path is not None:
        raise ValueError(f"data.source.eval_path is for local corpora, but data.source.path {parsed.path!r} is a Hub id "
                         "(or a local path that does not exist): give data.source.eval_split for a Hub set.")
    return parsed


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    return sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())


def local_files(pattern: str, key: str = "data.source.path") -> list[Path]:
    """The files of a local corpus path (file, folder or glob), sorted; all of one supported kind."""
    files = _expand(pattern)
    if not files:
        raise ValueError(f"{key} {pattern!r} names no file; give a file, a folder or a glob of "
                         f"{', '.join(LOCAL_SUFFIXES)} files.")
    kinds = {file.suffix.lower() for file in files}
    if len(kinds) > 1 or not kinds <= set(LOCAL_SUFFIXES):
        raise ValueError(f"{key} {pattern!r} holds files of kinds {sorted(kinds)}; a corpus is files of one kind "
                         f"({', '.join(LOCAL_SUFFIXES)}).")
    return files


# ----- identity -------------------------------------------------------------------------------------


def _source_identity(source: CorpusSource, role: str) -> dict[str, Any]:
    """What the documents of ``role`` ("train" / "eval") depend on."""
    if source.local:
        files = local_files(source.path if role == "train" else source.eval_path)
        return {"files": [f"{file.resolve()}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in files],
                "text_column": source.text_column}
    return {"hub": source.path, "name": source.name, "revision": source.revision, "data_files": source.data_files,
            "split": source.split if role == "train" else source.eval_split, "text_column": source.text_column}


def separator_of(tokenizer) -> list[int]:
    """What follows every document: EOS, when the tokenizer has one."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def shard_key(tokenizer, source: CorpusSource, role: str, max_length: int, max_windows: int | None) -> str:
    tokenizer_identity = (tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "backend_tokenizer", None) is not None
                          else {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())})
    return fingerprint({"format": SHARD_FORMAT, "tokenizer": tokenizer_identity, "separator": separator_of(tokenizer),
                        "source": _source_identity(source, role), "max_length": max_length, "max_windows": max_windows}, 24)


def shards_root(data) -> Path:
    """Where a run's token shards live: ``data.shards_dir``, else the data cache."""
    return Path(data.shards_dir).expanduser() if data.shards_dir else cache_dir() / "token_shards"


# ----- reading documents with Ray Data ---------------------------------------------------------------


def read_documents(source: CorpusSource, role: str) -> ray.data.Dataset:
    """The documents of ``role`` as a Ray Data dataset with one ``text`` column, in source order."""
    if source.local:
        files = [str(file) for file in local_files(source.path if role == "train" else source.eval_path)]
        suffix = Path(files[0]).suffix.lower()
        if suffix == ".txt":  # one document per file
            return ray.data.read_binary_files(files).map_batches(_decode_text, batch_format="numpy")
        if suffix == ".parquet":
            documents = ray.data.read_parquet(files, columns=[source.text_column])
        else:
            documents = ray.data.read_json(files, lines=suffix == ".jsonl")
    else:
        documents = ray.data.read_datasource(StreamedDocuments(source, role))
    return documents.select_columns([source.text_column]).rename_columns({source.text_column: "text"})


def _stream(source: CorpusSource, role: str) -> datasets.IterableDataset:
    split = source.split if role == "train" else source.eval_split
    try:
        return datasets.load_dataset(source.path, source.name, split=split, revision=source.revision,
                                     data_files=source.data_files, streaming=True)
    except (ConnectionError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"Could not stream {source.path!r} ({split}) from the Hugging Face Hub: {error}. It needs network access; "
            "offline, point data.source.path at local files (or use data.name austen).") from error


class StreamedDocuments(ray.data.Datasource):
    """A streamed ``datasets`` split read by one Ray task per file shard of the stream, in stream order.

    ``ray.data.from_huggingface`` reads a stream in a single task (after asking the Hub for a
    parquet export, which fails offline); a corpus such as the Pile is 30 files, so each task here
    streams its own (``IterableDataset.shard``) and the tokenising tasks downstream are fed in
    parallel."""

    BATCH_ROWS = 1024

    def __init__(self, source: CorpusSource, role: str):
        self.source, self.role = source, role
        self.num_shards = _stream(source, role).n_shards  # fails here, on the driver, when the set is out of reach

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        def read(index: int):
            part = _stream(self.source, self.role).shard(num_shards=self.num_shards, index=index, contiguous=True)
            rows = []
            for row in part:
                rows.append(str(row[self.source.text_column]))
                if len(rows) == self.BATCH_ROWS:
                    yield pa.table({self.source.text_column: rows})
                    rows = []
            if rows:
                yield pa.table({self.source.text_column: rows})

        metadata = ray.data.block.BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None)
        return [ray.data.ReadTask(functools.partial(read, index), metadata, per_task_row_limit=per_task_row_limit)
                for index in range(self.num_shards)]


def _decode_text(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"text": np.array([raw.decode("utf-8", errors="replace") for raw in batch["bytes"]], dtype=object)}


def _tokenize(batch: dict[str, np.ndarray], tokenizer, dtype: str) -> dict[str, np.ndarray]:
    """A batch of documents as one token stream (one row): each document, then the separator."""
    texts = [str(text) for text in batch["text"]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    separator = separator_of(tokenizer)
    stream = np.fromiter((token for document in ids for token in (*document, *separator)), dtype=np.dtype(dtype))
    out = np.empty(1, dtype=object)
    out[0] = stream
    return {"tokens": out}


@contextmanager
def _ordered_execution() -> Iterator[None]:
    """Ray Data keeps the source order while this holds (its default lets fast tasks overtake), and
    below raylin's --verbose its start-up and progress log lines stay off the console (its progress
    bar, on a terminal, stays)."""
    context = ray.data.DataContext.get_current()
    data_log = logging.getLogger("ray.data")
    before = (context.execution_options.preserve_order, data_log.level)
    context.execution_options.preserve_order = True
    if not log.isEnabledFor(logging.DEBUG):
        data_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        context.execution_options.preserve_order = before[0]
        data_log.setLevel(before[1])


# ----- building and opening --------------------------------------------------------------------------


def token_dtype(tokenizer) -> str:
    return "uint16" if len(tokenizer) <= 2**16 else "uint32"


def build_shards(folder: Path, source: CorpusSource, role: str, tokenizer, max_length: int,
                 max_windows: int | None) -> dict[str, Any]:
    """Tokenise the documents of ``source``'s ``role`` split with Ray Data and write their windows
    under ``folder`` (see the module doc); returns the manifest."""
    dtype = token_dtype(tokenizer)
    rows_per_shard = max(1, SHARD_BYTES // (max_length * np.dtype(dtype).itemsize))
    shards: list[int] = []  # rows of each shard file
    pending: list[np.ndarray] = []
    pending_tokens = total = 0

    def write(rows: np.ndarray) -> None:
        (folder / f"tokens-{len(shards):05d}.bin").write_bytes(np.ascontiguousarray(rows).tobytes())
        shards.append(len(rows))

    def flush(final: bool) -> None:
        nonlocal pending, pending_tokens, total
        stream = np.concatenate(pending) if pending else np.empty(0, dtype=dtype)
        count = len(stream) // max_length
        if max_windows is not None:
            count = min(count, max_windows - total)
        full = count if final else count // rows_per_shard * rows_per_shard
        for start in range(0, full, rows_per_shard):
            write(stream[start * max_length: min(full, start + rows_per_shard) * max_length].reshape(-1, max_length))
        total += full
        rest = stream[full * max_length:]
        pending, pending_tokens = [rest], len(rest)

    with _ordered_execution():  # the datasets take the context in force when they are made
        tokenized = read_documents(source, role).map_batches(_tokenize, fn_kwargs={"tokenizer": tokenizer, "dtype": dtype},
                                          batch_size=DOCUMENTS_PER_TASK, batch_format="numpy")
        for batch in tokenized.iter_batches(batch_size=None, batch_format="numpy"):
            for stream in batch["tokens"]:
                pending.append(stream)
                pending_tokens += len(stream)
            if pending_tokens >= rows_per_shard * max_length:
                flush(final=False)
            if max_windows is not None and total >= max_windows:
                break
        flush(final=True)
    manifest = {"format": SHARD_FORMAT, "dtype": dtype, "max_length": max_length, "windows": sum(shards), "shards": shards}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def corpus_windows(data, tokenizer, source: CorpusSource, role: str, max_windows: int | None) -> TokenWindows:
    """The windows of ``source``'s ``role`` split: opened if built, else built first (once: concurrent
    callers wait for the first, across processes and nodes sharing the folder). Building joins the
    running Ray cluster, or starts a local one; raylin builds on the driver before any worker or
    teacher replica starts (``raylin.data.task_data.prepare_task_data``), as Ray Data's tasks need free CPUs."""
    folder = shards_root(data) / shard_key(tokenizer, source, role, data.max_length, max_windows)
    if not (folder / MANIFEST).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(folder.parent / f".{folder.name}.lock"):  # one builder; the others find it built
            if not (folder / MANIFEST).is_file():
                if not ray.is_initialized():
                    ray.init(include_dashboard=False, log_to_driver=False)
                log.info("tokenising %s (%s) into token shards under %s", source.path, role, folder)
                build_once(folder, MANIFEST, lambda staging: build_shards(
                    staging, source, role, tokenizer, data.max_length, max_windows))
    windows = TokenWindows(folder)
    if not len(windows):
        raise ValueError(f"data.source {source.path!r} ({role}) holds fewer than {data.max_length} tokens: not one "
                         "window of data.max_length; give more text or a shorter data.max_length.")
    return windows


class TokenWindows(Sequence):
    """The windows of a shard folder, memory-mapped: ``windows[indices]`` is a (len(indices),
    max_length) LongTensor copied from the files (``windows[i]``: one window); nothing else is read
    into memory."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"No token shards at {self.folder}: on several machines data.shards_dir must be a "
                                    "folder every node sees (the driver writes it).")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != SHARD_FORMAT:
            raise ValueError(f"{manifest_path} is token-shard format {manifest.get('format')}, this raylin reads "
                             f"{SHARD_FORMAT}: delete the folder to rebuild it.")
        self.max_length = manifest["max_length"]
        self._maps = [np.memmap(self.folder / f"tokens-{i:05d}.bin", dtype=manifest["dtype"], mode="r", shape=(rows, self.max_length))
                      for i, rows in enumerate(manifest["shards"])]
        self._starts = np.cumsum([0] + list(manifest["shards"]))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, indices) -> torch.Tensor:
        if isinstance(indices, (int, np.integer)):
            return self[[indices]][0]
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"window index out of range 0..{len(self) - 1}")
        rows = np.where(rows < 0, rows + len(self), rows)
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        out = np.empty((len(rows), self.max_length), dtype=np.int64)
        for index in np.unique(shard):
            mine = shard == index
            out[mine] = self._maps[index][rows[mine] - self._starts[index]]
        return torch.from_numpy(out)
