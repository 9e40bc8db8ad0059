"""Settings of the labeling app: where it listens, who may sign in, how rounds are started.

Nothing is read from the environment at import time: :meth:`UiSettings.from_env` reads it when
the app is built.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TriggerKind = Literal["dagster", "in-process"]

_RATER_NAME = re.compile(r"^[\w][\w .@'\-]{0,62}[\w.]$|^\w$", re.UNICODE)


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


def valid_rater_name(name: str) -> bool:
    """1-64 letters, digits, spaces and ``.@'-_``; no control characters or slashes."""
    return bool(_RATER_NAME.match(name))


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
    """

    host: str = "127.0.0.1"
    port: int = 7860
    dagster_url: str = "http://127.0.0.1:3000"
    trigger: TriggerKind = "dagster"
    auth: list[tuple[str, str]] | None = None
    home: Path | None = None
    thumb_side: int = 512
    prefetch: int = 8
    login_max_failures: int = 5
    upload_max_bytes: int = 20 * 1024 * 1024  # an uploaded exemplar image file
    poll_seconds: float = 1.0
    title: str = "Agile Modeling"
    extra_blocked_paths: tuple[str, ...] = field(default_factory=tuple)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth)

    @classmethod
    def from_env(cls, **overrides: object) -> "UiSettings":
        """Defaults, then ``AGILE_APP_AUTH`` / ``AGILE_DAGSTER_URL`` / ``AGILE_APP_TRIGGER``,
        then explicit ``overrides`` (``None`` values are ignored)."""
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
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
