"""Synthetic speech for the home-assistant domain: espeak-ng over many voices, speeds and
pitches, optionally noisy, into 16 kHz mono PCM16 wavs and a NeMo-style JSONL manifest.

    python -m agent.training.synth --out data/train --split train --n 6000 [--extra-vocab] [--weights 0.4,0.2,0.4]
    python -m agent.training.synth --out data/test --split test --n 600     # reserved voices only
    python -m agent.training.synth --out data --split text                  # text only: every (prompt, reply)

Each manifest line: ``audio_filepath``, ``duration`` (s), ``text`` (the transcript),
``answer`` (the expected reply), ``intent``, ``voice``, ``reserved`` (voice class), ``held_out``
(a device combination kept out of training), ``slots``, ``speed``, ``pitch``, ``snr_db``
(null = clean), ``split``, ``seed``.

Voices: see `agent.training.voices` for the exact reserved-voice rule. Training and validation
splits refuse reserved voices; the test split accepts only reserved ones. Held-out device
combinations never occur in the train split; val and test include them (half of their device
items), so validation measures generalization to unseen combinations without touching a
reserved voice. ``--split text`` writes no audio: ``text.jsonl`` holds every (transcript, reply)
pair of the domain, held-out combinations included (text for the LLM, not training audio). Rendering runs in a
pool of worker processes (`--workers`, default 2); every item's randomness comes from
(seed, index), so the output does not depend on the number of workers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import time
from multiprocessing import Pool
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from agent.training.domain import INTENTS, OUT_OF_DOMAIN, Domain, Example, cut_points
from agent.training.voices import is_reserved, reserved_voices, training_voices

SAMPLE_RATE = 16000
SPLITS = ("train", "val", "test")
TEXT_SPLIT = "text"


class ReservedVoiceError(ValueError):
    pass


def check_voices(voices: Sequence[str], split: str) -> List[str]:
    """The voices a split may use: reserved ones are refused for train/val, required for test."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    voices = list(voices)
    if not voices:
        raise ValueError("no voices")
    if split == "test":
        bad = [v for v in voices if not is_reserved(v)]
        if bad:
            raise ReservedVoiceError(f"the test split uses reserved voices only; not reserved: {bad}")
    else:
        bad = [v for v in voices if is_reserved(v)]
        if bad:
            raise ReservedVoiceError(f"reserved voices are never used for the {split} split: {bad} "
                                     f"(see agent/training/voices.py)")
    return voices


def default_voices(split: str) -> List[str]:
    return reserved_voices() if split == "test" else training_voices()


def parse_range(value: Optional[str], cast=float) -> Optional[Tuple[float, float]]:
    """"a,b" -> (a, b); "a" -> (a, a); "none"/None -> None."""
    if value is None or str(value).lower() in ("", "none", "off"):
        return None
    parts = [cast(p) for p in str(value).split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] > parts[1]:
        raise ValueError(f"expected MIN,MAX, got {value!r}")
    return parts[0], parts[1]


def render(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech as float32 at 16 kHz."""
    import soundfile as sf
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=True).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    data = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        data = soxr.resample(data, rate, SAMPLE_RATE).astype(np.float32)
    return data


def colored_noise(n: int, rng: np.random.Generator, color: str) -> np.ndarray:
    white = rng.standard_normal(n).astype(np.float32)
    if color == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=np.float32)
    f[0] = 1.0
    spectrum /= np.sqrt(f) if color == "pink" else f
    noise = np.fft.irfft(spectrum, n).astype(np.float32)
    return noise / (noise.std() + 1e-8)


def add_noise(speech: np.ndarray, snr_db: float, rng: np.random.Generator, color: str = "white") -> np.ndarray:
    """Noise at `snr_db` relative to the speech power (measured where there is speech)."""
    active = speech[np.abs(speech) > 0.02 * (np.abs(speech).max() + 1e-8)]
    power = float(np.mean(active ** 2)) if active.size else float(np.mean(speech ** 2))
    noise = colored_noise(len(speech), rng, color)
    return speech + noise * np.sqrt(power / (10 ** (snr_db / 10))).astype(np.float32)


def make_item(job: dict) -> dict:
    """Render one manifest item (runs in a worker)."""
    import soundfile as sf

    rng = np.random.default_rng([job["seed"], job["index"], 7])
    speech = render(job["text"], job["voice"], job["speed"], job["pitch"])
    lead, tail = (int(SAMPLE_RATE * rng.uniform(*job["pad_s"])) for _ in range(2))
    audio = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(tail, np.float32)])
    if job["snr_db"] is not None:
        audio = add_noise(audio, job["snr_db"], rng, job["noise_color"])
    peak = float(np.abs(audio).max()) + 1e-8
    audio = audio * (job["peak"] / peak)
    path = job["audio_filepath"]
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    item = {k: job[k] for k in ("audio_filepath", "text", "answer", "intent", "voice", "reserved", "held_out",
                                "slots", "speed", "pitch", "snr_db", "split", "seed", "done")}
    if not job["done"]:
        item.update(full_text=job["full_text"], cut_words=job["cut_words"])
    item["duration"] = round(len(audio) / SAMPLE_RATE, 4)
    if job["snr_db"] is not None:
        item["noise"] = job["noise_color"]
    return item


def plan_jobs(out_dir: str, split: str, n: int, voices: Sequence[str], seed: int, domain: Domain,
              speeds: Tuple[float, float], pitches: Tuple[float, float], noise_db: Optional[Tuple[float, float]],
              noise_prob: float, weights: Optional[Dict[str, float]] = None, held_out_share: float = 0.5,
              cut_share: float = 0.0) -> List[dict]:
    voices = check_voices(voices, split)
    rng = random.Random(f"{split}-{seed}")
    cut_rng = random.Random(f"{split}-{seed}-cut")  # its own stream: cut_share=0 leaves the rest unchanged
    include_held_out = split in ("val", "test")
    examples: List[Example] = domain.sample(n, rng, include_held_out=include_held_out, weights=weights,
                                            held_out_only_share=held_out_share if include_held_out else 0.0)
    wav_dir = os.path.join(out_dir, "wavs")
    jobs = []
    for i, ex in enumerate(examples):
        if ex.held_out and split == "train":
            raise AssertionError("held-out device combination in a training split")
        snr = None
        if noise_db is not None and rng.random() < noise_prob:
            snr = round(rng.uniform(*noise_db), 1)
        text, done, cut = ex.text, True, {}
        points = cut_points(ex) if cut_share > 0 else []
        if points and cut_rng.random() < cut_share:  # an unfinished turn: the first k words, spoken alone
            k = cut_rng.choice(points)
            text, done = " ".join(ex.text.split()[:k]), False
            cut = {"full_text": ex.text, "cut_words": k}
        jobs.append({
            "index": i, "seed": seed, "split": split,
            "audio_filepath": os.path.abspath(os.path.join(wav_dir, f"{split}_{i:06d}.wav")),
            "text": text, "answer": ex.answer, "intent": ex.intent, "held_out": ex.held_out,
            "slots": ex.slot_dict(), "done": done, **cut,
            "voice": voices[rng.randrange(len(voices))] if split != "test" else voices[i % len(voices)],
            "speed": int(rng.uniform(*speeds)), "pitch": int(rng.uniform(*pitches)),
            "snr_db": snr, "noise_color": rng.choice(["white", "pink", "brown"]),
            "pad_s": (0.05, 0.35), "peak": round(rng.uniform(0.25, 0.95), 3),
        })
    for job in jobs:
        job["reserved"] = is_reserved(job["voice"])
    return jobs


def synthesize(out_dir: str, split: str = "train", n: int = 1000, voices: Optional[Sequence[str]] = None,
               seed: int = 0, domain_seed: int = 0, speeds: Tuple[float, float] = (120, 230),
               pitches: Tuple[float, float] = (15, 85), noise_db: Optional[Tuple[float, float]] = (5.0, 30.0),
               noise_prob: float = 0.5, workers: int = 2, manifest: Optional[str] = None,
               weights: Optional[Dict[str, float]] = None, progress: bool = True, extra_vocab: bool = False,
               cut_share: float = 0.0) -> str:
    """Render `n` items into `out_dir`; returns the manifest path (default `out_dir/<split>.jsonl`).
    `extra_vocab` (train split only) adds the training-only devices and rooms (domain.EXTRA_*)."""
    if extra_vocab and split != "train":
        raise ValueError("extra_vocab is for the train split only: val and test keep the domain's own words")
    voices = list(voices) if voices else default_voices(split)
    jobs = plan_jobs(out_dir, split, n, voices, seed, Domain(seed=domain_seed, extra_vocab=extra_vocab), speeds,
                     pitches, noise_db, noise_prob, weights, cut_share=cut_share)
    os.makedirs(os.path.join(out_dir, "wavs"), exist_ok=True)
    manifest = manifest or os.path.join(out_dir, f"{split}.jsonl")
    items = []
    if workers > 1:
        with Pool(workers) as pool:
            iterator = pool.imap(make_item, jobs, chunksize=16)
            items = list(_progress(iterator, len(jobs), progress, split))
    else:
        items = list(_progress(map(make_item, jobs), len(jobs), progress, split))
    with open(manifest, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return manifest


def write_text_manifest(out_dir: str, domain_seed: int = 0, manifest: Optional[str] = None,
                        extra_vocab: bool = False) -> Tuple[str, int]:
    """Every (transcript, reply) pair of the domain as JSONL (``text``, ``answer``, ``intent``,
    ``held_out``, ``slots``): the text the LLM is pre-trained on and keeps training on."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = manifest or os.path.join(out_dir, f"{TEXT_SPLIT}.jsonl")
    n = 0
    with open(manifest, "w") as f:
        for examples in Domain(seed=domain_seed, extra_vocab=extra_vocab).all_examples(include_held_out=True).values():
            for ex in examples:
                if ex.held_out and ex.intent == OUT_OF_DOMAIN:
                    continue  # held-out out-of-domain phrasings stay out of the training text too
                f.write(json.dumps({"text": ex.text, "answer": ex.answer, "intent": ex.intent,
                                    "held_out": ex.held_out, "slots": ex.slot_dict()}) + "\n")
                n += 1
    return manifest, n


def _progress(iterator, total, enabled, desc):
    if not enabled:
        return iterator
    from tqdm import tqdm

    return tqdm(iterator, total=total, desc=f"synth {desc}", unit="utt", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (wavs/ and <split>.jsonl)")
    p.add_argument("--split", default="train", choices=SPLITS + (TEXT_SPLIT,),
                   help="train/val: non-reserved voices only; test: reserved voices only; val/test include the "
                        "held-out device combinations; text: the domain's text pairs, no audio")
    p.add_argument("--n", type=int, default=1000, help="number of utterances")
    p.add_argument("--voices", default=None,
                   help="comma-separated espeak-ng voices (BASE or BASE+VARIANT); default: every voice allowed for the split")
    p.add_argument("--speeds", default="120,230", help="words per minute range MIN,MAX (espeak-ng -s)")
    p.add_argument("--pitches", default="15,85", help="pitch range MIN,MAX (espeak-ng -p, 0..99)")
    p.add_argument("--noise-db", default="5,30", help="SNR range in dB for added noise, or 'none'")
    p.add_argument("--noise-prob", type=float, default=0.5, help="fraction of utterances that get noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain-seed", type=int, default=0, help="seed of the held-out device combinations")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--manifest", default=None, help="manifest path (default OUT/<split>.jsonl)")
    p.add_argument("--extra-vocab", action="store_true",
                   help="train/text: also the training-only devices and rooms (agent.training.domain.EXTRA_*)")
    p.add_argument("--weights", default=None,
                   help="intent mix DEVICE,TIMER,ARITHMETIC[,OUT_OF_DOMAIN] (default 0.28,0.17,0.38,0.17; "
                        "three numbers: no out-of-domain requests)")
    p.add_argument("--cut-share", type=float, default=0.0,
                   help="fraction of utterances cut at a random word boundary: unfinished turns (done: false), "
                        "for the end-of-turn decision; the first words are rendered by espeak-ng on their own")
    args = p.parse_args(argv)
    voices = [v.strip() for v in args.voices.split(",") if v.strip()] if args.voices else None
    weights = None
    if args.weights:
        try:
            parts = [float(w) for w in args.weights.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (len(INTENTS) - 1, len(INTENTS)) or min(parts) < 0 or sum(parts) <= 0:
            p.error(f"--weights takes three or four non-negative numbers DEVICE,TIMER,ARITHMETIC[,OUT_OF_DOMAIN], "
                    f"got {args.weights!r}")
        weights = dict(zip(INTENTS, parts))
    if not 0.0 <= args.cut_share <= 1.0:
        p.error(f"--cut-share is a fraction in [0, 1], got {args.cut_share}")
    start = time.time()
    if args.split == TEXT_SPLIT:
        path, n = write_text_manifest(args.out, args.domain_seed, args.manifest, args.extra_vocab)
        print(f"wrote {n} text pairs to {path}")
        return
    try:
        path = synthesize(args.out, args.split, args.n, voices, args.seed, args.domain_seed,
                          parse_range(args.speeds), parse_range(args.pitches), parse_range(args.noise_db),
                          args.noise_prob, args.workers, args.manifest, weights, extra_vocab=args.extra_vocab,
                          cut_share=args.cut_share)
    except ValueError as exc:  # reserved voices, extra vocabulary outside the train split
        p.error(str(exc))
    print(f"wrote {args.n} utterances and {path} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
