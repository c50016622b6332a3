"""The `raylin` command: the demo (its reduced mode) and the speed benchmark (reduced sizes)."""

from __future__ import annotations

import json

import pytest

import raylin
from raylin.cli import build_parser, main


@pytest.mark.assets
def test_demo_quick_fine_tunes_converts_distils_and_reports(tmp_path, capfd):
    """The demo end to end in its reduced mode: teacher fine-tuning, conversion and distillation on
    a local Ray (2 workers, served teacher), accuracy and speed-up printed; a second run reuses the
    fine-tuned teacher. The console a newcomer reads: raylin's lines only on stderr (no traceback,
    no Ray, DeepSpeed, torch or transformers line, WARNING or not), each printed once, with a
    progress line per step of each stage (4 steps: every step is a tenth or more)."""
    import ray

    from conftest import require_asset

    require_asset("all-minilm-l6")
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path), "--length", "512"]) == 0
        captured = capfd.readouterr()
        printed, console = captured.out, captured.out + captured.err
        result = json.loads((tmp_path / "demo.json").read_text())
        assert result["quick"] and result["steps"] == 4
        assert 0 <= result["teacher_accuracy"] <= 1 and 0 <= result["student_accuracy"] <= 1
        assert f"teacher {result['teacher_accuracy']:.4f}" in printed and "forward @   512 tokens" in printed
        assert console.count("[raylin] [2/4] converting") == 1
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert lines and all(line.startswith("[raylin] ") for line in lines), [
            line for line in lines if not line.startswith("[raylin] ")][:10]
        assert len(lines) == len(set(lines)), "a console line was printed twice"
        for stage in ("fine-tune", "distil"):
            steps = [line for line in lines if line.startswith(f"[raylin] {stage}: step ")]
            assert [line.split()[3].rstrip(",") for line in steps] == ["1/4", "2/4", "3/4", "4/4"], steps
            assert "tokens/s" in steps[-1] and "loss" in steps[-1]
        assert all(t["teacher_ms"] > 0 and t["student_ms"] > 0 for t in result["timings"].values())
        student = raylin.load_student(result["student_dir"])
        assert student.plan.mixer == "linformer"
        served = json.loads((tmp_path / "student-run-quick" / "teacher_service.json").read_text())
        assert served["teacher_loads"] == 1 and served["teacher_forwards"] > 0

        from raylin.demo import demo_configs
        from raylin.pipeline import finished_run

        finetune, _ = demo_configs(tmp_path, quick=True)  # a second demo reuses this fine-tuned teacher
        assert finished_run(finetune)["target_teacher"] == str(tmp_path / "teacher-run-quick" / "teacher")
    finally:
        ray.shutdown()


def test_bench_speed_writes_records_summary_and_plot(tmp_path):
    assert main(["bench", "speed", "--out", str(tmp_path), "--lengths", "32,64", "--hidden", "64",
                 "--layers", "1", "--repeats", "1"]) == 0
    records = json.loads((tmp_path / "speed.json").read_text())
    assert (tmp_path / "speed.png").stat().st_size > 0
    keys = {"model", "scope", "seq_len", "latency_s", "peak_mem_mb"}
    assert all(keys <= set(r) and r["latency_s"] > 0 and r["peak_mem_mb"] >= 0 for r in records)
    models = {(r["model"], r["scope"]) for r in records}
    for name in ("teacher", "linformer", "bimamba", "bimamba2", "bigated_deltanet", "mamba", "mamba2", "gated_deltanet"):
        assert (name, "mixer") in models and (name, "model") in models
    assert ("teacher-eager", "mixer") in models
    assert ("bert-no-attention", "model") in models and ("llama-no-attention", "model") in models
    assert {r["seq_len"] for r in records} == {32, 64} and {r["input"] for r in records} == {"padded", "unpadded"}
    summary = json.loads((tmp_path / "speed_summary.json").read_text())
    assert "amdahl_limit" in summary["llama/unpadded/mamba2"]["model"]


def test_bench_scale_takes_a_part_and_each_part_its_own_default_steps():
    args = build_parser().parse_args(["bench", "scale", "--part", "billion"])
    assert args.part == "billion" and args.steps is None  # billion runs 20 steps, align and zero 2
    assert build_parser().parse_args(["bench", "scale"]).part == "all"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "scale", "--part", "everything"])
