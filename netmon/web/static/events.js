// What an event means to a person, from the API's own fields, and the DOM helper every
// view uses. Strings from the host (command names, unix paths) are untrusted: they only
// ever become text nodes, never markup.

// outcomes that are not a failure: the handshake succeeded, is still going, or the hook
// could not know; any other outcome (refused, timeout, reset, ...) is one
const NOT_FAILED = new Set(["established", "pending", "unknown"]);

// Did this attempt fail? As /api/top counts "failed": a TCP handshake's outcome decides
// when there is one (a non-blocking connect's EINPROGRESS is no failure by itself), else
// what connect() returned (return_code null: the hook could not know).
export function failed(ev) {
  if (ev.outcome != null) return !NOT_FAILED.has(ev.outcome);
  return ev.return_code != null && ev.error != null;
}

// what connect() returned, then what the handshake did when that was not the end of it:
// "ok", "ENOENT", "EINPROGRESS → established", "ECONNREFUSED → refused", "unknown"
export function resultText(ev) {
  if (ev.return_code == null) return ev.outcome || "unknown";
  if (ev.error == null) return "ok";
  return ev.outcome ? `${ev.error} → ${ev.outcome}` : ev.error;
}

// the row class: failed, in-progress (an error code that is not a failure), or ok
export function resultClass(ev) {
  if (failed(ev)) return "fail";
  return ev.error != null || ev.return_code == null ? "other" : "ok";
}

export function clock(timestamp) {
  const d = new Date(timestamp);
  if (Number.isNaN(d.getTime())) return String(timestamp);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function latency(us) {
  if (us == null) return "";
  return us < 1000 ? `${us} µs` : `${(us / 1000).toFixed(1)} ms`;
}

export function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

// el("td", {class: "x"}, "text", child): children that are not nodes become text nodes
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v);
  }
  for (const c of children) {
    node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  }
  return node;
}

// replace a node's children
export function fill(node, ...children) {
  node.replaceChildren(...children);
}
