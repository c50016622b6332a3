"""``raylin export``: a causal student as a stock transformers checkpoint that serving engines load.

A Llama-family student whose mixers are Mamba2 (any attention layers it kept stay Llama attention)
is exactly IBM's **Bamba** architecture, which transformers ships (``BambaForCausalLM``) and vLLM
serves: Llama-style attention with RoPE and grouped-query heads, Mamba2 mixers with the same
projections, causal convolution, gated RMS norm (gate before the norm, per group) and SSD scan,
the same SwiGLU MLP and RMSNorms. Only the names differ, so the export renames tensors and writes
a Bamba config; nothing is approximated. ``AutoModelForCausalLM.from_pretrained(DIR)`` then loads
it without raylin and without ``trust_remote_code``.

Three settings make the two match exactly and are checked, not assumed: Bamba's rotary embedding
is partial by default (half the head), so the config states ``partial_rotary_factor: 1.0``;
Bamba's gated norm uses the model's ``rms_norm_eps``, so the student's Mamba2 norm epsilon must
equal the teacher's; Bamba's mixers use the model's ``hidden_act``, so the MLP must use SiLU.

Before publishing, the export runs the Bamba model and the student on a probe batch and records
the largest logit difference in ``export_report.json``; above ``tolerance`` (1e-4, fp32) nothing
is written. The student runs through transformers' reference Mamba2 code there
(``reference_paths()``), the code Bamba itself runs on CPU, and the two agree to the last bit.
raylin's CPU fast path sums the same terms in another order; the report gives that difference
too (``max_abs_logit_diff_fast_path``): fp32 rounding, relative 1e-7 per layer, which
SmolLM2's massive activations (hidden states near 2.6e4) grow to about 5e-4 on logits near 40.

What it refuses, and why:
  * encoder students (BERT, RoBERTa, Wav2Vec2, HuBERT, Whisper): no stock bidirectional
    Mamba / Linformer architecture exists; they stay raylin folders, which ``AutoModel`` loads
    after ``import raylin``;
  * GPT-NeoX students: parallel residual, LayerNorm and partial rotary have no stock hybrid;
  * students without any attention layer: transformers' Bamba counts decoded tokens in its first
    attention layer and fails without one (keep one, as every hybrid does);
  * Mamba (v1) mixers: Jamba, the stock Mamba1 hybrid, has attention without RoPE;
  * Gated DeltaNet mixers: the stock delta-rule architectures (Qwen3-Next, Qwen3.5, OLMo-Hybrid)
    pair them with attention that Llama's cannot become (output-gated attention with per-head
    Q/K RMSNorm in Qwen3-Next and Qwen3.5, Q/K norm in OLMo-Hybrid) and write the delta rule's
    projections and norm in their own layout, so no stock model reproduces such a student exactly.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import BambaConfig, BambaForCausalLM, PretrainedConfig

from raylin.atomic import replace_folder, write_text_atomic
from raylin.models.mixers import Mamba2Mixer
from raylin.models.mixers.common import reference_paths
from raylin.models.student import RaylinStudent, load_student

_log = logging.getLogger(__name__)

REPORT_NAME = "export_report.json"
TOLERANCE = 1e-4

# Student tensor name -> Bamba tensor name; the first matching rule wins.
_BAMBA_NAMES = (
    (r"^model\.model\.layers\.(\d+)\.self_attn\.(in_proj|conv1d|dt_bias|A_log|D\b|norm|out_proj)", "model.layers.{0}.mamba.{1}"),
    (r"^model\.model\.layers\.(\d+)\.post_attention_layernorm", "model.layers.{0}.pre_ff_layernorm"),
    (r"^model\.model\.layers\.(\d+)\.mlp\.", "model.layers.{0}.feed_forward."),
    (r"^model\.model\.norm\.", "model.final_layernorm."),
    (r"^model\.model\.", "model."),
    (r"^model\.lm_head\.", "lm_head."),
)


class ExportError(ValueError):
    """A student that cannot become a stock checkpoint; the message says why and what to do."""


@dataclass
class ExportReport:
    student: str
    architecture: str
    attention_layers: list[int]
    tensors: int
    max_abs_logit_diff: float  # against the student on transformers' reference code (what Bamba runs)
    max_abs_logit_diff_fast_path: float  # against the student on raylin's CPU fast path
    tolerance: float
    probe_tokens: int


def bamba_name(student_name: str) -> str:
    """The Bamba name of a student tensor (raises ExportError for one no rule maps)."""
    for pattern, replacement in _BAMBA_NAMES:
        match = re.match(pattern, student_name)
        if match:
            return replacement.format(*match.groups()) + student_name[match.end():]
    raise ExportError(f"Student tensor {student_name!r} has no place in a Bamba checkpoint.")


def _mixers(student: RaylinStudent) -> list[Mamba2Mixer]:
    return [student.family.attention(student.block(i)) for i in student.mixer_layers()]


def check_exportable(student: RaylinStudent) -> None:
    """Raise ExportError naming the first difference that keeps ``student`` from being a Bamba model."""
    family, plan, config = student.family, student.plan, student.teacher_config
    if not family.causal:
        raise ExportError(
            f"A {family.name} student is a bidirectional encoder; no stock transformers architecture holds its "
            "mixers. Keep the raylin folder: `import raylin` registers it with AutoModel.")
    if family.name != "llama":
        raise ExportError(
            f"Only Llama-family students export (this one's teacher is {family.name}: parallel residual, LayerNorm "
            "and partial rotary have no stock hybrid). Keep the raylin folder.")
    if plan.mixer != "mamba2":
        reason = {
            "mamba": "Jamba, the stock Mamba1 hybrid, has attention without RoPE",
            "gated_deltanet": "the stock delta-rule models (Qwen3-Next, Qwen3.5, OLMo-Hybrid) pair it with gated or "
                              "Q/K-normed attention a Llama layer cannot become",
        }.get(plan.mixer, "no stock architecture matches it")
        raise ExportError(f"plan.mixer {plan.mixer!r} does not export: {reason}. Convert with mixer: mamba2 to export.")
    if config.hidden_act != "silu":
        raise ExportError(f"The teacher's MLP uses {config.hidden_act!r}; Bamba's Mamba2 mixers share the MLP's "
                          "activation and need 'silu'.")
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
        raise ExportError(f"The teacher's head_dim {config.head_dim} is not hidden_size / num_attention_heads; "
                          "Bamba derives it from those.")
    if not plan.keep_attention:
        raise ExportError(
            "A student with no attention layer does not export: transformers' Bamba counts decoded tokens in its "
            "first attention layer and fails without one. Keep at least one (plan.keep_attention), as hybrids do.")
    for mixer in _mixers(student):
        # Equal up to float32 rounding (a GGUF checkpoint stores 1e-5 as 9.9999997e-06).
        if not math.isclose(mixer.norm.variance_epsilon, config.rms_norm_eps, rel_tol=1e-6):
            raise ExportError(
                f"The Mamba2 gated norm uses eps={mixer.norm.variance_epsilon} but the teacher's RMSNorm uses "
                f"{config.rms_norm_eps}; Bamba uses one epsilon for both, so the export would not be exact.")


def bamba_config(student: RaylinStudent) -> BambaConfig:
    """The BambaConfig that reproduces ``student`` (its teacher's Llama config plus the plan's Mamba2 shape)."""
    config: PretrainedConfig = student.teacher_config
    first = _mixers(student)[0] if student.mixer_layers() else None
    mamba = {} if first is None else {
        "mamba_n_heads": first.num_heads, "mamba_d_head": first.head_dim, "mamba_n_groups": first.n_groups,
        "mamba_d_state": first.ssm_state_size, "mamba_d_conv": first.conv_kernel_size,
        "mamba_expand": first.intermediate_size // config.hidden_size, "mamba_chunk_size": first.chunk_size,
        "mamba_conv_bias": first.conv1d.bias is not None, "mamba_proj_bias": first.in_proj.bias is not None,
        "time_step_limit": tuple(first.time_step_limit),
    }
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta})
    rope["partial_rotary_factor"] = 1.0  # Bamba's default is 0.5; Llama rotates the whole head
    return BambaConfig(
        vocab_size=config.vocab_size, tie_word_embeddings=config.tie_word_embeddings, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        hidden_act=config.hidden_act, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias, attention_dropout=config.attention_dropout,
        attn_layer_indices=list(student.plan.keep_attention), rope_parameters=rope,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        architectures=["BambaForCausalLM"], **mamba,
    )


@torch.no_grad()
def to_bamba(student: RaylinStudent) -> BambaForCausalLM:
    """The Bamba model holding ``student``'s weights (strictly: every tensor placed, none left over)."""
    check_exportable(student)
    config = bamba_config(student)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = BambaForCausalLM(config)
    state = {bamba_name(name): tensor for name, tensor in student.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    placed = model.load_state_dict(state, strict=False, assign=True)
    if placed.unexpected_keys:
        raise ExportError(f"Student tensors with no place in the Bamba model: {placed.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were built on the meta device
    unplaced = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if unplaced:
        raise ExportError(f"Bamba tensors with no student weight: {unplaced[:5]}")
    return model.eval()


@torch.no_grad()
def max_logit_differences(student: RaylinStudent, exported: torch.nn.Module, probe: torch.Tensor) -> tuple[float, float]:
    """Largest |student logits - exported logits| on the token batch ``probe`` (fp32): with the
    student on transformers' reference code, and on raylin's CPU fast path."""
    actual = exported(input_ids=probe).logits.float()
    with reference_paths():
        reference = student(input_ids=probe).logits.float()
    fast = student(input_ids=probe).logits.float()
    return float((reference - actual).abs().max()), float((fast - actual).abs().max())


def export_student(student_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                   tolerance: float = TOLERANCE, probe_length: int = 64) -> ExportReport:
    """Write the student at ``student_dir`` as a stock Bamba checkpoint at ``out_dir``.

    The folder (config.json, model.safetensors, tokenizer files, export_report.json) appears in one
    rename, and only after the exported model reproduced the student's logits on a probe batch
    within ``tolerance``. Refuses an existing non-empty ``out_dir`` unless ``overwrite``, and
    students no stock architecture reproduces (ExportError says which difference prevents it).
    """
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    if out_dir.resolve() == student_dir.resolve():
        raise ExportError(f"--to {out_dir} is the student's own folder; choose another folder.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} already holds files; pass --overwrite to replace it, or choose another folder.")
    try:
        student = load_student(student_dir)
    except (FileNotFoundError, ValueError) as error:  # not a student folder: say so, without a traceback
        raise ExportError(str(error)) from error
    model = to_bamba(student)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, student.teacher_config.vocab_size, (2, probe_length), generator=generator)
    difference, fast_path_difference = max_logit_differences(student, model, probe)
    if not difference <= tolerance:
        raise ExportError(f"The exported model's logits differ from the student's by {difference:.2e} "
                          f"(tolerance {tolerance:.0e}); nothing was written. Please report this as a bug.")
    report = ExportReport(str(student_dir), "BambaForCausalLM", list(student.plan.keep_attention),
                          len(model.state_dict()), difference, fast_path_difference, tolerance, int(probe.numel()))

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if student.processor is not None:
            student.processor.save_pretrained(staging)
        write_text_atomic(staging / REPORT_NAME, json.dumps(asdict(report), indent=1))

    replace_folder(out_dir, write)
    _log.info("exported %s as BambaForCausalLM to %s (max |logit diff| %.2e on %d probe tokens)",
              student_dir, out_dir, difference, probe.numel())
    return report
