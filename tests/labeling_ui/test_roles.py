"""Roles per concept and invite links, through the real app: its HTTP routes and its Gradio
events (Gradio's own queue routes), with sign-in on. alice owns "red things"; bob and cy are
other signed-in people."""

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from labeling_ui import handlers
from labeling_ui.api import INVITE_COOKIE
from labeling_ui.app import build_app
from labeling_ui.config import ConfigError, UiSettings
from labeling_ui.session import LabelingSession
from tests.labeling_ui.conftest import LOCAL, World
from tests.labeling_ui.gradio_events import run_event

CONCEPT = "red things"
PEOPLE = [("alice", "pw-a"), ("bob", "pw-b"), ("cy", "pw-c")]


@pytest.fixture
def team(world: World, concept_with_batch: str) -> Iterator[Callable[[str], TestClient]]:
    """A function: a person's name -> a TestClient signed in as them (one app, one cookie jar each)."""
    app = build_app(UiSettings(home=world.home, auth=PEOPLE), service=world.service)
    clients: list[TestClient] = []

    def signed_in(name: str) -> TestClient:
        c = TestClient(app, base_url=LOCAL, follow_redirects=False)
        c.__enter__()
        clients.append(c)
        password = dict(PEOPLE)[name]
        assert c.post("/login", data={"username": name, "password": password}).status_code == 200
        return c

    yield signed_in
    for c in clients:
        c.__exit__(None, None, None)


def _labels(c: TestClient, world: World, n: int = 1, prefix: str = "ev") -> Any:
    batch = world.service.batches.latest(CONCEPT)
    assert batch is not None
    events = [{"concept": CONCEPT, "image_id": i, "label": "positive", "event_id": f"{prefix}-{k:06d}",
               "batch_id": batch.batch_id} for k, i in enumerate(batch.order[:n])]
    return c.post("/api/labels", json={"events": events})


def _invite(owner: TestClient, role: str = "rater", expires: str = "7d") -> dict[str, Any]:
    r = owner.post("/api/invites", json={"concept": CONCEPT, "role": role, "expires": expires, "note": "for bob"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_stranger_sees_nothing_of_a_concept(team: Callable[[str], TestClient], world: World) -> None:
    bob = team("bob")
    assert bob.get("/api/session").json()["concepts"] == []
    for url in ["/api/batch", "/api/round", "/api/models", "/api/agreement"]:
        r = bob.get(url, params={"concept": CONCEPT})
        assert r.status_code == 404 and "alice" not in r.text, url
    assert bob.get(f"/metrics/{CONCEPT}.png").status_code == 404
    assert bob.get(f"/export/{CONCEPT}/round-0.zip").status_code == 404
    assert _labels(bob, world).status_code == 404
    assert bob.post("/api/rounds", json={"concept": CONCEPT}).status_code == 404
    assert world.store.label_events(CONCEPT) == []
    # an unknown concept reads exactly the same
    assert bob.get("/api/batch", params={"concept": "no such"}).json()["detail"].replace("no such", CONCEPT) == \
        bob.get("/api/batch", params={"concept": CONCEPT}).json()["detail"]


def test_an_invite_makes_a_rater_who_can_rate_but_not_train_edit_or_export(
        team: Callable[[str], TestClient], world: World) -> None:
    alice, bob = team("alice"), team("bob")
    made = _invite(alice)
    assert made["link"].startswith("/invite/") and made["invite"]["role"] == "rater"
    r = bob.get(made["link"])
    assert r.status_code == 303 and r.headers["location"] == "/?concept=red+things"
    assert bob.get("/api/session").json()["concepts"] == [CONCEPT]
    assert bob.get("/api/batch", params={"concept": CONCEPT}).status_code == 200
    assert _labels(bob, world, 2).status_code == 200
    assert {e["rater"] for e in world.store.label_events(CONCEPT)} == {"bob"}
    r = bob.post("/api/rounds", json={"concept": CONCEPT, "job": "round"})
    assert r.status_code == 403 and "only its owner can start its rounds" in r.json()["detail"]
    assert bob.get(f"/export/{CONCEPT}/round-0.zip").status_code == 403
    assert bob.get("/api/members", params={"concept": CONCEPT}).status_code == 403
    assert bob.post("/api/invites", json={"concept": CONCEPT, "role": "rater"}).status_code == 403
    assert bob.post("/api/members", json={"concept": CONCEPT, "user": "cy", "role": "rater"}).status_code == 403
    img = world.store.label_events(CONCEPT)[0]["image_id"]
    assert bob.post("/api/review", json={"concept": CONCEPT, "image_id": img, "label": "negative"}).status_code == 403
    # the owner still can
    assert alice.post("/api/rounds", json={"concept": CONCEPT, "job": "round"}).status_code == 200
    overview = alice.get("/api/members", params={"concept": CONCEPT}).json()
    assert [(m["user"], m["role"], m["active"]) for m in overview["members"]] == [("bob", "rater", True)]
    assert overview["invites"][0]["uses"] == 1 and overview["invites"][0]["status"] == "active"
    assert "token" not in json.dumps(overview)


def test_revoking_an_invite_stops_it_and_its_members_at_once(team: Callable[[str], TestClient], world: World) -> None:
    alice, bob, cy = team("alice"), team("bob"), team("cy")
    made = _invite(alice)
    assert bob.get(made["link"]).status_code == 303
    assert _labels(bob, world, 1).status_code == 200
    r = alice.post("/api/invites/revoke", json={"concept": CONCEPT, "invite_id": made["invite"]["invite_id"]})
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert _labels(bob, world, 1, prefix="late").status_code == 404  # the very next request
    assert bob.get("/api/session").json()["concepts"] == []
    r = cy.get(made["link"])
    assert r.status_code == 410 and "revoked" in r.json()["detail"]
    assert len(world.store.label_events(CONCEPT)) == 1  # bob's rating from before stays


def test_a_viewer_reads_but_cannot_rate(team: Callable[[str], TestClient], world: World) -> None:
    alice, cy = team("alice"), team("cy")
    assert cy.get(_invite(alice, "viewer")["link"]).status_code == 303
    assert cy.get("/api/batch", params={"concept": CONCEPT}).status_code == 200
    assert cy.get("/api/agreement", params={"concept": CONCEPT}).status_code == 200
    r = _labels(cy, world)
    assert r.status_code == 403 and "rater invite" in r.json()["detail"]
    r = cy.post("/api/exemplars", json={"concept": CONCEPT, "image_id": world.ids[0]})
    assert r.status_code == 403
    r = cy.post(f"/api/exemplars/upload?concept={CONCEPT.replace(' ', '%20')}", content=b"x",
                headers={"Content-Type": "image/png"})
    assert r.status_code == 403
    assert world.store.label_events(CONCEPT) == [] and world.store.exemplars(CONCEPT) == []


def test_expired_and_forged_invites_admit_nobody(team: Callable[[str], TestClient], world: World) -> None:
    alice, bob = team("alice"), team("bob")
    made = _invite(alice)
    with sqlite3.connect(world.store.path) as con:
        con.execute("UPDATE concept_invites SET expires_at = ?", (time.time() - 1,))
    r = bob.get(made["link"])
    assert r.status_code == 410 and "expired" in r.json()["detail"]
    assert bob.get("/invite/" + "A" * 32).status_code == 400
    assert bob.get("/invite/short").status_code == 404
    assert bob.get("/api/session").json()["concepts"] == []


def test_only_the_token_digest_is_stored(team: Callable[[str], TestClient], world: World) -> None:
    token = _invite(team("alice"))["token"]
    assert token.encode() not in world.store.path.read_bytes()
    for wal in world.store.path.parent.glob("*.sqlite-wal"):
        assert token.encode() not in wal.read_bytes()


def test_an_invite_followed_before_signing_in_is_redeemed_by_the_page_load(
        team: Callable[[str], TestClient], world: World) -> None:
    made = _invite(team("alice"))
    app = build_app(UiSettings(home=world.home, auth=PEOPLE), service=world.service)
    with TestClient(app, base_url=LOCAL, follow_redirects=False) as anon:
        r = anon.get(made["link"])
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert anon.cookies.get(INVITE_COOKIE) == made["token"]
    settings = UiSettings(home=world.home, auth=PEOPLE)
    view = handlers.on_load(world.service, settings, LabelingSession(user="bob"), "", made["token"])
    assert view.concept == CONCEPT and view.choices == [CONCEPT]
    assert any("joined “red things” as a rater" in m for m in view.infos)
    # a revoked one tells them so, and opens nothing
    world.store.revoke_invite(made["invite"]["invite_id"], revoked_by="alice")
    view = handlers.on_load(world.service, settings, LabelingSession(user="bob"), "", made["token"])
    assert view.concept is None and any("revoked" in m for m in view.infos)


def test_redeeming_never_lowers_a_role(team: Callable[[str], TestClient], world: World) -> None:
    alice, bob = team("alice"), team("bob")
    assert alice.post("/api/members", json={"concept": CONCEPT, "user": "bob", "role": "rater"}).status_code == 200
    assert bob.get(_invite(alice, "viewer")["link"]).status_code == 303
    assert _labels(bob, world).status_code == 200  # still a rater
    r = alice.post("/api/members", json={"concept": CONCEPT, "user": "bob", "role": "owner"})
    assert r.status_code == 400 and "one owner" in r.json()["detail"]
    assert alice.post("/api/members", json={"concept": CONCEPT, "user": "bob", "role": "none"}).status_code == 200
    assert _labels(bob, world, prefix="gone").status_code == 404


def test_the_review_queue_decision_is_the_owners_label(team: Callable[[str], TestClient], world: World) -> None:
    alice, bob, cy = team("alice"), team("bob"), team("cy")
    for person in (bob, cy):
        assert person.get(_invite(alice)["link"]).status_code == 303
    batch = world.service.batches.latest(CONCEPT)
    assert batch is not None
    img = batch.order[0]
    for person, label in ((bob, "positive"), (cy, "negative")):
        ev = {"concept": CONCEPT, "image_id": img, "label": label, "event_id": f"d-{label}", "batch_id": batch.batch_id}
        assert person.post("/api/labels", json={"events": [ev]}).status_code == 200
    queue = alice.get("/api/agreement", params={"concept": CONCEPT}).json()["train"]["review_queue"]
    assert queue["size"] == 1
    r = alice.post("/api/review", json={"concept": CONCEPT, "image_id": img, "label": "negative"})
    assert r.status_code == 200 and r.json()["review_queue_size"] == 0
    assert world.store.effective_labels(CONCEPT)[img] == 0
    r = alice.post("/api/review", json={"concept": CONCEPT, "image_id": world.ids[-1], "label": "positive"})
    assert r.status_code == 400 and "nothing to decide" in r.json()["detail"]


# ---- the same rules on Gradio's own event routes --------------------------------------------
def test_gradio_events_enforce_roles(team: Callable[[str], TestClient], world: World) -> None:
    alice, bob = team("alice"), team("bob")
    assert bob.get(_invite(alice)["link"]).status_code == 303
    s = f"s{os.urandom(6).hex()}"
    opened = run_event(bob, None, "load", [CONCEPT], session=s)  # the page load opens ?concept=
    assert opened["success"] is True
    before = world.store.get_concept(CONCEPT)
    saved = run_event(bob, "am-save", "click", [None, "hacked phrase", "", "obey me"], session=s)
    assert saved["success"] is False and "only its owner can edit" in saved["output"]["error"]
    again = run_event(bob, "am-again", "click", [None, ""], session=s)
    assert again["success"] is False and "start its rounds" in again["output"]["error"]
    invite = run_event(bob, "am-invite-create", "click", [None, "rater", "7d", ""], session=s)
    assert invite["success"] is False
    assert world.store.get_concept(CONCEPT) == before and world.store.invites(CONCEPT)[0]["created_by"] == "alice"
    assert len(world.store.invites(CONCEPT)) == 1
    # a stranger cannot even open it
    s2 = f"s{os.urandom(6).hex()}"
    cy = team("cy")
    shown = run_event(cy, None, "load", [CONCEPT], session=s2)
    assert shown["success"] is True and CONCEPT not in json.dumps(shown["output"])
    assert run_event(cy, "am-save", "click", [None, "x", "", ""], session=s2)["success"] is False
    # the owner can
    s3 = f"s{os.urandom(6).hex()}"
    assert run_event(alice, None, "load", [CONCEPT], session=s3)["success"] is True
    assert run_event(alice, "am-save", "click", [None, "crimson things", "", "Only red."], session=s3)["success"] is True
    assert "crimson things" in world.store.get_concept(CONCEPT).positives


def test_handlers_refuse_by_role(world: World, concept_with_batch: str) -> None:
    settings = UiSettings(home=world.home, auth=PEOPLE)
    world.store.set_member(CONCEPT, "bob", "viewer", granted_by="alice")
    bob = LabelingSession(user="bob").with_concept(CONCEPT)
    for call in (lambda: handlers.on_save(world.service, settings, bob, "x", "", ""),
                 lambda: handlers.on_find_again(world.service, settings, bob, None),
                 lambda: handlers.on_widget_action(world.service, settings, bob, {"action": "round", "concept": CONCEPT}),
                 lambda: handlers.on_invite(world.service, settings, bob, "rater", "7d", ""),
                 lambda: handlers.on_revoke(world.service, settings, bob, "member:bob")):
        with pytest.raises(handlers.gr.Error):
            call()
    view = handlers.open_concept(world.service, settings, bob, CONCEPT)
    assert view.form["can_edit"] is False and view.manage["visible"] is False
    assert json.loads(view.widget)["role"] == "viewer" and "You are a **viewer**" in view.status
    assert "⬇ model" not in view.model and "data-decide" not in view.raters
    alice = LabelingSession(user="alice").with_concept(CONCEPT)
    view = handlers.open_concept(world.service, settings, alice, CONCEPT)
    assert view.form["can_edit"] is True and view.manage["visible"] is True
    assert view.manage["choices"] == [("bob (viewer)", "member:bob")]
    made = handlers.on_invite(world.service, settings, alice, "rater", "1d", "for dee")
    assert "/invite/" in made.invite_link and "shown only this once" in made.invite_link
    assert any(c[1].startswith("invite:") for c in made.manage["choices"])


def test_without_sign_in_the_one_user_owns_everything(client: TestClient, world: World,
                                                     concept_with_batch: str) -> None:
    r = client.post("/api/invites", json={"concept": CONCEPT, "role": "rater"})
    assert r.status_code == 400 and "AGILE_APP_AUTH" in r.json()["detail"]
    r = client.post("/api/rounds", json={"concept": CONCEPT, "rater": "bob", "job": "start"})
    assert r.status_code == 200, r.text


def test_default_role_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, team: Callable[[str], TestClient],
                                                 world: World) -> None:
    monkeypatch.setenv("AGILE_APP_DEFAULT_ROLE", "viewer")
    assert UiSettings.from_env().default_role == "viewer"
    monkeypatch.setenv("AGILE_APP_DEFAULT_ROLE", "none")
    assert UiSettings.from_env().default_role is None
    monkeypatch.setenv("AGILE_APP_DEFAULT_ROLE", "owner")
    with pytest.raises(ConfigError, match="none, viewer or rater"):
        UiSettings.from_env()
    app = build_app(UiSettings(home=world.home, auth=PEOPLE, default_role="viewer"), service=world.service)
    with TestClient(app, base_url=LOCAL) as c:
        assert c.post("/login", data={"username": "cy", "password": "pw-c"}).status_code == 200
        assert c.get("/api/session").json()["concepts"] == [CONCEPT]
        assert _labels(c, world).status_code == 403


def test_the_cli_manages_members_and_invites(world: World, concept_with_batch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from agile_pipeline.cli import app as cli

    monkeypatch.setenv("AGILE_HOME", str(world.home))
    runner = CliRunner()
    r = runner.invoke(cli, ["concept", "invite", CONCEPT, "--role", "viewer", "--expires", "12h", "--note", "for dee"])
    assert r.exit_code == 0, r.output
    token = r.output.split("/invite/")[1].split()[0]
    invite_id = world.store.invites(CONCEPT)[0]["invite_id"]
    assert world.store.invites(CONCEPT)[0]["expires_at"] == pytest.approx(time.time() + 43200, abs=60)
    assert runner.invoke(cli, ["concept", "grant", CONCEPT, "bob", "rater"]).exit_code == 0
    r = runner.invoke(cli, ["concept", "members", CONCEPT])
    assert "rater\tbob\tgranted\tactive" in r.output and f"invite\t{invite_id}\tviewer\tactive" in r.output
    assert token not in r.output
    assert runner.invoke(cli, ["concept", "revoke", CONCEPT, invite_id]).exit_code == 0
    assert "revoked" in runner.invoke(cli, ["concept", "members", CONCEPT]).output
    r = runner.invoke(cli, ["concept", "grant", CONCEPT, "bob", "owner"])
    assert r.exit_code == 1 and "one owner" in r.output
    r = runner.invoke(cli, ["concept", "invite", CONCEPT, "--expires", "1y"])
    assert r.exit_code == 1 and "7d" in r.output
    assert runner.invoke(cli, ["concept", "grant", CONCEPT, "bob", "none"]).exit_code == 0
    assert world.store.members(CONCEPT) == []


@pytest.mark.parametrize("origin", ["http://localhost:9999", "http://127.0.0.1:1", "null", "http://evil.test",
                                    "file://", "http://127.0.0.1/x"])
def test_a_page_on_another_origin_cannot_drive_the_app(world: World, origin: str) -> None:
    """Gradio lets any localhost page call its routes with the user's cookies; the app does not."""
    app = build_app(UiSettings(home=world.home), service=world.service)
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/config", headers={"Origin": "http://127.0.0.1"}).status_code == 200  # the app itself
        r = c.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "abcdefgh"},
                   headers={"Origin": origin})
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
        assert c.get("/config", headers={"Origin": origin}).status_code == 403
        assert c.get("/api/session", headers={"Origin": origin}).status_code == 403


def test_a_proxy_name_in_allowed_hosts_is_a_valid_origin(world: World) -> None:
    app = build_app(UiSettings(home=world.home, allowed_hosts=("rate.example.org",)), service=world.service)
    with TestClient(app, base_url=LOCAL) as c:  # the proxy rewrote Host to the app's own address
        assert c.get("/config", headers={"Origin": "https://rate.example.org"}).status_code == 200
        assert c.get("/config", headers={"Origin": "https://other.example.org"}).status_code == 403
