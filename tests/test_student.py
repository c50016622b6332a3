"""Student properties: causality, recurrent generation, padding invariance, save/load, errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import BIDIRECTIONAL, CAUSAL, make_teacher

import raylin
from raylin.models.families import family_for
from raylin.models.plan import OPTION_SECTIONS

CAUSAL_PLANS = {
    "mamba": {"mixer": "mamba"},
    "mamba2": {"mixer": "mamba2", "mamba2": {"chunk_size": 4}},
    "hybrid": {"mixer": "mamba2", "keep_attention": [1], "mamba2": {"chunk_size": 4}},
    "gated_deltanet_hybrid": {"mixer": "gated_deltanet", "keep_attention": [1], "init": "attention"},
}
BIDIRECTIONAL_PLANS = {
    "linformer": {"mixer": "linformer", "linformer": {"k": 8, "max_length": 4096}},
    "bimamba": {"mixer": "bimamba"},
    "bimamba2": {"mixer": "bimamba2", "mamba2": {"chunk_size": 4}},
    "bigated_deltanet": {"mixer": "bigated_deltanet"},
}

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family_name", CAUSAL)
@pytest.mark.parametrize("plan_name", sorted(CAUSAL_PLANS))
def test_causal_student_logits_ignore_future_tokens(family_name, plan_name):
    student, _ = raylin.convert(make_teacher(family_name), CAUSAL_PLANS[plan_name])
    ids = torch.randint(5, 100, (2, 14))
    changed = ids.clone()
    changed[:, 8:] = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        a, b = student(input_ids=ids).logits, student(input_ids=changed).logits
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.equal(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("family_name", CAUSAL)
@pytest.mark.parametrize("plan_name", sorted(CAUSAL_PLANS))
def test_recurrent_generation_equals_greedy_full_forwards(family_name, plan_name):
    student, _ = raylin.convert(make_teacher(family_name), CAUSAL_PLANS[plan_name])
    prompt = torch.randint(5, 100, (2, 7))
    generated = student.generate(prompt, max_new_tokens=10)
    sequence = prompt
    with torch.no_grad():
        for _ in range(10):
            next_token = student(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("family_name", CAUSAL)
@pytest.mark.parametrize("plan_name", sorted(CAUSAL_PLANS))
def test_chunked_and_stepwise_decoding_match_the_full_forward(family_name, plan_name):
    student, _ = raylin.convert(make_teacher(family_name), CAUSAL_PLANS[plan_name])
    ids = torch.randint(5, 100, (1, 13))
    cache = student.new_cache()
    with torch.no_grad():
        full = student(input_ids=ids).logits
        pieces = [student(input_ids=ids[:, :5], past_key_values=cache).logits]
        for t in range(5, 9):  # one token at a time
            pieces.append(student(input_ids=ids[:, t : t + 1], past_key_values=cache).logits)
        pieces.append(student(input_ids=ids[:, 9:], past_key_values=cache).logits)  # a chunk continuing the state
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


def test_recurrent_state_does_not_grow_with_context():
    student, _ = raylin.convert(make_teacher("llama"), CAUSAL_PLANS["mamba2"])
    prompt = torch.randint(5, 100, (1, 4))
    _, short_cache = student.generate(prompt, max_new_tokens=4, return_cache=True)
    _, long_cache = student.generate(prompt, max_new_tokens=40, return_cache=True)
    assert short_cache.state_bytes() == long_cache.state_bytes() > 0
    assert long_cache.get_seq_length() == 4 + 40 - 1  # the last token is returned, not yet fed back
    # A hybrid keeps a growing key/value cache only for its attention layer.
    hybrid, _ = raylin.convert(make_teacher("llama"), CAUSAL_PLANS["hybrid"])
    _, short_cache = hybrid.generate(prompt, max_new_tokens=4, return_cache=True)
    _, long_cache = hybrid.generate(prompt, max_new_tokens=40, return_cache=True)
    kv_per_token = 2 * hybrid.teacher_config.num_key_value_heads * (32 // 4) * 4  # keys+values, fp32
    assert long_cache.state_bytes() - short_cache.state_bytes() == 36 * kv_per_token


def test_generate_stops_at_eos_and_samples_reproducibly():
    student, _ = raylin.convert(make_teacher("llama"), CAUSAL_PLANS["mamba2"])
    prompt = torch.randint(5, 100, (2, 5))
    greedy = student.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 6])  # the second generated token of row 0
    stopped = student.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert (stopped[0, 6:] == eos).all()
    sample = lambda seed: student.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5,
                                           generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(1), sample(1))


def _real_outputs(output, family, valid_lengths):
    hidden = output.hidden_states[-1] if family.name != "whisper" else output.last_hidden_state
    return [hidden[row, :length] for row, length in enumerate(valid_lengths)]


@pytest.mark.parametrize("family_name", [f for f in BIDIRECTIONAL if f != "whisper"])
@pytest.mark.parametrize("plan_name", sorted(BIDIRECTIONAL_PLANS))
def test_bidirectional_outputs_on_real_tokens_ignore_padding(family_name, plan_name):
    teacher = make_teacher(family_name)
    family = family_for(teacher)
    student, _ = raylin.convert(teacher, BIDIRECTIONAL_PLANS[plan_name])
    speech = family.modality == "speech"
    lengths = [400, 290] if speech else [11, 7]
    short = family.example_inputs(teacher.config, lengths, seed=1)
    long = family.example_inputs(teacher.config, lengths, total_length=(640 if speech else 19), seed=1)
    # The same real content in both batches; only the amount of padding differs.
    key = "input_values" if speech else "input_ids"
    long[key][:, : short[key].shape[1]] = short[key]
    long[key] = long[key] * long["attention_mask"] if speech else long[key]
    with torch.no_grad():
        out_short = student(**short, output_hidden_states=True)
        out_long = student(**long, output_hidden_states=True)
    if speech:
        frame_lengths = student.model._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
        hidden_short = out_short.hidden_states
        hidden_long = out_long.hidden_states
    else:
        frame_lengths = lengths
        hidden_short, hidden_long = out_short.hidden_states, out_long.hidden_states
    for layer_short, layer_long in zip(hidden_short, hidden_long, strict=True):
        for row, length in enumerate(frame_lengths):
            torch.testing.assert_close(layer_long[row, :length], layer_short[row, :length], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family_name", sorted(set(CAUSAL) | set(BIDIRECTIONAL)))
def test_save_load_round_trip_is_bit_exact(family_name, tmp_path):
    teacher = make_teacher(family_name)
    family = family_for(teacher)
    plan = CAUSAL_PLANS["hybrid"] if family.causal else {**BIDIRECTIONAL_PLANS["bimamba2"], "keep_attention": [0]}
    student, _ = raylin.convert(teacher, plan)
    student.save_pretrained(tmp_path / "student")
    assert {p.name for p in (tmp_path / "student").iterdir()} >= {"config.json", "model.safetensors"}
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["model_type"] == "raylin_student" and config["plan"]["mixer"] == plan["mixer"]
    assert config["teacher_config"]["model_type"] == teacher.config.model_type
    loaded = raylin.load_student(tmp_path / "student")
    for (name, a), (_, b) in zip(student.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    inputs = family.example_inputs(teacher.config, [400, 300] if family.name in ("wav2vec2", "hubert") else [9, 6])
    with torch.no_grad():
        expected = next(v for v in student(**inputs).values() if isinstance(v, torch.Tensor))
        actual = next(v for v in loaded(**inputs).values() if isinstance(v, torch.Tensor))
    assert torch.equal(expected, actual)
    auto = transformers.AutoModel.from_pretrained(tmp_path / "student")
    assert isinstance(auto, raylin.RaylinStudent)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), auto.state_dict().values()))


@pytest.mark.parametrize("family_name", ["llama", "bert"])
def test_gated_deltanet_students_round_trip_bit_exact(family_name, tmp_path):
    teacher = make_teacher(family_name)
    plan = CAUSAL_PLANS["gated_deltanet_hybrid"] if family_name == "llama" else BIDIRECTIONAL_PLANS["bigated_deltanet"]
    student, _ = raylin.convert(teacher, plan)
    student.save_pretrained(tmp_path / "student")
    loaded = raylin.load_student(tmp_path / "student")
    for (name, a), (_, b) in zip(student.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    inputs = family_for(teacher).example_inputs(teacher.config, [9, 6])
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, loaded(**inputs).logits)


def test_linformer_layer_share_round_trips(tmp_path):
    student, report = raylin.convert(make_teacher("bert"), {"mixer": "linformer", "linformer": {"k": 8, "share": "layer"}})
    assert report.names("new") == ["linformer_shared.weight"]
    student.save_pretrained(tmp_path / "s")
    loaded = raylin.load_student(tmp_path / "s")
    layers = loaded.model.bert.encoder.layer
    assert layers[0].attention.self.projections()[0] is layers[2].attention.self.projections()[1]
    assert torch.equal(loaded.linformer_shared.weight, student.linformer_shared.weight)


def test_save_replaces_an_existing_folder_atomically(tmp_path):
    student, _ = raylin.convert(make_teacher("llama"), CAUSAL_PLANS["mamba2"])
    target = tmp_path / "student"
    student.save_pretrained(target)
    (target / "stale.txt").write_text("from an older save")
    student.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no staging folders left behind


def test_the_plan_table_in_the_docs_lists_each_mixers_options_with_their_defaults():
    """docs/conversion.md's plan table names every option of every mixer's options class, with the
    class's default where it is a plain value (teacher-derived defaults are said in words)."""
    rows = [line.split("|")[1:3] for line in (ROOT / "docs" / "conversion.md").read_text().splitlines()
            if line.startswith("| `")]
    documented: dict[str, dict[str, str]] = {}
    for names, defaults in rows:
        keys = re.findall(r"`([a-z_0-9.]+)`", names)
        section = keys[0].partition(".")[0]
        values = [value.strip().strip("`*") for value in defaults.split(",")] if len(keys) > 1 else [defaults.strip().strip("`")]
        for key, value in zip(keys, values, strict=True):
            documented.setdefault(section, {})[key.rpartition(".")[2]] = value
    for section, options in OPTION_SECTIONS.items():
        assert set(documented[section]) == set(options.keys()), section
        for field in dataclasses.fields(options):
            if field.default is not None:
                assert documented[section][field.name] == str(field.default).lower(), (section, field.name)
