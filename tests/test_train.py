"""CALD training on a real local Ray cluster with real DeepSpeed on CPU (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import discarded_steps, steps_logged
from conftest import losses_of as _losses
from conftest import run_config as _config

from raylin.pipeline import run_conversion
from raylin.train.checkpoint import STATE_FILE
from raylin.train.memory import MEMORY_REPORT
from raylin.train.run_files import TRAIN_LOG
from raylin.train.trainer import fit

pytestmark = pytest.mark.assets


# Waypoint guidance runs end to end in test_finetune_writes_a_target_teacher_and_waypoints_that_convert_uses,
# on the waypoints a real fine-tuning wrote.
GUIDANCE = {
    "unguided": {"mode": "unguided"},
    "target": {"mode": "target"},
    "trajectory": {"mode": "trajectory", "teacher_update_every": 2, "teacher_lr": 1e-3},
    "hybrid": {"mode": "hybrid", "hybrid_cutoff": 6},
}


def assert_conversion_ran_end_to_end(out: Path, metrics: dict, mode: str) -> None:
    """A finished conversion's outputs: metrics, report, a loadable student and a train log whose
    loss parts follow the guidance mode."""
    import raylin

    assert metrics["steps"] == 12 and metrics["tokens"] > 0
    assert 0 <= metrics["student"]["accuracy"] <= 1 and 0 <= metrics["teacher"]["accuracy"] <= 1
    assert (out / "report.md").read_text().startswith("# raylin run")
    assert raylin.load_student(out / "student").plan.mixer == "linformer"
    log = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    if mode == "unguided":
        assert all("loss_layer" not in r and "loss_kd" not in r for r in log)
    elif mode == "hybrid":
        assert all(("loss_layer" in r) == (r["step"] <= 6) for r in log)
    else:
        assert all("loss_layer" in r and "loss_kd" in r for r in log)


@pytest.mark.parametrize("mode", sorted(GUIDANCE))
def test_each_guidance_mode_runs_end_to_end(mode, teachers, ray_cluster, tmp_path):
    config = _config(teachers, tmp_path / mode, guidance=dict(GUIDANCE[mode]))
    assert_conversion_ran_end_to_end(tmp_path / mode, run_conversion(config), mode)


@pytest.fixture(scope="module")
def unguided_run(teachers, ray_cluster, tmp_path_factory):
    """One uninterrupted unguided run on two workers: the reference of the worker-count and
    crash-resume tests (their runs differ from it only in what they test)."""
    out = tmp_path_factory.mktemp("unguided") / "clean"
    return fit(_config(teachers, out, guidance={"mode": "unguided"})), out


def test_one_and_two_workers_follow_the_same_loss_curve(teachers, ray_cluster, unguided_run, tmp_path):
    fit(_config(teachers, tmp_path / "w1", guidance={"mode": "unguided"}, **{"train.num_workers": 1}))
    curves = {1: _losses(tmp_path / "w1"), 2: _losses(unguided_run[1])}
    assert len(curves[1]) == 12
    torch.testing.assert_close(torch.tensor(curves[2]), torch.tensor(curves[1]), rtol=2e-3, atol=2e-4)


def test_zero3_on_two_workers_trains_with_falling_loss(teachers, ray_cluster, tmp_path):
    out = tmp_path / "z3"
    result = fit(_config(teachers, out, **{"train.zero_stage": 3, "train.max_steps": 16, "train.checkpoint_every": 16}))
    assert result.error is None
    losses = _losses(out)
    assert sum(losses[-4:]) < sum(losses[:4])
    with result.checkpoint.as_directory() as folder:
        import raylin

        student = raylin.load_student(f"{folder}/student")  # gathered from ZeRO-3 shards
        assert all(p.numel() > 0 for p in student.parameters())
    # Each worker holds half of the parameters (its ZeRO-3 partition, padded to the world size) and
    # the optimizer state of that half only (raylin.train.memory).
    memory = json.loads((out / MEMORY_REPORT).read_text())
    whole_mb = sum(p.numel() * p.element_size() for p in student.parameters()) / 2**20
    assert memory["workers"] == 2 and memory["zero_stage"] == 3 and len(memory["peak_rss_mb"]) == 2
    for parameters, optimizer in zip(memory["parameters_mb"], memory["optimizer_mb"]):
        assert whole_mb / 2 * 0.995 <= parameters <= whole_mb / 2 * 1.05  # the report rounds to 0.01 MiB
        # Adam's two moments of that half; in fp32 training ZeRO-3's master copy is the partition itself
        # (stage3.py: "we don't need another copy of the weights"), and gradients are freed after the step.
        assert 2 * parameters * 0.99 <= optimizer <= 3 * parameters * 1.01


def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted(teachers, ray_cluster, unguided_run, tmp_path,
                                                                         monkeypatch):
    clean, clean_out = unguided_run
    monkeypatch.setenv("RAYLIN_TEST_FAULT", "crash:9")
    crashed = fit(_config(teachers, tmp_path / "crashed", guidance={"mode": "unguided"}))
    assert (tmp_path / "crashed" / ".fault-crash-9").exists()  # the worker really died at step 9
    assert crashed.error is None
    # One record per step: what the lost attempt logged past the checkpoint it resumed from is set aside.
    # (Ray Train registers a checkpoint when its controller next polls the workers: a worker dying a
    # second after the step-6 report can take it along, and the run then restarts from the start.)
    aside = discarded_steps(tmp_path / "crashed")
    assert steps_logged(tmp_path / "crashed") == list(range(1, 13))
    assert aside[-1] == 9 and aside == list(range(aside[0], 10)) and aside[0] in (1, 7), aside
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "crashed")), torch.tensor(_losses(clean_out)))
    assert crashed.metrics["eval_accuracy"] == clean.metrics["eval_accuracy"]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(teachers, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIN_TEST_FAULT", "crash-in-checkpoint:12")
    out = tmp_path / "ckpt-crash"
    result = fit(_config(teachers, out, guidance={"mode": "unguided"}))
    assert (out / ".fault-crash-in-checkpoint-12").exists()
    assert result.error is None and result.metrics["step"] == 12
    # The restart began at a checkpoint boundary (step 6, or 0 when Ray had not yet registered the
    # step-6 report when the worker died) and skipped nothing; the log holds each step once, the lost
    # attempt's steps past that checkpoint set aside.
    aside = discarded_steps(out)
    assert aside and aside[0] - 1 in (0, 6) and aside == list(range(aside[0], 13))
    assert steps_logged(out) == list(range(1, 13))
    # The step-6 checkpoint written before the crash is complete: state and both ranks' shards.
    step6 = [p for p in (out / "ray").glob("*/checkpoint_*") if p.is_dir()
             and json.loads((p / STATE_FILE).read_text())["step"] == 6]
    assert step6 and all(len(list(p.glob("engine/*optim_states.pt"))) == 2 for p in step6)
    with result.checkpoint.as_directory() as folder:
        assert json.loads((Path(folder) / STATE_FILE).read_text())["step"] == 12
    # The dead worker's half-written staging folder was replaced by the next save and removed after it.
    assert not list((out / ".checkpoint-staging").glob("rank*"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(teachers, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIN_TEST_FAULT", "nan:8")
    out = tmp_path / "nan"
    config = _config(teachers, out, guidance={"mode": "unguided"}, **{"train.max_failures": 0})
    with pytest.raises(Exception, match=r"Loss is nan at step 8.*last good checkpoint"):
        result = fit(config)
        if result.error is not None:
            raise result.error
    checkpoints = sorted(p for p in (out / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert checkpoints, "the step-6 checkpoint is gone"
    assert json.loads((checkpoints[-1] / STATE_FILE).read_text())["step"] == 6


def test_resuming_with_a_different_config_is_refused(teachers, ray_cluster, tmp_path):
    out = tmp_path / "changed"
    fit(_config(teachers, out, guidance={"mode": "unguided"}, **{"train.max_failures": 0}))
    changed = _config(teachers, out, guidance={"mode": "unguided"}, **{"train.lr": 5e-4, "train.max_failures": 0, "train.max_steps": 14})
    with pytest.raises(Exception, match="holds run .* with a different config"):
        result = fit(changed)
        if result.error is not None:
            raise result.error


def test_finetune_writes_a_target_teacher_and_waypoints_that_convert_uses(teachers, ray_cluster, tmp_path):
    from raylin.pipeline import run_finetune

    tuned = run_finetune(_config(teachers, tmp_path / "teacher-run", guidance={"mode": "target"}))
    assert [w["step"] for w in tuned["waypoints"]] == [6, 12]
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(tuned["target_teacher"])
    assert type(teacher).__name__ == "BertForSequenceClassification"  # a plain checkpoint, usable anywhere
    metrics = run_conversion(_config(teachers, tmp_path / "student-run", target_teacher=tuned["target_teacher"],
                                     guidance={"mode": "waypoint", "waypoints": tuned["waypoints"]}))
    assert_conversion_ran_end_to_end(tmp_path / "student-run", metrics, "waypoint")


def test_frozen_copied_weights_stay_exact_until_lit_unfreezes_them(teachers, ray_cluster, tmp_path):
    from safetensors.torch import load_file

    never = {"copied": True, "lit": {"window": 3, "threshold": -1e9, "patience": 1, "warmup_steps": 0}}
    result = fit(_config(teachers, tmp_path / "frozen", guidance={"mode": "unguided"}, freeze=never))
    with result.checkpoint.as_directory() as folder:
        student = load_file(f"{folder}/student/model.safetensors")
    source = load_file(f"{teachers['source']}/model.safetensors")
    copied = [k for k in student if k.removeprefix("model.") in source and ".attention.self." not in k]
    assert copied and all(torch.equal(student[k], source[k.removeprefix("model.")]) for k in copied)
    new = [k for k in student if k.endswith(".E.weight")]
    assert new and all(not torch.equal(student[k], torch.zeros_like(student[k])) for k in new)
    log = [json.loads(line) for line in (tmp_path / "frozen" / TRAIN_LOG).read_text().splitlines()]
    assert all(r["copied_frozen"] == 1 for r in log)
    # A threshold every window misses unfreezes at the end of the second window (the first comparison).
    always = {"copied": True, "lit": {"window": 3, "threshold": 1e9, "patience": 1, "warmup_steps": 2}}
    fit(_config(teachers, tmp_path / "unfrozen", guidance={"mode": "unguided"}, freeze=always))
    log = [json.loads(line) for line in (tmp_path / "unfrozen" / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in log if r["copied_frozen"] == 0][0] == 6


def test_copied_weights_frozen_to_the_end_hold_no_optimizer_state_under_sharded_zero3(teachers, ray_cluster, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "frozen-z3"
    result = fit(_config(teachers, out, guidance={"mode": "unguided"}, freeze={"copied": True, "until": "end"},
                         **{"train.zero_stage": 3}))
    with result.checkpoint.as_directory() as folder:
        student = load_file(f"{folder}/student/model.safetensors")
    source = load_file(f"{teachers['source']}/model.safetensors")
    copied = [k for k in student if k.removeprefix("model.") in source and ".attention.self." not in k]
    assert copied and all(torch.equal(student[k], source[k.removeprefix("model.")]) for k in copied)
    log = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert len(log) == 12 and all("copied_frozen" not in r for r in log)  # no LIT: frozen to the end
    # The optimizer holds Adam's two moments of the new weights' half only.
    new_mb = sum(t.numel() * 4 for k, t in student.items() if k not in copied and ".attention.self." not in k) / 2**20
    trainable_mb = sum(t.numel() * 4 for k, t in student.items() if k not in copied) / 2**20
    memory = json.loads((out / MEMORY_REPORT).read_text())
    for optimizer in memory["optimizer_mb"]:
        assert new_mb <= optimizer <= 3 * trainable_mb / 2 * 1.05 + 0.05


@pytest.mark.assets
def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    """The estimate counts the teacher's real parameters (SmolLM2-135M's safetensors headers) at 16
    bytes each per checkpoint, with at most 3 kept plus 1 staged; a disk one byte short is refused."""
    import shutil
    from collections import namedtuple

    from raylin.config import config_from_dict
    from raylin.models.teachers import load_teacher
    from raylin.train.trainer import check_disk, checkpoint_disk_need

    config = config_from_dict({"teacher": "asset:smollm2-135m", "output_dir": str(tmp_path / "run"), "plan": {"mixer": "mamba2"},
                               "task": {"type": "causal_lm"}, "data": {"name": "austen"}, "guidance": {"mode": "unguided"},
                               "train": {"max_steps": 40, "checkpoint_every": 10}})
    model, _ = load_teacher("asset:smollm2-135m", model_class="AutoModelForCausalLM")
    parameters = sum(p.numel() for p in model.parameters())
    assert checkpoint_disk_need(config) == (parameters, 4 * 16 * parameters)  # 4 saves: 3 kept + 1 staged
    one_save = config_from_dict(config.to_dict() | {"train": config.to_dict()["train"] | {"checkpoint_every": 40}})
    assert checkpoint_disk_need(one_save) == (parameters, 2 * 16 * parameters)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 4 * 16 * parameters - 1))
    with pytest.raises(RuntimeError, match=r"Not enough free disk.*needs about 8\.6 GB \(4 checkpoint\(s\) of about 2\.2 GB "
                                           r"for 135M parameters.*train\.checkpoint_every >= train\.max_steps"):
        check_disk(config)
    check_disk(one_save)  # 2 x 2.2 GB fits
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_trained_teacher_is_scored_once_per_checkpoint_and_held_out_set(teachers, tmp_path, monkeypatch):
    import os
    import shutil

    from raylin.pipeline import TEACHER_SCORES_DIR, score_teacher

    monkeypatch.setenv("RAYLIN_CACHE", str(tmp_path / "cache"))
    target = shutil.copytree(teachers["target"], tmp_path / "target")  # its files are touched below
    config = _config(teachers, tmp_path / "run", target_teacher=str(target))
    scores = score_teacher(config)
    (entry,) = (tmp_path / "cache" / TEACHER_SCORES_DIR).iterdir()
    assert json.loads(entry.read_text())["scores"] == scores
    # The second run reads the file: a sentinel written there comes back.
    record = json.loads(entry.read_text())
    entry.write_text(json.dumps(record | {"scores": {"accuracy": -1.0}}))
    assert score_teacher(config) == {"accuracy": -1.0}
    # Another held-out set, or the same teacher path with new files, is scored afresh.
    assert score_teacher(_config(teachers, tmp_path / "run", target_teacher=str(target),
                                 data={"max_length": 48, "max_train_examples": 256, "max_eval_examples": 32})) != {"accuracy": -1.0}
    weights = target / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert score_teacher(config) == scores
    # A source model whose task head is new is never remembered (its head is random per load).
    before = len(list((tmp_path / "cache" / TEACHER_SCORES_DIR).iterdir()))
    score_teacher(_config(teachers, tmp_path / "run", target_teacher=None, guidance={"mode": "unguided"}))
    assert len(list((tmp_path / "cache" / TEACHER_SCORES_DIR).iterdir())) == before


@pytest.mark.parametrize("grouped", [False, True])
def test_the_training_optimizer_is_fused_adamw_with_the_same_update(grouped):
    """raylin.optim.adamw: torch's fused AdamW on CPU, the same step as the default
    implementation up to float rounding, with or without parameter groups."""
    from raylin.optim import adamw

    torch.manual_seed(0)
    ours, reference = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    reference.load_state_dict(ours.state_dict())

    def params(model):
        return [{"params": [model.weight]}, {"params": [model.bias], "lr": 1e-2}] if grouped else model.parameters()

    optimizer = adamw(params(ours), lr=1e-3, weight_decay=0.01)
    expected = torch.optim.AdamW(params(reference), lr=1e-3, weight_decay=0.01, foreach=False)
    assert optimizer.defaults["fused"] is True and expected.defaults["fused"] is None
    for step in range(5):
        x = torch.randn(8, 64)
        for model, opt in ((ours, optimizer), (reference, expected)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for got, want in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_the_training_optimizer_falls_back_where_no_fused_kernel_applies():
    from raylin.optim import adamw

    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    assert adamw([meta], lr=1e-3).defaults["fused"] is None


def test_the_train_log_reads_one_record_per_step_the_rerun_winning(tmp_path):
    from raylin.train.run_files import read_train_log

    assert read_train_log(tmp_path) == []  # a run that has not logged yet
    # Steps 1-4, then a resume from the step-2 checkpoint re-runs 3 and 4.
    records = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)] + [{"step": s, "loss": 20.0 - s} for s in (3, 4)]
    (tmp_path / TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_train_log(tmp_path) == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
                                        {"step": 3, "loss": 17.0}, {"step": 4, "loss": 16.0}]


def test_the_loop_reports_at_evaluations_checkpoints_and_the_last_step():
    from raylin.config import TrainConfig
    from raylin.train.run_files import checkpoints_at, evaluates_at, reports_at

    train = TrainConfig(max_steps=12, eval_every=3, checkpoint_every=5)
    assert [s for s in range(1, 13) if evaluates_at(s, train)] == [3, 6, 9, 12]
    assert [s for s in range(1, 13) if checkpoints_at(s, train)] == [5, 10, 12]
    assert [s for s in range(1, 13) if reports_at(s, train)] == [3, 5, 6, 9, 10, 12]
    no_eval = TrainConfig(max_steps=12, eval_every=None, checkpoint_every=5)
    assert [s for s in range(1, 13) if reports_at(s, no_eval)] == [5, 10, 12]


def test_the_throughput_benchmark_times_both_loops_doing_the_same_math(teachers, ray_cluster, tmp_path):
    """`raylin bench distill`'s two loops (Ray Train + DeepSpeed, and a plain in-process loop)
    compute the same first-step loss on the same batch (fp32 activations, one worker), time the
    steps after warm-up, and the bf16 check scores the run's student and its teacher both ways."""
    from raylin.bench.throughput import bf16_scores, plain_throughput, raylin_throughput, summarize_throughput

    config = _config(teachers, tmp_path / "run", **{"train.num_workers": 1, "train.max_steps": 3,
                                                     "train.checkpoint_every": 3, "teacher_service.mode": "inprocess",
                                                     "teacher_service.dtype": "float32"})
    raylin, student_dir = raylin_throughput(config, warmup=1)
    plain = plain_throughput(config, steps=3, warmup=1)
    assert raylin.first_loss == pytest.approx(plain.first_loss, rel=1e-5)
    assert raylin.steps_timed == plain.steps_timed == 2
    assert raylin.tokens_per_s > 0 and plain.tokens_per_s > 0
    summary = summarize_throughput({"throughput": [vars(raylin), vars(plain)]})
    assert [row["config"] for row in summary] == ["run"]
    rows = bf16_scores(config, student_dir)
    assert {(row["model"], row["metric"]) for row in rows} == {("teacher", "accuracy"), ("student", "accuracy")}
    assert all(0 <= row["fp32"] <= 1 and 0 <= row["bf16"] <= 1 for row in rows)
