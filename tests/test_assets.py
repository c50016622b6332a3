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
