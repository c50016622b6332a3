"""Bad input fails early, with an error that names the problem and the fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import transformers
import yaml
from conftest import make_teacher, run_config

import raylin
from raylin.models.plan import PlanError
from raylin.models.teachers import load_teacher


@pytest.mark.parametrize(
    "family_name,plan,message",
    [
        ("bert", {"mixer": "linformer", "keep_attention": [3]}, r"keep_attention lists layer\(s\) \[3\].*valid indices 0..2"),
        ("bert", {"mixer": "linformer", "keep_attention": [-1]}, r"layer\(s\) \[-1\]"),
        ("bert", {"mixer": "performer"}, r"Unknown plan.mixer 'performer'; choose one of"),
        ("bert", {"mixer": "linformer", "linformer": {"k": 65}}, r"k=65 is above the maximum sequence length 64"),
        ("bert", {"mixer": "linformer", "linformer": {"share": "heads"}}, r"Unknown plan.linformer.share 'heads'"),
        ("bert", {"mixer": "linformer", "linformer": {"kk": 3}}, r"Unknown plan.linformer option\(s\) \['kk'\]"),
        ("bert", {"mixer": "linformer", "layers": [1]}, r"Unknown plan key\(s\) \['layers'\]"),
        ("bert", {"keep_attention": [1]}, r"plan.mixer is missing"),
        ("bert", {"mixer": "mamba2", "mamba2": {"head_dim": 5}}, r"not a multiple of head_dim=5"),
        ("bert", {"mixer": "mamba", "init": "magic"}, r"Unknown plan.init 'magic'"),
        ("llama", {"mixer": "linformer"}, r"looks at future tokens, but the llama teacher is causal"),
        ("gpt_neox", {"mixer": "bimamba2"}, r"use one of \('mamba', 'mamba2', 'gated_deltanet'\)"),
        ("wav2vec2", {"mixer": "linformer"}, r"set plan.linformer.max_length"),
    ],
)
def test_impossible_plans_name_the_field(family_name, plan, message):
    with pytest.raises(PlanError, match=message):
        raylin.convert(make_teacher(family_name), plan)


def test_plan_must_be_a_mapping():
    with pytest.raises(PlanError, match="plan must be a mapping"):
        raylin.convert(make_teacher("bert"), "linformer")


def test_unsupported_architecture_is_rejected_with_the_supported_list():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"Unsupported teacher architecture model_type='gpt2'.*llama"):
        raylin.convert(gpt2, {"mixer": "mamba"})
    with pytest.raises(TypeError, match="Expected a transformers PreTrainedModel"):
        raylin.convert(torch.nn.Linear(2, 2), {"mixer": "mamba"})


def test_unsupported_architecture_fails_before_weights_load(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="Unsupported teacher architecture"):
        load_teacher(folder)  # there are no weights: the check ran first


def test_missing_teacher_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="No teacher folder"):
        load_teacher(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_teacher(tmp_path)
    with pytest.raises(FileNotFoundError, match="Unknown asset 'nope'"):
        load_teacher("asset:nope")


def test_missing_student_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No student folder"):
        raylin.load_student(tmp_path / "nowhere")
    student, _ = raylin.convert(make_teacher("llama"), {"mixer": "mamba2"})
    student.save_pretrained(tmp_path / "s")
    (tmp_path / "s" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing.*Re-export the student"):
        raylin.load_student(tmp_path / "s")


def test_loading_a_teacher_folder_as_a_student_says_what_to_do(tmp_path):
    make_teacher("llama").save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="not a raylin student.*raylin.convert"):
        raylin.load_student(tmp_path / "teacher")


def test_weights_that_do_not_match_the_config_are_rejected(tmp_path):
    student, _ = raylin.convert(make_teacher("llama"), {"mixer": "mamba2"})
    student.save_pretrained(tmp_path / "s")
    config_path = tmp_path / "s" / "config.json"
    config = json.loads(config_path.read_text())
    config["plan"]["keep_attention"] = [0]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the student its config describes"):
        raylin.load_student(tmp_path / "s")


def test_bidirectional_students_cannot_generate():
    student, _ = raylin.convert(make_teacher("bert"), {"mixer": "bimamba2"})
    with pytest.raises(ValueError, match="bidirectional and cannot generate"):
        student.generate(torch.randint(5, 100, (1, 4)))


@pytest.mark.assets
def test_a_dead_clusters_address_is_refused_in_seconds_with_what_to_do(teachers, tmp_path):
    """A `ray start --head` that died leaves its address in RAY_TMPDIR/ray/ray_current_cluster, and
    ray.init() would retry that GCS for minutes. raylin probes it first and says what to do."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(teachers, tmp_path / "out").to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path)}
    for extra, source in [({}, "ray_current_cluster, left by the last `ray start --head`"),
                          ({"RAY_ADDRESS": dead}, "(from RAY_ADDRESS)")]:
        done = subprocess.run([sys.executable, "-m", "raylin.cli", "convert", str(config)], env=env | extra,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"No Ray cluster answers at {dead}" in done.stderr and source in done.stderr
        assert "RAY_ADDRESS=local" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # refused before any work
