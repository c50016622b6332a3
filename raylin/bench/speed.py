"""Forward latency and peak memory of teachers and students at long sequence lengths (CPU).

For a BERT-family and a Llama-family teacher of the same width (random weights; the shipped
checkpoints stop at 512 / 8192 positions), and each student of each, this measures

* ``scope: mixer``: the teacher's attention module alone against each mixer alone, called the way
  the block calls it; the teacher's module runs under transformers' ``sdpa`` (the default: on CPU
  a fused kernel whose memory grows linearly) and, as ``teacher-eager``, under ``eager`` (the
  attention scores are materialised, memory grows with the square of the length);
* ``scope: model``: whole models, plus each teacher with attention replaced by identity
  (``model: "<teacher>-no-attention"``), which bounds the speed-up any mixer can bring (Amdahl).

Each is measured on an unpadded sequence and on a padded one (``input: "padded"``: the last
token is padding, so attention gets a mask, as in any padded batch).

Latency and peak memory are raylin.timing's: the best of ``repeats`` timed runs, and the largest
amount of tensor memory the call holds at once, from a separate profiled run. Limits: batch 1,
fp32, one process, the threads torch is given; numbers depend on the machine.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from raylin.atomic import write_text_atomic
from raylin.bench import SHIPPED_CONFIGS
from raylin.config import config_from_dict
from raylin.convert import convert
from raylin.task_model import WHISPER_POSITIONS_PER_SECOND, load_task_model
from raylin.models.families import family_for
from raylin.plots import colours, figure
from raylin.tasks import task_kind
from raylin.timing import measure

_log = logging.getLogger(__name__)

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
STUDENT_PLANS = {
    "bert": {
        "linformer": {"mixer": "linformer", "linformer": {"k": 256, "share": "kv"}},
        "bimamba": {"mixer": "bimamba"},
        "bimamba2": {"mixer": "bimamba2"},
        "bigated_deltanet": {"mixer": "bigated_deltanet"},
    },
    "llama": {
        "mamba": {"mixer": "mamba"},
        "mamba2": {"mixer": "mamba2"},
        "gated_deltanet": {"mixer": "gated_deltanet"},
    },
}


INPUTS = ("unpadded", "padded")


@dataclass
class SpeedRecord:
    model: str  # "teacher" | mixer name | "<teacher>-no-attention"
    family: str
    scope: str  # "mixer" | "model"
    seq_len: int
    latency_s: float
    peak_mem_mb: float
    input: str = "unpadded"  # "padded": the last token is padding, so attention gets a mask


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


def _attention_call(
    family_name: str,
    model: nn.Module,
    module: nn.Module,
    hidden: torch.Tensor,
    padding_mask: torch.Tensor | None,
    implementation: str = "sdpa",
) -> Callable[[], object]:
    """How the block calls its attention module, with the mask transformers would build: none
    for an unpadded sdpa call (its fused kernel then applies causality itself), a boolean 4D mask
    for sdpa with padding, an additive float 4D mask for eager attention."""
    seq_len = hidden.shape[1]
    allowed = None
    if padding_mask is not None:
        allowed = padding_mask.bool()[:, None, None, :].expand(-1, 1, seq_len, -1)
    if family_name == "llama" and (allowed is not None or implementation == "eager"):
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        allowed = causal if allowed is None else allowed & causal
    mask = allowed
    if implementation == "eager" and allowed is not None:
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if family_name == "llama":
        position_embeddings = model.rotary_emb(hidden, torch.arange(seq_len).unsqueeze(0))
        return lambda: module(hidden, attention_mask=mask, position_embeddings=position_embeddings)
    return lambda: module(hidden, attention_mask=mask)


def run_speed_benchmark(
    out_dir: str | Path,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    hidden: int = 256,
    layers: int = 2,
    repeats: int = 2,
    inputs: tuple[str, ...] = INPUTS,
    log: Callable[[str], None] = _log.info,
) -> list[SpeedRecord]:
    """Measure every (model, scope, length) and write speed.json and speed.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    records: list[SpeedRecord] = []
    teachers = bench_teachers(hidden, layers, max(lengths))
    for family_name, teacher in teachers.items():
        family = family_for(teacher)
        plans = copy.deepcopy(STUDENT_PLANS[family_name])
        if "linformer" in plans:  # k cannot exceed the longest input
            plans["linformer"]["linformer"]["k"] = min(plans["linformer"]["linformer"]["k"], max(lengths))
        students = {name: convert(teacher, plan)[0] for name, plan in plans.items()}
        no_attention = copy.deepcopy(teacher)
        for layer in family.layers(no_attention):
            family.set_attention(layer, _Identity())
        models = {"teacher": teacher, **{n: s.model for n, s in students.items()}, f"{family_name}-no-attention": no_attention}
        # The same attention module run by transformers' eager implementation (scores materialised).
        eager = copy.deepcopy(family.attention(family.layers(teacher)[0]))
        eager.config = copy.deepcopy(eager.config)
        eager.config._attn_implementation = "eager"
        for seq_len, kind in itertools.product(lengths, inputs):
            hidden_states = torch.randn(1, seq_len, hidden)
            input_ids = torch.randint(0, 1000, (1, seq_len))
            padding_mask = None
            if kind == "padded":
                padding_mask = torch.ones(1, seq_len, dtype=torch.long)
                padding_mask[:, -1] = 0
            call = _attention_call(family_name, teacher, eager, hidden_states, padding_mask, "eager")
            latency, peak = measure(call, repeats)
            records.append(SpeedRecord("teacher-eager", family_name, "mixer", seq_len, latency, peak, kind))
            for name, model in models.items():
                if not name.endswith("no-attention"):
                    module = family.attention(family.layers(model)[0])
                    call = _attention_call(family_name, teacher, module, hidden_states, padding_mask)
                    latency, peak = measure(call, repeats)
                    records.append(SpeedRecord(name, family_name, "mixer", seq_len, latency, peak, kind))
                latency, peak = measure(lambda m=model: m(input_ids=input_ids, attention_mask=padding_mask), repeats)
                records.append(SpeedRecord(name, family_name, "model", seq_len, latency, peak, kind))
                log(f"{family_name:6s} {kind:8s} {name:20s} L={seq_len:6d} model {latency:8.3f}s {peak:9.1f} MB")
            _write(out, records)
    _write(out, records)
    return records


def _write(out: Path, records: list[SpeedRecord]) -> None:
    write_text_atomic(out / "speed.json", json.dumps([r.__dict__ for r in records], indent=1))
    plot_speed(records, out / "speed.png")


def plot_speed(records: list[SpeedRecord], path: Path) -> None:
    panels = sorted({(r.family, r.input) for r in records})
    colour = colours(list(dict.fromkeys(r.model for r in records)))
    with figure(path, rows=len(panels), cols=4, size=(5, 4.2)) as axes:
        for row, (family_name, kind) in enumerate(panels):
            for col, (scope, metric) in enumerate(
                [("mixer", "latency_s"), ("mixer", "peak_mem_mb"), ("model", "latency_s"), ("model", "peak_mem_mb")]
            ):
                ax = axes[row][col]
                chosen = [r for r in records if (r.family, r.input, r.scope) == (family_name, kind, scope)]
                for name in dict.fromkeys(r.model for r in chosen):
                    points = sorted((r.seq_len, max(getattr(r, metric), 1e-3)) for r in chosen if r.model == name)
                    ax.plot(*zip(*points), marker="o", label=name, color=colour[name],
                            linestyle="--" if "no-attention" in name else "-")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length (tokens)")
                ax.set_ylabel("latency (s)" if metric == "latency_s" else "peak memory (MB)")
                ax.set_title(f"{family_name}, {kind}: {scope} {'latency' if metric == 'latency_s' else 'memory'}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)


def summarize(records: list[SpeedRecord]) -> dict[str, dict]:
    """Per family, input and student: the length from which it is faster than the teacher at
    every measured length, and speed-up / memory ratio at the longest length; for whole models
    also the Amdahl limit (teacher vs teacher without attention) and the fraction reached."""
    summary: dict[str, dict] = {}
    longest = max(r.seq_len for r in records)
    by_key = {(r.family, r.input, r.model, r.scope, r.seq_len): r for r in records}
    for family_name, kind in sorted({(r.family, r.input) for r in records}):
        names = {r.model for r in records if (r.family, r.input) == (family_name, kind)}
        for name in sorted(n for n in names if not n.startswith("teacher") and not n.endswith("no-attention")):
            entry: dict[str, dict] = {}
            for scope in ("mixer", "model"):
                get = lambda model, length: by_key[(family_name, kind, model, scope, length)]
                lengths = sorted(r.seq_len for r in records
                                 if (r.family, r.input, r.model, r.scope) == (family_name, kind, name, scope))
                faster = {L for L in lengths if get(name, L).latency_s < get("teacher", L).latency_s}
                crossover = next((L for L in lengths if all(x in faster for x in lengths if x >= L)), None)
                student, teacher = get(name, longest), get("teacher", longest)
                entry[scope] = {
                    "faster_from": crossover,
                    f"speedup_at_{longest}": round(teacher.latency_s / student.latency_s, 2),
                    f"memory_ratio_at_{longest}": round(teacher.peak_mem_mb / max(student.peak_mem_mb, 1e-6), 2),
                }
                if scope == "mixer":
                    eager = get("teacher-eager", longest)
                    faster = {L for L in lengths if get(name, L).latency_s < get("teacher-eager", L).latency_s}
                    entry[scope] |= {
                        "faster_than_eager_from": next((L for L in lengths if all(x in faster for x in lengths if x >= L)), None),
                        f"speedup_vs_eager_at_{longest}": round(eager.latency_s / student.latency_s, 2),
                        f"memory_ratio_vs_eager_at_{longest}": round(eager.peak_mem_mb / max(student.peak_mem_mb, 1e-6), 2),
                    }
            no_attention = by_key[(family_name, kind, f"{family_name}-no-attention", "model", longest)]
            limit = by_key[(family_name, kind, "teacher", "model", longest)].latency_s / no_attention.latency_s
            entry["model"]["amdahl_limit"] = round(limit, 2)
            entry["model"]["fraction_of_limit"] = round(entry["model"][f"speedup_at_{longest}"] / limit, 2)
            summary[f"{family_name}/{kind}/{name}"] = entry
    return summary


# ----- the shipped models at their real widths ---------------------------------------------------

# (config, lengths to time): each shipped config's student at the lengths its config uses and, for
# text, from 512 tokens; Whisper also at its native 1,500 positions (30 s of audio).
SHIPPED = (
    (SHIPPED_CONFIGS / "minilm-rt-linformer.yaml", (64, 128, 512)),
    (SHIPPED_CONFIGS / "smollm2-austen-mamba2.yaml", (256, 512, 2048)),
    (SHIPPED_CONFIGS / "whisper-tiny-digits-bimamba2.yaml", (100, 1500)),
)
DECODE_STEPS = 16


@dataclass
class ShippedRecord:
    config: str  # the shipped config's file name
    model: str  # "teacher" | "student"
    mode: str  # "forward" (prefill for causal models) | "decode" (per new token, after `seq_len`) | "compiled"
    # ("compiled": the forward under torch.compile's inductor CPU backend, timed after compilation)
    dtype: str  # "float32" | "bfloat16" (weights and activations)
    seq_len: int  # tokens, or encoder positions for speech
    latency_s: float
    peak_mem_mb: float


def _shipped_pair(data: dict, positions: int | None):
    """The teacher of a shipped config (its parsed YAML ``data``) with its task head, and the student
    its plan converts it into; ``positions`` sizes a speech encoder (None: the config's own)."""
    # Speed needs the architecture only: the (pre-trained) teacher, not the fine-tuned target one.
    data = data | {"target_teacher": None, "guidance": {"mode": "unguided"}}
    overrides = [] if positions is None else [f"data.max_seconds={positions / WHISPER_POSITIONS_PER_SECOND}"]
    config = config_from_dict(data, overrides)
    teacher, processor = load_task_model(config, config.teacher)
    torch.manual_seed(0)
    student, _ = convert(teacher, config.plan, processor)
    return config, teacher.eval(), student.eval()


def _inputs(teacher: nn.Module, seq_len: int) -> dict[str, torch.Tensor]:
    if getattr(teacher.config, "model_type", "") == "whisper":
        return {"input_features": torch.randn(1, teacher.config.num_mel_bins, 2 * seq_len)}
    return {"input_ids": torch.randint(100, teacher.config.vocab_size, (1, seq_len))}


def _decode_latency(model: nn.Module, input_ids: torch.Tensor, is_student: bool) -> float:
    """Seconds per new token after a prompt of ``input_ids``: the mean of DECODE_STEPS one-token
    steps on the model's cache (key/value cache for the teacher, recurrent state for the student)."""
    with torch.inference_mode():
        if is_student:
            cache = model.new_cache()
            output = model(input_ids=input_ids, past_key_values=cache)
        else:
            output = model(input_ids=input_ids, use_cache=True)
            cache = output.past_key_values
        token = output.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            if is_student:
                output = model(input_ids=token, past_key_values=cache)
            else:
                output = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache = output.past_key_values
            token = output.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / DECODE_STEPS


def _compiled_latency(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """Best-of-``repeats`` seconds of ``model``'s forward under ``torch.compile`` (inductor, CPU: a
    C++ compiler must be installed), after a first call that compiles it. The compiled graph breaks
    where the SSD scan picks its factored or exact decay path (a data-dependent branch)."""
    compiled = torch.compile(model)
    with torch.inference_mode():
        compiled(**inputs)
        latency, _ = measure(lambda: compiled(**inputs), repeats, memory=False)
    torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next model
    return latency


def run_shipped_benchmark(
    out_dir: str | Path,
    shipped: tuple[tuple[str | Path, tuple[int, ...]], ...] = SHIPPED,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    repeats: int = 3,
    log: Callable[[str], None] = _log.info,
    compiled: bool = True,
) -> list[ShippedRecord]:
    """Time every shipped config's teacher and student at the config's lengths, per dtype; causal
    models also per decoded token; with ``compiled``, both also under ``torch.compile`` (fp32, each
    config's longest length: compiling takes about 45 s a model here). Writes shipped-speed.json
    into ``out_dir``.

    bf16 casts weights and activations (the scan and the norms still compute in fp32). Limits:
    batch 1, random inputs, the threads torch is given; bf16 is timed at each config's shortest
    length only (on CPUs without AVX-512 BF16 / AMX it runs far slower than fp32)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    records: list[ShippedRecord] = []
    for config_path, lengths in shipped:
        name = Path(config_path).name
        data = yaml.safe_load(Path(config_path).read_text())
        # A speech encoder is built for its positions (Whisper's table is cut): one pair per length.
        if task_kind(data["task"]["type"]).speech:
            pairs = {seq_len: _shipped_pair(data, seq_len) for seq_len in lengths}
        else:
            pairs = dict.fromkeys(lengths, _shipped_pair(data, None))
        for dtype_name, seq_len in itertools.product(dtypes, lengths):
            if dtype_name != "float32" and seq_len != min(lengths):
                continue
            config, teacher, student = pairs[seq_len]
            dtype = getattr(torch, dtype_name)
            inputs = _inputs(teacher, seq_len)
            for role, model in (("teacher", teacher), ("student", student)):
                # A cast copy: rounding the shared fp32 weights would change later cells.
                model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
                cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
                latency, peak = measure(lambda m=model: m(**cast), repeats)
                records.append(ShippedRecord(name, role, "forward", dtype_name, seq_len, latency, peak))
                log(f"{name:40s} {role:8s} {dtype_name:9s} L={seq_len:5d} forward {latency * 1e3:9.2f} ms")
                if config.task_kind.language_model:
                    step = _decode_latency(model, cast["input_ids"], role == "student")
                    records.append(ShippedRecord(name, role, "decode", dtype_name, seq_len, step, 0.0))
                    log(f"{name:40s} {role:8s} {dtype_name:9s} L={seq_len:5d} decode  {step * 1e3:9.2f} ms/token")
                if compiled and dtype == torch.float32 and seq_len == max(lengths):
                    latency = _compiled_latency(model, cast, repeats)
                    records.append(ShippedRecord(name, role, "compiled", dtype_name, seq_len, latency, 0.0))
                    log(f"{name:40s} {role:8s} {dtype_name:9s} L={seq_len:5d} compiled {latency * 1e3:8.2f} ms")
            write_text_atomic(out / "shipped-speed.json", json.dumps([r.__dict__ for r in records], indent=1))
    return records


def summarize_shipped(records: list[ShippedRecord]) -> list[dict]:
    """Teacher / student latency ratio (the student's speed-up) per config, mode, dtype and length."""
    by_key = {(r.config, r.model, r.mode, r.dtype, r.seq_len): r for r in records}
    rows = []
    for config, _, mode, dtype, seq_len in sorted({k for k in by_key if k[1] == "teacher"}):
        student = by_key.get((config, "student", mode, dtype, seq_len))
        if student is None:
            continue
        teacher = by_key[(config, "teacher", mode, dtype, seq_len)]
        fp32 = by_key.get((config, "student", mode, "float32", seq_len))
        rows.append({
            "config": config, "mode": mode, "dtype": dtype, "seq_len": seq_len,
            "teacher_ms": round(teacher.latency_s * 1e3, 2), "student_ms": round(student.latency_s * 1e3, 2),
            "speedup": round(teacher.latency_s / student.latency_s, 2),
            "student_bf16_over_fp32": None if dtype == "float32" or fp32 is None else round(fp32.latency_s / student.latency_s, 2),
        })
        eager = by_key.get((config, "student", "forward", dtype, seq_len))
        if mode == "compiled" and eager is not None:
            rows[-1]["student_compiled_over_eager"] = round(eager.latency_s / student.latency_s, 2)
    return rows
