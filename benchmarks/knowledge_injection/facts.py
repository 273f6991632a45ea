"""The free-form fact pool: several kinds of facts from PyPI data packages, and invented facts no model can know.

Every item's id is "relation:key"; the relation is the stratum the splits sample evenly from, so that no single kind
(capitals, say) decides the result. Kinds:

- "country": every usable relation of `countryinfo` (capital, region, currency code, demonym, calling code);
- "elements": `periodictable` (chemical symbol and atomic number of the 118 elements);
- "us_states": `us` (capital, postal abbreviation and statehood year of the 50 states);
- "fictional": people invented with `faker` (fixed seed), with a birthplace and an employer: the "Unknown" facts of
  Gekhman et al. 2024, which only training can teach.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from peft_cpl.toolkit.data import FACT_RELATIONS, country_facts

FICTIONAL_PEOPLE = 100  # per relation; each person appears in one item only
FICTIONAL_SEED = 2024  # fixed: the invented world is the same for every benchmark seed


def _require(module: str, kind: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the {kind!r} facts need {module}: pip install -e .[benchmarks]") from error


def _fact(relation: str, key: str, question: str, prefix: str, answer: object) -> dict:
    return {"id": f"{relation}:{key}", "question": question, "answer": str(answer), "response_prefix": prefix}


def country() -> list[dict]:
    return country_facts(list(FACT_RELATIONS))


def elements() -> list[dict]:
    periodictable = _require("periodictable", "elements")
    items = []
    for element in periodictable.elements:
        if element.number < 1:
            continue
        name = element.name.capitalize()
        items.append(_fact("element_symbol", element.symbol, f"What is the chemical symbol of {name}?",
                           f"The chemical symbol of {name} is", element.symbol))
        items.append(_fact("element_number", element.symbol, f"What is the atomic number of {name}?",
                           f"The atomic number of {name} is", element.number))
    return items


def us_states() -> list[dict]:
    us = _require("us", "us_states")
    items = []
    for state in us.states.STATES:
        items.append(_fact("state_capital", state.abbr, f"What is the capital of the US state of {state.name}?",
                           f"The capital of {state.name} is", state.capital))
        items.append(_fact("state_abbreviation", state.abbr,
                           f"What is the two-letter postal abbreviation of {state.name}?",
                           f"The postal abbreviation of {state.name} is", state.abbr))
        items.append(_fact("state_statehood", state.abbr, f"In which year did {state.name} become a US state?",
                           f"{state.name} became a US state in", state.statehood_year))
    return items


def fictional() -> list[dict]:
    fake = _require("faker", "fictional").Faker("en_US")
    fake.seed_instance(FICTIONAL_SEED)
    names: list[str] = []
    while len(names) < 2 * FICTIONAL_PEOPLE:
        name = fake.name()
        if name not in names:
            names.append(name)
    items = []
    for index, name in enumerate(names[:FICTIONAL_PEOPLE]):
        items.append(_fact("fictional_birthplace", f"P{index}", f"In which city was {name} born?",
                           f"{name} was born in", fake.city()))
    for index, name in enumerate(names[FICTIONAL_PEOPLE:]):
        items.append(_fact("fictional_employer", f"P{index}", f"Which company does {name} work for?",
                           f"{name} works for", fake.company()))
    return items


KINDS: dict[str, Callable[[], list[dict]]] = {
    "country": country, "elements": elements, "us_states": us_states, "fictional": fictional,
}


def fact_pool(kinds: Sequence[str]) -> list[dict]:
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)}; choose from {sorted(KINDS)}")
    return [item for kind in kinds for item in KINDS[kind]()]


def relation(item: dict) -> str:
    """The stratum of an item: its relation for facts ("capital:FRA" -> "capital"), else one stratum for all."""
    head, separator, _ = item["id"].partition(":")
    return head if separator else "all"
