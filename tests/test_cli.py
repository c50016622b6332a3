"""The `raylin` command: the demo and the speed benchmark (reduced sizes)."""

from __future__ import annotations

import json

import pytest

import raylin
from raylin.cli import main


@pytest.mark.assets
def test_demo_converts_minilm_and_writes_a_loadable_student(tmp_path, capsys):
    from conftest import require_asset

    require_asset("all-minilm-l6")
    assert main(["demo", "--out", str(tmp_path), "--length", "64"]) == 0
    printed = capsys.readouterr().out
    assert "copied" in printed and "forward @ 64 tokens" in printed
    assert "| copied |" in (tmp_path / "report.md").read_text()
    student = raylin.load_student(tmp_path / "student")
    assert student.plan.mixer == "linformer" and student.processor is not None


def test_bench_speed_writes_records_summary_and_plot(tmp_path):
    assert main(["bench", "speed", "--out", str(tmp_path), "--lengths", "32,64", "--hidden", "64",
                 "--layers", "1", "--repeats", "1"]) == 0
    records = json.loads((tmp_path / "speed.json").read_text())
    assert (tmp_path / "speed.png").stat().st_size > 0
    keys = {"model", "scope", "seq_len", "latency_s", "peak_mem_mb"}
    assert all(keys <= set(r) and r["latency_s"] > 0 and r["peak_mem_mb"] >= 0 for r in records)
    models = {(r["model"], r["scope"]) for r in records}
    for name in ("teacher", "linformer", "bimamba", "bimamba2", "mamba", "mamba2"):
        assert (name, "mixer") in models and (name, "model") in models
    assert ("teacher-eager", "mixer") in models
    assert ("bert-no-attention", "model") in models and ("llama-no-attention", "model") in models
    assert {r["seq_len"] for r in records} == {32, 64} and {r["input"] for r in records} == {"padded", "unpadded"}
    summary = json.loads((tmp_path / "speed_summary.json").read_text())
    assert "amdahl_limit" in summary["llama/unpadded/mamba2"]["model"]
