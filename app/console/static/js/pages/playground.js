// Playground: one prompt, streamed at once to the served base and up to three of your adapters,
// side by side, with the same sampling parameters. When all have finished, each adapter's output
// marks where it departs from the base's: the difference is what the prefix learned.

import { get, stream } from "../api.js";
import { append, clear, field, h, messageArea } from "../dom.js";

const SLOTS = 3;

function commonPrefixLength(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i += 1;
  return i;
}

export async function render(view, [preselect]) {
  const message = messageArea();
  const models = (await get("/v1/models")).data;
  const base = models.find((m) => m.kind === "base" && m.served);
  const adapters = models.filter((m) => m.kind === "adapter");
  if (!base) {
    view.append(h("h1", {}, "Playground"),
      h("p", { class: "message error", role: "alert" }, "No base is served right now: the server is still loading it."));
    return null;
  }
  const servable = adapters.filter((m) => m.base === base.id);
  const slots = Array.from({ length: SLOTS }, (_, i) => h("select", { name: `adapter-${i + 1}` },
    h("option", { value: "" }, "(none)"),
    servable.map((m) => h("option", { value: m.id, selected: i === 0 && m.id === preselect }, m.id))));
  if (!preselect && servable.length) slots[0].value = servable[0].id;

  const prompt = h("textarea", { name: "prompt", rows: 4, cols: 80, required: true }, "");
  const endpoint = h("select", { name: "endpoint" },
    h("option", { value: "completions" }, "completion (/v1/completions)"),
    h("option", { value: "chat" }, "chat, one user message (/v1/chat/completions)"));
  const temperature = h("input", { name: "temperature", type: "number", min: 0, max: 2, step: "0.1", value: "0" });
  const topP = h("input", { name: "top_p", type: "number", min: 0, max: 1, step: "0.05", value: "1" });
  const maxTokens = h("input", { name: "max_tokens", type: "number", min: 1, value: "32" });
  const seed = h("input", { name: "seed", type: "number", placeholder: "none" });
  const stop = h("input", { name: "stop", placeholder: "none" });
  const run = h("button", { type: "submit", id: "run-playground" }, "Run");
  const halt = h("button", { type: "button", hidden: true }, "Stop");
  const columns = h("div", { class: "columns", id: "outputs" });
  const form = h("form", { class: "grid", id: "playground-form" },
    h("div", { class: "wide" }, field("Prompt", prompt)), field("Mode", endpoint),
    field("Temperature", temperature, "0 decodes greedily"), field("top_p", topP), field("Max tokens", maxTokens),
    field("Seed", seed), field("Stop string", stop),
    slots.map((s, i) => field(`Adapter ${i + 1}`, s)), h("div", {}, run, halt), message);

  let controller = null;
  halt.addEventListener("click", () => controller && controller.abort());

  function pane(modelId, label) {
    const out = h("pre", { class: "output", "aria-live": "polite", "aria-label": `Output of ${modelId}` });
    const state = h("p", { class: "pane-state" }, "waiting…");
    const col = h("section", { class: "pane", dataset: { model: modelId, state: "waiting", chunks: "0" } },
      h("h2", {}, label), h("p", {}, h("code", {}, modelId)), out, state);
    col.out = out;
    col.stateEl = state;
    col.text = "";
    return col;
  }

  async function runOne(col, body, signal) {
    const chat = endpoint.value === "chat";
    const started = performance.now();
    let chunks = 0;
    let finish = null;
    col.dataset.state = "streaming";
    col.stateEl.textContent = "streaming…";
    try {
      await stream(chat ? "/v1/chat/completions" : "/v1/completions",
        chat ? { ...body, messages: [{ role: "user", content: prompt.value }] } : { ...body, prompt: prompt.value },
        (chunk) => {
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) return;
          const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
          if (piece) {
            col.text += piece;
            col.out.append(document.createTextNode(piece));
            chunks += 1;
            col.dataset.chunks = String(chunks);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }, { signal });
      col.dataset.state = "done";
      col.stateEl.textContent = `done (${finish || "stop"}), ${chunks} chunks in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    } catch (e) {
      col.dataset.state = "error";
      col.stateEl.textContent = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
      col.stateEl.classList.add(e.name === "AbortError" ? "muted" : "error");
    }
  }

  function showDifferences(basePane, others) {
    for (const col of others) {
      if (col.dataset.state !== "done" || basePane.dataset.state !== "done") continue;
      const same = commonPrefixLength(basePane.text, col.text);
      const differs = same < Math.max(basePane.text.length, col.text.length);
      col.dataset.differs = String(differs);
      clear(col.out);
      append(col.out, [col.text.slice(0, same), differs ? h("mark", {}, col.text.slice(same)) : null]);
      col.stateEl.append(h("br"), differs
        ? `differs from the base after ${same} character${same === 1 ? "" : "s"} (marked)`
        : "identical to the base");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.hide();
    if (!prompt.value) { message.show("Write a prompt first."); return; }
    const body = { max_tokens: Number(maxTokens.value), temperature: Number(temperature.value), top_p: Number(topP.value) };
    if (seed.value !== "") body.seed = Number(seed.value);
    if (stop.value) body.stop = stop.value;
    const chosen = [...new Set(slots.map((s) => s.value).filter(Boolean))];
    const basePane = pane(base.id, "Base");
    const others = chosen.map((id, i) => pane(id, `Adapter ${i + 1}`));
    clear(columns).append(basePane, ...others);
    controller = new AbortController();
    run.disabled = true;
    halt.hidden = false;
    await Promise.all([basePane, ...others].map((col) => runOne(col, { ...body, model: col.dataset.model }, controller.signal)));
    showDifferences(basePane, others);
    run.disabled = false;
    halt.hidden = true;
    controller = null;
  });

  append(view, [h("h1", {}, "Playground"),
    h("p", {}, "The base serves every adapter; an adapter's prefix is the only difference between the columns."),
    servable.length ? null : h("p", { class: "message" }, "You have no adapter for this base yet: only the base can answer."),
    form, columns]);
  return () => controller && controller.abort();
}
