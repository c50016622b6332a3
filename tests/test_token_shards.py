"""Token shards (raylin.data.shards): corpora tokenised once by Ray Data, read memory-mapped.

Properties: the windows equal the in-memory tokenisation of the same documents exactly, for every
local file kind and for a streamed ``datasets`` split, however Ray Data splits the work; caps keep
the first windows; a folder is built once and rebuilt when its source changes; a worker's memory
does not grow with the corpus; bad sources are refused before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from conftest import require_asset

from raylin.config import ConfigError, config_from_dict
from raylin.data import shards
from raylin.data.batch_order import GlobalBatches
from raylin.data.shards import MANIFEST, CorpusSource, TokenWindows, corpus_source, corpus_windows
from raylin.data.task_data import _token_ids, load_task_data, token_windows

pytestmark = pytest.mark.usefixtures("ray_cluster")
WORDS = ("the quiet river ran past a mill where seven sisters kept bees and argued about the price of wheat "
         "while an old dog slept under the bench").split()
LENGTH = 32


def documents(count: int, seed: int, longest: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(5, longest))) for _ in range(count)]


def write_corpus(folder: Path, kind: str, texts: list[str], files: int = 1) -> str:
    """``texts`` as ``files`` local files of ``kind``; returns the path (file, folder or glob) to give."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "txt":  # one document per file, read in file-name order
        for i, text in enumerate(texts):
            (folder / f"doc-{i:05d}.txt").write_text(text)
        return str(folder)
    parts = np.array_split(np.arange(len(texts)), files)
    for i, rows in enumerate(parts):
        frame = pd.DataFrame({"text": [texts[r] for r in rows], "id": rows})
        if kind == "parquet":
            frame.to_parquet(folder / f"part-{i:02d}.parquet")
        else:
            frame.to_json(folder / f"part-{i:02d}.jsonl", orient="records", lines=True)
    return str(folder / f"part-*.{kind}") if files > 1 else str(folder / f"part-00.{kind}")


@pytest.fixture(scope="module")
def tokenizer():
    require_asset("smollm2-135m")
    from raylin.assets import asset_path

    return transformers.AutoTokenizer.from_pretrained(asset_path("smollm2-135m"))


class Data:  # the data settings corpus_windows reads
    def __init__(self, root: Path, max_length: int = LENGTH):
        self.shards_dir, self.max_length = str(root), max_length


def expected(tokenizer, texts: list[str], length: int = LENGTH) -> torch.Tensor:
    """What the in-memory path makes of the same documents."""
    return token_windows(_token_ids(tokenizer, texts, cache=False), length)


def every(windows) -> torch.Tensor:
    return windows[list(range(len(windows)))]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_shards_equal_the_in_memory_windows(tmp_path, tokenizer, kind):
    texts = documents(60, seed=1)
    path = write_corpus(tmp_path / "corpus", kind, texts)
    heldout = write_corpus(tmp_path / "heldout", kind, documents(10, seed=2))
    source = corpus_source({"path": path, "eval_path": heldout})
    windows = corpus_windows(Data(tmp_path / "shards"), tokenizer, source, "train", None)
    assert isinstance(windows, TokenWindows)
    assert torch.equal(every(windows), expected(tokenizer, texts))
    assert torch.equal(windows[3], expected(tokenizer, texts)[3])  # one window


def test_order_is_the_documents_whatever_the_split_of_work(tmp_path, tokenizer, monkeypatch):
    """Many files, many small tokenising tasks and many shard files: still the documents' order."""
    texts = documents(300, seed=3)
    path = write_corpus(tmp_path / "corpus", "jsonl", texts, files=5)
    monkeypatch.setattr(shards, "DOCUMENTS_PER_TASK", 7)
    monkeypatch.setattr(shards, "SHARD_BYTES", 100 * LENGTH * 2)  # 100 windows of uint16 per file
    source = CorpusSource(path, eval_path=path)
    windows = corpus_windows(Data(tmp_path / "shards"), tokenizer, source, "train", None)
    manifest = json.loads((windows.folder / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) > 3
    assert torch.equal(every(windows), expected(tokenizer, texts))
    shuffled = np.random.default_rng(0).permutation(len(windows))[:40]
    assert torch.equal(windows[shuffled], expected(tokenizer, texts)[torch.from_numpy(shuffled)])


def test_a_streamed_split_equals_the_local_files_and_a_cap_keeps_the_first_windows(tmp_path, tokenizer):
    """A ``datasets`` builder streamed shard by shard (the Hub path, offline) gives the windows of
    the same files read locally; a cap stops the build after the first windows."""
    texts = documents(200, seed=4)
    path = write_corpus(tmp_path / "corpus", "jsonl", texts, files=3)
    files = sorted(str(p) for p in (tmp_path / "corpus").glob("*.jsonl"))
    streamed = corpus_source({"path": "json", "data_files": {"train": files, "validation": files[:1]}})
    assert not streamed.local
    data = Data(tmp_path / "shards")
    whole = corpus_windows(data, tokenizer, CorpusSource(path, eval_path=path), "train", None)
    capped = corpus_windows(data, tokenizer, streamed, "train", 25)
    assert len(capped) == 25 and torch.equal(every(capped), every(whole)[:25])
    assert torch.equal(every(corpus_windows(data, tokenizer, streamed, "train", None)), every(whole))


def test_built_once_and_rebuilt_when_the_source_changes(tmp_path, tokenizer):
    texts = documents(40, seed=5)
    path = write_corpus(tmp_path / "corpus", "jsonl", texts)
    source, data = CorpusSource(path, eval_path=path), Data(tmp_path / "shards")
    first = corpus_windows(data, tokenizer, source, "train", None)
    stamp = (first.folder / MANIFEST).stat().st_mtime_ns
    again = corpus_windows(data, tokenizer, source, "train", None)
    assert again.folder == first.folder and (again.folder / MANIFEST).stat().st_mtime_ns == stamp
    write_corpus(tmp_path / "corpus", "jsonl", texts[:20])  # the file changes: new windows, new folder
    changed = corpus_windows(data, tokenizer, source, "train", None)
    assert changed.folder != first.folder and torch.equal(every(changed), expected(tokenizer, texts[:20]))


def test_too_little_text_for_one_window_is_refused(tmp_path, tokenizer):
    path = write_corpus(tmp_path / "corpus", "jsonl", ["two words"])
    with pytest.raises(ValueError, match="fewer than 32 tokens"):
        corpus_windows(Data(tmp_path / "shards"), tokenizer, CorpusSource(path, eval_path=path), "train", None)


def test_bad_sources_are_refused_before_work_starts(tmp_path):
    path = write_corpus(tmp_path / "corpus", "jsonl", documents(3, seed=6))
    (tmp_path / "corpus" / "notes.parquet").write_bytes(b"")
    cases = [(None, "needs data.source.path"), ({"path": path, "colum": "x"}, r"Unknown data.source key\(s\) \['colum'\]"),
             ({"path": path}, "eval_path is missing"), ({"path": str(tmp_path / "corpus"), "eval_path": path}, "of one kind"),
             ({"path": str(tmp_path / "none-*.jsonl"), "eval_path": path}, "names no file"),
             ({"path": "owner/set", "eval_path": path}, "eval_path is for local corpora")]
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            corpus_source(source)
    base = {"teacher": "asset:smollm2-135m", "output_dir": str(tmp_path / "out"), "task": {"type": "causal_lm"},
            "plan": {"mixer": "mamba2"}, "guidance": {"mode": "unguided"}}
    with pytest.raises(ConfigError, match="eval_path is missing"):
        config_from_dict(base | {"data": {"name": "corpus", "source": {"path": path}}})
    with pytest.raises(ConfigError, match="data.source is read for data.name hub_audio or corpus only"):
        config_from_dict(base | {"data": {"name": "austen", "source": {"path": path}}})


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory, tokenizer):
    """A tiny Llama with SmolLM2's tokenizer: what a corpus run needs for its config and tokenizer."""
    folder = tmp_path_factory.mktemp("lm-teacher")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def corpus_config(teacher: str, root: Path, path: str, heldout: str, **data) -> object:
    return config_from_dict({
        "teacher": teacher, "output_dir": str(root / "out"), "task": {"type": "causal_lm"}, "plan": {"mixer": "mamba2"},
        "guidance": {"mode": "unguided"}, "eval_sets": [],
        "data": {"name": "corpus", "max_length": LENGTH, "shards_dir": str(root / "shards"),
                 "source": {"path": path, "eval_path": heldout}} | data})


def test_a_corpus_run_reads_its_batches_from_the_shards(tmp_path, tokenizer, lm_teacher):
    texts, heldout_texts = documents(120, seed=7), documents(30, seed=8)
    path = write_corpus(tmp_path / "corpus", "parquet", texts)
    heldout = write_corpus(tmp_path / "heldout", "parquet", heldout_texts)
    config = corpus_config(lm_teacher, tmp_path, path, heldout, max_train_examples=90, max_eval_examples=12)
    data = load_task_data(config, tokenizer)
    assert data.num_train == 90 and data.eval_sets == {"": 12}
    order = GlobalBatches(data.num_train, 8, seed=0)
    for step in (0, 5, 11, 12):  # a resumed run reads the same windows for the same step
        rows = order.shard(step, rank=1, world_size=2)
        batch = data.train_batch(rows)
        assert torch.equal(batch["input_ids"], expected(tokenizer, texts)[rows])
        assert torch.equal(batch["attention_mask"], torch.ones(4, LENGTH, dtype=torch.long))
    assert torch.equal(data.eval_batch("", [0, 11])["input_ids"], expected(tokenizer, heldout_texts)[[0, 11]])


# The peak as /proc reports it: ru_maxrss would carry the forking parent's peak across exec.
READER = """
import sys
from raylin.config import config_from_dict
from raylin.data.batch_order import GlobalBatches
from raylin.data.task_data import load_task_data
from raylin.models.teachers import load_processor
import json
config = config_from_dict(json.loads(sys.argv[1]))
data = load_task_data(config, load_processor(config.teacher, "text"))
order = GlobalBatches(data.num_train, 16, seed=0)
for step in range(40):
    data.train_batch(order.shard(step, 0, 2))
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])  # kB
"""


def test_worker_memory_stays_flat_when_the_corpus_grows_tenfold(tmp_path, tokenizer, lm_teacher):
    """A worker process's peak memory reading 40 steps from a corpus (0.6M tokens) and from one ten
    times larger: within 10%. The in-memory path would not be: its token list alone (a Python int and
    a list slot, 36 bytes a token, before the int64 windows) adds more than 10% for the larger one."""
    peaks, tokens = [], []
    heldout = write_corpus(tmp_path / "heldout", "jsonl", documents(20, seed=9))
    for scale in (1, 10):
        path = write_corpus(tmp_path / f"corpus-{scale}", "jsonl", documents(3_000 * scale, seed=scale, longest=400),
                            files=scale)
        config = corpus_config(lm_teacher, tmp_path, path, heldout)
        load_task_data(config, tokenizer)  # built here, on the driver, as raylin.data.task_data.prepare_task_data does
        result = subprocess.run([sys.executable, "-c", READER, json.dumps(config.to_dict())], capture_output=True, text=True,
                                check=True)
        peaks.append(int(result.stdout.split()[-1]) * 1024)
        tokens.append(load_task_data(config, tokenizer).num_train * LENGTH)
    assert tokens[1] > 9 * tokens[0] and tokens[1] * 36 > 0.1 * peaks[0]
    assert abs(peaks[1] - peaks[0]) <= 0.1 * peaks[0], peaks


def test_a_conversion_trains_on_a_sharded_corpus(tmp_path, tokenizer, lm_teacher):
    """End to end: the driver builds the shards before Ray Train's workers and the served teacher's
    replica start; both read their batches from the shards; the run scores the held-out windows."""
    from raylin.pipeline import run_conversion

    path = write_corpus(tmp_path / "corpus", "jsonl", documents(200, seed=10), files=2)
    heldout = write_corpus(tmp_path / "heldout", "jsonl", documents(20, seed=11))
    config = config_from_dict(corpus_config(lm_teacher, tmp_path, path, heldout, max_eval_examples=8).to_dict() | {
        "target_teacher": lm_teacher, "guidance": {"mode": "target"}, "loss": {"alpha_layer": 1.0, "alpha_out": 0.5},
        "train": {"num_workers": 2, "max_steps": 3, "batch_size": 4, "checkpoint_every": 3, "cpus_per_worker": 0.5,
                  "zero_stage": 0, "lr": 1e-3, "warmup_steps": 1}})
    metrics = run_conversion(config)
    assert metrics["steps"] == 3 and metrics["student"]["perplexity"] > 1
    assert metrics["teacher"]["perplexity"] > 1
    (built,) = [p for p in (tmp_path / "shards").iterdir() if p.is_dir() and len(TokenWindows(p)) > 8]  # train; eval holds 8
    assert len(TokenWindows(built)) == len(expected(tokenizer, documents(200, seed=10)))
