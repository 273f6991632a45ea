"""Selection and the guard in more than one process: what is summed over ranks, and what every rank must agree on.

torch.distributed does the work (all_reduce, all_gather_object, monitored_barrier). This module decides what is
reduced and checks what must be equal, so that a rank given another adapter or config, or a selection that some
ranks never call, fails with an error naming the ranks instead of training something else or waiting for ever.
Without an initialised process group of more than one rank every function here is a no-op.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class RanksDisagree(ValueError):
    """Ranks of one job were given, or computed, different things that must be equal."""


def world_size() -> int:
    """Ranks taking part (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _reduce_device(tensor: torch.Tensor) -> torch.device:
    """Where the backend can reduce `tensor`: NCCL only reduces CUDA tensors (a CPU accumulator goes through the
    current GPU, one tensor at a time); gloo reduces CPU tensors (and CUDA ones) where they are."""
    backend = str(dist.get_backend())
    if tensor.device.type == "cpu" and "nccl" in backend and "cpu:gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def sum_over_ranks_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its sum over all ranks (every rank gets the same bits)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        device = _reduce_device(tensor)
        if device == tensor.device:
            dist.all_reduce(tensor)
        else:
            staged = tensor.to(device)
            dist.all_reduce(staged)
            tensor.copy_(staged)


def count_over_ranks(count: int, like: torch.Tensor) -> int:
    """An integer summed over all ranks (`like` says which device the backend reduces on)."""
    if world_size() == 1:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=_reduce_device(like))
    dist.all_reduce(total)
    return int(total.item())


def check_joined(what: str) -> None:
    """Fail, rather than wait for ever, when `what` runs on only some ranks.

    Every rank must reach this point within the process group's timeout (`init_process_group(timeout=...)`,
    accelerate's `InitProcessGroupKwargs(timeout=...)`). With gloo, rank 0 names the ranks that did not come.
    """
    if world_size() == 1:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=_group_timeout(), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as error:  # DistBackendError and gloo's timeouts are RuntimeErrors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RanksDisagree(
            f"{what} ran on rank {rank()} but not on every rank of the {world_size()} within the process group's "
            f"timeout ({first}). Every rank must call {what}, with the same adapter and config, at the same point."
        ) from error


def _group_timeout() -> datetime.timedelta | None:
    """The default group's own timeout (monitored_barrier would otherwise wait torch's default, 30 minutes)."""
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout  # no public getter in torch 2.13
    except (AttributeError, RuntimeError):
        return None


def check_same(what: str, description: dict[str, Any]) -> None:
    """Every rank must pass an equal `description` (a small JSON-able dict); else name the ranks and the keys."""
    if world_size() == 1:
        return
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, description)
    differ = [index for index, other in enumerate(gathered) if other != gathered[0]]
    if not differ:
        return
    lines = []
    for index in differ:
        keys = sorted(key for key in set(gathered[0]) | set(gathered[index])
                      if gathered[0].get(key) != gathered[index].get(key))
        shown = ", ".join(f"{key}: {gathered[index].get(key)!r} (rank 0: {gathered[0].get(key)!r})" for key in keys)
        lines.append(f"rank {index} differs from rank 0 in {shown}")
    raise RanksDisagree(f"{what}: the ranks disagree; " + "; ".join(lines) + ". Give every rank the same adapter "
                        "and config (and, for selection, call it on every rank).")


def canonical(value: Any) -> Any:
    """`value` with sets sorted (their order differs between processes) and what JSON cannot hold as strings."""
    return json.loads(json.dumps(value, sort_keys=True, default=_plain))


def _plain(value: Any) -> Any:
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def fingerprint(value: Any) -> str:
    """A short digest of a JSON-able value (module lists are too long to gather and print whole)."""
    return hashlib.sha256(json.dumps(canonical(value), sort_keys=True).encode()).hexdigest()[:16]


def coordinate_digest(indices: torch.Tensor, chunk: int = 2**24) -> int:
    """An order-free digest of a set of flat coordinates, computed where they are, a chunk at a time (a support can
    have billions); int64 arithmetic wraps."""
    total = 0
    for part in indices.reshape(-1).split(chunk):
        x = part.to(torch.int64)
        total += int(((x * 0x9E3779B1 + 0x7F4A7C15) ^ (x >> 7) ^ (x * 0x632BE5AB >> 11)).sum())
    return total


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter that FSDP2's `fully_shard` sharded)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def shard_start(tensor: torch.Tensor) -> int:
    """Where this rank's shard of a 1-D DTensor starts in the whole tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # no public name in torch 2.13

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return int(offset[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP / DataParallel / DeepSpeed / torch.compile wrapper (what holds `peft_config`)."""
    from accelerate.utils import extract_model_from_parallel

    if not isinstance(model, nn.Module):  # not a model at all: left to the caller's check, which names what it got
        return model
    return extract_model_from_parallel(model, keep_torch_compile=False)
