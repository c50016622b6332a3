"""``raylin bench quality``: what conversion keeps of real models on real data, in three modalities.

Suites (all on shipped assets, no downloads):

* ``text``: all-MiniLM-L6 fine-tuned on Rotten Tomatoes and on IMDB (the target teachers; their
  snapshots are the waypoints), converted to Linformer and to bimamba2 under all five guidance
  modes; held-out accuracy.
* ``lm``: SmolLM2-135M -> Mamba2 in every layer, and a hybrid keeping two attention layers, on
  five Jane Austen novels; perplexity on the sixth (Persuasion), unguided vs target guidance (the
  target teacher is SmolLM2 itself: language modelling needs no task head).
* ``speech``: the Whisper tiny.en encoder fine-tuned on spoken digits synthesised by espeak-ng
  (the target teacher), converted to bimamba2, unguided vs target; accuracy on held-out espeak-ng
  accents and on the flite engine, which training never sees.
* ``hybrids``: SmolLM2-135M -> Gated DeltaNet and -> Mamba2 hybrids at the same attention share
  (blocks 9 and 19 kept), target guidance: perplexity, retention on fortunes and decoding state
  side by side (the Mamba2 run is the ``lm`` suite's hybrid/target run, reused when it exists).
* ``speed``: teacher vs student forward latency and memory at long lengths (raylin.bench.speed),
  and the decoding state a causal student keeps per generated token vs the teacher's KV cache.

Every run is a normal ``raylin finetune`` / ``raylin convert`` run under OUT/<suite>/<run>/ (a run
whose outputs exist with the same config is reused, so an interrupted benchmark continues).
Writes OUT/quality.json and, with ``docs``, DOCS/results.md and DOCS/results/*.png
(results-long.md and results-long/ for the long budget).

The grid (runs, shared settings, budgets) is grids/quality.yaml, package data. Budgets: ``hour`` (the default) runs the whole grid in about 75 minutes on 2 CPU cores
(76 min end to end, measured at commit c191ad9: text 42.6 min with its two teacher fine-tunings,
language modelling 19.1, speech 9.6, speed 4.1), so each student gets 16-30 steps. It was sized
for an hour; where the 76 minutes go: 12 alignments 23 min, the 26 students' training loops 31
(each loop's start-up and evaluations included), Ray Train's start and finish around those loops
12 (about 27 s a run), 3 teacher fine-tunings 5, speed 4. The align stage is what brought the text
students within a point of their teacher, and fewer steps would give back the points it won.
``long`` gives the students 2-3x the steps (2.7 hours before every student aligned, not
re-measured since); ``quick`` is a few-step smoke run of every pipeline (CI). ``--only`` splits a
budget into parts, and runs already finished are reused.
Every student starts from the align stage, computed once per data set and starting model and
shared through ``align.dir``.
Limits: short CPU budgets mean short training, so the gaps are those of tens of steps, not of the
paper's epochs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import DynamicCache

from raylin.atomic import write_text_atomic
from raylin.bench.speed import run_speed_benchmark, summarize
from raylin.config import config_from_dict, merge_sections
from raylin.convert import convert
from raylin.distill.guidance import MODES
from raylin.models.teachers import load_teacher
from raylin.pipeline import finished_run, run_conversion, run_finetune
from raylin.plots import figure
from raylin.scoring import HELD_OUT, retention_table
from raylin.tasks import METRICS, TASK_KINDS
from raylin.train.run_files import read_train_log
from raylin.train.trainer import ensure_ray

_log = logging.getLogger(__name__)

SUITES = ("text", "lm", "speech", "hybrids", "speed")
HYBRIDS = ("hybrid", "gdn_hybrid")  # the lm plans the hybrids suite sets side by side
_TASKS = {suite: TASK_KINDS[task] for suite, task in (("text", "sequence_classification"), ("lm", "causal_lm"),
                                                       ("speech", "utterance_classification"), ("hybrids", "causal_lm"))}
# The targets: largest acceptable in-distribution gap per suite (and mixer), and smallest retention on
# the evaluation sets training never sees. Accuracies are ratios of counts, so a gap of exactly one
# point (6 of 600) must not miss by float rounding (0.735 - 0.725 > 0.01 in binary).
_ROUNDING = 1e-9
TARGETS = {
    "text": ("accuracy within 1 point of the teacher (Linformer; 2 points for bimamba2)",
             lambda row: row["gap"] <= (0.02 if row["mixer"] == "bimamba2" else 0.01) + _ROUNDING),
    "speech": ("accuracy within 2 points of the teacher", lambda row: row["gap"] <= 0.02 + _ROUNDING),
    "lm": ("perplexity at most 1.5x the teacher's", lambda row: row["student_value"] <= 1.5 * row["teacher_value"] + _ROUNDING),
}
# Retention (raylin.scoring) on every out-of-distribution set of a run; for perplexity
# teacher / student, so 1.5x the teacher's perplexity is a retention of 2/3.
RETENTION_TARGETS = {"text": 0.97, "speech": 0.95, "lm": 1 / 1.5}

# The grid: runs, shared settings and budgets, in YAML (not a run config), shipped as package data
# (pyproject.toml's package-data) so an installed raylin runs the benchmark outside a checkout.
GRID_FOLDER = resources.files("raylin.bench") / "grids"
GRID_FILE = GRID_FOLDER / "quality.yaml"
NOTES_FILE = GRID_FOLDER / "quality-notes.md"  # the results pages' reading notes (a template)


def load_grid(path: str | Path | None = None) -> dict[str, Any]:
    """The benchmark's grid file (default GRID_FILE), with each budget's grid filled in from the
    full grid and each text size's ``max_length`` defaulting to the text section's."""
    grid = yaml.safe_load(GRID_FILE.read_text() if path is None else Path(path).read_text())
    text = grid["text"]
    full = {"text_data": list(text["data"]), "text_mixers": list(text["plans"]), "text_modes": list(MODES),
            "lm": [[plan, mode] for plan in grid["lm"]["plans"] for mode in ("unguided", "target")],
            "speech_modes": ["unguided", "target", "hybrid"]}
    grid["grids"] = {budget: full | (grid["grids"].get(budget) or {}) for budget in grid["sizes"]}
    for sizes in grid["sizes"].values():
        sizes["text"].setdefault("max_length", dict(text["data"]))
    return grid


GRID = load_grid()
_COMMON, TEXT, LM, SPEECH = GRID["common"], GRID["text"]["base"], GRID["lm"]["base"], GRID["speech"]["base"]
TEXT_DATA, TEXT_PLANS, LM_PLANS = GRID["text"]["data"], GRID["text"]["plans"], GRID["lm"]["plans"]
SIZES, GRIDS = GRID["sizes"], GRID["grids"]
BUDGETS = tuple(SIZES)
DEFAULT_OUT = {"quick": "outputs/bench-quality-quick", "hour": "outputs/bench-quality", "long": "outputs/bench-quality-long"}
PAGES = {"quick": "results.md", "hour": "results.md", "long": "results-long.md"}
COMMANDS = {"quick": "raylin bench quality --quick", "hour": "raylin bench quality", "long": "raylin bench quality --long"}
BUDGET_TITLES = {"quick": "quick smoke run", "hour": "the default budget, about 75 minutes on 2 cores",
                 "long": "the long budget, 2-3x the default's steps"}


def _sized(base: dict, steps: int, size: dict) -> dict:
    """``base`` trained for ``steps`` steps, evaluated ``size["evals"]`` times, on ``size``'s data caps."""
    extra: dict[str, Any] = {"train": {"max_steps": steps, "checkpoint_every": steps, "warmup_steps": max(1, steps // 10),
                                       "eval_every": max(1, steps // size["evals"])}}
    if "cap" in size:  # the quick smoke run
        extra["data"] = {"max_train_examples": size["cap"], "max_eval_examples": size["cap"] // 2}
        extra["train"]["batch_size"] = 8
    return merge_sections(base, extra)


def _aligned(run: dict, steps: int | None, store: Path) -> dict:
    """``run`` starting from ``steps`` align steps (none: as it is), shared through ``store`` (align.dir)."""
    return merge_sections(run, {"align": {"enabled": True, "steps": steps, "dir": str(store)}}) if steps else run


def _run(config_dict: dict, log: Callable[[str], None], finetune: bool = False) -> dict:
    """The metrics of the run ``config_dict`` describes (a teacher fine-tuning when ``finetune``): an
    earlier run with exactly this config is reused, so an interrupted benchmark continues."""
    config = config_from_dict(config_dict, run="teacher" if finetune else "conversion")
    cached = finished_run(config)
    if cached:
        log(f"  reusing {config.output_dir}")
        return cached
    log(f"  fine-tuning the teacher -> {config.output_dir}" if finetune
        else f"  {config.guidance.mode:10s} {config.plan.mixer} -> {config.output_dir}")
    return run_finetune(config) if finetune else run_conversion(config)


def _curve(out: Path, metric: str) -> list[tuple[int, float]]:
    """(step, held-out metric) points of a run's train log."""
    return [(record["step"], record[metric]) for record in read_train_log(out) if metric in record]


def _row(suite: str, data: str, mixer: str, metrics: dict, out: Path, metric: str, teacher_name: str) -> dict:
    teacher, student = metrics["teacher"][metric], metrics["student"][metric]
    gap = teacher - student if METRICS[metric].higher_is_better else student - teacher
    row = {"suite": suite, "data": data, "teacher_model": teacher_name, "mixer": mixer, "guidance": metrics["guidance"],
           "metric": metric, "teacher_value": teacher, "student_value": student, "gap": gap, "steps": metrics["steps"],
           "tokens": metrics["tokens"], "wall_s": metrics["wall_s"], "curve": _curve(out, f"eval_{metric}"),
           "output_dir": str(out)}
    if "align" in metrics:  # wall_s includes the alignment only for the run that computed it
        row["align"] = {"steps": metrics["align"]["steps"], "wall_s": metrics["align"].get("wall_s")}
    # Every evaluation set beyond the held-out split (IMDB for Rotten Tomatoes, flite and Festival for
    # speech, fortunes for Austen): teacher, student and retention.
    table = retention_table(_TASKS[suite], metrics["teacher"], metrics["student"])
    row["retention"] = {name: values for name, values in table.items() if name != HELD_OUT}
    return row


def text_suite(out: Path, budget: str, log, teachers: dict[str, float]) -> Iterator[dict]:
    """One row per student run, as each finishes; each teacher fine-tuning's wall time goes to ``teachers``."""
    size, grid = SIZES[budget]["text"], GRIDS[budget]
    steps = size["steps"]
    for data_name in grid["text_data"]:
        data = {"name": data_name, "max_length": size["max_length"][data_name]}
        base = _sized(merge_sections(merge_sections(_COMMON, TEXT), {"data": data}), steps, size)
        log(f"text / {data_name}")
        teacher_steps = size["teacher_steps"]
        teacher_run = merge_sections(_sized(base, teacher_steps, size), {
            "output_dir": str(out / "text" / data_name / "teacher"),
            "plan": TEXT_PLANS["linformer"], "train": {"lr": 5.0e-5, "checkpoint_every": max(1, teacher_steps // 4)}})
        finetuned = _run(teacher_run, log, finetune=True)
        teachers[f"text/{data_name}"] = finetuned["wall_s"]
        snapshots = finetuned["waypoints"][-min(4, steps):]  # one waypoint per student step at most
        waypoints = [{"step": max(1, (i + 1) * steps // len(snapshots)), "path": w["path"]} for i, w in enumerate(snapshots)]
        for mixer in grid["text_mixers"]:
            plan = TEXT_PLANS[mixer]
            for mode in grid["text_modes"]:
                run_dir = out / "text" / data_name / f"{mixer}-{mode}"
                run = merge_sections(base, {"output_dir": str(run_dir), "target_teacher": finetuned["target_teacher"], "plan": plan,
                                   "guidance": {"mode": mode, "waypoints": waypoints if mode == "waypoint" else [],
                                                "hybrid_cutoff": max(1, steps * 3 // 4) if mode == "hybrid" else None}})
                run = _aligned(run, (size["align_steps"] or {}).get(mixer), out / "text" / data_name / "aligned")
                yield _row("text", data_name, mixer, _run(run, log), run_dir, "accuracy", "all-MiniLM-L6")


def _lm_base(size: dict) -> dict:
    """The language-model runs' shared config at a budget's ``size`` (the lm and hybrids suites)."""
    return _sized(merge_sections(merge_sections(_COMMON, LM), {"data": {"max_length": size["max_length"]}}), size["steps"], size)


def lm_suite(out: Path, budget: str, log, teachers: dict[str, float]) -> Iterator[dict]:
    """The LM students (their target teacher is SmolLM2 itself: nothing to fine-tune)."""
    size = SIZES[budget]["lm"]
    base = _lm_base(size)
    log("lm / austen")
    for name, mode in GRIDS[budget]["lm"]:
        run_dir = out / "lm" / f"{name}-{mode}"
        run = merge_sections(base, {"output_dir": str(run_dir), "plan": LM_PLANS[name], "guidance": {"mode": mode}})
        metrics = _run(_aligned(run, size["align_steps"], out / "lm" / "aligned"), log)
        yield _row("lm", "austen", name, metrics, run_dir, "perplexity", "SmolLM2-135M")


def hybrids_suite(out: Path, budget: str, log, teachers: dict[str, float]) -> Iterator[dict]:
    """The Gated DeltaNet and Mamba2 hybrids at one attention share, target guidance, as the lm
    suite runs them (same folders: either suite reuses the other's runs), each with its decoding
    state after 256, 1,024 and 4,096 tokens of context."""
    size = SIZES[budget]["lm"]
    base = _lm_base(size)
    log("hybrids / austen")
    lengths = (16, 32) if budget == "quick" else (256, 1024, 4096)
    states = {record["model"]: record for record in decoding_state(lengths, plans={name: LM_PLANS[name] for name in HYBRIDS},
                                                                    log=log, key_by_length=True)}
    for name in HYBRIDS:
        run_dir = out / "lm" / f"{name}-target"
        run = merge_sections(base, {"output_dir": str(run_dir), "plan": LM_PLANS[name], "guidance": {"mode": "target"}})
        row = _row("hybrids", "austen", name, _run(_aligned(run, size["align_steps"], out / "lm" / "aligned"), log),
                   run_dir, "perplexity", "SmolLM2-135M")
        row["plan"] = LM_PLANS[name]
        row["decoding_state"] = states[f"{name} student"]["by_length"]
        yield row


def speech_suite(out: Path, budget: str, log, teachers: dict[str, float]) -> Iterator[dict]:
    size = SIZES[budget]["speech"]
    steps = size["steps"]
    base = _sized(merge_sections(_COMMON, SPEECH), steps, size)
    # The broad data feeds the align stage, which the smoke run leaves out.
    base = merge_sections(base, {"broad": {"enabled": bool(size["align_steps"]), "examples": size["broad_examples"]}})
    if "size" in size:
        base = merge_sections(base, {"data": {"size": size["size"]}})
    log("speech / spoken digits")
    teacher_run = merge_sections(_sized(base, size["teacher_steps"], size), {
        "output_dir": str(out / "speech" / "teacher"), "train": {"lr": 1.0e-4}})
    finetuned = _run(teacher_run, log, finetune=True)
    teachers["speech"] = finetuned["wall_s"]
    for mode in GRIDS[budget]["speech_modes"]:
        run_dir = out / "speech" / f"bimamba2-{mode}"
        run = merge_sections(base, {"output_dir": str(run_dir), "target_teacher": finetuned["target_teacher"],
                           "guidance": {"mode": mode, "hybrid_cutoff": max(1, steps * 3 // 4) if mode == "hybrid" else None}})
        run = _aligned(run, size["align_steps"], out / "speech" / "aligned")  # the smoke run skips it (tested on its own)
        yield _row("speech", "spoken_digits", "bimamba2", _run(run, log), run_dir, "accuracy", "Whisper tiny.en encoder")


@torch.no_grad()
def decoding_state(lengths: tuple[int, ...], plans: dict[str, dict] | None = None, log=_log.info,
                   key_by_length: bool = False) -> list[dict]:
    """Bytes of decoding state after a prompt of each length: SmolLM2's KV cache vs the students'
    (each of ``plans``, default every lm plan, freshly converted: state size does not depend on the
    weights). ``key_by_length``: one record per model with its ``by_length`` {tokens: bytes}."""
    teacher, _ = load_teacher("asset:smollm2-135m", model_class="AutoModelForCausalLM")
    students = {name: convert(teacher, plan)[0] for name, plan in (plans or LM_PLANS).items()}
    records = []
    for length in lengths:
        ids = torch.randint(100, 40_000, (1, length))
        cache = DynamicCache(config=teacher.config)
        teacher(input_ids=ids, past_key_values=cache, use_cache=True)
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        records.append({"model": "teacher (KV cache)", "length": length, "state_bytes": kv})
        for name, student in students.items():
            state = student.new_cache()
            student(input_ids=ids, past_key_values=state)
            records.append({"model": f"{name} student", "length": length, "state_bytes": state.state_bytes()})
        log(f"  decoding state at {length} tokens: " + ", ".join(
            f"{r['model']} {r['state_bytes'] / 2**20:.1f} MiB" for r in records if r["length"] == length))
    if key_by_length:
        models = dict.fromkeys(r["model"] for r in records)
        return [{"model": m, "by_length": {r["length"]: r["state_bytes"] for r in records if r["model"] == m}} for m in models]
    return records


def speed_suite(out: Path, budget: str, log) -> dict:
    quick = budget == "quick"
    lengths = (128, 256) if quick else (512, 1024, 2048, 4096, 8192)
    log("speed")
    records = run_speed_benchmark(out / "speed", lengths=lengths, repeats=1 if quick else 2, inputs=("unpadded",), log=log)
    state = decoding_state((16, 32) if quick else (256, 1024, 4096), log=log)
    return {"forward": summarize(records), "lengths": list(lengths), "decoding_state": state,
            "plot": str(out / "speed" / "speed.png")}


def run_quality_benchmark(out: str | Path | None = None, budget: str = "hour",
                          suites: tuple[str, ...] = SUITES, docs: str | Path | None = None,
                          log: Callable[[str], None] = _log.info) -> dict:
    """Run the suites at ``budget`` (quick | hour | long), write OUT/quality.json (OUT defaults to
    DEFAULT_OUT[budget]) and, when ``docs``, DOCS/results.md (results-long.md for ``long``) + plots."""
    if budget not in BUDGETS:
        raise ValueError(f"Unknown benchmark budget {budget!r}; choose from {BUDGETS}.")
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"Unknown benchmark suite(s) {sorted(unknown)}; choose from {SUITES}.")
    out = Path(out or DEFAULT_OUT[budget])
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "quality.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if result.get("budget") != budget:
        result = {}
    result["budget"] = budget
    result.setdefault("machines", {})
    for suite in suites:  # each suite's machine and commit: parts of a page may come from different runs
        result["machines"][suite] = _machine()
    if any(s in suites for s in ("text", "lm", "speech")) or "machine" not in result:
        result["machine"] = _machine()
    if any(s in suites for s in ("text", "lm", "speech", "hybrids")):
        ensure_ray()
    for suite in suites:
        started = time.perf_counter()
        if suite == "speed":
            result[suite] = speed_suite(out, budget, log)
        else:  # rows are saved as each run finishes: an interrupted suite keeps what it measured
            result[suite] = []
            teachers = result.setdefault("teacher_wall_s", {})
            suite_runs = {"text": text_suite, "lm": lm_suite, "speech": speech_suite, "hybrids": hybrids_suite}
            for row in suite_runs[suite](out, budget, log, teachers):
                result[suite].append(row)
                write_text_atomic(result_file, json.dumps(result, indent=1))
        result.setdefault("wall_s", {})[suite] = round(time.perf_counter() - started, 1)
        write_text_atomic(result_file, json.dumps(result, indent=1))
    if docs is not None:
        write_results_page(result, Path(docs))
    return result


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "commit": _commit()}


def _commit() -> str | None:
    """The raylin commit that measured the results, "-dirty" when the checkout had uncommitted
    changes outside docs/ (the pages and plots a benchmark writes itself do not count), so a page
    that outlives a change of configuration says which one it shows. None when raylin is not
    running from its own git checkout (an installed package inside some other repository must not
    report that repository's commit)."""
    here = Path(__file__).resolve()
    git = ["git", "-C", str(here.parent)]
    try:
        top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode or Path(top.stdout.strip(), "raylin", "bench", here.name).resolve() != here:
            return None
        head = subprocess.run(git + ["rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                        ":(top,exclude)docs"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = head.stdout.strip()
    return (commit + ("-dirty" if changes.stdout.strip() else "")) if commit else None


# ----- the results page ---------------------------------------------------------------------------


def _reading_notes(budget: str) -> str:
    """What every results page says about its budget, whatever the numbers (targets are checked per
    run): grids/quality-notes.md, its fields filled from the grid."""
    if budget == "quick":
        return "## Reading these numbers\n\nA smoke run of every pipeline: two steps per run on a few dozen examples.\n"
    text, lm, speech = (SIZES[budget][suite] for suite in ("text", "lm", "speech"))
    other = {"hour": "long", "long": "hour"}[budget]
    template = NOTES_FILE.read_text().split("-->\n", 1)[1]
    return template.format(
        text_steps=text["steps"], text_imdb_length=text["max_length"]["imdb"], lm_steps=lm["steps"],
        lm_length=lm["max_length"], speech_steps=speech["steps"], other=other, other_page=PAGES[other],
        other_command=COMMANDS[other], other_steps="2-3x more" if budget == "hour" else "fewer",
        lm_eval=LM["data"]["max_eval_examples"], speech_broad=f"{speech['broad_examples']:,}",
        text_align=", ".join(f"{mixer} {steps}" for mixer, steps in text["align_steps"].items()),
        lm_align_steps=lm["align_steps"], speech_align_steps=speech["align_steps"])


def _broad_lines(figures: Path) -> list[str]:
    """The broad-data stage's speech experiment (docs/results/broad-speech.json, committed with the
    page): what each variant kept in distribution and on the unseen synthesisers."""
    file = figures / "broad-speech.json"
    if not file.is_file():
        return []
    experiment = json.loads(file.read_text())
    lines = ["### What the broad-data stage bought (speech)", "", experiment["what"] + ":", "",
             "| setup | held-out | flite | Festival | wall s |", "|---|---:|---:|---:|---:|"]
    for run in experiment["runs"].values():
        kept = run["retention"]
        lines.append(f"| {run['setup']} | " + " | ".join(f"{kept[name]['student']:.3f} ({kept[name]['retention']:.2f})"
                                                        for name in ("held_out", "flite", "festival"))
                     + f" | {run['wall_s']:.0f} |")
    return lines + ["", "Student accuracy (retention). The last setup ships in the benchmark and in "
                        "raylin/configs/whisper-tiny-digits-bimamba2.yaml.", ""]


def write_results_page(result: dict, docs: Path) -> Path:
    """DOCS/results.md: every run's teacher, student and gap, its retention on the evaluation sets,
    the targets met or missed, and plots; the numbers behind it go to DOCS/results/quality.json."""
    budget = result.get("budget", "hour")
    figures = docs / PAGES[budget].removesuffix(".md")  # results/ or results-long/
    figures.mkdir(parents=True, exist_ok=True)
    lines = ["# Results" + (" (long budget)" if budget == "long" else ""), "", f"Generated by `{COMMANDS[budget]}` "
             f"({BUDGET_TITLES[budget]}) on {result['machine']['date']}: "
             f"{result['machine']['cpus']} CPU cores, torch {result['machine']['torch']}, "
             f"CUDA {'yes' if result['machine']['cuda'] else 'no'}"
             + (f", raylin commit {result['machine']['commit']}" if result["machine"].get("commit") else "")
             + f". {_time_line(result)}", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    for suite, title in (("text", "Text classification"), ("lm", "Language modelling (perplexity, lower is better)"),
                         ("speech", "Speech: spoken digits")):
        rows = result.get(suite)
        if not rows:
            continue
        lines += [f"## {title}", "", "| data | student | guidance | teacher | student | gap | steps | tokens | wall s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            fmt = (lambda v: f"{v:.4f}") if row["metric"] == "accuracy" else (lambda v: f"{v:.2f}")
            gap = f"{100 * row['gap']:+.1f} pt" if row["metric"] == "accuracy" else f"{100 * row['gap'] / row['teacher_value']:+.1f} %"
            aligned = f" (align {row['align']['steps']})" if row.get("align") else ""
            lines.append(f"| {row['data']} | {row['teacher_model']} -> {row['mixer']}{aligned} | {row['guidance']} | "
                         f"{fmt(row['teacher_value'])} | {fmt(row['student_value'])} | {gap} | {row['steps']} | "
                         f"{row['tokens']:,} | {row['wall_s']:.0f} |")
        lines += ["", _target_line(suite, rows), _guided_line(rows), ""]
        lines += _retention_lines(suite, rows)
        if any(row["curve"] for row in rows):
            name = f"curves-{suite}.png"
            plot_curves(rows, figures / name)
            lines += [f"![{suite} training curves]({figures.name}/{name})", ""]
    lines += _hybrid_lines(result)
    speed = result.get("speed")
    if speed:
        shutil.copy(speed["plot"], figures / "speed.png")
        plot_decoding_state(speed["decoding_state"], figures / "decoding-state.png")
        longest = max(speed["lengths"])
        lines += ["## Speed and memory", "", f"Whole-model forward at {longest} tokens (batch 1, fp32, CPU):", "",
                  "| family / student | speed-up | memory ratio | faster from (tokens) |", "|---|---:|---:|---:|"]
        for key, entry in speed["forward"].items():
            model = entry["model"]
            lines.append(f"| {key} | {model[f'speedup_at_{longest}']:.2f}x | {model[f'memory_ratio_at_{longest}']:.2f}x | "
                         f"{model['faster_from'] or 'never'} |")
        lines += ["", f"![speed and memory vs length]({figures.name}/speed.png)", "",
                  "Decoding state of the causal students (SmolLM2-135M, fp32) after a prompt:", "",
                  "| model | " + " | ".join(f"{L} tokens" for L in sorted({r['length'] for r in speed['decoding_state']})) + " | per token |",
                  "|---|" + "---:|" * (len({r['length'] for r in speed['decoding_state']}) + 1)]
        for model in dict.fromkeys(r["model"] for r in speed["decoding_state"]):
            points = sorted((r["length"], r["state_bytes"]) for r in speed["decoding_state"] if r["model"] == model)
            per_token = (points[-1][1] - points[0][1]) / max(points[-1][0] - points[0][0], 1)
            lines.append(f"| {model} | " + " | ".join(f"{b / 2**20:.2f} MiB" for _, b in points) + f" | {per_token / 1024:.1f} KiB |")
        lines += ["", f"![decoding state vs context]({figures.name}/decoding-state.png)", ""]
    lines += _broad_lines(figures) if budget != "quick" else []
    lines += [_reading_notes(budget)]
    page = docs / PAGES[budget]
    page.write_text("\n".join(lines) + "\n")
    write_text_atomic(figures / "quality.json", json.dumps(result, indent=1))
    return page


def _hybrid_lines(result: dict) -> list[str]:
    """The hybrids suite's section: the Gated DeltaNet and Mamba2 hybrids side by side."""
    rows = result.get("hybrids")
    if not rows:
        return []
    machine = result.get("machines", {}).get("hybrids", result["machine"])
    lengths = sorted({int(L) for row in rows for L in row["decoding_state"]})
    lines = ["## Gated DeltaNet vs Mamba2 hybrids (SmolLM2-135M, attention kept in the same blocks)", "",
             f"Target guidance, the language-modelling budget above (align {rows[0]['align']['steps'] if rows[0].get('align') else 0} "
             f"steps, {rows[0]['steps']} steps of 8 x {SIZES[result['budget']]['lm']['max_length']} tokens); measured "
             f"{machine['date']}, {machine['cpus']} CPU cores, raylin commit {machine.get('commit')}. Decoding state: fp32, "
             "after a prompt of each length (the two kept attention layers' keys and values grow; the mixers' state does not).", "",
             "| student | kept attention | Persuasion ppl (teacher) | gap | fortunes ppl (teacher) | retention | "
             + " | ".join(f"state at {L:,}" for L in lengths) + " | per token | wall s |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(lengths) + "---:|---:|"]
    for row in rows:
        fortunes = row["retention"].get("fortunes", {})
        state = {int(L): b for L, b in row["decoding_state"].items()}
        per_token = (state[lengths[-1]] - state[lengths[0]]) / max(lengths[-1] - lengths[0], 1)
        mixer = row["plan"]["mixer"].replace("gated_deltanet", "Gated DeltaNet").replace("mamba2", "Mamba2")
        align = row.get("align", {}).get("wall_s") or 0
        lines.append(f"| SmolLM2-135M -> {mixer} hybrid | {row['plan'].get('keep_attention')} | {row['student_value']:.2f} "
                     f"({row['teacher_value']:.2f}) | {100 * row['gap'] / row['teacher_value']:+.1f} % | "
                     f"{fortunes.get('student', float('nan')):.2f} ({fortunes.get('teacher', float('nan')):.2f}) | "
                     f"{fortunes.get('retention', float('nan')):.3f} | "
                     + " | ".join(f"{state[L] / 2**20:.2f} MiB" for L in lengths)
                     + f" | {per_token / 1024:.1f} KiB | {row['wall_s'] + align:.0f} |")
    return lines + ["", "Wall time includes the run's alignment when the run computed it.", ""]


def _time_line(result: dict) -> str:
    """What the benchmark costs from scratch: each run's own wall time (alignments included in the
    first run that computed them), each teacher fine-tuning and the speed suite. A benchmark resumed
    with ``--only`` reuses finished runs, so the last invocation's wall time says little."""
    parts = [f"{suite} {sum(row['wall_s'] for row in result[suite]) / 60:.1f} min ({len(result[suite])} runs)"
             for suite in ("text", "lm", "speech") if result.get(suite)]
    teachers = result.get("teacher_wall_s", {})
    if teachers:
        parts.append(f"teacher fine-tuning {sum(teachers.values()) / 60:.1f} min ({len(teachers)} teachers)")
    speed = result.get("wall_s", {}).get("speed") if result.get("speed") else None
    if speed is not None:
        parts.append(f"speed {speed / 60:.1f} min")
    total = sum(sum(row["wall_s"] for row in result.get(suite) or []) for suite in ("text", "lm", "speech"))
    total += sum(teachers.values()) + (speed or 0)
    return f"Time from scratch, summing each run's own wall time: {total / 60:.0f} min ({', '.join(parts)})."


def _target_line(suite: str, rows: list[dict]) -> str:
    description, met = TARGETS[suite]
    guided = [row for row in rows if row["guidance"] != "unguided"]
    if not guided:
        return f"Target ({description}): no guided run."
    hits = [row for row in guided if met(row)]
    best = min(guided, key=lambda r: r["gap"] if r["metric"] == "accuracy" else r["gap"] / r["teacher_value"])
    status = "met" if hits else "**missed**"
    return (f"Target ({description}): {status}, met by {len(hits)} of {len(guided)} guided runs; best {best['mixer']} / "
            f"{best['guidance']} on {best['data']}.")


def _retention_lines(suite: str, rows: list[dict]) -> list[str]:
    """The suite's retention table: every run on every evaluation set training never saw, and the
    retention target met or missed (by the guided runs, like the gap target)."""
    rows = [row for row in rows if row.get("retention")]
    if not rows:
        return []
    threshold = RETENTION_TARGETS[suite]
    fmt = (lambda v: f"{v:.4f}") if rows[0]["metric"] == "accuracy" else (lambda v: f"{v:.2f}")
    lines = [f"Retention on data training never showed (student / teacher{'; teacher / student for perplexity' if suite == 'lm' else ''}):",
             "", "| data | student | guidance | evaluation set | teacher | student | retention |", "|---|---|---|---|---:|---:|---:|"]
    for row in rows:
        for name, values in row["retention"].items():
            lines.append(f"| {row['data']} | {row['teacher_model']} -> {row['mixer']} | {row['guidance']} | {name} | "
                         f"{fmt(values['teacher'])} | {fmt(values['student'])} | {values['retention']:.3f} |")
    guided = [row for row in rows if row["guidance"] != "unguided"]
    hits = [row for row in guided if all(v["retention"] >= threshold - _ROUNDING for v in row["retention"].values())]
    worst = min((v["retention"], name, row) for row in guided for name, v in row["retention"].items()) if guided else None
    status = "met" if hits else "**missed**"
    line = f"Target (retention >= {threshold:.2f} on every out-of-distribution set): {status}, met by {len(hits)} of {len(guided)} guided runs"
    if hits:
        best = max(hits, key=lambda r: min(v["retention"] for v in r["retention"].values()))
        line += f"; best {best['mixer']} / {best['guidance']} on {best['data']}"
    if worst:
        line += f"; lowest {worst[0]:.3f} ({worst[2]['mixer']} / {worst[2]['guidance']} on {worst[1]})"
    return lines + ["", line + ".", ""]


def _guided_line(rows: list[dict]) -> str:
    better = lambda a, b: a["student_value"] > b["student_value"] if METRICS[a["metric"]].higher_is_better else a["student_value"] < b["student_value"]
    verdicts = []
    for key in dict.fromkeys((r["data"], r["mixer"]) for r in rows):
        group = [r for r in rows if (r["data"], r["mixer"]) == key]
        unguided = next((r for r in group if r["guidance"] == "unguided"), None)
        if unguided is None:
            continue
        ahead = [r["guidance"] for r in group if r["guidance"] != "unguided" and better(r, unguided)]
        behind = [r["guidance"] for r in group if r["guidance"] != "unguided" and not better(r, unguided)]
        verdicts.append(f"{key[0]} / {key[1]}: ahead of unguided: {', '.join(ahead) or 'none'}"
                        + (f"; not ahead: {', '.join(behind)}" if behind else ""))
    return "Guided vs unguided: " + "; ".join(verdicts) + "."


def plot_curves(rows: list[dict], path: Path) -> None:
    """Held-out metric vs step, one panel per (data, student), one line per guidance mode."""
    panels = list(dict.fromkeys((r["data"], r["mixer"]) for r in rows))
    with figure(path, cols=len(panels), size=(5, 3.8)) as axes:
        for ax, key in zip(axes[0], panels):
            for row in (r for r in rows if (r["data"], r["mixer"]) == key):
                if row["curve"]:
                    ax.plot(*zip(*row["curve"]), marker="o", label=row["guidance"])
            teacher = next(r["teacher_value"] for r in rows if (r["data"], r["mixer"]) == key)
            ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
            ax.set_title(f"{key[0]} -> {key[1]}")
            ax.set_xlabel("step")
            ax.set_ylabel(rows[0]["metric"])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)


def plot_decoding_state(records: list[dict], path: Path) -> None:
    with figure(path, size=(5.5, 3.8)) as axes:
        ax = axes[0][0]
        for model in dict.fromkeys(r["model"] for r in records):
            points = sorted((r["length"], r["state_bytes"] / 2**20) for r in records if r["model"] == model)
            ax.plot(*zip(*points), marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decoding state (MiB)")
        ax.set_title("Generation memory: KV cache vs recurrent state")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)


def summary_lines(result: dict) -> list[str]:
    """One line per run, for the terminal."""
    lines = []
    for suite in ("text", "lm", "speech"):
        for row in result.get(suite) or []:
            lines.append(f"{suite:6s} {row['data']:16s} {row['mixer']:9s} {row['guidance']:10s} "
                         f"teacher {row['teacher_value']:.4f} student {row['student_value']:.4f}")
    return lines
