"""The ``effx`` command: ``info``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import sys

import torch


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_info(args: argparse.Namespace) -> int:
    import effx

    info = effx.build_info()
    print(f"effx {effx.__version__}")
    print(f"torch {torch.__version__} (built against {info['torch_version']})")
    if info["cuda"]:
        print(f"CUDA kernels: compiled for sm {info['cuda_archs']}; torch CUDA {torch.version.cuda}; "
              f"device available: {torch.cuda.is_available()}")
    else:
        print("CUDA kernels: not compiled (CPU-only build)")
    print(f"OpenMP: {'yes' if info['openmp'] else 'no'}, max threads {info['openmp_max_threads']}; "
          f"torch threads {torch.get_num_threads()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from effx.bench import SUITES
    from effx.bench.harness import format_table, write_json

    families = list(SUITES) if not args.family or "all" in args.family else args.family
    unknown = [f for f in families if f not in SUITES]
    if unknown:
        print(f"effx bench: unknown family {', '.join(unknown)}; available: {', '.join(SUITES)}, all",
              file=sys.stderr)
        return 2
    device = _device(args.device)
    records = []
    for family in families:
        print(f"# {family} on {device}", flush=True)
        got = SUITES[family](device, quick=args.quick)
        print(format_table(got), flush=True)
        records += got
    if records:
        roofs = records[0].roofs
        print(f"\nroofs on {roofs.device}: copy {roofs.copy_gbps:.1f} GB/s, "
              f"matmul {roofs.matmul_tflops:.2f} TFLOP/s ({roofs.matmul_dtype})")
    if args.json:
        write_json(args.json, records)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from effx.demo import run_demo

    return run_demo(_device(args.device))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effx", description="Efficient-LLM inference primitives for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, compiled CUDA archs, threads").set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="run benchmark suites and print/write results")
    b.add_argument("family", nargs="*", help="suites to run (default: all)")
    b.add_argument("--json", metavar="PATH", help="write results as JSON")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    b.set_defaults(fn=cmd_bench)
    d = sub.add_parser("demo", help="run every effx method built so far and compare")
    d.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)
