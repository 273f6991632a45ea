"""The knowledge-injection protocol on a tiny Llama with a real word-level tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.toolkit.batches import collate, encode, make_batches
from peft_cpl.toolkit.data import read_items, write_items
from peft_cpl.toolkit.evaluation import injection_outcome, predict, split_by_correctness
from peft_cpl.toolkit.loop import make_optimizer, train
from peft_cpl.toolkit.tiny import fit

from .conftest import FACTS, facts_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return facts_tokenizer()


def test_encoding_targets(tokenizer):
    fact = encode(tokenizer, FACTS[3])
    assert tokenizer.decode(fact.input_ids[fact.target_start :]) == "city3"
    assert tokenizer.decode(fact.input_ids[: fact.target_start]).endswith("<|assistant|> land3 has")
    choice = encode(tokenizer, FACTS[-2])
    assert tokenizer.convert_ids_to_tokens(choice.input_ids[choice.target_start :]) == ["C"]
    batch = collate([fact, choice], tokenizer.pad_token_id)
    assert batch["labels"][0].ne(-100).sum() == 1 and batch["labels"][1].ne(-100).sum() == 1
    assert batch["attention_mask"].sum() == len(fact.input_ids) + len(choice.input_ids)


def memorised_model(tokenizer, items, steps: int = 60, lr: float = 1e-2):
    return fit(tiny_llama(seed=0, vocab_size=len(tokenizer)), tokenizer, items, steps=steps, lr=lr)


def test_predict_agrees_with_single_unpadded_forwards(tokenizer):
    model = memorised_model(tokenizer, FACTS[:6] + FACTS[-2:])
    batched = predict(model, tokenizer, FACTS, batch_size=5)
    single = predict(model, tokenizer, FACTS, batch_size=1)
    assert batched == single
    assert all(batched[item["id"]] for item in FACTS[:6] + FACTS[-2:])  # memorised items are answered
    assert not any(batched[item["id"]] for item in FACTS[6:12])  # the rest are not
    with torch.no_grad():  # and the letter protocol is the argmax over A-D at the answer position
        example = encode(tokenizer, FACTS[-2])
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, example.target_start - 1]
        letters = tokenizer.convert_tokens_to_ids(["A", "B", "C", "D"])
        assert "ABCD"[int(logits[letters].argmax())] == FACTS[-2]["label"]


def test_split_train_and_count_learned_forgotten(tokenizer):
    model = memorised_model(tokenizer, FACTS[:6])
    before = predict(model, tokenizer, FACTS[:12])
    mastered, injection = split_by_correctness(before, FACTS[:12])
    assert [item["id"] for item in mastered] == [f"f{i}" for i in range(6)]
    peft_model = get_peft_model(model, CPLConfig(target_modules="all-linear"))
    mastered_batches = make_batches(tokenizer, mastered, 3)
    injection_batches = make_batches(tokenizer, injection, 3, seed=0)
    select_collaborative(peft_model, mastered_batches, injection_batches, progress=False)
    optimizer = make_optimizer(peft_model, "adamw", lr=1e-2)
    seen = []
    history = train(peft_model, injection_batches, epochs=20, optimizer=optimizer, progress=False,
                    on_epoch_end=seen.append)
    assert seen == list(range(20)) and history[-1] < history[0]
    after = predict(peft_model, tokenizer, FACTS[:12])
    outcome = injection_outcome(after, mastered, injection)
    assert outcome.injection_total == 6 and outcome.mastered_total == 6
    assert outcome.learned == sum(after[item["id"]] for item in injection) > 0
    assert outcome.forgotten == sum(not after[item["id"]] for item in mastered)
    assert "learned" in str(outcome)


def test_jsonl_io_reports_line_numbers(tmp_path):
    path = write_items(tmp_path / "items.jsonl", FACTS)
    assert read_items(path) == FACTS
    path.write_text(json.dumps(FACTS[0]) + "\n{not json}\n")
    with pytest.raises(ValueError, match=r"items\.jsonl, line 2"):
        read_items(path)
    path.write_text(json.dumps({"question": "q", "label": "E"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: .*label"):
        read_items(path)
    with pytest.raises(FileNotFoundError, match="no such question file"):
        read_items(tmp_path / "missing.jsonl")


def test_country_facts_are_generated_offline():
    from peft_cpl.toolkit.data import country_facts

    facts = country_facts(["capital", "currency"])
    assert len(facts) > 400
    assert len({item["id"] for item in facts}) == len(facts)  # countryinfo lists Burma and Myanmar apart, and more
    france = {item["id"]: item for item in facts}["capital:FRA"]
    assert france["answer"] == "Paris" and france["response_prefix"] == "The capital of France is"
    with pytest.raises(ValueError, match="unknown relations"):
        country_facts(["language"])


def test_rotate_options_moves_the_label_with_its_option():
    from peft_cpl.toolkit.data import rotate_options

    item = {"id": "q", "question": "Question: x?\nOptions:\nA: one\nB: two\nC: three\nD: four\n\nReply.", "label": "B"}
    for shift in range(4):
        rotated = rotate_options(item, shift)
        options = [line for line in rotated["question"].splitlines() if line[:2] in ("A:", "B:", "C:", "D:")]
        lines = dict(line.split(": ", 1) for line in options)
        assert lines[rotated["label"]] == "two"
        assert rotated["question"].startswith("Question: x?") and rotated["question"].endswith("Reply.")
    assert rotate_options(item, 0)["question"] == item["question"]
    with pytest.raises(ValueError, match="options A-D"):
        rotate_options({"id": "bad", "question": "A: only one", "label": "A"}, 1)


def test_debiased_split(tokenizer):
    from peft_cpl.toolkit.data import rotate_options
    from peft_cpl.toolkit.evaluation import debiased_split

    known, unknown = FACTS[-2], FACTS[-1]
    training = [rotate_options(known, s) for s in range(4)]
    training += [{**rotate_options(unknown, s), "label": "ABCD"[(s + 1) % 4]} for s in range(4)]  # always wrong
    model = memorised_model(tokenizer, training, steps=200, lr=2e-3)
    mastered, injection = debiased_split(model, tokenizer, [known, unknown])
    assert [item["id"] for item in mastered] == ["m0"]
    assert [item["id"] for item in injection] == ["m1"]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_prefix_cache_gives_the_verdicts_of_whole_forwards(tokenizer, monkeypatch, batch_size):
    """The prompts' common start is run once and its key/value cache reused; verdicts must not change for that."""
    from peft_cpl.toolkit import evaluation

    model = memorised_model(tokenizer, FACTS[:5] + FACTS[-1:], steps=40)
    shared = evaluation.shared_prefix_length([encode(tokenizer, item) for item in FACTS])
    assert shared >= 1  # the template's start is common to every prompt
    monkeypatch.setattr(evaluation, "SHARED_PREFIX_MIN", 1)
    cached = predict(model, tokenizer, FACTS, batch_size=batch_size)
    monkeypatch.setattr(evaluation, "SHARED_PREFIX_MIN", 10**6)
    whole = predict(model, tokenizer, FACTS, batch_size=batch_size)
    assert cached == whole and list(cached) == [item["id"] for item in FACTS]  # same verdicts, items' order
    assert 0 < sum(cached.values()) < len(FACTS)  # some right, some wrong: the comparison can fail
    monkeypatch.setattr(evaluation, "SHARED_PREFIX_MIN", 1)
    model.eval()
    with torch.no_grad():  # the logits themselves are those of one unpadded forward per item
        for _item, example, logits in evaluation.target_logits(model, tokenizer, FACTS, batch_size):
            whole = model(input_ids=torch.tensor([example.input_ids])).logits[0, example.target_start - 1 : -1]
            torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-4)


def test_shared_prefix_stops_before_the_first_target(tokenizer):
    from peft_cpl.toolkit import evaluation

    encoded = [encode(tokenizer, FACTS[0]), encode(tokenizer, FACTS[0])]  # identical items: all tokens shared
    assert evaluation.shared_prefix_length(encoded) == encoded[0].target_start - 1
