// Berth Studio: the Deployments and Secrets pages. Talks only to /api/v1 on
// this origin; the API key lives in this tab's sessionStorage and travels
// only in the X-API-KEY header of those calls. Secret values are write-only:
// the page sends them once and never reads one back (the API has no way to).
//
// Live: the project's changes (pointer moves, environments, bindings) come
// as server-sent events from GET /api/v1/watch (read with fetch, which can
// send the key header EventSource cannot); each change re-reads the page at
// once. A cut stream is reconnected with backoff and resumed from the last
// revision seen (Last-Event-ID), so nothing is missed. What the registry's
// watch does not carry — replica states, the scheduler's status and request
// figures — is re-read every STATUS_POLL_MS.
"use strict";

const KEY_SLOT = "berth.apiKey";
const STATUS_POLL_MS = 10000;
const TOAST_MS = 8000;
const WATCH_BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];
const WATCH_MAX_FAILURES = 200;  // in a row, about 25 minutes: then polling alone
const CHART_MINUTES = 15;
const VIEWS = ["deployments", "secrets"];
const state = {
  environments: [], selected: null, deployments: [], timer: null, busy: false, again: false, refreshTimer: null,
  view: "deployments", toastTimer: null,
  watch: { active: false, controller: null, lastId: "", generation: 0 },
};
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = { "X-API-KEY": sessionStorage.getItem(KEY_SLOT) || "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`/api/v1${path}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
  });
  const text = await response.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch { data = {}; }
  if (!response.ok) {
    const err = data.error || {};
    throw new ApiError(response.status, err.code || String(response.status), err.message || response.statusText);
  }
  return data;
}

// Every page of a list endpoint (they page at 100 by default): ``field`` of
// each answer, following next_page_token; bounded in pages.
async function listAll(path, field) {
  const items = [];
  let token = "";
  for (let page = 0; page < 100; page++) {
    const query = `page_size=1000${token ? `&page_token=${encodeURIComponent(token)}` : ""}`;
    const data = await api("GET", `${path}${path.includes("?") ? "&" : "?"}${query}`);
    items.push(...(data[field] || []));
    token = data.next_page_token || "";
    if (!token) break;
  }
  return items;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

const badge = (text) => el("span", { class: `badge ${text}` }, text.replaceAll("_", " "));
const short = (id) => (id || "").slice(0, 16);
function when(ts) { return ts ? `${ts.replace("T", " ").slice(0, 19)} UTC` : "–"; }
function age(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  return s < 120 ? `${s}s` : s < 7200 ? `${Math.floor(s / 60)}m` : s < 172800 ? `${Math.floor(s / 3600)}h` : `${Math.floor(s / 86400)}d`;
}
// A table in its own horizontally scrolling box (the page itself never
// scrolls sideways); on a narrow screen each row reflows into a block of
// labelled cells (studio.css). ``rows``: arrays of <td>, or {attrs, cells}.
function dataTable(attrs, headers, rows) {
  const row = (r) => {
    const { attrs: rowAttrs = {}, cells } = Array.isArray(r) ? { cells: r } : r;
    cells.forEach((cell, i) => cell.setAttribute("data-label", headers[i]));
    return el("tr", rowAttrs, cells);
  };
  return el("div", { class: "scroll" }, el("table", { ...attrs, class: `reflow ${attrs.class || ""}`.trim() },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map(row))));
}
const deploymentById = (id) => state.deployments.find((d) => d.id === id);
const imageOf = (id) => (deploymentById(id) || {}).image || "";

// A confirmation or an error, shown near the control that caused it (just
// below it when it is on screen, else at the top of the viewport): always
// visible without scrolling, whatever the length of the page.
function toast(message, { anchor = "", isError = false } = {}) {
  const t = $("toast");
  t.textContent = message;
  t.className = isError ? "bad" : "";
  t.setAttribute("role", isError ? "alert" : "status");
  t.hidden = false;
  placeToast(anchor);
  clearTimeout(state.toastTimer);
  state.toastTimer = setTimeout(() => { t.hidden = true; }, TOAST_MS);
}

function placeToast(anchorId) {
  const t = $("toast");
  const margin = 8;
  const a = anchorId ? document.getElementById(anchorId) : null;
  const r = a ? a.getBoundingClientRect() : null;
  const onScreen = r && r.height > 0 && r.bottom > 0 && r.top < window.innerHeight;
  const width = t.offsetWidth;
  const height = t.offsetHeight;
  let top = onScreen ? r.bottom + margin : margin;
  top = Math.max(margin, Math.min(top, window.innerHeight - height - margin));
  let left = onScreen ? r.left : (window.innerWidth - width) / 2;
  left = Math.max(margin, Math.min(left, window.innerWidth - width - margin));
  t.style.top = `${Math.round(top)}px`;
  t.style.left = `${Math.round(left)}px`;
}

// ---------------------------------------------------------------- session

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  $("sign-in-error").textContent = "";
  sessionStorage.setItem(KEY_SLOT, key);
  try {
    await loadEnvironments();
  } catch (e) {
    sessionStorage.removeItem(KEY_SLOT);
    $("sign-in-error").textContent = e.status === 401 ? "That key is not valid (mistyped or revoked)." : e.message;
    return;
  }
  $("api-key").value = "";
  showApp();
}

function signOut() {
  sessionStorage.removeItem(KEY_SLOT);
  clearInterval(state.timer);
  stopWatch();
  stopLogs();
  state.selected = null;
  $("deployments").hidden = true;
  $("session").hidden = true;
  $("sign-in").hidden = false;
  $("api-key").focus();
}

function showApp() {
  $("sign-in").hidden = true;
  $("deployments").hidden = false;
  $("session").hidden = false;
  if (!state.selected && state.environments.length) state.selected = state.environments[0].id;
  renderViews();
  renderTabs();
  refresh();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, STATUS_POLL_MS);
  startWatch();
}

// ---------------------------------------------------------------- live updates

function setLive(status, detail = {}) {
  const badgeEl = $("live-status");
  badgeEl.dataset.state = status;
  if (detail.resumed !== undefined) badgeEl.dataset.resumed = String(detail.resumed);
  if (state.watch.lastId) badgeEl.dataset.revision = state.watch.lastId;
  badgeEl.textContent = { live: "● live", connecting: "connecting…", reconnecting: "reconnecting…", polling: "polling" }[status] || status;
  badgeEl.title = status === "live" ? "Changes appear as they happen" : "Not connected to the live feed; the page still refreshes every few seconds";
}

function startWatch() {
  stopWatch();
  const watch = state.watch;
  watch.active = true;
  watch.generation += 1;
  watchLoop(watch.generation);
}

function stopWatch() {
  const watch = state.watch;
  watch.active = false;
  watch.generation += 1;
  if (watch.controller) watch.controller.abort();
  watch.controller = null;
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// One stream at a time; a stream that ends or breaks is opened again with
// Last-Event-ID (the server replays what came after it), bounded in
// consecutive failures.
async function watchLoop(generation) {
  const watch = state.watch;
  const mine = () => watch.active && watch.generation === generation;
  let failures = 0;
  while (mine() && failures < WATCH_MAX_FAILURES) {
    setLive(failures || watch.lastId ? "reconnecting" : "connecting");
    let delivered = false;
    try {
      delivered = await readWatch(mine);
    } catch (e) {
      if (e && e.status === 401) { signOut(); $("sign-in-error").textContent = "Your key stopped working; sign in again."; return; }
      // a network error, the router restarting, a refused revision: try again
    }
    if (!mine()) return;
    failures = delivered ? 0 : failures + 1;
    await sleep(WATCH_BACKOFF_MS[Math.min(failures, WATCH_BACKOFF_MS.length - 1)]);
  }
  if (mine()) setLive("polling");
}

// Reads one stream to its end; true when it delivered its snapshot marker.
async function readWatch(mine) {
  const watch = state.watch;
  const controller = new AbortController();
  watch.controller = controller;
  const headers = { "X-API-KEY": sessionStorage.getItem(KEY_SLOT) || "", Accept: "text/event-stream" };
  if (watch.lastId) headers["Last-Event-ID"] = watch.lastId;
  const response = await fetch("/api/v1/watch", {
    headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer", signal: controller.signal,
  });
  if (!response.ok) {
    if (response.status === 400) watch.lastId = "";  // a revision the registry no longer takes: start afresh
    throw new ApiError(response.status, String(response.status), response.statusText);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { name: "message", data: [], id: null };
  let delivered = false;
  let live = false;
  try {
    while (mine()) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (event.data.length || event.name !== "message") {
            if (event.id !== null) watch.lastId = event.id;
            if (event.name === "snapshot_complete") {
              let resumed = false;
              try { resumed = Boolean(JSON.parse(event.data.join("\n")).resumed); } catch { resumed = false; }
              delivered = true;
              live = true;
              setLive("live", { resumed });
              scheduleRefresh();
            } else if (live) {
              scheduleRefresh();  // a change after the snapshot: read the page again
            }
          }
          event = { name: "message", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue;  // the server's keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event.name = text;
        else if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
      }
      if (buffer.length > 1 << 20) throw new Error("watch event too large");
    }
  } finally {
    controller.abort();
  }
  return delivered;
}

function scheduleRefresh() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(refresh, 50);
}

function viewFromHash() {
  const view = location.hash.replace(/^#/, "");
  return VIEWS.includes(view) ? view : "deployments";
}

function renderViews() {
  state.view = viewFromHash();
  for (const link of $("views").querySelectorAll("a")) {
    if (link.dataset.view === state.view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  $("view-title").textContent = state.view === "secrets" ? "Secrets" : "Deployments";
  document.title = `${$("view-title").textContent} · Berth Studio`;
}

// ---------------------------------------------------------------- data

// The usual path of a build first, then the project's own environments. An
// environment is "lower" than another when its tab comes first.
const ENV_ORDER = ["preview", "staging", "production"];
const envRank = (e) => (ENV_ORDER.includes(e.name) ? ENV_ORDER.indexOf(e.name) : ENV_ORDER.length);

async function loadEnvironments() {
  const environments = await listAll("/environments", "environments");
  state.environments = [...environments].sort((a, b) => envRank(a) - envRank(b) || a.name.localeCompare(b.name));
  if (state.environments.length) $("project-label").textContent = `project ${state.environments[0].project_name || ""}`.trim();
}

async function refresh() {
  if (document.hidden) return;
  if (state.busy) { state.again = true; return; }  // read again when this one is done: a change came meanwhile
  state.busy = true;
  state.again = false;
  try {
    await loadEnvironments();
    renderTabs();
    const env = current();
    if (!env) return;
    const view = state.view;
    if (view === "secrets") {
      const secrets = await listAll(`/secrets?environment_id=${encodeURIComponent(env.id)}`, "secrets");
      if (current() && current().id === env.id && state.view === view) renderSecrets(env, secrets);
      return;
    }
    const [deployments, history, status, errors] = await Promise.all([
      listAll("/deployments", "deployments"),
      listAll(`/environments/${env.id}/promotions`, "entries"),
      env.deployment_id ? api("GET", `/deployments/${env.deployment_id}/status`) : null,
      env.deployment_id ? listAll(`/deployments/${env.deployment_id}/errors`, "errors") : null,
    ]);
    state.deployments = deployments;
    if (current() && current().id === env.id && state.view === view) renderPanel(env, history, status, errors || []);
  } catch (e) {
    if (e.status === 401) { signOut(); $("sign-in-error").textContent = "Your key stopped working; sign in again."; }
    else toast(e.message, { isError: true });
  } finally {
    state.busy = false;
    if (state.again) scheduleRefresh();
  }
}

const current = () => state.environments.find((e) => e.id === state.selected);

// ---------------------------------------------------------------- rendering

function renderTabs() {
  const tabs = $("tabs");
  const focused = document.activeElement && document.activeElement.getAttribute("role") === "tab";
  tabs.replaceChildren(...state.environments.map((env) => el("button", {
    type: "button", role: "tab", id: `tab-${env.name}`, "data-env": env.name,
    "aria-selected": String(env.id === state.selected), tabindex: env.id === state.selected ? "0" : "-1",
    "aria-controls": "panel", onclick: () => select(env.id),
  }, env.name)));
  if (focused) { const t = tabs.querySelector("[aria-selected=true]"); if (t) t.focus(); }
}

function select(envId) {
  state.selected = envId;
  renderTabs();
  $("panel").replaceChildren(el("p", { class: "empty" }, "Loading…"));
  refresh();
}

function onTabKey(event) {
  const order = state.environments.map((e) => e.id);
  const i = order.indexOf(state.selected);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: order.length - 1 }[event.key];
  if (next === undefined || !order.length) return;
  event.preventDefault();
  select(order[(next + order.length) % order.length]);
  $("tabs").querySelector("[aria-selected=true]").focus();
}

// The router serves this environment by its previous deployment because the
// current one failed (its responses carry X-Berth-Fallback: 1).
function fallbackBanner(env) {
  const f = env.fallback;
  const image = imageOf(f.deployment_id);
  return el("div", { class: "banner", id: "fallback-banner" },
    el("strong", {}, "Traffic is served by the fallback"),
    el("span", {}, `Deployment `, el("span", { class: "mono", id: "fallback-deployment" }, f.deployment_id),
      image ? ` (${image})` : "",
      ` has answered ${env.name}'s requests since `, el("span", { id: "fallback-since" }, when(f.since)),
      f.since ? ` (${age(f.since)} ago)` : "",
      `, because the current deployment ${env.deployment_id} failed. Roll back, or fix and deploy again.`));
}

function renderPanel(env, entries, status, errors) {
  const panel = $("panel");
  panel.setAttribute("aria-labelledby", `tab-${env.name}`);
  const binding = status ? status.bindings.find((b) => b.environment_id === env.id) : null;
  const nodes = [];
  if (env.fallback) nodes.push(fallbackBanner(env));
  if (!env.deployment_id) {
    nodes.push(el("p", { class: "empty" }, `Nothing deployed to ${env.name} yet.`));
  } else {
    nodes.push(el("dl", { class: "summary", id: "summary" },
      el("dt", {}, "Deployment"), el("dd", { id: "current-deployment" }, env.deployment_id),
      el("dt", {}, "Image"), el("dd", {}, status ? status.image : ""),
      el("dt", {}, "Status"), el("dd", { id: "binding-status" }, binding ? badge(binding.status) : badge(status ? status.state : "unknown")),
      el("dt", {}, "Replicas"), el("dd", { id: "bounds" }, binding ? `${binding.min_replicas}..${binding.max_replicas}` : "–"),
    ));
  }
  if (binding) nodes.push(...trafficCharts(binding.requests));
  if (env.deployment_id) nodes.push(logsPanel(env));
  const deployment = status || null;
  nodes.push(el("div", { class: "toolbar" },
    el("button", { type: "button", id: "promote-btn", onclick: () => promoteDialog(env) }, "Promote…"),
    el("button", { type: "button", id: "rollback-btn", class: "quiet", disabled: !entries.length, onclick: () => rollbackDialog(env, entries) }, "Rollback…"),
    el("button", { type: "button", id: "scale-btn", class: "quiet", disabled: !binding, onclick: () => scaleDialog(env, binding) }, "Scale…"),
    deployment && deployment.state === "terminated"
      ? el("button", { type: "button", id: "start-btn", onclick: () => lifecycle(env, "start") }, "Start")
      : el("button", { type: "button", id: "terminate-btn", class: "danger", disabled: !env.deployment_id, onclick: () => lifecycle(env, "terminate") }, "Terminate"),
  ));
  if (binding) {
    nodes.push(el("h3", {}, "Replicas"));
    nodes.push(binding.replicas.length ? dataTable({ id: "replicas" }, ["Replica", "State", "Uptime", "Restarts", "Address"],
      binding.replicas.map((r) => [
        el("td", { class: "mono" }, r.name || short(r.id)), el("td", {}, badge(r.state)),
        el("td", {}, r.state === "ready" ? age(r.started_at) : "–"), el("td", {}, r.restarts), el("td", { class: "mono" }, r.address || "–")]),
    ) : el("p", { class: "empty", id: "replicas" }, "No replicas running."));
  }
  nodes.push(el("h3", {}, "Errors"));
  nodes.push(errors.length ? dataTable({ class: "errors", id: "errors" }, ["Kind", "Environment", "Replica", "Count", "First seen", "Last seen", "Message"],
    errors.map((e) => [
      el("td", {}, badge(e.kind)), el("td", {}, e.environment), el("td", { class: "mono" }, e.replica || "–"), el("td", {}, e.count),
      el("td", { class: "nowrap" }, when(e.first_seen)), el("td", { class: "nowrap" }, when(e.last_seen)), el("td", { class: "message" }, e.message)]),
  ) : el("p", { class: "empty", id: "errors" }, "No errors."));
  nodes.push(el("h3", {}, "Promotion history"));
  nodes.push(entries.length ? dataTable({ id: "history" }, ["#", "Kind", "Deployment", "Previous", "Replicas", "Reason", "By", "When"],
    [...entries].reverse().map((h) => [
      el("td", {}, h.sequence), el("td", {}, h.kind), el("td", { class: "mono" }, h.deployment_id), el("td", { class: "mono" }, h.previous_deployment_id || "–"),
      el("td", { class: "nowrap" }, `${h.min_replicas}..${h.max_replicas}`), el("td", { class: "reason" }, h.reason || "–"),
      el("td", {}, h.actor), el("td", { class: "nowrap" }, when(h.created_at))]),
  ) : el("p", { class: "empty", id: "history" }, "No history yet."));
  panel.replaceChildren(...nodes);
}

// ---------------------------------------------------------------- logs (issue 16)
//
// A live tail of the replicas' lines of the deployment the environment points
// at: GET /api/v1/deployments/{id}/logs?follow=true (server-sent events, read
// with fetch for the key header). The panel's node outlives the page's
// refreshes (they re-append it); a new environment or deployment starts a new
// stream. At most LOG_LINES lines are kept; pausing keeps collecting (within
// that bound) without redrawing; filters by replica and by text. A cut stream
// reconnects with backoff from the time of the last line it had.
const LOG_LINES = 500;
const LOG_BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
const logs = { key: "", node: null, controller: null, lines: [], paused: false, generation: 0, status: "" };

function stopLogs() {
  logs.generation += 1;
  if (logs.controller) logs.controller.abort();
  logs.controller = null;
  logs.key = "";
  logs.node = null;
  logs.lines = [];
}

function logsPanel(env) {
  const key = `${env.id}/${env.deployment_id}`;
  if (logs.key === key && logs.node) return logs.node;
  stopLogs();
  logs.key = key;
  logs.paused = false;
  const replica = el("select", { id: "logs-replica", "aria-label": "Replica", onchange: drawLogs }, el("option", { value: "" }, "All replicas"));
  const filter = el("input", { id: "logs-filter", type: "search", placeholder: "Filter lines", "aria-label": "Filter lines", oninput: drawLogs });
  const pause = el("button", { type: "button", id: "logs-pause", class: "quiet", onclick: () => {
    logs.paused = !logs.paused;
    pause.textContent = logs.paused ? "Resume" : "Pause";
    if (!logs.paused) drawLogs();
  } }, "Pause");
  logs.node = el("section", { id: "logs", "aria-label": "Logs" },
    el("h3", {}, "Logs"),
    el("div", { class: "toolbar" }, replica, filter, pause, el("span", { id: "logs-status", class: "meta" }, "connecting")),
    el("pre", { id: "logs-lines", class: "logs", tabindex: "0" }));
  logsLoop(env.id, env.deployment_id, logs.generation);
  return logs.node;
}

function drawLogs() {
  if (!logs.node || logs.paused) return;
  const wantReplica = $("logs-replica") ? $("logs-replica").value : "";
  const wantText = ($("logs-filter") ? $("logs-filter").value : "").toLowerCase();
  const select = $("logs-replica");
  if (select) {
    const known = new Set([...select.options].map((o) => o.value));
    for (const l of logs.lines) {
      if (!known.has(l.replica_id)) {
        known.add(l.replica_id);
        select.append(el("option", { value: l.replica_id }, `${short(l.replica_id).slice(0, 12)} (#${l.replica_index})`));
      }
    }
  }
  const shown = logs.lines.filter((l) => (!wantReplica || l.replica_id === wantReplica)
    && (!wantText || l.text.toLowerCase().includes(wantText)));
  const pre = $("logs-lines");
  if (!pre) return;
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.replaceChildren(...shown.map((l) => el("div", { class: `log-line ${l.stream}` },
    el("span", { class: "log-time" }, (l.time || "").replace("T", " ").slice(0, 23)), " ",
    el("span", { class: "log-replica" }, l.replica_id.slice(0, 12)), " ",
    el("span", { class: "log-stream" }, l.stream), " ", l.text)));
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

function setLogsStatus(text) {
  logs.status = text;
  const s = $("logs-status");
  if (s) s.textContent = text;
}

async function logsLoop(envId, deploymentId, generation) {
  const mine = () => logs.generation === generation;
  let failures = 0;
  while (mine() && failures < 100) {
    let got = false;
    try {
      got = await readLogs(envId, deploymentId, mine);
    } catch (e) {
      if (!mine()) return;
      if (e && e.status && e.status < 500) { setLogsStatus(`unavailable: ${e.message}`); return; }
    }
    if (!mine()) return;
    failures = got ? 0 : failures + 1;
    setLogsStatus("reconnecting");
    await sleep(LOG_BACKOFF_MS[Math.min(failures, LOG_BACKOFF_MS.length - 1)]);
  }
}

async function readLogs(envId, deploymentId, mine) {
  const controller = new AbortController();
  logs.controller = controller;
  const last = logs.lines.length ? logs.lines[logs.lines.length - 1] : null;
  const from = last ? `since=${encodeURIComponent(last.time)}` : "tail=100";
  const response = await fetch(`/api/v1/deployments/${encodeURIComponent(deploymentId)}/logs?environment_id=${encodeURIComponent(envId)}&follow=true&${from}`, {
    headers: { "X-API-KEY": sessionStorage.getItem(KEY_SLOT) || "", Accept: "text/event-stream" },
    cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer", signal: controller.signal,
  });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message || message; } catch { /* not JSON */ }
    throw new ApiError(response.status, String(response.status), message);
  }
  setLogsStatus("live");
  const seen = new Set(logs.lines.filter((l) => last && l.time === last.time).map((l) => `${l.replica_id} ${l.stream} ${l.text}`));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let got = false;
  let timer = null;
  try {
    while (mine()) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length) {
            let entry = null;
            try { entry = JSON.parse(data.join("\n")); } catch { entry = null; }
            if (entry && !(last && entry.time === last.time && seen.has(`${entry.replica_id} ${entry.stream} ${entry.text}`))) {
              logs.lines.push(entry);
              if (logs.lines.length > LOG_LINES) logs.lines.splice(0, logs.lines.length - LOG_LINES);
              got = true;
              if (!timer) timer = setTimeout(() => { timer = null; drawLogs(); }, 100);  // a burst: one redraw
            }
          }
          data = [];
          continue;
        }
        if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (buffer.length > 1 << 20) throw new Error("log event too large");
    }
  } finally {
    controller.abort();
  }
  return got;
}

// ---------------------------------------------------------------- traffic charts

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  node.append(...children);
  return node;
}

// The binding's per-minute points over the last 15 minutes (kept by the
// scheduler, so they survive a reload), then its last minute as "now".
function trafficPoints(requests) {
  if (!requests) return [];
  const points = (requests.history || []).map((p) => ({
    t: Date.parse(p.time), rps: p.requests_per_second, errors: p.error_rate, p99: p.p99_seconds,
  }));
  const m = requests.last_minute;
  points.push({ t: Date.now(), rps: m.requests_per_second, errors: m.error_rate, p99: m.p99_seconds });
  return points;
}

const formatRate = (v) => `${v < 10 ? v.toFixed(2) : v.toFixed(0)}/s`;
const formatShare = (v) => `${(v * 100).toFixed(1)}%`;
const formatSeconds = (v) => (v >= 1 ? `${v.toFixed(2)} s` : `${(v * 1000).toFixed(v >= 0.01 ? 0 : 1)} ms`);

// A small line chart of one figure over the last CHART_MINUTES minutes.
function sparkline(id, title, points, key, format) {
  const width = 240, height = 64, pad = 5;
  const now = Date.now(), from = now - CHART_MINUTES * 60000;
  const shown = points.filter((p) => p.t >= from && Number.isFinite(p[key]));
  const top = Math.max(...shown.map((p) => p[key]), key === "errors" ? 0.01 : 1e-9);
  const x = (t) => pad + ((width - 2 * pad) * (t - from)) / (now - from);
  const y = (v) => height - pad - ((height - 2 * pad) * v) / top;
  const last = shown[shown.length - 1];
  // Stretched to the box (preserveAspectRatio none); strokes keep their
  // width and the dots (zero-length round-capped lines) stay round.
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", class: "spark", role: "img",
    "aria-label": `${title} over the last ${CHART_MINUTES} minutes, now ${last ? format(last[key]) : "none"}`,
    "data-points": shown.length },
  svg("line", { x1: pad, x2: width - pad, y1: height - pad, y2: height - pad, class: "axis" }),
  svg("polyline", { class: "line", points: shown.map((p) => `${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ") }),
  ...shown.map((p) => {
    const [cx, cy] = [x(p.t).toFixed(1), y(p[key]).toFixed(1)];
    return svg("line", { class: "dot", x1: cx, x2: cx, y1: cy, y2: cy });
  }));
  return el("figure", { class: "metric", id },
    el("figcaption", {}, el("span", {}, title), el("strong", { class: "value" }, last ? format(last[key]) : "–")), chart,
    el("div", { class: "axis-labels" }, el("span", {}, `−${CHART_MINUTES} min`), el("span", {}, `max ${format(top)}`), el("span", {}, "now")));
}

function trafficCharts(requests) {
  const heading = el("h3", {}, "Traffic");
  if (!requests) return [heading, el("p", { class: "empty", id: "traffic" }, "No requests in the last 5 minutes.")];
  const points = trafficPoints(requests);
  const five = requests.last_five_minutes;
  return [heading, el("div", { class: "traffic", id: "traffic" },
    sparkline("chart-rps", "Requests", points, "rps", formatRate),
    sparkline("chart-errors", "Errors (5xx)", points, "errors", formatShare),
    sparkline("chart-p99", "p99 latency", points, "p99", formatSeconds)),
  el("p", { class: "hint", id: "traffic-five" },
    `Last 5 minutes: ${five.requests} requests, ${formatRate(five.requests_per_second)}, errors ${formatShare(five.error_rate)}, `
    + `p50 ${formatSeconds(five.p50_seconds)}, p99 ${formatSeconds(five.p99_seconds)}.`)];
}

function renderSecrets(env, secrets) {
  const panel = $("panel");
  panel.setAttribute("aria-labelledby", `tab-${env.name}`);
  const nodes = [
    el("p", { class: "hint" }, `What ${env.name} resolves: its own secrets and the project's (an environment's secret overrides the project's of the same name). Values are write-only: they are never shown.`),
    el("div", { class: "toolbar" },
      el("button", { type: "button", id: "set-secret-btn", onclick: () => setSecretDialog(env) }, "Set secret…")),
  ];
  nodes.push(secrets.length ? dataTable({ id: "secrets" }, ["Name", "Type", "Scope", "Version", "Updated", "By", "Actions"],
    secrets.map((s) => ({ attrs: { "data-secret": s.name }, cells: [
      el("td", { class: "mono" }, s.name), el("td", {}, s.type), el("td", { class: "nowrap" }, s.scope),
      el("td", { class: "version" }, s.version), el("td", { class: "nowrap" }, when(s.updated_at)), el("td", {}, s.updated_by || "–"),
      el("td", {}, s.version > 1
        ? el("button", { type: "button", class: "quiet small", id: `secret-rollback-${s.name}`, onclick: () => rollbackSecretDialog(env, s) }, "Roll back…")
        : "–")] })),
  ) : el("p", { class: "empty", id: "secrets" }, `No secrets resolve in ${env.name}.`));
  panel.replaceChildren(...nodes);
}

// ---------------------------------------------------------------- dialogs

function openDialog({ title, body, confirmLabel = "Confirm", danger = false, anchor = "", requireTyping = () => null, blocked = () => null, onConfirm }) {
  // requireTyping() names what must be typed to confirm (a protected
  // environment), or null; blocked() says why nothing can be confirmed, or
  // null. Both are re-read whenever a control changes.
  const dialog = $("dialog");
  $("dialog-title").textContent = title;
  $("dialog-error").textContent = "";
  const hint = el("label", { for: "confirm-typing", id: "confirm-hint" });
  const typed = el("input", { id: "confirm-typing", autocomplete: "off", "aria-describedby": "confirm-hint" });
  const typing = el("div", {}, hint, typed);
  $("dialog-body").replaceChildren(...body, typing);
  const confirm = $("dialog-confirm");
  confirm.textContent = confirmLabel;
  confirm.className = danger ? "danger" : "";
  const sync = () => {
    const needed = requireTyping();
    typing.hidden = !needed;
    hint.textContent = needed ? `Type ${needed} to confirm` : "";
    confirm.disabled = Boolean(blocked()) || (Boolean(needed) && typed.value !== needed);
  };
  $("dialog-form").oninput = sync;
  $("dialog-form").onchange = sync;
  sync();
  $("dialog-form").onsubmit = async (event) => {
    event.preventDefault();
    confirm.disabled = true;
    try {
      const message = await onConfirm();
      dialog.close();
      await refresh();
      toast(message, { anchor });
    } catch (e) {
      $("dialog-error").textContent = e.message;
      sync();
    }
  };
  dialog.showModal();
  const first = dialog.querySelector("input[type=radio]:checked, select, input:not([type=hidden]):not(#confirm-typing), textarea, button[type=submit]");
  if (first) first.focus();
}

const field = (label, control, hintText = "") => el("div", {}, el("label", { for: control.id }, label), control,
  hintText ? el("p", { class: "hint", id: `${control.id}-hint` }, hintText) : "");
const numberInput = (id, value, min = 0) => el("input", { id, type: "number", min: String(min), max: "100", value: String(value), required: true });
const reasonInput = (id) => el("input", { id, autocomplete: "off", maxlength: "500", placeholder: "optional, kept in the history" });

// Bindings of the deployments environments point at (current and previous),
// by deployment id: where each runs and how it is doing.
async function bindingsOf(ids) {
  const out = new Map();
  await Promise.all([...new Set(ids.filter(Boolean))].map(async (id) => {
    try {
      out.set(id, (await api("GET", `/deployments/${id}/status`)).bindings);
    } catch (e) {
      if (e.status !== 404) throw e;
    }
  }));
  return out;
}

// ---------------------------------------------------------------- gates (issue 17)
//
// A gated environment takes a promotion only of a deployment whose latest
// run of the gate's experiment on the gate's dataset passes the threshold
// (the registry decides; this only shows it). Runs are read newest first.
const GATE_RUN_PAGES = 5;

async function latestGateRun(gate, deploymentId) {
  let token = "";
  for (let page = 0; page < GATE_RUN_PAGES; page++) {
    const query = `deployment_id=${encodeURIComponent(deploymentId)}&name=${encodeURIComponent(gate.experiment)}`
      + `&page_size=100${token ? `&page_token=${encodeURIComponent(token)}` : ""}`;
    const data = await api("GET", `/experiments/runs?${query}`);
    const run = (data.runs || []).find((r) => !gate.dataset_digest || r.dataset_digest === gate.dataset_digest);
    if (run) return run;
    token = data.next_page_token || "";
    if (!token) break;
  }
  return null;
}

const gateVerdict = (gate, run) => (!run ? "no run" : run.pass_rate >= gate.threshold ? "passes" : "fails");
const digestShort = (digest) => (digest ? `${digest.slice(0, 19)}…` : "any dataset");

function gateSummary(gate) {
  return `${gate.environment} is gated on experiment ${gate.experiment}: pass rate ≥ ${formatShare(gate.threshold)} `
    + `on dataset ${digestShort(gate.dataset_digest)}`;
}

function gateTable(gate, candidates, runs) {
  return dataTable({ id: "promote-gate-results" }, ["Deployment", "Pass rate", "When", "Gate"],
    candidates.map((d) => {
      const run = runs.get(d.id) || null;
      const verdict = gateVerdict(gate, run);
      return { attrs: { "data-deployment": d.id, "data-verdict": verdict, class: verdict === "passes" ? "" : "gate-fails" }, cells: [
        el("td", { class: "mono" }, d.id),
        el("td", { class: "pass-rate" }, run ? `${formatShare(run.pass_rate)} (${run.passed}/${run.total})` : "no run"),
        el("td", { class: "nowrap" }, run ? when(run.created_at) : "–"),
        el("td", { class: "verdict" }, el("span", { class: `badge gate-${verdict.replace(" ", "-")}` }, verdict))] };
    }));
}

async function promoteDialog(env) {
  let bindings, gates;
  try {
    [bindings, gates] = await Promise.all([
      bindingsOf(state.environments.flatMap((e) => [e.deployment_id, e.previous_deployment_id])),
      api("GET", "/gates").then((r) => r.gates || []),
    ]);
  } catch (e) {
    toast(e.message, { anchor: "promote-btn", isError: true });
    return;
  }
  const rank = new Map(state.environments.map((e, i) => [e.id, i]));
  const servingIn = (id) => state.environments.filter((e) => (e.fallback ? e.fallback.deployment_id : e.deployment_id) === id).map((e) => e.name);
  // (Statuses are read for the deployments environments point at, current
  // or previous: the only ones that can be serving or proven.)
  const describe = (d) => {
    const serving = servingIn(d.id);
    if (!bindings.has(d.id)) return "no environment points at it";
    const runs = bindings.get(d.id).map((b) => `${b.status.replaceAll("_", " ")} in ${b.environment}`);
    return [runs.length ? runs.join(", ") : "not bound anywhere", serving.length ? `serving ${serving.join(", ")}` : "serving nowhere"].join("; ");
  };
  // Default target: the environment after this one (preview -> staging -> production).
  const here = state.environments.findIndex((e) => e.id === env.id);
  const next = state.environments[Math.min(here + 1, state.environments.length - 1)];
  const target = el("select", { id: "promote-target" }, state.environments.map((e) =>
    el("option", { value: e.id, selected: e.id === next.id }, e.name)));
  const source = el("select", { id: "promote-source", required: true });
  const where = el("p", { class: "hint", id: "promote-where" });
  const min = numberInput("promote-min", 1);
  const max = numberInput("promote-max", 3, 1);
  const boundsHint = el("p", { class: "hint", id: "promote-bounds-hint" });
  const previous = el("input", { id: "promote-scale-previous", type: "checkbox" });
  const reason = reasonInput("promote-reason");
  const gateBox = el("div", { id: "promote-gate", hidden: true });
  const skipGate = el("input", { id: "promote-skip-gate", type: "checkbox" });
  const skipRow = el("label", { class: "check", id: "promote-skip-gate-row", hidden: true }, skipGate,
    "Skip the gate (needs a reason, kept in the history)");
  const gating = { gate: null, runs: new Map(), loading: false, generation: 0 };
  const sourceVerdict = () => (gating.gate && !gating.loading ? gateVerdict(gating.gate, gating.runs.get(source.value) || null) : "");
  const showSkip = () => {
    const failing = Boolean(gating.gate) && !gating.loading && sourceVerdict() !== "passes";
    skipRow.hidden = !failing;
    if (!failing) skipGate.checked = false;
  };
  // The target's gate and each candidate's latest run of its experiment.
  const showGate = async (t, candidates) => {
    const generation = ++gating.generation;
    const gate = gates.find((g) => g.environment_id === t.id) || null;
    gating.gate = gate;
    gating.runs = new Map();
    gateBox.hidden = !gate;
    if (!gate) { gateBox.replaceChildren(); showSkip(); return; }
    gating.loading = true;
    showSkip();
    gateBox.replaceChildren(el("p", { class: "hint", id: "promote-gate-summary" }, gateSummary(gate)),
      el("p", { class: "hint" }, "Reading experiment runs…"));
    let runs;
    try {
      runs = new Map(await Promise.all(candidates.map(async (d) => [d.id, await latestGateRun(gate, d.id)])));
    } catch (e) {
      if (generation !== gating.generation) return;
      gating.loading = false;
      gateBox.replaceChildren(el("p", { class: "hint", id: "promote-gate-summary" }, gateSummary(gate)),
        el("p", { class: "error" }, `Could not read experiment runs: ${e.message}`));
      showSkip();
      return;
    }
    if (generation !== gating.generation) return;
    gating.runs = runs;
    gating.loading = false;
    gateBox.replaceChildren(el("p", { class: "hint", id: "promote-gate-summary" }, gateSummary(gate)),
      candidates.length ? gateTable(gate, candidates, runs) : el("p", { class: "empty" }, "No candidate."));
    showSkip();
    $("dialog-form").dispatchEvent(new Event("change"));
  };

  // Proved itself: running (every minimum replica ready) in an environment
  // before the target. Only those are offered first and pre-selected; a
  // failed or unproven build is listed apart and never pre-selected.
  const fillSources = () => {
    const t = state.environments.find((e) => e.id === target.value);
    const active = state.deployments.filter((d) => d.state === "active" && d.id !== t.deployment_id);
    const proven = active.filter((d) => (bindings.get(d.id) || []).some((b) => b.status === "running" && rank.get(b.environment_id) < rank.get(t.id)));
    const others = active.filter((d) => !proven.includes(d));
    const option = (d) => el("option", { value: d.id }, `${d.id} · ${d.image} — ${describe(d)}`);
    const groups = [];
    if (proven.length) groups.push(el("optgroup", { label: `Ready in an environment before ${t.name}` }, proven.map(option)));
    else groups.push(el("option", { value: "", disabled: true }, `No deployment is ready in an environment before ${t.name}`));
    if (others.length) groups.push(el("optgroup", { label: "Not proven before it (failed, not ready, or not bound)" }, others.map(option)));
    source.replaceChildren(...groups);
    source.value = proven.length ? proven[0].id : "";
    if (!proven.length) source.selectedIndex = 0;
    // Default bounds: the target's current ones (its serving binding).
    const current = (bindings.get(t.deployment_id) || []).find((b) => b.environment_id === t.id);
    min.value = String(current ? current.min_replicas : 1);
    max.value = String(current ? current.max_replicas : 3);
    boundsHint.textContent = current ? `${t.name}'s current bounds (${current.min_replicas}..${current.max_replicas})` : `${t.name} serves nothing yet: the platform's defaults`;
    showWhere();
    showGate(t, [...proven, ...others]);
  };
  const showWhere = () => {
    const d = deploymentById(source.value);
    where.textContent = d ? `${d.image}: ${describe(d)}` : "Choose a deployment.";
    showSkip();
  };
  target.addEventListener("change", fillSources);
  source.addEventListener("change", showWhere);
  fillSources();
  openDialog({
    title: "Promote a deployment",
    anchor: "promote-btn",
    body: [field("To environment", target), gateBox, field("Deployment", source), where,
      el("div", { class: "row" }, field("Min replicas", min), field("Max replicas", max)), boundsHint,
      el("label", { class: "check" }, previous, "Scale the previously serving deployment to zero"),
      skipRow, field("Reason", reason)],
    confirmLabel: "Promote",
    blocked: () => (!source.value ? "no deployment chosen" : gating.loading ? "reading the gate's runs"
      : skipGate.checked && !reason.value.trim() ? "skipping the gate needs a reason" : null),
    requireTyping: () => { const t = state.environments.find((e) => e.id === target.value); return t && t.protected ? t.name : null; },
    onConfirm: async () => {
      const targetEnv = state.environments.find((e) => e.id === target.value);
      const skip = Boolean(gating.gate) && !skipRow.hidden && skipGate.checked;
      let r;
      try {
        r = await api("POST", "/deployments/promote", {
          source_deployment_id: source.value, target_environment_id: target.value,
          min_replicas: Number(min.value), max_replicas: Number(max.value),
          scale_previous_to_zero: previous.checked, confirm: Boolean(targetEnv.protected), reason: reason.value.trim(),
          ...(skip ? { skip_gate: true } : {}),
        });
      } catch (e) {
        // A gate refusing (412) names the gate and the run: said in the toast too.
        if (e.status === 412) toast(e.message, { anchor: "promote-btn", isError: true });
        throw e;
      }
      return `Promoted ${source.value} to ${r.environment.name}.`;
    },
  });
}

// Where the environment pointed before, from its history: each deployment
// with its image, the last time it served (from, until) and who moved the
// pointer to it.
function servedPeriods(entries) {
  const periods = new Map();
  entries.forEach((h, i) => {
    const until = i + 1 < entries.length ? entries[i + 1].created_at : "";
    periods.set(h.deployment_id, { from: h.created_at, until, actor: h.actor, kind: h.kind, reason: h.reason });
  });
  return periods;
}

function rollbackDialog(env, entries) {
  const periods = servedPeriods(entries);
  const candidates = [...periods.keys()].filter((id) => id !== env.deployment_id)
    .sort((a, b) => (periods.get(b).from || "").localeCompare(periods.get(a).from || ""));
  const last = entries[entries.length - 1];
  const preferred = candidates.includes(last ? last.previous_deployment_id : "") ? last.previous_deployment_id : candidates[0];
  const radios = candidates.map((id) => {
    const p = periods.get(id);
    const d = deploymentById(id);
    return el("label", { class: "candidate", "data-deployment": id },
      el("input", { type: "radio", name: "rollback-target", value: id, checked: id === preferred }),
      el("span", { class: "mono" }, id, id === preferred ? " (previous)" : ""),
      el("span", { class: "image" }, d ? d.image : "(image unknown)"),
      el("span", { class: "meta served" }, `served ${when(p.from)} – ${when(p.until)}`),
      el("span", { class: "meta by" }, `by ${p.actor || "unknown"} (${p.kind}${p.reason ? `: ${p.reason}` : ""})`,
        d && d.state === "terminated" ? " · terminated: rolling back starts it again" : ""));
  });
  const reason = reasonInput("rollback-reason");
  const chosen = () => { const r = document.querySelector("input[name=rollback-target]:checked"); return r ? r.value : ""; };
  openDialog({
    title: `Roll back ${env.name}`,
    anchor: "rollback-btn",
    body: [candidates.length
      ? el("fieldset", { class: "candidates", id: "rollback-candidates" }, el("legend", {}, "Restore deployment"), radios)
      : el("p", { class: "empty" }, "This environment has no earlier deployment."),
    field("Reason", reason), el("p", { class: "hint" }, "Secrets are not rolled back.")],
    confirmLabel: "Roll back",
    danger: true,
    blocked: () => (chosen() ? null : "no deployment chosen"),
    requireTyping: () => (env.protected ? env.name : null),
    onConfirm: async () => {
      const id = chosen();
      await api("POST", "/deployments/rollback", { environment_id: env.id, deployment_id: id, confirm: Boolean(env.protected), reason: reason.value.trim() });
      return `Rolled ${env.name} back to ${id}.`;
    },
  });
}

function scaleDialog(env, binding) {
  const min = numberInput("scale-min", binding.min_replicas);
  const max = numberInput("scale-max", binding.max_replicas, 1);
  openDialog({
    title: `Scale ${short(env.deployment_id)} in ${env.name}`,
    anchor: "scale-btn",
    body: [el("div", { class: "row" }, field("Min replicas", min), field("Max replicas", max))],
    confirmLabel: "Scale",
    onConfirm: async () => {
      const r = await api("POST", `/deployments/${env.deployment_id}/scale`, {
        environment_id: env.id, min_replicas: Number(min.value), max_replicas: Number(max.value) });
      return `Replicas ${r.binding.min_replicas}..${r.binding.max_replicas} in ${env.name}.`;
    },
  });
}

function lifecycle(env, action) {
  const id = env.deployment_id;
  openDialog({
    title: action === "terminate" ? `Terminate ${id}` : `Start ${id}`,
    anchor: action === "terminate" ? "start-btn" : "terminate-btn",  // the button the page shows afterwards
    body: [el("p", {}, action === "terminate"
      ? "Every replica of this deployment stops, in every environment. The record and image stay; Start brings it back."
      : "Its replicas come back to their bounds.")],
    confirmLabel: action === "terminate" ? "Terminate" : "Start",
    danger: action === "terminate",
    requireTyping: () => (env.protected && action === "terminate" ? env.name : null),
    onConfirm: async () => {
      await api("POST", `/deployments/${id}/${action}`, {});
      return action === "terminate" ? `Terminated ${id}.` : `Started ${id}.`;
    },
  });
}

// The registry's rule (services/registry/domain.py NAME_PATTERN), written
// so it also compiles with the `v` flag browsers use for `pattern`.
const ENV_NAME_PATTERN = "[a-z]([a-z0-9\\-]{0,38}[a-z0-9])?";
const SECRET_NAME_PATTERN = "[A-Za-z_][A-Za-z0-9_]{0,127}";
const SECRET_TYPES = ["generic", "api_key", "password", "token", "certificate"];

function newEnvironmentDialog() {
  const name = el("input", { id: "new-env-name", required: true, pattern: ENV_NAME_PATTERN, maxlength: "40", autocomplete: "off",
    spellcheck: "false", title: "lowercase letters, digits and dashes; starts with a letter, does not end with a dash", "aria-describedby": "new-env-name-hint" });
  openDialog({
    title: "Create an environment",
    anchor: "new-env",
    body: [field("Name", name, "Lowercase letters, digits and dashes; starts with a letter, at most 40 characters.")],
    confirmLabel: "Create",
    onConfirm: async () => {
      const r = await api("POST", "/environments", { name: name.value.trim() });
      state.selected = r.environment.id;
      return `Created ${r.environment.name}.`;
    },
  });
}

function setSecretDialog(env) {
  const name = el("input", { id: "secret-name", required: true, pattern: SECRET_NAME_PATTERN, maxlength: "128", autocomplete: "off",
    spellcheck: "false", title: "letters, digits and underscores, not starting with a digit" });
  const type = el("select", { id: "secret-type" }, SECRET_TYPES.map((t) => el("option", { value: t }, t.replaceAll("_", " "))));
  const scope = el("select", { id: "secret-scope" },
    el("option", { value: env.id }, `${env.name} only`), el("option", { value: "" }, "the project (every environment that does not override it)"));
  // Write-only: masked, never autocompleted, cleared when the dialog closes.
  const value = el("textarea", { id: "secret-value", class: "secret-value", required: true, autocomplete: "off", spellcheck: "false", rows: "3" });
  $("dialog").addEventListener("close", () => { value.value = ""; }, { once: true });
  openDialog({
    title: `Set a secret for ${env.name}`,
    anchor: "set-secret-btn",
    body: [field("Name", name, "An environment variable name, e.g. DATABASE_URL."), field("Type", type), field("Scope", scope),
      field("Value", value, "Write-only: stored encrypted as a new version, never shown again. Replicas that resolve it are replaced.")],
    confirmLabel: "Set secret",
    requireTyping: () => (scope.value && env.protected ? env.name : null),
    onConfirm: async () => {
      const body = { name: name.value.trim(), type: type.value, value: value.value };
      if (scope.value) body.environment_id = scope.value;
      const r = await api("PUT", "/secrets", body);
      value.value = "";
      return `Set ${r.secret.name} (${r.secret.type}, ${r.secret.scope}) version ${r.secret.version}.`;
    },
  });
}

async function rollbackSecretDialog(env, secret) {
  const anchor = `secret-rollback-${secret.name}`;
  const scopeQuery = secret.environment_id ? `?environment_id=${encodeURIComponent(secret.environment_id)}` : "";
  let versions;
  try {
    versions = await listAll(`/secrets/${encodeURIComponent(secret.name)}/versions${scopeQuery}`, "versions");
  } catch (e) {
    toast(e.message, { anchor, isError: true });
    return;
  }
  const currentVersion = versions.length ? versions[versions.length - 1].version : secret.version;
  // The previous version that holds a value (a deletion holds none).
  const target = [...versions].reverse().find((v) => v.version < currentVersion && !v.deleted);
  const scopeText = secret.environment_id ? secret.scope : "project scope: every environment that does not override it";
  openDialog({
    title: `Roll back ${secret.name}`,
    anchor,
    body: [target
      ? el("p", { id: "secret-rollback-summary" }, `Restore the value of version ${target.version} (set ${when(target.updated_at)} by ${target.updated_by || "unknown"}) as version ${currentVersion + 1} of ${secret.name} (${scopeText}). Replicas that resolve it are replaced.`)
      : el("p", { id: "secret-rollback-summary" }, `No version before ${currentVersion} holds a value.`)],
    confirmLabel: "Roll back",
    danger: true,
    blocked: () => (target ? null : "nothing to restore"),
    requireTyping: () => (secret.environment_id && env.protected ? env.name : null),
    onConfirm: async () => {
      const body = { to_version: target.version };
      if (secret.environment_id) body.environment_id = secret.environment_id;
      const r = await api("POST", `/secrets/${encodeURIComponent(secret.name)}/rollback`, body);
      return `Restored ${r.secret.name} to the value of version ${target.version} as version ${r.secret.version}.`;
    },
  });
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("new-env").addEventListener("click", newEnvironmentDialog);
  $("dialog-cancel").addEventListener("click", () => $("dialog").close());
  $("tabs").addEventListener("keydown", onTabKey);
  // A hidden tab skips its refreshes: catch up with what the feed pushed meanwhile.
  document.addEventListener("visibilitychange", () => { if (!document.hidden && !$("deployments").hidden) scheduleRefresh(); });
  window.addEventListener("hashchange", () => {
    renderViews();
    $("panel").replaceChildren(el("p", { class: "empty" }, "Loading…"));
    refresh();
  });
  renderViews();
  if (sessionStorage.getItem(KEY_SLOT)) {
    loadEnvironments().then(showApp).catch(signOut);
  } else {
    signOut();
  }
});
