// inferd's console: live status from /stats, /stats/recent and /ready, a
// chat playground on /v1/chat/completions, and the usage table from
// /v1/usage. No libraries, no requests to anywhere but this server.
"use strict";

const POLL_MS = 2000;
// Seconds of /stats samples the live tokens-per-second figure spans.
const RATE_WINDOW_S = 30;

const $ = (id) => document.getElementById(id);
const state = {
  key: "",
  // Unknown until /stats answers; the first answer loads the usage table.
  keyRequired: null,
  models: [],
  messages: [],
  busy: null,
  rates: [], // [seconds, generated_tokens] samples for the live rate
};

const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");
const fmtMs = (v) => (v == null ? "–" : v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : Math.round(v).toLocaleString("en-US"));

function authHeaders(json) {
  const h = {};
  if (json) {
    h["content-type"] = "application/json";
    // The playground's usage is metered under its own feature tag.
    h["x-inferd-feature"] = "console";
  }
  if (state.key) h.authorization = "Bearer " + state.key;
  return h;
}

async function getJson(path, withKey) {
  const r = await fetch(path, { headers: withKey ? authHeaders(false) : {}, cache: "no-store" });
  let body = null;
  try {
    body = await r.json();
  } catch (_) {
    body = null;
  }
  return { ok: r.ok, status: r.status, body };
}

function errorText(res) {
  const e = res.body && res.body.error;
  return e && e.message ? `${res.status}: ${e.message}` : `HTTP ${res.status}`;
}

// ---- status ----------------------------------------------------------

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function renderReady(ready) {
  const el = $("ready");
  const status = ready ? ready.status : "unreachable";
  const kind = status === "ready" ? "ready" : status === "loading" || status === "draining" ? status : "down";
  el.dataset.state = kind;
  setText("ready", status === "ready" ? "ready" : `not ready: ${status}`);
  // Models that are not serving, with why: loading (and how far), failed.
  const notes = ((ready && ready.models) || [])
    .filter((m) => m.status !== "ready")
    .map((m) => `${m.name}: ${m.status}${m.reason ? ` (${m.reason})` : ""}${progressText(m.progress)}`);
  const detail = $("ready-detail");
  setText("ready-detail", notes.join(" · "));
  detail.hidden = notes.length === 0;
  if (ready && ready.ledger) {
    setText("stat-ledger", ready.ledger);
    setText("stat-ledger-sub", `${fmtInt(ready.ledger_pending)} records waiting`);
  }
}

function progressText(p) {
  if (!p || !p.stage) return "";
  const bytes = p.file_bytes_total ? `, ${((p.file_bytes_done / p.file_bytes_total) * 100).toFixed(0)} % of ${p.file || "a file"}` : "";
  return ` (${p.stage}${p.files_total ? `, file ${p.files_done + 1} of ${p.files_total}` : ""}${bytes})`;
}

function renderStats(stats) {
  for (const el of document.querySelectorAll("[data-key]")) {
    const text = fmtInt(stats[el.dataset.key]);
    if (el.textContent !== text) el.textContent = text;
  }
  const names = Object.keys(stats.models || {});
  setText("model", names.join(", ") || "no model");
  const b = stats.backend || {};
  setText("backend", `${b.device || "?"} · ${b.compute_dtype || "?"} · KV ${b.kv_cache_dtype || "?"}`);
  const total = stats.kv_blocks_total || 0;
  const share = total ? stats.kv_blocks_used / total : 0;
  setText("stat-kv", `${(share * 100).toFixed(1)} %`);
  $("stat-kv-bar").style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
  const q = stats.prefix_cache_query_tokens || 0;
  setText("stat-prefix", q ? `${((stats.prefix_cache_hit_tokens / q) * 100).toFixed(1)} %` : "–");
  const cost = stats.cost_per_million_tokens;
  setText("stat-cost", typeof cost === "number" ? `$${cost.toFixed(cost < 1 ? 4 : 2)}` : "–");
  setText("stat-cost-sub", typeof cost === "number" ? "at the measured throughput" : "set --instance-hourly-cost");

  const now = performance.now() / 1000;
  state.rates.push([now, stats.generated_tokens || 0]);
  while (state.rates.length > 2 && now - state.rates[0][0] > RATE_WINDOW_S) state.rates.shift();
  const [t0, n0] = state.rates[0];
  setText("stat-tps", now - t0 >= 1 ? ((stats.generated_tokens - n0) / (now - t0)).toFixed(1) : "–");

  if (stats.api_key_required !== state.keyRequired) {
    state.keyRequired = !!stats.api_key_required;
    $("auth").hidden = !state.keyRequired;
    loadUsage();
  }
  if (names.join() !== state.models.join()) {
    state.models = names;
    const sel = $("pg-model");
    sel.replaceChildren(...names.map((n) => new Option(n, n)));
  }
}

const SVG = "http://www.w3.org/2000/svg";
const W = 300;
const H = 90;

// A small line chart of `series` ([{cls, values}]) over the slots; null
// values break the line.
function drawChart(id, series) {
  const svg = $(id);
  const all = series.flatMap((s) => s.values).filter((v) => v != null);
  const max = niceMax(all.length ? Math.max(...all) : 0);
  const nodes = [];
  for (const frac of [0.5, 1]) {
    const line = document.createElementNS(SVG, "line");
    const y = H - frac * (H - 4);
    for (const [k, v] of [["x1", 0], ["x2", W], ["y1", y], ["y2", y]]) line.setAttribute(k, v);
    line.setAttribute("class", "gridline");
    nodes.push(line);
  }
  for (const s of series) {
    const n = s.values.length;
    let points = [];
    const flush = () => {
      if (points.length) {
        const pl = document.createElementNS(SVG, "polyline");
        pl.setAttribute("class", s.cls);
        // A lone point still shows: a short flat segment ending at it.
        if (points.length === 1) {
          const [x, y] = points[0].split(",").map(Number);
          points.unshift(`${(x >= 4 ? x - 4 : x + 4).toFixed(1)},${y.toFixed(1)}`);
        }
        pl.setAttribute("points", points.join(" "));
        nodes.push(pl);
      }
      points = [];
    };
    s.values.forEach((v, i) => {
      if (v == null) return flush();
      const x = n > 1 ? (i / (n - 1)) * W : 0;
      const y = max > 0 ? H - (v / max) * (H - 4) : H;
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    flush();
  }
  svg.replaceChildren(...nodes);
  return max;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function windowText(p) {
  return p.count ? `last 5 min: p50 ${fmtMs(p.p50_ms)} · p90 ${fmtMs(p.p90_ms)} · p99 ${fmtMs(p.p99_ms)} ms (${fmtInt(p.count)})` : "no samples in the last 5 min";
}

function renderRecent(recent) {
  const slots = recent.slots || [];
  for (const name of ["ttft", "itl"]) {
    const max = drawChart(`chart-${name}`, [
      { cls: "p50", values: slots.map((s) => s[name].p50_ms) },
      { cls: "p99", values: slots.map((s) => s[name].p99_ms) },
    ]);
    setText(`chart-${name}-max`, `max ${fmtMs(max)} ms`);
    setText(`${name}-window`, windowText(recent.window[name]));
  }
  const max = drawChart("chart-tps", [{ cls: "p50", values: slots.map((s) => s.tokens_per_second) }]);
  setText("chart-tps-max", `max ${fmtMs(max)}`);

  const body = $("rejections").tBodies[0];
  const rows = Object.entries(recent.window.rejections || {}).sort((a, b) => b[1] - a[1]);
  const cells = rows.length ? rows.map(([reason, n]) => tableRow([reason, fmtInt(n)], [false, true])) : [tableRow(["none"], [false])];
  body.replaceChildren(...cells);
  const total = Object.values(recent.rejections_total || {}).reduce((a, b) => a + b, 0);
  setText("rejections-total", `${fmtInt(total)} since start`);
}

function tableRow(values, numeric) {
  const tr = document.createElement("tr");
  values.forEach((v, i) => {
    const td = document.createElement("td");
    td.textContent = v;
    if (numeric[i]) td.className = "num";
    tr.append(td);
  });
  return tr;
}

async function poll() {
  try {
    const [stats, recent, ready] = await Promise.all([getJson("/stats"), getJson("/stats/recent"), getJson("/ready")]);
    renderReady(ready.body);
    if (stats.ok && stats.body) renderStats(stats.body);
    if (recent.ok && recent.body) renderRecent(recent.body);
    setText("updated", `updated ${new Date().toLocaleTimeString()}`);
  } catch (_) {
    renderReady(null);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// ---- playground ------------------------------------------------------

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  const node = document.createTextNode(text);
  body.append(node);
  div.append(who, body);
  $("pg-log").append(div);
  return { div, node };
}

function showError(text) {
  const el = $("pg-error");
  el.textContent = text;
  el.hidden = !text;
}

function numberField(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

// Reads an SSE body, calling `onEvent` with each JSON data payload.
async function readSse(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  const text = $("pg-input").value.trim();
  if (!text || state.busy) return;
  showError("");
  const system = $("pg-system").value.trim();
  const stream = $("pg-stream").checked;
  const history = [...state.messages, { role: "user", content: text }];
  const body = {
    model: $("pg-model").value || undefined,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    temperature: numberField("pg-temperature"),
    top_p: numberField("pg-top-p"),
    max_tokens: numberField("pg-max-tokens"),
    seed: numberField("pg-seed"),
    stream,
  };
  if (stream) body.stream_options = { include_usage: true };

  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.div.dataset.state = "streaming";
  $("pg-input").value = "";
  const ctl = new AbortController();
  state.busy = ctl;
  $("pg-send").disabled = true;
  $("pg-stop").disabled = false;
  const t0 = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  let requestId = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders(true),
      body: JSON.stringify(body),
      signal: ctl.signal,
    });
    requestId = r.headers.get("x-request-id");
    if (!r.ok) {
      let parsed = null;
      try {
        parsed = await r.json();
      } catch (_) {
        parsed = null;
      }
      throw new Error(errorText({ status: r.status, body: parsed }));
    }
    if (stream) {
      await readSse(r, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message || "the stream ended with an error");
        const choice = (chunk.choices || [])[0];
        const delta = choice && choice.delta && choice.delta.content;
        if (delta) {
          if (first == null) first = performance.now();
          answer.node.data += delta;
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (chunk.usage) usage = chunk.usage;
      });
    } else {
      const j = await r.json();
      first = performance.now();
      answer.node.data = (j.choices[0].message && j.choices[0].message.content) || "";
      finish = j.choices[0].finish_reason;
      usage = j.usage;
    }
    state.messages = [...history, { role: "assistant", content: answer.node.data }];
    answer.div.dataset.state = "done";
  } catch (e) {
    answer.div.dataset.state = "failed";
    showError(e.name === "AbortError" ? "Stopped." : String(e.message || e));
  } finally {
    state.busy = null;
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
    answer.div.append(meta(t0, first, usage, finish, requestId));
    if (answer.div.dataset.state === "done") loadUsage();
  }
}

function meta(t0, first, usage, finish, requestId) {
  const end = performance.now();
  const div = document.createElement("div");
  div.className = "meta";
  const parts = [];
  if (usage) {
    const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    parts.push(`${usage.prompt_tokens} prompt (${cached} cached) + ${usage.completion_tokens} completion tokens`);
  }
  if (first != null) parts.push(`first token ${fmtMs(first - t0)} ms`);
  if (usage && first != null && usage.completion_tokens > 1 && end > first) {
    parts.push(`${((usage.completion_tokens - 1) / ((end - first) / 1000)).toFixed(1)} tok/s after it`);
  }
  parts.push(`total ${((end - t0) / 1000).toFixed(2)} s`);
  if (finish) parts.push(`finish: ${finish}`);
  div.textContent = parts.join(" · ");
  div.dataset.completionTokens = usage ? usage.completion_tokens : "";
  if (requestId && usage) {
    for (const [rating, label] of [["up", "Good"], ["down", "Bad"]]) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.title = `rate this answer ${rating} (POST /v1/feedback)`;
      b.addEventListener("click", () => rate(requestId, rating, div));
      div.append(b);
    }
  }
  return div;
}

async function rate(requestId, rating, div) {
  const r = await fetch("/v1/feedback", {
    method: "POST",
    headers: authHeaders(true),
    body: JSON.stringify({ request_id: requestId, rating }),
  });
  for (const b of div.querySelectorAll("button")) b.disabled = true;
  div.append(document.createTextNode(r.ok ? ` rated ${rating}` : ` rating failed (${r.status})`));
  if (r.ok) loadUsage();
}

// ---- usage -----------------------------------------------------------

async function loadUsage() {
  const tbody = $("usage-table").tBodies[0];
  if (state.keyRequired && !state.key) {
    setText("usage-scope", "Enter an API key above to see usage (an admin key shows every tenant).");
    tbody.replaceChildren();
    return;
  }
  const res = await getJson("/v1/usage?group_by=tenant,model,feature", true);
  if (!res.ok) {
    setText("usage-scope", `Usage unavailable: ${errorText(res)}`);
    tbody.replaceChildren();
    return;
  }
  const u = res.body;
  setText("usage-scope", u.tenant == null ? "All tenants." : `Tenant ${u.tenant} only: an admin key shows every tenant.`);
  const rows = u.data.map((d) =>
    tableRow(
      [d.tenant, d.model, d.feature, fmtInt(d.requests), fmtInt(d.prompt_tokens), fmtInt(d.completion_tokens), d.cost_usd.toFixed(6), fmtInt(d.thumbs_up), fmtInt(d.thumbs_down)],
      [false, false, false, true, true, true, true, true, true],
    ),
  );
  tbody.replaceChildren(...rows);
}

// ---- wiring ----------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("pg-form").addEventListener("submit", send);
  $("pg-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("pg-form").requestSubmit();
  });
  $("pg-stop").addEventListener("click", () => state.busy && state.busy.abort());
  $("pg-clear").addEventListener("click", () => {
    state.messages = [];
    $("pg-log").replaceChildren();
    showError("");
  });
  $("api-key").addEventListener("change", (e) => {
    state.key = e.target.value.trim();
    loadUsage();
  });
  $("usage-refresh").addEventListener("click", loadUsage);
  poll();
});
