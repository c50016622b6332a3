"""Task pipelines (raylin.data.task_data): language modelling on Jane Austen, spoken digits on a shortened
Whisper encoder, and the metrics both report."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raylin.config import ConfigError, config_from_dict
from raylin.data.eval_sets import SPEECH_BUILTINS, TEXT_BUILTINS
from raylin.data.task_data import SHARDED_CORPORA, load_task_data, token_windows
from raylin.task_model import load_task_model
from raylin.data.text import DATASETS
from raylin.distill.losses import causal_lm_loss
from raylin.scoring import finish_scores, score_sums
from raylin.tasks import TASK_KINDS, metric
from raylin.train.evaluation import evaluate
from raylin.train.student_build import converted_student

from conftest import require_asset

LM = {"teacher": "asset:smollm2-135m", "target_teacher": "asset:smollm2-135m", "output_dir": "/tmp/raylin-tasks",
      "plan": {"mixer": "mamba2"},
      "task": {"type": "causal_lm"}, "data": {"name": "austen", "max_length": 64, "max_eval_examples": 8},
      "guidance": {"mode": "target"}}


def test_token_windows_are_exact_and_drop_the_tail():
    windows = token_windows(list(range(10)), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_perplexity_sums_add_up_over_batches():
    torch.manual_seed(0)
    logits, ids = torch.randn(4, 9, 11), torch.randint(0, 11, (4, 9))
    batch = lambda rows: {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows])}
    halves = score_sums(TASK_KINDS["causal_lm"], logits[:2], batch(slice(0, 2))) + score_sums(TASK_KINDS["causal_lm"], logits[2:], batch(slice(2, 4)))
    expected = causal_lm_loss(logits, ids).item()
    assert finish_scores(TASK_KINDS["causal_lm"], halves)["loss"] == pytest.approx(expected, rel=1e-6)


def test_a_task_refuses_data_of_another_task():
    with pytest.raises(ConfigError, match="not a causal_lm data set"):
        config_from_dict(LM, ["data.name=rotten_tomatoes"])


@pytest.mark.assets
def test_lm_student_keeping_every_attention_layer_has_the_teachers_perplexity():
    """Held-out windows come from Persuasion only; a student that keeps all 30 attention layers is
    the teacher, so its perplexity is exactly the teacher's."""
    require_asset("smollm2-135m")
    from raylin.data.austen import load_austen

    config = config_from_dict(LM, ["plan={mixer: mamba2, keep_attention: [" + ", ".join(map(str, range(30))) + "]}"])
    student, _, tokenizer = converted_student(config)
    data = load_task_data(config, tokenizer)
    assert data.eval_sets == {"": 8, "fortunes": 8}  # the Austen corpus's default out-of-distribution set
    window = data.eval_batch("", [0])["input_ids"][0]
    assert tokenizer.decode(window) in load_austen()["persuasion"]
    teacher, _ = load_task_model(config, config.teacher)
    cpu = torch.device("cpu")
    assert evaluate(student, data, config, cpu, 0, 1) == evaluate(teacher, data, config, cpu, 0, 1)


@pytest.mark.assets
def test_lm_token_ids_are_cached_per_tokenizer_and_text(tmp_path, monkeypatch):
    """Every worker of an Austen run needs the same ids: the first tokenisation is stored, the
    later ones read it back, equal to a fresh tokenisation; other texts get their own entry."""
    require_asset("smollm2-135m")
    from transformers import AutoTokenizer

    from raylin.data.task_data import _token_ids
    from raylin.models.teachers import resolve_teacher_path

    monkeypatch.setenv("RAYLIN_CACHE", str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(resolve_teacher_path("asset:smollm2-135m"))
    texts = ["It is a truth universally acknowledged,", "that a single man in possession of a good fortune"]
    fresh = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert _token_ids(tokenizer, texts, cache=False) == fresh and not (tmp_path / "tokens").exists()
    assert _token_ids(tokenizer, texts, cache=True) == fresh
    entries = list((tmp_path / "tokens").iterdir())
    assert len(entries) == 1 and torch.load(entries[0], weights_only=True).tolist() == fresh
    entries[0].write_bytes(b"")  # the second call must read the entry, not tokenise again
    with pytest.raises(Exception):
        _token_ids(tokenizer, texts, cache=True)
    entries[0].unlink()
    _token_ids(tokenizer, texts, cache=True)
    _token_ids(tokenizer, texts[:1], cache=True)
    assert len(list((tmp_path / "tokens").iterdir())) == 2


@pytest.mark.assets
def test_spoken_digits_on_a_shortened_whisper_encoder():
    require_asset("whisper-tiny-en")
    config = config_from_dict({
        "teacher": "asset:whisper-tiny-en", "output_dir": "/tmp/raylin-tasks", "plan": {"mixer": "bimamba2"},
        "task": {"type": "utterance_classification", "num_labels": 10},
        "data": {"name": "spoken_digits", "size": "quick", "max_seconds": 2.0}, "guidance": {"mode": "unguided"}})
    student, _, extractor = converted_student(config)
    assert student.teacher_config.max_source_positions == 100
    data = load_task_data(config, extractor)
    assert set(data.eval_sets) == {"", "flite", "festival"} and min(data.eval_sets.values()) > 0
    batch = data.train_batch([0, 1, 2])
    assert batch["input_features"].shape == (3, 80, 200) and batch["labels"].shape == (3,)
    scores = evaluate(student, data, config, torch.device("cpu"), 0, 1)
    assert set(scores) == {"accuracy", "flite_accuracy", "festival_accuracy"}
    # Both caps hold for spoken digits as for every data set (max_eval_examples used to be ignored).
    capped = load_task_data(dataclasses.replace(config, data=dataclasses.replace(
        config.data, max_train_examples=20, max_eval_examples=7)), extractor)
    assert capped.num_train == 20 and capped.eval_sets[""] == 7
    assert capped.eval_sets["flite"] == 7  # an evaluation set's cap defaults to max_eval_examples


def test_example_caps_mean_one_thing_for_every_data_set():
    """max_train_examples: a seeded random subset in row order; max_eval_examples: an even spread
    with the first and last example (raylin.data.limits)."""
    from raylin.data.limits import eval_rows, train_rows

    picked = train_rows(100, 5, seed=3)
    assert len(picked) == 5 and picked == sorted(picked) and picked == train_rows(100, 5, seed=3)
    assert picked != train_rows(100, 5, seed=4)
    assert eval_rows(10, 4) == [0, 3, 6, 9]
    assert train_rows(3, 5, seed=3) == eval_rows(3, 4) == [0, 1, 2]  # caps above the size keep everything
    assert train_rows(7, None, seed=0) == eval_rows(7, None) == list(range(7))


def test_the_task_registry_names_only_data_sets_and_evaluation_sets_raylin_can_load():
    loaders = {"sequence_classification": set(DATASETS), "causal_lm": {"austen", *SHARDED_CORPORA},
               "utterance_classification": {"spoken_digits", "hub_audio"}, "ctc": {"spoken_digits", "hub_audio"}}
    builtin_sets = {*TEXT_BUILTINS, *SPEECH_BUILTINS, "fortunes"}
    for name, kind in TASK_KINDS.items():
        assert set(kind.datasets) == loaders[name], name
        assert set(kind.eval_sets) <= builtin_sets
        assert all(set(defaults) <= set(kind.eval_sets) for defaults in kind.datasets.values()), name


def test_each_metric_says_its_direction_whatever_its_prefix():
    assert [metric(name).mode for name in ("eval_accuracy", "fortunes.perplexity", "eval_wer", "cer", "imdb.retention")] \
        == ["max", "min", "min", "min", "max"]
    with pytest.raises(ValueError, match="metric 'eval_bleu' is unknown"):
        metric("eval_bleu")
