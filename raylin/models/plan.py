"""A conversion plan: which mixer replaces attention in each layer, with the mixer's options.

Plans are mappings in YAML configs and in the student's config.json, and ``Plan`` objects in code::

    {"mixer": "linformer", "keep_attention": [1, 11], "linformer": {"k": 256, "share": "kv"}}

Keys:
  mixer            a name in ``MIXER_KINDS``: linformer | mamba | mamba2 | gated_deltanet | bimamba |
                   bimamba2 | bigated_deltanet
  keep_attention   block indices (0-based) that keep the teacher's attention (hybrid students)
  linformer, mamba, mamba2, gated_deltanet
                   each mixer's options: the fields of its options class, with their defaults
                   (``LinformerOptions``, ``MambaOptions``, ``Mamba2Options``, ``GatedDeltaNetOptions``
                   in raylin/models/mixers/; docs/config.md lists them)
  init             "default" (fresh mixer weights) or "attention" (seed the mixers from the teacher's
                   attention where shapes allow: Mamba2 Q->C, K->B, V->x; Gated DeltaNet Q, K, V
                   per head; O->out_proj)
  seed             seed for the new mixer weights (0), so a conversion is reproducible (each block's
                   mixer draws from a seed of its own, ``Plan.layer_seed``)

Adding a mixer kind: a file in raylin/models/mixers/ with the module and its ``MixerOptions``
subclass, and one line in ``MIXER_KINDS`` (docs/design.md shows the diff).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from raylin.models.families import FamilyAdapter
from raylin.models.mixers import (
    BidirectionalMixer,
    GatedDeltaNetOptions,
    LinformerOptions,
    Mamba2Options,
    MambaOptions,
    MixerOptions,
    TeacherShape,
)


@dataclass(frozen=True)
class MixerKind:
    """What a plan's ``mixer`` name stands for: its options class (which names the plan section and
    builds the module), whether it reads future tokens, and whether it is a causal mixer run in both
    directions (``BidirectionalMixer``) rather than bidirectional by nature (Linformer)."""

    options: type[MixerOptions]
    bidirectional: bool
    two_passes: bool = False


MIXER_KINDS: dict[str, MixerKind] = {
    "linformer": MixerKind(LinformerOptions, bidirectional=True),
    "mamba": MixerKind(MambaOptions, bidirectional=False),
    "mamba2": MixerKind(Mamba2Options, bidirectional=False),
    "gated_deltanet": MixerKind(GatedDeltaNetOptions, bidirectional=False),
    "bimamba": MixerKind(MambaOptions, bidirectional=True, two_passes=True),
    "bimamba2": MixerKind(Mamba2Options, bidirectional=True, two_passes=True),
    "bigated_deltanet": MixerKind(GatedDeltaNetOptions, bidirectional=True, two_passes=True),
}
MIXERS = tuple(MIXER_KINDS)
CAUSAL_MIXERS = tuple(name for name, kind in MIXER_KINDS.items() if not kind.bidirectional)
# The plan sections, one per options class, in registry order.
OPTION_SECTIONS: dict[str, type[MixerOptions]] = {kind.options.section: kind.options for kind in MIXER_KINDS.values()}
INIT_RULES = ("default", "attention")
_PLAN_KEYS = ("mixer", "keep_attention", *OPTION_SECTIONS, "init", "seed")


def teacher_shape(family: FamilyAdapter, config: PretrainedConfig) -> TeacherShape:
    """What the mixers need of a teacher of this family and config."""
    dropout = getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0)
    return TeacherShape(family.name, family.hidden_size(config), family.num_layers(config), family.num_heads(config),
                        family.head_dim(config), family.max_length(config), family.projections,
                        rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)), attention_dropout=float(dropout or 0.0))


class PlanError(ValueError):
    """A plan that cannot be built; the message names the field and the fix."""


def _default_options() -> dict[str, MixerOptions]:
    return {section: options() for section, options in OPTION_SECTIONS.items()}


@dataclass
class Plan:
    mixer: str
    keep_attention: list[int] = field(default_factory=list)
    options: dict[str, MixerOptions] = field(default_factory=_default_options)  # section -> options, every section
    init: str = "default"
    seed: int = 0

    @classmethod
    def from_mapping(cls, mapping: "Plan | dict[str, Any]") -> "Plan":
        """The plan in a config's mapping; PlanError naming the key and the fix."""
        if isinstance(mapping, Plan):
            return copy.deepcopy(mapping)
        if not isinstance(mapping, dict):
            raise PlanError(f"plan must be a mapping such as {{'mixer': 'linformer'}}, got {type(mapping).__name__}.")
        unknown = set(mapping) - set(_PLAN_KEYS)
        if unknown:
            raise PlanError(f"Unknown plan key(s) {sorted(unknown)}; valid keys are {sorted(_PLAN_KEYS)}.")
        if "mixer" not in mapping:
            raise PlanError(f"plan.mixer is missing; set it to one of {MIXERS}.")
        try:
            options = {section: kind.from_mapping(mapping.get(section) or {}) for section, kind in OPTION_SECTIONS.items()}
        except (ValueError, TypeError) as error:
            raise PlanError(str(error)) from None
        plan = cls(mapping["mixer"], copy.deepcopy(mapping.get("keep_attention", [])), options,
                   mapping.get("init", "default"), mapping.get("seed", 0))
        plan._check_fields()
        return plan

    def to_dict(self) -> dict[str, Any]:
        """The mapping a config (or the student's config.json) holds; options at their defaults are left out."""
        return {"mixer": self.mixer, "keep_attention": list(self.keep_attention),
                **{section: options.to_dict() for section, options in self.options.items()},
                "init": self.init, "seed": self.seed}

    def replace(self, **changes: Any) -> "Plan":
        """This plan with top-level keys (``mixer``, ``keep_attention``, ``init``, ``seed``) or whole
        option sections changed, checked like a plan read from a config."""
        return Plan.from_mapping({**self.to_dict(), **changes})

    @property
    def shares_across_layers(self) -> bool:
        """Whether the student holds one module all its mixers use (Linformer's ``share: layer``)."""
        return self.mixer_options.shares_across_layers

    @property
    def kind(self) -> MixerKind:
        return MIXER_KINDS[self.mixer]

    @property
    def mixer_options(self) -> MixerOptions:
        """The options of the plan's mixer (its section)."""
        return self.options[self.kind.options.section]

    def _check_fields(self) -> None:
        if self.mixer not in MIXERS:
            raise PlanError(f"Unknown plan.mixer {self.mixer!r}; choose one of {MIXERS}.")
        if self.init not in INIT_RULES:
            raise PlanError(f"Unknown plan.init {self.init!r}; choose one of {INIT_RULES}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise PlanError(f"plan.seed must be an integer >= 0, got {self.seed!r}.")
        if not isinstance(self.keep_attention, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.keep_attention
        ):
            raise PlanError(f"plan.keep_attention must be a list of layer indices, got {self.keep_attention!r}.")
        self.keep_attention = sorted(set(self.keep_attention))

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
        if family.causal and self.kind.bidirectional:
            raise PlanError(
                f"plan.mixer {self.mixer!r} looks at future tokens, but the {family.name} teacher is causal; "
                f"use one of {CAUSAL_MIXERS} for causal language models."
            )
        try:
            self.mixer_options.check_against(teacher_shape(family, config))
        except (ValueError, TypeError) as error:  # raylin's own name their key; transformers' get the section
            section = self.kind.options.section
            raise PlanError(str(error) if str(error).startswith("plan.") else f"plan.{section}: {error}") from None

    def shared_module(self, family: FamilyAdapter, config: PretrainedConfig) -> nn.Module | None:
        """The module the whole student holds once for its mixers (``MixerOptions.shared_module``), or None."""
        return self.mixer_options.shared_module(teacher_shape(family, config))

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
    shared: nn.Module | None,
) -> nn.Module:
    """The module that replaces ``attention`` (the freshly built teacher attention of one block)."""
    shape, options = teacher_shape(family, config), plan.mixer_options
    if plan.kind.two_passes:
        return BidirectionalMixer(options.build(shape, layer_idx, attention, shared),
                                  options.build(shape, layer_idx, attention, shared))
    return options.build(shape, layer_idx, attention, shared)
