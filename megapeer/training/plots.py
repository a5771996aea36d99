"""Figures of a run: training curves (run_dir/plots/training.png) and PEER expert usage
(run_dir/expert_usage/). numpy and matplotlib only: the plot worker imports this module."""
import json
import math
import os
import shutil

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


def plot_expert_usage(usage, path_png, step=None):
    """Per layer: sorted selection counts (log scale) and a histogram of counts."""
    from matplotlib.figure import Figure

    layers = sorted(usage)
    if not layers:
        raise ValueError("no expert usage to plot")
    fig = Figure(figsize=(11, 3.2 * len(layers)), layout="constrained")
    axes = fig.subplots(len(layers), 2, squeeze=False)
    for row, layer in zip(axes, layers):
        s = usage[layer]
        counts = np.asarray(s["counts"])
        n = counts.size
        srt = np.sort(counts)[::-1]
        # at most ~4000 points: the curve of a million experts needs no more
        pick = np.unique(np.linspace(0, n - 1, min(n, 4000)).astype(np.int64))
        x = pick / max(n - 1, 1)
        y = srt[pick]
        ax = row[0]
        pos = y > 0
        ax.plot(x[pos], y[pos], lw=1.5, color="C0", label="selections")
        uniform = s["selections"] / n if n else 0
        if uniform > 0:
            ax.axhline(uniform, color="C3", ls="--", lw=1, label=f"uniform ({uniform:.3g})")
        if s["dead"]:
            ax.axvline(s["fraction_used"], color="0.5", ls=":", lw=1,
                       label=f"never selected beyond here ({s['dead']})")
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_xlabel("experts, most to least selected (fraction of N)")
        ax.set_ylabel("times selected")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
        ax.set_title(f"layer {layer}: used {s['fraction_used']:.1%} of {n}, "
                     f"KL from uniform {s['kl_uniform']:.3f}, dead {s['dead']}", fontsize=10)

        ax = row[1]
        ax.hist(counts, bins=min(60, max(int(counts.max()) + 1, 1)), color="C0")
        ax.set_yscale("log")
        ax.set_xlabel("times selected in window")
        ax.set_ylabel("number of experts")
        ax.grid(alpha=0.3)
        ax.set_title(f"score {s['score_mean']:.3f} +/- {s['score_std']:.3f}, "
                     f"mean max gate {s['gate_max_mean']:.3f}", fontsize=10)
    title = "PEER expert usage" + (f" at step {step}" if step is not None else "")
    fig.suptitle(title)
    return save_figure(fig, path_png)


def save_usage_plots(usage, run_dir, step):
    """run_dir/expert_usage/step_XXXXXX.png and a copy as latest.png; returns the step path."""
    d = os.path.join(run_dir, "expert_usage")
    path = plot_expert_usage(usage, os.path.join(d, f"step_{step:06d}.png"), step=step)
    shutil.copyfile(path, os.path.join(d, "latest.png"))
    return path
