"""Run configs are validated before any worker starts; errors name the field."""

from __future__ import annotations

import pytest
import yaml

from raylin.cli import main
from raylin.config import ConfigError, config_from_dict, load_config
from raylin.models.plan import Plan

pytestmark = pytest.mark.assets


@pytest.fixture
def base(tmp_path):
    from conftest import make_teacher

    teacher = tmp_path / "teacher"
    make_teacher("bert").save_pretrained(teacher)
    # The tiny BERT was "fine-tuned" with 3 labels and takes 64 positions.
    return {"teacher": str(teacher), "target_teacher": str(teacher), "output_dir": str(tmp_path / "out"),
            "plan": {"mixer": "linformer", "linformer": {"k": 16}}, "task": {"num_labels": 3}, "data": {"max_length": 64}}


def test_shipped_config_is_valid():
    # Its target teacher comes from `raylin finetune`; validate against the source model instead.
    config = load_config("raylin/configs/minilm-rt-linformer.yaml", ["target_teacher=asset:all-minilm-l6"])
    assert config.guidance.mode == "target" and config.plan.mixer == "linformer"
    assert config.train.num_workers == 2 and config.data.name == "rotten_tomatoes"


def test_defaults_and_overrides(base):
    config = config_from_dict(base, ["train.max_steps=7", "loss.alpha_layer=2", "guidance.mode=unguided", "plan.linformer.k=8"])
    assert config.train.max_steps == 7 and config.loss.alpha_layer == 2.0 and config.plan.options["linformer"].k == 8
    assert config.run_name == "out" and config.train.zero_stage == 2


def test_local_paths_become_absolute(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ray Train workers do not share the driver's working directory
    config = config_from_dict({**base, "teacher": "teacher", "target_teacher": "teacher", "output_dir": "runs/a",
                               "align": {"dir": "runs/aligned"}})
    assert config.output_dir == str(tmp_path / "runs" / "a")
    assert config.align.dir == str(tmp_path / "runs" / "aligned")
    assert config.teacher == config.target_teacher == str(tmp_path / "teacher")
    assert config_from_dict({**base, "teacher": "asset:all-minilm-l6", "guidance": {"mode": "unguided"},
                             "target_teacher": None}).teacher == "asset:all-minilm-l6"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"guidance": {"mode": "distil"}}, r"guidance.mode 'distil' is unknown"),
        ({"loss": {"alpha_layer": -1}}, r"loss.alpha_layer must be >= 0"),
        ({"loss": {"alpha_out": "high"}}, r"'loss.alpha_out' must be float"),
        ({"loss": {"temperature": 0}}, r"loss.temperature must be > 0"),
        ({"target_teacher": None}, r"guidance.mode 'target' distils from a fine-tuned teacher: set target_teacher"),
        ({"guidance": {"mode": "waypoint"}}, r"needs guidance.waypoints"),
        ({"guidance": {"mode": "waypoint", "waypoints": [{"step": 5}]}}, r"Missing required config key 'guidance.waypoints\[0\].path'"),
        ({"guidance": {"mode": "hybrid"}}, r"needs guidance.hybrid_cutoff"),
        ({"train": {"zero_stage": 4}}, r"train.zero_stage must be 0, 1, 2 or 3"),
        ({"train": {"zero3_live_parameters": 0}}, r"train.zero3_live_parameters must be >= 1"),
        ({"freeze": {"until": "never"}}, r"freeze.until must be one of \('lit', 'end'\)"),
        ({"train": {"batch_size": 7}}, r"train.batch_size=7 must be divisible by train.num_workers=2"),
        ({"train": {"max_stepz": 3}}, r"Unknown config key\(s\) \['train.max_stepz'\]"),
        ({"learning_rate": 3}, r"Unknown config key\(s\) \['learning_rate'\]"),
        ({"task": {"type": "qa"}}, r"task.type 'qa' is unknown"),
        ({"teacher_service": {"mode": "remote"}}, r"teacher_service.mode must be one of \('served', 'inprocess'\)"),
        ({"teacher_service": {"dtype": "int8"}}, r"teacher_service.dtype must be one of"),
        ({"teacher_service": {"weights_dtype": "int8"}}, r"teacher_service.weights_dtype must be one of"),
        ({"align": {"parameters": "some"}}, r"align.parameters must be 'new' or 'all'"),
        ({"align": {"projection_lr": 0}}, r"align.lr and align.projection_lr must be positive"),
        ({"plan": {"mixer": "linformer", "keep_attention": [9]}}, r"keep_attention lists layer\(s\) \[9\]"),
        ({"plan": {"mixer": "linformer", "linformer": {"k": 100}}}, r"k=100 is above the maximum sequence length 64"),
        ({"teacher": "/nonexistent/teacher", "target_teacher": None, "guidance": {"mode": "unguided"}}, r"No teacher folder"),
    ],
)
def test_bad_configs_name_the_field(base, change, message):
    data = {**base, **{k: (base.get(k, {}) | v) if isinstance(v, dict) and k not in ("plan",) else v for k, v in change.items()}}
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        config_from_dict(data)


def test_missing_required_key(base):
    del base["teacher"]
    with pytest.raises(ConfigError, match="Missing required config key 'teacher'"):
        config_from_dict(base)


def test_cli_rejects_a_bad_config_before_starting_ray(base, tmp_path, capsys):
    import ray

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base, "guidance": {"mode": "trajectoryy"}}))
    assert main(["convert", str(path)]) == 2
    assert "guidance.mode 'trajectoryy' is unknown" in capsys.readouterr().err
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        config_from_dict(base, ["train.max_steps"])


def test_every_mistake_in_a_config_is_listed_at_once_before_ray_starts(base, tmp_path, capsys):
    """The bad inputs that used to pass validation and fail inside Ray workers (or with a raw
    traceback) are all refused together, each naming its key, before Ray starts."""
    import ray

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = {**base, "output_dir": str(blocker / "out"), "teacher": str(tmp_path / "no-such-teacher"),
            "loss": {"layers": [99]}, "train": {"batch_size": 0, "offload": True, "zero_stage": 0}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    problems = "\n".join(caught.value.problems)
    for expected in ("train.batch_size must be >= 1", "train.offload", "needs train.zero_stage >= 1",
                     "loss.layers lists [99]", "teacher '" + str(tmp_path / "no-such-teacher"), "output_dir",
                     "is under the file"):
        assert expected in problems, expected
    assert len(caught.value.problems) == 5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["convert", str(path)]) == 2
    err = capsys.readouterr().err
    assert "5 problems" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_a_scalar_where_a_section_belongs_is_named_with_the_other_problems(base):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({k: v for k, v in base.items() if k != "plan"} | {"train": 5, "loss": {"alpha_out": "x"}})
    problems = caught.value.problems
    assert any(p.startswith("train must be a mapping") for p in problems)
    assert "Missing required config key 'plan'." in problems
    assert any("'loss.alpha_out' must be float" in p for p in problems)


def test_the_teacher_run_of_a_config_leaves_the_students_sections_out(base, tmp_path):
    """`raylin finetune CONFIG`: the student's stages (align, broad data, its guidance and waypoints,
    its plan) do not apply to the teacher's run, whose target teacher does not exist yet; they must
    still be well formed; changing them never makes the teacher's run another run."""
    from raylin.config import conversion_only_keys, teacher_run
    from raylin.fingerprint import dotted
    from raylin.train.checkpoint import resume_identity

    student = {**base, "target_teacher": str(tmp_path / "not-made-yet"), "output_dir": str(tmp_path / "teacher-run"),
               "guidance": {"mode": "waypoint", "waypoints": [{"step": 5, "path": str(tmp_path / "no-snapshot")}]},
               "align": {"enabled": True, "steps": 7}, "broad": {"enabled": True}, "freeze": {"copied": True},
               "plan": {"mixer": "linformer", "keep_attention": [0]}}
    config = config_from_dict(student, run="teacher")
    assert set(conversion_only_keys()) == {"plan", "target_teacher", "guidance", "loss", "freeze", "teacher_service",
                                           "align", "broad"}
    assert config.target_teacher is None and config.guidance.mode == "unguided" and not config.guidance.waypoints
    assert not config.align.enabled and not config.broad.enabled and not config.freeze.copied
    assert config.plan == Plan.from_mapping({"mixer": "bimamba2", "keep_attention": [0, 1, 2]})  # the teacher's own 3 blocks
    assert config.task.num_labels == 3 and config.data.max_length == 64  # the teacher's task as the config gives it
    other = config_from_dict({**student, "align": {"enabled": False}, "loss": {"alpha_out": 3.0}}, run="teacher")
    assert dotted(resume_identity(other)) == dotted(resume_identity(config))
    assert teacher_run(config) == config  # the teacher's run of a teacher's run is itself
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**student, "align": {"stepz": 3}, "plan": {"mixer": "mamba9"}}, run="teacher")
    assert "align.stepz" in str(caught.value) and "Unknown plan.mixer 'mamba9'" in str(caught.value)
    with pytest.raises(ConfigError, match="target_teacher .* cannot be read"):
        config_from_dict(student)  # as a conversion, the same config needs its fine-tuned teacher
