"""A conversion plan: which mixer replaces attention in each layer, with the mixer's options.

Plans are plain mappings (they live in YAML configs and in the student's config.json)::

    {"mixer": "linformer", "keep_attention": [1, 11], "linformer": {"k": 256, "share": "kv"}}

Keys:
  mixer            linformer | mamba | mamba2 | gated_deltanet | bimamba | bimamba2 | bigated_deltanet
  keep_attention   block indices (0-based) that keep the teacher's attention (hybrid students)
  linformer        k (256), share none|kv|layer ("kv"), max_length (teacher's maximum positions)
  mamba            expand (2), state_size (16), conv_kernel (4), dt_rank ("auto"), use_bias (false)
  mamba2           expand (1), head_dim (64, or gcd(inner, 64) for narrow models), state_size (64), n_groups (1), chunk_size (128),
                   conv_kernel (4), use_bias (false)
  gated_deltanet   num_heads (the teacher's attention heads), head_dim (the teacher's), conv_kernel (4)
  init             "default" (fresh mixer weights) or "attention" (seed the mixers from the teacher's
                   attention where shapes allow: Mamba2 Q->C, K->B, V->x; Gated DeltaNet Q, K, V
                   per head; O->out_proj)
  seed             seed for the new mixer weights (0), so a conversion is reproducible (each block's
                   mixer draws from a seed of its own, ``Plan.layer_seed``)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from raylin.models.families import FamilyAdapter
from raylin.models.mixers import (
    BidirectionalMixer,
    GatedDeltaNetMixer,
    LinformerProjection,
    LinformerSelfAttention,
    Mamba2Mixer,
    MambaMixer,
    gated_deltanet_config,
    mamba2_config,
    mamba_config,
)
from raylin.models.mixers.linformer import SHARE_MODES


def _mamba(family: FamilyAdapter, config: PretrainedConfig, options: dict, layer_idx: int) -> nn.Module:
    return MambaMixer(mamba_config(family.hidden_size(config), family.num_layers(config), options), layer_idx)


def _mamba2(family: FamilyAdapter, config: PretrainedConfig, options: dict, layer_idx: int) -> nn.Module:
    return Mamba2Mixer(mamba2_config(family.hidden_size(config), family.num_layers(config), options), layer_idx)


def _gated_deltanet(family: FamilyAdapter, config: PretrainedConfig, options: dict, layer_idx: int) -> nn.Module:
    mixer_config = gated_deltanet_config(
        family.hidden_size(config), family.num_layers(config), family.num_heads(config), family.head_dim(config),
        options, rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)))
    return GatedDeltaNetMixer(mixer_config, layer_idx)


@dataclass(frozen=True)
class MixerKind:
    """What a plan's ``mixer`` name stands for: where its options live, whether it reads both
    directions, and how one causal core is built (None: Linformer, built from the attention)."""

    options: str
    bidirectional: bool
    core: Callable[[FamilyAdapter, PretrainedConfig, dict, int], nn.Module] | None


MIXER_KINDS: dict[str, MixerKind] = {
    "linformer": MixerKind("linformer", True, None),
    "mamba": MixerKind("mamba", False, _mamba),
    "mamba2": MixerKind("mamba2", False, _mamba2),
    "gated_deltanet": MixerKind("gated_deltanet", False, _gated_deltanet),
    "bimamba": MixerKind("mamba", True, _mamba),
    "bimamba2": MixerKind("mamba2", True, _mamba2),
    "bigated_deltanet": MixerKind("gated_deltanet", True, _gated_deltanet),
}
MIXERS = tuple(MIXER_KINDS)
BIDIRECTIONAL_MIXERS = tuple(name for name, kind in MIXER_KINDS.items() if kind.bidirectional)
CAUSAL_MIXERS = tuple(name for name, kind in MIXER_KINDS.items() if not kind.bidirectional)
INIT_RULES = ("default", "attention")
_OPTION_KEYS = {
    "linformer": {"k", "share", "max_length"},
    "mamba": {"expand", "state_size", "conv_kernel", "dt_rank", "use_bias"},
    "mamba2": {"expand", "head_dim", "state_size", "n_groups", "chunk_size", "conv_kernel", "use_bias"},
    "gated_deltanet": {"num_heads", "head_dim", "conv_kernel"},
}
_PLAN_KEYS = {"mixer", "keep_attention", "init", "seed", *_OPTION_KEYS}


class PlanError(ValueError):
    """A plan that cannot be built; the message names the field and the fix."""


@dataclass
class Plan:
    mixer: str
    keep_attention: list[int] = field(default_factory=list)
    linformer: dict[str, Any] = field(default_factory=dict)
    mamba: dict[str, Any] = field(default_factory=dict)
    mamba2: dict[str, Any] = field(default_factory=dict)
    gated_deltanet: dict[str, Any] = field(default_factory=dict)
    init: str = "default"
    seed: int = 0

    @classmethod
    def from_mapping(cls, mapping: "Plan | dict[str, Any]") -> "Plan":
        if isinstance(mapping, Plan):
            return copy.deepcopy(mapping)
        if not isinstance(mapping, dict):
            raise PlanError(f"plan must be a mapping such as {{'mixer': 'linformer'}}, got {type(mapping).__name__}.")
        unknown = set(mapping) - _PLAN_KEYS
        if unknown:
            raise PlanError(f"Unknown plan key(s) {sorted(unknown)}; valid keys are {sorted(_PLAN_KEYS)}.")
        if "mixer" not in mapping:
            raise PlanError(f"plan.mixer is missing; set it to one of {MIXERS}.")
        plan = cls(**copy.deepcopy(mapping))
        plan._check_fields()
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "mixer": self.mixer,
            "keep_attention": list(self.keep_attention),
            "linformer": dict(self.linformer),
            "mamba": dict(self.mamba),
            "mamba2": dict(self.mamba2),
            "gated_deltanet": dict(self.gated_deltanet),
            "init": self.init,
            "seed": self.seed,
        }

    def _check_fields(self) -> None:
        if self.mixer not in MIXERS:
            raise PlanError(f"Unknown plan.mixer {self.mixer!r}; choose one of {MIXERS}.")
        if self.init not in INIT_RULES:
            raise PlanError(f"Unknown plan.init {self.init!r}; choose one of {INIT_RULES}.")
        if not isinstance(self.keep_attention, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.keep_attention
        ):
            raise PlanError(f"plan.keep_attention must be a list of layer indices, got {self.keep_attention!r}.")
        self.keep_attention = sorted(set(self.keep_attention))
        for name, allowed in _OPTION_KEYS.items():
            options = getattr(self, name)
            if not isinstance(options, dict):
                raise PlanError(f"plan.{name} must be a mapping of options, got {options!r}.")
            unknown = set(options) - allowed
            if unknown:
                raise PlanError(f"Unknown plan.{name} option(s) {sorted(unknown)}; valid: {sorted(allowed)}.")
        share = self.linformer.get("share", "kv")
        if share not in SHARE_MODES:
            raise PlanError(f"Unknown plan.linformer.share {share!r}; choose one of {SHARE_MODES}.")

    # ----- against a teacher ------------------------------------------------------------------
    def check_against(self, family: FamilyAdapter, config: PretrainedConfig) -> None:
        """Raise PlanError if this plan cannot be applied to a teacher of this family and config."""
        num_layers = family.num_layers(config)
        out_of_range = [i for i in self.keep_attention if not 0 <= i < num_layers]
        if out_of_range:
            raise PlanError(
                f"plan.keep_attention lists layer(s) {out_of_range}, but the teacher has {num_layers} layers "
                f"(valid indices 0..{num_layers - 1})."
            )
        if family.causal and self.mixer in BIDIRECTIONAL_MIXERS:
            raise PlanError(
                f"plan.mixer {self.mixer!r} looks at future tokens, but the {family.name} teacher is causal; "
                f"use one of {CAUSAL_MIXERS} for causal language models."
            )
        if self.mixer == "linformer":
            max_length, k = self.linformer_max_length(family, config), self.linformer.get("k", 256)
            if not isinstance(k, int) or not 1 <= k <= max_length:
                raise PlanError(
                    f"Linformer k={k} is above the maximum sequence length {max_length} (or not a positive integer): "
                    f"the projections would be wider than any input. Use 1 <= plan.linformer.k <= {max_length}."
                )
        kind = MIXER_KINDS[self.mixer]
        if kind.core is not None:
            try:  # building one mixer on the meta device checks its options against the teacher's shapes
                with torch.device("meta"):
                    kind.core(family, config, getattr(self, kind.options), 0)
            except (ValueError, TypeError) as error:
                raise PlanError(f"plan.{error}") from None

    def linformer_max_length(self, family: FamilyAdapter, config: PretrainedConfig) -> int:
        max_length = self.linformer.get("max_length") or family.max_length(config)
        if max_length is None:
            raise PlanError(
                f"The {family.name} teacher has no maximum sequence length; set plan.linformer.max_length "
                "to the longest input the student must accept."
            )
        return int(max_length)

    def layer_seed(self, layer_idx: int) -> int:
        """The seed of block ``layer_idx``'s new mixer weights: one per block, so a block starts the same
        whichever other blocks are built with it."""
        return self.seed * 1_000_003 + layer_idx

    def mixer_layers(self, family: FamilyAdapter, config: PretrainedConfig) -> list[int]:
        keep = set(self.keep_attention)
        return [i for i in range(family.num_layers(config)) if i not in keep]


def build_mixer(
    plan: Plan,
    family: FamilyAdapter,
    config: PretrainedConfig,
    layer_idx: int,
    attention: nn.Module,
    shared_projection: LinformerProjection | None,
) -> nn.Module:
    """The module that replaces ``attention`` (the freshly built teacher attention of one block)."""
    kind = MIXER_KINDS[plan.mixer]
    if kind.core is None:
        dropout = getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0)
        return LinformerSelfAttention(
            attention,
            family.projections,
            num_heads=family.num_heads(config),
            head_dim=family.head_dim(config),
            max_length=plan.linformer_max_length(family, config),
            k=plan.linformer.get("k", 256),
            share=plan.linformer.get("share", "kv"),
            shared_projection=shared_projection,
            dropout=float(dropout or 0.0),
        )
    options = getattr(plan, kind.options)
    if kind.bidirectional:
        return BidirectionalMixer(kind.core(family, config, options, layer_idx), kind.core(family, config, options, layer_idx))
    return kind.core(family, config, options, layer_idx)
