"""The student: the teacher's own transformers architecture with attention modules replaced.

``RaylinStudent`` wraps one instance of the teacher's model class (``self.model``) whose blocks
carry the mixers the plan asks for; embeddings, norms, FFNs and heads stay where transformers put
them, so parameter names match the teacher's under the ``model.`` prefix. Its config carries the
teacher's config and the plan, which is all it takes to rebuild it.

On disk a student is a Hugging Face folder: config.json (model_type ``raylin_student``),
model.safetensors and the teacher's tokenizer or feature-extractor files. ``load_student`` and,
after ``import raylin``, ``AutoModel.from_pretrained`` rebuild it bit-exactly.

Causal students decode with a recurrent state (``generate``): mixer layers keep a fixed-size
conv + SSM state, so memory per new token does not grow with the context (layers kept as
attention, in hybrids, still keep a growing key/value cache).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
import transformers
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from raylin.atomic import replace_folder
from raylin.models.decoding_cache import StudentCache
from raylin.models.families import BlockSubset, FamilyAdapter, family_for_config
from raylin.models.plan import Plan, build_mixer
from raylin.models.teachers import load_processor

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class RaylinStudentConfig(PretrainedConfig):
    """Config of a student: the teacher's config (as a dict), its model class name and the plan."""

    model_type = "raylin_student"

    def __init__(
        self,
        teacher_config: dict[str, Any] | None = None,
        teacher_class: str | None = None,
        plan: dict[str, Any] | None = None,
        layer_ids: list[int] | None = None,
        **kwargs,
    ):
        self.teacher_config = teacher_config or {}
        self.teacher_class = teacher_class
        self.plan = plan or {}
        # The teacher blocks this student holds (None: all). A student of some blocks is what a
        # block-local align task trains (raylin.train.student_build.block_local_student); it is never saved.
        self.layer_ids = list(layer_ids) if layer_ids is not None else None
        super().__init__(**kwargs)

    def build_teacher_config(self) -> PretrainedConfig:
        config_dict = dict(self.teacher_config)
        model_type = config_dict.pop("model_type", None)
        if model_type is None:
            raise ValueError("Student config has no teacher model_type; the folder was not written by raylin.")
        config = AutoConfig.for_model(model_type, **config_dict)
        if config._attn_implementation not in ("sdpa", "eager"):
            config._attn_implementation = "sdpa"
        return config


def _teacher_model_class(name: str | None) -> type[PreTrainedModel]:
    model_class = getattr(transformers, name or "", None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(
            f"Student config names teacher class {name!r}, which is not a transformers model class. "
            "Students rebuild only transformers architectures (no remote code)."
        )
    return model_class


class RaylinStudent(PreTrainedModel):
    """A converted student. ``forward`` takes exactly what the teacher's forward takes."""

    config_class = RaylinStudentConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: RaylinStudentConfig):
        super().__init__(config)
        teacher_config = config.build_teacher_config()
        self.family: FamilyAdapter = family_for_config(teacher_config)
        self.plan = Plan.from_mapping(config.plan)
        self.plan.check_against(self.family, teacher_config)
        self.main_input_name = {"text": "input_ids", "speech": "input_values"}[self.family.modality]
        if self.family.name == "whisper":
            self.main_input_name = "input_features"
        model_class = _teacher_model_class(config.teacher_class)
        # Block j of self.model is teacher block layer_ids[j]; a whole student holds them all.
        self.layer_ids = config.layer_ids if config.layer_ids is not None else list(range(self.family.num_layers(teacher_config)))
        built_config = teacher_config
        if config.layer_ids is not None:
            built_config = copy.deepcopy(teacher_config)
            for key, value in BlockSubset.of(teacher_config, config.layer_ids).overrides().items():
                setattr(built_config, key, value)
        mixed = set(self.plan.mixer_layers(self.family, teacher_config))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.plan.seed)
            self.model = model_class(built_config)
            shared = self.plan.shared_module(self.family, teacher_config)
            if shared is not None:  # one module for every mixer (Linformer's share: layer), drawn after the model's weights
                self.linformer_shared = shared
            layers = self.family.layers(self.model)
            for position, layer_idx in enumerate(self.layer_ids):
                if layer_idx not in mixed:
                    continue
                # Each block's new weights come from a seed of its own, so a block is the same in a
                # student of some blocks as in the whole student.
                torch.manual_seed(self.plan.layer_seed(layer_idx))
                attention = self.family.attention(layers[position])
                mixer = build_mixer(self.plan, self.family, teacher_config, layer_idx, attention, shared)
                self.family.set_attention(layers[position], mixer)
        self.processor = None  # tokenizer / feature extractor saved alongside, when known

    # ----- what the student is ------------------------------------------------------------------
    @property
    def teacher_config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def is_causal(self) -> bool:
        return self.family.causal

    @property
    def holds_every_block(self) -> bool:
        return self.config.layer_ids is None

    def mixer_layers(self) -> list[int]:
        """Teacher block indices whose attention this student replaced (of the blocks it holds)."""
        keep = set(self.plan.keep_attention)
        return [i for i in self.layer_ids if i not in keep]

    def block(self, layer_idx: int) -> nn.Module:
        """The student's block standing for teacher block ``layer_idx``."""
        return self.family.layers(self.model)[self.layer_ids.index(layer_idx)]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def _init_weights(self, module: nn.Module) -> None:
        # Weights are initialised when the teacher architecture and the mixers are built, and then
        # overwritten by the transfer or by loading; transformers must not re-initialise them.
        return None

    # ----- forward ------------------------------------------------------------------------------
    def forward(self, *args, past_key_values: StudentCache | None = None, **kwargs):
        """Run the wrapped model. Pass a ``StudentCache`` (see ``new_cache``) to decode step by step."""
        if self.is_causal:
            kwargs["use_cache"] = past_key_values is not None
            if past_key_values is not None:
                kwargs["past_key_values"] = past_key_values
        elif past_key_values is not None:
            raise ValueError("Bidirectional students have no decoding cache; call them on whole sequences.")
        output = self.model(*args, **kwargs)
        if past_key_values is not None:
            step_inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            past_key_values.advance(step_inputs.shape[1])
        return output

    # ----- recurrent generation -----------------------------------------------------------------
    def new_cache(self) -> StudentCache:
        if not self.is_causal:
            raise ValueError(f"A {self.family.name} student is bidirectional and cannot generate.")
        keep = set(self.plan.keep_attention)
        return StudentCache([i not in keep for i in range(self.family.num_layers(self.teacher_config))])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        return_cache: bool = False,
    ):
        """Decode ``max_new_tokens`` tokens after ``input_ids`` with a recurrent state.

        Greedy by default (equal to choosing the argmax of a full forward at each step); with
        ``do_sample`` it samples at ``temperature`` from the ``top_k`` most likely tokens.
        Sequences that reach ``eos_token_id`` are padded with it. Prompts must be left-padded
        when ``attention_mask`` has zeros. Returns prompt + new tokens (and the cache if asked).
        """
        cache = self.new_cache()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache).logits[:, -1]
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = _choose_token(logits, do_sample, temperature, top_k, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            logits = self(input_ids=next_token[:, None], attention_mask=attention_mask, past_key_values=cache).logits[:, -1]
        sequences = torch.cat(tokens, dim=1)
        return (sequences, cache) if return_cache else sequences

    # ----- save / load --------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike,
                        write_weights: Callable[[Path], None] | None = None, **kwargs) -> None:
        """Write config.json, model.safetensors and the processor files, atomically.

        Everything is written into a temporary sibling folder that replaces ``save_directory`` in
        one rename, so an interrupted save never leaves a half-written student behind.
        ``write_weights(path)`` writes model.safetensors instead of this module's own tensors (a
        ZeRO-3 student streams its partitions there: raylin.train.checkpoint).
        """
        if not self.holds_every_block:
            raise ValueError(f"This student holds teacher blocks {self.layer_ids} only (a block-local align task's); "
                             "save the aligned blocks' weights (raylin.train.align) or convert the whole teacher.")
        def write(staging: Path) -> None:
            self.config.save_pretrained(staging)
            if write_weights is None:
                safetensors.torch.save_file(_standalone_state(self), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            else:
                write_weights(staging / WEIGHTS_NAME)
            if self.processor is not None:
                self.processor.save_pretrained(staging)

        replace_folder(save_directory, write)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, dtype=None, **kwargs):
        """Rebuild a student from a local folder or a Hub repo id (downloaded with huggingface_hub)."""
        folder = _resolve_folder(str(pretrained_model_name_or_path))
        config = RaylinStudentConfig.from_pretrained(folder)
        student = cls(config)
        missing, unexpected = safetensors.torch.load_model(student, str(folder / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not match the student its config describes: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. Was the folder edited by hand?"
            )
        student.processor = load_processor(str(folder), student.family.modality)
        if dtype is not None:
            student = student.to(dtype)
        return student.eval()


def _standalone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once and every tensor copied out of any shared
    buffer (DeepSpeed keeps parameters as views of one flat buffer; safetensors refuses those)."""
    state, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            continue  # a tied weight: load_model restores it from the one stored name
        seen.add(key)
        state[name] = tensor.detach().clone()
    return state


def _choose_token(logits, do_sample, temperature, top_k, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None:
        cutoff = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _resolve_folder(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
            raise FileNotFoundError(f"No student folder at {name_or_path}. Check the path, or convert a teacher first.")

        try:
            path = Path(snapshot_download(name_or_path))
        except Exception as error:  # offline, unknown repo, no permission
            raise FileNotFoundError(
                f"{name_or_path} is not a local folder and could not be fetched from the Hugging Face Hub ({error}). "
                "Pass the path of a saved student folder."
            ) from error
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} is missing: a student folder holds {CONFIG_NAME} and {WEIGHTS_NAME} as written by "
                "student.save_pretrained(dir). Re-export the student, or point at the right folder."
            )
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("model_type") != RaylinStudentConfig.model_type:
        raise ValueError(
            f"{path / CONFIG_NAME} has model_type={config.get('model_type')!r}, not a raylin student. "
            "Load teachers with transformers' AutoModel; convert them with raylin.convert."
        )
    return path


def load_student(path: str | os.PathLike, dtype: torch.dtype | None = None) -> RaylinStudent:
    """Load a student folder written by ``save_pretrained`` (or a Hub repo holding one)."""
    return RaylinStudent.from_pretrained(path, dtype=dtype)


def register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel*`` load student folders (done on ``import raylin``)."""
    try:
        AutoConfig.register(RaylinStudentConfig.model_type, RaylinStudentConfig)
    except ValueError:
        return  # already registered
    for auto_class in (
        transformers.AutoModel,
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSequenceClassification,
        transformers.AutoModelForAudioClassification,
        transformers.AutoModelForCTC,
    ):
        auto_class.register(RaylinStudentConfig, RaylinStudent)
