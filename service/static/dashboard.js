// strop dashboard: polls /dashboard/data and draws it; no libraries, so it works offline.
"use strict";

const POLL_MS = 5000;
const PALETTE = ["#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
const TRAFFIC_COLORS = {
  logged: "#2563eb", ingested: "#0891b2", enqueued: "#94a3b8",
  built: "#059669", pairs: "#7c3aed", dropped: "#dc2626",
};

const state = { data: null, polls: 0, expanded: new Set(), confirming: null, timer: null };

// --- small helpers -----------------------------------------------------------------------

/** An element with attributes and children (strings become text nodes: nothing is parsed). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

const $ = (id) => document.getElementById(id);
const fmt = (x, d = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(d) : "–");
// KLs of small updates are 1e-5 and less: significant digits, not decimals
const fmtSig = (x) => (typeof x === "number" && isFinite(x) ? String(Number(x.toPrecision(3))) : "–");
const hhmm = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)}s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)}m ago`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)}h ago`;
  return `${(seconds / 86400).toFixed(1)}d ago`;
}

/** A stable colour per version: base is grey, vN takes the palette in turn. */
function versionColor(v) {
  if (v === "base") return "#6b7280";
  const n = parseInt(v.replace(/^v/, ""), 10);
  return PALETTE[(isNaN(n) ? 0 : n - 1) % PALETTE.length];
}

const byVersion = (a, b) => (a === "base" ? -1 : b === "base" ? 1 : parseInt(a.slice(1)) - parseInt(b.slice(1)));

// --- keys --------------------------------------------------------------------------------

function key(name) {
  return sessionStorage.getItem(`strop.${name}`) || "";
}

function bindKey(inputId, name) {
  const input = $(inputId);
  input.value = key(name);
  input.addEventListener("input", () => {
    sessionStorage.setItem(`strop.${name}`, input.value.trim());
    if (name === "apiKey") poll(); // a new key: try again now rather than in 5 s
  });
}

function authHeaders(name) {
  // The admin key is also accepted as an API key, so it alone is enough to read the data.
  const k = key(name) || (name === "apiKey" ? key("adminKey") : "");
  return k ? { Authorization: `Bearer ${k}` } : {};
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return body.error?.message || `HTTP ${resp.status}`;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

// --- polling -----------------------------------------------------------------------------

async function poll() {
  clearTimeout(state.timer);
  const banner = $("error");
  try {
    const resp = await fetch(`/dashboard/data?window=${$("window").value}`, { headers: authHeaders("apiKey") });
    if (!resp.ok) {
      const msg = await errorMessage(resp);
      banner.textContent = resp.status === 401 ? `${msg} Enter an API key above.` : msg;
      banner.hidden = false;
      document.body.dataset.state = "error";
    } else {
      state.data = await resp.json();
      state.polls += 1;
      banner.hidden = true;
      render(state.data);
      document.body.dataset.state = "ok";
      document.body.dataset.polls = state.polls;
    }
  } catch (e) {
    banner.textContent = `Cannot reach the service (${e.message}); retrying.`;
    banner.hidden = false;
    document.body.dataset.state = "error";
  }
  state.timer = setTimeout(poll, POLL_MS);
}

function render(d) {
  $("serving").textContent = `strop → ${d.promoted || "base"}`;
  $("updated").textContent = `updated ${new Date(d.time * 1000).toLocaleTimeString()}`;
  renderHalted(d.halted, d.time);
  renderTiles(d);
  renderVersions(d);
  renderRollback(d);
  const x = [d.time - d.window_s, d.time];
  const marks = d.events
    .filter((e) => e.time >= x[0] && (e.kind === "promoted" || e.kind === "rolled_back"))
    .map((e) => ({
      t: e.time,
      label: e.kind === "promoted" ? `↑${e.version}` : `⟲${e.previous || "base"}`,
      color: e.kind === "promoted" ? "#059669" : "#d97706",
    }));
  const perVersion = (metric) =>
    Object.keys(d.trends[metric] || {}).sort(byVersion).map((v) => ({
      name: v, color: versionColor(v), points: d.trends[metric][v],
    }));
  lineChart($("chart-reward"), { series: perVersion("reward"), x, marks });
  lineChart($("chart-majority"), { series: perVersion("majority_ratio"), x, marks, y: [0, 1] });
  lineChart($("chart-judge"), { series: perVersion("judge_score"), x, marks, y: [0, 5] });
  lineChart($("chart-agreement"), { series: perVersion("feedback_agreement"), x, marks, y: [0, 1] });
  const t = d.traffic;
  lineChart($("chart-traffic"), {
    series: Object.entries(t.series).map(([name, values]) => ({
      name, color: TRAFFIC_COLORS[name] || "#333",
      points: values.map((n, i) => [t.minutes[i], n, 1]),
      total: t.totals[name],
    })),
    x, y: [0, null], integer: true, dense: true,
  });
  renderFeedback(d.feedback);
  renderQueues(d.queues);
  renderLearner(d.learner, d.time);
  renderEvents(d.events);
}

// --- tiles, tables -----------------------------------------------------------------------

/** The collapse guard's halt: promotions stop until an operator runs `strop adapters resume`. */
function renderHalted(halt, now) {
  const banner = $("halted");
  banner.hidden = !halt;
  if (!halt) return;
  banner.replaceChildren(
    h("b", {}, "promotion halted: "), halt.reason,
    h("div", { class: "small" },
      `The collapse guard rolled ${halt.version} back to ${halt.rolled_back_to} ${ago(now - halt.time)}. `,
      "Run ", h("code", {}, "strop adapters resume"), " to allow promotions again."));
}

function renderTiles(d) {
  const t = d.traffic.totals;
  const counts = {};
  for (const v of d.versions) counts[v.status] = (counts[v.status] || 0) + 1;
  const svc = d.service || {};
  const errors = Object.entries(svc.requests_by_status || {})
    .filter(([code]) => code !== "200").reduce((a, [, n]) => a + n, 0);
  const learner = d.learner ? d.learner.phase || "?" : "not running";
  const tiles = [
    ["serving", d.promoted || "base", `${d.versions.length} versions`],
    ["versions", `${counts.promoted || 0} / ${counts.rejected || 0}`, "promoted / rejected"],
    ["requests logged", t.logged, `in the window${d.traffic.logged_capped ? " (capped)" : ""}`],
    ["requests served", svc.requests ?? "–", `${errors} errors (this process)`],
    ["groups built", t.built, `${t.dropped} dropped`],
    ["pairs", t.pairs, "preference pairs"],
    ["feedback", d.feedback?.total ?? 0, feedbackSub(d.feedback)],
    ["build queue", d.queues.build, `${d.queues.prompt_log.lag ?? 0} prompts unread`],
    ["learner", learner, d.learner && d.learner.stale ? "stale: stopped?" : d.learner?.version || ""],
  ];
  $("tiles").replaceChildren(
    ...tiles.map(([label, value, sub]) =>
      h("div", { class: "tile", "data-tile": label },
        h("div", { class: "tile-label" }, label),
        h("div", { class: "tile-value" }, value),
        h("div", { class: "tile-sub muted" }, sub))),
  );
}

function renderVersions(d) {
  const rows = [];
  const versions = [...d.versions].reverse(); // newest first
  for (const v of versions) {
    const tm = v.train_metrics, g = v.gate;
    const lossKey = Object.keys(tm).find((k) => k.startsWith("loss/"));
    const live = d.live[v.version]?.reward;
    const toggle = () => {
      state.expanded.has(v.version) ? state.expanded.delete(v.version) : state.expanded.add(v.version);
      renderVersions(state.data);
    };
    rows.push(h("tr", { class: v.serving ? "serving" : "", "data-version": v.version, "data-status": v.status, onclick: toggle },
      h("td", {}, h("span", { class: "swatch", style: `background:${versionColor(v.version)}` }), v.version,
        v.serving ? h("span", { class: "pill small" }, "serving") : null),
      h("td", {}, h("span", { class: `badge ${v.status}` }, v.status.replace("_", " "))),
      h("td", {}, v.parent),
      h("td", { title: new Date(v.created * 1000).toLocaleString() }, ago(d.time - v.created)),
      h("td", {}, v.algorithm || "–"),
      h("td", { class: "num" }, v.records),
      h("td", { class: "num", title: lossKey || "" }, fmt(tm[lossKey], 4)),
      h("td", { class: "num" }, fmtSig(g["gate/kl"])),
      h("td", { class: "num" }, "gate/reward_candidate" in g
        ? `${fmt(g["gate/reward_parent"], 2)} → ${fmt(g["gate/reward_candidate"], 2)}` : "–"),
      h("td", { class: "num canary" }, "gate/canary_candidate" in g
        ? `${fmt(g["gate/canary_parent"], 2)} → ${fmt(g["gate/canary_candidate"], 2)}` : "–"),
      h("td", { class: "num" }, live ? `${fmt(live.mean)} (${live.count})` : "–"),
      h("td", { class: "reason" }, v.reason || "")));
    if (state.expanded.has(v.version)) {
      const metrics = { ...tm, ...g };
      rows.push(h("tr", { class: "details" }, h("td", { colspan: 12 },
        h("div", { class: "metrics" }, Object.keys(metrics).sort().map((k) =>
          h("span", {}, h("b", {}, k), " ", typeof metrics[k] === "number" ? fmt(metrics[k], 4) : String(metrics[k])))))));
    }
  }
  const base = d.live.base?.reward;
  if (base) {
    rows.push(h("tr", { class: d.promoted ? "base" : "base serving", "data-version": "base" },
      h("td", {}, h("span", { class: "swatch", style: `background:${versionColor("base")}` }), "base"),
      h("td", {}, h("span", { class: "badge" }, "no adapter")),
      ...Array(8).fill(null).map(() => h("td", {}, "")),
      h("td", { class: "num" }, `${fmt(base.mean)} (${base.count})`),
      h("td", {}, "")));
  }
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 12, class: "muted" }, "No adapter versions yet: strop serves the base model.")));
  $("versions").tBodies[0].replaceChildren(...rows);
}

// --- user feedback -----------------------------------------------------------------------

const pct = (x) => (typeof x === "number" && isFinite(x) ? `${(100 * x).toFixed(0)}%` : "–");

function feedbackSub(fb) {
  if (!fb) return "";
  const flagged = fb.trust?.flagged?.length || 0;
  return `${pct(fb.rate)} of requests` + (flagged ? `, ${flagged} untrusted key${flagged > 1 ? "s" : ""}` : "");
}

/** Feedback per version (up vs down, label agreement) and the keys no longer trusted. */
function renderFeedback(fb) {
  if (!fb) return;
  $("feedback-summary").replaceChildren(
    h("b", {}, fb.total), " feedback in the window (", pct(fb.rate), " of logged requests); label agreement ",
    h("b", { id: "feedback-agreement" }, fb.agreement === null ? "–" : `${fmt(fb.agreement, 2)}`),
    h("span", { class: "muted" }, ` of ${fb.agreement_n} answers`));
  const rows = Object.keys(fb.per_version).sort(byVersion).map((v) => {
    const r = fb.per_version[v], k = r.kinds;
    return h("tr", { "data-version": v },
      h("td", {}, h("span", { class: "swatch", style: `background:${versionColor(v)}` }), v),
      h("td", { class: "num" }, r.total),
      h("td", { class: "num good" }, k.up || 0),
      h("td", { class: "num bad" }, k.down || 0),
      h("td", { class: "num" }, pct(r.up_share)),
      h("td", { class: "num" }, k.answer || 0),
      h("td", { class: "num" }, k.preferred || 0),
      h("td", { class: "num" }, r.agreement === null ? "–" : `${fmt(r.agreement, 2)} (${r.agreement_n})`));
  });
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No feedback in this window.")));
  $("feedback").tBodies[0].replaceChildren(...rows);
  const flagged = fb.trust?.flagged || [];
  $("feedback-keys").replaceChildren(flagged.length
    ? h("p", { class: "bad" }, "Untrusted keys (their feedback labels nothing and weighs 1): ",
      flagged.map((k, i) => h("span", { "data-key": k.key_id },
        i ? ", " : "", h("code", {}, k.key_id),
        ` disagreed with ${k.disagree} of ${k.rated} clear majorities (${pct(k.rate)}; other keys ${pct(k.rest_rate)})`)))
    : h("p", { class: "muted small" }, `No untrusted keys (${fb.trust?.keys_rated ?? 0} keys rated against clear majorities).`));
}

// --- rollback ----------------------------------------------------------------------------

/** What the registry rolls back to by default: the newest earlier promoted version, or base. */
function defaultTarget(d) {
  const num = (v) => parseInt(v.slice(1), 10);
  const earlier = d.versions.filter((v) => v.status === "promoted" && v.version !== d.promoted
    && (!d.promoted || num(v.version) < num(d.promoted)));
  return earlier.length ? earlier[earlier.length - 1].version : "base";
}

function renderRollback(d) {
  const select = $("rollback-to");
  const chosen = select.value;
  const options = [h("option", { value: "" }, `previous promoted (${defaultTarget(d)})`)];
  if (d.promoted) options.push(h("option", { value: "base" }, "base model"));
  for (const v of [...d.versions].reverse()) {
    if (v.version !== d.promoted && (v.status === "promoted" || v.status === "rolled_back")) {
      options.push(h("option", { value: v.version }, `${v.version} (${v.status.replace("_", " ")})`));
    }
  }
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  $("rollback").disabled = !d.promoted && d.versions.length === 0;
}

function resetRollback() {
  state.confirming = null;
  $("rollback").textContent = "Roll back…";
  $("rollback").classList.remove("danger");
  $("rollback-cancel").hidden = true;
}

async function onRollback() {
  const result = $("rollback-result");
  const d = state.data;
  if (!d) return;
  if (!key("adminKey")) {
    result.textContent = "Enter the admin key above first.";
    result.className = "bad";
    return;
  }
  if (state.confirming === null) {
    // First click: say exactly what will happen; the second click does it.
    state.confirming = $("rollback-to").value || defaultTarget(d);
    $("rollback").textContent = `Confirm: ${d.promoted || "base"} → ${state.confirming}`;
    $("rollback").classList.add("danger");
    $("rollback-cancel").hidden = false;
    result.textContent = "";
    return;
  }
  const target = state.confirming;
  resetRollback();
  result.textContent = "rolling back…";
  result.className = "";
  try {
    const resp = await fetch("/v1/strop/rollback", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders("adminKey") },
      body: JSON.stringify({ version: target }),
    });
    if (resp.ok) {
      const body = await resp.json();
      result.textContent = `Rolled back: ${body.from} → ${body.to}`;
      result.className = "good";
    } else {
      result.textContent = `Rollback failed: ${await errorMessage(resp)}`;
      result.className = "bad";
    }
  } catch (e) {
    result.textContent = `Rollback failed: ${e.message}`;
    result.className = "bad";
  }
  poll();
}

// --- queues, learner, events -------------------------------------------------------------

function renderQueues(q) {
  const rows = [
    h("tr", {}, h("th", {}, "build tasks"), h("td", { class: "num" }, q.build), h("td", { class: "muted" }, "Celery queue (backpressure)")),
    h("tr", {}, h("th", {}, "ingest tasks"), h("td", { class: "num" }, q.ingest), h("td", {}, "")),
    h("tr", { "data-queue": "dead_letter", class: q.dead_letter ? "bad" : "" },
      h("th", {}, "dead letters"), h("td", { class: "num" }, q.dead_letter ?? 0),
      h("td", { class: "muted" }, q.dead_letter
        ? ["builds that failed for good: fix the cause, then ", h("code", {}, "strop worker requeue")]
        : "no failed builds")),
  ];
  for (const [name, reader] of [["prompt_log", "ingest"], ["groups", "learner"], ["pairs", "learner"]]) {
    const s = q[name];
    rows.push(h("tr", { "data-queue": name }, h("th", {}, name.replace("_", " ")),
      h("td", { class: "num" }, s.length),
      h("td", { class: "muted" }, s.lag === null
        ? `no ${reader} reader yet`
        : `${s.lag ?? "?"} unread, ${s.pending ?? 0} pending (${reader})`)));
  }
  $("queues").replaceChildren(h("tbody", {}, rows));
}

function renderLearner(l, now) {
  const box = $("learner");
  if (!l) {
    box.replaceChildren(h("p", { class: "muted" }, "No learner state in Redis: the learner has not run."));
    return;
  }
  const skip = new Set(["phase", "updated", "age_s", "stale"]);
  const rows = Object.keys(l).filter((k) => !skip.has(k)).sort().map((k) => {
    const v = l[k];
    const text = v && typeof v === "object"
      ? Object.entries(v).map(([a, b]) => `${a} ${typeof b === "number" ? fmt(b, 4) : b}`).join(", ") || "–"
      : String(v);
    return h("tr", {}, h("th", {}, k), h("td", {}, text));
  });
  box.replaceChildren(
    h("p", {}, h("span", { class: `badge ${l.stale ? "rejected" : "promoted"}`, id: "learner-phase" }, l.phase || "?"),
      " updated ", typeof l.updated === "number" ? ago(now - l.updated) : "?",
      l.stale ? h("span", { class: "bad" }, " — stale: the learner may be stopped") : null),
    h("table", { class: "kv" }, h("tbody", {}, rows)));
}

function renderEvents(events) {
  const items = [...events].reverse().slice(0, 12).map((e) =>
    h("li", {}, h("span", { class: "muted" }, hhmm(e.time)), " ",
      h("span", { class: `badge ${e.kind}` }, e.kind.replace("_", " ")), " ",
      e.kind === "rolled_back" ? `${e.version} → ${e.previous || "base"}` : e.version,
      e.kind === "promoted" && e.previous ? ` (was ${e.previous})` : "",
      e.reason ? h("span", { class: "muted" }, ` — ${e.reason}`) : null));
  $("events").replaceChildren(...(items.length ? items : [h("li", { class: "muted" }, "No events yet.")]));
}

// --- the line chart ----------------------------------------------------------------------

/** Round tick steps (1, 2, 5 x 10^k) covering [lo, hi] in about `n` steps. */
function niceTicks(lo, hi, n = 4, integer = false) {
  const raw = (hi - lo) / n || 1;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 5, 10].map((m) => m * mag).find((x) => x >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
  return ticks;
}

/**
 * An SVG line chart in `el`: series of [time, value, count] points, time on x.
 * opts: series [{name, color, points, total?}], x [t0, t1], y [min|null, max|null],
 * marks [{t, label, color}] (vertical lines), integer (y ticks), dense (one point a minute).
 */
function lineChart(el, opts) {
  const W = 600, H = 220, M = { l: 44, r: 14, t: 16, b: 24 };
  const [x0, x1] = opts.x;
  const values = opts.series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
  let [yMin, yMax] = opts.y || [null, null];
  if (yMin === null) yMin = values.length ? Math.min(...values) : 0;
  if (yMax === null) yMax = values.length ? Math.max(...values) : 1;
  if (yMax - yMin < 1e-9) { yMin -= 0.5; yMax += 0.5; }
  if (opts.integer && yMin === 0) yMax = Math.max(yMax, 4);
  const ticks = niceTicks(yMin, yMax, 4, opts.integer);
  yMin = Math.min(yMin, ticks[0]);
  yMax = Math.max(yMax, ticks[ticks.length - 1]);
  const px = (t) => M.l + ((t - x0) / (x1 - x0)) * (W - M.l - M.r);
  const py = (v) => H - M.b - ((v - yMin) / (yMax - yMin)) * (H - M.t - M.b);

  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img" });
  // y grid and labels
  for (const t of ticks) {
    svg.append(s("line", { x1: M.l, x2: W - M.r, y1: py(t), y2: py(t), class: "grid" }));
    svg.append(s("text", { x: M.l - 6, y: py(t) + 4, class: "tick", "text-anchor": "end" },
      opts.integer ? String(Math.round(t)) : String(+t.toFixed(3))));
  }
  // x labels at round minutes (5, 10, 15, 30 ... min apart, about 6 of them)
  const span = (x1 - x0) / 60;
  const stepMin = [5, 10, 15, 30, 60, 120, 180, 240, 360].find((m) => span / m <= 6) || 720;
  for (let t = Math.ceil(x0 / (stepMin * 60)) * stepMin * 60; t <= x1; t += stepMin * 60) {
    svg.append(s("line", { x1: px(t), x2: px(t), y1: H - M.b, y2: H - M.b + 4, class: "axis" }));
    svg.append(s("text", { x: px(t), y: H - 6, class: "tick", "text-anchor": "middle" }, hhmm(t)));
  }
  svg.append(s("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis" }));
  svg.append(s("line", { x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, class: "axis" }));
  // promotions and rollbacks, so a reward change can be read against the version change
  const rowEnds = []; // per label row: where its last label ends
  for (const m of [...(opts.marks || [])].sort((a, b) => a.t - b.t)) {
    const x = px(m.t);
    svg.append(s("line", { x1: x, x2: x, y1: M.t, y2: H - M.b, class: "mark", stroke: m.color }));
    const right = x > W - 60; // near the right edge the label goes left of its line
    // stack the labels of close events instead of overprinting them (about 7 units a character)
    const width = 7 * m.label.length;
    const start = right ? x - 3 - width : x + 3;
    let row = 0;
    while (rowEnds[row] !== undefined && rowEnds[row] > start - 2) row++;
    rowEnds[row] = start + width;
    svg.append(s("text", {
      x: right ? x - 3 : x + 3, y: M.t - 4 + row * 11, class: "mark-label", fill: m.color,
      "text-anchor": right ? "end" : "start",
    }, m.label));
  }
  // the series: a gap of more than 3 minutes without data breaks the line
  for (const ser of opts.series) {
    const pts = ser.points.filter((p) => p[1] !== null && p[0] >= x0 - 60);
    let d = "";
    pts.forEach((p, i) => {
      const jump = i === 0 || p[0] - pts[i - 1][0] > 180;
      d += `${jump ? "M" : "L"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`;
    });
    if (d) svg.append(s("path", { d, stroke: ser.color, class: "line", "data-series": ser.name, "data-points": pts.length }));
    if (!opts.dense) {
      for (const p of pts) {
        const dot = s("circle", { cx: px(p[0]), cy: py(p[1]), r: 2.6, fill: ser.color });
        dot.append(s("title", {}, `${ser.name} ${hhmm(p[0])}: ${fmt(p[1])} (n=${p[2]})`));
        svg.append(dot);
      }
    }
  }
  if (!values.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle" }, "no data in this window"));
  }
  const legend = h("div", { class: "legend" }, opts.series.map((ser) => {
    const last = [...ser.points].reverse().find((p) => p[1] !== null);
    const note = ser.total !== undefined ? `${ser.total}` : last ? fmt(last[1]) : "–";
    return h("span", { class: "legend-item", "data-series": ser.name },
      h("span", { class: "swatch", style: `background:${ser.color}` }), ser.name, " ",
      h("span", { class: "muted" }, ser.total !== undefined ? `(total ${note})` : `(last ${note})`));
  }));
  el.replaceChildren(svg, legend);
}

// --- start -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  bindKey("api-key", "apiKey");
  bindKey("admin-key", "adminKey");
  $("window").addEventListener("change", poll);
  $("rollback").addEventListener("click", onRollback);
  $("rollback-cancel").addEventListener("click", resetRollback);
  poll();
});
