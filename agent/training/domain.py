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
import re
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
INTENTS = ("device", "timer", "arithmetic", "out_of_domain")
IN_DOMAIN = ("device", "timer", "arithmetic")
# The intent mix of a split when none is given: in-domain roughly as before (0.3 / 0.2 / 0.5),
# one request in six out of domain.
DEFAULT_WEIGHTS = {"device": 0.28, "timer": 0.17, "arithmetic": 0.38, "out_of_domain": 0.17}

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


# -- out of domain --------------------------------------------------------------------------
DECLINE = "Sorry, I can only control devices, set timers and do arithmetic."
OUT_OF_DOMAIN = "out_of_domain"

# Slot fillers of the out-of-domain templates (spoken forms only: espeak-ng reads them, the
# word-CTC head splits them on spaces).
_OOD_SLOTS = {
    "city": ("paris", "london", "tokyo", "new york", "berlin", "chicago", "sydney", "madrid", "boston", "rome"),
    "when": ("today", "tomorrow", "this weekend", "tonight", "on monday", "next week", "this afternoon"),
    "genre": ("jazz", "rock", "classical", "pop", "country", "hip hop", "reggae"),
    "artist": ("the beatles", "taylor swift", "queen", "adele", "coldplay", "madonna", "elvis"),
    "playlist": ("workout", "party", "morning", "dinner", "road trip", "relaxing"),
    "topic": ("sports", "business", "science", "politics", "technology", "local", "world"),
    "person": ("mom", "dad", "john", "sarah", "my boss", "grandma", "peter", "emma", "the doctor", "david"),
    "item": ("milk", "eggs", "bread", "coffee", "batteries", "paper towels", "apples", "dog food", "cheese",
             "light bulbs", "toothpaste", "rice"),
    "country": ("france", "japan", "canada", "brazil", "italy", "egypt", "india", "spain", "mexico", "germany"),
    "landmark": ("the eiffel tower", "mount everest", "big ben", "the statue of liberty", "the great wall"),
    "book": ("hamlet", "harry potter", "the odyssey", "pride and prejudice", "moby dick"),
    "joke": ("funny", "silly", "knock knock", "dad", "animal", "short"),
    "count": ("two", "three", "four", "five", "six", "eight"),
    "hour": ("six", "seven", "eight", "nine", "ten", "eleven"),
    "place": ("the airport", "the station", "work", "the mall", "the hospital", "downtown", "the beach"),
    "team": ("lakers", "yankees", "patriots", "red sox", "bulls", "giants"),
    "dish": ("pancakes", "lasagna", "chicken soup", "banana bread", "pizza dough", "apple pie"),
    "word": ("hello", "thank you", "good night", "please", "water", "friend"),
    "language": ("spanish", "french", "german", "italian", "chinese", "japanese"),
    "appliance": ("dishwasher", "washing machine", "coffee maker", "air conditioner", "microwave", "vacuum cleaner"),
    "device": DEVICES,
    "room": ROOMS,
    "num": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "task": ("buy milk", "call mom", "take out the trash", "water the plants", "pay the bills", "walk the dog"),
    "day": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
}

# Category -> templates. Some share words with the domain on purpose ("turn the music up",
# "what time is the meeting", "set the table", "what is eight divided by two", "dim the lights in
# the kitchen", "cancel the timer"): the model must read the request, not spot a keyword.
OOD_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "weather": ("what's the weather like in {city}", "what's the weather like in {city} {when}", "will it rain {when}", "is it going to be sunny {when}",
                "how cold is it in {city}", "what's the forecast for {when}", "do i need an umbrella {when}",
                "how hot will it get {when}", "is it snowing in {city}", "what is the weather in {city}",
                "what's the temperature outside"),
    "music": ("play some {genre} music", "play the new album by {artist}", "turn the music up", "turn the music down",
              "skip this song", "pause the music", "play my {playlist} playlist", "who sings this song",
              "put on some {genre}", "turn up the volume", "play something by {artist}", "next song please"),
    "news": ("what's in the news today", "read me the headlines", "turn on the news", "what are the latest {topic} headlines",
             "any news about {topic}", "give me the {topic} news", "what happened in the world today",
             "tell me the {topic} news for {when}"),
    "calls": ("call {person}", "call {person} on speaker", "hang up the call", "redial the last number",
              "who called me today", "call {person} back", "make a video call to {person}", "answer the phone"),
    "messages": ("send a message to {person}", "text {person} that i am running late", "read my messages",
                 "do i have any new emails", "send an email to {person}", "tell {person} i will be home soon",
                 "check my voicemail", "reply to the last message from {person}"),
    "shopping": ("add {item} to my shopping list", "order more {item}", "buy some {item}", "what's on my shopping list",
                 "how much does {item} cost", "where can i buy {item}", "order a new {device} for the {room}",
                 "i need to buy {item}", "track my package", "remove {item} from the list"),
    "facts": ("what is the capital of {country}", "who is the president of {country}", "how tall is {landmark}",
              "how far away is the moon", "who wrote {book}", "what is the population of {country}",
              "how many people live in {city}", "why is the sky blue", "how old is {landmark}",
              "what is the biggest animal in the world", "what language do they speak in {country}"),
    "jokes": ("tell me a joke", "tell me a {joke} joke", "say something funny", "do you know any jokes", "make me laugh",
              "tell me a riddle", "tell me a story", "sing me a song", "tell me something interesting"),
    "bookings": ("book a table for {count} tonight", "book a flight to {city}", "reserve a hotel in {city}",
                 "book a taxi to {place}", "get me a ride to {place}", "book two tickets for the movie",
                 "cancel my reservation", "reserve a table at an italian restaurant",
                 "book an appointment with the dentist", "book a train to {city} for {when}"),
    "calendar": ("what time is the meeting", "what's on my calendar {when}", "when is my next appointment",
                 "add a meeting for {when}", "what time is it", "what day is it today", "what's the date today",
                 "move my meeting to {day}", "remind me to {task} {when}", "set an alarm for {hour} in the morning",
                 "wake me up at {hour}", "cancel my alarm", "what time is it in {city}"),
    "chores": ("set the table", "set the mood", "lock the front door", "open the garage door", "close the curtains in the {room}",
               "vacuum the {room}", "water the plants", "feed the dog", "turn on the {appliance}",
               "start the {appliance}", "turn off the {appliance} in the {room}", "clean the {room}"),
    "unsupported": ("dim the lights in the {room}", "make the {device} louder", "is the {device} on in the {room}",
                    "set the heater to {num} degrees", "cancel the timer", "pause the timer",
                    "how much time is left on the timer", "what is {num} divided by {num}",
                    "what is the square root of {num}", "how many minutes are in a day"),
    "navigation": ("how long is my drive to work", "is there traffic on the way to {place}",
                   "navigate to the nearest gas station", "where is the closest pharmacy", "find a restaurant near me",
                   "how do i get to {place}", "how far is {city} from here"),
    "cooking": ("how do i make {dish}", "give me a recipe for {dish}", "how long do i boil an egg",
                "what can i cook for dinner", "what goes well with {dish}"),
    "language": ("translate {word} into {language}", "how do you say {word} in {language}", "what does {word} mean",
                 "spell the word {word}"),
    "sports": ("who won the game last night", "what's the score of the {team} game", "when do the {team} play next",
               "who won the world cup"),
    "chat": ("how are you today", "what's your name", "who made you", "are you a robot", "thank you",
             "good morning", "what can you do", "do you like me", "what is the meaning of life"),
}

_SLOT_RE = re.compile(r"\{(\w+)\}")


def expand_template(template: str, limit: int = 24, seed: int = 0) -> List[str]:
    """Every filling of a template's slots (at most `limit`, a deterministic sample, so one
    template with many slots does not outweigh the others); slots filled independently."""
    import itertools

    slots = _SLOT_RE.findall(template)
    if not slots:
        return [template]
    pools = [_OOD_SLOTS[s] for s in slots]
    combos = list(itertools.product(*pools))
    if len(combos) > limit:
        combos = random.Random(f"{template}-{seed}").sample(combos, limit)
    out = []
    for combo in combos:
        it = iter(combo)
        out.append(_SLOT_RE.sub(lambda m: next(it), template))
    return sorted(set(out))


# Always trained (never held out): the requests the issue names.
ANCHOR_TEMPLATES = frozenset({"what's the weather like in {city}", "what's the weather like in {city} {when}",
                              "turn the music up", "what time is the meeting", "set the table"})


def held_out_templates(seed: int = 0) -> Set[str]:
    """The out-of-domain templates kept out of all training audio and text: one in four of each
    category's templates (a seeded choice among the non-anchor ones), so every category still
    trains and the test split has phrasings the model never saw in any form."""
    held = set()
    for category, templates in OOD_TEMPLATES.items():
        k = len(templates) // 4
        pool = [t for t in templates if t not in ANCHOR_TEMPLATES]
        held |= set(random.Random(f"ood-held-out-{seed}-{category}").sample(pool, k))
    return held


def ood_example(text: str, category: str, template: str, held_out: bool = False) -> Example:
    return Example(OUT_OF_DOMAIN, text, DECLINE, (("category", category), ("template", template)), held_out)


# Words after which a request cannot be complete ("what's the weather like in"): out-of-domain
# requests are only cut there, since a shorter request can be a complete one of its own
# ("play some music" of "play some music by queen"); every in-domain prefix is incomplete.
DANGLING_WORDS = frozenset("""a an the in on at to for of my me some and with by from about is are do does what's
what how who when where will that i any up into this your""".split())


def cut_points(example: Example) -> List[int]:
    """Word counts k (1 <= k < len(words)) at which the request may be cut so that the first k
    words are an unfinished turn."""
    words = example.text.split()
    if example.intent != OUT_OF_DOMAIN:
        return list(range(1, len(words)))
    return [k for k in range(1, len(words)) if words[k - 1] in DANGLING_WORDS]


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

    held_out_ood: Set[str] = field(default_factory=set)  # out-of-domain templates kept out of training

    def __post_init__(self):
        if not self.held_out:
            self.held_out = held_out_pairs(self.seed)
        if not self.held_out_ood:
            self.held_out_ood = held_out_templates(self.seed)

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

    def ood_examples(self, split: str = "all") -> List[Example]:
        """Out-of-domain requests, all answered `DECLINE`. split: "train" (without the held-out
        templates' phrasings), "held_out" (only them) or "all"."""
        held = self.held_out_ood
        out = []
        for category, templates in OOD_TEMPLATES.items():
            for template in templates:
                h = template in held
                if split == "all" or (split == "train" and not h) or (split == "held_out" and h):
                    out += [ood_example(t, category, template, h) for t in expand_template(template)]
        return out

    def all_examples(self, include_held_out: bool) -> Dict[str, List[Example]]:
        split = "all" if include_held_out else "train"
        return {"device": self.device_examples(split), "timer": self.timer_examples(),
                "arithmetic": self.arithmetic_examples(), OUT_OF_DOMAIN: self.ood_examples(split)}

    # -- sampling --------------------------------------------------------------------
    def sample(self, n: int, rng: random.Random, include_held_out: bool = False,
               weights: Optional[Dict[str, float]] = None, held_out_only_share: float = 0.0) -> List[Example]:
        """`n` examples: intents drawn by `weights`; within an intent, cycles through a shuffled
        list of all combinations so coverage is even (out of domain: a category drawn evenly,
        then its phrasings cycled). `held_out_only_share`: fraction of the device and of the
        out-of-domain items drawn from the held-out pairs / phrasings (val and test splits)."""
        weights = weights or dict(DEFAULT_WEIGHTS)
        pools = self.all_examples(include_held_out=False)
        cycles: Dict[str, Iterator[Example]] = {k: _cycle(v, rng) for k, v in pools.items() if k != OUT_OF_DOMAIN}
        cycles[OUT_OF_DOMAIN] = _grouped_cycle(pools[OUT_OF_DOMAIN], rng)
        held_cycles = {"device": _cycle(self.device_examples("held_out"), rng),
                       OUT_OF_DOMAIN: _grouped_cycle(self.ood_examples("held_out"), rng)}
        names = [k for k in weights if weights[k] > 0]
        out = []
        for _ in range(n):
            intent = rng.choices(names, [weights[k] for k in names])[0]
            if intent in held_cycles and include_held_out and rng.random() < held_out_only_share:
                out.append(next(held_cycles[intent]))
            else:
                out.append(next(cycles[intent]))
        return out

    def corpus(self) -> List[str]:
        """Every prompt and reply of the domain (held-out ones included)."""
        texts = []
        for examples in self.all_examples(include_held_out=True).values():
            for ex in examples:
                texts += [ex.text, ex.answer]
        return texts


def _grouped_cycle(items: Sequence[Example], rng: random.Random) -> Iterator[Example]:
    """Out-of-domain examples: a category drawn uniformly, then the next of its shuffled phrasings."""
    groups: Dict[str, List[Example]] = {}
    for ex in items:
        groups.setdefault(str(ex.slot_dict().get("category", "")), []).append(ex)
    names = sorted(groups)
    cycles = {k: _cycle(groups[k], rng) for k in names}
    while True:
        yield next(cycles[rng.choice(names)])


def _cycle(items: Sequence[Example], rng: random.Random) -> Iterator[Example]:
    items = list(items)
    while True:
        rng.shuffle(items)
        yield from items
