"""DeepSpeed configuration from a run config: ZeRO stage, offload and precision per device."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

from raylin.config import TrainConfig


@cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles, ``amx_bf16``), read
    from /proc/cpuinfo (False where it cannot be read). Without it oneDNN emulates bf16 through fp32:
    on the AVX2-only 2-core CI machine a 128 x 384 x 1536 bf16 matmul took 8x longer than fp32
    (docs/benchmarks.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` means bf16 on GPUs that support it and on CPUs with bf16 matrix hardware (AMX),
    fp32 elsewhere: on CPUs without it bf16 runs several times slower than fp32 (measured on the
    2-core CI machine, docs/benchmarks.md and docs/results/bf16-cpu.json)."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ValueError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU.")
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "cpu" and cpu_has_bf16_matmul():
        return "bf16"
    return "fp32"


def deepspeed_config(train: TrainConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    micro_batch = train.batch_size // world_size
    precision = resolve_precision(train.precision, device)
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # How many gathered parameters a worker keeps at once, and how soon a gathered parameter
        # due again is still released: DeepSpeed's 1e9 keeps any smaller model whole on every
        # worker once a step runs, which would undo the partition's memory saving.
        live = train.zero3_live_parameters
        zero |= {"stage3_max_live_parameters": live, "stage3_max_reuse_distance": live,
                 "stage3_prefetch_bucket_size": min(live // 2, 50_000_000), "reduce_bucket_size": min(live, 50_000_000)}
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
