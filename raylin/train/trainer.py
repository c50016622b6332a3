"""The Ray Train side of a run: a TorchTrainer whose workers run ``train_loop_per_worker``.

Distribution is configuration: ``train.num_workers`` workers (gloo on CPU, NCCL on GPU), a run
name and storage path under ``output_dir/ray`` (re-running with the same name resumes from the
latest checkpoint: Ray Train V2 semantics), ``FailureConfig(max_failures)`` to restart failed
workers from that checkpoint. Works on a laptop's local Ray and on a cluster alike; on a
multi-node cluster ``output_dir`` must be on storage every node can reach.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path

import pyarrow.fs
import ray
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors import safe_open

from raylin.atomic import write_text_atomic
from raylin.config import RunConfig
from raylin.data.task_data import prepare_task_data
from raylin.errors import ConfigError, RayClusterUnreachable
from raylin.log import LEVEL_ENV, QUIET_LIBRARIES
from raylin.progress import follow
from raylin.teacher import teacher_pool as make_pool
from raylin.tracking import TRACKING_ENV
from raylin.train.loop import train_loop_per_worker
from raylin.train.run_files import TRAIN_LOG

TEACHER_STATS = "teacher_service.json"  # the served teacher's counters (forwards, cache hits, bytes) and replicas' placement
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
    for name in ("HF_HUB_OFFLINE", "RAYLIN_CACHE", "HF_HOME", "RAYLIN_TEST_FAULT", LEVEL_ENV, *QUIET_LIBRARIES,
                 *TRACKING_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


RAY_PROBE_TIMEOUT_S = 3.0


def check_ray_address() -> str | None:
    """The address ``ray.init()`` will join (None: it starts a private local cluster). Fails in seconds when ``ray.init()`` would connect to a cluster that is gone, instead of its
    minutes of retries: the address in RAY_ADDRESS, or the one the last ``ray start --head`` on this
    machine recorded (``ray_current_cluster`` in RAY_TMPDIR, else /tmp/ray), which a head that
    crashed or was killed leaves behind. Ray Client (``ray://``) and job-server (``http://``)
    addresses are left to Ray, which reports those itself."""
    from_env = os.environ.get("RAY_ADDRESS", "").strip()
    if "://" in from_env:
        return from_env
    if from_env == "local":
        return None
    # Ray's own lookup of the last `ray start` (a private helper; its file layout is Ray's).
    address = from_env if from_env not in ("", "auto") else ray._private.services.find_bootstrap_address(None)
    if not address:
        return None  # nothing recorded: ray.init() starts a local cluster
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as error:
        where = ("RAY_ADDRESS" if from_env not in ("", "auto")
                 else f"{ray._common.utils.get_ray_address_file(None)}, left by the last `ray start --head` on this machine")
        raise RayClusterUnreachable(
            f"No Ray cluster answers at {address} (from {where}): {error}. Start that cluster again "
            f"(`ray start --head`), set RAY_ADDRESS to a running one, or set RAY_ADDRESS=local to let raylin "
            f"start its own."
        ) from None
    return address


def ensure_ray() -> None:
    """Connect to the Ray cluster (RAY_ADDRESS, or a running local one), or start a local one.
    Raises RayClusterUnreachable within seconds when the cluster it would join is gone."""
    if not ray.is_initialized():
        joins = check_ray_address()
        env_vars = _worker_env(False)
        if joins is None:
            # A private cluster on this machine is never preempted; Ray Train's preemption watcher
            # (for cloud nodes being drained) is force-killed at the end of every run, which logs an
            # actor-death error line on the console.
            env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        # Under `ray job submit` the job's own runtime_env (working_dir, pip, env_vars) applies;
        # Ray refuses a driver runtime_env that sets the same variables, so those are left to the job.
        job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
        if job_config:
            job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
            env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
        # The dashboard hosts the State API that Ray Train uses to clean up placement groups. Below
        # --verbose the workers' and Ray's own output stays in Ray's log files (RAY_TMPDIR/session_*/logs);
        # raylin's driver shows the progress from the run's files and any failure from Ray Train's result.
        verbose = os.environ.get(LEVEL_ENV) == "verbose"
        ray.init(runtime_env={"env_vars": env_vars}, dashboard_host="127.0.0.1", log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)


def fit(config: RunConfig, finetune: bool = False, teacher_pool=None, callbacks: list | None = None):
    """Run distillation for ``config`` and return Ray Train's Result (metrics, checkpoint).

    ``finetune=True`` is teacher fine-tuning (see raylin.config.teacher_run): the loop also
    writes plain transformers snapshots, the waypoints and target teacher of later runs.
    ``teacher_pool``: a TeacherPool shared with other runs (Tune trials); by default a served run
    gets its own pool, shut down when the run ends. ``callbacks``: Ray Train callbacks (Tune's
    TuneReportCallback inside a trial)."""
    ensure_ray()
    use_gpu = config.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= config.train.num_workers * config.train.gpus_per_worker
    check_precision(config, use_gpu)
    served = config.teacher_service.mode == "served" and config.schedule.uses_teacher and not finetune
    own_pool = served and teacher_pool is None
    check_resources(config, own_pool, use_gpu)  # before any replica starts: a refused run leaves none behind
    check_disk(config, finetune)
    prepare_task_data(config)  # token shards, before workers and replicas read them
    pool = (make_pool(config) if own_pool else teacher_pool) if served else None
    resources = worker_resources(config, use_gpu)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "finetune": finetune, "teacher_pool": pool},
        scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=600),
        run_config=RayRunConfig(
            name=config.run_name,
            storage_path=storage_path(config),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env(use_gpu)},
            callbacks=callbacks or [],
        ),
    )
    try:
        with follow("fine-tune" if finetune else "distil", config.train.max_steps, [Path(config.output_dir) / TRAIN_LOG]):
            return trainer.fit()
    finally:
        if own_pool:
            write_text_atomic(Path(config.output_dir) / TEACHER_STATS, json.dumps(pool.report(), indent=1))
            pool.shutdown()


def check_precision(config: RunConfig, use_gpu: bool) -> None:
    """Before any worker starts: fp16 needs GPUs (DeepSpeed's fp16 engine is CUDA-only). A config with
    train.use_gpu unset learns whether it has them only from the cluster, so this is checked here."""
    if config.train.precision == "fp16" and not use_gpu:
        raise ConfigError("train.precision fp16 needs GPUs and this cluster has none for the run's workers; "
                          "use bf16 or fp32 on CPU (or auto).")


def storage_path(config: RunConfig) -> str:
    """Ray Train's storage: train.storage_path (a folder or an s3:// / gs:// URI), else OUTPUT_DIR/ray."""
    if config.train.storage_path is None:
        return str((Path(config.output_dir) / "ray").resolve())
    if "://" in config.train.storage_path:
        return config.train.storage_path
    return str(Path(config.train.storage_path).expanduser().resolve())


def published_outputs(config: RunConfig) -> str | None:
    """Where publish_outputs copies a run's outputs: STORAGE_PATH/RUN_NAME/outputs, or None."""
    if config.train.storage_path is None:
        return None
    return f"{storage_path(config).rstrip('/')}/{config.run_name}/outputs"


def _storage_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else f"file://{uri}")


def delete_run_storage(config: RunConfig) -> None:
    """Delete STORAGE_PATH/RUN_NAME (the run's checkpoints and published outputs) when
    train.storage_path is set, local or remote; OUTPUT_DIR/ray goes with OUTPUT_DIR."""
    if config.train.storage_path is None:
        return
    filesystem, root = _storage_filesystem(f"{storage_path(config).rstrip('/')}/{config.run_name}")
    if filesystem.get_file_info(root).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(root)


def publish_outputs(config: RunConfig, names: list[str]) -> str | None:
    """Copy OUTPUT_DIR's ``names`` (files or folders) to STORAGE_PATH/RUN_NAME/outputs when
    train.storage_path is set, so results outlive the head node (``ray job submit`` drivers write
    OUTPUT_DIR on the head). Returns the destination, or None when there is no storage_path."""
    destination = published_outputs(config)
    if destination is None:
        return None

    filesystem, root = _storage_filesystem(destination)
    filesystem.create_dir(root, recursive=True)
    for name in names:
        source = Path(config.output_dir) / name
        if source.exists():
            target = f"{root}/{name}"
            if source.is_dir():
                filesystem.create_dir(target, recursive=True)
            pyarrow.fs.copy_files(str(source.resolve()), target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=filesystem)
    return destination


def worker_resources(config: RunConfig, use_gpu: bool) -> dict[str, float]:
    """What each Ray Train worker reserves."""
    resources = {"CPU": config.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = config.train.gpus_per_worker
    return resources


def teacher_replica_resources(config: RunConfig) -> dict[str, float]:
    """What the teacher replica on each node reserves (served teachers)."""
    return {"CPU": config.teacher_service.cpus, **({"GPU": config.teacher_service.gpus} if config.teacher_service.gpus else {})}


# A checkpoint holds fp32 weights and Adam's two moments (12 bytes a parameter; bf16 runs keep an
# fp32 master copy instead of fp32 weights) plus, at the end, the exported student (4 more).
CHECKPOINT_BYTES_PER_PARAMETER = 16


def checkpoint_disk_need(config: RunConfig, finetune: bool = False) -> tuple[int, int] | None:
    """(parameters, bytes) a run's checkpoints take at their peak on local storage, estimated from
    the teacher's safetensors headers (the student is the same size give or take its mixers), or
    None when that cannot be known cheaply (a Hub id not downloaded yet, .bin weights, remote
    storage). The peak is Ray Train's two kept checkpoints plus the one being reported plus its
    staging copy; teacher fine-tuning also keeps a plain snapshot (4 bytes a parameter) per checkpoint."""
    if config.train.storage_path is not None and "://" in config.train.storage_path:
        return None
    folder = Path(config.teacher_path("teacher"))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    parameters = 0
    for file in files:
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():
                shape = tensors.get_slice(name).get_shape()
                parameters += math.prod(shape)
    saves = _checkpoint_saves(config)
    size = parameters * CHECKPOINT_BYTES_PER_PARAMETER
    need = (min(saves, config.train.keep_checkpoints + 1) + 1) * size + (saves * parameters * 4 if finetune else 0)
    return parameters, need


def _checkpoint_saves(config: RunConfig) -> int:
    """Checkpoints a run writes: one every train.checkpoint_every steps, and always the last."""
    return -(-config.train.max_steps // max(1, config.train.checkpoint_every))


def check_disk(config: RunConfig, finetune: bool = False) -> None:
    """Fail before training when Ray Train's storage (OUTPUT_DIR/ray or train.storage_path) lacks the
    space the run's checkpoints will take: a full disk would otherwise stop the run at its first
    save, after the work. Checkpoints are written atomically, so an earlier one is never lost."""
    estimate = checkpoint_disk_need(config, finetune)
    if estimate is None:
        return
    parameters, need = estimate
    where = Path(storage_path(config))
    existing = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if need > free:
        raise RuntimeError(
            f"Not enough free disk for this run's checkpoints: {existing} has {free / 1e9:.1f} GB free and the run "
            f"needs about {need / 1e9:.1f} GB ({_checkpoint_saves(config)} checkpoint(s) of about "
            f"{parameters * CHECKPOINT_BYTES_PER_PARAMETER / 1e9:.1f} GB for {parameters / 1e6:.0f}M parameters: weights "
            "and Adam state, at most train.keep_checkpoints + 1 on disk at once plus one being staged). Free space there, point output_dir or "
            "train.storage_path at a larger disk, or set train.checkpoint_every >= train.max_steps (one checkpoint)."
        )


def check_resources(config: RunConfig, with_teacher_replica: bool, use_gpu: bool = False) -> None:
    """Fail fast when a single-node cluster cannot hold the workers (and the teacher replica):
    Ray would otherwise wait for resources forever. Not checked: multi-node clusters, and a lone
    head with no CPUs (an autoscaling cluster, as cluster/ defines them, before its workers start)."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    have = ray.cluster_resources()
    if len(alive) != 1 or have.get("CPU", 0) == 0:
        return
    workers = worker_resources(config, use_gpu)
    replica = teacher_replica_resources(config) if with_teacher_replica else {}
    for kind, knob in (("CPU", "cpus"), ("GPU", "gpus")):
        need = config.train.num_workers * workers.get(kind, 0) + replica.get(kind, 0)
        if need > have.get(kind, 0) + 1e-9:
            raise RuntimeError(
                f"This run needs {need:g} {kind}s ({config.train.num_workers} workers x train.{knob}_per_worker="
                f"{workers.get(kind, 0):g}" + (f" + teacher replica teacher_service.{knob}={replica.get(kind, 0):g}" if replica else "")
                + f") but the Ray cluster has {have.get(kind, 0):g}. Lower train.{knob}_per_worker (fractions are fine, "
                f"e.g. 0.5) or teacher_service.{knob}, use fewer train.num_workers, or set teacher_service.mode=inprocess."
            )