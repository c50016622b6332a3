"""The model a run trains or scores, with its task's head: which transformers class, how many
labels, CTC's vocabulary, and a Whisper encoder shortened to the run's clips.

Limits: CTC needs a model with a CTC head (Wav2Vec2, HuBERT); the Whisper encoder has none and is
refused. A shortened Whisper encoder re-makes its sinusoidal position table for the first
``WHISPER_POSITIONS_PER_SECOND * data.max_seconds`` positions (the original table up to its fp16
storage rounding).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import WhisperFeatureExtractor

from raylin.data.transcripts import BLANK_ID, CTC_VOCAB, check_ctc_head
from raylin.models.teachers import load_teacher, resolve_teacher_path

WHISPER_POSITIONS_PER_SECOND = 50  # 100 mel frames per second, halved by the encoder's strided conv


def model_options(config, path: str) -> dict[str, Any]:
    """What ``load_teacher`` needs to load ``path`` as this run's model: the class with the task head,
    the number of labels, and for Whisper the positions of ``data.max_seconds`` of audio."""
    teacher_config = config.model_config(path)
    model_type = getattr(teacher_config, "model_type", None)
    kind = config.task_kind
    options: dict[str, Any] = {"model_class": kind.model_class}
    if kind.transcribes:
        if model_type == "whisper":
            raise ValueError("task.type ctc needs a model with a CTC head (Wav2Vec2, HuBERT); the Whisper encoder has "
                             "none. Use utterance_classification with Whisper.")
        check_ctc_head(teacher_config)
        options |= {"vocab_size": len(CTC_VOCAB), "pad_token_id": BLANK_ID}
    elif kind.classifies:
        options["num_labels"] = config.task.num_labels
    if model_type == "whisper":
        # A shorter encoder: the position table is cut (re-made as the same sinusoids on load).
        options["max_source_positions"] = int(math.ceil(config.data.max_seconds * WHISPER_POSITIONS_PER_SECOND))
        options["ignore_mismatched_sizes"] = True
    return options


def load_task_model(config, path: str, blocks=None):
    """The model at ``path`` with this run's task head, and its tokenizer / feature extractor.
    ``blocks``: only these teacher blocks (see ``load_teacher``)."""
    options = model_options(config, path)
    model, processor = load_teacher(path, blocks=blocks, **options)
    if config.task_kind.classifies and model.config.model_type == "whisper":
        processor = whisper_feature_extractor(path, config.data.max_seconds)
    return model, processor


def whisper_feature_extractor(path: str, max_seconds: float):
    """Whisper's log-mel features for ``max_seconds`` windows instead of 30 s."""
    extractor = WhisperFeatureExtractor.from_pretrained(resolve_teacher_path(path))
    extractor.chunk_length = max_seconds
    extractor.n_samples = int(round(max_seconds * extractor.sampling_rate))
    extractor.nb_max_frames = extractor.n_samples // extractor.hop_length
    return extractor
