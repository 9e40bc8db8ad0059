"""The app's own HTTP routes: images by id, ratings, model export, the evaluation plot.

These are the hot path of rating (one small JSON post per rating, one thumbnail per image), so
they bypass Gradio's queue. Every route that reads or writes data requires a signed-in rater
when auth is on; label writes always carry the signed-in name (a rater can't write as another).
Every route on a concept asks :meth:`labeling_ui.members.Members.require` for the action it
does (read, rate, train, export, manage): a user with no role on the concept gets 404, one
whose role is too low 403 with what to ask the owner for.

Exemplar images a rater uploads (``POST /api/exemplars/upload``; Gradio's own upload routes stay
closed) are checked by the safe decoder, stored under the data directory by content hash and
registered in the manifest, so they are served by ``/image/{id}`` in exactly the same way.

Images are served **only by id**: ``/image/{id}`` accepts exactly 32 lowercase hex characters,
looks the id up in the manifest, reads that one file, checks that its content still hashes to
the id (a file swapped or symlinked after ingestion is refused) and returns a re-encoded
thumbnail, never the file itself.
"""

import hashlib
import io
import json
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response

from agile_pipeline.lib.access import AccessDenied
from agile_pipeline.lib.state import StateError
from labeling_ui.config import UiSettings, valid_rater_name
from labeling_ui.context import IMAGE_ID
from labeling_ui.members import TOKEN as INVITE_TOKEN
from labeling_ui.members import InviteGone, Members
from labeling_ui.security import AuthGate, clip_echoes, scrub_home, shown
from labeling_ui.service import LabelingService

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32
INT64 = 2**63 - 1
INVITE_COOKIE = "agile-invite"
"""Holds an invite link's token across sign-in (HttpOnly, an hour); the page load redeems it."""


class BadJSON(ValueError):
    """A JSON body the app cannot take (the message says why)."""


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or abs(int(text)) > INT64:
        raise BadJSON(f"the number {shown(text, 30)} is out of range (at most 64-bit integers)")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"the number {shown(text, 30)} is out of range")
    return value


def _json_constant(text: str) -> Any:
    raise BadJSON(f"{text} is not a number JSON allows")


def _depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; :class:`BadJSON` for anything else: bytes that are not
    UTF-8, malformed or too deeply nested JSON, numbers out of range (``1e999``, ``2**70``,
    ``NaN``), a value that is not an object."""
    try:
        text = raw.decode("utf-8") if raw else "{}"
    except UnicodeDecodeError:
        raise BadJSON("the body is not valid UTF-8 text") from None
    try:
        body = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON(f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError:  # JSONDecodeError, and int() on over-long digit strings
        raise BadJSON("the body is not valid JSON") from None
    if not _depth_ok(body):
        raise BadJSON(f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    if not isinstance(body, dict):
        raise BadJSON("the body must be a JSON object")
    return body


async def bad_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's validation errors (a query or path value of the wrong type) as a 400 that
    names the value, not a 422."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    where = ", ".join(
        dict.fromkeys(str(e.get("loc", ("", "?"))[-1]) for e in errors if isinstance(e, dict))
    ) or "the request"
    return JSONResponse({"detail": f"bad value for {shown(where)}: check its type and range"}, status_code=400)


def public(value: Any, home: Path) -> Any:
    """``value`` made fit to show a rater: JSON-safe (NaN and infinities become ``null``) and
    with the server's data directory written ``$AGILE_HOME`` (no absolute server paths)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return scrub_home(value, home)
    if isinstance(value, dict):
        return {k: public(v, home) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [public(v, home) for v in value]
    return value


def public_path(path: str | None, home: Path) -> str | None:
    """A server path as shown to raters: ``$AGILE_HOME/...`` inside the data directory, else
    only its last component."""
    if not path:
        return path
    p = Path(path)
    try:
        return "$AGILE_HOME/" + p.resolve().relative_to(Path(home).resolve()).as_posix()
    except (ValueError, OSError):
        return p.name


class ThumbnailCache:
    """A small LRU of encoded thumbnails (bytes), shared by all requests."""

    def __init__(self, max_items: int = 512) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


def render_thumbnail(service: LabelingService, image_id: str, max_side: int) -> bytes | None:
    """JPEG bytes of the image with this id, or ``None`` (unknown id, file gone or changed)."""
    from agile_pipeline.lib.images import DEFAULT_MAX_BYTES, ImageRejected, load_rgb, read_bytes

    path = service.store.image_path(image_id)
    if path is None:
        return None
    try:
        data = read_bytes(path, max_bytes=DEFAULT_MAX_BYTES)
        if hashlib.blake2b(data, digest_size=16).hexdigest() != image_id:
            log.warning("image %s: file %s changed since ingestion; not served", image_id, path)
            return None
        im = load_rgb(data, max_side=max_side)
    except ImageRejected as exc:
        log.warning("image %s unreadable or undecodable: %s", image_id, exc)
        return None
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88, optimize=False)
    return buf.getvalue()


def _phrases(value: Any) -> list[str]:
    """Phrases from JSON: a list of strings, or one string with a phrase per line."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HTTPException(status_code=400, detail="phrases must be a list of strings")
    return list(value)


def check_batch_ids(events: list[Any]) -> None:
    """A 400 for a ``batch_id`` no batch can have (beyond 64 bits); the ratings check the rest."""
    for e in events:
        b = e.get("batch_id") if isinstance(e, dict) else None
        if isinstance(b, bool):
            raise HTTPException(status_code=400, detail="batch_id must be a number; reload the page")
        if isinstance(b, int | float | str):
            try:
                n = int(b)
            except (ValueError, OverflowError):
                continue
            if abs(n) > INT64:
                raise HTTPException(status_code=400, detail=f"batch_id {shown(b, 30)} is out of range; reload the page")


def build_router(service: LabelingService, gate: AuthGate, settings: UiSettings) -> APIRouter:
    router = APIRouter()
    thumbs = ThumbnailCache()
    access = Members.for_app(service.context, settings)

    def signed_in(request: Request) -> str | None:
        """The signed-in rater; 401 when auth is on and nobody is signed in."""
        user = gate.user(request.cookies)
        if gate.enabled and not user:
            raise HTTPException(status_code=401, detail="sign in first")
        return user

    def rater_for(request: Request, claimed: Any) -> str:
        user = signed_in(request)
        claimed_s = str(claimed).strip() if isinstance(claimed, str) else ""
        if user is not None:
            if claimed_s and claimed_s != user:
                raise HTTPException(
                    status_code=403,
                    detail=f"you are signed in as {user!r}; you cannot rate as {shown(claimed_s)!r}",
                )
            return user
        if not claimed_s or not valid_rater_name(claimed_s):
            raise HTTPException(status_code=400, detail="tell us your name first (1-64 letters or digits)")
        return claimed_s

    def same_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin and origin.rstrip("/") != str(request.base_url).rstrip("/"):
            host = request.headers.get("host", "")
            if origin.split("://", 1)[-1].rstrip("/") != host:
                raise HTTPException(status_code=403, detail="cross-origin request refused")

    async def json_body(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":  # also stops cross-site HTML form posts (CSRF)
            raise HTTPException(status_code=415, detail="send application/json")
        same_origin(request)
        raw = await request.body()
        if len(raw) > MAX_JSON_BYTES:
            raise HTTPException(status_code=413, detail="request too large")
        try:
            return parse_json_body(raw)
        except BadJSON as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    def user_error(exc: StateError) -> HTTPException:
        if isinstance(exc, AccessDenied):  # no role at all reads like an unknown concept
            return HTTPException(status_code=404 if exc.role is None else 403, detail=clip_echoes(str(exc)))
        return HTTPException(status_code=400, detail=public(clip_echoes(str(exc).strip("'\"")), service.home))

    def allowed(request: Request, concept: Any, action: str) -> tuple[str | None, str]:
        """(the signed-in user, the concept's name) when they may do ``action`` on it."""
        user = signed_in(request)
        try:
            return user, access.require(str(concept or ""), user, action).name
        except StateError as exc:
            raise user_error(exc) from exc

    @router.get("/image/{image_id}", include_in_schema=False)
    def image(image_id: str, request: Request) -> Response:
        signed_in(request)
        if not IMAGE_ID.match(image_id):
            raise HTTPException(status_code=404, detail="not found")
        key = (image_id, settings.thumb_side)
        data = thumbs.get(key)
        if data is None:
            data = render_thumbnail(service, image_id, settings.thumb_side)
            if data is None:
                raise HTTPException(status_code=404, detail="not found")
            thumbs.put(key, data)
        return Response(
            content=data, media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=86400, immutable", "ETag": f'"{image_id}"'},
        )

    @router.get("/api/session", include_in_schema=False)
    def session(request: Request) -> dict[str, Any]:
        user = signed_in(request)
        return {"auth": gate.enabled, "user": user,
                "concepts": access.visible(user)}

    @router.get("/api/batch", include_in_schema=False)
    def batch(request: Request, concept: str, rater: str = "", purpose: str = "train") -> dict[str, Any]:
        who = rater_for(request, rater) if (rater or gate.enabled) else None
        if purpose not in ("train", "eval"):
            raise HTTPException(status_code=400, detail="purpose is train or eval")
        allowed(request, concept, "read")
        try:
            return public(service.ratings.batch_view(concept, who, purpose), service.home)  # type: ignore[arg-type]
        except StateError as exc:
            raise user_error(exc) from exc

    @router.post("/api/labels", include_in_schema=False)
    async def labels(request: Request) -> JSONResponse:
        body = await json_body(request)
        who = rater_for(request, body.get("rater"))
        events = body.get("events")
        if not isinstance(events, list):
            raise HTTPException(status_code=400, detail="events must be a list")
        check_batch_ids(events)
        for concept in dict.fromkeys(str(e.get("concept", "")) for e in events if isinstance(e, dict)):
            allowed(request, concept, "rate")
        try:
            from starlette.concurrency import run_in_threadpool

            result = await run_in_threadpool(service.ratings.record_labels, events, rater=who)
        except StateError as exc:
            raise user_error(exc) from exc
        return JSONResponse({"ok": True, "rater": who, "acked": [str(e.get("event_id")) for e in events], **result})

    @router.post("/api/exemplars", include_in_schema=False)
    async def add_exemplar(request: Request) -> JSONResponse:
        """Mark an image as an exemplar of the concept (stored with it, and the rater's label)."""
        body = await json_body(request)
        who = rater_for(request, body.get("rater"))
        image_id = body.get("image_id")
        if not isinstance(image_id, str) or not IMAGE_ID.match(image_id):
            raise HTTPException(status_code=400, detail="image_id must be a 32-character hex id")
        polarity = body.get("polarity", "positive")
        allowed(request, body.get("concept"), "rate")
        try:
            from starlette.concurrency import run_in_threadpool

            exemplars = await run_in_threadpool(
                service.exemplars.add_exemplar, str(body.get("concept", "")), image_id, rater=who, polarity=str(polarity),
            )
        except StateError as exc:
            raise user_error(exc) from exc
        return JSONResponse({"ok": True, "rater": who, "exemplars": exemplars})

    @router.post("/api/exemplars/upload", include_in_schema=False)
    async def upload_exemplar(
        request: Request, concept: str = "", polarity: str = "positive", rater: str = "", name: str = "",
    ) -> JSONResponse:
        """Upload an image file as an exemplar: the body is the file itself.

        Query: ``concept``, ``polarity`` (positive/negative), ``name`` (the file's name, for
        the record) and, without sign-in, ``rater``. With sign-in the exemplar is always the
        signed-in rater's. The body must be ``application/octet-stream`` or ``image/*`` (a
        cross-site form cannot send that without a CORS preflight, which is refused) and at most
        ``settings.upload_max_bytes``; the image is checked by the safe decoder and embedded.
        """
        who = rater_for(request, rater)
        same_origin(request)
        allowed(request, concept, "rate")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream" and not ctype.startswith("image/"):
            raise HTTPException(
                status_code=415,
                detail="send the image file itself as the body (application/octet-stream or image/*)",
            )
        cap = settings.upload_max_bytes
        too_big = f"the file is over the upload limit of {cap / (1024 * 1024):.1f} MB; upload a smaller version"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise HTTPException(status_code=413, detail=too_big)
        parts: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise HTTPException(status_code=413, detail=too_big)
            parts.append(chunk)
        from starlette.concurrency import run_in_threadpool

        from agile_pipeline.lib.uploads import (
            EmbeddingUnavailable,
            UploadQuota,
            UploadQuotaExceeded,
            UploadRejected,
            UploadsBusy,
            clean_filename,
        )

        quota = UploadQuota(
            per_rater=settings.uploads_per_rater_hour, bytes_per_rater=settings.upload_bytes_per_rater_hour,
            per_concept=settings.uploads_per_concept, bytes_per_concept=settings.upload_bytes_per_concept,
        )
        try:
            result = await run_in_threadpool(
                service.exemplars.upload_exemplar, concept, b"".join(parts), rater=who, polarity=polarity,
                filename=name, max_bytes=cap, quota=quota,
            )
        except UploadQuotaExceeded as exc:
            retry = {"Retry-After": str(int(exc.retry_after) + 1)} if exc.retry_after else None
            raise HTTPException(status_code=429, detail=f"upload refused: {exc}", headers=retry) from exc
        except UploadRejected as exc:
            status = 413 if exc.reason == "too_large_file" else 400
            file_name = clean_filename(name, 80)
            what = f"“{file_name}”" if file_name else "this file"
            raise HTTPException(status_code=status, detail=f"cannot use {what} as an exemplar: {exc}") from exc
        except StateError as exc:
            raise user_error(exc) from exc
        except UploadsBusy as exc:
            raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "5"}) from exc
        except EmbeddingUnavailable as exc:
            log.warning("exemplar upload for %r failed: %s", concept, exc)
            raise HTTPException(
                status_code=503,
                detail="the image is fine but could not be embedded now (embedding model or vector "
                       "store unavailable); try again later",
            ) from exc
        return JSONResponse({"ok": True, "rater": who, **result})

    @router.get("/api/search", include_in_schema=False)
    def search(request: Request, concept: str, q: str = "", k: int = 24) -> dict[str, Any]:
        """Images nearest to a few words, to find an exemplar when no batch holds a positive."""
        allowed(request, concept, "rate")
        try:
            return {"items": service.exemplars.search_images(concept, q, k)}
        except StateError as exc:
            raise user_error(exc) from exc
        except Exception as exc:  # no embeddings yet, model files missing ...
            log.warning("search for %r failed: %s", concept, exc)
            raise HTTPException(status_code=503, detail="search is not available yet (no image embeddings)") from exc

    # ---- concepts and rounds as JSON (scripts, benchmarks, other front ends) -------------
    @router.get("/api/health", include_in_schema=False)
    def health(request: Request) -> dict[str, Any]:
        """Whether the round worker is warm (everything a round needs is loaded)."""
        signed_in(request)
        return public(service.rounds.health(), service.home)

    @router.post("/api/concepts", include_in_schema=False)
    async def create_concept(request: Request) -> JSONResponse:
        """Create a concept and start finding its first images (as the Concept tab does)."""
        body = await json_body(request)
        who = rater_for(request, body.get("rater"))
        from starlette.concurrency import run_in_threadpool

        def create() -> dict[str, Any]:
            c = service.ratings.create_concept(
                str(body.get("name", "")), _phrases(body.get("positives")),
                _phrases(body.get("negatives")), str(body.get("instructions") or ""), owner=who,
            )
            view = service.rounds.start_concept(c.name, requested_by=who)
            return {"concept": service.ratings.concept_view(c.name), "round": view.to_dict()}

        try:
            return JSONResponse(public(await run_in_threadpool(create), service.home))
        except StateError as exc:
            raise user_error(exc) from exc

    @router.post("/api/rounds", include_in_schema=False)
    async def request_round(request: Request) -> JSONResponse:
        """Ask for a round (``job``: ``round``), the evaluation (``eval``) or a new search
        for the first images (``start``); returns the concept's round state."""
        body = await json_body(request)
        who = rater_for(request, body.get("rater"))
        job = body.get("job", "round")
        if job not in ("round", "eval", "start"):
            raise HTTPException(status_code=400, detail="job is round, eval or start")
        _, concept = allowed(request, body.get("concept"), "train")
        from starlette.concurrency import run_in_threadpool

        ask = {"round": service.rounds.request_round, "eval": service.rounds.request_eval,
               "start": service.rounds.start_concept}[job]
        try:
            view = await run_in_threadpool(lambda: ask(concept, requested_by=who))
        except StateError as exc:
            raise user_error(exc) from exc
        return JSONResponse(public(view.to_dict(), service.home))

    @router.get("/api/round", include_in_schema=False)
    def round_state(request: Request, concept: str) -> dict[str, Any]:
        """The concept's latest round request: state, run, whether a new batch is there."""
        _, name = allowed(request, concept, "read")
        return public(service.rounds.round_view(name).to_dict(), service.home)

    @router.get("/api/models", include_in_schema=False)
    def models(request: Request, concept: str) -> dict[str, Any]:
        """Every round's model, and the metrics of the latest evaluation (``null`` before)."""
        _, name = allowed(request, concept, "read")
        try:
            metrics, mtime = service.export.metrics_report(name)
            rounds = [{**r, "model_dir": public_path(r.get("model_dir"), service.home)}
                      for r in service.rounds.rounds_table(name)]
            return public({"rounds": rounds, "metrics": metrics, "metrics_mtime": mtime}, service.home)
        except StateError as exc:
            raise user_error(exc) from exc

    @router.get("/api/agreement", include_in_schema=False)
    def agreement(request: Request, concept: str) -> dict[str, Any]:
        """Agreement among the concept's raters, train and eval apart: Krippendorff's alpha
        (``null`` with ``alpha_note`` when undefined) over the co-rated images, each rater against
        the owner, the review queue (its image ids) and the label rule that trains the rounds."""
        allowed(request, concept, "read")
        try:
            return public(service.ratings.agreement(concept), service.home)
        except StateError as exc:
            raise user_error(exc) from exc

    @router.get("/export/{concept}/round-{round_index}.zip", include_in_schema=False)
    def export(concept: str, round_index: int, request: Request) -> Response:
        user = signed_in(request)
        try:
            access.require(concept, user, "export")
            name, data = service.export.export_zip(concept, round_index)
        except StateError as exc:
            raise HTTPException(status_code=403 if getattr(exc, "role", None) else 404,
                                detail=user_error(exc).detail) from exc
        return Response(
            content=data, media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
        )

    @router.get("/metrics/{concept}.png", include_in_schema=False)
    def metrics(concept: str, request: Request) -> Response:
        allowed(request, concept, "read")
        try:
            path = service.export.metrics_png(concept)
        except StateError as exc:
            raise HTTPException(status_code=404, detail="not found") from exc
        if path is None:
            raise HTTPException(status_code=404, detail="no evaluation plot yet")
        return Response(content=path.read_bytes(), media_type="image/png", headers={"Cache-Control": "no-cache"})

    # ---- teams: review decisions, invites, members (owners only) -------------------------
    @router.post("/api/review", include_in_schema=False)
    async def review(request: Request) -> JSONResponse:
        """The owner decides an image of the review queue: ``concept``, ``image_id``, ``label``
        (positive/negative), optional ``purpose`` (train/eval); it becomes the owner's label."""
        body = await json_body(request)
        _, concept = allowed(request, body.get("concept"), "manage")
        try:
            return JSONResponse(service.ratings.decide_review(
                concept, str(body.get("image_id", "")), str(body.get("label", "")),
                purpose=str(body.get("purpose", "train"))))  # type: ignore[arg-type]
        except StateError as exc:
            raise user_error(exc) from exc

    @router.get("/api/members", include_in_schema=False)
    def members(request: Request, concept: str) -> dict[str, Any]:
        """A concept's members and invites with their status (owners only; tokens never shown)."""
        user, name = allowed(request, concept, "manage")
        return access.overview(name, user)

    @router.post("/api/members", include_in_schema=False)
    async def change_member(request: Request) -> JSONResponse:
        """Give a user a role (``role``: rater/viewer) on a concept, or take it (``role``: none)."""
        body = await json_body(request)
        user, concept = allowed(request, body.get("concept"), "manage")
        member, role = str(body.get("user", "")).strip(), str(body.get("role", ""))
        try:
            if role == "none":
                access.remove(concept, user, member)
            else:
                access.grant(concept, user, member, role)
        except StateError as exc:
            raise user_error(exc) from exc
        return JSONResponse(access.overview(concept, user))

    @router.post("/api/invites", include_in_schema=False)
    async def create_invite(request: Request) -> JSONResponse:
        """A new invite link (``role``: rater/viewer, ``expires``: never or e.g. 7d, ``note``);
        its token is in the answer once and never again."""
        body = await json_body(request)
        user, concept = allowed(request, body.get("concept"), "manage")
        try:
            token, row = access.create_invite(
                concept, user, role=str(body.get("role", "rater")), lifetime=str(body.get("expires", "7d")),
                note=str(body.get("note", "")))
        except StateError as exc:
            raise user_error(exc) from exc
        row = {k: v for k, v in row.items() if k != "token_sha256"}
        return JSONResponse({"link": f"/invite/{token}", "token": token, "invite": row})

    @router.post("/api/invites/revoke", include_in_schema=False)
    async def revoke_invite(request: Request) -> JSONResponse:
        body = await json_body(request)
        user, concept = allowed(request, body.get("concept"), "manage")
        try:
            row = access.revoke_invite(concept, user, str(body.get("invite_id", "")))
        except StateError as exc:
            raise user_error(exc) from exc
        return JSONResponse({k: v for k, v in row.items() if k != "token_sha256"})

    @router.get("/invite/{token}", include_in_schema=False)
    def accept_invite(token: str, request: Request) -> Response:
        """An invite link. Signed in: join the concept and open it. Not yet: keep the token in
        a short-lived cookie and go to sign-in; the page redeems it when it loads."""
        if not INVITE_TOKEN.match(token):
            raise HTTPException(status_code=404, detail="this invite link is not valid: check that it was copied whole")
        user = gate.user(request.cookies)
        if gate.enabled and not user:
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(INVITE_COOKIE, token, max_age=3600, httponly=True, samesite="lax", path="/")
            return resp
        try:
            concept = access.redeem(token, user)
        except StateError as exc:
            raise HTTPException(status_code=410 if isinstance(exc, InviteGone) else 400, detail=str(exc)) from exc
        resp = RedirectResponse("/?" + urlencode({"concept": concept}), status_code=303)
        resp.delete_cookie(INVITE_COOKIE, path="/")
        return resp

    return router
