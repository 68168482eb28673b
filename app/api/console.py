"""The web console: `GET /` redirects to `/ui`, `/ui` is the single page, `/ui/assets/...` its own
modules and styles, `/ui/vendor/...` the charting library installed by `npm ci` (app/console/).

Every response carries a strict Content-Security-Policy: scripts, styles and connections from
this origin only, no inline script or style, no framing. The page holds no data of its own; it
calls the API with the key the user pastes, so it shows what that key may see and nothing more.

Assets are looked up in a table built once from the package directory: a request names an entry
of that table, never a filesystem path. A missing vendor file (npm absent) is a 404 that the page
reports as "charts unavailable".
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.api.errors import not_found

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
STATIC_DIR = CONSOLE_DIR / "static"
UPLOT_DIST = CONSOLE_DIR / "node_modules" / "uplot" / "dist"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}

# the only vendor files served, each under a fixed name
VENDOR = {"uPlot.esm.js": UPLOT_DIST / "uPlot.esm.js", "uPlot.min.css": UPLOT_DIST / "uPlot.min.css"}

router = APIRouter(include_in_schema=False)


def _assets() -> dict[str, Path]:
    """Relative name (`js/app.js`) -> file, for every servable file of the static directory."""
    return {p.relative_to(STATIC_DIR).as_posix(): p for p in sorted(STATIC_DIR.rglob("*"))
            if p.is_file() and p.suffix in MEDIA_TYPES}


ASSETS = _assets()


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307, headers=HEADERS)


@router.get("/ui")
def page() -> FileResponse:
    return _file(STATIC_DIR / "index.html")


@router.get("/ui/assets/{name:path}")
def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise not_found("asset", name, param="name")
    return _file(path)


@router.get("/ui/vendor/{name}")
def vendor(name: str) -> FileResponse:
    path = VENDOR.get(name)
    if path is None or not path.is_file():
        raise not_found("asset", name, param="name")
    return _file(path)
