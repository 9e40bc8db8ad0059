"""Start the labeling app (blocking): ``serve()`` is what ``agile app`` and ``python -m labeling_ui`` run."""

import logging
import os
from pathlib import Path
from typing import Any

from labeling_ui.config import ConfigError, UiSettings, check_bind, is_loopback

log = logging.getLogger(__name__)


def server_config(app: Any, settings: UiSettings, *, port: int | None = None, **kw: Any) -> Any:
    """The ``uvicorn.Config`` the app is served with.

    uvicorn believes ``X-Forwarded-For`` / ``-Proto`` only from the proxies in
    ``settings.trusted_proxies`` (``AGILE_APP_TRUSTED_PROXIES``); with none configured it never
    rewrites the client address, so the login back-off keys on the real peer.
    """
    import uvicorn

    trusted = list(settings.trusted_proxies)
    return uvicorn.Config(
        app, host=settings.host, port=settings.port if port is None else port,
        proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None, **kw,
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    dagster_url: str = "http://127.0.0.1:3000",
    auth: list[tuple[str, str]] | None = None,
    *,
    trigger: str | None = None,
    home: Path | None = None,
    allow_remote_without_auth: bool = False,
) -> None:
    """Serve the app on ``host:port`` until interrupted.

    Binds to this machine only unless ``host`` says otherwise. ``auth`` (or ``AGILE_APP_AUTH``
    as ``name:password,...``) switches sign-in on; without it, a ``host`` beyond this machine
    is refused (exit with a message) unless ``allow_remote_without_auth`` (or
    ``AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH=1``) says otherwise. Rounds run on the Dagster webserver at
    ``dagster_url``; ``trigger="in-process"`` (or ``AGILE_APP_TRIGGER``) runs them in the app.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    import uvicorn

    try:
        settings = UiSettings.from_env(host=host, port=port, dagster_url=dagster_url, auth=auth,
                                       trigger=trigger, home=home,
                                       allow_remote_without_auth=allow_remote_without_auth or None)
        check_bind(settings)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not settings.auth_enabled and not is_loopback(settings.host):
        log.warning("the app listens on %s without sign-in: anyone who can reach it can rate "
                    "(set AGILE_APP_AUTH=name:password,...)", settings.host)
    from labeling_ui.app import build_app

    app = build_app(settings)
    print(f"Agile Modeling app: http://{settings.host}:{settings.port}/  "  # noqa: T201
          f"(rounds via {app.state.service.rounds.trigger.describe()})", flush=True)
    server = uvicorn.Server(server_config(app, settings, log_level="warning"))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        raise SystemExit(3)  # uvicorn.run's exit code when the server could not start
