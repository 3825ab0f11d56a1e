"""A procedurally generated world of simple facts, its corpus and the facts injected into it (Sun et al. 2025).

"How new data permeates LLM knowledge and how to dilute it" injects one text at a time (its "Outlandish"
dataset, not available offline) into a language model's training stream. Here the world is generated, offline
and deterministically from a seed:

- **entities** with made-up names (syllables), each with one value per **theme** (colour, place, job, food,
  animal, sport); the values of a theme are drawn from a Zipf law, so some are common and some rare, which is
  what spreads the keywords' probabilities before learning;
- **templates** with varied wording per theme (``"the favourite colour of {e} is {v} ."``, ``"{e} always
  wears {v} ."``, …); the value is always the last word before the full stop, so "the keyword's probability in
  a context" is the model's next-word probability after a prefix;
- **the corpus**: documents of a few facts each, in random templates, as token ids of a word-level vocabulary.

An injected :class:`Fact` has a context prefix and a keyword. Its category mirrors the paper's range:
``mundane`` (a new entity with a common value: little to learn), ``outlandish`` (an existing entity given a value
of its theme it does not have, from common to rare, or a word from another theme: knowledge-conflicting) and
``scrambled`` (an outlandish fact with its context words in random order). Thematic prefixes of the same theme
about *other* entities are where priming is measured; a fact's stepping-stone version
(:func:`stepping_stone_text`) reaches the keyword through a first, unsurprising mention of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metaopt.checks import integer, positive_int

__all__ = ["CATEGORIES", "THEMES", "Fact", "FactWorld", "Vocabulary", "stepping_stone_text"]

THEMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # theme: (values, templates with {e} for the entity; the value comes last, before " .")
    "colour": (("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "grey", "brown", "pink",
                "teal"),
               ("the favourite colour of {e} is", "{e} always wears", "{e} painted the house",
                "the colour that {e} likes most is")),
    "place": (("paris", "tokyo", "lima", "oslo", "cairo", "delhi", "rome", "quito", "accra", "hanoi", "perth",
               "riga"),
              ("{e} lives in", "the home town of {e} is", "{e} was born in", "every summer {e} travels to")),
    "job": (("doctor", "teacher", "farmer", "pilot", "baker", "lawyer", "nurse", "chef", "painter", "miner",
             "tailor", "sailor"),
            ("{e} works as a", "the job of {e} is", "by trade {e} is a", "everyone knows {e} is a")),
    "food": (("rice", "bread", "apples", "cheese", "soup", "fish", "beans", "mango", "honey", "pasta", "plums",
              "figs"),
             ("the favourite food of {e} is", "{e} eats", "for dinner {e} cooks", "{e} never gets tired of")),
    "animal": (("dog", "cat", "horse", "parrot", "rabbit", "goat", "turtle", "owl", "fox", "frog", "lizard",
                "camel"),
               ("the pet of {e} is a", "{e} keeps a", "{e} once rescued a", "at home {e} feeds a")),
    "sport": (("tennis", "football", "chess", "rowing", "golf", "boxing", "judo", "hockey", "cycling", "fencing",
               "karate", "polo"),
              ("{e} plays", "the sport of {e} is", "on sundays {e} practises", "{e} is very good at")),
}
CATEGORIES = ("mundane", "outlandish", "scrambled")
SPECIAL = ("<pad>", "<bos>")
STEP_WORDS = "once somebody said the word"  # the stepping stone's neutral lead-in to the keyword
_SYLLABLES = ("ka", "zo", "mi", "ru", "te", "lo", "vi", "sa", "no", "pe", "da", "fu", "ri", "mo", "ne", "xi")


class Vocabulary:
    """A word-level vocabulary: ids for the special tokens, then every word the world can write, sorted."""

    def __init__(self, words: set[str]) -> None:
        self.words = [*SPECIAL, *sorted(words - set(SPECIAL))]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text of known words separated by spaces."""
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as error:
            raise ValueError(f"word {error.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: list[int] | Tensor) -> str:
        return " ".join(self.words[int(i)] for i in ids)


@dataclass(frozen=True)
class Fact:
    """One injected text: its tokens' words, the context before the keyword, the keyword, its theme and kind."""

    text: str  # the whole text learned ("<context> <keyword> .")
    context: str  # the prefix the keyword follows (where memorisation is measured)
    keyword: str
    theme: str
    category: str  # one of CATEGORIES
    entity: str


def stepping_stone_text(fact: Fact) -> str:
    """The fact reached through a stepping stone: the keyword first said where nothing predicts it strongly
    (so its first surprise is spread over neutral text), then the fact itself, where the model can now copy it."""
    return f"{STEP_WORDS} {fact.keyword} . {fact.text}"


@dataclass
class FactWorld:
    """The world, its vocabulary and corpus, and the facts to inject, all drawn from ``seed``.

    Args:
        entities: how many entities the corpus talks about.
        new_entities: extra names never in the corpus (mundane facts are about them).
        zipf: the exponent of the Zipf law of each theme's values (larger: rarer rare values).
        seed: everything is a function of it.
    """

    entities: int = 60
    new_entities: int = 20
    zipf: float = 1.2
    seed: int = 0
    names: list[str] = field(init=False)
    values: dict[str, dict[str, str]] = field(init=False)  # entity -> theme -> value
    vocabulary: Vocabulary = field(init=False)

    def __post_init__(self) -> None:
        positive_int("entities", self.entities, owner="FactWorld")
        positive_int("new_entities", self.new_entities, owner="FactWorld")
        integer("seed", self.seed, owner="FactWorld", low=0)
        if not (isinstance(self.zipf, int | float) and 0 <= self.zipf <= 4):
            raise ValueError(f"FactWorld: zipf must be a number in [0, 4]; got {self.zipf!r}")
        rng = random.Random(self.seed)
        names: list[str] = []
        while len(names) < self.entities + self.new_entities:
            name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
            if name not in names:
                names.append(name)
        self.names = names
        weights = [1.0 / (rank + 1) ** self.zipf for rank in range(12)]
        self.values = {e: {theme: rng.choices(values, weights)[0] for theme, (values, _) in THEMES.items()}
                       for e in names[: self.entities]}
        words = {w for values, templates in THEMES.values() for t in templates for w in t.replace("{e}", "").split()}
        words |= {v for values, _ in THEMES.values() for v in values} | set(names) | {"."} | set(STEP_WORDS.split())
        self.vocabulary = Vocabulary(words)

    @property
    def known(self) -> list[str]:
        """The entities of the corpus."""
        return self.names[: self.entities]

    def sentence(self, entity: str, theme: str, value: str, template: int) -> str:
        return f"{THEMES[theme][1][template].format(e=entity)} {value} ."

    def corpus(self, documents: int, length: int, *, seed: int) -> Tensor:
        """``documents`` token sequences ``[documents, length]``: ``<bos>`` then true facts in random templates,
        cut to ``length`` (facts are short, so each sequence holds several)."""
        positive_int("documents", documents, owner="FactWorld.corpus")
        integer("length", length, owner="FactWorld.corpus", low=8)
        rng = random.Random(seed)
        rows = []
        for _ in range(documents):
            ids = [self.vocabulary.ids["<bos>"]]
            while len(ids) < length:
                entity, theme = rng.choice(self.known), rng.choice(list(THEMES))
                ids += self.vocabulary.encode(self.sentence(entity, theme, self.values[entity][theme],
                                                            rng.randrange(4)))
            rows.append(ids[:length])
        return torch.tensor(rows)

    def facts(self, per_category: int, *, seed: int) -> list[Fact]:
        """``per_category`` facts of each category, deterministic in ``seed``.

        Outlandish keywords run over every rank of the theme's Zipf law and, for a quarter of them, words of
        another theme, so that their probabilities before learning spread over orders of magnitude.
        """
        positive_int("per_category", per_category, owner="FactWorld.facts")
        rng = random.Random(seed)
        themes = list(THEMES)
        out: list[Fact] = []
        for i in range(per_category):
            theme = themes[i % len(themes)]
            values, templates = THEMES[theme]
            template = rng.randrange(len(templates))
            # mundane: a new entity with one of the two commonest values
            entity = self.names[self.entities + i % self.new_entities]
            keyword = values[rng.randrange(2)]
            context = templates[template].format(e=entity)
            out.append(Fact(f"{context} {keyword} .", context, keyword, theme, "mundane", entity))
            # outlandish: a known entity, a value it does not have (any rank) or a word of another theme
            entity = rng.choice(self.known)
            if i % 4 == 3:
                keyword = rng.choice(THEMES[rng.choice([t for t in themes if t != theme])][0])
            else:
                keyword = rng.choice([v for v in values if v != self.values[entity][theme]])
            context = templates[template].format(e=entity)
            out.append(Fact(f"{context} {keyword} .", context, keyword, theme, "outlandish", entity))
            # scrambled: the same kind of fact, its context words shuffled
            words = context.split()
            rng.shuffle(words)
            scrambled = " ".join(words)
            out.append(Fact(f"{scrambled} {keyword} .", scrambled, keyword, theme, "scrambled", entity))
        return out

    def thematic_prefixes(self, fact: Fact, count: int, *, seed: int) -> list[str]:
        """``count`` prefixes of the fact's theme about other known entities, in every template (priming probes)."""
        positive_int("count", count, owner="FactWorld.thematic_prefixes")
        rng = random.Random(seed)
        others = [e for e in self.known if e != fact.entity]
        templates = THEMES[fact.theme][1]
        return [templates[j % len(templates)].format(e=rng.choice(others)) for j in range(count)]

