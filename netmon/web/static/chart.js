// Connects per second, failures and successes apart: hand-drawn SVG, stacked bars (failed
// at the bottom, in red, so a few failures stay visible under many successes). Two series
// of integers need no charting library to ship, audit and keep up to date.

const NS = "http://www.w3.org/2000/svg";
const W = 900, H = 220;
const PAD = { left: 48, right: 8, top: 10, bottom: 22 };

function node(tag, attrs, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

// the smallest of 1, 2, 5 x 10^n at or above v
function niceCeil(v) {
  if (v <= 1) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

export class RateChart {
  // svg: the <svg> to draw in; maxSpan: seconds kept and shown at most
  constructor(svg, maxSpan = 300) {
    this.svg = svg;
    this.maxSpan = maxSpan;
    this.buckets = new Map(); // second (epoch) -> [succeeded, failed]
  }

  add(timestamp, isFailure) {
    const sec = Math.floor(Date.parse(timestamp) / 1000);
    if (Number.isNaN(sec)) return;
    let b = this.buckets.get(sec);
    if (!b) this.buckets.set(sec, (b = [0, 0]));
    b[isFailure ? 1 : 0] += 1;
  }

  // draw the `span` seconds up to now (span clamped to maxSpan); returns the number of
  // seconds with a bar, also left in the svg's data-points attribute
  draw(span, nowMs = Date.now()) {
    span = Math.max(1, Math.min(Math.round(span), this.maxSpan));
    const end = Math.floor(nowMs / 1000);
    const start = end - span + 1;
    for (const sec of this.buckets.keys()) if (sec < end - this.maxSpan) this.buckets.delete(sec);
    let top = 0;
    for (let s = start; s <= end; s++) {
      const b = this.buckets.get(s);
      if (b) top = Math.max(top, b[0] + b[1]);
    }
    const ymax = niceCeil(top);
    const plotW = W - PAD.left - PAD.right, plotH = H - PAD.top - PAD.bottom;
    const bw = plotW / span;
    const y = (v) => PAD.top + plotH - (v / ymax) * plotH;
    let ok = "", bad = "", points = 0;
    for (let s = start; s <= end; s++) {
      const b = this.buckets.get(s);
      if (!b) continue;
      points += 1;
      const x = (PAD.left + (s - start) * bw).toFixed(1);
      const w = Math.max(bw - 0.5, 0.8).toFixed(1);
      const yFail = y(b[1]), yAll = y(b[0] + b[1]);
      if (b[1]) bad += `M${x} ${y(0).toFixed(1)}V${yFail.toFixed(1)}h${w}V${y(0).toFixed(1)}z`;
      if (b[0]) ok += `M${x} ${yFail.toFixed(1)}V${yAll.toFixed(1)}h${w}V${yFail.toFixed(1)}z`;
    }
    const parts = [];
    for (const v of [0, ymax / 2, ymax]) {
      parts.push(node("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
      parts.push(node("text", { class: "axis", x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" },
        Number.isInteger(v) ? String(v) : v.toFixed(1)));
    }
    const step = span > 120 ? 60 : span > 30 ? 10 : 5; // a label every `step` seconds back
    for (let back = 0; back < span; back += step) {
      const x = PAD.left + (span - back - 0.5) * bw;
      const label = back === 0 ? "now" : back % 60 ? `-${back} s` : `-${back / 60} min`;
      parts.push(node("text", { class: "axis", x, y: H - 6, "text-anchor": back === 0 ? "end" : "middle" }, label));
    }
    parts.push(node("path", { class: "bar fail", d: bad }));
    parts.push(node("path", { class: "bar ok", d: ok }));
    this.svg.replaceChildren(...parts);
    this.svg.dataset.points = String(points);
    return points;
  }
}
