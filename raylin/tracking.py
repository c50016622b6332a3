"""Experiment tracking: a run's metrics in MLflow, Weights & Biases or TensorBoard.

``tracking: {backend: mlflow | wandb | tensorboard, experiment, uri, tags}`` in the config. Training
rank 0 opens the tracker through Ray's integrations (``ray.air.integrations.mlflow.setup_mlflow``,
``ray.air.integrations.wandb.setup_wandb``; TensorBoard through tensorboardX, which Ray Tune's own
TensorBoard logger writes with) and logs every train-log record at its step: losses, learning
rate, tokens, evaluation scores. The driver then adds the run's results (teacher and student
scores, retention, as in metrics.json) to the same tracked run.

The tracked run's id is kept in ``OUTPUT_DIR/tracking.json``: a worker group restarted from a
checkpoint, a resumed run and the driver's results all land in one tracked run. Each step is
tracked once: rank 0 sends the train log's records to the tracker when a checkpoint holding their
step is committed (``sync_tracker``), so the steps a lost attempt ran past its last checkpoint never
reach the tracked run, and the tracked run lags the train log by at most ``train.checkpoint_every``
steps. ``tracking.json`` also records the last step tracked, so records committed just before a
crash are sent when the run resumes.

| backend     | needs                         | where                                               |
|-------------|-------------------------------|-----------------------------------------------------|
| mlflow      | ``pip install mlflow-skinny``  | ``uri`` (an MLflow server, or a file store: default ``file://OUTPUT_DIR/mlruns``) |
| wandb       | ``pip install wandb``          | project ``experiment``; ``WANDB_MODE=offline`` works without a network |
| tensorboard | tensorboardX (with Ray Tune)   | ``uri``: a folder (default ``OUTPUT_DIR/tensorboard``) |

Tracking is best effort: a tracker that cannot be opened or written to (a server down, a network
gone) is a warning, and the run goes on without it; it never fails a training step or a finished
run. A run that fails ends its tracked run as FAILED; a restarted or resumed attempt opens it again.

Limits: MLflow's file store is in maintenance mode in MLflow 3; raylin opts in to it
(``MLFLOW_ALLOW_FILE_STORE``) only for ``file:`` URIs. Metric names are the train log's keys
(``loss``, ``eval_accuracy``, ...); results are ``result.<section>.<name>`` (``result.student.accuracy``);
params are the config's dotted keys as the tracked run's first attempt had them (MLflow's params
cannot change: a resume with a larger max_steps keeps the first value). A resume whose tracking
URI or experiment changed starts a new tracked run there. W&B tags are ``key:value``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from raylin.atomic import write_text_atomic
from raylin.fingerprint import dotted

log = logging.getLogger(__name__)

# Credentials and modes the trackers read from the environment: carried to the Ray workers.
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY")
TRACKING_FILE = "tracking.json"  # the tracked run's id, for restarts, resumes and the driver's results


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...
    def close(self, failed: bool = False) -> None: ...


@dataclass(frozen=True)
class Backend:
    """One tracking backend: the package it needs and how to open its run."""

    package: str  # importable module
    install: str  # what to pip install
    open: Any  # (tracking config, run config, output_dir) -> Tracker


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _remembered(output_dir: Path) -> dict:
    path = output_dir / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


TRACKED_THROUGH = "tracked_through"  # tracking.json: the last step whose record the tracked run holds


def _remember(output_dir: Path, **ids: str) -> None:
    """Record the tracked run this output folder logs to; reopening the same run keeps how far it was
    tracked (``sync_tracker``), a new one starts from nothing."""
    before = _remembered(output_dir)
    same = all(before.get(key) == value for key, value in ids.items())
    kept = {TRACKED_THROUGH: before[TRACKED_THROUGH]} if same and TRACKED_THROUGH in before else {}
    write_text_atomic(output_dir / TRACKING_FILE, json.dumps({**ids, **kept}, indent=1))


def sync_tracker(tracker: Tracker | None, output_dir: Path, records: list[dict], through: int) -> None:
    """Send ``tracker`` the train-log ``records`` of steps up to ``through`` (a committed checkpoint's
    step) that the tracked run does not hold yet, and remember how far it got. Rank 0 calls it when
    the run (re)starts and after each checkpoint; a step is never sent twice."""
    if tracker is None:
        return
    remembered = _remembered(output_dir)
    done = int(remembered.get(TRACKED_THROUGH, 0))
    for record in records:
        if done < record["step"] <= through:
            tracker.log(record["step"], record)
    if through > done:
        write_text_atomic(output_dir / TRACKING_FILE, json.dumps({**remembered, TRACKED_THROUGH: through}, indent=1))


# ----- MLflow -----------------------------------------------------------------------------------

def mlflow_uri(tracking, output_dir: Path) -> str:
    uri = tracking.uri or (output_dir / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module's limits
    return uri


class _MLflow:
    def __init__(self, tracking, config, output_dir: Path):
        uri = mlflow_uri(tracking, output_dir)
        remembered = _remembered(output_dir)
        # The run this output folder tracked before, when it is in the same store and experiment:
        # mlflow.start_run resumes the run MLFLOW_RUN_ID names. Its params stand (they cannot change).
        known = remembered.get("mlflow_run_id") if (remembered.get("tracking_uri"), remembered.get("experiment")) == (
            uri, tracking.experiment) else None
        if known:
            os.environ["MLFLOW_RUN_ID"] = known
        else:
            os.environ.pop("MLFLOW_RUN_ID", None)
        params = None if known else {k: str(v)[:500] for k, v in dotted(config.to_dict()).items()}
        # Ray's integration imports mlflow (a second, and ray.data with it) in every process that
        # imports it: only a tracked run's rank 0 loads it.
        setup_mlflow = importlib.import_module("ray.air.integrations.mlflow").setup_mlflow
        self.mlflow = setup_mlflow(config=params, tracking_uri=uri, experiment_name=tracking.experiment,
                                   run_name=config.run_name, create_experiment_if_not_exists=True,
                                   tags=dict(tracking.tags), rank_zero_only=False)
        run_id = self.mlflow.active_run().info.run_id
        _remember(output_dir, mlflow_run_id=run_id, tracking_uri=uri, experiment=tracking.experiment)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(metrics), step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


# ----- Weights & Biases -------------------------------------------------------------------------

class _Wandb:
    def __init__(self, tracking, config, output_dir: Path):
        remembered = _remembered(output_dir)
        run_id = remembered.get("wandb_run_id") or f"{config.run_name}-{os.urandom(4).hex()}"
        setup_wandb = importlib.import_module("ray.air.integrations.wandb").setup_wandb  # as mlflow's, in rank 0 only
        self.run = setup_wandb(config=config.to_dict(), project=tracking.experiment, name=config.run_name,
                               id=run_id, resume="allow", tags=[f"{k}:{v}" for k, v in tracking.tags.items()] or None,
                               dir=str(output_dir), rank_zero_only=False)
        _remember(output_dir, wandb_run_id=run_id)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ----- TensorBoard ------------------------------------------------------------------------------

def tensorboard_dir(tracking, output_dir: Path) -> Path:
    return Path(tracking.uri).expanduser().resolve() if tracking.uri else output_dir / "tensorboard"


class _TensorBoard:
    def __init__(self, tracking, config, output_dir: Path):
        self.writer = _summary_writer(str(tensorboard_dir(tracking, output_dir) / config.run_name))
        _remember(output_dir, tensorboard_dir=str(tensorboard_dir(tracking, output_dir) / config.run_name))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def _summary_writer(folder: str):
    module = importlib.import_module("tensorboardX")
    return module.SummaryWriter(logdir=folder)


BACKENDS: dict[str, Backend] = {
    "mlflow": Backend("mlflow", "mlflow-skinny", _MLflow),
    "wandb": Backend("wandb", "wandb", _Wandb),
    "tensorboard": Backend("tensorboardX", "tensorboardX", _TensorBoard),
}
TRACKING_BACKENDS = ("none", *BACKENDS)


def check_tracking(tracking) -> list[str]:
    """Problems with a ``tracking:`` section (unknown backend, library not installed), for the
    config's checks before anything starts."""
    if tracking.backend == "none":
        return []
    backend = BACKENDS.get(tracking.backend)
    if backend is None:
        return [f"tracking.backend {tracking.backend!r} is unknown; choose one of {TRACKING_BACKENDS}."]
    if importlib.util.find_spec(backend.package) is None:
        return [f"tracking.backend {tracking.backend!r} needs the {backend.package} package: pip install {backend.install} "
                "(on every node), or set tracking.backend: none."]
    return []


class _BestEffort:
    """A tracker whose failures are warnings: after the first, this attempt logs no more."""

    def __init__(self, backend: str, tracker: Tracker):
        self.backend, self.tracker = backend, tracker

    def _call(self, what: str, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, what)(*args)
        except Exception as error:  # a tracker's failure never fails the run (module doc)
            log.warning("tracking (%s): %s failed (%s: %s); this attempt goes on without tracking",
                        self.backend, what, type(error).__name__, error)
            self.tracker = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._call("log", step, metrics)

    def close(self, failed: bool = False) -> None:
        self._call("close", failed)
        self.tracker = None


def open_tracker(config, output_dir: Path) -> Tracker | None:
    """Rank 0's tracker for this run (None without one, or when it cannot be opened: a warning);
    resumes the run's tracked run if it has one. Its calls never raise."""
    backend = BACKENDS.get(config.tracking.backend)
    if backend is None:
        return None
    try:
        return _BestEffort(config.tracking.backend, backend.open(config.tracking, config, Path(output_dir)))
    except Exception as error:  # a tracker's failure never fails the run (module doc)
        log.warning("tracking (%s): could not open the tracked run (%s: %s); training goes on without tracking",
                    config.tracking.backend, type(error).__name__, error)
        return None


@contextmanager
def tracked_run(config, output_dir: Path) -> Iterator[Tracker | None]:
    """``open_tracker``'s tracker for a training attempt, closed at its end: FAILED when the attempt
    raises (a NaN stop, a failed step); a worker killed outright leaves it running until the
    restarted attempt reopens it."""
    tracker = open_tracker(config, output_dir)
    try:
        yield tracker
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is not None:
        tracker.close()


def log_results(config, metrics: dict[str, Any]) -> None:
    """Add a finished run's results (metrics.json) to its tracked run, from the driver; a failure is
    a warning (the run has finished and its results are in metrics.json)."""
    try:
        _log_results(config, metrics)
    except Exception as error:  # a tracker's failure never fails the run (module doc)
        log.warning("tracking (%s): could not add the results to the tracked run (%s: %s); they are in %s",
                    config.tracking.backend, type(error).__name__, error, Path(config.output_dir) / "metrics.json")


def _log_results(config, metrics: dict[str, Any]) -> None:
    output_dir = Path(config.output_dir)
    remembered = _remembered(output_dir)
    results = {f"result.{k}": v for k, v in dotted({k: v for k, v in metrics.items() if k != "published"}).items()}
    step = int(metrics.get("steps") or 0)
    if config.tracking.backend == "mlflow" and "mlflow_run_id" in remembered:
        client = importlib.import_module("mlflow").MlflowClient(remembered.get("tracking_uri") or mlflow_uri(config.tracking, output_dir))
        run_id = remembered["mlflow_run_id"]
        for key, value in _numbers(results).items():
            client.log_metric(run_id, key, value, step=step)
        client.log_artifact(run_id, str(output_dir / "metrics.json"))
        client.set_terminated(run_id)
    elif config.tracking.backend == "wandb" and "wandb_run_id" in remembered:
        run = importlib.import_module("ray.air.integrations.wandb").setup_wandb(project=config.tracking.experiment, id=remembered["wandb_run_id"], resume="allow",
                          dir=str(output_dir), rank_zero_only=False)
        run.summary.update(_numbers(results))
        run.finish()
    elif config.tracking.backend == "tensorboard" and "tensorboard_dir" in remembered:
        writer = _summary_writer(remembered["tensorboard_dir"])
        for key, value in _numbers(results).items():
            writer.add_scalar(key, value, global_step=step)
        writer.close()
