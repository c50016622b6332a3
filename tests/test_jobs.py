"""End to end as users run it: a real Ray head (`ray start --head`), jobs sent with `ray job submit
--working-dir .`, the student read back from the job's output folder.

The head is started by this module and stopped by its own PID (SIGTERM to `ray start --block`,
which stops the node it started); nothing else is touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import run_config_dict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head with a job server: yields its dashboard address and the clients' environment."""
    # Ray 2.60 heads require a token (written to ~/.ray/auth_token); clients must say they use it.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    log_path = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    # A private temp dir: `ray start` records its address there (ray_current_cluster), and a record
    # in the default /tmp/ray would outlive this head and redirect every later ray.init() on the machine.
    temp_dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             f"--port={free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={free_port()}", "--include-dashboard=true"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while ray_cli(env, "job", "list", "--address", address).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up: {log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the node it started on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, *entrypoint: str) -> str:
    """`ray job submit --working-dir .` from the repository root; returns the submission id."""
    submission_id = f"raylin-test-{uuid.uuid4().hex[:8]}"
    done = ray_cli(env, "job", "submit", "--address", address, "--working-dir", ".", "--submission-id", submission_id,
                   "--no-wait", "--", *entrypoint)
    assert done.returncode == 0, done.stdout + done.stderr
    return submission_id


def job_end(address: str, env: dict, submission_id: str, timeout_s: float = 600) -> tuple[str, str]:
    """Poll `ray job status` until the job ends (stopped after ``timeout_s``): its status and logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = ray_cli(env, "job", "status", "--address", address, submission_id)
        status = (answer.stdout + answer.stderr).upper()  # "Status for job '...': SUCCEEDED"
        if any(word in status for word in ("SUCCEEDED", "FAILED", "STOPPED")) or time.monotonic() > deadline:
            break
        time.sleep(3)
    logs = ray_cli(env, "job", "logs", "--address", address, submission_id).stdout
    if not any(word in status for word in ("SUCCEEDED", "FAILED", "STOPPED")):
        ray_cli(env, "job", "stop", "--address", address, submission_id)
    return status, logs


def wait_for(address: str, env: dict, submission_id: str, timeout_s: float = 600) -> str:
    """Poll `ray job status` until the job ends; its logs when it SUCCEEDED."""
    status, logs = job_end(address, env, submission_id, timeout_s)
    assert "SUCCEEDED" in status, f"job {submission_id}: {status}\n{logs[-6000:]}"
    return logs


@pytest.mark.assets
def test_ray_job_submit_converts_refuses_a_double_submit_and_evaluates_on_a_ray_head(ray_head, tmp_path, teachers):
    """A tiny conversion submitted as a Ray job to a `ray start --head` cluster, as a user would:
    - submitted again while the first trains, the second job fails at once naming the holder
      (nothing of it reaches the run); a third with --wait finds the finished run;
    - the first succeeds; the student folder it writes loads and scores as the run reported; the
      outputs are published to train.storage_path and the train log holds each step once;
    - a further job (jobs/eval.py) re-scores the run on the same cluster."""
    import torch

    import raylin
    from raylin.config import config_from_dict
    from raylin.data.task_data import load_task_data
    from raylin.run_lock import LOCK_FILE
    from raylin.train.evaluation import evaluate

    address, env = ray_head
    out, storage = tmp_path / "run", tmp_path / "storage"
    config = run_config_dict(teachers, out, **{
        "data.max_train_examples": 128, "data.max_eval_examples": 64,
        "train.max_steps": 6, "train.checkpoint_every": 6, "train.storage_path": str(storage),
        "teacher_service": {"mode": "served", "cpus": 1}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    first = submit(address, env, "python", "jobs/convert.py", str(path))
    deadline = time.monotonic() + 180
    while not (out / LOCK_FILE).is_file():
        assert time.monotonic() < deadline, ray_cli(env, "job", "logs", "--address", address, first).stdout[-3000:]
        time.sleep(0.5)
    status, logs = job_end(address, env, submit(address, env, "python", "jobs/convert.py", str(path)), 180)
    assert "FAILED" in status and f"output_dir {out} is in use by a run in progress: process" in logs, logs[-3000:]
    waiting = submit(address, env, "python", "jobs/convert.py", str(path), "--wait")
    logs = wait_for(address, env, first)
    assert "raylin convert: Ray" in logs and "1 nodes" in logs, logs[-2000:]
    assert "holds this run, finished: its results stand" in wait_for(address, env, waiting)
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7))

    metrics = json.loads((out / "metrics.json").read_text())
    run = config_from_dict(config)
    assert metrics["steps"] == 6 and set(metrics) >= {"teacher", "student", "tokens", "wall_s"}
    assert metrics["published"] == f"{storage}/{run.run_name}/outputs"
    assert (Path(metrics["published"]) / "student" / "model.safetensors").is_file()
    student = raylin.load_student(out / "student")
    scores = evaluate(student, load_task_data(run, student.processor), run, torch.device("cpu"), 0, 1)
    assert scores["accuracy"] == pytest.approx(metrics["student"]["accuracy"], abs=1e-6)

    wait_for(address, env, submit(address, env, "python", "jobs/eval.py", str(path), "--length", "64"))
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["student"]["accuracy"] == pytest.approx(metrics["student"]["accuracy"], abs=1e-6)
    assert evaluation["teacher"]["accuracy"] == pytest.approx(metrics["teacher"]["accuracy"], abs=1e-6)
    assert evaluation["forward"]["length"] == 64 and evaluation["speedup"] > 0


def test_job_entrypoints_are_the_cli_commands():
    for command in ("convert", "finetune", "tune", "eval"):
        text = (ROOT / "jobs" / f"{command}.py").read_text()
        assert f'job_main("{command}")' in text and f"python jobs/{command}.py" in text
