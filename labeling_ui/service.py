"""The app's backend: concepts, batches, label writes, rounds, exports.

One :class:`LabelingService` is shared by every session and every HTTP request of an app
process (it holds the state store and the pipeline trigger, which are shared resources and are
never put in ``gr.State``). Its methods are plain Python, raise
:class:`~agile_pipeline.lib.state.StateError` with a user-facing message for anything the user
can fix, and are tested directly.

Data ownership: the app is the single writer of label events (through the multi-process-safe
``StateStore``); every batch, model and round is written by the concept jobs, which the app only
*asks* to run, through the :class:`~labeling_ui.trigger.PipelineTrigger`.
"""

import io
import json
import logging
import re
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from agile_pipeline.lib.state import (
    LABELS,
    Concept,
    LabelEvent,
    StateError,
    StateStore,
    validate_concept_name,
)
from labeling_ui.config import valid_rater_name
from labeling_ui.trigger import (
    FOLLOWUP_ASSETS,
    LOOKAHEAD_ASSETS,
    ROUND_JOB,
    START_JOB,
    PipelineTrigger,
    RunHandle,
    RunStatus,
    TriggerError,
    TriggerUnavailable,
)

log = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
EVENT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_EVENTS_PER_POST = 500
MAX_INSTRUCTIONS = 4000
Purpose = Literal["train", "eval"]
JobKind = Literal["start", "round", "eval", "followup"]


@dataclass(frozen=True)
class RoundPolicy:
    """When the app starts rounds by itself (``auto``), so that a rater never presses a button
    and, with ``lookahead``, never waits.

    * ``lookahead = L > 0``: when only L images of the batch being rated are left unrated, a
      round starts on the labels so far, with those L images kept out of its selection; when
      the batch ends, the next one is usually there already. A *follow-up* round then trains
      on the batch's full labels in the background (MLflow version, eval set, metrics) while
      the rater works on the new batch.
    * ``lookahead = 0`` (the paper's protocol): the round starts when the batch is fully rated.

    Nothing starts while the labels hold no positive (the app offers search and exemplars).
    """

    auto: bool = False
    lookahead: int = 0


def split_phrases(text: str | Sequence[str] | None) -> list[str]:
    """One phrase per line (commas stay inside phrases); blank lines dropped."""
    if text is None:
        return []
    lines = text.splitlines() if isinstance(text, str) else list(text)
    return [ln.strip() for ln in lines if ln and ln.strip()]


def concept_dir_name(concept: str) -> str:
    return concept.replace(" ", "_")


@dataclass
class RoundRequest:
    """What the app asked the pipeline to do for a concept, and what came of it."""

    concept: str
    job: JobKind
    handle: RunHandle | None
    requested_by: str
    requested_at: float
    batch_before: int | None
    label_cutoff: int
    status: RunStatus | None = None
    checked_at: float = 0.0
    finished_at: float | None = None
    unreachable: str | None = None
    error: str | None = None
    lookahead: bool = False
    auto: bool = False


@dataclass
class RoundView:
    """JSON-able view of a concept's pipeline activity, for the rating widget and the UI."""

    concept: str
    state: str = "idle"  # idle|queued|running|success|failure|canceled|unreachable|error
    job: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    kind: str | None = None
    message: str = ""
    requested_by: str | None = None
    requested_at: float | None = None
    finished_at: float | None = None
    batch_id: int | None = None
    new_batch: bool = False
    fallback_offered: bool = False
    seconds_to_batch: float | None = None
    round_index: int | None = None
    lookahead: bool = False
    auto: bool = False

    @property
    def in_flight(self) -> bool:
        return self.state in ("queued", "running")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_flight"] = self.in_flight
        return d


@dataclass(frozen=True)
class BatchRef:
    """An immutable candidate batch: provenance of every image in it."""

    batch_id: int
    concept: str
    kind: str
    round: int
    created_at: float
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: tuple[str, ...] = ()


class LabelingService:
    """Everything the app does, independent of Gradio (see module docstring)."""

    def __init__(
        self,
        store: StateStore,
        trigger: PipelineTrigger,
        *,
        home: Path,
        fallback: PipelineTrigger | None = None,
        encoder_spec: str = "bundled",
        status_cache_s: float = 0.75,
        policy: RoundPolicy | None = None,
    ) -> None:
        self.store = store
        self.trigger = trigger
        self.fallback = fallback
        self.home = Path(home)
        self.encoder_spec = encoder_spec
        self._status_cache_s = status_cache_s
        self._requests: dict[str, RoundRequest] = {}
        self._lock = threading.RLock()
        self._batches: OrderedDict[int, BatchRef] = OrderedDict()
        self._upload_slots = threading.BoundedSemaphore(2)
        self.policy = policy or RoundPolicy()
        # concept -> {"lookahead"|"round"|"followup": batch id it was started for}
        self._auto: dict[str, dict[str, int]] = {}

    # ---- concepts --------------------------------------------------------------------------
    def concept_names(self) -> list[str]:
        return self.store.concept_names()

    def concept(self, name: str) -> Concept:
        return self.store.get_concept(name)

    def concept_view(self, name: str) -> dict[str, Any]:
        c = self.store.get_concept(name)
        return {
            "name": c.name,
            "owner": c.owner,
            "positives": [p for k, p in c.phrases if k == "positive"],
            "negatives": [p for k, p in c.phrases if k == "negative"],
            "instructions": c.description,
            "exemplars": self.exemplars(c.name),
        }

    # ---- exemplars (images that drive expansion like phrases do) ------------------------------
    def exemplars(self, concept: str) -> list[dict[str, Any]]:
        return [
            {"image_id": e["image_id"], "polarity": e["polarity"], "added_by": e["added_by"]}
            for e in self.store.exemplars(concept)
        ]

    def add_exemplar(self, concept: str, image_id: str, *, rater: str, polarity: str = "positive") -> list[dict[str, Any]]:
        """Mark a corpus image as an exemplar (also the rater's training label); the new list."""
        rater = self._check_rater(rater)
        c = self.store.get_concept(validate_concept_name(str(concept)))
        image_id = str(image_id)
        if not IMAGE_ID.match(image_id):
            raise StateError(f"image id {image_id[:40]!r} is not a 32-character hex id")
        if polarity not in ("positive", "negative"):
            raise StateError(f"polarity {str(polarity)[:20]!r} is positive or negative")
        self.store.add_exemplar(c.name, image_id, polarity, rater)
        return self.exemplars(c.name)

    def upload_exemplar(
        self,
        concept: str,
        data: bytes,
        *,
        rater: str,
        polarity: str = "positive",
        filename: str = "",
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Make an uploaded image file an exemplar (checked, stored, embedded now; see
        :mod:`agile_pipeline.lib.uploads`). Returns the image id and the new exemplar list.

        Raises :class:`StateError` (rater, concept, polarity), ``UploadRejected`` (not a usable
        image) or ``EmbeddingUnavailable`` (encoder or vector store unavailable, or busy).
        """
        from agile_pipeline.lib.uploads import (
            DEFAULT_MAX_UPLOAD_BYTES,
            EmbeddingUnavailable,
            UploadsBusy,
            add_uploaded_exemplar,
        )

        rater = self._check_rater(rater)
        c = self.store.get_concept(validate_concept_name(str(concept)))
        if polarity not in ("positive", "negative"):
            raise StateError(f"polarity {str(polarity)[:20]!r} is positive or negative")
        # decoding and embedding take memory and CPU: a few at a time, whatever the traffic
        if not self._upload_slots.acquire(timeout=60):
            raise UploadsBusy("the app is busy with other uploads; try again in a moment")
        try:
            from agile_pipeline.lib.encoders import load_encoder
            from agile_pipeline.lib.vectors import VectorStore
            from agile_pipeline.settings import Paths

            try:
                encoder = load_encoder(self.encoder_spec)
            except Exception as exc:
                raise EmbeddingUnavailable(f"the embedding model {self.encoder_spec!r} cannot be loaded: {exc}") from exc
            paths = Paths(Path(self.home))
            vectors = VectorStore(paths.lancedb, cache_dir=paths.cache)
            res = add_uploaded_exemplar(
                self.store, vectors, encoder, paths.blobs, c.name, data, polarity=polarity,
                added_by=rater, filename=filename, max_bytes=max_bytes or DEFAULT_MAX_UPLOAD_BYTES,
            )
        finally:
            self._upload_slots.release()
        return {"image_id": res.image_id, "polarity": polarity, "in_corpus": res.in_corpus,
                "exemplars": self.exemplars(c.name)}

    def search_images(self, concept: str, text: str, k: int = 24) -> list[dict[str, Any]]:
        """The training-split images nearest to ``text`` (the embedding model, loaded lazily)."""
        c = self.store.get_concept(validate_concept_name(str(concept)))
        text = " ".join(str(text).split())[:200]
        if not text:
            raise StateError("type a few words to search for")
        from agile_pipeline.lib.encoders import load_encoder
        from agile_pipeline.lib.vectors import VectorStore
        from agile_pipeline.settings import Paths

        encoder = load_encoder(self.encoder_spec)
        paths = Paths(Path(self.home))
        vectors = VectorStore(paths.lancedb, cache_dir=paths.cache)
        query = encoder.embed_texts([text])[0]
        hits = vectors.search(str(encoder.model_id), query, max(1, min(int(k), 60)), split="train")
        mine = {e["image_id"] for e in self.exemplars(c.name)}
        return [{"image_id": i, "score": round(float(s), 4), "exemplar": i in mine} for i, _split, s in hits]

    def create_concept(
        self,
        name: str,
        positives: str | Sequence[str],
        negatives: str | Sequence[str],
        instructions: str,
        *,
        owner: str,
    ) -> Concept:
        self._check_rater(owner)
        if len(instructions or "") > MAX_INSTRUCTIONS:
            raise StateError(f"the instructions are {len(instructions)} characters long; keep them under {MAX_INSTRUCTIONS}")
        return self.store.create_concept(
            name, split_phrases(positives), split_phrases(negatives), owner=owner,
            description=instructions or "",
        )

    def update_concept(
        self, name: str, positives: str | Sequence[str], negatives: str | Sequence[str], instructions: str
    ) -> Concept:
        if len(instructions or "") > MAX_INSTRUCTIONS:
            raise StateError(f"the instructions are {len(instructions)} characters long; keep them under {MAX_INSTRUCTIONS}")
        current = self.store.get_concept(name)
        pos = [p for p in split_phrases(positives) if p.lower() != current.phrases[0][1].lower()]
        return self.store.update_concept(
            current.name, positives=pos, negatives=split_phrases(negatives), description=instructions or ""
        )

    # ---- batches --------------------------------------------------------------------------
    def _batch_ref(self, batch: Mapping[str, Any]) -> BatchRef:
        items = {it["image_id"]: dict(it) for it in batch["items"]}
        ref = BatchRef(
            int(batch["batch_id"]), str(batch["concept"]), str(batch["kind"]), int(batch["round"]),
            float(batch["created_at"]), items, tuple(it["image_id"] for it in batch["items"]),
        )
        with self._lock:
            self._batches[ref.batch_id] = ref
            while len(self._batches) > 256:
                self._batches.popitem(last=False)
        return ref

    def batch_by_id(self, batch_id: int) -> BatchRef | None:
        with self._lock:
            if batch_id in self._batches:
                return self._batches[batch_id]
        batch = self.store.get_batch(batch_id)
        return self._batch_ref(batch) if batch else None

    def latest_batch(self, concept: str, purpose: Purpose = "train") -> BatchRef | None:
        kinds = ("eval",) if purpose == "eval" else ("expansion", "al")
        batch = self.store.latest_batch(concept, kinds)
        return self._batch_ref(batch) if batch else None

    def batch_view(self, concept: str, rater: str | None, purpose: Purpose = "train") -> dict[str, Any]:
        """The latest batch for the rating widget: items in order, with this rater's labels."""
        c = self.store.get_concept(concept)
        ref = self.latest_batch(c.name, purpose)
        mine = self.store.rater_labels(c.name, rater, purpose) if rater else {}
        items = []
        if ref is not None:
            for image_id in ref.order:
                it = ref.items[image_id]
                items.append({
                    "image_id": image_id,
                    "source": it.get("source"),
                    "detail": it.get("detail"),
                    "label": mine.get(image_id),
                })
        rounds = self.store.rounds(c.name)
        return {
            "concept": self.concept_view(c.name),
            "purpose": purpose,
            "rater": rater,
            "batch": None if ref is None else {
                "batch_id": ref.batch_id, "kind": ref.kind, "round": ref.round,
                "created_at": ref.created_at, "size": len(ref.order),
            },
            "items": items,
            "done": sum(1 for it in items if it["label"]),
            "rounds_done": len(rounds),
            "round": self.round_view(c.name).to_dict(),
            "counts": self.label_counts(c.name, purpose),
            "recovery": any(it.get("source") == "recovery" for it in items),
        }

    # ---- labels ---------------------------------------------------------------------------
    @staticmethod
    def _check_rater(rater: str | None) -> str:
        name = (rater or "").strip()
        if not name or not valid_rater_name(name):
            raise StateError(
                "tell us your name first (1-64 letters, digits, spaces or .@'-_): every rating is "
                "stored under the name of the person who made it"
            )
        return name

    def record_labels(self, events: Sequence[Mapping[str, Any]], *, rater: str) -> dict[str, int]:
        """Store ratings from the app, idempotently (``event_id``), with batch provenance.

        Each event: ``concept``, ``image_id``, ``label`` (positive/negative/skip),
        ``event_id`` (client-generated), ``batch_id``; optional ``ts`` (client time, seconds)
        and ``purpose``. The image must belong to that batch of that concept. All or nothing.
        """
        rater = self._check_rater(rater)
        if not events:
            return {"received": 0, "new": 0}
        if len(events) > MAX_EVENTS_PER_POST:
            raise StateError(f"too many ratings in one request ({len(events)}); send at most {MAX_EVENTS_PER_POST}")
        out: list[LabelEvent] = []
        now = time.time()
        for raw in events:
            if not isinstance(raw, Mapping):
                raise StateError("each rating must be an object")
            concept = validate_concept_name(str(raw.get("concept", "")))
            image_id = str(raw.get("image_id", ""))
            label = str(raw.get("label", ""))
            event_id = str(raw.get("event_id", ""))
            if not IMAGE_ID.match(image_id):
                raise StateError(f"image id {image_id[:40]!r} is not a 32-character hex id")
            if label not in LABELS:
                raise StateError(f"label {label[:20]!r} is not one of {', '.join(LABELS)}")
            if not EVENT_ID.match(event_id):
                raise StateError("event_id must be 8-64 letters, digits, '-' or '_'")
            try:
                batch_id = int(raw.get("batch_id"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise StateError("a rating needs the batch_id it was made in") from None
            ref = self.batch_by_id(batch_id)
            if ref is None or ref.concept != concept:
                raise StateError(f"batch {batch_id} is not a batch of {concept!r}; reload the page")
            item = ref.items.get(image_id)
            if item is None:
                raise StateError(f"image {image_id} is not in batch {batch_id} of {concept!r}; reload the page")
            purpose: Purpose = "eval" if ref.kind == "eval" else "train"
            ts = raw.get("ts")
            try:
                ts_f = float(ts) if ts is not None else now  # type: ignore[arg-type]
            except (TypeError, ValueError):
                ts_f = now
            if not (now - 7 * 86400 < ts_f < now + 300):  # a client clock far off: server time
                ts_f = now
            out.append(LabelEvent(
                concept=concept, image_id=image_id, label=label, rater=rater, purpose=purpose,
                source=str(item.get("source") or ref.kind), detail=item.get("detail"),
                round=ref.round, event_id=event_id, ts=ts_f,
            ))
        new = self.store.add_labels(out)
        if self.policy.auto:
            for concept, batch_id in dict.fromkeys(
                    (e.concept, int(raw["batch_id"])) for e, raw in zip(out, events, strict=True)
                    if e.purpose == "train"):
                try:
                    self.auto_round(concept, batch_id, requested_by=rater)
                except Exception:  # the labels are stored: a round that cannot start is
                    log.exception("automatic round for %r did not start", concept)  # retried on the next label
        return {"received": len(out), "new": new}

    def auto_round(self, concept: str, batch_id: int, *, requested_by: str) -> RoundView | None:
        """Start the round the :class:`RoundPolicy` calls for after a rating of ``batch_id``
        (see there); ``None`` when none is due."""
        ref = self.batch_by_id(batch_id)
        if ref is None or ref.kind not in ("expansion", "al"):
            return None
        latest = self.store.latest_batch(concept, ("expansion", "al"))
        if latest is None:
            return None
        labeled = self.store.labeled_image_ids(concept)
        left = sum(1 for i in ref.order if i not in labeled)
        is_latest = int(latest["batch_id"]) == batch_id
        with self._lock:
            marks = self._auto.setdefault(concept, {})
            if is_latest and left == 0 and marks.get("lookahead") != batch_id:
                action = "round" if marks.get("round") != batch_id else None
            elif left == 0 and marks.get("lookahead") == batch_id:
                action = "followup" if marks.get("followup") != batch_id else None
            elif is_latest and 0 < left <= self.policy.lookahead:
                action = "lookahead" if batch_id not in (marks.get("lookahead"), marks.get("round")) else None
            else:
                action = None
            if action is None:
                return None
            if action != "followup" and self.label_counts(concept)["positive"] == 0:
                return None  # nothing to learn from yet: the app's recovery notice applies
            marks[action] = batch_id
        if action == "followup":
            view = self._request(concept, "followup", requested_by, False, auto=True)
        else:
            view = self._request(concept, "round", requested_by, False,
                                 lookahead=action == "lookahead", auto=True)
        if view.state in ("error", "unreachable"):  # not started: a later rating may try again
            with self._lock:
                if self._auto.get(concept, {}).get(action) == batch_id:
                    del self._auto[concept][action]
        return view

    def label_counts(self, concept: str, purpose: Purpose = "train") -> dict[str, int]:
        labels = self.store.effective_labels(concept, purpose=purpose)
        pos = sum(labels.values())
        return {"positive": pos, "negative": len(labels) - pos}

    def rater_stats(self, concept: str) -> list[dict[str, Any]]:
        by: dict[str, dict[str, Any]] = {}
        for r in self.store.label_events(concept):
            d = by.setdefault(r["rater"], {"rater": r["rater"], "images": set(), "last": 0.0})
            d["images"].add((r["purpose"], r["image_id"]))
            d["last"] = max(d["last"], float(r["ts"]))
        return [
            {"rater": d["rater"], "images_rated": len(d["images"]), "last_rating": d["last"]}
            for d in sorted(by.values(), key=lambda d: -d["last"])
        ]

    # ---- rounds ---------------------------------------------------------------------------
    def _trigger_for(self, in_process: bool) -> PipelineTrigger:
        if in_process:
            if self.fallback is None:
                raise StateError("running rounds inside the app is not enabled here")
            return self.fallback
        return self.trigger

    def start_concept(self, concept: str, *, requested_by: str, in_process: bool = False) -> RoundView:
        """Ask the pipeline for the concept's first batch (expansion + zero-shot)."""
        c = self.store.get_concept(concept)
        return self._request(c.name, "start", requested_by, in_process)

    def request_round(self, concept: str, *, requested_by: str, in_process: bool = False) -> RoundView:
        """Ask the pipeline to train on every rating so far and select the next batch."""
        c = self.store.get_concept(concept)
        counts = self.label_counts(c.name)
        if counts["positive"] == 0:
            raise StateError(
                f"no image is rated positive yet for {c.name!r} ({counts['negative']} negative): "
                "the model needs at least one example of the concept. Rate more images, or add "
                "phrases that describe it on the Concept tab and find images again"
            )
        rounds = self.store.rounds(c.name)
        cutoff = self.store.label_cutoff(c.name)
        latest = self.store.latest_batch(c.name)
        if (
            rounds and rounds[-1]["label_cutoff"] == cutoff and latest is not None
            and latest["kind"] == "al" and latest["label_cutoff"] >= rounds[-1]["label_cutoff"]
        ):
            raise StateError(
                f"nothing new was rated since round {rounds[-1]['round']}: rate the current "
                "batch first (its images are the ones the model is least sure about)"
            )
        return self._request(c.name, "round", requested_by, in_process)

    def request_eval(self, concept: str, *, requested_by: str, in_process: bool = False) -> RoundView:
        """Ask the pipeline to re-score every model on the evaluation ratings so far."""
        c = self.store.get_concept(concept)
        if not self.store.rounds(c.name):
            raise StateError(f"{c.name!r} has no model to evaluate yet: rate a batch and train one first")
        if not self.store.effective_labels(c.name, purpose="eval"):
            raise StateError("no evaluation ratings yet: rate the evaluation set first")
        return self._request(c.name, "eval", requested_by, in_process)

    def _request(self, concept: str, job: JobKind, requested_by: str, in_process: bool, *,
                 lookahead: bool = False, auto: bool = False) -> RoundView:
        requested_by = (requested_by or "").strip() or "unknown"
        job_name = START_JOB if job == "start" else ROUND_JOB
        trigger = self._trigger_for(in_process)
        with self._lock:
            current = self._requests.get(concept)
            if current is not None:
                self._poll(current, force=True)
            busy = current is not None and current.handle is not None and not self._finished(current)
            # automatic rounds queue behind whatever runs (the pipeline runs a concept's rounds
            # one after another; the policy's marks keep them from repeating), and anything
            # queues behind a follow-up; a rater's own request while one runs is told so
            queue_behind = busy and current is not None and (auto or current.job == "followup")
            if busy and current is not None and not queue_behind:
                view = self._view(current)
                what = {"round": "round", "start": "search", "eval": "evaluation"}[current.job]
                view.message = (
                    f"a {what} is already running for {concept!r} (asked by "
                    f"{current.requested_by}); its result will show here"
                )
                return view
            latest = self.store.latest_batch(concept, ("expansion", "al"))
            req = RoundRequest(
                concept=concept, job=job, handle=None, requested_by=requested_by,
                requested_at=time.time(), batch_before=latest["batch_id"] if latest else None,
                label_cutoff=self.store.label_cutoff(concept), lookahead=lookahead, auto=auto,
            )
            try:
                active = None if queue_behind else trigger.active_run(concept, job_name)
                if active is not None:
                    req.handle = active
                    req.error = None
                else:
                    tags = {"agile/requested_by": requested_by, "agile/label_cutoff": str(req.label_cutoff),
                            "agile/source": "labeling-app", "agile/requested_at": f"{req.requested_at:.3f}",
                            "agile/auto": "1" if auto else "0"}
                    if job == "start":
                        req.handle = trigger.start_concept(concept, tags=tags)
                    elif job == "eval":
                        req.handle = trigger.run_eval(concept, tags={**tags, "agile/evaluation": "1"})
                    elif job == "followup":
                        req.handle = trigger.run_round(
                            concept, tags={**tags, "agile/followup": "1"}, selection=FOLLOWUP_ASSETS)
                    else:
                        run_config = None
                        if lookahead:
                            run_config = {"ops": {
                                "classifier": {"config": {"lookahead": True}},
                                "al_candidates": {"config": {"exclude_pending": True}},
                            }}
                        req.handle = trigger.run_round(concept, run_config=run_config, tags={
                            **tags, "agile/round": str(self.store.next_round_index(concept)),
                            "agile/lookahead": "1" if lookahead else "0"},
                            selection=LOOKAHEAD_ASSETS if lookahead else None)
            except TriggerUnavailable as exc:
                req.unreachable = str(exc)
            except TriggerError as exc:
                req.error = str(exc)
            self._requests[concept] = req
            return self._view(req)

    @staticmethod
    def _finished(req: RoundRequest) -> bool:
        return req.status is not None and req.status.finished

    def _poll(self, req: RoundRequest, *, force: bool = False) -> None:
        if req.handle is None or self._finished(req):
            return
        if not force and time.time() - req.checked_at < self._status_cache_s:
            return
        trigger = self.fallback if req.handle.kind == "in-process" and self.fallback else self.trigger
        try:
            status = trigger.status(req.handle.run_id)
        except TriggerUnavailable as exc:
            req.status = RunStatus("running", f"lost contact with the pipeline ({exc}); retrying")
            req.checked_at = time.time()
            return
        except TriggerError as exc:
            status = RunStatus("failure", str(exc))
        req.status = status
        req.checked_at = time.time()
        if status.finished and req.finished_at is None:
            req.finished_at = time.time()

    def round_view(self, concept: str) -> RoundView:
        with self._lock:
            req = self._requests.get(concept)
        if req is None:
            return RoundView(concept=concept, round_index=self._last_round_index(concept))
        self._poll(req)  # outside the lock: a slow pipeline never stalls other concepts
        return self._view(req)

    def _last_round_index(self, concept: str) -> int | None:
        rounds = self.store.rounds(concept)
        return int(rounds[-1]["round"]) if rounds else None

    def _view(self, req: RoundRequest) -> RoundView:
        view = RoundView(
            concept=req.concept, job=req.job, requested_by=req.requested_by,
            requested_at=req.requested_at, finished_at=req.finished_at,
            round_index=self._last_round_index(req.concept), lookahead=req.lookahead, auto=req.auto,
        )
        if req.unreachable:
            return replace(view, state="unreachable", message=req.unreachable,
                           fallback_offered=self.fallback is not None)
        if req.error or req.handle is None:
            return replace(view, state="error", message=req.error or "the pipeline refused the request")
        view.run_id, view.run_url, view.kind = req.handle.run_id, req.handle.url, req.handle.kind
        status = req.status or RunStatus("queued")
        view.state = status.state
        view.message = status.message
        latest = self.store.latest_batch(req.concept, ("expansion", "al"))
        if latest is not None:
            view.batch_id = int(latest["batch_id"])
            view.new_batch = req.batch_before is None or view.batch_id > req.batch_before
            if view.new_batch and status.state == "success":
                last_ts = self._last_label_ts(req.concept)
                if last_ts is not None and req.job == "round" and not req.lookahead:
                    view.seconds_to_batch = round(float(latest["created_at"]) - last_ts, 2)
        if status.state == "success" and not view.new_batch and req.job == "round":
            view.message = view.message or "the run finished but selected no new images"
        return view

    def _last_label_ts(self, concept: str) -> float | None:
        events = self.store.label_events(concept, purpose="train")
        return float(events[-1]["ts"]) if events else None

    # ---- models ---------------------------------------------------------------------------
    def rounds_table(self, concept: str) -> list[dict[str, Any]]:
        return [
            {
                "round": int(r["round"]),
                "positive": r["n_pos"],
                "negative": r["n_neg"],
                "model_version": r["model_version"],
                "mlflow_run_id": r["mlflow_run_id"],
                "model_dir": r["model_uri"],
                "train_seconds": r["train_seconds"],
                "dagster_run_id": r["run_id"],
                "finished_at": r["finished_at"],
                "hidden": (r.get("info") or {}).get("hidden"),
                "lookahead": bool((r.get("info") or {}).get("lookahead")),
            }
            for r in self.store.rounds(concept)
        ]

    def model_dir(self, concept: str, round_index: int) -> Path:
        c = self.store.get_concept(concept)
        for r in self.store.rounds(c.name):
            if int(r["round"]) == round_index and r["model_uri"]:
                return Path(r["model_uri"])
        raise StateError(f"{c.name!r} has no trained round {round_index}")

    def export_zip(self, concept: str, round_index: int) -> tuple[str, bytes]:
        """A zip with the round's model files and a README saying how to apply it."""
        c = self.store.get_concept(concept)
        model_dir = self.model_dir(c.name, round_index)
        if not model_dir.is_dir():
            raise StateError(f"the files of round {round_index} are missing ({model_dir})")
        row = next(r for r in self.rounds_table(c.name) if r["round"] == round_index)
        embedding = "unknown"
        labels_file = model_dir / "training_labels.json"
        if labels_file.is_file():
            try:
                embedding = json.loads(labels_file.read_text()).get("embedding_model", embedding)
            except (OSError, json.JSONDecodeError):
                pass
        base = f"{concept_dir_name(c.name)}-round-{round_index:03d}"
        readme = export_readme(c, round_index, row, embedding, self.encoder_spec, base)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(model_dir.iterdir()):
                if p.is_file() and not p.is_symlink() and not p.name.startswith("."):
                    zf.write(p, f"{base}/{p.name}")
            zf.writestr(f"{base}/README.md", readme)
            zf.writestr(f"{base}/classifier.json", json.dumps({
                "concept": c.name, "round": round_index, "embedding_model": embedding,
                "encoder_spec": self.encoder_spec, "threshold": 0.5, "model_version": row["model_version"],
                "mlflow_run_id": row["mlflow_run_id"], "positive_labels": row["positive"],
                "negative_labels": row["negative"],
            }, indent=2))
        return f"{base}.zip", buf.getvalue()

    def metrics_report(self, concept: str) -> tuple[dict[str, Any] | None, float | None]:
        """The latest evaluation's ``metrics.json`` (written by ``model_metrics``) and its
        modification time, or ``(None, None)`` before the first evaluation."""
        c = self.store.get_concept(concept)
        p = self.home / "concepts" / concept_dir_name(c.name) / "metrics.json"
        try:
            return json.loads(p.read_text()), p.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            return None, None

    def health(self) -> dict[str, Any]:
        """The round worker's warm-up (see :class:`labeling_ui.trigger.InProcessTrigger`)."""
        warm_state = getattr(self.trigger, "warm_state", None)
        state = warm_state() if callable(warm_state) else {"warm": True, "preload": {}}
        return {"warm": bool(state.get("warm")), "trigger": self.trigger.describe(),
                "preload": state.get("preload", {}),
                "policy": {"auto": self.policy.auto, "lookahead": self.policy.lookahead}}

    def metrics_png(self, concept: str) -> Path | None:
        """The evaluation plot another part of the pipeline writes, if it exists."""
        c = self.store.get_concept(concept)
        p = self.home / "concepts" / concept_dir_name(c.name) / "metrics.png"
        return p if p.is_file() and not p.is_symlink() else None


def load_snippet(model_dir: str | Path) -> str:
    return (
        "from agile_pipeline.lib.training import TrainedClassifier; "
        f"clf = TrainedClassifier.load({str(model_dir)!r})"
    )


def export_readme(
    c: Concept, round_index: int, row: Mapping[str, Any], embedding: str, spec: str, base: str
) -> str:
    return f"""# Classifier for "{c.name}" (round {round_index})

Trained by Agile Modeling on {row['positive']} positive and {row['negative']} negative ratings
(MLflow model version {row['model_version'] or 'n/a'}, run {row['mlflow_run_id'] or 'n/a'}).

- Embedding model: `{embedding}` (encoder spec `{spec}`) — the classifier scores image
  *embeddings* from this model; embed new images with the same spec.
- Threshold: **0.5** on the returned probability (P(positive) >= 0.5 means "is {c.name}").
- Files: `model.pt` (PyTorch state dict), `meta.json` (architecture and training facts),
  `training_labels.json` (which labels it was trained on), `classifier.json` (this summary).

## Load and apply

```python
from agile_pipeline.lib.encoders import load_encoder
from agile_pipeline.lib.images import load_rgb
from agile_pipeline.lib.training import TrainedClassifier

clf = TrainedClassifier.load("{base}")            # this folder, unzipped
encoder = load_encoder("{spec}")                  # must give model id {embedding}
X = encoder.embed_images([load_rgb("photo.jpg")])
p = clf.predict_proba(X)                            # P(positive) per image
print(p >= 0.5)
```

Positive phrases: {", ".join(p for k, p in c.phrases if k == "positive")}
Negative phrases: {", ".join(c.negatives) or "none"}
"""
