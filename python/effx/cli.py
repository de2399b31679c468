"""The ``effx`` command: ``info``, ``bench``, ``report``, ``generate`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
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
    from effx.bench.harness import format_table, take_skipped, write_json

    families = list(SUITES) if not args.family or "all" in args.family else args.family
    unknown = [f for f in families if f not in SUITES]
    if unknown:
        print(f"effx bench: unknown family {', '.join(unknown)}; available: {', '.join(SUITES)}, all",
              file=sys.stderr)
        return 2
    if args.model and "e2e" not in families:
        print("effx bench: --model applies to the e2e suite, which is not among the families run", file=sys.stderr)
        return 2
    device = _device(args.device)
    records, skipped = [], []
    take_skipped()  # notes of an earlier run in this process are not this run's
    for family in families:
        print(f"# {family} on {device}", flush=True)
        options = {"model_dir": args.model} if family == "e2e" and args.model else {}
        got = SUITES[family](device, quick=args.quick, **options)
        print(format_table(got), flush=True)
        notes = take_skipped()
        for n in notes:
            case = ",".join(f"{k}={v}" for k, v in n.shape.items()) or "all cases"
            print(f"skipped {n.peer} ({case}): {n.reason}", flush=True)
        records += got
        skipped += notes
    if records:
        roofs = records[0].roofs
        print(f"\nroofs on {roofs.device}: copy {roofs.copy_gbps:.1f} GB/s, "
              f"matmul {roofs.matmul_tflops:.2f} TFLOP/s ({roofs.matmul_dtype})"
              + (f", fp32 FMA {roofs.fma_tflops:.2f} TFLOP/s" if roofs.fma_tflops else "")
              + (f", bf16 dot {roofs.bf16_dot_tflops:.2f} TFLOP/s" if roofs.bf16_dot_tflops else "")
              + (f", AMX bf16 {roofs.amx_tflops:.2f} TFLOP/s" if roofs.amx_tflops else ""))
    paths = [args.json] if args.json else []
    if args.report:
        paths.append(os.path.join(args.report, "results.json"))
    for path in paths:
        write_json(path, records, skipped=skipped, note=args.note)
        print(f"wrote {path}")
    if args.report:
        from effx.bench.report import write_report

        print(f"wrote {write_report(paths[-1], args.report)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from effx.bench.report import write_report

    try:
        print(f"wrote {write_report(args.json, args.out)}")
    except (OSError, ValueError, KeyError) as err:
        print(f"effx report: cannot render {args.json}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


def _budget(text: str) -> int | float:
    """--heavy/--recent: a token count ("64") or a fraction of the prompt ("0.1")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count or a fraction, got {text!r}") from None


def _load_model(name: str, dtype: str, device: torch.device):
    from effx import models

    if name == "random":
        return models.random_model(dtype=torch.float32 if dtype == "auto" else getattr(torch, dtype),
                                   device=device)
    return models.from_pretrained(name, dtype=dtype, device=device)


def cmd_generate(args: argparse.Namespace) -> int:
    from effx import models

    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        print(f"effx generate: --sparsity must be in [0, 1), got {args.sparsity}", file=sys.stderr)
        return 2
    policy = None
    if args.offload is not None:
        from effx.offload import Policy

        try:
            gpu, cpu = (float(x) for x in args.offload.split(","))
            policy = Policy(weights_gpu=gpu, weights_cpu=cpu)
        except ValueError as err:
            print(f"effx generate: --offload takes GPU,CPU weight percentages (the disk holds the rest), e.g. "
                  f"0,50: {err}", file=sys.stderr)
            return 2
    if args.kv != "h2o" and (args.heavy is not None or args.recent is not None):
        print("effx generate: --heavy and --recent apply to --kv h2o", file=sys.stderr)
        return 2
    if args.tree is not None and args.spec_draft is None:
        print("effx generate: --tree applies to --spec-draft", file=sys.stderr)
        return 2
    tree = _tree(args.tree or "auto")
    if tree is None:
        print(f"effx generate: --tree takes auto, chain:N (N >= 1) or specexec[:NODES,DEPTH], got {args.tree!r}",
              file=sys.stderr)
        return 2
    if args.kv_offload is not None and args.kv != "offload":
        print("effx generate: --kv-offload applies to --kv offload", file=sys.stderr)
        return 2
    device = _device(args.device)
    try:
        model = _load_model(args.model, args.dtype, device)
    except ValueError as err:
        print(f"effx generate: {err}", file=sys.stderr)
        return 1
    if model.tokenizer is None:
        print(f"effx generate: {args.model} has no tokenizer.json to encode the prompts", file=sys.stderr)
        return 1
    ids = [model.tokenizer.encode(p) for p in args.prompt]
    options = {}
    if args.kv == "offload":
        try:
            gpu, cpu = (float(x) for x in (args.kv_offload or "0,50").split(","))
            from effx.offload import Policy

            Policy(cache_gpu=gpu, cache_cpu=cpu)
        except ValueError as err:
            print(f"effx generate: --kv-offload takes GPU,CPU percentages of the KV cache (the disk holds the "
                  f"rest), e.g. 0,50: {err}", file=sys.stderr)
            return 2
        options = dict(cache_gpu=gpu, cache_cpu=cpu)
    if args.kv == "h2o":
        options = dict(heavy=0.1 if args.heavy is None else args.heavy,
                       recent=0.1 if args.recent is None else args.recent)
    stop = args.stop if args.stop is not None else list(model.config.eos_token_ids)
    mlp = weights = draft = None
    if args.spec_draft is not None:
        try:
            if args.spec_draft.startswith("first:"):
                draft = models.early_exit_draft(model, int(args.spec_draft.split(":", 1)[1]))
            else:
                draft = _load_model(args.spec_draft, args.dtype, device)
        except ValueError as err:
            print(f"effx generate: --spec-draft: {err}", file=sys.stderr)
            return 1
    if args.sparsity:
        # Predictors are trained on the prompts themselves: fine for a try-out; calibrate on
        # representative text (effx.models.sparse_mlps) for real use.
        fitted = models.sparse_mlps(model, ids, density=1 - args.sparsity)
        mlp = fitted.modules
        print(f"# sparse MLP: density {1 - args.sparsity:.2f}, predictor recall "
              f"{sum(fitted.recall) / len(fitted.recall):.3f} (mean over layers)")
    if policy is not None:
        weights = models.StreamedWeights(model, policy)
    try:
        result = models.generate(model, ids, max_new_tokens=args.max_new_tokens, cache=args.kv,
                                 cache_options=options, temperature=args.temperature, top_p=args.top_p,
                                 stop_tokens=stop, generator=torch.Generator(device).manual_seed(args.seed),
                                 mlp=mlp, weights=weights, draft=draft, tree=tree, progress=sys.stderr.isatty())
    except ValueError as err:
        print(f"effx generate: {err}", file=sys.stderr)
        return 1
    finally:
        if weights is not None:
            weights.close()
    texts = [model.tokenizer.decode(t) for t in result.tokens]
    random_note = "; the text is meaningless" if args.model == "random" else ""
    print(f"# {model.name} on {device} ({str(model.dtype).replace('torch.', '')}), KV cache {args.kv}{random_note}")
    for b, (prompt, text) in enumerate(zip(args.prompt, texts)):
        print(f"\n[{b}] {prompt}{text}")
    print(f"\n{'#':>3} {'prompt tok':>10} {'new tok':>8} {'finish':>7}")
    for b, tokens in enumerate(result.tokens):
        print(f"{b:>3} {result.prompt_lengths[b]:>10} {len(tokens):>8} {result.finish_reasons[b]:>7}")
    print(f"\nprefill {result.prefill_seconds:.3f} s, decode {result.decode_tokens_per_second:.1f} tokens/s "
          f"(batch {len(ids)}), KV cache {result.kv_bytes:,} bytes")
    if draft is not None:
        drafted = (f"SpecExec trees ({args.tree})" if result.tree is None else
                   f"a tree of {len(result.tree)} tokens per step"
                   + (" (planned: no tree beats plain decoding here)" if not result.tree else ""))
        print(f"tree speculation: {drafted}, {result.accepted_per_step:.2f} tokens per target step")
    if args.json:
        import effx

        doc = dict(effx_version=effx.__version__, model=model.name, random_weights=args.model == "random",
                   device=str(device), dtype=str(model.dtype).replace("torch.", ""), kv=args.kv, kv_options=options,
                   sparsity=args.sparsity, offload=args.offload,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   max_new_tokens=args.max_new_tokens, prefill_s=result.prefill_seconds,
                   decode_s=result.decode_seconds, decode_tokens_per_s=result.decode_tokens_per_second,
                   kv_bytes=result.kv_bytes, spec_tree=result.tree, accepted_per_step=result.accepted_per_step,
                   outputs=[dict(prompt=p, prompt_tokens=n, tokens=t, text=x, finish_reason=r)
                            for p, n, t, x, r in zip(args.prompt, result.prompt_lengths, result.tokens, texts,
                                                     result.finish_reasons)])
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            print(f"wrote {args.json}")
    return 0


def _tree(text: str) -> str | list[int] | None:
    """--tree's value as generate's ``tree`` argument, or None when malformed."""
    if text == "auto" or text.startswith("specexec"):
        return text  # generate checks a SpecExec shape
    kind, _, n = text.partition(":")
    if kind != "chain" or not n.isdigit() or int(n) < 1:
        return None
    return list(range(-1, int(n) - 1))


def cmd_demo(args: argparse.Namespace) -> int:
    from effx.demo import run_demo

    return run_demo(_device(args.device), model_dir=args.model, new_tokens=args.new_tokens, json_path=args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effx", description="Efficient-LLM inference primitives for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, compiled CUDA archs, threads").set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="run benchmark suites and print/write results")
    b.add_argument("family", nargs="*", help="suites to run (default: all)")
    b.add_argument("--json", metavar="PATH", help="write results as JSON")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    b.add_argument("--report", metavar="DIR", help="write DIR/results.json and a Markdown report with plots "
                                                   "(DIR/report.md, *.png; plots need matplotlib)")
    b.add_argument("--note", help="free text about the run, kept in the JSON and shown atop the report")
    b.add_argument("--model", metavar="DIR", help="e2e suite: a Hugging Face checkpoint folder instead of the "
                                                  "built-in random-weight model")
    b.set_defaults(fn=cmd_bench)
    r = sub.add_parser("report", help="render the Markdown report and plots of a bench JSON")
    r.add_argument("json", help="a JSON written by effx bench --json or --report")
    r.add_argument("--out", metavar="DIR", help="folder for report.md and the plots (default: the JSON's folder)")
    r.set_defaults(fn=cmd_report)
    g = sub.add_parser("generate", help="generate text with a checkpoint and any effx method")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face checkpoint folder (Llama, Mistral, Qwen2), or 'random' for the built-in "
                        "random-weight model")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--stop", type=int, action="append", metavar="ID",
                   help="stop token id (repeatable; default: the model's EOS ids)")
    g.add_argument("--kv", choices=["dense", "kivi2", "kivi4", "h2o", "offload"], default="dense",
                   help="KV-cache policy")
    g.add_argument("--kv-offload", metavar="GPU,CPU", help="--kv offload: percent of the KV cache on the GPU and "
                                                         "on the CPU, the rest on disk (default 0,50)")
    g.add_argument("--heavy", type=_budget, help="H2O heavy hitters: tokens or fraction of the prompt (0.1)")
    g.add_argument("--recent", type=_budget, help="H2O recent window: tokens or fraction of the prompt (0.1)")
    g.add_argument("--sparsity", type=float, help="sparse MLP (DejaVu): fraction of MLP neurons skipped, e.g. 0.5")
    g.add_argument("--spec-draft", metavar="DIR", help="draft model for tree speculation: a checkpoint folder, or "
                                                     "first:N for the model's first N layers")
    g.add_argument("--tree", metavar="SHAPE", help="--spec-draft's tree: auto (default: Sequoia's planner measures "
                                                 "the draft's acceptance on the prompts and both models' costs, and "
                                                 "picks the fastest tree, or none), chain:N, or specexec[:NODES,DEPTH] "
                                                 "(SpecExec's best-first tree, rebuilt each step; one prompt)")
    g.add_argument("--offload", metavar="GPU,CPU", help="serve weights through the offload engine: percent of "
                                                         "weights on the GPU and on the CPU, the rest on disk")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("demo", help="generate with every effx method on one model and compare")
    d.add_argument("--model", metavar="DIR", help="a Hugging Face checkpoint folder (default: the built-in "
                                                  "random-weight model)")
    d.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    d.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    d.add_argument("--json", metavar="PATH", help="write the model-runner rows as JSON")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)
