// Talking to the API with the pasted key. The key lives in sessionStorage (gone when the tab
// closes) and travels only in the Authorization header: never in a URL, never logged.

const KEY_SLOT = "prefixd.key";
const ROLE_SLOT = "prefixd.role";

export const session = {
  get key() { return sessionStorage.getItem(KEY_SLOT); },
  get role() { return sessionStorage.getItem(ROLE_SLOT); },
  save(key, role) { sessionStorage.setItem(KEY_SLOT, key); sessionStorage.setItem(ROLE_SLOT, role); },
  clear() { sessionStorage.removeItem(KEY_SLOT); sessionStorage.removeItem(ROLE_SLOT); },
};

/** An API error: `message` is the API's own words (the OpenAI error envelope), `status` the HTTP status. */
export class ApiError extends Error {
  constructor(message, status, code, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

function authHeaders(key = session.key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const err = body && body.error;
  if (err && err.message) return new ApiError(err.message, response.status, err.code, err.param);
  return new ApiError(`The server answered ${response.status} ${response.statusText || ""}`.trim(), response.status);
}

/** fetch + JSON, throwing ApiError with the API's message on a non-2xx answer. */
export async function call(method, path, body, { key, raw = false, signal } = {}) {
  const headers = authHeaders(key);
  const init = { method, headers, signal };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Could not reach the server: ${e.message}`, 0);
  }
  if (!response.ok) throw await errorOf(response);
  return raw ? response : response.json();
}

export const get = (path, opts) => call("GET", path, undefined, opts);
export const post = (path, body, opts) => call("POST", path, body, opts);
export const patch = (path, body, opts) => call("PATCH", path, body, opts);
export const del = (path, opts) => call("DELETE", path, undefined, opts);

/** Every page of a newest-first list (`after` = the last id of the previous page), up to `max` items. */
export async function listAll(path, { limit = 100, max = 1000 } = {}) {
  const out = [];
  let after = null;
  while (out.length < max) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await get(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    out.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return out;
}

/** Multipart upload through XMLHttpRequest, the one browser API that reports upload progress. */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    const key = session.key;
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        resolve(body);
      } else {
        const err = body && body.error;
        reject(new ApiError(err && err.message ? err.message : `The server answered ${xhr.status}`, xhr.status,
          err && err.code, err && err.param));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError("The upload failed: the connection was lost", 0)));
    xhr.send(form);
  });
}

/** POST with stream: true and call onText(choiceIndex, text) for each server-sent chunk. */
export async function stream(path, body, onChunk, { signal } = {}) {
  const response = await call("POST", path, { ...body, stream: true }, { raw: true, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data || data === "[DONE]") continue;
      const obj = JSON.parse(data);
      if (obj.error) throw new ApiError(obj.error.message, 200, obj.error.code, obj.error.param);
      onChunk(obj);
    }
  }
}

/** Downloads an authenticated resource as a file (the key cannot ride in a link). */
export async function download(path, filename) {
  const response = await call("GET", path, undefined, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Who the key belongs to: "tenant", "admin", or an ApiError for a key the server refuses. */
export async function whoIs(key) {
  try {
    await get("/v1/models", { key });
    return "tenant";
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 403) throw e;
    if (e.code !== "admin_key_not_allowed") throw e; // e.g. a suspended tenant: say so
  }
  await get("/v1/admin/tenants?limit=1", { key });
  return "admin";
}

export const enc = encodeURIComponent;
