"""Predictions files ({item id: answered correctly}, as `split` and `eval` save them) and what makes them comparable.

Ids alone do not identify an item: the default ids (<file stem>-<line>) repeat across files with the same name, and
a user may edit a question and keep its id. So a predictions file also keeps a fingerprint of every item (a hash of
its question and answers) and the judge it was made with; counting learned / forgotten against a baseline refuses
items whose fingerprint or judge differ.

    {"format": "peft-cpl predictions", "match": "auto", "correct": {id: bool}, "items": {id: fingerprint},
     "replies": {id: generated reply}}

A bare {id: bool} file (as written before 0.2) is still read, without those checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "peft-cpl predictions"
_CONTENT = ("question", "answer", "answers", "label", "response_prefix")


def fingerprint(item: dict) -> str:
    """A hash of what is asked and what counts as right (not the id): equal for the same item in any file."""
    content = {key: item[key] for key in _CONTENT if item.get(key) is not None}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """The content hash of a file (a checkpoint's inputs: `--resume` refuses changed ones)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Predictions:
    correct: dict[str, bool]
    match: str | None = None  # None: a file from before the judge was recorded
    items: dict[str, str] = field(default_factory=dict)  # id -> fingerprint
    replies: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "match": self.match, "correct": self.correct, "items": self.items,
                           "replies": self.replies}, indent=1, ensure_ascii=False)


def make_predictions(correct: dict[str, bool], items: Sequence[dict], match: str,
                     replies: dict[str, str] | None = None) -> Predictions:
    return Predictions(dict(correct), match, {item["id"]: fingerprint(item) for item in items}, dict(replies or {}))


def write_predictions(path: str | os.PathLike, predictions: Predictions) -> Path:
    from ..tuner import atomic

    return atomic.write_text(path, predictions.to_json())


def read_predictions(path: str | os.PathLike) -> Predictions:
    """A predictions file, in the format above or the bare {id: bool} one; ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such predictions file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a JSON predictions file ({error})") from None
    expected = f"{path}: expected a predictions file, as written by --save-predictions"
    if isinstance(data, dict) and data.get("format") == FORMAT:
        correct, items, replies = data.get("correct"), data.get("items"), data.get("replies") or {}
        if not (isinstance(correct, dict) and isinstance(items, dict) and isinstance(replies, dict)
                and all(isinstance(value, bool) for value in correct.values())
                and all(isinstance(value, str) for value in items.values())):
            raise ValueError(f"{expected} (its 'correct' or 'items' are damaged)")
        return Predictions(correct, data.get("match"), items, replies)
    if not isinstance(data, dict) or not all(isinstance(value, bool) for value in data.values()):
        raise ValueError(expected)
    return Predictions(data)


def check_against(baseline: Predictions, items: Sequence[dict], match: str, name: str) -> list[dict]:
    """The items that `baseline` (read from `name`) judged, after checking they are the same items under the same
    judge; ValueError naming the first item that differs."""
    if baseline.match is not None and baseline.match != match:
        raise ValueError(f"{name} was judged with --match {baseline.match}: pass --match {baseline.match} too, or "
                         "make a new baseline (learned / forgotten compare the same rule before and after)")
    known = [item for item in items if item["id"] in baseline.correct]
    for item in known:
        saved = baseline.items.get(item["id"])
        if saved is not None and saved != fingerprint(item):
            raise ValueError(f"item {item['id']!r} is not the item {name} was made on (its question or answer "
                             "differs): make the baseline from this file")
    return known
