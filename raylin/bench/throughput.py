"""The distillation step's throughput: raylin's Ray Train loop against a plain in-process loop.

For each shipped config this runs

* ``raylin``: the config's own distillation (Ray Train workers under DeepSpeed, the teacher in its
  Ray actor when the config serves it, prefetch, all-reduces, the train log) for a few steps, and
  reads tokens/s from the run's train log;
* ``plain``: what the CALD reference code does, one process holding the teacher and the student,
  the same global batch, the same losses (``cald_losses``), ``torch.optim.AdamW``;

and scores the short run's student (and the teacher) on the held-out split in fp32 and in bf16, the
check behind "bf16 keeps the held-out metric".

Both count tokens the same way (``count_tokens``: real tokens, or encoder positions for speech) and
use every core of the machine; the first ``warmup`` steps are not timed. Limits: speed does not
depend on the weights, so a config whose target teacher is a fine-tuned folder uses the pretrained
teacher with a fresh head instead (its held-out scores are then near chance: read the bf16 delta
of those rows as a numerical check, not a quality result); the activation cache is off, so every
teacher forward is computed; a few steps do not show the gains of a warm cache or a long run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch

from raylin.atomic import replace_folder, write_text_atomic
from raylin.bench import SHIPPED_CONFIGS
from raylin.config import RunConfig, config_from_dict, read_yaml_file
from raylin.errors import ConfigError
from raylin.data.task_data import load_task_data
from raylin.task_model import load_task_model
from raylin.data.batch_order import GlobalBatches
from raylin.distill.losses import cald_losses
from raylin.models.families import state_mask
from raylin.models.student import load_student
from raylin.plots import figure
from raylin.train.batch import count_tokens, model_inputs
from raylin.train.evaluation import evaluate
from raylin.train.run_files import STUDENT_DIR, read_train_log
from raylin.train.student_build import converted_student
from raylin.train.trainer import fit

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = tuple(SHIPPED_CONFIGS / name for name in (
    "minilm-rt-linformer.yaml", "smollm2-austen-mamba2.yaml", "whisper-tiny-digits-bimamba2.yaml"))


@dataclass
class ThroughputRecord:
    config: str
    loop: str  # "raylin" | "plain"
    steps_timed: int
    tokens_per_s: float
    tokens_per_s_per_core: float
    step_s: float
    first_loss: float  # step 1's loss: the loops do the same math on the same batch (workers average theirs)


def throughput_config(path: str | Path, out_dir: Path, steps: int) -> RunConfig:
    """The shipped config at ``path`` cut to ``steps`` distillation steps, its output under
    ``out_dir``: no align stage, no extra evaluation sets, no activation cache, one checkpoint at
    the end, the pretrained teacher when the fine-tuned target has not been made."""
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a run config (a mapping of keys to values).")
    target = data.get("target_teacher")
    if target and not str(target).startswith("asset:") and not Path(target).exists():
        data["target_teacher"] = data["teacher"]
    overrides = [
        f"output_dir={out_dir / Path(path).stem}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
        "train.eval_every=0", "align.enabled=false", "broad.enabled=false", "eval_sets=[]",
        "teacher_service.cache=false", "name=throughput",
    ]
    return config_from_dict(data, overrides)


def raylin_throughput(config: RunConfig, warmup: int) -> tuple[ThroughputRecord, Path]:
    """Run ``config``'s distillation and read its tokens/s from the train log (steps after
    ``warmup``); also returns the run's final student folder."""
    result = fit(config)
    if result.error is not None:
        raise result.error
    logged = read_train_log(config.output_dir)
    records = logged[warmup - 1:]
    tokens = records[-1]["tokens"] - records[0]["tokens"]
    wall = records[-1]["wall_s"] - records[0]["wall_s"]
    steps = len(records) - 1
    cores = os.cpu_count() or 1
    student = Path(config.output_dir) / STUDENT_DIR
    with result.checkpoint.as_directory() as folder:
        replace_folder(student, lambda staging: shutil.copytree(Path(folder) / STUDENT_DIR, staging, dirs_exist_ok=True))
    record = ThroughputRecord(Path(config.output_dir).name, "raylin", steps, tokens / wall, tokens / wall / cores, wall / steps,
                              logged[0]["loss"])
    return record, student


def plain_throughput(config: RunConfig, steps: int, warmup: int) -> ThroughputRecord:
    """A plain PyTorch distillation loop in this process: teacher and student side by side, the
    run's global batch and loss weights, AdamW; tokens/s over the steps after ``warmup``."""
    torch.set_num_threads(os.cpu_count() or 1)
    teacher_path = config.target_teacher or config.teacher
    teacher, processor = load_task_model(config, teacher_path)
    teacher.eval()
    student, _, _ = converted_student(config)
    student.train()
    data = load_task_data(config, processor)
    batches = GlobalBatches(data.num_train, config.train.batch_size, config.data.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    weights = config.schedule.weights
    hidden = weights.layer > 0
    tokens, started, first_loss = 0, 0.0, None
    for step in range(steps):
        if step == warmup:
            started, tokens = time.perf_counter(), 0
        batch = data.train_batch(batches.shard(step, 0, 1))
        inputs = model_inputs(batch)
        with torch.no_grad():
            teacher_out = teacher(**inputs, output_hidden_states=hidden)
        out = student(**inputs, output_hidden_states=hidden)
        mask = state_mask(student, batch)
        parts = cald_losses(config.task_kind, config.loss, weights, out, teacher_out, batch, mask)
        parts["loss"].backward()
        first_loss = parts["loss"].item() if first_loss is None else first_loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(count_tokens(batch, mask))
    wall = time.perf_counter() - started
    cores = os.cpu_count() or 1
    timed = steps - warmup
    return ThroughputRecord(Path(config.output_dir).name, "plain", timed, tokens / wall, tokens / wall / cores, wall / timed,
                            first_loss)


def bf16_scores(config: RunConfig, student_dir: Path) -> list[dict]:
    """Held-out scores of the teacher and the student in fp32 and in bf16 (weights and features;
    logits scored in fp32), one row per model and metric with the bf16 - fp32 difference."""
    teacher, processor = load_task_model(config, config.target_teacher or config.teacher)
    data = load_task_data(config, processor)
    rows = []
    for role, model in (("teacher", teacher), ("student", load_student(student_dir))):
        fp32 = evaluate(model, data, config, torch.device("cpu"), 0, 1, sets=[""])
        bf16 = evaluate(model.to(torch.bfloat16), data, config, torch.device("cpu"), 0, 1, sets=[""])
        for metric, value in fp32.items():
            rows.append({"config": Path(config.output_dir).name, "model": role, "metric": metric,
                         "fp32": value, "bf16": bf16[metric], "delta": bf16[metric] - value})
    return rows


def run_throughput_benchmark(out_dir: str | Path, configs: tuple[str, ...] = SHIPPED_CONFIGS,
                             steps: int = 12, warmup: int = 2) -> dict:
    """Throughput of both loops and the bf16 held-out check for every config in ``configs``;
    writes distill-throughput.json into ``out_dir`` after each config (a partial run keeps what it
    measured; rows of other configs already in the file, measured with the same steps on a machine
    with as many cores, are kept)."""
    out = Path(out_dir)
    result: dict = {"cores": os.cpu_count(), "steps": steps, "warmup": warmup, "throughput": [], "bf16": []}
    earlier = out / "distill-throughput.json"
    if earlier.is_file():  # re-measuring some configs keeps the others' rows (same steps and machine)
        kept = json.loads(earlier.read_text())
        if all(kept.get(key) == result[key] for key in ("cores", "steps", "warmup")):
            names = {Path(path).stem for path in configs}
            for key in ("throughput", "bf16"):
                result[key] = [row for row in kept[key] if row["config"] not in names]
    started_ray = not ray.is_initialized()
    try:
        for path in configs:
            config = throughput_config(path, out / "runs", steps)
            record, student_dir = raylin_throughput(config, warmup)
            plain = plain_throughput(config, steps, warmup)
            result["throughput"] += [asdict(record), asdict(plain)]
            log.info("%s: raylin %.0f tokens/s, plain loop %.0f tokens/s", record.config, record.tokens_per_s,
                     plain.tokens_per_s)
            result["bf16"] += bf16_scores(config, student_dir)
            write_text_atomic(out / "distill-throughput.json", json.dumps(result, indent=1))
            plot_throughput(result, out / "distill-throughput.png")
    finally:
        if started_ray:
            ray.shutdown()
    return result


def plot_throughput(result: dict, path: Path) -> None:
    """Tokens/s per core of both loops, one pair of bars per config."""
    rows = summarize_throughput(result)
    with figure(path, size=(7, 3.8)) as axes:
        ax = axes[0][0]
        positions = range(len(rows))
        for offset, loop in ((-0.2, "raylin"), (0.2, "plain")):
            ax.bar([p + offset for p in positions], [r[f"{loop}_tokens_per_s_per_core"] for r in rows], width=0.4,
                   label="raylin (Ray Train + served teacher)" if loop == "raylin" else "plain in-process loop")
        ax.set_xticks(list(positions), [r["config"] for r in rows], fontsize=7)
        ax.set_yscale("log")  # the configs differ 40x in tokens per step
        ax.set_ylabel("tokens/s per core")
        ax.set_title(f"Distillation step throughput ({result['cores']} cores)")
        ax.legend(fontsize=8)


def summarize_throughput(result: dict) -> list[dict]:
    """Per config: tokens/s per core of each loop and raylin's ratio to the plain loop."""
    by_config: dict[str, dict] = {}
    for record in result["throughput"]:
        by_config.setdefault(record["config"], {})[record["loop"]] = record["tokens_per_s_per_core"]
    return [{"config": name, "raylin_tokens_per_s_per_core": round(loops["raylin"], 1),
             "plain_tokens_per_s_per_core": round(loops["plain"], 1),
             "raylin_over_plain": round(loops["raylin"] / loops["plain"], 2)}
            for name, loops in by_config.items() if {"raylin", "plain"} <= loops.keys()]
