"""What every mixer kind owns: its options (one typed class with their defaults) and how it is built.

A mixer file defines a subclass of ``MixerOptions``: a frozen dataclass whose fields are the keys of
the plan's section for that mixer (``plan.mamba2: {expand: 2}``) with their defaults, whose
``check`` states the rules on their values, and whose ``build`` makes the module that replaces one
attention module. raylin.models.plan's registry (``MIXER_KINDS``) names the class; the plan's keys,
its parsing, its unknown-key errors and its serialisation all come from these fields, so an option
is declared once, beside the code that reads it.

The teacher reaches a mixer only as a ``TeacherShape`` (widths, heads, layers, longest input), so a
mixer file knows nothing of model families.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class ProjectionNames:
    """Attribute names of the teacher's projections inside its attention module."""

    query: str
    key: str
    value: str
    output: str | None  # None when the output projection lives outside the module (BERT)


@dataclass(frozen=True)
class TeacherShape:
    """What a mixer needs of the teacher whose attention it replaces."""

    family: str  # the family's name, for messages
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_length: int | None  # the longest input the teacher takes (None: no limit)
    projections: ProjectionNames | None  # None: fused QKV (GPT-NeoX)
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0


class MixerOptions:
    """Base of one mixer kind's options. Subclasses are frozen dataclasses with a ``section`` (the
    plan key holding them), ``check`` (ValueError naming ``plan.SECTION.KEY`` and the fix) and ``build``."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        self._check_types()
        self.check()

    # ----- parsing and serialising ------------------------------------------------------------
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, mapping: Any) -> "MixerOptions":
        """The options in a plan section's mapping; ValueError naming an unknown key or a wrong value."""
        if isinstance(mapping, cls):
            return mapping
        if not isinstance(mapping, dict):
            raise ValueError(f"plan.{cls.section} must be a mapping of options, got {mapping!r}.")
        unknown = sorted(set(mapping) - set(cls.keys()))
        if unknown:
            raise ValueError(f"Unknown plan.{cls.section} option(s) {unknown}; valid: {sorted(cls.keys())}.")
        return cls(**mapping)

    def to_dict(self) -> dict[str, Any]:
        """The options set to other than their defaults: a plan written back reads as it was given,
        and setting an option to its default changes no fingerprint."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            if isinstance(value, bool) and bool not in allowed:
                ok = False
            elif isinstance(value, int) and float in allowed:  # a whole number is a float too (expand: 2)
                ok = True
            else:
                ok = any(value is None if kind is type(None) else isinstance(value, kind) for kind in allowed)
            if not ok:
                names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)
                raise ValueError(f"plan.{self.section}.{f.name} must be {names}, got {value!r}.")

    def _positive(self, *names: str) -> None:
        """ValueError unless every named option that is set is >= 1."""
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"plan.{self.section}.{name} must be >= 1, got {value}.")

    def _above_zero(self, *names: str) -> None:
        """ValueError unless every named option is > 0."""
        for name in names:
            if not getattr(self, name) > 0:  # also rejects NaN
                raise ValueError(f"plan.{self.section}.{name} must be > 0, got {getattr(self, name)}.")

    # ----- what a subclass states -------------------------------------------------------------
    def check(self) -> None:
        """Rules on the values alone (ranges, choices); shapes are checked by building on meta."""

    def check_against(self, teacher: TeacherShape) -> None:
        """ValueError when these options cannot be built in this teacher: by default, building one
        mixer on the meta device (no memory) checks every shape."""
        with torch.device("meta"):
            self.build(teacher, 0, None, None)

    def build(self, teacher: TeacherShape, layer_idx: int, attention: nn.Module, shared: nn.Module | None) -> nn.Module:
        """The causal (or, for mixers that are bidirectional by nature, whole) module replacing
        ``attention``: the freshly built teacher attention of block ``layer_idx``."""
        raise NotImplementedError

    @property
    def shares_across_layers(self) -> bool:
        """Whether the student holds one module every mixer uses (``shared_module``)."""
        return False

    def shared_module(self, teacher: TeacherShape) -> nn.Module | None:
        """A module the whole student holds once and every mixer uses (Linformer's ``share: layer``
        projection), or None."""
        return None
