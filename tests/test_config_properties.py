"""Configs drawn from the schema's own types and ranges either fail validation (a ConfigError naming
the problem) or train a step without one: nothing the checks let through breaks later.

Hypothesis mutates one to four keys of a tiny CALD run (a two-layer BERT teacher pair, Rotten
Tomatoes) with values of each key's type, drawn around its limits and from its choices (and a
wrong one). A config that validates then runs one distillation step the way a training worker
does (raylin.train.setup, the worker's teachers and batch feed, a DeepSpeed engine, ``distill_step``),
in this process with a one-process gloo group. Left out of the draws, and why: paths (teachers,
folders: tests/test_bad_input.py), Ray's resources (num_workers, CPUs, GPUs: tests/test_train.py),
ZeRO offload (a minute-long op build on first use) and the align / broad stages (whole stages,
tested end to end in tests/test_train.py and tests/test_shipped_configs.py)."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from conftest import run_config_dict

from raylin.config import DATA_SIZES, FREEZE_UNTIL, PRECISIONS, SERVED_DTYPES, ConfigError, config_from_dict
from raylin.distill.guidance import MODES
from raylin.distill.losses import NORMALIZATIONS, REDUCTIONS
from raylin.models.mixers.linformer import SHARE_MODES
from raylin.models.plan import INIT_RULES, MIXERS
from raylin.train.trainer import check_precision

pytestmark = pytest.mark.assets


def whole(low: int, high: int):
    return st.integers(low, high)


def real(low: float, high: float):
    return st.one_of(st.sampled_from([low, 0.0, high]), st.floats(low, high, allow_nan=False))


def choice(options: tuple[str, ...]):
    return st.sampled_from([*options, "bogus"])


# dotted key -> values of its type, around its limits
DRAWS = {
    "task.num_labels": whole(-1, 4),
    "data.max_length": whole(-2, 160),
    "data.eval_fraction": real(-0.5, 1.5),
    "data.max_train_examples": st.one_of(st.none(), whole(-1, 48)),
    "data.max_eval_examples": st.one_of(st.none(), whole(-1, 24)),
    "data.size": choice(DATA_SIZES),
    "data.max_seconds": real(-1.0, 40.0),
    "guidance.mode": choice(MODES),
    "guidance.teacher_update_every": whole(-1, 3),
    "guidance.teacher_lr": real(-1e-3, 1e-2),
    "guidance.hybrid_cutoff": st.one_of(st.none(), whole(-1, 4)),
    "loss.alpha_task": real(-1.0, 3.0),
    "loss.alpha_layer": real(-1.0, 3.0),
    "loss.alpha_out": real(-1.0, 3.0),
    "loss.temperature": real(-1.0, 4.0),
    "loss.layers": st.one_of(st.none(), st.lists(whole(-1, 4), max_size=3)),
    "loss.normalization": choice(NORMALIZATIONS),
    "loss.reduction": choice(REDUCTIONS),
    "freeze.copied": st.booleans(),
    "freeze.until": choice(FREEZE_UNTIL),
    "train.zero_stage": whole(-1, 4),
    "train.precision": choice(PRECISIONS),
    "train.max_steps": whole(-1, 3),
    "train.batch_size": whole(-1, 8),
    "train.lr": real(-1e-3, 1e-2),
    "train.warmup_steps": whole(-1, 3),
    "train.weight_decay": real(-0.1, 0.5),
    "train.grad_clip": real(-1.0, 2.0),
    "train.checkpoint_every": whole(-1, 3),
    "train.eval_every": st.one_of(st.none(), whole(-1, 3)),
    "train.seed": whole(-1, 3),
    "train.max_failures": whole(-1, 2),
    "data.seed": whole(-1, 2),
    "freeze.lit.window": whole(-1, 3),
    "freeze.lit.threshold": real(-0.1, 0.5),
    "freeze.lit.patience": whole(-1, 2),
    "freeze.lit.warmup_steps": whole(-1, 2),
    "teacher_service.dtype": choice(SERVED_DTYPES),
    "teacher_service.weights_dtype": choice(SERVED_DTYPES),
    "plan.mixer": choice(MIXERS),
    "plan.keep_attention": st.lists(whole(-1, 3), max_size=2),
    "plan.init": choice(INIT_RULES),
    "plan.linformer.k": whole(-1, 64),
    "plan.linformer.share": choice(SHARE_MODES),
}


def _base(teachers, out) -> dict:
    return run_config_dict(teachers, out, **{"plan.linformer": {"k": 8}, "data.max_length": 32, "data.max_train_examples": 32,
                                             "data.max_eval_examples": 8, "train.max_steps": 2, "train.batch_size": 4,
                                             "train.checkpoint_every": 2, "teacher_service.mode": "inprocess"})


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


@pytest.fixture(scope="module")
def one_process_group():
    """A gloo group of one process, as DeepSpeed needs one to build an engine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in previous.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def one_step(config) -> dict[str, float]:
    """One distillation step of ``config`` as a training worker takes it (raylin.train.loop), world 1."""
    import deepspeed

    from raylin.teacher import open_teachers
    from raylin.train.batch import BatchFeed
    from raylin.train.deepspeed import deepspeed_config
    from raylin.train.loop import distill_step
    from raylin.train.setup import build_optimizer, build_run

    device = torch.device("cpu")
    ds_config = deepspeed_config(config.train, 1, device)
    run = build_run(config, device, ds_config)
    teachers = open_teachers(config, device, 0, 1)
    feed = BatchFeed.for_training(config, run.data, run.schedule, teachers, device, 0, 1)
    optimizer, scheduler, _ = build_optimizer(run.student, run.report, config)
    engine, *_ = deepspeed.initialize(model=run.student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    means, _ = distill_step(engine, feed.get(0), feed, config)
    return means


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.lists(st.sampled_from(sorted(DRAWS)), min_size=1, max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: DRAWS[key] for key in keys})))
def test_a_config_drawn_from_the_schema_is_refused_or_runs_a_step(changes, teachers, one_process_group, tmp_path):
    data = _base(teachers, tmp_path / "run")
    for key, value in changes.items():
        _set(data, key, value)
    try:
        config = config_from_dict(data)
    except ConfigError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)
        event("refused")
        return
    event("ran a step")
    try:
        check_precision(config, use_gpu=False)  # what the driver checks once it knows the cluster has no GPU
    except ConfigError:
        event("refused by the driver")
        return
    config = dataclasses.replace(config, teacher_service=dataclasses.replace(config.teacher_service, mode="inprocess"))
    means = one_step(config)
    assert set(means) >= {"loss"}
