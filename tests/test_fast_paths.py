"""raylin's CPU fast paths for the state-space mixers equal transformers' reference code: outputs,
gradients and final states, with and without padding, shorter and longer than a chunk."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from raylin.models.mixers import BidirectionalMixer, Mamba2Mixer, Mamba2Options, MambaMixer, MambaOptions, mamba2_config, mamba_config
from raylin.models.mixers import mamba as mamba_module
from raylin.models.mixers import scan
from raylin.models.mixers.common import reference_paths
from raylin.timing import peak_allocated_mb


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value (D = 1, norms = 1 hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module


def _outputs_and_grads(module, x, mask):
    output = module(x, attention_mask=mask)[0]
    grads = torch.autograd.grad(output.square().sum(), [x, *module.parameters()])
    return output, grads


def _assert_fast_equals_reference(module, x, mask):
    fast, fast_grads = _outputs_and_grads(module, x, mask)
    with reference_paths():
        reference, reference_grads = _outputs_and_grads(module, x, mask)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    for got, want in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def _padded_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    return mask


def test_causal_depthwise_conv_equals_conv1d():
    x = torch.randn(2, 37, 12)
    weight, bias = torch.randn(12, 4), torch.randn(12)
    reference = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=3, groups=12)[..., :37].transpose(1, 2)
    torch.testing.assert_close(scan.causal_depthwise_conv(x, weight, bias), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length,chunk", [(40, 64), (64, 64), (150, 64), (200, 32)])
@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_scan_equals_transformers_chunk_scan(length, chunk, groups):
    torch.manual_seed(0)
    batch, heads, head_dim, state = 2, 4, 8, 16
    x = torch.randn(batch, length, heads, head_dim)
    dt = F.softplus(torch.randn(batch, length, heads))
    A = -torch.rand(heads) * 2
    B, C = torch.randn(batch, length, groups, state), torch.randn(batch, length, groups, state)
    D = torch.randn(heads)
    y, final = scan.ssd_scan(x, dt, A[None], B, C, chunk, D=D[None], return_final_state=True)
    want_y, want_final = mamba2_chunk_scan(x, dt, A, B, C, chunk, D=D, return_final_states=True)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, want_final, rtol=1e-4, atol=1e-4)


def test_ssd_scan_exact_decay_when_a_chunk_decays_past_the_factor_limit():
    """Strong decay (a chunk's total log-decay below -FACTOR_LIMIT) takes the exact path, and it
    equals the reference too."""
    torch.manual_seed(1)
    x, B, C = torch.randn(1, 96, 2, 4), torch.randn(1, 96, 1, 8), torch.randn(1, 96, 1, 8)
    dt = torch.full((1, 96, 2), 3.0)
    A = torch.tensor([-2.0, -0.5])
    assert float((dt[0, :64] * A).sum(0).min()) < -scan.FACTOR_LIMIT
    y = scan.ssd_scan(x, dt, A[None], B, C, 64)
    torch.testing.assert_close(y, mamba2_chunk_scan(x, dt, A, B, C, 64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [24, 100, 300])
@pytest.mark.parametrize("padded", [False, True])
def test_mamba2_fast_path_equals_reference(length, padded):
    torch.manual_seed(0)
    mixer = _perturbed(Mamba2Mixer(mamba2_config(64, 2, Mamba2Options(chunk_size=64, state_size=16)), 0))
    x = torch.randn(2, length, 64, requires_grad=True)
    _assert_fast_equals_reference(mixer, x, _padded_mask(2, length) if padded else None)


@pytest.mark.parametrize("padded", [False, True])
def test_fused_bidirectional_mamba2_equals_two_passes(padded):
    torch.manual_seed(0)
    config = mamba2_config(64, 2, Mamba2Options(chunk_size=32, state_size=16))
    mixer = _perturbed(BidirectionalMixer(Mamba2Mixer(config, 0), Mamba2Mixer(config, 0)))
    assert mixer.fused
    x = torch.randn(2, 70, 64, requires_grad=True)
    _assert_fast_equals_reference(mixer, x, _padded_mask(2, 70) if padded else None)


@pytest.mark.parametrize("length,chunk", [(50, 128), (130, 32), (96, 16)])
@pytest.mark.parametrize("padded", [False, True])
def test_mamba_chunked_scan_equals_reference(monkeypatch, length, chunk, padded):
    monkeypatch.setattr(mamba_module, "SCAN_CHUNK", chunk)
    torch.manual_seed(0)
    mixer = _perturbed(MambaMixer(mamba_config(32, 2, MambaOptions()), 0))
    x = torch.randn(2, length, 32, requires_grad=True)
    _assert_fast_equals_reference(mixer, x, _padded_mask(2, length) if padded else None)


def test_chunked_selective_scan_memory_grows_with_the_chunk_not_the_sequence():
    torch.manual_seed(0)
    inner, state = 64, 16
    A = -torch.rand(inner, state)

    def peak(length: int, chunk: int) -> float:
        x, dt = torch.randn(1, length, inner), torch.rand(1, length, inner)
        B, C = torch.randn(1, length, state), torch.randn(1, length, state)
        return peak_allocated_mb(lambda: scan.chunked_selective_scan(x, dt, A, B, C, None, chunk))

    short, long = peak(512, 64), peak(4096, 64)
    whole = peak(4096, 4096)  # one chunk: what the unchunked scan holds
    # Per extra token the chunked scan holds a few floats per channel (inputs and outputs), never
    # one per channel and state entry; the one-chunk scan holds several per state entry.
    floats_per_channel_token = (long - short) * 1e6 / 4 / ((4096 - 512) * inner)
    assert floats_per_channel_token < state / 2
    assert whole > 8 * long


def test_shipped_speed_benchmark_times_teacher_and_student_forward_and_decode(tmp_path):
    """The shipped-model benchmark runs on the real shipped configs (short lengths here) and
    writes what the summary reads: forward for every model, per-token decode for causal ones."""
    import json

    from raylin.bench import SHIPPED_CONFIGS
    from raylin.bench.speed import run_shipped_benchmark, summarize_shipped

    shipped = ((SHIPPED_CONFIGS / "minilm-rt-linformer.yaml", (16,)), (SHIPPED_CONFIGS / "smollm2-austen-mamba2.yaml", (8,)))
    records = run_shipped_benchmark(tmp_path, shipped=shipped, dtypes=("float32",), repeats=1, log=lambda _: None,
                                    compiled=False)
    kinds = {(r.config, r.model, r.mode) for r in records}
    assert kinds == {
        (config, model, mode)
        for config, modes in (("minilm-rt-linformer.yaml", ("forward",)), ("smollm2-austen-mamba2.yaml", ("forward", "decode")))
        for model in ("teacher", "student")
        for mode in modes
    }
    assert all(r.latency_s > 0 for r in records)
    assert len(json.loads((tmp_path / "shipped-speed.json").read_text())) == len(records)
    rows = summarize_shipped(records)
    assert {(row["config"], row["mode"]) for row in rows} == {(c, m) for c, _, m in kinds}


def test_ssd_scan_is_exactly_causal():
    """Changing later tokens leaves every earlier output bit for bit the same."""
    torch.manual_seed(2)
    x, B, C = torch.randn(1, 90, 4, 8), torch.randn(1, 90, 2, 16), torch.randn(1, 90, 2, 16)
    dt = F.softplus(torch.randn(1, 90, 4))
    A = -torch.rand(1, 4)
    changed = [t.clone() for t in (x, dt, B, C)]
    for tensor in changed:
        tensor[:, 50:] = torch.randn_like(tensor[:, 50:]).abs()
    y = scan.ssd_scan(x, dt, A, B, C, 64)
    y_changed = scan.ssd_scan(*changed[:2], A, *changed[2:], 64)
    assert torch.equal(y[:, :50], y_changed[:, :50])
