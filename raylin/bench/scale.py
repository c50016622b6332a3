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
below as ``baseline_rss_mb``), which a small model's blocks do not dwarf.

The ZeRO part (``run_zero_benchmark``) distils SmolLM2-135M into a Mamba2 student for a few steps
at ZeRO stages 0, 2 and 3 with 1 and 2 Ray Train workers (fp32, CPU) and reads each run's
memory.json (raylin.train.memory): every worker's peak resident memory and the model states it
holds (its parameters, by ZeRO-3 partition, and the optimizer's master copies, gradients and
moments), next to DeepSpeed's own model-state estimate for that many parameters. It adds
DeepSpeed's estimator table for Mamba2 hybrids of Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B
(parameters counted on the meta device) on 8 x 80 GB GPU nodes. At ZeRO-3 the student is built
already partitioned (raylin.train.student_build.sharded_student). Limits: a worker's peak also holds the
process baseline (torch, transformers, DeepSpeed, the Ray worker), DeepSpeed's buffers and a
step's activations, which at 135M parameters are as large as the model states; DeepSpeed's
estimates assume 16-bit training with fp32 master weights, the runs here are fp32.

The billion part (``run_billion_benchmark``, ``--part billion``, not in ``all``) runs
raylin/configs/tinyllama-1.1b-mamba2-hybrid.yaml on a random teacher at TinyLlama-1.1B's shape:
block-local alignment, then 20 ZeRO-3 steps on 2 workers with the copied weights frozen, and
records every process's peak and the machine's.

Writes scale-align.json / .png, scale-zero.json / .png and scale-billion.json. Each part starts and stops its own local Ray instance.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import tempfile
from pathlib import Path

import ray
import torch
import transformers
from safetensors.torch import load_file

from raylin.assets import asset_path
from raylin.atomic import write_text_atomic
from raylin.bench import SHIPPED_CONFIGS
from raylin.config import config_from_dict, load_config
from raylin.models.plan import Plan
from raylin.models.student import RaylinStudent, RaylinStudentConfig
from raylin.pipeline import run_conversion
from raylin.plots import figure
from raylin.train.align import SUMMARY_FILE, WEIGHTS_FILE, aligned_dir, run_align
from raylin.train.memory import MEMORY_REPORT, MachineMemoryPeak, peak_rss_mb
from raylin.train.trainer import fit

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
    return peak_rss_mb()


def _output_folder(out: str | Path) -> Path:
    """``out``, made; RuntimeError inside a Ray session (each part starts its own Ray instance)."""
    if ray.is_initialized():
        raise RuntimeError("raylin bench scale starts its own Ray instance; run it outside a Ray session.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_scale_benchmark(out: str | Path, hidden: int = 1024, tasks: int = 4, steps: int = 2) -> dict:
    out = _output_folder(out)
    with tempfile.TemporaryDirectory(prefix="raylin-scale-") as scratch:
        teacher = Path(scratch) / "teacher"
        teacher_config = llama_teacher(teacher, hidden)
        model = transformers.LlamaForCausalLM(teacher_config)
        block_params = sum(p.numel() for p in model.model.layers[0].parameters())
        total_params = sum(p.numel() for p in model.parameters())
        del model
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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


# ----- ZeRO stages: what a training worker holds ---------------------------------------------------------

ZERO_STAGES = (0, 2, 3)
GPU_NODE = {"gpus": 8, "gpu_gb": 80}
# Llama shapes whose Mamba2 hybrids (one attention layer in ten kept) the estimator table covers.
LLAMA_SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, tie_word_embeddings=False),
}


def student_sizes(teacher_config, plan: "Plan | dict") -> tuple[int, int]:
    """(parameters, largest single module's own parameters) of the student ``plan`` makes of a teacher
    with ``teacher_config``, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        student = RaylinStudent(RaylinStudentConfig(teacher_config=teacher_config.to_dict(),
                                                    teacher_class="LlamaForCausalLM", plan=Plan.from_mapping(plan).to_dict()))
    total = sum(p.numel() for p in student.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in student.modules())
    return total, largest


def _deepspeed_estimates():
    # DeepSpeed probes accelerators on import (seconds, console lines): imported when the benchmark runs.
    stage3 = importlib.import_module("deepspeed.runtime.zero.stage3")
    stage2 = importlib.import_module("deepspeed.runtime.zero.stage_1_and_2")
    return stage2.estimate_zero2_model_states_mem_needs, stage3.estimate_zero3_model_states_mem_needs


def deepspeed_estimate(stage: int, params: int, largest: int, devices: int, nodes: int = 1, offload: bool = False) -> dict:
    """DeepSpeed's model-state estimate (bytes per device and per node's CPU memory) for ``params``
    spread over ``devices`` per node on ``nodes`` nodes. Stage 0 is DeepSpeed's 16-bit recipe
    unpartitioned: 2 + 2 + 12 bytes per parameter on every device."""
    zero2, zero3 = _deepspeed_estimates()
    if stage == 0:
        return {"device_bytes": 16 * params, "cpu_bytes": 0}
    if stage == 2:
        cpu, device = zero2(params, num_gpus_per_node=devices, num_nodes=nodes, cpu_offload=offload)
    else:
        cpu, device, _ = zero3(params, largest, num_gpus_per_node=devices, num_nodes=nodes, cpu_offload=offload,
                               cpu_offload_params=offload)
    return {"device_bytes": int(device), "cpu_bytes": int(cpu)}


def estimator_table() -> list[dict]:
    """DeepSpeed's estimate for the Mamba2 hybrids of ``LLAMA_SHAPES`` on 1, 2 and 4 nodes of
    ``GPU_NODE``: per-GPU and per-node CPU memory, ZeRO-2 and ZeRO-3, with and without offload."""
    rows = []
    for name, shape in LLAMA_SHAPES.items():
        config = transformers.LlamaConfig(vocab_size=128256, **shape)
        keep = list(range(9, shape["num_hidden_layers"], 10))
        params, largest = student_sizes(config, {"mixer": "mamba2", "keep_attention": keep})
        for stage in (2, 3):
            for offload in (False, True):
                for nodes in (1, 2, 4):
                    estimate = deepspeed_estimate(stage, params, largest, GPU_NODE["gpus"], nodes, offload)
                    rows.append({"student": f"{name} -> mamba2 (attention kept in {keep})", "params": params,
                                 "zero_stage": stage, "offload": offload, "nodes": nodes,
                                 "gpu_gb": round(estimate["device_bytes"] / 1e9, 1),
                                 "cpu_gb_per_node": round(estimate["cpu_bytes"] / 1e9, 1),
                                 "fits_80gb": estimate["device_bytes"] < 0.9 * GPU_NODE["gpu_gb"] * 1e9})
    return rows


def _zero_config(out: Path, stage: int, workers: int, steps: int) -> dict:
    return {"teacher": "asset:smollm2-135m", "output_dir": str(out), "task": {"type": "causal_lm"},
            "data": {"name": "austen", "max_length": 64, "max_train_examples": 64, "max_eval_examples": 2},
            "eval_sets": [], "plan": {"mixer": "mamba2"}, "guidance": {"mode": "unguided"},
            "train": {"num_workers": workers, "zero_stage": stage, "precision": "fp32", "max_steps": steps,
                      "batch_size": 2, "checkpoint_every": steps, "eval_every": steps, "cpus_per_worker": 1,
                      "warmup_steps": 1}}


def run_zero_benchmark(out: str | Path, steps: int = 2) -> dict:
    """Per-worker memory of SmolLM2-135M -> Mamba2 at ZeRO 0/2/3 with 1 and 2 workers, DeepSpeed's
    estimate beside each, and the estimator table for 1B, 8B and 70B students (see the module doc)."""
    out = _output_folder(out)
    teacher_config = transformers.AutoConfig.from_pretrained(asset_path(TOKENIZER))
    params, largest = student_sizes(teacher_config, {"mixer": "mamba2"})
    runs = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="raylin-zero-") as scratch:
            for workers in (1, 2):
                for stage in ZERO_STAGES:
                    folder = Path(scratch) / f"zero{stage}-w{workers}"
                    result = fit(config_from_dict(_zero_config(folder, stage, workers, steps)))
                    if result.error is not None:
                        raise result.error
                    memory = json.loads((folder / MEMORY_REPORT).read_text())
                    states = [round(p + o, 2) for p, o in zip(memory["parameters_mb"], memory["optimizer_mb"])]
                    estimate = deepspeed_estimate(stage, params, largest, workers)
                    runs.append({"zero_stage": stage, "workers": workers, **memory, "model_states_mb": states,
                                 "deepspeed_estimate_mb": round(estimate["device_bytes"] / 2**20, 1)})
                    log.info("ZeRO-%d, %d worker(s): model states %s MB, peak %s MB", stage, workers, states,
                             memory["peak_rss_mb"])
    finally:
        ray.shutdown()
    by = {(r["zero_stage"], r["workers"]): max(r["model_states_mb"]) for r in runs}
    result = {"machine": "2-core CPU, 24 GiB, no GPU", "student": {"teacher": "SmolLM2-135M", "mixer": "mamba2",
                                                                  "params": params, "largest_module_params": largest},
              "steps": steps, "precision": "fp32", "runs": runs,
              "zero3_over_zero0_model_states_2_workers": round(by[(3, 2)] / by[(0, 2)], 3),
              "zero2_over_zero0_model_states_2_workers": round(by[(2, 2)] / by[(0, 2)], 3),
              "estimator_table": {"node": GPU_NODE, "rows": estimator_table()}}
    write_text_atomic(out / "scale-zero.json", json.dumps(result, indent=1))
    plot_zero(result, out / "scale-zero.png")
    return result


def plot_zero(result: dict, path: Path) -> None:
    with figure(path, rows=1, cols=2, size=(10.0, 3.6), dpi=110) as axes:
        for ax, key, label in ((axes[0][0], "model_states_mb", "model states per worker (MiB)"),
                               (axes[0][1], "peak_rss_mb", "peak resident memory per worker (MiB)")):
            names = [f"ZeRO-{r['zero_stage']}\n{r['workers']} w" for r in result["runs"]]
            ax.bar(range(len(names)), [max(r[key]) for r in result["runs"]], color="tab:blue")
            if key == "model_states_mb":
                ax.plot(range(len(names)), [r["deepspeed_estimate_mb"] for r in result["runs"]], "o", color="tab:orange",
                        label="DeepSpeed's estimate (16-bit recipe)")
                ax.legend(fontsize=7)
            ax.set(xticks=list(range(len(names))), ylabel=label,
                   title=f"SmolLM2-135M -> Mamba2 ({result['student']['params'] / 1e6:.0f}M), fp32 CPU")
            ax.set_xticklabels(names, fontsize=7)


def summarize_zero(result: dict) -> list[str]:
    lines = [f"ZeRO-{r['zero_stage']} x {r['workers']}: model states {r['model_states_mb']} MB (DeepSpeed's estimate "
             f"{r['deepspeed_estimate_mb']}), peak {r['peak_rss_mb']} MB" for r in result["runs"]]
    lines.append(f"ZeRO-3 / ZeRO-0 model states at 2 workers: {result['zero3_over_zero0_model_states_2_workers']}")
    return lines


# ----- a billion-parameter conversion on this machine -----------------------------------------------------

BILLION_CONFIG = SHIPPED_CONFIGS / "tinyllama-1.1b-mamba2-hybrid.yaml"
BILLION_HIDDEN = 2048  # TinyLlama-1.1B's width: with LAYERS blocks, its shape


def run_billion_benchmark(out: str | Path, steps: int = 20, tasks: int = 4) -> dict:
    """``raylin convert`` of BILLION_CONFIG with a random teacher at TinyLlama-1.1B's shape (SmolLM2's
    tokenizer and vocabulary: 1.17B parameters): block-local alignment by ``tasks`` Ray tasks, then
    ``steps`` distillation steps on 2 Ray Train workers under ZeRO-3, the copied weights frozen.
    Records every align task's and training worker's peak resident memory, the workers' model
    states, the machine's peak memory in use (all processes), and the stages' wall times."""
    out = _output_folder(out)
    with tempfile.TemporaryDirectory(prefix="raylin-billion-") as scratch:
        teacher = Path(scratch) / "teacher"
        # Made in a process of its own: a process that built 4.7 GB of weights keeps most of it
        # resident after freeing them (the allocator's heap), which would count as this run's.
        maker = multiprocessing.get_context("spawn").Process(target=llama_teacher, args=(teacher, BILLION_HIDDEN))
        maker.start()
        maker.join()
        if maker.exitcode != 0:
            raise RuntimeError(f"making the random {BILLION_HIDDEN}-wide teacher failed (exit code {maker.exitcode}).")
        teacher_config = transformers.AutoConfig.from_pretrained(teacher)
        config = load_config(BILLION_CONFIG, [f"teacher={teacher}", f"target_teacher={teacher}",
                                              f"output_dir={Path(scratch) / 'run'}", f"train.max_steps={steps}",
                                              f"train.checkpoint_every={steps}", f"train.eval_every={steps}",
                                              f"align.num_workers={tasks}"])
        with torch.device("meta"):
            teacher_params = sum(p.numel() for p in transformers.LlamaForCausalLM(teacher_config).parameters())
        student_params, _ = student_sizes(teacher_config, config.plan)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            with MachineMemoryPeak() as machine:
                metrics = run_conversion(config)
        finally:
            ray.shutdown()
        memory = json.loads((Path(config.output_dir) / MEMORY_REPORT).read_text())
        align = json.loads((aligned_dir(config) / SUMMARY_FILE).read_text())
    result = {
        "machine": "2-core CPU, 24 GiB, no GPU", "config": f"raylin/configs/{BILLION_CONFIG.name}",
        "teacher": {"shape": "TinyLlama-1.1B (random weights), SmolLM2 vocabulary", "params": teacher_params},
        "student": {"plan": config.plan.to_dict(), "params": student_params},
        "align": {"tasks": tasks, "task_peak_rss_mb": align["task_peak_rss_mb"], "wall_s": align.get("wall_s")},
        "train": {"workers": memory["workers"], "zero_stage": memory["zero_stage"], "steps": metrics["steps"],
                  "peak_rss_mb": memory["peak_rss_mb"], "parameters_mb": memory["parameters_mb"],
                  "optimizer_mb": memory["optimizer_mb"], "wall_s": metrics["train_wall_s"]},
        "machine_peak_used_mb": round(machine.peak_mb, 1), "machine_baseline_used_mb": round(machine.baseline_mb, 1),
        "wall_s": metrics["wall_s"], "student_scores": metrics["student"], "teacher_scores": metrics["teacher"],
    }
    write_text_atomic(out / "scale-billion.json", json.dumps(result, indent=1))
    return result


def summarize_billion(result: dict) -> list[str]:
    train, align = result["train"], result["align"]
    return [f"{result['teacher']['params'] / 1e9:.2f}B teacher -> {result['student']['params'] / 1e9:.2f}B student: "
            f"align task peaks {align['task_peak_rss_mb']} MB, ZeRO-{train['zero_stage']} worker peaks "
            f"{train['peak_rss_mb']} MB over {train['steps']} steps; machine peak "
            f"{result['machine_peak_used_mb'] / 1024:.1f} GiB in use; {result['wall_s']} s"]
