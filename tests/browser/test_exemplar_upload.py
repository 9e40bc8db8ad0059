"""In headless Chromium: a rater who finds no positive in the first batch is offered an upload
next to search and ★, picks a file (two clicks) and sees it in the exemplar strip.

Screenshots go to ``test-artifacts/15-recovery-upload.png`` (the offer), ``16-uploaded.png``
(after the upload) and ``17-upload-error.png`` (a file that is not an image).
"""

import hashlib
from pathlib import Path
from typing import Any

import pytest

from agile_pipeline.lib.state import UPLOAD_SPLIT, StateStore
from agile_pipeline.lib.uploads import has_vector
from agile_pipeline.lib.vectors import VectorStore
from agile_pipeline.settings import Paths
from labeling_ui.app import build_app
from labeling_ui.config import UiSettings
from labeling_ui.service import LabelingService
from tests.browser.test_rating_flow import _reject_first_batch, _shot
from tests.hostile_images import write_real_like_images
from tests.labeling_ui.conftest import live_server
from tests.labeling_ui.fakes import FakeTrigger, ingest_images

pytestmark = pytest.mark.browser

STRIP = "[data-testid=exemplars]"
STATUS = "[data-testid=upload-status]"


def _strip_img_loaded(page: Any, image_id: str) -> None:
    page.wait_for_selector(f"{STRIP} img[data-id='{image_id}']", timeout=15000)
    page.wait_for_function(
        "(id) => { const im = document.querySelector(`[data-testid=exemplars] img[data-id='${id}']`);"
        " return im && im.complete && im.naturalWidth > 0; }", arg=image_id, timeout=15000)


def test_no_positive_offers_upload_and_an_uploaded_file_becomes_an_exemplar(
    agile_home: Path, tmp_path: Path, page: Any, artifacts_dir: Path
) -> None:
    store = StateStore(agile_home / "agile.sqlite")
    ids = ingest_images(store, tmp_path / "pictures", 30, seed=6)
    trig = FakeTrigger(store, ids, batch_size=6)
    service = LabelingService(store, trig, home=agile_home, encoder_spec="random:32")
    service.ratings.create_concept("rare bird", "a rare bird", "", "", owner="Cy")
    service.rounds.start_concept("rare bird", requested_by="Cy")
    mine = write_real_like_images(tmp_path / "mine", 2, seed=1234)
    not_image = tmp_path / "holiday.jpg"
    not_image.write_bytes(b"<html>this is a web page saved with a .jpg name</html>\n" * 20)
    app = build_app(UiSettings(home=agile_home), service=service)
    with live_server(app) as url:
        _reject_first_batch(page, url, "rare bird")

        # the recovery notice offers the upload next to search and ★
        text = page.inner_text("[data-testid=recovery]")
        assert "Search for one" in text and "exemplar" in text and "Upload an image" in text
        assert page.is_visible("[data-testid=recovery-upload]")
        _shot(page, artifacts_dir, "15-recovery-upload")

        # click 1: the button; click 2: the file in the picker. Nothing else.
        with page.expect_file_chooser() as chooser:
            page.click("[data-testid=recovery-upload]")
        chooser.value.set_files(str(mine[0]))
        first = hashlib.blake2b(mine[0].read_bytes(), digest_size=16).hexdigest()
        _strip_img_loaded(page, first)  # shown in the strip, served by /image/{id}
        page.wait_for_selector(f"{STATUS}.am-upok", timeout=10000)
        assert "added as an exemplar" in page.inner_text(STATUS)
        assert page.get_attribute(f"{STRIP} img[data-id='{first}']", "data-polarity") == "positive"
        page.wait_for_selector("[data-testid=recovery]", state="hidden", timeout=5000)
        _shot(page, artifacts_dir, "16-uploaded")
        assert [(e["image_id"], e["polarity"], e["added_by"]) for e in store.exemplars("rare bird")] == [
            (first, "positive", "Cy")]
        assert service.batches.label_counts("rare bird")["positive"] == 1
        assert store.image_rows([first])[0]["split"] == UPLOAD_SPLIT
        paths = Paths(agile_home)
        assert has_vector(VectorStore(paths.lancedb, cache_dir=paths.cache), "random-32", first)

        # a file that is not an image: a clear message where the rater looks, nothing stored
        page.set_input_files("[data-testid=exemplar-file]", str(not_image))
        page.wait_for_selector(f"{STATUS}.am-uperr", timeout=10000)
        msg = page.inner_text(STATUS)
        assert "Cannot use “holiday.jpg” as an exemplar" in msg and "not an image" in msg, msg
        _shot(page, artifacts_dir, "17-upload-error")
        assert len(store.exemplars("rare bird")) == 1

        # a counter-example: the second button, same two clicks
        with page.expect_file_chooser() as chooser:
            page.click("[data-testid=upload-counter]")
        chooser.value.set_files(str(mine[1]))
        second = hashlib.blake2b(mine[1].read_bytes(), digest_size=16).hexdigest()
        _strip_img_loaded(page, second)
        assert page.get_attribute(f"{STRIP} img[data-id='{second}']", "data-polarity") == "negative"
        assert "counter-example" in page.inner_text(STATUS)
        assert {e["image_id"]: e["polarity"] for e in store.exemplars("rare bird")} == {
            first: "positive", second: "negative"}
        assert page.errors == []  # type: ignore[attr-defined]
