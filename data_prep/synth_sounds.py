"""The synthetic "sound world": short clips of 1-3 sound events in a row, and captions that describe them.

An event has a pitch (low / mid / high), a timbre (tone: a sine; buzz: a square or sawtooth wave; noise:
a burst of white noise band-passed around the pitch) and a length (short / long). A clip is its events in
order, with gaps, over faint background noise. Like the shapes world: clips are frozen descriptions
sampled in the main process from one seeded ``random.Random``; ``SoundClip.render()`` synthesises the
samples (numpy RNG seeded from the description) in the encoding workers.
Captions name every event in order, grouping equal neighbours ("two short high tones, then a long low
buzz"), with varied words, joiners and prefixes.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np

from data_prep.synth_text import distinct_captions

SAMPLE_RATE = 16000
PITCHES = {"low": (140.0, 220.0), "mid": (380.0, 620.0), "high": (1000.0, 1600.0)}  # Hz ranges
TIMBRES = ("tone", "buzz", "noise")
LENGTHS = {"short": (0.2, 0.35), "long": (0.7, 0.95)}  # seconds
MAX_EVENTS = 3
GAP_SECONDS = (0.1, 0.25)  # before, between and after events: 4 gaps + 3 long events < MAX_CLIP_SECONDS
MIN_CLIP_SECONDS, MAX_CLIP_SECONDS = 2.0, 4.0
BACKGROUND_RMS = 0.003
RAMP_SECONDS = 0.01  # attack and release of every event
NOISE_BAND = 0.25  # a noise burst is white noise band-passed to pitch +-25%
NOISE_RMS = 0.3


@dataclasses.dataclass(frozen=True)
class Event:
    pitch: str
    timbre: str
    length: str
    start: float  # seconds
    seconds: float
    frequency: float
    amplitude: float
    wave: str = "sine"  # sine | square | saw | noise

    def describe(self) -> dict:
        return {"pitch": self.pitch, "timbre": self.timbre, "length": self.length}


@dataclasses.dataclass(frozen=True)
class SoundClip:
    events: tuple[Event, ...]
    seconds: float
    noise_seed: int

    def signature(self) -> tuple:
        """What a caption can say about the clip (ignores exact frequencies, times and levels)."""
        return tuple((e.pitch, e.timbre, e.length) for e in self.events)

    def describe(self) -> list[dict]:
        return [e.describe() for e in self.events]

    def render(self) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng(self.noise_seed)
        samples = BACKGROUND_RMS * rng.standard_normal(round(self.seconds * SAMPLE_RATE), dtype=np.float32)
        for event in self.events:
            wave = _event_wave(event, rng)
            start = round(event.start * SAMPLE_RATE)
            samples[start:start + len(wave)] += wave
        return samples, SAMPLE_RATE


def _event_wave(event: Event, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(round(event.seconds * SAMPLE_RATE), dtype=np.float32) / np.float32(SAMPLE_RATE)
    phase = np.float32(event.frequency) * t
    if event.wave == "sine":
        wave = np.sin(np.float32(2 * np.pi) * phase)
    elif event.wave == "square":
        wave = np.float32(0.6) * np.sign(np.sin(np.float32(2 * np.pi) * phase))
    elif event.wave == "saw":
        wave = np.float32(0.7) * (2 * (phase % 1) - 1)
    else:
        n_fft = 1 << (len(t) - 1).bit_length()  # a power of two: pocketfft is slow on odd lengths
        spectrum = np.fft.rfft(rng.standard_normal(n_fft))
        freqs = np.fft.rfftfreq(n_fft, 1.0 / SAMPLE_RATE)
        spectrum[np.abs(freqs - event.frequency) > NOISE_BAND * event.frequency] = 0.0
        wave = np.fft.irfft(spectrum, n_fft)[: len(t)].astype(np.float32)
        wave *= NOISE_RMS / max(float(wave.std()), 1e-9)
    ramp = np.minimum(1, np.minimum(t, t[-1] - t) / np.float32(RAMP_SECONDS))
    return (np.float32(event.amplitude) * wave * ramp).astype(np.float32)


def random_clip(rng: random.Random) -> SoundClip:
    """1-3 events (uniform), each attribute uniform and independent, in a clip of 2-4 s."""
    specs = [(rng.choice(tuple(PITCHES)), rng.choice(TIMBRES), rng.choice(tuple(LENGTHS)))
             for _ in range(rng.randint(1, MAX_EVENTS))]
    events, time = [], rng.uniform(*GAP_SECONDS)
    for pitch, timbre, length in specs:
        seconds = rng.uniform(*LENGTHS[length])
        wave = {"tone": "sine", "buzz": rng.choice(("square", "saw")), "noise": "noise"}[timbre]
        events.append(Event(pitch, timbre, length, round(time, 4), round(seconds, 4),
                            round(rng.uniform(*PITCHES[pitch]), 2), round(rng.uniform(0.3, 0.6), 3), wave))
        time += seconds + rng.uniform(*GAP_SECONDS)
    total = min(MAX_CLIP_SECONDS, max(MIN_CLIP_SECONDS, time + rng.uniform(0.0, 0.5)))
    return SoundClip(tuple(events), round(total, 4), rng.getrandbits(32))


# ---- captions --------------------------------------------------------------------------------------
COUNT_WORDS = ("", "a", "two", "three")
NOUNS = {"tone": (("tone", "tones"), ("beep", "beeps")),
         "buzz": (("buzz", "buzzes"), ("buzzing sound", "buzzing sounds")),
         "noise": (("noise burst", "noise bursts"), ("burst of noise", "bursts of noise"))}
PITCH_WORDS = {"low": ("low", "deep"), "mid": ("mid", "medium"), "high": ("high", "high-pitched")}
LENGTH_WORDS = {"short": ("short", "brief"), "long": ("long", "sustained")}
JOINERS = (", then ", " followed by ", ", and then ", " and after that ")
PREFIXES = ("", "we hear ", "a clip with ", "the sound of ", "a recording of ")


def _runs(clip: SoundClip, group: bool) -> list[tuple[tuple, int]]:
    """Events as (signature, repeat count), grouping equal neighbours when `group`."""
    runs: list[tuple[tuple, int]] = []
    for sig in clip.signature():
        if group and runs and runs[-1][0] == sig:
            runs[-1] = (sig, runs[-1][1] + 1)
        else:
            runs.append((sig, 1))
    return runs


def make_caption(rng: random.Random, clip: SoundClip) -> str:
    """One caption naming every event's count, length, pitch and timbre, in order."""
    word = rng.randrange(2)  # one synonym set per caption, so a caption never mixes "tone" and "beep"
    phrases = []
    for (pitch, timbre, length), n in _runs(clip, group=rng.random() < 0.8):
        singular, plural = NOUNS[timbre][word]
        count = COUNT_WORDS[n] if n > 1 or rng.random() < 0.8 else "one"
        noun = plural if n > 1 else singular
        adjectives = [LENGTH_WORDS[length][word], PITCH_WORDS[pitch][word]]
        phrases.append(" ".join([count, *adjectives, noun]))
    text = phrases[0]
    for phrase in phrases[1:]:
        text += rng.choice(JOINERS) + phrase
    return rng.choice(PREFIXES) + text


def make_sound_captions(rng: random.Random, clip: SoundClip, count: int) -> list[str]:
    """`count` different captions of the same clip."""
    return distinct_captions(make_caption, rng, clip, count)
