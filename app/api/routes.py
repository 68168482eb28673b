"""Every router, registered in one place. Add yours to ROUTERS (order: most specific first)."""

from __future__ import annotations

from app.api import admin, admin_serving, completions, console, files, health, jobs, models

ROUTERS = [
    health.router,
    admin.router,
    files.router,
    jobs.router,
    admin_serving.router,
    models.router,
    completions.router,
    console.router,
]
