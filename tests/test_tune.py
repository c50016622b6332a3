"""Ray Tune sweeps: a 4-trial sweep on this 2-core machine, ASHA, a shared teacher, resume, best config."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import losses_of, run_config
from raylin.config import ConfigError, config_from_dict, load_config

pytestmark = pytest.mark.assets


def _sweep_file(teachers, tmp_path, space, **tune) -> Path:
    data = run_config(teachers, tmp_path / "sweep").to_dict()
    data["train"] |= {"eval_every": 3}
    data["tune"] = {"metric": "loss", "mode": "min", "grace_period": 1, "reduction_factor": 2, "space": space, **tune}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_search_spaces_fail_before_ray_starts(teachers, tmp_path):
    from raylin.tune.search import load_tune_config

    for space, message in [
        ({"loss.alpha_layer": {"normal": [0, 1]}}, r"must be one of \{choice, grid"),
        ({"guidance.mode": {"choice": ["target", "distil"]}}, r"tune.space.guidance.mode value 'distil'.*is unknown"),
        ({"loss.alpha_out": {"uniform": [1, 0]}}, r"needs \[low, high\] with low < high"),
        ({"train.max_stepz": {"grid": [1, 2]}}, r"Unknown config key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_tune_config(_sweep_file(teachers, tmp_path, space))


def test_an_unset_sweep_direction_is_the_metrics_own(teachers, tmp_path):
    from raylin.tune.search import load_tune_config

    space = {"loss.alpha_layer": {"grid": [0.5]}}
    for name, mode in (("loss", "min"), ("eval_accuracy", "max"), ("eval_imdb_accuracy", "max")):
        _, section, _ = load_tune_config(_sweep_file(teachers, tmp_path, space, metric=name, mode=None))
        assert section.mode == mode, name
    with pytest.raises(ConfigError, match="tune.metric 'loss_layer' has no known direction; set tune.mode"):
        load_tune_config(_sweep_file(teachers, tmp_path, space, metric="loss_layer", mode=None))
    _, section, _ = load_tune_config(_sweep_file(teachers, tmp_path, space, metric="loss_layer", mode="min"))
    assert section.mode == "min"


def test_relative_paths_mean_the_same_inside_trials(teachers, tmp_path, monkeypatch):
    """Trials run in Ray Tune's trial folders: the base they get carries absolute paths."""
    import shutil

    from raylin.tune.search import load_tune_config, trial_config

    shutil.copytree(teachers["target"], tmp_path / "target")
    monkeypatch.chdir(tmp_path)
    data = run_config(teachers, tmp_path / "out").to_dict()
    data |= {"target_teacher": "target", "output_dir": "out"}
    data["tune"] = {"space": {"loss.alpha_layer": {"grid": [0.5, 1.0]}}}
    Path("sweep.yaml").write_text(yaml.safe_dump(data))
    base, _, _ = load_tune_config("sweep.yaml")
    monkeypatch.chdir(tmp_path.parent)
    trial = trial_config(base, {"loss.alpha_layer": 0.5}, "t0")
    assert trial.target_teacher == str(tmp_path / "target")
    assert trial.output_dir.startswith(str(tmp_path / "out"))


def test_sweep_stops_weak_trials_shares_the_teacher_resumes_and_writes_a_best_config_the_schema_takes(teachers, tmp_path):
    # Larger layer-loss weights give larger losses from the first report: ASHA (metric loss, min)
    # must stop some of them. One trial at a time fits 2 CPUs (2 workers x 0.5 + the teacher's 1).
    config = _sweep_file(teachers, tmp_path, {"loss.alpha_layer": {"grid": [0.0, 1000.0, 10000.0, 100000.0]}})
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    raylin = [sys.executable, "-m", "raylin.cli", "tune", str(config)]
    first = subprocess.Popen(raylin, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:
            logs = list((out / "trials").glob("*/train_log.jsonl"))
            if any('"step": 8' in log.read_text() for log in logs):
                break  # the first trial is past its step-6 checkpoint: interrupt it as a user's Ctrl-C would
            time.sleep(1)
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130  # "interrupted: resume with --resume"
    finally:
        if first.poll() is None:
            first.kill()
    assert not (out / "tune" / "results.csv").exists()
    resumed = subprocess.run(raylin + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "tune" / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["stopped_early"] >= 1
    assert summary["params"]["loss.alpha_layer"] == 0.0
    rows = list(csv.DictReader((out / "tune" / "results.csv").open()))
    assert len(rows) == 4 and all(math.isfinite(float(row["loss"])) for row in rows)
    assert (out / "tune" / "curves.png").stat().st_size > 0
    assert "| 1 |" in (out / "tune" / "results.md").read_text()
    # The interrupted trial resumed from its step-6 checkpoint, yet its history keeps the reports
    # from before the interruption (Tune's own results of it start over at the resume).
    best = summary["best_trial"]
    losses = losses_of(out / "trials" / best)
    history = json.loads((out / "tune" / "curves.json").read_text())[best]
    assert history == [[step, losses[step - 1]] for step in (3, 6, 9, 12)]
    assert summary["loss"] == min(losses[step - 1] for step in (3, 6, 9, 12))
    # Trials share one teacher replica per sweep run: the teacher loaded once by the interrupted
    # run and once by the resumed one (counters add up over both), not once per trial.
    stats = json.loads((out / "tune" / "teacher_service.json").read_text())
    assert stats["teacher_loads"] == 2 and stats["teacher_forwards"] > 0
    # best_config.yaml is a plain run config that `raylin convert` accepts unchanged: the schema
    # takes it as it is, and it is the best trial's run with its own output folder (the trial ran
    # it, so converting it again would only repeat that run).
    best_config = load_config(out / "tune" / "best_config.yaml")
    base = {key: value for key, value in yaml.safe_load(config.read_text()).items() if key != "tune"}
    assert best_config == config_from_dict(base, ["loss.alpha_layer=0.0", f"output_dir={out / 'best'}"])
