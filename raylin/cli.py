"""The ``raylin`` command line.

    raylin finetune CONFIG.yaml [--set key=value ...] [--overwrite]  fine-tune the teacher: target teacher + waypoints
    raylin convert CONFIG.yaml [--set key=value ...] [--overwrite]   transfer -> distill -> evaluate -> export
    raylin tune CONFIG.yaml [--resume]                 Ray Tune sweep over the config's tune: section
    raylin eval CONFIG.yaml [--student DIR]            score teacher and student, time both: OUTPUT_DIR/eval.json
    raylin export STUDENT_DIR --to DIR [--overwrite]   a Llama Mamba2 hybrid as a stock transformers (Bamba) checkpoint
    raylin demo [--quick]                               fine-tune, convert and distil all-MiniLM-L6 on Ray
    raylin bench speed [--out DIR] [--shipped]   latency / memory at long lengths (or of the shipped models)
    raylin bench distill [--out DIR] [--steps N]   distil step tokens/s vs a plain loop; bf16 vs fp32 held-out
    raylin bench quality [--quick | --long] [--only text,lm,speech,hybrids,speed]   teacher vs students on text, LM and speech
    raylin bench cluster [--out DIR] [--nodes 1,2,3]   teacher traffic per node on simulated nodes
    raylin bench scale [--out DIR] [--part align|zero|all|billion]   align-task peak; ZeRO stage memory; a 1.1B conversion
    raylin bench faults [--out DIR] [--trials N] [--kinds a,b]   fault soak: survived / identical runs per fault kind
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

from raylin.errors import ConfigError, RayClusterUnreachable, RunInProgress
from raylin.log import LEVEL_ENV, setup_logging

INTERNAL_ERROR_FRAMES = 3  # of an unexpected error's traceback, below --verbose

# Each command imports what it runs inside its handler: `raylin --help` answers before Ray and the
# benchmarks load, and a run loads Ray only after its config is checked.


# ----- option types: argparse refuses a bad value before any work starts (exit status 2, the -----
# ----- option named, the fix said), as the config's checks do for a config ----------------------

def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def at_least(minimum: int, multiple_of: int = 1):
    """An option type: a whole number >= ``minimum`` (and a multiple of ``multiple_of``)."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum or value % multiple_of:
            raise argparse.ArgumentTypeError(
                f"{text!r} must be a whole number >= {minimum}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")
                + f" (e.g. {max(minimum, multiple_of)})")
        return value
    parse.__name__ = "number"
    return parse


def numbers_at_least(minimum: int, example: str):
    """An option type: comma-separated whole numbers, each >= ``minimum`` (e.g. ``example``)."""
    def parse(text: str) -> tuple[int, ...]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            values = tuple(int(part) for part in parts)
        except ValueError:
            values = ()
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated whole numbers >= {minimum} (e.g. {example})")
        return values
    parse.__name__ = "list"
    return parse


def names_from(module: str, registry: str):
    """An option type: comma-separated names out of the registry ``module.registry`` (imported only
    when names are given, so ``--help`` stays light); empty: none given."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        choices = tuple(getattr(importlib.import_module(module), registry)) if names else ()
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}, comma-separated")
        return names
    parse.__name__ = "list"
    return parse


def output_folder(text: str) -> str:
    """An option type: a folder this user can write (or make)."""
    from raylin.paths import unwritable_reason

    reason = unwritable_reason(text)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {reason}")
    return text


def existing_folder(text: str) -> str:
    """An option type: a folder that exists."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder; give the path of an existing one")
    return text


def config_file(text: str) -> str:
    """An option type: a readable YAML config file (its content is checked by the command)."""
    from raylin.config import read_yaml_file

    try:
        read_yaml_file(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text



def _demo(args: argparse.Namespace) -> int:
    from raylin.demo import run_demo

    run_demo(args.out, quick=args.quick, long_length=args.length)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from raylin.atomic import write_text_atomic
    from raylin.bench.speed import run_shipped_benchmark, run_speed_benchmark, summarize, summarize_shipped

    if args.shipped:
        rows = summarize_shipped(run_shipped_benchmark(args.out, repeats=args.repeats))
        write_text_atomic(Path(args.out) / "shipped-speed-summary.json", json.dumps(rows, indent=1))
        print(json.dumps(rows, indent=1))
        print(f"wrote {Path(args.out) / 'shipped-speed.json'}")
        return 0
    records = run_speed_benchmark(args.out, lengths=args.lengths, hidden=args.hidden, layers=args.layers, repeats=args.repeats)
    summary = summarize(records)
    write_text_atomic(Path(args.out) / "speed_summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {Path(args.out) / 'speed.json'} and {Path(args.out) / 'speed.png'}")
    return 0


def _bench_distill(args: argparse.Namespace) -> int:
    from raylin.bench.throughput import DEFAULT_CONFIGS, run_throughput_benchmark, summarize_throughput, throughput_config

    configs = tuple(c for c in args.configs.split(",") if c) if args.configs else DEFAULT_CONFIGS
    for path in configs:  # bad input before any work: every config is checked as the benchmark runs it
        throughput_config(path, Path(args.out), args.steps)
    result = run_throughput_benchmark(args.out, configs=configs, steps=args.steps)
    print(json.dumps({"throughput": summarize_throughput(result), "bf16": result["bf16"]}, indent=1))
    print(f"wrote {Path(args.out) / 'distill-throughput.json'} and {Path(args.out) / 'distill-throughput.png'}")
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    from raylin.bench.quality import DEFAULT_OUT, PAGES, SUITES, run_quality_benchmark, summary_lines

    budget = "quick" if args.quick else "long" if args.long else "hour"
    suites = args.only or SUITES
    out = args.out or DEFAULT_OUT[budget]
    docs = args.docs or (out if budget == "quick" else "docs")
    result = run_quality_benchmark(out, budget=budget, suites=suites, docs=docs)
    print("\n".join(summary_lines(result)))
    print(f"wrote {Path(out) / 'quality.json'} and {Path(docs) / PAGES[budget]}")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from raylin.bench.scale import (
        run_billion_benchmark,
        run_scale_benchmark,
        run_zero_benchmark,
        summarize,
        summarize_billion,
        summarize_zero,
    )

    if args.part in ("align", "all"):
        result = run_scale_benchmark(args.out, hidden=args.hidden, tasks=args.tasks, steps=args.steps or 2)
        print("\n".join(summarize(result)))
        print(f"wrote {Path(args.out) / 'scale-align.json'} and {Path(args.out) / 'scale-align.png'}")
    if args.part in ("zero", "all"):
        print("\n".join(summarize_zero(run_zero_benchmark(args.out, steps=args.steps or 2))))
        print(f"wrote {Path(args.out) / 'scale-zero.json'} and {Path(args.out) / 'scale-zero.png'}")
    if args.part == "billion":  # not in "all": it takes most of the machine for half an hour
        print("\n".join(summarize_billion(run_billion_benchmark(args.out, steps=args.steps or 20))))
        print(f"wrote {Path(args.out) / 'scale-billion.json'}")
    return 0


def _bench_cluster(args: argparse.Namespace) -> int:
    from raylin.bench.cluster import run_cluster_benchmark, summarize

    result = run_cluster_benchmark(args.out, nodes=args.nodes, steps=args.steps)
    print(json.dumps(summarize(result), indent=1))
    print(f"wrote {Path(args.out) / 'cluster.json'} and {Path(args.out) / 'cluster.png'}")
    return 0


def _bench_faults(args: argparse.Namespace) -> int:
    from raylin.bench.recovery import check_kinds, run_fault_benchmark, summary_lines

    kinds = check_kinds(list(args.kinds))
    result = run_fault_benchmark(args.out, trials=args.trials, kinds=kinds, first_seed=args.first_seed)
    print("\n".join(summary_lines(result)))
    print(f"wrote {Path(args.out) / 'faults.json'}")
    return 0


def _run_config(args: argparse.Namespace, start, run: str = "conversion") -> int:
    """Validate CONFIG (+ --set) as a ``run`` (raylin.config.RUNS) before anything starts, call
    ``start(config)``, print its result."""
    from raylin.config import load_config

    config = load_config(args.config, args.set, run=run)
    result = start(config)  # checks what needs reading (evaluation sets) before any work starts
    print(json.dumps(result, indent=1))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from raylin.pipeline import run_conversion

    return _run_config(args, lambda config: run_conversion(config, overwrite=args.overwrite, wait=args.wait))


def _finetune(args: argparse.Namespace) -> int:
    from raylin.pipeline import run_finetune

    # The teacher's run of the config: the student's sections do not apply (raylin.config.teacher_run_mapping).
    return _run_config(args, lambda config: run_finetune(config, overwrite=args.overwrite, wait=args.wait), run="teacher")


def _eval(args: argparse.Namespace) -> int:
    from raylin.pipeline import run_eval

    return _run_config(args, lambda config: run_eval(config, args.student, args.length))


def _export(args: argparse.Namespace) -> int:
    from raylin.export import ExportError, export_student

    try:
        report = export_student(args.student, args.to, overwrite=args.overwrite)
    except ExportError as error:
        print(f"raylin export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.to}: {report.architecture}, attention kept in {report.attention_layers or 'no'} layers, "
          f"max |logit diff| {report.max_abs_logit_diff:.1e} vs the student; load it with "
          "transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from raylin.tune.search import SweepInterrupted, run_sweep

    try:
        summary = run_sweep(args.config, args.set, resume=args.resume)
    except SweepInterrupted as error:
        print(f"raylin: {error}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="verbose",
                       help="debug lines too, from the driver and every worker")
    level.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="quiet",
                       help="warnings and errors only (no progress lines)")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert and distil a teacher as a YAML config says")
    convert.add_argument("config", type=config_file, help="YAML run config (see docs/config.md)")
    convert.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field by its dotted name, e.g. --set train.max_steps=50")
    convert.add_argument("--overwrite", action="store_true",
                         help="delete a run of another config in output_dir instead of refusing to start")
    convert.add_argument("--wait", action="store_true",
                         help="when another run is in progress in output_dir, wait for it to end instead of refusing")
    convert.set_defaults(func=_convert)

    finetune = commands.add_parser("finetune", help="fine-tune the teacher on the task (target teacher + waypoints)")
    finetune.add_argument("config", type=config_file,
                          help="YAML run config; the teacher's run of it: the student's sections do not apply")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    finetune.add_argument("--overwrite", action="store_true",
                          help="delete a run of another config in output_dir instead of refusing to start")
    finetune.add_argument("--wait", action="store_true",
                          help="when another run is in progress in output_dir, wait for it to end instead of refusing")
    finetune.set_defaults(func=_finetune)

    tune = commands.add_parser("tune", help="Ray Tune sweep over config fields (the config's tune: section)")
    tune.add_argument("config", type=config_file, help="YAML run config with a tune: section (see docs/tune.md)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--resume", action="store_true", help="resume the interrupted sweep in the same output_dir")
    tune.set_defaults(func=_tune)

    evaluate = commands.add_parser("eval", help="score teacher and student on the held-out split and time both")
    evaluate.add_argument("config", type=config_file, help="the YAML run config the student was converted with")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--student", default=None, help="student folder (default OUTPUT_DIR/student)")
    evaluate.add_argument("--length", type=at_least(8), default=None, help="tokens for the timing (default: the longest the model takes)")
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser("export", help="write a causal Mamba2 hybrid student as a stock transformers checkpoint")
    export.add_argument("student", type=existing_folder, help="a student folder (OUTPUT_DIR/student of a convert run)")
    export.add_argument("--to", required=True, type=output_folder, help="folder to write the checkpoint into")
    export.add_argument("--overwrite", action="store_true", help="replace --to if it already holds files")
    export.set_defaults(func=_export)

    demo = commands.add_parser("demo", help="fine-tune, convert and distil the shipped all-MiniLM-L6 on a local Ray")
    demo.add_argument("--out", default="outputs/demo", type=output_folder, help="output folder (default outputs/demo)")
    demo.add_argument("--quick", action="store_true", help="a smoke run: a few steps on a few hundred examples")
    demo.add_argument("--length", type=at_least(16), default=4096, help="long sequence length for the speed-up (default 4096)")
    demo.set_defaults(func=_demo)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    speed = bench_kinds.add_parser("speed", help="latency and memory vs sequence length")
    speed.add_argument("--out", default="benchmarks/results", type=output_folder, help="output folder for speed.json / speed.png")
    speed.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", type=numbers_at_least(16, "512,4096"),
                       help="comma-separated sequence lengths (default 512,...,16384)")
    speed.add_argument("--hidden", type=at_least(64, multiple_of=64), default=256, help="model width, a multiple of the 64-wide heads (default 256)")
    speed.add_argument("--layers", type=at_least(1), default=2, help="blocks per model (default 2)")
    speed.add_argument("--repeats", type=at_least(1), default=2, help="timed runs per cell; the best is kept")
    speed.add_argument("--shipped", action="store_true",
                       help="instead: the shipped configs' teachers and students at their real widths and lengths, "
                            "fp32 and bf16, forward and (causal) per-token decode")
    speed.set_defaults(func=_bench)
    distill = bench_kinds.add_parser(
        "distill", help="the distillation step's tokens/s per core (shipped configs) against a plain in-process loop, "
                        "and the held-out metric in bf16 against fp32")
    distill.add_argument("--out", default="benchmarks/results", type=output_folder, help="output folder for distill-throughput.json / .png")
    distill.add_argument("--steps", type=at_least(3), default=12, help="distillation steps per run; the first 2 are not timed")
    distill.add_argument("--configs", default=None, help="comma-separated config files (default: the three shipped ones)")
    distill.set_defaults(func=_bench_distill)
    quality = bench_kinds.add_parser("quality", help="teacher vs students on text, language modelling and speech")
    budget = quality.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="a few steps per run: a smoke test of every pipeline")
    budget.add_argument("--long", action="store_true",
                        help="2-3x the default budget's steps (about 2.7 h on 2 cores before every student aligned): "
                             "docs/results-long.md")
    quality.add_argument("--out", default=None, type=output_folder,
                         help="run folders and quality.json (default outputs/bench-quality[-quick|-long])")
    quality.add_argument("--only", default=None, type=names_from("raylin.bench.quality", "SUITES"), help="comma-separated suites: text,lm,speech,hybrids,speed (default all)")
    quality.add_argument("--docs", default=None, type=output_folder, help="where the results page and its plots go (default docs/, or OUT with --quick)")
    quality.set_defaults(func=_bench_quality)
    cluster = bench_kinds.add_parser(
        "cluster", help="teacher-service traffic on 1, 2 and 3 simulated nodes (each a raylet on this machine): "
                        "activation bytes and forwards per node, prefetch overlap, extrapolated to the paper configs")
    cluster.add_argument("--out", default="benchmarks/results", type=output_folder, help="output folder for cluster.json / cluster.png")
    cluster.add_argument("--nodes", default="1,2,3", type=numbers_at_least(1, "1,2,3"), help="comma-separated node counts (default 1,2,3)")
    cluster.add_argument("--steps", type=at_least(3), default=10, help="distillation steps per run; the first 2 are not timed")
    cluster.set_defaults(func=_bench_cluster)
    scale = bench_kinds.add_parser(
        "scale", help="memory at scale: align tasks holding their blocks against the whole student, training "
                      "workers at ZeRO 0/2/3, and a 1.1B-parameter conversion")
    scale.add_argument("--out", default="benchmarks/results", type=output_folder, help="output folder for the scale-*.json files and plots")
    scale.add_argument("--hidden", type=at_least(64, multiple_of=64), default=1024,
                       help="teacher width, a multiple of the 64-wide heads (2048: TinyLlama-1.1B's shape)")
    scale.add_argument("--tasks", type=at_least(1), default=4, help="align tasks the 22 blocks are spread over")
    scale.add_argument("--steps", type=at_least(1), default=None,
                       help="align steps per task and distillation steps per ZeRO run (default 2); billion: "
                            "distillation steps (default 20)")
    scale.add_argument("--part", choices=("align", "zero", "all", "billion"), default="all",
                       help="align: block-local against whole-student align tasks; zero: per-worker memory at ZeRO "
                            "0/2/3 with 1 and 2 workers, and DeepSpeed's estimates for 1B-70B students; all: both; "
                            "billion: a 1.17B-parameter conversion (align + 20 ZeRO-3 steps), not in all")
    scale.set_defaults(func=_bench_scale)
    faults = bench_kinds.add_parser(
        "faults", help="fault soak: N short conversions per fault kind (worker, teacher replica or node lost, crash "
                       "while checkpointing, NaN loss) at seeded random steps, each compared with the uninterrupted run")
    faults.add_argument("--out", default="benchmarks/results", type=output_folder, help="output folder for faults.json")
    faults.add_argument("--trials", type=at_least(1), default=10, help="runs per fault kind (default 10)")
    faults.add_argument("--kinds", default="", type=names_from("raylin.bench.recovery", "FAULT_KINDS"), help="comma-separated fault kinds (default all: worker-kill, "
                        "teacher-kill, checkpoint-crash, nan, node-lost)")
    faults.add_argument("--first-seed", type=at_least(0), default=0, help="the first trial's seed (trials use seeds from it on)")
    faults.set_defaults(func=_bench_faults)
    return parser


def job_main(command: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<command>.py`` under ``ray job submit``: connects to the job's cluster
    (RAY_ADDRESS, set by the job server), says where it is running, then runs ``raylin <command>``."""
    import os

    import ray

    from raylin.train.trainer import ensure_ray

    ensure_ray()
    resources = ray.cluster_resources()
    print(f"raylin {command}: Ray {ray.__version__} at {ray.get_runtime_context().gcs_address} "
          f"({len([n for n in ray.nodes() if n['Alive']])} nodes, {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs), job {os.environ.get('RAY_JOB_ID') or ray.get_runtime_context().get_job_id()}, "
          f"cwd {os.getcwd()}", flush=True)
    return main([command, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse said why (a bad option value: status 2), or --help
        return stop.code if isinstance(stop.code, int) else 2
    if args.log_level:
        os.environ[LEVEL_ENV] = args.log_level  # Ray workers inherit it (raylin.train.trainer forwards it)
    setup_logging()
    try:
        return args.func(args)
    except ConfigError as error:  # bad input: a config, path, data source or output folder that cannot run
        print(f"raylin: invalid config: {error}", file=sys.stderr)
        return 2
    except (RayClusterUnreachable, RunInProgress) as error:  # the cluster named is gone; another run holds output_dir
        print(f"raylin: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # not bad input: a bug, or a failure of the run itself
        if os.environ.get(LEVEL_ENV) == "verbose":
            raise
        # Where it was raised, and the message; the full trace (often deep in Ray or DeepSpeed) with --verbose.
        print("".join(traceback.format_exception(error, limit=-INTERNAL_ERROR_FRAMES)).rstrip(), file=sys.stderr)
        print(f"raylin: {args.command} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
              "raylin: run it again with --verbose for the full trace; if this looks like a bug in raylin, report it "
              "with that trace.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
