"""The demo domain: a small English home assistant, as (prompt, reply) pairs.

Three intents:

* ``device``: "turn on|off the DEVICE in the ROOM" -> "Turning on|off the DEVICE in the ROOM."
  (DEVICE: lights, fan, heater, radio, tv; ROOM: kitchen, bedroom, living room, garage, office).
* ``timer``: "set a timer for N minutes" with N from one to thirty spoken as words ->
  "Timer set for N minutes." with N in digits. Choice (documented): for N = 1 the prompt
  says "one minute" and the reply "Timer set for 1 minute." (grammatical English); every
  other N follows the issue literally.
* ``arithmetic``: "what is A plus|minus|times B" with A, B from zero to twelve ->
  "A op B is C." ("7 times 8 is 56.", "3 minus 5 is -2.").

Held-out device combinations: a deterministic (by seed) set of (device, room) pairs -- 5 of
the 25, one per device and one per room (a random permutation), so every device and every room
still occurs in training -- is kept out of the training audio in both the "on" and "off" form:
10 of the 50 (state, device, room) combinations, 20%. The test split includes them and
`evaluate` reports them as their own row.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

DEVICES = ("lights", "fan", "heater", "radio", "tv")
ROOMS = ("kitchen", "bedroom", "living room", "garage", "office")
# Training-only vocabulary (``Domain(extra_vocab=True)``): more devices and rooms, so each device
# word is heard with ten rooms and each room with ten devices. With only the 40 trained
# combinations a model can recognize a command as a whole and answer a held-out one with the
# nearest trained combination; many more combinations push it to read the words. These words
# are never in the test split, and the held-out pairs still never occur in training audio.
EXTRA_DEVICES = ("lamp", "oven", "kettle", "speaker", "printer")
EXTRA_ROOMS = ("hallway", "basement", "bathroom", "attic", "study")
STATES = ("on", "off")
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
INTENTS = ("device", "timer", "arithmetic")

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = {20: "twenty", 30: "thirty"}


def number_words(n: int) -> str:
    """0..39 as English words ("twenty one")."""
    if not 0 <= n < 40:
        raise ValueError(f"number_words covers 0..39, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    word = _TENS[tens * 10]
    return word if ones == 0 else f"{word} {_ONES[ones]}"


@dataclass(frozen=True)
class Example:
    intent: str
    text: str  # what is spoken (the transcript)
    answer: str  # the expected reply
    slots: Tuple[Tuple[str, object], ...] = ()
    held_out: bool = False  # a device combination kept out of the training audio

    def slot_dict(self) -> Dict[str, object]:
        return dict(self.slots)


def device_example(state: str, device: str, room: str, held_out: bool = False) -> Example:
    return Example("device", f"turn {state} the {device} in the {room}", f"Turning {state} the {device} in the {room}.",
                   (("state", state), ("device", device), ("room", room)), held_out)


def timer_example(n: int) -> Example:
    unit = "minute" if n == 1 else "minutes"
    return Example("timer", f"set a timer for {number_words(n)} {unit}", f"Timer set for {n} {unit}.", (("minutes", n),))


def arithmetic_example(a: int, op: str, b: int) -> Example:
    c = OPS[op](a, b)
    return Example("arithmetic", f"what is {number_words(a)} {op} {number_words(b)}", f"{a} {op} {b} is {c}.",
                   (("a", a), ("op", op), ("b", b)))


def held_out_pairs(seed: int = 0) -> Set[Tuple[str, str]]:
    """The (device, room) pairs kept out of the training audio: a random permutation pairs
    each device with one room, so 5 of 25 pairs (20%) and all devices/rooms still train."""
    rooms = list(ROOMS)
    random.Random(f"held-out-{seed}").shuffle(rooms)
    return set(zip(DEVICES, rooms))


@dataclass
class Domain:
    seed: int = 0
    held_out: Set[Tuple[str, str]] = field(default_factory=set)
    extra_vocab: bool = False  # training-only devices/rooms in the "train"/"all" device lists

    def __post_init__(self):
        if not self.held_out:
            self.held_out = held_out_pairs(self.seed)

    # -- enumerations --------------------------------------------------------------
    def device_examples(self, split: str = "all") -> List[Example]:
        """split: "train" (without the held-out pairs), "held_out" (only them) or "all"."""
        out = []
        devices = DEVICES + EXTRA_DEVICES if self.extra_vocab and split != "held_out" else DEVICES
        rooms = ROOMS + EXTRA_ROOMS if self.extra_vocab and split != "held_out" else ROOMS
        for state in STATES:
            for device in devices:
                for room in rooms:
                    h = (device, room) in self.held_out
                    if split == "all" or (split == "train" and not h) or (split == "held_out" and h):
                        out.append(device_example(state, device, room, held_out=h))
        return out

    @staticmethod
    def timer_examples() -> List[Example]:
        return [timer_example(n) for n in range(1, 31)]

    @staticmethod
    def arithmetic_examples() -> List[Example]:
        return [arithmetic_example(a, op, b) for op in OPS for a in range(13) for b in range(13)]

    def all_examples(self, include_held_out: bool) -> Dict[str, List[Example]]:
        return {"device": self.device_examples("all" if include_held_out else "train"),
                "timer": self.timer_examples(), "arithmetic": self.arithmetic_examples()}

    # -- sampling --------------------------------------------------------------------
    def sample(self, n: int, rng: random.Random, include_held_out: bool = False,
               weights: Optional[Dict[str, float]] = None, held_out_only_share: float = 0.0) -> List[Example]:
        """`n` examples: intents drawn by `weights`; within an intent, cycles through a shuffled
        list of all combinations so coverage is even. `held_out_only_share`: fraction of the
        device items drawn from the held-out pairs (test split)."""
        weights = weights or {"device": 0.3, "timer": 0.2, "arithmetic": 0.5}
        pools = self.all_examples(include_held_out=False)
        held = self.device_examples("held_out")
        cycles: Dict[str, Iterator[Example]] = {k: _cycle(v, rng) for k, v in pools.items()}
        held_cycle = _cycle(held, rng)
        names = list(weights)
        out = []
        for _ in range(n):
            intent = rng.choices(names, [weights[k] for k in names])[0]
            if intent == "device" and include_held_out and rng.random() < held_out_only_share:
                out.append(next(held_cycle))
            else:
                out.append(next(cycles[intent]))
        return out

    def corpus(self) -> List[str]:
        """Every prompt and reply of the domain (held-out ones included: they are text the
        tokenizer must cover, not training audio)."""
        texts = []
        for examples in self.all_examples(include_held_out=True).values():
            for ex in examples:
                texts += [ex.text, ex.answer]
        return texts


def _cycle(items: Sequence[Example], rng: random.Random) -> Iterator[Example]:
    items = list(items)
    while True:
        rng.shuffle(items)
        yield from items
