"""Which share of a stage's images this process handles: ``--shard i/n`` or torchrun's env.

Inference stages (cams, pseudo, segment) split their id list into ``n`` disjoint strided
shares; every shard writes its share into the one store (see :func:`seco_cli.store.open_writer`).
This is the only place that reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, as set by torchrun).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

from seco_cli.errors import SecoError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1
    local_rank: int | None = None  # torchrun's LOCAL_RANK: the GPU of this process

    def take(self, ids: list[T]) -> list[T]:
        """This shard's ids: every ``count``-th one from ``index`` (disjoint, balanced)."""
        return ids[self.index::self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def label(self) -> str:
        """`` shard i/n`` for progress descriptions; empty for a single shard."""
        return f" shard {self}" if self.count > 1 else ""


def parse_shard(text: str) -> Shard:
    """``"i/n"`` with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise SecoError(f"shard '{text}' is not of the form i/n", "--shard",
                        "write e.g. --shard 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise SecoError(f"shard '{text}' needs 0 <= i < n", "--shard", "write e.g. --shard 0/4")
    return Shard(i, n)


def resolve_shard(text: str | None, env: dict[str, str] | None = None) -> Shard:
    """The ``--shard`` option when given, else torchrun's ``RANK``/``WORLD_SIZE``, else 0/1."""
    env = os.environ if env is None else env
    if text:
        return parse_shard(text)
    if "WORLD_SIZE" in env and "RANK" in env:
        shard = parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")
        local = env.get("LOCAL_RANK")
        return Shard(shard.index, shard.count, int(local) if local is not None else None)
    return Shard()
