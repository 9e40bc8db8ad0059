// The rating widget: runs entirely in the browser so a rater never waits on the server.
//
// Body of a gr.HTML `js_on_load`: `element`, `trigger`, `props`, `watch` are provided by Gradio.
// - Every rating goes first to an outbox in localStorage, then is POSTed to /api/labels with a
//   client-made event_id (idempotent retries); it leaves the outbox only once acknowledged, so
//   a refresh, a closed tab or a network blip loses nothing.
// - The next images are fetched and decoded ahead of time; a key press swaps in an already
//   decoded <img>, so the next image appears in the same frame.
// - Rounds are asked of Python with trigger('submit', {...}); Python pushes the run's progress
//   back through `props.value` (watched below). With automatic rounds (cfg.auto) the server
//   starts them as ratings arrive and this widget polls /api/round while one is due: a
//   lookahead round's batch waits until the rater finishes the current one, then appears at once.
(function () {
  "use strict";
  const root = element;
  const LS_RATER = "agile.rater";
  const LS_OUTBOX = "agile.outbox.v1";
  const LS_REJECTED = "agile.outbox.rejected.v1";
  const LS_MODE = "agile.mode";
  if (window.__agileRater && window.__agileRater.destroy) window.__agileRater.destroy();

  const st = {
    cfg: {}, concept: null, purpose: "train", batch: null, items: [], cursor: -1,
    history: [], mode: localStorage.getItem(LS_MODE) === "grid" ? "grid" : "single",
    cache: new Map(), lastRatingAt: null, flushing: false, retryMs: 1000, flushTimer: null,
    round: null, roundAskedAt: null, loading: false, banner: null, loadSeq: 0, afterRoundFor: null,
    tick: null, error: null, nextReady: null, pollTimer: null, polling: false,
  };
  const LS_DURATIONS = "agile.round-seconds.v1";
  window.agileLatency = window.agileLatency || [];

  // ---- DOM --------------------------------------------------------------------------------
  root.innerHTML = `
  <div class="am-rater" data-mode="single">
    <div class="am-topbar">
      <div class="am-progress"><div class="am-bar"><div class="am-fill"></div></div>
        <span class="am-count" data-testid="progress">0 / 0</span></div>
      <div class="am-switch" role="group" aria-label="View">
        <button type="button" class="am-seg" data-mode="single" title="One image at a time (G)">One by one</button>
        <button type="button" class="am-seg" data-mode="grid" title="All images of the batch (G)">Grid</button>
      </div>
      <div class="am-switch" role="group" aria-label="Set">
        <button type="button" class="am-seg am-purpose" data-purpose="train">Training batch</button>
        <button type="button" class="am-seg am-purpose" data-purpose="eval">Evaluation set</button>
      </div>
      <div class="am-save" data-testid="save-state" aria-live="polite"></div>
    </div>
    <div class="am-banner" hidden></div>
    <div class="am-recovery" data-testid="recovery" hidden></div>
    <div class="am-body">
      <div class="am-main">
        <div class="am-single">
          <div class="am-stage" data-testid="stage"></div>
          <div class="am-prev" aria-live="polite"></div>
          <div class="am-actions">
            <button type="button" class="am-btn am-no" data-label="negative">✗ No <kbd>N</kbd><kbd>←</kbd></button>
            <button type="button" class="am-btn am-skip" data-label="skip">Not sure <kbd>S</kbd></button>
            <button type="button" class="am-btn am-yes" data-label="positive">✓ Yes <kbd>Y</kbd><kbd>→</kbd></button>
            <button type="button" class="am-btn am-star" data-act="exemplar" data-testid="exemplar-btn" title="A clear example of the concept: it is stored with the concept, finds similar images, and counts as yes">★ Exemplar <kbd>E</kbd></button>
            <button type="button" class="am-btn am-undo" data-act="undo" title="Back to the previous image">↶ Undo <kbd>U</kbd></button>
          </div>
        </div>
        <div class="am-gridwrap">
          <div class="am-gridbar">Click an image to switch it between <b class="am-y">yes</b> and
            <b class="am-n">no</b>; ★ marks it as an exemplar. <button type="button" class="am-link" data-act="rest-no">Mark all unrated as no</button></div>
          <div class="am-grid" data-testid="grid"></div>
        </div>
        <div class="am-done" hidden>
          <div class="am-done-title"></div>
          <div class="am-done-sub"></div>
          <button type="button" class="am-btn am-train" data-act="round">Train the next model <kbd>Enter</kbd></button>
          <div class="am-roundbox"></div>
        </div>
        <div class="am-empty" hidden></div>
      </div>
      <aside class="am-side">
        <div class="am-q">Does the image show <span class="am-concept"></span>?</div>
        <div class="am-phr"><div class="am-phr-h am-y">Yes, if it shows</div><ul class="am-pos"></ul></div>
        <div class="am-phr"><div class="am-phr-h am-n">No, if it only shows</div><ul class="am-neg"></ul></div>
        <div class="am-phr am-exbox"><div class="am-phr-h am-y">★ Exemplars — images like these</div><div class="am-exstrip" data-testid="exemplars"></div>
          <div class="am-upbar"><button type="button" class="am-btn am-small-btn am-upload" data-act="upload" data-polarity="positive" data-testid="upload-exemplar" title="Pick an image file from your computer: it is checked, embedded now, finds similar images and counts as yes">⇪ Upload an image</button>
            <button type="button" class="am-link am-upneg" data-act="upload" data-polarity="negative" data-testid="upload-counter" title="Pick an image of what the concept is NOT: it counts as no">or a counter-example</button></div>
          <div class="am-upstatus" data-testid="upload-status" aria-live="polite"></div>
          <input type="file" class="am-upfile" accept="image/*" hidden data-testid="exemplar-file"></div>
        <div class="am-instr-h">Instructions</div>
        <div class="am-instr"></div>
        <div class="am-keys"><b>Keys</b>: <kbd>Y</kbd>/<kbd>→</kbd> yes · <kbd>N</kbd>/<kbd>←</kbd> no ·
          <kbd>S</kbd> not sure · <kbd>E</kbd> ★ exemplar · <kbd>U</kbd>/<kbd>⌫</kbd> undo · <kbd>G</kbd> grid</div>
        <div class="am-sideround"></div>
        <button type="button" class="am-link am-early" data-act="round">Train now with what I have rated</button>
      </aside>
    </div>
  </div>`;
  const $ = (sel) => root.querySelector(sel);
  const ui = {
    box: $(".am-rater"), fill: $(".am-fill"), count: $(".am-count"), save: $(".am-save"),
    banner: $(".am-banner"), stage: $(".am-stage"), prev: $(".am-prev"), grid: $(".am-grid"),
    done: $(".am-done"), doneTitle: $(".am-done-title"), doneSub: $(".am-done-sub"),
    roundbox: $(".am-roundbox"), empty: $(".am-empty"), concept: $(".am-concept"),
    pos: $(".am-pos"), neg: $(".am-neg"), instr: $(".am-instr"), sideround: $(".am-sideround"),
    train: $(".am-train"), early: $(".am-early"), recovery: $(".am-recovery"), exstrip: $(".am-exstrip"),
    upfile: $(".am-upfile"), upstatus: $(".am-upstatus"),
  };

  // ---- helpers ----------------------------------------------------------------------------
  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  function newId() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }
  function who() {
    if (st.cfg.auth) return st.cfg.user || null;
    const n = (localStorage.getItem(LS_RATER) || "").trim();
    return n || null;
  }
  // the user's role on the concept (the server enforces it; this only keeps buttons honest)
  function role() { return st.cfg.role || "owner"; }
  function viewOnly() {
    if (role() !== "viewer") return false;
    st.banner = "You are a <b>viewer</b> of this concept: you can look at its images but not rate them. " +
      "Ask its owner" + (st.cfg.owner ? " (" + esc(st.cfg.owner) + ")" : "") + " for a rater invite.";
    render();
    return true;
  }
  function readJSON(key) { try { const v = JSON.parse(localStorage.getItem(key) || "[]"); return Array.isArray(v) ? v : []; } catch (e) { return []; } }
  function writeJSON(key, v) { try { localStorage.setItem(key, JSON.stringify(v)); } catch (e) { console.error("localStorage", e); } }
  function imgUrl(id) { return "/image/" + id; }

  // ---- outbox: ratings stay in localStorage until the server acknowledges them ------------
  function outbox() { return readJSON(LS_OUTBOX); }
  function enqueue(ev) { const l = outbox(); l.push(ev); writeJSON(LS_OUTBOX, l); renderSave(); scheduleFlush(0); }
  function scheduleFlush(ms) {
    if (st.flushTimer) clearTimeout(st.flushTimer);
    st.flushTimer = setTimeout(flush, ms);
  }
  async function post(rater, events, keepalive) {
    return fetch("/api/labels", {
      method: "POST", credentials: "same-origin", keepalive: !!keepalive,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ rater, events: events.map(({ rater: _r, ...e }) => e) }),
    });
  }
  function ack(ids) { const s = new Set(ids); writeJSON(LS_OUTBOX, outbox().filter((e) => !s.has(e.event_id))); }
  async function flush() {
    st.flushTimer = null;
    if (st.flushing) { scheduleFlush(200); return; }
    const list = outbox();
    if (!list.length) { renderSave(); return; }
    st.flushing = true;
    renderSave();
    const rater = list[0].rater;
    const chunk = list.filter((e) => e.rater === rater).slice(0, 200);
    try {
      const r = await post(rater, chunk);
      if (r.ok) {
        ack((await r.json()).acked || chunk.map((e) => e.event_id));
        st.retryMs = 1000; st.error = null;
      } else if (r.status === 400 || r.status === 403 || r.status === 404 || r.status === 415) {
        // all-or-nothing on the server: find the event(s) it refuses, set them aside, keep the rest
        for (const ev of chunk) {
          const r1 = await post(rater, [ev]);
          if (r1.ok) { ack([ev.event_id]); continue; }
          if (r1.status >= 500) break;
          let msg = "refused"; try { msg = (await r1.json()).detail || msg; } catch (e) { /* keep */ }
          const rej = readJSON(LS_REJECTED); rej.push({ ...ev, error: msg }); writeJSON(LS_REJECTED, rej.slice(-200));
          ack([ev.event_id]);
          st.error = "A rating could not be saved: " + msg;
        }
      } else if (r.status === 401) {
        st.error = "You were signed out: reload the page and sign in; your ratings wait here.";
        st.retryMs = Math.min(st.retryMs * 2, 15000);
      } else { st.retryMs = Math.min(st.retryMs * 2, 15000); }
    } catch (e) {
      st.retryMs = Math.min(st.retryMs * 2, 15000);
    } finally {
      st.flushing = false;
    }
    renderSave();
    if (outbox().length) scheduleFlush(st.error && !navigator.onLine ? 5000 : (outbox().length && st.retryMs > 1000 ? st.retryMs : 0));
  }
  async function flushAll(timeoutMs) {
    const t0 = Date.now();
    while (outbox().length && Date.now() - t0 < timeoutMs) {
      await flush();
      if (outbox().length) await new Promise((res) => setTimeout(res, Math.min(st.retryMs, 1000)));
    }
    return outbox().length === 0;
  }
  function renderSave() {
    const n = outbox().length;
    let text, cls;
    if (st.error) { text = "⚠ " + st.error; cls = "am-warn"; }
    else if (n === 0) { text = "✓ All ratings saved"; cls = "am-ok"; }
    else if (st.retryMs > 1000) { text = `${n} rating${n > 1 ? "s" : ""} not saved yet — retrying`; cls = "am-warn"; }
    else { text = `Saving ${n}…`; cls = "am-pending"; }
    ui.save.textContent = text;
    ui.save.className = "am-save " + cls;
    ui.save.dataset.pending = String(n);
  }

  // ---- images: fetch and decode ahead ------------------------------------------------------
  function getImg(id) {
    let img = st.cache.get(id);
    if (!img) {
      img = new Image();
      img.decoding = "async";
      img.alt = "image to rate";
      img.draggable = false;
      img.src = imgUrl(id);
      img.dataset.id = id;
      img.className = "am-img";
      img._ready = img.decode().then(() => true, () => false);
      st.cache.set(id, img);
    }
    return img;
  }
  function prefetch() {
    const n = st.cfg.prefetch || 8;
    let k = 0;
    for (let i = st.cursor + 1; i < st.items.length && k < n; i++) {
      if (!st.items[i].label) { getImg(st.items[i].image_id); k++; }
    }
  }

  // ---- batch loading ----------------------------------------------------------------------
  async function loadBatch(opts) {
    opts = opts || {};
    const concept = st.cfg.concept;
    st.concept = concept;
    st.purpose = st.cfg.purpose === "eval" ? "eval" : "train";
    const seq = ++st.loadSeq;
    // a load that replaces one started for a batch switch (a newer round state can arrive
    // while it is in flight) keeps its "after a round" meaning, so the rater still sees when
    // the next batch came
    if (opts.afterRound) st.afterRoundFor = concept;
    else if (st.afterRoundFor && st.afterRoundFor !== concept) st.afterRoundFor = null;
    const rater = who();
    if (!concept) { st.batch = null; st.items = []; render(); return; }
    st.loading = true;
    render();
    let data;
    try {
      const q = new URLSearchParams({ concept, purpose: st.purpose });
      if (rater && !st.cfg.auth) q.set("rater", rater);
      const r = await fetch("/api/batch?" + q.toString(), { credentials: "same-origin" });
      if (!r.ok) { let d = ""; try { d = (await r.json()).detail; } catch (e) { /* none */ } throw new Error(d || ("HTTP " + r.status)); }
      data = await r.json();
    } catch (e) {
      if (seq !== st.loadSeq) return;
      st.loading = false; st.items = []; st.batch = null;
      showEmpty("Could not load the images: " + esc(e.message) + ' <button type="button" class="am-link" data-act="reload">Try again</button>');
      return;
    }
    if (seq !== st.loadSeq) return;
    st.loading = false;
    const afterRound = st.afterRoundFor === concept;
    st.afterRoundFor = null;
    const sameBatch = st.batch && data.batch && st.batch.batch_id === data.batch.batch_id;
    if (!sameBatch) { st.cache = new Map(); st.history = []; st.nextReady = null; }
    st.batch = data.batch;
    st.conceptView = data.concept;
    st.counts = data.counts || null;
    if (st.batch) st.batch.recovery = !!data.recovery;
    ui.recovery.dataset.built = "";
    st.items = data.items;
    // ratings still in the outbox (not yet on the server) win over what the server knows
    const mine = new Map();
    for (const ev of outbox()) if (ev.concept === concept && st.batch && ev.batch_id === st.batch.batch_id && ev.rater === rater) mine.set(ev.image_id, ev.label);
    for (const it of st.items) if (mine.has(it.image_id)) it.label = mine.get(it.image_id);
    if (!st.round && data.round) st.round = data.round;
    st.cursor = firstUnrated(0);
    if (afterRound) st.switchedAt = Date.now();  // a follow-up round may start now: watch it
    if (afterRound && st.lastRatingAt) {
      const secs = ((Date.now() - st.lastRatingAt) / 1000).toFixed(1);
      const r = st.round || {};
      if (data.recovery) st.banner = `<b>No model yet: none of your ratings is a yes.</b> Here are ${st.items.length} more images (half the next-nearest of every phrase and exemplar, half at random from the corpus), <b data-testid="seconds-to-batch">${secs} s</b> after your last rating.`;
      else st.banner = `<b>Next batch.</b> ${st.items.length} images the model is least sure about, shown <b data-testid="seconds-to-batch">${secs} s</b> after your last rating.` + (r.run_url ? ` <a href="${esc(r.run_url)}" target="_blank" rel="noopener">See the run ↗</a>` : "");
    }
    render();
    syncPolling();
  }
  function firstUnrated(from) {
    for (let i = from; i < st.items.length; i++) if (!st.items[i].label) return i;
    for (let i = 0; i < from && i < st.items.length; i++) if (!st.items[i].label) return i;
    return -1;
  }

  // ---- rating -----------------------------------------------------------------------------
  function rate(label, t0) {
    if (st.cursor < 0 || !st.items[st.cursor] || !st.batch) return;
    if (viewOnly()) return;
    const rater = who();
    if (!rater) { showNameHint(); return; }
    const item = st.items[st.cursor];
    const ev = {
      event_id: newId(), concept: st.concept, batch_id: st.batch.batch_id, image_id: item.image_id,
      label, ts: Date.now() / 1000, rater,
    };
    item.label = label;
    st.history.push(st.cursor);
    st.lastRatingAt = Date.now();
    st.banner = null;
    st.cursor = firstUnrated(st.cursor + 1);
    flashPrev(label);
    if (st.cursor < 0 && st.nextReady && st.purpose === "train") loadBatch({ afterRound: true });
    else render();            // the next image is on screen now (already decoded)
    measure(t0);
    enqueue(ev);              // localStorage first, then POST
    syncPolling();
  }
  function setLabel(i, label) {   // grid: change any image's label
    if (viewOnly()) return;
    const rater = who();
    if (!rater) { showNameHint(); return; }
    const item = st.items[i];
    item.label = label;
    st.lastRatingAt = Date.now();
    enqueue({ event_id: newId(), concept: st.concept, batch_id: st.batch.batch_id, image_id: item.image_id, label, ts: Date.now() / 1000, rater });
  }
  // ---- exemplars and search (recovery when no positive is found) ---------------------------
  async function markExemplar(imageId) {
    if (viewOnly()) return;
    const rater = who();
    if (!rater) { showNameHint(); return; }
    if (!st.concept || !imageId) return;
    try {
      const r = await fetch("/api/exemplars", {
        method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ concept: st.concept, image_id: imageId, polarity: "positive", rater }),
      });
      let d = {}; try { d = await r.json(); } catch (e) { /* none */ }
      if (!r.ok) { st.error = "Could not mark the exemplar: " + (d.detail || ("HTTP " + r.status)); renderSave(); return; }
      if (st.conceptView) st.conceptView.exemplars = d.exemplars || [];
      st.exemplarAdded = true;
      ui.prev.textContent = "★ Exemplar saved: it finds similar images and counts as yes";
      ui.prev.className = "am-prev am-show am-positive";
      renderSide(); renderRecovery(); renderSearchStars();
    } catch (e) { st.error = "Could not mark the exemplar (no connection?)"; renderSave(); }
  }
  // ---- uploading an image file as an exemplar: click, pick the file, done --------------------
  function pickUpload(polarity) {
    if (!who()) { showNameHint(); return; }
    if (!st.concept || st.uploading) return;
    st.uploadPolarity = polarity === "negative" ? "negative" : "positive";
    ui.upfile.value = "";
    ui.upfile.click();
  }
  function upStatus(html, cls) {   // the status shows both in the side panel and in the recovery notice
    st.upStatus = { html, cls };
    root.querySelectorAll(".am-upstatus").forEach((el) => {
      el.className = "am-upstatus" + (cls ? " " + cls : "");
      el.innerHTML = html;
    });
  }
  async function uploadExemplar(file, polarity) {
    const rater = who();
    if (!file || !rater || !st.concept) return;
    const max = st.cfg.upload_max_bytes || 20 * 1024 * 1024;
    const mb = (n) => (n / (1024 * 1024)).toFixed(1) + " MB";
    if (file.size > max) { upStatus(`⚠ “${esc(file.name)}” is ${mb(file.size)}; the limit is ${mb(max)}. Upload a smaller version.`, "am-uperr"); return; }
    if (!file.size) { upStatus(`⚠ “${esc(file.name)}” is empty.`, "am-uperr"); return; }
    st.uploading = true;
    root.querySelectorAll(".am-upload, .am-upneg").forEach((b) => { b.disabled = true; });
    upStatus(`<span class="am-spinner am-small"></span> Uploading and embedding “${esc(file.name)}”…`, "am-upbusy");
    try {
      const q = new URLSearchParams({ concept: st.concept, polarity, name: file.name });
      if (!st.cfg.auth) q.set("rater", rater);
      const r = await fetch("/api/exemplars/upload?" + q.toString(), {
        method: "POST", credentials: "same-origin", body: file,
        headers: { "Content-Type": "application/octet-stream" },
      });
      let d = {}; try { d = await r.json(); } catch (e) { /* none */ }
      if (!r.ok) {
        const why = r.status === 401 ? "you were signed out: reload the page and sign in" : (d.detail || ("HTTP " + r.status));
        upStatus("⚠ " + esc(why.charAt(0).toUpperCase() + why.slice(1)) + ".", "am-uperr");
        return;
      }
      if (st.conceptView) st.conceptView.exemplars = d.exemplars || [];
      st.exemplarAdded = true;
      const neg = polarity === "negative";
      upStatus(`✓ “${esc(file.name)}” ${d.in_corpus ? "is already in the collection: marked" : "added"} as ${neg ? "a counter-example (counts as no)" : "an exemplar: it finds similar images and counts as yes"}.`, neg ? "am-upok am-upneg-ok" : "am-upok");
      renderSide(); renderRecovery(); renderSearchStars();
    } catch (e) {
      upStatus("⚠ The upload failed (no connection?). Try again.", "am-uperr");
    } finally {
      st.uploading = false;
      root.querySelectorAll(".am-upload, .am-upneg").forEach((b) => { b.disabled = false; });
    }
  }
  function exemplarIds() { return new Set(((st.conceptView && st.conceptView.exemplars) || []).map((e) => e.image_id)); }
  async function runSearch(q) {
    const box = root.querySelector(".am-sresults");
    if (!box || !st.concept) return;
    q = (q || "").trim();
    if (!q) { box.innerHTML = ""; return; }
    box.innerHTML = '<span class="am-spinner am-small"></span> Searching…';
    try {
      const r = await fetch("/api/search?" + new URLSearchParams({ concept: st.concept, q, k: "24" }), { credentials: "same-origin" });
      let d = {}; try { d = await r.json(); } catch (e) { /* none */ }
      if (!r.ok) { box.innerHTML = `<span class="am-muted">${esc(d.detail || ("HTTP " + r.status))}</span>`; return; }
      st.searchHits = d.items || [];
      box.innerHTML = st.searchHits.length ? st.searchHits.map((h) => `<div class="am-shit"><img loading="lazy" alt="" src="${imgUrl(h.image_id)}"><button type="button" class="am-sstar" data-exemplar="${esc(h.image_id)}" title="Mark as an exemplar">★</button></div>`).join("") : '<span class="am-muted">Nothing found.</span>';
      renderSearchStars();
    } catch (e) { box.innerHTML = '<span class="am-muted">Search failed (no connection?)</span>'; }
  }
  function renderSearchStars() {
    const mine = exemplarIds();
    root.querySelectorAll(".am-sstar").forEach((b) => b.classList.toggle("am-on", mine.has(b.dataset.exemplar)));
  }
  function needsRecovery() {
    if (st.purpose !== "train" || !st.batch) return false;
    if (st.batch.recovery) return true;
    const c = st.counts || {};
    const anyYes = st.items.some((i) => i.label === "positive");
    const posExemplars = ((st.conceptView && st.conceptView.exemplars) || []).filter((e) => e.polarity !== "negative").length;
    return st.cursor < 0 && !anyYes && !(c.positive > 0) && !posExemplars;
  }
  function renderRecovery() {
    const show = needsRecovery();
    if (!show) { if (!ui.recovery.hidden) { ui.recovery.hidden = true; ui.recovery.innerHTML = ""; } return; }
    if (!ui.recovery.hidden && ui.recovery.dataset.built === "1") { renderSearchStars(); return; }
    const rec = st.batch && st.batch.recovery;
    const n = exemplarIds().size;
    ui.recovery.hidden = false;
    ui.recovery.dataset.built = "1";
    ui.recovery.innerHTML =
      `<div class="am-rec-title">No positive found yet${n ? "" : " — no model can be trained without one"}.</div>` +
      `<p>${rec ? "These are <b>recovery images</b>: the app skipped training and queued a batch that is half the next-nearest images of every phrase and exemplar, taking turns between them, and half random images from the corpus (when the words miss, a random image finds a yes more often than a nearer miss)." : "Training now queues a <b>recovery batch</b> instead of a model: half the next-nearest images of every phrase and exemplar, taking turns between them, half random images from the corpus."} To get to the first yes faster:</p>` +
      `<ul class="am-rec-list"><li><button type="button" class="am-link" data-act="goto-concept">Add phrases</button> that describe the concept in other words (Concept tab, then <b>Save changes</b> and <b>Find images again</b>).</li>` +
      `<li>Mark any image that shows it as an <b>★ exemplar</b> (button or key <kbd>E</kbd>): it finds similar images like a phrase does, and counts as yes.</li>` +
      `<li>Search for one: <span class="am-search"><input type="search" class="am-sq" placeholder="e.g. a red fire truck" aria-label="Search images"> <button type="button" class="am-btn am-small-btn" data-act="search">Search</button></span></li>` +
      `<li>Have a picture that shows it? <button type="button" class="am-btn am-small-btn am-upload" data-act="upload" data-polarity="positive" data-testid="recovery-upload">⇪ Upload an image</button> — it is checked, added as an exemplar right away and shown under ★ Exemplars.<div class="am-upstatus" aria-live="polite"></div></li></ul>` +
      `<div class="am-sresults" data-testid="search-results"></div>`;
  }
  function gotoConcept() {
    const tab = Array.from(document.querySelectorAll("button[role=tab], .tab-nav button")).find((b) => /Concept/.test(b.textContent || ""));
    if (tab) tab.click();
  }
  function undo() {
    let i = st.history.pop();
    if (i === undefined) {   // after a reload: step back to the rated image before the cursor
      const from = st.cursor < 0 ? st.items.length : st.cursor;
      for (let k = from - 1; k >= 0; k--) if (st.items[k].label) { i = k; break; }
    }
    if (i === undefined) return;
    st.cursor = i;
    const was = st.items[i].label;
    ui.prev.innerHTML = was ? `You said <b>${labelWord(was)}</b> — press a key to change it.` : "";
    ui.prev.className = "am-prev am-show";
    st.undoing = i;
    render(true);
  }
  function labelWord(l) { return l === "positive" ? "yes" : l === "negative" ? "no" : "not sure"; }
  function flashPrev(label) {
    ui.prev.textContent = "Saved: " + labelWord(label);
    ui.prev.className = "am-prev am-show am-" + label;
    clearTimeout(st.prevTimer);
    st.prevTimer = setTimeout(() => { ui.prev.className = "am-prev"; }, 700);
  }
  function measure(t0) {
    if (t0 == null) return;
    const img = ui.stage.firstChild;
    requestAnimationFrame(() => setTimeout(() => {
      const rec = { ms: performance.now() - t0, decoded: !!(img && img.complete && img.naturalWidth > 0), id: img && img.dataset ? img.dataset.id : null };
      window.agileLatency.push(rec);
      if (window.agileLatency.length > 2000) window.agileLatency.shift();
    }, 0));
  }

  // ---- rendering --------------------------------------------------------------------------
  function showEmpty(htmlText) {
    ui.box.dataset.view = "empty";
    ui.empty.hidden = false; ui.done.hidden = true;
    ui.empty.innerHTML = htmlText;
  }
  function showNameHint() {
    showEmpty('<div class="am-empty-title">What is your name?</div><p>Type it at the top right first: every rating is stored under the name of the person who made it.</p>');
  }
  function renderSide() {
    const c = st.conceptView;
    ui.concept.textContent = c ? "“" + c.name + "”" : "…";
    ui.pos.innerHTML = c ? c.positives.map((p) => `<li>${esc(p)}</li>`).join("") : "";
    ui.neg.innerHTML = c && c.negatives.length ? c.negatives.map((p) => `<li>${esc(p)}</li>`).join("") : '<li class="am-muted">—</li>';
    const ex = (c && c.exemplars) || [];
    const want = ex.map((e) => e.image_id + e.polarity).join(",");
    if (ui.exstrip.dataset.ids !== want) {
      ui.exstrip.dataset.ids = want;
      ui.exstrip.innerHTML = ex.length ? ex.map((e) => `<img class="am-ex am-ex-${esc(e.polarity)}" loading="lazy" alt="${esc(e.polarity)} exemplar" data-id="${esc(e.image_id)}" data-polarity="${esc(e.polarity)}" title="${e.polarity === "negative" ? "counter-example" : "exemplar"}, added by ${esc(e.added_by)}" src="${imgUrl(e.image_id)}">`).join("") : '<span class="am-muted">None yet: press ★ (<kbd>E</kbd>) on a clear example, or upload one.</span>';
    }
    ui.instr.textContent = c && c.instructions ? c.instructions : "Rate by your own judgement of the concept.";
    const done = st.items.filter((i) => i.label).length;
    ui.early.hidden = !(st.purpose === "train" && done > 0 && st.cursor >= 0);
  }
  function render(keepPrev) {
    const total = st.items.length;
    const done = st.items.filter((i) => i.label).length;
    ui.count.textContent = `${done} / ${total}`;
    ui.fill.style.width = total ? (100 * done / total).toFixed(1) + "%" : "0%";
    ui.box.dataset.mode = st.mode;
    root.querySelectorAll(".am-seg[data-mode]").forEach((b) => b.classList.toggle("am-on", b.dataset.mode === st.mode));
    root.querySelectorAll(".am-purpose").forEach((b) => b.classList.toggle("am-on", b.dataset.purpose === st.purpose));
    ui.banner.hidden = !st.banner;
    ui.banner.innerHTML = st.banner || "";
    renderSide();
    renderRound();
    renderRecovery();
    if (!keepPrev && st.undoing !== undefined && st.cursor !== st.undoing) { st.undoing = undefined; }
    if (!st.concept) { showEmpty('<div class="am-empty-title">No concept open</div><p>Create one on the <b>Concept</b> tab, or pick one at the top.</p>'); return; }
    if (!who()) { showNameHint(); return; }
    if (st.loading && !total) { showEmpty('<div class="am-spinner"></div><p>Loading images…</p>'); return; }
    if (!st.batch) {
      const r = st.round;
      if (st.purpose === "eval" && r && (r.state === "queued" || r.state === "running")) showEmpty(`<div class="am-spinner"></div><div class="am-empty-title">Building the evaluation set…</div><p>${runLink(r)}</p>`);
      else if (st.purpose === "eval") showEmpty('<div class="am-empty-title">No evaluation set yet</div><p>It is built when a model is trained: images from the test split, sampled across model scores so that the result is fair.</p>');
      else if (r && (r.state === "queued" || r.state === "running")) showEmpty(`<div class="am-spinner"></div><div class="am-empty-title">Finding images for your concept…</div><p>${runLink(r)}</p>`);
      else showEmpty('<div class="am-empty-title">No images to rate yet</div><p>Press <b>Find images again</b> on the Concept tab.</p>' + roundHtml(r));
      return;
    }
    ui.empty.hidden = true;
    if (st.mode === "grid") { ui.box.dataset.view = "grid"; ui.done.hidden = st.cursor >= 0; renderGrid(); if (st.cursor < 0) renderDone(); return; }
    if (st.cursor < 0) { ui.box.dataset.view = "done"; ui.done.hidden = false; renderDone(); return; }
    ui.box.dataset.view = "single";
    ui.done.hidden = true;
    const item = st.items[st.cursor];
    const img = getImg(item.image_id);
    if (ui.stage.firstChild !== img) ui.stage.replaceChildren(img);
    ui.stage.dataset.imageId = item.image_id;
    ui.stage.dataset.index = String(st.cursor);
    prefetch();
  }
  function renderGrid() {
    const want = st.items.map((i) => i.image_id).join(",");
    if (ui.grid.dataset.ids !== want) {
      ui.grid.dataset.ids = want;
      ui.grid.innerHTML = st.items.map((it, i) => `<button type="button" class="am-tile" data-i="${i}"><img loading="lazy" decoding="async" alt="" src="${imgUrl(it.image_id)}"><span class="am-badge"></span><span class="am-tstar" data-star="${i}" title="Mark as an exemplar">★</span></button>`).join("");
    }
    ui.grid.querySelectorAll(".am-tile").forEach((t) => {
      const l = st.items[+t.dataset.i].label || "";
      t.dataset.label = l;
      t.querySelector(".am-tstar").classList.toggle("am-on", exemplarIds().has(st.items[+t.dataset.i].image_id));
      t.querySelector(".am-badge").textContent = l === "positive" ? "✓" : l === "negative" ? "✗" : l === "skip" ? "?" : "";
    });
  }
  function renderDone() {
    const n = { positive: 0, negative: 0, skip: 0 };
    for (const it of st.items) if (it.label) n[it.label]++;
    const r = st.round;
    const busy = r && (r.state === "queued" || r.state === "running");
    if (st.purpose === "eval") {
      ui.doneTitle.textContent = "Evaluation set rated — thank you!";
      ui.doneSub.textContent = `${n.positive} yes · ${n.negative} no · ${n.skip} not sure. Score every model on these ratings; the Model tab then shows how good each one is.`;
      ui.train.innerHTML = "Update the evaluation <kbd>Enter</kbd>";
      ui.train.dataset.act = "eval";
      ui.train.hidden = !!busy;
      ui.train.disabled = !!st.roundPending;
      return;
    }
    ui.train.innerHTML = "Train the next model <kbd>Enter</kbd>";
    ui.train.dataset.act = "round";
    ui.doneTitle.textContent = "Batch done — well rated!";
    const autoDue = st.cfg.auto && n.positive > 0 && st.lastRatingAt && Date.now() - st.lastRatingAt < 8000;
    ui.doneSub.textContent = st.cfg.auto && (busy || autoDue)
      ? `${n.positive} yes · ${n.negative} no · ${n.skip} not sure. The next model is training on every rating so far; the images it is least sure about appear here by themselves.`
      : `${n.positive} yes · ${n.negative} no · ${n.skip} not sure. Train the next model on every rating so far; it picks the images it is least sure about for you next.`;
    ui.train.hidden = !!busy || !!autoDue;
    ui.train.disabled = !!st.roundPending;
  }
  function runLink(r) {
    if (!r || !r.run_id) return "";
    if (r.kind !== "dagster" && !r.run_url) return `<span class="am-muted">(run inside the app)</span>`;
    const label = `Dagster run ${esc(r.run_id.slice(0, 8))}`;
    return r.run_url ? `<a href="${esc(r.run_url)}" target="_blank" rel="noopener" data-testid="run-link">${label} ↗</a>` : label;
  }
  function durations() { try { return JSON.parse(localStorage.getItem(LS_DURATIONS) || "{}") || {}; } catch (e) { return {}; } }
  function noteDuration(r) {    // how long finished runs took, per kind: the estimate shown next time
    if (!r || r.state !== "success" || !r.requested_at || !r.finished_at) return;
    const d = durations();
    const key = r.job + (r.lookahead ? "-lookahead" : "");
    d[key] = ((d[key] || []).concat([Math.max(0, r.finished_at - r.requested_at)])).slice(-5);
    try { localStorage.setItem(LS_DURATIONS, JSON.stringify(d)); } catch (e) { /* full */ }
  }
  function estimate(r) {
    const xs = durations()[r.job + (r.lookahead ? "-lookahead" : "")] || [];
    if (!xs.length) return "";
    const m = xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    return ` (usually about ${m < 10 ? m.toFixed(1) : m.toFixed(0)} s)`;
  }
  function roundHtml(r) {
    if (st.nextReady && st.batch && st.cursor >= 0 && st.purpose === "train") {
      return `<div class="am-round am-good" data-state="next-ready">✓ Your next batch is ready: it follows the last image of this one. ${runLink(r)}</div>`;
    }
    if (!r || r.state === "idle") return "";
    const secs = r.requested_at ? Math.max(0, Date.now() / 1000 - r.requested_at) : 0;
    const what = { start: "Finding images", round: "Training the next model", eval: "Scoring every model on the evaluation ratings", followup: "Updating the model with the last ratings of the previous batch (in the background)" }[r.job] || "Running";
    if ((r.state === "queued" || r.state === "running") && r.lookahead && st.cursor >= 0) {
      return `<div class="am-round am-busy" data-state="lookahead"><span class="am-spinner am-small"></span> Preparing your next batch while you rate: a model is training on your ratings so far… <span class="am-elapsed">${secs.toFixed(0)} s</span>${estimate(r)} · ${runLink(r)}</div>`;
    }
    if ((r.state === "queued" || r.state === "running") && r.job === "followup") {
      return `<div class="am-round am-busy am-quiet" data-state="followup"><span class="am-spinner am-small"></span> ${what}… · ${runLink(r)}</div>`;
    }
    if ((r.state === "queued" || r.state === "running") && r.job === "round" && r.new_batch) {
      return `<div class="am-round am-busy" data-state="finishing"><span class="am-spinner am-small"></span> Model ready; the run is finishing its last steps (evaluation) · ${runLink(r)}</div>`;
    }
    if (r.state === "queued" || r.state === "running") {
      return `<div class="am-round am-busy" data-state="${r.state}"><span class="am-spinner am-small"></span> ${what}${r.state === "queued" ? " (waiting in the queue)" : ""}… <span class="am-elapsed">${secs.toFixed(0)} s</span>${estimate(r)} · ${runLink(r)}${r.message ? `<div class="am-muted">${esc(r.message)}</div>` : ""}</div>`;
    }
    if (r.state === "success" && (r.job === "start" || r.job === "followup" || r.lookahead)) return "";  // the images are on screen: nothing to say
    if (r.state === "success" && r.job === "round" && st.batch && st.batch.recovery && st.batch.batch_id === r.batch_id) return `<div class="am-round am-warnbox" data-state="success">No positive yet: a recovery batch was queued instead of a model. ${runLink(r)}</div>`;
    if (r.state === "success") return `<div class="am-round am-good" data-state="success">✓ ${{ start: "Images found", round: "Model trained", eval: "Evaluation updated: see the Model tab" }[r.job] || "Done"}. ${runLink(r)}</div>`;
    if (r.state === "unreachable") {
      return `<div class="am-round am-bad" data-state="unreachable"><b>Could not start the run.</b> ${esc(r.message)}` +
        (r.fallback_offered ? `<div><button type="button" class="am-btn am-fallback" data-act="${r.job}_in_process">Run it inside the app instead</button></div>` : "") + "</div>";
    }
    return `<div class="am-round am-bad" data-state="${esc(r.state)}"><b>${what} did not finish.</b> ${esc(r.message)} ${runLink(r)}<div><button type="button" class="am-btn" data-act="${esc(r.job)}">Try again</button></div></div>`;
  }
  function evalPromptHtml(r) {   // after a model exists: rating the eval set tells how good it is
    if (!r || !r.eval_to_rate || st.purpose !== "train" || r.round_index === null || r.round_index === undefined) return "";
    return `<div class="am-round am-quiet" data-testid="eval-prompt">Rate <b>${r.eval_to_rate}</b> images of the evaluation set to see how good your model is` +
      `${r.in_flight ? " — a good moment is now, while the model trains" : ""}. <button type="button" class="am-link" data-purpose="eval">Rate the evaluation set</button></div>`;
  }
  function renderRound() {
    const h = roundHtml(st.round);
    ui.roundbox.innerHTML = h + (st.cursor < 0 ? evalPromptHtml(st.round) : "");  // batch done
    const r = st.round;
    const worth = (r && r.state !== "idle" && r.state !== "success") || (st.nextReady && st.purpose === "train");
    // while rating, the side panel carries the round's state and the evaluation-set offer
    ui.sideround.innerHTML = st.cursor >= 0 ? (worth ? h : "") + evalPromptHtml(r) : "";
  }

  // ---- talking to Python (rounds) -----------------------------------------------------------
  async function ask(action) {
    if (st.roundPending) return;
    if (role() !== "owner") {
      ui.roundbox.innerHTML = '<div class="am-round">Only the concept\'s owner' + (st.cfg.owner ? " (" + esc(st.cfg.owner) + ")" : "") +
        " starts rounds" + (st.cfg.auto ? "; your ratings are saved, and the next model trains by itself as the batch is rated." : ". Your ratings are saved; tell the owner when the batch is done.") + "</div>";
      return;
    }
    st.roundPending = true;
    ui.train.disabled = true;
    ui.roundbox.innerHTML = '<div class="am-round am-busy"><span class="am-spinner am-small"></span> Saving your last ratings…</div>';
    const ok = await flushAll(8000);
    if (!ok) {
      st.roundPending = false; ui.train.disabled = false;
      ui.roundbox.innerHTML = '<div class="am-round am-bad">Some ratings are not saved yet (the server does not answer). They are kept in this browser; try again in a moment.</div>';
      return;
    }
    st.roundAskedAt = Date.now();
    ui.roundbox.innerHTML = '<div class="am-round am-busy"><span class="am-spinner am-small"></span> Asking the pipeline…</div>';
    trigger("submit", { action, concept: st.concept, rater: who() });
    // Python answers by pushing a new round state (onValue); if it refused (a gr.Error toast),
    // nothing comes back: give the button back after a while
    clearTimeout(st.pendingTimer);
    st.pendingTimer = setTimeout(() => { st.roundPending = false; render(); }, 5000);
  }
  function onValue() {
    let cfg = {};
    try { cfg = JSON.parse(props.value || "{}") || {}; } catch (e) { cfg = {}; }
    const prev = st.cfg;
    st.cfg = cfg;
    root.dataset.role = cfg.role || "owner";
    const prevRound = st.round;
    const changed = cfg.concept !== prev.concept || cfg.purpose !== prev.purpose || cfg.nonce !== prev.nonce || cfg.user !== prev.user;
    // the newest of what Python pushed and what polling saw
    if (changed || !st.round || !cfg.round || (cfg.round.requested_at || 0) >= (st.round.requested_at || 0)) st.round = cfg.round || null;
    if (changed) { st.banner = null; st.nextReady = null; st.openedAt = Date.now(); loadBatch(); return; }
    onRound(prevRound);
  }
  function onRound(prevRound) {
    const r = st.round;
    if (st.roundPending && JSON.stringify(prevRound) !== JSON.stringify(r)) {
      st.roundPending = false;
      clearTimeout(st.pendingTimer);
    }
    if (prevRound && r && prevRound.run_id === r.run_id && prevRound.state !== "success") noteDuration(r);
    // a new batch is usable as soon as it is written (the run may still be finishing other steps)
    const newBatch = r && r.new_batch && r.batch_id && (!st.batch || r.batch_id > st.batch.batch_id) && st.purpose === "train";
    const fromRound = r && (r.job === "round" || r.job === "followup");
    if (newBatch && st.batch && st.cursor >= 0 && st.items.length) {
      // a lookahead round: the rater finishes this batch first; the next is shown at its end
      if (st.nextReady !== r.batch_id) { st.nextReady = r.batch_id; render(); }
    } else if (newBatch) loadBatch({ afterRound: fromRound && (!prevRound || prevRound.batch_id !== r.batch_id) });
    // a finished round or evaluation may have (re)built the evaluation set
    else if (st.purpose === "eval" && r && r.state === "success" && prevRound && prevRound.state !== "success") loadBatch();
    else render();
    syncPolling();
  }
  // ---- automatic rounds: poll the round state while one is running or due --------------------
  function wantPoll() {
    if (!st.concept) return false;
    const r = st.round;
    if (r && (r.state === "queued" || r.state === "running")) return true;  // e.g. finding the first images
    // a concept just opened with no batch yet: its first images are on their way
    if (!st.batch && st.purpose === "train" && st.openedAt && Date.now() - st.openedAt < 60000) return true;
    if (!st.cfg.auto || !st.batch || st.purpose !== "train") return false;
    const left = st.items.filter((i) => !i.label).length;
    const recent = st.lastRatingAt && Date.now() - st.lastRatingAt < 15000;
    const justSwitched = st.switchedAt && Date.now() - st.switchedAt < 10000;
    return !!recent && (left <= (st.cfg.lookahead || 0) + 1 || !!justSwitched);
  }
  function syncPolling() {
    if (wantPoll()) { if (!st.pollTimer) st.pollTimer = setInterval(pollRound, 250); }
    else if (st.pollTimer) { clearInterval(st.pollTimer); st.pollTimer = null; }
  }
  async function pollRound() {
    if (st.polling || !st.concept) return;
    st.polling = true;
    try {
      const r = await fetch("/api/round?" + new URLSearchParams({ concept: st.concept }).toString(), { credentials: "same-origin" });
      if (r.ok) {
        const data = await r.json();
        const prev = st.round;
        if (JSON.stringify(prev) !== JSON.stringify(data)) { st.round = data; onRound(prev); }
        else syncPolling();
      }
    } catch (e) { /* offline: the next tick tries again */ } finally { st.polling = false; }
  }

  // ---- input ------------------------------------------------------------------------------
  function visible() { return root.isConnected && root.offsetParent !== null; }
  function onKey(ev) {
    if (!visible()) return;
    const t = ev.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    let handled = true;
    if (k === "g") { setMode(st.mode === "grid" ? "single" : "grid"); }
    else if (st.mode === "single" && st.cursor >= 0 && st.batch) {
      if (k === "y" || k === "j" || k === "ArrowRight") rate("positive", ev.timeStamp);
      else if (k === "n" || k === "k" || k === "ArrowLeft") rate("negative", ev.timeStamp);
      else if (k === "s" || k === "ArrowDown") rate("skip", ev.timeStamp);
      else if (k === "e") exemplarCurrent(ev.timeStamp);
      else if (k === "u" || k === "z" || k === "Backspace") undo();
      else handled = false;
    } else if (st.cursor < 0 && st.batch) {
      if (k === "u" || k === "z" || k === "Backspace") { setMode("single"); undo(); }
      else if (k === "Enter" && !ui.train.hidden) ask(st.purpose === "eval" ? "eval" : "round");
      else handled = false;
    } else handled = false;
    if (handled) ev.preventDefault();
  }
  function exemplarCurrent(t0) {
    if (st.cursor < 0 || !st.items[st.cursor] || !who()) { if (!who()) showNameHint(); return; }
    const id = st.items[st.cursor].image_id;
    rate("positive", t0);      // a yes in this batch, saved like any rating
    markExemplar(id);          // and stored with the concept as an exemplar
  }
  function setMode(m) { st.mode = m; localStorage.setItem(LS_MODE, m); render(); }
  function onClick(ev) {
    const star = ev.target.closest(".am-tstar");
    if (star && root.contains(star)) {
      const i = +star.dataset.star;
      if (st.items[i]) { setLabel(i, "positive"); st.cursor = firstUnrated(0); markExemplar(st.items[i].image_id); render(); }
      return;
    }
    const b = ev.target.closest("button, a");
    if (!b || !root.contains(b)) return;
    if (b.dataset.exemplar) { markExemplar(b.dataset.exemplar); return; }
    if (b.dataset.label) { rate(b.dataset.label, ev.timeStamp); return; }
    if (b.dataset.mode) { setMode(b.dataset.mode); return; }
    if (b.dataset.purpose) { if (b.dataset.purpose !== st.purpose) trigger("submit", { action: "purpose", purpose: b.dataset.purpose, concept: st.concept }); return; }
    if (b.classList.contains("am-tile")) {
      const i = +b.dataset.i;
      const cur = st.items[i].label;
      setLabel(i, cur === "positive" ? "negative" : "positive");
      st.cursor = firstUnrated(0);
      if (st.cursor < 0 && st.nextReady && st.purpose === "train") loadBatch({ afterRound: true });
      else render();
      syncPolling();
      return;
    }
    const act = b.dataset.act;
    if (act === "undo") undo();
    else if (act === "exemplar") exemplarCurrent(ev.timeStamp);
    else if (act === "upload") { if (!viewOnly()) pickUpload(b.dataset.polarity); }
    else if (act === "goto-concept") gotoConcept();
    else if (act === "search") { if (viewOnly()) return; const inp = root.querySelector(".am-sq"); runSearch(inp ? inp.value : ""); }
    else if (act === "reload") loadBatch();
    else if (act === "rest-no") {
      const rest = st.items.map((it, i) => (it.label ? -1 : i)).filter((i) => i >= 0);
      if (rest.length && confirm(`Mark the ${rest.length} unrated image${rest.length > 1 ? "s" : ""} as no?`)) {
        for (const i of rest) setLabel(i, "negative");
        st.cursor = firstUnrated(0);
        render();
      }
    } else if (act) ask(act);
  }
  const onRater = () => loadBatch();
  const onOnline = () => scheduleFlush(0);
  const onHide = () => {    // last chance: hand unsent ratings to the browser to deliver
    const l = outbox();
    if (l.length) { try { post(l[0].rater, l.filter((e) => e.rater === l[0].rater).slice(0, 100), true); } catch (e) { /* kept in outbox */ } }
  };
  ui.upfile.addEventListener("change", () => { const f = ui.upfile.files && ui.upfile.files[0]; if (f) uploadExemplar(f, st.uploadPolarity || "positive"); });
  const onSearchKey = (ev) => { if (ev.key === "Enter" && ev.target.classList && ev.target.classList.contains("am-sq")) { ev.preventDefault(); runSearch(ev.target.value); } };
  root.addEventListener("keydown", onSearchKey);
  document.addEventListener("keydown", onKey);
  root.addEventListener("click", onClick);
  window.addEventListener("agile-rater", onRater);
  window.addEventListener("online", onOnline);
  window.addEventListener("pagehide", onHide);
  st.tick = setInterval(() => {
    const el = root.querySelector(".am-elapsed");
    if (el && st.round && st.round.requested_at) el.textContent = Math.max(0, Date.now() / 1000 - st.round.requested_at).toFixed(0) + " s";
    if (outbox().length && !st.flushing && !st.flushTimer) scheduleFlush(0);
    syncPolling();
  }, 1000);
  window.__agileRater = {
    state: st,
    flush: () => flushAll(10000),
    destroy() {
      document.removeEventListener("keydown", onKey);
      window.removeEventListener("agile-rater", onRater);
      window.removeEventListener("online", onOnline);
      window.removeEventListener("pagehide", onHide);
      clearInterval(st.tick);
      if (st.pollTimer) clearInterval(st.pollTimer);
    },
  };
  watch("value", onValue);
  renderSave();
  onValue();
  scheduleFlush(0);
})();
