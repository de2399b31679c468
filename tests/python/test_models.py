"""The model runner: checkpoints written here in Hugging Face layout load and match
transformers; generation with every cache; ragged batches; hooks; bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import effx.spec
from common import rel_error
from effx import kv, models

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")

BASE = dict(vocab_size=96, hidden_size=128, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
            hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="float32")
CONFIGS = {
    "llama": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    "llama3-rope": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=16)),
    "llama-linear-bias": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                              rope_scaling=dict(type="linear", factor=2.0), attention_bias=True, mlp_bias=True),
    "qwen2-yarn": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True,
                       use_sliding_window=False,
                       rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64)),
    "llama-yarn-mscale": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                              rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32,
                                                beta_fast=16, beta_slow=2, mscale=0.8, mscale_all_dim=0.5)),
    "llama-dynamic": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=16,
                          rope_scaling=dict(type="dynamic", factor=2.0)),
    "mistral": dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None,
                    head_dim=48, tie_word_embeddings=False),
    "qwen2": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True,
                  use_sliding_window=False),
}
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def hf_model(config: dict, seed: int = 0):
    """transformers' own model for ``config``, with weights large enough that logits differ."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[config["model_type"]])
    cfg = cfg_cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 1 / p.shape[-1] ** 0.5)
    return model


def write_checkpoint(path, config: dict, state: dict, *, shards: int = 1):
    """config.json and safetensors in HF layout (with an index when sharded)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    if shards == 1:
        safetensors_torch.save_file(state, str(path / "model.safetensors"))
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        safetensors_torch.save_file(part, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    config = CONFIGS[name]
    ref = hf_model(config)
    write_checkpoint(tmp_path, config, ref.state_dict(), shards=1 if name == "llama" else 3)
    model = models.from_pretrained(tmp_path)
    assert model.dtype == torch.float32 and model.config.architecture == config["architectures"][0]
    ids = torch.randint(0, config["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = model(ids)
    assert got.shape == (2, 37, config["vocab_size"])
    assert rel_error(got, want) < 1e-5


def test_transformers_save_pretrained_sharded_loads(tmp_path):
    # transformers writes its own config spelling (rope_parameters in v5) and shard names.
    ref = hf_model(CONFIGS["llama3-rope"])
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = models.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    assert rel_error(model(ids), want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tmp_path, dtype):
    config = CONFIGS["qwen2"]
    write_checkpoint(tmp_path, config, hf_model(config).state_dict())
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(3))
    full = models.from_pretrained(tmp_path)(ids)
    half = models.from_pretrained(tmp_path, dtype=dtype)
    assert half.dtype == dtype
    got = half(ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_error(got, full) < 5e-2


# --- generation on a tiny random model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return models.random_model(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                               seed=3)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def recompute_greedy(model, prompt, n):
    """Plain greedy decoding: the whole sequence through the model at every step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# Small KIVI residual so quantization happens within the test's sequence lengths.
POLICIES = {"dense": {}, "kivi2": dict(residual=32), "kivi4": dict(residual=32),
            "h2o": dict(heavy=0.2, recent=0.2, prefill_chunk=16)}


def test_greedy_dense_equals_full_recompute(tiny):
    prompt = prompts_of([23])[0]
    got = models.generate(tiny, [prompt], max_new_tokens=12)
    assert got.tokens == [recompute_greedy(tiny, prompt, 12)]
    assert got.finish_reasons == ["length"] and got.prompt_lengths == [23]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_generate_with_each_cache(tiny, policy):
    prompts = prompts_of([70, 45, 58])
    result = models.generate(tiny, prompts, max_new_tokens=20, cache=policy, cache_options=POLICIES[policy])
    assert [len(t) for t in result.tokens] == [20, 20, 20]
    assert all(0 <= t < tiny.config.vocab_size for row in result.tokens for t in row)
    assert result.cache.seq_len(0) == 70 + 19 and result.cache.lengths(1).tolist() == [89, 64, 77]
    dense = models.generate(tiny, prompts, max_new_tokens=20)
    if policy == "dense":
        assert result.tokens == dense.tokens
    else:
        assert result.kv_bytes < dense.kv_bytes
    # Along the same forced stream, each policy's next-token distributions stay near dense.
    stream = torch.tensor(dense.tokens)
    want = models.teacher_forced_logits(tiny, prompts, stream)
    got = models.teacher_forced_logits(tiny, prompts, stream, cache=policy, cache_options=POLICIES[policy])
    agree = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
    assert agree == 1.0 if policy == "dense" else agree > 0.5
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_in_half_precision(dtype):
    model = models.random_model(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                                seed=3, dtype=dtype)
    full = models.random_model(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                               seed=3)
    prompts = prompts_of([40, 52])
    stream = torch.tensor(models.generate(full, prompts, max_new_tokens=8).tokens)
    want = models.teacher_forced_logits(full, prompts, stream)
    for policy, options in POLICIES.items():
        result = models.generate(model, prompts, max_new_tokens=8, cache=policy, cache_options=options)
        assert result.cache.dtype == dtype and [len(t) for t in result.tokens] == [8, 8]
        got = models.teacher_forced_logits(model, prompts, stream, cache=policy, cache_options=options)
        assert torch.isfinite(got).all()
        assert (got.argmax(-1) == want.argmax(-1)).double().mean() > 0.5


def test_kivi_quantizes_during_generation(tiny):
    result = models.generate(tiny, prompts_of([70]), max_new_tokens=10, cache="kivi2", cache_options=dict(residual=32))
    state = result.cache.quantized_lengths(0)[0].tolist()
    assert state[0] == 79 and state[1] == 64 and state[2] == 79 - 32


def test_h2o_holds_only_its_budget(tiny):
    result = models.generate(tiny, prompts_of([100]), max_new_tokens=10, cache="h2o",
                             cache_options=dict(heavy=10, recent=10))
    held = result.cache.scores(0)[1]
    assert (held >= 0).sum(-1).max().item() == 20 and result.cache.seq_len(0) == 109


@pytest.mark.parametrize("policy", ["dense", "kivi2", "kivi4"])
def test_ragged_batch_equals_each_prompt_alone(tiny, policy):
    prompts = prompts_of([9, 41, 26], seed=5)
    options = POLICIES[policy]
    batch = models.generate(tiny, prompts, max_new_tokens=15, cache=policy, cache_options=options)
    for b, prompt in enumerate(prompts):
        alone = models.generate(tiny, [prompt], max_new_tokens=15, cache=policy, cache_options=options)
        assert batch.tokens[b] == alone.tokens[0]
    forced = torch.tensor(batch.tokens)
    both = models.teacher_forced_logits(tiny, prompts, forced, cache=policy, cache_options=options)
    for b, prompt in enumerate(prompts):
        alone = models.teacher_forced_logits(tiny, [prompt], forced[b:b + 1], cache=policy, cache_options=options)
        assert rel_error(both[b], alone[0]) < 1e-5


def test_left_and_right_padding_with_attention_mask(tiny):
    prompts = prompts_of([7, 19])
    want = models.generate(tiny, prompts, max_new_tokens=8).tokens
    for side in ("left", "right"):
        ids = torch.zeros(2, 19, dtype=torch.int64)
        mask = torch.zeros(2, 19, dtype=torch.int64)
        for b, p in enumerate(prompts):
            sl = slice(19 - len(p), 19) if side == "left" else slice(0, len(p))
            ids[b, sl], mask[b, sl] = torch.tensor(p), 1
        assert models.generate(tiny, ids, attention_mask=mask, max_new_tokens=8).tokens == want


def test_teacher_forced_dense_equals_full_forward(tiny):
    prompt, forced = prompts_of([30, 6], seed=7)
    logits = models.teacher_forced_logits(tiny, [prompt], torch.tensor([forced]))
    full = tiny(torch.tensor([prompt + forced]))
    assert rel_error(logits[0], full[0, len(prompt) - 1:len(prompt) + 5]) < 1e-5


@pytest.mark.parametrize("policy", list(POLICIES))
def test_stop_tokens_end_rows_independently(tiny, policy):
    prompts = prompts_of([12, 33], seed=2)
    run = dict(max_new_tokens=16, cache=policy, cache_options=POLICIES[policy])
    free = models.generate(tiny, prompts, **run).tokens
    stop = free[0][3]
    assert stop not in free[0][:3]
    result = models.generate(tiny, prompts, stop_tokens=[stop], **run)
    assert result.tokens[0] == free[0][:4] and result.finish_reasons[0] == "stop"
    # The other row keeps going, unaffected by its neighbour having stopped.
    cut = free[1].index(stop) + 1 if stop in free[1] else 16
    assert result.tokens[1] == free[1][:cut]
    assert result.cache.lengths(0).tolist() == [12 + 3, 33 + cut - 1]


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tiny):
    prompts = prompts_of([15, 10], seed=4)

    def sample(seed, **kw):
        return models.generate(tiny, prompts, max_new_tokens=10, temperature=1.0,
                               generator=torch.Generator().manual_seed(seed), **kw).tokens

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    greedy = models.generate(tiny, prompts, max_new_tokens=10).tokens
    assert sample(0, top_p=1e-6) == greedy


def test_mlp_hook_swaps_each_layer(tiny):
    ids = torch.tensor(prompts_of([17]))
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, j, inner):
            super().__init__()
            self.j, self.inner = j, inner

        def forward(self, x):
            calls.append((self.j, tuple(x.shape)))
            return self.inner(x)

    same = [Counting(j, layer.mlp) for j, layer in enumerate(tiny.model.layers)]
    assert torch.equal(tiny(ids, mlp=same), tiny(ids))
    assert calls == [(0, (1, 17, 128)), (1, (1, 17, 128))]
    zero = [None, lambda x: torch.zeros_like(x)]
    assert rel_error(tiny(ids, mlp=zero), tiny(ids)) > 1e-2
    with pytest.raises(ValueError, match=r"mlp must hold one module \(or None\) per layer \(2\), got 1"):
        tiny(ids, mlp=[None])


class HostWeights:
    """A weight provider as an offload engine would be: layers kept elsewhere (here fp64 on the
    host), each served on request in the model's dtype; it records the order of requests."""

    def __init__(self, model):
        self.store = [{n: p.double().clone() for n, p in layer.named_parameters()} for layer in model.model.layers]
        self.asked = []

    def layer(self, j):
        self.asked.append(j)
        return {n: t.float() for n, t in self.store[j].items()}


def test_weights_hook_serves_layers_in_order(tiny):
    prompts = prompts_of([11, 20], seed=6)
    provider = HostWeights(tiny)
    result = models.generate(tiny, prompts, max_new_tokens=6, weights=provider)
    assert result.tokens == models.generate(tiny, prompts, max_new_tokens=6).tokens
    assert provider.asked == [0, 1] * 6
    provider.store[1].pop("mlp.up_proj.weight")
    with pytest.raises(RuntimeError, match="up_proj"):
        tiny(torch.tensor([prompts[0]]), weights=provider)


def test_token_tree_forward_and_commit(tiny):
    # The hook tree speculation uses: tree tokens with depth positions, then commit_tree.
    prompt = prompts_of([19], seed=8)[0]
    a, b, c, d, e = 5, 77, 200, 13, 99
    cache = tiny.new_cache(1, 40)
    tiny(torch.tensor([prompt]), cache=cache)
    n = len(prompt)
    tree = tiny(torch.tensor([[a, b, c, d]]), cache=cache, parents=[-1, 0, 0, 1],
                positions=torch.tensor([[n, n + 1, n + 1, n + 2]]))
    path = tiny(torch.tensor([prompt + [a, b, d]]))[0, n:]
    assert rel_error(tree[0, [0, 1, 3]], path) < 1e-5
    assert rel_error(tree[0, 2], tiny(torch.tensor([prompt + [a, c]]))[0, -1]) < 1e-5
    cache.commit_tree([0, 1, 3])
    assert cache.seq_len(0) == n + 3
    after = tiny(torch.tensor([[e]]), cache=cache)[0, -1]
    assert rel_error(after, tiny(torch.tensor([prompt + [a, b, d, e]]))[0, -1]) < 1e-5


def test_tree_speculation_equals_greedy(tiny):
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8, 6, 4]]
    plain = models.generate(tiny, prompts, max_new_tokens=12)
    for tree in ([-1, 0, 1, 2], [-1, -1, 0, 0, 1]):
        spec = models.generate(tiny, prompts, max_new_tokens=12, draft=models.early_exit_draft(tiny, 1), tree=tree)
        assert spec.tokens == plain.tokens and spec.accepted_per_step >= 1
    with pytest.raises(ValueError, match="tree speculation needs prompts of equal length"):
        models.generate(tiny, [[1, 2, 3], [4, 5]], draft=models.early_exit_draft(tiny, 1))
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, "):
        models.early_exit_draft(tiny, 0)


def test_plan_tree(tiny):
    prompts = prompts_of([24, 24], seed=9)
    plain = models.generate(tiny, prompts, max_new_tokens=10)
    # A draft of all the model's layers guesses every token: p = [1, 0, ...], so the best tree
    # of any size and depth is a chain, worth its length + 1 tokens per step (which length
    # wins depends on this machine's timings).
    same = models.early_exit_draft(tiny, 2)
    tree = models.plan_tree(tiny, same, prompts, max_nodes=6, max_depth=3, min_nodes=1, repeats=1)
    assert 1 <= tree.size <= 3 and tree.parents == list(range(-1, tree.size - 1))
    assert tree.expected_tokens == tree.size + 1 and 0 < tree.time_per_token < float("inf")
    cheap = models.early_exit_draft(tiny, 1)
    for min_nodes in (0, 1):
        t = models.plan_tree(tiny, cheap, prompts, max_nodes=8, max_depth=4, min_nodes=min_nodes, repeats=1)
        if t.parents:
            effx.spec.check_parents(t.parents)
        assert min_nodes <= t.size <= 8 and t.depth <= 4
        assert 1.0 <= t.expected_tokens <= 1.0 + t.size
    costs = models.measure_tree_costs(tiny, cheap, prompts, max_nodes=8, repeats=1)
    assert sorted(costs.target_time) == [1, 2, 4, 8, 9] and sorted(costs.draft_time) == [1, 2, 4, 8]
    assert costs.accept.shape == (8,) and 0 <= costs.accept.sum() <= 1 and costs.step_time >= 0
    assert costs.choose(8, 4).time_per_token <= costs.choose(8, 4, min_nodes=1).time_per_token
    for draft in (same, cheap):
        auto = models.generate(tiny, prompts, max_new_tokens=10, draft=draft, tree="auto")
        assert auto.tokens == plain.tokens and auto.prefill_seconds > 0 and auto.tree is not None
    with pytest.raises(ValueError, match=r"plan_tree: min_nodes must be an int in \[0, max_nodes = 4\], got 5"):
        models.plan_tree(tiny, cheap, prompts, max_nodes=4, min_nodes=5)
    with pytest.raises(ValueError, match=r"measure_tree_costs: the prompts must have equal lengths"):
        models.plan_tree(tiny, cheap, [[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"measure_tree_costs: the prompts must have at least 2 tokens, got 1"):
        models.plan_tree(tiny, cheap, [[1]])
    with pytest.raises(ValueError, match=r"measure_tree_costs: repeats must be an int >= 1, got 0"):
        models.plan_tree(tiny, cheap, prompts, repeats=0)
    with pytest.raises(ValueError, match=r"generate: tree must be a parent array, an effx.spec.SequoiaTree, 'auto' "
                                         r"or 'specexec\[:NODES,DEPTH\]', got 'best'"):
        models.generate(tiny, prompts, draft=cheap, tree="best")


def test_specexec_trees(tiny):
    prompt = prompts_of([20], seed=10)
    plain = models.generate(tiny, prompt, max_new_tokens=16)
    draft = models.early_exit_draft(tiny, 1)
    for tree in ("specexec", "specexec:8,3"):
        res = models.generate(tiny, prompt, max_new_tokens=16, draft=draft, tree=tree)
        assert res.tokens == plain.tokens and res.tree is None and res.accepted_per_step >= 1
    # A draft that is the model: its most likely child of the root, in every best-first tree,
    # is the target's argmax, so each step takes it and the bonus token at least.
    same = models.generate(tiny, prompt, max_new_tokens=16, draft=models.early_exit_draft(tiny, 2),
                           tree="specexec:6,3")
    assert same.tokens == plain.tokens and same.accepted_per_step >= 2
    sampled = models.generate(tiny, prompt, max_new_tokens=16, draft=draft, tree="specexec", temperature=0.8,
                              generator=torch.Generator().manual_seed(0))
    assert len(sampled.tokens[0]) == 16
    with pytest.raises(ValueError, match=r"generate: tree 'specexec:NODES,DEPTH' takes two ints >= 1, got 'specexec:4'"):
        models.generate(tiny, prompt, draft=draft, tree="specexec:4")
    # a batch: one tree per row, each row's output its own greedy output
    batch = prompts_of([20, 20], seed=11)
    res = models.generate(tiny, batch, max_new_tokens=12, draft=draft, tree="specexec:8,3")
    assert res.tokens == models.generate(tiny, batch, max_new_tokens=12).tokens and res.accepted_per_step >= 1


def test_sparse_mlp_and_streamed_weights_plug_in(tiny):
    from effx.offload import Policy

    prompts = [[5, 9, 2, 7, 1, 4, 4, 2], [3, 3, 8]]
    plain = models.generate(tiny, prompts, max_new_tokens=6)
    full = models.sparse_mlps(tiny, prompts, density=1.0, epochs=2)  # density 1 computes every neuron
    assert models.generate(tiny, prompts, max_new_tokens=6, mlp=full.modules).tokens == plain.tokens
    half = models.sparse_mlps(tiny, prompts, density=0.5, epochs=2)
    assert len(half.modules) == tiny.config.num_layers and all(0 <= r <= 1 for r in half.recall)
    assert len(models.generate(tiny, prompts, max_new_tokens=6, mlp=half.modules).tokens[0]) == 6
    with models.StreamedWeights(tiny, Policy(weights_gpu=0, weights_cpu=50)) as streamed:
        assert models.generate(tiny, prompts, max_new_tokens=6, weights=streamed).tokens == plain.tokens


def test_generation_bad_inputs(tiny):
    with pytest.raises(ValueError, match="cache policy must be one of dense, kivi2, kivi4, h2o, offload, got 'kivi3'"):
        models.generate(tiny, [[1, 2]], cache="kivi3")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        models.generate(tiny, [[1, 2], []])
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 512\)"):
        models.generate(tiny, [[1, 512]])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        models.generate(tiny, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask has holes"):
        models.generate(tiny, torch.ones(1, 4, dtype=torch.int64), attention_mask=torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="capacity exceeded"):
        models.generate(tiny, [[1, 2, 3]], max_new_tokens=8, cache=tiny.new_cache(1, 6))
    other = kv.DenseCache(3, 1, 2, 32, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="the cache holds 3 layers x 2 kv-heads x head_dim 32; this model needs 2"):
        tiny(torch.tensor([[1, 2]]), cache=other)


def test_sliding_window_matches_transformers(tmp_path):
    # Mistral's window of 16 over 40 tokens: a prefill past the window, then decoding token by
    # token through the dense cache (whose first blocks fall out of the window), both equal to
    # transformers, which masks positions <= p - 16.
    config = dict(CONFIGS["mistral"], sliding_window=16)
    ref = hf_model(config)
    write_checkpoint(tmp_path, config, ref.state_dict())
    model = models.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
        unwindowed = hf_model(dict(config, sliding_window=None))(ids).logits
    assert rel_error(unwindowed[:, 16:], want[:, 16:]) > 1e-2  # the window matters here
    assert rel_error(model(ids), want) < 1e-5
    cache = model.new_cache(2, 40)
    steps = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, 40)]
    assert rel_error(torch.cat(steps, 1), want) < 1e-5
    # KIVI keeps every token at its position: its windowed logits stay close to the exact ones.
    kivi = kv.KIVICache(config["num_hidden_layers"], 2, 2, 48, 64, bits=4, group_size=16, residual=16,
                        dtype=torch.float32)
    assert rel_error(model(ids, cache=kivi), want) < 0.1
    # Tree speculation past the window (tree nodes at the depth positions the window is
    # measured from): greedy output equals plain greedy decoding.
    prompts = ids[:, :24].tolist()
    plain = models.generate(model, prompts, max_new_tokens=12)
    for tree in ([-1, 0, 1, 2], [-1, -1, 0, 0, 1, 3]):
        spec = models.generate(model, prompts, max_new_tokens=12, draft=models.early_exit_draft(model, 1), tree=tree)
        assert spec.tokens == plain.tokens
    # H2O moves tokens off their positions: it refuses once the window hides one.
    h2o = kv.H2OCache(config["num_hidden_layers"], 1, 2, 48, 64, heavy=8, recent=8, dtype=torch.float32)
    model(ids[:1, :16], cache=h2o)
    with pytest.raises(ValueError, match=r"position 16 is past the sliding window \(16\) and H2OCache does not"):
        model(ids[:1, 16:17], cache=h2o)


# --- loading errors ------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    config = CONFIGS["llama"]
    write_checkpoint(tmp_path, config, hf_model(config).state_dict(), shards=2)
    return tmp_path


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ValueError, match=r"from_pretrained: .*nope is not a directory"):
        models.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json in"):
        models.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        models.from_pretrained(tmp_path)


def test_missing_weights_and_missing_shard(checkpoint):
    shard = checkpoint / "model-00002-of-00002.safetensors"
    shard.rename(checkpoint / "elsewhere.bin")
    with pytest.raises(ValueError, match="names shard.* that are not in .*: model-00002-of-00002.safetensors"):
        models.from_pretrained(checkpoint)
    (checkpoint / "model.safetensors.index.json").unlink()
    (checkpoint / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors weights in .*found elsewhere.bin"):
        models.from_pretrained(checkpoint)


def test_truncated_file(checkpoint):
    shard = checkpoint / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated"):
        models.from_pretrained(checkpoint)
    shard.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"cannot read .*model-00001-of-00002.safetensors"):
        models.from_pretrained(checkpoint)


def test_unsupported_architecture_and_rope(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'; effx.models runs "
                                         "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        models.from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps(dict(config, rope_scaling=dict(type="longrope", factor=4.0))))
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported"):
        models.from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu")))
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        models.from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="'hidden_size' is missing"):
        models.from_pretrained(checkpoint)


def test_mismatched_and_missing_tensors(tmp_path):
    config = CONFIGS["llama"]
    state = hf_model(config).state_dict()
    write_checkpoint(tmp_path, dict(config, intermediate_size=160), state)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight in model.safetensors has "
                                         r"shape \[176, 128\], but config.json implies \[160, 128\]"):
        models.from_pretrained(tmp_path)
    write_checkpoint(tmp_path, config, {k: v for k, v in state.items() if "k_proj" not in k})
    with pytest.raises(ValueError, match=r"lacks 2 tensor\(s\).*model.layers.0.self_attn.k_proj.weight"):
        models.from_pretrained(tmp_path)
    write_checkpoint(tmp_path, config, dict(state, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}))
    with pytest.raises(ValueError, match=r"has 1 tensor\(s\) that LlamaForCausalLM with this config does not use: "
                                         r"model.layers.0.self_attn.q_proj.bias"):
        models.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of auto"):
        models.from_pretrained(tmp_path, dtype="int8")


# --- tokenizer and command line ------------------------------------------------------------------

def write_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("the a river town bridge".split())}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def test_tokenizer_json_is_loaded(checkpoint):
    write_tokenizer(checkpoint)
    model = models.from_pretrained(checkpoint)
    assert model.tokenizer.encode("the river bridge") == [3, 5, 7]
    assert model.tokenizer.decode([3, 5, 7]) == "the river bridge"
    (checkpoint / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="load_tokenizer: cannot read"):
        models.from_pretrained(checkpoint)


def effx_cli(*args):
    return subprocess.run([sys.executable, "-m", "effx", *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_checkpoint_json(checkpoint, tmp_path):
    write_tokenizer(checkpoint)
    out_file = tmp_path / "out.json"
    out = effx_cli("generate", "--model", str(checkpoint), "--prompt", "the river", "--prompt", "a town bridge the",
                   "--kv", "kivi2", "--max-new-tokens", "5", "--stop", "95", "--device", "cpu", "--json", str(out_file))
    assert out.returncode == 0, out.stderr
    assert "KV cache kivi2" in out.stdout and "tokens/s" in out.stdout
    doc = json.loads(out_file.read_text())
    assert doc["kv"] == "kivi2" and not doc["random_weights"] and doc["kv_bytes"] > 0
    assert [o["prompt_tokens"] for o in doc["outputs"]] == [2, 4]
    model = models.from_pretrained(checkpoint)
    want = models.generate(model, [[3, 5], [4, 6, 7, 3]], max_new_tokens=5, cache="kivi2", stop_tokens=[95])
    assert [o["tokens"] for o in doc["outputs"]] == want.tokens


def test_cli_generate_random_model_h2o():
    out = effx_cli("generate", "--model", "random", "--prompt", "hello there", "--kv", "h2o", "--heavy", "4",
                   "--recent", "0.25", "--max-new-tokens", "4", "--device", "cpu", "--json", "-")
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout
    doc = json.loads(out.stdout[out.stdout.index('{\n  "effx_version"'):])
    assert doc["random_weights"] and doc["kv_options"] == {"heavy": 4, "recent": 0.25}
    assert doc["outputs"][0]["prompt_tokens"] == 12 and len(doc["outputs"][0]["tokens"]) <= 4


@pytest.mark.parametrize("flags,says", [(["--sparsity", "0.5"], "# sparse MLP: density 0.50"),
                                        (["--spec-draft", "first:1"], "tokens per target step"),
                                        (["--spec-draft", "first:1", "--tree", "chain:2"],
                                         "a tree of 2 tokens per step"),
                                        (["--spec-draft", "first:1", "--tree", "specexec:8,2"],
                                         "SpecExec trees (specexec:8,2)"),
                                        (["--offload", "0,50"], "decode")])
def test_cli_methods(flags, says):
    out = effx_cli("generate", "--model", "random", "--prompt", "hello there", "--max-new-tokens", "4", *flags)
    assert out.returncode == 0, out.stderr
    assert says in out.stdout


@pytest.mark.parametrize("flags,error", [(["--sparsity", "1.5"], "--sparsity must be in [0, 1), got 1.5"),
                                         (["--offload", "cpu"], "--offload takes GPU,CPU weight percentages"),
                                         (["--offload", "80,40"], "effx.offload"),
                                         (["--tree", "auto"], "--tree applies to --spec-draft"),
                                         (["--spec-draft", "first:1", "--tree", "chain:0"],
                                          "--tree takes auto, chain:N (N >= 1) or specexec[:NODES,DEPTH], got "
                                          "'chain:0'")])
def test_cli_bad_method_flags(flags, error):
    out = effx_cli("generate", "--model", "random", "--prompt", "x", *flags)
    assert out.returncode == 2 and error in out.stderr


def test_cli_bad_flags_and_models(tmp_path):
    out = effx_cli("generate", "--model", "random", "--prompt", "x", "--nope")
    assert out.returncode == 2 and "unrecognized arguments: --nope" in out.stderr
    out = effx_cli("generate", "--model", "random", "--prompt", "x", "--kv", "kivi3")
    assert out.returncode == 2 and "invalid choice: 'kivi3'" in out.stderr
    out = effx_cli("generate", "--model", "random", "--prompt", "x", "--heavy", "0.1")
    assert out.returncode == 2 and "--heavy and --recent apply to --kv h2o" in out.stderr
    out = effx_cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert out.returncode == 1 and "no config.json in" in out.stderr


def test_demo_runner_table_on_a_checkpoint(checkpoint, tmp_path, capsys):
    from effx.demo import runner_table

    write_tokenizer(checkpoint)
    path = tmp_path / "demo.json"
    runner_table(torch.device("cpu"), model_dir=str(checkpoint), new_tokens=6, json_path=str(path))
    text = capsys.readouterr().out
    assert "RANDOM" not in text and checkpoint.name in text
    doc = json.loads(path.read_text())
    assert doc["new_tokens"] == 6 and len(doc["prompt_tokens"]) == 2 and min(doc["prompt_tokens"]) > 128
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows["dense KV cache"]["top1_agreement"] == 1.0 and rows["dense KV cache"]["kl_vs_dense"] == 0.0
    assert rows["KIVI-2"]["kv_bytes"] < rows["dense KV cache"]["kv_bytes"]
    assert rows["tree speculation"]["top1_agreement"] == 1.0 and rows["offload 50% host/50% disk"]["top1_agreement"] == 1.0
    lines = text.splitlines()
    assert all(any(line.startswith(name) for line in lines) for name in rows)
