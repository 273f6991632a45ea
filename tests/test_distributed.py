"""Two CPU processes (gloo) give what one process gives on the same global batches: selection, the guard, DDP, the
fused step, FSDP2 and the CLI; ranks given other configs, or left out, fail naming them within a timeout.

One `accelerate launch` (torchrun underneath) runs every case on both ranks (tests/launched_checks.py: start-up is
the cost); the one-process reference runs here (tests/distributed_cases.py has the problem both solve). Float
tolerance: 1e-6 absolute on values, gradients and logits (sums over ranks add in another order than one process
does); supports and signs must be equal exactly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_cpl import cpl_layers
from peft_cpl.toolkit.cli import main as cli
from peft_cpl.toolkit.data import write_items
from peft_cpl.toolkit.memory import estimate_memory, per_rank
from peft_cpl.toolkit.tiny import tiny_llama
from peft_cpl.tuner.adapters import export_support
from peft_cpl.tuner.codec import decode_support, tensor_crc32

from .conftest import FACTS, facts_tokenizer
from .distributed_cases import (
    cli_commands,
    fresh,
    guarded_sgd,
    plain_sgd,
    random_values,
    selected,
    signs,
    step_batch,
    values,
)

TOLERANCE = 1e-6
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_workspace(root: Path) -> None:
    """A tiny model and items: mastered in batches of 2 (3 batches: rank 1 reads one), injection in batches of 3 (the
    last has 1 example: one rank trains on none of it)."""
    tokenizer = facts_tokenizer()
    tiny_llama(seed=0, vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_items(root / "items" / "mastered.jsonl", FACTS[:5])
    write_items(root / "items" / "injection.jsonl", FACTS[5:12])


def reference(folder: Path) -> dict:
    """One process, every batch."""
    model = selected(None)
    exported = export_support(model)
    result = {"supports": {name: s.indices for name, s in exported.supports.items()},
              "selection signs": exported.mastered_signs}
    guarded = fresh(exported)
    guard = guarded_sgd(guarded, guarded, None)
    result["guarded"] = {"values": values(guarded), "signs": signs(guarded), "reverted": guard.reverted}
    model = fresh(exported)
    random_values(model)
    output = model(**step_batch(0, None))
    output.loss.backward()
    result["fsdp"] = {"logits": output.logits.detach(), "grads": {
        name: layer.cpl_values["default"].grad.clone() for name, layer in cpl_layers(model).items()}}
    for param in model.parameters():
        param.grad = None
    plain_sgd(model, None)
    result["fsdp"]["values"] = values(model)
    model.save_pretrained(folder / "one-process-adapter")
    result["cli"] = [cli(command) for command in cli_commands(folder / "cli", "-1")]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    cli_workspace(folder / "cli")
    launched = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), str(HERE / "launched_checks.py"), str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        one = reference(folder)  # meanwhile: the launched ranks spend much of their time starting and waiting
        stdout, stderr = launched.communicate(timeout=240)
    finally:
        launched.kill()
    assert launched.returncode == 0, stderr[-4000:]
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    return ranks, one, folder, stdout


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=TOLERANCE, rtol=0, msg=name)


def assert_same_adapter(got: Path, want: Path) -> None:
    """Equal supports, values within the tolerance; each record's checksum is of the values saved beside it."""
    saved, expected = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert set(saved) == set(expected)
    for key in expected:
        if "cpl_values" in key:
            torch.testing.assert_close(saved[key], expected[key], atol=TOLERANCE, rtol=0, msg=key)
        else:
            record = decode_support(saved[key])
            assert torch.equal(record.support.indices, decode_support(expected[key]).support.indices), key
            assert record.values_crc == tensor_crc32(saved[key.replace("cpl_indices", "cpl_values")]), key


def test_selection_gives_every_rank_the_support_and_signs_of_one_process(runs):
    ranks, one, _, _ = runs
    assert sum(indices.numel() for indices in one["supports"].values()) > 0
    for result in ranks:
        assert set(result["supports"]) == set(one["supports"])
        for name, indices in one["supports"].items():
            assert torch.equal(result["supports"][name], indices), name
            assert torch.equal(result["selection signs"][name], one["selection signs"][name]), name


def test_ddp_fused_and_fsdp2_steps_with_the_guard_equal_one_process(runs):
    ranks, one, _, _ = runs
    for result in ranks:
        for kind in ("ddp", "fused", "fsdp guarded"):
            assert_close(result[kind]["values"], one["guarded"]["values"])
            for name, sign in one["guarded"]["signs"].items():  # refreshed after step 2 over both ranks' M
                assert torch.equal(result[kind]["signs"][name], sign), (kind, name)
        assert result["ddp"]["reverted"] == one["guarded"]["reverted"] > 0
    # under FSDP2 each rank reverts in its own shard: together, what one process reverts
    assert sum(result["fsdp guarded"]["reverted"] for result in ranks) == one["guarded"]["reverted"]


def test_fsdp2_shards_and_trains_like_one_process_and_saves_the_same_adapter(runs):
    ranks, one, folder, _ = runs
    for rank, result in enumerate(ranks):
        fsdp = result["fsdp"]
        assert all(fsdp["layout"].values()), fsdp["layout"]
        torch.testing.assert_close(fsdp["logits"], one["fsdp"]["logits"][2 * rank: 2 * rank + 2], atol=TOLERANCE,
                                   rtol=0)
        assert_close(fsdp["grads"], one["fsdp"]["grads"])
        assert_close(fsdp["values"], one["fsdp"]["values"])
    assert_same_adapter(folder / "fsdp-adapter", folder / "one-process-adapter")


def test_cli_select_and_train_under_accelerate_launch_write_what_one_process_writes(runs):
    ranks, one, folder, stdout = runs
    assert [result["cli"] for result in ranks] == [[0, 0, 0]] * 2 and one["cli"] == [0, 0, 0]
    assert stdout.count("-> adapter in") == 1  # printed by the main process only
    assert "(on 2 processes, the same support on each)" in stdout
    for name in ("adapter", "fused", "plain"):  # selection; training with the guard, fused (default) and not
        assert_same_adapter(folder / "cli" / f"{name}-2", folder / "cli" / f"{name}-1")
    trained = load_file(folder / "cli" / "plain-1" / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in trained.items() if "cpl_values" in key)


def test_ranks_given_other_adapters_configs_or_left_out_fail_naming_them(runs):
    ranks, _, _, _ = runs
    for result in ranks:
        message = result["errors"]["different configs"]
        assert "rank 1 differs from rank 0 in" in message and "density: 0.3 (rank 0: 0.2)" in message
        assert "CollaborativeGuard: the ranks disagree; rank 1 differs from rank 0 in support" in result["errors"][
            "different adapters"]
    message = ranks[0]["errors"]["only some ranks"]
    assert "select_collaborative ran on rank 0 but not on every rank" in message
    assert "Ranks 1 failed to pass monitoredBarrier" in message  # gloo names the ranks that did not come


def test_memory_per_rank_splits_what_fsdp2_shards_and_adds_ddp_buckets(runs):
    ranks, _, _, _ = runs
    model = fresh(export_support(selected(None)))
    one = estimate_memory(model, optimizer="sgd", guard=True)
    fsdp = per_rank(one, 2, "fsdp2", units=2)
    local = [result["fsdp"]["local value bytes"] for result in ranks]  # what fully_shard left on each rank
    assert sum(local) == one.trained_values and max(local) <= fsdp.trained_values + 4 * len(cpl_layers(model))
    assert fsdp.base_weights == -(-one.base_weights // 2) and (fsdp.index, fsdp.guard) == (one.index, one.guard)
    assert per_rank(one, 2, "ddp").temporaries == one.temporaries + one.trained_values  # DDP's fp32 buckets
    assert per_rank(one, 2, "ddp", fused=True) == one

