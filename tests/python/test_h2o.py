"""H2O (SPECS.md section 3): scores fused into the dense attention kernel, eviction per
(row, kv-head), and H2OCache, against a float64 reference with an explicit probability matrix."""

from __future__ import annotations

import pytest
import torch

import effx.kv as kv
from common import ALL_DEVICES, DTYPES, TOL, rel_error
from reference.h2o import H2ORow


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def check_against_reference(cache, rows, q, k, v, lengths=None, tol=1e-5):
    out = cache.attend(0, q, k, v, lengths=lengths)
    for b, row in enumerate(rows):
        valid = k.shape[2] if lengths is None else lengths[b]
        ref = row.step(q[b, :, :valid].cpu(), k[b, :, :valid].cpu(), v[b, :, :valid].cpu(), cache.sm_scale)
        assert rel_error(out[b, :, :valid], ref) <= tol
    scores, positions = cache.scores(0)
    for b, row in enumerate(rows):
        for h in range(cache.num_kv_heads):
            kept = row.kept(h)
            got = [p for p in positions[b, h].tolist() if p >= 0]
            assert got == kept, (b, h)
            want = torch.tensor([row.heads[h][p][2] for p in kept], dtype=torch.float64)
            assert torch.allclose(scores[b, h, : len(kept)].double().cpu(), want, rtol=1e-4, atol=1e-5)
    return out


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kv_heads,q_heads", [(2, 2), (2, 8), (1, 8)])
def test_many_steps_against_explicit_probabilities(device, kv_heads, q_heads):
    torch.manual_seed(0)
    b, d, heavy, recent = 2, 32, 8, 6
    cache = kv.H2OCache(1, b, kv_heads, d, 64, heavy=heavy, recent=recent, dtype=torch.float32, device=device)
    rows = [H2ORow(kv_heads, heavy, recent) for _ in range(b)]
    check_against_reference(cache, rows, randn(b, q_heads, 40, d, device=device), randn(b, kv_heads, 40, d, device=device),
                            randn(b, kv_heads, 40, d, device=device))
    for _ in range(60):
        check_against_reference(cache, rows, randn(b, q_heads, 1, d, device=device),
                                randn(b, kv_heads, 1, d, device=device), randn(b, kv_heads, 1, d, device=device))
    _, positions = cache.scores(0)
    assert positions.shape[-1] == heavy + recent
    # rows with different contents keep different heavy hitters
    assert positions[0].tolist() != positions[1].tolist()
    assert cache.seq_len() == 100


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_chunked_prefill_and_ragged_rows(device, dtype):
    torch.manual_seed(1)
    b, h, hq, d = 3, 2, 4, 64
    cache = kv.H2OCache(1, b, h, d, 96, heavy=10, recent=5, dtype=dtype, device=device, prefill_chunk=16)
    rows = [H2ORow(h, 10, 5) for _ in range(b)]
    # keep-sets of low precision runs can differ from float64 at near-ties, so compare outputs
    # only for float32 and check the structure for all
    q, k, v = (randn(b, n, 50, d, dtype=dtype, device=device) for n in (hq, h, h))
    if dtype == torch.float32:
        check_against_reference(cache, rows, q, k, v, lengths=[50, 21, 7])
        for _ in range(10):
            check_against_reference(cache, rows, randn(b, hq, 1, d, device=device), randn(b, h, 1, d, device=device),
                                    randn(b, h, 1, d, device=device))
    else:
        out = cache.attend(0, q, k, v, lengths=[50, 21, 7])
        ref = rows[0].step(q[0].cpu(), k[0].cpu(), v[0].cpu(), cache.sm_scale)
        assert rel_error(out[0], ref) <= TOL[dtype]  # prefill attention is exact before eviction
    assert cache.lengths(0).tolist()[1:] == ([31, 17] if dtype == torch.float32 else [21, 7])


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_scores_over_many_kernel_blocks(device):
    """A prefill and decode steps over a few hundred tokens: the softmax and the scores run
    over several of the kernel's token blocks (rescaled block by block), ragged rows."""
    torch.manual_seed(31)
    b, h, hq, d = 2, 2, 4, 32
    cache = kv.H2OCache(1, b, h, d, 320, heavy=150, recent=150, dtype=torch.float32, device=device)
    rows = [H2ORow(h, 150, 150) for _ in range(b)]
    lengths = torch.tensor([290, 203], device=device)
    check_against_reference(cache, rows, randn(b, hq, 290, d, device=device), randn(b, h, 290, d, device=device),
                            randn(b, h, 290, d, device=device), lengths=lengths, tol=1e-4)
    for _ in range(3):
        check_against_reference(cache, rows, randn(b, hq, 1, d, device=device), randn(b, h, 1, d, device=device),
                                randn(b, h, 1, d, device=device), tol=1e-4)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_budget_covering_everything_evicts_nothing(device):
    torch.manual_seed(2)
    cache = kv.H2OCache(1, 1, 2, 32, 64, heavy=30, recent=30, dtype=torch.float32, device=device)
    rows = [H2ORow(2, 30, 30)]
    check_against_reference(cache, rows, randn(1, 4, 20, 32, device=device), randn(1, 2, 20, 32, device=device),
                            randn(1, 2, 20, 32, device=device))
    for _ in range(5):
        check_against_reference(cache, rows, randn(1, 4, 1, 32, device=device), randn(1, 2, 1, 32, device=device),
                                randn(1, 2, 1, 32, device=device))
    _, positions = cache.scores(0)
    assert positions[0, 0].tolist() == list(range(25))


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_heavy_zero_is_a_sliding_window(device):
    torch.manual_seed(3)
    cache = kv.H2OCache(1, 1, 2, 32, 64, heavy=0, recent=7, dtype=torch.float32, device=device)
    rows = [H2ORow(2, 0, 7)]
    check_against_reference(cache, rows, randn(1, 2, 30, 32, device=device), randn(1, 2, 30, 32, device=device),
                            randn(1, 2, 30, 32, device=device))
    for _ in range(4):
        check_against_reference(cache, rows, randn(1, 2, 1, 32, device=device), randn(1, 2, 1, 32, device=device),
                                randn(1, 2, 1, 32, device=device))
    _, positions = cache.scores(0)
    assert positions[0, 1].tolist() == list(range(27, 34))


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_ties_evict_the_older_token(device):
    cache = kv.H2OCache(1, 1, 1, 16, 32, heavy=5, recent=3, dtype=torch.float32, device=device)
    # Stored without attention: every score is 0, a 20-way tie among the non-recent tokens.
    cache.extend(0, randn(1, 1, 20, 16, device=device), randn(1, 1, 20, 16, device=device))
    scores, positions = cache.scores(0)
    assert positions[0, 0].tolist() == list(range(12, 20)) and (scores == 0).all()
    # A query of zeros gives every held token the same probability: the tie again goes to age.
    cache.attend(0, torch.zeros(1, 1, 1, 16, device=device), randn(1, 1, 1, 16, device=device),
                 randn(1, 1, 1, 16, device=device))
    scores, positions = cache.scores(0)
    assert positions[0, 0].tolist() == [13, 14, 15, 16, 17, 18, 19, 20]
    assert torch.allclose(scores[0, 0], torch.full((8,), 1 / 9, device=scores.device))


def test_ratio_budget_and_nbytes_bound():
    torch.manual_seed(4)
    cache = kv.H2OCache(1, 1, 2, 64, 128, heavy=0.1, recent=0.1, dtype=torch.float16)
    cache.attend(0, randn(1, 4, 100, 64, dtype=torch.float16), randn(1, 2, 100, 64, dtype=torch.float16),
                 randn(1, 2, 100, 64, dtype=torch.float16))
    assert (cache.heavy, cache.recent) == (10, 10) and cache.lengths(0).tolist() == [100]
    _, positions = cache.scores(0)
    assert positions.shape[-1] == 20
    # storage sized for the budget plus one step, not for the whole context
    small = kv.H2OCache(1, 1, 2, 64, 20 + 1, heavy=10, recent=10, dtype=torch.float16)
    dense = kv.DenseCache(1, 1, 2, 64, 4096, dtype=torch.float16)
    assert small.nbytes() < 0.01 * dense.nbytes()


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_streamed_prefill_keeps_storage_within_budget_plus_chunk(device):
    torch.manual_seed(8)
    heavy, recent, chunk = 6, 4, 8
    cache = kv.H2OCache(1, 2, 2, 32, heavy + recent + chunk, heavy=heavy, recent=recent, dtype=torch.float32,
                        device=device, prefill_chunk=chunk)
    rows = [H2ORow(2, heavy, recent) for _ in range(2)]
    q, k, v = randn(2, 4, 45, 32, device=device), randn(2, 2, 45, 32, device=device), randn(2, 2, 45, 32, device=device)
    out = cache.attend(0, q, k, v)
    for b, row in enumerate(rows):
        # the reference evicts before every chunk that would overflow the storage
        refs = []
        for c0 in range(0, 45, chunk):
            if sum(1 for _ in row.heads[0]) + min(chunk, 45 - c0) > heavy + recent + chunk:
                row.evict()
            refs.append(row.step(q[b, :, c0:c0 + chunk].cpu(), k[b, :, c0:c0 + chunk].cpu(),
                                 v[b, :, c0:c0 + chunk].cpu(), cache.sm_scale, evict=False))
        row.evict()
        assert rel_error(out[b], torch.cat(refs, 1)) <= 1e-5
        _, positions = cache.scores(0)
        assert [p for p in positions[b, 1].tolist() if p >= 0] == row.kept(1)
    check_against_reference(cache, rows, randn(2, 4, 1, 32, device=device), randn(2, 2, 1, 32, device=device),
                            randn(2, 2, 1, 32, device=device))


def test_crop_before_and_after_eviction():
    torch.manual_seed(5)
    cache = kv.H2OCache(1, 1, 1, 16, 32, heavy=4, recent=4, dtype=torch.float32)
    cache.attend(0, randn(1, 1, 6, 16), randn(1, 1, 6, 16), randn(1, 1, 6, 16))
    cache.crop(4)
    assert cache.seq_len() == 4
    cache.attend(0, randn(1, 1, 6, 16), randn(1, 1, 6, 16), randn(1, 1, 6, 16))
    with pytest.raises(ValueError, match=r"effx\.kv\.H2OCache\.crop: cannot crop: row 0 of layer 0 has evicted tokens"):
        cache.crop(5)


def test_bad_budgets():
    with pytest.raises(ValueError, match=r"effx\.kv\.H2OCache: heavy must be a token count >= 0 or a fraction in "
                                         r"\[0, 1\], got -1"):
        kv.H2OCache(1, 1, 1, 16, 32, heavy=-1, recent=4)
    with pytest.raises(ValueError, match=r"effx\.kv\.H2OCache: heavy \+ recent \(30 \+ 4\) must not exceed "
                                         r"capacity \(32\)"):
        kv.H2OCache(1, 1, 1, 16, 32, heavy=30, recent=4)
    with pytest.raises(ValueError, match=r"recent as a fraction of the prompt must be in \[0, 1\], got 1.5"):
        kv.H2OCache(1, 1, 1, 16, 32, heavy=2, recent=1.5)
    cache = kv.H2OCache(1, 1, 1, 16, 32, heavy=0.5, recent=0.5)
    with pytest.raises(ValueError, match=r"effx\.kv\.H2OCache: heavy \+ recent \(20 \+ 20 for a prompt of 40\) must "
                                         r"not exceed capacity \(32\)"):
        cache.attend(0, randn(1, 1, 40, 16, dtype=torch.float16), randn(1, 1, 40, 16, dtype=torch.float16),
                     randn(1, 1, 40, 16, dtype=torch.float16))
    k = torch.zeros(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match=r"effx\.h2o_evict_: heavy \+ recent must not exceed the capacity \(8\), "
                                           r"got 9"):
        torch.ops.effx.h2o_evict_(k, k.clone(), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8, dtype=torch.int64),
                                  torch.zeros(1, 2, dtype=torch.int64), 5, 4)
    with pytest.raises(RuntimeError, match=r"effx\.h2o_evict_: heavy and recent must be >= 0, got -1 and 4"):
        torch.ops.effx.h2o_evict_(k, k.clone(), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8, dtype=torch.int64),
                                  torch.zeros(1, 2, dtype=torch.int64), -1, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    torch.manual_seed(6)
    b, h, c, d = 2, 2, 16, 32
    k_cache, v_cache = randn(b, h, c, d, dtype=dtype), randn(b, h, c, d, dtype=dtype)
    scores = torch.rand(b, h, c)
    positions = torch.arange(c).repeat(b, h, 1)
    state = torch.tensor([[12, 12], [9, 9]])
    q, k, v = randn(b, 4, 3, d, dtype=dtype), randn(b, h, 3, d, dtype=dtype), randn(b, h, 3, d, dtype=dtype)
    torch.library.opcheck(torch.ops.effx.h2o_attention.default,
                          (q, k, v, k_cache, v_cache, state[:, 0].contiguous(), None, None, scores, True, 0.2))
    torch.library.opcheck(torch.ops.effx.h2o_evict_.default, (k_cache, v_cache, scores, positions, state, 3, 4))


def test_scores_of_one_step_match_probabilities_and_gqa_grouping():
    torch.manual_seed(7)
    cache = kv.H2OCache(1, 1, 2, 16, 64, heavy=60, recent=2, dtype=torch.float32)
    q, k, v = randn(1, 6, 10, 16), randn(1, 2, 10, 16), randn(1, 2, 10, 16)
    cache.attend(0, q, k, v)
    scores, _ = cache.scores(0)
    # each query row's probabilities sum to 1: per kv-head the scores sum to group * queries
    assert torch.allclose(scores.sum(-1), torch.full((1, 2), 3.0 * 10), rtol=1e-5)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_committed_tree_path_scores_like_plain_decoding(device):
    """A tree step scores nothing until commit_tree; then the accepted path adds exactly what
    the same tokens decoded as one regular step add (rejected nodes add nothing)."""
    torch.manual_seed(21)
    b, h, hq, d = 2, 2, 4, 32
    tree_cache, plain_cache = (kv.H2OCache(1, b, h, d, 64, heavy=6, recent=6, device=device, dtype=torch.float32)
                               for _ in range(2))
    prompt = [randn(b, hq, 20, d, device=device), randn(b, h, 20, d, device=device), randn(b, h, 20, d, device=device)]
    for c in (tree_cache, plain_cache):
        c.attend(0, *prompt)
    parents = [-1, 0, 0, 1, 1, 3]
    q, k, v = randn(b, hq, 6, d, device=device), randn(b, h, 6, d, device=device), randn(b, h, 6, d, device=device)
    before = tree_cache.scores(0)
    tree_cache.attend(0, q, k, v, parents=parents)
    assert all(torch.equal(x, y) for x, y in zip(tree_cache.scores(0), before))
    paths = [[0, 1, 3, 5], [0, 2]]  # rows accept different paths and lengths
    tree_cache.commit_tree(paths)
    width = max(map(len, paths))
    pick = torch.tensor([p + [0] * (width - len(p)) for p in paths], device=device)

    def path(t):
        return torch.gather(t, 2, pick[:, None, :, None].expand(-1, t.shape[1], -1, d))

    plain_cache.attend(0, path(q), path(k), path(v), lengths=[len(p) for p in paths])
    for got, want in zip(tree_cache.scores(0), plain_cache.scores(0)):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    step = [randn(b, hq, 1, d, device=device), randn(b, h, 1, d, device=device), randn(b, h, 1, d, device=device)]
    assert torch.allclose(tree_cache.attend(0, *step), plain_cache.attend(0, *step), rtol=1e-6, atol=1e-6)
