"""Experiment tracking (raylin.tracking) against the real libraries, offline: MLflow's local file
store for a whole conversion, tensorboardX's event files for the TensorBoard backend."""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import struct

import pytest
from conftest import losses_of, run_config
from tensorboardX.proto import event_pb2

import raylin.tracking
from raylin.config import ConfigError, config_from_dict
from raylin.pipeline import run_conversion
from raylin.tracking import TRACKING_FILE, log_results, open_tracker, tracked_run

pytestmark = pytest.mark.assets

mlflow = pytest.importorskip("mlflow")


def test_a_conversion_is_one_mlflow_run_with_every_step_the_results_and_survives_a_restart(
        teachers, ray_cluster, tmp_path, monkeypatch):
    """Rank 0 logs each train-log record at its step, once its checkpoint is committed; a worker killed
    before step 9 restarts from the step-6 checkpoint and goes on in the same tracked run; the driver
    adds the results."""
    store = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # raylin sets it for file: stores; not for later tests
    monkeypatch.setenv("RAYLIN_TEST_FAULT", "crash:8")
    metrics = run_conversion(run_config(teachers, out, guidance={"mode": "unguided"},
                                        tracking={"backend": "mlflow", "uri": store, "experiment": "soak",
                                                  "tags": {"team": "raylin"}}))
    assert (out / ".fault-crash-8").exists()
    client = mlflow.MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "soak"]
    (run,) = client.search_runs([experiment.experiment_id])  # one tracked run across the restart
    assert run.info.run_id == json.loads((out / TRACKING_FILE).read_text())["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.data.tags["team"] == "raylin"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["plan.mixer"] == "linformer"
    history = client.get_metric_history(run.info.run_id, "loss")
    last = {}
    for point in sorted(history, key=lambda m: m.timestamp):
        last[point.step] = point.value
    assert sorted(last) == list(range(1, 13))
    assert [last[step] for step in range(1, 13)] == pytest.approx(losses_of(out), rel=1e-12)
    assert len(history) == 12  # each step once: the lost attempt's steps 7-8 never reached the tracked run
    assert run.data.metrics["result.student.accuracy"] == metrics["student"]["accuracy"]
    assert run.data.metrics["result.teacher.accuracy"] == metrics["teacher"]["accuracy"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "metrics.json" in artifacts


def _events(folder):
    """(tag, step, value) of every scalar in the tfevents files under ``folder``."""
    found = []
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_tensorboard_backend_writes_each_step_as_scalars(teachers, tmp_path):
    config = run_config(teachers, tmp_path / "run", tracking={"backend": "tensorboard"})
    (tmp_path / "run").mkdir()
    tracker = open_tracker(config, tmp_path / "run")
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0 / step, "lr": 1e-3, "step": step, "note": "text is skipped"})
    tracker.close()
    scalars = _events(tmp_path / "run" / "tensorboard")
    assert [(s, v) for tag, s, v in scalars if tag == "loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert not [tag for tag, _, _ in scalars if tag == "note"]


def test_an_unknown_or_uninstalled_backend_is_refused_with_the_fix(teachers, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking.backend 'comet' is unknown; choose one of \('none', 'mlflow'"):
        run_config(teachers, tmp_path / "a", tracking={"backend": "comet"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install wandb"):
        config_from_dict({"teacher": teachers["source"], "output_dir": str(tmp_path / "b"), "plan": {"mixer": "linformer"},
                          "tracking": {"backend": "wandb"}})


def _mlflow_config(teachers, out, **tracking):
    return run_config(teachers, out, tracking={"backend": "mlflow", "uri": (out.parent / "mlruns").as_uri(), **tracking})


def test_a_resumed_mlflow_run_keeps_its_params_a_failed_attempt_ends_failed_and_a_new_store_starts_anew(
        teachers, tmp_path, monkeypatch):
    """MLflow's params cannot change: a resume with a larger max_steps reopens the run without
    logging them again. A failing attempt ends FAILED; another experiment gets a run of its own."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    first = _mlflow_config(teachers, out, experiment="a")
    with pytest.raises(FloatingPointError), tracked_run(first, out) as tracker:
        tracker.log(1, {"loss": 0.5})
        raise FloatingPointError("a NaN stop")
    run_id = json.loads((out / TRACKING_FILE).read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(first.tracking.uri)
    assert client.get_run(run_id).info.status == "FAILED"

    longer = config_from_dict({**first.to_dict(), "train": {**first.to_dict()["train"], "max_steps": 40}})
    with tracked_run(longer, out) as tracker:
        tracker.log(2, {"loss": 0.25})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == str(first.train.max_steps)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]

    moved = _mlflow_config(teachers, out, experiment="b")
    with tracked_run(moved, out) as tracker:
        tracker.log(1, {"loss": 1.0})
    assert json.loads((out / TRACKING_FILE).read_text())["mlflow_run_id"] != run_id


def test_a_tracker_that_fails_is_a_warning_and_never_fails_the_run(teachers, tmp_path, monkeypatch, caplog):
    """A tracking server that is gone: opening warns and the attempt trains untracked; the driver's
    results are a warning too; a tracker that fails mid-run is dropped after one warning."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    config = run_config(teachers, out, tracking={"backend": "mlflow", "uri": dead})
    with caplog.at_level(logging.WARNING, logger="raylin"):
        assert open_tracker(config, out) is None
        (out / TRACKING_FILE).write_text(json.dumps({"mlflow_run_id": "0" * 32, "tracking_uri": dead}))
        (out / "metrics.json").write_text("{}")
        log_results(config, {"student": {"accuracy": 0.5}, "steps": 4})
    assert "could not open the tracked run" in caplog.text and "training goes on without tracking" in caplog.text
    assert "could not add the results to the tracked run" in caplog.text and "metrics.json" in caplog.text

    class Flaky:
        calls = 0

        def log(self, step, metrics):
            Flaky.calls += 1
            raise ConnectionError("server went away")

        def close(self, failed=False):
            raise AssertionError("a dropped tracker is not called again")

    monkeypatch.setitem(raylin.tracking.BACKENDS, "mlflow", raylin.tracking.Backend("mlflow", "mlflow", lambda *a: Flaky()))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raylin"), tracked_run(config, out) as tracker:
        for step in range(3):
            tracker.log(step, {"loss": 1.0})
    assert Flaky.calls == 1 and caplog.text.count("server went away") == 1
