"""``raylin bench scale``: what an align task holds, block-local against the whole student.

A Llama-shaped teacher with TinyLlama-1.1B's depth (22 blocks) and proportions (intermediate 2.75×
hidden, 64-wide heads, 8 query heads per key/value head) at ``hidden`` width, random weights (no
such checkpoint ships offline; at hidden 2048 it is TinyLlama's shape), with SmolLM2's tokenizer and
vocabulary, is aligned to a Mamba2 student by ``tasks`` Ray tasks, once with every task holding the
whole student (``align.holds: model``) and once with each holding only its blocks (``blocks``).
Each task runs in a process of its own; the stage records its peak resident memory, which is what
this benchmark reports (``task_peak_rss_mb``), next to the parameters each task holds. Both runs'
aligned weights are compared too (they are equal: tests/test_block_local.py).

Limits: the peak includes the process's baseline (torch, transformers, the Ray worker: measured
below as ``baseline_rss_mb``), which a small model's blocks do not dwarf; the sharded-construction,
ZeRO-stage and corpus parts of the scale benchmark (issue 22) are not here yet.

Writes scale-align.json and scale-align.png. Starts and stops its own local Ray instance.
"""

from __future__ import annotations

import importlib
import json
import logging
import resource
import tempfile
from pathlib import Path

import ray
import torch
import transformers
from safetensors.torch import load_file

from raylin.atomic import write_text_atomic
from raylin.config import config_from_dict
from raylin.data.assets import asset_path
from raylin.eval.plots import figure
from raylin.train.align import WEIGHTS_FILE, aligned_dir, run_align

log = logging.getLogger(__name__)

LAYERS = 22  # TinyLlama-1.1B's depth
TOKENIZER = "smollm2-135m"


def llama_teacher(folder: Path, hidden: int) -> transformers.LlamaConfig:
    """Save a random Llama of TinyLlama's proportions at ``hidden`` width, with SmolLM2's tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(asset_path(TOKENIZER))
    heads = max(hidden // 64, 1)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(2.75 * hidden), num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=max(heads // 8, 1), max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config


def _config(teacher: Path, out: Path, holds: str, tasks: int, steps: int) -> dict:
    return {"teacher": str(teacher), "target_teacher": str(teacher), "output_dir": str(out), "task": {"type": "causal_lm"},
            "data": {"name": "austen", "held_out": "persuasion", "max_length": 128, "max_train_examples": 64,
                     "max_eval_examples": 8},
            "plan": {"mixer": "mamba2", "init": "attention"}, "guidance": {"mode": "target"},
            "loss": {"normalization": "layernorm"},
            "align": {"enabled": True, "steps": steps, "batch_size": 2, "num_workers": tasks, "holds": holds},
            "train": {"cpus_per_worker": 0.5, "num_workers": 1},
            "teacher_service": {"mode": "served", "cpus": 0.5}}


@ray.remote(max_calls=1)
def _baseline_rss_mb() -> float:
    """A fresh Ray worker's peak after importing what an align task imports (by name: a worker runs this
    function without importing its module)."""
    importlib.import_module("raylin.train.align")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_scale_benchmark(out: str | Path, hidden: int = 1024, tasks: int = 4, steps: int = 2) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if ray.is_initialized():
        raise RuntimeError("raylin bench scale starts its own Ray instance; run it outside a Ray session.")
    with tempfile.TemporaryDirectory(prefix="raylin-scale-") as scratch:
        teacher = Path(scratch) / "teacher"
        teacher_config = llama_teacher(teacher, hidden)
        model = transformers.LlamaForCausalLM(teacher_config)
        block_params = sum(p.numel() for p in model.model.layers[0].parameters())
        total_params = sum(p.numel() for p in model.parameters())
        del model
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            baseline = ray.get(_baseline_rss_mb.remote())
            runs, weights = {}, {}
            for holds in ("model", "blocks"):
                config = config_from_dict(_config(teacher, Path(scratch) / holds, holds, tasks, steps))
                summary = run_align(config)
                weights[holds] = load_file(aligned_dir(config) / WEIGHTS_FILE)
                runs[holds] = {"task_peak_rss_mb": summary["task_peak_rss_mb"], "wall_s": summary["wall_s"],
                               "peak_rss_mb_max": max(summary["task_peak_rss_mb"])}
                log.info("align.holds=%s: task peaks %s MB", holds, summary["task_peak_rss_mb"])
        finally:
            ray.shutdown()
    equal = weights["model"].keys() == weights["blocks"].keys() and all(
        torch.equal(weights["model"][k], weights["blocks"][k]) for k in weights["model"])
    blocks_per_task = -(-LAYERS // tasks)
    result = {
        "machine": "2-core CPU, 24 GiB, no GPU", "teacher": {"hidden": hidden, "layers": LAYERS, "params": total_params,
                                                             "block_params": block_params},
        "tasks": tasks, "steps": steps, "max_blocks_per_task": blocks_per_task, "baseline_rss_mb": round(baseline, 1),
        "runs": runs, "aligned_weights_equal": equal,
        "peak_ratio": round(runs["blocks"]["peak_rss_mb_max"] / runs["model"]["peak_rss_mb_max"], 3),
        "peak_ratio_above_baseline": round((runs["blocks"]["peak_rss_mb_max"] - baseline)
                                           / (runs["model"]["peak_rss_mb_max"] - baseline), 3),
    }
    write_text_atomic(out / "scale-align.json", json.dumps(result, indent=1))
    plot(result, out / "scale-align.png")
    return result


def plot(result: dict, path: Path) -> None:
    with figure(path, rows=1, cols=1, size=(6.0, 3.6), dpi=110) as axes:
        ax = axes[0][0]
        for offset, (holds, color) in zip((-0.2, 0.2), (("model", "tab:red"), ("blocks", "tab:blue"))):
            peaks = result["runs"][holds]["task_peak_rss_mb"]
            ax.bar([i + offset for i in range(len(peaks))], [p / 1024 for p in peaks], width=0.38, color=color,
                   label=f"align.holds: {holds}")
        ax.axhline(result["baseline_rss_mb"] / 1024, color="grey", linestyle="--", label="process baseline")
        teacher = result["teacher"]
        ax.set(xlabel="align task", ylabel="peak resident memory (GiB)", xticks=list(range(result["tasks"])),
               title=f"{teacher['layers']}-block Llama, hidden {teacher['hidden']}: peak per align task")
        ax.legend(fontsize=7)


def summarize(result: dict) -> list[str]:
    runs = result["runs"]
    return [f"align task peak (MB): whole student {runs['model']['task_peak_rss_mb']}, "
            f"block-local {runs['blocks']['task_peak_rss_mb']}; ratio {result['peak_ratio']} "
            f"({result['peak_ratio_above_baseline']} above the {result['baseline_rss_mb']} MB baseline); "
            f"aligned weights equal: {result['aligned_weights_equal']}"]
