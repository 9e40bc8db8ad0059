"""The app builds without launching; config, throttling and path rules in isolation."""

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from labeling_ui.app import build_app
from labeling_ui.config import ConfigError, UiSettings, parse_auth
from labeling_ui.security import LoginThrottle, has_dot_segment
from tests.labeling_ui.conftest import LOCAL, World


def test_build_app_wires_routes_and_gradio(world: World) -> None:
    app = build_app(UiSettings(home=world.home), service=world.service)
    assert app.state.blocks is not None and app.state.settings.host == "127.0.0.1"
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/api/session").json() == {"auth": False, "user": None, "concepts": []}
        assert c.get(f"/image/{world.ids[0]}").status_code == 200
        assert c.post("/api/labels", json={"rater": "bob", "events": []}).json()["new"] == 0
        assert c.get("/").status_code == 200
        assert c.get("/docs").status_code == 404  # no API docs of the app's internals


def test_importing_the_app_stays_light() -> None:
    code = (
        "import sys, labeling_ui.app, labeling_ui.launch, labeling_ui.trigger\n"
        "heavy = [m for m in ('torch', 'mlflow', 'open_clip', 'dagster', 'lancedb') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("alice:pw1,bob:pw2", [("alice", "pw1"), ("bob", "pw2")]),
        (" alice : p:w ", [("alice", " p:w")]),  # passwords may contain ':'
        ("", None),
        (None, None),
    ],
)
def test_parse_auth(spec, expected) -> None:  # type: ignore[no-untyped-def]
    assert parse_auth(spec) == expected


@pytest.mark.parametrize("spec", ["alice", "alice:", ":pw", "../x:pw"])
def test_parse_auth_rejects_bad_entries(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_auth(spec)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGILE_APP_AUTH", "alice:pw")
    monkeypatch.setenv("AGILE_APP_TRIGGER", "in-process")
    s = UiSettings.from_env(port=9999, host=None)
    assert s.auth == [("alice", "pw")] and s.trigger == "in-process" and s.port == 9999
    assert s.host == "127.0.0.1"  # localhost unless told


@pytest.mark.parametrize(
    ("path", "blocked"),
    [("/image/abc", False), ("/assets/index-1.2.js", False), ("/.env", True), ("/a/../b", True),
     ("/x/.git/config", True), ("/a\\..\\b", True)],
)
def test_dot_segments(path: str, blocked: bool) -> None:
    assert has_dot_segment(path) is blocked


def test_login_throttle_backs_off_and_forgets() -> None:
    t = LoginThrottle(free=2, cap_s=60, forget_s=100)
    t.failed("1.2.3.4", now=0)
    assert t.retry_after("1.2.3.4", now=0) == 0  # one mistake is free
    t.failed("1.2.3.4", now=1)
    assert t.retry_after("1.2.3.4", now=1) == pytest.approx(2)
    t.failed("1.2.3.4", now=4)
    assert t.retry_after("1.2.3.4", now=4) == pytest.approx(4)  # doubles
    assert t.retry_after("5.6.7.8", now=4) == 0  # per address
    assert t.retry_after("1.2.3.4", now=200) == 0  # forgotten after a quiet while
    t.failed("9.9.9.9", now=0)
    t.succeeded("9.9.9.9")
    assert t.retry_after("9.9.9.9", now=0) == 0
