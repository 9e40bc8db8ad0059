"""Straightforward baselines, measured in the same run as the optimised paths.

Each is what a first implementation would do: float32 everywhere, full scans, full sorts,
Python sets and dicts of ids, epochs that walk every random negative.
"""

import math
import time
from typing import Any

import numpy as np


def numpy_search(vectors: Any, model_id: str, query: np.ndarray, k: int, *, split: str = "train",
                 batch_size: int = 1 << 16) -> list[tuple[str, float]]:
    """Exact nearest ``k`` by cosine: a float32 NumPy scan of the split's vectors streamed from
    the LanceDB table (the same bytes LanceDB's exact search reads), merged with argpartition."""
    ds = vectors.table(model_id).to_lance()
    q = np.asarray(query, np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    best_s = np.empty(0, np.float32)
    best_i: list[str] = []
    for batch in ds.to_batches(columns=["id", "vector"], filter=f"split = '{split}'",
                               batch_size=batch_size):
        if batch.num_rows == 0:
            continue
        col = batch.column("vector")
        dim = col.type.list_size
        V = col.values.to_numpy(zero_copy_only=False)[col.offset * dim:(col.offset + len(col)) * dim]
        V = V.reshape(-1, dim)
        s = (V @ q) / np.maximum(np.linalg.norm(V, axis=1), 1e-12)
        top = np.argpartition(-s, min(k, s.size) - 1)[:k] if s.size > k else np.arange(s.size)
        ids = batch.column("id").take(top).to_pylist()
        best_s = np.concatenate([best_s, s[top]])
        best_i += ids
        if best_s.size > k:
            keep = np.argpartition(-best_s, k - 1)[:k]
            best_s = best_s[keep]
            best_i = [best_i[j] for j in keep.tolist()]
    order = np.argsort(-best_s, kind="stable")
    return [(best_i[j], float(best_s[j])) for j in order.tolist()]


def al_round_fp32(vectors: Any, model_id: str, model: Any, labeled: set[str], k: int) -> tuple[list[str], list[float]]:
    """The AL round as first written: the train matrix (``VectorStore.matrix``), float32
    ``predict_proba`` over all of it, a Python membership test per id, a full argsort."""
    train = vectors.matrix(model_id, "train")
    scores = model.predict_proba(train.vectors)
    eligible = np.fromiter((i not in labeled for i in train.ids), dtype=bool, count=len(train.ids))
    m = np.abs(scores * 2 - 1)
    order = np.argsort(m, kind="stable")
    picked = order[eligible[order]][:k]
    return [str(train.ids[i]) for i in picked], [float(scores[i]) for i in picked]


def plain_train(X_lab: np.ndarray, y: np.ndarray, X_pool: np.ndarray, exclude: np.ndarray, *,
                hidden: tuple[int, ...] = (128, 128, 128), epochs: int = 10, batch_size: int = 64,
                random_negatives: int = 500_000, seed: int = 0,
                max_steps: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The paper's recipe read literally: up to 500k random negatives materialised as float32,
    and an epoch is one pass over all of them, in batches of 64 that are half labeled
    positives (upsampled), a quarter labeled negatives, a quarter random negatives; 10 epochs,
    Adam lr 1e-4, weight decay 1e-4, dropout 0.5, BCE. Returns ``(module, info)``; the module
    takes float32 rows and outputs logits."""
    import torch
    from torch import nn

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_pool = X_pool.shape[0]
    pool = np.setdiff1d(np.arange(n_pool), np.asarray(exclude, np.int64))
    rand_rows = np.sort(rng.choice(pool, size=min(random_negatives, pool.size), replace=False))
    R = np.asarray(X_pool[rand_rows], dtype=np.float32)
    P = np.asarray(X_lab[y == 1], dtype=np.float32)
    N = np.asarray(X_lab[y == 0], dtype=np.float32)
    b_pos, b_neg = batch_size // 2, batch_size // 4
    b_rand = batch_size - b_pos - (b_neg if len(N) else 0)
    if not len(N):
        b_neg = 0
    steps_per_epoch = math.ceil(len(R) / b_rand)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    prev = X_lab.shape[1]
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(0.5)]
        prev = h
    layers.append(nn.Linear(prev, 1))
    module = nn.Sequential(*layers)
    opt = torch.optim.Adam(module.parameters(), lr=1e-4, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    yb = torch.cat([torch.ones(b_pos), torch.zeros(b_neg + b_rand)]).unsqueeze(1)
    Pt, Nt, Rt = torch.from_numpy(P), torch.from_numpy(N), torch.from_numpy(R)
    module.train()
    step = 0
    for _epoch in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(R)))
        for s in range(steps_per_epoch):
            if step >= total:
                break
            r = perm[s * b_rand:(s + 1) * b_rand]
            if len(r) < b_rand:  # last partial batch: wrap around
                r = torch.cat([r, perm[: b_rand - len(r)]])
            parts = [Pt[torch.from_numpy(rng.integers(0, len(P), b_pos))]]
            if b_neg:
                parts.append(Nt[torch.from_numpy(rng.integers(0, len(N), b_neg))])
            parts.append(Rt[r])
            loss = loss_fn(module(torch.cat(parts)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    module.eval()
    return module, {"steps": step, "steps_per_epoch": steps_per_epoch, "random_negatives": len(R),
                    "seconds": time.perf_counter() - t0}


def predict_module(module: Any, X: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Sigmoid of a plain module over float16/float32 rows, float32 math."""
    import torch

    out = np.empty(X.shape[0], np.float32)
    with torch.inference_mode():
        for s in range(0, X.shape[0], chunk):
            x = torch.from_numpy(np.ascontiguousarray(X[s:s + chunk], dtype=np.float32))
            out[s:s + len(x)] = torch.sigmoid(module(x).squeeze(1)).numpy()
    return out


def matrix_as_committed(vectors: Any, model_id: str, split: str | None, dtype: type = np.float16) -> tuple[np.ndarray, np.ndarray]:
    """``VectorStore.matrix`` as first committed, for the first-load baseline: the whole split
    read as one float32 Arrow table, ids to a Python list, cast, saved with pickled ids.
    Peak memory is ~1.5x the split's float32 size (15 GB for 5M x 512)."""
    ds = vectors.table(model_id).to_lance()
    flt = f"split = '{split}'" if split else None
    t = ds.to_table(columns=["id", "vector"], filter=flt)
    ids = np.array(t.column("id").to_pylist(), dtype=object)
    col = t.column("vector").combine_chunks()
    dim = col.type.list_size
    vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(dtype, copy=False)
    if vectors.cache_dir is not None:
        from pathlib import Path

        d = Path(vectors.cache_dir)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"committed-{split}.npy", vecs)
        np.save(d / f"committed-{split}.ids.npy", ids, allow_pickle=True)
    return ids, vecs
