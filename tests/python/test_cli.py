"""The effx command line: info, bench (JSON output) and demo run and say what they measured."""

from __future__ import annotations

import json
import subprocess
import sys

import effx


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "effx", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_info_reports_build():
    text = _run("info")
    assert f"effx {effx.__version__}" in text
    info = effx.build_info()
    assert ("compiled for sm" in text) == info["cuda"]
    assert f"max threads {info['openmp_max_threads']}" in text


def test_bench_quant_writes_json(tmp_path):
    path = tmp_path / "quant.json"
    text = _run("bench", "quant", "--quick", "--device", "cpu", "--json", str(path))
    assert "quantize" in text and "dequantize" in text
    doc = json.loads(path.read_text())
    assert doc["effx_version"] == effx.__version__ and doc["roofs"][0]["copy_gbps"] > 0
    records = doc["records"]
    assert {r["op"] for r in records} == {"quantize", "dequantize"}
    assert {r["shape"]["bits"] for r in records} == {2, 4, 8}
    for r in records:
        assert r["time_s"] > 0 and r["baseline_time_s"] > 0 and r["bytes"] > 0
        assert abs(r["gbps"] - r["bytes"] / r["time_s"] / 1e9) < 1e-6 * r["gbps"]


def test_bench_rejects_unknown_family():
    out = subprocess.run([sys.executable, "-m", "effx", "bench", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown family nope" in out.stderr


def test_demo_prints_table(tmp_path):
    path = tmp_path / "demo.json"
    text = _run("demo", "--device", "cpu", "--json", str(path))
    assert "RANDOM weights" in text
    assert "quantize 2-bit, G=32" in text and "rel. error" in text and "MonarchLinear 16 blocks" in text
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    for name in ("dense KV cache", "KIVI-2", "KIVI-4", "H2O 20%", "KV offload 50% host/disk", "sparse MLP 50%",
                 "offload 50% host/50% disk", "tree speculation"):
        assert "not merged yet" not in rows[name] and "x" in rows[name] and "%" in rows[name]
    doc = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    dense = doc["dense KV cache"]
    assert dense["top1_agreement"] == 1.0 and dense["kl_vs_dense"] == 0.0 and dense["tokens_per_s"] > 0
    for name in ("KIVI-2", "KIVI-4", "H2O 20%"):
        assert doc[name]["kv_bytes"] < dense["kv_bytes"] and 0 < doc[name]["top1_agreement"] <= 1
    assert doc["KIVI-2"]["kv_bytes"] < doc["KIVI-4"]["kv_bytes"]
    # offloaded weights and greedy tree speculation change nothing in the outputs
    assert doc["offload 50% host/50% disk"]["top1_agreement"] == 1.0
    assert doc["KV offload 50% host/disk"]["top1_agreement"] == 1.0 and doc["KV offload 50% host/disk"]["kl_vs_dense"] == 0
    assert doc["tree speculation"]["top1_agreement"] == 1.0 and doc["tree speculation"]["accepted_per_step"] >= 1
    assert doc["sparse MLP 50%"]["kv_bytes"] == dense["kv_bytes"]
