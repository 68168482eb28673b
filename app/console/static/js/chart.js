// Line charts with uPlot, loaded from /ui/vendor (installed by `npm ci`). Without it the page
// still works: the chart's place says why there is no chart, and the numbers stay in the tables.
// The chart element carries data-points (how many x values it draws), which the browser tests read.

import { h } from "./dom.js";

let uPlotPromise = null;

function loadUPlot() {
  uPlotPromise ||= import("/ui/vendor/uPlot.esm.js").then((m) => m.default).catch(() => null);
  return uPlotPromise;
}

/** A chart of several series over one x axis: series = [{label, color}]. */
export async function lineChart(container, { xLabel, yLabel, series, height = 260 }) {
  const uPlot = await loadUPlot();
  const el = h("div", { class: "chart", role: "img", "aria-label": `${series.map((s) => s.label).join(" and ")} by ${xLabel}` });
  el.dataset.points = "0";
  container.append(el);
  if (!uPlot) {
    el.classList.add("unavailable");
    el.append(h("p", { class: "message" },
      "Charts are unavailable: the charting library (uPlot) is not installed on this server. " +
      "make run (or make console) installs it with npm ci; the numbers stay live."));
    return { setData(data) { el.dataset.points = String(data[0].length); }, el };
  }
  const opts = {
    width: Math.max(320, container.clientWidth || 640),
    height,
    scales: { x: { time: false } },
    axes: [{ label: xLabel }, { label: yLabel }],
    series: [{ label: xLabel }, ...series.map((s) => ({ label: s.label, stroke: s.color, width: 2, spanGaps: true }))],
  };
  const plot = new uPlot(opts, [[], ...series.map(() => [])], el);
  const resize = () => plot.setSize({ width: Math.max(320, container.clientWidth || 640), height });
  window.addEventListener("resize", resize);
  return {
    el,
    setData(data) {
      plot.setData(data);
      el.dataset.points = String(plot.data[0].length);
    },
    destroy() { window.removeEventListener("resize", resize); plot.destroy(); },
  };
}
