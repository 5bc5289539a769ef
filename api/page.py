"""The status page at ``/`` (``API_STATUS_PAGE=true``): queue per lane, workers (GPU,
VRAM, current job), the last images with their prompts, and a form that submits a
prompt and shows its progress, previews and final image live from the event stream.
Server-rendered HTML with a little inline CSS and JS; no build step.

**How the page gets a key.** The page uses the same API as every client, so it needs a
tenant's key, and a key must never be readable by another site or another machine:

* When the server is bound to a loopback address (``API_HOST=127.0.0.1``, what ``brigade
  up`` does) it makes, at start, an ephemeral key for the tenant ``local`` that lives
  only in its memory, and writes it into the page — but only for a request that came
  from a loopback peer *and* names a loopback host (``Host: 127.0.0.1:8080`` or
  ``localhost``). The second check defeats DNS rebinding (a hostile site whose name
  resolves to 127.0.0.1 sends its own name as ``Host``). Other sites cannot read the
  page (no CORS), the page is ``Cache-Control: no-store``, and every API call sends the
  key as a header, never a cookie, so there is nothing for cross-site requests to ride.
  Anyone who can open a loopback connection to this machine could use the key: on a
  shared machine, turn the page off or bind elsewhere.
* Otherwise the page renders no data at all and asks for a key, which the person
  pastes; it stays in the tab's ``sessionStorage``. The page then loads everything
  through the API, as the tenant that key belongs to (their jobs only).

A nonce-based Content-Security-Policy allows only this page's own script and style.
"""

from __future__ import annotations

import html
import json
import secrets
from typing import Any

from aiohttp import web

from api.auth import is_loopback
from api.context import ApiState, state
from api.jobs import job_view, read_queue, read_workers
from api.models import JobView, Queue, WorkerList
from api.problems import ApiProblem
from jobs.models import JobStatus

#: Last images shown.
RECENT = 8


def _trusted(request: web.Request, api: ApiState) -> bool:
    host = request.url.host or ""
    return api.local_key is not None and is_loopback(request.remote or "") and is_loopback(host)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _bytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**30:.1f} GiB"


def _queue_rows(queue: Queue | None) -> str:
    if queue is None:
        return '<tr><td colspan="4" class="muted">the broker does not answer</td></tr>'
    return "".join(
        f"<tr><td>{_e(lane.name)}</td><td>{lane.depth}</td><td>{lane.queued}</td>"
        f"<td>{lane.running}</td></tr>"
        for lane in queue.lanes
    )


def _worker_rows(workers: WorkerList) -> str:
    if not workers.workers:
        return '<tr><td colspan="5" class="muted">no renderer heard from</td></tr>'
    rows = []
    for w in workers.workers:
        used = (
            w.vram_total - w.vram_free
            if w.vram_total is not None and w.vram_free is not None
            else None
        )
        vram = f"{_bytes(used)} / {_bytes(w.vram_total)}" if w.vram_total else "–"
        rows.append(
            f"<tr><td>{_e(w.worker_id)}</td><td>{_e(w.state.value)}</td>"
            f"<td>{_e(w.device or '–')}</td><td>{_e(vram)}</td>"
            f"<td><code>{_e(w.job_id or '–')}</code></td></tr>"
        )
    return "".join(rows)


def _recent_cards(jobs: list[JobView]) -> str:
    cards = []
    for job in jobs:
        if not job.outputs:
            continue
        prompt = str(job.params.get("prompt", ""))
        cards.append(
            f'<figure><img src="{_e(job.outputs[0].url)}" alt="{_e(prompt)}" loading="lazy">'
            f"<figcaption>{_e(prompt)}</figcaption></figure>"
        )
    return "".join(cards) or '<p class="muted">no image yet</p>'


async def status_page(request: web.Request) -> web.Response:
    api = state(request)
    services = api.services
    trusted = _trusted(request, api)
    queue_html = workers_html = recent_html = '<tr><td class="muted">paste a key</td></tr>'
    if trusted:
        try:
            queue: Queue | None = await read_queue(api)
        except ApiProblem:
            queue = None
        queue_html = _queue_rows(queue)
        workers_html = _worker_rows(read_workers(api))
        records = await services.ledger.recent(
            "local", frontend="api", limit=RECENT, status=JobStatus.SUCCEEDED
        )
        recent_html = _recent_cards([await job_view(api, r) for r in records])
    else:
        recent_html = '<p class="muted">paste a key to see your images</p>'
    options = "".join(
        f'<option value="{_e(t.name)}"{" selected" if t.name == "demo" else ""}>'
        f"{_e(t.name)} — {_e(t.manifest.title)}</option>"
        for t in sorted(services.catalog, key=lambda t: t.name)
    )
    boot: dict[str, Any] = {"key": api.local_key if trusted else None}
    nonce = secrets.token_urlsafe(16)
    body = (
        _PAGE.replace("{{nonce}}", nonce)
        .replace("{{options}}", options)
        .replace("{{queue}}", queue_html)
        .replace("{{workers}}", workers_html)
        .replace("{{recent}}", recent_html)
        .replace("{{boot}}", json.dumps(boot).replace("<", "\\u003c"))
        .replace("{{keybox}}", "" if trusted else _KEYBOX)
    )
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "img-src 'self' data: http: https:; connect-src 'self'; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return web.Response(
        text=body,
        content_type="text/html",
        headers={
            "Content-Security-Policy": csp,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
        },
    )


_KEYBOX = """
<section class="card" id="keybox">
  <h2>API key</h2>
  <form id="keyform"><input id="key" type="password" autocomplete="off"
    placeholder="brg_…" aria-label="API key"><button>Use this key</button></form>
  <p class="muted">Kept in this tab only (sessionStorage).</p>
</section>"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Brigade · status</title>
<style nonce="{{nonce}}">
:root { --bg:#101418; --card:#182028; --line:#2a3440; --fg:#e8edf2; --mute:#8a99a8;
  --accent:#f0a040; font: 15px/1.45 system-ui, sans-serif; color-scheme: dark; }
body { margin:0; background:var(--bg); color:var(--fg); }
header { padding:14px 24px; border-bottom:1px solid var(--line); display:flex; gap:12px;
  align-items:baseline; }
header h1 { margin:0; font-size:20px; } header span { color:var(--mute); }
main { display:grid; grid-template-columns: minmax(320px, 1fr) minmax(320px, 1fr);
  gap:16px; padding:16px 24px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px;
  padding:14px 16px; }
.wide { grid-column: 1 / -1; }
h2 { margin:0 0 10px; font-size:15px; text-transform:uppercase; letter-spacing:.06em;
  color:var(--mute); }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:5px 6px; border-bottom:1px solid var(--line); }
th { color:var(--mute); font-weight:500; }
code { font-size:12px; color:var(--mute); }
textarea, input, select, button { font:inherit; color:var(--fg); background:var(--bg);
  border:1px solid var(--line); border-radius:6px; padding:7px 9px; }
textarea { width:100%; box-sizing:border-box; min-height:64px; resize:vertical; }
form { display:flex; flex-wrap:wrap; gap:8px; align-items:center; }
button { background:var(--accent); color:#1a1a1a; border:none; font-weight:600;
  cursor:pointer; }
progress { width:100%; height:10px; accent-color:var(--accent); }
.muted { color:var(--mute); }
.live { display:flex; gap:12px; margin-top:10px; flex-wrap:wrap; }
.live figure { margin:0; } .live img { width:256px; height:256px; object-fit:contain;
  background:#0b0e11; border:1px solid var(--line); border-radius:6px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(150px, 1fr)); gap:10px; }
.grid figure { margin:0; } .grid img { width:100%; aspect-ratio:1; object-fit:cover;
  border-radius:6px; background:#0b0e11; }
figcaption { font-size:12px; color:var(--mute); overflow:hidden; text-overflow:ellipsis;
  white-space:nowrap; }
#status.error { color:#ff7a6a; }
</style></head>
<body>
<header><h1>Brigade</h1><span>queue · workers · images</span></header>
<main>
{{keybox}}
<section class="card wide" id="imagine">
  <h2>Imagine</h2>
  <form id="submit">
    <textarea id="prompt" name="prompt" required maxlength="1500"
      placeholder="a lighthouse at dusk, oil painting"></textarea>
    <select id="workflow" name="workflow" aria-label="workflow">{{options}}</select>
    <label>steps <input id="steps" type="number" min="1" max="50" value="20"></label>
    <label>size <input id="size" type="number" min="64" max="1024" step="8" value="512"></label>
    <button id="go">Render</button>
  </form>
  <p id="status" class="muted">ready</p>
  <progress id="bar" max="1" value="0"></progress>
  <div class="live">
    <figure><img id="preview" alt="preview" data-count="0">
      <figcaption>preview</figcaption></figure>
    <figure><img id="final" alt="final image">
      <figcaption id="final-caption">final</figcaption></figure>
  </div>
</section>
<section class="card"><h2>Queue</h2><table>
  <thead><tr><th>lane</th><th>ready</th><th>queued</th><th>running</th></tr></thead>
  <tbody id="queue">{{queue}}</tbody></table></section>
<section class="card"><h2>Workers</h2><table>
  <thead><tr><th>worker</th><th>state</th><th>GPU</th><th>VRAM</th><th>job</th></tr></thead>
  <tbody id="workers">{{workers}}</tbody></table></section>
<section class="card wide"><h2>Last images</h2>
  <div class="grid" id="recent">{{recent}}</div></section>
</main>
<script id="boot" type="application/json" nonce="{{nonce}}">{{boot}}</script>
<script nonce="{{nonce}}">
"use strict";
const boot = JSON.parse(document.getElementById("boot").textContent);
let key = boot.key || sessionStorage.getItem("brigade-key") || "";
const $ = (id) => document.getElementById(id);
const status = (text, error) => { $("status").textContent = text;
  $("status").className = error ? "error" : "muted"; };

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + key }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok && response.status !== 202) {
    let detail = response.statusText;
    try { const p = await response.json(); detail = p.detail || p.title; } catch (e) {}
    throw new Error(response.status + ": " + detail);
  }
  return response;
}

function cell(row, text, code) {
  const td = row.insertCell(); const node = code ? document.createElement("code") : td;
  node.textContent = text; if (code) td.appendChild(node);
}
const gib = (n) => n == null ? "–" : (n / 2 ** 30).toFixed(1) + " GiB";

async function refresh() {
  if (!key) return;
  try {
    const [queue, workers, recent] = await Promise.all([
      api("/v1/queue").then((r) => r.json()),
      api("/v1/workers").then((r) => r.json()),
      api("/v1/jobs?status=succeeded&limit=8").then((r) => r.json()),
    ]);
    const q = $("queue"); q.textContent = "";
    for (const lane of queue.lanes) { const row = q.insertRow();
      for (const v of [lane.name, lane.depth, lane.queued, lane.running]) cell(row, v); }
    const w = $("workers"); w.textContent = "";
    for (const x of workers.workers) { const row = w.insertRow();
      const used = x.vram_total != null && x.vram_free != null ? x.vram_total - x.vram_free : null;
      cell(row, x.worker_id); cell(row, x.state); cell(row, x.device || "–");
      cell(row, x.vram_total ? gib(used) + " / " + gib(x.vram_total) : "–");
      cell(row, x.job_id || "–", true); }
    if (!workers.workers.length) { const row = w.insertRow(); cell(row, "no renderer heard from"); }
    const g = $("recent"); g.textContent = "";
    for (const job of recent.jobs) { if (!job.outputs.length) continue;
      const fig = document.createElement("figure"); const img = document.createElement("img");
      img.src = job.outputs[0].url; img.alt = job.params.prompt || ""; img.loading = "lazy";
      const cap = document.createElement("figcaption"); cap.textContent = job.params.prompt || "";
      fig.append(img, cap); g.appendChild(fig); }
    if (!recent.jobs.length) g.textContent = "no image yet";
  } catch (error) { status("refresh failed: " + error.message, true); }
}

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function follow(eventsUrl) {
  const response = await api(eventsUrl, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.getReader(); const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      let type = "message", data = "";
      for (const line of block.split("\\n")) {
        if (line.startsWith("event: ")) type = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) show(type, JSON.parse(data));
    }
  }
}

function show(type, data) {
  if (type === "state") status("job " + data.job_id.slice(0, 8) + " · " + data.status +
    (data.position ? " · #" + data.position + " in " + data.lane : ""));
  else if (type === "position") status("waiting · #" + data.position + " in the queue");
  else if (type === "accepted") status("rendering on " + data.worker_id);
  else if (type === "progress") { $("bar").max = data.total; $("bar").value = data.step;
    status("step " + data.step + " / " + data.total); }
  else if (type === "preview") { const p = $("preview"); p.src = data.image;
    p.dataset.count = String(Number(p.dataset.count) + 1); }
  else if (type === "succeeded") { $("bar").value = $("bar").max;
    $("final").src = data.outputs[0].url;
    $("final-caption").textContent = "final · seed " + data.seed;
    status("done in " + Object.values(data.timings).reduce((a, b) => a + b, 0).toFixed(1) + " s");
    refresh(); }
  else if (type === "failed") status("failed: " + data.message, true);
}

$("submit").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!key) { status("paste an API key first", true); return; }
  const size = Number($("size").value);
  const body = { workflow: $("workflow").value, prompt: $("prompt").value,
    steps: Number($("steps").value), width: size, height: size };
  $("preview").removeAttribute("src"); $("preview").dataset.count = "0";
  $("final").removeAttribute("src"); $("bar").value = 0;
  try {
    const response = await api("/v1/jobs", { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "Idempotency-Key": uuid() } });
    const ticket = await response.json();
    status("queued · " + ticket.job_id.slice(0, 8));
    await follow(ticket.events_url);
  } catch (error) { status(error.message, true); }
});

const keyform = $("keyform");
if (keyform) keyform.addEventListener("submit", (event) => {
  event.preventDefault(); key = $("key").value.trim();
  sessionStorage.setItem("brigade-key", key); refresh();
});
refresh(); setInterval(refresh, 5000);
</script>
</body></html>
"""
