"""The teachers of one run and how they answer a batch: shared by the in-process teacher and the
Ray-actor replicas of the teacher service, so both compute exactly the same thing.

A ``TeacherRequest`` names the teacher the guidance schedule picked for the step ("target",
"trajectory", or a waypoint snapshot's path) and carries the batch as numpy arrays. The bank
returns the hidden states the loss needs (``TeacherSpec.layers``) and the logits when output KD is
on, in a compact dtype (``TeacherSpec.dtype``, bfloat16 by default): that rounding is part of the
loss definition wherever the teacher runs, which is why in-process and served teachers give
identical losses.

The trajectory teacher trains inside the bank: every micro-batch's task loss is back-propagated
(scaled by 1 / (T_u x micro-batches per step)) right after its targets are taken, and the optimizer
steps once the last micro-batch of an update step has arrived. Its targets for step s are therefore
the teacher's states before its update at s. Fixed teachers can read and fill an ActivationCache.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from raylin.distill.losses import task_loss
from raylin.fault_injection import FaultPlan
from raylin.models.families import family_for, state_mask
from raylin.models.teachers import load_teacher
from raylin.optim import adamw
from raylin.tasks import TASK_KINDS, TaskKind
from raylin.teacher.activation_cache import ActivationCache, cache_namespace

COMPACT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STATES = ("hidden_states", "layer_io")


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher holder needs: which checkpoints, what to return, how to train the trajectory teacher."""

    model_class: str  # transformers class with the task head, e.g. "AutoModelForSequenceClassification"
    num_labels: int
    task: TaskKind = TASK_KINDS["sequence_classification"]
    load_options: tuple[tuple[str, Any], ...] = ()  # further from_pretrained arguments (Whisper's positions)
    target: str | None = None  # the fixed fine-tuned teacher (target / hybrid)
    source: str | None = None  # the pretrained model the trajectory teacher starts from
    trajectory_lr: float = 3e-5
    trajectory_every: int = 1  # T_u
    hidden: bool = True  # serve hidden states (the layerwise loss is on)
    layers: tuple[int, ...] | None = None  # which hidden-state indices; None = all
    logits: bool = False  # serve logits (output KD is on)
    states: str = "hidden_states"  # "hidden_states" (transformers' output) or "layer_io" (each block's input + last output)
    dtype: str = "bfloat16"
    weights_dtype: str = "float32"  # fixed teachers' weights (the trajectory teacher stays float32)
    cache_dir: str | None = None  # activation cache folder for fixed teachers (None: off)
    cache_max_bytes: int = 0
    data_key: str = ""  # identity of the data set and tokenisation (cache key)
    fault: str | None = None  # RAYLIN_TEST_FAULT (raylin.fault_injection) of the run, and its marker folder
    fault_dir: str | None = None

    def __post_init__(self) -> None:
        for key in ("dtype", "weights_dtype"):
            if getattr(self, key) not in COMPACT_DTYPES:
                raise ValueError(f"teacher_service.{key} must be one of {sorted(COMPACT_DTYPES)}, got {getattr(self, key)!r}.")
        if self.states not in STATES:
            raise ValueError(f"states must be one of {STATES}, got {self.states!r}.")


@dataclass
class TeacherRequest:
    step: int
    teacher: str  # "target", "trajectory" or a waypoint path (raylin.distill.guidance.StepGuidance.teacher)
    inputs: dict[str, np.ndarray]  # model inputs of this micro-batch
    labels: np.ndarray | None = None  # the trajectory teacher's task targets
    example_ids: list[int] | None = None  # cache keys (training-split indices)
    update_teacher: bool = False  # trajectory: this step ends a T_u window
    micro_batches: int = 1  # micro-batches that make up the global batch of this step (workers)


@dataclass
class TeacherOutput:
    hidden_states: list[torch.Tensor | None]  # one entry per state index; None where not served
    logits: torch.Tensor | None


def teacher_loader(spec: TeacherSpec) -> Callable[[str], torch.nn.Module]:
    """``path -> model`` loading a teacher checkpoint with the task head the spec names, directly in
    ``spec.weights_dtype`` (the trajectory teacher, which trains, in float32)."""
    options = dict(spec.load_options)

    def load(path: str) -> torch.nn.Module:
        dtype = torch.float32 if path == spec.source else COMPACT_DTYPES[spec.weights_dtype]
        return load_teacher(path, model_class=spec.model_class, num_labels=spec.num_labels, dtype=dtype, **options)[0]

    return load


# ----- compact wire format: numpy arrays (zero-copy through Ray's object store) ---------------------


def pack(output: TeacherOutput, dtype: str) -> dict[str, Any]:
    served = [i for i, h in enumerate(output.hidden_states) if h is not None]
    hidden = torch.stack([output.hidden_states[i] for i in served]) if served else None
    return {"dtype": dtype, "num_states": len(output.hidden_states), "layers": served,
            "hidden": _to_numpy(hidden), "logits": _to_numpy(output.logits)}


def unpack(message: dict[str, Any], device: torch.device | str = "cpu") -> TeacherOutput:
    dtype = COMPACT_DTYPES[message["dtype"]]
    hidden = _from_numpy(message["hidden"], dtype, device)
    states: list[torch.Tensor | None] = [None] * message["num_states"]
    for position, index in enumerate(message["layers"]):
        states[index] = hidden[position]
    return TeacherOutput(states, _from_numpy(message["logits"], dtype, device))


def _to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    if tensor is None:
        return None
    tensor = tensor.detach().cpu().contiguous()
    # numpy has no bfloat16: ship its bits as int16 and reinterpret on arrival (no copy either way).
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _from_numpy(array: np.ndarray | None, dtype: torch.dtype | None, device) -> torch.Tensor | None:
    if array is None:
        return None
    with warnings.catch_warnings():  # arrays from the object store are read-only; we never write them
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device)


# ----- the bank --------------------------------------------------------------------------------------


class TeacherBank:
    """Holds a run's teachers (loaded on first use) and computes their outputs for requests.

    ``load(path)`` returns a transformers model with the task head; ``grad_sync`` (in-process
    teachers) averages the trajectory teacher's gradients across workers before its step.
    """

    def __init__(self, spec: TeacherSpec, load: Callable[[str], torch.nn.Module], device: torch.device,
                 grad_sync: Callable[[torch.nn.Module], None] | None = None):
        self.spec, self._load, self.device, self._grad_sync = spec, load, device, grad_sync
        self._models: dict[str, torch.nn.Module] = {}
        self._optimizer = None
        self._received: dict[int, int] = {}  # trajectory: micro-batches seen per step
        self.updated_through = -1  # trajectory: last step whose update has been applied
        self.loads = 0  # checkpoints loaded (a waypoint run loads one per snapshot)
        self.forwards = 0  # teacher forward passes (one per computed micro-batch)
        self.examples_forwarded = 0
        self.cache = ActivationCache(spec.cache_dir, spec.cache_max_bytes) if spec.cache_dir else None
        self._namespaces: dict[str, str] = {}
        self.faults = FaultPlan(spec.fault, spec.fault_dir)
        if spec.source is not None:
            model = load(spec.source)
            model.train()
            self.loads += 1
            self._models["trajectory"] = model
            self._optimizer = adamw(model.parameters(), lr=spec.trajectory_lr)

    # ----- models ---------------------------------------------------------------------------------
    def model(self, name: str) -> torch.nn.Module:
        key = self.spec.target if name == "target" else name
        if key is None:
            raise ValueError("The guidance asked for the target teacher but the run has no target_teacher.")
        if key not in self._models:
            # Waypoints replace each other: keep the fixed teachers and the current snapshot only.
            for old in [k for k in self._models if k not in ("trajectory", self.spec.target)]:
                del self._models[old]
            self._models[key] = self._load(key).to(self.device).eval()
            self.loads += 1
        return self._models[key]

    def last_update_before(self, step: int) -> int:
        """The latest trajectory update step < ``step`` (-1 if none): it must be applied before serving ``step``."""
        every = self.spec.trajectory_every
        return (step // every) * every - 1

    # ----- serving ----------------------------------------------------------------------------------
    def compute(self, request: TeacherRequest) -> TeacherOutput:
        self.faults.before_teacher_request(request.step)
        inputs = {k: _from_numpy(v, None, self.device) for k, v in request.inputs.items()}
        if request.teacher == "trajectory":
            return self._trajectory(request, inputs)
        if self.cache is not None and request.example_ids is not None:
            return self._cached(request, inputs)
        with torch.no_grad():
            return self._forward(self.model(request.teacher), inputs)

    def _forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> TeacherOutput:
        self.forwards += 1
        self.examples_forwarded += next(iter(inputs.values())).shape[0]
        spec, dtype = self.spec, COMPACT_DTYPES[self.spec.dtype]
        weights = next(model.parameters()).dtype  # audio and features in the weights' dtype
        inputs = {k: v.to(weights) if v.is_floating_point() else v for k, v in inputs.items()}
        if spec.states == "layer_io":
            with family_for(model).capture_layer_io(model) as record:
                out = model(**inputs)
            states = list(record["inputs"]) + [record["outputs"][-1]]
        else:
            out = model(**inputs, output_hidden_states=spec.hidden)
            states = list(out.hidden_states) if spec.hidden else []
        keep = set(range(len(states)) if spec.layers is None else spec.layers) if spec.hidden else set()
        hidden = [h.detach().to(dtype) if i in keep else None for i, h in enumerate(states)]
        logits = out.logits.detach().to(dtype) if spec.logits else None
        return TeacherOutput(hidden, logits)

    def _cached(self, request: TeacherRequest, inputs: dict[str, torch.Tensor]) -> TeacherOutput:
        """Read each example from the cache; run the teacher on the misses only and store them. An entry
        keeps the real positions only (tokens, Wav2Vec2 frames; Whisper's are all real).

        Padded raw audio (Wav2Vec2 / HuBERT) misses are run one clip at a time, unpadded: the
        group-norm feature encoder of the base models normalises over the padding too, so a clip's
        states would otherwise depend on the batch that first computed them. Entries are then each
        clip's own states, whatever the batch; uncached forwards see their batch's padding."""
        namespace = self._namespace(request.teacher)
        model = self.model(request.teacher)
        mask = state_mask(model, inputs)
        rows = next(iter(inputs.values())).shape[0]
        real = [mask[r].bool() if mask is not None else slice(None) for r in range(rows)]
        entries = [self.cache.get(namespace, i) for i in request.example_ids]
        missing = [r for r, entry in enumerate(entries) if entry is None]
        alone = "input_values" in inputs and "attention_mask" in inputs
        groups = [[r] for r in missing] if alone else [missing] if missing else []
        for group in groups:
            batch = {k: v[group] for k, v in inputs.items()}
            if alone:  # trim the clip to its real samples
                length = int(batch["attention_mask"].sum())
                batch = {k: v[:, :length] for k, v in batch.items()}
            with torch.no_grad():
                fresh = self._forward(model, batch)
            for position, r in enumerate(group):
                keep = slice(None) if alone else real[r]
                entry = {f"h{i}": h[position][keep] for i, h in enumerate(fresh.hidden_states) if h is not None}
                if fresh.logits is not None:
                    logits = fresh.logits[position]
                    entry["logits"] = logits[keep] if logits.dim() == 2 and mask is not None else logits
                self.cache.put(namespace, request.example_ids[r], entry)
                entries[r] = entry
        return self._assemble(entries, real, mask, rows, num_states=self._num_states(model))

    def _assemble(self, entries, real, mask, rows: int, num_states: int) -> TeacherOutput:
        first = entries[0]
        indices = sorted(int(k[1:]) for k in first if k.startswith("h"))
        if mask is not None:
            length = mask.shape[1]
        elif indices:  # unmasked inputs (Whisper's mel frames): the states set the length
            length = first[f"h{indices[0]}"].shape[0]
        else:  # no states kept: per-position logits set the length
            length = first["logits"].shape[0] if "logits" in first and first["logits"].dim() == 2 else 0
        hidden: list[torch.Tensor | None] = [None] * num_states
        for i in indices:
            sample = first[f"h{i}"]
            batch = torch.zeros(rows, length, sample.shape[-1], dtype=sample.dtype, device=self.device)
            for r, entry in enumerate(entries):
                batch[r][real[r]] = entry[f"h{i}"].to(self.device)
            hidden[i] = batch
        logits = None
        if "logits" in first:
            sample = first["logits"]
            if sample.dim() == 2:  # per-token logits (causal LM)
                logits = torch.zeros(rows, length, sample.shape[-1], dtype=sample.dtype, device=self.device)
                for r, entry in enumerate(entries):
                    logits[r][real[r]] = entry["logits"].to(self.device)
            else:
                logits = torch.stack([entry["logits"].to(self.device) for entry in entries])
        return TeacherOutput(hidden, logits)

    @staticmethod
    def _num_states(model: torch.nn.Module) -> int:
        """Embeddings + one per block (hidden_states), or each block's input + the last output (layer_io)."""
        return family_for(model).num_layers(model.config) + 1

    def _namespace(self, teacher: str) -> str:
        path = self.spec.target if teacher == "target" else teacher
        if path not in self._namespaces:
            spec = self.spec
            self._namespaces[path] = cache_namespace(path, spec.data_key, spec.layers if spec.hidden else (),
                                                     spec.logits, spec.dtype, spec.states, spec.weights_dtype)
        return self._namespaces[path]

    # ----- the trajectory teacher ------------------------------------------------------------------
    def _trajectory(self, request: TeacherRequest, inputs: dict[str, torch.Tensor]) -> TeacherOutput:
        model = self._models["trajectory"]
        self.forwards += 1
        self.examples_forwarded += next(iter(inputs.values())).shape[0]
        out = model(**inputs, output_hidden_states=True)
        labels = _from_numpy(request.labels, None, self.device)
        loss = task_loss(self.spec.task, out.logits, labels, inputs, state_mask(model, inputs))
        (loss / (self.spec.trajectory_every * request.micro_batches)).backward()
        dtype = COMPACT_DTYPES[self.spec.dtype]
        keep = set(range(len(out.hidden_states)) if self.spec.layers is None else self.spec.layers)
        hidden = [h.detach().to(dtype) if (self.spec.hidden and i in keep) else None for i, h in enumerate(out.hidden_states)]
        result = TeacherOutput(hidden, out.logits.detach().to(dtype) if self.spec.logits else None)
        self._received[request.step] = self._received.get(request.step, 0) + 1
        if self._received[request.step] == request.micro_batches:
            del self._received[request.step]
            if request.update_teacher:
                if self._grad_sync is not None:
                    self._grad_sync(model)
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                self.updated_through = request.step
        return result

    def state_dict(self) -> dict:
        if self._optimizer is None:
            return {}
        model = self._models["trajectory"]
        return {
            "trajectory_model": model.state_dict(),
            "trajectory_optimizer": self._optimizer.state_dict(),
            # Gradients gathered since the last update (a checkpoint inside a T_u window).
            "trajectory_grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "updated_through": self.updated_through,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state or self._optimizer is None:
            return
        model = self._models["trajectory"]
        model.load_state_dict(state["trajectory_model"])
        self._optimizer.load_state_dict(state["trajectory_optimizer"])
        grads = state.get("trajectory_grads", {})
        for name, param in model.named_parameters():
            param.grad = grads[name].to(param.device) if name in grads else None
        self.updated_through = state.get("updated_through", -1)
        self._received.clear()

    def stats(self) -> dict[str, int]:
        stats = {"teacher_loads": self.loads, "teacher_forwards": self.forwards, "examples_forwarded": self.examples_forwarded}
        return stats | (self.cache.stats() if self.cache else {})
