"""Speech augmentation: the acoustic variety a synthetic training set lacks (speed, room, noise,
channel, level), applied to 16 kHz mono float32 clips with numpy and soxr.

``augment(clip, seed, settings)`` is a pure function of its arguments: the same clip, seed and
settings give the same samples on every machine with the same numpy and soxr, which is what lets
augmented examples keep an example index (the activation cache and exact resume key on it).

| effect    | probability | what it does                                                               |
|-----------|------------:|----------------------------------------------------------------------------|
| speed     | always      | resampling by a factor in ``speed`` (0.85-1.15): tempo and pitch together, as Kaldi's speed perturbation |
| reverb    | ``reverb``  | convolution with a synthetic room response: decaying noise, RT60 0.15-0.7 s |
| band      | ``band``    | a narrow channel: down to 8 kHz and back (telephone-band speech)           |
| noise     | ``noise``   | white, pink or brown noise at an SNR in ``snr_db`` (5-30 dB)               |
| gain      | always      | level between -12 and +3 dB of the clip's, then clipped to [-1, 1]         |

Limits: synthetic rooms and noises, not recorded ones; clips keep their length except for the
speed change (a Whisper classifier crops or pads them to ``data.max_seconds`` as usual).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raylin.data.audio import SAMPLING_RATE, resample


@dataclass(frozen=True)
class AugmentSettings:
    speed: tuple[float, float] = (0.85, 1.15)
    reverb: float = 0.5  # probability
    band: float = 0.25
    noise: float = 0.7
    snr_db: tuple[float, float] = (5.0, 30.0)


DEFAULT_AUGMENT = AugmentSettings()


def augment(clip: np.ndarray, seed: int, settings: AugmentSettings = DEFAULT_AUGMENT) -> np.ndarray:
    """``clip`` with the table's effects drawn from ``seed`` (see the module doc)."""
    rng = np.random.default_rng(seed)
    audio = np.asarray(clip, dtype=np.float32)
    if audio.size == 0:
        return audio
    factor = rng.uniform(*settings.speed)
    # Read at factor x the rate, played at the rate: factor > 1 is faster and higher.
    audio = resample(audio, int(round(SAMPLING_RATE * factor)), SAMPLING_RATE)
    if rng.random() < settings.reverb:
        audio = _reverberate(audio, rng)
    if rng.random() < settings.band:
        audio = resample(resample(audio, SAMPLING_RATE, 8_000), 8_000, SAMPLING_RATE)
    if rng.random() < settings.noise:
        audio = audio + _noise(len(audio), rng, rng.uniform(*settings.snr_db), audio)
    peak = float(np.abs(audio).max(initial=0.0))
    if peak > 0:
        audio = audio / peak * float(np.abs(clip).max(initial=0.0)) * 10 ** (rng.uniform(-12.0, 3.0) / 20)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _reverberate(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rt60 = rng.uniform(0.15, 0.7)  # seconds for the response to decay by 60 dB
    length = int(rt60 * SAMPLING_RATE)
    t = np.arange(length) / SAMPLING_RATE
    response = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)  # ln(1000) = 6.9: -60 dB at rt60
    response[0] = 1.0 / max(rng.uniform(0.3, 1.0), 1e-3)  # the direct path, louder than the room
    response /= np.sqrt(np.sum(response**2))
    wet = np.convolve(audio, response)[: len(audio)]
    return wet.astype(np.float32)


def _noise(length: int, rng: np.random.Generator, snr_db: float, signal: np.ndarray) -> np.ndarray:
    white = rng.standard_normal(length)
    colour = rng.integers(3)  # 0 white, 1 pink (1/f), 2 brown (1/f^2)
    if colour:
        spectrum = np.fft.rfft(white)
        frequencies = np.fft.rfftfreq(length, 1 / SAMPLING_RATE)
        spectrum[1:] /= frequencies[1:] ** (colour / 2)
        spectrum[0] = 0
        white = np.fft.irfft(spectrum, length)
    signal_power = float(np.mean(signal.astype(np.float64) ** 2)) or 1e-8
    noise_power = float(np.mean(white**2)) or 1e-8
    return (white * np.sqrt(signal_power / noise_power / 10 ** (snr_db / 10))).astype(np.float32)
