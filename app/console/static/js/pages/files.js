// Files: drag-and-drop upload with a progress bar, then each file's validation status and, for a
// file that failed, every bad line the validator reported with its number and reason.

import { del, enc, get, upload } from "../api.js";
import { clear, field, fmtBytes, fmtTime, h, messageArea, table } from "../dom.js";

const POLL_MS = 1000;

/** "2 bad lines: line 2: not JSON; line 4: missing 'completion'; ... and 3 more bad lines" -> parts. */
export function badLines(details) {
  const lines = [];
  const re = /line (\d+): (.*?)(?=; line \d+: |; \.\.\. and |$)/g;
  let m;
  while ((m = re.exec(details || "")) !== null) lines.push({ line: Number(m[1]), reason: m[2] });
  const more = /\.\.\. and (\d+) more bad line/.exec(details || "");
  return { lines, more: more ? Number(more[1]) : 0 };
}

function statusCell(f) {
  const label = { uploaded: "validating…", processed: "valid", error: "invalid" }[f.status] || f.status;
  return h("span", { class: `status status-${f.status}` }, label);
}

function detailsOf(f) {
  if (f.status !== "error") return null;
  const { lines, more } = badLines(f.status_details);
  if (!lines.length) return h("p", { class: "details" }, f.status_details || "invalid");
  return h("div", { class: "details" },
    table(["line", "reason"], lines.map((l) => [String(l.line), l.reason]), `Bad lines of ${f.filename}`),
    more ? h("p", {}, `… and ${more} more bad line${more > 1 ? "s" : ""}`) : null);
}

export async function render(view) {
  const message = messageArea();
  const purpose = h("select", { name: "purpose" },
    h("option", { value: "fine-tune" }, "fine-tune (JSONL of prompt/completion or messages)"),
    h("option", { value: "base-train" }, "base-train (plain text or JSONL of text)"));
  const input = h("input", { type: "file", name: "file", accept: ".jsonl,.json,.txt,application/jsonl,text/plain" });
  const progress = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "Upload progress" });
  const progressText = h("span", { class: "progress-text", "aria-live": "polite" });
  const drop = h("div", { class: "drop", id: "drop-zone" },
    h("p", {}, "Drop a dataset here, or choose one:"), field("Dataset file", input), progress, progressText);
  const list = h("div", { id: "file-list" });
  let timer = null;
  let stopped = false;

  async function send(file) {
    message.hide();
    const form = new FormData();
    form.append("purpose", purpose.value);
    form.append("file", file, file.name);
    progress.hidden = false;
    progress.value = 0;
    progressText.textContent = `Uploading ${file.name}…`;
    try {
      const f = await upload("/v1/files", form, (fraction) => {
        progress.value = fraction;
        progressText.textContent = `Uploading ${file.name}: ${Math.round(fraction * 100)}%`;
      });
      progressText.textContent = `Uploaded ${f.filename} (${f.id}); validating…`;
      await refresh();
    } catch (e) {
      progress.hidden = true;
      progressText.textContent = "";
      message.error(e);
    }
  }

  input.addEventListener("change", () => { if (input.files[0]) send(input.files[0]); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) send(file);
  });

  async function remove(f) {
    try {
      await del(`/v1/files/${enc(f.id)}`);
      await refresh();
    } catch (e) { message.error(e); }
  }

  async function refresh() {
    clearTimeout(timer);
    let files;
    try {
      files = (await get("/v1/files?limit=200")).data;
    } catch (e) { message.error(e); return; }
    clear(list);
    if (!files.length) list.append(h("p", {}, "No files yet."));
    else {
      list.append(table(["name", "id", "purpose", "status", "rows", "tokens", "size", "uploaded", ""],
        files.map((f) => [f.filename, h("code", {}, f.id), f.purpose, statusCell(f), f.row_count ?? "",
          f.token_count ?? "", fmtBytes(f.bytes), fmtTime(f.created_at),
          f.purpose === "fine-tune-results" ? "" :
            h("button", { type: "button", class: "small", onclick: () => remove(f),
              "aria-label": `Delete ${f.filename}` }, "Delete")]), "Your files"));
      for (const f of files.filter((x) => x.status === "error")) {
        list.append(h("section", { class: "bad-file", dataset: { file: f.id } },
          h("h2", {}, `${f.filename}: invalid`), detailsOf(f)));
      }
    }
    const pending = files.some((f) => f.status === "uploaded");
    if (!pending && progressText.textContent.endsWith("validating…")) {
      progress.hidden = true;
      progressText.textContent = "Validation finished.";
    }
    if (pending && !stopped) timer = setTimeout(refresh, POLL_MS);
  }

  view.append(h("h1", {}, "Files"), message, field("Purpose", purpose), drop, list);
  await refresh();
  return () => { stopped = true; clearTimeout(timer); };
}
