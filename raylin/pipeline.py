"""``raylin convert CONFIG.yaml``: transfer -> distill -> evaluate -> export, in one call.

The config is validated before Ray starts. Training runs on Ray Train workers (raylin.train);
the last checkpoint carries the HF-format student, which is copied to OUTPUT_DIR/student/. The
teacher (the target teacher when there is one, else the source model with its task head) is
scored on the same held-out split and evaluation sets (``eval_sets``: data training never showed,
raylin.data.eval_sets) in this process (once per teacher checkpoint and held-out set
when its head is trained: ``score_teacher``). Writes:

    OUTPUT_DIR/student/        the student folder (raylin.load_student)
    OUTPUT_DIR/metrics.json    {"teacher": {...}, "student": {...}, "retention": {set: {metric, teacher,
                               student, retention}}, "steps", "tokens", "wall_s"}
    OUTPUT_DIR/report.md       config, scores and the XATL transfer report
    OUTPUT_DIR/config.yaml     the validated config, as run

With ``train.storage_path`` set (s3://, gs:// or a shared folder) these are also copied to
STORAGE_PATH/RUN_NAME/outputs/, next to the run's Ray Train checkpoints. ``raylin eval`` re-scores
a finished run: OUTPUT_DIR/eval.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from raylin.assets import cache_dir
from raylin.atomic import replace_folder, write_text_atomic
from raylin.config import ConfigError, RunConfig, dump_config, recorded_config, teacher_run
from raylin.data.eval_sets import preload_eval_sets, resolve_eval_sets
from raylin.data.task_data import load_task_data
from raylin.task_model import load_task_model
from raylin.fingerprint import dotted, fingerprint
from raylin.models.student import load_student
from raylin.run_lock import LOCK_FILE, hold_output_dir
from raylin.scoring import retention_table, table_markdown
from raylin.teacher.activation_cache import teacher_fingerprint
from raylin.timing import measure
from raylin.tracking import log_results
from raylin.train.align import aligned_dir, run_align
from raylin.train.checkpoint import resume_identity
from raylin.train.evaluation import evaluate
from raylin.train.run_files import FINETUNED_DIR, SNAPSHOT_DIR, STUDENT_DIR
from raylin.train.trainer import check_disk, delete_run_storage, ensure_ray, fit, publish_outputs, published_outputs

log = logging.getLogger(__name__)


def check_eval_sets(config: RunConfig) -> None:
    """Read the run's evaluation sets before any work starts (raylin.data.eval_sets.preload); a set
    that cannot be read is bad input: ConfigError."""
    try:
        preload_eval_sets(config)
    except ValueError as error:
        raise ConfigError(f"eval_sets: {error}") from None


def changed_keys(recorded: RunConfig, config: RunConfig) -> list[str]:
    """The dotted keys where ``config`` is another run than the ``recorded`` one (what differs in
    their ``resume_identity``: max_steps and the like, and tracking, may change on resume)."""
    before, now = dotted(resume_identity(recorded)), dotted(resume_identity(config))
    missing = object()
    return sorted(k for k in before.keys() | now.keys() if before.get(k, missing) != now.get(k, missing))


def check_output_dir(config: RunConfig, overwrite: bool = False, say: bool = True) -> RunConfig | None:
    """Before any work starts, touching nothing: ``output_dir`` can be made, and holds no run of
    another config. Returns the run that ``prepare_output_dir`` is to delete (``overwrite``), if any.

    Without ``overwrite``, a folder whose config.yaml records another run (a finished one, or one
    with checkpoints to resume) is refused with the keys that differ; the same run, or one that
    differs only in what may change on resume, goes on (reused when finished, resumed from its
    checkpoint otherwise). With ``overwrite``, the run there, whatever its config, is to be deleted
    and this one started afresh; a folder that holds a git checkout, or the working directory or
    home or one of their parents, is never deleted. ``say``: warn of the deletion. Raises ConfigError."""
    out = Path(config.output_dir)
    if not out.is_dir():  # try making it, and leave no trace: a refused run touches nothing
        missing = [folder for folder in (out, *out.parents) if not folder.exists()]
        try:
            _make_output_dir(out)
        finally:
            for folder in missing:
                with contextlib.suppress(OSError):  # gone, or another run has begun in a shared parent
                    folder.rmdir()
    recorded_file = out / "config.yaml"
    if not recorded_file.is_file():
        return None
    try:
        recorded = recorded_config(yaml.safe_load(recorded_file.read_text()))
    except yaml.YAMLError:
        recorded = None
    changed = changed_keys(recorded, config) if recorded is not None else ["(unreadable config.yaml)"]
    finished = (out / "metrics.json").is_file()
    if not overwrite:
        if changed:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise ConfigError(
                f"output_dir {out} holds {'a finished run' if finished else 'a run'} of a different config (it "
                f"differs in {shown}). Choose another output_dir (--set output_dir=...), or pass --overwrite to "
                "delete that run and start this one.")
        return None
    protected = [Path.cwd().resolve(), Path.home().resolve()]
    if (out / ".git").exists() or any(folder.is_relative_to(out) for folder in protected):
        raise ConfigError(f"--overwrite would delete {out}, which holds a git checkout or the working or home folder; "
                          "choose an output_dir of its own for the run.")
    if say:
        log.warning("--overwrite: deleting the %s run in %s%s", "finished" if finished else "unfinished", out,
                    f" (its config differs in {', '.join(changed)})" if changed else " (the same config)")
    return recorded or config


def prepare_output_dir(config: RunConfig, replacing: RunConfig | None) -> None:
    """Make ``output_dir``, after deleting the run ``check_output_dir`` returned (``replacing``): the
    folder's contents (all but the run lock this run holds), and that run's checkpoints under its
    train.storage_path (local or remote)."""
    out = Path(config.output_dir)
    if replacing is not None:
        delete_run_storage(replacing)
        for entry in out.iterdir():
            if entry.name == LOCK_FILE:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    _make_output_dir(out)


def _make_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output_dir {out} cannot be created ({error.strerror}); choose a folder this user can write.") from None


@contextlib.contextmanager
def started_run(config: RunConfig, overwrite: bool, wait: bool = False) -> Iterator[dict | None]:
    """Start a run in OUTPUT_DIR and hold the folder while the body runs: refuse bad output folders
    before Ray, hold the folder (raylin.run_lock: another run in progress there is refused, or waited
    for with ``wait``), then start Ray and prepare the folder (config.yaml written). Yields the metrics
    of the same run finished there instead (touching nothing), else None."""
    out = Path(config.output_dir)
    check_output_dir(config, overwrite, say=False)  # refusals first, before Ray or the lock
    with hold_output_dir(out, wait):
        replacing = check_output_dir(config, overwrite)  # again: a run waited for may have changed the folder
        if replacing is None and (earlier := finished_run(config)) is not None:
            log.info("%s holds this run, finished: its results stand (--overwrite runs it again)", out)
            yield earlier
            return
        ensure_ray()  # before the output folder is touched: a cluster that is gone is refused here
        prepare_output_dir(config, replacing)
        write_text_atomic(out / "config.yaml", dump_config(config))
        yield None


def finished_run(config: RunConfig) -> dict | None:
    """The metrics of a run that already finished in ``config.output_dir`` as this config's run (the
    same ``resume_identity`` and max_steps as its config.yaml records), else None: callers reuse it
    instead of training again."""
    out = Path(config.output_dir)
    if not (out / "metrics.json").is_file() or not (out / "config.yaml").is_file():
        return None
    try:
        recorded = recorded_config(yaml.safe_load((out / "config.yaml").read_text()))
    except yaml.YAMLError:
        return None
    same = recorded is not None and not changed_keys(recorded, config) and recorded.train.max_steps == config.train.max_steps
    return json.loads((out / "metrics.json").read_text()) if same else None


def run_finetune(config: RunConfig, overwrite: bool = False, wait: bool = False) -> dict:
    """Fine-tune the teacher on the task; writes OUTPUT_DIR/teacher/ and OUTPUT_DIR/snapshots/step_N/.
    ``config`` may describe a conversion: its teacher's run is taken (raylin.config.teacher_run: the
    student's sections do not apply). ``overwrite``: replace a run of another config in OUTPUT_DIR
    (check_output_dir); ``wait``: wait for a run in progress there instead of refusing (started_run)."""
    config = teacher_run(config)
    with started_run(config, overwrite, wait) as earlier:
        return earlier if earlier is not None else _finetune(config)


def _finetune(config: RunConfig) -> dict:
    started = time.perf_counter()
    out = Path(config.output_dir)
    result = fit(config, finetune=True)
    if result.error is not None:
        raise result.error
    final = result.metrics or {}
    snapshots = sorted((out / SNAPSHOT_DIR).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    metrics = {
        "teacher": {k.removeprefix("eval_"): v for k, v in final.items() if k.startswith("eval_")},
        "steps": final.get("step"), "tokens": final.get("tokens"),
        "wall_s": round(time.perf_counter() - started, 1),
        "target_teacher": str(out / FINETUNED_DIR),
        "waypoints": [{"step": int(p.name.split("_")[1]), "path": str(p)} for p in snapshots],
    }
    if published_outputs(config):
        metrics["published"] = published_outputs(config)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    publish_outputs(config, [FINETUNED_DIR, SNAPSHOT_DIR, "metrics.json", "config.yaml"])
    log_results(config, metrics)
    return metrics


TEACHER_SCORES_DIR = "teacher_scores"  # under RAYLIN_CACHE


def score_teacher(config: RunConfig) -> dict[str, float]:
    """The teacher's held-out scores (the target teacher when there is one, else the source model).

    Scores of a teacher with a trained task head (a target teacher, or a causal LM) are remembered
    in RAYLIN_CACHE/teacher_scores/, keyed by the teacher's files (path, sizes, modification times),
    the task, the data settings and the evaluation batch, so a suite of runs against one teacher (a
    benchmark's guidance modes, Tune trials) scores it once. A source model whose head is new for
    the task is scored every time: its head is initialised afresh by each load."""
    teacher = config.target_teacher or config.teacher
    cached = None
    if config.target_teacher or config.task_kind.language_model:
        identity = {"teacher": teacher_fingerprint(teacher), "task": dataclasses.asdict(config.task),
                    "data": dataclasses.asdict(config.data), "eval_batch": config.train.batch_size,
                    "eval_sets": [dataclasses.asdict(entry) for entry in resolve_eval_sets(config)]}
        key = fingerprint(identity, 20)
        cached = cache_dir() / TEACHER_SCORES_DIR / f"{key}.json"
        if cached.is_file():
            return json.loads(cached.read_text())["scores"]
    model, processor = load_task_model(config, teacher)
    scores = evaluate(model, load_task_data(config, processor), config, torch.device("cpu"), 0, 1)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cached, json.dumps({"teacher": teacher, "identity": identity, "scores": scores}, indent=1))
    return scores


def run_conversion(config: RunConfig, overwrite: bool = False, wait: bool = False) -> dict:
    """Convert, align (when enabled), distil and evaluate; writes OUTPUT_DIR/student/, metrics.json and
    report.md. ``overwrite``: replace a run of another config in OUTPUT_DIR (check_output_dir);
    ``wait``: wait for a run in progress there instead of refusing (started_run)."""
    check_eval_sets(config)
    with started_run(config, overwrite, wait) as earlier:
        return earlier if earlier is not None else _convert(config)


def _convert(config: RunConfig) -> dict:
    started = time.perf_counter()
    out = Path(config.output_dir)
    aligned = None
    if config.align.enabled:
        check_disk(config)  # fit checks again, but the align stage comes first and takes minutes
        aligned = run_align(config)
    result = fit(config)
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        replace_folder(out / STUDENT_DIR,
                       lambda staging: shutil.copytree(Path(folder) / STUDENT_DIR, staging, dirs_exist_ok=True))
    final = result.metrics or {}
    teacher_scores = score_teacher(config)
    student_scores = {k.removeprefix("eval_"): v for k, v in final.items() if k.startswith("eval_")}
    metrics = {
        "teacher": teacher_scores,
        "student": student_scores,
        "retention": retention_table(config.task_kind, teacher_scores, student_scores),
        "steps": final.get("step"),
        "tokens": final.get("tokens"),
        "wall_s": round(time.perf_counter() - started, 1),
        "train_wall_s": final.get("wall_s"),
        "guidance": config.guidance.mode,
        "mixer": config.plan.mixer,
    }
    if published_outputs(config):
        metrics["published"] = published_outputs(config)
    if aligned is not None:
        metrics["align"] = {"steps": aligned["steps"], "workers": aligned["workers"], "layers": aligned["layers"],
                            "wall_s": aligned.get("wall_s"), "dir": str(aligned_dir(config))}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    write_text_atomic(out / "report.md", render_report(config, metrics))
    publish_outputs(config, [STUDENT_DIR, "metrics.json", "report.md", "config.yaml", "teacher_service.json"])
    log_results(config, metrics)
    return metrics


def render_report(config: RunConfig, metrics: dict) -> str:
    student = load_student(Path(config.output_dir) / STUDENT_DIR)
    params = sum(p.numel() for p in student.parameters())
    rows = "\n".join(
        f"| {name} | {metrics['teacher'].get(name, float('nan')):.4f} | {value:.4f} |"
        for name, value in metrics["student"].items()
    )
    return (
        f"# raylin run `{config.run_name}`\n\n"
        f"{config.teacher} -> {config.plan.mixer} student ({params:,} parameters), "
        f"guidance **{config.guidance.mode}**, {metrics['steps']} steps, {metrics['tokens']:,} tokens, "
        f"{metrics['wall_s']} s.\n\n| metric | teacher | student |\n|---|---:|---:|\n{rows}\n\n"
        f"## Retention (student / teacher; teacher / student for perplexity and error rates)\n\n"
        f"{table_markdown(metrics.get('retention', {}))}\n\n"
        f"Student folder: `{Path(config.output_dir) / STUDENT_DIR}`.\n\n## Config\n\n```yaml\n{dump_config(config)}```\n"
    )


def run_eval(config: RunConfig, student_dir: str | None = None, length: int | None = None) -> dict:
    """Score the teacher and a student folder (default OUTPUT_DIR/student) on the config's held-out
    sets (the held-out split and every evaluation set, with each set's retention), and time one forward
    of each on this process's CPU or GPU: at ``length`` tokens (default:
    the model's longest) for text, on one held-out clip for speech. Writes OUTPUT_DIR/eval.json.
    Limits: batch 1 for the timing."""
    folder = Path(student_dir) if student_dir else Path(config.output_dir) / STUDENT_DIR
    if not (folder / "config.json").is_file():
        raise ConfigError(f"No student folder at {folder} (no config.json there): run `raylin convert` first, "
                          "or pass --student with the folder a conversion wrote (OUTPUT_DIR/student).")
    check_eval_sets(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = load_student(folder).to(device)
    teacher, processor = load_task_model(config, config.target_teacher or config.teacher)
    teacher = teacher.to(device)
    data = load_task_data(config, processor)
    result: dict = {"student_dir": str(folder), "device": str(device)}
    for name, model in (("teacher", teacher), ("student", student)):
        result[name] = evaluate(model, data, config, device, 0, 1)
    result["retention"] = retention_table(config.task_kind, result["teacher"], result["student"])
    if student.family.modality == "text":
        positions = getattr(teacher.config, "max_position_embeddings", 512)
        length = min(length or positions, positions)
        inputs = {"input_ids": torch.randint(1000, processor.vocab_size, (1, length), device=device)}
    else:
        inputs = {k: v.to(device) for k, v in data.eval_batch("", [0]).items() if k != "labels"}
        length = next(iter(inputs.values())).shape[-1]
    forward: dict = {"length": length}
    for name, model in (("teacher", teacher), ("student", student)):
        latency, peak_mb = measure(lambda model=model: model(**inputs), repeats=3)
        forward[f"{name}_ms"], forward[f"{name}_peak_mb"] = round(latency * 1e3, 2), round(peak_mb, 1)
    result["forward"] = forward
    result["speedup"] = round(forward["teacher_ms"] / forward["student_ms"], 3)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=1))
    return result
