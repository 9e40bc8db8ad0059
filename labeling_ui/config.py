"""Settings of the labeling app: where it listens, who may sign in, how rounds are started.

Nothing is read from the environment at import time: :meth:`UiSettings.from_env` reads it when
the app is built.
"""

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# the rule lives with the state, so the CLI applies the same one; re-exported here for the app
from agile_pipeline.lib.state import valid_rater_name

__all__ = ["ConfigError", "UiSettings", "parse_auth", "valid_rater_name"]

TriggerKind = Literal["dagster", "in-process"]


class ConfigError(ValueError):
    """A bad setting; the message says which and how to fix it."""


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """``"alice:pw1,bob:pw2"`` -> ``[("alice", "pw1"), ("bob", "pw2")]``; empty -> ``None``."""
    if spec is None or not spec.strip():
        return None
    pairs: list[tuple[str, str]] = []
    for chunk in spec.split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        user, sep, password = chunk.partition(":")
        user = user.strip()
        if not sep or not user or not password:
            raise ConfigError(
                f"AGILE_APP_AUTH entry {chunk.split(':')[0]!r} must look like NAME:PASSWORD "
                "(several separated by commas)"
            )
        if not valid_rater_name(user):
            raise ConfigError(f"rater name {user!r} in AGILE_APP_AUTH is not a valid name")
        pairs.append((user, password))
    return pairs or None


@dataclass(frozen=True)
class UiSettings:
    """How the app runs.

    ``home``: the data directory (``None``: ``$AGILE_HOME`` or ``./.agile``).
    ``dagster_url``: the Dagster webserver that runs rounds (``trigger="dagster"``); with
    ``trigger="in-process"`` rounds run inside the app process (tests, no webserver).
    ``auth``: ``[(name, password), ...]`` switches Gradio's sign-in on; labels are then written
    under the signed-in name only.
    ``upload_max_bytes``: the largest exemplar image file a rater may upload (Gradio's own upload
    routes stay closed; uploads go through ``POST /api/exemplars/upload`` only).
    ``trigger``: ``"in-process"`` (default) runs every round inside this long-lived, warmed app
    process as a run of the named Dagster job, recorded in ``$DAGSTER_HOME`` (the Dagster UI
    shows it); ``"dagster"`` submits it to the Dagster webserver, whose daemon launches it in a
    fresh process (a queue wait and a cold start each round).
    ``auto_round`` / ``lookahead``: the :class:`~labeling_ui.rounds.RoundPolicy` (rounds start
    by themselves as ratings arrive; with ``lookahead`` L the next round starts when L images
    of the batch are left, so the next batch is ready when the rater finishes). ``warm``:
    load everything a round needs when the app starts (in-process trigger only).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    dagster_url: str = "http://127.0.0.1:3000"
    trigger: TriggerKind = "in-process"
    auth: list[tuple[str, str]] | None = None
    home: Path | None = None
    thumb_side: int = 512
    prefetch: int = 8
    login_max_failures: int = 5
    upload_max_bytes: int = 20 * 1024 * 1024  # an uploaded exemplar image file
    poll_seconds: float = 1.0
    auto_round: bool = True
    lookahead: int = 10
    warm: bool = True
    title: str = "Agile Modeling"
    extra_blocked_paths: tuple[str, ...] = field(default_factory=tuple)
    # the names (Host header) the app answers to besides the bound host and loopback; "*": any
    allowed_hosts: tuple[str, ...] = ()
    # without sign-in the app refuses to listen beyond this machine unless this is set
    allow_remote_without_auth: bool = False
    # reverse proxies whose X-Forwarded-For / -Proto uvicorn may believe (IPs or CIDRs)
    trusted_proxies: tuple[str, ...] = ()
    # exemplar uploads through the app (0: no limit); a rater's count and bytes per hour, and
    # a concept's uploads kept in all
    uploads_per_rater_hour: int = 20
    upload_bytes_per_rater_hour: int = 200 * 1024 * 1024
    uploads_per_concept: int = 50
    upload_bytes_per_concept: int = 200 * 1024 * 1024
    # with sign-in on: the role of a signed-in user on a concept nobody gave them a role on
    # (None: none; the concept's owner invites them). Without sign-in everyone is the owner.
    default_role: Literal["viewer", "rater"] | None = None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth)

    def host_names(self) -> tuple[str, ...]:
        """The Host names requests may carry: the bound host, the loopback names and
        :attr:`allowed_hosts` (without ports or brackets, lower case)."""
        names = [self.host, "localhost", "127.0.0.1", "::1", *self.allowed_hosts]
        out: list[str] = []
        for n in names:
            n = n.strip().lower()
            if n.startswith("[") and "]" in n:
                n = n[1 : n.index("]")]
            elif n.count(":") == 1:
                n = n.split(":", 1)[0]
            n = n.rstrip(".")
            if n and n not in out:
                out.append(n)
        return tuple(out)

    @classmethod
    def from_env(cls, **overrides: object) -> "UiSettings":
        """Defaults, then ``AGILE_APP_AUTH`` / ``AGILE_DAGSTER_URL`` / ``AGILE_APP_TRIGGER`` /
        ``AGILE_APP_AUTO_ROUND`` / ``AGILE_APP_LOOKAHEAD``, then explicit ``overrides``
        (``None`` values are ignored)."""
        values: dict[str, object] = {}
        auth = parse_auth(os.environ.get("AGILE_APP_AUTH"))
        if auth:
            values["auth"] = auth
        if os.environ.get("AGILE_DAGSTER_URL"):
            values["dagster_url"] = os.environ["AGILE_DAGSTER_URL"]
        trig = os.environ.get("AGILE_APP_TRIGGER")
        if trig:
            if trig not in ("dagster", "in-process"):
                raise ConfigError(f"AGILE_APP_TRIGGER={trig!r}: use 'dagster' or 'in-process'")
            values["trigger"] = trig
        auto = os.environ.get("AGILE_APP_AUTO_ROUND")
        if auto:
            if auto.strip().lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ConfigError(f"AGILE_APP_AUTO_ROUND={auto!r}: use 1 or 0")
            values["auto_round"] = auto.strip().lower() in ("1", "true", "yes")
        look = os.environ.get("AGILE_APP_LOOKAHEAD")
        if look:
            try:
                values["lookahead"] = int(look)
            except ValueError:
                raise ConfigError(f"AGILE_APP_LOOKAHEAD={look!r}: a whole number of images (0 = off)") from None
            if not 0 <= int(look) <= 1000:
                raise ConfigError(f"AGILE_APP_LOOKAHEAD={look!r}: between 0 (off) and 1000")
        values.update(_security_from_env())
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


_MB = 1024 * 1024
_UPLOAD_LIMITS = (  # variable, field, unit in bytes
    ("AGILE_APP_UPLOADS_PER_RATER_HOUR", "uploads_per_rater_hour", 1),
    ("AGILE_APP_UPLOAD_MB_PER_RATER_HOUR", "upload_bytes_per_rater_hour", _MB),
    ("AGILE_APP_UPLOADS_PER_CONCEPT", "uploads_per_concept", 1),
    ("AGILE_APP_UPLOAD_MB_PER_CONCEPT", "upload_bytes_per_concept", _MB),
)


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in os.environ.get(name, "").split(",") if x.strip())


def _security_from_env() -> dict[str, object]:
    """``AGILE_APP_ALLOWED_HOSTS`` / ``AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH`` /
    ``AGILE_APP_TRUSTED_PROXIES`` and the upload limits (``AGILE_APP_UPLOADS_PER_*``,
    ``AGILE_APP_UPLOAD_MB_PER_*``)."""
    values: dict[str, object] = {}
    hosts = _env_list("AGILE_APP_ALLOWED_HOSTS")
    for h in hosts:
        if h != "*" and not re.fullmatch(r"\.?[A-Za-z0-9_.:\[\]-]{1,253}", h):
            raise ConfigError(f"AGILE_APP_ALLOWED_HOSTS entry {h[:80]!r}: a host name or IP address "
                              "(several separated by commas; '*' allows any)")
    if hosts:
        values["allowed_hosts"] = hosts
    remote = os.environ.get("AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH", "").strip().lower()
    if remote:
        if remote not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH={remote[:20]!r}: use 1 or 0")
        values["allow_remote_without_auth"] = remote in ("1", "true", "yes")
    proxies = _env_list("AGILE_APP_TRUSTED_PROXIES")
    for ip in proxies:
        try:
            ipaddress.ip_network(ip, strict=False)
        except ValueError:
            raise ConfigError(f"AGILE_APP_TRUSTED_PROXIES entry {ip[:80]!r}: an IP address or network "
                              "(e.g. 127.0.0.1 or 10.0.0.0/8) of your reverse proxy") from None
    if proxies:
        values["trusted_proxies"] = proxies
    default_role = os.environ.get("AGILE_APP_DEFAULT_ROLE", "").strip().lower()
    if default_role:
        if default_role not in ("none", "viewer", "rater"):
            raise ConfigError(f"AGILE_APP_DEFAULT_ROLE={default_role[:20]!r}: none, viewer or rater (the role "
                              "of a signed-in user on a concept whose owner gave them none)")
        values["default_role"] = None if default_role == "none" else default_role
    for var, name, unit in _UPLOAD_LIMITS:
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        try:
            n = int(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw[:20]!r}: a whole number (0 = no limit)") from None
        if not 0 <= n <= 10**6:
            raise ConfigError(f"{var}={raw[:20]!r}: between 0 (no limit) and 1000000")
        values[name] = n * unit
    return values


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface to bind) is this machine only: ``localhost``, 127.x, ::1."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(settings: UiSettings) -> None:
    """Refuse to listen beyond this machine without sign-in, unless told explicitly."""
    if settings.auth_enabled or settings.allow_remote_without_auth or is_loopback(settings.host):
        return
    raise ConfigError(
        f"refusing to listen on {settings.host[:80]!r} without sign-in: anyone who can reach this "
        "address could read and rate every concept. Switch sign-in on with "
        "AGILE_APP_AUTH=name:password,... (one entry per rater), or listen on 127.0.0.1; to serve "
        "it without sign-in anyway (a trusted network only), set "
        "AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH=1"
    )
