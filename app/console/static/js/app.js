// The console's shell: sign-in, the navigation, and a hash router (#/jobs/ftjob-...) so that a
// page reload keeps the page, while the key itself never enters the URL.

import { ApiError, session, whoIs } from "./api.js";
import { append, clear, h } from "./dom.js";
import * as admin from "./pages/admin.js";
import * as files from "./pages/files.js";
import * as jobs from "./pages/jobs.js";
import * as models from "./pages/models.js";
import * as playground from "./pages/playground.js";
import * as serving from "./pages/serving.js";

const TENANT_PAGES = [
  ["files", "Files", files], ["jobs", "Jobs", jobs], ["models", "Models", models],
  ["playground", "Playground", playground], ["serving", "Serving", serving],
];
const ADMIN_PAGES = [["tenants", "Tenants", admin.tenants], ["bases", "Bases & serving", admin.bases],
  ["serving", "Metrics", serving]];

const $ = (id) => document.getElementById(id);
let cleanup = null;

function pages() {
  return session.role === "admin" ? ADMIN_PAGES : TENANT_PAGES;
}

function showSignIn(message) {
  $("sign-in").hidden = false;
  $("view").hidden = true;
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  const msg = $("sign-in-message");
  msg.hidden = !message;
  msg.textContent = message || "";
  $("api-key").focus();
}

function renderNav(current) {
  const nav = clear($("nav"));
  append(nav, [h("ul", {}, pages().map(([slug, title]) =>
    h("li", {}, h("a", { href: `#/${slug}`, "aria-current": slug === current ? "page" : null }, title))))]);
  nav.hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = session.role === "admin" ? "admin" : "tenant";
}

let routeSeq = 0;

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const seq = ++routeSeq;
  const hash = location.hash;
  if (!session.key) return showSignIn();
  const [slug, ...rest] = hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const list = pages();
  const entry = list.find(([s]) => s === slug);
  if (!entry) { location.replace(`#/${list[0][0]}`); return; }
  $("sign-in").hidden = true;
  renderNav(slug);
  const view = $("view");
  // each page renders into its own element: one left behind by a quick navigation writes nowhere
  const pageEl = h("div", { class: "page" });
  view.replaceChildren(pageEl);
  view.hidden = false;
  view.dataset.page = slug;
  delete view.dataset.route;
  let done = null;
  try {
    done = (await entry[2].render(pageEl, rest.filter(Boolean))) || null;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      session.clear();
      return showSignIn(`Signed out: ${e.message}`);
    }
    append(pageEl, [h("p", { class: "message error", role: "alert" }, e.message || String(e))]);
  }
  if (seq !== routeSeq) { if (done) done(); return; } // navigated away meanwhile
  cleanup = done;
  view.dataset.route = hash;
  const heading = pageEl.querySelector("h1");
  if (heading) { heading.tabIndex = -1; heading.focus({ preventScroll: true }); }
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("api-key");
  const key = input.value.trim();
  if (!key) return;
  try {
    const role = await whoIs(key);
    session.save(key, role);
    input.value = "";
    if (location.hash.replace(/^#\/?/, "")) route(); else location.hash = `#/${pages()[0][0]}`;
  } catch (e) {
    showSignIn(e.message || String(e));
  }
});

$("sign-out").addEventListener("click", () => {
  session.clear();
  routeSeq += 1;
  if (cleanup) { cleanup(); cleanup = null; }
  history.replaceState(null, "", "/ui");
  showSignIn();
});

window.addEventListener("hashchange", route);
route();
