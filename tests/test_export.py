"""`raylin export`: Mamba2 hybrids of Llama teachers become stock Bamba checkpoints, checked in a
Python process that never imports raylin; what cannot be exported is refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_teacher
from transformers import LlamaConfig, LlamaForCausalLM

import raylin
from raylin.cli import main
from raylin.export import REPORT_NAME, ExportError, export_student
from raylin.models.mixers.common import reference_paths

# Runs in a fresh interpreter: stock transformers only, no trust_remote_code, raylin never imported.
_STOCK_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    folder, probe_file = sys.argv[1], sys.argv[2]
    probe = torch.load(probe_file, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["ids"]).logits
        tokens = model.generate(probe["prompt"], max_new_tokens=probe["new_tokens"], do_sample=False,
                                pad_token_id=0)
    print(json.dumps({
        "architecture": type(model).__name__,
        "max_abs_diff": float((logits - probe["logits"]).abs().max()),
        "same_tokens": bool(torch.equal(tokens, probe["generated"])),
        "raylin_imported": any(name == "raylin" or name.startswith("raylin.") for name in sys.modules),
    }))
""")


def stock_transformers_check(folder: Path, student, ids: torch.Tensor, prompt: torch.Tensor, tmp_path: Path,
                             new_tokens: int = 12) -> dict:
    """Load ``folder`` with AutoModelForCausalLM in a new process and compare it with ``student``
    (its logits from transformers' reference Mamba2 code, which Bamba runs too; raylin's CPU fast
    path differs by fp32 rounding, checked by the callers)."""
    with torch.no_grad(), reference_paths():
        probe = {"ids": ids, "logits": student(input_ids=ids).logits, "prompt": prompt, "new_tokens": new_tokens,
                 "generated": student.generate(prompt, max_new_tokens=new_tokens)}
    torch.save(probe, tmp_path / "probe.pt")
    script = tmp_path / "stock_check.py"
    script.write_text(_STOCK_CHECK)
    done = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "probe.pt")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiny_llama(**overrides) -> LlamaForCausalLM:
    config = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(config | overrides))).eval()


def _trained_looking(student):
    """Move every weight off its initial value, so no tensor matches its counterpart by accident."""
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return student


def test_exported_mamba2_hybrid_is_a_stock_bamba_model_outside_raylin(tmp_path):
    plan = {"mixer": "mamba2", "keep_attention": [1], "init": "attention", "mamba2": {"head_dim": 16, "chunk_size": 8}}
    student, _ = raylin.convert(_tiny_llama(), plan)
    _trained_looking(student).save_pretrained(tmp_path / "student")
    assert main(["export", str(tmp_path / "student"), "--to", str(tmp_path / "bamba")]) == 0
    report = json.loads((tmp_path / "bamba" / REPORT_NAME).read_text())
    assert report["architecture"] == "BambaForCausalLM" and report["max_abs_logit_diff"] <= 1e-4
    assert report["max_abs_logit_diff_fast_path"] <= 1e-4
    config = json.loads((tmp_path / "bamba" / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["attn_layer_indices"] == [1]
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0
    ids = torch.randint(0, 120, (2, 37), generator=torch.Generator().manual_seed(1))  # chunks of 8, and a remainder
    outcome = stock_transformers_check(tmp_path / "bamba", student.eval(), ids, ids[:1, :9], tmp_path)
    assert outcome["architecture"] == "BambaForCausalLM" and not outcome["raylin_imported"]
    assert outcome["max_abs_diff"] <= 1e-4
    assert outcome["same_tokens"]


def test_untied_heads_and_several_attention_layers_export_exactly(tmp_path):
    plan = {"mixer": "mamba2", "keep_attention": [0, 3], "mamba2": {"head_dim": 16}}
    student, _ = raylin.convert(_tiny_llama(tie_word_embeddings=False), plan)
    _trained_looking(student).save_pretrained(tmp_path / "student")
    report = export_student(tmp_path / "student", tmp_path / "bamba")
    assert report.attention_layers == [0, 3] and report.max_abs_logit_diff <= 1e-4


@pytest.mark.parametrize(("teacher", "plan", "reason"), [
    ("bert", {"mixer": "bimamba2"}, "bidirectional encoder"),
    ("gpt_neox", {"mixer": "mamba2"}, "Only Llama-family students export"),
    ("llama", {"mixer": "gated_deltanet"}, "gated_deltanet' does not export"),
    ("llama", {"mixer": "mamba"}, "Jamba"),
    ("llama", {"mixer": "mamba2"}, "no attention layer"),
])
def test_export_refuses_students_no_stock_architecture_reproduces(teacher, plan, reason, tmp_path):
    student, _ = raylin.convert(make_teacher(teacher), plan)
    student.save_pretrained(tmp_path / "student")
    with pytest.raises(ExportError, match=reason):
        export_student(tmp_path / "student", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_inexact_norm_epsilon_and_a_folder_in_use(tmp_path, capsys):
    plan = {"mixer": "mamba2", "keep_attention": [2], "mamba2": {"head_dim": 16}}
    student, _ = raylin.convert(_tiny_llama(rms_norm_eps=1e-6), plan)
    student.save_pretrained(tmp_path / "student")
    with pytest.raises(ExportError, match="Bamba uses one epsilon"):
        export_student(tmp_path / "student", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["export", str(tmp_path / "student"), "--to", str(tmp_path / "busy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert main(["export", str(tmp_path / "busy"), "--to", str(tmp_path / "elsewhere")]) == 2  # not a student folder
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.assets
def test_exported_smollm2_mamba2_hybrid_passes_the_stock_transformers_check(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    student, _ = raylin.convert(teacher, {"mixer": "mamba2", "keep_attention": [9, 19], "init": "attention"}, tokenizer)
    student.save_pretrained(tmp_path / "student")
    report = export_student(tmp_path / "student", tmp_path / "bamba")
    assert (tmp_path / "bamba" / "tokenizer.json").is_file()
    # raylin's CPU fast path sums in another order: fp32 rounding that SmolLM2's massive activations
    # (hidden states near 2.6e4) grow to about 5e-4 on logits near 40 (relative 1.5e-5).
    assert report.max_abs_logit_diff <= 1e-4 and report.max_abs_logit_diff_fast_path <= 2e-3
    ids = tokenizer(["It is a truth universally acknowledged, that a single man in possession of a good fortune",
                     "Anne Elliot had been forced into prudence in her youth"], padding=True, return_tensors="pt")
    prompt = ids["input_ids"][:1, :10]
    outcome = stock_transformers_check(tmp_path / "bamba", student, ids["input_ids"], prompt, tmp_path)
    assert outcome == {"architecture": "BambaForCausalLM", "max_abs_diff": outcome["max_abs_diff"],
                       "same_tokens": True, "raylin_imported": False}
    assert outcome["max_abs_diff"] <= 1e-4
