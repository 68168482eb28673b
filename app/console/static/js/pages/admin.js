// The admin view (admin key): tenants, their keys (create, revoke), quotas and usage, and the
// bases: which one is served, switching it, registering one from a path on the server.

import { ApiError, del, enc, get, listAll, patch, post } from "../api.js";
import { clear, field, fmtBytes, fmtTime, h, messageArea, table } from "../dom.js";

const QUOTAS = [["storage_bytes", "storage (bytes)"], ["files", "files"], ["adapters", "adapters"],
  ["running_jobs", "running jobs"], ["requests_per_minute", "requests per minute"],
  ["tokens_per_minute", "tokens per minute"]];

/** A new key, shown once with a copy button. */
function keyNotice(key, what) {
  const code = h("code", { class: "secret" }, key);
  const copy = h("button", { type: "button", class: "small", onclick: () => navigator.clipboard.writeText(key) }, "Copy");
  return h("div", { class: "message ok", role: "status" },
    `${what}: copy it now, it is shown only once. `, code, " ", copy);
}

// ---------------------------------------------------------------- tenants

export const tenants = {
  async render(view, [tenantId]) {
    return tenantId ? renderTenant(view, tenantId) : renderTenants(view);
  },
};

async function renderTenants(view) {
  const message = messageArea();
  const notice = h("div");
  const list = h("div", { id: "tenant-list" });
  const name = h("input", { name: "name", required: true, maxlength: 200 });
  const form = h("form", { class: "row", id: "create-tenant" }, field("New tenant's name", name),
    h("button", { type: "submit" }, "Create tenant"));

  async function refresh() {
    const rows = await listAll("/v1/admin/tenants", { limit: 1000, max: 10000 });
    clear(list).append(rows.length ? table(["name", "id", "suspended", "quota overrides", "created"],
      rows.map((t) => [h("a", { href: `#/tenants/${enc(t.id)}` }, t.name), h("code", {}, t.id),
        t.suspended ? "suspended" : "", Object.entries(t.quotas).map(([k, v]) => `${k}=${v}`).join(", "),
        fmtTime(t.created_at)]), "Tenants") : h("p", {}, "No tenants yet."));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.hide();
    try {
      const t = await post("/v1/admin/tenants", { name: name.value });
      clear(notice).append(keyNotice(t.api_key, `Tenant ${t.name} created with the key`));
      form.reset();
      await refresh();
    } catch (e) { message.error(e); }
  });
  view.append(h("h1", {}, "Tenants"), message, form, notice, list);
  await refresh();
  return null;
}

async function renderTenant(view, tenantId) {
  const message = messageArea();
  const notice = h("div");
  const info = h("div", { id: "tenant-info" });
  const keys = h("div", { id: "tenant-keys" });
  const path = `/v1/admin/tenants/${enc(tenantId)}`;
  let tenant;
  try {
    tenant = await get(path);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      view.append(h("h1", {}, "Tenant not found"), h("p", { class: "message error", role: "alert" }, e.message));
      return null;
    }
    throw e;
  }
  const title = h("h1", {}, `Tenant ${tenant.name}`);

  function showTenant() {
    title.textContent = `Tenant ${tenant.name}`;
    const usage = tenant.usage || {}, limits = tenant.limits || {};
    const fmt = (k, v) => (v === undefined || v === null ? "" : k === "storage_bytes" ? fmtBytes(v) : String(v));
    clear(info).append(
      h("p", {}, "id ", h("code", {}, tenant.id), tenant.suspended ? " — suspended" : "", ", created ", fmtTime(tenant.created_at)),
      table(["quota", "used", "limit (0 = unlimited)", "override"], QUOTAS.map(([k, label]) =>
        [label, fmt(k, usage[k]), fmt(k, limits[k]), tenant.quotas[k] === undefined ? "default" : String(tenant.quotas[k])]),
      "Quotas and usage"));
  }

  async function showKeys() {
    const rows = (await get(`${path}/keys`)).data;
    clear(keys).append(table(["key id", "created", "revoked", ""], rows.map((k) => [h("code", {}, k.id),
      fmtTime(k.created_at), k.revoked_at ? fmtTime(k.revoked_at) : "",
      k.revoked_at ? "" : h("button", { type: "button", class: "small danger", "aria-label": `Revoke key ${k.id}`,
        onclick: () => revoke(k.id) }, "Revoke")]), "API keys"));
  }

  async function revoke(keyId) {
    message.hide();
    if (!window.confirm(`Revoke the key ${keyId}? Requests made with it stop at once.`)) return;
    try {
      await del(`${path}/keys/${enc(keyId)}`);
      message.ok(`Key ${keyId} revoked.`);
      await showKeys();
    } catch (e) { message.error(e); }
  }

  const newKey = h("button", { type: "button", id: "create-key" }, "Create a key");
  newKey.addEventListener("click", async () => {
    message.hide();
    try {
      const k = await post(`${path}/keys`);
      clear(notice).append(keyNotice(k.api_key, "New key"));
      await showKeys();
    } catch (e) { message.error(e); }
  });

  const quotaInputs = QUOTAS.map(([k, label]) => [k, h("input", { name: k, type: "number", min: 0,
    value: tenant.quotas[k] ?? "", placeholder: "default" }), label]);
  const quotaForm = h("form", { class: "grid", id: "quota-form" },
    quotaInputs.map(([, input, label]) => field(label, input)),
    h("div", {}, h("button", { type: "submit" }, "Save quotas")),
    h("small", { class: "hint" }, "An empty field removes the override (the default applies); 0 means unlimited."));
  quotaForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.hide();
    const quotas = {};
    for (const [k, input] of quotaInputs) quotas[k] = input.value === "" ? null : Number(input.value);
    try {
      tenant = await patch(path, { quotas });
      showTenant();
      message.ok("Quotas saved.");
    } catch (e) { message.error(e); }
  });

  const suspend = h("button", { type: "button", id: "suspend-tenant" });
  const label = () => { suspend.textContent = tenant.suspended ? "Unsuspend" : "Suspend"; };
  label();
  suspend.addEventListener("click", async () => {
    message.hide();
    try {
      tenant = await patch(path, { suspended: !tenant.suspended });
      label();
      showTenant();
    } catch (e) { message.error(e); }
  });
  const remove = h("button", { type: "button", class: "danger" }, "Delete tenant");
  remove.addEventListener("click", async () => {
    if (!window.confirm(`Delete ${tenant.name} with all its files, jobs and adapters?`)) return;
    try {
      await del(path);
      location.hash = "#/tenants";
    } catch (e) { message.error(e); }
  });

  view.append(h("p", {}, h("a", { href: "#/tenants" }, "← All tenants")), title, message, info,
    h("h2", {}, "Keys"), h("div", { class: "row" }, newKey), notice, keys,
    h("h2", {}, "Quota overrides"), quotaForm, h("h2", {}, "Tenant"), h("div", { class: "row" }, suspend, remove));
  showTenant();
  await showKeys();
  return null;
}

// ---------------------------------------------------------------- bases and serving

export const bases = {
  async render(view) {
    const message = messageArea();
    const status = h("div", { id: "serving-status" });

    async function refresh() {
      const s = await get("/v1/admin/serving");
      const cache = Object.entries(s.adapter_cache || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
      clear(status).append(table(["", ""], [["served base", s.model || "(none)"], ["fingerprint", s.fingerprint || ""],
        ["ready", s.ready ? "yes" : "no"], ["loading", s.loading ? "yes" : "no"], ["error", s.error || ""],
        ["queued requests", String(s.queued)], ["adapter cache", cache]], "Serving (this API process)"));
    }

    const model = h("input", { name: "model", required: true, placeholder: "a registered base id" });
    const switchForm = h("form", { class: "row", id: "switch-base" }, field("Serve the base", model),
      h("button", { type: "submit" }, "Switch"));
    switchForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      message.hide();
      try {
        await post("/v1/admin/serving", { model: model.value });
        message.ok(`Now serving ${model.value}.`);
        await refresh();
      } catch (e) { message.error(e); }
    });

    const srcPath = h("input", { name: "path", required: true, size: 50, placeholder: "/models/my-base or /models/x.gguf" });
    const baseId = h("input", { name: "id", placeholder: "default: the directory's or file's name" });
    const registerForm = h("form", { class: "grid", id: "register-base" },
      field("Path on the server", srcPath, "a Hugging Face model directory or a .gguf file"), field("Base id", baseId),
      h("div", {}, h("button", { type: "submit" }, "Register base")));
    registerForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      message.hide();
      const body = { path: srcPath.value };
      if (baseId.value) body.id = baseId.value;
      message.show("Registering… (a GGUF file converts now, which can take a while)", "ok");
      try {
        const m = await post("/v1/admin/bases", body);
        message.ok(`Registered base ${m.id}; tenants see it in their models. Serving did not change.`);
      } catch (e) { message.error(e); }
    });

    view.append(h("h1", {}, "Bases & serving"), message, status, h("h2", {}, "Switch the served base"), switchForm,
      h("h2", {}, "Register a base"), registerForm);
    await refresh();
    return null;
  },
};
