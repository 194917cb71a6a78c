// Berth Studio: the Deployments page. Talks only to /api/v1 on this origin;
// the API key lives in this tab's sessionStorage and travels only in the
// X-API-KEY header of those calls.
"use strict";

const KEY_SLOT = "berth.apiKey";
const POLL_MS = 2000;
const state = { environments: [], selected: null, deployments: [], timer: null, busy: false };
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
function when(ts) { return ts ? ts.replace("T", " ").slice(0, 19) : "–"; }
function uptime(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  return s < 120 ? `${s}s` : s < 7200 ? `${Math.floor(s / 60)}m` : `${Math.floor(s / 3600)}h`;
}
function flash(message, isError = false) {
  const f = $("flash");
  f.textContent = message;
  f.style.color = isError ? "var(--bad)" : "var(--ok)";
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
  renderTabs();
  refresh();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
}

// ---------------------------------------------------------------- data

// The usual path of a build first, then the project's own environments.
const ENV_ORDER = ["preview", "staging", "production"];
const envRank = (e) => (ENV_ORDER.includes(e.name) ? ENV_ORDER.indexOf(e.name) : ENV_ORDER.length);

async function loadEnvironments() {
  const environments = await listAll("/environments", "environments");
  state.environments = [...environments].sort((a, b) => envRank(a) - envRank(b) || a.name.localeCompare(b.name));
  if (state.environments.length) $("project-label").textContent = `project ${state.environments[0].project_name || ""}`.trim();
}

async function refresh() {
  if (state.busy || document.hidden) return;
  state.busy = true;
  try {
    await loadEnvironments();
    renderTabs();
    const env = current();
    if (!env) return;
    const [deployments, history, status, errors] = await Promise.all([
      listAll("/deployments", "deployments"),
      listAll(`/environments/${env.id}/promotions`, "entries"),
      env.deployment_id ? api("GET", `/deployments/${env.deployment_id}/status`) : null,
      env.deployment_id ? listAll(`/deployments/${env.deployment_id}/errors`, "errors") : null,
    ]);
    state.deployments = deployments;
    if (current() && current().id === env.id) renderPanel(env, history, status, errors || []);
  } catch (e) {
    if (e.status === 401) { signOut(); $("sign-in-error").textContent = "Your key stopped working; sign in again."; }
    else flash(e.message, true);
  } finally {
    state.busy = false;
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

function renderPanel(env, entries, status, errors) {
  const panel = $("panel");
  panel.setAttribute("aria-labelledby", `tab-${env.name}`);
  const binding = status ? status.bindings.find((b) => b.environment_id === env.id) : null;
  const nodes = [];
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
    nodes.push(binding.replicas.length ? el("table", { id: "replicas" },
      el("thead", {}, el("tr", {}, ["Replica", "State", "Uptime", "Restarts", "Address"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, binding.replicas.map((r) => el("tr", {},
        el("td", { class: "mono" }, r.name || short(r.id)), el("td", {}, badge(r.state)),
        el("td", {}, r.state === "ready" ? uptime(r.started_at) : "–"), el("td", {}, r.restarts), el("td", { class: "mono" }, r.address))))
    ) : el("p", { class: "empty", id: "replicas" }, "No replicas running."));
  }
  nodes.push(el("h3", {}, "Errors"));
  nodes.push(errors.length ? el("table", { class: "errors", id: "errors" },
    el("thead", {}, el("tr", {}, ["Kind", "Environment", "Replica", "Count", "First seen", "Last seen", "Message"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, errors.map((e) => el("tr", {},
      el("td", {}, badge(e.kind)), el("td", {}, e.environment), el("td", { class: "mono" }, e.replica || "–"), el("td", {}, e.count),
      el("td", {}, when(e.first_seen)), el("td", {}, when(e.last_seen)), el("td", {}, e.message))))
  ) : el("p", { class: "empty", id: "errors" }, "No errors."));
  nodes.push(el("h3", {}, "Promotion history"));
  nodes.push(entries.length ? el("table", { id: "history" },
    el("thead", {}, el("tr", {}, ["#", "Kind", "Deployment", "Previous", "Replicas", "By", "When"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, [...entries].reverse().map((h) => el("tr", {},
      el("td", {}, h.sequence), el("td", {}, h.kind), el("td", { class: "mono" }, h.deployment_id), el("td", { class: "mono" }, h.previous_deployment_id || "–"),
      el("td", {}, `${h.min_replicas}..${h.max_replicas}`), el("td", {}, h.actor), el("td", {}, when(h.created_at)))))
  ) : el("p", { class: "empty", id: "history" }, "No history yet."));
  panel.replaceChildren(...nodes);
}

// ---------------------------------------------------------------- dialogs

function openDialog({ title, body, confirmLabel = "Confirm", danger = false, requireTyping = () => null, onConfirm }) {
  // requireTyping() names what must be typed to confirm (a protected
  // environment), or null; it is re-read whenever a control changes.
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
    confirm.disabled = Boolean(needed) && typed.value !== needed;
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
      flash(message);
      await refresh();
    } catch (e) {
      $("dialog-error").textContent = e.message;
      sync();
    }
  };
  dialog.showModal();
  const first = dialog.querySelector("select, input:not([hidden] input), button[type=submit]");
  if (first) first.focus();
}

const field = (label, control) => el("div", {}, el("label", { for: control.id }, label), control);
const numberInput = (id, value, min = 0) => el("input", { id, type: "number", min: String(min), max: "100", value: String(value), required: true });

function promoteDialog(env) {
  const source = el("select", { id: "promote-source" }, state.deployments.filter((d) => d.state === "active").map((d) =>
    el("option", { value: d.id, selected: d.id === env.deployment_id }, `${d.id}  ${d.image}`)));
  // Default target: the environment after this one (preview -> staging -> production).
  const here = state.environments.findIndex((e) => e.id === env.id);
  const next = state.environments[Math.min(here + 1, state.environments.length - 1)];
  const target = el("select", { id: "promote-target" }, state.environments.map((e) =>
    el("option", { value: e.id, selected: e.id === next.id }, e.name)));
  const min = numberInput("promote-min", 1);
  const max = numberInput("promote-max", 3, 1);
  const previous = el("input", { id: "promote-scale-previous", type: "checkbox" });
  openDialog({
    title: "Promote a deployment",
    body: [field("Deployment", source), field("To environment", target),
      el("div", { class: "row" }, field("Min replicas", min), field("Max replicas", max)),
      el("label", { class: "check" }, previous, "Scale the previously serving deployment to zero")],
    confirmLabel: "Promote",
    requireTyping: () => { const t = state.environments.find((e) => e.id === target.value); return t && t.protected ? t.name : null; },
    onConfirm: async () => {
      const targetEnv = state.environments.find((e) => e.id === target.value);
      const r = await api("POST", "/deployments/promote", {
        source_deployment_id: source.value, target_environment_id: target.value,
        min_replicas: Number(min.value), max_replicas: Number(max.value),
        scale_previous_to_zero: previous.checked, confirm: Boolean(targetEnv.protected),
      });
      return `Promoted ${source.value} to ${r.environment.name}.`;
    },
  });
}

function rollbackDialog(env, entries) {
  const candidates = [...new Set(entries.map((h) => h.deployment_id))].filter((id) => id !== env.deployment_id);
  const last = entries[entries.length - 1];
  const preferred = last ? last.previous_deployment_id : "";
  const choice = el("select", { id: "rollback-target" }, candidates.map((id) =>
    el("option", { value: id, selected: id === preferred }, id === preferred ? `${id} (previous)` : id)));
  openDialog({
    title: `Roll back ${env.name}`,
    body: [field("Restore deployment", choice), el("p", {}, "Secrets are not rolled back.")],
    confirmLabel: "Roll back",
    danger: true,
    requireTyping: () => (env.protected ? env.name : null),
    onConfirm: async () => {
      if (!choice.value) throw new Error("This environment has no earlier deployment.");
      await api("POST", "/deployments/rollback", { environment_id: env.id, deployment_id: choice.value, confirm: Boolean(env.protected) });
      return `Rolled ${env.name} back to ${choice.value}.`;
    },
  });
}

function scaleDialog(env, binding) {
  const min = numberInput("scale-min", binding.min_replicas);
  const max = numberInput("scale-max", binding.max_replicas, 1);
  openDialog({
    title: `Scale ${short(env.deployment_id)} in ${env.name}`,
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

function newEnvironmentDialog() {
  const name = el("input", { id: "new-env-name", required: true, pattern: "[a-z][a-z0-9-]*", autocomplete: "off" });
  openDialog({
    title: "Create an environment",
    body: [field("Name", name)],
    confirmLabel: "Create",
    onConfirm: async () => {
      const r = await api("POST", "/environments", { name: name.value.trim() });
      state.selected = r.environment.id;
      return `Created ${r.environment.name}.`;
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
  if (sessionStorage.getItem(KEY_SLOT)) {
    loadEnvironments().then(showApp).catch(signOut);
  } else {
    signOut();
  }
});
