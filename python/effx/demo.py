"""``effx demo``: generation with every effx method on one model, in one table, then the
primitives that are not part of the runner yet (quantization, MonarchLinear).

With no model given it builds the package's small Llama-architecture model with RANDOM weights
(seed 0) and a batch of two random prompts of different lengths: speeds, cache sizes and
memory are real, and fidelity (top-1 agreement, KL of the next-token distributions against
the dense cache on the same forced token stream) shows what each method changes, though not
how a trained model would respond. ``--model DIR`` runs the same on a real checkpoint.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from tqdm.auto import tqdm

from effx import models, ops
from effx.bench.harness import PeakMemory, median_time
from effx.offload import Policy

_PROMPT_LENGTHS = (512, 384)  # the random model's batch: ragged on purpose
_TEXT = (
    "The river town had grown up around a single bridge, and for two hundred years every road in the valley "
    "bent toward it. Merchants crossed it with wool in spring and grain in autumn; soldiers crossed it twice, "
    "once in each direction, and the town remembered both crossings for a century. When the railway came, "
    "the engineers surveyed the old stone arches, shook their heads, and built a new iron span a mile "
    "downstream. Within a generation the market square had moved to meet the station, the inns along the "
    "old road had become houses, and children who had never seen a cart on the bridge used it as a place to "
    "fish. The town council debated for years whether to repair the arches or let the river have them. In "
    "the end a schoolteacher settled the matter by collecting the names carved into the parapet, more than "
    "three thousand of them, and printing them in a small book that every household bought. "
)
_TEXT_PROMPTS = (
    _TEXT * 2 + "Question: why did the market square move? Answer:",
    _TEXT + "In one sentence, the story is about",
)


# The runner's methods: name -> keyword arguments of generate / teacher_forced_logits (a cache
# policy and its options; a method merged later adds its mlp= or weights= here). The first one
# is the reference.
_METHODS = {
    "dense KV cache": dict(cache="dense"),
    "KIVI-2": dict(cache="kivi2"),
    "KIVI-4": dict(cache="kivi4"),
    "H2O 20%": dict(cache="h2o", cache_options=dict(heavy=0.1, recent=0.1)),
    "KV offload 50% host/disk": dict(cache="offload", cache_options=dict(cache_gpu=0, cache_cpu=50)),
}


def _fidelity(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || method)) of next-token distributions."""
    agree = (logits.argmax(-1) == reference.argmax(-1)).double().mean().item()
    ref, got = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    return agree, kl


def model_rows(model: models.CausalLM, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Generate with each method (greedy, no stop tokens so every method makes the same number
    of tokens) and score each along the dense model's own greedy stream."""
    models.generate(model, [p[:8] for p in prompts], max_new_tokens=2)  # warm-up: thread pools, first calls
    # Sparse MLP: predictors trained on the demo's own prompts (calibration data), keeping
    # half of each layer's neurons. Offload: the decoder layers' weights half in the host
    # pool, half on disk, streamed layer by layer with the next one prefetched.
    fitted = models.sparse_mlps(model, prompts, density=0.5)
    streamed = models.StreamedWeights(model, Policy(weights_gpu=0, weights_cpu=50))
    methods = dict(_METHODS)
    methods["sparse MLP 50%"] = dict(cache="dense", mlp=fitted.modules)
    recall = sum(fitted.recall) / len(fitted.recall)
    methods["offload 50% host/50% disk"] = dict(cache="dense", weights=streamed)
    rows, reference, dense_bytes = [], None, None
    for name, method in tqdm(methods.items(), desc="methods", leave=False, disable=not sys.stderr.isatty()):
        with PeakMemory(model.device) as mem:
            result = models.generate(model, prompts, max_new_tokens=new_tokens, **method)
        if reference is None:
            stream = torch.tensor(result.tokens)
            dense_bytes = result.kv_bytes
        logits = models.teacher_forced_logits(model, prompts, stream, **method)
        if reference is None:
            reference = logits
        agree, kl = _fidelity(logits, reference)
        rows.append(dict(method=name, tokens_per_s=result.decode_tokens_per_second, kv_bytes=result.kv_bytes,
                         vs_dense=dense_bytes / result.kv_bytes, peak_bytes=mem.peak, top1_agreement=agree,
                         kl_vs_dense=kl))
        if method.get("cache") == "offload":
            tiers = result.cache.tier_bytes()
            rows[-1]["note"] = (f"KV offload: {tiers['host']:,} bytes of K/V in the host pool, {tiers['disk']:,} on "
                                f"disk, {tiers['staging']:,} of staging for the layer attending and the one "
                                f"prefetched; outputs equal the dense cache's")
            result.cache.close()
    streamed.close()
    rows.append(_speculation_row(model, prompts, new_tokens))
    rows[-3]["note"] = (f"sparse MLP 50%: per-layer predictors trained on the demo prompts, recall {recall:.2f} "
                        "of the true top half")
    rows[-2]["note"] = (f"offload: {streamed.streamed_bytes:,} bytes of decoder weights per forward, streamed "
                        "with the next layer prefetched")
    return rows


def _speculation_row(model: models.CausalLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy tree speculation with the model's first layer as draft, on the prompts cut to one
    length, through the tree of at least one token that Sequoia's planner picks here (the
    planner's own choice, which may be no tree, is in the note); fidelity is the share of
    tokens equal to plain greedy."""
    short = [p[:min(len(q) for q in prompts)] for p in prompts]
    plain = models.generate(model, short, max_new_tokens=new_tokens)
    draft = models.early_exit_draft(model, 1)
    costs = models.measure_tree_costs(model, draft, short, max_nodes=32)
    tree, free = costs.choose(32, 8, min_nodes=1), costs.choose(32, 8)
    with PeakMemory(model.device) as mem:
        result = models.generate(model, short, max_new_tokens=new_tokens, draft=draft, tree=tree)
    same = sum(a == b for x, y in zip(result.tokens, plain.tokens) for a, b in zip(x, y)) / plain.new_tokens
    verdict = ("plain decoding, no tree paying for its draft" if free.size == 0 else
               f"a {free.size}-token tree of depth {free.depth}")
    return dict(method="tree speculation", tokens_per_s=result.decode_tokens_per_second, kv_bytes=result.kv_bytes,
                vs_dense=plain.kv_bytes / result.kv_bytes, peak_bytes=mem.peak, top1_agreement=same,
                kl_vs_dense=None, accepted_per_step=result.accepted_per_step,
                note=f"tree speculation: first layer as draft, Sequoia tree planned here ({tree.size} tokens, depth "
                     f"{tree.depth}, {tree.expected_tokens:.2f} tokens per step expected from the acceptance measured "
                     f"on the prompts), {result.accepted_per_step:.2f} per target step seen, "
                     f"{plain.decode_tokens_per_second:.1f} tokens/s without it; left free, the planner picks "
                     f"{verdict} (the draft's first guess is the model's token at {costs.accept[0]:.0%} of prompt "
                     f"positions); top-1 = tokens equal to plain greedy (prompts cut to {len(short[0])} tokens)")


def _format_model_row(r: dict) -> str:
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} MiB"
    kl = "-" if r["kl_vs_dense"] is None else f"{r['kl_vs_dense']:.2e}"
    return (f"{r['method']:<26} {r['tokens_per_s']:>9.1f} {r['kv_bytes']:>12,} {r['vs_dense']:>7.2f}x "
            f"{peak:>11} {r['top1_agreement']:>8.1%} {kl:>10}")


def quant_rows(device: torch.device, dtype: torch.dtype) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 1024, 128, device=device, dtype=dtype)
    fp16_bytes = x.numel() * 2
    rows = []
    for bits in (8, 4, 2):
        for group in (128, 32):
            codes, scale, zero = ops.quantize(x, bits, group)
            back = ops.dequantize(codes, scale, zero, bits, group, dtype)
            held = codes.nbytes + scale.nbytes + zero.nbytes
            err = ((back.double() - x.double()).norm() / x.double().norm()).item()
            tq = median_time(lambda: ops.quantize(x, bits, group), device, runs=10)
            td = median_time(lambda: ops.dequantize(codes, scale, zero, bits, group, dtype), device, runs=10)
            name = f"quantize {bits}-bit, G={group}"
            rows.append(f"{name:<26} {held:>11,} {fp16_bytes / held:>7.2f}x {err:>11.2e} {tq * 1e3:>9.3f} {td * 1e3:>11.3f}")
    return rows


def run_demo(device: torch.device, *, model_dir: str | None = None, new_tokens: int = 64,
             json_path: str | None = None) -> int:
    start = time.perf_counter()
    runner_table(device, model_dir=model_dir, new_tokens=new_tokens, json_path=json_path)
    primitives_table(device)
    print(f"\ndemo took {time.perf_counter() - start:.0f} s")
    return 0


def runner_table(device: torch.device, *, model_dir: str | None, new_tokens: int, json_path: str | None) -> None:
    """The model runner's table: every method generating with one model."""
    if model_dir is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = models.random_model(dtype=dtype, device=device)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in _PROMPT_LENGTHS]
        print(f"effx demo on {device} ({dtype}): the built-in {model.name}; prompts are random bytes, so the "
              f"generated text is meaningless and fidelity shows only what each method changes\n")
    else:
        model = models.from_pretrained(model_dir, dtype="auto" if device.type == "cuda" else torch.float32,
                                       device=device)
        if model.tokenizer is None:
            raise SystemExit(f"effx demo: {model_dir} has no tokenizer.json to encode the prompts")
        prompts = [model.tokenizer.encode(p) for p in _TEXT_PROMPTS]
        print(f"effx demo on {device} ({model.dtype}): {model.name}\n")
    c = model.config
    print(f"model runner: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} query / {c.num_kv_heads} kv "
          f"heads; batch of {len(prompts)} prompts ({', '.join(str(len(p)) for p in prompts)} tokens), "
          f"{new_tokens} new tokens each, greedy")
    print("fidelity: next-token distributions along the dense cache's greedy stream (top-1 agreement, KL)")
    print(f"{'method':<26} {'tokens/s':>9} {'KV bytes':>12} {'smaller':>8} {'peak mem':>11} {'top-1':>8} "
          f"{'KL':>10}")
    rows = model_rows(model, prompts, new_tokens)
    for r in rows:
        print(_format_model_row(r))
    for r in rows:
        if "note" in r:
            print(r["note"])
    print("peak mem: what generation adds at its peak (CUDA allocator; on CPU the growth of peak RSS)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(model=model.name, device=str(device), prompt_tokens=[len(p) for p in prompts],
                           new_tokens=new_tokens, rows=rows), f, indent=2)
        print(f"wrote {json_path}")


def primitives_table(device: torch.device) -> None:
    print("\nprimitives not in the runner yet\n")
    print("quantization of a [4, 8, 1024, 128] float16 tensor (the KV-cache compressor)")
    print(f"{'method':<26} {'bytes':>11} {'vs fp16':>8} {'rel. error':>11} {'quant ms':>9} {'dequant ms':>11}")
    for row in quant_rows(device, torch.float16):
        print(row)
    print()
    from effx.monarch import monarch_demo_row

    print(f"{'structured layer':<26} {'bytes':>11} {'vs dense':>8} {'rel. error':>11} {'ms':>9} {'dense ms':>11}")
    print(monarch_demo_row(device))
