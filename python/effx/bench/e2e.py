"""Benchmark suite ``e2e``: generation throughput of one model with each effx method against
batch size and context length, the papers' end-to-end tables.

The model is the demo's (:func:`effx.models.random_model`, random weights: real costs,
meaningless text) or a checkpoint (``effx bench e2e --model DIR``). Prompts are random token
ids, all rows of one context length; every row generates the same number of tokens (greedy,
no stop token). Methods are configured as in ``effx demo``: dense, KIVI-2/4 and H2O 20%
caches, DejaVu sparse MLP at density 0.5 (predictors trained on two random calibration
prompts), weights streamed by the offload engine (half host, half disk), the KV cache
offloaded the same way (``kv-offload``: half the layers in the host pool, half on disk) and
tree speculation (drafted by the model's first layer; the tree of at least one token that
:func:`effx.models.plan_tree` picks at each shape).

Per (method, batch B, context ctx) one record, the median of ``rounds`` interleaved runs: its
time is decode seconds per generated token (all rows), so tokens/s = 1 / time_s; the shape
carries ``prefill_s``, the KV-cache storage allocated (``kv_bytes``; the draft's cache
included for speculation) and the peak memory of the whole generate call (``peak_bytes``,
measured as ``peak_of`` says, see :class:`effx.bench.harness.PeakMemory`). The baseline is
the dense cache at the same shape: speed-up = tokens/s over dense's. Decode time excludes the
prefill for every method, speculation included (its prompt passes through target and draft
are timed apart; the planning before is not timed).
"""

from __future__ import annotations

from typing import Callable

import torch

from effx import models, spec
from effx.bench.harness import PeakMemory, Record, measure_roofs
from effx.models.generate import spec_callable
from effx.offload import Policy

CHAIN = [-1, 0, 1, 2]  # the runner's default speculation tree: a chain of 4 (the warm-up runs)


def grid(device: torch.device, quick: bool) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(batch sizes, context lengths, new tokens per row, rounds) of a run."""
    if device.type == "cuda":
        return ((1, 16), (1024, 4096), 32, 3) if quick else ((1, 16, 64), (1024, 4096, 16384), 64, 3)
    return ((1, 4), (128, 512), 16, 3) if quick else ((1, 4, 16), (256, 1024, 4096), 32, 2)


def load_model(device: torch.device, model_dir: str | None) -> models.CausalLM:
    if model_dir is None:
        return models.random_model(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    return models.from_pretrained(model_dir, dtype="auto" if device.type == "cuda" else torch.float32,
                                  device=device)


def speculate(model: models.CausalLM, draft: models.CausalLM, ids: torch.Tensor, new: int,
              tree: spec.SequoiaTree | list[int]) -> dict:
    """Greedy tree speculation through :func:`effx.spec.generate` (as ``generate(draft=)``
    runs it); the prompt's pass through target and draft is timed apart as the prefill."""
    b, t = ids.shape
    room = (len(tree.parents if isinstance(tree, spec.SequoiaTree) else tree) + 1) * (new + 1)
    cache = models.make_cache(model, "dense", b, t + room, prompt_len=t)
    draft_cache = draft.new_cache(b, t + room)

    gen = spec.generate(spec_callable(model), spec_callable(draft), ids.to(model.device), new, target_cache=cache,
                        draft_cache=draft_cache, tree=tree)
    return dict(tokens_per_s=b * new / gen.seconds, prefill_s=gen.prefill_seconds,
                kv_bytes=cache.nbytes() + draft_cache.nbytes(), accepted=round(gen.mean_accepted, 2))


def _methods(model: models.CausalLM, streamed: models.StreamedWeights, sparse: models.SparseMLPs,
             draft: models.CausalLM, trees: dict) -> dict[str, Callable[[torch.Tensor, int], dict]]:
    """Method name -> run(prompt ids [B, ctx], new tokens) -> measurements; ``trees`` maps a
    prompt shape to its planned speculation tree (a chain of 4 for shapes not planned)."""
    def plain(**method) -> Callable[[torch.Tensor, int], dict]:
        def run(ids: torch.Tensor, new: int) -> dict:
            res = models.generate(model, ids, max_new_tokens=new, **method)
            return dict(tokens_per_s=res.decode_tokens_per_second, prefill_s=res.prefill_seconds,
                        kv_bytes=res.kv_bytes)
        return run

    return {
        "dense": plain(cache="dense"),
        "kivi2": plain(cache="kivi2"),
        "kivi4": plain(cache="kivi4"),
        "h2o-20%": plain(cache="h2o", cache_options=dict(heavy=0.1, recent=0.1)),
        "sparse-50%": plain(cache="dense", mlp=sparse.modules),
        "offload": plain(cache="dense", weights=streamed),
        "kv-offload": plain(cache="offload", cache_options=dict(cache_gpu=0, cache_cpu=50)),
        "tree-spec": lambda ids, new: speculate(model, draft, ids, new, trees.get(tuple(ids.shape), CHAIN)),
    }


def run(device: torch.device, quick: bool = False, *, model_dir: str | None = None,
        batches: tuple[int, ...] | None = None, contexts: tuple[int, ...] | None = None,
        new_tokens: int | None = None, rounds: int | None = None) -> list[Record]:
    """One record per (method, batch, context); ``batches``/``contexts``/``new_tokens``/
    ``rounds`` override the device's grid (tests use a tiny one).

    Each cell runs every method ``rounds`` times, the methods interleaved round by round, and
    keeps the run of median tokens/s (the faster of two): a burst of load from elsewhere then
    falls on one round of every method instead of on all runs of one.
    """
    roofs = measure_roofs(device)
    default_b, default_ctx, default_new, default_rounds = grid(device, quick)
    batches, contexts = batches or default_b, contexts or default_ctx
    new, rounds = new_tokens or default_new, rounds or default_rounds
    model = load_model(device, model_dir)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, vocab, (2, 256), generator=g).tolist()
    sparse = models.sparse_mlps(model, calibration, density=0.5)
    draft = models.early_exit_draft(model, 1)
    dtype = str(model.dtype).replace("torch.", "")
    records = []
    with models.StreamedWeights(model, Policy(weights_gpu=0, weights_cpu=50)) as streamed:
        trees: dict[tuple[int, int], spec.SequoiaTree] = {}
        methods = _methods(model, streamed, sparse, draft, trees)
        for method in methods.values():  # warm-up: thread pools, first calls, the disk tier's page cache
            method(torch.randint(0, vocab, (1, 8), generator=g), 2)
        for b in batches:
            for ctx in contexts:
                ids = torch.randint(0, vocab, (b, ctx), generator=g)
                # Sequoia's planner at this shape, held to a tree of at least one token (plain
                # decoding is the dense row).
                tree = trees[(b, ctx)] = models.plan_tree(model, draft, ids, max_nodes=32, min_nodes=1, repeats=2)
                runs: dict[str, list[tuple[dict, int | None, str | None]]] = {name: [] for name in methods}
                for _ in range(rounds):
                    for name, method in methods.items():
                        with PeakMemory(device) as mem:
                            got = method(ids, new)
                        runs[name].append((got, mem.peak, mem.source))
                dense_time = None
                for name, tries in runs.items():
                    got, peak, source = sorted(tries, key=lambda x: x[0]["tokens_per_s"])[len(tries) // 2]
                    time_s = 1.0 / got["tokens_per_s"]
                    dense_time = dense_time or time_s  # dense runs first
                    shape = dict(B=b, ctx=ctx, new=new, rounds=rounds, prefill_s=round(got["prefill_s"], 4),
                                 kv_bytes=got["kv_bytes"], peak_bytes=peak, peak_of=source, model=model.name)
                    if "accepted" in got:
                        shape["accepted/step"] = got["accepted"]
                        shape["tree"] = (f"{tree.size}-token tree, depth {tree.depth}, "
                                         f"{tree.expected_tokens:.2f} expected")
                    records.append(Record("e2e", name, shape, dtype, roofs.device, time_s, 0.0, 0.0, "dense",
                                          dense_time, roofs))
    return records
