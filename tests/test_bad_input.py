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


def test_a_changed_section_the_recorded_config_lacks_is_a_different_config(tmp_path):
    """Keys only one side has count: a plan gaining keep_attention, a data source gaining a path."""
    require_asset("all-minilm-l6")
    out = tmp_path / "out"
    _finished_run(out)
    hybrid = config_from_dict({**GOOD, "output_dir": str(out), "plan": {**GOOD["plan"], "keep_attention": [0]}})
    with pytest.raises(ConfigError, match=r"differs in plan.keep_attention\)"):
        check_output_dir(hybrid)


def test_the_same_finished_run_is_reused_without_starting_ray(tmp_path, capsys):
    require_asset("all-minilm-l6")
    out = tmp_path / "out"
    config = _finished_run(out, eval_every=2)  # resumable keys may differ; max_steps may not
    same = config_from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "eval_every": 0}})
    assert pipeline.run_conversion(same) == {"student": {"accuracy": 0.8}}
    assert not ray.is_initialized()
    longer = config_from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "max_steps": 8}})
    assert pipeline.finished_run(longer) is None and check_output_dir(longer) is None  # resumes to step 8


def test_overwrite_deletes_the_recorded_run_and_its_checkpoints_after_ray_starts(tmp_path):
    require_asset("all-minilm-l6")
    out, storage = tmp_path / "out", tmp_path / "storage"
    recorded = _finished_run(out, lr=1.0e-3, storage_path=str(storage))
    (storage / recorded.run_name / "checkpoint_x").mkdir(parents=True)
    changed = config_from_dict({**GOOD, "output_dir": str(out), "name": "renamed",
                                "train": {**GOOD["train"], "lr": 5.0e-4, "storage_path": str(storage)}})
    (storage / changed.run_name / "checkpoint_y").mkdir(parents=True)  # another output folder's run: kept
    with pytest.raises(ConfigError, match="differs in name, train.lr"):
        check_output_dir(changed)
    replacing = check_output_dir(changed, overwrite=True)
    assert replacing.run_name == recorded.run_name
    assert (out / "metrics.json").is_file() and (storage / recorded.run_name).exists()  # deleting waits for Ray
    prepare_output_dir(changed, replacing)
    assert out.is_dir() and not list(out.iterdir()) and not (storage / recorded.run_name).exists()
    assert (storage / changed.run_name / "checkpoint_y").is_dir()


def test_overwrite_never_deletes_a_git_checkout_or_the_working_folder(tmp_path, monkeypatch):
    require_asset("all-minilm-l6")
    out = tmp_path / "project"
    _finished_run(out, lr=1.0e-3)
    (out / ".git").mkdir()
    changed = config_from_dict({**GOOD, "output_dir": str(out)})
    with pytest.raises(ConfigError, match="holds a git checkout or the working or home folder"):
        check_output_dir(changed, overwrite=True)
    (out / ".git").rmdir()
    monkeypatch.chdir(out / "student")
    with pytest.raises(ConfigError, match="holds a git checkout or the working or home folder"):
        check_output_dir(changed, overwrite=True)
    assert (out / "metrics.json").is_file()


def test_an_internal_error_prints_where_it_happened_and_points_to_verbose(tmp_path, capsys, monkeypatch):
    """Not bad input: a short trace and what to do below --verbose; the whole trace with it."""
    require_asset("all-minilm-l6")
    path = _write_config(tmp_path, {})

    def broken(config, **options):
        raise RuntimeError("something raylin did not expect")

    monkeypatch.setattr(pipeline, "run_conversion", broken)
    assert main(["convert", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert "raylin: convert failed: RuntimeError: something raylin did not expect" in err and "--verbose" in err
    monkeypatch.setenv("RAYLIN_LOG_LEVEL", "normal")  # so that teardown restores what was there, not --verbose
    with pytest.raises(RuntimeError, match="did not expect"):
        main(["--verbose", "convert", str(path)])


# ----- every subcommand's options: argparse (or the command's first check) refuses a bad value ------

# (argv with {tmp}, {file}, {binary}, {config} placeholders, what the message must say)
BAD_OPTIONS = {
    "speed lengths not numbers": (["bench", "speed", "--lengths", "abc"], r"argument --lengths: 'abc' must be comma-separated whole numbers >= 16"),
    "speed lengths too short": (["bench", "speed", "--lengths", "512,0"], r"argument --lengths: .* >= 16 \(e.g. 512,4096\)"),
    "speed hidden": (["bench", "speed", "--hidden", "100"], r"argument --hidden: '100' must be a whole number >= 64 and a multiple of 64"),
    "speed layers": (["bench", "speed", "--layers", "0"], r"argument --layers: '0' must be a whole number >= 1"),
    "speed repeats": (["bench", "speed", "--repeats", "two"], r"argument --repeats: 'two' is not a whole number"),
    "speed out is a file": (["bench", "speed", "--out", "{file}"], r"argument --out: .* cannot be written: it is the file"),
    "distill steps": (["bench", "distill", "--steps", "2"], r"argument --steps: '2' must be a whole number >= 3"),
    "distill configs": (["bench", "distill", "--configs", "{tmp}/missing.yaml", "--out", "{tmp}/o"], r"Config file .*missing.yaml does not exist"),
    "quality suites": (["bench", "quality", "--only", "text,bogus"], r"argument --only: unknown \['bogus'\]; choose from \['text', 'lm'"),
    "quality budgets": (["bench", "quality", "--quick", "--long"], r"argument --long: not allowed with argument --quick"),
    "quality out": (["bench", "quality", "--out", "{file}/x"], r"argument --out: .* it is under the file"),
    "cluster nodes": (["bench", "cluster", "--nodes", "0,1"], r"argument --nodes: '0,1' must be comma-separated whole numbers >= 1"),
    "cluster steps": (["bench", "cluster", "--steps", "1"], r"argument --steps: '1' must be a whole number >= 3"),
    "scale hidden": (["bench", "scale", "--hidden", "1000"], r"argument --hidden: '1000' must be a whole number >= 64 and a multiple of 64"),
    "scale tasks": (["bench", "scale", "--tasks", "0"], r"argument --tasks: '0' must be a whole number >= 1"),
    "scale part": (["bench", "scale", "--part", "everything"], r"argument --part: invalid choice: 'everything'"),
    "faults kinds": (["bench", "faults", "--kinds", "worker-kill,bogus"], r"argument --kinds: unknown \['bogus'\]; choose from \['worker-kill'"),
    "faults trials": (["bench", "faults", "--trials", "0"], r"argument --trials: '0' must be a whole number >= 1"),
    "faults seed": (["bench", "faults", "--first-seed", "-1"], r"argument --first-seed: '-1' must be a whole number >= 0"),
    "tune binary config": (["tune", "{binary}"], r"argument config: Config file .* is not UTF-8 text .*save the file as UTF-8"),
    "tune missing config": (["tune", "{tmp}/none.yaml"], r"argument config: Config file .*none.yaml does not exist"),
    "tune config is a folder": (["tune", "{tmp}"], r"does not exist \(it is a folder\)"),
    "convert binary config": (["convert", "{binary}"], r"argument config: Config file .* is not UTF-8 text"),
    "finetune binary config": (["finetune", "{binary}"], r"argument config: Config file .* is not UTF-8 text"),
    "eval length": (["eval", "{config}", "--length", "0"], r"argument --length: '0' must be a whole number >= 8"),
    "export missing student": (["export", "{tmp}/nothing", "--to", "{tmp}/x"], r"argument student: .*nothing' is not a folder"),
    "export target under a file": (["export", "{tmp}", "--to", "{file}/x"], r"argument --to: .* it is under the file"),
    "demo length": (["demo", "--length", "8"], r"argument --length: .8. must be a whole number >= 16"),
    "demo out": (["demo", "--out", "{file}"], r"argument --out: .* cannot be written: it is the file"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_every_subcommands_bad_option_is_refused_before_work_starts(case, tmp_path, capsys):
    """Exit status 2, the option named with what it takes, no traceback, no Ray, nothing written."""
    argv, message = BAD_OPTIONS[case]
    (tmp_path / "afile").write_text("")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**GOOD, "output_dir": str(tmp_path / "out")}))
    argv = [a.format(tmp=tmp_path, file=tmp_path / "afile", binary=tmp_path / "binary.yaml", config=config) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(message, err), err
    assert not ray.is_initialized() and sorted(tmp_path.rglob("*")) == before


def test_a_length_beyond_the_teachers_positions_is_refused_before_ray(tmp_path, capsys):
    """IMDB at 1,024 tokens on all-MiniLM-L6 (512 positions) used to reach the workers and die there."""
    require_asset("all-minilm-l6")
    path = _write_config(tmp_path, {})
    assert main(["convert", str(path), "--set", "data.max_length=1024"]) == 2
    err = capsys.readouterr().err
    assert "data.max_length 1024 is longer than the teacher takes (512 positions" in err
    assert "set data.max_length to at most 512" in err and not ray.is_initialized()


def test_a_target_teacher_that_is_not_the_teacher_fine_tuned_is_refused(tmp_path, capsys):
    """Another model as the target teacher (another vocabulary, width and depth) would fail in the
    workers' KD loss: refused before Ray, naming what differs."""
    require_asset("all-minilm-l6")
    require_asset("smollm2-135m")
    path = _write_config(tmp_path, {})
    assert main(["convert", str(path), "--set", "target_teacher=asset:smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert "is not a fine-tuned copy of teacher 'asset:all-minilm-l6'" in err and "vocabulary 30522 vs 49152" in err
    assert not ray.is_initialized()
