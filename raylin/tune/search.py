"""``raylin tune CONFIG.yaml``: Ray Tune sweeps over any config field (guidance mode, loss weights, ...).

A run config plus a ``tune:`` section::

    tune:
      metric: eval_accuracy        # any metric the loop reports; eval_* need train.eval_every
      mode: max
      num_samples: 1               # repeats of the whole space (grid dimensions multiply)
      scheduler: asha              # asha | fifo
      grace_period: 1              # ASHA: reports before a trial may be stopped
      reduction_factor: 2
      max_concurrent_trials: null  # default: as many as the cluster's CPUs hold
      space:
        guidance.mode: {grid: [unguided, target, trajectory, waypoint, hybrid]}
        loss.alpha_layer: {loguniform: [0.1, 10]}
        train.lr: {choice: [1.0e-4, 3.0e-4]}
        plan.linformer.k: {randint: [16, 65]}

Dimensions: ``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint`` (Ray Tune's). Every
choice is validated against the base config before Ray starts, so a bad value fails at once.
``tune.layout`` searches which attention layers a hybrid keeps (raylin/tune/layout.py): the
layouts, measured from the teacher before the first trial, become a grid over
``plan.keep_attention``.

Each trial launches its own TorchTrainer (the Ray Train V2 pattern: the trial function is the
trainer's driver; TuneReportCallback forwards the workers' reports to Tune, so ASHA can stop weak
trials). Trials with fixed teachers share one TeacherPool (one replica per node, serving the union
of what any trial's losses need) and the activation cache, instead of each loading the teacher; a
trajectory trial gets its own stateful pool. An interrupted sweep resumes with ``--resume``
(``Tuner.restore``). Results: OUTPUT_DIR/tune/results.csv, results.md, curves.png and curves.json
(metric vs step per trial, from each trial's own train log, so an interruption loses nothing),
summary.json and best_config.yaml, which ``raylin convert`` accepts unchanged.

Limits: the search spaces are Ray Tune's basic variants (no conditional dimensions); trial
output folders live under OUTPUT_DIR/trials/, so on a multi-node cluster OUTPUT_DIR must be on
shared storage.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.tune
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from transformers import AutoConfig

from raylin.atomic import write_text_atomic
from raylin.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_section,
    config_from_dict,
    dump_config,
    read_yaml_file,
)
from raylin.data.task_data import prepare_task_data
from raylin.distill.guidance import GUIDANCE_MODES
from raylin.models.families import family_for_config
from raylin.models.teachers import resolve_teacher_path
from raylin.plots import figure
from raylin.run_lock import hold_output_dir
from raylin.tasks import metric
from raylin.teacher import teacher_pool, teacher_spec
from raylin.train.align import run_align
from raylin.train.run_files import read_train_log, reports_at
from raylin.train.trainer import ensure_ray, fit
from raylin.tune.layout import SEARCHED_KEY, LayoutSearch, check_layout_search, resolve_layouts, write_layout_results

DIMENSIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
TRIAL_DRIVER_MEMORY = 512 * 2**20


@dataclass
class TuneSection:
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    metric: str = "eval_accuracy"
    mode: str | None = None  # min | max; None: the metric's own direction (raylin.tasks.METRICS)
    num_samples: int = 1
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int | None = None
    seed: int = 0
    layout: LayoutSearch | None = None  # search the kept attention layers (raylin/tune/layout.py)


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> tuple[dict, TuneSection, RunConfig]:
    """Split CONFIG.yaml into the base run config (validated) and its ``tune:`` section (validated,
    every choice checked against the base config)."""
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"A config must be a mapping of keys to values (e.g. `teacher: asset:all-minilm-l6`), "
                          f"got {type(data).__name__}.")
    data = apply_overrides(data, overrides or [])
    if "tune" not in data:
        raise ConfigError(f"{path} has no `tune:` section; add one with a `space:` (see docs/tune.md).")
    section = build_section(TuneSection, data.pop("tune"), "tune.")
    base = config_from_dict(data)
    # Trials run in Ray Tune's trial folders, not here: pin relative paths to what they mean here.
    data = {**data, "teacher": base.teacher, "target_teacher": base.target_teacher, "output_dir": base.output_dir}
    if base.guidance.waypoints:
        data["guidance"] = {**data.get("guidance", {}), "waypoints": [dataclasses.asdict(w) for w in base.guidance.waypoints]}
    validate_section(section, data)
    if section.layout is not None:
        teacher_config = base.teacher_config("target_teacher" if base.target_teacher else "teacher")
        check_layout_search(section.layout, section.space, family_for_config(teacher_config).num_layers(teacher_config))
    return data, section, base


def validate_section(section: TuneSection, base: dict) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    need(bool(section.space) or section.layout is not None,
         "tune.space is empty: name at least one config field to search (or a tune.layout).")
    if section.mode is None:
        try:
            section.mode = metric(section.metric).mode
        except ValueError:
            need(False, f"tune.metric {section.metric!r} has no known direction; set tune.mode: min or max.")
    need(section.mode in ("min", "max"), f"tune.mode must be 'min' or 'max', got {section.mode!r}.")
    need(section.scheduler in SCHEDULERS, f"tune.scheduler must be one of {SCHEDULERS}, got {section.scheduler!r}.")
    need(section.num_samples >= 1 and section.grace_period >= 1 and section.reduction_factor >= 2,
         "tune.num_samples and tune.grace_period must be >= 1, tune.reduction_factor >= 2.")
    for key, spec in section.space.items():
        need(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DIMENSIONS,
             f"tune.space.{key} must be one of {{{', '.join(DIMENSIONS)}}}: VALUES, got {spec!r}.")
        kind, values = next(iter(spec.items()))
        need(isinstance(values, list) and values, f"tune.space.{key}.{kind} needs a list of values.")
        if kind in ("uniform", "loguniform", "randint"):
            need(len(values) == 2 and values[0] < values[1], f"tune.space.{key}.{kind} needs [low, high] with low < high.")
            need(kind != "loguniform" or values[0] > 0, f"tune.space.{key}.loguniform needs low > 0.")
        samples = values if kind in ("choice", "grid") else [values[0], values[1] - 1 if kind == "randint" else values[1]]
        for value in samples:  # each value must make a valid run on its own
            try:
                config_from_dict(base, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
            except ConfigError as error:
                raise ConfigError(f"tune.space.{key} value {value!r}: {error}") from None


def param_space(section: TuneSection) -> dict[str, Any]:
    space = {}
    for key, spec in section.space.items():
        kind, values = next(iter(spec.items()))
        space[key] = {"choice": lambda v: tune.choice(v), "grid": tune.grid_search,
                      "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                      "randint": lambda v: tune.randint(*v)}[kind](values)
    return space


def trial_config(base: dict, params: dict[str, Any], trial_name: str) -> RunConfig:
    """The run config of one trial: the base with the sampled fields set, in its own output folder."""
    data = copy.deepcopy(base)
    data["output_dir"] = str(Path(base["output_dir"]).expanduser().resolve() / TRIALS_DIR / trial_name)
    data["name"] = trial_name
    overrides = [f"{key}={json.dumps(_plain(value))}" for key, value in params.items()]
    return config_from_dict(data, overrides)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def shared_pool(config: RunConfig):
    """The pool every fixed-teacher trial uses: serves all hidden states and the logits, so trials
    with different loss weights still share one replica."""
    spec = dataclasses.replace(teacher_spec(config), hidden=True, layers=None, logits=True, fault=None)
    return teacher_pool(config, spec)


class TrialSlots:
    """A counting semaphore (a Ray actor) that holds trials to the sweep's concurrency.

    Tune's ``max_concurrent_trials`` only limits how many new trials it generates: a restored sweep
    starts every unfinished trial at once, and trials reserve no CPUs (their TorchTrainer's workers
    do), so they would wait on each other's resources forever. A slot is held by a trial's actor;
    slots of actors that died (a trial stopped by ASHA is killed) are taken back."""

    def __init__(self, slots: int):
        self.slots = slots
        self.holders: dict[str, Any] = {}  # trial id -> the trial's actor handle

    async def acquire(self, trial: str, holder) -> None:
        while trial not in self.holders and len(self.holders) >= self.slots:
            await self._forget_dead_holders()
            if len(self.holders) < self.slots:
                break
            await asyncio.sleep(2)
        self.holders[trial] = holder

    async def release(self, trial: str) -> None:
        self.holders.pop(trial, None)

    async def _forget_dead_holders(self) -> None:
        for trial, holder in list(self.holders.items()):
            try:
                await asyncio.wait_for(holder.__ray_ready__.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                self.holders.pop(trial, None)
            except asyncio.TimeoutError:
                pass  # busy, not dead


def run_trial(params: dict, base: dict, pools: dict, slots) -> None:
    """One Tune trial: the driver of its own TorchTrainer, once it holds a slot."""
    context = ray.tune.get_context()
    config = trial_config(base, params, context.get_trial_name())
    shared = pools.get("fixed")
    fixed_teacher = config.teacher_service.mode == "served" and config.schedule.kind.fixed_teacher
    # Trials with the sweep's fixed teacher share its pool; others (a swept target) get their own.
    pool = shared if fixed_teacher and shared is not None and shared.spec.target == config.target_teacher else None
    ray.get(slots.acquire.remote(context.get_trial_id(), ray.get_runtime_context().current_actor))
    try:
        if config.align.enabled:  # as `raylin convert` does; trials aligning alike share it through align.dir
            run_align(config)
        result = fit(config, teacher_pool=pool, callbacks=[TuneReportCallback()])
    finally:
        ray.get(slots.release.remote(context.get_trial_id()))
    if result.error is not None:
        raise result.error


def expected_trials(section: TuneSection) -> int:
    grids = [len(next(iter(spec.values()))) for spec in section.space.values() if "grid" in spec]
    return section.num_samples * math.prod(grids)


def searches_trajectory(base: RunConfig, section: TuneSection) -> bool:
    """Whether some trial trains its teacher alongside (trajectory guidance)."""
    spec = section.space.get("guidance.mode", {})
    modes = [base.guidance.mode, *next(iter(spec.values()), [])]
    return any(GUIDANCE_MODES[mode].trains_teacher for mode in modes if mode in GUIDANCE_MODES)


def concurrency(base: RunConfig, section: TuneSection) -> int:
    """Trials at once: what the cluster's CPUs hold next to the shared teacher replica, counting a
    trajectory trial's own replica. Raises ConfigError when not even one trial fits."""
    if section.max_concurrent_trials:
        return section.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 1)
    served = base.teacher_service.mode == "served"
    free = cpus - (base.teacher_service.cpus if served else 0)
    per_trial = base.train.num_workers * base.train.cpus_per_worker
    if served and searches_trajectory(base, section):
        per_trial += base.teacher_service.cpus  # a trajectory trial trains its own teacher replica
    if per_trial > free + 1e-9 and len([n for n in ray.nodes() if n["Alive"]]) == 1 and cpus > 0:
        raise ConfigError(
            f"One trial needs {per_trial:g} CPUs next to the shared teacher replica ({base.teacher_service.cpus:g}), "
            f"but the cluster has {cpus:g}: lower teacher_service.cpus or train.cpus_per_worker (fractions are fine)."
        )
    return max(1, math.floor(free / per_trial + 1e-9))


def run_sweep(path: str | Path, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Run (or resume) the sweep in ``path``; returns the best trial's summary. The sweep's output
    folder is held for the sweep (raylin.run_lock: a second sweep into it is refused)."""
    base_data, section, base = load_tune_config(path, overrides)
    out = Path(base.output_dir)
    if resume and not tune.Tuner.can_restore(str((out / TUNE_DIR / "sweep").resolve())):
        raise ConfigError(f"No sweep to resume under {(out / TUNE_DIR / 'sweep').resolve()}; run without --resume first.")
    with hold_output_dir(out):
        return _sweep(path, base_data, section, base, resume)


def _sweep(path: str | Path, base_data: dict, section: TuneSection, base: RunConfig, resume: bool) -> dict:
    ensure_ray()  # before the output folder is touched: a cluster that is gone is refused here
    out = Path(base.output_dir)
    (out / TUNE_DIR).mkdir(parents=True, exist_ok=True)
    base_data["output_dir"] = str(out)
    limit = concurrency(base, section)  # before the teacher replica starts: may refuse the sweep
    prepare_task_data(base)  # token shards once, before the replica and the trials read them
    if section.layout is not None:  # measured once, reused on --resume: the same layouts every time
        layouts = resolve_layouts(base, section.layout, section.seed, out / TUNE_DIR)
        section.space = {**section.space, SEARCHED_KEY: {"grid": [layout["layers"] for layout in layouts]}}
        validate_section(section, base_data)
    pool = shared_pool(base) if base.teacher_service.mode == "served" and base.target_teacher else None
    pools = {"fixed": pool} if pool else {}
    slots = ray.remote(TrialSlots).options(num_cpus=0).remote(limit)
    trainable = tune.with_parameters(run_trial, base=base_data, pools=pools, slots=slots)
    # A trial is only the driver of its TorchTrainer, whose workers hold the CPUs: it reserves memory, no CPU.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    storage = str((out / TUNE_DIR).resolve())
    name = "sweep"
    if resume:
        tuner = tune.Tuner.restore(os.path.join(storage, name), trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(grace_period=section.grace_period, reduction_factor=section.reduction_factor,
                                   max_t=10**6) if section.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(section),
            tune_config=tune.TuneConfig(metric=section.metric, mode=section.mode, num_samples=section.num_samples,
                                        scheduler=scheduler, max_concurrent_trials=limit),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
        )
    try:
        results = tuner.fit()
    finally:
        if pool is not None:
            # Counters add up over an interrupted sweep and its resumes (each has its own pool).
            stats_file = out / TUNE_DIR / "teacher_service.json"
            totals = json.loads(stats_file.read_text()) if resume and stats_file.is_file() else {}
            for key, value in pool.stats().items():
                # Counters add up; the cache's size is a state of the shared folder: the latest wins.
                totals[key] = value if key in ("cache_bytes", "cache_entries") else totals.get(key, 0) + value
            totals["replicas"] = pool.placement()  # this (last) part of the sweep's replicas: node and whom they served
            write_text_atomic(stats_file, json.dumps(totals, indent=1))
            pool.shutdown()
    # After Ctrl-C Tune returns normally; unfinished trials stay PENDING/RUNNING in its saved state,
    # and grid variants it had not generated yet are missing.
    statuses = [trial.status for trial in results._experiment_analysis.trials]
    unfinished = sum(status not in ("TERMINATED", "ERROR") for status in statuses)
    unfinished += max(0, expected_trials(section) - len(statuses))
    if unfinished:
        raise SweepInterrupted(f"The sweep stopped with {unfinished} unfinished trial(s); continue it with "
                               f"`raylin tune {path} --resume`.")
    return write_results(results, section, base_data, out / TUNE_DIR)


class SweepInterrupted(RuntimeError):
    """A sweep stopped before every trial finished (Ctrl-C, a lost driver): resume it."""


def write_results(results, section: TuneSection, base: dict, folder: Path) -> dict:
    """results.csv, results.md, curves.png, curves.json and best_config.yaml from a finished sweep.

    Each trial's history is read from its own train log at the steps the loop reported to Tune,
    not from Tune's per-trial results: Tune restarts a trial interrupted mid-run with empty results
    (our checkpoints are Ray Train's, not Tune's), so those would hold only what it reported after
    the resume, and nothing for a trial interrupted after its last checkpoint."""
    frame = results.get_dataframe()
    params = sorted(section.space)
    metric = section.metric
    rows = []
    # ResultGrid lists its results in the order of the analysis' trials.
    for trial, result in zip(results._experiment_analysis.trials, results, strict=True):
        name = str(trial)  # the trial's name, as run_trial gave it to trial_config
        # The trial's own config: a sweep may search train.max_steps, eval_every or checkpoint_every.
        run = trial_config(base, trial.config, name)
        log = read_train_log(run.output_dir)
        history = [[r["step"], r[metric]] for r in log if metric in r and reports_at(r["step"], run.train)]
        values = [value for _, value in history]
        best_value = (max(values) if section.mode == "max" else min(values)) if values else float("nan")
        steps = log[-1]["step"] if log else 0
        rows.append({"trial": name, **{p: _plain(trial.config.get(p)) for p in params}, metric: best_value,
                     "steps": steps, "stopped_early": steps < run.train.max_steps,
                     "error": str(result.error) if result.error else "", "history": history})
    ordered = sorted((r for r in rows if not math.isnan(r[section.metric])), key=lambda r: r[section.metric],
                     reverse=section.mode == "max")

    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial", *params, section.metric, "steps", "stopped_early", "error"])
        writer.writeheader()
        for row in ordered + [r for r in rows if r not in ordered]:
            writer.writerow({k: v for k, v in row.items() if k != "history"})
    header = f"| rank | trial | {' | '.join(params)} | {section.metric} | steps | stopped early |"
    lines = [header, "|" + "---|" * (len(params) + 5)]
    for rank, row in enumerate(ordered, 1):
        lines.append(f"| {rank} | {row['trial']} | " + " | ".join(str(row[p]) for p in params)
                     + f" | {row[section.metric]:.4f} | {row['steps']} | {'yes' if row['stopped_early'] else 'no'} |")
    write_text_atomic(folder / "results.md", "\n".join(lines) + "\n")
    _plot(rows, section, folder / "curves.png")
    write_text_atomic(folder / "curves.json", json.dumps({row["trial"]: row["history"] for row in rows}, indent=1))
    if not ordered:
        raise RuntimeError(f"No trial reported {section.metric!r}; see {folder}/sweep for the trials' errors.")
    best = ordered[0]
    best_config = trial_config(base, {p: best[p] for p in params}, "best")
    best_config = dataclasses.replace(best_config, output_dir=str(Path(base["output_dir"]).expanduser().resolve() / "best"),
                                      name=None)
    write_text_atomic(
        folder / "best_config.yaml",
        f"# Best trial of the sweep ({best['trial']}: {section.metric}={best[section.metric]:.4f}).\n"
        f"#   raylin convert {folder / 'best_config.yaml'}\n" + dump_config(best_config))
    frame.to_json(folder / "tune_dataframe.json")
    summary = {"best_trial": best["trial"], section.metric: best[section.metric], "params": {p: best[p] for p in params},
               "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows)}
    if section.layout is not None:
        teacher_config = AutoConfig.from_pretrained(resolve_teacher_path(base["target_teacher"] or base["teacher"]))
        summary["layouts"] = write_layout_results(rows, metric, section.mode, folder, teacher_config)
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=1))
    return summary


def _plot(rows, section: TuneSection, path: Path) -> None:
    with figure(path, size=(7, 4), dpi=120) as axes:
        ax = axes[0][0]
        for row in rows:
            if row["history"]:
                steps, values = zip(*row["history"])
                label = ", ".join(f"{p.split('.')[-1]}={row[p]}" for p in sorted(section.space))
                ax.plot(steps, values, marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(section.metric)
        ax.set_title("Sweep: metric vs step per trial")
        if rows:
            ax.legend(fontsize=7)
