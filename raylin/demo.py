"""``raylin demo``: the whole method on the shipped all-MiniLM-L6, on a local Ray, in minutes, with
the best recipe raylin has measured for this task.

1. fine-tune all-MiniLM-L6 on Rotten Tomatoes (the target teacher; reused when a run with the same
   config already finished in OUTPUT/teacher-run, OUTPUT/teacher-run-quick for ``quick``);
2. convert it into a Linformer student (XATL), align every block to the teacher block it came from
   (the align stage: whole blocks, Linformer's projections at their own rate), then distil it under
   target guidance (CALD) on 2 Ray Train workers, the student in a DeepSpeed ZeRO-2 engine, the
   teacher served from a Ray actor;
3. print teacher and student accuracy and retention on the held-out split and on IMDB, which
   training never shows, and the student's forward speed-up: at 512 tokens (the longest MiniLM
   takes) with the trained weights, and at a long length with the same architecture stretched to
   more positions (random weights: speed does not depend on them).

Why this recipe (docs/demo.md, with every variant measured): without the align stage the student
ended 7.6 points behind its teacher after 150 distillation steps (IMDB retention 0.859); aligned
first and distilled with the copied weights frozen, it ends within a point of the teacher and keeps
about 0.95 of its IMDB accuracy. ``quick`` is a smoke run (a few steps on a few hundred examples)
that tests use. Limits: CPU timings, batch 1; ``train.precision: auto`` computes in bf16 on CPUs
with AMX and in fp32 elsewhere, so the figures differ a little between machines.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from raylin.atomic import write_text_atomic
from raylin.config import config_from_dict, merge_sections
from raylin.convert import convert
from raylin.models.student import load_student
from raylin.models.teachers import load_teacher
from raylin.pipeline import finished_run, run_conversion, run_finetune

log = logging.getLogger(__name__)

DEMO_CONFIG: dict[str, Any] = {
    "teacher": "asset:all-minilm-l6",
    "output_dir": "outputs/demo",
    "task": {"type": "sequence_classification", "num_labels": 2},
    "data": {"name": "rotten_tomatoes", "max_length": 64, "eval_fraction": 0.1},
    "plan": {"mixer": "linformer", "linformer": {"k": 32, "share": "kv"}},
    "guidance": {"mode": "target"},
    # alpha_layer 2: the Tune sweep's best layer-loss weight for this pair (docs/tune.md).
    "loss": {"alpha_task": 1.0, "alpha_layer": 2.0, "alpha_out": 1.0, "temperature": 2.0},
    # Every block learns to reproduce its teacher block first (whole blocks: new projections and
    # copied weights), on the task's sentences.
    "align": {"enabled": True, "steps": 150, "parameters": "all"},
    # Then only the new Linformer projections distil (XATL's freeze, for the whole run): training the
    # aligned copied weights on Rotten Tomatoes too brought the held-out split level with the teacher
    # but cost IMDB, which training never shows, 2-3 points (docs/demo.md).
    "freeze": {"copied": True, "until": "end"},
    "train": {"num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2, "max_steps": 150, "batch_size": 32,
              "lr": 3.0e-3, "warmup_steps": 15, "checkpoint_every": 75},
    "teacher_service": {"mode": "served", "cpus": 1, "cache": True},
}
TEACHER_RUN = {"train": {"lr": 5.0e-5, "max_steps": 150, "warmup_steps": 15, "checkpoint_every": 75}}  # the teacher's own fine-tuning
QUICK = {"train": {"max_steps": 4, "checkpoint_every": 4, "warmup_steps": 1},
         "data": {"max_train_examples": 256, "max_eval_examples": 64}, "align": {"steps": 4}}


def demo_configs(out: str | Path, quick: bool = False):
    """(teacher fine-tuning config, conversion config builder) for the demo under ``out``."""
    runs = "-quick" if quick else ""  # a quick run and a full one are different runs: their own folders
    teacher_run = merge_sections(merge_sections(DEMO_CONFIG, TEACHER_RUN), {"output_dir": str(Path(out) / f"teacher-run{runs}")})
    finetune = config_from_dict(merge_sections(teacher_run, QUICK) if quick else teacher_run, run="teacher")
    base = merge_sections(DEMO_CONFIG, QUICK) if quick else copy.deepcopy(DEMO_CONFIG)

    def conversion(target_teacher: str):
        return config_from_dict(merge_sections(base, {"output_dir": str(Path(out) / f"student-run{runs}"),
                                                      "target_teacher": target_teacher}))

    return finetune, conversion


def forward_ms(model: torch.nn.Module, length: int, vocab_size: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` latency of one forward over ``length`` random tokens (batch 1)."""
    ids = torch.randint(1000, vocab_size, (1, length))
    best = float("inf")
    with torch.inference_mode():
        model(input_ids=ids)
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def stretched_pair(teacher_path: str, plan: dict, length: int):
    """The teacher architecture with ``length`` positions (random weights) and its converted student."""
    config = AutoConfig.from_pretrained(teacher_path)
    config.max_position_embeddings = length
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()
    student, _ = convert(teacher, plan)
    return teacher, student.eval()


def run_demo(out: str | Path = "outputs/demo", quick: bool = False, long_length: int = 4096) -> dict:
    """Run the demo and return its numbers (also written to OUT/demo.json)."""
    started = time.perf_counter()
    finetune, conversion = demo_configs(out, quick)
    log.info("[1/4] fine-tuning all-MiniLM-L6 on Rotten Tomatoes -> %s", finetune.output_dir)
    earlier = finished_run(finetune)  # the same fine-tuning already finished there
    target = earlier["target_teacher"] if earlier else None
    if target:
        log.info("      reusing the fine-tuned teacher of an earlier demo run: %s", target)
    else:
        target = run_finetune(finetune)["target_teacher"]
    config = conversion(target)
    log.info("[2/4] converting to Linformer (k=%d), aligning each block to the teacher's (%d steps) and distilling "
             "under target guidance: %d Ray Train workers (DeepSpeed ZeRO-%d), served teacher, %d steps -> %s",
             config.plan.options["linformer"].k, config.align.steps, config.train.num_workers, config.train.zero_stage,
             config.train.max_steps, config.output_dir)
    metrics = run_conversion(config)

    log.info("[3/4] timing teacher and student forwards")
    teacher, tokenizer = load_teacher(target)
    student = load_student(Path(config.output_dir) / "student")
    short = teacher.config.max_position_embeddings
    timings = {"trained": {"length": short, "teacher_ms": forward_ms(teacher, short, tokenizer.vocab_size),
                           "student_ms": forward_ms(student, short, tokenizer.vocab_size)}}
    long_teacher, long_student = stretched_pair(config.teacher_path("teacher"), config.plan, long_length)
    timings["stretched"] = {"length": long_length, "teacher_ms": forward_ms(long_teacher, long_length, tokenizer.vocab_size),
                            "student_ms": forward_ms(long_student, long_length, tokenizer.vocab_size)}
    for timing in timings.values():
        timing["speedup"] = timing["teacher_ms"] / timing["student_ms"]

    result = {"teacher_accuracy": metrics["teacher"]["accuracy"], "student_accuracy": metrics["student"]["accuracy"],
              "retention": metrics.get("retention", {}), "steps": metrics["steps"], "timings": timings, "wall_s": round(time.perf_counter() - started, 1),
              "student_dir": str(Path(config.output_dir) / "student"), "quick": quick}
    write_text_atomic(Path(out) / "demo.json", json.dumps(result, indent=1))
    trained, stretched = timings["trained"], timings["stretched"]
    retained = "".join(f"  {(name if name != 'held_out' else 'held-out') + ' accuracy':>18} teacher {row['teacher']:.4f}   "
                       f"student {row['student']:.4f}   retention {row['retention']:.3f}"
                       f"{' (never trained on)' if name != 'held_out' else ''}\n"
                       for name, row in result["retention"].items())
    print(f"[4/4] done ({result['steps']} distillation steps after {config.align.steps} align steps)\n{retained}"
          f"  forward @ {trained['length']:>5} tokens  teacher {trained['teacher_ms']:8.1f} ms   student "
          f"{trained['student_ms']:8.1f} ms   {trained['speedup']:.2f}x\n"
          f"  forward @ {stretched['length']:>5} tokens  teacher {stretched['teacher_ms']:8.1f} ms   student "
          f"{stretched['student_ms']:8.1f} ms   {stretched['speedup']:.2f}x  (same architecture, positions "
          f"stretched to {stretched['length']})\n"
          f"  student folder {result['student_dir']} (raylin.load_student), report {Path(config.output_dir) / 'report.md'}\n"
          f"  total {result['wall_s']:.0f} s", flush=True)
    return result
