"""The host kernel's register-blocked code paths against the float64 reference and against themselves.

The AVX-512 kernel works on 32-key tiles (two vectors of scores), scores in groups of up to 12 query rows,
P.V in groups of up to 6 rows x 64 head-dim columns (then 32- and 16-wide slices), a bf16 V read as even /
odd halves of 32 columns, and an fp16 V (or a bf16 one with a head dim not a multiple of 32) either
converted in registers (up to 24 rows) or converted once per tile (more rows). These cases
put every remainder in play: key counts that are not a multiple of the tile (or of 16), row counts
T*G that are not a multiple of any group size, head dims 16..128 that leave 32- and 16-wide slices,
windows that start mid-tile, and both V paths. Each must match the reference to 1e-5, and each query's
output must be bitwise what it gets decoded alone (its row group and tile split do not change its sums).
"""
from __future__ import annotations

import pytest
import torch

from specoffload.runtime import host_attention as ha

from test_host_attention import assert_matches, case

LENGTHS = [33, 0, 65, 1, 31, 200, 47]


def _need_kernel():
    if ha.backend("kernel") != "kernel":
        pytest.skip("the C++ kernel could not be built here: " + ha.backend_note("kernel"))


@pytest.mark.parametrize("dtype,T,G,Dh,window", [
    (torch.bfloat16, 5, 4, 128, None),   # 20 rows: scores 10 + 10, P.V 5 x 4, V read from the cache
    (torch.bfloat16, 7, 5, 64, 21),      # 35 rows: scores 12 + 12 + 11, 6 P.V groups on even / odd V
    (torch.float32, 9, 8, 128, None),    # 72 rows: 6 score groups, 12 P.V groups per 64 columns
    (torch.float32, 3, 3, 80, 40),       # head dim 80: a 64-wide block and a 16-wide slice
    (torch.float16, 4, 7, 96, None),     # 28 rows, fp16 V converted once per tile; 64 + 32 columns
    (torch.bfloat16, 2, 3, 48, None),    # head dim 48: bf16 scores and V in fp32 (not a multiple of 32)
    (torch.bfloat16, 9, 3, 80, None),    # 27 rows, head dim 80: the bf16 V converted once per tile
    (torch.bfloat16, 1, 1, 16, 5),       # one row, a 16-wide head dim, a short window
    (torch.float32, 6, 2, 32, None),     # 12 rows: exactly one score group
])
def test_tiles_and_row_groups_match_reference(dtype, T, G, Dh, window):
    _need_kernel()
    q, k, v, q_pos, kv_len, rows = case(11, LENGTHS, T, G, 2, Dh, dtype, 210)
    got = ha.host_attention(q, k, v, q_pos, kv_len, window, rows=rows, impl="kernel")
    assert_matches(got, q, k, v, q_pos, kv_len, window, rows)
    # Bitwise the same as each query decoded alone (one row, one query: the smallest groups, one tile path).
    for b in range(len(LENGTHS)):
        for t in range(T):
            if int(q_pos[b, t]) >= int(kv_len[b]):
                continue
            alone = ha.host_attention(q[b:b + 1, t:t + 1], k, v, q_pos[b:b + 1, t:t + 1],
                                      torch.minimum(kv_len[b:b + 1], q_pos[b:b + 1, t] + 1), window,
                                      rows=rows[b:b + 1], impl="kernel")
            assert torch.equal(alone[0, 0], got[b, t]), (b, t)


def test_thread_count_does_not_change_results():
    """Work items sit at fixed (row, kv head, chunk): one thread and two give the same bits (a long row is
    split into chunks and merged in chunk order either way)."""
    _need_kernel()
    q, k, v, q_pos, kv_len, rows = case(5, [1100, 70, 600], 5, 4, 2, 128, torch.bfloat16, 1100)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ha.host_attention(q, k, v, q_pos, kv_len, rows=rows, impl="kernel")
        torch.set_num_threads(2)
        two = ha.host_attention(q, k, v, q_pos, kv_len, rows=rows, impl="kernel")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert_matches(one, q, k, v, q_pos, kv_len, None, rows)


def test_peak_probe_reports_a_positive_rate_and_rejects_unknown_kinds():
    _need_kernel()
    mod = ha.kernel_module()
    fma = mod.peak_gflops("fma", 0.02)
    dp = mod.peak_gflops("dpbf16", 0.02)
    if mod.has_avx512():
        assert 0 < fma < 1e5
    else:
        assert fma == 0
    assert dp >= 0 and dp < 1e5
    with pytest.raises(RuntimeError, match="kind must be 'fma' or 'dpbf16'"):
        mod.peak_gflops("amx", 0.01)


@pytest.mark.parametrize("Dh,T,G", [(128, 5, 4), (32, 3, 5), (96, 1, 2)])
def test_bf16_pairs_never_read_past_a_row(Dh, T, G):
    """bf16 P.V works on pairs of keys; an odd key count pairs the last key with zeros. Keys past each row's
    length (and the padding of a window) hold NaN and inf here: a result that read them would not be finite."""
    _need_kernel()
    lengths = [33, 1, 65, 47, 0, 3, 97]
    L = 97
    q, k, v, q_pos, kv_len, rows = case(13, lengths, T, G, 2, Dh, torch.bfloat16, L)
    for b, n in enumerate(lengths):
        k[rows[b], :, n:] = float("nan")
        v[rows[b], :, n:] = float("nan")
        if n < L:
            v[rows[b], :, n] = float("inf")
    for window in (None, 6):
        got = ha.host_attention(q, k, v, q_pos, kv_len, window, rows=rows, impl="kernel")
        assert torch.isfinite(got).all()
        assert_matches(got, q, k, v, q_pos, kv_len, window, rows)
