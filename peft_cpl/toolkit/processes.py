"""The CLI under `accelerate launch` (or torchrun): join the process group, share the data, write on one process.

accelerate's `PartialState` starts torch.distributed from the launcher's environment (gloo on CPUs, NCCL on GPUs);
the library then reduces what selection and the guard need (peft_cpl/tuner/distributed.py). Here are only the
application's choices: which rank reads which batches, and that one process writes files and prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.distributed as dist

from ..tuner.distributed import rank, world_size
from .cli_files import CLIError

T = TypeVar("T")


def start() -> None:
    """Join the launcher's process group, if this process was started by one with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # without cpu=True accelerate sees no distributed CPU run


def is_main() -> bool:
    return rank() == 0


def say(*args, **kwargs) -> None:
    """print, on the main process only (the others would repeat it)."""
    if is_main():
        print(*args, **kwargs)


def across() -> str:
    """What to add to a result line when several processes made it (nothing for one)."""
    return f" (on {world_size()} processes, the same support on each)" if world_size() > 1 else ""


def share(batches: Sequence[T]) -> list[T]:
    """This rank's batches (every `world_size()`-th): selection and the guard sum over ranks, so each needs only its
    share, and the sums are those of one process that read them all."""
    return list(batches[rank()::world_size()])


def on_main(action: Callable[[], T]) -> T | None:
    """Run `action` (writing the output) on the main process only; every rank waits for it, and fails if it failed."""
    if world_size() == 1:
        return action()
    result, failure = None, None
    if is_main():
        try:
            result = action()
        except Exception as error:  # told to the other ranks, then raised here as it was
            failure = error
    status = [None if failure is None else str(failure)]
    dist.broadcast_object_list(status, src=0)
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise CLIError(f"the main process failed to write the output: {status[0]}")
    return result
