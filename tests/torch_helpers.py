"""torch settings a test module needs, put back afterwards.

Why a module of its own: many test modules set torch's intra-op thread count, and what one leaves set
changes the next one's floating-point results (CMMDL's odd-size golden case moves past its tolerance
at one thread), so a module that depends on the count sets it through here and restores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, the previous count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
