"""`agile label NAME --from-csv FILE`: what spreadsheets really produce, and hostile files.

Every refused file names the problem (and the line) and records nothing: no label of a bad
file is half-applied."""

import codecs

import pytest
from typer.testing import CliRunner

from agile_pipeline.cli import app
from agile_pipeline.lib.state import StateStore
from agile_pipeline.runner import run_corpus
from agile_pipeline.settings import Paths, data_home
from tests.hostile_images import write_real_like_images


@pytest.fixture
def world(agile_home, tmp_path):
    paths = write_real_like_images(tmp_path / "corpus", 6, seed=21)
    assert run_corpus([str(tmp_path / "corpus")]).success
    store = StateStore(Paths(data_home()).state_db)
    store.create_concept("c", ["x"])
    ids = sorted(store.all_image_splits())
    return store, ids, paths


def _label(tmp_path, data: bytes, name: str = "labels.csv"):
    f = tmp_path / name
    f.write_bytes(data)
    return CliRunner().invoke(app, ["label", "c", "--from-csv", str(f)])


def _events(store: StateStore) -> int:
    return len(store.label_history("c"))


@pytest.mark.parametrize("encode", [
    pytest.param(lambda t: t.encode("utf-8"), id="utf-8"),
    pytest.param(lambda t: codecs.BOM_UTF8 + t.replace(",", ";").encode("utf-8"), id="utf-8-bom-semicolons"),
    pytest.param(lambda t: t.replace(",", "\t").encode("utf-16"), id="utf-16-tabs"),
    pytest.param(lambda t: t.replace("\n", "\r\n").replace("image,label,rater", " Image , LABEL,Rater")
                 .replace("positive", "yes").encode("utf-8"), id="crlf-header-case-yes"),
])
def test_spreadsheet_exports_are_read(world, tmp_path, encode):
    store, ids, _ = world
    text = "image,label,rater\n" + f"{ids[0]},positive,ann\n{ids[1]},negative,bob\n"
    r = _label(tmp_path, encode(text))
    assert r.exit_code == 0, r.output
    assert "recorded 2 label(s)" in r.output
    assert _events(store) == 2


@pytest.mark.parametrize(("data", "expect"), [
    pytest.param(b"image,label\n{a},positive\n{p1},negative\n", "line 3 is not UTF-8", id="mixed-encodings"),
    pytest.param(b"image,label\n{p1},positive\n", "line 2 is not UTF-8", id="cp1252-path"),
    pytest.param(b"picture,verdict\n{a},positive\n", "needs a header with columns image,label", id="wrong-columns"),
    pytest.param(b"image,label\n{a},positive\nffffffffffffffffffffffffffffffff,negative\n",
                 "not in the corpus", id="unknown-id"),
    pytest.param(b"image,label\n{a},positive\n{b},maybe\n", "line 3: label 'maybe'", id="bad-label"),
    pytest.param(b"image,label\n{a},positive\n{b},neg\x00ative\n", "NUL byte", id="nul-byte"),
    pytest.param(b"", "needs a header", id="empty"),
    pytest.param(b"image,label\n", "no label rows", id="header-only"),
    pytest.param(b"image,label\n\"{a},positive\n", "nothing was recorded", id="unclosed-quote"),
])
def test_bad_files_name_the_problem_and_record_nothing(world, tmp_path, data, expect):
    store, ids, paths = world
    data = data.replace(b"{a}", ids[0].encode()).replace(b"{b}", ids[1].encode())
    # a corpus path with an accent, written in a legacy code page
    accented = paths[0].parent / "café.png"
    paths[0].rename(accented)
    data = data.replace(b"{p1}", str(accented).encode("cp1252"))
    r = _label(tmp_path, data)
    assert r.exit_code == 1, r.output
    assert expect.lower() in r.output.lower(), r.output
    assert "Traceback" not in r.output
    assert _events(store) == 0
