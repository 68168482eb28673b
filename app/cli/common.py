"""What every command shares: the --json option and the run's config and consoles."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.config import Config
from app.cli.output import CLIError, Out

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's object as one JSON document on stdout "
                                                      "(progress goes to stderr).")]


def setup(ctx: typer.Context, json_mode: bool) -> tuple[Config, Out]:
    cfg = ctx.obj if isinstance(ctx.obj, Config) else Config.from_env()
    return cfg, Out(json_mode)


def to_dict(obj) -> dict:
    """An openai object or page as the API sent it (fields the server left out stay out)."""
    return obj.model_dump(mode="json", exclude_unset=True, by_alias=True)


def served_base(client) -> str:
    """The id of the base this server answers with now (the first listed model marked served)."""
    models = client.models.list().data
    for m in models:
        if getattr(m, "kind", None) == "base" and getattr(m, "served", False):
            return m.id
    raise CLIError("the server serves no base yet (is it still loading?); pass --model")
