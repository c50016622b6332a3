"""Block-local construction (issue 22): a model of some teacher blocks, loaded from those blocks'
weights alone, converts each block exactly as the whole student does; the align stage built that
way aligns the blocks exactly as a task holding the whole student."""

from __future__ import annotations

import pytest
import torch
from conftest import make_teacher, run_config
from safetensors.torch import load_file

from raylin.convert import convert
from raylin.models.families import BlockSubset, family_for, family_for_config
from raylin.models.teachers import load_teacher

PLANS = {"causal": {"mixer": "mamba2", "init": "attention", "mamba2": {"head_dim": 8, "state_size": 8}},
         "bidirectional": {"mixer": "bimamba2", "mamba2": {"head_dim": 8, "state_size": 8}}}


def _saved_teacher(family_name, folder):
    """A tiny teacher of three blocks (so a subset can leave one out in the middle), saved to ``folder``."""
    config = make_teacher(family_name).config
    setattr(config, family_for_config(config).layer_count_key, 3)
    torch.manual_seed(0)
    teacher = type(make_teacher(family_name))(config).eval()
    teacher.save_pretrained(folder)
    return teacher


def test_a_student_of_some_blocks_equals_the_whole_students_blocks_in_every_family(family_name, tmp_path):
    whole_teacher = _saved_teacher(family_name, tmp_path)
    family = family_for(whole_teacher)
    plan = PLANS["causal" if family.causal else "bidirectional"] | {"keep_attention": [2]}
    whole, whole_report = convert(whole_teacher, plan)
    blocks = BlockSubset.of(whole_teacher.config, [2, 0])  # out of order, and block 1 left out
    teacher, _ = load_teacher(tmp_path, model_class=type(whole_teacher).__name__, blocks=blocks)
    assert family.num_layers(teacher.config) == 2
    part, report = convert(teacher, plan, blocks=blocks)
    assert part.layer_ids == [2, 0] and part.mixer_layers() == [0]
    for layer_idx in (0, 2):  # copied weights, a fresh or attention-seeded mixer, a kept attention
        expected, got = whole.block(layer_idx).state_dict(), part.block(layer_idx).state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected), layer_idx
    # The student holds two blocks' parameters, not three.
    assert report.count("copied") < whole_report.count("copied")
    block_params = sum(p.numel() for p in whole.block(1).parameters())
    assert sum(p.numel() for p in part.parameters()) == sum(p.numel() for p in whole.parameters()) - block_params


@pytest.mark.parametrize(("family_name", "mixer"), [("llama", "gated_deltanet"), ("bert", "bigated_deltanet")])
def test_gated_deltanet_blocks_build_alone_as_in_the_whole_student(family_name, mixer, tmp_path):
    # What the align stage's tasks build: a Gated DeltaNet block of some blocks equals the whole student's.
    whole_teacher = _saved_teacher(family_name, tmp_path)
    plan = {"mixer": mixer, "init": "attention", "keep_attention": [1]}
    whole, _ = convert(whole_teacher, plan)
    blocks = BlockSubset.of(whole_teacher.config, [2])
    teacher, _ = load_teacher(tmp_path, model_class=type(whole_teacher).__name__, blocks=blocks)
    part, report = convert(teacher, plan, blocks=blocks)
    expected, got = whole.block(2).state_dict(), part.block(2).state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)
    assert any("in_proj_qkvz" in name for name in report.names("seeded"))


def test_a_student_of_some_blocks_refuses_to_be_saved_as_a_student(tmp_path):
    whole_teacher = _saved_teacher("llama", tmp_path / "teacher")
    blocks = BlockSubset.of(whole_teacher.config, [1])
    teacher, _ = load_teacher(tmp_path / "teacher", blocks=blocks)
    part, _ = convert(teacher, PLANS["causal"], blocks=blocks)
    with pytest.raises(ValueError, match=r"holds teacher blocks \[1\] only"):
        part.save_pretrained(tmp_path / "student")
    assert not (tmp_path / "student").exists()
    with pytest.raises(ValueError, match="distinct block indices of a 3-block teacher"):
        BlockSubset.of(whole_teacher.config, [1, 3])


def test_block_local_alignment_equals_alignment_holding_the_whole_student(teachers, ray_cluster, tmp_path):
    from raylin.train.align import WEIGHTS_FILE, aligned_dir, run_align

    results = {}
    for holds in ("model", "blocks"):
        config = run_config(teachers, tmp_path / holds, align={"enabled": True, "steps": 6, "num_workers": 2, "holds": holds},
                            plan={"mixer": "bimamba2", "mamba2": {"head_dim": 8, "state_size": 8}})
        summary = run_align(config)
        results[holds] = summary, load_file(aligned_dir(config) / WEIGHTS_FILE)
    (model_summary, model_state), (block_summary, block_state) = results["model"], results["blocks"]
    assert block_summary["layers"] == model_summary["layers"]  # MSE before and after, per layer, exactly
    assert block_summary["fingerprint"] == model_summary["fingerprint"]  # same result: one store entry
    assert block_summary["holds"] == "blocks" and len(block_summary["task_peak_rss_mb"]) == 2  # one process per task
    assert model_state.keys() == block_state.keys() and any(".layer.1." in name for name in block_state)
    assert all(torch.equal(model_state[name], block_state[name]) for name in model_state)
