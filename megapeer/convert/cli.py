"""Command lines: tools/convert_to_hf.py (export_main), tools/convert_from_hf.py
(import_main) and text sampling (sample_main, for a `megapeer sample` subcommand).
Each takes argv and returns an exit status; errors print one line naming the file or
tensor and return 1."""
import argparse
import json
import sys


def export_parser():
    p = argparse.ArgumentParser(
        prog="convert_to_hf.py",
        description="megapeer checkpoint (any TP/PP/VPP/EP layout) -> Hugging Face folder")
    p.add_argument("--checkpoint", required=True,
                   help="iteration folder, checkpoint dir (with `latest`) or run dir")
    p.add_argument("--output", required=True, help="Hugging Face folder to write")
    p.add_argument("--format", default="auto", choices=["auto", "megapeer", "deepseek_v3"],
                   help="megapeer: bundled modeling code (trust_remote_code); deepseek_v3: "
                        "transformers' native classes (models without PEER layers); "
                        "auto: deepseek_v3 when possible (default)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: as saved)")
    p.add_argument("--tokenizer", help="tokenizer to ship (default: data.tokenizer.path of "
                                       "the checkpoint's config)")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--max-shard-size", default="2GB", help="per safetensors file (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def import_parser():
    p = argparse.ArgumentParser(
        prog="convert_from_hf.py",
        description="Hugging Face folder written by megapeer -> megapeer checkpoint that "
                    "resumes under any layout")
    p.add_argument("--hf", required=True, help="Hugging Face folder (megapeer or deepseek_v3)")
    p.add_argument("--output", required=True, help="checkpoint dir to write (iter folder + "
                                                   "latest)")
    p.add_argument("--iteration", type=int, default=0, help="iteration number to record")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("overrides", nargs="*",
                   help="config overrides stored in the checkpoint's megapeer.yaml, e.g. "
                        "parallel.tensor=2 training.lr=1e-4")
    return p


def export_main(argv=None):
    args = export_parser().parse_args(argv)
    from .checkpoint_io import ConversionError
    from .export import export_checkpoint
    try:
        summary = export_checkpoint(args.checkpoint, args.output, args.format, args.dtype,
                                    args.tokenizer, args.no_tokenizer, args.max_shard_size,
                                    args.overwrite)
    except ConversionError as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def import_main(argv=None):
    args = import_parser().parse_args(argv)
    from .checkpoint_io import ConversionError
    from .hf_import import import_hf
    try:
        it = import_hf(args.hf, args.output, args.iteration, args.overrides, args.overwrite)
    except ConversionError as e:
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {it}")
    return 0


def sample_parser():
    p = argparse.ArgumentParser(prog="megapeer sample",
                                description="generate text from an export folder or checkpoint")
    p.add_argument("--model", required=True, help="export folder or megapeer checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="<= 0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", help="default: the model's own")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step")
    return p


def sample_main(argv=None):
    """Print the prompt's continuation (megapeer.convert.generate.sample)."""
    args = sample_parser().parse_args(argv)
    from .checkpoint_io import ConversionError
    from .generate import sample
    try:
        text = sample(args.model, args.tokenizer, args.prompt, args.max_new_tokens,
                      args.temperature, args.top_k, args.seed, args.device,
                      use_cache=not args.no_cache)
    except (ConversionError, ValueError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 1
    print(args.prompt + text)
    return 0
