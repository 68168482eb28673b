"""The eval-run worker and its dispatch, called directly: SQLite through the real migrations, local
blobs, a tiny base and a random adapter of it, and a send function that records run ids."""

from __future__ import annotations

import time

import pytest
import torch
from sqlalchemy import select, update

from app.config import Settings
from app.evals import dispatch, runner, validate_eval
from app.jobs.context import JobContext
from app.store.eval_tables import EvalRecord, EvalRunOutputItemRecord, EvalRunRecord
from app.store.tables import ModelRecord, Tenant

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}, "label": {"type": "string"}},
          "required": ["label"]}
CRITERIA = [
    {"type": "string_check", "name": "says it", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
     "operation": "ilike"},
    {"type": "label", "name": "by probability", "labels": [" yes", " no"]},
]
ITEMS = [{"text": f"is {w} a word?", "label": "yes" if i % 2 else "no"} for i, w in enumerate("abcd")]
ITEMS.append({"label": "yes"})  # no text: its prompt cannot be rendered, so it errors alone


@pytest.fixture()
def env(tmp_path, tiny_base_dirs):
    from transformers import AutoConfig

    from app.ml.adapter import Adapter, adapter_to_bytes
    from app.ml.kvcache import ModelGeometry
    from app.ml.prefix import PrefixConfig
    from app.store.base_registry import register_base
    from app.store.blobs import LocalBlobStore
    from app.store.db import init_db, make_engine, make_session_factory

    settings = Settings(data_dir=tmp_path, job_heartbeat_s=0.2, job_stale_after_s=1.0, job_resend_after_s=30)
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    sf = make_session_factory(engine)
    blobs = LocalBlobStore(tmp_path / "blobs")
    sent: list[str] = []
    ctx = JobContext(settings, sf, blobs, extra={"send_eval_run": sent.append})
    g = ModelGeometry.of(AutoConfig.from_pretrained(tiny_base_dirs["llama"], local_files_only=True))
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=3)
    with sf() as s:
        s.add(Tenant(id="tenant-a", name="a"))
        base = register_base(s, blobs, tiny_base_dirs["llama"], "tiny")
        table = torch.randn(3, cfg.table_width, generator=torch.Generator().manual_seed(0))
        adapter = Adapter.from_table(table, cfg, base.fingerprint)
        blobs.put_bytes("adapters/tenant-a/x/adapter.zip", adapter_to_bytes(adapter))
        s.add(ModelRecord(id="ft:tiny:a", kind="adapter", tenant_id="tenant-a", base_id="tiny",
                          fingerprint=base.fingerprint, blob_key="adapters/tenant-a/x/adapter.zip",
                          num_virtual_tokens=3))
        spec = validate_eval({"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True}, CRITERIA)
        s.add(EvalRecord(id="eval_1", tenant_id="tenant-a", name="e", data_source_config=spec.data_source_config(),
                         testing_criteria=spec.testing_criteria()))
        s.commit()

    def add_run(model="ft:tiny:a", items=ITEMS, **kw) -> str:
        with sf() as s:
            run = EvalRunRecord(eval_id="eval_1", tenant_id="tenant-a", model=model, items_total=len(items),
                                data_source={
                "type": "completions", "model": model,
                "source": {"type": "file_content", "content": [{"item": it} for it in items]},
                "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.text}}"}]},
                "sampling_params": {"temperature": 0.0, "top_p": 1.0, "seed": 42, "max_completion_tokens": 3}}, **kw)
            s.add(run)
            s.commit()
            return run.id

    def items(run_id):
        with sf() as s:
            return list(s.scalars(select(EvalRunOutputItemRecord).where(EvalRunOutputItemRecord.run_id == run_id)
                                  .order_by(EvalRunOutputItemRecord.seq)))

    def get(run_id):
        with sf() as s:
            return s.get(EvalRunRecord, run_id)

    return type("Env", (), dict(ctx=ctx, sf=sf, sent=sent, add_run=staticmethod(add_run),
                                items=staticmethod(items), get=staticmethod(get), adapter=adapter))


def test_a_run_grades_the_adapter_and_its_base_in_the_same_batches(env, monkeypatch):
    from app.jobs.runner import _BASE_CACHE
    from app.ml.data import encode_prompt, format_chat
    from app.ml.evaluate import prefix_key_values
    from app.ml.generate import GenerationRequest, generate

    monkeypatch.setattr(runner, "BATCH_ITEMS", 3)  # several batches
    run_id = env.add_run()
    assert runner.run_eval(run_id, env.ctx) == "completed"
    assert runner.run_eval(run_id, env.ctx) == "skipped"  # a second delivery does nothing
    run = env.get(run_id)
    items = env.items(run_id)
    assert [it.datasource_item_id for it in items] == list(range(1, len(ITEMS) + 1))
    assert items[-1].status == "error" and "item.text" in items[-1].error and items[-1].base_status == "error"
    counts = run.summary["result_counts"]
    assert counts["total"] == len(ITEMS) and counts["errored"] == 1
    assert counts["passed"] + counts["failed"] == len(ITEMS) - 1
    assert [r["testing_criteria"] for r in run.summary["per_testing_criteria_results"]] == ["says it", "by probability"]
    assert run.base_summary["model"] == "tiny" and run.base_summary["result_counts"]["total"] == len(ITEMS)
    assert {u["model_name"] for u in run.per_model_usage} == {"ft:tiny:a", "tiny"}

    # each row computes what it computes alone: the adapter's and the base's outputs match a
    # separate generate() of that item with and without the prefix
    base = next(iter(_BASE_CACHE.values()))
    kv = prefix_key_values(env.adapter, next(base.model.parameters()).dtype, base.device)
    for it in items[:-1]:
        text = format_chat([{"role": "user", "content": it.datasource_item["text"]}], base.tokenizer)
        ids = encode_prompt(base.tokenizer, text)
        alone = [generate(base, [GenerationRequest(ids, prefix=p, max_tokens=3, temperature=0.0)])[0].text
                 for p in (kv, None)]
        assert [it.sample["output"][0]["content"], it.base_sample["output"][0]["content"]] == alone
        assert it.sample["model"] == "ft:tiny:a" and it.base_sample["model"] == "tiny"
    label_scores = [it.results[1]["sample"]["scores"] for it in items[:-1]]
    base_scores = [it.base_results[1]["sample"]["scores"] for it in items[:-1]]
    assert label_scores != base_scores  # the label criterion scored under each row's own prefix


def test_a_base_run_has_no_base_results(env):
    run_id = env.add_run(model="tiny", items=ITEMS[:2])
    assert runner.run_eval(run_id, env.ctx) == "completed"
    run = env.get(run_id)
    assert run.base_summary is None and all(it.base_status is None for it in env.items(run_id))


def test_cancel_stops_the_run_after_its_batch(env, monkeypatch):
    monkeypatch.setattr(runner, "BATCH_ITEMS", 2)
    run_id = env.add_run()
    real = runner.EvalRun._write_batch

    def write_then_cancel(self, *a, **kw):
        real(self, *a, **kw)
        with env.sf() as s:  # what POST .../cancel does
            s.execute(update(EvalRunRecord).where(EvalRunRecord.id == run_id).values(status="canceled"))
            s.commit()

    monkeypatch.setattr(runner.EvalRun, "_write_batch", write_then_cancel)
    assert runner.run_eval(run_id, env.ctx) == "canceled"
    assert len(env.items(run_id)) == 2 and env.get(run_id).status == "canceled"


def test_a_lost_worker_s_run_is_queued_again_and_resumes(env, monkeypatch):
    monkeypatch.setattr(runner, "BATCH_ITEMS", 2)
    run_id = env.add_run()
    real = runner.EvalRun._write_batch

    def die_after_first_batch(self, *a, **kw):
        real(self, *a, **kw)
        raise KeyboardInterrupt  # the worker dies: nothing else is written

    monkeypatch.setattr(runner.EvalRun, "_write_batch", die_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(run_id, env.ctx)
    monkeypatch.setattr(runner.EvalRun, "_write_batch", real)
    assert env.get(run_id).status == "in_progress"
    time.sleep(1.2)  # job_stale_after_s
    assert dispatch.check_once(env.ctx) == [run_id]  # queued again and sent
    assert env.get(run_id).status == "queued"
    assert runner.run_eval(run_id, env.ctx) == "completed"
    items = env.items(run_id)
    assert [it.datasource_item_id for it in items] == list(range(1, len(ITEMS) + 1))  # none twice
    assert env.get(run_id).summary["result_counts"]["total"] == len(ITEMS)


def test_relay_sends_a_queued_run_once_until_it_is_due_again(env):
    run_id = env.add_run()
    assert dispatch.relay(env.ctx) == [run_id]
    assert dispatch.relay(env.ctx) == []  # sent: due again only after job_resend_after_s
    assert dispatch.relay(env.ctx, now_s=time.time() + 31) == [run_id]

    def down(_run_id):
        raise ConnectionError("broker down")

    other = env.add_run()
    env.ctx.extra["send_eval_run"] = down
    assert dispatch.relay(env.ctx, [other]) == []
    assert env.get(other).sent_at is None and env.get(other).sends == 0  # due at the next pass
    env.ctx.extra["send_eval_run"] = env.sent.append
    assert dispatch.relay(env.ctx, [other]) == [other]


def test_a_run_whose_workers_keep_dying_fails(env):
    run_id = env.add_run(status="in_progress", heartbeat_at=0.0, attempts=dispatch.MAX_ATTEMPTS)
    dispatch.check_once(env.ctx)
    run = env.get(run_id)
    assert run.status == "failed" and run.error["code"] == "worker_lost"


def test_a_deleted_model_fails_the_run_with_a_reason(env):
    run_id = env.add_run(model="ft:tiny:gone")
    assert runner.run_eval(run_id, env.ctx) == "failed"
    assert env.get(run_id).error["code"] == "model_not_found"
