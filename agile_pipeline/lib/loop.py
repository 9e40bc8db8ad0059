"""The concept loop without Dagster: expansion, a training round, candidate selection.

Dagster assets, the CLI, the simulated user and the benchmarks all call these functions, so
the product's behaviour is the same whichever way a round is started.
"""

import fcntl
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agile_pipeline import settings
from agile_pipeline.lib.selection import sample_expansion
from agile_pipeline.lib.split_cache import has_cache, split_cache
from agile_pipeline.lib.state import Concept, LabelRule, StateStore, concept_dir
from agile_pipeline.lib.vectors import VectorStore
from agile_pipeline.lib.working_set import RowSource, concept_rows

log = logging.getLogger(__name__)

Strategy = Literal["margin", "margin-positive", "cluster-margin"]


class LoopError(ValueError):
    """A user-facing problem with a concept's state; the message says what to do."""


@dataclass
class LoopEnv:
    """What the loop needs: state, vectors, the embedding model id and the data paths."""

    store: StateStore
    vectors: VectorStore
    model_id: str
    paths: settings.Paths
    encoder_spec: str = ""  # how to embed new images for ``model_id`` (empty: the default)

    def concept_dir(self, concept: str) -> Path:
        """The concept's folder (created): :func:`agile_pipeline.lib.state.concept_dir`, keyed
        collision-free by :func:`~agile_pipeline.lib.state.concept_storage_key`, an old-style
        folder migrated there."""
        return concept_dir(self.store, self.paths.home, concept)


@contextmanager
def concept_lock(env: LoopEnv, concept: str, what: str) -> Iterator[None]:
    """One training/selection at a time per concept, across processes.

    A second request fails at once with a clear message instead of racing the first; the OS
    releases the lock if the holder dies (even ``kill -9``), so no manual repair is needed.
    """
    path = env.concept_dir(concept) / ".round.lock"
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoopError(
                f"a round for {concept!r} is already running ({what}); wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class RoundResult:
    concept: str
    round_index: int
    label_cutoff: int
    n_pos: int
    n_neg: int
    model_dir: Path
    train_seconds: float
    reused: bool = False
    warnings: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    model_version: str | None = None
    family: str = "mlp"
    model_choice: dict[str, Any] = field(default_factory=dict)
    working_set: dict[str, int] = field(default_factory=dict)  # rows read from it / not (pooled)
    graph_positives: int = 0  # unrated images a kernel round also trained on as positives


@dataclass
class CandidateBatch:
    concept: str
    kind: str
    round_index: int
    batch_id: int
    items: list[dict[str, Any]]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


# ---- expansion ---------------------------------------------------------------------------
def phrase_vectors(encoder: Any, concept: Concept) -> tuple[list[tuple[str, str]], np.ndarray]:
    phrases = concept.phrases
    vecs = encoder.embed_texts([p for _, p in phrases])
    return phrases, np.asarray(vecs, dtype=np.float32)


def build_expansion(
    env: LoopEnv,
    concept_name: str,
    encoder: Any,
    *,
    per_phrase: int = settings.EXPANSION_PER_PHRASE,
    sample: int = settings.EXPANSION_SAMPLE,
    seed: int = 0,
    run_id: str | None = None,
    recovery: bool = False,
) -> CandidateBatch:
    """Nearest ``per_phrase`` unlabeled train images for every phrase and exemplar image;
    sample ``sample`` of their union.

    Already-labelled images are skipped, so a second call reaches the *next* nearest images.
    ``recovery=True`` (used when the labels hold no positive yet) takes
    ``settings.RECOVERY_RANDOM_SHARE`` of the batch uniformly from the unlabeled train images
    and the rest round-robin across the queries, so every phrase and exemplar gets an equal
    share.
    """
    t0 = time.perf_counter()
    concept = env.store.get_concept(concept_name)
    phrases, vecs = phrase_vectors(encoder, concept)
    queries = [(f"{pol}:{text}", v) for (pol, text), v in zip(phrases, vecs, strict=True)]
    exemplars = env.store.exemplars(concept.name)
    if exemplars:
        ex_vecs = env.vectors.vectors_for(env.model_id, [e["image_id"] for e in exemplars])
        queries += [(f"{e['polarity']}:exemplar {e['image_id'][:8]}", v)
                    for e, v in zip(exemplars, ex_vecs, strict=True)]
    cutoff = env.store.label_cutoff(concept.name)  # first: every label up to it is skipped below
    labeled = env.store.labeled_image_ids(concept.name)
    found: dict[str, list[str]] = {}
    for (key, _v), hits in zip(queries, nearest_train(env, [v for _k, v in queries],
                                                       per_phrase + len(labeled)), strict=True):
        found[key] = [i for i in hits if i not in labeled][:per_phrase]
    if recovery:  # diversity: a share at random, the rest round-robin across the queries
        n_random = round(sample * settings.RECOVERY_RANDOM_SHARE)
        picked = _round_robin(found, sample - n_random, seed)
        taken = labeled | {i for i, _ in picked}
        picked += [(i, "random:random unlabeled image")
                   for i in _random_unlabeled(env, n_random, taken, seed)]
    else:
        picked = sample_expansion(found, sample, seed)
    items = [
        {"image_id": image_id, "source": "recovery" if recovery else "expansion",
         "detail": key.split(":", 1)[1], "polarity": key.split(":", 1)[0]}
        for image_id, key in picked
    ]
    info = {
        "phrases": [f"{p}: {t}" for p, t in phrases],
        "found_per_phrase": {k: len(v) for k, v in found.items()},
        "union": len({i for v in found.values() for i in v}),
        "seed": seed,
        "recovery": recovery,
    }
    round_index = len(env.store.rounds(concept.name))  # the round these labels will train
    batch_id = env.store.write_batch(
        concept.name, "expansion", round_index, items, label_cutoff=cutoff, run_id=run_id, info=info
    )
    if pooled(env):  # the phrases' and exemplars' neighbours are the pool's first members
        from agile_pipeline.lib import candidate_pool

        path = candidate_pool.pool_path(env.concept_dir(concept.name), env.model_id)
        with candidate_pool.locked(path):
            pool = candidate_pool.load(path)
            pool.add([f"query:{k}" for k in found], [v[: pool.k] for v in found.values()])
            candidate_pool.save(path, pool)
    return CandidateBatch(concept.name, "expansion", round_index, batch_id, items,
                          time.perf_counter() - t0, info)


def nearest_train(env: LoopEnv, queries: list[np.ndarray] | np.ndarray, k: int) -> list[list[str]]:
    """The ``k`` nearest train images of every query (ids, best first), in one call: through
    the table's ANN index where it has one (large corpora, :mod:`.ann_index`), else one exact
    pass over the warm split cache, else LanceDB's exact search."""
    from agile_pipeline.lib import ann_index
    from agile_pipeline.lib.scan import EXACT_SEARCH_MAX_ROWS, nearest_in_split

    if len(queries) == 0:
        return []
    q = np.stack(list(queries)).astype(np.float32)
    indexed = ann_index.has_index(env.vectors, env.model_id)
    if not indexed and has_cache(env.vectors):
        cache = split_cache(env.vectors, env.model_id, "train")
        if len(cache) <= EXACT_SEARCH_MAX_ROWS:
            return [[i for i, _s in h] for h in nearest_in_split(cache, q, k)]
    from agile_pipeline.lib import distributed

    if distributed.enabled() and indexed:
        hits = ann_index.search_ray(env.vectors, env.model_id, q, k, split="train")
    else:
        hits = ann_index.search(env.vectors, env.model_id, q, k, split="train")
    return [[i for i, _sp, _s in h] for h in hits]


def _random_unlabeled(env: LoopEnv, n: int, exclude: set[str], seed: int) -> list[str]:
    """``n`` train images drawn uniformly (seeded), none of ``exclude``."""
    if n <= 0:
        return []
    if has_cache(env.vectors):
        cache = split_cache(env.vectors, env.model_id, "train")
        total, id_at = len(cache), cache.id_at
    else:
        m = env.vectors.matrix(env.model_id, "train")
        total, id_at = len(m.ids), (lambda rows: [str(m.ids[r]) for r in rows])
    rng = np.random.default_rng(seed)
    draw = rng.choice(total, size=min(total, 2 * n + len(exclude)), replace=False)
    return [i for i in id_at(np.sort(draw)) if i not in exclude][:n]


def _round_robin(found: dict[str, list[str]], n: int, seed: int) -> list[tuple[str, str]]:
    """Diversity across queries: take each query's next-nearest image in turn (seeded order)."""
    import random

    keys = list(found)
    random.Random(seed).shuffle(keys)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    depth = 0
    while len(out) < n and any(depth < len(found[k]) for k in keys):
        for k in keys:
            if depth < len(found[k]) and found[k][depth] not in seen and len(out) < n:
                seen.add(found[k][depth])
                out.append((found[k][depth], k))
        depth += 1
    return out


def label_counts(env: LoopEnv, concept: str, rule: LabelRule = LabelRule()) -> tuple[int, int]:
    labels = env.store.effective_labels(concept, purpose="train", rule=rule)
    pos = sum(labels.values())
    return pos, len(labels) - pos


# the MLP's random negatives a working set holds: its random slots with the defaults (10 epochs
# of at least 30 steps of 16 random rows) and room to spare
PREFETCH_MLP_RANDOM = 8_000

NO_POSITIVES_ADVICE = (
    "no positive labels yet for {name!r} ({neg} negative): queued a recovery batch — the next "
    "nearest images of every phrase and exemplar, balanced across them. To get there faster, "
    "add phrases (`agile concept edit`), mark an image you like as an exemplar "
    "(`agile concept exemplar {name!r} IMAGE`) or upload one (`agile concept exemplar {name!r} "
    "--file PHOTO.jpg`)"
)


# ---- the round policy --------------------------------------------------------------------
RoundAction = Literal["train", "reuse", "recovery", "refuse"]


@dataclass(frozen=True)
class RoundFacts:
    """What a round depends on, read from the state store in one place (:func:`round_facts`)."""

    concept: str
    n_pos: int
    n_neg: int
    label_cutoff: int
    last_round: int | None  # index of the latest trained round
    last_round_cutoff: int | None  # the label cutoff it was trained on
    latest_batch_kind: str | None  # "expansion" or "al"
    latest_batch_cutoff: int | None


@dataclass(frozen=True)
class RoundPlan:
    """What a round would do now: ``train`` a model (``round_index``), ``reuse`` the last one
    (nothing rated since), queue a ``recovery`` batch (no positive yet), or ``refuse`` (a
    rater's request that cannot help); ``reason`` says why, in words for the user."""

    action: RoundAction
    reason: str
    round_index: int | None = None


def plan_round(facts: RoundFacts, *, force: bool = False, rater_request: bool = False) -> RoundPlan:
    """The one answer to "what would a round do now?" — the app, the ``classifier`` and
    ``al_candidates`` assets, training itself and ``agile round --dry-run`` all ask it.

    * no positive label: the pipeline queues a recovery batch (the next-nearest images of every
      phrase and exemplar); a rater's own request is refused instead — a model needs one
      example of the concept, and the advice says how to find one;
    * nothing rated since the last round: the pipeline keeps that model (``reuse``; ``force``
      retrains the same round); a rater's request is refused while an AL batch selected by that
      model waits to be rated;
    * otherwise: train round ``last + 1`` (the first is 0).
    """
    f = facts
    if f.n_pos == 0:
        if rater_request:
            return RoundPlan("refuse", (
                f"no image is rated positive yet for {f.concept!r} ({f.n_neg} negative): "
                "the model needs at least one example of the concept. Rate more images, or add "
                "phrases that describe it on the Concept tab and find images again"))
        return RoundPlan("recovery", NO_POSITIVES_ADVICE.format(name=f.concept, neg=f.n_neg))
    unchanged = f.last_round is not None and f.last_round_cutoff == f.label_cutoff
    if unchanged and rater_request and f.latest_batch_kind == "al" and (
            f.latest_batch_cutoff is not None and f.last_round_cutoff is not None
            and f.latest_batch_cutoff >= f.last_round_cutoff):
        return RoundPlan("refuse", (
            f"nothing new was rated since round {f.last_round}: rate the current batch first "
            "(its images are the ones the model is least sure about)"), f.last_round)
    if unchanged and not force:
        return RoundPlan("reuse", f"no new labels since round {f.last_round}: kept that model "
                                  "(use --force to retrain)", f.last_round)
    if unchanged:
        return RoundPlan("train", f"retraining round {f.last_round} on the same labels (forced)",
                         f.last_round)
    nxt = 0 if f.last_round is None else f.last_round + 1
    return RoundPlan("train", f"training round {nxt} on {f.n_pos} positive / {f.n_neg} negative "
                              "labels", nxt)


def round_facts(store: StateStore, concept: str, rule: LabelRule = LabelRule(), *,
                upto: int | None = None) -> RoundFacts:
    """The :class:`RoundFacts` of a concept now (or up to label event ``upto``)."""
    c = store.get_concept(concept)
    cutoff = store.label_cutoff(c.name) if upto is None else upto
    labels = store.effective_labels(c.name, purpose="train", rule=rule, upto=cutoff)
    rounds = store.rounds(c.name)
    latest = store.latest_batch(c.name)
    pos = sum(labels.values())
    return RoundFacts(
        c.name, pos, len(labels) - pos, cutoff,
        int(rounds[-1]["round"]) if rounds else None,
        int(rounds[-1]["label_cutoff"]) if rounds else None,
        latest["kind"] if latest else None,
        int(latest["label_cutoff"]) if latest and latest["label_cutoff"] is not None else None,
    )


# ---- zero-shot ---------------------------------------------------------------------------
def zero_shot(env: LoopEnv, concept_name: str, encoder: Any, *, save: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every image (all splits) with the concept-name text vector: (ids, scores)."""
    concept = env.store.get_concept(concept_name)
    text = np.asarray(encoder.embed_texts([concept.phrases[0][1]])[0], dtype=np.float32)
    from agile_pipeline.lib.scan import matvec_f16

    if has_cache(env.vectors):  # the warm split caches: no second copy of the table
        parts = [split_cache(env.vectors, env.model_id, sp) for sp in ("train", "test")]
        ids = np.concatenate([np.char.decode(np.asarray(c.keys), "utf-8") for c in parts])
        scores = np.concatenate([matvec_f16(c, text) for c in parts])
    else:
        m = env.vectors.matrix(env.model_id, None)
        ids, scores = m.ids, _matvec(m.vectors, text)
    if save:
        out = env.concept_dir(concept.name) / "zero_shot.npz"
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids.astype(str), scores=scores, text=text)
        tmp.replace(out)
    return ids, scores


def load_zero_shot(env: LoopEnv, concept_name: str) -> tuple[np.ndarray, np.ndarray] | None:
    path = env.concept_dir(concept_name) / "zero_shot.npz"
    if not path.exists():
        return None
    z = np.load(path, allow_pickle=False)
    return z["ids"], z["scores"]


def _matvec(X: np.ndarray, v: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    out = np.empty(X.shape[0], dtype=np.float32)
    for s in range(0, X.shape[0], chunk):
        out[s : s + chunk] = np.asarray(X[s : s + chunk], dtype=np.float32) @ v
    return out


# ---- training ----------------------------------------------------------------------------
def training_labels(env: LoopEnv, concept: str, *, rule: LabelRule, upto: int) -> tuple[list[str], np.ndarray]:
    labels = env.store.effective_labels(concept, purpose="train", rule=rule, upto=upto)
    ids = sorted(labels)
    return ids, np.array([labels[i] for i in ids], dtype=np.int64)


def train_round(
    env: LoopEnv,
    concept_name: str,
    *,
    config: Any = None,
    rule: LabelRule = LabelRule(),
    force: bool = False,
    tracking: bool = True,
    run_id: str | None = None,
    lookahead: bool = False,
    choice: Any = None,
) -> RoundResult:
    """Train the next model on every train label so far; log it to MLflow.

    ``choice`` (a :class:`~agile_pipeline.lib.model_choice.ModelChoiceConfig`; default: the
    ``AGILE_MODEL_FAMILY`` setting) says which family the round trains or cross-validates.

    ``tracking=False`` leaves the MLflow run and model version to :func:`register_round`
    (the round job does that after the next batch is committed). ``lookahead`` marks a round
    started while the rater still had a few images of the batch left; such a round trains the
    family the concept's last cross-validation chose instead of cross-validating again
    (:func:`~agile_pipeline.lib.model_choice.reuse_choice`), as the rater may be waiting for it.

    A round is keyed by its label cutoff (the last label event it saw). If nothing was rated
    since the last round, the last round is returned (``reused=True``) unless ``force``, which
    retrains that same round (same labels, same seed: the same model).
    """
    concept = env.store.get_concept(concept_name)
    with concept_lock(env, concept.name, "training"):
        return _train_round(env, concept.name, config=config, rule=rule, force=force,
                            tracking=tracking, run_id=run_id, lookahead=lookahead, choice=choice)


def _train_round(
    env: LoopEnv,
    concept_name: str,
    *,
    config: Any,
    rule: LabelRule,
    force: bool,
    tracking: bool,
    run_id: str | None,
    lookahead: bool = False,
    choice: Any = None,
) -> RoundResult:
    from agile_pipeline.lib.model_choice import (
        choice_for,
        family_of,
        reuse_choice,
        train_round_model,
    )
    from agile_pipeline.lib.training import NotEnoughLabels, TrainConfig

    config = config or TrainConfig()
    choice = choice or choice_for(settings.model_family(), seed=config.seed)
    store = env.store
    concept = store.get_concept(concept_name)
    if lookahead:  # the rater may be waiting: the last cross-validated family, no CV now
        done = [(r.get("info") or {}).get("model_choice") for r in store.rounds(concept.name)]
        choice = reuse_choice(choice, next((c for c in reversed(done) if c and c.get("folds")), None))
    facts = round_facts(store, concept.name, rule)
    cutoff = facts.label_cutoff
    plan = plan_round(facts, force=force)
    if plan.action == "reuse":
        last = store.rounds(concept.name)[-1]
        return RoundResult(
            concept.name, last["round"], cutoff, last["n_pos"], last["n_neg"],
            Path(last["model_uri"]), last["train_seconds"] or 0.0, reused=True,
            mlflow_run_id=last["mlflow_run_id"], model_version=last["model_version"],
            family=str((last.get("info") or {}).get("family", "mlp")),
            model_choice=dict((last.get("info") or {}).get("model_choice") or {}),
            graph_positives=int((last.get("info") or {}).get("graph_positives", 0)),
        )
    if plan.action != "train" or plan.round_index is None:  # no positive: nothing to learn from
        raise LoopError(
            f"no positive labels yet for {concept.name!r} ({facts.n_neg} negative): rate at least one "
            "image as positive — widen the search with more phrases, or add an exemplar image — "
            "then run the round again"
        )
    round_index = plan.round_index
    ids, y = training_labels(env, concept.name, rule=rule, upto=cutoff)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    from agile_pipeline.lib.training import training_inputs

    rows = (lambda cache: concept_rows(env.concept_dir(concept.name), cache)) if pooled(env) else None
    X_pool, X_lab, exclude = training_inputs(env.vectors, env.model_id, ids, rows=rows)
    events = store.label_events(concept.name, purpose="train", upto=cutoff)
    arch_round = architecture_round(round_index, [e["round"] for e in events])
    try:
        model = train_round_model(
            X_lab, y, X_pool, round_index=arch_round, config=config, choice=choice,
            exclude_from_pool=exclude, concept=concept.name,
        )
    except NotEnoughLabels as exc:
        raise LoopError(str(exc)) from exc
    graph_ids: list[str] = []
    if family_of(model.meta) == "kernel" and not isinstance(X_pool, RowSource):
        model, graph_ids = _refit_with_graph_positives(env, concept.name, model, ids, y, X_lab, X_pool, exclude,
                                                       round_index=arch_round, config=config, choice=choice)
    model_dir = env.concept_dir(concept.name) / f"round-{round_index:03d}"
    tmp_dir = model_dir.with_name(model_dir.name + ".tmp")
    model.save(tmp_dir)
    (tmp_dir / "training_labels.json").write_text(json.dumps({
        "label_cutoff": cutoff, "rule": rule.describe(), "embedding_model": env.model_id,
        "labels": dict(zip(ids, y.tolist(), strict=True)),
        "event_seqs": [r["seq"] for r in events],
        "graph_positives": graph_ids,
    }))
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    tmp_dir.replace(model_dir)  # a round's files appear complete or not at all
    result = RoundResult(
        concept.name, round_index, cutoff, n_pos, n_neg, model_dir,
        float(model.meta.train_seconds), warnings=list(model.meta.warnings),
        family=family_of(model.meta), model_choice=dict(model.meta.config.get("model_choice") or {}),
        working_set={"working_set_hits": X_pool.hits, "working_set_misses": X_pool.misses}
        if isinstance(X_pool, RowSource) else {},
        graph_positives=len(graph_ids),
    )
    store.record_round(
        concept.name, round_index, label_cutoff=cutoff, run_id=run_id, model_uri=str(model_dir),
        model_version=result.model_version, mlflow_run_id=result.mlflow_run_id, n_pos=n_pos,
        n_neg=n_neg, train_seconds=result.train_seconds,
        info={"warnings": result.warnings, "hidden": list(model.meta.hidden), "graph_positives": len(graph_ids),
              "family": family_of(model.meta), "model_choice": model.meta.config.get("model_choice"),
              "params": {**config.to_dict(), "hidden": list(model.meta.hidden),
                         "model_family": family_of(model.meta),
                         "model_candidates": ",".join(choice.candidates),
                         "graph_positives": len(graph_ids),
                         "label_rule": rule.describe(), "label_cutoff": cutoff},
              "n_random_neg": int(model.meta.n_random_neg), "lookahead": lookahead},
    )
    if tracking:
        result.mlflow_run_id, result.model_version, _ = register_round(
            env, concept.name, round_index, run_id=run_id)
    return result


def _refit_with_graph_positives(env: LoopEnv, concept: str, model: Any, ids: list[str], y: np.ndarray,
                                X_lab: np.ndarray, X_pool: Any, exclude: np.ndarray, *, round_index: int,
                                config: Any, choice: Any) -> tuple[Any, list[str]]:
    """A kernel round trained again with its graph positives (README, "Graph positives"): the
    unrated train images that the model's scores, propagated over the corpus graph with the
    ratings held, make confidently positive. Unchanged (and no ids) where the corpus has no graph
    (``AGILE_PROPAGATION``), its graph is not built yet and would take the rater's time to build
    (:data:`~agile_pipeline.settings.PROPAGATION_ROUND_BUILD_IMAGES`), or nothing is confident
    enough."""
    from agile_pipeline.lib.corpus_scores import corpus_graph, graph_positives
    from agile_pipeline.lib.model_choice import refit_with_positives

    g = corpus_graph(env.vectors, env.model_id, build_max_images=settings.PROPAGATION_ROUND_BUILD_IMAGES)
    if g is None:
        return model, []
    rows = graph_positives(model, g, dict(zip(ids, (int(v) for v in y), strict=True)))
    if not len(rows):
        return model, []
    refit = refit_with_positives(model, X_lab, y, X_pool, rows, round_index=round_index, config=config,
                                 exclude_from_pool=exclude, concept=concept, choice=choice)
    log.info("%s: kernel refitted with %d graph positives", concept, len(rows))
    return refit, g.train.id_at(rows)


def dagster_run_link(run_id: str | None) -> dict[str, str]:
    """``{"dagster_run_url": ...}`` for a Dagster run id (``AGILE_DAGSTER_UI_URL``, default
    what the quickstart's webserver serves), or nothing without a run."""
    if not run_id:
        return {}
    return {"dagster_run_url": f"{settings.dagster_ui_url()}/runs/{run_id}"}


def register_round(env: LoopEnv, concept_name: str, round_index: int | None = None, *,
                   run_id: str | None = None) -> tuple[str | None, str | None, bool]:
    """Log a trained round to MLflow (run + registered-model version) unless it already is.

    Kept apart from training so that a round's next batch is committed before this
    bookkeeping runs (the rater sees the batch; MLflow catches up a second later).
    Returns ``(mlflow_run_id, model_version, logged_now)``.
    """
    from agile_pipeline.lib.tracking import log_model_version

    rounds = env.store.rounds(concept_name)
    if not rounds:
        return None, None, False
    r = rounds[-1] if round_index is None else next((x for x in rounds if x["round"] == round_index), None)
    if r is None:
        raise LoopError(f"{concept_name!r} has no round {round_index}")
    if r.get("model_version"):
        return r["mlflow_run_id"], r["model_version"], False
    info = r.get("info") or {}
    from agile_pipeline.lib.agreement import agreement_report

    params = dict(info.get("params") or {})
    params.setdefault("label_rule", LabelRule().describe())
    # agreement among the raters on the labels this round saw (alpha NaN: not logged)
    agreement = agreement_report(
        env.store.label_events(concept_name, purpose="train", upto=r.get("label_cutoff")),
        env.store.get_concept(concept_name).owner, rule=str(params["label_rule"]))
    logged = log_model_version(
        tracking_uri=env.paths.mlflow_uri(),
        artifact_root=env.paths.mlflow_artifacts,
        concept=concept_name,
        round_index=int(r["round"]),
        model_dir=Path(r["model_uri"]),
        params=params,
        metrics={"n_pos": r["n_pos"], "n_neg": r["n_neg"], "n_labels": r["n_pos"] + r["n_neg"],
                 "n_random_neg": float(info.get("n_random_neg", 0)),
                 **{f"cv_auc_pr_{k}": float(v)
                    for k, v in ((info.get("model_choice") or {}).get("cv_auc_pr") or {}).items()},
                 **({"near_duplicate_agreement": float(info["model_choice"]["agreement"])}
                    if (info.get("model_choice") or {}).get("agreement") is not None else {}),
                 "train_seconds": r["train_seconds"] or 0.0, **agreement.metrics()},
        tags={"agile/embedding_model": env.model_id, "dagster_run_id": run_id or r.get("run_id") or "",
              "agile/label_cutoff": str(r["label_cutoff"]),
              "agile/lookahead": "1" if info.get("lookahead") else "0",
              "agile/model_family": str(info.get("family", "mlp")),
              "agile/model_choice": str((info.get("model_choice") or {}).get("reason", "")),
              **dagster_run_link(run_id or r.get("run_id"))},
        encoder_spec=env.encoder_spec or settings.default_encoder_spec(),
        embedding_model=env.model_id,
    )
    env.store.update_round(concept_name, int(r["round"]), mlflow_run_id=logged.run_id,
                           model_version=logged.version)
    env.store.merge_round_info(concept_name, int(r["round"]), registered_model=logged.name)
    return logged.run_id, logged.version, True


def architecture_round(round_index: int, label_rounds: list[int | None]) -> int:
    """Which model of the recipe to train (``0``: the first model, 1x16; else 3x128).

    The paper's first model is the one trained on the expansion batch. A round is therefore
    "first" when it is round 0, or when every one of its labels rated in a batch was rated in a
    round-0 batch (a lookahead round and its follow-up on the first batch, or an early "train
    now"); labels from no batch (``None``: exemplars, imports) do not make a round later.
    """
    from_batches = [r for r in label_rounds if r is not None]
    if round_index == 0 or (from_batches and all(r == 0 for r in from_batches)):
        return 0
    return round_index


def load_model(env: LoopEnv, concept_name: str, round_index: int | None = None) -> tuple[int, Any]:
    from agile_pipeline.lib.training import TrainedClassifier

    rounds = env.store.rounds(concept_name)
    if not rounds:
        raise LoopError(f"{concept_name!r} has no trained model yet: rate the first batch, then run a round")
    r = rounds[-1] if round_index is None else next((x for x in rounds if x["round"] == round_index), None)
    if r is None:
        raise LoopError(f"{concept_name!r} has no round {round_index}")
    return int(r["round"]), TrainedClassifier.load(Path(r["model_uri"]))


# ---- active learning ---------------------------------------------------------------------
def select_candidates(
    env: LoopEnv,
    concept_name: str,
    *,
    batch_size: int = settings.AL_BATCH,
    strategy: Strategy = "margin",
    run_id: str | None = None,
    exclude_pending: bool = False,
) -> CandidateBatch:
    """Score every unlabeled train image with the latest model and queue the next batch.

    ``exclude_pending``: also leave out the images of the current batch that nobody has
    rated yet (a lookahead round runs while the rater is still on them).
    """
    concept = env.store.get_concept(concept_name)
    with concept_lock(env, concept.name, "selecting candidates"):
        batch = _select_candidates(env, concept.name, batch_size=batch_size, strategy=strategy,
                                   run_id=run_id, exclude_pending=exclude_pending)
    if batch.info.get("candidate_pool"):  # the rater sees the batch now; its neighbours join
        t0 = time.perf_counter()          # the pool while they rate it (SEALS' growth step)
        added = grow_candidate_pool(env, concept.name, [it["image_id"] for it in batch.items])
        batch.info.update(pool_added=added, pool_grow_seconds=round(time.perf_counter() - t0, 4))
        t0 = time.perf_counter()  # and the next round also scores this model's most uncertain
        try:
            swept = sweep_candidate_pool(env, concept.name, exclude=[it["image_id"] for it in batch.items])
        except Exception as exc:  # the batch is committed: the next round goes without the sweep
            log.warning("%s: the candidate pool's sweep failed (the next round scores the pool and the "
                        "random sample only): %s", concept.name, exc)
            swept = 0
        batch.info.update(pool_swept=swept, pool_sweep_seconds=round(time.perf_counter() - t0, 4))
        t0 = time.perf_counter()  # last, copy what the next round will read into one file
        try:
            kept = prefetch_working_set(env, concept.name, [it["image_id"] for it in batch.items],
                                        int(batch.info["model_round"]))
        except Exception as exc:  # a cache: the next round reads the split cache instead
            log.warning("%s: the working set was not written (the next round reads the split cache): %s",
                        concept.name, exc)
            kept = 0
        batch.info.update(working_set_written=kept, working_set_seconds=round(time.perf_counter() - t0, 4))
    return batch


def prefetch_working_set(env: LoopEnv, concept_name: str, batch_ids: Sequence[str], model_round: int) -> int:
    """Write the concept's working set (:mod:`.working_set`) with the train rows its next
    pooled round will read once ``batch_ids`` are rated: the labelled rows, the rows the
    selection will score (the pool, the sweep and the random sample it will draw), and the
    random negatives the default model families will train on. Returns the rows written.

    The draws are the next round's exactly when the rater rates the whole batch and nothing
    else changes; whatever differs (a skip, labels from elsewhere, another seed) is read from
    the split cache then, only slower."""
    from agile_pipeline.lib import candidate_pool
    from agile_pipeline.lib.model_choice import choice_for, kernel_random_rows
    from agile_pipeline.lib.training import TrainConfig, mlp_random_rows
    from agile_pipeline.lib.working_set import write_working_set

    train = split_cache(env.vectors, env.model_id, "train")
    pool = candidate_pool.load(candidate_pool.pool_path(env.concept_dir(concept_name), env.model_id))
    ids, _y = training_labels(env, concept_name, rule=LabelRule(), upto=env.store.label_cutoff(concept_name))
    lab = train.positions(list(dict.fromkeys([*ids, *batch_ids])))
    lab = lab[lab >= 0]
    eligible = ~train.mask(sorted(env.store.labeled_image_ids(concept_name) | set(batch_ids)))
    in_pool = train.positions([*pool.ids, *pool.sweep])
    scored, _ = candidate_pool.rows_to_score(in_pool[in_pool >= 0], eligible, candidate_pool.POOL_RANDOM,
                                             _pool_rng(concept_name, model_round + 1))
    negatives = [kernel_random_rows(choice_for(settings.model_family()), len(train), lab),
                 mlp_random_rows(TrainConfig(), len(train), lab, PREFETCH_MLP_RANDOM)]
    return write_working_set(env.concept_dir(concept_name), train, np.concatenate([scored, lab, *negatives]))


def _pool_rng(concept_name: str, round_index: int) -> np.random.Generator:
    """The generator of a pooled round's random sample (by the model's round and the concept)."""
    import zlib

    return np.random.default_rng([round_index, zlib.crc32(concept_name.encode())])


def pooled(env: LoopEnv, mode: str | None = None) -> bool:
    """Whether this corpus's rounds score a SEALS candidate pool (:mod:`.candidate_pool`)."""
    from agile_pipeline.lib.candidate_pool import use_pool

    mode = mode or settings.candidate_pool_mode()
    if mode != "auto":
        return use_pool(mode, 0)
    return has_cache(env.vectors) and use_pool(mode, len(split_cache(env.vectors, env.model_id, "train")))


def grow_candidate_pool(env: LoopEnv, concept_name: str, image_ids: Sequence[str]) -> int:
    """Add the nearest train neighbours of ``image_ids`` (those not expanded yet) to the
    concept's pool; returns how many images joined it."""
    from agile_pipeline.lib import candidate_pool

    path = candidate_pool.pool_path(env.concept_dir(concept_name), env.model_id)
    with candidate_pool.locked(path):
        pool = candidate_pool.load(path)
        todo = pool.missing(image_ids)
        if not todo:
            return 0
        train = split_cache(env.vectors, env.model_id, "train")
        rows = train.positions(todo)
        keys = [i for i, r in zip(todo, rows, strict=True) if r >= 0]  # eval labels are test images
        if not keys:
            return 0
        added = pool.grow(keys, train.rows_f32(rows[rows >= 0]), lambda q, k: nearest_train(env, q, k + 1))
        candidate_pool.save(path, pool)
        return added


def sweep_candidate_pool(env: LoopEnv, concept_name: str, exclude: Sequence[str] = ()) -> int:
    """Scan the whole train split with the concept's latest model and keep its
    :data:`~.candidate_pool.POOL_SWEEP` most uncertain unlabelled images (not in ``exclude``)
    in the pool file, for the next pooled round to score; returns how many were kept.

    Costs one full scan (the paper's per-round selection), run after the batch is committed, so
    it is off the rater's wait; what it buys is the pool's blind spot closed (see
    :mod:`.candidate_pool`)."""
    from agile_pipeline.lib import candidate_pool
    from agile_pipeline.lib.selection import select_for_round

    if candidate_pool.POOL_SWEEP <= 0:
        return 0
    _, model = load_model(env, concept_name)
    ineligible = set(env.store.labeled_image_ids(concept_name)) | set(exclude)
    sel = select_for_round(env.vectors, env.model_id, model, ineligible, candidate_pool.POOL_SWEEP, "margin",
                           exact=False)  # the next round re-scores the sweep exactly
    path = candidate_pool.pool_path(env.concept_dir(concept_name), env.model_id)
    with candidate_pool.locked(path):
        pool = candidate_pool.load(path)
        pool.sweep = list(sel.ids)
        candidate_pool.save(path, pool)
    return len(sel.ids)


def _select_candidates(
    env: LoopEnv, concept_name: str, *, batch_size: int, strategy: Strategy, run_id: str | None,
    exclude_pending: bool = False,
) -> CandidateBatch:
    t0 = time.perf_counter()
    concept = env.store.get_concept(concept_name)
    round_index, model = load_model(env, concept.name)
    cutoff = env.store.label_cutoff(concept.name)
    if strategy not in ("margin", "margin-positive", "cluster-margin"):
        raise LoopError(f"unknown strategy {strategy!r}: use 'margin', 'margin-positive' or 'cluster-margin'")
    from agile_pipeline.lib.selection import select_for_round

    labeled = env.store.labeled_image_ids(concept.name)
    pending = {it["image_id"] for it in pending_items(env, concept.name)} if exclude_pending else set()
    if pooled(env):
        sel = _select_from_pool(env, concept.name, model, labeled | pending, batch_size, strategy, round_index)
    else:
        sel = select_for_round(env.vectors, env.model_id, model, labeled | pending, batch_size, strategy)
    items = [
        {"image_id": image_id, "source": f"al:{strategy}",
         "detail": f"selected by the round-{round_index} model", "score": score}
        for image_id, score in zip(sel.ids, sel.scores, strict=True)
    ]
    seconds = time.perf_counter() - t0
    info = {"strategy": strategy, "scored": sel.n_scored, "eligible": sel.n_eligible,
            "select_seconds": seconds, "model_round": round_index, "excluded_pending": len(pending),
            **sel.info}
    # labels of this batch train the next round
    batch_id = env.store.write_batch(
        concept.name, "al", round_index + 1, items, label_cutoff=cutoff, run_id=run_id, info=info
    )
    return CandidateBatch(concept.name, "al", round_index + 1, batch_id, items, seconds, info)


def _select_from_pool(env: LoopEnv, concept_name: str, model: Any, ineligible: set[str], k: int,
                      strategy: str, round_index: int) -> Any:
    """The next batch chosen among the concept's SEALS pool plus a uniform sample of the rest
    of the split (:mod:`.candidate_pool`), scored exactly: O(labels x k), not O(corpus)."""
    from agile_pipeline.lib import candidate_pool
    from agile_pipeline.lib.scan import exact_scores
    from agile_pipeline.lib.selection import (
        CLUSTER_POOL,
        RoundSelection,
        diversify_by_cluster,
        margin,
        select_margin,
        select_margin_positive,
    )

    t0 = time.perf_counter()
    caught_up = grow_candidate_pool(env, concept_name, sorted(env.store.labeled_image_ids(concept_name)))
    t_grow = time.perf_counter() - t0
    pool = candidate_pool.load(candidate_pool.pool_path(env.concept_dir(concept_name), env.model_id))
    train = split_cache(env.vectors, env.model_id, "train")
    eligible = ~train.mask(list(ineligible))
    rng = _pool_rng(concept_name, round_index)
    source = concept_rows(env.concept_dir(concept_name), train)
    members = train.positions(list(pool.ids))
    swept = train.positions(pool.sweep) if pool.sweep else np.empty(0, np.int64)
    swept = swept[swept >= 0]
    rows, n_random = candidate_pool.rows_to_score(np.concatenate([members, swept]), eligible,
                                                  candidate_pool.POOL_RANDOM, rng)
    scores = exact_scores(model, source, rows) if rows.size else np.empty(0, np.float32)
    if strategy == "cluster-margin":  # diversity among the most uncertain only
        short = select_margin(scores, CLUSTER_POOL * k)
        pick = short[diversify_by_cluster(margin(scores[short]), source.rows_f32(rows[short]), min(k, short.size))]
    else:
        pick = (select_margin if strategy == "margin" else select_margin_positive)(scores, k)
    return RoundSelection(train.id_at(rows[pick]), [float(x) for x in scores[pick]], int(rows.size),
                          int(eligible.sum()), {
                              "candidate_pool": True, "pool_size": len(pool.ids), "pool_k": pool.k,
                              "pool_scored": int(rows.size - n_random), "random_scored": n_random,
                              "sweep_scored": int(eligible[swept].sum()),
                              "pool_caught_up": caught_up, "pool_catch_up_seconds": round(t_grow, 4),
                              "working_set_rows": len(source.rows), "working_set_misses": source.misses,
                              "seconds": round(time.perf_counter() - t0, 4)})


def pending_items(
    env: LoopEnv, concept_name: str, rater: str | None = None, *, purpose: str = "train"
) -> list[dict[str, Any]]:
    """The latest batch's items not yet labelled (by ``rater``, or by anyone); see
    :meth:`StateStore.pending_items`."""
    return env.store.pending_items(concept_name, rater, purpose=purpose)
