"""Timing, peak memory and machine description for the suite."""

import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

GIB = float(1 << 30)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 10 ms).

    ``rss``: resident set size (psutil), including file pages the process has mapped (memory
    maps count once touched); ``anon``: the anonymous part (``RssAnon``), i.e. what the
    process itself allocated. Both in bytes.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.rss = 0
        self.anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            rss = self.proc.memory_info().rss
            anon = _status_kib("RssAnon") * 1024
        except (OSError, psutil.Error):
            return
        self.rss = max(self.rss, rss)
        self.anon = max(self.anon, anon)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


@dataclass
class Measured:
    """Runs of one measured callable: seconds per run, peak memory over all runs, last value."""

    seconds: list[float] = field(default_factory=list)
    peak_rss: int = 0
    peak_anon: int = 0
    value: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def measure(fn: Callable[[], Any], repeats: int, *, setup: Callable[[], Any] | None = None) -> Measured:
    """Call ``fn`` ``repeats`` times (``setup`` before each, untimed); median via ``.median``."""
    out = Measured()
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out.value = fn()
            out.seconds.append(time.perf_counter() - t0)
        out.peak_rss = max(out.peak_rss, mem.rss)
        out.peak_anon = max(out.peak_anon, mem.anon)
    return out


def drop_file_cache(paths: list[str]) -> bool:
    """Ask the kernel to evict these files from the page cache (``posix_fadvise DONTNEED``);
    returns False where unsupported. Used to measure first loads honestly."""
    ok = True
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            ok = False
        finally:
            os.close(fd)
    return ok


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "avx512_fp16")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`SIMD_FLAGS` it has (``/proc/cpuinfo``): the
    int8 and bfloat16 kernels, hence many timings, depend on them."""
    model = platform.processor() or "unknown CPU"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "unknown CPU", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in SIMD_FLAGS if x in have]
                    break
    except OSError:
        pass
    return model, flags


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load: what the numbers were measured on."""
    model, flags = cpu_model_and_flags()
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        nproc = os.cpu_count() or 0
    try:
        free_g = subprocess.run(["free", "-g"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        free_g = ""
    vm = psutil.virtual_memory()
    import torch

    return {
        "cpu": model,
        "nproc": nproc,
        "cpu_flags": flags,
        "mem_total_gib": round(vm.total / GIB, 1),
        "free_g": free_g.strip(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def describe(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['nproc']} cores ({' '.join(m['cpu_flags'])}), "
            f"{m['mem_total_gib']} GiB RAM, load {m['loadavg'][0]:.2f} at start, torch {m['torch']}")
