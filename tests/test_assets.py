"""The real shipped checkpoints: all-MiniLM-L6 (BERT) and SmolLM2-135M (Llama, GQA, RoPE)."""

from __future__ import annotations

import pytest
import torch

import raylin

pytestmark = pytest.mark.assets


def test_minilm_keep_attention_everywhere_is_exact_and_round_trips(minilm, tmp_path):
    teacher, tokenizer = minilm
    student, report = raylin.convert(teacher, {"mixer": "linformer", "keep_attention": list(range(6))}, tokenizer)
    assert report.count("copied") == sum(p.numel() for p in teacher.parameters())
    batch = tokenizer(["a gripping, beautifully shot film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(student(**batch).last_hidden_state, teacher(**batch).last_hidden_state)
    student.save_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "tokenizer.json").is_file() or (tmp_path / "student" / "vocab.txt").is_file()
    loaded = raylin.load_student(tmp_path / "student")
    assert loaded.processor is not None and loaded.processor("dull")["input_ids"] == tokenizer("dull")["input_ids"]


def test_minilm_linformer_student_is_padding_invariant(minilm):
    teacher, tokenizer = minilm
    student, report = raylin.convert(teacher, {"mixer": "linformer", "keep_attention": [1], "linformer": {"k": 64}})
    assert report.names("skipped") == []
    assert len(report.names("new")) == 5  # one shared E=F per converted layer
    texts = ["the plot drags but the acting is superb", "fine"]
    short = tokenizer(texts, padding=True, return_tensors="pt")
    long = tokenizer(texts, padding="max_length", max_length=40, return_tensors="pt")
    with torch.no_grad():
        a, b = student(**short).last_hidden_state, student(**long).last_hidden_state
    for row, length in enumerate(short["attention_mask"].sum(-1).tolist()):
        torch.testing.assert_close(b[row, :length], a[row, :length], rtol=1e-4, atol=1e-5)


def test_smollm2_hybrid_mamba2_student_is_causal_generates_recurrently_and_round_trips(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    cfg = teacher.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # a GQA teacher
    plan = {"mixer": "mamba2", "keep_attention": [1, 20], "init": "attention"}
    student, report = raylin.convert(teacher, plan, tokenizer)
    assert len(report.names("seeded")) == 2 * (cfg.num_hidden_layers - 2)  # in_proj (V rows) and out_proj
    layer = student.model.model.layers[1].self_attn
    assert torch.equal(layer.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    ids = tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[:, 6:] = tokenizer("in possession of a good fortune", return_tensors="pt")["input_ids"][:, : ids.shape[1] - 6]
    with torch.no_grad():
        a, b = student(input_ids=ids).logits, student(input_ids=changed).logits
    assert torch.equal(a[:, :6], b[:, :6])
    generated = student.generate(ids[:, :8], max_new_tokens=6)
    sequence = ids[:, :8]
    with torch.no_grad():
        for _ in range(6):
            sequence = torch.cat([sequence, student(input_ids=sequence).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)
    student.save_pretrained(tmp_path / "student")
    loaded = raylin.load_student(tmp_path / "student")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, a)


def test_smollm2_keep_attention_everywhere_generates_like_the_teacher(smollm2):
    teacher, tokenizer = smollm2
    student, _ = raylin.convert(teacher, {"mixer": "mamba2", "keep_attention": list(range(30))})
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
        expected = teacher.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(student.generate(ids, max_new_tokens=8), expected)


@pytest.fixture(scope="module")
def whisper_tiny():
    from conftest import require_asset

    require_asset("whisper-tiny-en")
    from raylin.models.teachers import load_teacher

    return load_teacher("asset:whisper-tiny-en", model_class="WhisperForAudioClassification")


def _tone_features(feature_extractor):
    time = torch.arange(16000) / 16000
    audio = torch.sin(2 * torch.pi * (200 + 300 * time) * time).numpy()
    return feature_extractor(audio, sampling_rate=16000, return_tensors="pt")["input_features"]


def test_whisper_tiny_encoder_converts_exactly_and_to_bimamba2(whisper_tiny):
    teacher, feature_extractor = whisper_tiny
    assert teacher.config.d_model == 384 and teacher.config.encoder_layers == 4
    features = _tone_features(feature_extractor)
    keep_all, _ = raylin.convert(teacher, {"mixer": "bimamba2", "keep_attention": [0, 1, 2, 3]})
    with torch.no_grad():
        assert torch.equal(keep_all(input_features=features).logits, teacher(input_features=features).logits)
    student, report = raylin.convert(teacher, {"mixer": "bimamba2"}, feature_extractor)
    # Every encoder layer drops q/k/v/out (k has no bias in Whisper): 7 tensors per layer.
    assert len(report.names("skipped")) == 7 * 4
    assert all(".self_attn." in name for name in report.names("skipped"))
    with torch.no_grad():
        hidden = student(input_features=features, output_hidden_states=True).hidden_states
    assert len(hidden) == 5 and hidden[-1].shape == (1, 1500, 384)


def test_whisper_full_model_converts_only_its_encoder(tmp_path):
    from conftest import require_asset

    require_asset("whisper-tiny-en")
    student, report = raylin.convert("asset:whisper-tiny-en", {"mixer": "bimamba2", "keep_attention": [3]})
    assert all(".encoder.layers." in name for name in report.names("new"))
    assert any(".decoder.layers.0.self_attn.q_proj" in name for name in report.names("copied"))
    student.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "preprocessor_config.json").is_file()
    loaded = raylin.load_student(tmp_path / "s")
    assert type(loaded.processor).__name__ == "WhisperFeatureExtractor"
