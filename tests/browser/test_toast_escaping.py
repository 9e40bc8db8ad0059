"""Issue 17, finding 8 in headless Chromium: user text in an error toast is shown as text."""

from pathlib import Path
from typing import Any

import pytest

from agile_pipeline.lib.state import StateStore
from labeling_ui.app import build_app
from labeling_ui.config import UiSettings
from labeling_ui.service import LabelingService
from tests.labeling_ui.conftest import live_server
from tests.labeling_ui.fakes import FakeTrigger, ingest_images

pytestmark = pytest.mark.browser

HOSTILE = "<img src=x onerror=window.__pwned=1>"


def test_a_hostile_concept_name_shows_as_text_in_the_toast(agile_home: Path, tmp_path: Path, page: Any) -> None:
    store = StateStore(agile_home / "agile.sqlite")
    ids = ingest_images(store, tmp_path / "pictures", 10, seed=5)
    service = LabelingService(store, FakeTrigger(store, ids, batch_size=5), home=agile_home)
    app = build_app(UiSettings(home=agile_home), service=service)
    with live_server(app) as url:
        page.goto(url + "/")
        page.evaluate("localStorage.setItem('agile.rater', 'bob')")
        page.reload()
        page.wait_for_selector("[data-testid=rater-name]", timeout=30000)  # the app is live
        page.fill("#am-name input, #am-name textarea", HOSTILE)
        page.fill("#am-pos textarea", "a phrase")
        page.click("#am-create")
        toast = page.wait_for_selector("[data-testid=toast-body]", timeout=30000)
        text = toast.inner_text()
        assert HOSTILE in text  # the characters the rater typed
        assert toast.query_selector("img") is None  # not an element
        assert page.evaluate("window.__pwned === undefined")
        assert store.concept_names() == []
