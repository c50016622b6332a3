"""One run per output folder at a time (raylin.run_lock): a second start is refused naming the holder,
or waits with --wait; a holder that died leaves nothing that blocks a rerun. Real processes: the
lock is an flock between them, and the CLI test starts two real `raylin convert` runs."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import discarded_steps, run_config_dict, steps_logged

from raylin.errors import RunInProgress
from raylin.run_lock import LOCK_FILE, hold_output_dir

BIN = Path(sys.executable).parent


def _hold(out: str, ready, release) -> None:
    with hold_output_dir(out):
        ready.set()
        release.wait(60)


def _holder(out: Path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    process = context.Process(target=_hold, args=(str(out), ready, release))
    process.start()
    assert ready.wait(60)
    return process, release


def test_a_second_holder_is_refused_naming_the_first_and_a_waiter_gets_its_turn(tmp_path):
    out = tmp_path / "run"
    process, release = _holder(out)
    with pytest.raises(RunInProgress) as refused:
        with hold_output_dir(out):
            pass
    message = str(refused.value)
    assert f"output_dir {out} is in use by a run in progress: process {process.pid} on {socket.gethostname()}" in message
    assert "--wait" in message and "--set output_dir=" in message
    release.set()
    with hold_output_dir(out, wait=True):  # waits for the holder to end, then holds the folder itself
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        process.join(30)
        assert process.exitcode == 0  # the first holder ended cleanly, having released the folder
    assert not (out / LOCK_FILE).exists() and out.is_dir()


def test_a_holder_that_died_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    process, _ = _holder(out)
    os.kill(process.pid, signal.SIGKILL)  # no cleanup at all: the lock file stays, naming a dead process
    process.join(30)
    assert (out / LOCK_FILE).exists()
    with hold_output_dir(out):  # the kernel dropped the dead process's flock
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_refused_start_leaves_a_folder_it_made_as_it_was(tmp_path):
    out = tmp_path / "a" / "b"
    with hold_output_dir(out):
        assert out.is_dir()
    assert not (tmp_path / "a").exists()  # made for the lock, left empty: removed again


@pytest.mark.assets
def test_two_real_convert_starts_into_one_folder(teachers, tmp_path):
    """`raylin convert` twice into one folder, the second while the first trains: refused at once
    with exit status 2 naming the holder; a third with --wait starts when the first ends and finds
    its results; the train log holds each step once."""
    out = tmp_path / "run"
    config = run_config_dict(teachers, out, **{"data.max_train_examples": 128, "data.max_eval_examples": 32,
                                               "train.max_steps": 8, "train.checkpoint_every": 8, "train.zero_stage": 0})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    command = [str(BIN / "raylin"), "convert", str(path)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"output_dir {out} is in use by a run in progress: process {first.pid} on {socket.gethostname()}" in second.stderr
        assert "raylin convert" in second.stderr and "Traceback" not in second.stderr
        waiter = subprocess.Popen([*command, "--wait"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_out, first_err = first.communicate(timeout=600)
        assert first.returncode == 0, first_err[-3000:]
        waiter_out, waiter_err = waiter.communicate(timeout=300)
        assert waiter.returncode == 0, waiter_err[-3000:]
    finally:
        for process in (first,):
            if process.poll() is None:
                process.kill()
    assert "is in use by" in waiter_err and "waiting for it to end" in waiter_err
    assert "holds this run, finished: its results stand" in waiter_err
    assert json.loads(waiter_out) == json.loads(first_out)  # the waiter found the first run's results
    assert steps_logged(out) == list(range(1, 9)) and not (out / LOCK_FILE).exists()


@pytest.mark.assets
def test_a_killed_driver_run_again_resumes_and_logs_each_step_once(teachers, tmp_path):
    """SIGKILL to a `raylin convert` driver's process group while it holds past its step-8 checkpoint,
    then the same command again: the folder is free (no stale lock), the run resumes from step 8,
    and train_log.jsonl holds steps 1-16 once, the lost attempt's 9-11 set aside."""
    import psutil

    out = tmp_path / "run"
    config = run_config_dict(teachers, out, **{"data.max_train_examples": 128, "data.max_eval_examples": 32,
                                               "train.max_steps": 16, "train.checkpoint_every": 4, "train.zero_stage": 0})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [str(BIN / "raylin"), "convert", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    driver = subprocess.Popen(command, env={**env, "RAYLIN_TEST_FAULT": "stall:11"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    launched = []
    try:
        deadline = time.monotonic() + 300
        while not (out / ".fault-stall-11").exists():  # rank 0 holds before step 12: steps 1-11 logged
            assert driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(3)  # Ray Train's controller has registered the step-8 checkpoint
        launched = psutil.Process(driver.pid).children(recursive=True)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        for process in launched:  # what the driver started and the group kill did not reach
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    assert steps_logged(out)[-1] == 11
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert steps_logged(out) == list(range(1, 17))
    assert discarded_steps(out) == [9, 10, 11]
    assert json.loads(again.stdout)["steps"] == 16 and not (out / LOCK_FILE).exists()
