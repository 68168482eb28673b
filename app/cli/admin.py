"""`prefixd admin`: tenants, their keys, bases and the served base, with the admin key
(PREFIXD_ADMIN_KEY, else PREFIXD_API_KEY). These routes are our extensions, so they go over httpx."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

import typer

from app.cli.common import JsonOpt, setup
from app.cli.output import Out, api_errors, check, when

app = typer.Typer(help="Administration with the admin key: tenants, keys, bases.", no_args_is_help=True)
tenants = typer.Typer(help="Tenants: create (prints its first key), list, show, suspend, unsuspend.",
                      no_args_is_help=True)
keys = typer.Typer(help="A tenant's API keys: create, list, revoke.", no_args_is_help=True)
bases = typer.Typer(help="Bases: register one from a server-side path, show or switch the served base.",
                    no_args_is_help=True)
app.add_typer(tenants, name="tenants")
app.add_typer(keys, name="keys")
app.add_typer(bases, name="bases")


def _call(ctx: typer.Context, json_: bool, method: str, path: str, body: dict | None = None,
          params: dict | None = None) -> tuple[Out, dict]:
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url), cfg.http(admin=True) as http:
        r = check(http.request(method, path, json=body, params=params))
    return out, r.json()


def _id(value: str) -> str:
    return quote(value, safe="")


def _tenant_fields(out: Out, t: dict) -> None:
    pairs = [("id", t["id"]), ("name", t.get("name")), ("suspended", t.get("suspended")),
             ("created", when(t.get("created_at")))]
    if t.get("quotas"):
        pairs.append(("quotas", t["quotas"]))
    if t.get("usage"):
        pairs.append(("usage", t["usage"]))
    out.fields(pairs)


@tenants.command("create")
def tenants_create(ctx: typer.Context, name: str, json_: JsonOpt = False) -> None:
    """Create a tenant and its first API key (shown once: keep it)."""
    out, t = _call(ctx, json_, "POST", "admin/tenants", {"name": name})
    if out.json:
        return out.document(t)
    _tenant_fields(out, t)
    out.fields([("api_key", t["api_key"]), ("api_key_id", t["api_key_id"])])
    out.note("the key is shown once; export PREFIXD_API_KEY=<api_key> to use it", style="dim")


@tenants.command("list")
def tenants_list(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                 after: Annotated[str | None, typer.Option(help="The last id of the previous page")] = None,
                 json_: JsonOpt = False) -> None:
    params = {"limit": limit, **({"after": after} if after else {})}
    out, page = _call(ctx, json_, "GET", "admin/tenants", params=params)
    if out.json:
        return out.document(page)
    out.table(["id", "name", "suspended", "created"],
              [(t["id"], t["name"], t["suspended"], when(t["created_at"])) for t in page["data"]])


@tenants.command("show")
def tenants_show(ctx: typer.Context, tenant_id: str, json_: JsonOpt = False) -> None:
    """A tenant with its quotas, limits and usage."""
    out, t = _call(ctx, json_, "GET", f"admin/tenants/{_id(tenant_id)}")
    if out.json:
        return out.document(t)
    _tenant_fields(out, t)


@tenants.command("suspend")
def tenants_suspend(ctx: typer.Context, tenant_id: str, json_: JsonOpt = False) -> None:
    """Suspend a tenant: its keys answer 403, its running requests and jobs stop."""
    out, t = _call(ctx, json_, "PATCH", f"admin/tenants/{_id(tenant_id)}", {"suspended": True})
    if out.json:
        return out.document(t)
    out.note(f"{t['id']} suspended")


@tenants.command("unsuspend")
def tenants_unsuspend(ctx: typer.Context, tenant_id: str, json_: JsonOpt = False) -> None:
    out, t = _call(ctx, json_, "PATCH", f"admin/tenants/{_id(tenant_id)}", {"suspended": False})
    if out.json:
        return out.document(t)
    out.note(f"{t['id']} active")


@keys.command("create")
def keys_create(ctx: typer.Context, tenant_id: str, json_: JsonOpt = False) -> None:
    """A new key for a tenant (shown once)."""
    out, k = _call(ctx, json_, "POST", f"admin/tenants/{_id(tenant_id)}/keys")
    if out.json:
        return out.document(k)
    out.fields([("id", k["id"]), ("api_key", k["api_key"]), ("created", when(k.get("created_at")))])


@keys.command("list")
def keys_list(ctx: typer.Context, tenant_id: str, json_: JsonOpt = False) -> None:
    out, page = _call(ctx, json_, "GET", f"admin/tenants/{_id(tenant_id)}/keys")
    if out.json:
        return out.document(page)
    out.table(["id", "created", "revoked"],
              [(k["id"], when(k["created_at"]), when(k.get("revoked_at"))) for k in page["data"]])


@keys.command("revoke")
def keys_revoke(ctx: typer.Context, tenant_id: str, key_id: str, json_: JsonOpt = False) -> None:
    """Revoke a key: new requests with it get 401, its running requests stop."""
    out, k = _call(ctx, json_, "DELETE", f"admin/tenants/{_id(tenant_id)}/keys/{_id(key_id)}")
    if out.json:
        return out.document(k)
    out.note(f"{k['id']} revoked")


def _serving_fields(out: Out, s: dict) -> None:
    out.fields([(k, s.get(k)) for k in ("model", "ready", "loading", "error", "queued", "fingerprint")]
               + [("adapter_cache", s.get("adapter_cache"))])


@bases.command("served")
def bases_served(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """The base this API process serves, its queue and adapter cache."""
    out, s = _call(ctx, json_, "GET", "admin/serving")
    if out.json:
        return out.document(s)
    _serving_fields(out, s)


@bases.command("serve")
def bases_serve(ctx: typer.Context, model: str, json_: JsonOpt = False) -> None:
    """Serve another registered base from the next batch on (this API process only)."""
    out, s = _call(ctx, json_, "POST", "admin/serving", {"model": model})
    if out.json:
        return out.document(s)
    _serving_fields(out, s)


@bases.command("register")
def bases_register(ctx: typer.Context,
                   path: Annotated[str, typer.Argument(help="A HF model directory or .gguf file on the server")],
                   base_id: Annotated[str | None, typer.Option("--id", help="The base's id (default: from the "
                                                                            "path)")] = None,
                   json_: JsonOpt = False) -> None:
    """Register a base from a path on the server (a GGUF converts once, in the request)."""
    out, m = _call(ctx, json_, "POST", "admin/bases", {"path": path, **({"id": base_id} if base_id else {})})
    if out.json:
        return out.document(m)
    out.fields([(k, m.get(k)) for k in ("id", "kind", "served", "size_bytes")])
