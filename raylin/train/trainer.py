"""The Ray Train side of a run: a TorchTrainer whose workers run ``train_loop_per_worker``.

Distribution is configuration: ``train.num_workers`` workers (gloo on CPU, NCCL on GPU), a run
name and storage path under ``output_dir/ray`` (re-running with the same name resumes from the
latest checkpoint: Ray Train V2 semantics), ``FailureConfig(max_failures)`` to restart failed
workers from that checkpoint. Works on a laptop's local Ray and on a cluster alike; on a
multi-node cluster ``output_dir`` must be on storage every node can reach.
"""

from __future__ import annotations

import os
from pathlib import Path

from raylin.config import RunConfig
from raylin.train.loop import train_loop_per_worker

WORKER_ENV = {
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def _worker_env(use_gpu: bool) -> dict[str, str]:
    env = dict(WORKER_ENV)
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed JIT-compiles a few ops on first use; keep them in one cache across runs.
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "raylin" / "torch_extensions")
    )
    for name in ("HF_HUB_OFFLINE", "RAYLIN_CACHE", "HF_HOME", "RAYLIN_TEST_FAULT"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def fit(config: RunConfig, finetune: bool = False):
    """Run distillation for ``config`` and return Ray Train's Result (metrics, checkpoint).

    ``finetune=True`` is teacher fine-tuning (see raylin.pipeline.finetune_config): the loop also
    writes plain transformers snapshots, the waypoints and target teacher of later runs."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        # The dashboard hosts the State API that Ray Train uses to clean up placement groups.
        ray.init(runtime_env={"env_vars": _worker_env(False)}, dashboard_host="127.0.0.1")
    use_gpu = config.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= config.train.num_workers
    resources = {"CPU": config.train.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "finetune": finetune},
        scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=600),
        run_config=RayRunConfig(
            name=config.run_name,
            storage_path=str((Path(config.output_dir) / "ray").resolve()),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": _worker_env(use_gpu)},
        ),
    )
    return trainer.fit()
