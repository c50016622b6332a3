"""Run configuration: YAML in, typed and validated dataclasses out.

Every run (``raylin convert CONFIG.yaml``) is described by one YAML file; ``--set key=value``
overrides any field by its dotted name (values are parsed as YAML). The whole config is checked
before any worker starts: unknown keys, wrong types, impossible values and missing teachers
raise ``ConfigError`` naming the field and the fix. See docs/config.md for every key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoConfig, PretrainedConfig

from raylin.data.audio import audio_source
from raylin.data.broad import broad_problems
from raylin.data.eval_sets import eval_set_problems
from raylin.data.shards import corpus_source
from raylin.distill.guidance import GuidanceSchedule, Waypoint
from raylin.distill.losses import LossWeights, loss_setting_problems
from raylin.errors import ConfigError
from raylin.models.families import family_for_config
from raylin.models.plan import Plan, PlanError
from raylin.models.teachers import resolve_teacher_path
from raylin.paths import unwritable_reason
from raylin.task_model import WHISPER_POSITIONS_PER_SECOND
from raylin.tasks import TASKS, TaskKind, task_kind
from raylin.tracking import check_tracking

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATA_SIZES = ("full", "quick")
TEACHER_MODES = ("served", "inprocess")
SERVED_DTYPES = ("bfloat16", "float16", "float32")


class _Problems:
    """Collects problems instead of stopping at the first, so one run of the checks reports them all."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def need(self, condition: bool, message: str) -> bool:
        if not condition:
            self.found.append(message)
        return bool(condition)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError(self.found)


@dataclass
class TaskConfig:
    type: str = "sequence_classification"
    num_labels: int = 2


@dataclass
class DataConfig:
    name: str = "rotten_tomatoes"  # per task: its registry entry's datasets (raylin.tasks)
    max_length: int = 128  # tokens (text); language modelling windows are exactly this long
    held_out: str | None = None  # causal_lm austen: the novel held out (default persuasion)
    max_seconds: float = 2.0  # speech classification: clips are cropped to this length (ctc: never cropped)
    size: str = "full"  # spoken_digits: full | quick (a smoke-test sized synthesis); DATA_SIZES
    source: dict[str, Any] = field(default_factory=dict)  # hub_audio: the audio (raylin.data.audio); corpus: the text (raylin.data.shards)
    shards_dir: str | None = None  # pile, corpus: where token shards are kept (default RAYLIN_CACHE/token_shards)
    eval_fraction: float = 0.1
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0


@dataclass
class WaypointConfig:
    step: int  # the student step from which this snapshot guides
    path: str  # a plain checkpoint folder (raylin finetune writes OUTPUT_DIR/snapshots/step_N)


@dataclass
class GuidanceConfig:
    mode: str = "target"
    teacher_update_every: int = 1  # T_u (trajectory)
    teacher_lr: float = 3e-5  # trajectory teacher's own learning rate
    waypoints: list[WaypointConfig] = field(default_factory=list)  # waypoint mode
    hybrid_cutoff: int | None = None  # hybrid


@dataclass
class LossConfig:
    alpha_task: float = 1.0
    alpha_layer: float = 1.0
    alpha_out: float = 0.0
    temperature: float = 2.0
    layers: list[int] | None = None  # hidden-state indices (0 = embeddings); default all
    normalization: str = "none"
    reduction: str = "sum"


@dataclass
class LitConfig:
    window: int = 50
    threshold: float = 0.01
    patience: int = 1
    warmup_steps: int = 20


@dataclass
class FreezeConfig:
    copied: bool = False  # XATL: start with copied weights frozen
    # Until when: "lit" (the loss-improvement threshold unfreezes them) or "end" (frozen for the whole
    # run and left out of the optimizer: no gradients and no optimizer state for them, which is what
    # fits a billion-parameter conversion into a small machine).
    until: str = "lit"
    lit: LitConfig = field(default_factory=LitConfig)


FREEZE_UNTIL = ("lit", "end")


@dataclass
class TrainConfig:
    num_workers: int = 2
    zero_stage: int = 2
    # ZeRO-3: parameters a worker holds gathered at once beyond its partition (DeepSpeed's
    # stage3_max_live_parameters and stage3_max_reuse_distance; 1e9 by DeepSpeed's default, which
    # keeps a model below a billion parameters whole on every worker). Larger: less communication.
    zero3_live_parameters: int = 50_000_000
    offload: bool = False
    precision: str = "auto"
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    max_steps: int = 300
    batch_size: int = 32  # global batch, split across workers
    lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # Ray Train keeps this many latest checkpoints (older ones are deleted)
    eval_every: int | None = None
    max_failures: int = 2
    seed: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with GPUs: below 1 leaves room for the node's teacher replica (e.g. 0.75 + 0.25)
    # Where Ray Train keeps checkpoints: a folder, or a URI every node reaches (s3://bucket/path,
    # gs://bucket/path). None: OUTPUT_DIR/ray. With a URI the run's outputs are copied there too.
    storage_path: str | None = None


@dataclass
class TeacherServiceConfig:
    mode: str = "served"  # served: Ray actors (raylin.teacher.pool) | inprocess: inside each training worker
    dtype: str = "bfloat16"  # dtype of served activations: bfloat16 | float16 | float32
    # dtype fixed teachers (target, waypoints, the align stage's) load and compute in: float32, or
    # bfloat16 / float16 to halve a replica's memory where the hardware multiplies them (GPUs,
    # AMX CPUs). The trajectory teacher trains and stays float32.
    weights_dtype: str = "float32"
    cpus: float = 1.0  # per replica (fractions allowed)
    gpus: float = 0.0  # per replica (fractions share a GPU)
    prefetch: bool = True  # ask for step s+1's activations while the student computes step s
    cache: bool = False  # activation cache for fixed teachers (target, hybrid, waypoints)
    cache_dir: str = "~/.cache/raylin/activations"
    cache_max_gb: float = 20.0


ALIGN_HOLDS = ("blocks", "model")


@dataclass
class AlignConfig:
    enabled: bool = False  # run the layer-parallel alignment stage before distillation
    steps: int = 100  # optimizer steps per layer
    batch_size: int = 16
    lr: float = 1e-3  # the new Mamba-family mixer weights (and, with parameters: all, the copied ones)
    # Linformer's length projections E/F start N(0, 1), some 30x the scale of a linear layer's
    # weights: at ``lr`` they barely move in a short alignment, so they get their own rate.
    projection_lr: float = 3e-2
    num_workers: int = 2  # Ray tasks; layers are spread round-robin across them
    parameters: str = "new"  # new: only the new mixer weights learn | all: the whole block
    # blocks: each task builds only the blocks it aligns, from those blocks' teacher weights (memory
    # follows blocks per task) | model: each task builds the whole student. Same result either way.
    holds: str = "blocks"
    # A store of aligned blocks shared across runs, keyed by what the alignment depends on (teacher,
    # plan, data, align settings): runs that align the same way align once. None: OUTPUT_DIR/aligned.
    dir: str | None = None


@dataclass
class TrackingConfig:
    """Experiment tracking (raylin.tracking): rank 0 logs the train log's records, the driver the results."""

    backend: str = "none"  # none | mlflow | wandb | tensorboard
    experiment: str = "raylin"  # MLflow experiment / W&B project
    # MLflow: tracking URI (default: a file store at OUTPUT_DIR/mlruns); TensorBoard: the log folder
    # (default OUTPUT_DIR/tensorboard); W&B: unused (WANDB_MODE, WANDB_BASE_URL in the environment).
    uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class BroadConfig:
    """The broad-data stage (raylin.data.broad): unlabeled data broader than the task's, for alignment."""

    enabled: bool = False
    data: str = "auto"  # auto: the task's built-in (text: passages; speech: voices) | passages | voices
    source: dict[str, Any] = field(default_factory=dict)  # a local / Hub source instead (eval-set keys)
    examples: int = 2000  # broad examples joining the align stage's training examples
    augment: bool = True  # speech: broad clips are augmented (raylin.data.augment)
    train_copies: int = 0  # speech: augmented copies of every training clip join distillation's training set
    seed: int = 0


@dataclass
class EvalSetConfig:
    """An evaluation set beyond the held-out split (raylin.data.eval_sets): a built-in name, or a source."""

    name: str
    source: dict[str, Any] = field(default_factory=dict)  # empty: the built-in set ``name``
    max_examples: int | None = None  # default: data.max_eval_examples


# Field metadata of the RunConfig sections only a conversion reads: the student's plan, its guidance
# and losses, freezing, the teacher service and the student's own stages (align, broad data). The
# teacher's fine-tuning run (``raylin finetune``, ``teacher_run``) leaves them out: the teacher
# learns the task as the config gives it, whatever the student's recipe.
CONVERSION_ONLY = {"run": "conversion"}


@dataclass
class RunConfig:
    teacher: str  # the pretrained (source) model: folder, Hub id or asset:NAME
    output_dir: str
    plan: Plan = field(metadata=CONVERSION_ONLY)  # parsed by Plan.from_mapping (raylin.models.plan)
    target_teacher: str | None = field(default=None, metadata=CONVERSION_ONLY)  # the fine-tuned teacher (target and hybrid guidance)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig, metadata=CONVERSION_ONLY)
    loss: LossConfig = field(default_factory=LossConfig, metadata=CONVERSION_ONLY)
    freeze: FreezeConfig = field(default_factory=FreezeConfig, metadata=CONVERSION_ONLY)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_service: TeacherServiceConfig = field(default_factory=TeacherServiceConfig, metadata=CONVERSION_ONLY)
    align: AlignConfig = field(default_factory=AlignConfig, metadata=CONVERSION_ONLY)
    broad: BroadConfig = field(default_factory=BroadConfig, metadata=CONVERSION_ONLY)
    # Out-of-distribution sets scored for teacher and student (retention); None: the data set's defaults.
    eval_sets: list[EvalSetConfig] | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    name: str | None = None  # run name (resume key); default: the output folder's name

    # ----- resolved views -----------------------------------------------------------------------
    # Teacher paths and config.json files are read once per process: memoised under the value they
    # derive from (a changed field resolves anew) and never pickled, so a Ray worker resolves them on
    # its own node. The task kind and the schedule are cheap and built on each call.
    def _once(self, key: tuple, make):
        memo = self.__dict__.setdefault("_resolved", {})
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_resolved"}

    @property
    def run_name(self) -> str:
        return self.name or Path(self.output_dir).name

    @property
    def task_kind(self) -> TaskKind:
        """The task registry's entry for ``task.type`` (raylin.tasks)."""
        return task_kind(self.task.type)

    @property
    def schedule(self) -> GuidanceSchedule:
        """The guidance schedule (raylin.distill.guidance): who guides each step, with which weights."""
        g, loss = self.guidance, self.loss
        return GuidanceSchedule(
            g.mode,
            LossWeights(loss.alpha_task, loss.alpha_layer, loss.alpha_out),
            teacher_update_every=g.teacher_update_every,
            waypoints=[Waypoint(w.step, w.path) for w in g.waypoints],
            hybrid_cutoff=g.hybrid_cutoff,
        )

    @property
    def conversion_source(self) -> str:
        """The model the student is converted from: the target teacher when the guidance mode
        starts the student there (target, hybrid), else the pretrained teacher."""
        return self.target_teacher if self.schedule.student_starts_from_target else self.teacher

    def teacher_path(self, which: str = "conversion_source") -> str:
        """The local folder (or Hub id) of ``teacher``, ``target_teacher`` or ``conversion_source``."""
        name = getattr(self, which)
        return self._once(("path", name), lambda: resolve_teacher_path(name))  # model_config shares this memo

    def teacher_config(self, which: str = "conversion_source") -> PretrainedConfig:
        """The transformers config (config.json, no weights) of ``teacher``, ``target_teacher`` or
        ``conversion_source``."""
        return self.model_config(getattr(self, which))

    def model_config(self, name: str) -> PretrainedConfig:
        """The transformers config of any model this run reads (a teacher, a waypoint, a folder
        raylin wrote), by folder, Hub id or asset:NAME: read once per process."""
        path = self._once(("path", name), lambda: resolve_teacher_path(name))
        return self._once(("config", path), lambda: AutoConfig.from_pretrained(path, trust_remote_code=False))

    def to_dict(self) -> dict[str, Any]:
        """The config as the mapping it was read from (what config.yaml holds and fingerprints cover)."""
        data = dataclasses.asdict(self)
        data["plan"] = self.plan.to_dict()
        return data


# ----- loading --------------------------------------------------------------------------------


RUNS = ("conversion", "teacher")  # what a config describes: a conversion, or its teacher's fine-tuning


def read_yaml_file(path: str | Path, what: str = "Config file") -> Any:
    """The YAML document in ``path``; ConfigError naming the file when it is missing, unreadable,
    not UTF-8 text (a binary file, another encoding) or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist{' (it is a folder)' if path.is_dir() else ''}; "
                          "give the path of a YAML file (e.g. raylin/configs/minilm-rt-linformer.yaml).")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}): "
                          "a config is a YAML text file; check the path, or save the file as UTF-8.") from None
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read ({error.strerror}); check its permissions.") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None


def load_config(path: str | Path, overrides: list[str] | None = None, run: str = "conversion") -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate everything. ``run="teacher"``:
    the config of the teacher's fine-tuning run the file describes (``teacher_run_mapping``)."""
    return config_from_dict(read_yaml_file(path) or {}, overrides, run)


def conversion_only_keys() -> tuple[str, ...]:
    """The RunConfig sections a teacher's fine-tuning run leaves out (marked CONVERSION_ONLY)."""
    return tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("run") == "conversion")


def teacher_run_mapping(data: dict[str, Any]) -> dict[str, Any]:
    """The teacher's fine-tuning run described by a run config's mapping: the conversion-only
    sections (the student's plan, guidance, losses, freezing, teacher service, align and broad
    stages) left out, so they take their defaults and never decide or change the teacher's run;
    unguided (the task loss alone), with a plan that keeps every attention layer (the "student" is
    the teacher's own architecture)."""
    kept = {key: copy.deepcopy(value) for key, value in data.items() if key not in conversion_only_keys()}
    kept["plan"] = _whole_teacher_plan(kept.get("teacher"))
    kept["guidance"] = {"mode": "unguided"}  # the teacher learns from the task alone
    return kept


def _whole_teacher_plan(teacher: Any) -> dict[str, Any]:
    """A plan keeping every attention layer of ``teacher``; a placeholder when the teacher cannot be
    read (validation then names that problem)."""
    try:
        teacher_config = AutoConfig.from_pretrained(resolve_teacher_path(teacher), trust_remote_code=False)
        family = family_for_config(teacher_config)
    except (OSError, ValueError, TypeError):
        return {"mixer": "mamba2", "keep_attention": []}
    return {"mixer": "mamba2" if family.causal else "bimamba2",
            "keep_attention": list(range(family.num_layers(teacher_config)))}


def teacher_run(config: RunConfig) -> RunConfig:
    """The run that fine-tunes ``config``'s teacher on its task (``teacher_run_mapping``), validated."""
    return config_from_dict(config.to_dict(), run="teacher")


def merge_sections(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in section by section (nested mappings merge, other values
    replace); a new dict, neither argument is changed."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_sections(merged[key], value) if both else copy.deepcopy(value)
    return merged


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, run: str = "conversion") -> RunConfig:
    """A validated RunConfig from a config's mapping and ``key=value`` overrides. ``run``: what the
    mapping is to describe, a conversion or its teacher's fine-tuning (``teacher_run_mapping``)."""
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    if not isinstance(data, dict):
        raise ConfigError(f"A config must be a mapping of keys to values (e.g. `teacher: asset:all-minilm-l6`), "
                          f"got {type(data).__name__}.")
    data = apply_overrides(data, overrides or [])
    problems = _Problems()
    if run == "teacher":
        _check_conversion_sections(data, problems)
        data = teacher_run_mapping(data)
    if isinstance(data.get("eval_sets"), list):  # a bare name stands for {name: NAME} (a built-in set)
        data["eval_sets"] = [{"name": entry} if isinstance(entry, str) else entry for entry in data["eval_sets"]]
    config = _build(RunConfig, data, "", problems)
    if config is None:  # a required key is missing or unusable: nothing further can be checked
        problems.raise_any()
    _absolute_paths(config)
    validate(config, problems)
    return config


def _check_conversion_sections(data: dict[str, Any], problems: _Problems) -> None:
    """For a teacher's run: the conversion-only sections it leaves out still have to be well formed
    (known keys, right types, a plan that parses), so that a typo is found before the teacher's run
    and not hours later by the conversion; what they name (target teacher, waypoints) may not exist yet."""
    hints = typing.get_type_hints(RunConfig)
    for key in conversion_only_keys():
        if key in data:
            _coerce(hints[key], data[key], key, problems)


def recorded_config(data: Any) -> RunConfig | None:
    """The config a run recorded (its config.yaml, as ``dump_config`` wrote it), with today's defaults
    for keys added to raylin since; None when it cannot be read as a config. Not validated: its
    teachers and data may have moved since, and it is only compared with the config at hand."""
    problems = _Problems()
    config = _build(RunConfig, data, "", problems) if isinstance(data, dict) else None
    return None if config is None or problems.found else config


def _absolute_paths(config: RunConfig) -> None:
    """Make local paths absolute: Ray Train workers run in their own working directory."""
    config.output_dir = str(Path(config.output_dir).expanduser().resolve())
    for source in [entry.source for entry in config.eval_sets or []] + [config.broad.source]:
        path = source.get("path") if isinstance(source, dict) else None
        if isinstance(path, str) and path and Path(path).expanduser().exists():
            source["path"] = str(Path(path).expanduser().resolve())
    if config.align.dir:
        config.align.dir = str(Path(config.align.dir).expanduser().resolve())
    local = lambda path: str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path
    config.teacher, config.target_teacher = local(config.teacher), local(config.target_teacher)
    for waypoint in config.guidance.waypoints:
        waypoint.path = local(waypoint.path)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} must look like key=value (e.g. train.max_steps=100).")
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {key}: {part} is not a section.")
        node[last] = yaml.safe_load(raw)
    return data


def _build(cls, data: Any, prefix: str, problems: _Problems):
    """``cls`` built from ``data``; a wrong value is recorded in ``problems`` and its default used, so
    later keys are still checked. None when a required key is missing or wrong, or ``data`` is not a mapping."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "config"
        problems.need(False, f"{section} must be a mapping of keys to values (e.g. `{section}: {{key: value}}`), "
                             f"got {data!r}.")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    problems.need(not unknown, f"Unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {sorted(fields)}.")
    values, complete = {}, True
    for name, spec in fields.items():
        dotted = prefix + name
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if name not in data:
            complete &= problems.need(not required, f"Missing required config key {dotted!r}.")
            continue
        value = _coerce(hints[name], data[name], dotted, problems)
        if value is _INVALID:
            complete &= not required
            continue
        values[name] = value
    return cls(**values) if complete else None


def build_section(cls, data: Any, prefix: str):
    """A config dataclass ``cls`` (e.g. a sweep's ``tune:`` section) from ``data``, its keys named
    under ``prefix``; raises one ConfigError listing every unknown key and wrong type."""
    problems = _Problems()
    built = _build(cls, data, prefix, problems)
    problems.raise_any()
    return built


_INVALID = object()  # a section that could not be built (its problems are recorded)


def _coerce(hint, value, dotted: str, problems: _Problems):
    """``value`` as type ``hint``, or _INVALID with the problem recorded."""
    if hint is Plan:
        try:
            return Plan.from_mapping(value)
        except PlanError as error:
            problems.need(False, str(error))
            return None  # unusable, but the rest of the config is still checked (the plan's checks skip it)
    if dataclasses.is_dataclass(hint):
        built = _build(hint, value, dotted + ".", problems)
        return _INVALID if built is None else built
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, dotted, problems)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if origin is list and isinstance(value, list):
        if not args:
            return value
        items = [_coerce(args[0], v, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(item is _INVALID for item in items) else items
    if origin is dict and isinstance(value, dict):
        return value
    if hint is Any:
        return value
    expected = getattr(hint, "__name__", str(hint))
    problems.need(False, f"Config key {dotted!r} must be {expected}, got {value!r}.")
    return _INVALID


def validate(config: RunConfig, problems: _Problems | None = None) -> None:
    """Checks that need more than types, all of them: raises one ConfigError listing every problem
    (with those already in ``problems``), each naming the key and the fix. Reads the teachers'
    config.json files (no weights) and checks that the output folder can be written."""
    problems = problems or _Problems()
    need = problems.need

    task_ok = need(config.task.type in TASKS, f"task.type {config.task.type!r} is unknown; choose one of {TASKS}.")
    need(config.task.num_labels >= 1, "task.num_labels must be >= 1.")

    datasets = tuple(config.task_kind.datasets) if task_ok else ()
    need(not task_ok or config.data.name in datasets,
         f"data.name {config.data.name!r} is not a {config.task.type} data set; choose one of {datasets}.")
    if task_ok and config.data.name in ("hub_audio", "corpus"):
        try:
            (audio_source(config.data.source, config.task_kind) if config.data.name == "hub_audio"
             else corpus_source(config.data.source))
        except ValueError as error:
            need(False, str(error))
    else:
        need(not config.data.source, f"data.source is read for data.name hub_audio or corpus only; data.name "
             f"{config.data.name!r} has its own source: remove data.source (or set data.name corpus).")
    need(config.data.size in DATA_SIZES, f"data.size must be one of {DATA_SIZES}, got {config.data.size!r}.")
    need(config.data.max_seconds > 0, f"data.max_seconds must be > 0, got {config.data.max_seconds}.")
    need(0 < config.data.eval_fraction < 1, "data.eval_fraction must be between 0 and 1.")
    for key in ("max_train_examples", "max_eval_examples"):
        value = getattr(config.data, key)
        need(value is None or value >= 1, f"data.{key} must be >= 1 (or null: all), got {value}.")
    need(config.data.seed >= 0, f"data.seed must be >= 0, got {config.data.seed}.")
    need(config.data.max_length >= 8, "data.max_length must be >= 8.")
    g = config.guidance
    loss = config.loss
    for problem in loss_setting_problems(loss.temperature, loss.normalization, loss.reduction):
        need(False, problem)
    try:
        need(not config.schedule.student_starts_from_target or config.target_teacher is not None,
             f"guidance.mode {g.mode!r} distils from a fine-tuned teacher: set target_teacher to the fine-tuned "
             "checkpoint folder, or use guidance.mode unguided.")
    except (ValueError, TypeError) as error:
        need(False, str(error))
    need(g.teacher_lr > 0, f"guidance.teacher_lr must be > 0 (the trajectory teacher's own rate), got {g.teacher_lr}.")
    lit = config.freeze.lit
    need(lit.window >= 1 and lit.patience >= 1, f"freeze.lit.window and freeze.lit.patience must be >= 1, got "
         f"{lit.window} and {lit.patience}.")
    need(lit.warmup_steps >= 0, f"freeze.lit.warmup_steps must be >= 0, got {lit.warmup_steps}.")
    need(config.freeze.until in FREEZE_UNTIL, f"freeze.until must be one of {FREEZE_UNTIL}, got {config.freeze.until!r}.")
    t = config.train
    need(t.num_workers >= 1, "train.num_workers must be >= 1.")
    need(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}.")
    need(t.zero3_live_parameters >= 1, f"train.zero3_live_parameters must be >= 1, got {t.zero3_live_parameters}.")
    need(t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}.")
    need(t.max_steps >= 1, "train.max_steps must be >= 1.")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1 (the global batch, split across workers), got {t.batch_size}.")
    cap = config.data.max_train_examples
    need(cap is None or cap < 1 or cap >= t.batch_size,
         f"data.max_train_examples {cap} cannot fill one global batch (train.batch_size {t.batch_size}); raise "
         f"data.max_train_examples to at least {t.batch_size}, or lower train.batch_size.")
    need(t.precision != "fp16" or t.use_gpu is not False,
         "train.precision fp16 needs GPUs and train.use_gpu is false; use bf16 or fp32 on CPU (or auto).")
    need(not t.offload or t.zero_stage >= 1,
         "train.offload moves ZeRO's optimizer state to CPU memory and needs train.zero_stage >= 1; "
         "set train.zero_stage: 2 (or 3), or train.offload: false.")
    need(t.num_workers < 1 or t.batch_size % t.num_workers == 0,
         f"train.batch_size={t.batch_size} must be divisible by train.num_workers={t.num_workers}.")
    need(t.lr > 0, "train.lr must be > 0.")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0 (0: none), got {t.weight_decay}.")
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (the largest gradient norm; 0: no clipping), got {t.grad_clip}.")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}.")
    need(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}.")
    need(t.max_failures >= 0, f"train.max_failures must be >= 0 (restarts from the latest checkpoint), got {t.max_failures}.")
    need(0 < t.gpus_per_worker <= 1, f"train.gpus_per_worker must be in (0, 1], got {t.gpus_per_worker}.")
    need(t.cpus_per_worker > 0, f"train.cpus_per_worker must be > 0, got {t.cpus_per_worker}.")
    need(t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1.")
    for problem in check_tracking(config.tracking):
        need(False, problem)
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1 (the run resumes from the latest).")
    need(t.eval_every is None or t.eval_every >= 0, f"train.eval_every must be >= 0 (0 or null: at the end only), got {t.eval_every}.")
    if need(bool(config.output_dir), "output_dir must be set."):
        _check_writable(Path(config.output_dir), "output_dir", need)
    ts = config.teacher_service
    need(ts.mode in TEACHER_MODES, f"teacher_service.mode must be one of {TEACHER_MODES}, got {ts.mode!r}.")
    need(ts.dtype in SERVED_DTYPES, f"teacher_service.dtype must be one of {SERVED_DTYPES}, got {ts.dtype!r}.")
    need(ts.weights_dtype in SERVED_DTYPES,
         f"teacher_service.weights_dtype must be one of {SERVED_DTYPES}, got {ts.weights_dtype!r}.")
    need(ts.cpus >= 0 and ts.gpus >= 0, "teacher_service.cpus and teacher_service.gpus must be >= 0.")
    need(ts.cache_max_gb > 0, f"teacher_service.cache_max_gb must be > 0, got {ts.cache_max_gb}.")
    a = config.align
    need(a.steps >= 1 and a.batch_size >= 1 and a.num_workers >= 1 and a.lr > 0 and a.projection_lr > 0,
         "align.steps, align.batch_size, align.num_workers, align.lr and align.projection_lr must be positive.")
    need(a.parameters in ("new", "all"), f"align.parameters must be 'new' or 'all', got {a.parameters!r}.")
    need(a.holds in ALIGN_HOLDS, f"align.holds must be one of {ALIGN_HOLDS} (blocks: each task builds only its "
         f"blocks; model: the whole student), got {a.holds!r}.")

    for problem in (eval_set_problems(config) + broad_problems(config)) if task_ok else []:
        need(False, problem)
    teachers = {"teacher": config.teacher, "target_teacher": config.target_teacher}
    teacher_configs = {key: _teacher_config(config, key, need) for key, path in teachers.items() if path}
    tuned = teacher_configs.get("target_teacher")
    # A config says its labels whether or not its model has a head (transformers' default is 2): only
    # a checkpoint saved with a classification head (its `architectures`) is held to them.
    has_head = any(name.endswith("Classification") for name in getattr(tuned, "architectures", None) or [])
    if task_ok and has_head and config.task_kind.classifies:
        head = len(getattr(tuned, "id2label", None) or {}) or getattr(tuned, "num_labels", None)
        need(not head or head == config.task.num_labels,
             f"target_teacher {config.target_teacher!r} has a task head of {head} labels but task.num_labels is "
             f"{config.task.num_labels}; set task.num_labels: {head} (what the teacher was fine-tuned with).")
    if tuned is not None and teacher_configs.get("teacher") is not None:
        _check_teacher_pair(config, teacher_configs["teacher"], tuned, need)
    # The student is converted from (and shaped like) the target teacher when there is one.
    shape = tuned or teacher_configs.get("teacher")
    if shape is not None:
        _check_against_teacher(config, shape, need)
    problems.raise_any()


def _teacher_config(config: RunConfig, key: str, need):
    """The teacher's transformers config (its config.json: no weights are read; kept for the run's
    later reads), or None with the problem recorded."""
    teacher = getattr(config, key)
    try:
        return config.teacher_config(key)
    except (OSError, ValueError) as error:
        fix = ("a folder with config.json (e.g. made by `raylin finetune`), a Hub id, or asset:NAME"
               if key == "target_teacher" else "a folder with config.json, a Hub id, or asset:NAME")
        need(False, f"{key} {teacher!r} cannot be read ({str(error).splitlines()[0]}); set it to {fix}.")
        return None


def _check_against_teacher(config: RunConfig, teacher_config, need) -> None:
    """The plan and the layer indices of the loss against the teacher's shape."""
    try:
        family = family_for_config(teacher_config)
    except ValueError as error:
        need(False, str(error))
        return
    try:
        if config.plan is not None:  # None: it did not parse (reported with the other problems)
            config.plan.check_against(family, teacher_config)
    except ValueError as error:
        need(False, str(error))
    _check_lengths(config, family, teacher_config, need)
    states = family.num_layers(teacher_config) + 1  # hidden states: the embeddings, then one per block
    need(config.loss.layers is None or bool(config.loss.layers),
         "loss.layers is empty; list hidden-state indices (0 = embeddings), or leave it unset (null) for all.")
    wrong = [i for i in config.loss.layers or [] if not 0 <= i < states]
    need(not wrong, f"loss.layers lists {wrong}, but the teacher has {states} hidden states (0 = embeddings, "
                    f"1..{states - 1} = blocks); use indices in 0..{states - 1}, or leave loss.layers unset for all.")


def _check_teacher_pair(config: RunConfig, source, tuned, need) -> None:
    """The target teacher must be the pretrained teacher fine-tuned: the same family, width, layer
    count and vocabulary (the student starts from one and distils from the other; logits are
    compared token for token)."""
    try:
        families = family_for_config(source), family_for_config(tuned)
    except ValueError:
        return  # each unknown family is reported with the teacher it belongs to
    shapes = [(family.name, family.hidden_size(c), family.num_layers(c), getattr(c, "vocab_size", None))
              for family, c in zip(families, (source, tuned))]
    names = ("family", "width", "layers", "vocabulary")
    differ = [f"{name} {a} vs {b}" for name, a, b in zip(names, *shapes) if a != b]
    need(not differ, f"target_teacher {config.target_teacher!r} is not a fine-tuned copy of teacher {config.teacher!r} "
         f"({', '.join(differ)}); set target_teacher to `raylin finetune`'s output for this teacher "
         "(OUTPUT_DIR/teacher), or teacher to the model it was fine-tuned from.")


def _check_lengths(config: RunConfig, family, teacher_config, need) -> None:
    """The inputs' length against what the teacher takes: data.max_length tokens within its
    positions (text), data.max_seconds (the crop of a classified clip) within the Whisper encoder's window."""
    longest = family.max_length(teacher_config)
    if family.modality == "text" and longest:
        need(config.data.max_length <= longest,
             f"data.max_length {config.data.max_length} is longer than the teacher takes ({longest} positions: "
             f"max_position_embeddings of {family.name}); set data.max_length to at most {longest}.")
    crops = config.task.type in TASKS and config.task_kind.classifies  # CTC clips are never cropped
    if family.name == "whisper" and longest and crops:
        seconds = longest / WHISPER_POSITIONS_PER_SECOND
        need(config.data.max_seconds <= seconds,
             f"data.max_seconds {config.data.max_seconds:g} is longer than the Whisper encoder hears ({seconds:g} s: "
             f"{longest} positions); set data.max_seconds to at most {seconds:g}.")


def _check_writable(path: Path, key: str, need) -> None:
    """``path`` exists as a writable folder, or can be made under its nearest existing parent."""
    reason = unwritable_reason(path)
    need(reason is None, f"{key} {str(path)!r} cannot be written: {reason}.")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
