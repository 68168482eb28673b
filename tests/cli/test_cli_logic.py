"""The CLI's pure logic: folding job events into the progress bar's state, splitting a file's
validation details into lines, building eval data sources and the side-by-side results table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from app.cli.evals import data_source, read_items, results_rows
from app.cli.files import bad_lines
from app.cli.output import CLIError
from app.cli.watch import JobProgress, duration


def event(i: int, type_: str = "metrics", **data):
    return SimpleNamespace(id=f"ftevent-{i}", type=type_, message=f"event {i}", created_at=i, data=data)


def test_progress_folds_metrics_events_and_keeps_the_last_valid_loss():
    p = JobProgress("ftjob-1")
    fresh = p.new_events([event(2, "metrics", step=1, total_steps=30, train_loss=5.0, tokens_per_s=100.0, eta_s=9.4),
                          event(1, "message", total_steps=30)])
    assert [e.id for e in fresh] == ["ftevent-1", "ftevent-2"]  # oldest first
    for e in fresh:
        p.apply_event(e)
    p.apply_job(SimpleNamespace(status="running"))
    assert p.line() == "ftjob-1 running step 1/30 train_loss 5.0000 valid_loss - tokens/s 100 eta 0:00:09"
    p.apply_event(event(3, step=11, total_steps=30, train_loss=4.0, valid_loss=4.5, tokens_per_s=120.0, eta_s=4))
    p.apply_event(event(4, step=21, total_steps=30, train_loss=3.0, tokens_per_s=float("nan"), eta_s=2))
    assert (p.step, p.train_loss, p.valid_loss, p.tokens_per_s) == (21, 3.0, 4.5, None)
    p.apply_event(event(5, step=11, train_loss=9.0))  # an older step seen late changes nothing
    assert (p.step, p.train_loss) == (21, 3.0)
    assert p.new_events([event(2), event(1)]) == []  # seen already
    p.apply_job(SimpleNamespace(status="succeeded"))
    assert p.fields()["steps"] == "30/30" and p.fields()["eta"] == "0:00:00"


def test_duration():
    assert [duration(x) for x in (None, 0, 59.6, 3725)] == ["-", "0:00:00", "0:01:00", "1:02:05"]


def test_bad_lines_one_per_line():
    assert bad_lines('2 bad lines: line 2: not JSON; line 3: missing field "completion"') == [
        "2 bad lines:", "line 2: not JSON", 'line 3: missing field "completion"']
    assert bad_lines("21 bad lines: line 1: not JSON; line 2: empty completion; ... and 19 more bad lines") == [
        "21 bad lines:", "line 1: not JSON", "line 2: empty completion", "... and 19 more bad lines"]
    assert bad_lines("file is empty: no examples found") == ["file is empty: no examples found"]
    assert bad_lines(None) == []


def test_eval_data_source_from_a_local_file(tmp_path):
    rows = tmp_path / "items.jsonl"
    rows.write_text(json.dumps({"text": "good", "label": "positive"}) + "\n\n"
                    + json.dumps({"item": {"text": "bad", "label": "negative"}}) + "\n")
    ds = data_source("ft:x", str(rows), "Review: {{item.text}} ->", 4, 0.0)
    assert ds == {"type": "completions", "model": "ft:x",
                  "source": {"type": "file_content", "content": [{"item": {"text": "good", "label": "positive"}},
                                                                 {"item": {"text": "bad", "label": "negative"}}]},
                  "input_messages": {"type": "template", "template": "Review: {{item.text}} ->"},
                  "sampling_params": {"max_completion_tokens": 4, "temperature": 0.0}}
    chat = data_source("m", "file-abc", '[{"role": "user", "content": "{{item.text}}"}]', None, None)
    assert chat["source"] == {"type": "file_id", "id": "file-abc"} and "sampling_params" not in chat
    assert chat["input_messages"]["template"] == [{"role": "user", "content": "{{item.text}}"}]
    assert data_source("m", "file-abc", "item.messages", None, None)["input_messages"] == {
        "type": "item_reference", "item_reference": "item.messages"}


def test_eval_items_name_the_bad_line(tmp_path):
    rows = tmp_path / "items.jsonl"
    rows.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(CLIError, match="line 2: not a JSON object"):
        read_items(rows)


def test_results_side_by_side():
    def run(model, passed, failed, mean):
        return {"id": f"run-{model}", "model": model,
                "result_counts": {"total": 4, "passed": passed, "failed": failed, "errored": 0},
                "per_testing_criteria_results": [{"testing_criteria": "exact", "passed": passed, "failed": failed}],
                "per_testing_criteria_metrics": [{"testing_criteria": "exact", "mean_score": mean}]}
    columns, rows = results_rows([run("ft:a", 3, 1, 0.75), run("base", 0, 4, 0.0)])
    assert columns == ["criterion", "ft:a", "base"]
    assert rows == [["exact", "3/4 passed, mean 0.750", "0/4 passed, mean 0.000"],
                    ["items", "3 passed, 1 failed, 0 errored of 4", "0 passed, 4 failed, 0 errored of 4"]]
