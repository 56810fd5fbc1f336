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


@pytest.mark.parametrize("dtype,T", [(torch.bfloat16, 5), (torch.bfloat16, 1), (torch.float32, 1)])
def test_thread_count_does_not_change_results(dtype, T):
    """Work items sit at fixed (row, kv head, chunk): one thread, two and three give the same bits (a long row is
    split into chunks and merged in chunk order either way), over a ragged batch with more items than threads."""
    _need_kernel()
    lengths = [1100, 70, 600, 0, 1, 513, 40, 300]
    q, k, v, q_pos, kv_len, rows = case(5, lengths, T, 4, 2, 128, dtype, 1100)
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(ha.host_attention(q, k, v, q_pos, kv_len, rows=rows, impl="kernel"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    assert_matches(got[0], q, k, v, q_pos, kv_len, None, rows)


def test_kernel_work_runs_on_torch_threads():
    """The kernel's at::parallel_for spreads its work over torch's intra-op threads (built without OpenMP it ran
    every item on the calling thread, whatever the thread count): n tasks that each wait for all n to start
    complete on n distinct threads."""
    _need_kernel()
    mod = ha.kernel_module()
    assert mod.has_openmp(), ha.backend_note()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert mod.parallel_threads(2) == 2
        assert mod.parallel_threads(1) == 1
        torch.set_num_threads(1)
        assert mod.parallel_threads(2) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 63, 64 * 1024 + 37, 5 * 65536 + 129])
def test_read_baseline_sums_what_torch_sums(dtype, n):
    """read_sum (the bench's read-only baseline) reads every element once: its sum equals the float64 sum of the
    same values within fp32 rounding (blocks of 2^16 elements summed in 8 fp32 chains, blocks added in double), and
    the thread count does not change it."""
    _need_kernel()
    mod = ha.kernel_module()
    g = torch.Generator().manual_seed(n)
    x = (torch.rand(n, generator=g) * 2 + 0.5).to(dtype)  # positive values: no cancellation hides a missed block
    ref = x.double().sum().item()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod.read_sum(x)
        torch.set_num_threads(2)
        two = mod.read_sum(x)
    finally:
        torch.set_num_threads(before)
    assert one == two
    # each fp32 chain adds at most 2^16 / 128 values: relative error below 512 * 2^-24 of the absolute sum
    assert abs(one - ref) <= 512 * 2.0 ** -24 * x.double().abs().sum().item() + 1e-6, (one, ref)
    if n > 1:
        assert abs(one - ref) < 1e-4 * ref
        assert abs(mod.read_sum(x[:-1]) - (ref - x[-1].double().item())) <= 1e-4 * ref  # the tail is read too
    with pytest.raises(RuntimeError, match="contiguous"):
        mod.read_sum(torch.zeros(4, 4, dtype=dtype).t())


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


def test_a_build_without_openmp_says_why_in_the_backend_note(monkeypatch):
    """Where the -fopenmp build failed and the one-thread build runs, backend_note names it and the reason."""
    class OneThread:
        def has_openmp(self):
            return False

        def has_avx512(self):
            return False

    monkeypatch.setattr(ha, "backend", lambda impl=None: "kernel")
    monkeypatch.setattr(ha, "kernel_module", lambda: OneThread())
    monkeypatch.setitem(ha._state, "omp_why", "CompileError: cc1plus: error: unrecognized option '-fopenmp'")
    note = ha.backend_note()
    assert "one thread: built without OpenMP" in note and "unrecognized option '-fopenmp'" in note
