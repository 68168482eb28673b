"""The two ways an eval can go wrong, kept apart because they are answered differently.

- `EvalSpecError`: the definition (eval, run data source, item rows) is bad. The API answers it
  400 `invalid_request_error` at creation, with `param` naming the field the way OpenAI's error
  `param` does (`testing_criteria[1].operation`), and nothing is created.
- `ItemError`: one item cannot be graded at run time (a template names a value the row lacks, a
  label reference that is not among the labels). That item is `errored`; the run goes on.
"""

from __future__ import annotations


class EvalSpecError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"EvalSpecError({self.message!r}, param={self.param!r})"


class ItemError(Exception):
    """One item's failure; `str(e)` is the message reported on the output item."""
