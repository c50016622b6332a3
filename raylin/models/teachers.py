"""Loading teachers: a local folder, a Hugging Face Hub id, or a shipped asset (``asset:NAME``).

Weights load through transformers' ``from_pretrained`` (safetensors preferred, no remote code);
the family is checked from config.json before any weight is read, so an unsupported
architecture fails fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedModel

from raylin.assets import asset_path
from raylin.models.families import BlockSubset, family_for_config

ASSET_PREFIX = "asset:"


def paper_teacher_architecture(hub_id: str) -> transformers.PretrainedConfig | None:
    """The architecture (config only, no weights) of a Hub teacher the run configs in
    raylin/configs name, known offline; None for any other id. It lets those configs be
    validated, fitted to clusters and costed (``raylin bench cluster``) where the Hub is unreachable.
    The values are the checkpoints' own config.json fields."""
    if hub_id == "roberta-base":
        return transformers.RobertaConfig(
            vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, layer_norm_eps=1e-5, architectures=["RobertaForMaskedLM"])
    if hub_id == "EleutherAI/pythia-1b":
        return transformers.GPTNeoXConfig(
            vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192,
            max_position_embeddings=2048, rotary_pct=0.25, architectures=["GPTNeoXForCausalLM"])
    if hub_id == "facebook/wav2vec2-large-lv60":
        return transformers.Wav2Vec2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
            architectures=["Wav2Vec2ForPreTraining"])
    if hub_id == "TinyLlama/TinyLlama_v1.1":
        return transformers.LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    return None


def resolve_teacher_path(name_or_path: str | os.PathLike) -> str:
    """Local folders stay as they are, ``asset:NAME`` resolves to a shipped asset, anything else
    is treated as a Hub id (downloaded by transformers on first use)."""
    name = str(name_or_path)
    if name.startswith(ASSET_PREFIX):
        return str(asset_path(name.removeprefix(ASSET_PREFIX)))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: a teacher folder must be a transformers checkpoint "
                "(config.json + model.safetensors). Save one with model.save_pretrained(folder)."
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # Hub ids are "name" or "owner/name"
        raise FileNotFoundError(f"No teacher folder at {name}. Check the path.")
    return name


def load_teacher(
    name_or_path: str | os.PathLike,
    model_class: str | None = None,
    dtype: torch.dtype = torch.float32,
    blocks: BlockSubset | list[int] | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """Load a teacher and its tokenizer or feature extractor (None when the folder has neither).

    ``model_class`` names a transformers class (e.g. ``"BertForSequenceClassification"``); by
    default the first class in config.json's ``architectures`` is used. ``blocks`` (teacher block
    indices, or a BlockSubset): load only those blocks, block j being teacher block ``blocks[j]``;
    the other blocks' tensors are never read, so memory follows the blocks loaded.
    """
    path = resolve_teacher_path(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    family = family_for_config(config)
    class_name = model_class or (config.architectures or [None])[0]
    model_cls = getattr(transformers, class_name or "", None) or transformers.AutoModel
    if not (isinstance(model_cls, type) and hasattr(model_cls, "from_pretrained")):
        raise ValueError(f"{class_name!r} is not a transformers model class.")
    model_kwargs.setdefault("attn_implementation", "sdpa")
    if blocks is not None:
        return _load_blocks(path, model_cls, dtype, blocks, model_kwargs), load_processor(path, family.modality)
    model = model_cls.from_pretrained(path, dtype=dtype, trust_remote_code=False, **model_kwargs)
    return model.eval(), load_processor(path, family.modality)


# from_pretrained's own options; the other keyword arguments of load_teacher are config fields.
_LOADER_OPTIONS = ("attn_implementation", "ignore_mismatched_sizes")


def _load_blocks(path: str, model_cls: type, dtype: torch.dtype, blocks: BlockSubset | list[int],
                 model_kwargs: dict[str, Any]) -> PreTrainedModel:
    """``load_teacher`` with only some blocks: their tensors (and those outside the blocks) are read
    from the safetensors files, renumbered, and handed to transformers' loader, which applies its
    usual conversions; the other blocks are never read."""
    loader = {key: model_kwargs.pop(key) for key in _LOADER_OPTIONS if key in model_kwargs}
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, **model_kwargs)
    blocks = blocks if isinstance(blocks, BlockSubset) else BlockSubset.of(config, list(blocks))
    for key, value in blocks.overrides().items():
        setattr(config, key, value)
    state = {}
    folder = Path(path) if Path(path).is_dir() else Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as checkpoint:
            for key in checkpoint.keys():
                renamed = blocks.checkpoint_key(key)
                if renamed is not None:
                    state[renamed] = checkpoint.get_tensor(key)
    if hasattr(model_cls, "_model_mapping"):  # an Auto class: the concrete class its mapping gives this config
        model_cls = model_cls._model_mapping[type(config)]
    model = model_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, **loader)
    return model.eval()


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} holds no safetensors weights (model.safetensors or an index of shards), which "
                            "loading some blocks reads. Re-save the teacher with save_pretrained (safetensors is its "
                            "default), or set align.holds: model.")


def load_processor(path: str, modality: str) -> Any:
    """Tokenizer (text) or feature extractor (speech) stored with a checkpoint, or None."""
    loader = transformers.AutoTokenizer if modality == "text" else transformers.AutoFeatureExtractor
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        return None
