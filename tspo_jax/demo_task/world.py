"""The demo task's synthetic world: people born in cities, cities in countries, from one seed.

Everything here is a pure function of the seed (Python's `random.Random`, whose choice/shuffle
sequence is stable across Python 3 versions), so `generate` can rebuild the files byte for byte.
"""
from __future__ import annotations

import dataclasses
import random

from tspo_jax.rewards import normalize_answer

SEED = 20260122
NUM_PEOPLE = 200
NUM_TEST_PEOPLE = 50
NUM_COUNTRIES = 10
CITIES_PER_COUNTRY = 4
# Every person gets a 2-hop (country) question; about this share of them also gets a 1-hop (city)
# one, which makes about 1 / 1.43 = 70% of the questions 2-hop.
ONE_HOP_SHARE = 0.43

ONE_HOP, TWO_HOP, CITY_HOP = "demo_1hop", "demo_2hop", "demo_city"
CITY_QUESTION = "In which city was {name} born?"
COUNTRY_QUESTION = "In which country was {name} born?"
# The second 1-hop kind, training only (cities are shared by all people, so none is held out):
# one question per city, the second link of a 2-hop chain asked on its own.
CITY_COUNTRY_QUESTION = "In which country is the city of {name}?"

OCCUPATIONS = ("painter", "farmer", "baker", "teacher", "sailor", "poet", "doctor", "weaver",
               "singer", "builder", "potter", "miller")
CITY_FACTS = ("It lies on a wide river.", "It is known for its markets.",
              "It sits at the foot of the hills.", "It has an old harbour.",
              "It is famous for its gardens.", "It is surrounded by farms.")
LANDMARK_KINDS = (("Bridge", "{name} Bridge is an old stone bridge over a quiet river."),
                  ("Market", "{name} Market is a busy market that opens every morning."),
                  ("Tower", "{name} Tower is a tall tower with a bell at the top."))
NUM_LANDMARKS = 20

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "br", "dr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "n", "r", "l", "s", "m", "th")  # Only a word's last syllable gets one.
_COUNTRY_ENDINGS = ("ria", "nia", "land", "dor")
NUM_FIRST_NAMES = NUM_LAST_NAMES = 60


@dataclasses.dataclass(frozen=True)
class Person:
    key: str  # "p017": stable id used in question ids.
    name: str
    occupation: str
    city: str


@dataclasses.dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    city_country: dict[str, str]
    city_fact: dict[str, str]
    landmarks: tuple[tuple[str, str], ...]  # (title, text)
    test_keys: frozenset[str]


normalize = normalize_answer  # Search-R1's answer normalisation, the reward's own


def _template_text() -> str:
    """All fixed wording, so that no generated name can hide inside it."""
    parts = [CITY_QUESTION, COUNTRY_QUESTION, CITY_COUNTRY_QUESTION, *OCCUPATIONS, *CITY_FACTS,
             *(t for _, t in LANDMARK_KINDS), *(k for k, _ in LANDMARK_KINDS),
             "is a", "was born in", "is a city in", "Doc Title information think search answer"]
    return normalize(" ".join(parts))


class _NameMaker:
    """Pronounceable made-up words; none is a substring of another or of the fixed wording.

    That rule keeps every gold answer (city, country) out of questions and out of passages that
    should not reveal it, under the same substring test that FOLR uses.
    """

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._taken: list[str] = []
        self._template = _template_text()

    def make(self, syllables: int, ending: str = "") -> str:
        rng = self._rng
        while True:
            word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
            word += ending or rng.choice(_CODAS)
            if len(word) < 4 or word in self._template:
                continue
            if any(word in t or t in word for t in self._taken):
                continue
            self._taken.append(word)
            return word.capitalize()


def build_world(seed: int = SEED) -> World:
    rng = random.Random(seed)
    names = _NameMaker(rng)
    countries = [names.make(2, rng.choice(_COUNTRY_ENDINGS)) for _ in range(NUM_COUNTRIES)]
    cities = [names.make(rng.choice((2, 2, 3))) for _ in range(NUM_COUNTRIES * CITIES_PER_COUNTRY)]
    city_country = {c: countries[i // CITIES_PER_COUNTRY] for i, c in enumerate(cities)}
    city_fact = {c: rng.choice(CITY_FACTS) for c in cities}
    firsts = [names.make(2) for _ in range(NUM_FIRST_NAMES)]
    lasts = [names.make(2) for _ in range(NUM_LAST_NAMES)]

    full_names: list[str] = []
    while len(full_names) < NUM_PEOPLE:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in full_names:
            full_names.append(name)
    people = tuple(Person(key=f"p{i:03d}", name=n, occupation=rng.choice(OCCUPATIONS),
                          city=rng.choice(cities)) for i, n in enumerate(full_names))

    landmarks = []
    for i in range(NUM_LANDMARKS):
        kind, template = LANDMARK_KINDS[i % len(LANDMARK_KINDS)]
        # Named after a surname or a city, so that retrieval meets near misses; they never name a
        # country, which keeps a 2-hop answer out of the first search's results.
        base = rng.choice(lasts) if i % 2 else rng.choice(cities)
        title = f"{base} {kind}"
        if title not in (t for t, _ in landmarks):
            landmarks.append((title, template.format(name=base)))

    order = list(range(NUM_PEOPLE))
    rng.shuffle(order)
    test_keys = frozenset(people[i].key for i in order[:NUM_TEST_PEOPLE])
    return World(people=people, city_country=city_country, city_fact=city_fact,
                 landmarks=tuple(landmarks), test_keys=test_keys)


def person_passage(p: Person) -> tuple[str, str]:
    article = "an" if p.occupation[0] in "aeiou" else "a"
    return p.name, f"{p.name} is {article} {p.occupation}. {p.name} was born in {p.city}."


def city_passage(world: World, city: str) -> tuple[str, str]:
    return city, f"{city} is a city in {world.city_country[city]}. {world.city_fact[city]}"


def corpus_records(world: World, seed: int = SEED) -> list[dict[str, str]]:
    """wiki-18 style passages {"id", "contents": "Title\\ntext"} in a seeded shuffled order."""
    passages = [person_passage(p) for p in world.people]
    passages += [city_passage(world, c) for c in world.city_country]
    passages += list(world.landmarks)
    random.Random(seed + 1).shuffle(passages)
    return [{"id": str(i), "contents": f"{title}\n{text}"}
            for i, (title, text) in enumerate(passages)]


def qa_records(world: World, split: str, seed: int = SEED) -> list[dict[str, object]]:
    """Search-R1 style rows {"id", "question", "golden_answers", "data_source"} for one split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    rng = random.Random(seed + 2)
    one_hop = {p.key for p in world.people if rng.random() < ONE_HOP_SHARE}
    rows = []
    if split == "train":
        rows += [{"id": f"c{i:02d}-country", "question": CITY_COUNTRY_QUESTION.format(name=c),
                  "golden_answers": [country], "data_source": CITY_HOP}
                 for i, (c, country) in enumerate(world.city_country.items())]
    for p in world.people:
        if (p.key in world.test_keys) != (split == "test"):
            continue
        rows.append({"id": f"{p.key}-country", "question": COUNTRY_QUESTION.format(name=p.name),
                     "golden_answers": [world.city_country[p.city]], "data_source": TWO_HOP})
        if p.key in one_hop:
            rows.append({"id": f"{p.key}-city", "question": CITY_QUESTION.format(name=p.name),
                         "golden_answers": [p.city], "data_source": ONE_HOP})
    random.Random(seed + (3 if split == "train" else 4)).shuffle(rows)
    return rows
