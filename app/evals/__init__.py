"""Pure-logic core of OpenAI's Evals API: no HTTP, SQL or Celery. (The worker side,
`app.evals.runner`, is the one module here that uses the database and the model; this package does
not import it.)

Creation (each raises EvalSpecError(message, param) -> a 400 naming `param`):
    spec = validate_eval(data_source_config, testing_criteria)       # -> EvalSpec
    tmpl = parse_input_messages(data_source["input_messages"], spec.item_schema)
    n = validate_jsonl(lines, spec.item_schema)                         # or validate_rows(content_rows(...))
Run time, per item (ItemError inside becomes that item's `error` status, never the run's):
    prompt = tmpl.render(item)                                          # messages or text
    outcome = grade_item(spec.criteria, item, Sample(output_text, prompt), score_labels=...)
    outcome.to_dict()                                                   # store it; results = OpenAI's shape
Run totals:
    summarize_run(spec.criteria, outcomes).to_dict()                    # result_counts, per_testing_criteria_*
"""

from app.evals.aggregate import (
    ItemOutcome,
    RunSummary,
    grade_item,
    label_metrics,
    summarize_run,
)
from app.evals.criteria import (
    CRITERIA,
    REFUSED,
    Criterion,
    CriterionResult,
    EntityF1,
    Label,
    Sample,
    ScoreLabels,
    SpanF1,
    StringCheck,
    TextSimilarity,
)
from app.evals.errors import EvalSpecError, ItemError
from app.evals.inputs import InputTemplate, parse_input_messages
from app.evals.spec import (
    EvalSpec,
    check_item_schema,
    content_rows,
    jsonl_rows,
    parse_criterion,
    validate_eval,
    validate_jsonl,
    validate_rows,
)
from app.evals.templates import (
    check_template,
    references,
    render,
    render_messages,
    render_value,
)

__all__ = [
    "CRITERIA", "REFUSED", "Criterion", "CriterionResult", "EntityF1", "EvalSpec", "EvalSpecError", "InputTemplate",
    "ItemError", "ItemOutcome", "Label", "RunSummary", "Sample", "ScoreLabels", "SpanF1", "StringCheck",
    "TextSimilarity", "check_item_schema", "check_template", "content_rows", "grade_item", "jsonl_rows",
    "label_metrics", "parse_criterion", "parse_input_messages", "references", "render", "render_messages",
    "render_value", "summarize_run", "validate_eval", "validate_jsonl", "validate_rows",
]
