"""Findings of the team-deployment probe (issue 17) in the app, each through the real app
(FastAPI TestClient, a real uvicorn server, Gradio's own event routes):

* 3: the Host header is checked (DNS rebinding); no sign-in means no non-loopback bind;
* 5: the login back-off keys on the real peer, not on ``X-Forwarded-For``;
* 6: malformed values are a 400, never a 500;
* 8: user text in toasts is escaped;
* 10: upload quotas per rater and per concept;
* also: Gradio analytics off, no absolute server paths shown, no trailing-newline ids, long
  echoes cut short.
"""

import html
import io
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from labeling_ui import handlers
from labeling_ui.app import build_app
from labeling_ui.config import ConfigError, UiSettings, check_bind, valid_rater_name
from labeling_ui.context import IMAGE_ID
from labeling_ui.export import concept_dir_name
from labeling_ui.security import HostAllowList
from labeling_ui.session import LabelingSession
from tests.hostile_images import write_real_like_images
from tests.labeling_ui.conftest import LOCAL, World, live_server
from tests.labeling_ui.gradio_events import run_event

EVIL = "http://rebind.attacker.example:7860"


def _event(world: World, concept: str, k: int = 0, **over: Any) -> dict[str, Any]:
    batch = world.service.batches.latest(concept)
    assert batch is not None
    return {"concept": concept, "image_id": batch.order[k], "label": "positive",
            "event_id": f"ev-{k:06d}", "batch_id": batch.batch_id, **over}


# ---- finding 3: Host header, DNS rebinding -------------------------------------------------
def test_a_foreign_host_is_refused_on_every_route(world: World, concept_with_batch: str) -> None:
    """A DNS-rebinding page: foreign Host, and an Origin that matches it."""
    app = build_app(UiSettings(home=world.home), service=world.service)
    with TestClient(app, base_url=EVIL) as evil:
        origin = {"Origin": EVIL}
        for path in ("/api/session", f"/api/batch?concept={concept_with_batch}&rater=bob", "/",
                     "/config", f"/image/{world.ids[0]}", "/gradio_api/info"):
            r = evil.get(path, headers=origin)
            assert r.status_code == 400, path
            assert "not allowed" in r.json()["detail"] and "AGILE_APP_ALLOWED_HOSTS" in r.json()["detail"]
            assert "rebind.attacker.example" in r.json()["detail"]
        r = evil.post("/api/labels", json={"rater": "alice", "events": [_event(world, concept_with_batch)]},
                      headers=origin)
        assert r.status_code == 400
    assert world.store.label_events(concept_with_batch) == []


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7860", "127.0.0.1"])
def test_the_loopback_names_are_answered(client: TestClient, host: str) -> None:
    assert client.get("/api/session", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["", "127.0.0.1.evil.example", "evil.example:7860", "127.0.0.1:x", "::1",
                                  "localhost@evil.example", "a" * 300])
def test_malformed_or_foreign_hosts_are_refused(client: TestClient, host: str) -> None:
    r = client.get("/api/session", headers={"Host": host})
    assert r.status_code == 400
    assert len(r.json()["detail"]) < 400


def test_allowed_hosts_come_from_the_environment(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGILE_APP_ALLOWED_HOSTS", "rate.example.org, .team.example")
    settings = UiSettings.from_env(home=world.home)
    assert settings.allowed_hosts == ("rate.example.org", ".team.example")
    app = build_app(settings, service=world.service)
    with TestClient(app, base_url=LOCAL) as c:
        for host, status in (("rate.example.org", 200), ("rate.example.org:443", 200),
                             ("labels.team.example", 200), ("team.example", 200),
                             ("other.example.org", 400), ("127.0.0.1", 200)):
            assert c.get("/api/session", headers={"Host": host}).status_code == status, host
    monkeypatch.setenv("AGILE_APP_ALLOWED_HOSTS", "bad host!")
    with pytest.raises(ConfigError, match="AGILE_APP_ALLOWED_HOSTS"):
        UiSettings.from_env()


def test_the_host_is_checked_by_the_real_server(world: World, concept_with_batch: str) -> None:
    """Over a socket, as a browser on a rebound name would send it."""
    app = build_app(UiSettings(home=world.home), service=world.service)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])

        def get(host: str) -> tuple[int, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(f"GET /api/session HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n"
                             "Connection: close\r\n\r\n".encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split(b" ", 2)[1]), body

        status, body = get(f"rebind.attacker.example:{port}")
        assert status == 400 and concept_with_batch.encode() not in body
        status, body = get(f"127.0.0.1:{port}")
        assert status == 200 and concept_with_batch.encode() in body


def test_a_wildcard_bind_answers_to_ip_addresses_not_to_other_names() -> None:
    hosts = HostAllowList(UiSettings(host="0.0.0.0", allow_remote_without_auth=True).host_names(), bound="0.0.0.0")
    assert hosts.allows("192.168.1.20:7860") and hosts.allows("[fe80::1]:7860") and hosts.allows("localhost")
    assert hosts.allows(socket.gethostname())
    assert not hosts.allows("rebind.attacker.example")
    assert not HostAllowList(UiSettings().host_names()).allows("192.168.1.20")


def test_without_sign_in_a_non_loopback_bind_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGILE_APP_")}
    env["AGILE_HOME"] = str(tmp_path / "agile")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "labeling_ui", "--host", "0.0.0.0", "--port", str(port)],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "AGILE_APP_AUTH" in out.stderr and "AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH=1" in out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(ConfigError, match="AGILE_APP_AUTH"):
        check_bind(UiSettings(host="192.168.1.20"))
    check_bind(UiSettings(host="127.0.0.1"))
    check_bind(UiSettings(host="::1"))
    check_bind(UiSettings(host="0.0.0.0", auth=[("alice", "pw")]))
    check_bind(UiSettings(host="0.0.0.0", allow_remote_without_auth=True))


def test_remote_without_auth_is_an_explicit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH", "1")
    check_bind(UiSettings.from_env(host="0.0.0.0"))
    monkeypatch.setenv("AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH", "maybe")
    with pytest.raises(ConfigError):
        UiSettings.from_env()


# ---- finding 5: the login back-off keys on the real peer ------------------------------------
def _login(url: str, password: str, forwarded_for: str | None = None) -> int:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    req = urllib.request.Request(f"{url}/login", data=f"username=alice&password={password}".encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_rotating_x_forwarded_for_does_not_escape_the_login_back_off(world: World) -> None:
    settings = UiSettings(home=world.home, auth=[("alice", "pw-a")], login_max_failures=3)
    app = build_app(settings, service=world.service)
    with live_server(app) as url:
        codes = [_login(url, "wrong", forwarded_for=f"203.0.113.{k}") for k in range(6)]
        assert codes[:3] == [400, 400, 400]
        assert 429 in codes[3:]
        assert _login(url, "pw-a", forwarded_for="198.51.100.7") == 429  # still the same peer


def test_a_configured_trusted_proxy_is_believed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGILE_APP_TRUSTED_PROXIES", "127.0.0.1")
    settings = UiSettings.from_env(home=world.home, auth=[("alice", "pw-a")], login_max_failures=2)
    assert settings.trusted_proxies == ("127.0.0.1",)
    app = build_app(settings, service=world.service)
    with live_server(app) as url:
        assert [_login(url, "wrong", forwarded_for="203.0.113.1") for _ in range(3)][-1] == 429
        assert _login(url, "pw-a", forwarded_for="203.0.113.2") == 200  # another client behind the proxy
    monkeypatch.setenv("AGILE_APP_TRUSTED_PROXIES", "my-proxy")
    with pytest.raises(ConfigError, match="AGILE_APP_TRUSTED_PROXIES"):
        UiSettings.from_env()


# ---- finding 6: a 400 for every malformed value -------------------------------------------
def _post_raw(client: TestClient, path: str, body: bytes) -> Any:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path", ["/api/labels", "/api/exemplars", "/api/concepts", "/api/rounds"])
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"rater": "bob", "events": [], "x": 1e999}', "out of range"),
        (b'{"rater": "bob", "events": [], "x": -1e999}', "out of range"),
        (b'{"rater": "bob", "events": [], "x": 1180591620717411303424}', "out of range"),
        (b'{"rater": "bob", "events": [], "x": ' + b"9" * 5000 + b"}", "out of range"),
        (b'{"rater": "bob", "events": [], "x": NaN}', "NaN"),
        (b'{"rater": "bob", "events": [], "x": Infinity}', "Infinity"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "nested too deeply"),
        (b'{"rater": "bob\xff\xfe", "events": []}', "UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b'{"rater": "bob", "events": [', "not valid JSON"),
        (b'"just a string"', "JSON object"),
    ],
)
def test_malformed_json_bodies_are_a_400(client: TestClient, path: str, body: bytes, says: str) -> None:
    r = _post_raw(client, path, body)
    assert r.status_code == 400, r.text
    assert says in r.json()["detail"]


@pytest.mark.parametrize("batch_id", ["1e999", "2**70", "-1e999", "1e300", '"1180591620717411303424"', '"1e999"',
                                      '"' + "9" * 5000 + '"', "true", "null", '{"a": 1}'])
def test_unusable_batch_ids_are_a_400(client: TestClient, world: World, concept_with_batch: str,
                                      batch_id: str) -> None:
    event = json.dumps(_event(world, concept_with_batch)).replace(
        f'"batch_id": {world.service.batches.latest(concept_with_batch).batch_id}',  # type: ignore[union-attr]
        f'"batch_id": {2**70 if batch_id == "2**70" else batch_id}')
    r = _post_raw(client, "/api/labels", b'{"rater": "bob", "events": [' + event.encode() + b"]}")
    assert r.status_code == 400, r.text
    assert r.json()["detail"]
    assert world.store.label_events(concept_with_batch) == []


@pytest.mark.parametrize(
    "url",
    ["/api/search?concept=red%20things&k=1e999", "/api/search?concept=red%20things&k=abc",
     "/export/red%20things/round-1e999.zip", "/export/red%20things/round-99999999999999999999999.zip",
     "/api/batch?concept=%ff%fe&rater=bob", "/api/batch?rater=bob", "/api/round?concept=" + "x" * 10_000,
     "/api/models?concept=%00", "/image/%ff"],
)
def test_malformed_query_and_path_values_are_not_a_500(client: TestClient, concept_with_batch: str, url: str) -> None:
    r = client.get(url)
    assert 400 <= r.status_code < 500 and r.status_code != 422, (url, r.status_code, r.text)
    assert len(r.text) < 1000


def test_the_models_route_survives_an_evaluation_without_ratings(client: TestClient, world: World,
                                                                 concept_with_batch: str) -> None:
    d = world.home / "concepts" / concept_dir_name(concept_with_batch)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text('{"concept": "red things", "n_eval_labels": 0, "models": '
                                    '[{"model": "zero-shot", "auc_pr": NaN, "auc_pr_lo": Infinity}]}')
    r = client.get("/api/models", params={"concept": concept_with_batch})
    assert r.status_code == 200
    assert r.json()["metrics"]["models"][0]["auc_pr"] is None


# ---- finding 8: user text in toasts is text ------------------------------------------------
HOSTILE = "<img src=x onerror=alert(1)>"


def test_error_toasts_show_user_text_as_text(client: TestClient, world: World) -> None:
    msg = run_event(client, "am-create", "click", [None, HOSTILE, "a phrase", "", "", "bob"])
    assert msg["success"] is False
    error = msg["output"]["error"]
    assert "<img" not in error and "&lt;img src=x onerror=alert(1)&gt;" in error
    assert HOSTILE in html.unescape(error)  # the rater sees the characters they typed


def test_handler_toasts_are_escaped(world: World, concept_with_batch: str) -> None:
    settings = UiSettings(home=world.home)
    with pytest.raises(handlers.gr.Error) as exc:
        handlers.on_create(world.service, settings, LabelingSession(), HOSTILE, "x", "", "", "bob")
    assert "<img" not in exc.value.message and "&lt;img" in exc.value.message
    session = LabelingSession().with_concept(concept_with_batch)
    with pytest.raises(handlers.gr.Error) as exc:
        handlers.on_widget_action(world.service, settings, session, {"action": "<b>x</b>" + "y" * 500})
    assert "<b>" not in exc.value.message and "&lt;b&gt;" in exc.value.message
    assert len(exc.value.message) < 200
    assert handlers.toast_text("a <script>b</script> & 'c'") == "a &lt;script&gt;b&lt;/script&gt; &amp; 'c'"


# ---- finding 10: upload quotas -----------------------------------------------------------
@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return [p.read_bytes() for p in write_real_like_images(tmp_path_factory.mktemp("up"), 8, seed=4242)]


def _upload(c: TestClient, concept: str, data: bytes, rater: str) -> Any:
    return c.post("/api/exemplars/upload", params={"concept": concept, "rater": rater}, content=data,
                  headers={"Content-Type": "application/octet-stream"})


@pytest.fixture
def quota_client(world: World) -> Iterator[TestClient]:
    settings = UiSettings(home=world.home, uploads_per_rater_hour=2, uploads_per_concept=3)
    with TestClient(build_app(settings, service=world.service), base_url=LOCAL) as c:
        yield c


def test_a_raters_uploads_per_hour_are_limited(quota_client: TestClient, world: World, concept_with_batch: str,
                                               pictures: list[bytes]) -> None:
    c = concept_with_batch
    assert [_upload(quota_client, c, pictures[k], "bob").status_code for k in range(2)] == [200, 200]
    assert _upload(quota_client, c, pictures[0], "bob").status_code == 200  # the same file again: no new upload
    r = _upload(quota_client, c, pictures[2], "bob")
    assert r.status_code == 429
    assert "in the last hour" in r.json()["detail"] and "try again" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 3601
    assert len(world.store.exemplars(c)) == 2
    assert _upload(quota_client, c, pictures[2], "carol").status_code == 200  # per rater


def test_a_concepts_uploads_are_limited(quota_client: TestClient, world: World, concept_with_batch: str,
                                        pictures: list[bytes]) -> None:
    c = concept_with_batch
    codes = [_upload(quota_client, c, pictures[k], rater).status_code
             for k, rater in enumerate(["ann", "bea", "cat", "dan"])]
    assert codes == [200, 200, 200, 429]
    r = _upload(quota_client, c, pictures[5], "eve")
    assert r.status_code == 429 and "AGILE_APP_UPLOADS_PER_CONCEPT" in r.json()["detail"]
    assert "retry-after" not in r.headers  # waiting does not help
    assert len(world.store.exemplars(c)) == 3
    # a corpus image marked through the upload route stores nothing new: not counted
    corpus_bytes = (world.store.image_path(world.ids[10]) or Path("/")).read_bytes()
    assert _upload(quota_client, c, corpus_bytes, "eve").status_code == 200


def test_upload_bytes_are_limited(world: World, concept_with_batch: str, pictures: list[bytes]) -> None:
    size = len(pictures[0])
    settings = UiSettings(home=world.home, upload_bytes_per_concept=size + len(pictures[1]) - 1)
    with TestClient(build_app(settings, service=world.service), base_url=LOCAL) as c:
        assert _upload(c, concept_with_batch, pictures[0], "ann").status_code == 200
        r = _upload(c, concept_with_batch, pictures[1], "bea")
        assert r.status_code == 429 and "MB" in r.json()["detail"]
    settings = UiSettings(home=world.home, upload_bytes_per_rater_hour=size)
    with TestClient(build_app(settings, service=world.service), base_url=LOCAL) as c:
        r = _upload(c, concept_with_batch, pictures[3], "ann")  # ann uploaded `size` bytes above
        assert r.status_code == 429 and "last hour" in r.json()["detail"]


def test_upload_quotas_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = UiSettings()
    assert (defaults.uploads_per_rater_hour, defaults.uploads_per_concept) == (20, 50)
    assert defaults.upload_bytes_per_concept == 200 * 1024 * 1024
    monkeypatch.setenv("AGILE_APP_UPLOADS_PER_RATER_HOUR", "5")
    monkeypatch.setenv("AGILE_APP_UPLOAD_MB_PER_RATER_HOUR", "10")
    monkeypatch.setenv("AGILE_APP_UPLOADS_PER_CONCEPT", "0")
    monkeypatch.setenv("AGILE_APP_UPLOAD_MB_PER_CONCEPT", "100")
    s = UiSettings.from_env()
    assert (s.uploads_per_rater_hour, s.upload_bytes_per_rater_hour) == (5, 10 * 1024 * 1024)
    assert (s.uploads_per_concept, s.upload_bytes_per_concept) == (0, 100 * 1024 * 1024)
    monkeypatch.setenv("AGILE_APP_UPLOADS_PER_CONCEPT", "-1")
    with pytest.raises(ConfigError, match="AGILE_APP_UPLOADS_PER_CONCEPT"):
        UiSettings.from_env()


# ---- also: analytics, server paths, ids, echoes --------------------------------------------
def test_gradio_analytics_are_off(client: TestClient) -> None:
    assert client.app.state.blocks.analytics_enabled is False  # type: ignore[attr-defined]
    assert client.get("/config").json()["analytics_enabled"] is False
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    code = "import os, labeling_ui.app, gradio.analytics as a; print(os.environ['GRADIO_ANALYTICS_ENABLED'], a.analytics_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_no_absolute_server_path_is_shown(client: TestClient, world: World, concept_with_batch: str) -> None:
    c = concept_with_batch
    inside = f"concepts/{concept_dir_name(c)}/round-001"
    world.store.record_round(c, 0, label_cutoff=0, model_uri="/nonexistent/round-000", model_version="1",
                             mlflow_run_id="mlf0", n_pos=1, n_neg=1, train_seconds=0.5)
    world.store.record_round(c, 1, label_cutoff=0, model_uri=str(world.home / inside), model_version="2",
                             mlflow_run_id="mlf1", n_pos=1, n_neg=1, train_seconds=0.5)
    home = str(world.home)
    panel = handlers.model_panel(world.service, c)
    assert "set_tracking_uri" in panel and home not in panel and "/nonexistent" not in panel
    assert "$AGILE_HOME" in panel
    for url in (f"/api/models?concept={c}", f"/api/round?concept={c}", f"/api/batch?concept={c}&rater=bob",
                "/api/health", "/api/session"):
        r = client.get(url)
        assert r.status_code == 200, url
        assert home not in r.text and "/nonexistent" not in r.text, url
    rounds = client.get("/api/models", params={"concept": c}).json()["rounds"]
    assert {r["model_dir"] for r in rounds} == {f"$AGILE_HOME/{inside}", "round-000"}
    r = client.get(f"/export/{c}/round-1.zip")  # its files are missing: said without the path
    assert r.status_code == 404 and home not in r.text
    # the snippet for a store outside the data directory, and a server with credentials
    from labeling_ui.export import load_snippet, public_spec

    assert "/srv/secret" not in load_snippet(c, "sqlite:////srv/secret/mlflow.db", home=world.home)
    assert "pw@" not in load_snippet(c, "https://me:pw@mlflow.example/", home=world.home)
    assert public_spec("open_clip:ViT-B-32:/srv/models/ckpt.pt", world.home) == "open_clip:ViT-B-32:PATH/TO/ckpt.pt"


def test_the_export_shows_no_server_path(world: World, concept_with_batch: str) -> None:
    model_dir = world.home / "concepts" / concept_dir_name(concept_with_batch) / "round-000"
    model_dir.mkdir(parents=True)
    (model_dir / "model.pt").write_bytes(b"weights")
    (model_dir / "training_labels.json").write_text(json.dumps({"embedding_model": "open_clip-x"}))
    world.store.record_round(concept_with_batch, 0, label_cutoff=1, model_uri=str(model_dir), model_version="1",
                             n_pos=3, n_neg=4)
    service = type(world.service)(world.store, world.trigger, home=world.home,
                                  encoder_spec="open_clip:ViT-B-32:/srv/models/ckpt.pt")
    with TestClient(build_app(UiSettings(home=world.home), service=service), base_url=LOCAL) as c:
        r = c.get(f"/export/{concept_with_batch}/round-0.zip")
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        text = "".join(zf.read(n).decode("utf-8", "replace") for n in zf.namelist() if not n.endswith(".pt"))
    assert "/srv/models" not in text and str(world.home) not in text and "ckpt.pt" in text


def test_ids_and_names_with_a_trailing_newline_are_refused(client: TestClient, world: World,
                                                            concept_with_batch: str) -> None:
    assert not valid_rater_name("bob\n") and valid_rater_name("bob")
    assert not IMAGE_ID.match(world.ids[0] + "\n") and IMAGE_ID.match(world.ids[0])
    r = client.post("/api/exemplars", json={"rater": "bob", "concept": concept_with_batch,
                                            "image_id": world.ids[0] + "\n"})
    assert r.status_code == 400
    assert client.get(f"/image/{world.ids[0]}%0A").status_code == 404
    r = client.post("/api/labels", json={"rater": "bob", "events": [_event(world, concept_with_batch,
                                                                           event_id="abcdefgh\n")]})
    assert r.status_code == 400 and "event_id" in r.json()["detail"]
    assert world.store.exemplars(concept_with_batch) == [] and world.store.label_events(concept_with_batch) == []


def test_a_long_name_is_not_echoed_whole(client: TestClient, world: World) -> None:
    name = "<" + "x" * 10_000
    r = client.post("/api/concepts", json={"rater": "bob", "name": name, "positives": ["a"]})
    assert r.status_code == 400
    assert len(r.json()["detail"]) < 500 and "x" * 100 not in r.json()["detail"]
    assert "not allowed" in r.json()["detail"]
    r = client.get("/api/round", params={"concept": "y" * 10_000})
    assert r.status_code == 400 and "y" * 100 not in r.json()["detail"]
    r = client.get("/export/" + "z" * 5_000 + "/round-0.zip")
    assert r.status_code == 404 and "z" * 100 not in r.json()["detail"]
    with pytest.raises(handlers.gr.Error) as exc:
        handlers.on_create(world.service, UiSettings(home=world.home), LabelingSession(), name, "a", "", "", "bob")
    assert len(exc.value.message) < 500
