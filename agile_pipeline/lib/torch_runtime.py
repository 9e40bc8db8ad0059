"""Torch's process-wide runtime settings: intra-op threads.

Used by the encoders, the trainer and the scan kernels. torch is imported inside the
functions only, so importing this module stays cheap.
"""

import contextlib
from collections.abc import Iterator


def configure_torch_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: usable CPU cores); returns the number."""
    import os

    import torch

    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            n = os.cpu_count() or 1
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op threads set to ``n`` (``None``/0: unchanged), then
    restore the previous setting."""
    import torch

    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(prev)

