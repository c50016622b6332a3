"""Forward latency and peak memory of teachers and students at long sequence lengths (CPU).

For a BERT-family and a Llama-family teacher of the same width (random weights; the shipped
checkpoints stop at 512 / 8192 positions), and each student of each, this measures

* ``scope: mixer``: the teacher's attention module alone against each mixer alone, called the way
  the block calls it;
* ``scope: model``: whole models, plus each teacher with attention replaced by identity
  (``model: "<teacher>-no-attention"``), which bounds the speed-up any mixer can bring (Amdahl).

Peak memory is the process's resident high-water mark above the baseline before the call
(Linux: ``/proc/self/clear_refs`` resets it), so it counts every allocation the call makes.
Limits: batch 1, fp32, one process, the threads torch is given; numbers depend on the machine.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from raylin.convert import convert
from raylin.models.families import family_for

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
STUDENT_PLANS = {
    "bert": {
        "linformer": {"mixer": "linformer", "linformer": {"k": 256, "share": "kv"}},
        "bimamba": {"mixer": "bimamba"},
        "bimamba2": {"mixer": "bimamba2"},
    },
    "llama": {
        "mamba": {"mixer": "mamba"},
        "mamba2": {"mixer": "mamba2"},
    },
}


@dataclass
class SpeedRecord:
    model: str  # "teacher" | mixer name | "<teacher>-no-attention"
    family: str
    scope: str  # "mixer" | "model"
    seq_len: int
    latency_s: float
    peak_mem_mb: float


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(fn: Callable[[], object], repeats: int = 2) -> tuple[float, float]:
    """(best latency in seconds, peak resident memory above baseline in MB) of ``fn()``."""
    peak_mb = float("nan")
    latencies = []
    for run in range(repeats):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset the VmHWM high-water mark
            baseline = _rss_kb("VmRSS")
        except OSError:
            baseline = None
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        latencies.append(time.perf_counter() - start)
        if run == 0 and baseline is not None:
            peak_mb = max(_rss_kb("VmHWM") - baseline, 0) / 1024
    return min(latencies), peak_mb


def bench_teachers(hidden: int, layers: int, max_len: int) -> dict[str, nn.Module]:
    """A BERT-family and a Llama-family model of the same width, with random weights."""
    heads = max(hidden // 64, 1)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=1000)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**common, intermediate_size=4 * hidden, max_position_embeddings=max_len,
                                attn_implementation="sdpa"), add_pooling_layer=False)
    llama = LlamaModel(LlamaConfig(**common, intermediate_size=(8 * hidden) // 3, num_key_value_heads=heads,
                                   max_position_embeddings=max_len, attn_implementation="sdpa"))
    return {"bert": bert.eval(), "llama": llama.eval()}


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


def _attention_call(family_name: str, model: nn.Module, module: nn.Module, hidden: torch.Tensor) -> Callable[[], object]:
    """How the block calls its attention module, for a single unpadded sequence."""
    if family_name == "llama":
        position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
        position_embeddings = model.rotary_emb(hidden, position_ids)
        return lambda: module(hidden, attention_mask=None, position_embeddings=position_embeddings)
    return lambda: module(hidden, attention_mask=None)


def run_speed_benchmark(
    out_dir: str | Path,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    hidden: int = 256,
    layers: int = 2,
    repeats: int = 2,
    log: Callable[[str], None] = print,
) -> list[SpeedRecord]:
    """Measure every (model, scope, length) and write speed.json and speed.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    records: list[SpeedRecord] = []
    teachers = bench_teachers(hidden, layers, max(lengths))
    for family_name, teacher in teachers.items():
        family = family_for(teacher)
        students = {name: convert(teacher, plan)[0] for name, plan in STUDENT_PLANS[family_name].items()}
        no_attention = copy.deepcopy(teacher)
        for layer in family.layers(no_attention):
            family.set_attention(layer, _Identity())
        models = {"teacher": teacher, **{n: s.model for n, s in students.items()}, f"{family_name}-no-attention": no_attention}
        for seq_len in lengths:
            hidden_states = torch.randn(1, seq_len, hidden)
            input_ids = torch.randint(0, 1000, (1, seq_len))
            for name, model in models.items():
                if not name.endswith("no-attention"):
                    module = family.attention(family.layers(model)[0])
                    latency, peak = measure(_attention_call(family_name, teacher, module, hidden_states), repeats)
                    records.append(SpeedRecord(name, family_name, "mixer", seq_len, latency, peak))
                latency, peak = measure(lambda m=model: m(input_ids=input_ids), repeats)
                records.append(SpeedRecord(name, family_name, "model", seq_len, latency, peak))
                log(f"{family_name:6s} {name:22s} L={seq_len:6d} model {latency:8.3f}s {peak:9.1f} MB")
            _write(out, records)
    _write(out, records)
    return records


def _write(out: Path, records: list[SpeedRecord]) -> None:
    tmp = out / "speed.json.tmp"
    tmp.write_text(json.dumps([r.__dict__ for r in records], indent=1))
    os.replace(tmp, out / "speed.json")
    plot_speed(records, out / "speed.png")


def plot_speed(records: list[SpeedRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r.family for r in records})
    fig, axes = plt.subplots(len(families), 4, figsize=(20, 4.5 * len(families)), squeeze=False)
    for row, family_name in enumerate(families):
        for col, (scope, metric) in enumerate(
            [("mixer", "latency_s"), ("mixer", "peak_mem_mb"), ("model", "latency_s"), ("model", "peak_mem_mb")]
        ):
            ax = axes[row][col]
            chosen = [r for r in records if r.family == family_name and r.scope == scope]
            for name in dict.fromkeys(r.model for r in chosen):
                points = sorted((r.seq_len, getattr(r, metric)) for r in chosen if r.model == name)
                ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if "no-attention" in name else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel("latency (s)" if metric == "latency_s" else "peak memory (MB)")
            ax.set_title(f"{family_name}: {scope} {'latency' if metric == 'latency_s' else 'memory'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(records: list[SpeedRecord]) -> dict[str, dict]:
    """Crossover lengths and ratios at the longest length, per family and student."""
    summary: dict[str, dict] = {}
    longest = max(r.seq_len for r in records)
    by_key = {(r.family, r.model, r.scope, r.seq_len): r for r in records}
    for family_name in sorted({r.family for r in records}):
        for name in sorted({r.model for r in records if r.family == family_name} - {"teacher"}):
            if name.endswith("no-attention"):
                continue
            entry = {}
            for scope in ("mixer", "model"):
                lengths = sorted(r.seq_len for r in records if r.family == family_name and r.model == name and r.scope == scope)
                faster = [L for L in lengths if by_key[(family_name, name, scope, L)].latency_s
                          < by_key[(family_name, "teacher", scope, L)].latency_s]
                crossover = next((L for L in lengths if all(x in faster for x in lengths if x >= L)), None)
                student, teacher = by_key[(family_name, name, scope, longest)], by_key[(family_name, "teacher", scope, longest)]
                entry[scope] = {
                    "faster_from": crossover,
                    f"speedup_at_{longest}": teacher.latency_s / student.latency_s,
                    f"memory_ratio_at_{longest}": teacher.peak_mem_mb / max(student.peak_mem_mb, 1e-6),
                }
            limit = by_key[(family_name, "teacher", "model", longest)].latency_s / by_key[
                (family_name, f"{family_name}-no-attention", "model", longest)].latency_s
            entry["model"]["amdahl_limit"] = limit
            entry["model"]["fraction_of_limit"] = entry["model"][f"speedup_at_{longest}"] / limit
            summary[f"{family_name}/{name}"] = entry
    return summary
