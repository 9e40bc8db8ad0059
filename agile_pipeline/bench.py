"""``agile bench`` and ``agile bench-session``: the source checkout's benchmarks, launched.

The benchmarks live in the ``benchmarks`` package next to ``agile_pipeline`` in a source
checkout (a development tool, not installed with the wheel). They import ``agile_pipeline``;
``agile_pipeline`` never imports them. These commands run ``python -m benchmarks`` /
``python -m benchmarks.session`` from the checkout in a child process with the same Python,
the checkout on its ``PYTHONPATH`` and the command's own name in ``AGILE_BENCH_PROG`` (its usage
lines and the command it records then read ``agile bench ...``).
"""

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PROG_ENV = "AGILE_BENCH_PROG"  # read by benchmarks.cli.prog_name


def checkout_root() -> Path:
    """The source checkout holding ``benchmarks/`` next to this package.

    Raises ``ImportError`` with what to do when there is none (an installed wheel).
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__init__.py").exists():
        raise ImportError(
            "the benchmark suite ships with the source checkout (benchmarks/ next to "
            "agile_pipeline/); run `agile bench` from a clone of the repository"
        )
    return root


def run_benchmark(module: str, args: Sequence[str], *, prog: str) -> int:
    """Run ``python -m module args`` from the checkout; its exit status.

    The child shares the terminal: a Ctrl-C reaches it directly and it decides how to stop
    (the suite deletes its synthetic corpora on the way out); this process waits for it.
    """
    root = checkout_root()
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(root) + (os.pathsep + path if path else ""),
           PROG_ENV: prog}
    # -P: not the current folder first on the path (a `benchmarks` folder there is not ours)
    proc = subprocess.Popen([sys.executable, "-P", "-m", module, *args], env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue
