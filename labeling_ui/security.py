"""What the app serves and to whom, enforced in front of Gradio and of the app's own routes.

* :class:`AuthGate` resolves the signed-in rater of a request from Gradio's session cookie, so
  the app's JSON routes obey the same sign-in as the Gradio UI (and a rater can never write
  labels under another name).
* :class:`GuardMiddleware` (pure ASGI, so Gradio's streamed queue responses pass untouched):

  - refuses (400) a request whose ``Host`` is not one of the app's names
    (:class:`HostAllowList`: the bound host, ``localhost``, ``127.0.0.1``, ``[::1]`` and
    ``AGILE_APP_ALLOWED_HOSTS``), so a page on another site cannot reach the app through DNS
    rebinding;
  - refuses (403) a request whose ``Origin`` is another site or another local port
    (:func:`same_origin`), which Gradio's own CORS rule would let drive its events;
  - refuses any path with a dot-segment (``.``/``..`` traversal, dotfiles such as ``/.env``),
    checked on both the decoded and the raw path;
  - closes Gradio's upload routes (the app has no upload widget) and its generic file routes
    (``/gradio_api/file=...``, ``/file/...``, ``/proxy=``): corpus images are served only by
    id through ``/image/{id}``;
  - throttles wrong passwords on ``/login`` per client address (exponential back-off): the
    address of the peer, which the server rewrites from ``X-Forwarded-For`` only for the
    proxies configured in ``AGILE_APP_TRUSTED_PROXIES`` (:func:`labeling_ui.launch.server_config`);
  - adds ``nosniff`` / frame / referrer headers to every response.
"""

import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Gradio routes the app never needs: uploads, arbitrary file serving, proxying, monitoring,
# run history (which serves stored files) and the MCP server.
BLOCKED_PREFIXES: tuple[str, ...] = (
    "/gradio_api/upload",
    "/gradio_api/file=",
    "/gradio_api/file/",
    "/gradio_api/proxy=",
    "/gradio_api/run-history",
    "/gradio_api/mcp",
    "/gradio_api/stream",
    "/file=",
    "/file/",
    "/proxy=",
    "/upload",
    "/monitoring",
    "/gradio_api/monitoring",
)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"referrer-policy", b"same-origin"),
)


class AuthGate:
    """The signed-in rater of a request, read from Gradio's own session (``None`` if auth is off)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._gradio_app: Any = None

    def bind(self, gradio_app: Any) -> None:
        self._gradio_app = gradio_app

    def user(self, cookies: MutableMapping[str, str] | dict[str, str]) -> str | None:
        if not self.enabled or self._gradio_app is None:
            return None
        cookie_id = self._gradio_app.cookie_id
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        if not token:
            return None
        user = self._gradio_app.tokens.get(token)
        return str(user) if user else None


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Per-address back-off after ``free`` wrong passwords: 2, 4, 8 ... seconds, at most ``cap``."""

    def __init__(self, free: int = 5, cap_s: float = 300.0, forget_s: float = 900.0) -> None:
        self.free = free
        self.cap_s = cap_s
        self.forget_s = forget_s
        self._by_ip: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def retry_after(self, ip: str, now: float | None = None) -> float:
        now = time.time() if now is None else now
        with self._lock:
            f = self._by_ip.get(ip)
            if f is None:
                return 0.0
            if now - f.last > self.forget_s:
                del self._by_ip[ip]
                return 0.0
            return max(0.0, f.blocked_until - now)

    def failed(self, ip: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            if len(self._by_ip) > 10_000:  # bound memory under a spray of addresses
                cutoff = now - self.forget_s
                self._by_ip = {k: v for k, v in self._by_ip.items() if v.last > cutoff}
            f = self._by_ip.setdefault(ip, _Failures())
            f.count += 1
            f.last = now
            if f.count >= self.free:
                f.blocked_until = now + min(self.cap_s, 2.0 ** (f.count - self.free + 1))

    def succeeded(self, ip: str) -> None:
        with self._lock:
            self._by_ip.pop(ip, None)


def shown(value: object, limit: int = 80) -> str:
    """User text to echo in a message: printable, one line, at most ``limit`` characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip_echoes(message: str, limit: int = 80) -> str:
    """``message`` with every quoted echo of user input (a ``repr``, in ``'...'`` or ``"..."``)
    longer than ``limit`` characters cut to that: a 10,000-character name is not sent back whole."""
    n = limit + 1
    literal = re.compile(rf"'(?:[^'\\\n]|\\.){{{n},}}'|\"(?:[^\"\\\n]|\\.){{{n},}}\"")

    def clip(m: re.Match[str]) -> str:
        q = m.group(0)[0]
        return q + m.group(0)[1 : limit + 1] + "…" + q

    return literal.sub(clip, message)


def scrub_home(text: str, home: object) -> str:
    """``text`` with the server's data directory written ``$AGILE_HOME``: raters see no absolute
    server paths (in messages, run errors, JSON)."""
    root = str(home).rstrip("/\\")
    return text.replace(root, "$AGILE_HOME") if len(root) > 1 else text


def host_of(value: str) -> str | None:
    """The name in a ``Host`` header (lower case, no port, no brackets), ``None`` if malformed."""
    v = value.strip().lower()
    if not v:
        return None
    if v.startswith("["):
        end = v.find("]")
        rest = v[end + 1 :] if end > 0 else "?"
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return v[1:end]
    if v.count(":") > 1:
        return None  # an IPv6 address needs brackets
    name, _, port = v.partition(":")
    if _ and not port.isdigit():
        return None
    name = name.rstrip(".")
    return name if name and re.fullmatch(r"[a-z0-9_.-]+", name) else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostAllowList:
    """The host names a request may address the app by (its ``Host`` header).

    ``names``: exact names (see :meth:`UiSettings.host_names`); an entry ``.example.org`` also
    allows every sub-domain, ``*`` allows any host. When the app listens on every interface
    (``0.0.0.0`` / ``::``), any IP address and this machine's host name are allowed too: a
    request addressed by IP cannot come from a DNS-rebinding page.
    """

    def __init__(self, names: tuple[str, ...] | list[str], *, bound: str = "127.0.0.1") -> None:
        self.any = "*" in names
        self.names = tuple(n for n in names if n != "*")
        self.wildcard_bind = bound.strip("[]") in ("0.0.0.0", "::", "")
        if self.wildcard_bind:
            self.names += (socket.gethostname().lower().rstrip("."),)

    def allows(self, host_header: str | None) -> bool:
        if self.any:
            return True
        name = host_of(host_header or "")
        if name is None:
            return False
        if name in self.names:
            return True
        if any(n.startswith(".") and (name == n[1:] or name.endswith(n)) for n in self.names):
            return True
        return self.wildcard_bind and _is_ip(name)

    def refusal(self, host_header: str | None) -> str:
        names = ", ".join(f"[{n}]" if ":" in n else n for n in self.names if n)
        if not host_header:
            return "a request needs a Host header"
        return (f"host {shown(host_header)!r} is not allowed: this app answers only to {names}. "
                "To reach it under another name, add that name to AGILE_APP_ALLOWED_HOSTS "
                "(comma-separated)")


def same_origin(origin: str, host_header: str | None, extra_names: tuple[str, ...] = ()) -> bool:
    """Whether a request's ``Origin`` is the app itself: the same host and port as its ``Host``
    header, or a host name configured in ``AGILE_APP_ALLOWED_HOSTS`` (a reverse proxy that
    rewrites ``Host``). This closes Gradio's rule that lets any page on ``localhost`` (another
    port) drive the app with the user's cookies; ``null`` origins are refused too."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        return False
    if host_header and rest == host_header.strip().lower():
        return True
    name = host_of(rest)
    return name is not None and any(
        n == name or (n.startswith(".") and (name == n[1:] or name.endswith(n))) for n in extra_names)


def has_dot_segment(path: str) -> bool:
    """True for ``/a/../b``, ``/.env``, ``/x/.git/config`` (any segment starting with a dot)."""
    for seg in path.replace("\\", "/").split("/"):
        if seg.startswith("."):
            return True
    return False


async def _send_json(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, *, throttle: LoginThrottle | None = None,
                 hosts: HostAllowList | None = None, origin_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.throttle = throttle or LoginThrottle()
        self.hosts = hosts or HostAllowList(("127.0.0.1", "localhost", "::1"))
        self.origin_hosts = origin_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"host"), None)
        if not self.hosts.allows(host):
            if scope["type"] == "http":
                await _send_json(send, 400, self.hosts.refusal(host))
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        origin = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"origin"), None)
        if origin is not None and not same_origin(origin, host, self.origin_hosts):
            if scope["type"] == "http":
                await _send_json(send, 403, f"cross-origin request from {shown(origin)!r} refused: open the app "
                                            "at its own address")
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope.get("path", "")
        raw = scope.get("raw_path") or b""
        raw_path = raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else str(raw)
        lowered_raw = raw_path.lower()
        if (
            has_dot_segment(path)
            or has_dot_segment(raw_path)
            or "%2e" in lowered_raw
            or "%2f" in lowered_raw
            or "%5c" in lowered_raw
            or "\x00" in path
        ):
            if scope["type"] == "http":
                await _send_json(send, 404, "not found")
            return
        if path.startswith(BLOCKED_PREFIXES):
            if scope["type"] == "http":
                await _send_json(send, 404, "not available in this app")
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_login = scope.get("method") == "POST" and path.rstrip("/") == "/login"
        ip = (scope.get("client") or ("?", 0))[0]
        if is_login:
            wait = self.throttle.retry_after(ip)
            if wait > 0:
                await _send_json(
                    send, 429, f"too many wrong passwords from your address: wait {int(wait) + 1} s",
                    [(b"retry-after", str(int(wait) + 1).encode())],
                )
                return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message["headers"] = headers
                if is_login:
                    status = int(message.get("status", 0))
                    if status in (400, 401, 403):
                        self.throttle.failed(ip)
                        log.warning("wrong password from %s", ip)
                    elif 200 <= status < 300:
                        self.throttle.succeeded(ip)
            await send(message)

        await self.app(scope, receive, send_wrapper)
