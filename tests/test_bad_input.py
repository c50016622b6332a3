"""Every kind of bad input to the command line is refused before Ray starts: exit status 2, every
problem listed at once, each naming its key and the fix, and no traceback. A run never touches a
folder holding another config's run unless told to (--overwrite)."""

from __future__ import annotations

import json
import re

import pytest
import ray
import yaml
from conftest import require_asset

from raylin import pipeline
from raylin.cli import main
from raylin.config import ConfigError, config_from_dict, dump_config
from raylin.pipeline import check_output_dir, prepare_output_dir

GOOD = {
    "teacher": "asset:all-minilm-l6",
    "task": {"type": "sequence_classification", "num_labels": 2},
    "data": {"name": "rotten_tomatoes", "max_length": 64},
    "plan": {"mixer": "linformer", "linformer": {"k": 16}},
    "guidance": {"mode": "unguided"},
    "train": {"num_workers": 2, "cpus_per_worker": 0.5, "max_steps": 4, "batch_size": 8, "checkpoint_every": 4},
}

# (what is wrong: a config text or a change to GOOD, --set overrides, what the message must say)
CASES = {
    "missing file": (None, [], [r"Config file .*missing\.yaml does not exist"]),
    "YAML syntax": ("teacher: [unclosed\n", [], [r"is not valid YAML"]),
    "not a mapping": ("- a\n- b\n", [], [r"A config must be a mapping"]),
    "unknown key": ({"train": {**GOOD["train"], "max_stepz": 3}}, [], [r"Unknown config key\(s\) \['train.max_stepz'\]; valid keys here: .*'max_steps'"]),
    "unknown section": ({"trainer": {}}, [], [r"Unknown config key\(s\) \['trainer'\]"]),
    "wrong type": ({}, ["train.lr=fast"], [r"Config key 'train.lr' must be float, got 'fast'"]),
    "override without =": ({}, ["train.lr"], [r"Override 'train.lr' must look like key=value"]),
    "override of an unknown key": ({}, ["train.nope=1"], [r"Unknown config key\(s\) \['train.nope'\]"]),
    "out of range": ({}, ["train.num_workers=0", "data.max_length=2"], [r"train.num_workers must be >= 1", r"data.max_length must be >= 8"]),
    "unknown choice": ({}, ["guidance.mode=sideways"], [r"guidance.mode 'sideways' is unknown; choose one of"]),
    "unknown mixer": ({"plan": {"mixer": "mamba9"}}, [], [r"Unknown plan.mixer 'mamba9'; choose one of"]),
    "missing teacher folder": ({}, ["teacher=/nonexistent/teacher"], [r"teacher '/nonexistent/teacher' cannot be read .*set it to a folder"]),
    "unknown asset": ({}, ["teacher=asset:nope"], [r"Unknown asset 'nope'; shipped assets"]),
    "missing required key": ("output_dir: x\n", [], [r"Missing required config key 'teacher'"]),
    "unknown data set": ({"data": {"name": "no_such_data"}}, [], [r"data.name 'no_such_data' is not a sequence_classification data set"]),
    "evaluation set without a source": ({"eval_sets": [{"name": "x"}]}, [], [r"eval_sets\[0\]: 'x' is not a built-in .*give it a source"]),
    "evaluation source with unknown keys": ({"eval_sets": [{"name": "x", "source": {"path": "f.csv", "text": "t"}}]}, [],
                                            [r"eval_sets\[0\].source: unknown key\(s\) \['text'\]; known: .*'text_column'"]),
    "evaluation file missing": ({"eval_sets": [{"name": "x", "source": {"path": "/nonexistent/file.csv", "text_column": "t",
                                                                        "label_column": "l"}}]}, [],
                                [r"eval_sets\[0\].source: path '/nonexistent/file.csv' does not exist; give an existing local file"]),
    "output folder under a file": ({}, ["output_dir={tmp}/afile/run"], [r"output_dir .* is under the file .*; choose a folder path"]),
    "output folder that cannot be made": ({}, ["output_dir=/proc/raylin-run"], [r"output_dir /proc/raylin-run cannot be created"]),
    "many problems at once": ({"plan": {"mixer": "mamba9"}, "data": {"name": "no_such_data"}}, ["train.lr=fast", "teacher=asset:nope"],
                              [r"4 problems:", r"mamba9", r"no_such_data", r"train.lr", r"asset 'nope'"]),
}


def _write_config(tmp_path, spec):
    path = tmp_path / ("missing.yaml" if spec is None else "config.yaml")
    if isinstance(spec, str):
        path.write_text(spec)
    elif isinstance(spec, dict):
        path.write_text(yaml.safe_dump({**GOOD, "output_dir": str(tmp_path / "out"), **spec}))
    return path


@pytest.mark.parametrize("command", ["convert", "finetune"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_ray_starts_with_every_problem_and_no_traceback(case, command, tmp_path, capsys):
    require_asset("all-minilm-l6")
    (tmp_path / "afile").write_text("")
    spec, overrides, messages = CASES[case]
    if command == "finetune" and case == "unknown choice":
        pytest.skip("finetune sets guidance itself")
    path = _write_config(tmp_path, spec)
    argv = [command, str(path), *[arg for o in overrides for arg in ("--set", o.format(tmp=tmp_path))]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for message in messages:
        assert re.search(message, err), (message, err)
    assert not ray.is_initialized()


def test_eval_of_a_missing_student_is_bad_input(tmp_path, capsys):
    require_asset("all-minilm-l6")
    path = _write_config(tmp_path, {})
    assert main(["eval", str(path), "--student", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "No student folder at" in err and "--student" in err and "Traceback" not in err


def _finished_run(folder, **train):
    config = config_from_dict({**GOOD, "output_dir": str(folder), "train": {**GOOD["train"], **train}})
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_config(config))
    (folder / "metrics.json").write_text(json.dumps({"student": {"accuracy": 0.8}}))
    (folder / "student").mkdir()
    (folder / "student" / "model.safetensors").write_bytes(b"weights")
    return config


def test_a_folder_holding_another_configs_finished_run_is_refused_and_left_as_it_was(tmp_path, capsys):
    require_asset("all-minilm-l6")
    out = tmp_path / "out"
    _finished_run(out, lr=1.0e-3)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    path = _write_config(tmp_path, {"train": {**GOOD["train"], "lr": 5.0e-4}})
    assert main(["convert", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run of a different config (it differs in train.lr)" in err and "--overwrite" in err
    assert not ray.is_initialized()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_deletes_the_other_run_and_its_checkpoints_and_resumable_changes_pass(tmp_path):
    require_asset("all-minilm-l6")
    out, storage = tmp_path / "out", tmp_path / "storage"
    _finished_run(out, lr=1.0e-3, storage_path=str(storage))
    longer = config_from_dict({**GOOD, "output_dir": str(out),
                               "train": {**GOOD["train"], "lr": 1.0e-3, "storage_path": str(storage), "max_steps": 8}})
    assert check_output_dir(longer) is False  # more steps: resumes the same run
    assert (out / "metrics.json").is_file()
    changed = config_from_dict({**GOOD, "output_dir": str(out), "train": {**GOOD["train"], "lr": 5.0e-4, "storage_path": str(storage)}})
    (storage / changed.run_name / "checkpoint_x").mkdir(parents=True)
    with pytest.raises(ConfigError, match="differs in train.lr"):
        check_output_dir(changed)
    assert check_output_dir(changed, overwrite=True) is True
    assert (out / "metrics.json").is_file() and (storage / changed.run_name).exists()  # deleting waits for Ray
    prepare_output_dir(changed, replace=True)
    assert out.is_dir() and not list(out.iterdir()) and not (storage / changed.run_name).exists()


def test_an_internal_error_prints_where_it_happened_and_points_to_verbose(tmp_path, capsys, monkeypatch):
    """Not bad input: a short trace and what to do below --verbose; the whole trace with it."""
    require_asset("all-minilm-l6")
    path = _write_config(tmp_path, {})

    def broken(config, overwrite=False):
        raise RuntimeError("something raylin did not expect")

    monkeypatch.setattr(pipeline, "run_conversion", broken)
    assert main(["convert", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert "raylin: convert failed: RuntimeError: something raylin did not expect" in err and "--verbose" in err
    monkeypatch.setenv("RAYLIN_LOG_LEVEL", "normal")  # so that teardown restores what was there, not --verbose
    with pytest.raises(RuntimeError, match="did not expect"):
        main(["--verbose", "convert", str(path)])
