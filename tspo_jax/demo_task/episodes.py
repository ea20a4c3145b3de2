"""Scripted search episodes for the demo task, in Search-R1's tags, for a supervised warm start.

An episode is a list of (role, text) segments: "policy" segments are what the model should write
(trained on), "observation" segments are what the environment inserts (masked out of the loss).
Answers are read from the retrieved passages, not copied from the gold, so a demonstration shows
exactly what the retriever makes possible.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tspo_jax.demo_task import world
from tspo_jax.retrieval import base as retrieval_base

POLICY, OBSERVATION = "policy", "observation"
# A short instruction in the tags' vocabulary (our wording); configs may use it as the prompt.
INSTRUCTION = (
    "Answer the question. Think inside <think> and </think> first. To look something up, write "
    "a query inside <search> and </search>; the results come back inside <information> and "
    "</information>. When you know the answer, give it inside <answer> and </answer>.")
SearchFn = Callable[[str], Sequence[tuple[str, str]]]  # query -> [(title, text), ...]


def _question_regex(template: str) -> re.Pattern:
    before, after = template.split("{name}")
    return re.compile(f"^{re.escape(before)}(.+){re.escape(after)}$")


_QUESTION = {world.ONE_HOP: _question_regex(world.CITY_QUESTION),
             world.TWO_HOP: _question_regex(world.COUNTRY_QUESTION),
             world.CITY_HOP: _question_regex(world.CITY_COUNTRY_QUESTION)}
_BORN_IN = re.compile(r"\bwas born in (\w+)\.")
_CITY_IN = re.compile(r"\bis a city in (\w+)\.")


class DemonstrationUnavailable(LookupError):
    """The search results lack the passage a scripted episode needs (e.g. a retrieval miss)."""


def format_docs(docs: Sequence[tuple[str, str]]) -> str:
    """Search-R1's `_passages2string` for (title, text) pairs: the rollout's own formatting."""
    return retrieval_base.format_docs([retrieval_base.Doc("", title, text, 0.0) for title, text in docs])


def format_observation(docs: Sequence[tuple[str, str]]) -> str:
    """The text the environment appends after a search, exactly as the rollout writes it."""
    return retrieval_base.wrap_observation(format_docs(docs))


def _search_turn(think: str, query: str) -> str:
    return f"<think> {think} </think>\n<search> {query} </search>"


def _answer_turn(think: str, answer: str) -> str:
    return f"<think> {think} </think>\n<answer> {answer} </answer>"


def _fact_from(docs: Sequence[tuple[str, str]], title: str, pattern: re.Pattern, query: str) -> str:
    for doc_title, text in docs:
        if doc_title == title:
            match = pattern.search(text)
            if match:
                return match.group(1)
    raise DemonstrationUnavailable(
        f"Search for {query!r} returned no passage titled {title!r} stating the needed fact "
        f"(got titles {[t for t, _ in docs]}); skip this example or retrieve more documents.")


def _parse(example) -> str:
    pattern = _QUESTION.get(example.data_source)
    match = pattern.match(example.question) if pattern else None
    if match is None:
        raise ValueError(f"Not a demo-task question: data_source={example.data_source!r}, "
                         f"question={example.question!r}; demonstrations only script "
                         f"{sorted(_QUESTION)} questions.")
    return match.group(1)


def _check_gold(example, answer: str) -> None:
    golds = {world.normalize(g) for g in example.golds}
    if world.normalize(answer) not in golds:
        raise ValueError(f"Retrieved passages give {answer!r} for {example.uid!r} but its golds "
                         f"are {example.golds}; the corpus and the QA file disagree.")


def demonstrations(example, search_fn: SearchFn) -> list[tuple[str, str]]:
    """The scripted (correct) episode for a demo-task QAExample (demo_1hop, demo_city, demo_2hop).

    Raises DemonstrationUnavailable when search_fn misses a needed passage, and ValueError for a
    question that is not from the demo task or whose retrieved answer contradicts its gold.
    """
    name = _parse(example)
    segments: list[tuple[str, str]] = []

    if example.data_source == world.CITY_HOP:
        segments.append((POLICY, _search_turn(f"I need to find out which country {name} is in.", name)))
        docs = list(search_fn(name))
        segments.append((OBSERVATION, format_observation(docs)))
        answer = _fact_from(docs, name, _CITY_IN, name)
        segments.append((POLICY, _answer_turn(f"{name} is a city in {answer}.", answer)))
        _check_gold(example, answer)
        return segments

    if example.data_source == world.ONE_HOP:
        segments.append((POLICY, _search_turn(f"I need to find out where {name} was born.", name)))
    else:
        segments.append((POLICY, _search_turn(
            f"I need to find out where {name} was born, and then which country that city is in.",
            name)))
    docs = list(search_fn(name))
    segments.append((OBSERVATION, format_observation(docs)))
    city = _fact_from(docs, name, _BORN_IN, name)

    if example.data_source == world.ONE_HOP:
        answer = city
        segments.append((POLICY, _answer_turn(f"{name} was born in {city}.", city)))
    else:
        segments.append((POLICY, _search_turn(
            f"{name} was born in {city}. Now I need to find the country of {city}.", city)))
        docs = list(search_fn(city))
        segments.append((OBSERVATION, format_observation(docs)))
        answer = _fact_from(docs, city, _CITY_IN, city)
        segments.append((POLICY, _answer_turn(f"{city} is a city in {answer}.", answer)))

    _check_gold(example, answer)
    return segments


def one_hop_demonstrations(example, search_fn: SearchFn) -> list[tuple[str, str]]:
    """Only the 1-hop kinds (person -> city, city -> country); a 2-hop question raises
    DemonstrationUnavailable, so the warm start skips it and never shows a chain of searches."""
    if example.data_source == world.TWO_HOP:
        raise DemonstrationUnavailable("one_hop_demonstrations script no 2-hop question")
    return demonstrations(example, search_fn)


# A weak searcher's behaviours on a 2-hop question, with how many of one question's
# demonstrations show each (the warm start samples a question's demonstrations uniformly, so a
# converged policy takes them with these shares on every 2-hop question, whatever its seed):
#   stop:   search the person, answer the birth city (what a 1-hop searcher does; wrong);
#   unused: search the person, then the city, then still answer the birth city (the second search
#           retrieved the gold country and it went unused: FOLR's case; wrong);
#   chain:  search the person, then the city, answer the country (right).
TWO_HOP_MIX = (("stop", 5), ("unused", 2), ("chain", 1))


def _two_hop_variant(example, search_fn: SearchFn, kind: str) -> list[tuple[str, str]]:
    name = _parse(example)
    segments = [(POLICY, _search_turn(f"I need to find out where {name} was born.", name))]
    docs = list(search_fn(name))
    segments.append((OBSERVATION, format_observation(docs)))
    city = _fact_from(docs, name, _BORN_IN, name)
    if kind == "stop":
        segments.append((POLICY, _answer_turn(f"{name} was born in {city}.", city)))
        return segments
    segments.append((POLICY, _search_turn(
        f"{name} was born in {city}. Now I need to find the country of {city}.", city)))
    docs = list(search_fn(city))
    segments.append((OBSERVATION, format_observation(docs)))
    country = _fact_from(docs, city, _CITY_IN, city)
    if kind == "unused":
        segments.append((POLICY, _answer_turn(f"{name} was born in {city}.", city)))
    else:
        _check_gold(example, country)
        segments.append((POLICY, _answer_turn(f"{city} is a city in {country}.", country)))
    return segments


def weak_searcher_demonstrations(example, search_fn: SearchFn) -> list[list[tuple[str, str]]]:
    """The demo's warm start: a list of episodes per question, sampled uniformly by the warm start.

    1-hop kinds (person -> city, city -> country): their one correct episode. 2-hop: the
    TWO_HOP_MIX of a weak searcher that mostly stops after one search. After the first search
    it searches again with probability 3/8, and after the second it answers the country with
    probability 1/3: greedy decoding answers the city on every 2-hop question, and a sampled
    rollout is right with probability 1/8, so most 2-hop groups of 5 are all-wrong.
    """
    if example.data_source != world.TWO_HOP:
        return [demonstrations(example, search_fn)]
    return [_two_hop_variant(example, search_fn, kind)
            for kind, count in TWO_HOP_MIX for _ in range(count)]
