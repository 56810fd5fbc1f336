"""Host attention (runtime/host_attention.py) against a float64 reference, both implementations.

Random ragged batches: rows of length 0 and 1 among longer ones, rows addressed out of order inside
a larger cache (no gather), Q in 1..9 new queries per row, GQA group sizes 1..8, sliding windows,
fp32 / bf16 / fp16 caches. Both paths accumulate in fp32 whatever the cache dtype, and bf16/fp16
caches are compared with the reference computed from the same (rounded) cache values and queries
(KVCache.attend hands queries over in the cache dtype). fp32 and fp16 caches must match to 1e-5; with a
bf16 cache the kernel rounds the softmax weights to bf16 for P.V, so it must match within that rounding
(see assert_matches: the bound is derived, element by element, not a blanket tolerance).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specoffload.runtime import host_attention as ha
from specoffload.runtime.kv_cache import KVCache

IMPLS = ["kernel", "torch"]


BF16_U = 2.0 ** -8  # unit roundoff of bf16 (8 significand bits, round to nearest even)


def reference(q, k, v, q_pos, kv_len, window, rows, weighted_abs=False):
    """Float64 attention, one query at a time; a query that sees no key gets 0. With ``weighted_abs`` also
    returns sum_j p_j |v_j| (the softmax weights against |V|), the scale of the bf16 P.V rounding error."""
    B, T, H, Dh = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, T, H, Dh, dtype=torch.float64)
    wabs = torch.zeros(B, T, H, Dh, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = int(q_pos[b, t])
            hi = min(p + 1, int(kv_len[b]))
            lo = max(0, p - window + 1) if window else 0
            if hi <= lo:
                continue
            for h in range(H):
                kk = k[rows[b], h // G, lo:hi].double()
                vv = v[rows[b], h // G, lo:hi].double()
                s = kk @ q[b, t, h].double() / math.sqrt(Dh)
                w = torch.softmax(s, 0)
                out[b, t, h] = w @ vv
                wabs[b, t, h] = w @ vv.abs()
    return (out, wabs) if weighted_abs else out


def assert_matches(got, q, k, v, q_pos, kv_len, window, rows):
    """``got`` against the float64 reference: within 1e-5 (absolute and relative) for fp32 and fp16 caches.

    bf16 caches: the kernel rounds each weight p_j to bf16 for P.V (round to nearest even: p'_j = p_j (1 + e_j),
    |e_j| <= u = 2^-8) and divides by the sum of the fp32 weights, so its output differs from the exact one by
    sum_j p_j e_j v_j / sum_j p_j, at most u * sum_j p_j |v_j| / sum_j p_j <= u * max_j |v_j| (about half a bf16
    ulp of the largest value) per element; that bound plus the same 1e-5 for the fp32 arithmetic."""
    want, wabs = reference(q, k, v, q_pos, kv_len, window, rows, weighted_abs=True)
    err = (got.double() - want).abs()
    tol = 1e-5 + 1e-5 * want.abs()
    if k.dtype == torch.bfloat16:
        tol = tol + BF16_U * wabs
    bad = err > tol
    assert not bool(bad.any()), (f"{int(bad.sum())} element(s) off, worst {float((err - tol).max()):.3g} past the "
                                 f"bound (max error {float(err.max()):.3g})")


def case(seed, lengths, T, G, Hkv, Dh, dtype, L):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    S = B + 2
    k = torch.randn(S, Hkv, L, Dh, generator=g).to(dtype)
    v = torch.randn(S, Hkv, L, Dh, generator=g).to(dtype)
    rows = torch.randperm(S, generator=g)[:B]  # out of order, with unused slots between
    kv_len = torch.tensor(lengths, dtype=torch.long)
    # Each row's new queries are its last n_new positions (n_new <= T, the rest is padding past the end).
    n_new = torch.tensor([min(T, n) for n in lengths])
    q_pos = (kv_len - n_new)[:, None] + torch.arange(T)[None, :]
    # Queries in the cache's dtype, as KVCache.attend passes them (the kernel dots bf16 queries with bf16 keys).
    q = (torch.randn(B, T, G * Hkv, Dh, generator=g) * 2.0).to(dtype).float()
    return q, k, v, q_pos, kv_len, rows


@pytest.fixture(params=IMPLS)
def impl(request):
    if request.param == "kernel" and ha.backend("kernel") != "kernel":
        pytest.skip("the C++ kernel could not be built here: " + ha.backend_note("kernel"))
    return request.param


def need(impl: str) -> None:
    if impl == "kernel" and ha.backend("kernel") != "kernel":
        pytest.skip("the C++ kernel could not be built here: " + ha.backend_note("kernel"))


@pytest.mark.parametrize("impl_name", IMPLS)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_matches_reference_on_random_ragged_batches(impl_name, data):
    impl = impl_name
    need(impl)
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label="dtype")
    T = data.draw(st.integers(1, 9), label="T")
    G = data.draw(st.integers(1, 8), label="G")
    Hkv = data.draw(st.integers(1, 3), label="Hkv")
    Dh = data.draw(st.sampled_from([8, 16, 32, 20]), label="Dh")
    L = data.draw(st.sampled_from([24, 80, 1100]), label="L")  # 1100 keys span three 512-key chunks
    lengths = data.draw(st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, L)), min_size=1, max_size=5),
                        label="lengths")
    window = data.draw(st.one_of(st.none(), st.integers(1, 40)), label="window")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    q, k, v, q_pos, kv_len, rows = case(seed, lengths, T, G, Hkv, Dh, dtype, L)
    got = ha.host_attention(q, k, v, q_pos, kv_len, window, rows=rows, impl=impl, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_matches(got, q, k, v, q_pos, kv_len, window, rows)


@pytest.mark.slow
def test_portable_loops_match_reference():
    """The kernel built without AVX-512 (the loops a CPU without it runs) against the reference."""
    if ha.backend("kernel") != "kernel":
        pytest.skip("the C++ kernel could not be built here")
    mod = ha._build(("-mno-avx512f",))
    assert not mod.has_avx512()
    for seed, (lengths, T, G, Hkv, Dh, dtype, L, window) in enumerate([
            ([0, 1, 70, 33], 5, 4, 2, 32, torch.float32, 80, None),
            ([600, 3, 1100], 9, 3, 1, 16, torch.bfloat16, 1100, 37),
            ([20, 80], 2, 8, 2, 20, torch.float16, 80, None)]):
        q, k, v, q_pos, kv_len, rows = case(seed, lengths, T, G, Hkv, Dh, dtype, L)
        got = mod.host_attention(q, k, v, rows, q_pos, kv_len, window or 0)
        assert_matches(got, q, k, v, q_pos, kv_len, window, rows)


@pytest.mark.parametrize("dtype,T,G,Dh", [(torch.float32, 9, 8, 128), (torch.bfloat16, 9, 5, 128),
                                          (torch.float32, 3, 7, 16)])
def test_row_groups_do_not_change_results(dtype, T, G, Dh):
    """Many query rows per kv head (split into register-blocked groups) give each row bitwise what it gets
    decoded alone, and match the reference."""
    if ha.backend("kernel") != "kernel":
        pytest.skip("the C++ kernel could not be built here")
    q, k, v, q_pos, kv_len, rows = case(7, [530, 9, 200], T, G, 1, Dh, dtype, 600)
    batch = ha.host_attention(q, k, v, q_pos, kv_len, rows=rows, impl="kernel")
    assert_matches(batch, q, k, v, q_pos, kv_len, None, rows)
    for b in range(3):
        for t in range(T):
            if int(q_pos[b, t]) >= int(kv_len[b]):
                continue
            alone = ha.host_attention(q[b:b + 1, t:t + 1], k, v, q_pos[b:b + 1, t:t + 1],
                                      torch.minimum(kv_len[b:b + 1], q_pos[b:b + 1, t] + 1), rows=rows[b:b + 1],
                                      impl="kernel")
            assert torch.equal(alone[0, 0], batch[b, t])


def test_query_seeing_no_key_is_zero(impl):
    q, k, v, q_pos, kv_len, rows = case(1, [0, 5], 2, 2, 2, 16, torch.float32, 8)
    q_pos[0] = torch.tensor([0, 1])  # row 0 has no keys at all
    o = ha.host_attention(q, k, v, q_pos, kv_len, rows=rows, impl=impl)
    assert bool((o[0] == 0).all())


def test_result_does_not_depend_on_batch_or_query_count():
    """The kernel's blocks sit at absolute key positions: a query's output is bitwise the same whether it
    is decoded alone or verified among k+1 queries in a batch with other rows."""
    if ha.backend("kernel") != "kernel":
        pytest.skip("the C++ kernel could not be built here")
    q, k, v, q_pos, kv_len, rows = case(3, [700, 40, 1030], 5, 4, 2, 32, torch.bfloat16, 1100)
    batch = ha.host_attention(q, k, v, q_pos, kv_len, 300, rows=rows, impl="kernel")
    for b in range(3):
        for t in range(5):
            alone = ha.host_attention(q[b:b + 1, t:t + 1], k, v, q_pos[b:b + 1, t:t + 1],
                                      torch.minimum(kv_len[b:b + 1], q_pos[b:b + 1, t] + 1), 300,
                                      rows=rows[b:b + 1], impl="kernel")
            assert torch.equal(alone[0, 0], batch[b, t])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_attend_uses_host_path_without_copies(impl, dtype, monkeypatch):
    """KVCache.attend on the host equals the sdpa path over the same (rounded) cache, rows out of order."""
    monkeypatch.setenv(ha.ENV_IMPL, impl)
    g = torch.Generator().manual_seed(0)
    cache = KVCache(1, 5, 32, 2, 16, dtype=dtype, sliding_window=6)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    cache.lengths[:] = torch.tensor([3, 0, 20, 7, 1])
    slots = [4, 2, 1]
    q = torch.randn(3, 3, 4, 16, generator=g)
    k_new, v_new = torch.randn(3, 3, 2, 16, generator=g), torch.randn(3, 3, 2, 16, generator=g)
    n_new = torch.tensor([3, 1, 2])
    before = [cache.k[0].clone(), cache.v[0].clone(), cache.lengths.clone()]
    got = cache.attend(0, slots, q, k_new, v_new, n_new)  # writes the new keys, then attends
    assert got.dtype == dtype
    cache2 = KVCache(1, 5, 32, 2, 16, dtype=dtype, sliding_window=6)
    cache2.k[0].copy_(before[0]), cache2.v[0].copy_(before[1])
    cache2.lengths.copy_(before[2])
    want = cache2.attend(0, slots, q.to(dtype).float(), k_new, v_new, n_new, impl="sdpa") if dtype == torch.float32 \
        else None
    idx = torch.tensor(slots)
    ref = reference(q.to(dtype).float(), cache.k[0], cache.v[0], cache.positions(idx, 3), cache.lengths[idx] + n_new, 6, idx)
    for b, n in enumerate(n_new.tolist()):  # padded query rows (t >= n_new) are not compared
        # the output is stored in the cache dtype: bf16 rounding of the result (2^-8 relative)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(got[b, :n].float(), ref[b, :n].float(), atol=tol, rtol=tol)
        if want is not None:
            torch.testing.assert_close(got[b, :n], want[b, :n], atol=1e-5, rtol=1e-5)


def test_bad_input_is_a_clear_error():
    q = torch.randn(1, 1, 3, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        ha.host_attention(q, k, k, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    with pytest.raises(ValueError, match="fp32, bf16 and fp16"):
        ha.host_attention(torch.randn(1, 1, 2, 8), k.double(), k.double(), torch.zeros(1, 1, dtype=torch.long),
                          torch.ones(1, dtype=torch.long))


def test_env_forces_fallback_and_rejects_nonsense(monkeypatch):
    monkeypatch.setenv(ha.ENV_IMPL, "torch")
    assert ha.backend() == "torch" and "grouped matmul" in ha.backend_note()
    monkeypatch.setenv(ha.ENV_IMPL, "fast")
    with pytest.raises(ValueError, match="expected 'kernel' or 'torch'"):
        ha.backend()


def test_thread_choice_leaves_one_core_and_refuses_oversubscription(monkeypatch):
    monkeypatch.setattr(ha, "usable_cores", lambda: 4)
    assert ha.default_threads() == 3
    monkeypatch.setattr(ha, "usable_cores", lambda: 1)
    assert ha.default_threads() == 1
    with pytest.raises(ValueError, match="may use only 1 CPU"):
        ha.set_threads(2)
    with pytest.raises(ValueError, match="at least 1"):
        ha.set_threads(0)
