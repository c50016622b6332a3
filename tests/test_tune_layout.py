"""Hybrid layouts chosen by search: per-layer importance, candidate layouts, a layout sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
import yaml
from conftest import require_asset, run_config

from raylin.config import ConfigError
from raylin.tune.layout import (
    LayoutSearch,
    candidate_layouts,
    check_layout_search,
    evenly_spaced,
    layer_importance,
    resolve_layouts,
)
from raylin.tune.search import load_tune_config

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """A 4-block BERT classifier on MiniLM's tokenizer: enough blocks to choose among."""
    require_asset("all-minilm-l6")
    from raylin.assets import asset_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(asset_path("all-minilm-l6"))
    folder = tmp_path_factory.mktemp("deep") / "teacher"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     initializer_range=0.5)  # large weights: outputs that depend on every block
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"source": str(folder), "target": str(folder)}


def _sweep_file(teachers, tmp_path, layout, space=None):
    data = run_config(teachers, tmp_path / "sweep", **{"train.max_steps": 4, "train.checkpoint_every": 4}).to_dict()
    data["train"] |= {"eval_every": 2}
    data["align"] = {"enabled": True, "steps": 2, "batch_size": 8}  # each trial aligns first, as `raylin convert` does
    data["tune"] = {"metric": "loss", "mode": "min", "scheduler": "fifo", "space": space or {}, "layout": layout}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_evenly_spaced_layouts_and_candidates_per_budget():
    assert evenly_spaced(2, 30) == [9, 19]  # the hybrid every shipped config keeps
    assert evenly_spaced(1, 4) == [1] and evenly_spaced(3, 4) == [0, 1, 2]
    scores = [0.9, 0.1, 0.2, 0.3, 0.1, 0.8]  # ranked: 0, 5, 3, 2, then 1 and 4
    layouts = candidate_layouts(scores, LayoutSearch(keep=[1, 2], pool=4, samples=2), seed=0)
    by_origin = {(l["keep"], l["origin"]): l["layers"] for l in layouts}
    assert by_origin[(1, "evenly spaced")] == [2] and by_origin[(2, "evenly spaced")] == [1, 3]
    assert by_origin[(1, "most important")] == [0] and by_origin[(2, "most important")] == [0, 5]
    searched = [l for l in layouts if l["origin"] == "searched"]
    assert [l["keep"] for l in searched] == [1, 1, 2, 2]
    assert all(set(l["layers"]) <= {0, 5, 3, 2} for l in searched)  # drawn from the 4 most important
    # A layout two origins name is searched once, under the first.
    same = candidate_layouts([0.1, 0.2, 0.9, 0.3], LayoutSearch(keep=[1], pool=1, samples=0), seed=0)
    assert same == [{"layers": [1], "origin": "evenly spaced", "keep": 1, "share": 0.25},
                    {"layers": [2], "origin": "most important", "keep": 1, "share": 0.25}]
    assert len({tuple(l["layers"]) for l in layouts}) == len(layouts)  # each layout once
    assert candidate_layouts(scores, LayoutSearch(keep=[1, 2], pool=4, samples=2), seed=0) == layouts


def test_bad_layout_searches_fail_before_ray_starts(deep_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"tune.layout.keep must list budgets between 1 and 3"):
        load_tune_config(_sweep_file(deep_teacher, tmp_path, {"keep": [4]}))
    with pytest.raises(ConfigError, match=r"both choose the kept layers"):
        load_tune_config(_sweep_file(deep_teacher, tmp_path, {"keep": [1]}, {"plan.keep_attention": {"grid": [[0]]}}))
    with pytest.raises(ConfigError, match=r"Unknown config key\(s\) \['tune.layout.budget'\]"):
        load_tune_config(_sweep_file(deep_teacher, tmp_path, {"budget": 1}))
    with pytest.raises(ConfigError, match=r"pool must hold at least the largest budget"):
        check_layout_search(LayoutSearch(keep=[3], pool=2), {}, 4)


def test_importance_is_the_divergence_of_converting_one_block_and_is_reused(deep_teacher, tmp_path, monkeypatch):
    config = run_config(deep_teacher, tmp_path / "run")
    scores = layer_importance(config, probe_batches=1)
    assert len(scores) == 4 and all(score > 0 for score in scores)  # a fresh mixer changes the output
    assert layer_importance(config, probe_batches=1) == scores  # the same measurement every time
    search = LayoutSearch(keep=[1], samples=1, probe_batches=1)
    layouts = resolve_layouts(config, search, 0, tmp_path)
    assert json.loads((tmp_path / "layouts.json").read_text())["importance"] == scores
    # A resumed sweep reads the same layouts instead of measuring again.
    monkeypatch.setattr("raylin.tune.layout.layer_importance", lambda *a: pytest.fail("measured again"))
    assert resolve_layouts(config, search, 0, tmp_path) == layouts


@pytest.mark.slow  # about 3 minutes (three trials, each aligning first): `make test-all`
def test_layout_sweep_searches_the_kept_layers_and_plots_them_against_evenly_spaced(deep_teacher, tmp_path):
    config = _sweep_file(deep_teacher, tmp_path, {"keep": [1], "samples": 1, "probe_batches": 1})
    done = subprocess.run([sys.executable, "-m", "raylin.cli", "tune", str(config)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "sweep" / "tune"
    saved = json.loads((folder / "layouts.json").read_text())
    searched = sorted(tuple(l["layers"]) for l in saved["layouts"])
    assert sorted(tuple(r["layers"]) for r in saved["results"]) == searched and len(searched) >= 2
    assert {"evenly spaced", "most important"} <= {l["origin"] for l in saved["layouts"]}
    assert all(r["kv_bytes_per_token"] == 2 * 4 * 8 * 4 for r in saved["results"])  # 1 layer, 4 heads x 8, fp32
    assert "evenly spaced" in (folder / "layouts.md").read_text() and (folder / "layouts.png").stat().st_size > 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["trials"] == len(searched) and len(summary["params"]["plan.keep_attention"]) == 1
