"""What `split` tells the user about a split that is probably wrong, and the model's actual replies to look at.

A split where the model knows (almost) nothing or (almost) everything is usually a mismatch between the facts and
the judge, not the model: CPL would then teach facts the model had, or have nothing to protect or to teach.
"""

from __future__ import annotations

from collections.abc import Sequence

LOW, HIGH = 0.02, 0.98


def known_share_warning(known: int, total: int, prefixed: int) -> str | None:
    """A warning when under 2% or over 98% of `total` items are known (`prefixed`: facts judged by their prefix)."""
    share = known / max(total, 1)
    if share < LOW:
        causes = (f"{prefixed} of the facts are judged by their response_prefix (the reply must start with it, then "
                  "the answer): check the replies below against those prefixes, or try --match generate; "
                  if prefixed else "")
        return (f"warning: the model answers only {known} of {total} items ({share:.1%}). This usually means the "
                f"judge does not fit how the model answers: {causes}a tokenizer whose chat template is not the "
                "model's also does this. CPL would then teach facts the model already has, with nothing to protect.")
    if share > HIGH:
        return (f"warning: the model already answers {known} of {total} items ({share:.1%}): there is almost "
                "nothing to teach. Usually the answer is given away by the question, or the facts are common "
                "knowledge; add facts the model does not know.")
    return None


def wrong_examples(items: Sequence[dict], correct: dict[str, bool], replies: dict[str, str], count: int) -> list[str]:
    """Lines showing, for up to `count` wrongly answered items, the question, the expected answer and the reply."""
    lines = []
    for item in [item for item in items if not correct[item["id"]] and item["id"] in replies][:count]:
        expected = item.get("label") or item.get("answer")
        prefix = f" (after {item['response_prefix']!r})" if item.get("response_prefix") else ""
        lines.append(f"  {item['id']}: {item['question'][:80]!r} expected {expected!r}{prefix}, the model said "
                     f"{replies[item['id']][:120]!r}")
    return lines
