"""Fixtures of the pipeline tests."""

import pytest

from agile_pipeline.defs.resources import AgileResources
from agile_pipeline.runner import run_corpus
from tests.hostile_images import write_real_like_images


@pytest.fixture
def corpus(agile_home, tmp_path):
    """800 real-like images ingested and embedded (plumbing encoder) in a fresh AGILE_HOME."""
    src = tmp_path / "corpus"
    write_real_like_images(src, 800, seed=11)
    run_corpus([str(src)])
    return AgileResources()
