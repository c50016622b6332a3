"""Task pipelines: for each ``task.type``, the data a run trains and scores on, how one batch is
built from example indices, and the held-out metric.

| task.type                | data.name                                  | batch                                   | metric     |
|--------------------------|--------------------------------------------|-----------------------------------------|------------|
| sequence_classification  | rotten_tomatoes, imdb (shipped); sst2, qnli, qqp (Hub) | input_ids, attention_mask, labels | accuracy |
| causal_lm                | austen (shipped); pile (Hub, streamed)     | input_ids, attention_mask               | perplexity |
| utterance_classification | spoken_digits (synthesised)                | input_features (Whisper) or input_values + attention_mask, labels | accuracy |

Language modelling reads a corpus as one token stream per document and cuts it into
non-overlapping windows of ``data.max_length`` tokens; every window is one example. ``austen``
trains on five novels and holds out ``data.held_out`` (default ``persuasion``). Speech clips are
padded or cropped to ``data.max_seconds``; a Whisper encoder is shortened to match (its positions
are fixed sinusoids, re-made for the first ``50 * max_seconds`` positions: the original table up to
its fp16 storage rounding).

Extra held-out sets (the spoken digits' unseen ``flite`` engine) are scored too and reported as
``eval_<name>_<metric>``. CTC has losses (raylin.distill.losses) but no data pipeline yet.

Every batch is built on the CPU from example indices only, so any worker, the teacher service and
a resumed run build exactly the same batch for the same indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raylin.models.teachers import MODEL_CLASSES

LM_DATASETS = ("austen", "pile")
SPEECH_DATASETS = ("spoken_digits",)
METRICS = {"sequence_classification": "accuracy", "causal_lm": "perplexity", "utterance_classification": "accuracy"}
WHISPER_POSITIONS_PER_SECOND = 50  # 100 mel frames per second, halved by the encoder's strided conv


def datasets_for(task: str) -> tuple[str, ...]:
    """The data sets a task can train on."""
    from raylin.data.text import DATASETS

    return {"sequence_classification": DATASETS, "causal_lm": LM_DATASETS, "utterance_classification": SPEECH_DATASETS}.get(task, ())


def metric_mode(metric: str) -> str:
    """``max`` for accuracies, ``min`` for perplexities and losses (Tune's ``mode``)."""
    return "min" if metric.endswith(("perplexity", "loss")) else "max"


# ----- models -----------------------------------------------------------------------------------


def model_options(config, path: str) -> dict[str, Any]:
    """What ``load_teacher`` needs to load ``path`` as this run's model: the class with the task head,
    the number of labels, and for Whisper the positions of ``data.max_seconds`` of audio."""
    from transformers import AutoConfig

    from raylin.models.teachers import resolve_teacher_path

    options: dict[str, Any] = {"model_class": MODEL_CLASSES[config.task.type]}
    if config.task.type != "causal_lm":
        options["num_labels"] = config.task.num_labels
    model_type = getattr(AutoConfig.from_pretrained(resolve_teacher_path(path)), "model_type", None)
    if model_type == "whisper":
        # A shorter encoder: the position table is cut (re-made as the same sinusoids on load).
        options["max_source_positions"] = int(math.ceil(config.data.max_seconds * WHISPER_POSITIONS_PER_SECOND))
        options["ignore_mismatched_sizes"] = True
    return options


def load_task_model(config, path: str):
    """The model at ``path`` with this run's task head, and its tokenizer / feature extractor."""
    from raylin.models.teachers import load_teacher

    options = model_options(config, path)
    model, processor = load_teacher(path, **options)
    if config.task.type == "utterance_classification" and model.config.model_type == "whisper":
        processor = whisper_feature_extractor(path, config.data.max_seconds)
    return model, processor


def whisper_feature_extractor(path: str, max_seconds: float):
    """Whisper's log-mel features for ``max_seconds`` windows instead of 30 s."""
    from transformers import WhisperFeatureExtractor

    from raylin.models.teachers import resolve_teacher_path

    extractor = WhisperFeatureExtractor.from_pretrained(resolve_teacher_path(path))
    extractor.chunk_length = max_seconds
    extractor.n_samples = int(round(max_seconds * extractor.sampling_rate))
    extractor.nb_max_frames = extractor.n_samples // extractor.hop_length
    return extractor


# ----- data -------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """A task's examples. ``train_batch(indices)`` / ``eval_batch(name, indices)`` return CPU tensors
    ready for the model (``labels`` included where the task has them)."""

    task: str
    num_train: int
    eval_sets: dict[str, int]  # held-out set name ("" = the main one) -> number of examples
    builder: Any = field(repr=False)

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.builder("train", indices)

    def eval_batch(self, name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.builder(name or "eval", indices)


def load_task_data(config, processor) -> TaskData:
    """The examples of ``config.data`` for ``config.task``, batched with ``processor``."""
    task, data = config.task.type, config.data
    if data.name not in datasets_for(task):
        raise ValueError(f"data.name {data.name!r} is not a {task} data set; choose one of {datasets_for(task)}.")
    if task == "sequence_classification":
        return _text_classification(data, processor)
    if task == "causal_lm":
        return _language_modelling(data, processor)
    if task == "utterance_classification":
        return _spoken_utterances(data, processor)
    raise NotImplementedError(f"task.type {task!r} has no data pipeline yet; supported: {sorted(METRICS)}.")


def _text_classification(data, tokenizer) -> TaskData:
    from raylin.data.text import load_splits, tokenize

    splits = load_splits(data)
    sets = {"train": (splits.train_texts, splits.train_labels), "eval": (splits.eval_texts, splits.eval_labels)}

    def build(name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        texts, labels = sets[name]
        batch = tokenize(tokenizer, [texts[i] for i in indices], data.max_length)
        batch["labels"] = torch.tensor([labels[i] for i in indices])
        return dict(batch)

    return TaskData("sequence_classification", len(splits.train_texts), {"": len(splits.eval_texts)}, build)


def token_windows(token_ids: list[int], length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens (the ragged tail is dropped)."""
    count = len(token_ids) // length
    return torch.tensor(token_ids[: count * length], dtype=torch.long).view(count, length)


def _language_modelling(data, tokenizer) -> TaskData:
    documents = _lm_documents(data)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    windows = {}
    for split, texts in documents.items():
        ids: list[int] = []
        for text in texts:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        windows[split] = token_windows(ids, data.max_length)
    order = torch.randperm(len(windows["eval"]), generator=torch.Generator().manual_seed(data.seed)).sort().values
    windows["eval"] = windows["eval"][order]  # a fixed spread over the held-out text when capped
    if data.max_train_examples is not None:
        windows["train"] = windows["train"][: data.max_train_examples]
    if data.max_eval_examples is not None:
        step = max(1, len(windows["eval"]) // data.max_eval_examples)
        windows["eval"] = windows["eval"][::step][: data.max_eval_examples]

    def build(name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        input_ids = windows[name][indices]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    return TaskData("causal_lm", len(windows["train"]), {"": len(windows["eval"])}, build)


def _lm_documents(data) -> dict[str, list[str]]:
    if data.name == "austen":
        from raylin.data.austen import NOVELS, load_austen

        held_out = data.held_out or "persuasion"
        if held_out not in NOVELS:
            raise ValueError(f"data.held_out {held_out!r} is not one of Jane Austen's novels here: {NOVELS}.")
        novels = load_austen()
        return {"train": [novels[n] for n in NOVELS if n != held_out], "eval": [novels[held_out]]}
    if data.name == "pile":
        return _pile_documents(data)
    raise ValueError(f"Unknown language modelling corpus {data.name!r}; choose one of {LM_DATASETS}.")


def _pile_documents(data) -> dict[str, list[str]]:
    """The first documents of the (uncopyrighted) Pile, streamed: ``max_train_examples`` windows need
    about that many documents; validation documents form the held-out set."""
    import itertools

    import datasets

    def take(split: str, count: int) -> list[str]:
        try:
            stream = datasets.load_dataset("monology/pile-uncopyrighted", split=split, streaming=True)
            return [row["text"] for row in itertools.islice(stream, count)]
        except (ConnectionError, OSError, ValueError) as error:
            raise FileNotFoundError(
                f"Could not stream the Pile ({split}) from the Hugging Face Hub: {error}. It needs network access; "
                "offline, use data.name austen."
            ) from error

    return {"train": take("train", data.max_train_examples or 20_000), "eval": take("validation", data.max_eval_examples or 500)}


def _spoken_utterances(data, processor) -> TaskData:
    from raylin.data.speech import SAMPLING_RATE, load_spoken_digits

    splits = load_spoken_digits(seed=data.seed, quick=data.size == "quick")
    sets = {"train": (splits.train_audio, splits.train_labels), "eval": (splits.eval_audio, splits.eval_labels),
            **splits.extra}
    if data.max_train_examples is not None:
        order = torch.randperm(len(splits.train_audio), generator=torch.Generator().manual_seed(data.seed)).tolist()
        keep = order[: data.max_train_examples]
        sets["train"] = ([splits.train_audio[i] for i in keep], [splits.train_labels[i] for i in keep])
    max_samples = int(data.max_seconds * SAMPLING_RATE)
    whisper = type(processor).__name__ == "WhisperFeatureExtractor"

    def build(name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        audio, labels = sets[name]
        clips = [np.asarray(audio[i][:max_samples], dtype=np.float32) for i in indices]
        if whisper:  # fixed-length log-mel windows, silence after the clip; no mask
            features = processor(clips, sampling_rate=SAMPLING_RATE, return_tensors="pt")
            batch = {"input_features": features["input_features"]}
        else:  # raw waveforms (Wav2Vec2 / HuBERT), right-padded with a mask
            features = processor(clips, sampling_rate=SAMPLING_RATE, padding=True, return_attention_mask=True,
                                 return_tensors="pt")
            batch = {"input_values": features["input_values"], "attention_mask": features["attention_mask"]}
        batch["labels"] = torch.tensor([labels[i] for i in indices])
        return batch

    eval_sets = {"": len(sets["eval"][0])} | {name: len(sets[name][0]) for name in splits.extra}
    return TaskData("utterance_classification", len(sets["train"][0]), eval_sets, build)


# ----- scoring ----------------------------------------------------------------------------------


def score_sums(task: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sums that add up over batches and workers: (correct, count) or (summed NLL, predicted tokens)."""
    if task == "causal_lm":
        from raylin.distill.losses import causal_lm_loss

        mask = batch.get("attention_mask")
        count = (mask[:, 1:].sum() if mask is not None else torch.tensor(batch["input_ids"][:, 1:].numel())).float()
        nll = causal_lm_loss(logits, batch["input_ids"], mask) * count
        return torch.stack([nll.detach().float(), count.to(nll.device)])
    correct = (logits.argmax(-1) == batch["labels"]).sum().float()
    return torch.stack([correct, torch.tensor(float(len(batch["labels"])), device=correct.device)])


def finish_scores(task: str, sums: torch.Tensor) -> dict[str, float]:
    """The metric from ``score_sums`` totals."""
    total, count = sums[0].item(), max(sums[1].item(), 1.0)
    if task == "causal_lm":
        return {"perplexity": math.exp(total / count), "loss": total / count}
    return {"accuracy": total / count}
