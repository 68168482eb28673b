"""The web console in a real browser: headless Chromium (Debian's `chromium`, driven by the pip
`playwright` package with `executable_path`; never `playwright install`) against one real API and
Celery worker shared by the module, serving the `learnable` base (tests/conftest.py).

The tests sign in with a pasted key and upload files through the page, see a bad line reported,
start a job from the form and watch its loss curve gain points (the chart's point count, read
twice), stream one prompt to the base and the trained adapter side by side at temperature 0,
cancel a job, and check that a hostile file name and a completion holding HTML render as text
(no dialog fires, no element is made). The admin key opens the admin view. A screenshot of every
page goes to var/screenshots/ (CONSOLE_SCREENSHOTS overrides it).

Skipped, with the reason, when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, launch
from tests.integration.test_learning_flow import PLACES

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", ROOT / "var" / "screenshots"))
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jsonl"

# The label depends on the noun; the adapter learns to answer it wrapped in HTML, so its
# completions hold markup that the page must show as text.
LABELS = {"pizza": "food", "bread": "food", "soup": "food", "coffee": "city", "tea": "city", "milk": "city",
          "pub": "dog", "bar": "dog", "cafe": "dog", "jumps": "fox", "runs": "fox", "sits": "fox"}
TRAIN_JSONL = "".join(json.dumps({"prompt": f"item {n} in the {p} ->", "completion": f" <b>{label}</b>"}) + "\n"
                      for n, label in LABELS.items() for p in PLACES)
PROMPT = "item soup in the attic ->"  # a place no training prompt has
BAD_JSONL = (json.dumps({"prompt": "a", "completion": " b"}) + "\nthis is not json\n"
             + json.dumps({"prompt": "c"}) + "\n")


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


class Console:
    """The shared server, one tenant, and a browser page with a dialog trap."""

    def __init__(self, svc, tenant, browser):
        self.svc, self.tenant, self.browser = svc, tenant, browser
        self.dialogs: list[str] = []
        self.urls: list[str] = []  # every URL a page asked for: the key must be in none
        self.job_id: str | None = None
        self.page = self.new_page()

    def new_page(self):
        page = self.browser.new_page(viewport={"width": 1360, "height": 900})
        page.set_default_timeout(20_000)
        page.on("dialog", self._on_dialog)
        page.on("request", lambda request: self.urls.append(request.url))
        return page

    def _on_dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def sign_in(self, key: str, page=None):
        page = page or self.page
        page.goto(self.svc.base_url + "/")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.locator("#nav a").first.wait_for()

    def go(self, hash_: str, page=None):
        page = page or self.page
        page.evaluate("h => { location.hash = h; }", hash_)
        # the shell marks the view with its route once the page has rendered
        page.wait_for_function("h => document.getElementById('view').dataset.route === h", arg=hash_)

    def shot(self, name: str, page=None, full_page: bool = True):
        SHOTS.mkdir(parents=True, exist_ok=True)
        (page or self.page).screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


@pytest.fixture(scope="module")
def console(tmp_path_factory, learnable_base_dir):
    if reason := _skip_reason():
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    svc = launch(tmp_path_factory.mktemp("console"), "embedded", learnable_base_dir, None, worker=True)
    pw = browser = None
    try:
        svc.wait_ready()
        tenant = svc.make_tenant("console-tenant")
        pw = sync_playwright().start()
        # root cannot run Chromium's sandbox; the pages are our own
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        c = Console(svc, tenant, browser)
        yield c
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        svc.stop()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


@pytest.fixture(scope="module")
def adapter(console) -> str:
    """The adapter of the job the jobs test started from the page (started here if it did not run)."""
    c = console
    if c.job_id is None:
        f = c.tenant.client.post("/v1/files", files={"file": ("task.jsonl", TRAIN_JSONL.encode())},
                                 data={"purpose": "fine-tune"}).json()
        while c.tenant.client.get(f"/v1/files/{f['id']}").json()["status"] == "uploaded":
            time.sleep(0.2)
        c.job_id = c.tenant.client.post("/v1/fine_tuning/jobs", json={
            "model": "learnable", "training_file": f["id"], "suffix": "html", "seed": 0}).json()["id"]
    job = wait_job(c.tenant.client, c.job_id)
    assert job["status"] == "succeeded", job["error"]
    return job["fine_tuned_model"]


def upload(page, name: str, content: str):
    page.locator("#drop-zone input[type=file]").set_input_files(
        {"name": name, "mimeType": "application/jsonl", "buffer": content.encode()})


def drop(page, name: str, content: str):
    """A file dropped on the drop zone, as a drag from the desktop delivers it."""
    transfer = page.evaluate_handle("""([name, text]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: "application/jsonl"}));
        return dt;
    }""", [name, content])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})


def test_root_serves_the_sign_in_page_with_a_strict_csp(console):
    r = httpx.get(console.svc.base_url + "/", follow_redirects=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert 'id="sign-in-form"' in r.text and "<script>" not in r.text
    # assets come from a fixed table: no path outside it
    for path in ("/ui/assets/js/app.js", "/ui/assets/console.css", "/ui/vendor/uPlot.esm.js"):
        assert httpx.get(console.svc.base_url + path).status_code == 200, path
    for path in ("/ui/assets/../../main.py", "/ui/assets/%2e%2e/__init__.py", "/ui/vendor/package.json"):
        assert httpx.get(console.svc.base_url + path).status_code == 404, path
    page = console.page
    page.goto(console.svc.base_url + "/")
    assert page.url.endswith("/ui")
    page.get_by_label("API key").fill("sk-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.locator("#sign-in-message").wait_for()
    assert page.locator("#sign-in-message").text_content() == "Incorrect API key provided"
    console.shot("sign-in")


def test_sign_in_upload_and_see_bad_lines_as_text(console):
    c, page = console, console.page
    c.sign_in(c.tenant.key)
    assert "sk-" not in page.url
    assert page.evaluate("sessionStorage.getItem('prefixd.key')") == c.tenant.key
    c.go("#/files")
    assert not [u for u in c.urls if c.tenant.key in u]
    upload(page, "task.jsonl", TRAIN_JSONL)
    page.locator("#file-list td", has_text="task.jsonl").wait_for()
    drop(page, HOSTILE_NAME, BAD_JSONL)
    bad = page.locator("section.bad-file")
    bad.wait_for()
    page.locator(".progress-text", has_text="Validation finished.").wait_for()
    # each bad line with its number and reason; the hostile name is text, never an element
    rows = bad.locator("tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).locator("td").all_text_contents() == ["2", "not JSON"]
    assert rows.nth(1).locator("td").nth(0).text_content() == "3"
    assert "completion" in rows.nth(1).locator("td").nth(1).text_content()
    assert bad.locator("h2").text_content() == f"{HOSTILE_NAME}: invalid"
    page.locator("#file-list td", has_text="task.jsonl").wait_for()
    page.locator("#file-list .status-processed").wait_for()
    assert page.locator("#file-list td", has_text=HOSTILE_NAME).count() == 1
    assert page.locator("img").count() == 0 and c.dialogs == []
    c.shot("files")


def test_start_a_job_and_watch_its_curve_grow(console):
    c, page = console, console.page
    c.go("#/jobs")
    form = page.locator("#create-job")
    form.get_by_label("Training file").select_option(label=next(
        o for o in form.get_by_label("Training file").locator("option").all_text_contents() if "task.jsonl" in o))
    form.get_by_label("Suffix").fill("html")
    form.get_by_label("Seed").fill("0")
    form.get_by_label("Epochs").fill("20")  # 680 steps: enough to learn the answers' HTML
    form.get_by_role("button", name="Start job").click()
    page.locator("#job-summary").wait_for()
    c.job_id = page.url.rsplit("/", 1)[-1]
    assert c.job_id.startswith("ftjob-")
    chart = page.locator("#loss-chart .chart")
    points = "n => Number(document.querySelector('#loss-chart .chart').dataset.points) > n"
    page.wait_for_function(points, arg=0, timeout=60_000)
    first = int(chart.get_attribute("data-points"))
    page.wait_for_function(points, arg=first, timeout=30_000)
    second = int(chart.get_attribute("data-points"))
    assert second > first > 0
    assert page.locator("#loss-chart canvas").count() == 1  # uPlot drew it
    assert "step " in page.locator("#job-progress-text").text_content()
    c.shot("job-running")
    page.locator("#job-status", has_text="succeeded").wait_for(timeout=90_000)
    page.locator("#results table").wait_for()
    page.locator("#checkpoints table").wait_for()
    c.shot("jobs", full_page=False)  # docs/img/jobs.png: the summary and the loss curve
    c.shot("job-detail")
    c.go("#/jobs")
    page.locator("#job-list td a", has_text=c.job_id).wait_for()
    c.shot("job-list")


def test_playground_streams_base_and_adapter_side_by_side(console, adapter):
    c, page = console, console.page
    c.go("#/models")
    page.locator("#model-list code", has_text=adapter).wait_for()
    # export to PEFT, and import that zip back as a new adapter
    with page.expect_download() as download:
        page.get_by_role("button", name=f"Export {adapter} as PEFT").click()
    peft_zip = download.value.path()
    page.get_by_text("Import a PEFT adapter").click()
    form = page.locator("#import-model")
    form.get_by_label("PEFT prefix-tuning zip").set_input_files(peft_zip)
    form.get_by_label("Suffix").fill("reimported")
    form.get_by_role("button", name="Import").click()
    page.locator(".message.ok", has_text="Imported as ft:learnable:").wait_for()
    page.locator("#model-list code", has_text=":reimported:").wait_for()
    c.shot("models")
    c.go("#/playground/" + adapter)
    form = page.locator("#playground-form")
    form.get_by_label("Prompt").fill(PROMPT)
    form.get_by_label("Temperature").fill("0")
    form.get_by_label("Max tokens").fill("8")
    form.get_by_role("button", name="Run").click()
    panes = page.locator("#outputs .pane")
    page.wait_for_function("() => [...document.querySelectorAll('#outputs .pane')]"
                           ".every(p => p.dataset.state === 'done')")
    assert panes.count() == 2
    base_pane, ft_pane = panes.nth(0), panes.nth(1)
    assert ft_pane.get_attribute("data-model") == adapter
    base_text = base_pane.locator("pre.output").text_content()
    ft_text = ft_pane.locator("pre.output").text_content()
    # streamed in pieces, the same text the API answers at temperature 0, and different
    assert int(ft_pane.get_attribute("data-chunks")) >= 2 and int(base_pane.get_attribute("data-chunks")) >= 1
    for model, shown in (("learnable", base_text), (adapter, ft_text)):
        r = c.tenant.client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                          "temperature": 0})
        assert r.json()["choices"][0]["text"] == shown
    assert base_text != ft_text and ft_pane.get_attribute("data-differs") == "true"
    # the adapter answers in HTML, shown as text
    assert "<b>" in ft_text, ft_text
    assert ft_pane.locator("pre.output b").count() == 0 and c.dialogs == []
    c.shot("playground")


def test_charts_unavailable_without_the_library(console, adapter):
    """A server whose npm step did not run: the vendor file 404s, and the job page says so."""
    c = console
    page = c.new_page()
    try:
        page.route("**/ui/vendor/**", lambda route: route.fulfill(status=404, body="{}"))
        c.sign_in(c.tenant.key, page)
        c.go(f"#/jobs/{c.job_id}", page)
        box = page.locator("#loss-chart .chart.unavailable")
        assert "Charts are unavailable" in box.text_content()
        assert int(box.get_attribute("data-points")) > 0 and page.locator("#loss-chart canvas").count() == 0
        page.locator("#job-status", has_text="succeeded").wait_for()
        c.shot("job-without-charts", page, full_page=False)
    finally:
        page.close()


def test_cancel_a_job(console, adapter):
    c, page = console, console.page
    f = c.tenant.client.get("/v1/files", params={"purpose": "fine-tune"}).json()["data"]
    training = next(x["id"] for x in f if x["status"] == "processed")
    job = c.tenant.client.post("/v1/fine_tuning/jobs", json={
        "model": "learnable", "training_file": training, "suffix": "long",
        "method": {"type": "prefix", "prefix": {"hyperparameters": {"n_epochs": 100}}}}).json()
    c.go(f"#/jobs/{job['id']}")
    page.get_by_role("button", name="Cancel job").click()
    page.locator("#job-status", has_text="cancelled").wait_for(timeout=30_000)
    assert wait_job(c.tenant.client, job["id"], 5)["status"] == "cancelled"
    assert not page.get_by_role("button", name="Cancel job").is_visible()
    c.shot("job-cancelled")


def test_serving_page_shows_live_metrics(console, adapter):
    c, page = console, console.page
    c.go("#/serving")
    numbers = page.locator("#serving-numbers")
    numbers.locator("td", has_text="adapter cache hits").wait_for()
    generated = numbers.locator("tr", has_text="tokens generated").locator("td").nth(1)
    assert int(generated.text_content()) > 0  # the playground's tokens
    c.shot("serving")


def test_admin_view_tenants_keys_and_serving(console):
    c = console
    page = c.new_page()
    try:
        # by keyboard alone: the key field has the focus, Enter signs in, the links are in the tab order
        page.goto(c.svc.base_url + "/ui")
        page.keyboard.type(c.svc.admin_key)
        page.keyboard.press("Enter")
        page.locator("#tenant-list a").first.wait_for()
        assert page.locator("#who").text_content() == "admin"
        page.locator("#view h1:focus").wait_for()  # the page's heading takes the focus
        for _ in range(6):  # back up from it: Sign out, then the links
            page.keyboard.press("Shift+Tab")
            if page.evaluate("() => document.activeElement.textContent") == "Bases & serving":
                break
        assert page.evaluate("() => document.activeElement.textContent") == "Bases & serving"
        page.keyboard.press("Enter")
        page.locator("#serving-status").wait_for()
        page.go_back()
        page.locator("#tenant-list a", has_text="console-tenant").click()
        page.locator("#tenant-info table").wait_for()
        assert page.locator("#tenant-info td", has_text="storage (bytes)").count() == 1
        keys = page.locator("#tenant-keys tbody tr")
        keys.first.wait_for()  # the tenant's own key: the list has loaded before it is counted
        before = keys.count()
        page.get_by_role("button", name="Create a key").click()
        page.locator(".secret").wait_for()
        new_key = page.locator(".secret").text_content()
        assert new_key.startswith("sk-")
        page.wait_for_function("n => document.querySelectorAll('#tenant-keys tbody tr').length === n", arg=before + 1)
        assert c.tenant.client.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
        page.once("dialog", lambda d: d.accept())
        page.remove_listener("dialog", c._on_dialog)
        keys.last.get_by_role("button", name="Revoke").click()
        page.locator(".message.ok", has_text="revoked").wait_for()
        revoked = httpx.get(c.svc.base_url + "/v1/models", headers={"Authorization": f"Bearer {new_key}"})
        assert revoked.status_code == 401
        c.shot("admin-tenant", page)
        c.go("#/bases", page)
        page.locator("#serving-status td", has_text="learnable").wait_for()
        c.shot("admin-bases", page)
    finally:
        page.close()
