"""The benchmark report: a Markdown page and PNG plots from the JSON the harness writes.

``effx bench all --report DIR`` writes DIR/results.json and the report next to it;
``effx report results.json [--out DIR]`` renders an existing JSON (default: into its own
folder). The page holds the machine, roofs, commit, versions, build and date, a roofline
chart per device, per family a table and a speed-up chart against each baseline, the ``e2e``
family as pivot tables (method x (batch, context)), and the peers that were skipped.

Plots need matplotlib (``pip install 'effx[plot]'``); without it the page is written anyway
and says how to get them.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

INSTALL_PLOT = "pip install matplotlib  # or: pip install 'effx[plot]'"
_FAMILY_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:gray", "tab:olive", "tab:cyan")


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shape_text(shape: dict, skip: Iterable[str] = ()) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items() if k not in skip)


def _families(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["family"] for r in records))


def _has_baseline(r: dict) -> bool:
    return r["baseline"] != "none"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "device"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


# --- plots -----------------------------------------------------------------------------------

def _on_roofline(r: dict) -> bool:
    return r["flops"] > 0 and r["bytes"] > 0


def _kernel_points(records: list[dict]) -> list[dict]:
    """One point per measured kernel: a kernel timed against several baselines is one record
    per baseline with the same time."""
    seen, points = set(), []
    for r in records:
        key = (r["family"], r["op"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["device"], r["time_s"])
        if _on_roofline(r) and key not in seen:
            seen.add(key)
            points.append(r)
    return points


def _compute_tflops(roofs: dict) -> float:
    """The compute roof of a results file's roofs entry (files before the FMA probe have none)."""
    return max(roofs["matmul_tflops"], roofs.get("fma_tflops", 0.0))


def _compute_source(roofs: dict) -> str:
    return "fp32 FMA" if roofs.get("fma_tflops", 0.0) > roofs["matmul_tflops"] else f"{roofs['matmul_dtype']} matmul"


def plot_roofline(plt, records: list[dict], roofs: dict | None, device: str, path: str) -> None:
    """Achieved FLOP/s against arithmetic intensity (log-log) under the copy and compute roofs."""
    points = _kernel_points(records)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ai = [p["flops"] / p["bytes"] for p in points]
    achieved = [p["flops"] / p["time_s"] for p in points]
    lo, hi = min(ai) / 4, max(ai) * 4
    if roofs:
        bw, peak = roofs["copy_gbps"] * 1e9, _compute_tflops(roofs) * 1e12
        ridge = peak / bw
        lo, hi = min(lo, ridge / 4), max(hi, ridge * 4)
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(peak, x * bw) for x in xs], color="black", lw=1.5,
                label=f"roof: copy {roofs['copy_gbps']:.1f} GB/s, compute {_compute_tflops(roofs):.3g} TFLOP/s "
                      f"({_compute_source(roofs)})")
        ax.axvline(ridge, color="gray", ls=":", lw=1)
        dot = max(roofs.get("bf16_dot_tflops", 0.0), roofs.get("amx_tflops", 0.0)) * 1e12
        if dot > peak:
            what = "AMX tiles" if roofs.get("amx_tflops", 0.0) >= roofs.get("bf16_dot_tflops", 0.0) else "dot products"
            ax.plot(xs, [min(dot, x * bw) for x in xs], color="black", lw=1, ls="--",
                    label=f"bf16 {what} {dot / 1e12:.3g} TFLOP/s (bf16 records)")
    for i, family in enumerate(_families(points)):
        mine = [p for p in points if p["family"] == family]
        ax.scatter([p["flops"] / p["bytes"] for p in mine], [p["flops"] / p["time_s"] for p in mine],
                   color=_FAMILY_COLORS[i % len(_FAMILY_COLORS)], label=family, s=28, alpha=0.85, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=min(achieved) / 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"Roofline: {device}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_label(r: dict) -> str:
    if r["family"] == "e2e":
        return f"{r['op']} B={r['shape'].get('B')} ctx={r['shape'].get('ctx')}"
    return f"{r['op']} {shape_text(r['shape'])} {r['dtype']}"


def plot_speedups(plt, records: list[dict], family: str, path: str) -> None:
    """Horizontal bars of baseline_time / time (log x, a line at 1x), coloured by baseline; a
    record that is its own baseline (e2e's dense row) is 1x by construction and left out."""
    rows = [r for r in records if _has_baseline(r) and r["baseline"] != r["op"]]
    baselines = list(dict.fromkeys(r["baseline"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.22 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    colors = {b: _FAMILY_COLORS[i % len(_FAMILY_COLORS)] for i, b in enumerate(baselines)}
    for b in baselines:
        mine = [(y, r) for y, r in zip(ys, rows) if r["baseline"] == b]
        ax.barh([y for y, _ in mine], [r["speedup"] for _, r in mine], color=colors[b], label=f"vs {b}",
                height=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([_bar_label(r) for r in rows], fontsize=6.5)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("speed-up = baseline time / effx time (log)")
    ax.set_title(f"{family}: speed-up against each baseline")
    ax.grid(True, axis="x", which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Markdown --------------------------------------------------------------------------------

def _header(doc: dict, data_name: str) -> list[str]:
    build = doc.get("build", {})
    cuda = f"yes, sm {build.get('cuda_archs')}" if build.get("cuda") else "no"
    build_text = (f"CUDA kernels: {cuda}; OpenMP: {'yes' if build.get('openmp') else 'no'} "
                  f"(max {build.get('openmp_max_threads')} threads); built against torch {build.get('torch_version')}")
    devices = list(dict.fromkeys([r["device"] for r in doc.get("roofs", [])] +
                                 [r["device"] for r in doc.get("records", [])]))
    rows = [["machine", "; ".join(devices) or "unknown"], ["date", doc.get("date", "unknown")],
            ["commit", f"`{doc.get('commit', 'unknown')}`"], ["effx", str(doc.get("effx_version"))],
            ["torch", str(doc.get("torch_version"))], ["build", build_text], ["data", f"[{data_name}]({data_name})"]]
    lines = ["# effx benchmark report", ""]
    if doc.get("note"):
        lines += [f"> {doc['note']}", ""]
    lines += [_md_table(["", ""], rows), ""]
    roofs = doc.get("roofs", [])
    if roofs:
        lines += ["## Roofs", "", "Measured on the machine at the start of the run: copy bandwidth from a large "
                  "tensor copy (bytes read + written), matmul rate from a large torch matmul, and on a CPU the "
                  "rate of independent fp32 FMA chains on every thread. The compute roof is the larger of the "
                  "last two (a CPU BLAS may reach half the FMA rate); bf16 records on a CPU with AVX512_BF16 "
                  "or AMX have the faster rate of its bf16 dot products and its AMX tile products instead.", ""]
        lines.append(_md_table(["device", "copy GB/s", "matmul TFLOP/s", "matmul dtype", "FMA TFLOP/s",
                                "bf16 dot TFLOP/s", "AMX bf16 TFLOP/s", "ridge FLOP/byte"], [
            [r["device"], f"{r['copy_gbps']:.1f}", f"{r['matmul_tflops']:.3f}", r["matmul_dtype"],
             f"{r['fma_tflops']:.3f}" if r.get("fma_tflops") else "-",
             f"{r['bf16_dot_tflops']:.3f}" if r.get("bf16_dot_tflops") else "-",
             f"{r['amx_tflops']:.3f}" if r.get("amx_tflops") else "-",
             f"{_compute_tflops(r) * 1e12 / (r['copy_gbps'] * 1e9):.2f}"] for r in roofs]))
        lines.append("")
    return lines


def _family_table(records: list[dict], with_device: bool) -> str:
    head = ["op", "shape", "dtype", "ms", "GB/s", "TFLOP/s", "roof %", "baseline", "baseline ms", "speed-up"]
    rows = []
    for r in records:
        base = _has_baseline(r)
        row = [r["op"], shape_text(r["shape"]), r["dtype"], f"{r['time_s'] * 1e3:.3f}", f"{r['gbps']:.1f}",
               f"{r['tflops']:.3f}", f"{100 * r['roof_fraction']:.1f}", r["baseline"] if base else "-",
               f"{r['baseline_time_s'] * 1e3:.3f}" if base else "-", f"{r['speedup']:.2f}x" if base else "-"]
        rows.append(([r["device"]] if with_device else []) + row)
    return _md_table((["device"] if with_device else []) + head, rows)


def _pivot(records: list[dict], cell) -> str:
    """Rows: method (op); columns: (B, ctx); ``cell(record) -> str``."""
    columns = sorted({(r["shape"]["B"], r["shape"]["ctx"]) for r in records})
    methods = list(dict.fromkeys(r["op"] for r in records))
    at = {(r["op"], r["shape"]["B"], r["shape"]["ctx"]): r for r in records}
    rows = [[m] + [cell(at[(m, *c)]) if (m, *c) in at else "-" for c in columns] for m in methods]
    return _md_table(["method"] + [f"B={b}, ctx={t}" for b, t in columns], rows)


def _e2e_section(records: list[dict]) -> list[str]:
    lines = []
    for device in dict.fromkeys(r["device"] for r in records):
        mine = [r for r in records if r["device"] == device]
        first = mine[0]["shape"]
        sources = sorted({str(r["shape"].get("peak_of")) for r in mine})
        lines += [f"Model: {first.get('model', 'unknown')} ({mine[0]['dtype']}) on {device}; "
                  f"{first.get('new')} new tokens per row, greedy, random prompt ids; each cell the median of "
                  f"{first.get('rounds', 1)} runs, the methods interleaved round by round.", "",
                  "Decode tokens/s (all rows; prefill excluded, speculation included) and speed-up over the dense "
                  "cache at the same shape:", "",
                  _pivot(mine, lambda r: f"{1 / r['time_s']:.1f} ({r['speedup']:.2f}x)"), "",
                  f"Peak memory of the generate call, MiB ({', '.join(sources)}):", "",
                  _pivot(mine, lambda r: _mib(r["shape"].get("peak_bytes"))), "",
                  "KV-cache storage allocated, MiB:", "",
                  _pivot(mine, lambda r: _mib(r["shape"].get("kv_bytes"))), ""]
        accepted = [r for r in mine if "accepted/step" in r["shape"]]
        if accepted:
            lines += ["Tokens per target step of tree speculation (and the tree planned at the shape): " + ", ".join(
                f"B={r['shape']['B']} ctx={r['shape']['ctx']}: {r['shape']['accepted/step']}"
                + (f" ({r['shape']['tree']})" if "tree" in r["shape"] else "") for r in accepted), ""]
    lines += ["Peak memory on a CPU is the growth of the whole process's peak resident set during the call "
              "(VmHWM, reset before it): every allocation counts (activations, caches, allocator slack, pages "
              "read from disk), and memory the allocator already held from earlier calls does not. On CUDA it "
              "is the growth of torch's allocator peak.", ""]
    return lines


def _skipped_section(skipped: list[dict]) -> list[str]:
    if not skipped:
        return []
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for s in skipped:
        groups.setdefault((s["family"], s["peer"], s["reason"]), []).append(s.get("shape") or {})
    rows = []
    for (family, peer, reason), shapes in groups.items():
        cases = "all" if not any(shapes) else "; ".join(shape_text(s) for s in shapes)
        rows.append([family, peer, reason.replace("|", "\\|"), cases])
    return ["## Skipped peers", "", "Peers that did not run in this run, with the reason they gave.", "",
            _md_table(["family", "peer", "reason", "cases"], rows), ""]


def render(doc: dict, images: dict[str, str], plot_note: str | None, data_name: str) -> str:
    """The Markdown page; ``images`` maps "roofline:<device>" and "speedup:<family>" to the
    relative file names of the plots made (none when ``plot_note`` says why)."""
    records = doc.get("records", [])
    roofs = {r["device"]: r for r in doc.get("roofs", [])}
    lines = _header(doc, data_name)
    if plot_note:
        lines += [f"**Plots not made:** {plot_note}", ""]
    off = [r for r in records if not _on_roofline(r) and r["family"] != "e2e"]
    lines += ["## Roofline", "", "Every kernel measured, as achieved FLOP/s against FLOP per byte moved, under "
              "the measured copy-bandwidth and matmul roofs (matmul roof in the dtype named there). Roof % in the "
              "tables is the binding roof's time over the measured time.", ""]
    for device in dict.fromkeys(r["device"] for r in records if _on_roofline(r)):
        if f"roofline:{device}" in images:
            lines += [f"![roofline on {device}]({images[f'roofline:{device}']})", ""]
        if device not in roofs:
            lines += [f"No roofs were recorded for {device}.", ""]
    if off:
        by_family: dict[str, set[str]] = {}
        for r in off:
            by_family.setdefault(r["family"], set()).add(r["op"])
        lines += [f"Left off the roofline ({len(off)} records with zero FLOPs or zero bytes counted): " +
                  "; ".join(f"{f}: {', '.join(sorted(ops))}" for f, ops in by_family.items()) +
                  ". The end-to-end (e2e) rows are tokens/s and are not on it either.", ""]
    multi = len({r["device"] for r in records}) > 1
    for family in _families(records):
        mine = [r for r in records if r["family"] == family]
        lines += [f"## {family}", ""]
        lines += _e2e_section(mine) if family == "e2e" else [_family_table(mine, multi), ""]
        if f"speedup:{family}" in images:
            lines += [f"![{family} speed-ups]({images[f'speedup:{family}']})", ""]
    lines += _skipped_section(doc.get("skipped", []))
    return "\n".join(lines)


def write_report(json_path: str, out_dir: str | None = None) -> str:
    """Render the JSON at ``json_path`` into ``out_dir`` (default: the JSON's folder, else the
    JSON is copied there so the page's data link works): report.md plus PNGs. Returns the
    path of report.md."""
    with open(json_path) as f:
        doc = json.load(f)
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(out_dir, exist_ok=True)
    data_name = os.path.basename(json_path)
    target = os.path.join(out_dir, data_name)
    if not os.path.exists(target) or not os.path.samefile(json_path, target):
        shutil.copyfile(json_path, target)
    records = doc.get("records", [])
    images: dict[str, str] = {}
    plt = _pyplot()
    note = None if plt is not None else f"matplotlib is not installed (`{INSTALL_PLOT}`)."
    if plt is not None:
        roofs = {r["device"]: r for r in doc.get("roofs", [])}
        devices = list(dict.fromkeys(r["device"] for r in records if _on_roofline(r)))
        for device in devices:
            name = "roofline.png" if len(devices) == 1 else f"roofline-{_slug(device)}.png"
            plot_roofline(plt, [r for r in records if r["device"] == device], roofs.get(device), device,
                          os.path.join(out_dir, name))
            images[f"roofline:{device}"] = name
        for family in _families(records):
            mine = [r for r in records if r["family"] == family]
            if any(_has_baseline(r) and r["baseline"] != r["op"] for r in mine):
                name = f"speedup-{_slug(family)}.png"
                plot_speedups(plt, mine, family, os.path.join(out_dir, name))
                images[f"speedup:{family}"] = name
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(render(doc, images, note, data_name))
    return path
