// The live page: the header from /health, the chart from the unfiltered event stream, top
// lists and recent failures from /api/top and /api/events, a live tail from a stream with
// the API's own filter parameters. Every string from the host goes into text nodes.

import { ApiError, EventStream, Unauthorized, getJSON, request, setToken, token } from "./api.js";
import { RateChart } from "./chart.js";
import { clock, duration, el, failed, fill, latency, resultClass, resultText } from "./events.js";

const CHART_SPAN = 300; // seconds the chart shows at most (less while netmon is younger)
const BACKFILL = 5000; // events read at load to draw the chart's past
const TAIL_ROWS = 200; // rows the tail keeps
const TAIL_BACKFILL = 50;
const ERROR_ROWS = 50;
const HEALTH_MS = 2000, TOPS_MS = 3000, DRAW_MS = 1000, DROP_BANNER_MS = 60000;
const TOPS = ["destination", "command", "error"];

const $ = (id) => document.getElementById(id);
const chart = new RateChart($("chart"), CHART_SPAN);
const eventOf = new WeakMap(); // table row -> its event, for the detail view
const live = { chart: null, tail: null, timers: [] };
const tail = { filters: {}, paused: false, queue: [], flushing: false, generation: 0 };
const health = { uptime: 0, dropped: null, droppedAt: 0, reason: null };

// ---- header and banner ----

function setBanner() {
  const parts = [];
  if (health.reason) parts.push(`netmon is unhealthy: ${health.reason}`);
  if (Date.now() - health.droppedAt < DROP_BANNER_MS) {
    parts.push(`events are being dropped (${health.dropped} in all): the kernel ring buffer ` +
      "fills faster than netmon drains it; raise --ringbuf-size");
  }
  $("banner").textContent = parts.join(" — ");
  $("banner").hidden = parts.length === 0;
}

async function pollHealth() {
  try {
    const { status, body } = await request("/health");
    health.uptime = body.uptime_seconds;
    $("backend").textContent = body.backend;
    $("uptime").textContent = duration(body.uptime_seconds);
    $("captured").textContent = body.events_captured.toLocaleString();
    $("dropped").textContent = body.events_dropped.toLocaleString();
    $("evicted").textContent = body.events_evicted.toLocaleString();
    if (health.dropped !== null && body.events_dropped > health.dropped) health.droppedAt = Date.now();
    health.dropped = body.events_dropped;
    health.reason = status === 200 ? null : body.reason || body.status;
  } catch (e) {
    health.reason = "it does not answer";
  }
  $("dropped").classList.toggle("fail", Date.now() - health.droppedAt < DROP_BANNER_MS);
  setBanner();
}

// ---- rows ----

// the name the process resolved (netmon --dns-names) in place of the IP; the IP in the title
function destinationText(ev) {
  return ev.destination_name ? `${ev.destination_name}:${ev.destination_port}`
    : ev.destination ?? "";
}

function eventRow(ev, columns) {
  const cells = {
    time: clock(ev.timestamp), pid: ev.pid, command: ev.command,
    destination: destinationText(ev), protocol: ev.protocol ?? "",
    result: resultText(ev), latency: latency(ev.latency_us),
  };
  const titles = { ...cells, destination: ev.destination_name
    ? [ev.destination, ...(ev.destination_cname_chain ?? [])].join(" via ") : cells.destination };
  const row = el("tr", { class: resultClass(ev), "data-seq": ev.seq },
    ...columns.map((c) => el("td", { class: c, title: titles[c] }, cells[c])));
  eventOf.set(row, ev);
  return row;
}

function showDetail(ev) {
  $("detail-seq").textContent = String(ev.seq);
  fill($("detail-fields").tBodies[0], ...Object.entries(ev).map(([k, v]) =>
    el("tr", {}, el("th", {}, k), el("td", {}, typeof v === "string" ? v : JSON.stringify(v)))));
  $("detail").hidden = false;
}

function onRowClick(e) {
  const row = e.target.closest("tr");
  const ev = row && eventOf.get(row);
  if (ev) showDetail(ev);
}

// ---- live tail ----

const TAIL_COLUMNS = ["time", "pid", "command", "destination", "protocol", "result", "latency"];

function flushTail() {
  tail.flushing = false;
  const body = $("tail-table").tBodies[0];
  const rows = tail.queue.splice(0).slice(-TAIL_ROWS).reverse(); // newest first
  body.prepend(...rows.map((item) => item instanceof Node ? item : eventRow(item, TAIL_COLUMNS)));
  while (body.rows.length > TAIL_ROWS) body.lastElementChild.remove();
}

function toTail(item) {
  tail.queue.push(item);
  if (tail.queue.length > 4 * TAIL_ROWS) tail.queue.splice(0, tail.queue.length - TAIL_ROWS);
  if (!tail.flushing) {
    tail.flushing = true;
    setTimeout(flushTail, 100); // one DOM update per batch, however fast events come
  }
}

function gapRow(gap) {
  return el("tr", { class: "gap" }, el("td", { colspan: TAIL_COLUMNS.length },
    `${gap.missed} events were overwritten in netmon's store before they could be shown`));
}

function filterError(message) {
  $("filter-error").textContent = message || "";
  $("filter-error").hidden = !message;
}

function setStreamState(name, error) {
  $("stream-state").textContent = name === "failed" ? `stopped: ${error.message}` : name;
}

async function startTail() {
  const generation = ++tail.generation; // a newer call (new filters) supersedes this one
  if (live.tail) live.tail.stop();
  live.tail = null;
  tail.queue = [];
  fill($("tail-table").tBodies[0]);
  filterError(null);
  let page;
  try {
    page = await getJSON("/api/events", { ...tail.filters, limit: TAIL_BACKFILL });
  } catch (e) {
    if (e instanceof ApiError && e.status === 400) return filterError(e.message);
    return report(e);
  }
  if (generation !== tail.generation) return;
  page.events.forEach(toTail);
  live.tail = new EventStream(tail.filters, {
    event: toTail,
    gap: (g) => toTail(gapRow(g)),
    state: (name, error) => {
      if (error instanceof Unauthorized) report(error);
      else if (error) filterError(error.message);
    },
  });
  if (!tail.paused) live.tail.start(page.next_after);
  else live.tail.after = page.next_after;
}

function readFilters() {
  const form = $("filters");
  const f = {};
  for (const name of ["command", "pid", "dest", "result"]) {
    const v = form.elements[name].value.trim();
    if (v) f[name] = v;
  }
  return f;
}

function setFilter(name, value) {
  $("filters").elements[name].value = value;
  tail.filters = readFilters();
  startTail();
}

function togglePause() {
  tail.paused = !tail.paused;
  $("pause").textContent = tail.paused ? "Resume" : "Pause";
  $("tail").classList.toggle("paused", tail.paused);
  if (!live.tail) return;
  if (tail.paused) live.tail.stop();
  else live.tail.start(); // after the last event shown: what came meanwhile follows
}

// ---- top lists and recent failures ----

const TOP_KEY = {
  destination: (t) => t.destination ?? "(none)",
  command: (t) => t.command,
  error: (t) => t.error ?? `return code ${t.return_code}`,
};
const TOP_FILTER = { destination: "dest", command: "command", error: "result" };

function destFilter(destination) {
  if (destination.startsWith("/") || destination.startsWith("@")) return destination;
  if (destination.startsWith("[")) return destination.slice(1, destination.indexOf("]"));
  return destination.slice(0, destination.lastIndexOf(":"));
}

function topRow(by, entry) {
  const key = TOP_KEY[by](entry);
  const row = el("tr", {},
    el("td", { class: "key", title: key }, key), el("td", { class: "num" }, entry.count),
    el("td", { class: entry.failed ? "num fail" : "num" }, entry.failed));
  const value = by === "destination" ? entry.destination && destFilter(entry.destination)
    : by === "error" ? entry.error : entry.command;
  if (value) row.addEventListener("click", () => setFilter(TOP_FILTER[by], value));
  return row;
}

async function refreshTops() {
  const windowSec = Number($("window").value);
  try {
    const [tops, errors] = await Promise.all([
      Promise.all(TOPS.map((by) => getJSON("/api/top", { by, duration: windowSec, limit: 10 }))),
      getJSON("/api/events", { result: "error", since: `${windowSec}s`, limit: 200 }),
    ]);
    tops.forEach((t, i) => fill($(`top-${TOPS[i]}`).tBodies[0],
      ...t.top.map((entry) => topRow(TOPS[i], entry))));
    const failures = errors.events.filter(failed).reverse().slice(0, ERROR_ROWS);
    fill($("error-table").tBodies[0],
      ...failures.map((ev) => eventRow(ev, ["time", "command", "destination", "result"])));
    $("tops").dataset.loaded = new Date().toISOString();
  } catch (e) {
    report(e);
  }
}

// ---- connecting, with or without a token ----

function stopLive() {
  live.timers.forEach(clearInterval);
  live.timers = [];
  for (const s of [live.chart, live.tail]) if (s) s.stop();
  live.chart = live.tail = null;
}

function showLogin(message) {
  stopLive();
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-message").textContent = message;
  $("token").focus();
}

function report(e) {
  if (e instanceof Unauthorized) {
    showLogin(token() ? "netmon refused this token: enter the right one." :
      "This netmon needs a bearer token: paste the one in the file given to " +
      "--auth-token-file. The page keeps it for this tab only and sends it in an " +
      "Authorization header.");
  } else {
    $("stream-state").textContent = `error: ${e.message}`;
  }
}

async function connect() {
  stopLive();
  let past;
  try {
    past = await getJSON("/api/events", { since: `${CHART_SPAN}s`, limit: BACKFILL });
  } catch (e) {
    report(e);
    if (!(e instanceof Unauthorized)) setTimeout(connect, 5000);
    return;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  for (const ev of past.events) chart.add(ev.timestamp, failed(ev));
  live.chart = new EventStream({}, {
    event: (ev) => chart.add(ev.timestamp, failed(ev)),
    gap: () => {},
    state: (name, error) => (error instanceof Unauthorized ? report(error) : setStreamState(name, error)),
  });
  live.chart.start(past.next_after);
  const draw = () => chart.draw(Math.max(60, health.uptime));
  draw();
  live.timers.push(setInterval(draw, DRAW_MS), setInterval(refreshTops, TOPS_MS));
  refreshTops();
  startTail();
}

function init() {
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    setToken($("token").value.trim());
    $("token").value = "";
    connect();
  });
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    tail.filters = readFilters();
    startTail();
  });
  $("clear").addEventListener("click", () => {
    $("filters").reset();
    tail.filters = {};
    startTail();
  });
  $("pause").addEventListener("click", togglePause);
  $("window").addEventListener("change", refreshTops);
  $("tail-table").addEventListener("click", onRowClick);
  $("error-table").addEventListener("click", onRowClick);
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
  pollHealth();
  setInterval(pollHealth, HEALTH_MS);
  connect();
}

init();
