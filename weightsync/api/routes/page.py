"""The status page at ``/``: engines, states, versions, and recent sync phase durations.

One self-contained HTML document (inline CSS, JS and SVG; no CDN: engines often live on
machines without internet). The current status is embedded as JSON so the page renders without
a round trip, then refreshes from ``/status`` every 2 s with the page's cookie.

Auth: with a token configured, sign in once at ``/login`` (a form that POSTs the token, so it
never appears in a URL, an access log or the browser's history). The service answers with an
HttpOnly, SameSite=Strict cookie holding a random session id (``weightsync.api.gate.
PageSessions``), never the token, and a 303 to a relative ``./`` (the ``Host`` header is not
trusted to build it). The cookie is accepted by read-only GET routes only (see
``weightsync.api.deps``).
"""

from __future__ import annotations

import json
import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from weightsync.api.deps import COOKIE, get_fleet, get_settings, require_reader, token_matches
from weightsync.api.errors import AuthError
from weightsync.api.fleet import Fleet
from weightsync.api.routes.common import PAGE_ERRORS, error_responses
from weightsync.config import Settings

router = APIRouter(tags=["page"])
SECURITY_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                    "X-Content-Type-Options": "nosniff"}


@router.get("/", response_model=str, response_class=HTMLResponse,
            dependencies=[Depends(require_reader)], responses=PAGE_ERRORS)
async def status_page(fleet: Fleet = Depends(get_fleet)) -> Response:
    status = await fleet.status()  # as last seen: the page never waits on an engine
    nonce = secrets.token_urlsafe(16)
    data = (json.dumps(status.model_dump(mode="json"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    html = PAGE.replace("__NONCE__", nonce).replace("__DATA__", data)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, **SECURITY_HEADERS})


@router.get("/login", response_model=str, response_class=HTMLResponse)
async def login_form() -> Response:
    """The status page's sign-in form (public). It POSTs the token to ``/login``."""
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; " \
          "frame-ancestors 'none'"
    return HTMLResponse(LOGIN, headers={"Content-Security-Policy": csp, **SECURITY_HEADERS})


LOGIN_BODY = {"content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "required": ["token"],
    "properties": {"token": {"type": "string", "minLength": 1, "maxLength": 4096}}}}},
    "required": True}


@router.post("/login", status_code=303, response_class=Response,
             openapi_extra={"requestBody": LOGIN_BODY},
             responses={303: {"description": "Signed in: sets the page's session cookie and "
                                             "redirects to the page"},
                        **error_responses(401, 413, 422, json_route=False)})
async def login(request: Request, settings: Settings = Depends(get_settings)) -> Response:
    """Sign in to the status page with the bearer token (a form field, never a URL)."""
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [None])[0]
    if settings.token is not None and not token_matches(token, settings.token):
        raise AuthError("wrong token")
    resp = RedirectResponse("./", status_code=303)
    if settings.token is not None:
        resp.set_cookie(COOKIE, request.app.state.page_sessions.new(), httponly=True,
                        samesite="strict", path="/",
                        max_age=int(request.app.state.page_sessions.ttl_s))
    return resp


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    """The page's icon, public like ``/healthz`` (it says nothing about the fleet). Browsers ask
    for it on any document, the JSON 401 included; a 404 there is a console error."""
    return Response(ICON, media_type="image/svg+xml",
                    headers={"Cache-Control": "public, max-age=86400"})


ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
        b'<rect width="16" height="16" rx="3" fill="#0969da"/>'
        b'<path d="M3 5l2 7 3-5 3 5 2-7" fill="none" stroke="#fff" stroke-width="1.6"/></svg>')


LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>weightsync: sign in</title>
<link rel="icon" href="favicon.ico" type="image/svg+xml">
<style>body{font:14px/1.4 system-ui,sans-serif;margin:2rem}input{margin:.3rem 0}</style>
</head><body><h1>weightsync</h1>
<form method="post" action="login"><label>Token<br>
<input type="password" name="token" id="token" autocomplete="current-password" required>
</label><br><button type="submit" id="signin">Sign in</button></form></body></html>
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>weightsync</title>
<link rel="icon" href="favicon.ico" type="image/svg+xml">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#1b1f24;background:#fafbfc}
h1{font-size:1.4rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.muted{color:#57606a}table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d0d7de;padding:.35rem .7rem;text-align:left}
th{background:#f0f3f6}td.name,td.version{white-space:nowrap}td.version{font-weight:600;text-align:right}
.state{border-radius:1rem;padding:.05rem .6rem;font-size:.85rem}
.serving{background:#dafbe1}.fenced,.stopped{background:#ffebe9}
.paused,.asleep,.loading,.weights_awake,.starting{background:#fff8c5}
#legend span{display:inline-block;margin-right:1rem}
#legend i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}
</style></head><body>
<h1>weightsync</h1>
<p class="muted" id="summary">loading...</p>
<table id="engines"><thead><tr><th>engine</th><th>state</th><th>version</th><th>device</th>
<th>model</th><th>last sync</th><th>note</th></tr></thead><tbody></tbody></table>
<h2>Recent sync phase durations</h2>
<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="760" height="40" role="img"
 aria-label="recent sync phase durations"></svg>
<div id="legend"></div>
<script id="initial" type="application/json">__DATA__</script>
<script nonce="__NONCE__">
"use strict";
const COLORS = {pause:"#8250df", sleep:"#bf8700", wake_weights:"#d4a72c", transfer:"#0969da",
  reload:"#1a7f37", reset_caches:"#57606a", fingerprint:"#cf222e", wake_kv:"#bc4c00",
  resume:"#1b7c83"};
const SVG = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function ms(s) { return (s * 1000).toFixed(s < 0.1 ? 1 : 0) + " ms"; }
function sum(o) { return Object.entries(o).filter(([k]) => k !== "total")
  .reduce((a, [, v]) => a + v, 0); }
function renderTable(status) {
  const body = document.querySelector("#engines tbody");
  body.replaceChildren();
  for (const e of status.engines) {
    const tr = el("tr", {"data-engine": e.name});
    tr.append(el("td", {class: "name"}, e.name));
    const st = el("td", {}); st.append(el("span", {class: "state " + e.state}, e.state));
    tr.append(st, el("td", {class: "version"}, String(e.version)), el("td", {}, e.device),
      el("td", {class: "muted"}, e.model),
      el("td", {}, Object.keys(e.last_sync).length
        ? ms(e.last_sync.total ?? sum(e.last_sync)) : "-"),
      el("td", {class: "muted"}, e.fenced_reason || (e.sleep_supported ? "" : "no sleep mode")));
    body.append(tr);
  }
  const busy = status.busy ? " - a sync is running" : "";
  document.getElementById("summary").textContent =
    `${status.engines.length} engine(s), fleet version ${status.version}${busy}`;
}
function renderChart(status) {
  let rows = status.recent.slice(-12).map(r => ({label: `v${r.version} ${r.mode}` +
    (r.ok ? "" : " (failed)"), seconds: r.seconds}));
  if (!rows.length) rows = status.engines.filter(e => Object.keys(e.last_sync).length)
    .map(e => ({label: `${e.name} last`, seconds: e.last_sync}));
  const chart = document.getElementById("chart"), legend = document.getElementById("legend");
  chart.replaceChildren(); legend.replaceChildren();
  if (!rows.length) { chart.setAttribute("height", 24);
    chart.append(svg("text", {x: 0, y: 16, fill: "#57606a"}, "no syncs yet")); return; }
  const left = 150, width = 520, h = 20, gap = 6;
  const max = Math.max(...rows.map(r => sum(r.seconds)), 1e-6);
  chart.setAttribute("height", rows.length * (h + gap));
  const used = new Set();
  rows.forEach((r, i) => {
    const y = i * (h + gap);
    chart.append(svg("text", {x: 0, y: y + 14, "font-size": 12}, r.label));
    let x = left;
    for (const [phase, s] of Object.entries(r.seconds)) {
      if (phase === "total" || s <= 0) continue;
      const w = Math.max(1, s / max * width);
      const rect = svg("rect", {x, y, width: w, height: h, fill: COLORS[phase] || "#8c959f"});
      rect.append(svg("title", {}, `${phase}: ${ms(s)}`));
      chart.append(rect); x += w; used.add(phase);
    }
    chart.append(svg("text", {x: x + 6, y: y + 14, "font-size": 12}, ms(sum(r.seconds))));
  });
  for (const p of used) {
    const item = el("span"); const sw = el("i"); sw.style.background = COLORS[p] || "#8c959f";
    item.append(sw, document.createTextNode(p)); legend.append(item);
  }
}
function render(status) { renderTable(status); renderChart(status); }
render(JSON.parse(document.getElementById("initial").textContent));
setInterval(async () => {
  try {
    const r = await fetch("status", {credentials: "same-origin", cache: "no-store"});
    if (r.ok) render(await r.json());
  } catch (e) { /* the service restarts; the next tick retries */ }
}, 2000);
</script></body></html>
"""
