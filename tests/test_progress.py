"""The driver's progress display (raylin.progress): read from the files the workers append to."""

from __future__ import annotations

import json
import logging
import threading
import time

import transformers

from raylin.log import setup_logging
from raylin.progress import StageProgress, append_record, follow


def _write_steps(path, steps, pause=0.02):
    for step in steps:
        append_record(path, {"step": step, "loss": 1.0 / step, "tokens": 100 * step, "wall_s": float(step)})
        time.sleep(pause)


def _progress_lines(capsys, label):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"[raylin] {label}:")]


def test_each_tenth_of_a_stage_is_shown_once_with_loss_rate_and_eta(tmp_path, capsys):
    setup_logging("normal")
    log_file = tmp_path / "train_log.jsonl"
    with follow("distil", 100, [log_file], terminal=False):
        _write_steps(log_file, range(1, 101), pause=0.002)
    lines = _progress_lines(capsys, "distil")
    assert len(lines) == len(set(lines)) and 10 <= len(lines) <= 12
    assert lines[-1].startswith("[raylin] distil: step 100/100, loss 0.01, 100 tokens/s, ETA 0:00")
    # The rate and ETA come from the workers' clock (wall_s), not from when the driver read the line.
    assert "step 50/100, loss 0.02, 100 tokens/s, ETA 0:50" in "\n".join(lines)


def test_a_restart_from_a_checkpoint_is_said_and_counted_from_there(tmp_path, capsys):
    setup_logging("normal")
    log_file = tmp_path / "train_log.jsonl"
    with follow("distil", 8, [log_file], terminal=False):
        _write_steps(log_file, [1, 2, 3, 4, 5, 6])
        time.sleep(0.8)  # the follower shows step 6 before the workers go back
        _write_steps(log_file, [5, 6, 7, 8])
    lines = _progress_lines(capsys, "distil")
    restart = lines.index("[raylin] distil: the workers restarted from a checkpoint and resumed at step 5")
    assert [line.split()[3].rstrip(",") for line in lines[restart + 1:]] == ["5/8", "6/8", "7/8", "8/8"]


def test_steps_already_logged_count_as_done_and_half_written_lines_wait(tmp_path, capsys):
    setup_logging("normal")
    log_file = tmp_path / "train_log.jsonl"
    _write_steps(log_file, [1, 2, 3], pause=0)  # a resumed run's earlier steps
    with follow("distil", 4, [log_file], terminal=False):
        with open(log_file, "a") as half:
            half.write(json.dumps({"step": 4, "loss": 0.25})[:8])  # the writer has not finished the line
            half.flush()
            time.sleep(0.8)
            assert _progress_lines(capsys, "distil") == []
            half.write(json.dumps({"step": 4, "loss": 0.25})[8:] + "\n")
    assert _progress_lines(capsys, "distil") == ["[raylin] distil: step 4/4, loss 0.25"]


def test_parallel_tasks_count_their_steps_together(tmp_path, capsys):
    setup_logging("normal")
    files = [tmp_path / "task0.jsonl", tmp_path / "task1.jsonl"]
    with follow("align", 5, files, terminal=False):
        writers = [threading.Thread(target=_write_steps, args=(f, range(1, 6))) for f in files]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
    lines = _progress_lines(capsys, "align")
    assert lines[-1].startswith("[raylin] align: step 10/10")


def test_on_a_terminal_it_is_one_bar_redrawn_in_place(capsys):
    setup_logging("normal")
    progress = StageProgress("distil", 3, terminal=True)
    for step in (1, 2, 3):
        progress.update(step, {"loss": 0.5, "tokens": 10 * step, "wall_s": float(step)})
    progress.close()
    err = capsys.readouterr().err
    assert "[raylin] distil: 3/3" in err and "10 tok/s" in err and "\r" in err
    assert not [line for line in err.split("\n") if line.startswith("[raylin] distil: step")]


def test_quiet_hides_progress(tmp_path, capsys):
    setup_logging("quiet")
    try:
        log_file = tmp_path / "train_log.jsonl"
        with follow("distil", 2, [log_file], terminal=False):
            _write_steps(log_file, [1, 2])
        assert _progress_lines(capsys, "distil") == []
    finally:
        setup_logging("normal")
        logging.getLogger("raylin").setLevel(logging.INFO)


def test_below_verbose_the_already_imported_transformers_is_quieted(monkeypatch):
    """`import raylin` imports transformers before the CLI sets up its console, so the environment
    switches come too late for this process: setup_logging quiets transformers' logger and bars itself."""
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.enable_progress_bar()
    setup_logging("normal")
    assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR
    assert not transformers.utils.logging.is_progress_bar_enabled()


def test_a_resumed_run_sets_aside_what_the_lost_attempt_logged_and_the_display_reads_on(tmp_path, capsys):
    """A driver killed at step 5 with a checkpoint at step 3: the resumed run moves steps 4-5 (and a
    half-written record) aside, so the log holds each step once, and a follower reads on from the cut."""
    from raylin.train.run_files import DISCARDED_LOG, TRAIN_LOG, read_train_log, set_aside_unconfirmed

    setup_logging("normal")
    log_file = tmp_path / TRAIN_LOG
    _write_steps(log_file, [1, 2, 3, 4, 5], pause=0)
    with open(log_file, "a") as half:
        half.write('{"step": 6, "lo')  # the lost attempt died mid-write
    with follow("distil", 6, [log_file], terminal=False):
        time.sleep(0.8)
        assert set_aside_unconfirmed(tmp_path, 3) == 3
        time.sleep(0.8)
        _write_steps(log_file, [4, 5, 6])
    assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line)["step"] for line in log_file.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    aside = (tmp_path / DISCARDED_LOG).read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside[:2]] == [4, 5] and aside[2] == '{"step": 6, "lo'
    lines = _progress_lines(capsys, "distil")
    assert "[raylin] distil: the workers restarted from a checkpoint and resumed at step 4" in lines
    assert lines[-1].startswith("[raylin] distil: step 6/6")
    assert set_aside_unconfirmed(tmp_path, 6) == 0 and set_aside_unconfirmed(tmp_path / "none", 0) == 0
