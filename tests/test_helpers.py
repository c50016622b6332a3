"""The one-per-mechanism helpers: atomic writes, fingerprints, fault injection and the console."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os

import pytest

from raylin.atomic import replace_folder, write_text_atomic
from raylin.fault_injection import fires
from raylin.fingerprint import fingerprint
from raylin.log import LEVEL_ENV, QUIET_LIBRARIES, setup_logging
from raylin.train.trainer import _worker_env


def test_a_replaced_folder_is_whole_before_and_after_and_a_failed_build_keeps_the_old_one(tmp_path):
    target = tmp_path / "student"
    replace_folder(target, lambda staging: (staging / "weights").write_text("v1"))
    assert (target / "weights").read_text() == "v1"

    def broken(staging):
        (staging / "weights").write_text("half")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        replace_folder(target, broken)
    assert (target / "weights").read_text() == "v1"  # the finished folder is never deleted first
    replace_folder(target, lambda staging: (staging / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no staging or aside folders left


def test_an_atomic_file_write_leaves_no_temporary_file(tmp_path):
    write_text_atomic(tmp_path / "a" / "metrics.json", "{}")
    write_text_atomic(tmp_path / "a" / "metrics.json", '{"x": 1}')
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["metrics.json"]
    assert (tmp_path / "a" / "metrics.json").read_text() == '{"x": 1}'


def test_a_fingerprint_is_canonical():
    @dataclasses.dataclass
    class Part:
        a: int
        b: tuple

    assert fingerprint({"x": 1, "y": [1, 2]}) == fingerprint({"y": (1, 2), "x": 1})
    assert fingerprint({"part": Part(1, (2,))}) == fingerprint({"part": {"a": 1, "b": [2]}})
    assert fingerprint({"x": 1}) != fingerprint({"x": 2}) and len(fingerprint({}, 20)) == 20


def test_a_fault_fires_once_per_output_folder(tmp_path):
    assert not fires(None, "nan", 3, tmp_path) and not fires("nan:4", "nan", 3, tmp_path)
    assert fires("nan:3", "nan", 3, tmp_path)
    assert not fires("nan:3", "nan", 3, tmp_path)  # a restarted worker does not fail again
    assert fires("nan:3", "nan", 3, tmp_path / "other-run")


def test_the_console_handler_is_attached_once_and_does_not_propagate(monkeypatch):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    logger = setup_logging()
    setup_logging()
    assert [h.get_name() for h in logger.handlers].count("raylin-console") == 1
    assert not logger.propagate and logger.level == logging.INFO
    assert setup_logging("verbose").level == logging.DEBUG
    assert setup_logging("quiet").level == logging.WARNING
    setup_logging()


def test_the_console_follows_stderr_when_it_is_redirected_after_the_handler_was_made():
    setup_logging()  # the handler exists already (made by an earlier test or command)
    redirected = io.StringIO()
    with contextlib.redirect_stderr(redirected):
        logging.getLogger("raylin.console-test").info("one line")
    assert redirected.getvalue() == "[raylin] one line\n"


def test_the_console_level_comes_from_the_environment_workers_inherit(monkeypatch, tmp_path):
    from raylin.cli import main

    monkeypatch.setenv(LEVEL_ENV, "quiet")
    assert setup_logging().level == logging.WARNING  # a Ray worker started with the driver's level
    monkeypatch.setenv(LEVEL_ENV, "loud")
    with pytest.raises(ValueError, match="RAYLIN_LOG_LEVEL='loud' is not a log level"):
        setup_logging()
    monkeypatch.delenv(LEVEL_ENV)
    assert main(["--quiet", "--verbose", "convert", "x.yaml"]) == 2  # one level at a time: argparse refuses
    monkeypatch.setenv(LEVEL_ENV, "normal")
    (tmp_path / "incomplete.yaml").write_text("output_dir: x\n")  # read, then refused: no teacher
    assert main(["--quiet", "convert", str(tmp_path / "incomplete.yaml")]) == 2 and os.environ[LEVEL_ENV] == "quiet"
    setup_logging("normal")


def test_atomic_files_and_folders_get_the_usual_permissions(tmp_path):
    """Staged with mkstemp / mkdtemp (0600 / 0700), published with what open() and mkdir() give."""
    import os
    import stat

    write_text_atomic(tmp_path / "metrics.json", "{}")
    replace_folder(tmp_path / "student", lambda staging: None)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "student").stat().st_mode) == 0o777 & ~umask


def test_libraries_are_quiet_below_verbose_and_a_users_setting_wins(monkeypatch):
    for name in QUIET_LIBRARIES:
        monkeypatch.delenv(name, raising=False)
    setup_logging("verbose")
    assert not any(name in os.environ for name in QUIET_LIBRARIES)  # --verbose shows the libraries' own output
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    setup_logging("normal")
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"  # set by the user: kept
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert {name: _worker_env(False)[name] for name in QUIET_LIBRARIES} == {name: os.environ[name] for name in QUIET_LIBRARIES}
