"""Items: questions with their answers. Reading them (from the files and datasets readers.py opens), writing them as
JSONL, and a free-form fact set generated from the `countryinfo` package.

Two kinds of item, told apart by their keys:
- multiple choice: {"id", "question", "label"} with label in A-D (the question text lists the options), as in the
  paper's banks (shared/data/mcq);
- free-form fact: {"id", "question", "answer"} and optionally "response_prefix", the start of the assistant's reply
  that the answer completes (e.g. "The capital of France is" + " Paris"), matching how chat models answer, and
  optionally "answers", other right answers (aliases) for the generation judge (evaluation.py).

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
MATCHES = ("auto", "prefix", "generate")  # how a fact is judged (judge.py); here for the CLI's help, without torch

ITEM_FORMATS = """\
Item files are JSONL, JSON, CSV or Parquet files, or folders saved by datasets' save_to_disk; one item (a question
with its answer) per line or row, in any of these forms (--question-field / --answer-field rename columns):
  {"question": ..., "label": "A"-"D"}                multiple choice (the question lists options "A: ...")
  {"question": ..., "answer": ..., "response_prefix": ..., "answers": [...]}   free-form fact (prefix, aliases
                                                     optional; without a prefix it is judged on generated replies)
  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   fact: last user message -> final reply
  {"prompt": ..., "completion": ...}                  fact (strings, or lists of chat messages)
  {"text": "The capital of Foo is Bar"}               fact: the text before its last word -> the last word
An optional "id" names an item (default: <file stem>-<line or row>). The loss is on the answer tokens only.
"""


def item_kind(item: dict) -> str:
    """'mcq' or 'fact'; raises ValueError naming what is missing."""
    if "question" not in item or not isinstance(item["question"], str) or not item["question"].strip():
        raise ValueError("an item needs a non-empty string 'question'")
    if "response_prefix" in item and not isinstance(item["response_prefix"], (str, type(None))):
        raise ValueError(f"'response_prefix' must be a string, got {type(item['response_prefix']).__name__}")
    answers = item.get("answers")
    if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
        raise ValueError(f"'answers' (other right answers) must be a list of strings, got {answers!r}"[:200])
    if "label" in item:
        if item["label"] not in LETTERS:
            raise ValueError(f"a multiple-choice 'label' must be one of {LETTERS}, got {item['label']!r}")
        return "mcq"
    if isinstance(item.get("answer"), str) and item["answer"].strip():
        return "fact"
    if "answer" in item and not isinstance(item["answer"], str):
        raise ValueError(f"'answer' must be a string, got {type(item['answer']).__name__} {item['answer']!r}"[:200])
    raise ValueError("an item needs either 'label' (multiple choice, A-D) or a non-empty string 'answer' (fact)")


def read_items(
    source: str | os.PathLike | object, *, question_field: str | None = None, answer_field: str | None = None
) -> list[dict]:
    """The items of a JSONL, JSON, CSV or Parquet file, a `datasets` folder or a `datasets.Dataset` (any form in
    ITEM_FORMATS, read by readers.py with the `datasets` library), each validated; errors name the file and row.

    `question_field` / `answer_field` name the columns that hold the question and the answer when they are not
    called "question" and "answer".
    """
    from .readers import read_records, source_stem

    items, place_of_id = [], {}
    stem = source_stem(source)
    fields = {"question": question_field, "answer": answer_field}
    name = str(source) if isinstance(source, (str, os.PathLike)) else "the dataset"
    for place, number, record in read_records(source, fields):
        try:
            item = to_item(record)
            item_kind(item)
        except ValueError as error:
            hint = _field_hint(record, fields) if "expected 'question'" in str(error) else ""
            raise ValueError(f"{place}: {error}{hint}") from None
        item.setdefault("id", f"{stem}-{number}")
        if not isinstance(item["id"], str) or not item["id"]:
            raise ValueError(f"{place}: 'id' must be a non-empty string, got {item['id']!r} (quote it, or leave ids "
                             f"out to get <file name>-<row>)")
        if item["id"] in place_of_id:
            kind, first = place_of_id[item["id"]].rpartition(", ")[2].split()
            raise ValueError(f"{name}, {kind}s {first} and {number}: both have the id {item['id']!r} "
                             "(ids name items in predictions and baselines: make them unique)")
        place_of_id[item["id"]] = place
        items.append(item)
    if not items:
        raise ValueError(f"{name} holds no items")
    return items


def _field_hint(record: dict, fields: dict[str, str | None]) -> str:
    """For a record that is no item: its columns, and the flags that map them."""
    columns = ", ".join(map(repr, record)) or "none"
    if any(fields.values()):
        return f" (its non-empty columns: {columns})"
    return f" (its columns: {columns}; name the question and answer columns with --question-field / --answer-field)"


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
    items, seen = [], set()
    for country in sorted(countryinfo.all_countries(), key=lambda c: c.name()):
        info, name = country.info(), country.name()
        code = (info.get("ISO") or {}).get("alpha3")
        if not code or code in seen:  # countryinfo lists some countries twice (Burma, Myanmar) or without a code
            continue
        seen.add(code)
        for relation in relations:
            question, prefix, getter = FACT_RELATIONS[relation]
            answer = getter(info)
            if isinstance(answer, str) and answer.strip():
                items.append(
                    {
                        "id": f"{relation}:{code}",
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
