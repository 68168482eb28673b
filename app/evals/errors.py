"""Domain errors of the evals core; the API layer maps them to its 400 envelope."""


class EvalSpecError(ValueError):
    """An eval definition (or its rows) is invalid. `param` names the field like OpenAI's error
    `param` (e.g. ``testing_criteria[1].operation``) so the route can pass it through unchanged."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ItemError(Exception):
    """One item cannot be graded (e.g. a template value missing at run time). It makes that
    item `errored`, never the whole run."""
