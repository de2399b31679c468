"""Benchmark suite ``offload``: weight-streaming decode of a Llama-shaped stack with its layers
served by :class:`effx.offload.OffloadEngine` from the host (pinned pool, CUDA only: on a CPU
the host tier is used in place) or the disk (checksummed O_DIRECT reads), one token at a time.

Per case: time per token with prefetch (the record's time), bytes streamed per token
(achieved GB/s), and the baseline of loading then computing each layer with no overlap.
Overlap efficiency = max(load-only time, compute-only time) / time with prefetch (1.0: the
slower of the two hides the other completely). On CUDA also the pinned host-to-device copy
bandwidth, the roof for host streaming.
"""

from __future__ import annotations

import tempfile

import torch

from effx import offload
from effx.bench.harness import Record, measure_roofs, median_time


def llama_stack(num_layers: int, hidden: int, inter: int, heads: int, kv_heads: int, dtype, seed: int = 0):
    """Random weights of ``num_layers`` Llama decoder layers (on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    kv = kv_heads * hidden // heads
    shapes = {
        "input_layernorm.weight": (hidden,), "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden), "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden), "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    return [{n: (torch.randn(s, generator=g) / s[-1] ** 0.5).to(dtype) for n, s in shapes.items()}
            for _ in range(num_layers)]


def decoder_step(x: torch.Tensor, w: dict) -> torch.Tensor:
    """One decode token through a Llama layer's projections (attention over a one-token
    context, which is the value itself): every weight of the layer is read once."""
    h = torch.nn.functional.rms_norm(x, (x.shape[-1],), w["input_layernorm.weight"])
    q, v = h @ w["self_attn.q_proj.weight"].T, h @ w["self_attn.v_proj.weight"].T
    k = h @ w["self_attn.k_proj.weight"].T
    attn = v.repeat(1, q.shape[-1] // v.shape[-1]) * torch.sigmoid((q * k.repeat(1, q.shape[-1] // k.shape[-1])).sum(-1, keepdim=True))
    x = x + attn @ w["self_attn.o_proj.weight"].T
    h = torch.nn.functional.rms_norm(x, (x.shape[-1],), w["post_attention_layernorm.weight"])
    return x + (torch.nn.functional.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T


def stream_case(layers, policy: offload.Policy, device: torch.device, disk_dir: str, runs: int = 5) -> dict:
    """Times of one token: streamed with prefetch, load only, compute only (resident)."""
    eng = offload.OffloadEngine(layers, policy, device=device, disk_dir=disk_dir)
    x0 = torch.randn(1, layers[0]["self_attn.q_proj.weight"].shape[1], dtype=layers[0]["self_attn.q_proj.weight"].dtype,
                     device=device)

    def token():
        x = x0
        for j in range(len(layers)):
            x = decoder_step(x, eng.load_layer(j))
        return x

    def load_only():
        for j in range(len(layers)):
            w = eng.load_layer(j)
        return w

    resident = [{n: t.to(device) for n, t in layer.items()} for layer in layers]

    def compute_only():
        x = x0
        for w in resident:
            x = decoder_step(x, w)
        return x

    t_total = median_time(token, device, warmup=1, runs=runs)
    t_io = median_time(load_only, device, warmup=1, runs=runs)
    t_comp = median_time(compute_only, device, warmup=1, runs=runs)
    streamed = eng.tier_bytes()["host"] + eng.tier_bytes()["disk"]
    out = dict(total=t_total, io=t_io, compute=t_comp, streamed=streamed, host_peak=eng.host_peak,
               host_budget=eng.host_budget)
    eng.close()
    return out


def run(device: torch.device, quick: bool = False) -> list[Record]:
    roofs = measure_roofs(device)
    cuda = device.type == "cuda"
    if cuda:
        cfg = (8, 2048, 5632, 16, 8) if quick else (16, 4096, 11008, 32, 8)
        dtype = torch.float16
    else:
        cfg = (4, 512, 1408, 8, 4) if quick else (8, 1024, 2816, 16, 8)
        dtype = torch.float32
    layers = llama_stack(*cfg, dtype)
    shape_base = {"L": cfg[0], "H": cfg[1], "I": cfg[2]}
    modes = ([("host", offload.Policy(weights_gpu=0, weights_cpu=100))] if cuda else []) + \
        [("disk", offload.Policy(weights_gpu=0, weights_cpu=0))]
    records = []
    params = sum(t.numel() for layer in layers for t in layer.values())
    name = str(dtype).replace("torch.", "")
    for mode, policy in modes:
        with tempfile.TemporaryDirectory(prefix="effx_bench_offload_") as d:
            r = stream_case(layers, policy, device, d, runs=3 if quick else 5)
        overlap = max(r["io"], r["compute"]) / r["total"]
        shape = dict(shape_base, src=mode, overlap=round(overlap, 3))
        records.append(Record("offload", f"stream-{mode}", shape, name, roofs.device, r["total"], r["streamed"],
                              2.0 * params, "load, then compute", r["io"] + r["compute"], roofs))
        print(f"offload stream from {mode}: {r['streamed'] / r['total'] / 1e9:.2f} GB/s achieved, load-only "
              f"{r['streamed'] / r['io'] / 1e9:.2f} GB/s, compute {r['compute'] * 1e3:.2f} ms/token, "
              f"overlap efficiency {overlap:.1%}, host pool peak {r['host_peak'] / 2**20:.0f} MiB of "
              f"{r['host_budget'] / 2**20:.0f} MiB", flush=True)
    if cuda:
        nbytes = 1 << 30
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        t = median_time(lambda: dev.copy_(pinned, non_blocking=True), device, runs=10)
        t_base = median_time(lambda: dev.copy_(pageable), device, runs=5)
        records.append(Record("offload", "pinned-h2d", {"MiB": nbytes >> 20}, "uint8", roofs.device, t, nbytes, 0.0,
                              "pageable copy", t_base, roofs))
        print(f"pinned host-to-device: {nbytes / t / 1e9:.1f} GB/s (pageable {nbytes / t_base / 1e9:.1f} GB/s)")
    return records
