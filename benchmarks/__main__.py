"""``python -m benchmarks --sizes 1000000,10000000 --out DIR`` (also ``agile bench``)."""

from benchmarks.cli import main

if __name__ == "__main__":
    main()
