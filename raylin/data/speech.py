"""Spoken digits "zero".."nine" (label = index), synthesised offline with espeak-ng, flite and Festival.

The set is made of synthetic voices, so accents can be held out cleanly: evaluation uses espeak-ng
accents training never hears, and two other synthesisers are further out-of-distribution sets:
flite (CMU's diphone and cluster-unit voices) and Festival's diphone voice ``ked`` (a speaker flite
does not have; Festival is the system flite was derived from, with its own signal processing).

| split   | engine    | voices                                                         | clips (default / quick) |
|---------|-----------|----------------------------------------------------------------|------------------------:|
| train   | espeak-ng | 6 accents: en, en-us, en-gb-x-rp, en-gb-x-gbclan,              | 2,700 / 240             |
|         |           | en-gb-x-gbcwmd, en-us-nyc; x variants x speeds x pitches       |                         |
| eval    | espeak-ng | 2 held-out accents: en-gb-scotland, en-029 (Caribbean);        | 900 / 80                |
|         |           | same variants, speeds and pitches as train                     |                         |
| "flite" | flite     | kal16, awb, rms, slt, kal (8 kHz, upsampled) x duration_stretch | 150 / 50                |
| "festival" | Festival | ked_diphone (festvox-kdlpc16k) x Duration_Stretch              | 30 / 10                 |

Default recipe: 5 variants (m1..m7, f1..f5, klatt*, croak, whisper, ... drawn with ``seed`` from
the variants the espeak-ng at hand lists; seed 0 with 1.51: AnxiousAndy, benjamin, gustave, iven4,
whisper) x speeds 140/175/210 wpm x pitches 35/50/65 x 10 digits
per accent; flite and Festival stretches 0.8/1.0/1.25. Quick recipe (CI smoke runs): 2 variants x
speeds 150/200 x pitch 50; flite and Festival stretch 1.0. Every (voice, speed, pitch) setting says all ten digits,
so labels are balanced in every split.

Audio is float32 mono at 16 kHz in [-1, 1] (resampled with soxr), with leading and trailing
silence trimmed lightly (below -40 dB of the clip's peak, 20 ms kept) and capped at 2 s. Clips
keep the build order (accent, variant, speed, pitch, digit); shuffle downstream.

Starting espeak-ng costs more than saying a word, so each espeak-ng voice says the ten digits in
one call (SSML sentences 600 ms apart) that is cut at the pauses; a voice whose recording does not
cut into ten words (1.51: the RicishayMax variants, whose echo fills the pauses) says them one
call per word instead. Words said in a row come out about 10% shorter than words said alone.

The set is built once per recipe into ``$RAYLIN_CACHE/spoken_digits/<format>-<recipe hash>/``
(``clips.npz`` + ``meta.json``) and later loads only read that file. Programs: ``espeak-ng`` /
``flite`` on PATH if present, else the Debian packages fetched without root (see
``raylin.data.debian``); Festival always from its Debian packages (festival, festlex-cmu,
festlex-poslex, festvox-kdlpc16k), joined into one data folder under ``$RAYLIN_CACHE/debian``.

Limits: the variant list, and so the seeded draw, comes from the espeak-ng that builds the set
(1.51 lists about 100); ``meta.json`` records the variants and engine versions used, and a set
built elsewhere with another espeak-ng can differ under the same cache name. Synthetic speech is
far cleaner than recorded speech: scores here say little about real speakers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from raylin.assets import cache_dir
from raylin.atomic import build_once
from raylin.data.audio import SAMPLING_RATE, read_audio, resample
from raylin.data.debian import debian_dir, debian_package_with_dependencies, library_path
from raylin.fingerprint import fingerprint

MAX_SECONDS = 2.0
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
EVAL_ACCENTS = ("en-gb-scotland", "en-029")
TRAIN_ACCENTS = tuple(accent for accent in ACCENTS if accent not in EVAL_ACCENTS)
FLITE_VOICES = ("kal16", "awb", "rms", "slt", "kal")
FESTIVAL_VOICES = ("ked",)  # Festival's voice_<name>_diphone
FESTIVAL_PACKAGES = {"ked": "festvox-kdlpc16k"}
_WAV = object()  # stands for the output file in a synthesis command
_FORMAT = 1  # bump when the synthesis or the file layout changes: it renames every cache folder


@dataclass(frozen=True)
class DigitRecipe:
    """What ``synthesize_digits`` renders; its hash names the cache folder."""

    num_variants: int = 5
    seed: int = 0
    speeds: tuple[int, ...] = (140, 175, 210)  # espeak-ng -s, words per minute
    pitches: tuple[int, ...] = (35, 50, 65)  # espeak-ng -p, 0..99
    flite_stretches: tuple[float, ...] = (0.8, 1.0, 1.25)  # flite duration_stretch (>1 is slower)
    accents: tuple[str, ...] = ACCENTS
    flite_voices: tuple[str, ...] = FLITE_VOICES
    festival_voices: tuple[str, ...] = FESTIVAL_VOICES
    festival_stretches: tuple[float, ...] = (0.8, 1.0, 1.25)  # Festival Duration_Stretch

    def folder_name(self) -> str:
        return f"v{_FORMAT}-{fingerprint({'format': _FORMAT, **asdict(self)}, 12)}"


DEFAULT_RECIPE = DigitRecipe()
QUICK_RECIPE = DigitRecipe(num_variants=2, speeds=(150, 200), pitches=(50,), flite_stretches=(1.0,),
                           festival_stretches=(1.0,))


@dataclass
class SpeechSplits:
    """Audio clips (float32, 16 kHz) with digit labels; ``extra`` sets are for evaluation only."""

    train_audio: list[np.ndarray]
    train_labels: list[int]
    eval_audio: list[np.ndarray]
    eval_labels: list[int]
    extra: dict[str, tuple[list[np.ndarray], list[int]]]  # out-of-distribution sets, never trained on
    train_voices: list[str] = field(default_factory=list)  # espeak-ng voice per clip, e.g. "en-us+m3"
    eval_voices: list[str] = field(default_factory=list)


def load_spoken_digits(num_variants: int | None = None, seed: int = 0, quick: bool = False) -> SpeechSplits:
    """Train / held-out-accent / flite / festival splits (see the module doc); builds the set on first use
    (default: about 15 s on two busy cores, 90 MB on disk; ``quick``: about 5 s, 9 MB; plus the
    first fetch of the Debian packages, about 20 s and 48 MB, where the programs are not on PATH).

    ``num_variants`` defaults to the recipe's (5, or 2 when ``quick``); ``seed`` draws the variants.
    """
    recipe = QUICK_RECIPE if quick else DEFAULT_RECIPE
    recipe = replace(recipe, seed=seed, num_variants=recipe.num_variants if num_variants is None else num_variants)
    with np.load(synthesize_digits(recipe)) as data:
        audio, offsets = data["audio"], data["offsets"]
        # Copies, not views, so that changing one clip in place cannot touch its neighbours.
        clips = [audio[start:stop].copy() for start, stop in zip(offsets[:-1], offsets[1:])]
        labels, engines, accents = data["labels"].tolist(), data["engine"], data["accent"]
        voices = [f"{accent}+{variant}" for accent, variant in zip(accents, data["variant"])]
    espeak = engines == "espeak-ng"

    def pick(mask: np.ndarray) -> list[int]:
        return np.flatnonzero(mask).tolist()

    train = pick(espeak & np.isin(accents, TRAIN_ACCENTS))
    held_out = pick(espeak & np.isin(accents, EVAL_ACCENTS))
    extra = {engine: pick(engines == engine) for engine in ("flite", "festival")}
    return SpeechSplits(
        [clips[i] for i in train], [labels[i] for i in train],
        [clips[i] for i in held_out], [labels[i] for i in held_out],
        {engine: ([clips[i] for i in rows], [labels[i] for i in rows]) for engine, rows in extra.items() if rows},
        [voices[i] for i in train], [voices[i] for i in held_out],
    )


def synthesize_digits(recipe: DigitRecipe = DEFAULT_RECIPE, workers: int | None = None) -> Path:
    """Path of the recipe's ``clips.npz``, rendered once and atomically (see the module doc).

    The file holds ``audio`` (all clips concatenated, float32 16 kHz) and ``offsets`` (clip i is
    ``audio[offsets[i]:offsets[i + 1]]``) plus per-clip ``labels``, ``engine``, ``accent``,
    ``variant``, ``speed`` and ``pitch`` (flite, festival: accent = voice, variant = "", speed = stretch
    in percent, pitch = 0). ``workers`` synthesiser processes run at once (default: CPU count).
    """
    unknown = [accent for accent in recipe.accents if accent not in ACCENTS]
    if unknown:
        raise ValueError(f"Unknown accent(s) {unknown}; espeak-ng English accents here: {ACCENTS}.")
    target = build_once(cache_dir() / "spoken_digits" / recipe.folder_name(), "clips.npz",
                        lambda staging: _render(recipe, staging, workers or os.cpu_count() or 1))
    return target / "clips.npz"


# ----- synthesis ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Program:
    """A synthesiser command line and the environment it needs (extracted packages need libraries)."""

    argv: tuple[str, ...]
    env: dict[str, str] | None = None

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True)


def _program(name: str, probe: str) -> _Program:
    """``name`` from PATH, else from its Debian package (plus the libraries this machine lacks);
    ``probe`` is an argument that makes it exit 0 at once, to check that the extracted one runs."""
    if shutil.which(name):
        return _Program((name,))
    try:
        roots = debian_package_with_dependencies(name)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error} Spoken digits need {name}: install it (e.g. `apt install {name}`, `dnf install {name}`, "
            f"`brew install {name}`) so that `{name}` is on PATH."
        ) from error
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [library_path(roots), env.get("LD_LIBRARY_PATH")]))
    # espeak-ng looks for its data at the path compiled in (/usr/lib/<triple>/espeak-ng-data);
    # ESPEAK_DATA_PATH names the folder that holds espeak-ng-data.
    data = [phontab.parent.parent for root in roots for phontab in root.glob("usr/*/*/espeak-ng-data/phontab")]
    data += [phontab.parent.parent for root in roots for phontab in root.glob("usr/share/espeak-ng-data/phontab")]
    if data:
        env["ESPEAK_DATA_PATH"] = str(data[0])
    program = _Program((str(roots[0] / "usr" / "bin" / name),), env)
    check = program.run(probe)
    if check.returncode != 0:
        raise FileNotFoundError(
            f"The {name} extracted from Debian packages under {roots[0].parent} does not run: "
            f"{check.stderr.strip()[-300:]}. Install {name} with the system's package manager instead."
        )
    return program


def _festival(voices: tuple[str, ...]) -> _Program:
    """Festival with ``voices`` (names of FESTIVAL_PACKAGES), from its Debian packages. Festival reads
    its init files, lexicons and voices below one ``--datadir``, and the packages unpack apart, so
    their ``usr/share/festival`` trees are joined (as symbolic links) into one folder, once."""
    unknown = [voice for voice in voices if voice not in FESTIVAL_PACKAGES]
    if unknown:
        raise ValueError(f"Unknown Festival voice(s) {unknown}; raylin knows {sorted(FESTIVAL_PACKAGES)}.")
    packages = ["festival", "festlex-cmu", "festlex-poslex"] + [FESTIVAL_PACKAGES[voice] for voice in voices]
    try:
        roots = list(dict.fromkeys(root for package in packages for root in debian_package_with_dependencies(package)))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} The spoken digits' festival set needs Festival's Debian packages "
                                f"({', '.join(packages)}).") from error

    def join(staging: Path) -> None:
        for package in packages:
            tree = debian_dir() / package / "usr" / "share" / "festival"
            for file in sorted(tree.rglob("*")):
                link = staging / file.relative_to(tree)
                if file.is_file() and not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(file)

    # A leading dot: no package name can clash.
    joined = build_once(debian_dir() / f".festival-data-{'-'.join(voices)}", "init.scm", join)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [library_path(roots), env.get("LD_LIBRARY_PATH")]))
    binary = debian_dir() / "festival" / "usr" / "bin" / "festival"
    return _Program((str(binary), "--datadir", str(joined), "--libdir", str(joined)), env)


def _espeak_variants(espeak: _Program) -> list[str]:
    """Variant names espeak-ng lists (``--voices=variant``), sorted."""
    result = espeak.run("--voices=variant")
    variants = []
    for line in result.stdout.splitlines()[1:]:
        tokens = line.split()
        files = [i for i, token in enumerate(tokens) if token.startswith("!v/")]
        # The file column is the last but for "(lang priority)" pairs; a name with a space (1.51's
        # "Mr serious") would be cut in two and cannot be passed as "-v accent+name" anyway.
        if files and all(token.startswith("(") or token.endswith(")") for token in tokens[files[0] + 1 :]):
            variants.append(tokens[files[0]][3:])
    if not variants:
        raise RuntimeError(f"espeak-ng listed no voice variants: {result.stderr.strip()[-300:]}")
    return sorted(set(variants))


def _version(program: _Program, pattern: str) -> str:
    output = program.run("--version").stdout
    match = re.search(pattern, output)
    return match.group(1) if match else output.strip()[:80]


@dataclass(frozen=True)
class _Voice:
    """One synthesiser setting; it says all ten digits."""

    engine: str
    accent: str  # espeak-ng accent, or flite voice
    variant: str
    speed: int  # espeak-ng words per minute, or flite / Festival duration stretch in percent
    pitch: int
    options: tuple  # command-line options before the text; _WAV marks the output file


def _render(recipe: DigitRecipe, out: Path, workers: int) -> None:
    programs = {"espeak-ng": _program("espeak-ng", "--version"), "flite": _program("flite", "-lv")}
    if recipe.festival_voices:
        programs["festival"] = _festival(recipe.festival_voices)
    available = _espeak_variants(programs["espeak-ng"])
    if not 1 <= recipe.num_variants <= len(available):
        raise ValueError(
            f"num_variants must be 1..{len(available)} (the variants espeak-ng lists), not {recipe.num_variants}."
        )
    variants = sorted(random.Random(recipe.seed).sample(available, recipe.num_variants))
    voices = [
        _Voice("espeak-ng", accent, variant, speed, pitch,
               ("-v", f"{accent}+{variant}", "-s", str(speed), "-p", str(pitch), "-w", _WAV))
        for accent in recipe.accents for variant in variants for speed in recipe.speeds for pitch in recipe.pitches
    ]
    voices += [
        _Voice("flite", voice, "", round(stretch * 100), 0,
               ("-voice", voice, "--setf", f"duration_stretch={stretch}", "-o", _WAV, "-t"))
        for voice in recipe.flite_voices for stretch in recipe.flite_stretches
    ]
    voices += [
        _Voice("festival", voice, "", round(stretch * 100), 0,
               (f"(voice_{voice}_diphone)", f"(Parameter.set (quote Duration_Stretch) {stretch})"))
        for voice in recipe.festival_voices for stretch in recipe.festival_stretches
    ]
    wav_dir = Path(tempfile.mkdtemp(prefix=".wav.", dir=out))

    def run(index: int, voice: _Voice, *text: str) -> tuple[np.ndarray, int]:
        path = wav_dir / f"{index}.wav"
        command = [str(path) if arg is _WAV else arg for arg in voice.options] + list(text)
        result = programs[voice.engine].run(*command)
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(f"`{voice.engine} {' '.join(command)}` failed: {result.stderr.strip()[-300:]}")
        audio = read_audio(path)
        path.unlink()
        return audio

    def say_digits(index: int) -> tuple[list[np.ndarray], bool]:
        """The ten clips of voice ``index``, and whether one espeak-ng call said them all."""
        voice = voices[index]
        if voice.engine == "festival":  # one process says the ten words into ten files
            paths = [wav_dir / f"{index}-{label}.wav" for label in range(len(DIGITS))]
            saves = [f'(utt.save.wave (SynthText "{word}") "{path}" (quote riff))' for word, path in zip(DIGITS, paths)]
            result = programs["festival"].run("--batch", *voice.options, *saves)
            if result.returncode != 0 or not all(path.is_file() for path in paths):
                raise RuntimeError(f"festival {' '.join(voice.options)} failed: {(result.stderr + result.stdout).strip()[-300:]}")
            clips = [_checked(_clean(*read_audio(path)), voice) for path in paths]
            for path in paths:
                path.unlink()
            return clips, True
        if voice.engine == "espeak-ng":
            # Starting espeak-ng costs more than saying a word, so one call says all ten, as SSML
            # sentences 600 ms apart, and the result is cut at the pauses.
            text = " ".join(f'{word}. <break time="600ms"/>' for word in DIGITS)
            audio, rate = run(index, voice, "-m", text)  # -m: the text is SSML
            words = _split_words(audio, rate, len(DIGITS))
            if words is not None:
                return [_checked(_clean(word, rate), voice) for word in words], True
        return [_checked(_clean(*run(index, voice, word)), voice) for word in DIGITS], False

    with ThreadPoolExecutor(workers) as pool:  # threads suffice: the work is in the child processes
        said = list(pool.map(say_digits, range(len(voices))))
    shutil.rmtree(wav_dir)
    clips = [clip for voice_clips, _ in said for clip in voice_clips]
    rows = [(v.engine, v.accent, v.variant, v.speed, v.pitch, label) for v in voices for label in range(len(DIGITS))]
    columns = list(zip(*rows))
    np.savez(
        out / "clips.npz",
        audio=np.concatenate(clips),
        offsets=np.cumsum([0] + [len(clip) for clip in clips]).astype(np.int64),
        engine=np.array(columns[0]), accent=np.array(columns[1]), variant=np.array(columns[2]),
        speed=np.array(columns[3], np.int32), pitch=np.array(columns[4], np.int32),
        labels=np.array(columns[5], np.int64),
    )
    unsplit = sum(1 for voice, (_, batched) in zip(voices, said) if voice.engine == "espeak-ng" and not batched)
    meta = {
        "recipe": asdict(recipe), "format": _FORMAT, "variants": variants, "clips": len(clips),
        "espeak_voices_said_word_by_word": unsplit,  # their ten-digit call did not cut into ten words
        "engines": {
            "espeak-ng": _version(programs["espeak-ng"], r"text-to-speech: (\S+)"),
            "flite": _version(programs["flite"], r"version: (\S+)"),
            **({"festival": _version(programs["festival"], r"System: (\S+)")} if "festival" in programs else {}),
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _split_words(audio: np.ndarray, rate: int, count: int) -> list[np.ndarray] | None:
    """Cut a recording of ``count`` words said with long pauses at its silences (>= 300 ms), with
    50 ms margins; None when it does not give ``count`` pieces. Pauses inside a word (the closure
    in "six", "eight") last well under 200 ms."""
    frame = rate // 100
    loudness = np.abs(audio[: len(audio) // frame * frame]).reshape(-1, frame).max(axis=1)
    voiced = np.flatnonzero(loudness > loudness.max(initial=0.0) * 0.01)
    if voiced.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(voiced) >= 30)
    starts, stops = np.r_[voiced[0], voiced[breaks + 1]], np.r_[voiced[breaks], voiced[-1]]
    if len(starts) != count:
        return None
    return [audio[max(start - 5, 0) * frame : (stop + 6) * frame] for start, stop in zip(starts, stops)]


def _checked(clip: np.ndarray, voice: _Voice) -> np.ndarray:
    if clip.size == 0:
        raise RuntimeError(f"{voice.engine} {' '.join(str(o) for o in voice.options if o is not _WAV)} said nothing.")
    return clip


def _clean(audio: np.ndarray, rate: int) -> np.ndarray:
    """Resample to 16 kHz, trim leading / trailing silence (-40 dB of peak, 20 ms kept), cap at 2 s."""
    audio = resample(audio, rate)
    frame = SAMPLING_RATE // 100  # 10 ms
    usable = len(audio) // frame * frame
    loudness = np.abs(audio[:usable]).reshape(-1, frame).max(axis=1)
    loud = np.flatnonzero(loudness > max(loudness.max(initial=0.0) * 0.01, 1e-4))
    if loud.size == 0:
        return np.zeros(0, np.float32)
    start, stop = max(loud[0] - 2, 0) * frame, min(loud[-1] + 3, len(loudness)) * frame
    audio = audio[start:stop][: int(MAX_SECONDS * SAMPLING_RATE)]
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


# ----- varied speech for the broad-data stage -----------------------------------------------------

# Everyday words for the broad-data speech: unlabeled phrases, so any words do; none are digits.
WORDS = tuple("""
about above across after again against almost along always animal answer apple around autumn baby
back ball basket beach bear because bed before begin behind bell below between bicycle big bird
black blue boat body book bottle box bread bridge bright brother brown build butter cake call
camera candle car carry castle cat chair change cheese children circle city clean clock close cloud
coffee cold colour come corner country cover cow cup dance dark daughter day deep desk dinner doctor
dog door down dream dress drink early earth east easy eat egg engine evening every eye face family
farm fast father feather field find finger fire fish flower fly follow food forest friend garden
girl give glass gold good grass great green ground guitar hair hand happy hat heart heavy hello help
high hill holiday home horse hospital hour house hundred ice island jacket journey jump kitchen
ladder lamp large late laugh leaf learn letter light listen little long lunch machine market
milk minute money moon morning mother mountain music name near never night north ocean open orange
paper party pencil people picture place plant play pocket purple question quiet rabbit rain read
red remember river road rock room round run school sea second shadow ship shoe short silver sing
sister sleep slow small snow soft song south speak spring square star station stone story street
summer sun sweet table tall teacher thank think thousand today together tomorrow tree truck under
up valley village voice wait walk wall warm water weather west wheel white window winter wood
world write yellow yesterday young
""".split())


@dataclass(frozen=True)
class VoicesRecipe:
    """What ``synthesize_voices`` renders: ``clips`` phrases of 1-3 ``WORDS``, each in a voice drawn
    from the training accents and every espeak-ng variant, at a drawn speed and pitch. Its hash names
    the cache folder. Never uses the held-out accents, flite or Festival (the evaluation sets)."""

    clips: int = 2000
    seed: int = 0
    speeds: tuple[int, int] = (110, 240)  # words per minute, drawn uniformly
    pitches: tuple[int, int] = (15, 85)
    accents: tuple[str, ...] = TRAIN_ACCENTS

    def folder_name(self) -> str:
        return f"voices-v{_FORMAT}-{fingerprint({'format': _FORMAT, **asdict(self)}, 12)}"


def load_voices(recipe: VoicesRecipe) -> list[np.ndarray]:
    """The recipe's clips (float32, 16 kHz, trimmed and capped at 2 s like the digits), synthesised
    once into ``$RAYLIN_CACHE/spoken_digits/<voices folder>/clips.npz`` (about 1 s per 20 clips on
    two cores) and read from there afterwards."""
    unknown = [accent for accent in recipe.accents if accent not in TRAIN_ACCENTS]
    if unknown:
        raise ValueError(f"Accent(s) {unknown} are held out for evaluation (or unknown); broad speech uses {TRAIN_ACCENTS}.")
    target = build_once(cache_dir() / "spoken_digits" / recipe.folder_name(), "clips.npz",
                        lambda staging: _render_voices(recipe, staging))
    with np.load(target / "clips.npz") as data:
        audio, offsets = data["audio"], data["offsets"]
        return [audio[start:stop].copy() for start, stop in zip(offsets[:-1], offsets[1:])]


def _render_voices(recipe: VoicesRecipe, out: Path) -> None:
    espeak = _program("espeak-ng", "--version")
    variants = _espeak_variants(espeak)
    rng = random.Random(recipe.seed)
    settings = [(rng.choice(recipe.accents), rng.choice(variants), rng.randint(*recipe.speeds), rng.randint(*recipe.pitches),
                 " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))) for _ in range(recipe.clips)]

    def say(index: int) -> np.ndarray:
        accent, variant, speed, pitch, phrase = settings[index]
        path = out / f"{index}.wav"
        result = espeak.run("-v", f"{accent}+{variant}", "-s", str(speed), "-p", str(pitch), "-w", str(path), phrase)
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(f"`espeak-ng -v {accent}+{variant}` failed: {result.stderr.strip()[-300:]}")
        clip = _clean(*read_audio(path))
        path.unlink()
        return clip

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        clips = [clip for clip in pool.map(say, range(len(settings))) if clip.size]
    np.savez(out / "clips.npz", audio=np.concatenate(clips), offsets=np.cumsum([0] + [len(c) for c in clips]).astype(np.int64))
    (out / "meta.json").write_text(json.dumps({"recipe": asdict(recipe), "clips": len(clips), "variants": variants,
                                               "espeak-ng": _version(espeak, r"text-to-speech: (\S+)")}, indent=1))
