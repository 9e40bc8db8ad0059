"""The labeling app: a FastAPI app with the Gradio UI mounted at ``/`` and the fast routes beside it.

``build_app(settings)`` wires the real dependencies (state store, pipeline trigger);
``build_blocks(service, settings)`` lays out the Gradio UI and wires its events to the pure
handlers in :mod:`labeling_ui.handlers`. No model, table or client is created at import time,
and torch / mlflow / dagster are imported only when a round runs in-process.

Screens: **Concept** (create / open / edit a concept; creating it starts the search for its
first images through the pipeline), **Rate** (a client-side rating widget: one image at a time
with keyboard shortcuts, or a grid; see ``static/rater.js``), **Model** (rounds, MLflow versions,
how to load, export, the evaluation plot) and **Raters** (invite link, who rated what).
"""

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from labeling_ui import handlers
from labeling_ui.api import INVITE_COOKIE, bad_request, build_router
from labeling_ui.config import UiSettings
from labeling_ui.handlers import NO_CHANGE, View
from labeling_ui.rounds import RoundPolicy
from labeling_ui.security import AuthGate, GuardMiddleware, HostAllowList, LoginThrottle, scrub_home
from labeling_ui.service import LabelingService
from labeling_ui.session import LabelingSession
from labeling_ui.trigger import DagsterGraphQLTrigger, InProcessTrigger, PipelineTrigger

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
WIDGET_TEMPLATE = '<div class="am-root" data-testid="rater"></div>'
WHOAMI_TEMPLATE = '<div class="am-whoroot"></div>'
BRAND = (
    '<div class="am-brand"><div class="am-logo">A</div><div><h1>Agile Modeling</h1>'
    "<p>Teach the computer your idea, by example — in minutes.</p></div></div>"
)
# the invite link as a full address (the server does not know the address raters use)
INVITE_JS = (
    "const fix = () => element.querySelectorAll('a.am-invite').forEach("
    "a => { a.textContent = location.origin + a.getAttribute('href'); }); watch('value', fix); fix();"
)
# the owner's Yes / No on the review queue: one POST each; the image then shows the decision
REVIEW_JS = INVITE_JS + """
element.addEventListener('click', async (ev) => {
  const b = ev.target.closest('button[data-decide]');
  if (!b) return;
  const box = element.querySelector('[data-slot=agreement]');
  const fig = b.closest('figure');
  fig.querySelectorAll('button').forEach((x) => { x.disabled = true; });
  let msg = '';
  try {
    const r = await fetch('/api/review', { method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ concept: box.dataset.concept, image_id: b.dataset.image, label: b.dataset.decide }) });
    const d = await r.json().catch(() => ({}));
    if (r.ok) {
      msg = 'decided: ' + (b.dataset.decide === 'positive' ? 'yes' : 'no');
      fig.dataset.decided = b.dataset.decide;
      const n = element.querySelector('[data-slot=review-queue-size]');
      if (n) n.textContent = String(d.review_queue_size);
      box.dataset.queueSize = String(d.review_queue_size);
    } else { msg = d.detail || ('HTTP ' + r.status); fig.querySelectorAll('button').forEach((x) => { x.disabled = false; }); }
  } catch (e) { msg = 'not saved (the server does not answer): try again'; fig.querySelectorAll('button').forEach((x) => { x.disabled = false; }); }
  let note = fig.querySelector('.am-decided');
  if (!note) { note = document.createElement('div'); note.className = 'am-decided am-muted'; fig.appendChild(note); }
  note.textContent = msg;
});
"""
INVITE_HELP = """### Invite someone to this concept
Make an invite link and send it: whoever opens it and signs in (with a name and password from
`AGILE_APP_AUTH`) gets its role on this concept only. A **rater** rates, adds exemplars and
searches; a **viewer** only looks. Only you edit the concept, start rounds, export and decide the
review queue. Revoke a link and everyone who joined through it loses access at once."""
HOW_IT_WORKS = """
<ol class="am-steps">
<li><b>Describe it.</b> A short name and a few phrases for what it looks like; also what it is
<i>not</i> (similar things that don't count). The app finds matching images.</li>
<li><b>Rate 100 images.</b> Yes or no, with the keyboard: about 3 minutes.</li>
<li><b>Train.</b> A model learns from your ratings and picks the 100 images it is least sure
about. Rate those; repeat. Five rounds usually make a good classifier.</li>
<li><b>Use it.</b> Download the model on the Model tab.</li>
</ol>
"""


def _read_static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _outputs(view: View, settings: UiSettings) -> list[Any]:
    """A :class:`View` -> values for the fixed output list of every event (see ``OUTPUT_KEYS``)."""
    for msg in view.infos:
        gr.Info(handlers.toast_text(msg))  # toasts render HTML: user text is shown as text
    skip = gr.skip()
    form = view.form
    vals: list[Any] = [
        view.session,
        skip if view.choices is NO_CHANGE and view.concept is NO_CHANGE else gr.Dropdown(
            choices=view.choices if view.choices is not NO_CHANGE else None,
            value=view.concept if view.concept is not NO_CHANGE else None,
        ),
        skip if form is NO_CHANGE else gr.Textbox(value=form["name"], interactive=not form["editing"]),
        *(skip if form is NO_CHANGE else gr.Textbox(value=form[k], interactive=form.get("can_edit", True))
          for k in ("positives", "negatives", "instructions")),
        skip if form is NO_CHANGE else gr.Button(visible=not form["editing"]),
        skip if form is NO_CHANGE else gr.Row(visible=form["editing"] and form.get("can_edit", True)),
        skip if view.status is NO_CHANGE else view.status,
        skip if view.widget is NO_CHANGE else view.widget,
        skip if view.model is NO_CHANGE else view.model,
        skip if view.raters is NO_CHANGE else view.raters,
        skip if view.tab is NO_CHANGE else gr.Tabs(selected=view.tab),
        skip if view.timer is NO_CHANGE else gr.Timer(active=bool(view.timer)),
        handlers.header_value(view.session, settings),  # unchanged values are not re-sent
        skip if view.manage is NO_CHANGE else gr.Group(visible=view.manage["visible"]),
        skip if view.manage is NO_CHANGE else gr.Dropdown(choices=view.manage["choices"], value=None),
        skip if view.invite_link is NO_CHANGE else view.invite_link,
    ]
    return vals


def build_blocks(service: LabelingService, settings: UiSettings) -> gr.Blocks:
    """The Gradio UI (layout and wiring only; logic is in :mod:`labeling_ui.handlers`)."""
    with gr.Blocks(title=settings.title, fill_width=True, analytics_enabled=False) as demo:
        session = gr.State(LabelingSession())
        rater_box = gr.Textbox(visible=False)
        concept_hint = gr.Textbox(visible=False)
        with gr.Row(elem_id="am-header", equal_height=True):
            gr.HTML(BRAND, scale=3, min_width=290)
            concept_dd = gr.Dropdown(
                choices=[], value=None, label="Concept", scale=2, elem_id="am-concept",
                allow_custom_value=False, interactive=True, min_width=200,
            )
            new_btn = gr.Button("+ New concept", scale=1, size="sm", elem_id="am-new", min_width=130)
            whoami = gr.HTML(
                handlers.header_value(LabelingSession(), settings), html_template=WHOAMI_TEMPLATE,
                js_on_load=_read_static("whoami.js"), scale=3, min_width=300, elem_id="am-who",
            )
        with gr.Tabs(selected="concept", elem_id="am-tabs") as tabs:
            with gr.Tab("1 · Concept", id="concept", elem_id="am-tab-concept"):
                with gr.Row():
                    with gr.Column(scale=3):
                        name = gr.Textbox(label="Name of the concept", placeholder="e.g. gourmet tuna",
                                          max_lines=1, elem_id="am-name")
                        positives = gr.Textbox(
                            label="What it looks like — one phrase per line",
                            placeholder="seared tuna steak on a plate\ntuna sashimi, nicely arranged",
                            lines=4, elem_id="am-pos",
                        )
                        negatives = gr.Textbox(
                            label="What it is NOT — similar things that don't count (optional)",
                            placeholder="canned tuna\ntuna sandwich", lines=3, elem_id="am-neg",
                        )
                        instructions = gr.Textbox(
                            label="Instructions for raters (optional)",
                            placeholder="Say yes only if the tuna is the main subject and looks restaurant-quality.",
                            lines=3, elem_id="am-instructions",
                        )
                        create_btn = gr.Button("Create and find images", variant="primary", elem_id="am-create")
                        with gr.Row(visible=False) as edit_row:
                            save_btn = gr.Button("Save changes", elem_id="am-save")
                            again_btn = gr.Button("Find images again", elem_id="am-again")
                        status = gr.Markdown(elem_id="am-status")
                    with gr.Column(scale=2):
                        gr.Markdown("### How it works")
                        gr.HTML(HOW_IT_WORKS)
            with gr.Tab("2 · Rate", id="rate", elem_id="am-tab-rate"):
                widget = gr.HTML(
                    handlers.widget_value(LabelingSession(), settings), html_template=WIDGET_TEMPLATE,
                    js_on_load=_read_static("rater.js"), elem_id="am-rater",
                )
            with gr.Tab("3 · Model", id="model", elem_id="am-tab-model") as model_tab:
                model = gr.HTML(handlers.model_panel(service, None), elem_id="am-model")
                with gr.Row():
                    refresh_btn = gr.Button("Refresh", size="sm", scale=0, min_width=120)
            with gr.Tab("Raters", id="raters", elem_id="am-tab-raters") as raters_tab:
                with gr.Group(visible=False, elem_id="am-manage") as manage_box:  # the owner's, with sign-in on
                    gr.Markdown(INVITE_HELP)
                    with gr.Row(equal_height=True):
                        invite_role = gr.Radio(["rater", "viewer"], value="rater", label="Role",
                                               elem_id="am-invite-role", scale=1)
                        invite_expiry = gr.Dropdown(["1d", "7d", "30d", "never"], value="7d",
                                                    label="The link admits people for", elem_id="am-invite-expiry",
                                                    scale=1)
                        invite_note = gr.Textbox(label="Note (who it is for; optional)", max_lines=1,
                                                 elem_id="am-invite-note", scale=2)
                        invite_btn = gr.Button("Create invite link", variant="primary", elem_id="am-invite-create",
                                               scale=1)
                    invite_out = gr.HTML("", elem_id="am-invite-out", js_on_load=INVITE_JS)
                    with gr.Row(equal_height=True):
                        revoke_dd = gr.Dropdown(choices=[], value=None, label="Revoke an invite link, or take "
                                                "someone's role away", elem_id="am-revoke-choice", scale=3)
                        revoke_btn = gr.Button("Revoke", variant="stop", elem_id="am-revoke", scale=1)
                raters = gr.HTML(
                    handlers.raters_panel(service, settings, None), elem_id="am-raters",
                    js_on_load=REVIEW_JS,
                )
        timer = gr.Timer(settings.poll_seconds, active=False)

        outputs = [session, concept_dd, name, positives, negatives, instructions, create_btn,
                   edit_row, status, widget, model, raters, tabs, timer, whoami, manage_box, revoke_dd, invite_out]
        private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}
        rater_js = "(...a) => { a[a.length - 1] = localStorage.getItem('agile.rater') || ''; return a; }"

        def run(fn: Any, sess: LabelingSession, request: gr.Request | None, *args: Any) -> list[Any]:
            # with sign-in on, who is acting always comes from the signed-in session, never
            # from anything the browser sends
            user = getattr(request, "username", None) if settings.auth_enabled else None
            try:
                view = fn(service, settings, sess.with_user(user), *args)
            except gr.Error as exc:  # no server path in what a rater sees
                exc.message = scrub_home(str(exc.message), service.home)
                raise
            view.infos = [scrub_home(m, service.home) for m in view.infos]
            return _outputs(view, settings)

        def load(hint: str, request: gr.Request) -> list[Any]:
            # an invite link followed before signing in left its token in a cookie (api.py)
            cookies = getattr(request, "cookies", None) or {}
            return run(handlers.on_load, LabelingSession(), request, hint, cookies.get(INVITE_COOKIE))

        def select(sess: LabelingSession, concept: str | None, request: gr.Request) -> list[Any]:
            if concept == sess.concept:
                return [gr.skip()] * len(outputs)
            return run(handlers.open_concept, sess, request, concept)

        def new(sess: LabelingSession, request: gr.Request) -> list[Any]:
            return run(handlers.open_concept, sess, request, None)

        def create(sess: LabelingSession, n: str, p: str, ng: str, ins: str, rater: str,
                   request: gr.Request) -> list[Any]:
            return run(handlers.on_create, sess, request, n, p, ng, ins, rater)

        def save(sess: LabelingSession, p: str, ng: str, ins: str, request: gr.Request) -> list[Any]:
            return run(handlers.on_save, sess, request, p, ng, ins)

        def again(sess: LabelingSession, rater: str, request: gr.Request) -> list[Any]:
            return run(handlers.on_find_again, sess, request, rater)

        def action(sess: LabelingSession, evt: gr.EventData, request: gr.Request) -> list[Any]:
            data = evt._data if isinstance(evt._data, dict) else {}
            return run(handlers.on_widget_action, sess, request, dict(data))

        def tick(sess: LabelingSession, request: gr.Request) -> list[Any]:
            return run(handlers.on_tick, sess, request)

        def refresh(sess: LabelingSession, request: gr.Request) -> list[Any]:
            return run(handlers.on_refresh, sess, request)

        def invite(sess: LabelingSession, role: str, expires: str, note: str, request: gr.Request) -> list[Any]:
            return run(handlers.on_invite, sess, request, role, expires, note)

        def revoke(sess: LabelingSession, choice: str | None, request: gr.Request) -> list[Any]:
            return run(handlers.on_revoke, sess, request, choice)

        # the concept to reopen: ?concept= (invite links, reloads) or the last one in this browser
        hint_js = ("(h) => new URLSearchParams(location.search).get('concept') "
                   "|| localStorage.getItem('agile.concept') || ''")
        demo.load(load, [concept_hint], outputs, js=hint_js, **private)
        concept_dd.input(select, [session, concept_dd], outputs, **private)
        new_btn.click(new, [session], outputs, **private)
        create_btn.click(create, [session, name, positives, negatives, instructions, rater_box], outputs,
                         js=rater_js, concurrency_id="dagster", **private)
        save_btn.click(save, [session, positives, negatives, instructions], outputs,
                       concurrency_id="dagster", **private)
        again_btn.click(again, [session, rater_box], outputs, js=rater_js, concurrency_id="dagster", **private)
        widget.submit(action, [session], outputs, concurrency_id="dagster", **private)
        timer.tick(tick, [session], outputs, concurrency_limit=None, **private)
        refresh_btn.click(refresh, [session], outputs, **private)
        model_tab.select(refresh, [session], outputs, **private)
        raters_tab.select(refresh, [session], outputs, **private)
        invite_btn.click(invite, [session, invite_role, invite_expiry, invite_note], outputs, **private)
        revoke_btn.click(revoke, [session, revoke_dd], outputs, **private)
    return demo


def make_service(settings: UiSettings, *, store: Any = None, trigger: PipelineTrigger | None = None,
                 fallback: PipelineTrigger | None = None) -> LabelingService:
    """The shared backend with real dependencies unless given."""
    from agile_pipeline import settings as agile_settings
    from agile_pipeline.lib.state import StateStore

    home = Path(settings.home).expanduser().resolve() if settings.home else agile_settings.data_home()
    paths = agile_settings.Paths(home)
    if store is None:
        if not paths.state_db.exists():
            log.warning("no state database at %s yet: ingest a corpus first (`agile ingest FOLDER`)", paths.state_db)
        store = StateStore(paths.state_db)
    # runs are recorded in $DAGSTER_HOME (the webserver shows them) when it is set
    runs_url = settings.dagster_url if os.environ.get("DAGSTER_HOME") else None
    in_process = fallback or InProcessTrigger(
        home=str(home), dagster_url=runs_url,
        warm=settings.warm and settings.trigger == "in-process" and trigger is None,
    )
    if trigger is None:
        trigger = in_process if settings.trigger == "in-process" else DagsterGraphQLTrigger(settings.dagster_url)
    return LabelingService(
        store, trigger, home=home, fallback=None if trigger is in_process else in_process,
        encoder_spec=agile_settings.default_encoder_spec(),
        policy=RoundPolicy(auto=settings.auto_round, lookahead=settings.lookahead),
    )


def build_app(settings: UiSettings | None = None, *, service: LabelingService | None = None) -> FastAPI:
    """The whole app: security middleware, the fast routes, and the Gradio UI at ``/``."""
    settings = settings or UiSettings.from_env()
    service = service or make_service(settings)
    # the widget follows the round policy the service really has (a given service brings its own)
    settings = dataclasses.replace(settings, auto_round=service.rounds.policy.auto,
                                   lookahead=service.rounds.policy.lookahead)
    gate = AuthGate(enabled=settings.auth_enabled)
    app = FastAPI(title=settings.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_router(service, gate, settings))
    app.add_exception_handler(RequestValidationError, bad_request)
    blocks = build_blocks(service, settings)
    blocks.queue(default_concurrency_limit=8)
    app = gr.mount_gradio_app(
        app, blocks, path="/", auth=settings.auth,
        auth_message="Sign in with the name and password the concept owner gave you.",
        allowed_paths=[], blocked_paths=[str(service.home), *settings.extra_blocked_paths],
        footer_links=[], run_history=False, ssr_mode=False, mcp_server=False,
        enable_monitoring=False, pwa=False, show_error=False, max_file_size=1,
        css=_read_static("app.css"), theme=gr.themes.Soft(primary_hue="indigo"),
        server_name=settings.host, server_port=settings.port,
    )
    from gradio.routes import App as GradioApp

    for route in app.routes:
        sub = getattr(route, "app", None)
        if isinstance(sub, GradioApp):
            gate.bind(sub)
    app.add_middleware(GuardMiddleware, throttle=LoginThrottle(free=settings.login_max_failures),
                       hosts=HostAllowList(settings.host_names(), bound=settings.host),
                       origin_hosts=tuple(h.strip().lower() for h in settings.allowed_hosts if h != "*"))
    app.state.service = service
    app.state.blocks = blocks
    app.state.settings = settings
    return app
