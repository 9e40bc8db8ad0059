"""One holder at a time across processes: an exclusive ``flock`` on a ``.lock`` file beside a
path. Blocking; the OS releases it when the holder dies (even ``kill -9``)."""

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(path: Path, *, required: bool = True) -> Iterator[None]:
    """Hold the lock of ``path`` (``path`` with the suffix ``.lock``) while the block runs.
    Where the lock file cannot be made (a read-only cache folder) it raises, or, unless
    ``required``, runs the block unlocked."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.with_suffix(".lock").open("a+")
    except OSError:
        if required:
            raise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
