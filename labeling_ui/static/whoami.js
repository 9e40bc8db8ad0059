// Who is rating: the signed-in user (auth on) or a name kept in this browser (auth off).
// Body of a gr.HTML `js_on_load` (`element`, `props`, `watch` provided by Gradio).
(function () {
  "use strict";
  const LS_RATER = "agile.rater";
  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const valid = (n) => /^[\p{L}\p{N}_][\p{L}\p{N}_ .@'-]{0,62}[\p{L}\p{N}_.]$|^[\p{L}\p{N}_]$/u.test(n);
  function cfg() { try { return JSON.parse(props.value || "{}") || {}; } catch (e) { return {}; } }
  function render(editing) {
    const c = cfg();
    if (c.auth) {
      element.innerHTML = `<div class="am-who"><span>Signed in as <b data-testid="rater-name">${esc(c.user || "?")}</b></span> <a class="am-link" href="/logout">Sign out</a></div>`;
      return;
    }
    const name = (localStorage.getItem(LS_RATER) || "").trim();
    if (name && !editing) {
      element.innerHTML = `<div class="am-who"><span>Rating as <b data-testid="rater-name">${esc(name)}</b></span> <button type="button" class="am-link" data-act="change">change</button></div>`;
      return;
    }
    element.innerHTML = `<form class="am-who am-who-form"><label>Your name <input name="rater" data-testid="rater-input" autocomplete="nickname" maxlength="64" placeholder="e.g. Alice" value="${esc(name)}"></label><button type="submit" class="am-btn am-small-btn">Save</button><span class="am-who-err"></span></form>`;
    const input = element.querySelector("input");
    if (editing) input.focus();
  }
  element.addEventListener("click", (ev) => {
    const b = ev.target.closest("[data-act=change]");
    if (b) render(true);
  });
  element.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = element.querySelector("input");
    const n = (input.value || "").trim().replace(/\s+/g, " ");
    if (!valid(n)) { element.querySelector(".am-who-err").textContent = "1-64 letters or digits"; return; }
    localStorage.setItem(LS_RATER, n);
    render(false);
    window.dispatchEvent(new CustomEvent("agile-rater", { detail: n }));
  });
  // remember the open concept: a reload (or a bookmark) reopens it
  let lastConcept;
  function remember() {
    const c = cfg();
    if (c.concept === lastConcept) return;
    lastConcept = c.concept;
    if (c.concept === undefined) return;
    const url = new URL(location.href);
    if (c.concept) { url.searchParams.set("concept", c.concept); localStorage.setItem("agile.concept", c.concept); }
    else { url.searchParams.delete("concept"); localStorage.removeItem("agile.concept"); }
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
  }
  watch("value", () => { render(false); remember(); });
  render(false);
})();
