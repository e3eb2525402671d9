"""Several processes, one device each: ``torchrun --nproc-per-node N -m pure.infer --input FOLDER ...``.

torchrun starts N copies of the command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Every rank
lists the same jobs (sorted inputs and their outputs, before anything is written) and takes every N-th one
(:meth:`Ranks.shard`), on ``cuda:LOCAL_RANK`` when CUDA is there; each image is restored with the same seed
and settings as in one process, so the files are the same ones. The ranks only talk to add up their counts
and failures at the end (:meth:`Ranks.sum`, :meth:`Ranks.gather`: gloo, whatever the device, since nothing
but a few Python objects travels), so that rank 0 prints the one summary and every rank exits alike.
Without torchrun (``WORLD_SIZE`` unset or 1) nothing here starts a process group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

T = TypeVar("T")
# A rank that finishes first waits in the final gather for the slowest one's last images (a big tiled image
# can take hours), so the collectives' timeout is long; a rank that fails makes torchrun stop the others.
WAIT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ones torchrun started (``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """From torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (a single process when unset)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise ValueError(
                f"RANK, WORLD_SIZE and LOCAL_RANK (set by torchrun) must be integers: {err}"
            ) from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE); got RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th one from ``rank`` (the same split on every rank)."""
        return list(items[self.rank :: self.world])

    def device(self, requested: str | None) -> str | None:
        """The device of this rank: ``cuda:LOCAL_RANK`` when ``requested`` is None or ``"cuda"`` and CUDA is
        there with several ranks; otherwise ``requested`` as given (``cpu``, an explicit ``cuda:K``)."""
        if self.world == 1 or not torch.cuda.is_available() or requested not in (None, "cuda"):
            return requested
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (``[value]`` in a single process)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=WAIT)
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def sum(self, value: int) -> int:
        """``value`` added up over the ranks."""
        return sum(self.gather(value))


def finish() -> None:
    """Leave the process group, if one was started (end of a torchrun command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
