"""Tiny random teachers of every supported family, and the shipped real checkpoints."""

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
    from raylin.data.assets import available

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
