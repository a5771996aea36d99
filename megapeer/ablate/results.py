"""Collect a sweep: each variant's metrics.jsonl -> results.csv, results.md and plots."""
import csv
import json
import math
import os
import statistics

COLUMNS = ["variant", "architecture", "layout", "status", "world_size", "tp", "pp", "vpp",
           "ep", "dp", "micro_batch", "recompute", "params_total", "params_active",
           "flops_per_token", "train_iters", "steps", "train_flops", "tokens_per_s", "mfu",
           "peak_memory_gib", "final_train_loss", "final_valid_loss", "best_valid_loss"]


def read_metrics(run_dir):
    """(train records, valid records) sorted by step; for a repeated step the last wins."""
    by = {"train": {}, "valid": {}}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue                       # a line cut short by a kill
                if r.get("split") in by and "step" in r:
                    by[r["split"]][r["step"]] = r
    return tuple([d[k] for k in sorted(d)] for d in (by["train"], by["valid"]))


def _values(recs, key):
    return [r[key] for r in recs if isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def summarize(v):
    """One results row for a Variant (see COLUMNS)."""
    train, valid = read_metrics(v.run_dir)
    steps = train[-1]["step"] if train else 0
    # the first logged window holds start-up costs: leave it out when there are others
    steady = train[1:] if len(train) > 1 else train
    tps, mfu = _values(steady, "tokens_per_s"), _values(steady, "mfu")
    mem = _values(train, "mem_gib") or _values(train, "memory_gib")  # older runs: memory_gib
    tl, vl = _values(train, "loss"), _values(valid, "loss")
    lay = v.layout_values
    status = ("finished" if v.finished() else "not started" if not train
              else f"stopped at {steps}/{v.train_iters}")
    return {
        "variant": v.name, "architecture": v.architecture, "layout": v.layout,
        "status": status, "world_size": v.world_size, "tp": lay.get("tp", 1),
        "pp": lay.get("pp", 1), "vpp": lay.get("vpp"), "ep": lay.get("ep", 1),
        "dp": lay.get("dp", 1), "micro_batch": lay.get("micro_batch"),
        "recompute": lay.get("recompute"), "params_total": v.params_total,
        "params_active": v.params_active, "flops_per_token": v.flops_per_token,
        "train_iters": v.train_iters, "steps": steps, "train_flops": steps * v.flops_per_step,
        "tokens_per_s": statistics.median(tps) if tps else None,
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_gib": max(mem) if mem else None,
        "final_train_loss": tl[-1] if tl else None,
        "final_valid_loss": vl[-1] if vl else None,
        "best_valid_loss": min(vl) if vl else None,
    }


def _fmt(v, key):
    if v is None:
        return "-"
    if key in ("params_total", "params_active"):
        return f"{v / 1e6:.2f}M"
    if key in ("flops_per_token", "train_flops"):
        return f"{v:.3g}"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "tokens_per_s":
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4f}" if "loss" in key else f"{v:.2f}"
    return str(v)


MD_COLUMNS = ["variant", "status", "world_size", "params_active", "flops_per_token", "steps",
              "train_flops", "tokens_per_s", "mfu", "peak_memory_gib", "final_valid_loss",
              "best_valid_loss"]


def write_tables(rows, out_dir, title):
    """results.csv (all columns) and results.md (the main ones; best valid loss in bold)."""
    csv_path = os.path.join(out_dir, "results.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    best = [r["best_valid_loss"] for r in rows if r["best_valid_loss"] is not None]
    lines = [f"# {title}", "", "| " + " | ".join(MD_COLUMNS) + " |",
             "|" + "|".join("---" if c in ("variant", "status") else "---:"
                            for c in MD_COLUMNS) + "|"]
    for r in rows:
        cells = [_fmt(r[c], c) for c in MD_COLUMNS]
        if best and r["best_valid_loss"] == min(best):
            i = MD_COLUMNS.index("best_valid_loss")
            cells[i] = f"**{cells[i]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "tokens/s and MFU: median over logged windows after the first; memory: peak "
              "per rank; train_flops = steps x flops_per_token x tokens per step."]
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_loss_vs_flops(variants, out_path):
    """Validation loss (markers) and training loss (thin) against training FLOPs."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(variants))]
    for v, c in zip(variants, colors):
        train, valid = read_metrics(v.run_dir)
        t = [(r["step"] * v.flops_per_step, r["loss"]) for r in train
             if _values([r], "loss")]
        e = [(r["step"] * v.flops_per_step, r["loss"]) for r in valid if _values([r], "loss")]
        if t:
            ax.plot(*zip(*t), color=c, alpha=0.35, linewidth=1)
        if e:
            ax.plot(*zip(*e), color=c, marker="o", linewidth=2, label=v.name)
        elif t:
            ax.plot([], [], color=c, label=f"{v.name} (train only)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("loss (markers: validation, thin: training)")
    ax.set_title("loss against training compute")
    ax.grid(True, which="both", alpha=0.3)
    if variants:
        ax.legend(fontsize=8)
    fig.savefig(out_path, dpi=110)
    return out_path


def plot_throughput(rows, out_path):
    """Tokens/s, MFU and peak memory per layout, one bar per architecture."""
    from matplotlib.figure import Figure
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    archs = list(dict.fromkeys(r["architecture"] for r in rows))
    panels = [("tokens_per_s", "tokens/s", 1.0), ("mfu", "MFU (%)", 100.0),
              ("peak_memory_gib", "peak memory (GiB)", 1.0)]
    panels = [p for p in panels if any(r[p[0]] is not None for r in rows)] or panels[:1]
    fig = Figure(figsize=(4 + 3.2 * len(panels) * max(1, len(layouts)) ** 0.5, 4.8),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / max(1, len(archs))
    cell = {(r["layout"], r["architecture"]): r for r in rows}
    for ax, (key, label, scale) in zip(axes, panels):
        for j, a in enumerate(archs):
            xs, ys = [], []
            for i, lay in enumerate(layouts):
                r = cell.get((lay, a))
                if r is not None and r[key] is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r[key] * scale)
            ax.bar(xs, ys, width=width, color=f"C{j % 10}", label=a)
        ax.set_xticks(range(len(layouts)))
        ax.set_xticklabels(layouts, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_title("throughput per layout")
    axes[0].legend(fontsize=8)
    fig.savefig(out_path, dpi=110)
    return out_path


def collect(variants, out_dir, title):
    """Write every output of a sweep.

    Returns {'rows', 'csv', 'md', 'loss_plot', 'throughput_plot'}.
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = [summarize(v) for v in variants]
    csv_path, md_path = write_tables(rows, out_dir, title)
    return {"rows": rows, "csv": csv_path, "md": md_path,
            "loss_plot": plot_loss_vs_flops(variants, os.path.join(out_dir, "loss_vs_flops.png")),
            "throughput_plot": plot_throughput(rows, os.path.join(out_dir, "throughput.png"))}
