"""Every router, registered in one place (order: most specific first)."""

from __future__ import annotations

from app.api import admin, admin_serving, completions, console, evals, files, health, jobs, models

ROUTERS = [
    health.router,
    admin.router,
    files.router,
    jobs.router,
    admin_serving.router,
    models.router,
    completions.router,
    evals.router,
    console.router,
]
