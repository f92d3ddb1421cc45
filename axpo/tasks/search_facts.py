"""Fact lookup over a generated world of fictional countries, reachable only through `search`.

`build_corpus(cfg)` makes the world (deterministic in `cfg.world_seed`): one short passage per
(country, attribute), e.g. "Zorbia: The capital of Zorbia is Qelvan." The default search provider
indexes these passages with BM25. `generate(n, seed, cfg)` asks about random (country, attribute)
pairs of that world, so different seeds give mostly different questions over one shared corpus.
The names are invented, so no model knows them: without the tool the answer is a guess.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from axpo.tasks.base import ANSWER_INSTRUCTION, Sample, TaskSpec
from axpo.tools.base import ToolResult
from axpo.tools.search import Snippet

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "dr", "kr", "sh", "qu", "br"]
_VOWELS = ["a", "e", "i", "o", "u", "ia", "ae", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd"]
_SUFFIXES = {"country": ["ia", "ova", "land", "istan", "ora", "enia"], "city": ["", "ton", "grad", "burg", "holm", "a"],
             "river": ["", "a", "el", "une"], "person": ["", "o", "a", "en"], "currency": ["", "i", "o"]}
ANIMALS = ["lynx", "heron", "otter", "falcon", "bison", "tiger", "whale", "eagle", "fox", "wolf",
           "stag", "crane", "panther", "beaver", "owl", "badger"]

# attribute -> (passage template, question template, answer type)
ATTRIBUTES: dict[str, tuple[str, str, str]] = {
    "capital": ("The capital of {e} is {v}.", "What is the capital of {e}?", "exact"),
    "founded": ("{e} was founded in {v}.", "In which year was {e} founded?", "numeric"),
    "currency": ("The currency of {e} is the {v}.", "What is the currency of {e}?", "exact"),
    "animal": ("The national animal of {e} is the {v}.", "What is the national animal of {e}?", "exact"),
    "river": ("The longest river in {e} is the {v}.", "What is the longest river in {e}?", "exact"),
    "leader": ("The leader of {e} is {v}.", "Who is the leader of {e}?", "exact"),
}
# Words a query uses for each attribute (the oracle query is "<word> <country>").
QUERY_WORDS = {"capital": "capital", "founded": "founded", "currency": "currency", "animal": "national animal",
               "river": "longest river", "leader": "leader"}


@dataclass
class SearchTaskConfig:
    world_seed: int = 0                # the world (corpus) is fixed by this, not by generate's seed
    num_entities: int = 300
    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    oracle_max_results: int = 3        # max_results in the oracle call (short tool responses)
    tools: list[str] = field(default_factory=lambda: ["search"])


def _name(rng: random.Random, kind: str, syllables: tuple[int, int] = (1, 2)) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(*syllables))]
    return ("".join(parts) + rng.choice(_SUFFIXES[kind])).capitalize()


@dataclass
class World:
    entities: list[str]
    facts: dict[tuple[str, str], str]       # (entity, attribute) -> value
    passages: list[Snippet]


@functools.lru_cache(maxsize=8)
def _world(world_seed: int, num_entities: int, attributes: tuple[str, ...]) -> World:
    rng = random.Random(f"search-world-{world_seed}")
    used: set[str] = set()

    def unique(kind: str) -> str:
        while True:
            name = _name(rng, kind)
            if name.lower() not in used and len(name) >= 4:
                used.add(name.lower())
                return name

    entities = [unique("country") for _ in range(num_entities)]
    facts: dict[tuple[str, str], str] = {}
    passages = []
    for e in entities:
        for attr in attributes:
            if attr == "capital":
                v = unique("city")
            elif attr == "founded":
                v = str(rng.randint(1100, 1990))
            elif attr == "currency":
                v = unique("currency").lower()
            elif attr == "animal":
                v = rng.choice(ANIMALS)
            elif attr == "river":
                v = unique("river") + " River"
            elif attr == "leader":
                v = f"{unique('person')} {unique('person')}"
            else:
                raise ValueError(f"unknown attribute {attr!r}; known: {', '.join(ATTRIBUTES)}")
            facts[(e, attr)] = v
            passages.append(Snippet(title=e, text=ATTRIBUTES[attr][0].format(e=e, v=v)))
    return World(entities, facts, passages)


def world(cfg: SearchTaskConfig) -> World:
    return _world(cfg.world_seed, cfg.num_entities, tuple(cfg.attributes))


def build_corpus(cfg: SearchTaskConfig | None = None) -> list[Snippet]:
    """The documents of the default search provider for this task config."""
    return list(world(cfg or SearchTaskConfig()).passages)


def generate(n: int, seed: int, cfg: SearchTaskConfig | None = None, start: int = 0) -> list[Sample]:
    cfg = cfg or SearchTaskConfig()
    w = world(cfg)
    samples = []
    for i in range(start, start + n):  # sample i depends only on (seed, i)
        rng = random.Random(f"search-{seed}-{i}")
        e, attr = rng.choice(w.entities), rng.choice(cfg.attributes)
        _, question, answer_type = ATTRIBUTES[attr]
        samples.append(Sample(
            uid=f"search-{seed}-{i}", task="search",
            question=f"{question.format(e=e)} Use search if needed. {ANSWER_INSTRUCTION}", images=[],
            answer=w.facts[(e, attr)], answer_type=answer_type, tools=list(cfg.tools),
            oracle_call={"name": "search", "arguments": {"query": f"{QUERY_WORDS[attr]} {e}",
                                                         "max_results": cfg.oracle_max_results}},
            meta={"entity": e, "attribute": attr, "world_seed": cfg.world_seed,
                  "num_entities": cfg.num_entities, "attributes": list(cfg.attributes)},
        ))
    return samples


# --------------------------------------------------------------------------------------------


def _pattern(attr: str, entity: str | None) -> re.Pattern:
    template = re.escape(ATTRIBUTES[attr][0])
    e = re.escape(entity) if entity else r"[A-Z][a-z]+"
    return re.compile(template.replace(r"\{e\}", e).replace(r"\{v\}", r"(.+?)") + "$")


def read_tool_output(sample: Sample, result: ToolResult) -> str | None:
    """Value of the asked attribute for the asked entity in the snippets; failing that, the same
    attribute of whichever entity the snippets mention (what a careless reader would answer)."""
    if result.error:
        return None
    attr, entity = sample.meta["attribute"], sample.meta["entity"]
    lines = [line.split(": ", 1)[-1].strip() for line in result.text.splitlines()]
    for pat in (_pattern(attr, entity), _pattern(attr, None)):
        for line in lines:
            m = pat.search(line)
            if m:
                return m.group(1)
    return None


def _world_of(sample: Sample) -> World:
    m = sample.meta
    return _world(m["world_seed"], m["num_entities"], tuple(m["attributes"]))


def answer_without_tool(sample: Sample, rng: random.Random) -> str:
    """A guess from the attribute's answer vocabulary (the whole world's values)."""
    w, attr = _world_of(sample), sample.meta["attribute"]
    return rng.choice(sorted({v for (e, a), v in w.facts.items() if a == attr}))


def wrong_call(sample: Sample, rng: random.Random) -> dict:
    """A different (often similar-sounding) country, or the attribute without the country."""
    attr, entity = sample.meta["attribute"], sample.meta["entity"]
    w = _world_of(sample)
    if rng.random() < 0.3:
        query = QUERY_WORDS[attr]
    else:
        similar = [e for e in w.entities if e != entity and e[:2] == entity[:2]]
        other = rng.choice(similar or [e for e in w.entities if e != entity])
        query = f"{QUERY_WORDS[attr]} {other}"
    return {"name": "search", "arguments": {"query": query, "max_results": sample.oracle_call["arguments"]["max_results"]}}


def random_call(sample: Sample, rng: random.Random) -> dict:
    """Words drawn from the corpus vocabulary."""
    w = _world_of(sample)
    words = rng.sample(w.entities, 1) + rng.sample(sorted({q for q in QUERY_WORDS.values()}), 1)
    rng.shuffle(words)
    return {"name": "search", "arguments": {"query": " ".join(words), "max_results": sample.oracle_call["arguments"]["max_results"]}}


def plan_text(sample: Sample) -> str:
    return f"I do not know facts about {sample.meta['entity']}. I will search."


def direct_text(sample: Sample) -> str:
    return f"I am not sure about {sample.meta['entity']}. I will guess."


def after_text(sample: Sample, reading: str | None) -> str:
    if reading is None:
        return "The results do not answer the question. I will guess."
    return f"The search result says {reading}."


SPEC = TaskSpec("search", SearchTaskConfig, generate, read_tool_output, answer_without_tool,
                wrong_call, random_call, plan_text, direct_text, after_text)
