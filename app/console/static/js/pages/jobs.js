// Jobs: the list, a form that starts a prefix job, and a job's page, which follows the job's
// events while it runs (no reload): loss curves, progress, tokens per second and ETA, events,
// checkpoints, the result CSV, and cancel.

import { ApiError, enc, get, listAll, post } from "../api.js";
import { lineChart } from "../chart.js";
import { append, clear, field, fmtDuration, fmtNum, fmtTime, h, messageArea, table } from "../dom.js";

const ACTIVE = new Set(["validating_files", "queued", "running"]);
const POLL_MS = 1000;

export async function render(view, [jobId]) {
  return jobId ? renderDetail(view, jobId) : renderList(view);
}

// ---------------------------------------------------------------- list + create

function jobLink(job) {
  return h("a", { href: `#/jobs/${enc(job.id)}` }, job.id);
}

async function createForm(onCreated) {
  const message = messageArea();
  const [files, models] = await Promise.all([get("/v1/files?purpose=fine-tune&limit=200"), get("/v1/models")]);
  const usable = files.data.filter((f) => f.status === "processed");
  const bases = models.data.filter((m) => m.kind === "base").sort((a, b) => Number(b.served) - Number(a.served));
  const fileOptions = (blank) => [blank ? h("option", { value: "" }, "(none)") : null,
    ...usable.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id}, ${f.row_count ?? "?"} rows)`))];
  const training = h("select", { name: "training_file", required: true }, fileOptions(false));
  const validation = h("select", { name: "validation_file" }, fileOptions(true));
  const model = h("select", { name: "model" },
    bases.map((m) => h("option", { value: m.id }, m.served ? `${m.id} (served)` : m.id)));
  const suffix = h("input", { name: "suffix", maxlength: 40, pattern: "[a-z0-9-]{1,40}", placeholder: "e.g. support-v1" });
  const epochs = h("input", { name: "n_epochs", type: "number", min: 1, placeholder: "auto" });
  const lrm = h("input", { name: "learning_rate_multiplier", type: "number", min: 0, step: "any", placeholder: "auto" });
  const tokens = h("input", { name: "num_virtual_tokens", type: "number", min: 1, placeholder: "default" });
  const seed = h("input", { name: "seed", type: "number", placeholder: "random" });
  const submit = h("button", { type: "submit" }, "Start job");
  const form = h("form", { class: "grid", id: "create-job" },
    field("Training file", training, usable.length ? null : "Upload a valid fine-tune file on the Files page first"),
    field("Validation file", validation), field("Base model", model), field("Suffix", suffix, "a-z, 0-9 and -"),
    field("Epochs", epochs), field("Learning-rate multiplier", lrm), field("Virtual tokens", tokens),
    field("Seed", seed), h("div", {}, submit), message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.hide();
    const hyper = {};
    if (epochs.value) hyper.n_epochs = Number(epochs.value);
    if (lrm.value) hyper.learning_rate_multiplier = Number(lrm.value);
    const prefix = { hyperparameters: hyper };
    if (tokens.value) prefix.num_virtual_tokens = Number(tokens.value);
    const body = { model: model.value, training_file: training.value, method: { type: "prefix", prefix } };
    if (validation.value) body.validation_file = validation.value;
    if (suffix.value) body.suffix = suffix.value;
    if (seed.value) body.seed = Number(seed.value);
    submit.disabled = true;
    try {
      const job = await post("/v1/fine_tuning/jobs", body);
      onCreated(job);
    } catch (e) {
      message.error(e);
    } finally {
      submit.disabled = false;
    }
  });
  return h("details", { class: "create", open: true }, h("summary", {}, "New prefix-tuning job"), form);
}

async function renderList(view) {
  const message = messageArea();
  const list = h("div", { id: "job-list" });
  let timer = null;
  let stopped = false;

  async function refresh() {
    clearTimeout(timer);
    let jobs;
    try {
      jobs = await listAll("/v1/fine_tuning/jobs", { limit: 100, max: 500 });
    } catch (e) { message.error(e); return; }
    clear(list);
    if (!jobs.length) list.append(h("p", {}, "No jobs yet."));
    else {
      list.append(table(["job", "status", "base", "suffix", "fine-tuned model", "created"],
        jobs.map((j) => [jobLink(j), h("span", { class: `status status-${j.status}` }, j.status), j.model,
          j.user_provided_suffix || "", j.fine_tuned_model || "", fmtTime(j.created_at)]), "Your jobs"));
    }
    if (!stopped && jobs.some((j) => ACTIVE.has(j.status))) timer = setTimeout(refresh, 3 * POLL_MS);
  }

  view.append(h("h1", {}, "Jobs"), message);
  try {
    view.append(await createForm((job) => { location.hash = `#/jobs/${enc(job.id)}`; }));
  } catch (e) { message.error(e); }
  view.append(list);
  await refresh();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---------------------------------------------------------------- one job

/** A job's events in the server's order (oldest first here); `poll` adds those newer than the newest seen. */
class EventLog {
  constructor(jobId) {
    this.path = `/v1/fine_tuning/jobs/${enc(jobId)}/events`;
    this.seen = new Set();
    this.events = [];
  }

  async poll() {
    const fresh = []; // newest first, as the API pages them
    let after = null;
    for (let pages = 0; pages < 50; pages += 1) {
      const page = await get(`${this.path}?limit=100${after ? `&after=${enc(after)}` : ""}`);
      let reachedKnown = false;
      for (const ev of page.data) {
        if (this.seen.has(ev.id)) { reachedKnown = true; break; }
        fresh.push(ev);
      }
      if (reachedKnown || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    for (const ev of fresh.reverse()) { this.seen.add(ev.id); this.events.push(ev); }
  }

  /** One metrics point per step (a resumed run may repeat a step: the last one wins). */
  get metrics() {
    const byStep = new Map();
    for (const ev of this.events) if (ev.type === "metrics" && ev.data && typeof ev.data.step === "number") byStep.set(ev.data.step, ev.data);
    return [...byStep.values()].sort((a, b) => a.step - b.step);
  }
}

function parseCsv(text) {
  const rows = [];
  let row = [], cell = "", quoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { cell += '"'; i += 1; } else if (c === '"') quoted = false; else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(cell); cell = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i += 1;
      row.push(cell); rows.push(row); row = []; cell = "";
    } else cell += c;
  }
  if (cell || row.length) { row.push(cell); rows.push(row); }
  return rows;
}

async function resultTable(fileId) {
  const response = await get(`/v1/files/${enc(fileId)}/content`, { raw: true });
  const rows = parseCsv(await response.text()).filter((r) => r.some((c) => c !== ""));
  if (!rows.length) return h("p", {}, "The result file is empty.");
  return table(rows[0], rows.slice(1), `Results (${fileId})`);
}

async function renderDetail(view, jobId) {
  const message = messageArea();
  const log = new EventLog(jobId);
  let job;
  try {
    job = await get(`/v1/fine_tuning/jobs/${enc(jobId)}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      view.append(h("h1", {}, "Job not found"), h("p", { class: "message error", role: "alert" }, e.message),
        h("p", {}, h("a", { href: "#/jobs" }, "All jobs")));
      return null;
    }
    throw e;
  }
  const summary = h("dl", { class: "summary", id: "job-summary" });
  const progress = h("progress", { max: 1, value: 0, "aria-label": "Training progress", id: "job-progress" });
  const progressText = h("span", { class: "progress-text", id: "job-progress-text", "aria-live": "polite" });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger" }, "Cancel job");
  const tryIt = h("a", { href: "#/playground", class: "button", hidden: true, id: "try-model" }, "Try it in the playground");
  const chartBox = h("div", { class: "chart-box", id: "loss-chart" });
  const eventsBox = h("div", { id: "events" });
  const checkpointsBox = h("div", { id: "checkpoints" });
  const resultsBox = h("div", { id: "results" });
  view.append(h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")), h("h1", {}, `Job ${jobId}`), message,
    summary, h("div", { class: "row" }, progress, progressText), h("div", { class: "row" }, cancel, tryIt),
    h("h2", {}, "Loss"), chartBox, h("h2", {}, "Checkpoints"), checkpointsBox,
    h("h2", {}, "Results"), resultsBox, h("h2", {}, "Events"), eventsBox);
  const chart = await lineChart(chartBox, {
    xLabel: "step", yLabel: "loss",
    series: [{ label: "training loss", color: "#1f6feb" }, { label: "validation loss", color: "#d9480f" }],
  });

  let timer = null;
  let stopped = false;
  let resultsShown = false;

  cancel.addEventListener("click", async () => {
    message.hide();
    cancel.disabled = true;
    try {
      job = await post(`/v1/fine_tuning/jobs/${enc(jobId)}/cancel`);
      message.ok(job.status === "cancelled" ? "Job cancelled." : "Cancel requested: the job stops within seconds.");
      draw();
      schedule();
    } catch (e) {
      message.error(e);
      cancel.disabled = false;
    }
  });

  function draw() {
    const points = log.metrics;
    const last = points[points.length - 1];
    const etaFromJob = job.estimated_finish ? job.estimated_finish - Date.now() / 1000 : null;
    clear(summary);
    const items = [["status", h("span", { class: `status status-${job.status}`, id: "job-status" }, job.status)],
      ["base", job.model], ["suffix", job.user_provided_suffix || ""],
      ["fine-tuned model", job.fine_tuned_model || ""], ["training file", job.training_file],
      ["validation file", job.validation_file || ""], ["trained tokens", job.trained_tokens ?? ""],
      ["tokens per second", last ? fmtNum(last.tokens_per_s, 3) : ""],
      ["ETA", ACTIVE.has(job.status) ? fmtDuration(last && last.eta_s != null ? last.eta_s : etaFromJob) : ""],
      ["created", fmtTime(job.created_at)], ["finished", fmtTime(job.finished_at)]];
    if (job.error) items.push(["error", `${job.error.message}${job.error.code ? ` (${job.error.code})` : ""}`]);
    for (const [k, v] of items) append(summary, [h("dt", {}, k), h("dd", {}, v)]);
    if (last && last.total_steps) {
      progress.max = last.total_steps;
      progress.value = last.step;
      progressText.textContent = `step ${last.step} of ${last.total_steps}` +
        (last.train_loss != null ? `, training loss ${fmtNum(last.train_loss)}` : "") +
        (last.valid_loss != null ? `, validation loss ${fmtNum(last.valid_loss)}` : "");
    } else {
      progressText.textContent = ACTIVE.has(job.status) ? `${job.status}…` : "";
    }
    if (job.status === "succeeded") { progress.max = 1; progress.value = 1; }
    cancel.hidden = !ACTIVE.has(job.status);
    if (job.fine_tuned_model && job.status === "succeeded") {
      tryIt.hidden = false;
      tryIt.href = `#/playground/${enc(job.fine_tuned_model)}`;
    }
    chart.setData([points.map((p) => p.step), points.map((p) => p.train_loss ?? null),
      points.map((p) => p.valid_loss ?? null)]);
    clear(eventsBox).append(h("ol", { class: "events", reversed: true },
      log.events.slice(-200).reverse().map((ev) => h("li", { class: `level-${ev.level}` },
        h("time", {}, fmtTime(ev.created_at)), " ", ev.message))));
  }

  async function drawCheckpoints() {
    const cks = await listAll(`/v1/fine_tuning/jobs/${enc(jobId)}/checkpoints`, { limit: 100, max: 200 });
    clear(checkpointsBox).append(cks.length ? table(["step", "training loss", "validation loss", "checkpoint"],
      cks.map((c) => [String(c.step_number), fmtNum(c.metrics.train_loss), fmtNum(c.metrics.valid_loss),
        h("code", {}, c.fine_tuned_model_checkpoint)])) : h("p", {}, "No checkpoints yet."));
  }

  async function drawResults() {
    if (resultsShown) return;
    if (!job.result_files || !job.result_files.length) {
      clear(resultsBox).append(h("p", {}, ACTIVE.has(job.status) ? "Written when the job succeeds." : "No result file."));
      return;
    }
    resultsShown = true;
    clear(resultsBox);
    for (const id of job.result_files) resultsBox.append(await resultTable(id));
  }

  function schedule() {
    clearTimeout(timer);
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }

  let ticks = 0;
  async function tick() {
    try {
      [job] = await Promise.all([get(`/v1/fine_tuning/jobs/${enc(jobId)}`), log.poll()]);
      draw();
      ticks += 1;
      const active = ACTIVE.has(job.status);
      if (!active || ticks % 5 === 1) await drawCheckpoints();
      if (!active) await drawResults();
      if (active) schedule();
    } catch (e) {
      message.error(e);
      schedule();
    }
  }

  await tick();
  return () => { stopped = true; clearTimeout(timer); if (chart.destroy) chart.destroy(); };
}
