"""Tree speculative decoding (SPECS.md section 5): tree attention against an explicit-mask
float64 reference, verification ops against plain-Python walks, exactness of stochastic
verification by chi-square, the Sequoia DP against brute force, SpecExec trees against brute
force, and speculative greedy decoding equal to plain greedy decoding token for token."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effx.kv as kv
import effx.spec as spec
from common import ALL_DEVICES, DTYPES, TOL, rel_error
from reference.attention import attention_ref
from reference.spec import best_tree_value, sampling_probs_ref, tree_value, walk_ref


def random_parents(n: int, g: torch.Generator, roots: float = 0.1) -> list[int]:
    """A random tree: each node's parent uniform over the earlier nodes, or the root."""
    out = []
    for i in range(n):
        if i == 0 or torch.rand((), generator=g) < roots:
            out.append(-1)
        else:
            out.append(int(torch.randint(0, i, (), generator=g)))
    return out


# --- tree attention -------------------------------------------------------------------------------


def check_tree_attention(device, dtype, b, hkv, hq, d, p, n, per_row, ragged, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype=dtype, device=device)

    q, kp, vp, kt, vt = r(b, hq, n, d), r(b, hkv, p, d), r(b, hkv, p, d), r(b, hkv, n, d), r(b, hkv, n, d)
    parents = [random_parents(n, g) for _ in range(b)] if per_row else [random_parents(n, g)] * b
    par = torch.tensor(parents) if per_row else torch.tensor(parents[0])
    lengths = [int(x) for x in torch.randint(0, p + 1, (b,), generator=g)] if ragged else [p] * b
    out, lse = spec.tree_attention(q, kp, vp, kt, vt, par, prefix_lengths=lengths if ragged else None,
                                   return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    for row in range(b):
        ln = lengths[row]
        k = torch.cat([kp[row, :, :ln], kt[row]], 1).cpu()
        v = torch.cat([vp[row, :, :ln], vt[row]], 1).cpu()
        ref, ref_lse = attention_ref(q[row].cpu(), k, v, ln, 1 / math.sqrt(d), parents=parents[row])
        assert rel_error(out[row], ref) < TOL[dtype]
        torch.testing.assert_close(lse[row].cpu().double(), ref_lse, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hkv,hq,d,p,n,per_row,ragged", [
    (1, 1, 1, 32, 0, 1, False, False),  # no prefix, one token
    (2, 2, 8, 64, 77, 13, True, True),  # GQA, a tree per row, ragged prefixes
    (3, 4, 4, 40, 130, 64, False, True),
    (1, 2, 6, 128, 300, 257, False, False),  # several query chunks and ancestor-mask words
])
def test_tree_attention_matches_explicit_mask(device, dtype, b, hkv, hq, d, p, n, per_row, ragged):
    check_tree_attention(device, dtype, b, hkv, hq, d, p, n, per_row, ragged, seed=n + p)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_tree_attention_1024_tokens(device):
    check_tree_attention(device, torch.float32, 2, 1, 2, 16, 50, 1024, True, True, seed=5)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_tree_attention_chain_is_causal_and_noncontiguous_inputs(device):
    torch.manual_seed(3)
    q = torch.randn(2, 6, 4, 32, device=device).transpose(1, 2)  # [2, 4, 6, 32] viewed, not copied
    kp = torch.randn(2, 2, 9, 64, device=device)[..., ::2]  # head_dim strided
    vp = torch.randn(2, 2, 9, 32, device=device)
    kt, vt = torch.randn(2, 2, 6, 32, device=device), torch.randn(2, 2, 6, 32, device=device)
    out = spec.tree_attention(q, kp, vp, kt, vt, [-1, 0, 1, 2, 3, 4])
    k, v = torch.cat([kp, kt], 2), torch.cat([vp, vt], 2)
    causal = torch.ones(6, 15, dtype=torch.bool, device=device).tril(9)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@given(n=st.integers(1, 40), p=st.integers(0, 40), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       seed=st.integers(0, 10**6))
@settings(max_examples=25, deadline=None)
def test_tree_attention_property(n, p, hkv, group, seed):
    check_tree_attention("cpu", torch.float32, 2, hkv, hkv * group, 8, p, n, True, True, seed)


def test_bad_trees_get_clear_errors():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    kp = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"effx\.spec\.tree_attention: parents\[2\] must be in \[-1, 2\) \(a node's "
                                         r"parent comes before it, so no cycles\), got 3"):
        spec.tree_attention(q, kp, kp, k, k, [-1, 0, 3, 2])
    with pytest.raises(ValueError, match=r"parents\[0\] must be in \[-1, 0\) .* got 1"):  # the cycle 0 -> 1 -> 0
        spec.tree_attention(q, kp, kp, k, k, [1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"parents\[1\] must be in \[-1, 1\) .* got 1"):  # a self-loop
        spec.tree_attention(q, kp, kp, k, k, [-1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"parents\[3\] must be in \[-1, 3\) .* got -2"):
        spec.tree_attention(q, kp, kp, k, k, [-1, 0, 0, -2])
    with pytest.raises(ValueError, match=r"effx\.spec\.tree_attention: parents must have one entry per tree token "
                                         r"\(4\), got 3"):
        spec.tree_attention(q, kp, kp, k, k, [-1, 0, 0])
    with pytest.raises(ValueError, match=r"parents of shape \[B, N\] must have B = 1 \(the batch\), got 2"):
        spec.tree_attention(q, kp, kp, k, k, [[-1, 0, 0, 0]] * 2)
    with pytest.raises(ValueError, match=r"prefix_lengths must be 1 ints in \[0, 5\], got \[6\]"):
        spec.tree_attention(q, kp, kp, k, k, [-1, 0, 0, 0], prefix_lengths=[6])
    with pytest.raises(ValueError, match=r"k_prefix and v_prefix must have shape \[1, 2, P, 16\]"):
        spec.tree_attention(q, kp[:, :1], kp[:, :1], k, k, [-1, 0, 0, 0])
    with pytest.raises(RuntimeError, match=r"effx\.dense_attention: q heads \(3\) must be a multiple of kv heads \(2\)"):
        spec.tree_attention(torch.randn(1, 3, 4, 16), kp, kp, k, k, [-1, 0, 0, 0])


# --- sampling distribution and verification ops ----------------------------------------------------


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.01)])
def test_sampling_probs(device, dtype, temperature, top_p):
    torch.manual_seed(1)
    logits = (torch.randn(3, 5, 301) * 3).to(dtype=dtype, device=device)
    got = spec.ops.sampling_probs(logits, temperature, top_p)
    want = sampling_probs_ref(logits.cpu().float(), temperature, top_p)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    assert ((got.cpu() > 0) == (want > 0)).all()  # the same nucleus
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-6, rtol=1e-4)


def tree_batch(b, n, vocab, g, per_row):
    parents = [random_parents(n, g, roots=0.3) for _ in range(b)] if per_row else [random_parents(n, g, 0.3)] * b
    tokens = torch.randint(0, vocab, (b, n), generator=g)
    tokens[torch.rand(b, n, generator=g) < 0.1] = -1  # empty nodes
    return tokens, parents


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_verify_greedy_and_match_walks(device, dtype, per_row):
    g = torch.Generator().manual_seed(2)
    b, n, vocab = 6, 40, 5  # a small vocabulary, so many children match
    tokens, parents = tree_batch(b, n, vocab, g, per_row)
    logits = torch.randn(b, n + 1, vocab, generator=g).to(dtype)
    par = torch.tensor(parents) if per_row else torch.tensor(parents[0])
    res = spec.verify_greedy(tokens.to(device), par.to(device), logits.to(device))
    samples = torch.randint(0, vocab, (b, n + 1), generator=g)
    res_m = spec.ops.tree_verify_match(tokens.to(device), par.to(device), samples.to(device))
    total = 0
    for row in range(b):
        t = tokens[row].tolist()
        path, bonus = walk_ref(t, parents[row], lambda c: int(logits[row, c + 1].float().argmax()))
        assert res.paths()[row] == path and int(res.bonus[row]) == bonus
        assert (res.accepted[row, len(path):] == -1).all()
        path, bonus = walk_ref(t, parents[row], lambda c: int(samples[row, c + 1]))
        assert res_m[0][row, :len(path)].tolist() == path and int(res_m[1][row]) == len(path)
        assert int(res_m[2][row]) == bonus
        total += len(path)
    assert total > 0  # the test exercised accepted paths


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    probs = probs.double()
    keep = probs > 0
    assert (counts[~keep] == 0).all(), "a token of probability 0 was emitted"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return scipy.stats.chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("draft", ["equal", "disjoint", "random", "peaked"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_verify_sample_is_exact(device, draft, top_p):
    """Two levels: the root has 3 children drawn without replacement from q, each child 2
    children drawn from its own q. The first two emitted tokens (path then bonus) must follow
    the target: p_root(x1) * p_child[x1](x2)."""
    g = torch.Generator().manual_seed({"equal": 0, "disjoint": 1, "random": 2, "peaked": 3}[draft] + int(top_p * 10))
    vocab, trials = 6, 40000
    target_root = torch.randn(vocab, generator=g) * 1.5
    target_next = torch.randn(vocab, vocab, generator=g) * 1.5  # the target at a child depends on its token
    p_root = spec.ops.sampling_probs(target_root, 1.0, top_p)
    p_next = spec.ops.sampling_probs(target_next, 1.0, top_p)
    if draft == "equal":
        q_root, q_next = p_root.clone(), p_next.clone()
    elif draft == "disjoint":  # q puts its mass where p has little: every token of the support of q is tried
        q_root = torch.softmax(-target_root * 3, -1)
        q_next = torch.softmax(-target_next * 3, -1)
    elif draft == "random":
        q_root = torch.softmax(torch.randn(vocab, generator=g), -1)
        q_next = torch.softmax(torch.randn(vocab, vocab, generator=g), -1)
    else:
        q_root = torch.softmax(torch.randn(vocab, generator=g) * 6, -1)
        q_next = torch.softmax(torch.randn(vocab, vocab, generator=g) * 6, -1)
    parents = [-1, -1, -1, 0, 0, 1, 1, 2, 2]
    n = len(parents)
    gen = torch.Generator(device="cpu").manual_seed(7)
    first = spec._draw_without_replacement(q_root.expand(trials, -1), 3, gen)
    tokens = torch.full((trials, n), -1, dtype=torch.int64)
    tokens[:, :3] = first
    q_rows = torch.zeros(trials, n + 1, vocab)
    p_rows = torch.zeros(trials, n + 1, vocab)
    q_rows[:, 0], p_rows[:, 0] = q_root, p_root
    for c in range(3):
        x = first[:, c].clamp(min=0)
        q_rows[:, c + 1], p_rows[:, c + 1] = q_next[x], p_next[x]
        tokens[:, 3 + 2 * c: 5 + 2 * c] = spec._draw_without_replacement(q_next[x], 2, gen)
        gone = first[:, c] < 0
        tokens[gone, 3 + 2 * c: 5 + 2 * c] = -1
    for r in range(4, n + 1):  # leaves: the target at a grandchild does not matter for two tokens
        p_rows[:, r] = 1.0 / vocab
    u = torch.rand(trials, n + 1, generator=gen)
    args = [t.to(device) for t in (tokens, torch.tensor(parents), p_rows, q_rows, u)]
    acc, num, bonus = (t.cpu() for t in spec.ops.tree_verify_sample(*args))
    path_tokens = tokens.gather(1, acc.clamp(min=0))
    emitted = torch.where(torch.arange(n)[None] < num[:, None], path_tokens, torch.full_like(path_tokens, -1))
    x1 = torch.where(num > 0, emitted[:, 0], bonus)
    x2 = torch.where(num > 1, emitted[:, 1], torch.where(num == 1, bonus, torch.full_like(bonus, -1)))
    two = num >= 1
    assert chi_square_p(torch.bincount(x1, minlength=vocab), p_root) > 1e-4
    joint = torch.bincount(x1[two] * vocab + x2[two], minlength=vocab * vocab)
    # Conditioned on one token accepted, x2 follows p_next[x1]: compare per x1 as a joint table.
    cond = torch.zeros(vocab * vocab)
    for a in range(vocab):
        m = joint[a * vocab:(a + 1) * vocab].sum()
        cond[a * vocab:(a + 1) * vocab] = p_next[a] * m
    assert chi_square_p(joint, cond / cond.sum()) > 1e-4
    if draft == "equal":
        assert (num >= 1).all()  # q == p accepts the first child always
    if draft == "disjoint":
        assert (num == 0).float().mean() > 0.05  # rejections, residual draws exercised


def test_verify_sample_all_zero_residual_falls_back_to_p():
    """A child rejected where p == q leaves no residual: the bonus comes from the original p
    (the public Sequoia code stops generating there)."""
    vocab = 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = p.expand(1, 2, vocab).contiguous()
    for u0, want in ((0.05, 0), (0.25, 1), (0.55, 2), (0.95, 3)):
        u = torch.tensor([[u0, 1.0]])  # u = 1 rejects even where p(x) == q(x)
        acc, num, bonus = spec.ops.tree_verify_sample(torch.tensor([[2]]), torch.tensor([-1]), rows, rows, u)
        assert int(num[0]) == 0 and int(bonus[0]) == want and int(acc[0, 0]) == -1


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_verify_wrappers_with_generators(device):
    g = torch.Generator().manual_seed(4)
    b, n, vocab = 3, 7, 11
    tokens, parents = tree_batch(b, n, vocab, g, False)
    logits = torch.randn(b, n + 1, vocab, generator=g).to(device)
    q = torch.softmax(torch.randn(b, n + 1, vocab, generator=g), -1).to(device)
    one = spec.verify_sample(tokens.to(device), parents[0], logits, q, temperature=0.8, top_p=0.9,
                             generator=torch.Generator().manual_seed(1))
    two = spec.verify_sample(tokens.to(device), parents[0], logits, q, temperature=0.8, top_p=0.9,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(one.accepted, two.accepted) and torch.equal(one.bonus, two.bonus)  # reproducible
    assert ((one.bonus >= 0) & (one.bonus < vocab)).all()
    sx = spec.verify_specexec(tokens[0].to(device), parents[0], logits, temperature=1e-4,
                              generator=torch.Generator().manual_seed(1))
    gr = spec.verify_greedy(tokens[0].to(device), parents[0], logits)
    assert torch.equal(sx.accepted, gr.accepted) and torch.equal(sx.bonus, gr.bonus)  # T -> 0 is greedy


def test_ops_opcheck_and_compile():
    g = torch.Generator().manual_seed(5)
    tokens, parents = tree_batch(2, 6, 9, g, True)
    par = torch.tensor(parents)
    logits = torch.randn(2, 7, 9, generator=g)
    probs = torch.softmax(logits, -1)
    u = torch.rand(2, 7, generator=g)
    torch.library.opcheck(torch.ops.effx.sampling_probs.default, (logits, 0.9, 0.8))
    torch.library.opcheck(torch.ops.effx.tree_verify_greedy.default, (tokens, par, logits.half()))
    torch.library.opcheck(torch.ops.effx.tree_verify_match.default, (tokens, par[0], tokens.new_zeros(2, 7)))
    torch.library.opcheck(torch.ops.effx.tree_verify_sample.default, (tokens, par, probs, probs, u))

    def step(x):
        p = torch.ops.effx.sampling_probs(x, 1.0, 1.0)
        return torch.ops.effx.tree_verify_greedy(tokens, par, x)[2] + p.argmax(-1)[:, 0]

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(logits), step(logits))


def test_bad_op_inputs():
    t, par = torch.tensor([[1, 2]]), torch.tensor([-1, 0])
    logits = torch.randn(1, 3, 4)
    with pytest.raises(RuntimeError, match=r"effx\.tree_verify_greedy: parents\[1\] must be in \[-1, 1\) \(a node's "
                                           r"parent comes before it\), got 1"):
        torch.ops.effx.tree_verify_greedy(t, torch.tensor([-1, 1]), logits)
    with pytest.raises(RuntimeError, match=r"effx\.tree_verify_greedy: logits must have shape \[1, 3, 4\] \(row 0 "
                                           r"at the root, row i \+ 1 at node i\), got \[1, 2, 4\]"):
        torch.ops.effx.tree_verify_greedy(t, par, logits[:, :2])
    with pytest.raises(RuntimeError, match=r"effx\.tree_verify_greedy: parents must have shape \[2\] or \[1, 2\]"):
        torch.ops.effx.tree_verify_greedy(t, torch.tensor([-1]), logits)
    with pytest.raises(RuntimeError, match=r"effx\.tree_verify_greedy: tokens must be < vocab \(4\) or negative for "
                                           r"an empty node, got 7 at node 1 of row 0"):
        torch.ops.effx.tree_verify_greedy(torch.tensor([[1, 7]]), par, logits)
    with pytest.raises(RuntimeError, match=r"effx\.tree_verify_sample: draft_probs must be Float, got Half"):
        torch.ops.effx.tree_verify_sample(t, par, logits, logits.half(), torch.rand(1, 3))
    with pytest.raises(RuntimeError, match=r"effx\.tree_verify_sample: uniforms must have shape \[1, 3\]"):
        torch.ops.effx.tree_verify_sample(t, par, logits, logits, torch.rand(1, 2))
    with pytest.raises(RuntimeError, match=r"effx\.sampling_probs: temperature must be > 0"):
        torch.ops.effx.sampling_probs(logits, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"effx\.sampling_probs: top_p must be in \(0, 1\], got 1.5"):
        torch.ops.effx.sampling_probs(logits, 1.0, 1.5)
    with pytest.raises(RuntimeError, match=r"effx\.tree_verify_match: tokens must be int64, got Int"):
        torch.ops.effx.tree_verify_match(t.int(), par, torch.zeros(1, 3, dtype=torch.int64))


# --- Sequoia trees and the chooser ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("order", ["any", "non-increasing"])  # the DP, and the best-first search
def test_sequoia_dp_matches_brute_force(seed, order):
    g = torch.Generator().manual_seed(seed)
    k = 3
    p = torch.rand(k + 1, generator=g)
    p = (p[:k] / p.sum()).tolist()  # sums below 1: sometimes no child is accepted
    if order == "non-increasing":
        p = sorted(p, reverse=True)
    elif p == sorted(p, reverse=True):
        p = p[::-1]
    for max_nodes, max_depth in ((1, 1), (3, 2), (5, 3), (6, 2), (7, 4)):
        t = spec.sequoia_tree(p, max_nodes, max_depth)
        assert len(t.parents) <= max_nodes and (not t.parents or t.depth <= max_depth)
        spec.check_parents(t.parents)
        assert math.isclose(tree_value(t.parents, p), t.expected_tokens, rel_tol=1e-12)
        assert math.isclose(t.expected_tokens, best_tree_value(p, max_nodes, max_depth), rel_tol=1e-12)


def test_sequoia_large_tree_shape():
    p = [0.5, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.01]
    t = spec.sequoia_tree(p, 1024, 32)
    assert t.size == 1024 and t.depth <= 32
    assert math.isclose(tree_value(t.parents, p), t.expected_tokens, rel_tol=1e-9)
    chain = spec.sequoia_tree([0.9], 8, 8)  # one child per node: a chain
    assert chain.parents == [-1, 0, 1, 2, 3, 4, 5, 6]
    assert math.isclose(chain.expected_tokens, sum(0.9**i for i in range(9)))
    # siblings in draw order: a node's first child is the most valuable
    assert spec.sequoia_tree([0.6, 0.3], 3, 1).parents == [-1, -1]


def test_choose_tree_minimizes_time_per_token():
    p = [0.6, 0.2, 0.1]
    target = {1: 1.0, 8: 1.05, 32: 1.3, 128: 3.0}
    best = spec.choose_tree(p, 0.05, target, 64, 8)
    dp = spec._SequoiaDP(p, 64, 8, "test")
    for n in range(1, 65):
        for d in range(1, 9):
            cost = (d * 0.05 + spec._interpolate(target, n + 1, "t")) / float(dp.f[d + 1, n + 1])
            assert best.time_per_token <= cost + 1e-12
    assert math.isclose(tree_value(best.parents, p), best.expected_tokens, rel_tol=1e-12)
    slow_target = spec.choose_tree(p, 0.001, lambda n: 1.0, 64, 8)  # free tokens: the biggest tree
    assert slow_target.size == 64
    # Size 0 is plain decoding: the answer when every draft step costs more than it saves.
    none = spec.choose_tree(p, 10.0, target, 64, 8, sizes=range(0, 65))
    assert none.parents == [] and none.depth == 0 and none.expected_tokens == 1.0 and none.time_per_token == 1.0
    assert spec.choose_tree(p, 0.05, target, 64, 8, sizes=range(0, 65)).parents == best.parents
    # A step's own work, paid once per step, makes more tokens per step worth more.
    costly = spec.choose_tree(p, 0.05, target, 64, 8, step_time=5.0)
    assert costly.expected_tokens > best.expected_tokens
    assert math.isclose(costly.time_per_token, min(
        (d * 0.05 + spec._interpolate(target, n + 1, "t") + 5.0) / float(dp.f[d + 1, n + 1])
        for n in range(1, 65) for d in range(1, 9)), rel_tol=1e-12)
    with pytest.raises(ValueError, match=r"effx\.spec\.choose_tree: accept_probs must be probabilities"):
        spec.choose_tree([0.8, 0.5], 0.1, target, 8, 2)
    with pytest.raises(ValueError, match=r"effx\.spec\.choose_tree: sizes must be in \[0, 8\], got 9"):
        spec.choose_tree(p, 0.1, target, 8, 2, sizes=[9])


# --- SpecExec trees ------------------------------------------------------------------------------


def path_of(tokens, parents, i):
    """The tokens from the root to node i."""
    out = []
    while i >= 0:
        out.append(tokens[i])
        i = parents[i]
    return tuple(reversed(out))


def test_specexec_tree_is_best_first():
    vocab, max_nodes, max_depth = 4, 9, 3
    g = torch.Generator().manual_seed(0)
    table = {}

    def lp_of(path):
        if path not in table:
            table[path] = torch.log_softmax(torch.randn(vocab, generator=g) * 2, -1)
        return table[path]

    calls = []

    def logprob_fn(tokens, parents, nodes):
        calls.append(len(nodes))
        return torch.stack([lp_of(() if i < 0 else path_of(tokens, parents, i)) for i in nodes])

    tree = spec.specexec_tree(logprob_fn, max_nodes, max_depth)
    spec.check_parents(tree.parents)
    got = {path_of(tree.tokens, tree.parents, i) for i in range(len(tree.tokens))}
    # brute force: every path of depth <= 3 with its cumulative log-prob, the best 9
    scores = {}

    def visit(path, s):
        if len(path) == max_depth:
            return
        lp = lp_of(path)
        for t in range(vocab):
            scores[path + (t,)] = s + float(lp[t])
            visit(path + (t,), s + float(lp[t]))

    visit((), 0.0)
    want = set(sorted(scores, key=lambda x: -scores[x])[:max_nodes])
    assert got == want
    assert len(calls) <= max_depth + 1  # the draft runs once per level
    for i, path in enumerate(path_of(tree.tokens, tree.parents, i) for i in range(len(tree.tokens))):
        assert math.isclose(tree.logprobs[i], scores[path], rel_tol=1e-9)


def test_specexec_trees_batch_each_row_as_alone():
    # Three rows with their own draft tables: row 0 uniform (its best 7 nodes lie within depth
    # 2, so it finishes a round early), row 1 peaked, row 2 with one token (a chain of 4 nodes,
    # fewer than asked for). Each batched tree equals specexec_tree on that row's table.
    vocabs, scales, max_nodes, max_depth = [5, 3, 1], [0.0, 3.0, 1.0], 7, 4
    g = torch.Generator().manual_seed(3)
    tables = [{} for _ in vocabs]

    def lp_of(r, path):
        if path not in tables[r]:
            tables[r][path] = torch.log_softmax(torch.randn(vocabs[r], generator=g) * scales[r], -1)
        return tables[r][path]

    rounds = []

    def batched(tokens, parents, nodes):
        rounds.append([len(x) for x in nodes])
        return [torch.stack([lp_of(r, () if i < 0 else path_of(tokens[r], parents[r], i)) for i in nodes[r]])
                if nodes[r] else None for r in range(len(nodes))]

    trees = spec.specexec_trees(batched, 3, max_nodes, max_depth)
    assert len(rounds) == max_depth and rounds[-1][0] == 0  # one call per level; row 0 done early
    for r, tree in enumerate(trees):
        alone = spec.specexec_tree(lambda t, p, n: torch.stack([lp_of(r, () if i < 0 else path_of(t, p, i))
                                                                for i in n]), max_nodes, max_depth)
        assert (tree.tokens, tree.parents) == (alone.tokens, alone.parents)
        assert tree.logprobs == alone.logprobs
    assert len(trees[2].tokens) == max_depth and trees[2].parents == [-1, 0, 1, 2]
    with pytest.raises(ValueError, match=r"effx\.spec\.specexec_trees: logprob_fn must return one entry per row "
                                         r"\(3\), got 1"):
        spec.specexec_trees(lambda t, p, n: [None], 3, 4, 2)
    with pytest.raises(ValueError, match=r"effx\.spec\.specexec_trees: batch must be >= 1, got 0"):
        spec.specexec_trees(batched, 0, 4, 2)
    with pytest.raises(ValueError, match=r"effx\.spec\.specexec_tree: branch must be >= 1, got 0"):
        spec.specexec_tree(batched, 4, 2, branch=0)


# --- decoding loop ---------------------------------------------------------------------------------


def models(device="cpu"):
    target = spec.TinyDecoder(vocab=97, dim=64, heads=4, kv_heads=2, layers=2, mix=0.5, seed=1, device=device)
    draft = spec.TinyDecoder(vocab=97, dim=64, heads=4, kv_heads=2, layers=2, mix=0.5, seed=1, device=device)
    draft.layers_used = 1
    return target, draft


def plain_greedy(target, prompt, steps):
    cache = target.make_cache(prompt.shape[0], prompt.shape[1] + steps + 1)
    pos = torch.arange(prompt.shape[1])[None].expand(prompt.shape[0], -1)
    logits = target(prompt, cache, pos)
    out, tok = [], logits[:, -1].argmax(-1)
    for i in range(steps):
        out.append(tok)
        logits = target(tok[:, None], cache, torch.full((prompt.shape[0], 1), prompt.shape[1] + i))
        tok = logits[:, -1].argmax(-1)
    return torch.stack(out, 1).tolist()


@pytest.mark.parametrize("tree", [[-1], [-1, 0, 1, 2], [-1, -1, 0, 0, 1, 2, 3], "sequoia"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculation_equals_greedy_decoding(tree, batch):
    target, draft = models()
    prompt = torch.randint(0, 97, (batch, 5), generator=torch.Generator().manual_seed(batch))
    steps = 30
    want = plain_greedy(target, prompt, steps)
    if tree == "sequoia":
        tree = spec.sequoia_tree([0.5, 0.2, 0.1], 12, 4)
    cap = 5 + steps + 40
    res = spec.generate(target, draft, prompt, steps, target_cache=target.make_cache(batch, cap),
                        draft_cache=draft.make_cache(batch, cap), tree=tree)
    assert res.tokens == want
    assert all(1 <= a for a in res.accepted_per_step)
    assert res.mean_accepted > 1.0  # the layer-skipping draft agrees often enough to gain
    assert len(res.accepted_per_step) < steps


def test_generate_without_draft_and_prompt_of_one():
    target, _ = models()
    prompt = torch.tensor([[3]])
    res = spec.generate(target, None, prompt, 8, target_cache=target.make_cache(1, 16))
    assert res.tokens == plain_greedy(target, prompt, 8)
    assert res.accepted_per_step == [1.0] * 8


def test_generate_sample_and_specexec_modes():
    target, draft = models()
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    cap = 80
    res = spec.generate(target, draft, prompt, 20, target_cache=target.make_cache(2, cap),
                        draft_cache=draft.make_cache(2, cap), tree=[-1, -1, 0, 0, 1], mode="sample",
                        temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in res.tokens] == [20, 20] and all(0 <= x < 97 for t in res.tokens for x in t)
    # SpecExec at a vanishing temperature samples the argmax: greedy output
    prompt1 = prompt[:1]
    res = spec.generate(target, draft, prompt1, 20, target_cache=target.make_cache(1, cap),
                        draft_cache=draft.make_cache(1, cap), mode="specexec", temperature=1e-4,
                        specexec_nodes=8, specexec_depth=3, generator=torch.Generator().manual_seed(0))
    assert res.tokens == plain_greedy(target, prompt1, 20)
    assert res.mean_accepted > 1.0
    # a batch: every row grows its own tree and still decodes greedily
    res = spec.generate(target, draft, prompt, 20, target_cache=target.make_cache(2, cap),
                        draft_cache=draft.make_cache(2, cap), mode="specexec", temperature=1e-4,
                        specexec_nodes=8, specexec_depth=3, generator=torch.Generator().manual_seed(0))
    assert res.tokens == plain_greedy(target, prompt, 20)
    assert res.mean_accepted > 1.0


def test_measure_acceptance_vector():
    target, draft = models()
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    greedy = spec.measure_acceptance(target, draft, tokens, lambda b: target.make_cache(b, 16), 4, greedy=True)
    sampled = spec.measure_acceptance(target, draft, tokens, lambda b: target.make_cache(b, 16), 4,
                                      generator=torch.Generator().manual_seed(0))
    for p in (greedy, sampled):
        assert p.shape == (4,) and (p >= 0).all() and p.sum() <= 1 + 1e-9
    assert greedy[0] > 0.3  # the layer-skipping draft's argmax often is the target's
    x = torch.randn(500, 7)
    same = spec.acceptance_vector(x, x, 3, generator=torch.Generator().manual_seed(0))
    assert same.tolist() == [1.0, 0.0, 0.0]  # q == p accepts the first draw always


def test_acceptance_vector_greedy_reference_and_chunked_sampling():
    g = torch.Generator().manual_seed(4)
    t, d = torch.randn(301, 11, generator=g), torch.randn(301, 11, generator=g)
    ranks = d.double().argsort(-1, descending=True)
    want = [(ranks[:, j] == t.double().argmax(-1)).double().mean().item() for j in range(5)]
    assert spec.acceptance_vector(t, d, 5, greedy=True).tolist() == pytest.approx(want, abs=1e-12)
    # A vocabulary big enough that the sampled rows go through in several chunks of positions.
    x = torch.randn(300, 65536, generator=g)
    same = spec.acceptance_vector(x, x, 3, generator=torch.Generator().manual_seed(0))
    assert same.tolist() == [1.0, 0.0, 0.0]
