"""XATL conversion on every family: exact reproduction, copied tensors, reports, attention init."""

from __future__ import annotations

import pytest
import torch
from conftest import BIDIRECTIONAL, CAUSAL, TINY_TEACHERS, make_teacher

import raylin
from raylin.models.families import family_for


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    tensors = [v for k, v in out.items() if isinstance(v, torch.Tensor)]
    hidden = out.get("encoder_hidden_states") or out.get("hidden_states")
    return tensors + list(hidden or [])


def _inputs(name, teacher):
    family = family_for(teacher)
    length = 400 if family.modality == "speech" and name != "whisper" else 10
    return family.example_inputs(teacher.config, [length, length - 3 if name != "whisper" else length])


def test_keep_attention_everywhere_reproduces_teacher_exactly(family_name):
    teacher = make_teacher(family_name)
    family = family_for(teacher)
    plan = {"mixer": "mamba2" if family.causal else "bimamba2",
            "keep_attention": list(range(family.num_layers(teacher.config)))}
    student, report = raylin.convert(teacher, plan)
    assert report.summary()["new"] == 0 and report.summary()["skipped"] == 0
    inputs = _inputs(family_name, teacher)
    for expected, actual in zip(_outputs(teacher, inputs), _outputs(student, inputs), strict=True):
        assert torch.equal(expected, actual)


@pytest.mark.parametrize("family_name", sorted(TINY_TEACHERS))
def test_every_copied_tensor_equals_the_teachers(family_name):
    teacher = make_teacher(family_name)
    mixer = "mamba" if family_name in CAUSAL else "linformer"
    plan = {"mixer": mixer, "keep_attention": [1], "linformer": {"k": 8, "max_length": 512}}
    student, report = raylin.convert(teacher, plan)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    copied = report.names("copied")
    assert copied, "nothing was copied"
    for name in copied:
        assert torch.equal(student_state[name], teacher_state[name.removeprefix("model.")])
    # Everything outside the replaced attention modules is copied: the new tensors are mixer weights only.
    family = family_for(teacher)
    attention_path = family.attention_path
    for name in report.names("new"):
        assert f".{attention_path}." in name, name
    # Kept attention layer 1 is fully copied, Q/K/V included.
    assert any(f".1.{attention_path}." in name for name in copied)
    # Parameter counts add up.
    assert report.count("copied") + report.count("new") == sum(p.numel() for p in student.parameters())


def test_linformer_reuses_qkv_and_drops_nothing():
    teacher = make_teacher("bert")
    student, report = raylin.convert(teacher, {"mixer": "linformer", "linformer": {"k": 16, "share": "none"}})
    assert report.names("skipped") == []
    new = report.names("new")
    assert len(new) == 2 * teacher.config.num_hidden_layers  # E and F per layer
    assert all(name.endswith((".E.weight", ".F.weight")) for name in new)
    assert "model.bert.encoder.layer.0.attention.self.query.weight" in report.names("copied")


@pytest.mark.parametrize("share,expected_new", [("none", 6), ("kv", 3), ("layer", 1)])
def test_linformer_share_modes(share, expected_new):
    teacher = make_teacher("bert")
    student, report = raylin.convert(teacher, {"mixer": "linformer", "linformer": {"k": 16, "share": share}})
    assert len(report.names("new")) == expected_new
    inputs = family_for(teacher).example_inputs(teacher.config, [12, 9])
    assert student(**inputs).logits.shape == (2, 3)


def test_mamba_student_drops_attention_and_reports_it():
    teacher = make_teacher("gpt_neox")
    student, report = raylin.convert(teacher, {"mixer": "mamba2"})
    skipped = report.names("skipped")
    assert len(skipped) == 4 * teacher.config.num_hidden_layers  # fused QKV and dense, weight + bias
    assert all(".attention." in name for name in skipped)
    assert "model.lm_head.weight" in report.to_markdown(max_rows=1000)
    summary = report.to_dict()["summary"]
    assert summary["copied"] + summary["new"] == sum(p.numel() for p in student.parameters())


def test_attention_init_seeds_mamba2_from_qkvo_with_gqa():
    teacher = make_teacher("llama")
    cfg = teacher.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    plan = {"mixer": "mamba2", "init": "attention",
            "mamba2": {"head_dim": head_dim, "n_groups": cfg.num_attention_heads, "state_size": head_dim}}
    student, report = raylin.convert(teacher, plan)
    mixer = student.model.model.layers[0].self_attn
    attention = teacher.model.layers[0].self_attn
    inner, groups_state = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size
    repeat = cfg.num_attention_heads // cfg.num_key_value_heads
    expand = lambda w: w.view(cfg.num_key_value_heads, head_dim, -1).repeat_interleave(repeat, 0).reshape(-1, cfg.hidden_size)
    rows = mixer.in_proj.weight
    assert torch.equal(rows[inner:2 * inner], expand(attention.v_proj.weight))
    assert torch.equal(rows[2 * inner:2 * inner + groups_state], expand(attention.k_proj.weight))
    assert torch.equal(rows[2 * inner + groups_state:2 * inner + 2 * groups_state], attention.q_proj.weight)
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    assert len(report.names("seeded")) == 2 * cfg.num_hidden_layers


def test_attention_init_skips_what_does_not_fit():
    teacher = make_teacher("bert")
    student, report = raylin.convert(teacher, {"mixer": "bimamba", "init": "attention"})
    # Mamba-1 takes V into x only when expand == 1; with the default expand=2 nothing fits.
    assert report.names("seeded") == []
    student, report = raylin.convert(teacher, {"mixer": "bimamba", "init": "attention", "mamba": {"expand": 1}})
    layer = student.model.bert.encoder.layer[0].attention.self
    v = teacher.bert.encoder.layer[0].attention.self.value.weight
    assert torch.equal(layer.forward_mixer.in_proj.weight[: v.shape[0]], v)
    assert torch.equal(layer.backward_mixer.in_proj.weight[: v.shape[0]], v)


def test_conversion_is_reproducible_from_the_plan_seed():
    teacher = make_teacher("llama")
    a, _ = raylin.convert(teacher, {"mixer": "mamba", "seed": 3})
    b, _ = raylin.convert(teacher, {"mixer": "mamba", "seed": 3})
    c, _ = raylin.convert(teacher, {"mixer": "mamba", "seed": 4})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("family_name", BIDIRECTIONAL)
@pytest.mark.parametrize("mixer", ["linformer", "bimamba", "bimamba2"])
def test_bidirectional_students_run_and_backpropagate(family_name, mixer):
    teacher = make_teacher(family_name)
    plan = {"mixer": mixer, "linformer": {"k": 8, "max_length": 512}, "mamba2": {"head_dim": 8, "state_size": 8}}
    student, _ = raylin.convert(teacher, plan)
    student.train()
    inputs = _inputs(family_name, teacher)
    out = student(**inputs)
    first = next(v for v in out.values() if isinstance(v, torch.Tensor))
    first.float().pow(2).mean().backward()
    grads = [p.grad for n, p in student.named_parameters() if ".E." in n or "in_proj" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_layer_io_capture_reads_every_block():
    teacher = make_teacher("llama")
    family = family_for(teacher)
    inputs = family.example_inputs(teacher.config, [9])
    with family.capture_layer_io(teacher) as record:
        out = teacher(**inputs, output_hidden_states=True)
    assert len(record["inputs"]) == len(record["outputs"]) == teacher.config.num_hidden_layers
    # transformers' hidden_states[i] is the input of block i; the last one is after the final norm.
    for i in range(teacher.config.num_hidden_layers):
        assert torch.equal(record["inputs"][i], out.hidden_states[i])
    assert torch.equal(record["outputs"][0], record["inputs"][1])
