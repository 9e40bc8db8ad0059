"""Torch's process-wide runtime settings: intra-op threads and an importable torchvision.

Used by the encoders, the trainer and the scan kernels. torch is imported inside the
functions only, so importing this module stays cheap.
"""

import contextlib
import importlib.util
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

_TORCHVISION_STUBS: list[Any] = []  # keeps the stub Library alive: schemas die with it
_TORCHVISION_LOCK = threading.Lock()


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work when its compiled ops do not match the installed torch.

    timm and open_clip import torchvision for its pure-Python transforms. The registry's
    torchvision wheel is a CUDA build; next to the CPU build of torch its ``_C`` extension
    cannot load, and torchvision then dies at import on ``register_fake("torchvision::nms")``
    ("operator torchvision::nms does not exist"). When (and only when) that happens we define
    the two missing operator schemas, ``nms`` and ``qnms``, and import again. Everything
    timm/open_clip use works; ``torchvision.ops.nms`` itself would still raise.
    """
    with _TORCHVISION_LOCK:
        if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
            return
        try:
            import torchvision
        except RuntimeError as exc:
            if "torchvision::" not in str(exc):
                raise
            import torch

            for name in [
                m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")
            ]:
                del sys.modules[name]
            lib = torch.library.Library("torchvision", "FRAGMENT")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_STUBS.append(lib)
            import torchvision  # noqa: F401

            # expected with the registry's CPU torch (nothing the product uses is missing), so
            # not a warning a newcomer reads as breakage; visible with --log-level INFO
            logger.info(
                "torchvision's compiled ops do not load with this torch build (%s); defined stub "
                "schemas for torchvision::nms/qnms so its Python parts import "
                "(torchvision.ops.nms is unavailable; timm and open_clip do not use it).",
                exc,
            )


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

