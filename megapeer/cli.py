"""`megapeer` command: train, eval, info, demo."""
import sys

USAGE = """usage: megapeer <command> [args]

commands:
  train   pretrain from a YAML config (megapeer train --config X.yaml [key=value ...])
  eval    perplexity and lm-eval-harness benchmarks (megapeer eval --help)
  export  checkpoint -> Hugging Face folder (same as tools/convert_to_hf.py)
  import  Hugging Face folder -> checkpoint (same as tools/convert_from_hf.py)
  sample  generate text from a checkpoint or an export (megapeer sample --help)
  info    versions, devices and which attention / PEER kernel paths are active
  demo    the README demo: corpus, tokenizer, tiny MLA+PEER model on CPU, eval, export, sample
"""


def info() -> int:
    import torch
    print(f"megapeer {__import__('megapeer').__version__}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    try:
        import megatron.core as mc
        print(f"megatron-core {mc.__version__}")
    except Exception as e:  # pragma: no cover - shown to the user
        print(f"megatron-core: not importable ({e})")
    from .parallel.cpu_shims import transformer_engine_available
    te = transformer_engine_available()
    print(f"attention: {'Transformer Engine spec' if te else 'local spec + torch SDPA'} "
          f"(model.attention_backend=auto)")
    from .ops import kernel_status
    ok, why = kernel_status()
    print(f"PEER expert step: {'fused CUDA kernels' if ok else 'plain PyTorch reference'}"
          f"{'' if ok else ' (' + why + ')'}")
    from .ops import peer_grouped
    gok, gwhy = peer_grouped.available()
    from .ops.dispatch import GROUPED_MIN_PAIRS, GROUPED_MIN_WIDTH
    print(f"grouped Triton kernels (model.peer.kernel=grouped): "
          f"{'available' if gok else 'unavailable: ' + gwhy}"
          + (f"; auto uses them for experts of width >= {GROUPED_MIN_WIDTH} chosen by "
             f">= {GROUPED_MIN_PAIRS} pairs each per call" if gok else ""))
    from .ops import peer_gmm
    mok, mwhy = peer_gmm.available()
    print(f"torch grouped GEMM (model.peer.kernel=gmm): {mwhy if mok else 'unavailable: ' + mwhy}")
    from .ops import grad_add
    print("gradient add into main_grad (training.triton_grad_add): "
          + (f"Triton kernel for bf16/fp16 gradients of >= {grad_add.MIN_NUMEL} elements"
             if grad_add.available() else "torch's add_ (needs Triton and a GPU)"))
    from .ops import adam, product_topk
    print("Triton AdamW + model copy (training.triton_adam, on by default): "
          + (f"used for fp32 main parameters of >= {adam.MIN_NUMEL} elements"
             if adam.available() else "unavailable (needs Triton and a GPU): torch's Adam"))
    print("product-key top-k kernel (model.peer.topk_kernel): "
          + ("auto uses it for two sub-key sets"
             if product_topk.available() and torch.cuda.is_available()
             else "unavailable (needs Triton and a GPU): auto uses torch.topk"))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train import main as train_main
        return train_main(rest)
    if cmd == "eval":
        from .eval.cli import main as eval_main
        return eval_main(rest)
    if cmd in ("export", "import", "sample"):
        from .convert import cli as convert_cli
        return getattr(convert_cli, f"{cmd}_main")(rest)
    if cmd == "info":
        return info()
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


def console_main():
    """The `megapeer` console script."""
    from .train import exit_quickly
    exit_quickly(main())


if __name__ == "__main__":
    console_main()
