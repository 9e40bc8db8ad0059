"""Fixtures of the reliability tests: a data directory with an ingested corpus and a concept."""

import pytest

from agile_pipeline.defs.concepts import loop_env
from agile_pipeline.defs.resources import AgileResources
from agile_pipeline.lib.loop import pending_items
from agile_pipeline.lib.state import LabelEvent
from agile_pipeline.runner import run_concept_start, run_corpus
from tests.hostile_images import write_real_like_images


@pytest.fixture
def loop_home(agile_home, tmp_path):  # type: ignore[no-untyped-def]
    """700 pictures ingested (random:32 encoder), concept ``c`` with its first batch rated."""
    src = tmp_path / "corpus"
    write_real_like_images(src, 700, seed=21)
    run_corpus([str(src)])
    agile = AgileResources()
    env = loop_env(agile.state, agile.vectors, agile.encoder)
    env.store.create_concept("c", ["x"])
    run_concept_start("c")
    env.store.add_labels([
        LabelEvent("c", it["image_id"], "positive" if int(it["image_id"][:2], 16) % 4 == 0 else "negative", "owner")
        for it in pending_items(env, "c")
    ])
    return env
