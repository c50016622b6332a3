"""Teacher families: one adapter per transformers architecture raylin converts.

An adapter knows where a family keeps its attention modules, how those modules are called (which
mask, which cache argument, which projections they own), and how to read every layer's input and
output hidden states. Everything else about conversion is family-independent.

Supported: BERT / RoBERTa encoders, GPT-NeoX (Pythia), Llama (RoPE, GQA; SmolLM2 is one),
Wav2Vec2 / HuBERT encoders and the Whisper encoder (only its encoder self-attention is
converted; a decoder, where present, is left as it is).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from raylin.models.mixers.options import ProjectionNames


@dataclass(frozen=True)
class FamilyAdapter:
    """What raylin needs to know about one family of transformers models."""

    name: str
    model_types: tuple[str, ...]
    causal: bool
    layers_paths: tuple[str, ...]  # dotted suffixes of the block ModuleList, tried in order
    attention_path: str  # dotted path of the attention module inside one block
    projections: ProjectionNames | None  # None: fused QKV (GPT-NeoX), split by `attention_weights`
    modality: str  # "text" or "speech"

    # ----- config ---------------------------------------------------------------------------
    def hidden_size(self, config: PretrainedConfig) -> int:
        return config.d_model if self.name == "whisper" else config.hidden_size

    def num_layers(self, config: PretrainedConfig) -> int:
        return getattr(config, self.layer_count_key)

    @property
    def layer_count_key(self) -> str:
        """The config field that holds the number of converted blocks."""
        return "encoder_layers" if self.name == "whisper" else "num_hidden_layers"

    def num_heads(self, config: PretrainedConfig) -> int:
        return config.encoder_attention_heads if self.name == "whisper" else config.num_attention_heads

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        return getattr(config, "num_key_value_heads", None) or self.num_heads(config)

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or self.hidden_size(config) // self.num_heads(config)

    def max_length(self, config: PretrainedConfig) -> int | None:
        """Longest sequence the teacher accepts (positions), or None when unbounded (Wav2Vec2)."""
        if self.name == "whisper":
            return config.max_source_positions
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions and self.name == "roberta":
            return max_positions - config.pad_token_id - 1  # RoBERTa positions start after padding_idx
        return max_positions

    # ----- modules --------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of transformer blocks whose attention modules get replaced."""
        for suffix in self.layers_paths:
            found = [
                module
                for name, module in model.named_modules()
                if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix))
            ]
            if len(found) == 1:
                return found[0]
        raise ValueError(
            f"Found no single block list named '*{self.layers_paths[0]}' in {type(model).__name__} "
            f"({self.name} family). Is this a supported {self.name} model class?"
        )

    def attention(self, layer: nn.Module) -> nn.Module:
        module = layer
        for part in self.attention_path.split("."):
            module = getattr(module, part)
        return module

    def set_attention(self, layer: nn.Module, new_module: nn.Module) -> None:
        *parents, last = self.attention_path.split(".")
        parent = layer
        for part in parents:
            parent = getattr(parent, part)
        setattr(parent, last, new_module)

    def attention_weights(self, attention: nn.Module, config: PretrainedConfig) -> dict[str, nn.Linear | torch.Tensor]:
        """Q, K, V (and O where the module owns it) weights as (out, in) tensors, biases as ``*_bias``.

        Used to seed Mamba-family mixers from attention. Fused GPT-NeoX QKV is split here.
        """
        if self.projections is None:  # GPT-NeoX: per head [q | k | v] rows
            heads, head_dim = self.num_heads(config), self.head_dim(config)
            weight = attention.query_key_value.weight.view(heads, 3, head_dim, -1)
            out = {key: weight[:, i].reshape(heads * head_dim, -1) for i, key in enumerate("qkv")}
            if attention.query_key_value.bias is not None:
                bias = attention.query_key_value.bias.view(heads, 3, head_dim)
                out |= {f"{key}_bias": bias[:, i].reshape(-1) for i, key in enumerate("qkv")}
            out["o"] = attention.dense.weight
            return out
        names = self.projections
        out = {}
        for key, name in (("q", names.query), ("k", names.key), ("v", names.value), ("o", names.output)):
            if name is None:
                continue
            linear = getattr(attention, name)
            out[key] = linear.weight
            if linear.bias is not None:
                out[f"{key}_bias"] = linear.bias
        return out

    # ----- hidden states --------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_layer_io(self, model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record every block's input and output hidden states during the forwards inside the block.

        Yields ``{"inputs": [...], "outputs": [...]}`` with one (batch, seq, hidden) tensor per
        block, in order. Tensors keep their autograd graph (detach them for targets).
        """
        record: dict[str, list[torch.Tensor]] = {"inputs": [], "outputs": []}

        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            record["inputs"].append(hidden_in)
            record["outputs"].append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in self.layers(model)]
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()

    # ----- padding ----------------------------------------------------------------------------
    def state_mask(self, config: PretrainedConfig, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Which positions of the hidden states (and per-position logits) are real: (batch, positions).

        Text: the attention mask. Wav2Vec2 / HuBERT: the frames the convolutional feature encoder
        makes of the real samples (its strided convolutions, as transformers computes them). Whisper
        and unmasked inputs: None (every position counts).
        """
        mask = inputs.get("attention_mask")
        if mask is None or self.modality == "text":
            return mask
        if self.name != "wav2vec2":
            return None

        def frames(lengths: torch.Tensor) -> torch.Tensor:
            for kernel, stride in zip(config.conv_kernel, config.conv_stride):
                lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            return lengths

        total = int(frames(torch.tensor(mask.shape[1])))
        real = frames(mask.sum(-1))
        return (torch.arange(total, device=mask.device)[None, :] < real[:, None]).long()

    # ----- example inputs (tests, benchmarks) -------------------------------------------------
    def example_inputs(
        self, config: PretrainedConfig, lengths: list[int], total_length: int | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random inputs for a right-padded batch with the given real lengths.

        Lengths count tokens for text, samples of 16 kHz audio for Wav2Vec2/HuBERT and mel frames
        for Whisper (which always takes 2 * max_source_positions frames, padded with zeros).
        """
        generator = torch.Generator().manual_seed(seed)
        total = total_length or max(lengths)
        mask = torch.zeros(len(lengths), total, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        if self.name == "whisper":
            frames = 2 * config.max_source_positions
            features = torch.randn(len(lengths), config.num_mel_bins, frames, generator=generator)
            for row, length in enumerate(lengths):
                features[row, :, length:] = 0
            return {"input_features": features}
        if self.modality == "speech":
            audio = torch.randn(len(lengths), total, generator=generator) * mask
            return {"input_values": audio, "attention_mask": mask}
        low = 5 if config.vocab_size > 10 else 0  # keep clear of special ids in real vocabularies
        ids = torch.randint(low, config.vocab_size, (len(lengths), total), generator=generator)
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
        return {"input_ids": ids, "attention_mask": mask}


_TEXT_QKV = ProjectionNames("q_proj", "k_proj", "v_proj", "o_proj")
_SPEECH_QKV = ProjectionNames("q_proj", "k_proj", "v_proj", "out_proj")

FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("bert", ("bert",), False, ("encoder.layer",), "attention.self",
                  ProjectionNames("query", "key", "value", None), "text"),
    FamilyAdapter("roberta", ("roberta", "xlm-roberta"), False, ("encoder.layer",), "attention.self",
                  ProjectionNames("query", "key", "value", None), "text"),
    FamilyAdapter("gpt_neox", ("gpt_neox",), True, ("layers",), "attention", None, "text"),
    FamilyAdapter("llama", ("llama",), True, ("layers",), "self_attn", _TEXT_QKV, "text"),
    FamilyAdapter("wav2vec2", ("wav2vec2", "hubert"), False, ("encoder.layers",), "attention", _SPEECH_QKV, "speech"),
    FamilyAdapter("whisper", ("whisper",), False, ("encoder.layers", "layers"), "self_attn", _SPEECH_QKV, "speech"),
)


@dataclass(frozen=True)
class BlockSubset:
    """Some of a teacher's blocks, by their index in the teacher: what a block-local align task holds.

    A model built or loaded with ``overrides()`` has ``len(layer_ids)`` blocks, block j standing for
    teacher block ``layer_ids[j]``; ``checkpoint_key`` names a checkpoint's tensors in it.
    Limit: per-layer config lists other than ``layer_types`` are not subset."""

    family: FamilyAdapter
    layer_ids: tuple[int, ...]
    num_layers: int  # the whole teacher's
    layer_types: tuple[str, ...] | None = None  # the whole teacher's, where its config has them

    @classmethod
    def of(cls, config: PretrainedConfig, layer_ids: list[int]) -> "BlockSubset":
        family = family_for_config(config)
        num_layers = family.num_layers(config)
        if not layer_ids or sorted(set(layer_ids)) != sorted(layer_ids) or not all(0 <= i < num_layers for i in layer_ids):
            raise ValueError(f"layer_ids {layer_ids} must be distinct block indices of a {num_layers}-block teacher.")
        layer_types = getattr(config, "layer_types", None)
        return cls(family, tuple(layer_ids), num_layers, tuple(layer_types) if layer_types else None)

    def overrides(self) -> dict:
        """Config fields of the model holding only these blocks."""
        fields: dict = {self.family.layer_count_key: len(self.layer_ids)}
        if self.layer_types:
            fields["layer_types"] = [self.layer_types[i] for i in self.layer_ids]
        return fields

    def whole(self) -> dict:
        """Config fields of the whole teacher (what ``overrides`` changed, restored)."""
        fields: dict = {self.family.layer_count_key: self.num_layers}
        if self.layer_types:
            fields["layer_types"] = list(self.layer_types)
        return fields

    def _block_index(self, key: str) -> re.Match | None:
        return re.search(rf"(^|\.){re.escape(self.family.layers_paths[0])}\.(\d+)\.", key)

    def checkpoint_key(self, key: str) -> str | None:
        """A checkpoint tensor's name in the model holding these blocks, or None when it belongs to a
        block this subset leaves out."""
        match = self._block_index(key)
        if match is None:
            return key
        layer_idx = int(match.group(2))
        if layer_idx not in self.layer_ids:
            return None
        return key[:match.start(2)] + str(self.layer_ids.index(layer_idx)) + key[match.end(2):]

    def whole_key(self, key: str) -> tuple[str, bool]:
        """The inverse of ``checkpoint_key``: (a tensor's name in the whole model, whether it lies in
        a block) for a name in the model holding these blocks (student names, with their ``model.``
        prefix, too)."""
        match = self._block_index(key)
        if match is None:
            return key, False
        return key[:match.start(2)] + str(self.layer_ids[int(match.group(2))]) + key[match.end(2):], True


def family_for_config(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for a teacher config, or a ValueError naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for family in FAMILIES for t in family.model_types)
    raise ValueError(
        f"Unsupported teacher architecture model_type={model_type!r}. raylin converts: {', '.join(supported)}. "
        "Pick a checkpoint of one of these families, or add a FamilyAdapter in raylin/models/families.py."
    )


def state_mask(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``FamilyAdapter.state_mask`` for a teacher, a student or a DeepSpeed engine around either."""
    model = getattr(model, "module", model)
    config = getattr(model, "teacher_config", None) or model.config
    return family_for_config(config).state_mask(config, inputs)


def family_for(model: PreTrainedModel) -> FamilyAdapter:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"Expected a transformers PreTrainedModel as teacher, got {type(model).__name__}.")
    family = family_for_config(model.config)
    family.layers(model)  # raises, naming the class, when the blocks are not where the family keeps them
    return family
