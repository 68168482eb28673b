"""Every router, registered in one place. Add yours to ROUTERS (order: most specific first)."""

from __future__ import annotations

from app.api import admin, files, health

ROUTERS = [
    health.router,
    admin.router,
    files.router,
]
