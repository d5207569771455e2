"""Training data: NeMo-style JSONL manifests -> batches for `UltravoxModel`.

A batch is built with the model's own `UltravoxProcessor` (it expands `<|audio|>` into exactly
the positions the encoder produces and computes the log-mel features). The prompt is the chat
template rendered the way inference renders it (`UltravoxInference.build_prompt`, which the
realtime Session also follows); the reply tokens and the end-of-turn token are appended after
it, and only they carry labels.
"""
from __future__ import annotations

import json
import os
import random
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

IGNORE = -100


def read_manifest(path: str, limit: Optional[int] = None) -> List[dict]:
    items = []
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            item = json.loads(line)
            if not os.path.isabs(item["audio_filepath"]):
                item["audio_filepath"] = os.path.join(base, item["audio_filepath"])
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    return items


def read_text_pairs(path: str) -> List[dict]:
    """A text-only JSONL manifest: one ``{"text": transcript, "answer": reply}`` per line."""
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not isinstance(item.get("text"), str) or not isinstance(item.get("answer"), str):
                raise ValueError(f"{path}:{n}: a text pair needs string 'text' and 'answer' fields")
            pairs.append(item)
    if not pairs:
        raise ValueError(f"{path}: no text pairs")
    return pairs


class TextPairSampler:
    """Draws text pairs evenly over intents (then uniformly within one), so a small intent
    (50 device combinations next to 507 sums) is not drowned out."""

    def __init__(self, pairs: Sequence[dict], rng: random.Random):
        self.groups: Dict[str, List[dict]] = {}
        for pair in pairs:
            self.groups.setdefault(str(pair.get("intent", "")), []).append(pair)
        self.names = sorted(self.groups)
        self.rng = rng

    def sample(self, n: int) -> List[dict]:
        return [self.rng.choice(self.groups[self.rng.choice(self.names)]) for _ in range(n)]


def load_wave(path: str) -> np.ndarray:
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    data = data.mean(axis=1)
    if rate != 16000:
        import soxr

        data = soxr.resample(data, rate, 16000).astype(np.float32)
    return data


def render_prompt(tokenizer, system_prompt: Optional[str], user_text: str, placeholder: str = "<|audio|>",
                  audio: bool = True, transcript: Optional[str] = None) -> str:
    """The chat prompt up to the assistant header, as `UltravoxInference.build_prompt` renders
    it (a transcript instead of the audio gives the text-only version of the same turn)."""
    content = user_text
    if audio:
        content = content + ("\n" if content else "") + placeholder
    elif transcript is not None:
        content = content + ("\n" if content else "") + transcript
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reply_ids(tokenizer, answer: str) -> List[int]:
    """The reply's tokens and the end-of-turn token: what generation must produce."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def turn_done(item: dict) -> bool:
    """Whether a manifest item is a complete user turn (``done``, default true); false for a
    request cut at a word boundary (``synth --cut-share``)."""
    return bool(item.get("done", True))


def last_audio_positions(input_ids: torch.Tensor, audio_token_id: int) -> torch.Tensor:
    """[B] index of each row's last audio position. The end-of-turn decision is read there: the
    logits at the last audio position predict the chat template's first token after the audio
    (with ChatML, the user turn's closing ``<|im_end|>``)."""
    is_audio = input_ids == audio_token_id
    if not bool(is_audio.any(dim=1).all()):
        raise ValueError("a row without audio positions")
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(is_audio, idx, torch.full_like(idx, -1)).max(dim=1).values


def end_of_turn_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, audio_token_id: int):
    """(log p_done, log (1 - p_done), end-token ids), each [B]: p_done = softmax(logits at the last
    audio position)[the token that follows the audio in the prompt], the engine's contract."""
    pos = last_audio_positions(input_ids, audio_token_id)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    end_ids = input_ids[rows, pos + 1]
    at = logits[rows, pos].float()
    total = torch.logsumexp(at, dim=-1)
    log_done = at.gather(1, end_ids[:, None])[:, 0] - total
    others = at.scatter(1, end_ids[:, None], float("-inf"))
    log_not = torch.logsumexp(others, dim=-1) - total
    return log_done, log_not, end_ids


def end_of_turn_loss(logits: torch.Tensor, input_ids: torch.Tensor, audio_token_id: int,
                     done: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the end-of-turn decision: -log p_done for complete turns,
    -log(1 - p_done) for cut ones, mean over the batch."""
    log_done, log_not, _ = end_of_turn_log_probs(logits, input_ids, audio_token_id)
    done = done.to(log_done.dtype)
    return -(done * log_done + (1 - done) * log_not).mean()


def reply_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (what the HF loss computes), and 0
    (with a gradient path) for a batch without any (all its turns cut)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    if n == 0:
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum") / n


class Augmenter:
    """On-the-fly waveform augmentation: speed (resampling), gain, additive noise."""

    def __init__(self, cfg: Optional[dict], rng: np.random.Generator):
        self.cfg = cfg or {}
        self.rng = rng

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        c, rng = self.cfg, self.rng
        if not c:
            return wave
        if c.get("speed_prob", 0) > 0 and rng.random() < c["speed_prob"]:
            import soxr

            factor = rng.uniform(*c["speed"])
            wave = soxr.resample(wave, 16000 * factor, 16000).astype(np.float32)
        if c.get("noise_prob", 0) > 0 and rng.random() < c["noise_prob"]:
            from agent.training.synth import add_noise

            wave = add_noise(wave, rng.uniform(*c["snr_db"]), rng, rng.choice(["white", "pink", "brown"]))
        if c.get("gain_db"):
            peak = float(np.abs(wave).max()) + 1e-8
            gain = 10 ** (rng.uniform(*c["gain_db"]) / 20)
            wave = wave * min(gain, 0.99 / peak)
        return wave.astype(np.float32)


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, cfg: Optional[dict], gen: torch.Generator) -> torch.Tensor:
    """SpecAugment-style masks on [B, F, T] log-mel features (set to each item's mean)."""
    if not cfg:
        return features
    features = features.clone()
    B, F, _ = features.shape
    for b in range(B):
        T = int(lengths[b])
        if T < 2:
            continue
        fill = features[b, :, :T].mean()
        for _ in range(int(cfg.get("freq_masks", 0))):
            w = int(torch.randint(0, int(cfg["freq_width"]) + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, F - w), (1,), generator=gen))
            features[b, f0:f0 + w, :T] = fill
        for _ in range(int(cfg.get("time_masks", 0))):
            w = int(torch.randint(0, max(1, int(cfg["time_width"] * T)) + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, max(1, T - w), (1,), generator=gen))
            features[b, :, t0:t0 + w] = fill
    return features


@dataclass
class Batch:
    inputs: Dict[str, torch.Tensor]  # input_ids, attention_mask, input_features, feature_lengths, labels
    items: List[dict]
    text_inputs: Optional[Dict[str, torch.Tensor]] = None  # the transcript version (for KL / text mixing)
    done: Optional[torch.Tensor] = None  # [B] 1.0 for a complete turn, 0.0 for a cut one


def pad_sequences(seqs: Sequence[List[int]], labels: Sequence[List[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class TokenIdCache:
    """Token ids of rendered text prompts and replies for one tokenizer, memoized
    (rendering the chat template per item is slower than the tiny LLM's step)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: Dict[tuple, List[int]] = {}

    def reply(self, answer: str) -> List[int]:
        key = ("reply", answer)
        if key not in self._ids:
            self._ids[key] = reply_ids(self.tokenizer, answer)
        return list(self._ids[key])

    def text_prompt(self, system: Optional[str], user_text: str, transcript: str) -> List[int]:
        key = ("text", system, user_text, transcript)
        if key not in self._ids:
            rendered = render_prompt(self.tokenizer, system, user_text, audio=False, transcript=transcript)
            self._ids[key] = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return list(self._ids[key])


# One cache per tokenizer for callers that pass none, held here (weakly: it goes with
# the tokenizer), not as an attribute on the library's tokenizer object.
_DEFAULT_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_id_cache(tokenizer) -> TokenIdCache:
    cache = _DEFAULT_CACHES.get(tokenizer)
    if cache is None:
        cache = _DEFAULT_CACHES[tokenizer] = TokenIdCache(tokenizer)
    return cache


def text_batch(tokenizer, items: Sequence[dict], system_prompts: Sequence[Optional[str]], user_text: str,
               ids: Optional[TokenIdCache] = None) -> Dict[str, torch.Tensor]:
    """Text-only examples: the transcript in the user turn, the reply labelled."""
    ids = ids if ids is not None else token_id_cache(tokenizer)
    seqs, labels = [], []
    for item, system in zip(items, system_prompts):
        prompt = ids.text_prompt(system, user_text, item["text"])
        reply = ids.reply(item["answer"])
        seqs.append(prompt + reply)
        labels.append([IGNORE] * len(prompt) + reply)
    return pad_sequences(seqs, labels, tokenizer.pad_token_id)


class ManifestDataset:
    """Waveforms held in memory (int16) with their manifest items."""

    def __init__(self, items: List[dict]):
        self.items = items
        self.waves = [(np.clip(load_wave(it["audio_filepath"]), -1, 1) * 32767).astype(np.int16) for it in items]

    @classmethod
    def from_manifest(cls, path: str, limit: Optional[int] = None) -> "ManifestDataset":
        return cls(read_manifest(path, limit))

    def __len__(self) -> int:
        return len(self.items)

    def wave(self, i: int) -> np.ndarray:
        return self.waves[i].astype(np.float32) / 32767.0


class Collator:
    """Items -> model inputs with reply-only labels, through the model's UltravoxProcessor."""

    def __init__(self, processor, system_prompts: Sequence[Optional[str]], user_text: str = "",
                 augment: Optional[dict] = None, seed: int = 0, with_text: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.ids = TokenIdCache(self.tokenizer)
        self.system_prompts = list(system_prompts) or [None]
        self.user_text = user_text
        self.rng = np.random.default_rng(seed)
        self.pyrng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.augment = augment
        self.augmenter = Augmenter({k: v for k, v in (augment or {}).items() if k != "spec_augment"}, self.rng)
        self.with_text = with_text

    def __call__(self, dataset: ManifestDataset, indices: Sequence[int], train: bool = True,
                 system_prompts: Optional[Sequence[Optional[str]]] = None) -> Batch:
        items = [dataset.items[i] for i in indices]
        waves = [dataset.wave(i) for i in indices]
        if train:
            waves = [self.augmenter(w) for w in waves]
        if system_prompts is None:
            system_prompts = [self.pyrng.choice(self.system_prompts) for _ in items]
        rendered = {s: render_prompt(self.tokenizer, s, self.user_text, self.processor.audio_placeholder)
                    for s in set(system_prompts)}
        prompts = [rendered[s] for s in system_prompts]
        enc = self.processor(prompts, audio=waves, sampling_rate=16000)
        seqs, labels = [], []
        for i, item in enumerate(items):
            prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            if not turn_done(item):  # an unfinished turn: no reply to learn (see end_of_turn_loss)
                seqs.append(prompt)
                labels.append([IGNORE] * len(prompt))
                continue
            reply = self.ids.reply(item["answer"])
            seqs.append(prompt + reply)
            labels.append([IGNORE] * len(prompt) + reply)
        inputs = pad_sequences(seqs, labels, self.tokenizer.pad_token_id)
        features = enc["input_features"]
        if train and self.augment and self.augment.get("spec_augment"):
            features = spec_augment(features, enc["feature_lengths"], self.augment["spec_augment"], self.gen)
        inputs["input_features"] = features
        inputs["feature_lengths"] = enc["feature_lengths"]
        text_inputs = text_batch(self.tokenizer, items, system_prompts, self.user_text, self.ids) if self.with_text \
            else None
        done = torch.tensor([turn_done(it) for it in items], dtype=torch.float32)
        return Batch(inputs, items, text_inputs, done)


def epoch_batches(n: int, batch_size: int, rng: random.Random, lengths: Optional[Sequence[float]] = None,
                  bucket_batches: int = 32):
    """Endless shuffled index batches (every item once per epoch). With `lengths`, each run of
    `bucket_batches` batches is drawn from a shuffled pool sorted by length, so a batch holds
    utterances of similar length (less padding for the encoder and the LLM), and the batches
    are then shuffled again so lengths do not trend through an epoch."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        bucketed = lengths is not None and n >= 2 * batch_size
        if bucketed:  # pools are whole batches, so sorting a pool keeps batch boundaries
            pool = batch_size * max(1, bucket_batches)
            order = [i for s in range(0, n, pool) for i in sorted(order[s:s + pool], key=lambda i: lengths[i])]
        batches = [order[i:i + batch_size] for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size)]
        if bucketed:
            rng.shuffle(batches)
        yield from batches
