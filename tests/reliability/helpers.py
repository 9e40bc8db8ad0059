"""Shared by the reliability tests: environment for child processes, running the real CLI
(optionally under an OS resource limit), and the figures file RELIABILITY.md quotes."""

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def env_vars(**extra: str) -> dict[str, str]:
    """The test's environment for a child process, with the repository importable."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def record(artifacts_dir: Path, **fields: object) -> None:
    """Append one line of figures to ``test-artifacts/reliability.jsonl``."""
    with (artifacts_dir / "reliability.jsonl").open("a") as fh:
        fh.write(json.dumps({"time": time.time(), **fields}) + "\n")


def file_size_limit(nbytes: int) -> Callable[[], None]:
    """``preexec_fn`` that caps every file the child writes at ``nbytes`` (``RLIMIT_FSIZE``).

    A write past the cap fails with ``EFBIG`` (Python ignores ``SIGXFSZ``), as a write to a
    full disk fails with ``ENOSPC``: a real fault, no root, no tmpfs, works for root too.
    """

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``agile ARGS`` (the real CLI, ``python -m agile_pipeline.cli``) in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "agile_pipeline.cli", *args],
        check=False, capture_output=True, text=True, env=dict(env or env_vars()), preexec_fn=preexec_fn,
        timeout=timeout, cwd=REPO,
    )
