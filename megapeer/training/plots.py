"""Training curves from run_dir/metrics.jsonl -> run_dir/plots/training.png."""
import json
import math
import os

import numpy as np


def read_metrics(run_dir):
    """{split: [records sorted by step]}; for a repeated step the last line wins."""
    by_split = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in rec:
                by_split.setdefault(rec.get("split", "train"), {})[rec["step"]] = rec
    return {s: [recs[k] for k in sorted(recs)] for s, recs in by_split.items()}


def _series(recs, key):
    pts = [(r["step"], r[key]) for r in recs
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return (np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float))


def plot_run(run_dir, out=None):
    """Loss against step and tokens, lr, grad norm, tokens/s, memory. Returns the PNG path."""
    from matplotlib.figure import Figure

    data = read_metrics(run_dir)
    train, valid = data.get("train", []), data.get("valid", [])
    if not train and not valid:
        raise ValueError(f"no train or valid lines in {run_dir}/metrics.jsonl")
    out = out or os.path.join(run_dir, "plots", "training.png")
    fig = Figure(figsize=(15, 8), layout="constrained")
    ax = fig.subplots(2, 3).ravel()

    ts, tl = _series(train, "loss")
    vs, vl = _series(valid, "loss")
    ax[0].plot(ts, tl, lw=1, label="train")
    if len(vs):
        ax[0].plot(vs, vl, "o-", ms=4, label="validation")
    ax[0].set(xlabel="step", ylabel="loss", title="loss")

    # tokens axis: logged per train step; validation points placed by their step
    tok_s, tok = _series(train, "tokens")
    if len(tok):
        ls, ll = _series([r for r in train if "tokens" in r], "loss")
        ax[1].plot(np.interp(ls, tok_s, tok), ll, lw=1, label="train")
        if len(vs):
            ax[1].plot(np.interp(vs, tok_s, tok), vl, "o-", ms=4, label="validation")
        ax[1].set(xlabel="tokens", ylabel="loss", title="loss against tokens")
    else:
        ax[1].text(0.5, 0.5, "no token counts logged", ha="center", va="center")
        ax[1].set(title="loss against tokens")
    for a in ax[:2]:
        if a.get_legend_handles_labels()[0]:
            a.legend()
        finite = np.concatenate([tl, vl])
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
            a.set_yscale("log")

    for a, key, label in [(ax[2], "lr", "learning rate"), (ax[3], "grad_norm", "grad norm"),
                          (ax[4], "tokens_per_s", "tokens / s"), (ax[5], "mem_gib", "memory (GiB)")]:
        s, v = _series(train, key)
        if len(s):
            a.plot(s, v, lw=1)
        else:
            a.text(0.5, 0.5, f"no {key} logged", ha="center", va="center")
        a.set(xlabel="step", ylabel=label, title=label)
    s, v = _series(train, "grad_norm")
    if len(v) and v.min() > 0 and v.max() / v.min() > 20:
        ax[3].set_yscale("log")
    for a in ax:
        a.grid(alpha=0.3)
    last = train[-1]["step"] if train else valid[-1]["step"]
    title = f"{os.path.basename(os.path.abspath(run_dir))}: step {last}"
    if len(vl):
        title += f", validation loss {vl[-1]:.3f} (ppl {math.exp(min(vl[-1], 700)):.1f})"
    fig.suptitle(title)
    return save_figure(fig, out)


def save_figure(fig, path_png, dpi=90):
    """Write a matplotlib Figure as PNG atomically (a temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
    tmp = path_png + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path_png)
    return path_png
