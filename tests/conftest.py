"""Tiny random teachers of every supported family, the shipped real checkpoints, and tiny CALD runs
on a local Ray cluster."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
_SPEECH = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), feat_extract_norm="layer",
    do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=20,
    layerdrop=0.0,
)

# name -> (model class, config)
TINY_TEACHERS = {
    "bert": ("BertForSequenceClassification", transformers.BertConfig(**_TEXT, max_position_embeddings=64, num_labels=3)),
    "roberta": ("RobertaModel", transformers.RobertaConfig(**_TEXT, max_position_embeddings=66, pad_token_id=1)),
    "gpt_neox": ("GPTNeoXForCausalLM", transformers.GPTNeoXConfig(**_TEXT, rotary_pct=0.25, max_position_embeddings=64)),
    "llama": ("LlamaForCausalLM", transformers.LlamaConfig(**_TEXT, num_key_value_heads=2, max_position_embeddings=64)),
    "wav2vec2": ("Wav2Vec2ForCTC", transformers.Wav2Vec2Config(**_SPEECH)),
    "hubert": ("HubertModel", transformers.HubertConfig(**_SPEECH)),
    "whisper": ("WhisperForAudioClassification", transformers.WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, vocab_size=50, num_labels=4)),
}
CAUSAL = ("gpt_neox", "llama")
BIDIRECTIONAL = ("bert", "roberta", "wav2vec2", "hubert", "whisper")


def make_teacher(name: str, seed: int = 0, attn_implementation: str = "sdpa") -> transformers.PreTrainedModel:
    class_name, config = TINY_TEACHERS[name]
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config).eval()


@pytest.fixture(params=sorted(TINY_TEACHERS))
def family_name(request) -> str:
    return request.param


def require_asset(name: str) -> None:
    from raylin.assets import available

    if not available(name):
        if os.environ.get("CI"):
            pytest.fail(f"asset {name} is not installed; `make setup` installs it")
        pytest.skip(f"asset {name} is not installed (make setup installs it)")


@pytest.fixture(scope="session")
def minilm():
    require_asset("all-minilm-l6")
    from raylin.models.teachers import load_teacher

    return load_teacher("asset:all-minilm-l6")


@pytest.fixture(scope="session")
def smollm2():
    require_asset("smollm2-135m")
    from raylin.models.teachers import load_teacher

    return load_teacher("asset:smollm2-135m")


# ----- tiny text teachers and a local Ray cluster for training tests --------------------------------


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    require_asset("all-minilm-l6")
    from raylin.bench.recovery import tiny_text_teacher

    root = tmp_path_factory.mktemp("teachers")
    return {name: tiny_text_teacher(root / name, seed) for seed, name in enumerate(["source", "target", "wp1", "wp2"])}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # address="local": a private cluster even when another (a `ray start`, a benchmark's Cluster) runs here
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_config(teachers, out, **overrides):
    """A tiny CALD run: 2 workers x 0.5 CPU (+ 1 CPU for a served teacher), 12 steps, checkpoints at 6 and 12."""
    from raylin.config import config_from_dict

    return config_from_dict(run_config_dict(teachers, out, **overrides))


def run_config_dict(teachers, out, **overrides):
    """``run_config``'s mapping (to write as a YAML file): ``section.field=value`` sets one key,
    ``section=value`` the whole section (pass dotted keys as ``**{"train.max_steps": 8}``)."""
    base = {
        "teacher": teachers["source"], "target_teacher": teachers["target"], "output_dir": str(out),
        "plan": {"mixer": "linformer", "linformer": {"k": 16}},
        "data": {"max_length": 48, "max_train_examples": 256, "max_eval_examples": 64},
        "guidance": {"mode": "target"},
        "loss": {"alpha_layer": 1.0, "alpha_out": 0.5},
        # fp32 whatever the CPU: `auto` computes in bf16 on CPUs with AMX, and these runs are compared
        # exactly with each other and with in-process references.
        "train": {"num_workers": 2, "zero_stage": 2, "max_steps": 12, "batch_size": 8, "checkpoint_every": 6,
                  "lr": 1e-3, "warmup_steps": 2, "max_failures": 1, "cpus_per_worker": 0.5, "precision": "fp32"},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            base[section] = {**base.get(section, {}), field: value}
        else:
            base[section] = value
    return base


def losses_of(out):
    """Loss per step from a run's train_log.jsonl."""
    from raylin.train.run_files import read_train_log

    return [record["loss"] for record in read_train_log(out)]


def steps_logged(out):
    """The steps of a run's train_log.jsonl, line by line (a resumed run's log holds each step once)."""
    import json

    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def discarded_steps(out):
    """The steps a lost attempt ran past its checkpoint, set aside when the run resumed."""
    import json

    aside = out / "train_log.discarded.jsonl"
    return [json.loads(line)["step"] for line in aside.read_text().splitlines()] if aside.is_file() else []
