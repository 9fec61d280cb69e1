"""What a conformance case is: an op, a name, a level, and a seeded builder of its arguments."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration of one op.

    ``build(gen)`` returns ``(args, kwargs)`` on the CPU from a seeded generator (fresh random data,
    never zeros unless the case is about zeros). ``tags`` name the edges the case covers."""

    op: str
    name: str
    build: Callable[[torch.Generator], tuple[tuple, dict]]
    tags: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"

    def generator(self, seed: int) -> torch.Generator:
        """The case's own generator: the run seed mixed with the case id, so cases are independent."""
        digest = hashlib.sha256(f"{seed}:{self.id}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def materialize(self, seed: int) -> tuple[tuple, dict]:
        return self.build(self.generator(seed))


def randn(g: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)
