"""Issue 18 in headless Chromium: what an ML platform team sees in the Dagster UI (`dagster dev`)
after three rounds and their evaluations of a concept: the lineage graph open on load, the
quality metrics charted over rounds (the asset's Plots, by event), and the concept's asset
checks listed with their results. Screenshots go to ``test-artifacts/dagster-*.png``."""

from pathlib import Path
from typing import Any

import pytest

from agile_pipeline.lib.state import LabelEvent, StateStore
from agile_pipeline.runner import run_concept_eval, run_concept_round, run_concept_start
from agile_pipeline.settings import dagster_lineage_url
from tests.labeling_ui.test_dagster_integration import dagster_dev  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CONCEPT = "dots"


def _truth(image_id: str) -> str:
    return "positive" if int(image_id[-1], 16) < 6 else "negative"


def _train(store: StateStore, rounds: int) -> None:
    store.create_concept(CONCEPT, ["red dot"], ["blue"])
    assert run_concept_start(CONCEPT).success
    for _ in range(rounds):
        store.add_labels([LabelEvent(CONCEPT, it["image_id"], _truth(it["image_id"]), "owner", source=it["source"])
                          for it in store.pending_items(CONCEPT, None)])
        assert run_concept_round(CONCEPT).success
        store.add_labels([LabelEvent(CONCEPT, it["image_id"], _truth(it["image_id"]), "owner", purpose="eval",
                                     source="eval") for it in store.pending_items(CONCEPT, None, purpose="eval")])
        assert run_concept_eval(CONCEPT).success


def _open(page: Any, url: str) -> None:
    page.goto(url)
    try:  # Dagster's first-visit newsletter dialog
        page.get_by_role("button", name="Skip").click(timeout=8000)
    except Exception:
        pass


def test_lineage_plots_and_checks_in_the_dagster_ui(dagster_dev: str, agile_home: Path, page: Any,  # noqa: F811
                                                    artifacts_dir: Path) -> None:
    store = StateStore(agile_home / "agile.sqlite")
    _train(store, rounds=3)

    # the lineage opens with the graph drawn: every asset of the three groups is a node
    _open(page, dagster_lineage_url(dagster_dev))
    for asset in ("image_manifest", "classifier", "al_candidates", "model_metrics", "registered_model"):
        page.get_by_text(asset, exact=True).first.wait_for(state="visible", timeout=30000)
    page.screenshot(path=str(artifacts_dir / "dagster-01-lineage.png"))

    # AUC-PR charted over the concept's rounds (one point per evaluation)
    _open(page, f"{dagster_dev}/assets/model_metrics")
    page.get_by_text("Plots", exact=True).click()
    page.get_by_role("button", name="Events").click()
    page.get_by_text("auc_pr", exact=True).first.wait_for(state="visible", timeout=30000)
    page.wait_for_function("() => document.querySelectorAll('canvas').length > 0", timeout=30000)  # the charts
    page.screenshot(path=str(artifacts_dir / "dagster-02-auc-pr-over-rounds.png"), full_page=True)

    # the concept's checks are listed with a result; the blocking ones pass
    _open(page, f"{dagster_dev}/assets/classifier?view=checks")
    page.get_by_text("weights_finite", exact=True).first.wait_for(state="visible", timeout=30000)
    body = page.inner_text("body")
    assert "Passed" in body or "Succeeded" in body
    page.screenshot(path=str(artifacts_dir / "dagster-03-classifier-checks.png"), full_page=True)
    for asset, check in (("al_candidates", "batch_of_unlabeled_train_images"), ("eval_set", "strata_filled"),
                         ("model_metrics", "beats_zero_shot")):
        _open(page, f"{dagster_dev}/assets/{asset}?view=checks")
        page.get_by_text(check, exact=True).first.wait_for(state="attached", timeout=30000)  # (middle-truncated)
    page.screenshot(path=str(artifacts_dir / "dagster-04-model-metrics-checks.png"), full_page=True)
