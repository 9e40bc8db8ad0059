"""Start the labeling app (blocking): ``serve()`` is what ``agile app`` and ``python -m labeling_ui`` run."""

import logging
from pathlib import Path

from labeling_ui.config import UiSettings

log = logging.getLogger(__name__)


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    dagster_url: str = "http://127.0.0.1:3000",
    auth: list[tuple[str, str]] | None = None,
    *,
    trigger: str | None = None,
    home: Path | None = None,
) -> None:
    """Serve the app on ``host:port`` until interrupted.

    Binds to this machine only unless ``host`` says otherwise. ``auth`` (or ``AGILE_APP_AUTH``
    as ``name:password,...``) switches sign-in on. Rounds run on the Dagster webserver at
    ``dagster_url``; ``trigger="in-process"`` (or ``AGILE_APP_TRIGGER``) runs them in the app.
    """
    import uvicorn

    from labeling_ui.app import build_app

    settings = UiSettings.from_env(host=host, port=port, dagster_url=dagster_url, auth=auth,
                                   trigger=trigger, home=home)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.auth_enabled:
        log.warning("the app listens on %s without sign-in: anyone who can reach it can rate "
                    "(set AGILE_APP_AUTH=name:password,...)", settings.host)
    app = build_app(settings)
    print(f"Agile Modeling app: http://{settings.host}:{settings.port}/  "  # noqa: T201
          f"(rounds via {app.state.service.rounds.trigger.describe()})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
