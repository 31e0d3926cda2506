"""The status page at ``/``: engines, states, versions, and recent sync phase durations.

One self-contained HTML document (inline CSS, JS and SVG; no CDN: engines often live on
machines without internet). The current status is embedded as JSON so the page renders without
a round trip, then refreshes from ``/status`` every 2 s with the page's cookie.

Auth: with a token configured, open ``/?token=<token>`` once; the service sets an HttpOnly,
SameSite=Strict cookie and redirects to ``/`` (the token leaves the address bar and history).
The cookie is accepted by read-only GET routes only (see ``weightsync.api.deps``).
"""

from __future__ import annotations

import json
import secrets

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from weightsync.api.deps import (COOKIE, bearer_scheme, get_fleet, get_settings, require_reader,
                                 token_matches)
from weightsync.api.errors import AuthError
from weightsync.api.fleet import Fleet
from weightsync.api.routes.common import PAGE_ERRORS
from weightsync.api.schemas import FleetStatus
from weightsync.config import Settings

router = APIRouter(tags=["page"])


@router.get("/", response_model=str, response_class=HTMLResponse,
            responses={303: {"description": "Token accepted: sets the page cookie, redirects"},
                       **PAGE_ERRORS})
async def status_page(request: Request,
                      token: str | None = Query(None, max_length=4096,
                                                description="Sets the page's cookie once"),
                      credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
                      settings: Settings = Depends(get_settings),
                      fleet: Fleet = Depends(get_fleet)) -> Response:
    if token is not None and settings.token is not None:
        if not token_matches(token, settings.token):
            raise AuthError("wrong token")
        resp = RedirectResponse(str(request.url.remove_query_params("token")), status_code=303)
        resp.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict", path="/")
        return resp
    require_reader(request, credentials, settings)
    status = FleetStatus(version=fleet.coordinator.version, busy=fleet.busy,
                         engines=await fleet.statuses(), recent=list(fleet.recent))
    nonce = secrets.token_urlsafe(16)
    data = (json.dumps(status.model_dump(mode="json"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    html = PAGE.replace("__NONCE__", nonce).replace("__DATA__", data)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": csp,
                                       "Cache-Control": "no-store"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    """The page's icon, public like ``/healthz`` (it says nothing about the fleet). Browsers ask
    for it on any document, the JSON 401 included; a 404 there is a console error."""
    return Response(ICON, media_type="image/svg+xml",
                    headers={"Cache-Control": "public, max-age=86400"})


ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
        b'<rect width="16" height="16" rx="3" fill="#0969da"/>'
        b'<path d="M3 5l2 7 3-5 3 5 2-7" fill="none" stroke="#fff" stroke-width="1.6"/></svg>')


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
