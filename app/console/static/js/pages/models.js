// Models: the bases (the served one marked) and your adapters, export to a PEFT zip, import one.

import { del, download, enc, get, upload } from "../api.js";
import { clear, field, fmtBytes, fmtTime, h, messageArea, table } from "../dom.js";

export async function render(view) {
  const message = messageArea();
  const list = h("div", { id: "model-list" });

  async function refresh() {
    const models = (await get("/v1/models")).data;
    const bases = models.filter((m) => m.kind === "base");
    const adapters = models.filter((m) => m.kind === "adapter");
    clear(list);
    list.append(h("h2", {}, "Bases"), table(["id", "served", "owner", "created"],
      bases.map((m) => [h("code", {}, m.id), m.served ? "yes (answers completions now)" : "no", m.owned_by,
        fmtTime(m.created)]), "Base models"));
    list.append(h("h2", {}, "Adapters"));
    if (!adapters.length) { list.append(h("p", {}, "No adapters yet: a succeeded job, or an import, makes one.")); return; }
    list.append(table(["id", "base", "served", "virtual tokens", "size", "job", "created", "actions"],
      adapters.map((m) => [h("code", {}, m.id), m.base || "", m.served ? "yes" : "no", m.num_virtual_tokens ?? "",
        fmtBytes(m.size_bytes), m.job_id ? h("a", { href: `#/jobs/${enc(m.job_id)}` }, m.job_id) : "",
        fmtTime(m.created), h("span", { class: "actions" },
          h("a", { href: `#/playground/${enc(m.id)}`, class: "button small" }, "Try"),
          h("button", { type: "button", class: "small", "aria-label": `Export ${m.id} as PEFT`,
            onclick: () => exportModel(m) }, "Export (PEFT)"),
          h("button", { type: "button", class: "small danger", "aria-label": `Delete ${m.id}`,
            onclick: () => remove(m) }, "Delete"))]), "Your adapters"));
  }

  async function exportModel(m) {
    message.hide();
    try {
      await download(`/v1/models/${enc(m.id)}/export`, `${m.id.replace(/[^A-Za-z0-9._-]+/g, "_")}.peft.zip`);
      message.ok(`Exported ${m.id}.`);
    } catch (e) { message.error(e); }
  }

  async function remove(m) {
    message.hide();
    if (!window.confirm(`Delete the adapter ${m.id}?`)) return;
    try {
      await del(`/v1/models/${enc(m.id)}`);
      message.ok(`Deleted ${m.id}.`);
      await refresh();
    } catch (e) { message.error(e); }
  }

  const zip = h("input", { type: "file", name: "file", accept: ".zip,application/zip", required: true });
  const suffix = h("input", { name: "suffix", maxlength: 40, pattern: "[a-z0-9-]{1,40}", placeholder: "optional" });
  const progress = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "Import progress" });
  const submit = h("button", { type: "submit" }, "Import");
  const form = h("form", { class: "grid", id: "import-model" },
    field("PEFT prefix-tuning zip", zip, "adapter_config.json and adapter_model.safetensors; for the served base"),
    field("Suffix", suffix), h("div", {}, submit, progress));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.hide();
    if (!zip.files[0]) return;
    const body = new FormData();
    body.append("file", zip.files[0], zip.files[0].name);
    if (suffix.value) body.append("suffix", suffix.value);
    submit.disabled = true;
    progress.hidden = false;
    try {
      const m = await upload("/v1/models/import", body, (f) => { progress.value = f; });
      message.ok(`Imported as ${m.id}.`);
      form.reset();
      await refresh();
    } catch (e) { message.error(e); } finally { submit.disabled = false; progress.hidden = true; }
  });

  view.append(h("h1", {}, "Models"), message, list,
    h("details", { class: "create" }, h("summary", {}, "Import a PEFT adapter"), form));
  await refresh();
  return null;
}
