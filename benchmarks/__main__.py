"""``python -m benchmarks --sizes 1000000,10000000 --out DIR`` (same as ``agile bench``)."""

import typer

from agile_pipeline.bench import bench_command

if __name__ == "__main__":
    typer.run(bench_command)
