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

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth)

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
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
