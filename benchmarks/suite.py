"""The benchmark suite: per corpus size, every measurement beside its baseline.

Order per size (each step reuses what the previous ones built):

1. ``corpus_write`` — the planted corpus in the real layout (reused if already there);
2. ``first_load`` / ``cache_load`` — the per-version split caches, built from LanceDB (in a
   subprocess each, so peak memory is the phase's own) and loaded again;
3. concept setup — concept, zero-shot vector, expansion batch, labels, round 0, AL batch;
4. ``expansion_exact`` (+ ``expansion_cached``), ``al_round``, ``train``, ``eval_set``;
5. ``round_end_to_end`` — label the pending batch, ``runner.run_concept_round`` (Dagster,
   in-process, MLflow), next candidates ready;
6. issue 15 (:mod:`benchmarks.pool`): after ``al_round``, ``embedding_index`` (IVF-PQ build
   and calibration; a metadata-only table version, the split caches stay), ``expansion_ann``,
   ``pool_growth``, ``al_round_pool``; after ``round_end_to_end`` (``AGILE_CANDIDATE_POOL`` as
   set: by default the whole split below 2.5M train rows), ``round_end_to_end_pool`` (the
   pool forced on) and ``pool_quality``.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib import evalset, scan
from agile_pipeline.lib.npy_io import iter_npy_rows
from agile_pipeline.lib.selection import select_for_round
from agile_pipeline.lib.split_cache import clear_split_caches, split_cache
from agile_pipeline.lib.training import training_inputs
from benchmarks import measure, plain, pool, synth

GIB = float(1 << 30)
REFERENCES = [  # the paper's prototype (Table 1), 10M images, desktop CPU
    {"name": "paper_al_round", "n": 10_000_000, "seconds": 58.6,
     "note": "Agile Modeling paper, Table 1: one AL round over 10M images"},
    {"name": "paper_train", "n": 10_000_000, "seconds": 23.1,
     "note": "Agile Modeling paper, Table 1: training a model"},
]


@dataclass
class SuiteConfig:
    sizes: list[int]
    out: Path
    dim: int = 512
    repeats: int = 3
    workdir: Path | None = None
    keep: bool = False
    plain_epochs: int = 10
    random_negatives: int = 500_000
    ann: bool = True
    pool: bool = True
    baseline_round: bool = True
    baseline_round_repeats: int = 2
    rounds_warmup: int = 1
    seed: int = 0
    committed_first_load_max_n: int = 2_000_000
    baseline_round_max_n: int = 2_000_000
    ray: bool = False
    pool_rounds: int = 5
    log: Callable[[str], None] = print
    command: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)


# ---- helpers -----------------------------------------------------------------------------
def _row(name: str, n: int, ours: measure.Measured | None, base: measure.Measured | None = None,
         **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "n": n}
    row["seconds"] = round(ours.median, 4) if ours else None
    row["baseline_seconds"] = round(base.median, 4) if base else None  # null: no baseline
    row["ratio"] = round(base.median / ours.median, 2) if (ours and base and ours.median > 0) else None
    row["peak_rss_gib"] = round(ours.peak_rss / GIB, 3) if ours else None
    row["baseline_peak_rss_gib"] = round(base.peak_rss / GIB, 3) if base else None
    row["peak_anon_gib"] = round(ours.peak_anon / GIB, 3) if ours else None
    row["runs"] = [round(s, 4) for s in ours.seconds] if ours else []
    row["baseline_runs"] = [round(s, 4) for s in base.seconds] if base else []
    row["loadavg_1m"] = round(os.getloadavg()[0], 2)
    row.update(extra)
    return row


def _num(x: Any, spec: str, width: int) -> str:
    return format(x, spec) if isinstance(x, int | float) and x == x else "-".rjust(width)


def _fmt(row: dict[str, Any]) -> str:
    ratio = row.get("ratio")
    rt = f"{ratio:7.1f}x" if ratio else "       -"
    return (f"{row['name']:<22} {row['n']:>11,} {_num(row['seconds'], '9.3f', 9)} "
            f"{_num(row.get('baseline_seconds'), '9.3f', 9)} {rt} "
            f"{_num(row['peak_rss_gib'], '7.2f', 7)}")


HEADER = f"{'name':<22} {'n':>11} {'seconds':>9} {'baseline':>9} {'ratio':>8} {'peakGiB':>7}"


def _save(cfg: SuiteConfig, machine: dict[str, Any]) -> dict[str, Any]:
    doc = {
        "machine": measure.describe(machine),
        "machine_info": machine,
        "command": cfg.command,
        "results": cfg.results,
        "references": REFERENCES,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
    tmp.replace(cfg.out / "results.json")
    return doc


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


@contextmanager
def _env_vars(**values: str) -> Any:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fast_path_installed() -> bool:
    """Whether loop.py/evaluation.py read the split caches (the fast path in BENCHMARKS.md)."""
    import inspect

    from agile_pipeline.lib import evaluation, loop

    return "split_cache" in inspect.getsource(loop) and "split_cache" in inspect.getsource(evaluation)


# ---- first load, in a subprocess ------------------------------------------------------------
def _first_load_child(kind: str, home: str, model_id: str) -> None:
    """Entry point of the first-load subprocess: build the caches, print a JSON line."""
    import lance  # noqa: F401 - imports are not part of the measured load
    import torch  # noqa: F401

    from agile_pipeline import settings
    from agile_pipeline.lib.vectors import VectorStore

    paths = settings.Paths(Path(home))
    vs = VectorStore(paths.lancedb, cache_dir=paths.cache)
    vs.table(model_id)
    with measure.PeakMemory() as mem:
        t0 = time.perf_counter()
        if kind == "committed":
            for split in ("train", "test"):
                plain.matrix_as_committed(vs, model_id, split)
        elif kind == "matrix":
            for split in ("train", "test"):
                vs.matrix(model_id, split)
        else:
            for split in ("train", "test"):
                split_cache(vs, model_id, split)
        seconds = time.perf_counter() - t0
    sys.stdout.write(json.dumps({"seconds": seconds, "rss": mem.rss, "anon": mem.anon}) + "\n")


def _run_first_load(kind: str, home: Path, model_id: str, lance_files: list[str]) -> measure.Measured | None:
    cache = home / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    measure.drop_file_cache(lance_files)
    cmd = [sys.executable, "-c",
           "import sys; from benchmarks.suite import _first_load_child as f; f(*sys.argv[1:])",
           kind, str(home), model_id]
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        return None
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    m = measure.Measured(seconds=[got["seconds"]], peak_rss=got["rss"], peak_anon=got["anon"])
    return m


# ---- concept setup ---------------------------------------------------------------------------
@dataclass
class Bench:
    n: int
    corpus: synth.Corpus
    env: Any
    train: Any
    test: Any
    truth_train: np.ndarray  # bool per train row
    truth_test: np.ndarray  # bool per test row
    spec: str
    agile: Any
    agile_baseline: Any  # the same resources with the split caches off (the straightforward path)


def _release(b: "Bench | None" = None) -> None:
    """Unmap what earlier phases touched, so each phase's peak RSS is its own: memory-mapped
    file pages count in RSS for as long as the mapping lives."""
    import gc


    clear_split_caches()
    if b is not None:
        b.train._f16 = None
        b.test._f16 = None
    gc.collect()


def _truth(cache: Any, positives: np.ndarray) -> np.ndarray:
    t = np.zeros(len(cache), np.bool_)
    p = cache.positions(positives)
    t[p[p >= 0]] = True
    return t


def _label(b: Bench, items: list[dict[str, Any]], purpose: str = "train") -> int:
    from agile_pipeline.lib.state import LabelEvent

    ids = [it["image_id"] for it in items]
    in_train = b.train.positions(ids)
    in_test = b.test.positions(ids)
    events = []
    for it, a, c in zip(items, in_train.tolist(), in_test.tolist(), strict=True):
        pos = bool(b.truth_train[a]) if a >= 0 else bool(b.truth_test[c]) if c >= 0 else False
        events.append(LabelEvent(synth.CONCEPT, it["image_id"], "positive" if pos else "negative",
                                 "owner", purpose=purpose, source=it.get("source", "bench")))
    return b.env.store.add_labels(events)


def write_zero_shot(b: Bench) -> None:
    """The concept's ``zero_shot.npz`` (ids, cosines, text vector) from the split caches —
    what the start job's ``zero_shot`` asset writes, without a 10M-row all-splits matrix."""

    text = b.corpus.geometry.phrase_vectors[synth.CONCEPT]
    ids = np.concatenate([np.char.decode(b.train.keys, "utf-8"), np.char.decode(b.test.keys, "utf-8")])
    scores = np.concatenate([scan.matvec_f16(b.train, text), scan.matvec_f16(b.test, text)])
    out = b.env.concept_dir(synth.CONCEPT) / "zero_shot.npz"
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, ids=ids, scores=scores, text=text)
    tmp.replace(out)


def drop_concept(b: "Bench", name: str) -> None:
    """Remove a concept a kept corpus still holds from an earlier run (labels, batches, rounds,
    its folder), so the run starts from the same state every time."""
    if name in b.env.store.concept_names():
        import sqlite3

        con = sqlite3.connect(b.env.paths.state_db, isolation_level=None)
        for table in ("label_events", "batch_items", "batches", "rounds", "exemplars"):
            try:
                if table == "batch_items":
                    con.execute("DELETE FROM batch_items WHERE batch_id IN (SELECT batch_id FROM "
                                "batches WHERE concept = ?)", (name,))
                else:
                    con.execute(f"DELETE FROM {table} WHERE concept = ?", (name,))
            except sqlite3.OperationalError:
                pass
        con.execute("DELETE FROM concepts WHERE name = ?", (name,))
        con.close()
        shutil.rmtree(b.env.concept_dir(name), ignore_errors=True)


def setup_concept(b: Bench, log: Callable[[str], None]) -> dict[str, float]:
    """Concept + zero-shot + expansion batch (rated) + round 0 + AL batch (rated) + eval labels:
    the state in which the user has just submitted round 1's labels."""
    from agile_pipeline.lib.loop import build_expansion, select_candidates, train_round

    times: dict[str, float] = {}
    store = b.env.store
    drop_concept(b, synth.CONCEPT)
    store.create_concept(synth.CONCEPT, [synth.MODE_PHRASE], [synth.NEG_PHRASE])
    t0 = time.perf_counter()
    write_zero_shot(b)
    times["zero_shot"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    exp = build_expansion(b.env, synth.CONCEPT, synth.PlantedTextEncoder(b.corpus))
    times["expansion"] = time.perf_counter() - t0
    _label(b, exp.items)
    # eval labels: 100 random test images and 20 planted test positives
    rng = np.random.default_rng(7)
    rows = rng.choice(len(b.test), size=min(100, len(b.test)), replace=False)
    pos_rows = np.flatnonzero(b.truth_test)[:20]
    ev = [{"image_id": i, "source": "eval"} for i in b.test.id_at(np.concatenate([rows, pos_rows]))]
    _label(b, ev, purpose="eval")
    t0 = time.perf_counter()
    train_round(b.env, synth.CONCEPT)
    times["round0_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    al = select_candidates(b.env, synth.CONCEPT)
    times["round0_select"] = time.perf_counter() - t0
    _label(b, al.items)
    n_pos = int(sum(b.truth_train[b.train.positions([it["image_id"] for it in exp.items + al.items])]))
    log(f"  setup: expansion {times['expansion']:.1f}s, round 0 {times['round0_train']:.1f}s + "
        f"{times['round0_select']:.1f}s; {len(exp.items) + len(al.items)} labels, {n_pos} positive")
    return times


def _labels(b: Bench) -> tuple[list[str], np.ndarray]:
    from agile_pipeline.lib.loop import training_labels
    from agile_pipeline.lib.state import LabelRule

    cutoff = b.env.store.label_cutoff(synth.CONCEPT)
    return training_labels(b.env, synth.CONCEPT, rule=LabelRule(), upto=cutoff)


def _ap_rows(b: Bench, cap: int = 1_000_000) -> np.ndarray:
    rng = np.random.default_rng(11)
    n = len(b.test)
    return np.sort(rng.choice(n, size=min(cap, n), replace=False)) if n > cap else np.arange(n)


def _auc_pr(truth: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(truth, scores)) if truth.any() else float("nan")


# ---- the measurements ------------------------------------------------------------------------
def bench_expansion(b: Bench, cfg: SuiteConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:

    vs, mid = b.env.vectors, b.corpus.model_id
    qs = list(b.corpus.geometry.phrase_vectors.values())
    k = 100

    def lance_exact() -> list[set[str]]:
        return [{i for i, _s, _d in vs.search(mid, q, k, split="train")} for q in qs]

    def numpy_scan() -> list[set[str]]:
        return [{i for i, _s in plain.numpy_search(vs, mid, q, k)} for q in qs]

    def cached_scan() -> list[set[str]]:
        return [set(x) for x in scale_search(split_cache(vs, mid, "train"), np.stack(qs), k)]

    ours = measure.measure(lance_exact, cfg.repeats)
    base = measure.measure(numpy_scan, cfg.repeats)
    cached = measure.measure(cached_scan, cfg.repeats)
    exact = ours.value
    rec_np = statistics.mean(len(a & e) / k for a, e in zip(base.value, exact, strict=True))
    rec_c = statistics.mean(len(a & e) / k for a, e in zip(cached.value, exact, strict=True))
    per = len(qs)
    for m in (ours, base, cached):
        m.seconds = [s / per for s in m.seconds]
    rows = [
        _row("expansion_exact", b.n, ours, base, unit="seconds per phrase", phrases=per,
             method="LanceDB exact search (prefilter split='train')",
             baseline="float32 NumPy scan of the LanceDB vectors + argpartition",
             baseline_recall_at_100=round(rec_np, 4)),
        _row("expansion_cached", b.n, cached, base, unit="seconds per phrase", phrases=per,
             method="one bfloat16 scan of the train split cache for all phrases + float32 re-rank",
             recall_at_100_vs_exact=round(rec_c, 4)),
    ]
    return rows, {"exact": exact, "lance_exact": ours, "numpy": base, "cached": cached}


def scale_search(cache: Any, queries: np.ndarray, k: int, *, chunk: int = 1 << 16,
                 shortlist: int = 20) -> list[list[str]]:
    """Nearest ``k`` by cosine for several queries in one bfloat16 scan of a split cache, the
    best ``shortlist * k`` per query re-ranked in float32 from the float16 rows."""
    import torch


    q = np.asarray(queries, np.float32)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    dt = scan.scan_compute_dtype()  # bfloat16 only where the CPU multiplies it natively
    qt = torch.from_numpy(q.T.copy()).to(dt)
    keep = shortlist * k
    best_s = [np.empty(0, np.float32) for _ in q]
    best_r = [np.empty(0, np.int64) for _ in q]
    with torch.inference_mode():
        for start, rows in iter_npy_rows(cache.bf16_path, chunk):
            x = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).to(dt)
            s = (x @ qt).float().numpy()  # the cache's bfloat16 rows are unit vectors
            scan.merge_top_columns(best_s, best_r, s, start, keep)
    out = []
    for j in range(q.shape[0]):
        rows_j = np.sort(best_r[j])
        X = cache.rows_f32(rows_j)
        exact = (X @ q[j]) / np.maximum(np.linalg.norm(X, axis=1), 1e-12)
        order = np.lexsort((rows_j, -exact))[:k]
        out.append(cache.id_at(rows_j[order]))
    return out


def _round_selection(b: Bench, model: Any) -> Any:
    """The AL round's selection as the product runs it, split cache loading included."""
    def select() -> Any:
        clear_split_caches()  # include loading the split cache, as a fresh round does
        return select_for_round(b.env.vectors, b.corpus.model_id, model,
                                b.env.store.labeled_image_ids(synth.CONCEPT), 100, "margin")
    return select


def bench_al_round(b: Bench, cfg: SuiteConfig, model: Any) -> dict[str, Any]:

    vs, mid, store = b.env.vectors, b.corpus.model_id, b.env.store
    ours = _round_selection(b, model)

    def base() -> Any:
        return plain.al_round_fp32(vs, mid, model, store.labeled_image_ids(synth.CONCEPT), 100)

    _release(b)
    o = measure.measure(ours, cfg.repeats)
    _release(b)
    bm = measure.measure(base, cfg.repeats)
    _release(b)
    same_set = set(o.value.ids) == set(bm.value[0])
    same_order = list(o.value.ids) == list(bm.value[0])
    t0 = time.perf_counter()
    scan.score_approx(model, b.train)
    scan_s = time.perf_counter() - t0
    return _row("al_round", b.n, o, bm, rows_scored=len(b.train), batch=100,
                method=f"{scan.scan_mode()} scan of the train split cache + exact float32 re-score of a "
                       "proven shortlist + argpartition; labeled ids masked via sorted ids",
                baseline="VectorStore.matrix + float32 predict_proba + per-id Python membership + full argsort",
                same_selection_as_baseline=same_set, same_order_as_baseline=same_order,
                shortlist=o.value.info.get("shortlist"), shortlist_proven=o.value.info.get("shortlist_proven"),
                scan_mode=scan.scan_mode(), scan_seconds=round(scan_s, 4))


def bench_al_round_ray(b: Bench, cfg: SuiteConfig, model: Any) -> dict[str, Any]:
    """The AL round with the scan fanned out as Ray tasks (a local Ray instance started here),
    against the local path in the same run: what the Ray switch costs or gains on one box."""
    from agile_pipeline.lib import distributed

    select = _round_selection(b, model)
    _release(b)
    local = measure.measure(select, cfg.repeats)
    before = os.environ.get(distributed.ENV_ADDRESS)
    os.environ[distributed.ENV_ADDRESS] = "local"
    try:
        ray = distributed.ensure_ray()
        select()  # warm-up: workers start, the module is shipped once
        o = measure.measure(select, cfg.repeats)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        ray.shutdown()
    finally:
        if before is None:
            os.environ.pop(distributed.ENV_ADDRESS, None)
        else:
            os.environ[distributed.ENV_ADDRESS] = before
    _release(b)
    return _row("al_round_ray", b.n, o, local, ray_cpus=cpus, shards=distributed.n_shards(cpus),
                same_selection_as_local=list(o.value.ids) == list(local.value.ids),
                method="AGILE_RAY_ADDRESS=local: the scan as one Ray task per row range, merged, "
                       "then the same exact re-score and selection",
                baseline="the local in-process scan (same run)")


def bench_train(b: Bench, cfg: SuiteConfig) -> tuple[dict[str, Any], Any]:
    from agile_pipeline.lib.training import TrainConfig, train_classifier

    vs, mid = b.env.vectors, b.corpus.model_id
    ids, y = _labels(b)
    tc = TrainConfig(random_negatives=cfg.random_negatives)

    def ours() -> Any:
        X_pool, X_lab, exclude = training_inputs(vs, mid, ids)
        return train_classifier(X_lab, y, X_pool, round_index=1, config=tc, exclude_from_pool=exclude)

    _release(b)
    o = measure.measure(ours, cfg.repeats)
    model = o.value
    ap_rows = _ap_rows(b)
    truth = b.truth_test[ap_rows]
    X_ap = b.test.rows_f32(ap_rows)
    ap_ours = _auc_pr(truth, model.predict_proba(X_ap))
    zs = X_ap @ b.corpus.geometry.phrase_vectors[synth.CONCEPT]
    ap_zero = _auc_pr(truth, zs)
    extra: dict[str, Any] = {
        "labels": len(y), "labels_positive": int(y.sum()), "random_negatives": model.meta.n_random_neg,
        "steps": model.meta.steps_per_epoch * tc.epochs, "auc_pr": round(ap_ours, 4),
        "auc_pr_zero_shot": round(ap_zero, 4), "auc_pr_rows": int(ap_rows.size),
        "auc_pr_positives": int(truth.sum()),
        "method": "train_classifier (paper recipe: 3x128, 500k random negatives, 10 epochs of "
                  "max(30, labels/batch) steps of 64) incl. input gathering",
    }
    base = None
    if cfg.plain_epochs > 0:
        _X_pool, X_lab, exclude = training_inputs(vs, mid, ids)
        del _X_pool

        def plain_run() -> Any:
            pool = np.load(b.train.f16_path, mmap_mode="r")  # its own mapping, unmapped after
            try:
                return plain.plain_train(X_lab, y, pool, exclude, epochs=cfg.plain_epochs,
                                         random_negatives=cfg.random_negatives)
            finally:
                del pool

        _release(b)
        base = measure.measure(plain_run, 1)
        module, info = base.value
        ap_plain = _auc_pr(truth, plain.predict_module(module, X_ap))
        del module
        extra.update(auc_pr_baseline=round(ap_plain, 4), baseline_steps=info["steps"],
                     baseline=f"plain recipe: {cfg.plain_epochs} epochs, each one pass over all "
                              f"{info['random_negatives']:,} random negatives, batch 64 "
                              "(32 pos / 16 neg / 16 random), float32, run once",
                     auc_pr_no_worse_than_baseline=bool(ap_ours >= ap_plain - 1e-9))
    del X_ap
    _release(b)
    return _row("train", b.n, o, base, **extra), model


def bench_train_model_choice(b: Bench, cfg: SuiteConfig, paper_row: dict[str, Any],
                             family: str = "auto") -> tuple[dict[str, Any], Any]:
    """The product's round training (issue 19) with ``AGILE_MODEL_FAMILY=family``: ``auto`` (the
    default: the kernel machine or the MLP by the near-duplicate agreement of the labels) or
    ``cv`` (4-fold cross-validation of the MLP, ridge LR and their ensemble), then the chosen
    family trained on every label."""
    from agile_pipeline.lib.model_choice import choice_for, train_round_model
    from agile_pipeline.lib.training import TrainConfig

    vs, mid = b.env.vectors, b.corpus.model_id
    ids, y = _labels(b)
    tc = TrainConfig(random_negatives=cfg.random_negatives)

    def ours() -> Any:
        X_pool, X_lab, exclude = training_inputs(vs, mid, ids)
        return train_round_model(X_lab, y, X_pool, round_index=1, config=tc, choice=choice_for(family),
                                 exclude_from_pool=exclude)

    _release(b)
    o = measure.measure(ours, cfg.repeats)
    model = o.value
    ap_rows = _ap_rows(b)
    truth = b.truth_test[ap_rows]
    ap = _auc_pr(truth, model.predict_proba(b.test.rows_f32(ap_rows)))
    choice = model.meta.config["model_choice"]
    _release(b)
    how = ("4-fold CV (MLP lr 1e-3, ridge LR, ensemble) on the labels plus 3,000 random train rows, "
           "then the winner" if family == "cv" else
           "the kernel machine or the MLP (lr 1e-3) by the near-duplicate agreement of the labels, then that family")
    row = _row("train_model_choice" + ("" if family == "auto" else f"_{family}"), b.n, o, None, labels=len(y),
               labels_positive=int(y.sum()), family=choice["family"], reason=choice["reason"],
               agreement=choice.get("agreement"), cv_auc_pr=choice["cv_auc_pr"], cv_seconds=choice["seconds"],
               hidden=list(model.meta.hidden), auc_pr=round(ap, 4), auc_pr_paper_recipe=paper_row["auc_pr"],
               method=f"train_round_model, AGILE_MODEL_FAMILY={family}: {how} on every label, incl. input gathering",
               baseline="the paper's recipe: the train row above")
    return row, model


def bench_al_round_model_choice(b: Bench, cfg: SuiteConfig, model: Any) -> dict[str, Any]:
    """The AL round of the ``al_round`` row with the default family's model instead of the
    paper's MLP: the kernel machine has a hidden unit per label, so its scan costs more per row."""
    _release(b)
    o = measure.measure(_round_selection(b, model), cfg.repeats)
    _release(b)
    return _row("al_round_model_choice", b.n, o, None, rows_scored=len(b.train), batch=100,
                family=model.meta.config.get("family"), hidden=list(model.meta.hidden),
                method="as al_round, with the model of the train_model_choice row",
                baseline="al_round (the paper's MLP)")


def bench_eval_set(b: Bench, cfg: SuiteConfig, models: dict[str, Any]) -> dict[str, Any]:
    import copy

    from agile_pipeline import settings
    from agile_pipeline.lib.evalset import stratified_eval_set

    text = b.corpus.geometry.phrase_vectors[synth.CONCEPT]
    zs = evalset.zero_shot_unit_split(b.env.concept_dir(synth.CONCEPT), text, b.train, b.test)
    exact: dict[str, Any] = {"zero-shot": zs}
    approx: dict[str, Any] = {"zero-shot": zs}
    t_exact = t_approx = 0.0
    for name, model in models.items():
        t0 = time.perf_counter()
        exact[name] = model.predict_proba(b.test.f16)
        t_exact += time.perf_counter() - t0
        _release(b)
        t0 = time.perf_counter()
        approx[name] = evalset.approx_split_scores(model, b.test)
        t_approx += time.perf_counter() - t0
    for p in b.test.cache_dir.glob(f"{b.test.tag}.eval*.npy"):
        p.unlink()
    t0 = time.perf_counter()
    evalset.eval_hash_order(b.test, settings.EVAL_KEY)
    first = time.perf_counter() - t0
    fresh: dict[str, Any] = {}

    def reset() -> None:  # each run starts from the unrefined scan scores
        fresh.clear()
        fresh.update({k: copy.copy(v) if isinstance(v, np.ndarray) else
                      evalset.SplitScores(v.values.copy(), v.exact.copy(), v.bound, v.refine)
                      for k, v in approx.items()})

    def ours() -> Any:
        return evalset.stratified_eval_set_cached(b.test, fresh, key=settings.EVAL_KEY)

    test_m = b.env.vectors.matrix(b.corpus.model_id, "test")

    def base() -> Any:
        return stratified_eval_set([str(i) for i in test_m.ids], exact, key=settings.EVAL_KEY)

    _release(b)
    o = measure.measure(ours, cfg.repeats, setup=reset)
    refined = int(sum(int(v.exact.sum() - approx[k].exact.sum()) for k, v in fresh.items()
                      if isinstance(v, evalset.SplitScores)))
    bm = measure.measure(base, cfg.repeats)
    _release(b)
    same = (o.value.keys, o.value.picked_by, o.value.counts) == (bm.value.keys, bm.value.picked_by, bm.value.counts)
    n_models = len(models)
    return _row("eval_set", b.n, o, bm, models=len(exact), test_rows=len(b.test),
                eval_images=len(o.value), same_eval_set_as_baseline=same,
                same_stratum_sizes=o.value.stratum_sizes == bm.value.stratum_sizes,
                rows_refined=refined, hash_order_first_seconds=round(first, 4),
                scoring_seconds_per_model=round(t_approx / n_models, 3),
                baseline_scoring_seconds_per_model=round(t_exact / n_models, 3),
                method=f"stratified_eval_set_cached on {scan.scan_mode()} scan scores, refining only rows that "
                       "could change a pick; SipHash order cached per table version (scoring "
                       "not timed: scoring_seconds_per_model)",
                baseline="stratified_eval_set over a list of the test ids (hashing every id) on "
                         "float32 scores (scoring not timed: baseline_scoring_seconds_per_model)")


def _one_round(b: Bench, *, baseline: bool = False) -> tuple[float, dict[str, Any]]:
    """One round through the named Dagster job; ``baseline``: with the split caches off, the
    code paths as they were before the fast path (matrix + dict index + float32 scans)."""
    from agile_pipeline.defs.concepts import al_candidates, classifier
    from agile_pipeline.lib.loop import pending_items
    from agile_pipeline.runner import metadata_of, run_concept_round

    pending = pending_items(b.env, synth.CONCEPT)
    _label(b, pending)
    t0, wall0 = time.perf_counter(), time.time()
    res = run_concept_round(synth.CONCEPT, agile=b.agile_baseline if baseline else b.agile)
    seconds = time.perf_counter() - t0
    nxt = pending_items(b.env, synth.CONCEPT)
    c, a = metadata_of(res, classifier), metadata_of(res, al_candidates)
    steps, _ends = _step_times(res)
    # the app shows the next batch as soon as al_candidates has committed it (the run then goes
    # on to the eval set and metrics while the rater works): that is when the user stops waiting
    batch = b.env.store.latest_batch(synth.CONCEPT, ("al",))
    ready = float(batch["created_at"]) if batch and float(batch["created_at"]) >= wall0 else None
    info = {"round": c.get("round"), "train_seconds": c.get("train_seconds"),
            "classifier_seconds": c.get("seconds_total"), "select_seconds": a.get("select_seconds"),
            "candidate_pool": bool(a.get("candidate_pool")), "pool_size": a.get("pool_size"),
            "images_scored": a.get("images_scored"), "family": c.get("family"),
            "working_set_misses": {"classifier": c.get("working_set_misses"),
                                   "al_candidates": a.get("working_set_misses")},
            "working_set_written": a.get("working_set_written"),
            "next_candidates": len(nxt), "steps": steps, "run_seconds": round(seconds, 3),
            "candidates_ready_seconds": round(ready - wall0, 3) if ready else None}
    info["timed_seconds"] = ready - wall0 if ready else seconds
    return info["timed_seconds"], info


def _step_times(res: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per Dagster step and each step's end (wall clock), from the run's event log."""
    try:
        import dagster as dg

        inst = dg.DagsterInstance.get()
        starts: dict[str, float] = {}
        out: dict[str, float] = {}
        ends: dict[str, float] = {}
        for e in inst.all_logs(res.run_id):
            de = e.dagster_event
            if de is None or not de.step_key:
                continue
            if de.event_type_value == "STEP_START":
                starts[de.step_key] = e.timestamp
            elif de.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and de.step_key in starts:
                out[de.step_key] = round(e.timestamp - starts[de.step_key], 3)
                if de.event_type_value == "STEP_SUCCESS":
                    ends[de.step_key] = e.timestamp
        return out, ends
    except Exception:  # timing detail only
        return {}, {}


def bench_round(b: Bench, cfg: SuiteConfig) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fast = fast_path_installed()
    # warm-up: imports (mlflow, sklearn), first MLflow writes — reported separately
    _release(b)
    firsts = [_one_round(b) for _ in range(cfg.rounds_warmup)]
    infos: list[dict[str, Any]] = []

    def ours() -> float:
        s, info = _one_round(b)
        infos.append(info)
        return s

    o = measure.measure(ours, cfg.repeats)
    o.seconds = [i["timed_seconds"] for i in infos]  # from submit, not from labelling the batch
    base = None
    base_infos: list[dict[str, Any]] = []
    if cfg.baseline_round and fast and b.n <= cfg.baseline_round_max_n:
        _release(b)
        _one_round(b, baseline=True)  # warm-up: builds VectorStore.matrix caches the old path reads

        def base_fn() -> float:
            s, info = _one_round(b, baseline=True)
            base_infos.append(info)
            return s

        base = measure.measure(base_fn, cfg.baseline_round_repeats)
        base.seconds = [i["timed_seconds"] for i in base_infos]
    rows.append(_row(
        "round_end_to_end", b.n, o, base, fast_path_installed=fast,
        first_round_seconds=[round(s, 3) for s, _ in firsts],
        rounds=[i["round"] for i in infos], next_candidates=[i["next_candidates"] for i in infos],
        steps=infos[len(infos) // 2]["steps"] if infos else {},
        run_seconds=[i["run_seconds"] for i in infos],
        baseline_run_seconds=[i["run_seconds"] for i in base_infos],
        baseline_steps=base_infos[len(base_infos) // 2]["steps"] if base_infos else {},
        method="label the pending AL batch, runner.run_concept_round (Dagster in-process: "
               "classifier + MLflow, al_candidates, eval_set, model_metrics); seconds until "
               "al_candidates has written the next batch (when the app shows it; the run's "
               "eval_set and model_metrics steps go on meanwhile: run_seconds)",
        baseline="the same round with the split caches off (AgileResources(split_caches=False)): "
                 "VectorStore.matrix, dict id index, float32 scans" if base else
                 ("not run: the fast path is not wired into loop.py" if not fast else
                  f"not run above n = {cfg.baseline_round_max_n:,} (minutes per round)"),
    ))
    return rows


# ---- per size --------------------------------------------------------------------------------
def run_size(n: int, cfg: SuiteConfig, machine: dict[str, Any]) -> None:
    from agile_pipeline import settings
    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.lib.loop import LoopEnv
    from agile_pipeline.lib.state import StateStore
    from agile_pipeline.lib.training import TrainConfig, train_classifier
    from agile_pipeline.lib.vectors import VectorStore

    log = cfg.log
    workdir = cfg.workdir or cfg.out / "work"
    home = workdir / f"corpus-{n}-d{cfg.dim}"
    log(f"== n = {n:,} (dim {cfg.dim}) in {home}")
    t0 = time.perf_counter()
    corpus = synth.write_corpus(home, n, cfg.dim, seed=cfg.seed, log=log)
    reused = time.perf_counter() - t0 < corpus.build_seconds * 0.5
    cfg.results.append(_row("corpus_write", n, measure.Measured(seconds=[corpus.build_seconds]),
                            manifest_seconds=round(corpus.manifest_seconds, 2), reused=reused,
                            positives=len(corpus.positives)))
    log(_fmt(cfg.results[-1]))
    paths = settings.Paths(home).ensure()
    vectors = VectorStore(paths.lancedb, cache_dir=paths.cache)
    tbl = vectors.table(corpus.model_id)
    for idx in tbl.list_indices():  # a kept corpus from an earlier run: exact search again
        tbl.drop_index(idx.name)
    lance_files = [str(p) for p in paths.lancedb.rglob("*") if p.is_file()]

    # first load (subprocesses) and cached load
    committed = n <= cfg.committed_first_load_max_n
    base_first = _run_first_load("committed" if committed else "matrix", home, corpus.model_id,
                                 lance_files)
    ours_first = _run_first_load("ours", home, corpus.model_id, lance_files)
    clear_split_caches()
    cfg.results.append(_row(
        "first_load", n, ours_first, base_first,
        method="split_cache(train) + (test): one streaming scan of LanceDB into float16, "
               "bfloat16, sorted-id and norm files",
        baseline=("VectorStore.matrix(train) + (test) as first committed: whole split as "
                  "float32 in memory, then cast" if committed else
                  "VectorStore.matrix(train) + (test), streaming version (the committed one "
                  "needs ~1.5x the split's float32 size in RAM: not run at this size)"),
        page_cache_dropped=True))
    log(_fmt(cfg.results[-1]))

    def load_ours() -> None:
        clear_split_caches()
        split_cache(vectors, corpus.model_id, "train")
        split_cache(vectors, corpus.model_id, "test")

    def load_base() -> None:
        vectors.matrix(corpus.model_id, "train")
        vectors.matrix(corpus.model_id, "test")

    cfg.results.append(_row("cache_load", n, measure.measure(load_ours, cfg.repeats),
                            measure.measure(load_base, cfg.repeats),
                            method="split caches memory-mapped (ids as fixed-width bytes)",
                            baseline="VectorStore.matrix cached (pickled object ids + memmap)"))
    log(_fmt(cfg.results[-1]))

    store = StateStore(paths.state_db)
    env = LoopEnv(store, vectors, corpus.model_id, paths)
    train = split_cache(vectors, corpus.model_id, "train")
    test = split_cache(vectors, corpus.model_id, "test")
    spec = corpus.encoder_spec()
    b = Bench(n, corpus, env, train, test, _truth(train, corpus.positives),
              _truth(test, corpus.positives), spec, AgileResources(home=str(home), encoder=spec),
              AgileResources(home=str(home), encoder=spec, split_caches=False))
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with _env_vars(AGILE_HOME=str(home), AGILE_ENCODER=spec, DAGSTER_HOME=str(dagster_home)):
        setup = setup_concept(b, log)
        rows, exp = bench_expansion(b, cfg)
        for r in rows:
            r["setup_seconds"] = {k: round(v, 2) for k, v in setup.items()}
            cfg.results.append(r)
            log(_fmt(r))
        _save(cfg, machine)
        train_row, model1 = bench_train(b, cfg)
        cfg.results.append(train_row)
        log(_fmt(train_row) + f"   AUC-PR {train_row['auc_pr']} (plain {train_row.get('auc_pr_baseline')}, "
            f"zero-shot {train_row['auc_pr_zero_shot']})")
        chosen = None
        for family in ("auto", "cv"):
            row, model = bench_train_model_choice(b, cfg, train_row, family)
            chosen = chosen or model
            cfg.results.append(row)
            log(_fmt(row) + f"   {row['family']}: AUC-PR {row['auc_pr']} (paper's recipe {train_row['auc_pr']}; "
                f"{'CV ' + str(row['cv_auc_pr']) if row['cv_auc_pr'] else row['reason']})")
        _save(cfg, machine)
        full_scan = bench_al_round(b, cfg, model1)  # the pooled round's baseline: the same model
        cfg.results.append(full_scan)
        log(_fmt(full_scan) + f"   same selection: {full_scan['same_selection_as_baseline']}")
        cfg.results.append(bench_al_round_model_choice(b, cfg, chosen))
        log(_fmt(cfg.results[-1]) + f"   {cfg.results[-1]['family']}, hidden {cfg.results[-1]['hidden']}")
        _save(cfg, machine)
        if cfg.ann:
            cfg.results.append(pool.bench_index(b, cfg, _row))
            log(_fmt(cfg.results[-1]) + f"   recall@100 {cfg.results[-1]['recall_at_100']} "
                f"(nprobes {cfg.results[-1]['nprobes']}, refine {cfg.results[-1]['refine_factor']})")
            cfg.results.append(pool.bench_expansion_ann(b, cfg, _row, exp))
            log(_fmt(cfg.results[-1]) + f"   recall@100 {cfg.results[-1]['recall_at_100']}")
            _save(cfg, machine)
        if cfg.pool:
            cfg.results.append(pool.bench_pool_growth(b, cfg, _row))
            log(_fmt(cfg.results[-1]) + f"   recall {cfg.results[-1]['recall']}")
            cfg.results.append(pool.bench_al_round_pool(b, cfg, _row, model1, full_scan))
            log(_fmt(cfg.results[-1]) + f"   pool {cfg.results[-1]['pool_size']}, overlap with the full "
                f"scan {cfg.results[-1]['overlap_with_full_scan']}/100")
            _save(cfg, machine)
        if cfg.ray:
            cfg.results.append(bench_al_round_ray(b, cfg, model1))
            log(_fmt(cfg.results[-1]) + f"   same selection: {cfg.results[-1]['same_selection_as_local']}")
            _save(cfg, machine)
        ids, y = _labels(b)
        X_pool, X_lab, exclude = training_inputs(vectors, corpus.model_id, ids)
        models = {"round-1": model1}
        for seed in (1, 2, 3):
            models[f"seed-{seed}"] = train_classifier(X_lab, y, X_pool, round_index=1,
                                                      config=TrainConfig(seed=seed), exclude_from_pool=exclude)
        models["round-0"] = train_classifier(X_lab, y, X_pool, round_index=0, exclude_from_pool=exclude)
        ap_rows = _ap_rows(b)
        X_ap = b.test.rows_f32(ap_rows)
        aps = [_auc_pr(b.truth_test[ap_rows], models[k].predict_proba(X_ap))
               for k in ("round-1", "seed-1", "seed-2", "seed-3")]
        train_row["auc_pr_seeds_0_3"] = [round(a, 4) for a in aps]
        train_row["auc_pr_seed_mean"] = round(float(np.mean(aps)), 4)
        train_row["auc_pr_seed_sd"] = round(float(np.std(aps, ddof=1)), 4)
        del X_ap
        _release(b)
        cfg.results.append(bench_eval_set(b, cfg, models))
        log(_fmt(cfg.results[-1]) + f"   same set: {cfg.results[-1]['same_eval_set_as_baseline']}")
        _save(cfg, machine)
        for r in bench_round(b, cfg):
            cfg.results.append(r)
            log(_fmt(r) + f"   steps {r['steps']}")
        _save(cfg, machine)
        if cfg.pool:
            with _env_vars(AGILE_CANDIDATE_POOL="on"):  # the same rounds scoring the pool
                for r in bench_round(b, replace(cfg, baseline_round=False)):
                    r["name"] = "round_end_to_end_pool"
                    cfg.results.append(r)
                    log(_fmt(r) + f"   steps {r['steps']}")
            cfg.results.append(pool.bench_pool_quality(b, cfg, _row, rounds=cfg.pool_rounds))
            log(_fmt(cfg.results[-1]) + f"   AUC-PR pooled {cfg.results[-1]['auc_pr_pooled']} vs full scan "
                f"{cfg.results[-1]['auc_pr_full_scan']}")
            _save(cfg, machine)
    store.close()
    clear_split_caches()
    if not cfg.keep:
        shutil.rmtree(home, ignore_errors=True)


def run_suite(cfg: SuiteConfig) -> dict[str, Any]:
    """Run every size; write ``cfg.out / results.json`` after each step; return the document."""
    import logging

    # absolute paths: DAGSTER_HOME and MLflow's file URIs refuse relative ones
    cfg.out = Path(cfg.out).resolve()
    cfg.workdir = Path(cfg.workdir).resolve() if cfg.workdir else None

    for name in ("lance", "lancedb", "alembic", "mlflow", "dagster"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("LANCE_LOG", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    machine = measure.machine()
    cfg.log(measure.describe(machine))
    if not fast_path_installed():
        cfg.log("note: loop.py/evaluation.py do not read the split caches (see "
                "BENCHMARKS.md); round_end_to_end measures the committed path")
    cfg.log(HEADER)
    for n in cfg.sizes:
        run_size(n, cfg, machine)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = _save(cfg, machine)
    cfg.log("")
    cfg.log(HEADER)
    for r in cfg.results:
        cfg.log(_fmt(r))
    return doc
