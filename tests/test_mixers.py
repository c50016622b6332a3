"""Mixers against their definitions: Linformer vs softmax attention, CPU scans vs sequential loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_teacher
from transformers.models.mamba.modeling_mamba import mamba_selective_scan
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule

import raylin
from raylin.models.mixers import reverse_within_length
from raylin.models.mixers.common import token_validity


def test_linformer_with_k_equal_length_and_identity_projections_is_softmax_attention():
    teacher = make_teacher("bert")
    length = 12
    student, _ = raylin.convert(teacher, {"mixer": "linformer", "linformer": {"k": length, "max_length": length, "share": "none"}})
    with torch.no_grad():
        for layer in student.model.bert.encoder.layer:
            for projection in (layer.attention.self.E, layer.attention.self.F):
                # Linformer divides by sqrt(n); sqrt(n) * I makes the effective projection the identity.
                projection.weight.copy_(math.sqrt(length) * torch.eye(length))
    ids = torch.randint(5, 100, (2, length))
    with torch.no_grad():
        expected = teacher(input_ids=ids, output_hidden_states=True)
        actual = student(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for e, a in zip(expected.hidden_states, actual.hidden_states, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_linformer_rejects_sequences_longer_than_its_projections():
    teacher = make_teacher("bert")
    student, _ = raylin.convert(teacher, {"mixer": "linformer", "linformer": {"k": 4, "max_length": 8}})
    with pytest.raises(ValueError, match="longer than the Linformer projections"):
        student(input_ids=torch.randint(5, 100, (1, 9)))


def _sequential_selective_scan(u, dt, A, B, C, D, z):
    """Mamba-1 reference: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; y_t = C_t h_t + D u_t, gated by silu(z)."""
    batch, channels, length = u.shape
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + u * D[None, :, None]
    return y * F.silu(z)


def _sequential_ssd(x, dt, A, B, C, D):
    """Mamba-2 reference per head: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t."""
    batch, length, heads, head_dim = x.shape
    h = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * B[:, t, None, None, :]
        ys.append((h * C[:, t, None, None, :]).sum(-1))
    return torch.stack(ys, 1) + x * D[None, None, :, None]


def _grads(output, inputs):
    return torch.autograd.grad(output.pow(2).sum(), inputs)


def test_mamba_parallel_scan_equals_sequential_loop_forward_and_backward():
    torch.manual_seed(0)
    batch, channels, state, length = 2, 6, 4, 37  # length not a power of two: mambapy pads
    u = torch.randn(batch, channels, length, requires_grad=True)
    dt = (torch.rand(batch, channels, length) * 0.5 + 0.01).requires_grad_()
    A = -torch.rand(channels, state).add(0.5).requires_grad_()
    B = torch.randn(batch, state, length, requires_grad=True)
    C = torch.randn(batch, state, length, requires_grad=True)
    D = torch.randn(channels, requires_grad=True)
    z = torch.randn(batch, channels, length, requires_grad=True)
    inputs = (u, dt, A, B, C, D, z)
    fast = mamba_selective_scan(u, dt, A, B, C, D=D, z=z, use_mambapy=True)
    reference = _sequential_selective_scan(u, dt, A, B, C, D, z)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    for g_fast, g_ref in zip(_grads(fast, inputs), _grads(reference, inputs), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)


def test_mamba2_chunked_scan_equals_sequential_loop_forward_and_backward():
    torch.manual_seed(0)
    batch, length, heads, head_dim, state = 2, 37, 3, 4, 5  # 37 tokens over chunks of 8
    x = torch.randn(batch, length, heads, head_dim, requires_grad=True)
    dt = (torch.rand(batch, length, heads) * 0.5 + 0.01).requires_grad_()
    A = -torch.rand(heads).add(0.5).requires_grad_()
    B = torch.randn(batch, length, 1, state, requires_grad=True)
    C = torch.randn(batch, length, 1, state, requires_grad=True)
    D = torch.randn(heads, requires_grad=True)
    inputs = (x, dt, A, B, C, D)
    fast = mamba2_chunk_scan(x, dt, A, B, C, chunk_size=8, D=D)
    reference = _sequential_ssd(x, dt, A, B.expand(-1, -1, heads, -1)[:, :, 0], C.expand(-1, -1, heads, -1)[:, :, 0], D)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    for g_fast, g_ref in zip(_grads(fast, inputs), _grads(reference, inputs), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)


def test_gated_delta_rule_chunked_equals_recurrent_across_chunks_and_from_a_state():
    # The chunked form the Gated DeltaNet mixer trains with (chunks of 64) against the per-token
    # recurrence it decodes with: 150 tokens span three chunks, and both start from the same state.
    torch.manual_seed(0)
    batch, length, heads, width = 2, 150, 3, 8
    query, key, value = (torch.randn(batch, length, heads, width) for _ in range(3))
    decay = -F.softplus(torch.randn(batch, length, heads))  # log decays, <= 0
    beta = torch.rand(batch, length, heads)
    state = torch.randn(batch, heads, width, width) * 0.1
    chunked, chunked_state = torch_chunk_gated_delta_rule(query, key, value, decay, beta, initial_state=state,
                                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
    recurrent, recurrent_state = torch_recurrent_gated_delta_rule(query, key, value, decay, beta, initial_state=state,
                                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(chunked, recurrent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked_state, recurrent_state, rtol=1e-4, atol=1e-5)


def test_gated_deltanet_attention_init_copies_q_k_v_per_head_and_o():
    teacher = make_teacher("llama")  # grouped-query attention: K/V heads are repeated per query head
    student, report = raylin.convert(teacher, {"mixer": "gated_deltanet", "init": "attention"})
    cfg, mixer = teacher.config, student.model.model.layers[0].self_attn
    attention = teacher.model.layers[0].self_attn
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    repeat = cfg.num_attention_heads // cfg.num_key_value_heads
    per_head = lambda w, n: w.view(n, head_dim, -1).repeat_interleave(cfg.num_attention_heads // n, 0)
    rows = mixer.in_proj_qkvz.weight.view(cfg.num_attention_heads, 4, head_dim, -1)
    assert repeat > 1
    assert torch.equal(rows[:, 0], per_head(attention.q_proj.weight, cfg.num_attention_heads))
    assert torch.equal(rows[:, 1], per_head(attention.k_proj.weight, cfg.num_key_value_heads))
    assert torch.equal(rows[:, 2], per_head(attention.v_proj.weight, cfg.num_key_value_heads))
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    assert len(report.names("seeded")) == 2 * cfg.num_hidden_layers
    # Other head shapes than the teacher's leave the projections fresh rather than half-copied.
    _, report = raylin.convert(teacher, {"mixer": "gated_deltanet", "init": "attention", "gated_deltanet": {"head_dim": 4}})
    assert not any("in_proj_qkvz" in name for name in report.names("seeded"))


def test_mamba2_mixer_runs_a_short_sequence_as_one_chunk_with_the_same_output_and_gradients():
    """A 40-token sequence runs as one 40-token chunk instead of being padded to 128; the result is the
    one 8-token chunks give, and the configured chunk size is kept for the next call."""
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as TransformersMamba2Mixer

    from raylin.models.mixers import Mamba2Mixer, Mamba2Options, mamba2_config

    torch.manual_seed(0)
    mixer = Mamba2Mixer(mamba2_config(32, 2, Mamba2Options(head_dim=8, state_size=16, chunk_size=128)), 0)
    x = torch.randn(2, 40, 32)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 31:] = 0
    single, _ = mixer(x, attention_mask=mask)
    assert mixer.chunk_size == 128
    single.pow(2).sum().backward()
    single_grads = [p.grad.clone() for p in mixer.parameters()]
    mixer.zero_grad()
    mixer.chunk_size = 8  # transformers' own forward, in 8-token chunks
    chunked = TransformersMamba2Mixer.forward(mixer, x, attention_mask=mask.bool())
    chunked.pow(2).sum().backward()
    torch.testing.assert_close(single, chunked, rtol=1e-5, atol=1e-5)
    for got, want in zip(single_grads, [p.grad for p in mixer.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_reverse_within_length_keeps_padding_and_is_an_involution():
    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    reversed_x = reverse_within_length(x, valid)
    assert reversed_x[0, :, 0].tolist() == [2, 1, 0, 3, 4]
    assert reversed_x[1, :, 0].tolist() == [9, 8, 7, 6, 5]
    assert torch.equal(reverse_within_length(reversed_x, valid), x)


def test_token_validity_reads_every_mask_layout():
    keys = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    bool_4d = keys[:, None, None, :].expand(1, 1, 3, 3)
    float_4d = torch.zeros(1, 1, 3, 3).masked_fill(~bool_4d, torch.finfo(torch.float32).min)
    for mask in (keys.long(), bool_4d, float_4d):
        assert token_validity(mask, 3).tolist() == [[True, True, False]]
    assert token_validity(None, 3) is None
    assert token_validity(torch.ones(1, 3, dtype=torch.long), 3) is None
    with pytest.raises(ValueError, match="attention mask of shape"):
        token_validity(torch.ones(1, 3, 3), 3)
