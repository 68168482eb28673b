"""GrowingLayer: appends into spare capacity, and stays equal to a concatenating DynamicLayer
through every change of rows that DecodeBatch makes (selection, left trim, merge)."""

import torch
from transformers.cache_utils import DynamicLayer

from app.ml.kvcache import GenerationCache, GrowingLayer


def _kv(batch, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, t, 4, generator=g), torch.randn(batch, 2, t, 4, generator=g)


def test_growing_layer_matches_dynamic_layer_through_row_changes():
    grow, cat = GrowingLayer(), DynamicLayer()
    seed = 0

    def both_update(batch, t):
        nonlocal seed
        seed += 1
        k, v = _kv(batch, t, seed)
        gk, gv = grow.update(k, v)
        ck, cv = cat.update(k, v)
        assert torch.equal(gk, ck) and torch.equal(gv, cv)

    both_update(3, 5)  # a prefill
    buffer = grow._key_buffer
    for _ in range(10):  # decode steps write in place: no new buffer
        both_update(3, 1)
    assert grow._key_buffer is buffer and grow.get_seq_length() == 15

    idx = torch.tensor([0, 2])  # rows leave
    grow.batch_select_indices(idx)
    cat.batch_select_indices(idx)
    both_update(2, 1)
    for layer in (grow, cat):  # left trim, as DecodeBatch does when long rows finished
        layer.keys, layer.values = layer.keys[:, :, 4:], layer.values[:, :, 4:]
    both_update(2, 1)
    capacity = grow._key_buffer.shape[2]
    for _ in range(200):  # past the spare capacity: the buffer grows
        both_update(2, 1)
    assert grow.get_seq_length() == cat.get_seq_length() == 213
    assert grow._key_buffer.shape[2] > capacity


def test_generation_cache_prefills_prefixes():
    kv = [_kv(2, 3, layer) for layer in range(2)]
    cache = GenerationCache(kv)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    assert cache.get_seq_length() == 3
    k, _ = cache.update(*_kv(2, 1, 9), 0)
    assert torch.equal(k[:, :, :3], kv[0][0]) and k.shape[2] == 4


def test_reserve_sizes_the_first_buffer_for_the_prompt_after_the_prefix():
    """With `reserve` = prefix + prompt slots, the prompt and the first 64 decode steps write into
    the buffer the prefix went into: no copy of the whole cache during a short generation."""
    prefix, prompt = 16, 52
    kv = [_kv(4, prefix, layer) for layer in range(2)]
    cache = GenerationCache(kv, reserve=prefix + prompt)
    buffers = [layer._key_buffer for layer in cache.layers]
    for layer in range(2):
        k, _ = cache.update(*_kv(4, prompt, 10 + layer), layer)
        assert torch.equal(k[:, :, :prefix], kv[layer][0])
    for step in range(64):
        for layer in range(2):
            cache.update(*_kv(4, 1, 100 + step), layer)
    assert [layer._key_buffer for layer in cache.layers] == buffers
    assert cache.get_seq_length() == prefix + prompt + 64
    # without the reserve, the prefix's buffer is too small for this prompt plus 64 tokens
    plain = GenerationCache(kv)
    first = plain.layers[0]._key_buffer
    plain.update(*_kv(4, prompt, 10), 0)
    for step in range(64):
        plain.update(*_kv(4, 1, 100 + step), 0)
    assert plain.layers[0]._key_buffer is not first


def test_batch_prefixes_places_each_row_right_aligned_whatever_the_mix():
    """Distinct prefixes of one length (stacked), mixed lengths and rows without a prefix (copied
    row by row), and one shared prefix (expanded) all give the same layout: row i's prefix in its
    last P_i slots, zeros and mask 0 before it."""
    from app.ml.kvcache import ModelGeometry, batch_prefixes

    geometry = ModelGeometry(num_layers=2, num_kv_heads=2, head_dim=4, hidden_size=8, max_positions=64)

    def prefix(P, seed):
        return [(k[0], v[0]) for k, v in (_kv(1, P, seed * 10 + layer) for layer in range(2))]

    same_length = [prefix(3, s) for s in range(3)]
    mixed = [prefix(3, 7), None, prefix(1, 8)]
    shared = [prefix(2, 9)] * 2
    for prefixes in (same_length, mixed, shared):
        kv, mask = batch_prefixes(prefixes, geometry, torch.float32, "cpu")
        P_max = max(0 if p is None else p[0][0].shape[1] for p in prefixes)
        for row, p in enumerate(prefixes):
            n = 0 if p is None else p[0][0].shape[1]
            assert mask[row].tolist() == [0] * (P_max - n) + [1] * n
            for layer, (k, v) in enumerate(kv):
                assert k.shape == (len(prefixes), 2, P_max, 4)
                assert not k[row, :, : P_max - n].any() and not v[row, :, : P_max - n].any()
                if p is not None:
                    assert torch.equal(k[row, :, P_max - n :], p[layer][0])
                    assert torch.equal(v[row, :, P_max - n :], p[layer][1])
