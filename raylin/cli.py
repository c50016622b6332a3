"""The ``raylin`` command line.

    raylin finetune CONFIG.yaml [--set key=value ...]  fine-tune the teacher: target teacher + waypoints
    raylin convert CONFIG.yaml [--set key=value ...]   transfer -> distill -> evaluate -> export
    raylin demo                      convert the shipped all-MiniLM-L6 into a Linformer student
    raylin bench speed [--out DIR]   latency / memory of teachers and students at long lengths
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import torch

    from raylin.convert import convert
    from raylin.data.assets import asset_path

    out = Path(args.out)
    teacher_path = asset_path("all-minilm-l6")
    plan = {"mixer": "linformer", "linformer": {"k": args.k, "share": "kv"}}
    print(f"[1/3] converting {teacher_path} with plan {json.dumps(plan)}", flush=True)
    start = time.perf_counter()
    student, report = convert(str(teacher_path), plan)
    print(f"      {report}", flush=True)

    print(f"[2/3] saving the student to {out / 'student'}", flush=True)
    student.save_pretrained(out / "student")
    (out / "report.md").write_text(report.to_markdown())

    print(f"[3/3] timing teacher and student forwards at {args.length} tokens", flush=True)
    from raylin.models.teachers import load_teacher

    teacher, tokenizer = load_teacher(str(teacher_path))
    ids = torch.randint(1000, tokenizer.vocab_size, (1, args.length))
    timings = {}
    for name, model in (("teacher", teacher), ("student", student)):
        with torch.inference_mode():
            model(input_ids=ids)
            begin = time.perf_counter()
            for _ in range(3):
                model(input_ids=ids)
        timings[name] = (time.perf_counter() - begin) / 3
    lines = [
        "",
        f"student folder : {out / 'student'} (load with raylin.load_student)",
        f"transfer report: {out / 'report.md'}",
        f"forward @ {args.length} tokens: teacher {timings['teacher'] * 1e3:.1f} ms, "
        f"student {timings['student'] * 1e3:.1f} ms ({timings['teacher'] / timings['student']:.2f}x)",
        f"total {time.perf_counter() - start:.1f} s. The student is converted, not yet distilled: "
        "its outputs match the teacher only after CALD training.",
    ]
    print("\n".join(lines))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from raylin.eval.speed import run_speed_benchmark, summarize

    lengths = tuple(int(x) for x in args.lengths.split(","))
    records = run_speed_benchmark(args.out, lengths=lengths, hidden=args.hidden, layers=args.layers, repeats=args.repeats)
    summary = summarize(records)
    (Path(args.out) / "speed_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {Path(args.out) / 'speed.json'} and {Path(args.out) / 'speed.png'}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from raylin.config import ConfigError, load_config
    from raylin.pipeline import run_conversion

    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"raylin: invalid config: {error}", file=sys.stderr)
        return 2
    metrics = run_conversion(config)
    print(json.dumps(metrics, indent=1))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from raylin.config import ConfigError, load_config
    from raylin.pipeline import run_finetune

    try:
        # The fine-tuned teacher is what this run makes: ignore target_teacher and guidance.
        config = load_config(args.config, args.set + ["guidance={mode: unguided}", "target_teacher=null"])
    except ConfigError as error:
        print(f"raylin: invalid config: {error}", file=sys.stderr)
        return 2
    print(json.dumps(run_finetune(config), indent=1))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from raylin.config import ConfigError
    from raylin.tune.search import SweepInterrupted, run_sweep

    try:
        summary = run_sweep(args.config, args.set, resume=args.resume)
    except ConfigError as error:
        print(f"raylin: invalid config: {error}", file=sys.stderr)
        return 2
    except SweepInterrupted as error:
        print(f"raylin: {error}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert and distil a teacher as a YAML config says")
    convert.add_argument("config", help="YAML run config (see docs/config.md)")
    convert.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field by its dotted name, e.g. --set train.max_steps=50")
    convert.set_defaults(func=_convert)

    finetune = commands.add_parser("finetune", help="fine-tune the teacher on the task (target teacher + waypoints)")
    finetune.add_argument("config", help="YAML run config; its teacher, task, data and train sections are used")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    finetune.set_defaults(func=_finetune)

    tune = commands.add_parser("tune", help="Ray Tune sweep over config fields (the config's tune: section)")
    tune.add_argument("config", help="YAML run config with a tune: section (see docs/tune.md)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--resume", action="store_true", help="resume the interrupted sweep in the same output_dir")
    tune.set_defaults(func=_tune)

    demo = commands.add_parser("demo", help="convert the shipped all-MiniLM-L6 into a Linformer student")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    demo.add_argument("--k", type=int, default=128, help="Linformer projection length (default 128)")
    demo.add_argument("--length", type=int, default=512, help="sequence length for the timing (default 512)")
    demo.set_defaults(func=_demo)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    speed = bench_kinds.add_parser("speed", help="latency and memory vs sequence length")
    speed.add_argument("--out", default="benchmarks/results", help="output folder for speed.json / speed.png")
    speed.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    speed.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    speed.add_argument("--layers", type=int, default=2, help="blocks per model (default 2)")
    speed.add_argument("--repeats", type=int, default=2, help="timed runs per cell; the best is kept")
    speed.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
