"""Pure-logic core of OpenAI's Evals API (issue 13, section 1): no HTTP, SQL or Celery."""
from .errors import EvalSpecError, ItemError
from .templates import check_template, references, render, render_messages, render_value

__all__ = ["EvalSpecError", "ItemError", "check_template", "references", "render", "render_messages", "render_value"]
