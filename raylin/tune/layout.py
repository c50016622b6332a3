"""Hybrid layouts chosen by measurement: which attention layers a student keeps, under a budget.

A sweep's ``tune.layout`` section turns ``plan.keep_attention`` into a searched dimension::

    tune:
      metric: eval_perplexity
      mode: min
      layout:
        keep: [2]          # budgets: attention layers kept (several budgets: one set of layouts each)
        pool: 6            # the most important layers the searched layouts draw from
        samples: 2         # random layouts drawn from the pool, per budget
        probe_batches: 2   # held-out batches the importance is measured on

1. **Importance.** For every block i, the teacher with block i alone converted to the plan's
   mixer (seeded from its attention, not trained) runs on ``probe_batches`` held-out batches;
   block i's importance is that model's KL divergence from the teacher's output distribution
   (per predicted token for causal LMs, per example otherwise). It measures what losing block i's
   attention costs before any training repairs it: the cheap, zero-shot form of the per-layer
   runs published conversions rank by hand. One forward of the teacher and one per block.
2. **Layouts.** For each budget k of N blocks: the evenly spaced layout (the baseline every
   hybrid paper starts from), the k most important blocks, and ``samples`` distinct random
   k-subsets of the ``pool`` most important blocks (seeded by ``tune.seed``).
3. **Search.** The layouts become a grid over ``plan.keep_attention``: one trial each, ASHA
   stopping the weak ones, every trial reading the sweep's shared teacher pool and activation cache.

The importance scores and the layouts are written to OUTPUT_DIR/tune/layouts.json before the
first trial and reused when the sweep resumes (the same fingerprint: teacher, plan, data, probe
and search settings), so a resumed sweep searches the same layouts; the importance alone is also
remembered in RAYLIN_CACHE/layer_importance/, so a sweep of other budgets measures it once. After the sweep, layouts.md and
layouts.png set each layout's metric against its share of attention, searched layouts against
evenly spaced ones, with the key/value bytes each kept layer adds per decoded token.

Limits: the importance of a block is measured with the others intact, so it ignores how blocks
interact once several are converted; the searched layouts are what corrects for that.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from raylin.assets import cache_dir
from raylin.atomic import write_text_atomic
from raylin.config import ConfigError, RunConfig
from raylin.convert import convert
from raylin.data.task_data import load_task_data
from raylin.task_model import load_task_model
from raylin.fingerprint import fingerprint
from raylin.models.families import family_for
from raylin.plots import figure
from raylin.teacher.activation_cache import teacher_fingerprint

_log = logging.getLogger(__name__)

LAYOUTS_FILE = "layouts.json"
IMPORTANCE_DIR = "layer_importance"  # under RAYLIN_CACHE
SEARCHED_KEY = "plan.keep_attention"
ORIGINS = ("evenly spaced", "most important", "searched")


@dataclass
class LayoutSearch:
    keep: list[int] = field(default_factory=lambda: [2])
    pool: int | None = None  # default: 3 x the largest budget, at most every block
    samples: int = 2
    probe_batches: int = 2


def check_layout_search(search: LayoutSearch, space: dict, num_layers: int) -> None:
    """Raise ConfigError for a layout search that cannot run on a teacher of ``num_layers`` blocks."""
    problems = []
    if SEARCHED_KEY in space:
        problems.append(f"tune.space.{SEARCHED_KEY} and tune.layout both choose the kept layers; keep one of them.")
    if not search.keep or any(not 1 <= k < num_layers for k in search.keep):
        problems.append(f"tune.layout.keep must list budgets between 1 and {num_layers - 1} (the teacher has "
                        f"{num_layers} blocks), got {search.keep}.")
    pool = search.pool if search.pool is not None else min(num_layers, 3 * max(search.keep, default=1))
    if search.keep and not max(search.keep) <= pool <= num_layers:
        problems.append(f"tune.layout.pool must hold at least the largest budget ({max(search.keep)}) and at most "
                        f"{num_layers} blocks, got {pool}.")
    if search.samples < 0 or search.probe_batches < 1:
        problems.append("tune.layout.samples must be >= 0 and tune.layout.probe_batches >= 1.")
    if problems:
        raise ConfigError("\n".join(problems))


def evenly_spaced(keep: int, num_layers: int) -> list[int]:
    """``keep`` blocks spread evenly over ``num_layers`` (2 of 30: [9, 19])."""
    return sorted({round((j + 1) * num_layers / (keep + 1)) - 1 for j in range(keep)})


@torch.no_grad()
def _divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> tuple[float, float]:
    """(summed KL(teacher || student), count) over predicted tokens (causal) or examples."""
    if causal:
        teacher_logits, student_logits = teacher_logits[:, :-1], student_logits[:, :-1]
        mask = mask[:, 1:] if mask is not None else None
    per_item = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                        log_target=True, reduction="none").sum(-1)
    if causal and mask is not None:
        per_item = per_item * mask
        return float(per_item.sum()), float(mask.sum())
    return float(per_item.sum()), float(per_item.numel())


@torch.no_grad()
def layer_importance(config: RunConfig, probe_batches: int) -> list[float]:
    """Block i's importance: the KL divergence from the teacher of the teacher with block i alone
    converted to ``config.plan``'s mixer (seeded from attention, untrained), on held-out batches."""
    teacher_path = config.target_teacher or config.teacher
    teacher, processor = load_task_model(config, teacher_path)
    teacher = teacher.eval()
    family = family_for(teacher)
    num_layers = family.num_layers(teacher.config)
    data = load_task_data(config, processor)
    size = config.train.batch_size
    count = min(probe_batches * size, data.eval_sets[""])
    batches = [data.eval_batch("", list(range(start, min(start + size, count)))) for start in range(0, count, size)]
    batches = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    references = [teacher(**batch).logits for batch in batches]
    causal = config.task_kind.language_model
    scores = []
    for layer in range(num_layers):
        plan = config.plan.replace(init="attention", keep_attention=[i for i in range(num_layers) if i != layer])
        student, _ = convert(teacher, plan)
        student.eval()
        total = items = 0.0
        for batch, reference in zip(batches, references, strict=True):
            kl, n = _divergence(reference, student(**batch).logits, batch.get("attention_mask"), causal)
            total, items = total + kl, items + n
        scores.append(total / max(items, 1.0))
        _log.info("layer importance: block %d converted alone -> KL %.4f", layer, scores[-1])
        del student
    return scores


def candidate_layouts(scores: list[float], search: LayoutSearch, seed: int) -> list[dict]:
    """Per budget: evenly spaced, the most important blocks, and ``samples`` distinct random subsets
    of the ``pool`` most important blocks. Each layout once (the first origin that names it wins)."""
    num_layers = len(scores)
    ranked = sorted(range(num_layers), key=lambda i: (-scores[i], i))
    pool = ranked[: search.pool if search.pool is not None else min(num_layers, 3 * max(search.keep))]
    rng = random.Random(seed)
    layouts, seen = [], set()

    def add(layers: list[int], origin: str, keep: int) -> bool:
        key = tuple(sorted(layers))
        if key in seen:
            return False
        seen.add(key)
        layouts.append({"layers": list(key), "origin": origin, "keep": keep, "share": keep / num_layers})
        return True

    for keep in search.keep:
        add(evenly_spaced(keep, num_layers), ORIGINS[0], keep)
        add(ranked[:keep], ORIGINS[1], keep)
        subsets = {tuple(sorted(c)) for c in itertools.islice(itertools.combinations(pool, keep), 10_000)}
        drawn = 0
        for candidate in rng.sample(sorted(subsets), len(subsets)):
            if drawn >= search.samples:
                break
            drawn += add(list(candidate), ORIGINS[2], keep)
    return layouts


def importance_identity(config: RunConfig, search: LayoutSearch) -> dict:
    """What the layers' importance depends on: the teacher's files, the plan, task, data and probe."""
    return {"teacher": teacher_fingerprint(config.target_teacher or config.teacher), "plan": config.plan.to_dict(),
            "task": dataclasses.asdict(config.task), "data": dataclasses.asdict(config.data),
            "batch": config.train.batch_size, "probe_batches": search.probe_batches}


def importance_file(identity: dict) -> Path:
    """Where the importance measured for ``identity`` is remembered (RAYLIN_CACHE/layer_importance/)."""
    return cache_dir() / IMPORTANCE_DIR / f"{fingerprint(identity, 20)}.json"


def resolve_layouts(config: RunConfig, search: LayoutSearch, seed: int, folder: Path) -> list[dict]:
    """The layouts this sweep searches: read from ``folder``/layouts.json when its fingerprint matches
    (a resumed sweep), else drawn from the layers' importance and written there.

    The importance is remembered in RAYLIN_CACHE/layer_importance/, keyed by the teacher's files,
    the plan, the task, the data and the probe, so sweeps of other budgets on the same teacher
    (or a sweep restarted with more samples) measure it once."""
    identity = importance_identity(config, search)
    key = fingerprint(identity | {"search": dataclasses.asdict(search), "seed": seed})
    path = folder / LAYOUTS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == key:
            return saved["layouts"]
    remembered = importance_file(identity)
    if remembered.is_file():
        scores = json.loads(remembered.read_text())["importance"]
    else:
        scores = layer_importance(config, search.probe_batches)
        remembered.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(remembered, json.dumps({"identity": identity, "importance": scores}, indent=1))
    layouts = candidate_layouts(scores, search, seed)
    write_text_atomic(path, json.dumps({"fingerprint": key, "importance": scores, "layouts": layouts}, indent=1))
    _log.info("layout search: %d layouts (%s)", len(layouts), "; ".join(f"{l['origin']} {l['layers']}" for l in layouts))
    return layouts


def kv_bytes_per_token(teacher_config, layers: list[int], bytes_per_value: int = 4) -> int:
    """Key/value bytes each decoded token adds: keys and values of every kept attention layer
    (the mixer layers' state is fixed, whatever the length)."""
    heads = getattr(teacher_config, "num_key_value_heads", None) or teacher_config.num_attention_heads
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
    return len(layers) * 2 * heads * head_dim * bytes_per_value


def write_layout_results(rows: list[dict], metric: str, mode: str, folder: Path, teacher_config) -> list[dict]:
    """layouts.md, layouts.png and the rows of layouts.json's ``results``: each searched layout's
    best metric against its share of attention, with its origin and KV bytes per token."""
    saved = json.loads((folder / LAYOUTS_FILE).read_text())
    origin = {tuple(l["layers"]): l for l in saved["layouts"]}
    results = []
    for row in rows:
        layers = tuple(sorted(row.get(SEARCHED_KEY) or []))
        layout = origin.get(layers, {"origin": "given", "keep": len(layers), "share": None})
        results.append({"layers": list(layers), "origin": layout["origin"], "keep": layout["keep"],
                        "share": layout["share"], metric: row[metric], "steps": row["steps"],
                        "stopped_early": row["stopped_early"], "kv_bytes_per_token": kv_bytes_per_token(teacher_config, list(layers))})
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    lines = [f"| attention kept | share | origin | {metric} | KV bytes / token | steps |", "|---|---:|---|---:|---:|---:|"]
    for result in sorted(results, key=lambda r: (r["keep"], r[metric] if mode == "min" else -r[metric])):
        lines.append(f"| {result['layers']} | {result['share']:.3f} | {result['origin']} | {result[metric]:.3f} | "
                     f"{result['kv_bytes_per_token']:,} | {result['steps']}{' (stopped early)' if result['stopped_early'] else ''} |")
    verdicts = []
    for keep in sorted({r["keep"] for r in results}):
        group = [r for r in results if r["keep"] == keep]
        even = [r for r in group if r["origin"] == ORIGINS[0]]
        chosen = [r for r in group if r["origin"] != ORIGINS[0]]
        if even and chosen:
            best = min(chosen, key=lambda r: r[metric]) if mode == "min" else max(chosen, key=lambda r: r[metric])
            verdicts.append(f"keep {keep}: best searched layout {best['layers']} ({best['origin']}) {best[metric]:.3f} vs "
                            f"evenly spaced {even[0]['layers']} {even[0][metric]:.3f}: "
                            f"{'better' if better(best[metric], even[0][metric]) else 'not better'}.")
    write_text_atomic(folder / "layouts.md", "\n".join(lines + [""] + verdicts) + "\n")
    _plot_layouts(results, metric, folder / "layouts.png")
    write_text_atomic(folder / LAYOUTS_FILE, json.dumps({**saved, "results": results}, indent=1))
    return results


def _plot_layouts(results: list[dict], metric: str, path: Path) -> None:
    """The metric against the share of attention kept (and the KV bytes per token it costs), one
    marker per origin, each point named by its layers; hollow: stopped early by the scheduler."""
    with figure(path, size=(7, 4.2), dpi=120) as axes:
        ax = axes[0][0]
        for name, marker in zip(ORIGINS, ("s", "^", "o"), strict=True):
            for stopped in (False, True):
                points = [r for r in results if r["origin"] == name and r["stopped_early"] == stopped]
                if points:
                    ax.scatter([r["share"] for r in points], [r[metric] for r in points], marker=marker, s=60,
                               label=name + (" (stopped early)" if stopped else ""),
                               facecolors="none" if stopped else None, edgecolors=f"C{ORIGINS.index(name)}",
                               color=f"C{ORIGINS.index(name)}")
        for r in results:
            ax.annotate(str(r["layers"]), (r["share"], r[metric]), textcoords="offset points", xytext=(6, -3), fontsize=7)
        shares = [r["share"] for r in results]
        ax.set_xlim(0, max(shares) * 1.6)
        ax.set_xlabel("share of attention layers kept")
        ax.set_ylabel(metric)
        kv = {r["share"]: r["kv_bytes_per_token"] for r in results}
        ax.set_title("Searched layouts vs evenly spaced ones; KV bytes per token: "
                     + ", ".join(f"{share:.3f} -> {kv[share]:,}" for share in sorted(kv)), fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
