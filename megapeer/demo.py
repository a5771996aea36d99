"""The README demo (`make demo`, `megapeer demo`): the whole product on one CPU.

1. corpus: the running interpreter's stdlib sources -> JSONL -> tokenizer -> .bin/.idx
2. train examples/tiny_cpu.yaml (tiny MLA + PEER model) until validation loss has dropped
3. evaluate perplexity on held-out stdlib files (not in the training corpus)
4. export the checkpoint to a Hugging Face folder
5. sample text from the export
Re-running resumes or reuses every finished step.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _heldout_jsonl(path, skip_mb, take_mb=0.3):
    """Stdlib files after the first `skip_mb` (the training corpus), about take_mb."""
    from .data.demo import stdlib_files
    seen = {rel for rel, _ in stdlib_files(int(skip_mb * 1e6))}
    n = size = 0
    with open(path + ".tmp", "w") as f:
        for rel, p in stdlib_files():
            if rel in seen:
                continue
            with open(p, encoding="utf-8", errors="replace") as src:
                text = src.read()
            if text.strip():
                f.write(json.dumps({"text": text, "path": rel}) + "\n")
                n, size = n + 1, size + len(text)
            if size >= take_mb * 1e6:
                break
    os.replace(path + ".tmp", path)
    return n


def _step(title):
    print(f"\n=== {title}", flush=True)
    return time.time()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="megapeer demo", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "demo"))
    ap.add_argument("--run", default=os.path.join(ROOT, "runs", "tiny_cpu"))
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "tiny_cpu.yaml"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    a = ap.parse_args(argv)

    t = _step("1/5 corpus, tokenizer, indexed dataset")
    from .data import prepare_demo_data
    data = prepare_demo_data(a.data)
    heldout = os.path.join(a.data, "heldout.jsonl")
    if not os.path.exists(heldout):
        _heldout_jsonl(heldout, data["settings"]["max_mb"])
    print(f"{data['documents']} documents, {data['tokens']:,} tokens ({time.time() - t:.0f} s)")

    t = _step("2/5 train a tiny MLA + PEER model on the CPU")
    overrides = [f"data.tokenizer.path={data['tokenizer']}", f"data.blend=[{data['prefix']}]",
                 f"logging.run_dir={a.run}", *a.overrides]
    from .train import main as train_main
    rc = train_main(["--config", a.config, "--resume", "auto", *overrides])
    if rc:
        return rc
    valid = [json.loads(x) for x in open(os.path.join(a.run, "metrics.jsonl"))
             if '"valid"' in x]
    if valid:
        print(f"validation loss {valid[0]['loss']:.3f} (step {valid[0]['step']}) -> "
              f"{valid[-1]['loss']:.3f} (step {valid[-1]['step']}); plots in "
              f"{os.path.join(a.run, 'plots')} and {os.path.join(a.run, 'expert_usage')} "
              f"({time.time() - t:.0f} s)")

    t = _step("3/5 perplexity on held-out stdlib files")
    from .eval.cli import main as eval_main
    rc = eval_main(["--model", a.run, "--jsonl", heldout, "--device", "cpu",
                    "--output", os.path.join(a.run, "eval.json")])
    if rc:
        return rc

    t = _step("4/5 export to a Hugging Face folder")
    from .convert.cli import export_main
    hf = os.path.join(a.run, "hf")
    rc = export_main(["--checkpoint", a.run, "--output", hf, "--overwrite"])
    if rc:
        return rc

    _step("5/5 sample from the export")
    from .convert.cli import sample_main
    for prompt in ("def ", "import os\n\n\nclass "):
        rc = sample_main(["--model", hf, "--prompt", prompt, "--max-new-tokens", "60",
                          "--temperature", "0.8", "--top-k", "40", "--device", "cpu"])
        if rc:
            return rc
        print("-" * 60)
    print(f"\ndone. run folder: {a.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
