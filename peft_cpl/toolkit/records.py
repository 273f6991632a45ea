"""Training records in the formats people already have (chat, prompt/completion, plain text) as question items.

Items are what `peft_cpl.toolkit.data` reads and `peft_cpl.toolkit.evaluation` encodes; this module maps the other
common record formats onto free-form fact items, so the CLI and user code accept the same files.
"""

from __future__ import annotations

import os

from .data import read_items

RECORD_FORMATS = """\
Question files are JSONL, one record per line:
  {"question": ..., "label": "A"-"D"}                multiple choice (the question lists options "A: ...")
  {"question": ..., "answer": ..., "response_prefix": ...}   free-form fact (prefix optional)
  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   fact: last user message -> final reply
  {"prompt": ..., "completion": ...}                  fact (strings, or lists of chat messages)
  {"text": "The capital of Foo is Bar"}               fact: the text before its last word -> the last word
An optional "id" names a record (default: <file stem>-<line>). The loss is on the answer tokens only.
"""


def read_questions(path: str | os.PathLike) -> list[dict]:
    """Items of a JSONL file (formats in RECORD_FORMATS), each validated; errors name the file and line."""
    return read_items(path, convert=to_item)


def to_item(record: dict) -> dict:
    """Map a chat, prompt/completion or plain-text record to a free-form fact; items pass through unchanged."""
    keep = {"id": record["id"]} if "id" in record else {}
    if "question" in record:
        return record
    if "messages" in record:
        question, answer = _from_messages(record["messages"])
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            question, answer = _from_messages(prompt + completion)
        elif isinstance(prompt, str) and isinstance(completion, str):
            question, answer = prompt, completion
        else:
            raise ValueError("'prompt' and 'completion' must both be strings or both be lists of chat messages")
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError("'text' must be a string")
        head, _, last = record["text"].strip().rpartition(" ")
        if not head.strip():
            raise ValueError("a 'text' record needs at least two words: the text up to its last word is the prompt")
        return {**keep, "question": head.strip(), "response_prefix": head.strip(), "answer": last}
    else:
        raise ValueError(
            "unrecognised record: expected 'question' with 'label' or 'answer', 'messages', 'prompt' + 'completion', "
            "or 'text'"
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
