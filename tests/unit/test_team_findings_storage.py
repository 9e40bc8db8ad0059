"""Issue 17, findings 1, 7, 9 and 11 on the real SQLite state store, files and the real CLI.

1. concept names map to storage by a collision-free key; old-style folders are migrated when
   they belong to one concept, refused with a clear message when they were shared.
7. rater instructions are cleaned like phrases; `agile concept show` prints no raw escapes.
9. a reused event id with a different payload is refused, never silently dropped.
11. CLI rater names follow the app's rule; the CSV label export is guarded against formulas.
"""

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agile_pipeline.cli import app
from agile_pipeline.lib.state import (
    LabelEvent,
    StateError,
    StateStore,
    clean_instructions,
    concept_dir,
    concept_storage_key,
    valid_rater_name,
    validate_phrases,
)
from agile_pipeline.settings import Paths, data_home

HOSTILE = "Rate\x00 only\x07 red\u202e things.\n\tNo \x1b[31mblue\x1b[0m ones.\x1b]0;pwned\x07\r\nDone."


def _image(i: int, path: str | None = None) -> dict:
    p = path or f"/c/{i}.png"
    return {"id": f"{i:032x}", "uri": p, "path": p, "size": 10, "width": 8, "height": 8,
            "format": "PNG", "n_frames": 1, "split": "train", "source": "/c", "ingested_at": time.time()}


@pytest.fixture
def store(agile_home: Path) -> StateStore:
    s = StateStore(Paths(data_home()).state_db)
    s.record_ingest([_image(i) for i in range(20)], [])
    return s


def _old_version_concept(store: StateStore, name: str) -> None:
    """A concept row as versions before keyed folders wrote it (no marker in ``meta``)."""
    con = sqlite3.connect(store.path)
    with con:
        con.execute("INSERT INTO concepts VALUES (?, 'owner', '', '[]', '[]', ?, ?)",
                    (name, time.time() - 100, time.time() - 100))
    con.close()


def _old_folder(home: Path, folder: str, marker: str) -> Path:
    d = home / "concepts" / folder
    (d / "round-000").mkdir(parents=True)
    (d / "round-000" / "model.pt").write_text(marker)
    (d / "zero_shot.npz").write_text(marker)
    (home / "predictions").mkdir(exist_ok=True)
    (home / "predictions" / f"{folder}.parquet").write_text(marker)
    return d


# ---- finding 1: one folder per concept --------------------------------------------------------
def test_alike_concept_names_get_their_own_folders(store: StateStore, agile_home: Path) -> None:
    from labeling_ui.export import concept_dir_name

    store.create_concept("sp ace", ["x"])
    store.create_concept("sp_ace", ["y"])
    store.create_concept("sp-ace", ["z"])
    dirs = {n: concept_dir(store, agile_home, n) for n in ("sp ace", "sp_ace", "sp-ace")}
    assert len(set(dirs.values())) == 3, dirs
    assert all(d.is_dir() and d.parent == agile_home / "concepts" for d in dirs.values())
    # one mapping: the app's name of the folder is the pipeline's
    assert {concept_dir_name(n) for n in dirs} == {d.name for d in dirs.values()}
    assert dirs["sp ace"].name.startswith("sp_ace.") and dirs["sp_ace"].name.startswith("sp_ace.")
    # the key is a pure function of the (normalised) name
    assert concept_storage_key("Sp  Ace") == concept_storage_key("sp ace") == dirs["sp ace"].name


def test_old_folder_of_one_concept_is_moved_with_its_round_paths(store: StateStore, agile_home: Path) -> None:
    _old_version_concept(store, "sp ace")
    old = _old_folder(agile_home, "sp_ace", "mine")
    store.record_round("sp ace", 0, label_cutoff=0, model_uri=str(old / "round-000"))
    new = concept_dir(store, agile_home, "sp ace")
    assert new.name == concept_storage_key("sp ace") and not old.exists()
    assert (new / "round-000" / "model.pt").read_text() == "mine"
    assert (new / "zero_shot.npz").read_text() == "mine"
    assert store.rounds("sp ace")[0]["model_uri"] == str((new / "round-000").resolve())
    assert (agile_home / "predictions" / f"{new.name}.parquet").read_text() == "mine"
    assert not (agile_home / "predictions" / "sp_ace.parquet").exists()
    assert concept_dir(store, agile_home, "sp ace") == new  # once only


def test_old_folder_shared_by_two_concepts_is_refused_with_advice(store: StateStore, agile_home: Path) -> None:
    _old_version_concept(store, "sp ace")
    _old_version_concept(store, "sp_ace")
    old = _old_folder(agile_home, "sp_ace", "mixed")
    for name in ("sp ace", "sp_ace"):
        with pytest.raises(StateError) as err:
            concept_dir(store, agile_home, name)
        msg = str(err.value)
        assert "'sp ace'" in msg and "'sp_ace'" in msg and "Move it" in msg and str(old) in msg
    assert (old / "round-000" / "model.pt").read_text() == "mixed"  # nothing moved


def test_concept_created_after_keyed_folders_never_takes_an_old_folder(store: StateStore, agile_home: Path) -> None:
    _old_version_concept(store, "sp ace")
    old = _old_folder(agile_home, "sp_ace", "the old concept's")
    store.create_concept("sp_ace", ["new"])  # reads like the old folder, but is new
    fresh = concept_dir(store, agile_home, "sp_ace")
    assert list(fresh.iterdir()) == [] and old.exists()
    moved = concept_dir(store, agile_home, "sp ace")
    assert (moved / "round-000" / "model.pt").read_text() == "the old concept's"


def test_export_reads_metrics_from_the_concepts_own_folder(store: StateStore, agile_home: Path) -> None:
    from labeling_ui.context import ServiceContext
    from labeling_ui.export import ModelExport

    store.create_concept("sp ace", ["x"])
    store.create_concept("sp_ace", ["y"])
    (concept_dir(store, agile_home, "sp ace") / "metrics.json").write_text(json.dumps({"who": "sp ace"}))
    export = ModelExport(ServiceContext(store, agile_home), rounds=None)  # type: ignore[arg-type]
    assert export.metrics_report("sp ace")[0] == {"who": "sp ace"}
    assert export.metrics_report("sp_ace") == (None, None)


# ---- finding 7: instructions cleaned like phrases -------------------------------------------------
def test_instructions_are_cleaned_like_phrases_keeping_lines(store: StateStore) -> None:
    c = store.create_concept("red", ["x"], description=HOSTILE)
    for bad in ("\x00", "\x07", "\u202e", "\x1b", "\r"):
        assert bad not in c.description
    assert c.description == "Rate only red things.\n\tNo [31mblue[0m ones.]0;pwned\nDone."
    # the same rule as phrases, which drop the same characters
    assert validate_phrases([HOSTILE], "positive")[0] == " ".join(c.description.split())
    c = store.update_concept("red", description="  \u202eevil\x1b[2J  ")
    assert c.description == "evil[2J"
    assert clean_instructions("a\u2028b\x0bc") == "a b c"


def test_concept_show_writes_no_raw_escape_to_the_terminal(store: StateStore) -> None:
    store.create_concept("red", ["x"], owner="ann")
    con = sqlite3.connect(store.path)  # instructions stored raw by an older version
    with con:
        con.execute("UPDATE concepts SET description = ?, owner = ? WHERE name = 'red'",
                    (HOSTILE, "ann\x1b[8m"))
    con.close()
    r = CliRunner().invoke(app, ["concept", "show", "red"])
    assert r.exit_code == 0, r.output
    for bad in ("\x00", "\x07", "\u202e", "\x1b"):
        assert bad not in r.output
    assert "\\x1b[31mblue" in r.output and "\\u202e" in r.output  # shown, not obeyed
    assert "instructions: Rate\\x00 only" in r.output


# ---- finding 9: a reused event id is refused, a retry accepted ----------------------------------
@pytest.mark.parametrize("change", [
    {"rater": "mallory"}, {"image_id": f"{7:032x}"}, {"label": "negative"}, {"concept": "other"},
    {"purpose": "eval"},
])
def test_reused_event_id_with_another_payload_is_refused(store: StateStore, change: dict) -> None:
    store.create_concept("c", ["x"])
    store.create_concept("other", ["y"])
    first = dict(concept="c", image_id=f"{1:032x}", label="positive", rater="ann", purpose="train",
                 event_id="shared-event-1")
    assert store.add_labels([LabelEvent(**first)]) == 1
    assert store.add_labels([LabelEvent(**first)]) == 0  # a retry: accepted, stored once
    with pytest.raises(StateError, match="already used for a different rating"):
        store.add_labels([LabelEvent(**{**first, **change}),
                          LabelEvent("c", f"{2:032x}", "positive", "ann", event_id="fresh-event-2")])
    rows = store.label_history("c") + store.label_history("other")
    assert [(r["event_id"], r["rater"], r["label"]) for r in rows] == [("shared-event-1", "ann", "positive")]


def test_one_request_reusing_an_event_id_is_refused(store: StateStore) -> None:
    store.create_concept("c", ["x"])
    with pytest.raises(StateError, match="used twice in this request"):
        store.add_labels([LabelEvent("c", f"{1:032x}", "positive", "ann", event_id="dup-event-1"),
                          LabelEvent("c", f"{2:032x}", "positive", "ann", event_id="dup-event-1")])
    assert store.label_history("c") == []
    same = LabelEvent("c", f"{1:032x}", "positive", "ann", event_id="dup-event-2")
    assert store.add_labels([same, same]) == 1


# ---- finding 11: rater names and the CSV export ---------------------------------------------------
@pytest.mark.parametrize("bad", ["<script>", "\x1b[31mred", "=1+1", "+cmd", "@SUM(1)", "alice\n", "a/b", ""])
def test_rater_names_follow_the_apps_rule_everywhere(bad: str) -> None:
    import labeling_ui.config

    assert labeling_ui.config.valid_rater_name is valid_rater_name  # one rule, moved down
    assert not valid_rater_name(bad)
    assert all(valid_rater_name(ok) for ok in ("alice", "Zoë O'Neil", "bob.smith@example.com", "x"))


def test_cli_refuses_rater_names_the_app_refuses(store: StateStore, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["concept", "create", "c", "--pos", "x", "--owner", "=1+1", "--no-expand"])
    assert r.exit_code == 1 and "not allowed" in r.output
    assert store.concept_names() == []
    store.create_concept("c", ["x"])
    f = tmp_path / "labels.csv"
    f.write_text(f"image,label\n{1:032x},positive\n")
    for bad in ("<script>", "\x1b[31mx"):
        r = runner.invoke(app, ["label", "c", "--from-csv", str(f), "--rater", bad])
        assert r.exit_code == 1 and "not allowed" in r.output, r.output
    f.write_text(f"image,label,rater\n{1:032x},positive,ann\n{2:032x},negative,=1+1\n")
    r = runner.invoke(app, ["label", "c", "--from-csv", str(f)])
    assert r.exit_code == 1 and "line 3" in r.output and "nothing was recorded" in r.output
    r = runner.invoke(app, ["concept", "exemplar", "c", f"{1:032x}", "--rater", "<script>"])
    assert r.exit_code == 1 and "not allowed" in r.output
    assert store.label_history("c") == []
    f.write_text(f"image,label,rater\n{1:032x},positive,Zoë O'Neil\n")
    r = runner.invoke(app, ["label", "c", "--from-csv", str(f)])
    assert r.exit_code == 0, r.output
    assert [e["rater"] for e in store.label_history("c")] == ["Zoë O'Neil"]


def test_csv_export_cannot_carry_a_spreadsheet_formula(store: StateStore, agile_home: Path, tmp_path: Path) -> None:
    hostile = ["=1+1", "+SUM(A1)", "-2+3", "@cmd"]
    store.record_ingest([_image(100, "=HYPERLINK(\"http://x\")")], [])
    store.create_concept("c", ["x"])
    # raters and details written before names were checked (or by a script through the store)
    store.add_labels([LabelEvent("c", f"{i:032x}", "positive", rater, detail=rater)
                      for i, rater in enumerate(hostile)]
                     + [LabelEvent("c", f"{100:032x}", "negative", "ann", detail="\t=1")])
    runner = CliRunner()
    r = runner.invoke(app, ["labels", "export", "c"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "labels.csv"
    assert runner.invoke(app, ["labels", "export", "c", "--out", str(out)]).exit_code == 0
    for text in (r.stdout, out.read_text()):
        rows = list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == len(hostile) + 1
        cells = [v for row in rows for v in row.values() if v]
        assert not [v for v in cells if v[0] in "=+-@\t\r"], cells
        assert [row["rater"] for row in rows[:-1]] == ["'" + h for h in hostile]
        assert [row["detail"] for row in rows] == ["'" + h for h in [*hostile, "\t=1"]]
        assert rows[-1]["image_path"] == "'=HYPERLINK(\"http://x\")" and rows[-1]["rater"] == "ann"
    store.create_concept("d", ["x"])
    store.add_labels([LabelEvent("d", f"{1:032x}", "positive", "ann", detail="\r=2")])
    assert runner.invoke(app, ["labels", "export", "d", "--out", str(out)]).exit_code == 0
    with out.open(newline="") as fh:
        assert next(csv.DictReader(fh))["detail"] == "'\r=2"
    pq = tmp_path / "labels.parquet"  # typed data, not a spreadsheet: kept as stored
    assert runner.invoke(app, ["labels", "export", "c", "--format", "parquet", "--out", str(pq)]).exit_code == 0
    import pyarrow.parquet as papq

    assert papq.read_table(pq).column("rater").to_pylist() == [*hostile, "ann"]
