"""The scale suite's command line: ``python -m benchmarks`` and ``agile bench`` (issue 7).

The suite is a development tool that ships with the source checkout, not with the wheel. It
imports ``agile_pipeline``; ``agile_pipeline`` never imports it: ``agile bench`` and
``agile bench-session`` run ``python -m benchmarks`` / ``python -m benchmarks.session`` from the
checkout in a child process (:mod:`agile_pipeline.bench`), which names itself in
:data:`PROG_ENV` so that usage lines and the recorded command read ``agile bench ...``.
"""

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

PROG_ENV = "AGILE_BENCH_PROG"


def prog_name() -> str:
    """How this run was started: ``agile bench`` (the launcher says so) or ``python -m benchmarks``."""
    return os.environ.get(PROG_ENV) or "python -m benchmarks"


def run_bench(
    sizes: list[int],
    out: Path,
    dim: int = 512,
    repeats: int = 3,
    *,
    workdir: Path | None = None,
    keep: bool = False,
    plain_epochs: int = 10,
    random_negatives: int = 500_000,
    ann: bool = True,
    pool: bool = True,
    baseline_round: bool = True,
    baseline_round_repeats: int = 2,
    committed_first_load_max_n: int = 2_000_000,
    baseline_round_max_n: int = 2_000_000,
    ray: bool = False,
    pool_rounds: int = 5,
    log: Any = None,
    command: str = "",
) -> dict[str, Any]:
    """Run the suite for every corpus size; write ``out/results.json`` and return it.

    ``{"machine": str, "results": [{"name", "n", "seconds", "baseline_seconds",
    "peak_rss_gib", ...}], ...}`` with names ``corpus_write``, ``first_load``, ``cache_load``,
    ``expansion_exact``, ``expansion_cached``, ``train``, ``al_round``, ``eval_set``,
    ``round_end_to_end``, and (issue 15) ``embedding_index``, ``expansion_ann``, ``pool_growth``,
    ``al_round_pool``, ``round_end_to_end_pool``, ``pool_quality``.

    ``workdir`` holds the synthetic corpora (default ``out/work``; a 10M x 512 corpus needs
    about 45 GB); they are deleted after each size unless ``keep``. ``plain_epochs=0`` skips the
    plain-recipe training baseline (minutes: it walks every random negative each epoch).
    """
    from benchmarks import suite

    if not sizes or any(n < 1000 for n in sizes):
        raise ValueError("sizes must be at least 1000 rows each")
    cfg = suite.SuiteConfig(
        sizes=list(sizes), out=Path(out), dim=dim, repeats=repeats,
        workdir=Path(workdir) if workdir else None, keep=keep, plain_epochs=plain_epochs,
        random_negatives=random_negatives, ann=ann, pool=pool, baseline_round=baseline_round,
        baseline_round_repeats=baseline_round_repeats,
        committed_first_load_max_n=committed_first_load_max_n,
        baseline_round_max_n=baseline_round_max_n, ray=ray, pool_rounds=pool_rounds,
        log=log or typer.echo,
        command=command or f"{prog_name()} " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    return suite.run_suite(cfg)


def _sizes(text: str) -> list[int]:
    try:
        return [int(float(s.replace("_", ""))) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"sizes must be comma-separated integers, got {text!r}") from None


def bench_command(
    sizes: Annotated[str, typer.Option(help="Corpus sizes, comma-separated (e.g. 1000000,10000000).")] = "1000000",
    out: Annotated[Path, typer.Option(help="Results folder (results.json is written there).")] = Path("bench-out"),
    dim: Annotated[int, typer.Option(help="Embedding dimension.")] = 512,
    repeats: Annotated[int, typer.Option(help="Runs per measurement (the median is reported).")] = 3,
    workdir: Annotated[Path | None, typer.Option(help="Where the synthetic corpora go (default OUT/work).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the synthetic corpora (reused by the next run).")] = False,
    plain_epochs: Annotated[int, typer.Option(help="Epochs of the plain-recipe training baseline (0: skip it).")] = 10,
    ann: Annotated[bool, typer.Option(help="Build the IVF-PQ embedding index, calibrate it and measure ANN expansion.")] = True,
    pool: Annotated[bool, typer.Option(help="Measure the SEALS candidate pool: growth, pooled AL round, rounds and quality vs the full scan.")] = True,
    baseline_round: Annotated[bool, typer.Option(help="Also time whole rounds on the straightforward path.")] = True,
    baseline_round_max_n: Annotated[int, typer.Option(help="Largest size whose straightforward rounds are timed (they take minutes).")] = 2_000_000,
    ray: Annotated[bool, typer.Option(help="Also time the AL round with its scan on a local Ray instance.")] = False,
    pool_rounds: Annotated[int, typer.Option(help="Rounds of pool_quality (pooled vs full scan from the same labels).")] = 5,
) -> None:
    """Benchmark the loop at scale on synthetic corpora with a planted concept (see BENCHMARKS.md)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    free = _free_gib(workdir or out)
    need = max(_sizes(sizes)) * dim * 9 / 2**30
    if free < need:
        typer.secho(f"warning: {free:.0f} GiB free where the corpora go; the largest size needs "
                    f"about {need:.0f} GiB", fg=typer.colors.YELLOW, err=True)
    doc = run_bench(_sizes(sizes), out, dim, repeats, workdir=workdir, keep=keep,
                    plain_epochs=plain_epochs, ann=ann, pool=pool, baseline_round=baseline_round,
                    baseline_round_max_n=baseline_round_max_n, ray=ray, pool_rounds=pool_rounds)
    typer.echo(f"wrote {Path(out) / 'results.json'} ({len(doc['results'])} rows)")


def _free_gib(path: Path) -> float:
    import shutil

    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / 2**30


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m benchmarks`` (and, through the launcher, ``agile bench``)."""
    app = typer.Typer(add_completion=False)
    app.command()(bench_command)
    app(args=argv, prog_name=prog_name())
