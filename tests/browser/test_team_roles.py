"""Issue 17 in headless Chromium: an owner and two raters, each in their own browser.

alice owns "stripes" and invites bob and cy through invite links made in the Raters tab. The
raters sign in, rate, and cannot edit or train; the owner can. A scripted disagreement shows the
right Krippendorff's alpha and review queue; the owner's decision empties the queue; a revoked
invite stops working on the very next request. Screenshots go to ``test-artifacts/team-*.png``.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import krippendorff
import numpy as np
import pytest

from agile_pipeline.lib.state import StateStore
from labeling_ui.app import build_app
from labeling_ui.config import UiSettings
from labeling_ui.service import LabelingService
from tests.labeling_ui.conftest import live_server
from tests.labeling_ui.fakes import FakeTrigger, ingest_images

pytestmark = pytest.mark.browser

PEOPLE = [("alice", "pw-alice"), ("bob", "pw-bob"), ("cy", "pw-cy")]
STAGE_IMG = "[data-testid=stage] img"
CONCEPT = "stripes"


@contextmanager
def _person(browser: Any, url: str, name: str, path: str = "/?concept=stripes") -> Iterator[Any]:
    """A browser of its own (own cookies and storage), signed in as ``name`` after opening ``path``."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    try:
        page.goto(url + path)
        page.wait_for_selector("input[type=password]", timeout=30000)
        page.fill("input[type=text]", name)
        page.fill("input[type=password]", dict(PEOPLE)[name])
        page.keyboard.press("Enter")
        page.wait_for_selector("[data-testid=rater-name]", timeout=30000)
        yield page
    finally:
        ctx.close()


def _shot(page: Any, artifacts: Path, name: str) -> None:
    page.wait_for_timeout(200)
    page.screenshot(path=str(artifacts / f"team-{name}.png"), full_page=True)


def _invite(owner: Any, role: str = "rater") -> str:
    owner.get_by_role("tab", name="Raters").click()
    owner.wait_for_selector("#am-invite-create", state="visible", timeout=15000)
    owner.get_by_label(role, exact=True).check()
    before = owner.locator("[data-slot=new-invite] a.am-invite").count()
    old = owner.get_attribute("[data-slot=new-invite] a.am-invite", "href") if before else None
    owner.click("#am-invite-create")
    owner.wait_for_function(
        "(old) => { const a = document.querySelector('[data-slot=new-invite] a.am-invite');"
        " return a && a.getAttribute('href') !== old; }", arg=old, timeout=15000)
    return str(owner.get_attribute("[data-slot=new-invite] a.am-invite", "href"))


def _rate(page: Any, keys: str) -> None:
    for k, key in enumerate(keys, start=1):
        page.keyboard.press(key)
        page.wait_for_function(
            "(n) => (document.querySelector('[data-testid=progress]')?.textContent || '').startsWith(n + ' /')",
            arg=k, timeout=15000)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=save-state]')?.dataset.pending === '0'", timeout=15000)


def _status(page: Any, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    return int(page.evaluate(
        "([m, p, b]) => fetch(p, { method: m, credentials: 'same-origin', headers: b ? "
        "{ 'Content-Type': 'application/json' } : {}, body: b ? JSON.stringify(b) : undefined }).then(r => r.status)",
        [method, path, body]))


def test_an_owner_and_two_raters(agile_home: Path, tmp_path: Path, browser: Any, artifacts_dir: Path) -> None:
    store = StateStore(agile_home / "agile.sqlite")
    ids = ingest_images(store, tmp_path / "pictures", 30, seed=8)
    trig = FakeTrigger(store, ids, batch_size=6)
    service = LabelingService(store, trig, home=agile_home)
    service.ratings.create_concept(CONCEPT, "stripes", "", "Stripes in any direction.", owner="alice")
    service.rounds.start_concept(CONCEPT, requested_by="alice")
    app = build_app(UiSettings(home=agile_home, auth=PEOPLE), service=service)
    with live_server(app) as url, _person(browser, url, "alice") as owner:
        owner.wait_for_selector(STAGE_IMG, timeout=30000)
        bob_link, cy_link = _invite(owner), _invite(owner)
        assert bob_link.startswith("/invite/") and bob_link != cy_link
        _shot(owner, artifacts_dir, "01-owner-invites")
        first = store.invites(CONCEPT)[0]["invite_id"]

        with _person(browser, url, "bob", bob_link) as bob, _person(browser, url, "cy", cy_link) as cy:
            for rater in (bob, cy):  # the page load redeemed the invite and opened the concept
                rater.wait_for_selector(STAGE_IMG, timeout=30000)
            # what a rater sees: no editing, no training, no management
            bob.get_by_role("tab", name="1 · Concept").click()
            assert not bob.is_visible("#am-save") and not bob.is_visible("#am-again")
            assert bob.is_disabled("#am-pos textarea")
            assert "You are a rater" in bob.inner_text("#am-status")
            bob.get_by_role("tab", name="Raters").click()
            assert not bob.is_visible("#am-invite-create")
            _shot(bob, artifacts_dir, "02-rater-view")
            bob.get_by_role("tab", name="2 · Rate").click()
            bob.wait_for_selector(STAGE_IMG)
            # the scripted disagreement on the first three images: agree, disagree, agree
            _rate(bob, "yyn")
            _rate(cy, "ynn")
            # the server refuses what a rater may not do, whatever the browser sends
            assert _status(bob, "POST", "/api/rounds", {"concept": CONCEPT, "job": "round"}) == 403
            assert _status(bob, "GET", f"/export/{CONCEPT}/round-0.zip") == 403
            assert _status(cy, "POST", "/api/invites", {"concept": CONCEPT, "role": "rater"}) == 403
            assert [c[0] for c in trig.calls if "start" not in c[0]] == []

            # the owner sees the agreement and decides the one disagreement
            owner.get_by_role("tab", name="3 · Model").click()
            owner.get_by_role("tab", name="Raters").click()
            box = owner.wait_for_selector("[data-slot=agreement][data-queue-size='1']", timeout=15000)
            expected = krippendorff.alpha(reliability_data=np.array([[1, 1, 0], [1, 0, 0]], dtype=float),
                                          level_of_measurement="nominal")
            assert float(box.get_attribute("data-alpha") or "nan") == pytest.approx(expected, abs=1e-6)
            assert box.get_attribute("data-co-rated") == "3"
            _shot(owner, artifacts_dir, "03-owner-review-queue")
            disputed = owner.get_attribute("[data-slot=agreement] figure[data-image-id]", "data-image-id")
            owner.click("[data-slot=agreement] figure button[data-decide=negative]")
            owner.wait_for_selector("[data-slot=agreement][data-queue-size='0']", timeout=15000)
            assert store.effective_labels(CONCEPT)[str(disputed)] == 0

            # revoke bob's invite in the UI: his very next request is refused
            owner.click("#am-revoke-choice input")
            owner.get_by_role("option", name=f"invite {first}", exact=False).click()
            owner.click("#am-revoke")
            owner.wait_for_selector(f"[data-invite-id='{first}'][data-status=revoked]", timeout=15000)
            assert _status(bob, "GET", f"/api/batch?concept={CONCEPT}") == 404
            n = len(store.label_events(CONCEPT))
            bob.keyboard.press("y")
            bob.wait_for_function(
                "() => (document.querySelector('.am-rater')?.textContent || '').includes('could not be saved')",
                timeout=15000)
            assert len(store.label_events(CONCEPT)) == n
            _shot(bob, artifacts_dir, "04-revoked-rater")
            assert _status(cy, "GET", f"/api/batch?concept={CONCEPT}") == 200  # cy's invite still works
            assert bob.errors == [] and cy.errors == []

        # the owner edits and trains
        owner.get_by_role("tab", name="1 · Concept").click()
        owner.fill("#am-pos textarea", "zebra stripes")
        owner.click("#am-save")
        # wait for this save's own toast: the revoke's toast may still be on screen
        owner.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=toast-body]')]"
            ".some(t => t.textContent.includes('Saved.'))", timeout=15000)
        assert "zebra stripes" in store.get_concept(CONCEPT).positives
        starts = sum(1 for c in trig.calls if "start" in c[0])
        owner.click("#am-again")
        for _ in range(150):
            if sum(1 for c in trig.calls if "start" in c[0]) > starts:
                break
            owner.wait_for_timeout(100)
        assert sum(1 for c in trig.calls if "start" in c[0]) == starts + 1
        assert owner.errors == []
