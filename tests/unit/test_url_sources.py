"""URL sources against real local HTTP servers (``http.server`` in threads, real sockets).

Loopback is refused by default, so the good cases opt in with ``AGILE_ALLOW_PRIVATE_URLS`` set
to the test server's own ``HOST:PORT`` only: a redirect from it to any other non-public
endpoint (another local server, link-local metadata, RFC 1918, ``file:``) is still refused,
and the other local server is shown never to be contacted.
"""

import hashlib
import io
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from agile_pipeline.lib.corpus import (
    ENV_ALLOW_PRIVATE,
    UrlPolicy,
    _CheckedHTTPHandler,
    check_public_url,
    fetch_url,
    ingest_source,
)
from agile_pipeline.lib.images import ImageRejected
from agile_pipeline.lib.state import StateStore

Route = Callable[[BaseHTTPRequestHandler], None]


def png_bytes(color: tuple[int, int, int], size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


GOOD = png_bytes((200, 30, 30))
GOOD_AS_HTML = png_bytes((30, 200, 30))
GOOD_AFTER_REDIRECT = png_bytes((30, 30, 200))
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)>not an image</body></html>"


@dataclass
class Server:
    url: str
    host: str
    port: int
    hits: list[str] = field(default_factory=list)


def _send(h: BaseHTTPRequestHandler, body: bytes, ctype: str, status: int = 200, length: bool = True) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    if length:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Route]], Server]]:
    """Start real HTTP servers on 127.0.0.1 (free ports); each records the paths it was asked."""
    servers: list[ThreadingHTTPServer] = []

    def start(routes: dict[str, Route]) -> Server:
        hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                route = routes.get(self.path)
                if route is None:
                    _send(self, b"not found", "text/plain", 404)
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def log_message(self, format: str, *args: object) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        servers.append(httpd)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        host, port = httpd.server_address[:2]
        return Server(f"http://{host}:{port}", str(host), int(port), hits)

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def internal(serve: Callable[[dict[str, Route]], Server]) -> Server:
    """A private service on this machine that must never be reached through a URL source."""
    return serve({"/secret": lambda h: _send(h, b"root:x:0:0:secret", "text/plain")})


def redirect(to: str) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def slow_headers(seconds: float) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        _send(h, GOOD, "image/png")

    return route


def trickle(n: int, every_s: float) -> Route:
    """Headers at once, then one byte every ``every_s``: each read is quick, the whole is not."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(n))
        h.end_headers()
        for k in range(n):
            h.wfile.write(GOOD[k : k + 1] or b"\0")
            h.wfile.flush()
            time.sleep(every_s)

    return route


def stream(total: int, *, chunked: bool) -> Route:
    """``total`` bytes without a Content-Length (close-delimited, or chunked)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        block = b"\x89PNG" + b"\0" * 65532
        if chunked:
            h.protocol_version = "HTTP/1.1"
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
            h.send_header("Connection", "close")
        h.end_headers()
        sent = 0
        while sent < total:
            if chunked:
                h.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            else:
                h.wfile.write(block)
            sent += len(block)
        if chunked:
            h.wfile.write(b"0\r\n\r\n")

    return route


def big_declared(n: int) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(n))
        h.end_headers()
        h.wfile.write(b"\0" * 1024)  # the client must not wait for the rest

    return route


@pytest.fixture
def origin(serve: Callable[[dict[str, Route]], Server], internal: Server) -> Server:
    """The test's image server, with honest, lying, slow, huge and redirecting routes."""
    routes: dict[str, Route] = {
        "/good.png": lambda h: _send(h, GOOD, "image/png"),
        "/photo": lambda h: _send(h, GOOD_AS_HTML, "text/html; charset=utf-8"),
        "/fake.png": lambda h: _send(h, HTML, "image/png"),
        "/empty.png": lambda h: _send(h, b"", "image/png"),
        "/moved.png": redirect("/elsewhere/real.png"),
        "/elsewhere/real.png": lambda h: _send(h, GOOD_AFTER_REDIRECT, "image/png"),
        "/to-internal": redirect(f"{internal.url}/secret"),
        "/to-internal-by-name": redirect(f"http://localhost:{internal.port}/secret"),
        "/to-internal-v6": redirect(f"http://[::ffff:127.0.0.1]:{internal.port}/secret"),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-lan": redirect("http://10.0.0.1/router.png"),
        "/to-file": redirect("file:///etc/passwd"),
        "/slow": slow_headers(3.0),
        "/trickle": trickle(200, 0.05),
        "/big-declared": big_declared(5 * 1024 * 1024),
        "/big-streamed": stream(3 * 1024 * 1024, chunked=False),
        "/big-chunked": stream(3 * 1024 * 1024, chunked=True),
    }
    return serve(routes)


@pytest.fixture
def allow_origin(origin: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The documented opt-in, for the test server's own endpoint only."""
    monkeypatch.setenv(ENV_ALLOW_PRIVATE, f"{origin.host}:{origin.port}")
    return origin


# ---- the default is strict ---------------------------------------------------------------------
def test_loopback_is_refused_by_default_and_never_contacted(origin: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ALLOW_PRIVATE, raising=False)
    with pytest.raises(ImageRejected, match=r"non-public address 127\.0\.0\.1") as err:
        fetch_url(f"{origin.url}/good.png")
    assert err.value.reason == "unreadable"
    assert origin.hits == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://[::1]/", "http://10.1.2.3/", "http://192.168.0.1/",
    "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/",
    "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/", "http://224.0.0.1/", "ftp://example.com/x.png",
    "file:///etc/passwd", "http:///no-host",
])
def test_non_public_or_non_http_urls_are_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ALLOW_PRIVATE, raising=False)
    with pytest.raises(ImageRejected) as err:
        check_public_url(url)
    assert err.value.reason == "unreadable"


def test_the_connected_address_itself_is_checked(origin: Server) -> None:
    """Even if a name passed the check and then resolved elsewhere (DNS rebinding), the
    connection is refused once the peer turns out to be non-public: nothing is requested."""
    opener = urllib.request.build_opener(_CheckedHTTPHandler(UrlPolicy()))
    with pytest.raises(ImageRejected, match="non-public"):
        opener.open(f"{origin.url}/good.png", timeout=5)
    assert origin.hits == []
    allowed = UrlPolicy(endpoints=frozenset({(origin.host, origin.port)}))
    with urllib.request.build_opener(_CheckedHTTPHandler(allowed)).open(f"{origin.url}/good.png", timeout=5) as r:
        assert r.read() == GOOD


def test_a_bad_allow_list_entry_is_an_error_not_an_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_ALLOW_PRIVATE, "127.0.0.1")  # no port
    with pytest.raises(ImageRejected, match="HOST:PORT"):
        fetch_url("http://127.0.0.1:1/x.png")


# ---- redirects -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/to-internal", "/to-internal-by-name", "/to-internal-v6", "/to-metadata",
                                  "/to-lan", "/to-file"])
def test_redirect_from_an_allowed_host_to_a_private_one_is_refused(
    allow_origin: Server, internal: Server, path: str
) -> None:
    with pytest.raises(ImageRejected) as err:
        fetch_url(f"{allow_origin.url}{path}", timeout=5)
    assert err.value.reason == "unreadable"
    assert allow_origin.hits == [path]
    assert internal.hits == [], "the private service was contacted"


def test_allow_all_opt_in_follows_private_redirects(origin: Server, internal: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """``AGILE_ALLOW_PRIVATE_URLS=1`` is the documented 'my corpus is on my network' switch."""
    monkeypatch.setenv(ENV_ALLOW_PRIVATE, "1")
    assert fetch_url(f"{origin.url}/to-internal", timeout=5) == b"root:x:0:0:secret"
    assert internal.hits == ["/secret"]


# ---- time and size ---------------------------------------------------------------------------------
def test_a_server_that_never_answers_times_out(allow_origin: Server) -> None:
    t0 = time.monotonic()
    with pytest.raises(ImageRejected, match="timed out") as err:
        fetch_url(f"{allow_origin.url}/slow", timeout=0.5)
    assert err.value.reason == "unreadable"
    assert time.monotonic() - t0 < 2.5


def test_a_trickling_server_is_cut_off_by_the_deadline(allow_origin: Server) -> None:
    """Each byte arrives well within the read timeout; the whole body would take 10 s."""
    t0 = time.monotonic()
    with pytest.raises(ImageRejected, match="took longer than 1s"):
        fetch_url(f"{allow_origin.url}/trickle", timeout=0.5, deadline_s=1.0)
    assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("path", ["/big-declared", "/big-streamed", "/big-chunked"])
def test_size_cap(allow_origin: Server, path: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ImageRejected) as err:
        fetch_url(f"{allow_origin.url}{path}", max_bytes=1024 * 1024, timeout=5)
    assert err.value.reason == "too_large_file"
    assert time.monotonic() - t0 < 5


def test_a_body_exactly_at_the_cap_is_accepted(allow_origin: Server) -> None:
    assert fetch_url(f"{allow_origin.url}/good.png", max_bytes=len(GOOD)) == GOOD
    with pytest.raises(ImageRejected, match="cap"):
        fetch_url(f"{allow_origin.url}/good.png", max_bytes=len(GOOD) - 1)


# ---- ingestion: decided by content, not by headers -------------------------------------------------
def test_url_list_ingests_good_images_and_skips_lies(allow_origin: Server, internal: Server, tmp_path: Path) -> None:
    paths = ["/good.png", "/photo", "/fake.png", "/empty.png", "/moved.png", "/to-internal", "/to-metadata",
             "/nowhere.png", "/good.png"]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(f"{allow_origin.url}{p}" for p in paths) + "\n")
    store = StateStore(tmp_path / "agile.sqlite")
    report = ingest_source(str(listing), store, blob_dir=tmp_path / "blobs", workers=2)
    assert report.seen == len(paths)
    assert report.ingested == 3  # good.png, the PNG served as text/html, the redirected PNG
    assert report.duplicates == 1  # good.png listed twice
    assert dict(report.skipped) == {"not_an_image": 1, "empty_file": 1, "unreadable": 3}
    assert internal.hits == []
    rows = {r["uri"]: r for r in store.image_rows()}
    for path, data in (("/good.png", GOOD), ("/photo", GOOD_AS_HTML), ("/moved.png", GOOD_AFTER_REDIRECT)):
        row = rows[f"{allow_origin.url}{path}"]
        assert row["id"] == hashlib.blake2b(data, digest_size=16).hexdigest()
        assert Path(row["path"]).read_bytes() == data  # the blob is the bytes, addressed by content
        assert row["format"] == "PNG"
    assert not list((tmp_path / "blobs").rglob("*.part"))
    # a second scan reads nothing again: every URL is known
    again = ingest_source(str(listing), store, blob_dir=tmp_path / "blobs")
    assert again.unchanged == len(set(paths)) and again.ingested == 0
