"""Render one or more ``results.json`` files as the Markdown table used in BENCHMARKS.md.

    python -m benchmarks.report bench-out/results.json [more.json ...]
"""

import json
import sys
from pathlib import Path
from typing import Any


def _f(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, int | float) and x == x else "–"


NOTE_KEYS = (
    "same_selection_as_baseline", "same_eval_set_as_baseline", "shortlist_proven", "auc_pr",
    "auc_pr_baseline", "auc_pr_seed_mean", "auc_pr_seed_sd", "auc_pr_zero_shot", "recall_at_100",
    "recall_at_100_vs_exact", "build_seconds", "rows_scored", "bf16_scan_seconds", "scan_mode", "scan_seconds",
    "first_round_seconds", "steps", "manifest_seconds", "hash_order_first_seconds", "loadavg_1m",
)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| measurement | n | ours (s) | baseline (s) | ratio | peak RSS ours / baseline (GiB) | notes |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        notes = [f"{key}={r[key]}" for key in NOTE_KEYS if r.get(key) not in (None, [], {})]
        base = r.get("baseline_peak_rss_gib")
        out.append(
            f"| {r['name']} | {r['n']:,} | {_f(r.get('seconds'))} | {_f(r.get('baseline_seconds'))} | "
            f"{_f(r.get('ratio'), '.1f') + '×' if r.get('ratio') else '–'} | "
            f"{_f(r.get('peak_rss_gib'), '.2f')} / {_f(base, '.2f')} | {'; '.join(notes)} |")
    return "\n".join(out)


def main(paths: list[str]) -> None:
    rows: list[dict[str, Any]] = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        sys.stdout.write(f"<!-- {p}: {doc['machine']} -->\n")
        rows += doc["results"]
    sys.stdout.write(table(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
