// Talking to netmon: JSON requests and the event stream. The bearer token, when the server
// wants one, is kept for this tab in sessionStorage and sent only in the Authorization
// header: never in a URL, where logs and history would keep it.

const TOKEN_KEY = "netmon.token";
const RETRY_MS = 2000;

export class Unauthorized extends Error {}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(accept) {
  const h = { Accept: accept };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

// path?name=value for the parameters that have a value
export function url(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

async function failure(res) {
  if (res.status === 401) return new Unauthorized("the server wants a bearer token");
  const body = await res.json().catch(() => null);
  return new ApiError(res.status, (body && body.message) || res.statusText);
}

// {status, body} of a GET whose answer is JSON whatever its status (/health: 503 too)
export async function request(path, params) {
  const res = await fetch(url(path, params), { headers: headers("application/json"), cache: "no-store" });
  return { status: res.status, body: await res.json() };
}

// the JSON answer of a GET; Unauthorized on 401, ApiError (with the server's message) else
export async function getJSON(path, params) {
  const res = await fetch(url(path, params), { headers: headers("application/json"), cache: "no-store" });
  if (!res.ok) throw await failure(res);
  return res.json();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Server-Sent Events from /api/events/stream, read with fetch so the token can travel in
// a header (EventSource cannot send one). After a broken connection it reconnects,
// resuming after the last event id it saw, so nothing is lost or repeated. A 400 (a bad
// filter) or a 401 ends it: retrying would not help.
//   handlers: event(ev), gap(info), state(name, message)
export class EventStream {
  constructor(params, handlers) {
    this.params = params;
    this.on = handlers;
    this.after = null;
    this.controller = null;
    this.running = false;
  }

  start(after) {
    if (after !== undefined) this.after = after;
    this.running = true;
    this.run();
  }

  stop() {
    this.running = false;
    if (this.controller) this.controller.abort();
  }

  async run() {
    while (this.running) {
      const controller = new AbortController();
      this.controller = controller;
      let wait = RETRY_MS;
      try {
        const params = { ...this.params, after: this.after };
        const res = await fetch(url("/api/events/stream", params), {
          headers: headers("text/event-stream"), cache: "no-store", signal: controller.signal,
        });
        if (!res.ok) throw await failure(res);
        this.on.state("live");
        await this.read(res.body.pipeThrough(new TextDecoderStream()).getReader());
      } catch (e) {
        if (!this.running || controller.signal.aborted) return;
        if (e instanceof Unauthorized || (e instanceof ApiError && e.status === 400)) {
          this.running = false;
          this.on.state("failed", e);
          return;
        }
        if (e instanceof ApiError && e.status === 429) wait = 5000;
      }
      if (!this.running) return;
      this.on.state("reconnecting");
      await sleep(wait);
    }
  }

  async read(reader) {
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const blocks = (buffer + value).split("\n\n");
      buffer = blocks.pop();
      for (const block of blocks) this.message(block);
    }
  }

  message(block) {
    let kind = "message", data = "", id = null;
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // a comment: the greeting or a keepalive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") kind = value;
      else if (field === "data") data = data ? `${data}\n${value}` : value;
      else if (field === "id") id = value;
    }
    if (!data) return;
    if (id !== null) this.after = Number(id);
    const body = JSON.parse(data);
    if (kind === "gap") this.on.gap(body);
    else this.on.event(body);
  }
}
