"""Torch's intra-op thread count for a block of work, restored after it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block at ``threads`` torch threads (None or 0: leave the count as it is) and put
    the previous count back afterwards, also on an exception. The thread count changes the order
    of floating-point sums, so it is part of what makes a run reproducible (docs/cluster.md).

    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
