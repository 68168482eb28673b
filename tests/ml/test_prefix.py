import torch
from transformers import AutoModelForCausalLM

from app.ml.kvcache import FrozenPrefixCache, ModelGeometry, batch_prefixes, positions_from_mask
from app.ml.prefix import PrefixConfig, PrefixEncoder, key_values_to_table


def test_table_layout_roundtrip_and_peft_order():
    cfg = PrefixConfig(num_layers=3, num_kv_heads=2, head_dim=4, num_virtual_tokens=5)
    enc = PrefixEncoder(cfg)
    kvs = enc.key_values()
    assert len(kvs) == 3 and kvs[0][0].shape == (2, 5, 4)
    # PEFT layout: layer i keys at block 2i, values at 2i+1 of the second axis
    block = cfg.kv_dim
    assert torch.equal(kvs[1][0].permute(1, 0, 2).reshape(5, -1), enc.table[:, 2 * block : 3 * block])
    assert torch.equal(kvs[1][1].permute(1, 0, 2).reshape(5, -1), enc.table[:, 3 * block : 4 * block])
    assert torch.equal(key_values_to_table(kvs), enc.table)


def test_projection_folds_to_same_table():
    cfg = PrefixConfig(2, 2, 4, num_virtual_tokens=3, prefix_projection=True, projection_hidden_size=8)
    enc = PrefixEncoder(cfg)
    folded = enc.fold()
    assert not folded.config.prefix_projection
    assert torch.allclose(folded(), enc(), atol=0)
    assert sum(p.numel() for p in folded.parameters()) == 3 * cfg.table_width


def test_mixed_prefix_rows_match_rows_alone(tiny_base_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, local_files_only=True).eval()
    g = ModelGeometry.of(model.config)
    torch.manual_seed(0)
    encs = [PrefixEncoder(PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)) for P in (3, 7)]
    rows = [([5, 6, 7, 8, 9], encs[0]), ([1, 2], encs[1]), ([3, 4, 5], None)]

    def run(rows):
        L = max(len(t) for t, _ in rows)
        ids = torch.tensor([[0] * (L - len(t)) + t for t, _ in rows])
        tm = torch.tensor([[0] * (L - len(t)) + [1] * len(t) for t, _ in rows])
        kv, pm = batch_prefixes([None if e is None else e.key_values() for _, e in rows], g, torch.float32, "cpu")
        full = torch.cat([pm, tm], 1)
        cache = FrozenPrefixCache(kv) if pm.shape[1] else None
        out = model(input_ids=ids, attention_mask=full, position_ids=positions_from_mask(full, L), cache=cache)
        return [out.logits[i, L - len(t) :] for i, (t, _) in enumerate(rows)]

    with torch.no_grad():
        batch = run(rows)
        for i, r in enumerate(rows):
            assert (batch[i] - run([r])[0]).abs().max() < 1e-5
