"""espeak-ng voices and the reserved-voice rule.

A voice is written ``BASE`` or ``BASE+VARIANT`` (espeak-ng's ``-v`` syntax), e.g. ``en-us``,
``en-us+f3``, ``en-029+klatt4``. BASE is an English espeak-ng voice (``espeak-ng --voices=en``,
its language column); VARIANT is a variant file name (``espeak-ng --voices=variant``, the
name after ``!v/``).

Classification (exactly): a voice is RESERVED when its base is one of RESERVED_BASES
(``en-029``, ``en-gb-scotland``), whatever its variant, OR its variant is one of
RESERVED_VARIANTS (``m6``, ``f5``, ``klatt4``, ``john``, ``linda``, ``grandpa``), whatever its
base. Comparison is case-insensitive, on the base and variant names as written. Every other
voice is a training voice. Reserved voices never appear in training or validation data
(the synthesizer refuses them there) and are the only voices of the test split.
"""
from __future__ import annotations

import functools
import subprocess
from typing import List, Tuple

RESERVED_BASES = ("en-029", "en-gb-scotland")
RESERVED_VARIANTS = ("m6", "f5", "klatt4", "john", "linda", "grandpa")

# Fallbacks when espeak-ng cannot be asked (names as espeak-ng 1.51 lists them).
_DEFAULT_BASES = ("en", "en-us", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-us-nyc", "en-029",
                  "en-gb-scotland")
# Variants that are not a speaker at all (a test voice, sound effects) are skipped.
_SKIP_VARIANTS = {"fast", "announcer"}


def split_voice(voice: str) -> Tuple[str, str]:
    base, _, variant = voice.partition("+")
    if not base:
        raise ValueError(f"bad voice {voice!r}: expected BASE or BASE+VARIANT")
    return base, variant


def is_reserved(voice: str) -> bool:
    base, variant = split_voice(voice)
    return base.lower() in RESERVED_BASES or variant.lower() in RESERVED_VARIANTS


@functools.lru_cache(maxsize=None)
def base_voices() -> Tuple[str, ...]:
    """English espeak-ng base voices (formant synthesis; MBROLA voices need extra packages)."""
    try:
        out = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return _DEFAULT_BASES
    names = []
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and cols[1].startswith("en") and not cols[4].startswith("mb/") and cols[1] not in names:
            names.append(cols[1])
    return tuple(n for n in names if n != "en-uk") or _DEFAULT_BASES


@functools.lru_cache(maxsize=None)
def variants() -> Tuple[str, ...]:
    try:
        out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return RESERVED_VARIANTS + ("m1", "m2", "m3", "f1", "f2", "f3", "f4")
    names = []
    for line in out.splitlines()[1:]:
        for col in line.split():
            if col.startswith("!v/"):
                name = col[3:]
                if name not in _SKIP_VARIANTS and name not in names:
                    names.append(name)
    return tuple(names)


def training_voices() -> List[str]:
    """Every non-reserved BASE and BASE+VARIANT."""
    bases = [b for b in base_voices() if b.lower() not in RESERVED_BASES]
    vs = [v for v in variants() if v.lower() not in RESERVED_VARIANTS]
    return bases + [f"{b}+{v}" for b in bases for v in vs]


def reserved_voices() -> List[str]:
    """The test voices: each reserved base alone and with each reserved variant, and each
    non-reserved base with each reserved variant."""
    bases = list(base_voices())
    reserved_bases = [b for b in bases if b.lower() in RESERVED_BASES] or list(RESERVED_BASES)
    other = [b for b in bases if b.lower() not in RESERVED_BASES]
    out = list(reserved_bases) + [f"{b}+{v}" for b in reserved_bases for v in RESERVED_VARIANTS]
    out += [f"{b}+{v}" for b in other for v in RESERVED_VARIANTS]
    return out
