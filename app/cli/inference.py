"""`prefixd complete` and `prefixd chat`: streamed text from a base, an adapter or a checkpoint."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from app.cli.common import JsonOpt, served_base, setup, to_dict
from app.cli.output import CLIError, Out, api_errors

Model = Annotated[str | None, typer.Option("--model", "-m", help="A base, adapter (ft:...) or checkpoint id "
                                                                  "(default: the served base)")]
MaxTokens = Annotated[int | None, typer.Option(help="Tokens to generate at most")]
Temperature = Annotated[float | None, typer.Option("--temperature", "-t", help="0 decodes greedily")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling mass")]
Seed = Annotated[int | None, typer.Option(help="Makes sampling reproducible")]
Stop = Annotated[list[str] | None, typer.Option(help="A stop string, repeatable")]


def _sampling(max_tokens, temperature, top_p, seed, stop) -> dict:
    return {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                              ("seed", seed), ("stop", stop or None)) if v is not None}


def _read_stdin(what: str) -> str:
    if sys.stdin.isatty():
        raise CLIError(f"give the {what} as an argument, or pipe it on stdin")
    return sys.stdin.read()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def complete(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Argument(help="The prompt ('-' or none: read stdin)")] = None,
    model: Model = None, max_tokens: MaxTokens = 64, temperature: Temperature = None, top_p: TopP = None,
    seed: Seed = None, stop: Stop = None, json_: JsonOpt = False,
) -> None:
    """Complete a prompt, streaming the text as it is generated (--json: the completion object)."""
    cfg, out = setup(ctx, json_)
    text = prompt if prompt not in (None, "-") else _read_stdin("prompt")
    params = _sampling(max_tokens, temperature, top_p, seed, stop)
    with api_errors(cfg.base_url):
        client = cfg.openai()
        model = model or served_base(client)
        if out.json:
            return out.document(to_dict(client.completions.create(model=model, prompt=text, **params)))
        for chunk in client.completions.create(model=model, prompt=text, stream=True, **params):
            if chunk.choices:
                _write(chunk.choices[0].text)
    _write("\n")


def _stream_chat(client, model: str, messages: list[dict], params: dict) -> str:
    parts = []
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **params):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            _write(parts[-1])
    _write("\n")
    return "".join(parts)


def chat(
    ctx: typer.Context,
    message: Annotated[str | None, typer.Argument(help="The user message (none: a conversation in a terminal, "
                                                       "or stdin when piped)")] = None,
    model: Model = None, system: Annotated[str | None, typer.Option(help="A system message")] = None,
    max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None, seed: Seed = None,
    stop: Stop = None, json_: JsonOpt = False,
) -> None:
    """Chat, streaming each answer.

    Without a message in a terminal: a conversation, one turn per line, until an empty line or Ctrl-D."""
    cfg, out = setup(ctx, json_)
    params = _sampling(max_tokens, temperature, top_p, seed, stop)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = message is None and sys.stdin.isatty() and not out.json
    if not interactive and message in (None, "-"):
        message = _read_stdin("message")
    with api_errors(cfg.base_url):
        client = cfg.openai()
        model = model or served_base(client)
        if out.json:
            messages.append({"role": "user", "content": message})
            return out.document(to_dict(client.chat.completions.create(model=model, messages=messages, **params)))
        if not interactive:
            messages.append({"role": "user", "content": message})
            _stream_chat(client, model, messages, params)
            return
        _conversation(out, client, model, messages, params)


def _conversation(out: Out, client, model: str, messages: list[dict], params: dict) -> None:
    out.note(f"chatting with {model}; an empty line or Ctrl-D ends", style="dim")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            _write("\n")
            return
        if not line.strip():
            return
        messages.append({"role": "user", "content": line})
        answer = _stream_chat(client, model, messages, params)
        messages.append({"role": "assistant", "content": answer})
