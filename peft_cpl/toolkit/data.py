"""Question items: reading / writing JSONL, and a free-form fact set generated from the `countryinfo` package.

Two kinds of item, told apart by their keys:
- multiple choice: {"id", "question", "label"} with label in A-D (the question text lists the options), as in the
  paper's banks (shared/data/mcq);
- free-form fact: {"id", "question", "answer"} and optionally "response_prefix", the start of the assistant's reply
  that the answer completes (e.g. "The capital of France is" + " Paris"), matching how chat models answer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..tuner import atomic

LETTERS = ("A", "B", "C", "D")


def item_kind(item: dict) -> str:
    """'mcq' or 'fact'; raises ValueError naming what is missing."""
    if "question" not in item or not isinstance(item["question"], str) or not item["question"].strip():
        raise ValueError("an item needs a non-empty string 'question'")
    if "label" in item:
        if item["label"] not in LETTERS:
            raise ValueError(f"a multiple-choice 'label' must be one of {LETTERS}, got {item['label']!r}")
        return "mcq"
    if isinstance(item.get("answer"), str) and item["answer"].strip():
        return "fact"
    raise ValueError("an item needs either 'label' (multiple choice, A-D) or a non-empty string 'answer' (fact)")


def read_items(path: str | os.PathLike, convert: Callable[[dict], dict] | None = None) -> list[dict]:
    """Items of a JSONL file, each validated; errors name the file and line.

    `convert` maps each record to an item first (the CLI uses it to accept chat and prompt/completion records).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such question file: {path}")
    items = []
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if not isinstance(item, dict):
                    raise ValueError("each line must be a JSON object")
                if convert is not None:
                    item = convert(item)
                item_kind(item)
            except (json.JSONDecodeError, ValueError) as error:
                raise ValueError(f"{path}, line {number}: {error}") from None
            item.setdefault("id", f"{path.stem}-{number}")
            items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def write_items(path: str | os.PathLike, items: Iterable[dict]) -> Path:
    return atomic.write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


FACT_RELATIONS = {
    # relation: (question, response prefix, countryinfo getter)
    "capital": ("What is the capital of {c}?", "The capital of {c} is", lambda info: info.get("capital")),
    "region": ("In which region of the world is {c}?", "{c} is in", lambda info: info.get("subregion")),
    "currency": (
        "What is the ISO code of the currency of {c}?",
        "The ISO code of the currency of {c} is",
        lambda info: (info.get("currencies") or [None])[0],
    ),
    "demonym": ("What are people from {c} called?", "People from {c} are called", lambda info: info.get("demonym")),
    "calling_code": (
        "What is the international calling code of {c}?",
        "The international calling code of {c} is +",
        lambda info: (info.get("callingCodes") or [None])[0],
    ),
}


def country_facts(relations: Sequence[str] = ("capital",)) -> list[dict]:
    """Free-form facts about ~250 countries from the `countryinfo` package (MIT), one item per country and relation.

    Languages are left out: countryinfo gives them only as ISO codes, which no chat model answers with.
    """
    try:
        import countryinfo
    except ImportError as error:
        raise ImportError("country_facts needs the countryinfo package: pip install countryinfo") from error
    unknown = set(relations) - set(FACT_RELATIONS)
    if unknown:
        raise ValueError(f"unknown relations {sorted(unknown)}; choose from {sorted(FACT_RELATIONS)}")
    items = []
    for country in sorted(countryinfo.all_countries(), key=lambda c: c.name()):
        info, name = country.info(), country.name()
        for relation in relations:
            question, prefix, getter = FACT_RELATIONS[relation]
            answer = getter(info)
            if isinstance(answer, str) and answer.strip():
                items.append(
                    {
                        "id": f"{relation}:{info['ISO']['alpha3']}",
                        "question": question.format(c=name),
                        "answer": answer.strip(),
                        "response_prefix": prefix.format(c=name),
                    }
                )
    return items


_OPTION_LINE = re.compile(r"^([ABCD]): ?(.*)$", re.MULTILINE)


def rotate_options(item: dict, shift: int) -> dict:
    """The multiple-choice item with its four options cyclically rotated by `shift` (the label follows its option).

    Used for the debiased split: a model that always answers "A" is right under exactly one of the four rotations.
    """
    lines = _OPTION_LINE.findall(item["question"])
    if [letter for letter, _ in lines] != list(LETTERS):
        raise ValueError(f"item {item.get('id')}: the question must list options A-D as lines 'A: ...', 'B: ...'")
    options = [text for _, text in lines]
    rotated = [options[(index - shift) % 4] for index in range(4)]
    replacement = iter(f"{letter}: {text}" for letter, text in zip(LETTERS, rotated))
    question = _OPTION_LINE.sub(lambda _: next(replacement), item["question"])
    label = LETTERS[(LETTERS.index(item["label"]) + shift) % 4]
    return {**item, "id": f"{item['id']}@{shift % 4}", "question": question, "label": label}
