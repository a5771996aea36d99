"""`megapeer eval`: perplexity and lm-evaluation-harness tasks for a checkpoint or an export.

    megapeer eval --model runs/x/checkpoints --jsonl valid.jsonl --indexed data/valid_text_document
    megapeer eval --model exports/x --tasks hellaswag,mmlu --num-fewshot 5 --output res.json
    torchrun --nproc_per_node 8 -m megapeer.eval.cli --model exports/x --tasks mmlu  # 8 ranks

Results: a printed table, and JSON (--output) with "perplexity" (per data source) and
"lm_eval" (lm-eval's results, versions, n-shot). See docs/export_eval.md.
"""
import argparse
import json
import math
import os
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="megapeer eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="export folder (config.json) or megapeer checkpoint (any layout)")
    p.add_argument("--tokenizer", help="tokenizer file/folder (default: the model's own)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: as stored)")
    p.add_argument("--max-length", type=int,
                   help="context window in tokens (default: the model's training length)")
    p.add_argument("--batch-size", type=int, default=8)
    g = p.add_argument_group("perplexity")
    g.add_argument("--jsonl", action="append", default=[], help="JSON-lines file (repeatable)")
    g.add_argument("--json-key", default="text", help="text field of --jsonl records")
    g.add_argument("--append-eod", action="store_true",
                   help="score an end-of-document token after each --jsonl text")
    g.add_argument("--indexed", action="append", default=[],
                   help="Megatron indexed dataset prefix (.bin/.idx; repeatable)")
    g.add_argument("--stride", type=int,
                   help="sliding-window step in tokens (default: --max-length)")
    g.add_argument("--max-documents", type=int, help="first N documents of each source")
    g = p.add_argument_group("lm-evaluation-harness")
    g.add_argument("--tasks", help="comma-separated lm-eval task names")
    g.add_argument("--include-path", action="append", default=[],
                   help="folder of extra lm-eval task YAMLs (repeatable)")
    g.add_argument("--no-default-tasks", action="store_true",
                   help="index only --include-path tasks (faster start)")
    g.add_argument("--num-fewshot", type=int)
    g.add_argument("--limit", type=float, help="documents per task (or fraction if < 1)")
    g.add_argument("--gen-kwargs", help="generation kwargs for generate_until tasks, a=1,b=2")
    g.add_argument("--bootstrap-iters", type=int, default=100000)
    g.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", help="write results as JSON here")
    return p


def _setup_distributed():
    """(rank, world, device) under torchrun/SLURM; (0, 1, None) otherwise."""
    import torch
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world == 1:
        return 0, 1, None
    from ..parallel import init_distributed   # gloo on CPU (with the CPU shims), NCCL on GPU
    init_distributed()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else None
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _reduce(res, world):
    """Sum a perplexity result over ranks (each scored its share of the documents)."""
    if world == 1:
        return res
    import torch
    keys = [k for k in ("documents", "tokens", "nll", "bytes") if k in res]
    t = torch.tensor([float(res[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    res = dict(res, **{k: float(v) if k == "nll" else int(v) for k, v in zip(keys, t.tolist())})
    res["loss"] = res["nll"] / max(res["tokens"], 1)
    res["perplexity"] = math.exp(res["loss"])
    if res.get("bytes"):
        res["bits_per_byte"] = res["nll"] / (math.log(2) * res["bytes"])
    return res


def run_perplexity(args, model, tok, max_length, rank, world):
    from .perplexity import (doc_prefix, indexed_documents, jsonl_documents, perplexity)
    out = {}
    for path in args.jsonl:
        texts = jsonl_documents(path, args.json_key, args.max_documents)[rank::world]
        docs = [tok.encode(t) + ([tok.eod] if args.append_eod else []) for t in texts]
        res = perplexity(model, docs, doc_prefix(tok), max_length, args.stride, args.batch_size,
                         nbytes=sum(len(t.encode("utf-8")) for t in texts))
        out[path] = _reduce(res, world)
    for prefix in args.indexed:
        docs = indexed_documents(prefix, args.max_documents)[rank::world]
        res = perplexity(model, docs, doc_prefix(tok), max_length, args.stride, args.batch_size)
        out[prefix] = _reduce(res, world)
    return out


def run_lm_eval(args, model, tok, max_length):
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("megapeer eval --tasks needs lm-eval: pip install 'megapeer[eval]' "
                         "(lm-eval==0.4.13)") from None
    from .lm_eval_adapter import MegapeerLM
    lm = MegapeerLM(path=args.model, model=model, tokenizer=tok, batch_size=args.batch_size,
                    max_length=max_length)
    tm = TaskManager(include_path=args.include_path or None,
                     include_defaults=not args.no_default_tasks)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise SystemExit(f"unknown lm-eval task(s): {', '.join(unknown)}")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit, task_manager=tm,
        gen_kwargs=args.gen_kwargs, bootstrap_iters=args.bootstrap_iters, log_samples=False,
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed)
    return res


def table(perplexity):
    rows = [("data", "documents", "tokens", "loss", "perplexity", "bits/byte")]
    for name, r in perplexity.items():
        bpb = r.get("bits_per_byte")
        rows.append((name, str(r["documents"]), str(r["tokens"]), f"{r['loss']:.4f}",
                     f"{r['perplexity']:.3f}", f"{bpb:.4f}" if bpb is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def main(argv=None) -> int:
    """`megapeer eval` entry point: 0 on success; bad input exits with a message."""
    run(argv)
    return 0


def run(argv=None) -> dict:
    """Evaluate as the flags say; returns the results (also printed and, with --output,
    written as JSON on rank 0)."""
    args = build_parser().parse_args(argv)
    if not (args.jsonl or args.indexed or args.tasks):
        build_parser().error("nothing to evaluate: give --jsonl, --indexed and/or --tasks")
    import torch

    from ..convert.checkpoint_io import ConversionError
    from ..convert.loading import load_model
    rank, world, dist_device = _setup_distributed()
    device = args.device or dist_device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok = load_model(args.model, device=device, dtype=args.dtype,
                                tokenizer=args.tokenizer)
    except ConversionError as e:
        raise SystemExit(f"megapeer eval: {e}") from None
    if tok is None:
        raise SystemExit(f"megapeer eval: {args.model} has no tokenizer; pass --tokenizer")
    max_length = args.max_length or model.config.max_position_embeddings
    results = {"model": args.model, "max_length": max_length}
    try:
        if args.jsonl or args.indexed:
            results["perplexity"] = run_perplexity(args, model, tok, max_length, rank, world)
    except ValueError as e:
        raise SystemExit(f"megapeer eval: {e}") from None
    if args.tasks:
        res = run_lm_eval(args, model, tok, max_length)
        if res is not None:   # None on ranks other than 0
            results["lm_eval"] = {k: res[k] for k in ("results", "versions", "n-shot",
                                                      "higher_is_better") if k in res}
            results["_lm_eval_raw"] = res
    if rank != 0:
        return results
    if "perplexity" in results:
        print(table(results["perplexity"]))
    if "_lm_eval_raw" in results:
        from lm_eval.utils import make_table
        print(make_table(results["_lm_eval_raw"]))
    results.pop("_lm_eval_raw", None)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
