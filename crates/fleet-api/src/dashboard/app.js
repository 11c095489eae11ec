// fleet's dashboard: lists units, states and machines through API v1, then follows
// /fleet/v1/events with EventSource. Every value from the cluster is shown through
// textContent, never as HTML.
"use strict";

const API = "/fleet/v1";
const units = new Map();     // name -> {name, desired, current, machine, reason, hash, global}
const states = new Map();    // name -> Map(machine -> {load, active, sub, current})
const machines = new Map();  // id -> {id, ip, metadata, apiMetadata}
const history = new Map();   // unit name -> [{revision, time, text}], since the page opened
const HISTORY_MAX = 200;     // entries kept per unit: a page left open must not grow forever
const files = new Map();     // unit name -> unit file text
let source = null;
let ready = false;           // the lists are in: events apply at once
let pending = [];            // events that came while listing
let revision = null;         // the last revision seen
let renderQueued = false;
let loading = false;

const $ = (id) => document.getElementById(id);

function setStatus(state, text) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
}

async function listAll(resource, key) {
  const out = [];
  let token = "";
  do {
    const q = token ? "?nextPageToken=" + encodeURIComponent(token) : "";
    const r = await fetch(API + "/" + resource + q, { cache: "no-store" });
    if (!r.ok) throw new Error(resource + ": HTTP " + r.status);
    const page = await r.json();
    out.push(...(page[key] || []));
    token = page.nextPageToken || "";
  } while (token);
  return out;
}

// Opens the stream first, then lists: events that happen meanwhile are applied after the
// lists (each event sets a value, so applying one the lists already show changes nothing).
function start() {
  if (source) source.close();
  ready = false;
  pending = [];
  setStatus("connecting", "connecting");
  source = new EventSource(API + "/events");
  source.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (_) { return; }
    if (ev.type === "hello") {
      if (!ready && !loading) load();
      setStatus("live", "live");
      return;
    }
    if (ev.type === "reset") { revision = null; start(); return; }
    if (ev.type === "cut-off") return; // EventSource reconnects with Last-Event-ID
    if (ready) apply(ev); else pending.push(ev);
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // refused (e.g. 410: too old to resume): list again
      setStatus("offline", "offline, retrying");
      revision = null;
      setTimeout(start, 2000);
    } else {
      setStatus("connecting", "reconnecting");
    }
  };
}

async function load() {
  loading = true;
  try {
    const [us, ss, ms] = await Promise.all([
      listAll("units", "units"), listAll("state", "states"), listAll("machines", "machines"),
    ]);
    units.clear(); states.clear(); machines.clear();
    for (const u of us) {
      units.set(u.name, {
        name: u.name, desired: u.desiredState, current: u.currentState,
        machine: u.machineID || "", reason: u.reason || "", global: !u.machineID && isGlobal(u),
      });
      files.set(u.name, unitText(u.options || []));
    }
    for (const s of ss) {
      stateOf(s.name).set(s.machineID, {
        load: s.systemdLoadState, active: s.systemdActiveState, sub: s.systemdSubState,
        current: null,
      });
    }
    for (const m of ms) {
      machines.set(m.id, { id: m.id, ip: m.primaryIP, metadata: m.metadata || {}, apiMetadata: {} });
    }
    ready = true;
    const queued = pending;
    pending = [];
    for (const ev of queued) apply(ev);
    queueRender();
  } catch (e) {
    setStatus("offline", "cannot list: " + e.message);
    setTimeout(load, 2000);
  } finally {
    loading = false;
  }
}

function isGlobal(u) {
  return (u.options || []).some((o) => o.section === "X-Fleet" && o.name === "Global" && o.value === "true");
}

function unitText(options) {
  let text = "", section = null;
  for (const o of options) {
    if (o.section !== section) {
      text += (section === null ? "" : "\n") + "[" + o.section + "]\n";
      section = o.section;
    }
    text += o.name + "=" + o.value + "\n";
  }
  return text;
}

function stateOf(name) {
  if (!states.has(name)) states.set(name, new Map());
  return states.get(name);
}

function unitOf(name) {
  if (!units.has(name)) {
    units.set(name, { name, desired: "", current: "inactive", machine: "", reason: "", global: false });
  }
  return units.get(name);
}

function describe(ev) {
  switch (ev.type) {
    case "unit-created": return "created, desired state " + ev.desiredState;
    case "unit-changed":
      return ev.hash !== ev.previousHash ? "unit file replaced, desired state " + ev.desiredState
        : "desired state " + ev.previousDesiredState + " \u2192 " + ev.desiredState;
    case "unit-destroyed": return "destroyed";
    case "unit-placed": return "placed on " + ev.machine;
    case "unit-unplaced": return "unscheduled" + (ev.machine ? " from " + ev.machine : "");
    case "unit-unplaceable": return "cannot be placed: " + ev.reason;
    case "unit-state":
      return "on " + ev.machine + ": " + ev.loadState + " " + ev.activeState + " " + ev.subState +
        " (" + ev.currentState + ")";
    case "unit-state-removed": return "no state from " + ev.machine;
    default: return ev.type;
  }
}

function apply(ev) {
  if (typeof ev.revision === "number") {
    revision = ev.revision;
    $("revision").textContent = "revision " + revision;
  }
  if (ev.unit) {
    if (!history.has(ev.unit)) history.set(ev.unit, []);
    const h = history.get(ev.unit);
    h.push({ revision: ev.revision, time: new Date(), text: describe(ev) });
    if (h.length > HISTORY_MAX) h.splice(0, h.length - HISTORY_MAX);
  }
  switch (ev.type) {
    case "unit-created": {
      const u = unitOf(ev.unit);
      Object.assign(u, { desired: ev.desiredState, global: !!ev.global, reason: "" });
      files.delete(ev.unit);
      break;
    }
    case "unit-changed": {
      const u = unitOf(ev.unit);
      u.desired = ev.desiredState;
      if (ev.hash !== ev.previousHash) files.delete(ev.unit);
      break;
    }
    case "unit-destroyed":
      units.delete(ev.unit); states.delete(ev.unit); files.delete(ev.unit);
      history.delete(ev.unit);
      break;
    case "unit-placed": {
      const u = unitOf(ev.unit);
      u.machine = ev.machine; u.reason = "";
      u.current = currentOn(ev.unit, ev.machine);
      break;
    }
    case "unit-unplaced":
      if (units.has(ev.unit)) Object.assign(units.get(ev.unit), { machine: "", current: "inactive" });
      break;
    case "unit-unplaceable":
      unitOf(ev.unit).reason = ev.reason;
      break;
    case "unit-state": {
      stateOf(ev.unit).set(ev.machine, {
        load: ev.loadState, active: ev.activeState, sub: ev.subState, current: ev.currentState,
      });
      const u = units.get(ev.unit);
      if (u && u.machine === ev.machine) u.current = ev.currentState;
      break;
    }
    case "unit-state-removed": {
      if (states.has(ev.unit)) states.get(ev.unit).delete(ev.machine);
      const u = units.get(ev.unit);
      if (u && u.machine === ev.machine) u.current = "inactive";
      break;
    }
    case "machine-joined":
    case "machine-changed": {
      const m = machines.get(ev.machine) || { id: ev.machine, metadata: {}, apiMetadata: {} };
      m.ip = ev.primaryIP;
      // the event carries the whole configured metadata: keys it lacks were removed; what was
      // set through the API since the page opened stays on top
      m.metadata = Object.assign({}, ev.metadata || {}, m.apiMetadata || {});
      machines.set(ev.machine, m);
      break;
    }
    case "machine-left":
      machines.delete(ev.machine);
      break;
    case "machine-metadata": {
      const m = machines.get(ev.machine);
      if (m) {
        m.apiMetadata = m.apiMetadata || {};
        if (ev.value === null) {
          delete m.metadata[ev.key]; delete m.apiMetadata[ev.key];
        } else {
          m.metadata[ev.key] = ev.value; m.apiMetadata[ev.key] = ev.value;
        }
      }
      break;
    }
  }
  queueRender();
}

function currentOn(unit, machine) {
  const s = states.has(unit) && states.get(unit).get(machine);
  return (s && s.current) || "inactive";
}

// ---- filtering ----

function matcher() {
  const f = $("filter").value.trim();
  if (!f) return () => true;
  if (/[*?[]/.test(f)) {
    try {
      const re = new RegExp("^" + f.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
      return (...values) => values.some((v) => v && re.test(v));
    } catch (_) {
      // an unfinished pattern ("web[") filters as text until it is complete
    }
  }
  const low = f.toLowerCase();
  return (...values) => values.some((v) => v && v.toLowerCase().includes(low));
}

// ---- rendering ----

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => { renderQueued = false; render(); }, 0);
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  td.dataset.value = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function render() {
  const keep = matcher();
  const unitBody = $("units").tBodies[0];
  const machineBody = $("machines").tBodies[0];
  const names = [...units.keys()].sort();
  const rows = [];
  const perMachine = new Map();
  for (const name of names) {
    const u = units.get(name);
    const on = states.get(name) || new Map();
    let s = u.machine ? on.get(u.machine) : null;
    if (u.global) {
      const active = [...new Set([...on.values()].map((x) => x.active))].join(", ");
      const sub = [...new Set([...on.values()].map((x) => x.sub))].join(", ");
      s = { active, sub, load: "" };
      for (const m of on.keys()) perMachine.set(m, (perMachine.get(m) || 0) + 1);
    } else if (u.machine) {
      perMachine.set(u.machine, (perMachine.get(u.machine) || 0) + 1);
    }
    const tr = document.createElement("tr");
    tr.dataset.unit = name;
    tr.dataset.desired = u.desired;
    tr.dataset.current = u.current;
    tr.dataset.active = s ? s.active : "-";
    tr.dataset.sub = s ? s.sub : "-";
    tr.dataset.machine = u.global ? "global" : u.machine;
    const td = document.createElement("td");
    const a = document.createElement("a");
    a.href = "#unit/" + encodeURIComponent(name);
    a.textContent = name;
    td.appendChild(a);
    tr.appendChild(td);
    cell(tr, u.desired);
    cell(tr, u.current);
    cell(tr, s ? s.active : "-");
    cell(tr, s ? s.sub : "-");
    cell(tr, u.global ? "global" : (u.machine ? machineLabel(u.machine) : "-"), "machine");
    cell(tr, u.reason, "reason");
    tr.hidden = !keep(name, u.machine);
    rows.push(tr);
  }
  unitBody.replaceChildren(...rows);
  $("unit-count").textContent = "(" + units.size + ")";

  const mrows = [];
  for (const id of [...machines.keys()].sort()) {
    const m = machines.get(id);
    const tr = document.createElement("tr");
    tr.dataset.machine = id;
    cell(tr, id, "machine");
    cell(tr, m.ip || "-");
    cell(tr, Object.entries(m.metadata || {}).map(([k, v]) => k + "=" + v).join(", ") || "-");
    cell(tr, String(perMachine.get(id) || 0));
    tr.hidden = !keep(id, m.ip, ...Object.entries(m.metadata || {}).map(([k, v]) => k + "=" + v));
    mrows.push(tr);
  }
  machineBody.replaceChildren(...mrows);
  $("machine-count").textContent = "(" + machines.size + ")";
  renderUnitPage();
}

function machineLabel(id) {
  const m = machines.get(id);
  return id.slice(0, 8) + "\u2026" + (m && m.ip ? "/" + m.ip : "");
}

// ---- the unit page (#unit/<name>) ----

function pageUnit() {
  const h = location.hash;
  if (!h.startsWith("#unit/")) return null;
  try {
    return decodeURIComponent(h.slice(6));
  } catch (_) {
    return null; // a malformed escape in a hand-typed address: the main page
  }
}

async function fetchFile(name) {
  try {
    const r = await fetch(API + "/units/" + encodeURIComponent(name), { cache: "no-store" });
    if (r.status === 404) { files.set(name, "(no such unit)"); return; }
    if (!r.ok) throw new Error("HTTP " + r.status);
    const u = await r.json();
    files.set(name, unitText(u.options || []));
  } catch (e) {
    files.set(name, "(cannot read the unit: " + e.message + ")");
  }
  renderUnitPage();
}

function renderUnitPage() {
  const name = pageUnit();
  $("overview").hidden = name !== null;
  $("unit-page").hidden = name === null;
  if (name === null) return;
  $("unit-name").textContent = name;
  const u = units.get(name);
  const s = u && u.machine && states.has(name) ? states.get(name).get(u.machine) : null;
  const rows = [
    ["desired", u ? u.desired : "(destroyed)"], ["current", u ? u.current : "-"],
    ["machine", u ? (u.global ? "global" : u.machine || "-") : "-"],
    ["active", s ? s.active : "-"], ["sub", s ? s.sub : "-"], ["reason", u ? u.reason || "-" : "-"],
  ];
  $("unit-summary").tBodies[0].replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.dataset.key = k;
    const th = document.createElement("th");
    th.textContent = k;
    tr.appendChild(th);
    cell(tr, v);
    return tr;
  }));
  if (!files.has(name) && u) { files.set(name, "(loading)"); fetchFile(name); }
  $("unit-file").textContent = files.get(name) || "";
  $("unit-history").replaceChildren(...(history.get(name) || []).map((h) => {
    const li = document.createElement("li");
    li.textContent = h.time.toLocaleTimeString() + "  rev " + h.revision + "  " + h.text;
    return li;
  }));
}

$("filter").addEventListener("input", queueRender);
window.addEventListener("hashchange", renderUnitPage);
start();
