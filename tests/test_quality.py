"""`raylin bench quality --quick`: every pipeline (text, LM, speech, speed) runs end to end on a
local Ray and the results page is written. About 6 minutes on 2 cores, hence `slow`."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.assets
def test_quick_quality_benchmark_writes_every_suite(tmp_path):
    import ray

    from raylin.eval.quality import SUITES, run_quality_benchmark

    try:
        result = run_quality_benchmark(tmp_path / "bench", quick=True, docs=tmp_path / "docs")
    finally:
        ray.shutdown()
    assert all(result[suite] for suite in SUITES)
    assert {row["metric"] for row in result["lm"]} == {"perplexity"}
    assert "flite_accuracy" in result["speech"][0]["extra"]
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "## Language modelling" in page and "## Speed and memory" in page
    assert json.loads((tmp_path / "bench" / "quality.json").read_text())["quick"] is True
