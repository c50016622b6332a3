"""`train.precision: auto` picks bf16 only where the hardware multiplies bf16 matrices."""

import pytest
import torch

from raylin.train import deepspeed as deepspeed_config


@pytest.mark.parametrize("has_amx,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_bf16_matrix_hardware(monkeypatch, has_amx, expected):
    monkeypatch.setattr(deepspeed_config, "cpu_has_bf16_matmul", lambda: has_amx)
    assert deepspeed_config.resolve_precision("auto", torch.device("cpu")) == expected


def test_explicit_precision_is_kept_and_fp16_needs_a_gpu():
    assert deepspeed_config.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert deepspeed_config.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        deepspeed_config.resolve_precision("fp16", torch.device("cpu"))

