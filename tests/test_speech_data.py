"""Spoken digits synthesised for real with espeak-ng, flite and Festival (quick recipe, a few hundred clips).

Like the shipped-model tests, these use the real cache ($RAYLIN_CACHE, default ~/.cache/raylin):
the first run fetches the Debian packages (unless espeak-ng and flite are on PATH) and builds the
quick set in well under a minute; later runs load it in milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from raylin.data import speech
from raylin.data.speech import (
    DIGITS, EVAL_ACCENTS, QUICK_RECIPE, SAMPLING_RATE, TRAIN_ACCENTS, DigitRecipe, load_spoken_digits,
    synthesize_digits,
)

# One accent, one variant, one setting per engine: 20 clips, built in a second or two.
TINY = DigitRecipe(
    num_variants=1, speeds=(175,), pitches=(50,), accents=("en-us",), flite_voices=("slt",), flite_stretches=(1.0,),
    festival_voices=(),
)


def require_synthesisers() -> None:
    on_path = shutil.which("espeak-ng") and shutil.which("flite")
    if not on_path and not (shutil.which("apt-get") and shutil.which("dpkg")):
        if os.environ.get("CI"):
            pytest.fail("spoken digits need espeak-ng and flite on PATH, or apt-get and dpkg to fetch them")
        pytest.skip("spoken digits need espeak-ng and flite on PATH, or apt-get and dpkg to fetch them")


@pytest.fixture(scope="module")
def splits():
    require_synthesisers()
    return load_spoken_digits(quick=True)


def test_quick_sizes_and_balanced_labels(splits):
    assert len(splits.train_audio) == len(splits.train_labels) == len(TRAIN_ACCENTS) * 2 * 2 * 10
    assert len(splits.eval_audio) == len(splits.eval_labels) == len(EVAL_ACCENTS) * 2 * 2 * 10
    flite_audio, flite_labels = splits.extra["flite"]
    assert len(flite_audio) == len(flite_labels) == len(QUICK_RECIPE.flite_voices) * 10
    festival_audio, festival_labels = splits.extra["festival"]  # a third synthesiser, never trained on
    assert len(festival_audio) == len(QUICK_RECIPE.festival_voices) * len(QUICK_RECIPE.festival_stretches) * 10
    for labels in (splits.train_labels, splits.eval_labels, flite_labels, festival_labels):
        counts = Counter(labels)
        assert sorted(counts) == list(range(len(DIGITS))) and len(set(counts.values())) == 1


def test_held_out_accents_never_reach_training(splits):
    accent = lambda voice: voice.split("+")[0]
    variant = lambda voice: voice.split("+")[1]
    assert {accent(v) for v in splits.train_voices} == set(TRAIN_ACCENTS)
    assert {accent(v) for v in splits.eval_voices} == set(EVAL_ACCENTS)
    assert not set(TRAIN_ACCENTS) & set(EVAL_ACCENTS)
    # The held-out axis is the accent alone: the same voice variants speak in both splits.
    assert {variant(v) for v in splits.train_voices} == {variant(v) for v in splits.eval_voices}


def test_audio_is_trimmed_float32_16khz_mono_within_range(splits):
    clips = splits.train_audio + splits.eval_audio + splits.extra["flite"][0] + splits.extra["festival"][0]
    for clip in clips:
        assert clip.dtype == np.float32 and clip.ndim == 1
        assert SAMPLING_RATE // 10 <= len(clip) <= 2 * SAMPLING_RATE
        assert np.abs(clip).max() <= 1.0 and np.abs(clip).max() > 0.05
    # Trimming leaves little silence at the ends: 30 ms from each edge is already voice.
    edges = [np.abs(clip[:480]).max() + np.abs(clip[-480:]).max() for clip in clips]
    assert np.median(edges) > 0.01


def test_loads_are_identical_and_read_the_cache(splits, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))  # no synthesiser, no apt: the cache must suffice
    again = load_spoken_digits(quick=True)
    assert again.train_labels == splits.train_labels and again.train_voices == splits.train_voices
    assert all(np.array_equal(a, b) for a, b in zip(again.eval_audio, splits.eval_audio))
    meta = json.loads((synthesize_digits(QUICK_RECIPE).parent / "meta.json").read_text())
    assert meta["clips"] == 380 and len(meta["variants"]) == 2


def test_synthesis_is_deterministic_and_seeded(splits, monkeypatch, tmp_path):
    def build(folder: str, recipe: DigitRecipe) -> tuple[dict, dict]:
        monkeypatch.setattr(speech, "cache_dir", lambda: tmp_path / folder)  # fresh set, cached programs
        path = synthesize_digits(recipe, workers=1)
        with np.load(path) as data:
            return {key: data[key] for key in data.files}, json.loads((path.parent / "meta.json").read_text())

    first, meta = build("a", TINY)
    second, _ = build("b", TINY)
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    assert set(first["engine"]) == {"espeak-ng", "flite"} and len(first["labels"]) == 20
    _, reseeded = build("seed1", replace(TINY, seed=1))
    assert reseeded["variants"] != meta["variants"]


def test_bad_recipes_and_missing_programs_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Unknown accent"):
        synthesize_digits(DigitRecipe(accents=("en-au",)))
    monkeypatch.setenv("RAYLIN_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    with pytest.raises(FileNotFoundError, match=r"apt-get.*Spoken digits need espeak-ng"):
        synthesize_digits(TINY)
