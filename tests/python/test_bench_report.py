"""The benchmark report (effx.bench.report), the skipped-peer notes, the peers' checks and the
e2e suite on a tiny grid."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from effx.bench import e2e, harness, peers, report

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic(path) -> None:
    """Two devices, a kernel family, a zero-FLOP family, a record with no baseline, e2e rows and
    skipped peers, written by the harness itself."""
    a = harness.Roofs("devA", copy_gbps=100.0, matmul_tflops=2.0, matmul_dtype="float32", fma_tflops=4.0,
                      bf16_dot_tflops=8.0, amx_tflops=16.0)
    b = harness.Roofs("devB", copy_gbps=1000.0, matmul_tflops=50.0, matmul_dtype="bfloat16")
    rec = harness.Record
    records = [
        rec("attn", "step", {"B": 1, "T": 64}, "float32", "devA", 2e-3, 1e8, 4e9, "sdpa", 4e-3, a),
        rec("attn", "step", {"B": 1, "T": 64}, "float32", "devA", 2e-3, 1e8, 4e9, "sdpa[math]", 1e-3, a),
        rec("attn", "step", {"B": 1, "T": 64}, "bfloat16", "devA", 2e-3, 1e8, 8e9, "sdpa", 4e-3, a),
        rec("attn", "step", {"B": 1, "T": 64}, "bfloat16", "devB", 1e-4, 1e8, 4e9, "sdpa", 3e-4, b),
        rec("quant", "quantize", {"rows": 4, "cols": 8}, "float32", "devA", 5e-4, 1e6, 0.0, "torch ops", 1e-3, a),
        rec("tree", "sequoia-dp", {"nodes": 8}, "float64", "devA", 0.25, 0.0, 0.0, "none", 0.25, a),
    ]
    for method, tok_s, peak in (("dense", 100.0, 3 << 20), ("kivi2", 150.0, 2 << 20), ("tree-spec", 50.0, None)):
        for batch in (1, 4):
            shape = dict(B=batch, ctx=128, new=16, rounds=3, prefill_s=0.1, kv_bytes=1 << 20, peak_bytes=peak,
                         peak_of="process peak RSS growth", model="tiny")
            if method == "tree-spec":
                shape["accepted/step"] = 1.5
            records.append(rec("e2e", method, shape, "float32", "devA", 1 / (tok_s * batch), 0.0, 0.0, "dense",
                               1 / (100.0 * batch), a))
    skipped = [harness.Skipped("attn", "flash-attn", "not importable (ImportError: no module)"),
               harness.Skipped("attn", "sdpa[cudnn]", "refused | no kernel", {"B": 1, "T": 64})]
    harness.write_json(str(path), records, skipped=skipped, note="synthetic run")


def test_write_json_carries_skipped_and_note(tmp_path):
    harness.take_skipped()
    harness.note_skipped("kivi", "flashinfer", "CUDA-only peer", {"B": 1})
    notes = harness.take_skipped()
    assert [(n.peer, n.shape) for n in notes] == [("flashinfer", {"B": 1})] and harness.take_skipped() == []
    _synthetic(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["note"] == "synthetic run" and {r["device"] for r in doc["roofs"]} == {"devA", "devB"}
    assert doc["skipped"][1] == {"family": "attn", "peer": "sdpa[cudnn]", "reason": "refused | no kernel",
                                 "shape": {"B": 1, "T": 64}}


def test_cpu_roofs_probe_the_fma_rate():
    roofs = harness.measure_roofs(torch.device("cpu"))
    assert 0.0 < roofs.fma_tflops < float("inf") and roofs.compute_tflops == max(roofs.fma_tflops, roofs.matmul_tflops)
    assert roofs.bf16_dot_tflops >= 0.0 and roofs.amx_tflops >= 0.0  # 0 without AVX512_BF16, AMX
    assert roofs.compute_tflops_of("bfloat16") == max(roofs.compute_tflops, roofs.bf16_dot_tflops, roofs.amx_tflops)
    assert roofs.compute_tflops_of("float32") == roofs.compute_tflops
    assert roofs.ridge_flop_per_byte == roofs.compute_tflops * 1e12 / (roofs.copy_gbps * 1e9)


def test_median_times_alternates_and_keeps_names():
    order = []
    got = harness.median_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                               torch.device("cpu"), warmup=1, runs=3)
    assert set(got) == {"a", "b"} and all(t >= 0.0 for t in got.values())
    # warm-up of each, then per round each in turn: an untimed call (CPU), then the timed one
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3


def test_report_tables_from_synthetic_json(tmp_path):
    _synthetic(tmp_path / "r.json")
    out = tmp_path / "out"
    md = open(report.write_report(str(tmp_path / "r.json"), str(out))).read()
    assert (out / "r.json").exists() and "[r.json](r.json)" in md
    # devA's compute roof is its FMA rate (above its matmul), devB's its matmul
    assert "> synthetic run" in md and "| devA | 100.0 | 2.000 | float32 | 4.000 | 8.000 | 16.000 | 40.00 |" in md
    assert "| devB | 1000.0 | 50.000 | bfloat16 | - | - | - | 50.00 |" in md
    # ms, GB/s, TFLOP/s, roof % (4e9 / 4e12 = 1 ms of compute in 2 ms), baseline ms, speed-up; device column
    assert "| devA | step | B=1, T=64 | float32 | 2.000 | 50.0 | 2.000 | 50.0 | sdpa | 4.000 | 2.00x |" in md
    assert "| devA | step | B=1, T=64 | float32 | 2.000 | 50.0 | 2.000 | 50.0 | sdpa[math] | 1.000 | 0.50x |" in md
    # bf16 against devA's AMX roof (above its dot products): 8e9 / 16e12 = 0.5 ms of compute, so
    # the 1 ms of memory binds, in 2 ms
    assert "| devA | step | B=1, T=64 | bfloat16 | 2.000 | 50.0 | 4.000 | 50.0 | sdpa | 4.000 | 2.00x |" in md
    assert "| devB | step | B=1, T=64 | bfloat16 | 0.100 | 1000.0 | 40.000 | 100.0 | sdpa | 0.300 | 3.00x |" in md
    assert "| devA | sequoia-dp | nodes=8 | float64 | 250.000 | 0.0 | 0.000 | 0.0 | - | - | - |" in md
    assert "Left off the roofline (2 records with zero FLOPs or zero bytes counted): quant: quantize; tree: " \
           "sequoia-dp" in md
    # e2e as pivots: tokens/s with speed-up, peak MiB (n/a where unmeasured), KV MiB
    assert "| method | B=1, ctx=128 | B=4, ctx=128 |" in md
    assert "| kivi2 | 150.0 (1.50x) | 600.0 (1.50x) |" in md and "| dense | 100.0 (1.00x) | 400.0 (1.00x) |" in md
    assert "| dense | 3.0 | 3.0 |" in md and "| tree-spec | n/a | n/a |" in md and "| kivi2 | 1.0 | 1.0 |" in md
    assert "B=1 ctx=128: 1.5" in md and "process peak RSS growth" in md and "median of 3 runs" in md
    assert "| attn | flash-attn | not importable (ImportError: no module) | all |" in md
    assert "| attn | sdpa[cudnn] | refused \\| no kernel | B=1, T=64 |" in md
    if HAVE_MPL:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert pngs == ["roofline-deva.png", "roofline-devb.png", "speedup-attn.png", "speedup-e2e.png",
                        "speedup-quant.png"]
        assert all((out / p).read_bytes().startswith(PNG) and f"]({p})" in md for p in pngs)
        assert "Plots not made" not in md


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (pip install matplotlib)")
def test_report_plots_land_next_to_the_json(tmp_path):
    _synthetic(tmp_path / "r.json")
    report.write_report(str(tmp_path / "r.json"))
    assert (tmp_path / "report.md").exists() and (tmp_path / "roofline-deva.png").read_bytes().startswith(PNG)


def test_report_without_matplotlib_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    _synthetic(tmp_path / "r.json")
    md = open(report.write_report(str(tmp_path / "r.json"))).read()
    assert "matplotlib is not installed" in md and "pip install matplotlib" in md
    assert not list(tmp_path.glob("*.png")) and "| kivi2 | 150.0 (1.50x) | 600.0 (1.50x) |" in md


def test_peers_note_refusals_and_wrong_outputs():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def refuses():
        raise RuntimeError("inputs not supported")

    candidates = dict(peers.sdpa_candidates(q, k, v), refuses=refuses, wrong=lambda: lambda: torch.zeros_like(q))
    harness.take_skipped()
    kept = peers.usable("test", candidates, reference, {"T": 32})
    notes = {n.peer: n.reason for n in harness.take_skipped()}
    assert "sdpa[math]" in kept and torch.allclose(kept["sdpa[math]"](), reference, atol=1e-5)
    assert "refuses" not in kept and "inputs not supported" in notes["refuses"]
    assert "wrong" not in kept and "differs" in notes["wrong"]
    assert set(kept) | set(notes) == set(candidates)


def test_bench_quant_report_end_to_end(tmp_path):
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "effx", "bench", "quant", "--quick", "--device", "cpu", "--report",
                          str(out), "--note", "test"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["note"] == "test" and doc["skipped"] == [] and {r["family"] for r in doc["records"]} == {"quant"}
    md = (out / "report.md").read_text()
    assert "## quant" in md and "| quantize | rows=1024, cols=1024, bits=2, G=32 | float32 |" in md
    if HAVE_MPL:
        assert (out / "speedup-quant.png").read_bytes().startswith(PNG)
    else:
        assert "matplotlib is not installed" in md


def test_bench_model_needs_e2e():
    run = subprocess.run([sys.executable, "-m", "effx", "bench", "quant", "--model", "x"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "--model applies to the e2e suite" in run.stderr


def test_e2e_rows_for_every_method():
    records = e2e.run(torch.device("cpu"), batches=(1, 2), contexts=(32,), new_tokens=4, rounds=1)
    methods = ["dense", "kivi2", "kivi4", "h2o-20%", "sparse-50%", "offload", "kv-offload", "tree-spec"]
    assert [r.op for r in records] == methods * 2
    for r in records:
        assert r.family == "e2e" and r.baseline == "dense" and r.time_s > 0 and 1 / r.time_s > 0
        assert r.shape["kv_bytes"] > 0 and r.shape["new"] == 4 and r.shape["ctx"] == 32
        dense = next(d for d in records if d.op == "dense" and d.shape["B"] == r.shape["B"])
        assert r.baseline_time_s == dense.time_s
    by = {(r.op, r.shape["B"]): r for r in records}
    assert by[("kivi2", 2)].shape["kv_bytes"] < by[("kivi4", 2)].shape["kv_bytes"]
    assert by[("tree-spec", 1)].shape["accepted/step"] >= 1
