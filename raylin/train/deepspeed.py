"""DeepSpeed configuration from a run config: ZeRO stage, offload and precision per device."""

from __future__ import annotations

from typing import Any

import torch

from raylin.config import TrainConfig


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` means bf16 on GPUs that support it, fp32 elsewhere. On CPU, bf16 autocast was
    re-measured on the 2-core AMX machine (docs/results/bf16-cpu.json): a training step of every
    shipped student and teacher took 1.3-2x longer than fp32 at one thread per worker, so fp32 stays
    the CPU default."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ValueError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU.")
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(train: TrainConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    micro_batch = train.batch_size // world_size
    precision = resolve_precision(train.precision, device)
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload:
        if train.zero_stage == 0:
            raise ValueError("train.offload needs train.zero_stage >= 1.")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # raylin passes a torch AdamW (one optimizer for every device); allow it with offload too.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
