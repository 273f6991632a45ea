"""Item files: identity (unique string ids), encodings users have (BOM), and prefixes with stray whitespace."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from peft_cpl.toolkit.batches import encode
from peft_cpl.toolkit.cli import main
from peft_cpl.toolkit.data import read_items
from peft_cpl.toolkit.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS


def write(path, *lines: str, bom: bool = False) -> str:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode("utf-8"))
    return str(path)


def test_duplicate_and_non_string_ids_are_refused_naming_the_lines(tmp_path):
    fact = '"question": "capital of A?", "answer": "B"'
    path = write(tmp_path / "f.jsonl", f'{{"id": "x", {fact}}}', f'{{"id": "y", {fact}}}', f'{{"id": "x", {fact}}}')
    with pytest.raises(ValueError, match=r"f\.jsonl, lines 1 and 3: both have the id 'x'"):
        read_items(path)
    with pytest.raises(ValueError, match=r"line 1: 'id' must be a non-empty string, got 5"):
        read_items(write(tmp_path / "g.jsonl", f'{{"id": 5, {fact}}}'))
    with pytest.raises(ValueError, match=r"line 1: 'response_prefix' must be a string, got int"):
        read_items(write(tmp_path / "h.jsonl", f'{{{fact}, "response_prefix": 3}}'))


def test_a_byte_order_mark_is_not_part_of_the_first_item(tmp_path):
    items = read_items(write(tmp_path / "bom.jsonl", '{"question": "q?", "answer": "a"}', bom=True))
    assert items == [{"question": "q?", "answer": "a", "id": "bom-1"}]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (the kind chat models use: a leading space belongs to the next word), trained here."""
    texts = ["The capital of France is Paris.", "The capital of Peru is Lima.", "What is the capital of France?"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_a_prefix_with_trailing_whitespace_encodes_like_the_clean_prefix():
    tokenizer = byte_level_tokenizer()
    item = {"question": "What is the capital of France?", "answer": "Paris"}
    clean = encode(tokenizer, {**item, "response_prefix": "The capital of France is"})
    for prefix in ("The capital of France is ", "The capital of France is  ", "The capital of France is\n"):
        assert encode(tokenizer, {**item, "response_prefix": prefix}) == clean, repr(prefix)
    answer = tokenizer.convert_ids_to_tokens(clean.input_ids[clean.target_start:])
    assert answer[0].startswith("Ġ")  # the answer carries its leading space, as the model would generate it


@pytest.mark.parametrize(("flag", "value"), [("--epochs", "-1"), ("--batch-size", "0"), ("--epochs", "two")])
def test_counts_below_one_are_refused_before_any_work(flag, value, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
