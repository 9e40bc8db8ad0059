"""``agile``: the command line for the whole loop (corpus, concepts, labels, rounds)."""

import csv
import errno
import io
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from agile_pipeline import settings

app = typer.Typer(
    help="Agile Modeling: from a visual concept to a trained image classifier in minutes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
concept_app = typer.Typer(help="Create, edit and list concepts.", no_args_is_help=True)
app.add_typer(concept_app, name="concept")
labels_app = typer.Typer(help="Label history (audit).", no_args_is_help=True)
app.add_typer(labels_app, name="labels")
sources_app = typer.Typer(help="The corpus sources scheduled refreshes ingest.", no_args_is_help=True)
app.add_typer(sources_app, name="sources")

Strategy = Literal["margin", "margin-positive", "cluster-margin"]


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _term_safe(text: object, *, keep_lines: bool = False) -> str:
    """User text fit for a terminal: every character that is not printable (ESC, BEL, NUL,
    U+202E, ...) is shown as its escape (``\\x1b``) instead of acting on the terminal; with
    ``keep_lines``, newlines and tabs stay."""
    return "".join(
        ch if ch.isprintable() or (keep_lines and ch in "\n\t")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in str(text)
    )


def _rater_name(name: str, where: str = "--rater") -> str:
    """A rater (or owner) name checked by the app's rule; otherwise one red line and exit 1."""
    from agile_pipeline.lib.state import valid_rater_name

    cleaned = name.strip()
    if not valid_rater_name(cleaned):
        fail(f"{where}: rater name {name[:80]!r} is not allowed: use 1-64 letters, digits, "
             "spaces or .@'-_ (the app's rule), starting with a letter or digit")
    return cleaned


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("lance", "lancedb", "alembic", "mlflow", "dagster"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _store():  # type: ignore[no-untyped-def]
    from agile_pipeline.lib.state import StateError, StateStore

    paths = _data_dir()
    try:
        return StateStore(paths.state_db)
    except (StateError, OSError) as exc:
        fail(str(exc))
        raise
    except sqlite3.Error as exc:
        fail(settings.explain_sqlite_error(exc, paths.state_db) or f"cannot open {paths.state_db}: {exc}")
        raise


def _data_dir() -> settings.Paths:
    """The data directory, created if missing and proven writable; else one line and exit 1."""
    try:
        return settings.check_data_dir(settings.paths())
    except settings.DataDirError as exc:
        fail(str(exc))
        raise


def _env():  # type: ignore[no-untyped-def]
    from agile_pipeline.defs.concepts import loop_env
    from agile_pipeline.defs.resources import AgileResources

    _data_dir()
    res = AgileResources()
    return loop_env(res.state, res.vectors, res.encoder)


def _with_progress(what: str, fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` under a spinner that says what is happening and for how long (stderr)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        typer.echo(f"{what}…", err=True)
        return fn()
    with console.status(f"{what}…", spinner="dots"):
        return fn()


def _print_steps(result) -> None:  # type: ignore[no-untyped-def]
    from agile_pipeline.runner import step_seconds

    steps = step_seconds(result)
    if steps:
        typer.echo("Dagster run " + str(result.run_id)[:8] + ": " + ", ".join(
            f"{k} {v:.1f}s" for k, v in steps.items()), err=True)


def _guard(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` and turn user-facing errors into one red line and exit code 1."""
    from agile_pipeline.lib.loop import LoopError
    from agile_pipeline.lib.state import StateError

    def run_failed(exc: BaseException) -> bool:
        # Dagster is imported only by the commands that run a job (a table read stays fast)
        runner = sys.modules.get("agile_pipeline.runner")
        return runner is not None and isinstance(exc, runner.RunFailed)

    try:
        return fn()
    except (StateError, LoopError, LookupError) as exc:
        fail(str(exc).strip("'\""))
    except RuntimeError as exc:
        if not run_failed(exc):
            raise
        fail(str(exc).strip("'\""))
    except settings.DataDirError as exc:
        fail(str(exc))
    except (sqlite3.Error, OSError) as exc:
        message = _storage_fault(exc)
        if message is None:
            raise
        fail(message)


def _storage_fault(exc: BaseException) -> str | None:
    """One line for a full disk, a read-only data directory or an I/O error met while writing,
    or ``None`` (anything else keeps its traceback: it is a bug to report). The chain is
    searched, so a failed ROLLBACK does not hide the write error that caused it."""
    home = settings.data_home()
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in reversed(seen):  # the root cause first
        if isinstance(e, sqlite3.Error):
            msg = settings.explain_sqlite_error(e, settings.Paths(home).state_db)
            if msg:
                return msg
        elif isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return settings.explain_os_error(e, home)
    return None


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


@app.command("demo-corpus")
def demo_corpus(
    dest: Annotated[Path, typer.Argument(help="Folder to write the corpus into.")],
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    limit: Annotated[int | None, typer.Option(help="Write at most this many images (emoji-mix: at most this many emojis per Unicode subgroup).")] = None,
    workers: Annotated[int, typer.Option(help="Parallel rasterizers.")] = 2,
    kind: Annotated[str, typer.Option(help="emoji (OpenMoji), glyphs (unseen digits/letters, rare concepts) or emoji-mix (~11.8k images: OpenMoji, Twemoji, Noto and Symbola art of the same emojis, 26 Unicode-subgroup concepts).")] = "emoji",
    seed: Annotated[int, typer.Option(help="Seed of the glyphs and emoji-mix datasets.")] = 0,
) -> None:
    """Write the demo corpus: OpenMoji artwork as PNGs in DEST/<group>/<subgroup>/<name>.png
    (``--kind glyphs``: the unseen dataset of rare digit/letter concepts in DEST/{train,test}/;
    ``--kind emoji-mix``: the labeled benchmark of emojis in four art sets, same layout)."""
    from agile_pipeline.lib.demo_corpus import write_demo_corpus

    _setup_logging()
    if kind == "emoji-mix":
        from agile_pipeline.research.emoji_mix_dataset import write_emoji_mix_dataset

        try:
            mx = write_emoji_mix_dataset(dest, seed=seed, size=size, limit=limit, workers=workers)
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            fail(str(exc))
            return
        counts = ", ".join(f"{c} {n}/{mx.n_test_per_concept[c]}" for c, n in mx.n_per_concept.items())
        styles = ", ".join(f"{s} {n}" for s, n in mx.n_per_style.items())
        typer.echo(f"emoji-mix dataset in {dest}: {mx.n_images} images ({styles}), "
                   f"{len(mx.n_per_concept)} concepts (images/test images: {counts}), "
                   f"{mx.n_distractors} distractors, {mx.n_failed} failed, {mx.seconds:.1f}s; "
                   f"labels in {dest / 'labels.csv'}")
        return
    if kind == "glyphs":
        from agile_pipeline.research.unseen_dataset import write_unseen_dataset

        st = write_unseen_dataset(dest, seed=seed, size=96 if size == 128 else size)
        typer.echo(f"glyphs dataset in {dest}: {st.n_images} images, {len(st.n_per_concept)} "
                   f"concepts of {max(st.n_per_concept.values())} images each, "
                   f"{st.n_distractors} distractors, {st.seconds:.1f}s; labels in {dest / 'labels.csv'}")
        return
    if kind != "emoji":
        fail(f"unknown kind {kind!r}: use emoji, glyphs or emoji-mix")
    try:
        stats = write_demo_corpus(dest, size=size, limit=limit, workers=workers)
    except (FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
        return
    typer.echo(
        f"demo corpus in {dest}: {stats.n_written} written, {stats.n_skipped_existing} already "
        f"there, {stats.n_failed} failed, {stats.seconds:.1f}s; labels in {dest / 'labels.csv'}"
    )


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Folders, path/URL list files, or parquet files with a 'url' column.")],
    workers: Annotated[int, typer.Option(help="Parallel readers/decoders.")] = 4,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Ingest, dedup, split and embed SOURCES into $AGILE_HOME; print what happened."""
    from agile_pipeline.defs.corpus import (
        embedding_index,
        image_embeddings,
        image_manifest,
        neighbour_graph,
        train_test_assignment,
    )
    from agile_pipeline.runner import metadata_of, run_corpus

    _setup_logging(verbose)
    t0 = time.perf_counter()
    _data_dir()
    typer.echo(f"data directory: {settings.data_home()}")
    result = _guard(lambda: run_corpus(sources, workers=workers))
    m = metadata_of(result, image_manifest)
    s = metadata_of(result, train_test_assignment)
    e = metadata_of(result, image_embeddings)
    skipped = {k.removeprefix("skipped_"): v for k, v in m.items()
               if k.startswith("skipped_") and k != "skipped_total"}
    seconds = time.perf_counter() - t0
    typer.echo(f"files seen:   {m.get('files_seen', 0)} ({m.get('unchanged_since_last_scan', 0)} unchanged since last scan)")
    typer.echo(f"ingested:     {m.get('ingested', 0)}")
    typer.echo(f"duplicates:   {m.get('duplicates', 0)}")
    typer.echo(f"skipped:      {m.get('skipped_total', 0)}" + (
        "  (" + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")" if skipped else ""))
    typer.echo(f"split:        train {s.get('train', 0)}, test {s.get('test', 0)}")
    typer.echo(f"embedded:     {e.get('embedded_now', 0)} with {e.get('model_id', '?')} "
               f"({e.get('rows_total', 0)} in table; {e.get('failed_now', 0)} failed)")
    ix = metadata_of(result, embedding_index)
    if ix.get("status") == "exact":
        typer.echo(f"index:        none: {ix.get('rows', 0):,} rows are searched exactly (an IVF-PQ index "
                   "is built from 200,000)")
    elif ix.get("status"):
        typer.echo(f"index:        IVF-PQ {ix['status']} ({ix.get('indexed_rows', 0):,} rows, "
                   f"recall@100 {ix.get('recall_at_100', '?')}, {ix.get('build_seconds', '?')} s)")
    gr = metadata_of(result, neighbour_graph)
    if gr.get("status") in ("built", "current"):
        typer.echo(f"graph:        {gr['images']:,} images, {gr['k']} neighbours each ({gr['status']}, "
                   f"{gr['build_seconds']} s): corpus scores and graph positives")
    elif gr.get("status"):
        typer.echo(f"graph:        {gr['status']}")
    rate = e.get("images_per_second")
    typer.echo(f"seconds:      {seconds:.1f}" + (f"  (embedding: {rate} images/s)" if rate else ""))


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="A phrase, e.g. 'dog'.")],
    k: Annotated[int, typer.Option("-k", help="How many images.")] = 10,
    split: Annotated[str | None, typer.Option(help="train or test (default: both).")] = None,
) -> None:
    """Print the K images nearest to TEXT: path, split, cosine score."""
    _setup_logging()
    env = _env()
    from agile_pipeline.defs.resources import AgileResources

    encoder = AgileResources().encoder.load()
    q = encoder.embed_texts([text])[0]
    from agile_pipeline.lib.ann_index import search as ann_search  # the index on large corpora

    hits = _guard(lambda: ann_search(env.vectors, env.model_id, [q], k, split=split)[0])
    paths = {r["id"]: r["path"] for r in env.store.image_rows([h[0] for h in hits])}
    for image_id, sp, score in hits:
        typer.echo(f"{_term_safe(paths.get(image_id, image_id))}\t{sp}\t{score:.4f}")


@concept_app.command("create")
def concept_create(
    name: Annotated[str, typer.Argument(help="Concept name; also used as a positive phrase.")],
    pos: Annotated[list[str] | None, typer.Option("--pos", help="Positive phrase (repeat).")] = None,
    neg: Annotated[list[str] | None, typer.Option("--neg", help="Negative phrase (repeat).")] = None,
    description: Annotated[str, typer.Option(help="Instructions for raters.")] = "",
    owner: Annotated[str, typer.Option(help="The concept owner (their label wins).")] = "owner",
    expand: Annotated[bool, typer.Option(help="Build the first batch (expansion) now.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for sampling the first batch.")] = 0,
) -> None:
    """Create a concept (adds its Dagster partition) and build its first batch to rate."""
    from agile_pipeline.runner import ensure_partition, instance

    _setup_logging()
    owner = _rater_name(owner, "--owner")
    store = _store()
    concept = _guard(lambda: store.create_concept(name, pos or [], neg or [], owner=owner, description=description))
    ensure_partition(instance(), concept.name)
    typer.echo(f"created concept {concept.name!r}: positives {[p for k, p in concept.phrases if k == 'positive']}, "
               f"negatives {list(concept.negatives)}")
    if expand:
        _start(concept.name, seed)


def _start(name: str, seed: int) -> None:
    from agile_pipeline.defs.concepts import expansion_candidates
    from agile_pipeline.runner import metadata_of, run_concept_start

    result = _with_progress(
        f"finding the first images for {name!r}: nearest images of every phrase, zero-shot scores",
        lambda: _guard(lambda: run_concept_start(name, seed=seed)))
    _print_steps(result)
    m = metadata_of(result, expansion_candidates)
    typer.echo(f"first batch ready: {m.get('candidates', 0)} images from {m.get('union_of_neighbours', 0)} "
               f"nearest neighbours of the phrases; list them with `agile candidates {name!r}`")


@concept_app.command("expand")
def concept_expand(
    name: str,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
) -> None:
    """Build a fresh expansion batch (e.g. after editing the phrases)."""
    _setup_logging()
    _start(name, seed)


@concept_app.command("exemplar")
def concept_exemplar(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    image: Annotated[str | None, typer.Argument(help="Image id or path of an ingested image.")] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", help="Upload this image file instead (embedded now; need not be in the corpus).",
    )] = None,
    negative: Annotated[bool, typer.Option("--negative", help="A counter-example instead.")] = False,
    rater: Annotated[str, typer.Option(help="Who adds it (recorded as their label).")] = "owner",
) -> None:
    """Mark an image as an exemplar: it is a label and drives expansion like a phrase.

    Either an ingested image (IMAGE: id or path) or any image file (--file PATH), which is
    checked, stored with the data and embedded on the spot.
    """
    if image is None and file is None:
        fail("say which image: an ingested IMAGE (id or path), or --file PATH of an image to upload")
        return
    if image is not None and file is not None:
        fail("give either an ingested IMAGE or --file PATH, not both")
        return
    rater = _rater_name(rater)
    store = _store()
    concept = _guard(lambda: store.get_concept(name))
    polarity = "negative" if negative else "positive"
    if file is not None:
        _exemplar_upload(store, concept.name, file, polarity, rater)
        return
    assert image is not None
    image_id = store.resolve_image(image)
    if image_id is None:
        fail(f"{image!r} is not an ingested image: use a path or id from `agile search` or "
             "`agile candidates`, or upload a file with --file PATH")
        return
    _guard(lambda: store.add_exemplar(concept.name, image_id, polarity, rater))
    typer.echo(f"added {polarity} exemplar {image_id} to {concept.name!r}; `agile concept expand "
               f"{concept.name!r}` builds a batch around it, `agile round` trains with it")


def _exemplar_upload(store, concept: str, file: Path, polarity: str, rater: str) -> None:  # type: ignore[no-untyped-def]
    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.lib.uploads import (
        EmbeddingUnavailable,
        UploadRejected,
        add_uploaded_exemplar,
        read_upload_file,
    )

    _setup_logging()
    agile = AgileResources()
    try:
        data = read_upload_file(file)
        encoder = agile.encoder.load()
        res = _guard(lambda: add_uploaded_exemplar(
            store, agile.vectors.vectors(), encoder, agile.paths.blobs, concept, data,
            polarity=polarity, added_by=rater, filename=file.name,
        ))
    except UploadRejected as exc:
        fail(f"cannot use {str(file)!r} as an exemplar: {exc}")
        return
    except EmbeddingUnavailable as exc:
        fail(f"{str(file)!r} is a valid image but could not be embedded: {exc}")
        return
    if res.in_corpus:
        typer.echo(f"{file} is already in the corpus (image {res.image_id}): added it as a {polarity} "
                   f"exemplar of {concept!r}")
    else:
        typer.echo(f"uploaded {file} as image {res.image_id} (embedded with {res.model_id}; kept out of "
                   f"the train and test splits) and added it as a {polarity} exemplar of {concept!r}")
    typer.echo(f"`agile concept expand {concept!r}` builds a batch around it, `agile round` trains with it")


@concept_app.command("edit")
def concept_edit(
    name: str,
    pos: Annotated[list[str] | None, typer.Option("--pos", help="Replace positive phrases.")] = None,
    neg: Annotated[list[str] | None, typer.Option("--neg", help="Replace negative phrases.")] = None,
    description: Annotated[str | None, typer.Option(help="Replace the rater instructions.")] = None,
) -> None:
    """Edit a concept's phrases or description."""
    store = _store()
    c = _guard(lambda: store.update_concept(name, positives=pos, negatives=neg, description=description))
    typer.echo(f"updated {c.name!r}: positives {list(c.positives)}, negatives {list(c.negatives)}")


@concept_app.command("list")
def concept_list() -> None:
    """List concepts with their label counts and rounds."""
    store = _store()
    names = store.concept_names()
    if not names:
        typer.echo("no concepts yet: `agile concept create NAME --pos PHRASE --neg PHRASE`")
        return
    typer.echo("name\tpositive\tnegative\trounds\tphrases")
    for n in names:
        c = store.get_concept(n)
        labels = store.effective_labels(n)
        pos = sum(labels.values())
        typer.echo(f"{n}\t{pos}\t{len(labels) - pos}\t{len(store.rounds(n))}\t"
                   + "; ".join(f"{'+' if k == 'positive' else '-'}{_term_safe(p)}" for k, p in c.phrases))


@concept_app.command("show")
def concept_show(name: str) -> None:
    """Show a concept: phrases, labels, rounds and model versions."""
    from agile_pipeline.lib.state import concept_storage_key

    store = _store()
    c = _guard(lambda: store.get_concept(name))
    labels = store.effective_labels(c.name)
    pos = sum(labels.values())
    typer.echo(f"concept:      {c.name} (owner {_term_safe(c.owner)})")
    typer.echo(f"positives:    {[p for k, p in c.phrases if k == 'positive']}")
    typer.echo(f"negatives:    {list(c.negatives)}")
    if c.description:
        typer.echo("instructions: " + _term_safe(c.description, keep_lines=True).replace("\n", "\n" + " " * 14))
    typer.echo(f"storage key:  {concept_storage_key(c.name)} (its folder under concepts/, its "
               "predictions table under predictions/)")
    typer.echo(f"train labels: {pos} positive, {len(labels) - pos} negative")
    for r in store.rounds(c.name):
        typer.echo(f"round {r['round']}: {r['n_pos']} pos / {r['n_neg']} neg, trained in "
                   f"{r['train_seconds']:.2f}s, MLflow model version {r['model_version']}")


def _members(name: str):  # type: ignore[no-untyped-def]
    """The app's access rules over this data directory, acting as the concept's owner (the shell
    that can read the data directory is its administrator)."""
    from agile_pipeline import settings
    from labeling_ui.context import ServiceContext
    from labeling_ui.members import AccessSettings, Members

    store = _store()
    _guard(lambda: store.get_concept(name))
    return Members(ServiceContext(store, settings.data_home()), AccessSettings(auth_enabled=True))


@concept_app.command("members")
def concept_members(name: str) -> None:
    """Who has a role on a concept (and through which invite), and its invite links."""
    import time

    o = _guard(lambda: _members(name).overview(name, None))
    typer.echo(f"owner\t{_term_safe(o['owner'])}")
    for m in o["members"]:
        how = f"invite {m['via_invite']}" if m["via_invite"] else "granted"
        typer.echo(f"{m['role']}\t{_term_safe(m['user'])}\t{how}\t{'active' if m['active'] else 'revoked'}")
    for i in o["invites"]:
        exp = time.strftime("%Y-%m-%d %H:%M", time.localtime(i["expires_at"])) if i["expires_at"] else "never"
        typer.echo(f"invite\t{i['invite_id']}\t{i['role']}\t{i['status']}\texpires {exp}\t{i['uses']} joined"
                   + (f"\t{_term_safe(i['note'])}" if i["note"] else ""))


@concept_app.command("invite")
def concept_invite(
    name: str,
    role: Annotated[str, typer.Option(help="rater (rate, exemplars, search) or viewer (look only).")] = "rater",
    expires: Annotated[str, typer.Option(help="How long the link admits people: e.g. 12h, 7d, 2w, or never.")] = "7d",
    note: Annotated[str, typer.Option(help="Who it is for (shown to the owner).")] = "",
) -> None:
    """Make an invite link for a concept (the app must run with sign-in: AGILE_APP_AUTH)."""
    token, row = _guard(lambda: _members(name).create_invite(name, None, role=role, lifetime=expires, note=note))
    typer.echo(f"invite {row['invite_id']} ({row['role']}): open <app address>/invite/{token}")
    typer.echo("the link is shown only now; `agile concept revoke` stops it and everyone who joined through it")


@concept_app.command("revoke")
def concept_revoke(
    name: str,
    invite_id: Annotated[str, typer.Argument(help="The invite's id (`agile concept members NAME`).")],
) -> None:
    """Revoke an invite link: it admits nobody, and who joined through it loses access at once."""
    _guard(lambda: _members(name).revoke_invite(name, None, invite_id))
    typer.echo(f"invite {invite_id} revoked")


@concept_app.command("grant")
def concept_grant(
    name: str,
    user: Annotated[str, typer.Argument(help="A sign-in name (AGILE_APP_AUTH).")],
    role: Annotated[str, typer.Argument(help="rater, viewer, or none to take their role away.")],
) -> None:
    """Give someone a role on a concept directly (not through an invite), or take it away."""
    m = _members(name)
    if role == "none":
        gone = _guard(lambda: m.remove(name, None, user))
        typer.echo(f"{_term_safe(user)} {'no longer has a role' if gone else 'had no role'} on {name!r}")
        return
    _guard(lambda: m.grant(name, None, user, role))
    typer.echo(f"{_term_safe(user)} is a {role} of {name!r}")


@app.command()
def label(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    from_csv: Annotated[Path, typer.Option("--from-csv", help="CSV with columns image,label[,rater].")],
    rater: Annotated[str, typer.Option(help="Rater for rows without a rater column.")] = "owner",
    purpose: Annotated[str, typer.Option(help="train, or eval for evaluation-set labels.")] = "train",
) -> None:
    """Record ratings from a CSV (image = id or path; label = positive/negative/skip)."""
    from agile_pipeline.lib.state import LabelEvent, valid_rater_name

    rater = _rater_name(rater)
    store = _store()
    concept = _guard(lambda: store.get_concept(name))
    rows = _read_label_csv(from_csv)
    batch = store.latest_batch(concept.name, ("expansion", "al", "eval"))
    provenance = {it["image_id"]: it for it in (batch or {}).get("items", [])}
    events, unknown = [], []
    for lineno, row in rows:
        image_id = store.resolve_image(row["image"])
        if image_id is None:
            unknown.append(f"line {lineno}: {row['image']!r}")
            continue
        lab = row["label"].strip().lower()
        lab = {"pos": "positive", "1": "positive", "yes": "positive", "neg": "negative",
               "0": "negative", "no": "negative"}.get(lab, lab)
        if lab not in ("positive", "negative", "skip"):
            fail(f"{from_csv}: line {lineno}: label {row['label']!r} is not positive, negative or skip; nothing was recorded")
        who = (row.get("rater") or rater).strip() or rater
        if not valid_rater_name(who):
            fail(f"{from_csv}: line {lineno}: rater name {who[:80]!r} is not allowed: use 1-64 "
                 "letters, digits, spaces or .@'-_ (the app's rule); nothing was recorded")
        it = provenance.get(image_id)
        events.append(LabelEvent(
            concept=concept.name, image_id=image_id, label=lab,
            rater=who, purpose=purpose,
            source=(it["source"] if it else "import"), detail=(it["detail"] if it else str(from_csv)),
            round=(batch["round"] if it and batch else None),
        ))
    if unknown:
        fail(f"{len(unknown)} image(s) in {from_csv} are not in the corpus ({'; '.join(unknown[:3])}); "
             "use ids or paths printed by `agile candidates`/`agile search`. Nothing was recorded")
    n = _guard(lambda: store.add_labels(events))
    labels = store.effective_labels(concept.name, purpose=purpose)
    pos = sum(labels.values())
    typer.echo(f"recorded {n} label(s) for {concept.name!r}; {purpose} labels now {pos} positive, "
               f"{len(labels) - pos} negative")
    if purpose == "train" and labels and pos == 0:
        typer.secho("no positive labels yet: add more phrases (`agile concept edit`) and "
                    "`agile concept expand`, or rate more images, before a round", fg=typer.colors.YELLOW)


def _decode_csv(raw: bytes, path: Path) -> str:
    """CSV bytes as text: UTF-8 (with or without BOM) or UTF-16 with a BOM (Excel's "Unicode
    text"). Anything else — a legacy code page, or lines in different encodings — is refused
    with the first offending line, rather than guessed (a wrong guess silently turns a path
    into an unknown image)."""
    import codecs

    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            fail(f"{path} starts as UTF-16 but byte {exc.start} is not: save it again as "
                 "'CSV UTF-8' and retry; nothing was recorded")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start : exc.start + 4]
        fail(f"{path}: line {line} is not UTF-8 (bytes {bad!r}): the file was saved in a legacy "
             "encoding or mixes encodings; save it as 'CSV UTF-8' and retry; nothing was recorded")
    raise AssertionError("unreachable")


def _read_label_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
        raise
    text = _decode_csv(raw, path)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        fail(f"{path}: line {line} holds a NUL byte: this is not a text CSV; nothing was recorded")
    try:  # Excel writes ';' (many locales) or tabs ("Unicode text") as often as ','
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    cols = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
    if "image" not in cols or "label" not in cols:
        fail(f"{path} needs a header with columns image,label[,rater] (found: {', '.join(cols) or 'none'}); nothing was recorded")
    out = []
    try:
        for lineno, row in enumerate(reader, start=2):
            norm = {(k or "").strip().lower(): (v or "") for k, v in row.items() if isinstance(v, str)}
            if not norm.get("image", "").strip():
                continue
            out.append((lineno, norm))
    except csv.Error as exc:
        fail(f"{path}: line {reader.line_num}: {exc}; nothing was recorded")
    if not out:
        fail(f"{path} has no label rows")
    return out


@labels_app.command("export")
def labels_export(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    out: Annotated[Path | None, typer.Option(help="Output file (default: stdout, csv only).")] = None,
) -> None:
    """Export a concept's full label history: one row per rating event, oldest first."""
    import duckdb
    import pyarrow as pa

    store = _store()
    concept = _guard(lambda: store.get_concept(name))
    if fmt not in ("csv", "parquet"):
        fail(f"unknown format {fmt!r}: use csv or parquet")
    if fmt == "parquet" and out is None:
        fail("parquet needs --out FILE")
    rows = store.label_history(concept.name)
    cols = ["seq", "event_id", "concept", "image_id", "image_path", "label", "rater", "ts",
            "purpose", "source", "detail", "round"]
    events = pa.table({c: [r[c] for r in rows] for c in cols}) if rows else pa.table(
        {c: pa.array([], pa.string()) for c in cols})
    con = duckdb.connect()  # in-memory analytics over Arrow: no file, no lock
    con.register("events", events)
    col = {c: c for c in cols}
    if fmt == "csv":  # no cell that a spreadsheet would run as a formula (OWASP: CSV injection)
        col.update({c: _csv_formula_guard(c) for c in ("event_id", "concept", "image_id", "image_path",
                                                       "label", "rater", "purpose", "source", "detail")})
    query = (f"SELECT {col['seq']}, {col['event_id']}, {col['concept']}, {col['image_id']}, "
             f"{col['image_path']}, {col['label']}, {col['rater']}, to_timestamp(ts) AS time, "
             f"{col['purpose']}, {col['source']}, {col['detail']}, {col['round']} FROM events ORDER BY seq")
    if out is None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        res = con.execute(query)
        writer.writerow([d[0] for d in res.description])
        writer.writerows(res.fetchall())
        sys.stdout.write(buf.getvalue())
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    target = str(out).replace("'", "''")
    con.execute(f"COPY ({query}) TO '{target}' (FORMAT {fmt.upper()}{', HEADER' if fmt == 'csv' else ''})")
    typer.echo(f"wrote {len(rows)} label events of {concept.name!r} to {out}", err=True)


def _csv_formula_guard(column: str) -> str:
    """SQL for ``column`` with a cell that starts like a spreadsheet formula (``= + - @``, tab
    or carriage return) prefixed by a single quote, so a spreadsheet shows it as text."""
    return (f"CASE WHEN left({column}, 1) IN ('=', '+', '-', '@', chr(9), chr(13)) "
            f"THEN '''' || {column} ELSE {column} END AS {column}")


@app.command("round")
def round_(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    strategy: Annotated[str, typer.Option(
        help="margin, margin-positive, or cluster-margin (the most uncertain 10x batch, one per k-means "
             "cluster: no near-duplicate batches).")] = "margin",
    batch: Annotated[int, typer.Option(help="Images to select for the next batch.")] = settings.AL_BATCH,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Retrain even if no label changed since the last round.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what a round would do now (train, keep the last model, or queue a recovery batch) and run nothing.")] = False,
) -> None:
    """Train on all labels so far, then select the next batch (margin sampling)."""
    from agile_pipeline.defs.concepts import al_candidates, classifier, eval_set, registered_model
    from agile_pipeline.runner import metadata_of, run_concept_round

    _setup_logging()
    if strategy not in ("margin", "margin-positive", "cluster-margin"):
        fail(f"unknown strategy {strategy!r}: use margin, margin-positive or cluster-margin")
    if dry_run:
        from agile_pipeline.lib.loop import plan_round, round_facts

        plan = plan_round(_guard(lambda: round_facts(_env().store, name)), force=force)
        typer.echo(f"{plan.action}: {plan.reason}")
        return
    result = _with_progress(
        f"round for {name!r}: loading the model and vectors, training, selecting the next "
        "batch, registering in MLflow, updating the eval set",
        lambda: _guard(lambda: run_concept_round(
            name, training={"seed": seed, "force": force},
            sampling={"batch_size": batch, "strategy": strategy},
        )))
    _print_steps(result)
    c = metadata_of(result, classifier)
    a = metadata_of(result, al_candidates)
    ev = metadata_of(result, eval_set)
    mv = metadata_of(result, registered_model)
    if c.get("trained") is False:
        from agile_pipeline.lib.loop import NO_POSITIVES_ADVICE

        typer.secho(NO_POSITIVES_ADVICE.format(name=name, neg=c.get("n_neg")), fg=typer.colors.YELLOW)
        typer.echo(f"recovery batch: {a.get('candidates')} images; `agile candidates {name!r}` lists them")
        return
    if c.get("reused_previous_round"):
        typer.echo(f"no new labels since round {c.get('round')}: kept that model (use --force to retrain)")
    typer.echo(f"round {c.get('round')}: trained on {c.get('n_pos')} positive / {c.get('n_neg')} negative "
               f"labels in {c.get('train_seconds')}s; MLflow model version {mv.get('model_version')}")
    typer.echo(f"next batch: {a.get('candidates')} images selected by {a.get('strategy')} from "
               f"{a.get('images_scored')} in {a.get('select_seconds')}s; `agile candidates {name!r}` lists them")
    typer.echo(f"eval set: {ev.get('eval_images')} test images, {ev.get('to_rate')} still to rate "
               f"(`agile candidates {name!r} --eval`, then `agile label {name!r} --purpose eval ...`)")
    _print_metrics(name)


def _print_metrics(name: str) -> None:
    import json

    env = _env()
    path = env.concept_dir(env.store.get_concept(name).name) / "metrics.json"
    if not path.exists():
        return
    report = json.loads(path.read_text())
    if not report["n_eval_labels"]:
        typer.echo("metrics: no eval labels yet")
        return
    typer.echo(f"metrics on {report['n_eval_labels']} eval labels (plot: {path.with_suffix('.png')}):")
    corpus = any("auc_pr_corpus" in r for r in report["models"])
    typer.echo("model\tlabels\tAUC-PR\tAUC-ROC\tF1\taccuracy" + ("\tAUC-PR (corpus scores)" if corpus else ""))
    for r in report["models"]:
        extra = f"\t{r.get('auc_pr_corpus', r['auc_pr']):.3f}" if corpus else ""
        typer.echo(f"{r['model']}\t{r['n_labels']}\t{r['auc_pr']:.3f}\t{r['auc_roc']:.3f}\t{r['f1']:.3f}\t{r['accuracy']:.3f}"
                   + extra)
    if corpus:
        typer.echo("AUC-PR (corpus scores): the scores of this corpus's own images (propagated over the "
                   "corpus's kNN graph where its rated neighbours agree; elsewhere the model file's)")


@app.command()
def evaluate(name: Annotated[str, typer.Argument(help="Concept name.")]) -> None:
    """Re-score every model and zero-shot on the eval labels rated so far (prints the table)."""
    from agile_pipeline.runner import run_concept_eval

    _setup_logging()
    result = _with_progress(f"scoring every model of {name!r} on its eval ratings",
                            lambda: _guard(lambda: run_concept_eval(name)))
    _print_steps(result)
    _print_metrics(name)


@app.command()
def predict(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    version: Annotated[int | None, typer.Option(help="MLflow model version (default: the alias).")] = None,
    alias: Annotated[str, typer.Option(help="MLflow alias: champion (best on the eval set) or latest.")] = "champion",
    threshold: Annotated[float, typer.Option(help="P(concept) at or above this is the concept.")] = 0.5,
) -> None:
    """Score images with a concept's registered classifier (the MLflow model any MLflow tool
    loads too): prints path, P(concept), yes/no, and why an image could not be read."""
    from agile_pipeline.lib.tracking import load_classifier_model

    paths_ = _data_dir()
    if not 0.0 <= threshold <= 1.0:
        fail("--threshold is a probability between 0 and 1")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"no such file or folder: {', '.join(missing)}")
    concept = _guard(lambda: _store().get_concept(name))

    def load():  # type: ignore[no-untyped-def]
        try:
            return load_classifier_model(paths_.mlflow_uri(), concept.name, version=version, alias=alias)
        except Exception as exc:
            fail(f"no registered model for {concept.name!r} at "
                 f"{'version ' + str(version) if version is not None else '@' + alias}: "
                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
                 "(train one with `agile round`; `agile predict --help` lists the options)")

    import pandas as pd

    model, uri = load()
    out = model.predict(pd.DataFrame({"image": [str(p.resolve()) for p in paths]}),
                        params={"threshold": threshold})
    typer.echo(f"# {uri}  threshold {threshold}", err=True)
    typer.echo("image\tprobability\tis_concept\terror")
    for r in out.to_dict(orient="records"):
        prob = "" if r["probability"] != r["probability"] else f"{r['probability']:.4f}"
        verdict = "" if r["is_concept"] is None else ("yes" if r["is_concept"] else "no")
        typer.echo(f"{r['image']}\t{prob}\t{verdict}\t{r['error']}")


@app.command()
def candidates(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    rater: Annotated[str | None, typer.Option(help="Only images this rater has not rated.")] = None,
    with_ids: Annotated[bool, typer.Option("--ids", help="Print 'id<TAB>path'.")] = False,
    eval_: Annotated[bool, typer.Option("--eval", help="The eval set's unrated images instead.")] = False,
) -> None:
    """Print the images to rate next, one path per line (rate them with `agile label`)."""
    store = _store()  # a table read: no model, vector store or Dagster needed
    concept = _guard(lambda: store.get_concept(name))
    items = store.pending_items(concept.name, rater, purpose="eval" if eval_ else "train")
    paths = {r["id"]: r["path"] for r in store.image_rows([it["image_id"] for it in items])}
    for it in items:
        p = _term_safe(paths.get(it["image_id"], ""))
        typer.echo(f"{it['image_id']}\t{p}" if with_ids else p)
    if not items:
        typer.echo("nothing to rate: run `agile round NAME` to select the next batch", err=True)


@sources_app.command("list")
def sources_list() -> None:
    """Print the registered corpus sources, one per line (what refreshes ingest)."""
    from agile_pipeline.lib.corpus import registered_sources

    paths = _data_dir()
    known = _guard(lambda: registered_sources(paths.sources_file))
    if not known:
        typer.echo("no registered sources: `agile ingest PATH` registers one", err=True)
    for src in known:
        typer.echo(_term_safe(src))
    for src in known:
        if "://" not in src and not Path(src).exists():
            typer.secho(f"warning: {_term_safe(src)} does not exist: refreshes fail until it is "
                        f"back or removed with `agile sources remove {_term_safe(repr(src))}`",
                        fg=typer.colors.YELLOW, err=True)


@sources_app.command("remove")
def sources_remove(
    source: Annotated[str, typer.Argument(help="A registered source, as `agile sources list` prints it or as it was ingested.")],
) -> None:
    """Stop refreshing a source. Its images stay in the corpus (labels may name them)."""
    from agile_pipeline.lib.corpus import SourceError, remove_source

    paths = _data_dir()
    try:
        removed = _guard(lambda: remove_source(paths.sources_file, source))
    except SourceError as exc:
        fail(_term_safe(exc))
        return
    typer.echo(f"removed source {_term_safe(removed)}; its images stay in the corpus (refreshes "
               "no longer read it)")


@app.command()
def status() -> None:
    """Summarise the data directory: images, splits, models, concepts."""
    store = _store()
    typer.echo(f"data directory: {settings.data_home()}")
    typer.echo(f"images: {store.count_images()}")
    typer.echo(f"ingest log: {store.ingest_summary()}")
    typer.echo(f"concepts: {', '.join(store.concept_names()) or 'none'}")


@app.command()
def simulate(
    dataset: Annotated[Path, typer.Option(help="Labeled folder tree (or CSV image,concept).")],
    concepts: Annotated[str | None, typer.Option(help="Comma-separated concept names, or a number to sample.")] = None,
    rounds: Annotated[int, typer.Option(help="Active-learning rounds after expansion.")] = settings.AL_ROUNDS,
    batch: Annotated[int, typer.Option(help="Images rated per round.")] = settings.AL_BATCH,
    strategy: Annotated[str, typer.Option(
        help="margin, margin-positive, or cluster-margin (the most uncertain 10x batch, one per k-means "
             "cluster: no near-duplicate batches).")] = "margin",
    seed: Annotated[int, typer.Option(help="Seed for sampling and training.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("sim-out"),
    workers: Annotated[int, typer.Option(help="Concepts simulated in parallel.")] = 1,
    min_test_pos: Annotated[int, typer.Option(help="Skip concepts with fewer test positives.")] = 20,
    few_shot: Annotated[str, typer.Option(help="Training variant: plain (the paper's MLP), auto (the product's default model choice), cv (model choice by cross-validation), ensemble, linear, prior-linear, hybrid, mlp-pseudo, prior-decay.")] = "plain",
    few_shot_args: Annotated[str, typer.Option(help="The variant's settings as key=value,key=value (e.g. 'candidates=mlp|linear,folds=5,ridge_l2=0.3' for cv).")] = "",
    exemplar_when_stuck: Annotated[bool, typer.Option(help="After a batch with no positive, the simulated user gives one exemplar image (the app's recovery path).")] = False,
    pool_k: Annotated[int, typer.Option(help="SEALS candidate pool: score only the k nearest train neighbours of every labelled image and phrase (plus a random sample); 0 = the whole split (the paper's protocol).")] = 0,
    pool_random: Annotated[int, typer.Option(help="With --pool-k: unlabelled train images outside the pool scored too, drawn uniformly (the product's default; 0 = the pool alone, its worst case on small corpora).")] = settings.POOL_RANDOM,
    pool_sweep: Annotated[int, typer.Option(help="With --pool-k: the previous model's most uncertain train images (one whole-split scan after each selection, as the product does) scored with the pool too; 0 = none.")] = settings.POOL_SWEEP,
) -> None:
    """Play the user with ground truth (paper section 5) and report AUC-PR per round."""
    import json

    from agile_pipeline.research.simulate import (
        FEW_SHOT_VARIANTS,
        SimConfig,
        attach_negative_phrases,
        choose_concepts,
        config_dict,
        format_table,
        parse_variant_args,
        run_all,
        summarize,
        write_outputs,
    )
    from agile_pipeline.runner import prepare_simulation

    _setup_logging()
    if strategy not in ("margin", "margin-positive", "cluster-margin"):
        fail(f"unknown strategy {strategy!r}: use margin, margin-positive or cluster-margin")
    if few_shot not in FEW_SHOT_VARIANTS:
        fail(f"unknown --few-shot {few_shot!r}: one of {', '.join(FEW_SHOT_VARIANTS)}")
    try:
        variant_args = parse_variant_args(few_shot_args)
    except ValueError as exc:
        fail(f"--few-shot-args: {exc}")
        return
    t0 = time.perf_counter()
    data = _guard(lambda: prepare_simulation(str(dataset), min_test_pos=min_test_pos))
    if dataset.is_dir():  # negative phrases (negatives.txt) typed by the simulated user
        from agile_pipeline.defs.resources import AgileResources

        attach_negative_phrases(data, dataset, AgileResources().encoder.load())
    available = {c: len(p) for c, p in data.positives.items()}
    if not available:
        fail(f"no concept in {dataset} has {min_test_pos} or more test positives")
    requested = count = None
    if concepts:
        if concepts.strip().isdigit():
            count = int(concepts)
        else:
            requested = [c.strip() for c in concepts.split(",") if c.strip()]
    try:
        names = choose_concepts(available, requested, count, seed)
    except ValueError as exc:
        fail(str(exc))
        return
    if pool_k < 0 or pool_random < 0 or pool_sweep < 0:
        fail("--pool-k must be 0 (whole split) or a positive number of neighbours, --pool-random and --pool-sweep at least 0")
    cfg = SimConfig(rounds=rounds, batch=batch, strategy=strategy, seed=seed, few_shot=few_shot,
                    few_shot_args=variant_args, exemplar_when_stuck=exemplar_when_stuck, pool_k=pool_k, pool_random=pool_random,
                    pool_sweep=pool_sweep)
    typer.echo(f"simulating {len(names)} concepts on {len(data.train_ids)} train / "
               f"{len(data.test_ids)} test images with {data.embedding_model}")
    per_concept = run_all(data, names, cfg, workers=workers)
    summary = summarize(per_concept)
    results = {
        "embedding_model": data.embedding_model, "dataset": str(dataset),
        "config": config_dict(cfg),
        "concepts": per_concept, "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    paths = write_outputs(out, results)
    typer.echo(format_table(summary))
    typer.echo(f"wrote {paths['json']}, {paths['csv']}, {paths['plot']} in {results['seconds']}s")
    del json


def _run_benchmark(module: str, ctx: typer.Context) -> None:
    from agile_pipeline.bench import run_benchmark

    try:
        rc = run_benchmark(module, ctx.args, prog=ctx.command_path)
    except ImportError as exc:  # no source checkout
        fail(str(exc))
        return
    raise typer.Exit(rc)


@app.command("bench", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Performance suite (issue 7): synthetic 1M/10M corpora; see BENCHMARKS.md (options: `agile bench --help`)."""
    _run_benchmark("benchmarks", ctx)


@app.command("bench-session", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_session(ctx: typer.Context) -> None:
    """What a rater waits for in the real deployment (options: `agile bench-session --help`)."""
    _run_benchmark("benchmarks.session", ctx)


@app.command("app")
def app_(
    host: Annotated[str, typer.Option(help="Interface to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    dagster_url: Annotated[str, typer.Option(help="Dagster webserver that runs the rounds.")] = "http://127.0.0.1:3000",
) -> None:
    """Start the labeling app for the data directory ($AGILE_HOME) whose corpus is ingested."""
    from labeling_ui.launch import serve

    _setup_logging()
    store = _store()
    if not sum(store.count_images().values()):
        fail(f"no images in {settings.data_home()}: run `agile ingest FOLDER` first")
    serve(host=host, port=port, dagster_url=dagster_url)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
