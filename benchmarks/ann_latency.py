"""ANN query latency and recall@100 on a bench corpus kept with ``agile bench --keep``.

    python -m benchmarks.ann_latency --home /work/bench-work/corpus-10000000-d512

Uses the corpus's existing index (``agile bench`` builds and calibrates it) through
``ann_index.search``, the path expansion, exemplar search and pool growth take: for each
(nprobes, refine) setting, recall@100 against an exact scan of the train split cache and the
milliseconds per query, asked one at a time (as a phrase expansion does) and 50 in one call
(as pool growth does). Two query sets: 50 train rows (what calibration uses) and the planted
phrase directions plus noisy copies of them (text-like queries, off the image manifold).
First, what one LanceDB query costs alone when it returns its candidates' image ids or only
their row ids (what the re-rank reads since issue 15's row-id change).
"""

import argparse
import time
from pathlib import Path

import numpy as np

from agile_pipeline import settings
from agile_pipeline.lib import ann_index
from agile_pipeline.lib.scan import nearest_in_split
from agile_pipeline.lib.split_cache import split_cache
from agile_pipeline.lib.vectors import VectorStore
from benchmarks import synth

SETTINGS = ((20, 20), (20, 30), (30, 30), (40, 20), (40, 40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True, help="a corpus folder under the bench's --workdir")
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args()
    paths = settings.Paths(Path(a.home))
    vs = VectorStore(paths.lancedb, cache_dir=paths.cache)
    mid = synth.model_id_for(a.dim)
    if not ann_index.has_index(vs, mid):
        raise SystemExit(f"{a.home} has no ANN index: run agile bench with --keep (and --ann) first")
    cache = split_cache(vs, mid, "train")
    rng = np.random.default_rng(1)
    phrases = np.stack(list(synth.geometry(a.dim, 0).phrase_vectors.values())).astype(np.float32)
    noisy = phrases[rng.integers(0, len(phrases), 20 - len(phrases))]
    noisy = noisy + 0.3 * rng.standard_normal(noisy.shape).astype(np.float32) / np.sqrt(a.dim)
    queries = {"train rows": cache.rows_f32(np.sort(np.random.default_rng(0).choice(len(cache), 50, replace=False))),
               "phrases": np.concatenate([phrases, noisy])}
    truth = {name: [{i for i, _s in h} for h in nearest_in_split(cache, q, 100)] for name, q in queries.items()}
    print(f"{len(cache):,} train rows; calibrated setting {ann_index.search_settings(vs, mid)}")
    # what a single index query costs in LanceDB alone, with the candidates' image ids or row ids
    tbl = vs.table(mid)
    print("| LanceDB alone, nprobes 20 | candidates | ms with image ids | ms with row ids only |")
    print("|---|---:|---:|---:|")
    for limit in (100, 1000, 3000):
        ms = []
        for ids in (True, False):
            def one(i: int, limit: int = limit, ids: bool = ids) -> None:
                s = (tbl.search(phrases[i % len(phrases)], vector_column_name="vector").distance_type("cosine")
                     .nprobes(20).limit(limit))
                (s.select(["id", "_distance"]) if ids else s.with_row_id(True).select(["_distance"])).to_arrow()
            one(0)
            t0 = time.perf_counter()
            for i in range(10):
                one(i)
            ms.append(100 * (time.perf_counter() - t0))
        print(f"| | {limit:,} | {ms[0]:.1f} | {ms[1]:.1f} |")
    print("| nprobes | refine | queries | recall@100 | ms one at a time | ms per query, 50 in one call |")
    print("|---:|---:|---|---:|---:|---:|")
    for nprobes, refine in SETTINGS:
        how = {"nprobes": nprobes, "refine_factor": refine}
        for name, q in queries.items():
            ann_index.search(vs, mid, q[:2], 100, split="train", settings=how)  # warm the probed lists
            t0 = time.perf_counter()
            got = ann_index.search(vs, mid, q, 100, split="train", settings=how)
            batched = 1000 * (time.perf_counter() - t0) / len(q)
            t0 = time.perf_counter()
            for one in q[:20]:
                ann_index.search(vs, mid, [one], 100, split="train", settings=how)
            single = 1000 * (time.perf_counter() - t0) / 20
            recall = np.mean([len({i for i, _sp, _s in g} & t) / 100 for g, t in zip(got, truth[name], strict=True)])
            print(f"| {nprobes} | {refine} | {name} | {recall:.3f} | {single:.1f} | {batched:.1f} |")


if __name__ == "__main__":
    main()
