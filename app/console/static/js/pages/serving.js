// Serving: the inference engine's live numbers from /metrics (this API process), read every two
// seconds: rows per decode step, queue depth, tokens per second, adapter cache hits.

import { lineChart } from "../chart.js";
import { clear, fmtNum, h, messageArea, table } from "../dom.js";

const POLL_MS = 2000;
const HISTORY = 150;

/** Prometheus text format -> Map("name{labels}" -> value), and name -> [{labels, value}]. */
export function parseMetrics(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    if (!samples.has(m[1])) samples.set(m[1], []);
    samples.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return samples;
}

const total = (samples, name) => (samples.get(name) || []).reduce((s, x) => s + x.value, 0);

export async function render(view) {
  const message = messageArea();
  const numbers = h("div", { id: "serving-numbers" });
  const extra = h("div", { id: "serving-extra" });
  const chartBox = h("div", { class: "chart-box", id: "serving-chart" });
  view.append(h("h1", {}, "Serving"),
    h("p", {}, "Live numbers of this API process's inference engine, from /metrics, every 2 s."),
    message, numbers, chartBox, extra);
  const chart = await lineChart(chartBox, {
    xLabel: "seconds (0 = now)", yLabel: "value",
    series: [{ label: "tokens per second", color: "#1f6feb" }, { label: "rows per decode step", color: "#2f9e44" },
      { label: "queue depth", color: "#d9480f" }],
  });
  const history = [];
  let previous = null;
  let timer = null;
  let stopped = false;

  async function tick() {
    let text;
    try {
      const r = await fetch("/metrics");
      if (!r.ok) throw new Error(`/metrics answered ${r.status}`);
      text = await r.text();
      message.hide();
    } catch (e) {
      message.error(e);
      if (!stopped) timer = setTimeout(tick, POLL_MS);
      return;
    }
    const s = parseMetrics(text);
    const now = Date.now() / 1000;
    const cur = {
      t: now,
      rowsSum: total(s, "prefixd_batch_size_sum"), rowsCount: total(s, "prefixd_batch_size_count"),
      adaptersSum: total(s, "prefixd_batch_distinct_adapters_sum"),
      tokens: total(s, "prefixd_generated_tokens_total"),
      hits: total(s, "prefixd_adapter_cache_hits_total"), misses: total(s, "prefixd_adapter_cache_misses_total"),
    };
    const queue = total(s, "prefixd_queue_depth");
    const steps = previous ? cur.rowsCount - previous.rowsCount : 0;
    const rowsNow = steps > 0 ? (cur.rowsSum - previous.rowsSum) / steps : 0;
    const tokRate = previous && now > previous.t ? (cur.tokens - previous.tokens) / (now - previous.t) : 0;
    previous = cur;
    const lookups = cur.hits + cur.misses;
    const rows = [
      ["queue depth (requests waiting)", fmtNum(queue)],
      ["tokens per second (last 2 s)", fmtNum(tokRate, 3)],
      ["tokens per second (last batch)", fmtNum(total(s, "prefixd_tokens_per_second"), 3)],
      ["rows per decode step (last 2 s)", steps > 0 ? fmtNum(rowsNow, 3) : "idle"],
      ["rows per decode step (since start)", cur.rowsCount ? fmtNum(cur.rowsSum / cur.rowsCount, 3) : ""],
      ["distinct adapters per step (since start)", cur.rowsCount ? fmtNum(cur.adaptersSum / cur.rowsCount, 3) : ""],
      ["decode steps", fmtNum(cur.rowsCount, 12)],
      ["tokens generated", fmtNum(cur.tokens, 12)],
      ["adapter cache hits", fmtNum(cur.hits, 12)],
      ["adapter cache misses", fmtNum(cur.misses, 12)],
      ["adapter cache hit rate", lookups ? `${fmtNum((100 * cur.hits) / lookups, 3)} %` : ""],
      ["adapters in cache", fmtNum(total(s, "prefixd_adapter_cache_size"))],
    ];
    clear(numbers).append(table(["measure", "value"], rows, "Inference engine"));
    const jobs = (s.get("prefixd_jobs") || []).map((x) => [x.labels.status || "", fmtNum(x.value, 12)]);
    const rejected = (s.get("prefixd_rejected_total") || []).map((x) => [x.labels.reason || "", fmtNum(x.value, 12)]);
    clear(extra);
    if (jobs.length) extra.append(table(["job status", "jobs"], jobs, "Jobs (all tenants)"));
    if (rejected.length) extra.append(table(["reason", "requests refused"], rejected, "Refused for load or quota"));
    history.push([now, tokRate, steps > 0 ? rowsNow : 0, queue]);
    if (history.length > HISTORY) history.shift();
    chart.setData([history.map((p) => Math.round(p[0] - now)), history.map((p) => p[1]), history.map((p) => p[2]),
      history.map((p) => p[3])]);
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }

  await tick();
  return () => { stopped = true; clearTimeout(timer); if (chart.destroy) chart.destroy(); };
}
