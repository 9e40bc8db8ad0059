"""Corpus ingestion: sources, content-hash ids, dedup and the deterministic split.

A *source* is a folder (scanned recursively), a text file with one path or URL per line, or
a parquet file with a ``url`` column (LAION style). Every image gets a stable id from its
content hash, so identical content is ingested once whatever its name; a URI already seen
is not read again (incremental refresh).
"""

import fcntl
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agile_pipeline.lib.images import ImageRejected, inspect_image, read_bytes
from agile_pipeline.lib.state import StateStore

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif", ".pjpeg",
    ".ppm", ".pgm", ".ico",
}
# Files a corpus folder commonly holds beside its images (labels, notes): not even tried.
IGNORED_SUFFIXES = {".txt", ".csv", ".json", ".md", ".parquet", ".py", ".yaml", ".yml"}
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 20.0


class SourceError(ValueError):
    """The source itself cannot be used (missing path, unreadable list, bad parquet)."""


@dataclass(frozen=True)
class SourceItem:
    uri: str
    path: Path | None  # local file, or None for a URL
    size: int | None
    mtime: float | None


@dataclass
class IngestReport:
    source: str
    seen: int = 0
    unchanged: int = 0
    ingested: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one example uri

    def as_metadata(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files_seen": self.seen,
            "unchanged_since_last_scan": self.unchanged,
            "ingested": self.ingested,
            "duplicates": self.duplicates,
            "skipped_total": sum(self.skipped.values()),
            **{f"skipped_{k}": v for k, v in sorted(self.skipped.items())},
            "seconds": round(self.seconds, 2),
        }


def image_id_for(data: bytes) -> str:
    """Stable id from content: BLAKE2b-128 of the bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def describe_source(spec: str) -> str:
    """Canonical text of a source (absolute path for local ones) used as its key."""
    if _is_url(spec):
        return spec
    return str(Path(spec).expanduser().resolve())


# ---- the registered sources: what scheduled refreshes and the sensor ingest ----------------
def registered_sources(registry: Path) -> list[str]:
    """The registered sources (canonical, see :func:`describe_source`), oldest first."""
    try:
        text = Path(registry).read_text()
    except FileNotFoundError:
        return []
    return [str(s) for s in json.loads(text)]


def _write_registry(registry: Path, sources: list[str]) -> None:
    tmp = registry.with_name(registry.name + ".tmp")
    tmp.write_text(json.dumps(sources, indent=1))
    tmp.replace(registry)


@contextmanager
def _registry_lock(registry: Path) -> Iterator[None]:
    """An exclusive lock around a read-modify-write of the registry (across processes)."""
    registry.parent.mkdir(parents=True, exist_ok=True)
    with registry.with_name(registry.name + ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def register_sources(registry: Path, sources: list[str]) -> list[str]:
    """Remember sources so the schedule and sensor refresh them; returns the full list.

    Callers register a source only once it has been ingested: a source that cannot be read
    (a mistyped path) is never registered, so it cannot make every later refresh fail.
    """
    registry = Path(registry)
    with _registry_lock(registry):
        known = registered_sources(registry)
        added = False
        for s in sources:
            canonical = describe_source(s)
            if canonical not in known:
                known.append(canonical)
                added = True
        if added or not registry.exists():
            _write_registry(registry, known)
    return known


def remove_source(registry: Path, spec: str) -> str:
    """Unregister a source (as given, or its canonical form); returns the entry removed.

    Its images stay in the corpus (labels may name them); only refreshes stop reading it.
    Raises :class:`SourceError` listing the registered sources when ``spec`` is not one.
    """
    registry = Path(registry)
    with _registry_lock(registry):
        known = registered_sources(registry)
        for candidate in (spec, describe_source(spec)):
            if candidate in known:
                known.remove(candidate)
                _write_registry(registry, known)
                return candidate
    listed = ", ".join(repr(s) for s in known) or "none"
    raise SourceError(f"{spec!r} is not a registered source (registered: {listed}); "
                      "`agile sources list` shows them")


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https")


def scan_source(spec: str) -> Iterator[SourceItem]:
    """List a source's items. Raises :class:`SourceError` naming the path if unreachable."""
    if _is_url(spec):
        yield SourceItem(spec, None, None, None)
        return
    root = Path(spec).expanduser()
    if not root.exists():
        raise SourceError(f"source {str(root)!r} does not exist: check the path (it is resolved "
                          f"relative to {os.getcwd()})")
    if root.is_dir():
        yield from _scan_folder(root.resolve())
    elif root.suffix.lower() == ".parquet":
        yield from _scan_parquet(root)
    elif root.suffix.lower() in IMAGE_SUFFIXES:
        st = root.stat()
        yield SourceItem(str(root.resolve()), root.resolve(), st.st_size, st.st_mtime)
    else:
        yield from _scan_list(root)


def _scan_folder(root: Path) -> Iterator[SourceItem]:
    try:
        os.listdir(root)
    except OSError as exc:
        raise SourceError(f"cannot read source folder {str(root)!r}: {exc.strerror}") from exc
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.suffix.lower() in IGNORED_SUFFIXES:
                continue  # other extensions are tried: the content decides
            try:
                st = p.lstat()
            except OSError:
                continue
            if not p.is_file() or p.is_symlink():
                # symlinks are followed only if they stay inside the source folder
                if p.is_symlink():
                    target = p.resolve()
                    if not target.is_relative_to(root) or not target.is_file():
                        continue
                    st = target.stat()
                else:
                    continue
            yield SourceItem(str(p), p, st.st_size, st.st_mtime)


def _scan_list(path: Path) -> Iterator[SourceItem]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise SourceError(f"cannot read source list {str(path)!r}: {exc.strerror}") from exc
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        yield _item_for_entry(entry, base=path.parent)


def _scan_parquet(path: Path) -> Iterator[SourceItem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise SourceError(f"cannot read parquet source {str(path)!r}: {exc}") from exc
    cols = pf.schema_arrow.names
    col = next((c for c in ("url", "URL", "path") if c in cols), None)
    if col is None:
        raise SourceError(f"parquet source {str(path)!r} has no 'url' column (columns: {cols})")
    for batch in pf.iter_batches(columns=[col], batch_size=65536):
        for value in batch.column(0).to_pylist():
            if value:
                yield _item_for_entry(str(value).strip(), base=path.parent)


def _item_for_entry(entry: str, base: Path) -> SourceItem:
    if _is_url(entry):
        return SourceItem(entry, None, None, None)
    p = Path(entry).expanduser()
    if not p.is_absolute():
        p = base / p
    try:
        st = p.stat()
        return SourceItem(str(p.resolve()), p.resolve(), st.st_size, st.st_mtime)
    except OSError:
        return SourceItem(str(p), p, None, None)


# ---- fetching ----------------------------------------------------------------------------
# What a URL may reach. Default: public addresses only, checked for the URL, for every redirect
# target and again for the address actually connected to (a DNS answer that changes between
# the check and the connection cannot slip a private address in). ``AGILE_ALLOW_PRIVATE_URLS``
# opts in: ``1`` allows every address (a corpus on your own network), ``HOST:PORT[,...]``
# allows exactly those endpoints and keeps refusing every other non-public one, redirects
# included (what the tests' local server uses).
ENV_ALLOW_PRIVATE = "AGILE_ALLOW_PRIVATE_URLS"
MAX_DOWNLOAD_SECONDS = 120.0  # the whole download, however slowly the server trickles bytes


@dataclass(frozen=True)
class UrlPolicy:
    """Which non-public endpoints a download may reach (public ones always may)."""

    allow_private: bool = False
    endpoints: frozenset[tuple[str, int]] = frozenset()  # (ip address, port)

    @classmethod
    def from_env(cls) -> "UrlPolicy":
        raw = os.environ.get(ENV_ALLOW_PRIVATE, "").strip()
        if raw in ("", "0"):
            return cls()
        if raw == "1":
            return cls(allow_private=True)
        endpoints: set[tuple[str, int]] = set()
        for entry in filter(None, (e.strip() for e in raw.split(","))):
            host, sep, port = entry.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"{ENV_ALLOW_PRIVATE} entry {entry!r} must be HOST:PORT (or the "
                                 "whole variable 1 to allow every address)")
            host = host.strip("[]")
            for info in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP):
                endpoints.add((str(ipaddress.ip_address(info[4][0])), int(port)))
        return cls(endpoints=frozenset(endpoints))

    def check_address(self, url: str, addr: str, port: int) -> None:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if ip.is_global and not (ip.is_multicast or ip.is_reserved):
            return
        if self.allow_private or (str(ip), port) in self.endpoints:
            return
        raise ImageRejected("unreadable", f"refused {url}: its host resolves to a non-public address {ip}")


def _default_port(parsed: urllib.parse.ParseResult) -> int:
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def check_public_url(url: str, *, allow_private: bool = False, policy: UrlPolicy | None = None) -> None:
    """Refuse URLs whose host resolves to a private, loopback, link-local or other non-public
    address, unless ``policy`` (default: from ``AGILE_ALLOW_PRIVATE_URLS``) allows it."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ImageRejected("unreadable", f"not an http(s) URL: {url}")
    if allow_private:
        return
    try:
        policy = policy or UrlPolicy.from_env()
        port = _default_port(parsed)
    except ValueError as exc:
        raise ImageRejected("unreadable", f"{url}: {exc}") from exc
    if policy.allow_private:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot resolve {parsed.hostname}: {exc}") from exc
    for info in infos:
        policy.check_address(url, str(info[4][0]), port)


class _PeerChecked:
    """Mixin for ``http.client`` connections: after connecting, the peer address itself must
    pass the policy (when the connection is direct, not through a proxy)."""

    policy: UrlPolicy
    check_peer: bool

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        if self.check_peer and not self.policy.allow_private:
            addr, port = self.sock.getpeername()[:2]  # type: ignore[attr-defined]
            try:
                self.policy.check_address(f"{addr}:{port}", str(addr), int(port))
            except ImageRejected:
                self.sock.close()  # type: ignore[attr-defined]
                raise


class _CheckedHTTP(_PeerChecked, http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: UrlPolicy, check_peer: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy, self.check_peer = policy, check_peer


class _CheckedHTTPS(_PeerChecked, http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: UrlPolicy, check_peer: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy, self.check_peer = policy, check_peer


def _direct(req: urllib.request.Request) -> bool:
    return not req.has_proxy() and not getattr(req, "_tunnel_host", None)


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_CheckedHTTP, req, policy=self.policy, check_peer=_direct(req))


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__()
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_CheckedHTTPS, req, context=self._context,  # type: ignore[attr-defined]
                            policy=self.policy, check_peer=_direct(req))


class _NoPrivateRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: UrlPolicy | None = None) -> None:
        super().__init__()
        self.policy = policy

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        check_public_url(newurl, policy=self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(
    url: str,
    *,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    deadline_s: float = MAX_DOWNLOAD_SECONDS,
    policy: UrlPolicy | None = None,
) -> bytes:
    """Download with a size cap, a per-read timeout, a deadline for the whole body and no
    connection to a non-public address (redirects included). The Content-Type header is not
    trusted: what the bytes are is decided by decoding them (:func:`inspect_image`)."""
    try:
        policy = policy or UrlPolicy.from_env()
    except ValueError as exc:
        raise ImageRejected("unreadable", f"{url}: {exc}") from exc
    check_public_url(url, policy=policy)
    opener = urllib.request.build_opener(
        _NoPrivateRedirects(policy), _CheckedHTTPHandler(policy), _CheckedHTTPSHandler(policy)
    )
    req = urllib.request.Request(url, headers={"User-Agent": "agile-modeling/0.1"})
    started = time.monotonic()
    chunks: list[bytes] = []
    got = 0
    try:
        with opener.open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageRejected("too_large_file", f"{url} is {length} bytes (cap {max_bytes})")
            while got <= max_bytes:
                chunk = resp.read1(min(1 << 16, max_bytes + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                if time.monotonic() - started > deadline_s:
                    raise ImageRejected("unreadable", f"download of {url} took longer than {deadline_s:g}s")
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected("unreadable", f"download failed for {url}: {exc}") from exc
    if got > max_bytes:
        raise ImageRejected("too_large_file", f"{url} exceeds {max_bytes} bytes")
    return b"".join(chunks)


# ---- ingestion ---------------------------------------------------------------------------
def _read_item(item: SourceItem) -> bytes:
    if item.path is not None:
        return read_bytes(item.path)
    return fetch_url(item.uri)


def ingest_source(
    spec: str,
    store: StateStore,
    *,
    blob_dir: Path,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> IngestReport:
    """Ingest new items of a source into the manifest.

    Unchanged URIs (same size and mtime as last scan) are not read again. Each new file is
    fully decoded once to validate it; bad files are recorded with their reason and never
    fail the run. Identical content (same hash) and repeated URIs count as duplicates.
    New rows have no split yet: the ``train_test_assignment`` step assigns it.
    """
    started = time.perf_counter()
    source = describe_source(spec)
    report = IngestReport(source=source)
    known = store.known_uris(source)
    items: list[SourceItem] = []
    seen_uris: set[str] = set()
    for item in scan_source(spec):
        report.seen += 1
        if item.uri in seen_uris:
            report.duplicates += 1
            continue
        seen_uris.add(item.uri)
        prev = known.get(item.uri)
        if prev is not None and (item.path is None or prev == (item.size, item.mtime)):
            report.unchanged += 1
            continue
        items.append(item)

    def work(item: SourceItem) -> tuple[SourceItem, dict[str, Any]]:
        try:
            data = _read_item(item)
            info = inspect_image(data)
        except ImageRejected as exc:
            return item, {"status": "skipped", "reason": exc.reason, "detail": exc.detail}
        except Exception as exc:  # never let one file fail the run
            return item, {"status": "skipped", "reason": "unreadable", "detail": repr(exc)}
        image_id = image_id_for(data)
        path = item.path
        if path is None:  # downloaded: keep the bytes, addressed by content
            path = blob_dir / image_id[:2] / f"{image_id}.{info.format.lower()}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                tmp = path.with_suffix(".part")
                tmp.write_bytes(data)
                tmp.replace(path)
        return item, {
            "status": "ok", "id": image_id, "path": str(path), "size": len(data),
            "width": info.width, "height": info.height, "format": info.format,
            "n_frames": info.n_frames,
        }

    batch_images: list[dict[str, Any]] = []
    batch_log: list[dict[str, Any]] = []
    ids_this_run: set[str] = set()

    def flush() -> None:
        if batch_images or batch_log:
            store.record_ingest(batch_images, batch_log)
            batch_images.clear()
            batch_log.clear()

    now = time.time()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for item, res in pool.map(work, items):
            row = {"uri": item.uri, "size": item.size, "mtime": item.mtime, "source": source,
                   "seen_at": now, "reason": None, "image_id": None}
            if res["status"] == "skipped":
                report.skipped[res["reason"]] += 1
                report.examples.setdefault(res["reason"], f"{item.uri}: {res['detail']}")
                log.info("skipped %s: %s (%s)", item.uri, res["reason"], res["detail"])
                batch_log.append({**row, "status": "skipped", "reason": res["reason"]})
            else:
                image_id = res["id"]
                row["image_id"] = image_id
                if image_id in ids_this_run or store.has_image(image_id):
                    report.duplicates += 1
                    batch_log.append({**row, "status": "duplicate"})
                else:
                    ids_this_run.add(image_id)
                    report.ingested += 1
                    batch_images.append({
                        **{k: res[k] for k in ("id", "path", "size", "width", "height", "format", "n_frames")},
                        "uri": item.uri, "split": None, "source": source, "ingested_at": now,
                    })
                    batch_log.append({**row, "status": "ingested"})
            if progress:
                progress(1)
            if len(batch_log) >= 500:
                flush()
    flush()
    report.seconds = time.perf_counter() - started
    return report
