"""Items: questions with their answers. Reading and writing them as JSONL, and a free-form fact set generated from
the `countryinfo` package.

Two kinds of item, told apart by their keys:
- multiple choice: {"id", "question", "label"} with label in A-D (the question text lists the options), as in the
  paper's banks (shared/data/mcq);
- free-form fact: {"id", "question", "answer"} and optionally "response_prefix", the start of the assistant's reply
  that the answer completes (e.g. "The capital of France is" + " Paris"), matching how chat models answer.

A file may also hold the chat, prompt/completion and plain-text lines that training data usually comes in
(ITEM_FORMATS); `read_items` turns each into a free-form fact (`to_item`), so the CLI and user code read the same
files.
This module imports nothing heavy: the CLI's help text comes from it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

LETTERS = ("A", "B", "C", "D")

ITEM_FORMATS = """\
Item files are JSONL, one item (a question with its answer) per line, in any of these forms:
  {"question": ..., "label": "A"-"D"}                multiple choice (the question lists options "A: ...")
  {"question": ..., "answer": ..., "response_prefix": ...}   free-form fact (prefix optional)
  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   fact: last user message -> final reply
  {"prompt": ..., "completion": ...}                  fact (strings, or lists of chat messages)
  {"text": "The capital of Foo is Bar"}               fact: the text before its last word -> the last word
An optional "id" names an item (default: <file stem>-<line>). The loss is on the answer tokens only.
"""


def item_kind(item: dict) -> str:
    """'mcq' or 'fact'; raises ValueError naming what is missing."""
    if "question" not in item or not isinstance(item["question"], str) or not item["question"].strip():
        raise ValueError("an item needs a non-empty string 'question'")
    if "response_prefix" in item and not isinstance(item["response_prefix"], (str, type(None))):
        raise ValueError(f"'response_prefix' must be a string, got {type(item['response_prefix']).__name__}")
    if "label" in item:
        if item["label"] not in LETTERS:
            raise ValueError(f"a multiple-choice 'label' must be one of {LETTERS}, got {item['label']!r}")
        return "mcq"
    if isinstance(item.get("answer"), str) and item["answer"].strip():
        return "fact"
    raise ValueError("an item needs either 'label' (multiple choice, A-D) or a non-empty string 'answer' (fact)")


def read_items(path: str | os.PathLike) -> list[dict]:
    """The items of a JSONL file (any form in ITEM_FORMATS), each validated; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such question file: {path}")
    try:  # utf-8-sig: a byte-order mark, as some editors write, is not part of the first line
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: U+2028 may stand in a string
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    items, lines_of_id = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            line_object = json.loads(line)
            if not isinstance(line_object, dict):
                raise ValueError("each line must be a JSON object")
            item = to_item(line_object)
            item_kind(item)
        except (json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
        item.setdefault("id", f"{path.stem}-{number}")
        if not isinstance(item["id"], str) or not item["id"]:
            raise ValueError(f"{path}, line {number}: 'id' must be a non-empty string, got {item['id']!r}")
        if item["id"] in lines_of_id:
            raise ValueError(f"{path}, lines {lines_of_id[item['id']]} and {number}: both have the id {item['id']!r} "
                             "(ids name items in predictions and baselines: make them unique)")
        lines_of_id[item["id"]] = number
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def write_items(path: str | os.PathLike, items: Iterable[dict]) -> Path:
    from ..tuner import atomic  # here, not at the top: the CLI's help imports this module

    return atomic.write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def to_item(line: dict) -> dict:
    """An item from one JSON line of a file: items pass through unchanged; a chat, prompt/completion or plain-text
    line becomes a free-form fact (ITEM_FORMATS)."""
    keep = {"id": line["id"]} if "id" in line else {}
    if "question" in line:
        return line
    if "messages" in line:
        question, answer = _from_messages(line["messages"])
    elif "prompt" in line and "completion" in line:
        prompt, completion = line["prompt"], line["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            question, answer = _from_messages(prompt + completion)
        elif isinstance(prompt, str) and isinstance(completion, str):
            question, answer = prompt, completion
        else:
            raise ValueError("'prompt' and 'completion' must both be strings or both be lists of chat messages")
    elif "text" in line:
        if not isinstance(line["text"], str):
            raise ValueError("'text' must be a string")
        head, _, last = line["text"].strip().rpartition(" ")
        if not head.strip():
            raise ValueError("a 'text' line needs at least two words: the text up to its last word is the prompt")
        return {**keep, "question": head.strip(), "response_prefix": head.strip(), "answer": last}
    else:
        raise ValueError(
            "not an item: expected 'question' with 'label' or 'answer', 'messages', 'prompt' + 'completion', or 'text'"
        )
    return {**keep, "question": question, "answer": answer}


def _from_messages(messages: object) -> tuple[str, str]:
    """(last user message before the final assistant reply, that reply); earlier turns and system prompts drop."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a list of {'role', 'content'} objects")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's reply (the answer to learn)")
    users = [m for m in messages[:-1] if m.get("role") == "user"]
    if not users:
        raise ValueError("no user message before the assistant's reply")
    question, answer = users[-1].get("content"), messages[-1].get("content")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError("message contents must be strings")
    return question, answer


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
