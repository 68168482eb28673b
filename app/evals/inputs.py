"""A run's `data_source.input_messages`: what the model is given for each item.

OpenAI's shapes (CreateEvalCompletionsRunDataSource):
- `{"type": "template", "template": [message, ...]}`, a message being `{role, content}` with
  content a string, `{"type": "input_text" | "output_text", "text"}` or a list of those (joined
  with newlines); images and audio are refused, this server serves text models;
- `{"type": "item_reference", "item_reference": "item.<field>"}`: the item holds the messages.

Ours, for completion (non-chat) use: `{"type": "template", "template": "<prompt string>"}`, a
plain prompt template rendered to text.

Roles are OpenAI's `user`, `assistant`, `system` and `developer`; `developer` is rendered as
`system`, which is what it means to a model that has no developer role. Templates may name
`{{item.*}}` only: the sample does not exist before the model answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.evals.errors import EvalSpecError, ItemError
from app.evals.templates import (
    Ref,
    check_template,
    lookup,
    refs,
    render,
    schema_has_path,
)

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


def _fail(err: type[Exception], msg: str, where: str) -> Exception:
    # The same message checks serve creation (EvalSpecError naming the param) and, for an
    # item_reference, run time (ItemError: only that item errors).
    return EvalSpecError(msg, where) if err is EvalSpecError else ItemError(f"{where}: {msg}")


def _content_text(content: Any, param: str, err: type[Exception] = EvalSpecError) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, Mapping) and part.get("type"):
            raise _fail(err, f"content of type {part.get('type')!r} is not supported: this server's models take "
                        "text only", param)
        else:
            raise _fail(err, "content must be a string, {\"type\": \"input_text\", \"text\": ...} or a list of "
                        "them", param)
    return "\n".join(texts)


def _message(m: Any, param: str, err: type[Exception] = EvalSpecError) -> tuple[str, str]:
    if not isinstance(m, Mapping):
        raise _fail(err, "each message must be an object {role, content}", param)
    if m.get("type", "message") != "message":
        raise _fail(err, f"message type {m.get('type')!r} is not supported; use 'message'", f"{param}.type")
    role = m.get("role")
    if role not in ROLES:
        raise _fail(err, f"role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
    if "content" not in m:
        raise _fail(err, f"Missing required parameter: '{param}.content'", f"{param}.content")
    return ROLES[role], _content_text(m["content"], f"{param}.content", err)


@dataclass(frozen=True)
class InputTemplate:
    kind: str  # "chat" | "prompt" | "item_reference"
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content template)
    prompt: str = ""  # prompt: the template
    reference: Ref | None = None  # item_reference

    @property
    def is_chat(self) -> bool:
        return self.kind != "prompt"

    def render(self, item: Mapping[str, Any]) -> list[dict[str, str]] | str:
        """Messages [{role, content}] for a chat run, text for a prompt run (ItemError if the item
        lacks a value)."""
        if self.kind == "prompt":
            return render(self.prompt, item)
        if self.kind == "chat":
            return [{"role": role, "content": render(content, item)} for role, content in self.messages]
        value = lookup(self.reference, item, None)
        if not isinstance(value, list) or not value:
            raise ItemError(f"{{{{{self.reference}}}}} must be a non-empty list of messages")
        return [dict(zip(("role", "content"), _message(m, f"{self.reference}[{i}]", ItemError), strict=False))
                for i, m in enumerate(value)]


def parse_input_messages(obj: Any, item_schema: Mapping[str, Any], *,
                         param: str = "data_source.input_messages") -> InputTemplate:
    if not isinstance(obj, Mapping):
        raise EvalSpecError(f"Missing required parameter: '{param}'", param)
    kind = obj.get("type")
    if kind == "template":
        template = obj.get("template")
        p = f"{param}.template"
        if isinstance(template, str):
            check_template(template, item_schema, p, allow_sample=False)
            return InputTemplate("prompt", prompt=template)
        if not isinstance(template, list) or not template:
            raise EvalSpecError("template must be a non-empty list of messages (or, ours, a prompt string)", p)
        messages = []
        for i, m in enumerate(template):
            role, content = _message(m, f"{p}[{i}]")
            check_template(content, item_schema, f"{p}[{i}].content", allow_sample=False)
            messages.append((role, content))
        return InputTemplate("chat", messages=tuple(messages))
    if kind == "item_reference":
        p = f"{param}.item_reference"
        ref_text = obj.get("item_reference")
        if not isinstance(ref_text, str):
            raise EvalSpecError(f"Missing required parameter: '{p}'", p)
        found = refs("{{" + ref_text + "}}", p)
        if len(found) != 1 or found[0].namespace != "item":
            raise EvalSpecError("item_reference must name a field of the item, e.g. 'item.input'", p)
        if not schema_has_path(item_schema, found[0].path):
            raise EvalSpecError(f"item_reference {ref_text!r} names a field the item_schema does not define", p)
        return InputTemplate("item_reference", reference=found[0])
    raise EvalSpecError(f"input_messages type must be 'template' or 'item_reference', got {kind!r}",
                        f"{param}.type")
