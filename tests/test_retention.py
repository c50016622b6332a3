"""Retention: evaluation sets beyond the held-out split (eval_sets), their built-in out-of-distribution
sets per modality, retention = student / teacher, and the broad-data stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import require_asset, run_config
from raylin.config import ConfigError, config_from_dict
from raylin.data.task_data import load_task_data
from raylin.scoring import finish_scores, retention, retention_table
from raylin.tasks import METRICS, TASK_KINDS

pytestmark = pytest.mark.assets


def test_every_metric_declares_its_direction():
    reported = {metric for kind in TASK_KINDS.values() for metric in kind.metrics}
    reported |= {key for kind in TASK_KINDS.values() for key in finish_scores(kind, torch.ones(4))}
    assert reported <= set(METRICS)
    assert METRICS["accuracy"].higher_is_better and not METRICS["perplexity"].higher_is_better
    with pytest.raises(ValueError, match="metric 'f1' is unknown"):
        retention("f1", 1.0, 1.0)


def test_retention_is_student_over_teacher_and_inverted_where_lower_is_better():
    assert retention("accuracy", 0.8, 0.6) == pytest.approx(0.75)
    assert retention("perplexity", 50.0, 100.0) == 0.5 and retention("wer", 0.2, 0.4) == 0.5
    assert retention("wer", 0.0, 0.0) == 1.0 and retention("wer", 0.1, 0.0) == math.inf
    table = retention_table(TASK_KINDS["sequence_classification"], {"accuracy": 0.8, "imdb_accuracy": 0.7},
                            {"accuracy": 0.8, "imdb_accuracy": 0.56, "extra_only_student_accuracy": 0.5})
    assert table == {"held_out": {"metric": "accuracy", "teacher": 0.8, "student": 0.8, "retention": 1.0},
                     "imdb": {"metric": "accuracy", "teacher": 0.7, "student": 0.56, "retention": pytest.approx(0.8)}}


def _text(teachers, tmp_path, **extra):
    return {"teacher": teachers["source"], "target_teacher": teachers["target"], "output_dir": str(tmp_path / "run"),
            "plan": {"mixer": "linformer", "linformer": {"k": 16}}, "data": {"max_length": 32, "max_eval_examples": 20},
            **extra}


def test_each_data_set_is_scored_on_its_own_out_of_distribution_sets_by_default(teachers, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teachers["source"])
    rotten = config_from_dict(_text(teachers, tmp_path))
    data = load_task_data(rotten, tokenizer)
    assert data.eval_sets == {"": 20, "imdb": 20}  # capped by data.max_eval_examples, an even spread
    imdb = config_from_dict(_text(teachers, tmp_path, data={"name": "imdb", "max_eval_examples": 20}))
    assert set(load_task_data(imdb, tokenizer).eval_sets) == {"", "rotten_tomatoes"}
    assert set(load_task_data(config_from_dict(_text(teachers, tmp_path, eval_sets=[])), tokenizer).eval_sets) == {""}
    # The built-in IMDB set never holds a Rotten Tomatoes text (the sets come from different sources).
    from raylin.data.eval_sets import load_text_set, resolve_eval_sets
    from raylin.data.text import load_text_classification

    imdb_texts, _ = load_text_set(resolve_eval_sets(rotten)[0], rotten)
    rt = load_text_classification("rotten_tomatoes")
    assert not set(imdb_texts) & set(rt.train_texts + rt.eval_texts)


def test_a_local_csv_evaluation_set_is_scored_with_its_own_metric_name(teachers, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raylin.train.evaluation import evaluate

    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\n" + "".join(f"\"review number {i}, fine\",{i % 2}\n" for i in range(30)))
    config = config_from_dict(_text(teachers, tmp_path, eval_sets=[
        {"name": "mine", "source": {"path": str(csv), "text_column": "review", "label_column": "stars"}, "max_examples": 10}]))
    tokenizer = AutoTokenizer.from_pretrained(teachers["source"])
    data = load_task_data(config, tokenizer)
    assert data.eval_sets == {"": 20, "mine": 10}
    assert data.eval_batch("mine", [0, 1])["labels"].tolist() == [0, 1]
    model = AutoModelForSequenceClassification.from_pretrained(teachers["target"])
    scores = evaluate(model, data, config, torch.device("cpu"), 0, 1)
    assert set(scores) == {"accuracy", "mine_accuracy"}
    assert evaluate(model, data, config, torch.device("cpu"), 0, 1, sets=[""]).keys() == {"accuracy"}


def test_bad_evaluation_sets_are_all_refused_at_once_before_anything_runs(teachers, tmp_path):
    (tmp_path / "no-label.csv").write_text("text\nhello\n")
    (tmp_path / "corpus.txt").write_text("plain text\n")
    bad = [
        "flite",  # a speech set for a text student
        "rotten_tomatoes",  # the training set itself
        {"name": "eval", "source": {"path": str(tmp_path / "corpus.txt")}},  # reserved name
        {"name": "a", "source": {"path": str(tmp_path / "no-label.csv")}},  # no label column
        {"name": "b", "source": {"path": str(tmp_path / "corpus.txt")}},  # plain text cannot score classification
        {"name": "c", "source": {"path": str(tmp_path / "missing.parquet")}},
        {"name": "d", "source": {"path": "owner/set", "colour": "red"}},
        {"name": "a", "source": {"path": "owner/set"}, "max_examples": 0},
    ]
    with pytest.raises(ConfigError) as error:
        config_from_dict(_text(teachers, tmp_path, eval_sets=bad))
    message = str(error.value)
    for expected in ["eval_sets[0]: 'flite' is not a built-in sequence_classification evaluation set",
                     "eval_sets[1]: 'rotten_tomatoes' is the training data set itself",
                     "eval_sets[2].name 'eval' must be",
                     "eval_sets[3].source: ", "has no column(s) ['label']", "set source.label_column",
                     "eval_sets[4].source: ", "is plain text, which only language modelling can score",
                     "eval_sets[5].source: path", "does not exist",
                     "eval_sets[6].source: unknown key(s) ['colour']",
                     "eval_sets[7].name 'a' is used twice", "eval_sets[7].max_examples must be >= 1"]:
        assert expected in message


def test_a_bad_evaluation_set_stops_raylin_convert_with_exit_2_and_no_ray(teachers, tmp_path, capsys):
    import ray
    import yaml

    from raylin.cli import main

    (tmp_path / "bad.csv").write_text("text,label\nfine,7\n")  # label 7 of a 2-class task: found on reading
    config = _text(teachers, tmp_path, eval_sets=[{"name": "odd", "source": {"path": str(tmp_path / "bad.csv")}}])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["convert", str(tmp_path / "run.yaml")]) == 2
    assert "eval_sets: Evaluation set 'odd' cannot be read" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "run" / "metrics.json").exists()


def test_language_models_are_scored_on_the_fortunes_corpus_by_other_authors(smollm2):
    from raylin.data.austen import load_austen
    from raylin.data.fortunes import COLLECTIONS, load_fortunes

    fortunes = load_fortunes()
    assert len(fortunes) > 5000 and sum(len(f.split()) for f in fortunes) > 200_000
    assert not any("%" == line.strip() for f in fortunes[:200] for line in f.splitlines())
    novels = "\n".join(load_austen().values())
    assert not any(f in novels for f in fortunes[:500] if len(f) > 80)
    with pytest.raises(ValueError, match="Unknown fortune collection"):
        load_fortunes(("computers",))
    assert "computers" not in COLLECTIONS


def test_an_audio_csv_manifest_of_digit_words_is_an_evaluation_set(tmp_path):
    import soundfile

    from raylin.data.eval_sets import EvalSet, load_speech_set

    rng = np.random.default_rng(0)
    rows = []
    for i, word in enumerate(["seven", "zero", "3"]):
        soundfile.write(tmp_path / f"{i}.wav", rng.uniform(-0.1, 0.1, 8000).astype(np.float32), 8000)
        rows.append(f"{i}.wav,{word}")
    (tmp_path / "real.csv").write_text("audio,label\n" + "\n".join(rows) + "\n")
    config = config_from_dict({"teacher": "asset:whisper-tiny-en", "output_dir": str(tmp_path / "o"),
                               "plan": {"mixer": "bimamba2"}, "guidance": {"mode": "unguided"},
                               "task": {"type": "utterance_classification", "num_labels": 10},
                               "data": {"name": "spoken_digits"},
                               "eval_sets": [{"name": "real", "source": {"path": str(tmp_path / "real.csv")}}]})
    clips, targets = load_speech_set(EvalSet("real", config.eval_sets[0].source, None), config, {})
    assert targets == [7, 0, 3] and clips[0].dtype == np.float32 and len(clips[0]) == 16000  # resampled to 16 kHz


def test_augmentation_is_a_pure_function_of_clip_and_seed():
    from raylin.data.augment import augment
    from raylin.data.broad import AugmentedClips

    clip = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32) * 0.5
    first, again, other = augment(clip, 3), augment(clip, 3), augment(clip, 4)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.dtype == np.float32 and np.abs(first).max() <= 1.0
    copies = AugmentedClips([clip, clip * 0.5], copies=2, seed=0)
    assert len(copies) == 6 and np.array_equal(copies[1], clip * 0.5)  # the originals come first
    assert np.array_equal(copies[4], AugmentedClips([clip, clip * 0.5], copies=2, seed=0)[4])
    assert not np.array_equal(copies[2], copies[4])  # two copies of one clip differ
    with pytest.raises(IndexError):
        copies[6]


def test_broad_data_is_checked_before_anything_runs(teachers, tmp_path):
    with pytest.raises(ConfigError, match="broad.enabled feeds the align stage: set align.enabled"):
        config_from_dict(_text(teachers, tmp_path, broad={"enabled": True}))
    with pytest.raises(ConfigError, match="broad.train_copies augments speech clips"):
        config_from_dict(_text(teachers, tmp_path, broad={"enabled": True, "train_copies": 1}, align={"enabled": True}))
    with pytest.raises(ConfigError, match="broad.data auto has no built-in broad corpus for causal_lm"):
        config_from_dict({"teacher": "asset:smollm2-135m", "output_dir": str(tmp_path / "lm"), "task": {"type": "causal_lm"},
                          "data": {"name": "austen"}, "plan": {"mixer": "mamba2"}, "guidance": {"mode": "unguided"},
                          "align": {"enabled": True}, "broad": {"enabled": True}})


def test_speech_broad_data_joins_the_align_stage_and_copies_join_distillation(tmp_path):
    require_asset("whisper-tiny-en")
    from raylin.data.task_data import NO_LABEL
    from raylin.task_model import load_task_model

    config = config_from_dict({
        "teacher": "asset:whisper-tiny-en", "output_dir": str(tmp_path / "o"), "plan": {"mixer": "bimamba2"},
        "guidance": {"mode": "unguided"}, "task": {"type": "utterance_classification", "num_labels": 10},
        "data": {"name": "spoken_digits", "size": "quick"}, "align": {"enabled": True},
        "broad": {"enabled": True, "examples": 40, "train_copies": 1}})
    _, extractor = load_task_model(config, config.teacher)
    align, distill = load_task_data(config, extractor, "align"), load_task_data(config, extractor, "distill")
    assert align.num_train == 240 + 40 and distill.num_train == 2 * 240
    assert align.train_batch([239, 240])["labels"].tolist()[1] == NO_LABEL
    copy, original = distill.train_batch([240]), distill.train_batch([0])
    assert copy["labels"].tolist() == original["labels"].tolist()  # an augmented copy keeps its label
    assert not torch.equal(copy["input_features"], original["input_features"])
    assert torch.equal(distill.train_batch([240])["input_features"], copy["input_features"])  # the same every time


def test_a_broad_data_alignment_runs_on_ray_and_differs_from_the_tasks_alone(teachers, ray_cluster, tmp_path):
    """The align stage on Ray with broad passages next to the task's examples: its own alignment
    (fingerprint and folder), computed from batches that hold broad examples, so its weights differ
    from the same alignment on the task's examples alone. (tests/test_teacher_service.py runs the
    align -> distill -> retention path end to end.)"""
    from safetensors.torch import load_file

    from raylin.train.align import WEIGHTS_FILE, _fingerprint, aligned_dir, run_align

    align = {"enabled": True, "steps": 4, "num_workers": 2, "batch_size": 8}
    broad = run_config(teachers, tmp_path / "broad", align=align, broad={"enabled": True, "examples": 256})
    plain = run_config(teachers, tmp_path / "plain", align=align)
    assert _fingerprint(broad) != _fingerprint(plain)
    from raylin.data.batch_order import GlobalBatches

    first_batch = GlobalBatches(256 + 256, 8, broad.data.seed + 1).indices(0)  # as run_align draws them
    assert any(i >= 256 for i in first_batch)  # broad examples follow the task's 256
    summaries = [run_align(config) for config in (broad, plain)]
    assert all(set(summary["layers"]) == {"0", "1"} for summary in summaries)
    weights = [load_file(aligned_dir(config) / WEIGHTS_FILE) for config in (broad, plain)]
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
