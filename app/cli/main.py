"""The `prefixd` command: its root options and command groups, and the one place errors become
words on stderr and an exit status."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from app.cli import admin, evals, files, inference, jobs, models
from app.cli.config import Config
from app.cli.output import CLIError

app = typer.Typer(
    name="prefixd",
    help="Command line client of a prefixd server: datasets, fine-tuning jobs with live progress, "
         "completions, adapters, administration. Server and key: PREFIXD_BASE_URL (with /v1) and "
         "PREFIXD_API_KEY (admin commands: PREFIXD_ADMIN_KEY), else OPENAI_BASE_URL / OPENAI_API_KEY.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(files.app, name="files")
app.add_typer(jobs.app, name="jobs")
app.add_typer(models.app, name="models")
app.add_typer(evals.app, name="eval")
app.add_typer(admin.app, name="admin")
app.command("complete")(inference.complete)
app.command("chat")(inference.chat)


@app.callback()
def root(ctx: typer.Context,
         base_url: Annotated[str | None, typer.Option(help="The server's API root, with /v1 "
                                                          "(default: $PREFIXD_BASE_URL)")] = None,
         api_key: Annotated[str | None, typer.Option(help="The key to use (default: $PREFIXD_API_KEY, or "
                                                         "$PREFIXD_ADMIN_KEY for admin commands)")] = None) -> None:
    ctx.obj = Config.from_env(base_url, api_key)


def main() -> None:
    try:
        app()
    except CLIError as e:
        sys.stderr.write(f"error: {e.message}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # `prefixd ... | head`
        sys.exit(1)
