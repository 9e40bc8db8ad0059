"""Gradio event handlers as plain functions: (service, session, inputs) -> :class:`View`.

They never touch components: ``app.py`` turns a :class:`View` into component updates. User
mistakes raise ``gr.Error`` with the store's own advice (``StateError`` messages). Gradio shows
toast messages as HTML, so every message is escaped (:func:`toast_text`): user text in it is
shown as text, never as markup.
"""

import html
import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from agile_pipeline.lib import access
from agile_pipeline.lib.state import StateError
from labeling_ui.config import UiSettings, valid_rater_name
from labeling_ui.export import load_snippet
from labeling_ui.members import Members
from labeling_ui.rounds import RoundView
from labeling_ui.security import clip_echoes, scrub_home, shown
from labeling_ui.service import LabelingService
from labeling_ui.session import LabelingSession

NO_CHANGE: Any = object()


@dataclass
class View:
    """Everything a handler may change; fields left at ``NO_CHANGE`` are not updated."""

    session: LabelingSession
    choices: Any = NO_CHANGE  # list[str]
    concept: Any = NO_CHANGE  # str | None
    form: Any = NO_CHANGE  # dict(name, positives, negatives, instructions, editing)
    status: Any = NO_CHANGE  # markdown
    widget: Any = NO_CHANGE  # JSON string
    model: Any = NO_CHANGE  # HTML
    raters: Any = NO_CHANGE  # HTML
    manage: Any = NO_CHANGE  # dict(visible, choices): the owner's invite and member controls
    invite_link: Any = NO_CHANGE  # HTML: a new invite link, shown once
    tab: Any = NO_CHANGE  # "concept" | "rate" | "model" | "raters"
    timer: Any = NO_CHANGE  # bool
    infos: list[str] = field(default_factory=list)


def toast_text(message: str) -> str:
    """A message for ``gr.Error`` / ``gr.Warning`` / ``gr.Info``, which Gradio renders as HTML:
    escaped (user text stays text) and with long echoes of user input cut short."""
    return html.escape(clip_echoes(message), quote=False)


def user_error(exc: Exception) -> gr.Error:
    return gr.Error(toast_text(str(exc).strip("'\"")), title="Please check")


def members(service: LabelingService, settings: UiSettings) -> Members:
    """Who may do what, under this app's sign-in settings."""
    return Members.for_app(service.context, settings)


def role_of(service: LabelingService, settings: UiSettings, session: LabelingSession,
            action: str = "read") -> str | None:
    """The session user's role on the open concept, when it allows ``action`` (``gr.Error`` if not)."""
    if not session.concept:
        return None
    m = members(service, settings)
    try:
        c = m.require(session.concept, session.user, action)
    except StateError as exc:
        raise user_error(exc) from exc
    return m.role(c, session.user)


def widget_value(
    session: LabelingSession, settings: UiSettings, round_view: RoundView | None = None,
    role: str | None = "owner", owner: str | None = None,
) -> str:
    """The rating widget's configuration (its ``value``); a change makes it react."""
    return json.dumps({
        "concept": session.concept,
        "auth": settings.auth_enabled,
        "user": session.user,
        "role": role,
        "owner": owner,
        "purpose": session.purpose,
        "nonce": session.nonce,
        "prefetch": settings.prefetch,
        "upload_max_bytes": settings.upload_max_bytes,
        "auto": settings.auto_round,
        "lookahead": settings.lookahead,
        "round": round_view.to_dict() if round_view is not None else None,
    })


def header_value(session: LabelingSession, settings: UiSettings) -> str:
    """The header's value: who is rating, and the open concept (kept in the URL and browser)."""
    return json.dumps({"auth": settings.auth_enabled, "user": session.user, "concept": session.concept})


def empty_form() -> dict[str, Any]:
    return {"name": "", "positives": "", "negatives": "", "instructions": "", "editing": False}


def concept_form(service: LabelingService, concept: str, role: str | None = "owner") -> dict[str, Any]:
    v = service.ratings.concept_view(concept)
    return {
        "name": v["name"],
        "positives": "\n".join(v["positives"][1:]),  # the name leads; it is always a phrase
        "negatives": "\n".join(v["negatives"]),
        "instructions": v["instructions"],
        "editing": True,
        "can_edit": access.allows(role, "edit"),  # type: ignore[arg-type]
    }


def panels(service: LabelingService, settings: UiSettings, session: LabelingSession,
           role: str | None = None) -> dict[str, Any]:
    """The Model and Raters tabs and the owner's controls, as the session's user may see them."""
    concept = session.concept
    if concept and role is None:
        role = role_of(service, settings, session)
    owned = bool(concept) and role == "owner" and settings.auth_enabled
    overview = members(service, settings).overview(concept or "", session.user) if owned else None
    return {
        "model": model_panel(service, concept, role=role or "owner"),
        "raters": raters_panel(service, settings, concept, role=role or "owner", user=session.user,
                               overview=overview),
        "manage": manage_controls(service, settings, session, role, overview=overview),
    }


def manage_controls(service: LabelingService, settings: UiSettings, session: LabelingSession,
                    role: str | None, *, overview: dict[str, Any] | None = None) -> dict[str, Any]:
    """Whether the owner's invite/member controls show, and what the revoke list offers."""
    if not session.concept or role != "owner" or not settings.auth_enabled:
        return {"visible": False, "choices": []}
    o = overview or members(service, settings).overview(session.concept, session.user)
    choices = [(f"invite {i['invite_id']} ({i['role']}{', ' + i['note'] if i['note'] else ''}; "
                f"{i['uses']} joined)", f"invite:{i['invite_id']}") for i in o["invites"] if i["status"] == "active"]
    choices += [(f"{m['user']} ({m['role']})", f"member:{m['user']}") for m in o["members"] if m["active"]]
    return {"visible": True, "choices": choices}


def requester(session: LabelingSession, rater: str | None) -> str:
    """Who asked (a run tag only; label writes take the name from the session or the API)."""
    if session.user:
        return session.user
    name = (rater or "").strip()
    return name if name and valid_rater_name(name) else "anonymous"


# ---- page load and concept selection -------------------------------------------------------
def on_load(
    service: LabelingService, settings: UiSettings, session: LabelingSession, query_concept: str | None,
    invite_token: str | None = None,
) -> View:
    """A page (re)load: reopen ``query_concept`` (``?concept=`` or the browser's last one), or
    join and open the concept of the invite link followed before signing in."""
    joined: list[str] = []
    if invite_token and settings.auth_enabled and session.user:
        try:
            query_concept = members(service, settings).redeem(invite_token, session.user)
            joined.append(query_concept)
        except StateError as exc:
            out = on_load(service, settings, session, query_concept)
            out.infos.append(f"The invite link you followed does not work: {exc}")
            return out
    names = members(service, settings).visible(session.user)
    wanted = None
    if query_concept:
        norm = " ".join(query_concept.strip().lower().split())
        wanted = norm if norm in names else None
    if wanted is None and session.concept in names:
        wanted = session.concept
    view = open_concept(service, settings, session, wanted, names=names, on_load=True)
    if joined and view.concept == joined[0]:
        role = members(service, settings).role(service.store.get_concept(joined[0]), session.user)
        view.infos.append(f"You joined “{joined[0]}” as a {role}.")
    return view


def open_concept(
    service: LabelingService, settings: UiSettings, session: LabelingSession, concept: str | None,
    *, names: list[str] | None = None, on_load: bool = False,
) -> View:
    names = names if names is not None else members(service, settings).visible(session.user)
    if not concept:
        session = session.with_concept(None)
        # on a page load the form is already empty: leave it, so that nothing typed before
        # the load event lands is wiped
        return View(
            session, choices=names, concept=None, form=NO_CHANGE if on_load else empty_form(),
            status=("" if names else "**Start here:** describe the idea you want to teach."),
            widget=widget_value(session, settings), **panels(service, settings, session),
            invite_link="", tab="concept", timer=False,
        )
    try:
        c = members(service, settings).require(concept, session.user, "read")
        role = members(service, settings).role(c, session.user)
        form = concept_form(service, c.name, role)
    except StateError as exc:
        raise user_error(exc) from exc
    session = session.with_concept(form["name"])
    view = service.rounds.round_view(session.concept or "")
    has_batch = service.batches.latest(form["name"]) is not None
    return View(
        session, choices=names, concept=form["name"], form=form,
        status=concept_status(service, form["name"], view, role=role, owner=c.owner),
        widget=widget_value(session, settings, view, role=role, owner=c.owner),
        **panels(service, settings, session, role), invite_link="",
        tab="rate" if has_batch or view.in_flight else ("concept" if on_load else NO_CHANGE),
        timer=view.in_flight,
    )


def concept_status(service: LabelingService, concept: str, view: RoundView, *, role: str | None = "owner",
                   owner: str | None = None) -> str:
    batch = service.batches.latest(concept)
    counts = service.batches.label_counts(concept)
    rounds = len(service.rounds.rounds_table(concept))
    parts = [f"**{html.escape(concept)}** · {counts['positive']} yes / {counts['negative']} no ratings"
             f" · {rounds} model{'s' if rounds != 1 else ''} trained"]
    if role != "owner":
        what = "rate its images" if role == "rater" else "look at it"
        parts.append(f"You are a **{role}** of this concept: you can {what}; its owner "
                     f"({html.escape(owner or '?')}) edits it and starts its rounds.")
    if view.in_flight:
        parts.append(f"⏳ {run_phrase(view)}")
    elif batch is None and view.state in ("failure", "error", "unreachable"):
        parts.append(f"⚠️ {html.escape(scrub_home(view.message, service.home))}")
    elif batch is None:
        parts.append("No images found yet: press **Find images again**.")
    return "  \n".join(parts)


JOB_PHRASES = {"start": "Finding images", "round": "Training the next model",
               "eval": "Scoring every model on the evaluation ratings",
               "followup": "Updating the model with the batch's last ratings"}


def run_phrase(view: RoundView) -> str:
    what = JOB_PHRASES.get(view.job or "", "Running")
    where = "in Dagster" if view.kind == "dagster" or view.run_url else "inside the app"
    link = f" ([run {view.run_id[:8]}]({view.run_url}))" if view.run_url and view.run_id else ""
    return f"{what} {where}…{link}"


# ---- create / edit -------------------------------------------------------------------------
def on_create(
    service: LabelingService, settings: UiSettings, session: LabelingSession, name: str, positives: str,
    negatives: str, instructions: str, rater: str | None,
) -> View:
    owner = requester(session, rater)
    if owner == "anonymous":
        raise gr.Error("Tell us your name first (top right): every rating is stored under it.", title="Your name")
    try:
        concept = service.ratings.create_concept(name, positives, negatives, instructions, owner=owner)
    except StateError as exc:
        raise user_error(exc) from exc
    session = session.with_concept(concept.name)
    view = service.rounds.start_concept(concept.name, requested_by=owner)
    out = View(
        session, choices=members(service, settings).visible(session.user),
        concept=concept.name, form=concept_form(service, concept.name),
        status=concept_status(service, concept.name, view),
        widget=widget_value(session, settings, view, owner=concept.owner), **panels(service, settings, session),
        invite_link="", tab="rate", timer=view.in_flight,
    )
    out.infos.append(f"Concept “{concept.name}” saved. {round_sentence(view)}")
    return out


def on_save(
    service: LabelingService, settings: UiSettings, session: LabelingSession, positives: str, negatives: str,
    instructions: str,
) -> View:
    if not session.concept:
        raise gr.Error("Open a concept first, or create one.")
    role_of(service, settings, session, "edit")
    try:
        service.ratings.update_concept(session.concept, positives, negatives, instructions)
    except StateError as exc:
        raise user_error(exc) from exc
    session = session.bumped()
    view = service.rounds.round_view(session.concept or "")
    out = View(session, form=concept_form(service, session.concept or ""),
               status=concept_status(service, session.concept or "", view),
               widget=widget_value(session, settings, view))
    out.infos.append("Saved. Press “Find images again” to search with the new phrases.")
    return out


def on_find_again(
    service: LabelingService, settings: UiSettings, session: LabelingSession, rater: str | None,
    in_process: bool = False,
) -> View:
    if not session.concept:
        raise gr.Error("Open a concept first, or create one.")
    role_of(service, settings, session, "train")
    try:
        view = service.rounds.start_concept(session.concept, requested_by=requester(session, rater), in_process=in_process)
    except StateError as exc:
        raise user_error(exc) from exc
    out = View(session, status=concept_status(service, session.concept, view),
               widget=widget_value(session, settings, view), tab="rate", timer=view.in_flight)
    out.infos.append(round_sentence(view))
    return out


def round_sentence(view: RoundView) -> str:
    if view.state == "unreachable":
        return "The pipeline is not reachable; your work is saved (see the Rate tab)."
    if view.state == "error":
        return f"The pipeline refused: {view.message}"
    what = "Finding images for it" if view.job == "start" else JOB_PHRASES.get(view.job or "", "Running")
    where = "in Dagster" if view.kind == "dagster" or view.run_url else "inside the app"
    return f"{what} {where} (run {str(view.run_id)[:8]})."


# ---- rounds (from the rating widget) --------------------------------------------------------
def on_widget_action(
    service: LabelingService, settings: UiSettings, session: LabelingSession, data: dict[str, Any],
) -> View:
    """``data`` comes from the widget's ``trigger('submit', {...})``."""
    action = str(data.get("action", ""))
    concept = session.concept
    if not concept or str(data.get("concept", concept)) != concept:
        raise gr.Error("The concept changed in another tab; reload the page.")
    who = requester(session, data.get("rater"))
    role = role_of(service, settings, session, "train" if action != "purpose" else "read")
    owner = service.store.get_concept(concept).owner
    try:
        if action in ("round", "round_in_process"):
            view = service.rounds.request_round(concept, requested_by=who, in_process=action == "round_in_process")
        elif action in ("eval", "eval_in_process"):
            view = service.rounds.request_eval(concept, requested_by=who, in_process=action == "eval_in_process")
        elif action in ("start", "start_in_process"):
            view = service.rounds.start_concept(concept, requested_by=who, in_process=action == "start_in_process")
        elif action == "purpose":
            purpose = "eval" if data.get("purpose") == "eval" else "train"
            session = LabelingSession(session.concept, session.user, purpose, session.nonce + 1)
            return View(session, widget=widget_value(session, settings, service.rounds.round_view(concept),
                                                     role=role, owner=owner))
        else:
            raise gr.Error(toast_text(f"unknown action {shown(action)!r}"))
    except StateError as exc:
        raise user_error(exc) from exc
    out = View(session, widget=widget_value(session, settings, view, role=role, owner=owner), timer=view.in_flight,
               status=concept_status(service, concept, view))
    if view.state not in ("unreachable", "error"):
        out.infos.append(round_sentence(view))
    return out


def on_tick(service: LabelingService, settings: UiSettings, session: LabelingSession) -> View:
    """Poll the run; once finished, refresh everything that depends on it and stop polling."""
    if not session.concept:
        return View(session, timer=False)
    role = role_of(service, settings, session)
    owner = service.store.get_concept(session.concept).owner
    view = service.rounds.round_view(session.concept)
    out = View(session, widget=widget_value(session, settings, view, role=role, owner=owner), timer=view.in_flight)
    if not view.in_flight:
        out.status = concept_status(service, session.concept, view, role=role, owner=owner)
        p = panels(service, settings, session, role)
        out.model, out.raters, out.manage = p["model"], p["raters"], p["manage"]
    return out


def on_refresh(service: LabelingService, settings: UiSettings, session: LabelingSession) -> View:
    return View(session, **panels(service, settings, session))


# ---- the owner's invites and members (Raters tab) -------------------------------------------
def on_invite(service: LabelingService, settings: UiSettings, session: LabelingSession, role: str,
              expires: str, note: str) -> View:
    """A new invite link for the open concept, shown once (owners only)."""
    if not session.concept:
        raise gr.Error("Open a concept first.")
    try:
        token, row = members(service, settings).create_invite(session.concept, session.user, role=role, lifetime=expires,
                                                   note=note)
    except StateError as exc:
        raise user_error(exc) from exc
    link = f"/invite/{token}"
    until = f"until {_fmt_time(row['expires_at'])}" if row.get("expires_at") else "until you revoke it"
    out = View(session, **panels(service, settings, session, "owner"))
    out.invite_link = (
        f'<div class="am-panel" data-slot="new-invite"><p><b>New invite link</b> ({html.escape(row["role"])}, '
        f'works {until}). Copy it now: it is shown only this once.</p><p><a class="am-invite" '
        f'data-invite-id="{html.escape(row["invite_id"], quote=True)}" href="{html.escape(link, quote=True)}">'
        f'{html.escape(link)}</a></p></div>'
    )
    out.infos.append(f"Invite link made ({row['role']}): copy it now, it is shown only once.")
    return out


def on_revoke(service: LabelingService, settings: UiSettings, session: LabelingSession, choice: str | None) -> View:
    """Revoke an invite (everyone who joined through it loses access) or remove a member."""
    if not session.concept:
        raise gr.Error("Open a concept first.")
    kind, _, key = str(choice or "").partition(":")
    try:
        if kind == "invite":
            members(service, settings).revoke_invite(session.concept, session.user, key)
            msg = f"Invite {key} revoked: it admits nobody now, and who joined through it has lost access."
        elif kind == "member":
            members(service, settings).remove(session.concept, session.user, key)
            msg = f"{key} no longer has a role on “{session.concept}” (their ratings stay)."
        else:
            raise gr.Error("Pick an invite or a member to revoke first.")
    except StateError as exc:
        raise user_error(exc) from exc
    out = View(session, **panels(service, settings, session, "owner"), invite_link="")
    out.infos.append(msg)
    return out


# ---- panels (HTML) --------------------------------------------------------------------------
def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "—"


def _auc_cell(row: dict | None, key: str = "auc_pr") -> str:
    """``0.81 (0.72–0.88)``: a model's AUC-PR (``key``: of the model file, or ``auc_pr_corpus``
    of its corpus scores) on the eval ratings and its bootstrap interval."""
    value = (row or {}).get(key)
    if value is None or value != value:
        return "—"
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")  # type: ignore[union-attr]
    band = f' <span class="am-muted">({lo:.2f}–{hi:.2f})</span>' if lo == lo and hi == hi and lo is not None else ""
    return f"{value:.2f}{band}"


def _corpus_auc_cell(row: dict | None) -> str:
    """The collection's AUC-PR; for a model whose collection scores are its own (not propagated:
    the collection's neighbours disagreed on the ratings), says so instead of repeating it."""
    if row and "auc_pr_corpus" not in row and row.get("auc_pr") == row.get("auc_pr"):
        return ('<span class="am-muted" title="not propagated: in your collection, the nearest rated '
                'neighbours of the rated positives are too often negatives, so its scores there are '
                'the model file\'s">= model file</span>')
    return _auc_cell(row, "auc_pr_corpus")


FAMILY_NAMES = {"mlp": "MLP", "linear": "logistic regression", "ensemble": "MLP + logistic regression",
                "kernel": "kernel machine on the rated images",
                "mlp+kernel": "MLP + kernel machine on the rated images"}


def _family_cell(row: dict[str, Any]) -> str:
    """A model's family, with what the cross-validation measured as its tooltip."""
    family = str(row.get("family") or "mlp")
    choice = row.get("model_choice") or {}
    scores = choice.get("cv_auc_pr") or {}
    tip = (f"chosen by {choice.get('folds')}-fold cross-validation on the ratings, AUC-PR: "
           + ", ".join(f"{FAMILY_NAMES.get(k, k)} {v:.3f}" for k, v in scores.items())) if scores else (
        str(choice.get("reason") or "the paper's recipe"))
    name = FAMILY_NAMES.get(family, family)
    extra = int(row.get("graph_positives") or 0)
    if extra:
        name += f" + {extra} graph positive{'s' if extra != 1 else ''}"
        tip += (f"; also trained on {extra} unrated image{'s' if extra != 1 else ''} of your collection "
                "that label propagation over its neighbour graph made confidently positive")
    return (f'<span data-family="{html.escape(family, quote=True)}" title="{html.escape(tip, quote=True)}">'
            f"{html.escape(name)}</span>")


def model_panel(service: LabelingService, concept: str | None, *, role: str = "owner") -> str:
    esc = html.escape
    if not concept:
        return '<div class="am-panel am-muted">Open or create a concept to see its models.</div>'
    rows = service.rounds.rounds_table(concept)
    counts = service.batches.label_counts(concept)
    q = esc(concept, quote=True)
    parts = [f'<div class="am-panel"><h3>Models for “{esc(concept)}”</h3>',
             f'<p class="am-muted">Ratings so far: <b>{counts["positive"]}</b> yes, '
             f'<b>{counts["negative"]}</b> no.</p>']
    if not rows:
        parts.append('<p>No model yet. Rate the first batch: the first model trains by itself as you '
                     'finish it.</p>' if service.rounds.policy.auto else
                     '<p>No model yet. Rate the first batch, then press <b>Train the next model</b>.</p>')
    else:
        report, _mtime = service.export.metrics_report(concept)
        scored = {m["model"]: m for m in (report or {}).get("models", [])} if (report or {}).get(
            "n_eval_labels") else {}
        corpus = any("auc_pr_corpus" in m for m in scored.values())
        corpus_head = ('<th title="the scores this collection\'s own images get: the model\'s scores '
                       'spread over each image\'s nearest neighbours in the collection, your training '
                       'ratings held (label propagation); what the predictions table holds">AUC-PR, '
                       'your collection</th>') if corpus else ""
        parts.append('<table class="am-table"><thead><tr><th>Model</th><th>Trained on</th>'
                     '<th title="the model file on its own (what it gives a new image), on every '
                     'evaluation rating so far; in brackets a 90% bootstrap interval">AUC-PR'
                     + (', model file' if corpus else '') + '</th>' + corpus_head
                     + '<th title="which classifier the round trained, chosen by '
                     'cross-validation on your ratings">Kind</th><th>MLflow version</th><th>Training time</th>'
                     '<th>Finished</th><th>Download</th></tr></thead><tbody>')
        for r in reversed(rows):
            href = f"/export/{esc(concept, quote=True)}/round-{r['round']}.zip"
            download = (f'<a class="am-download" href="{href}" download>⬇ model {r["round"] + 1} (.zip)</a>'
                        if role == "owner" else '<span class="am-muted" title="only the owner exports">owner only</span>')
            model_key = f"round-{r['round']}"
            note = (' <span class="am-muted" title="trained while the last images of a batch were '
                    'still being rated, to have the next batch ready in time">(early: picked the next '
                    'batch)</span>') if r.get("lookahead") else ""
            parts.append(
                f"<tr><td>Model {r['round'] + 1}{note}</td><td>{r['positive']} yes / {r['negative']} no</td>"
                f"<td>{_auc_cell(scored.get(model_key))}</td>"
                + (f'<td data-slot="auc-corpus">{_corpus_auc_cell(scored.get(model_key))}</td>' if corpus else "")
                + f"<td>{_family_cell(r)}</td>"
                f"<td>{esc(str(r['model_version'] or '—'))}</td>"
                f"<td>{(r['train_seconds'] or 0):.1f} s</td><td>{_fmt_time(r['finished_at'])}</td>"
                f'<td>{download}</td></tr>'
            )
        parts.append("</tbody></table>")
        last = rows[-1]
        snippet = load_snippet(concept, service.export.tracking_uri, home=service.home,
                               registered_model=last.get("registered_model"))
        parts.append(
            '<h4>Use the model (MLflow)</h4>'
            f'<pre class="am-code"><code>{esc(snippet)}'
            '</code></pre>'
            '<p class="am-muted">The same from a shell: <code>agile predict '
            f'{esc(shlex.quote(concept))} PHOTO_OR_FOLDER</code>. The download holds <code>model.pt</code>, '
            '<code>meta.json</code> and a README with the embedding model to use and the threshold (0.5).'
            + (f' MLflow run <code>{esc(str(last["mlflow_run_id"]))}</code>.' if last["mlflow_run_id"] else "")
            + "</p>"
        )
    # ---- evaluation plot: written by the evaluation part of the pipeline (metrics.png) ----
    parts.append('<h4>How good is it?</h4>')
    report, _mtime = service.export.metrics_report(concept)
    n_eval = int((report or {}).get("n_eval_labels") or 0)
    to_rate = len(service.store.pending_items(concept, None, purpose="eval"))
    if n_eval and service.export.metrics_png(concept) is not None:
        pos = int(next(iter(report["models"]), {}).get("n_eval_pos", 0)) if report else 0
        parts.append(f'<p class="am-muted">Every model and zero-shot are scored on the same '
                     f'<b>{n_eval}</b> evaluation ratings ({pos} yes); the range beside each AUC-PR is '
                     'a 90% bootstrap interval. The evaluation set over-samples likely positives, '
                     'so compare models with each other rather than reading a figure as the '
                     'share of the whole collection.</p>')
        parts.append(f'<img class="am-metrics" alt="AUC-PR vs number of labels" '
                     f'src="/metrics/{q}.png?t={int(time.time())}">')
    if to_rate:
        parts.append(f'<div class="am-placeholder" data-slot="evaluation-prompt">Rate <b>{to_rate}</b> '
                     'images of the evaluation set (Rate tab → <b>Evaluation set</b>) to see how good '
                     'your model is — a good moment is while the next model trains.</div>')
    elif not n_eval:
        parts.append('<div class="am-placeholder" data-slot="evaluation-prompt">The evaluation set '
                     'is built with the first model: test images sampled across model scores. '
                     'Rate it to see how good each model is.</div>')
    parts.append("</div>")
    return "".join(parts)


def _members_table(o: dict[str, Any]) -> str:
    """The owner's view of who has a role and which invite links exist (``Members.overview``)."""
    esc = html.escape
    rows = [f'<tr data-member="{esc(m["user"], quote=True)}"><td>{esc(m["user"])}</td><td>{esc(m["role"])}</td>'
            f'<td>{"invite " + esc(m["via_invite"]) if m["via_invite"] else "given by the owner"}</td>'
            f'<td>{"yes" if m["active"] else "no (its invite was revoked)"}</td></tr>' for m in o["members"]]
    parts = ['<h4>People</h4><table class="am-table" data-slot="members"><thead><tr><th>Name</th><th>Role</th>'
             '<th>How</th><th>Has access</th></tr></thead><tbody>',
             f'<tr><td>{esc(o["owner"])}</td><td>owner</td><td>created the concept</td><td>yes</td></tr>',
             *rows, "</tbody></table>"]
    if o["invites"]:
        parts.append('<h4>Invite links</h4><table class="am-table" data-slot="invites"><thead><tr><th>Invite</th>'
                     '<th>Role</th><th>Note</th><th>Made</th><th>Expires</th><th>Joined</th><th>Status</th>'
                     '</tr></thead><tbody>')
        parts.extend(f'<tr data-invite-id="{esc(i["invite_id"], quote=True)}" data-status="{esc(i["status"])}">'
                     f'<td><code>{esc(i["invite_id"])}</code></td><td>{esc(i["role"])}</td>'
                     f'<td>{esc(i["note"] or "—")}</td><td>{_fmt_time(i["created_at"])}</td>'
                     f'<td>{_fmt_time(i["expires_at"]) if i["expires_at"] else "never"}</td>'
                     f'<td>{int(i["uses"])}</td><td>{esc(i["status"])}</td></tr>' for i in reversed(o["invites"]))
        parts.append("</tbody></table>")
    return "".join(parts)


def raters_panel(service: LabelingService, settings: UiSettings, concept: str | None, *, role: str = "owner",
                 user: str | None = None, overview: dict[str, Any] | None = None) -> str:
    esc = html.escape
    if not concept:
        return '<div class="am-panel am-muted">Open or create a concept to invite raters.</div>'
    c = service.ratings.concept_view(concept)
    if not settings.auth_enabled:
        link = f"/?concept={esc(concept, quote=True).replace(' ', '%20')}"
        parts = [
            '<div class="am-panel"><h3>Raters</h3>',
            f'<p>Link to this concept: <a class="am-invite" href="{link}">{esc(link)}</a>. Sign-in is off, so '
            'the app serves this machine only (or a trusted network, with '
            '<code>AGILE_APP_ALLOW_REMOTE_WITHOUT_AUTH=1</code>), everyone who reaches it can do '
            'everything, and each rater types their name once (every rating keeps it). To invite people '
            'with a role (rater or viewer) through links you can revoke, start the app with sign-in: '
            '<code>AGILE_APP_AUTH=name:password,...</code>, one entry per person.</p>',
        ]
    elif role == "owner":
        parts = ['<div class="am-panel">', _members_table(overview or members(service, settings).overview(concept, user))]
    else:
        parts = [f'<div class="am-panel"><h3>Raters</h3><p data-slot="your-role">You are a <b>{esc(role)}</b> of '
                 f'this concept; its owner is {esc(c["owner"])}.</p>']
    parts += [
        '<p>Raters see these instructions next to every image:</p>',
        f'<blockquote>{esc(c["instructions"] or "(no instructions yet: add some on the Concept tab)")}</blockquote>',
    ]
    agreement = service.ratings.agreement(concept)
    train = agreement["train"]
    parts.append(f'<p class="am-muted" data-slot="label-rule">Owner: {esc(c["owner"])}. Label rule '
                 f'that trains each round: {esc(agreement["label_rule"])}.</p>')
    stats = service.ratings.rater_stats(concept)
    if stats:
        figures = {r["rater"]: r for r in train["raters"]}
        parts.append('<table class="am-table" data-slot="rater-agreement"><thead><tr><th>Rater</th>'
                     '<th title="yes/no ratings of training images (their latest; skips not '
                     'counted)">Images rated</th><th title="on the images both rated: how often '
                     'this rater’s label is the owner’s">Agrees with the owner</th>'
                     '<th>Last rating</th></tr></thead><tbody>')
        for s in stats:
            f = figures.get(s["rater"], {})
            if f.get("is_owner"):
                agrees = '<span class="am-muted">(owner)</span>'
            elif f.get("co_rated_with_owner"):
                agrees = (f"{f['owner_agreement']:.0%} ({f['agree_with_owner']} of "
                          f"{f['co_rated_with_owner']})")
            else:
                agrees = '<span class="am-muted">— (no image rated by both)</span>'
            parts.append(f"<tr><td>{esc(s['rater'])}</td><td>{f.get('images_rated', 0)}</td>"
                         f"<td>{agrees}</td><td>{_fmt_time(s['last_rating'])}</td></tr>")
        parts.append("</tbody></table>")
    # ---- agreement: alpha, the review queue's first images, the eval ratings' alpha ----
    def alpha_line(rep: dict[str, Any], what: str) -> str:
        if rep["alpha"] is None:
            return f"{what}: Krippendorff’s α not available — {esc(rep['alpha_note'])}."
        n = rep["co_rated_images"]
        return (f"{what}: Krippendorff’s α = <b>{rep['alpha']:.2f}</b> over <b>{n}</b> "
                f"image{'s' if n != 1 else ''} rated by two or more raters "
                "(1: full agreement, 0: no better than chance).")

    evals, queue, shown_images = agreement["eval"], train["review_queue"], 8
    alpha_attr = "" if train["alpha"] is None else f"{train['alpha']:.6f}"
    parts += [f'<div data-slot="agreement" data-concept="{esc(concept, quote=True)}" data-alpha="{alpha_attr}" data-co-rated="{train["co_rated_images"]}" '
              f'data-queue-size="{queue["size"]}"><h3>Agreement</h3>',
              f"<p>{alpha_line(train, 'Training ratings')}</p>"]
    if evals["rated_images"]:
        parts.append(f'<p class="am-muted">{alpha_line(evals, "Evaluation ratings")} '
                     f'{evals["review_queue"]["size"]} to review.</p>')
    owner, n = esc(agreement["owner"]), queue["size"]
    if not n:
        parts.append(f'<h4>Review queue</h4><p class="am-muted">Nothing to review: no image where raters '
                     f'disagree is waiting for the owner ({owner}).</p>')
    else:
        parts.append(f'<h4>Review queue: <span data-slot="review-queue-size">{n}</span></h4>'
                     f'<p>{n} image{"s" if n != 1 else ""} where raters disagree (a yes and a no) and the '
                     f'owner ({owner}) has not rated. The owner’s decision becomes the label (the Yes / No '
                     'under each image, for the owner); once decided, the image leaves the queue.'
                     + (f" The first {shown_images}:" if n > shown_images else "") + '</p><div class="am-review">')
        for item in queue["items"][:shown_images]:
            image_id = esc(str(item["image_id"]), quote=True)
            who = " · ".join(f"{esc(r)}: {'yes' if lab == 'positive' else 'no'}"
                             for r, lab in item["labels"].items())
            decide = ('<div class="am-decide">'
                      f'<button type="button" class="am-btn am-small-btn" data-decide="positive" data-image="{image_id}" '
                      'title="The owner decides: yes">✓ Yes</button> '
                      f'<button type="button" class="am-btn am-small-btn" data-decide="negative" data-image="{image_id}" '
                      'title="The owner decides: no">✗ No</button></div>') if role == "owner" else ""
            parts.append(f'<figure data-image-id="{image_id}" style="display:inline-block;margin:0 8px 8px 0;'
                         f'width:112px;vertical-align:top"><img src="/image/{image_id}" alt="image to review" '
                         'loading="lazy" style="width:112px;height:112px;object-fit:cover;border-radius:6px">'
                         f'<figcaption class="am-muted" style="font-size:12px">{who}</figcaption>{decide}</figure>')
        parts.append("</div>")
    parts.append("</div></div>")
    return "".join(parts)
