"""Where a training step's time goes: torch.profiler over a few steps, summarised.

`StepProfiler` records steps [first, last] of a run (`logging.profile_steps`), writes a
Chrome trace per rank and a summary that sorts every GPU kernel into a category:

  GEMM, attention, PEER kernels, communication (NCCL), optimizer, memory copies,
  elementwise / norms / other, and idle (step wall time with no kernel running).
The idle time is also split by cause: for each gap, what the GPU waited for (the CPU
operators that launched the kernel ending it, after a host synchronisation if one
ended inside the gap).

Code wrapped in `record_function(label)` for a label in LABELS is also reported on
its own (kernels launched from inside the label's CPU span, matched by correlation
id): PEER's collectives, forward and backward (`peer.comm`), and the data-parallel
gradient reduction (`grad_sync`).
See docs/profile.md.
"""
import bisect
import json
import logging
import os

import torch

log = logging.getLogger("megapeer")

STEP = "megapeer.step"
LABELS = ("peer.comm", "grad_sync")  # set in models/peer.py (COMM_LABEL) and training/step.py
CATEGORIES = ("GEMM", "attention", "PEER kernels", "communication (NCCL)", "optimizer",
              "memory copies", "elementwise / norms / other")


def kernel_category(name, cat="kernel"):
    """The category of one GPU activity from its name (and trace category)."""
    n = name.lower()
    if cat in ("gpu_memcpy", "gpu_memset") or n.startswith(("memcpy", "memset")):
        return "memory copies"
    if "nccl" in n:
        return "communication (NCCL)"
    if "megapeer::" in n or "peer_grouped" in n or "peer_gather_sum" in n:
        return "PEER kernels"
    if any(s in n for s in ("flash", "fmha", "sdpa", "attention", "attn")):
        return "attention"
    if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "gemv",
                            "splitk")):
        return "GEMM"
    if any(s in n for s in ("multi_tensor", "adam", "foreach")):
        return "optimizer"
    return "elementwise / norms / other"


def _union(intervals):
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync", "cudaStreamWaitEvent")
MIN_GAP_US = 10.0


def _op_tree(ev):
    """Per (pid, tid): CPU operators sorted by start, with each one's parent index."""
    by_thread = {}
    for e in ev:
        if e.get("cat") in ("cpu_op", "user_annotation") and e.get("name") != STEP:
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(
                (e["ts"], e["ts"] + e["dur"], e["name"]))
    trees = {}
    for key, ops in by_thread.items():
        ops.sort(key=lambda o: (o[0], -o[1]))
        parent, stack = [], []
        for i, (a, b, _) in enumerate(ops):
            while stack and ops[stack[-1]][1] < b:
                stack.pop()
            parent.append(stack[-1] if stack else -1)
            stack.append(i)
        trees[key] = (ops, [o[0] for o in ops], parent)
    return trees


def _chain(trees, pid, tid, ts):
    """Names of the CPU operators around time ts on a thread, outermost first."""
    tree = trees.get((pid, tid))
    if tree is None:
        return []
    ops, starts, parent = tree
    i = bisect.bisect_right(starts, ts) - 1
    while i >= 0 and ops[i][1] < ts:
        i = parent[i]
    names = []
    while i >= 0:
        names.append(ops[i][2])
        i = parent[i]
    return names[::-1]


def _cause(chain):
    if not chain:
        return "no CPU operator around the launch"
    if len(chain) <= 3:
        return " > ".join(chain)
    return " > ".join(chain[:2]) + " > ... > " + chain[-1]


def idle_causes(ev, kernels, lo, hi, launch, top=10):
    """Idle gaps (>= MIN_GAP_US) between the GPU's busy intervals in [lo, hi], summed by
    cause: 'host: <ops>' when the kernel ending the gap was launched after the gap began
    (the GPU waited for the host; '<sync> then' when a synchronising call ended inside
    the gap), 'device: launched before the gap' otherwise. Returns [(cause, us, gaps)]."""
    trees = _op_tree(ev)
    syncs = sorted((e["ts"] + e["dur"], e["name"]) for e in ev
                   if e.get("cat") == "cuda_runtime" and e.get("name") in SYNC_CALLS)
    sync_ends = [t for t, _ in syncs]
    iv = sorted(((e["ts"], e["ts"] + e["dur"], e) for e in kernels), key=lambda k: k[:2])
    total = {}
    end = lo
    for a, b, e in iv:
        if a - end >= MIN_GAP_US:
            gap = (end, min(a, hi))
            src = launch.get(e.get("args", {}).get("correlation"))
            if src is None or src[2] < gap[0]:
                cause = "device: launched before the gap"
            else:
                cause = "host: " + _cause(_chain(trees, src[0], src[1], src[2]))
                j = bisect.bisect_right(sync_ends, src[2]) - 1
                if j >= 0 and sync_ends[j] >= gap[0]:
                    cause = f"{syncs[j][1]} then " + cause
            t = total.setdefault(cause, [0.0, 0])
            t[0] += gap[1] - gap[0]
            t[1] += 1
        end = max(end, b)
    return sorted(((c, us, n) for c, (us, n) in total.items()), key=lambda r: -r[1])[:top]


def summarize_trace(trace):
    """Summary of a Chrome trace (dict) of profiled steps; times in ms per step."""
    ev = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    ev = [e for e in ev if e.get("ph") == "X" and "dur" in e]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in ev
             if e.get("name") == STEP and e.get("cat") in ("user_annotation", "cpu_op")]
    if not steps:
        raise ValueError(f"no '{STEP}' spans in the trace: nothing to summarise")
    lo, hi = min(a for a, _ in steps), max(b for _, b in steps)
    n = len(steps)
    wall = _union(steps)
    kernels = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
               and lo <= e["ts"] + e["dur"] / 2 <= hi]
    # A kernel is inside a label when the CPU call that launched it (same correlation id)
    # ran inside the label's CPU span on the same thread.
    launch = {e["args"]["correlation"]: (e.get("pid"), e.get("tid"), e["ts"]) for e in ev
              if e.get("cat") in ("cuda_runtime", "cuda_driver")
              and "correlation" in e.get("args", {})}
    spans = {lab: {} for lab in LABELS}
    for e in ev:
        if e.get("cat") == "user_annotation" and e.get("name") in spans:
            spans[e["name"]].setdefault((e.get("pid"), e.get("tid")), []).append(
                (e["ts"], e["ts"] + e["dur"]))
    cats = dict.fromkeys(CATEGORIES, 0.0)
    labels = dict.fromkeys(LABELS, 0.0)
    label_kernels = {lab: [] for lab in LABELS}
    per_name = {}
    for e in kernels:
        c = kernel_category(e["name"], e["cat"])
        cats[c] += e["dur"]
        k = per_name.setdefault(e["name"], [c, 0.0, 0])
        k[1] += e["dur"]
        k[2] += 1
        src = launch.get(e.get("args", {}).get("correlation"))
        if src is None:
            continue
        for lab, by_thread in spans.items():
            if any(a <= src[2] <= b for a, b in by_thread.get(src[:2], ())):
                labels[lab] += e["dur"]
                label_kernels[lab].append((src[2], e["name"], e["dur"]))
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    ms = 1e-3 / n
    causes = idle_causes(ev, kernels, lo, hi, launch)
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:15]
    return {"steps": n, "wall_ms": wall * ms, "busy_ms": busy * ms,
            "idle_ms": max(wall - busy, 0.0) * ms,
            "categories_ms": {c: v * ms for c, v in cats.items()},
            "labels_ms": {lab: v * ms for lab, v in labels.items()},
            # each label's kernels in CPU launch order, [name, us]: comm_without_waiting
            "label_kernels": {lab: [[k, d] for _, k, d in sorted(v)]
                              for lab, v in label_kernels.items()},
            "top_kernels": [{"name": k, "category": c, "ms": t * ms, "calls": cnt / n}
                            for k, (c, t, cnt) in top],
            "idle_causes": [{"cause": c, "ms": us * ms, "gaps": g / n} for c, us, g in causes],
            "device_kernels": len(kernels)}


def comm_without_waiting(summaries, label):
    """ms per step of `label`'s kernels with the waiting taken out, from the summaries of
    the ranks of a run, which issue the same collectives in the same order (None where
    their kernel lists differ). With several groups (TP x EP) a lower estimate.

    A collective's kernel starts when its rank arrives and ends when all have, so the
    kernel of the last rank to arrive lasts about the transfer alone: per kernel, the
    shortest duration over the ranks."""
    lists = [s["label_kernels"][label] for s in summaries]
    if len({tuple(k for k, _ in ks) for ks in lists}) != 1:
        return None
    return sum(min(d) for d in zip(*([d for _, d in ks] for ks in lists))) * 1e-3 \
        / summaries[0]["steps"]


def format_summary(s, title=""):
    """A plain-text table of a summary from summarize_trace."""
    w = s["wall_ms"] or 1.0
    lines = [f"{title}{' ' if title else ''}{s['steps']} step(s), {s['wall_ms']:.1f} ms/step wall, "
             f"GPU busy {s['busy_ms']:.1f} ms ({100 * s['busy_ms'] / w:.0f}%)"]
    if not s["device_kernels"]:
        lines.append("no GPU kernels recorded (CPU run): see the trace for CPU operators")
        return "\n".join(lines)
    lines.append(f"{'category':30s} {'ms/step':>9s} {'% of step':>9s}")
    rows = sorted(s["categories_ms"].items(), key=lambda kv: -kv[1])
    rows.append(("idle (no kernel running)", s["idle_ms"]))
    for c, v in rows:
        lines.append(f"{c:30s} {v:9.2f} {100 * v / w:8.1f}%")
    for lab, v in s["labels_ms"].items():
        if v:
            lines.append(f"  inside '{lab}' spans{'':10s} {v:9.2f} {100 * v / w:8.1f}%")
    if s.get("idle_causes"):
        lines.append(f"idle gaps >= {MIN_GAP_US:.0f} us by what the GPU waited for:")
        for c in s["idle_causes"]:
            lines.append(f"  {c['ms']:8.2f} ms {c['gaps']:6.1f}x  {c['cause'][:110]}")
    lines.append("top kernels:")
    for k in s["top_kernels"][:10]:
        lines.append(f"  {k['ms']:8.2f} ms {k['calls']:6.1f}x  {k['category']:.14s}  "
                     f"{k['name'][:90]}")
    return "\n".join(lines)


class StepProfiler:
    """Profile steps first..last (1-based, inclusive) of a loop; no-op when steps is None.

    Call `step(it)` as a context manager around each step; the trace and summary are
    written to out_dir after step `last`.
    """

    def __init__(self, steps, out_dir, rank=0, title=""):
        self.first, self.last = (steps or (0, -1))
        self.out_dir, self.rank, self.title = out_dir, rank, title
        self.prof = None
        self.summary = None

    def step(self, it):
        if self.prof is None and it == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        return _StepSpan(self, it)

    def _end_step(self, it):
        if self.prof is None or it != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        trace = os.path.join(self.out_dir, f"trace_rank{self.rank}.json")
        self.prof.export_chrome_trace(trace + ".tmp")
        os.replace(trace + ".tmp", trace)
        self.prof = None
        with open(trace) as f:
            self.summary = summarize_trace(json.load(f))
        base = os.path.join(self.out_dir, f"summary_rank{self.rank}")
        with open(base + ".json", "w") as f:
            json.dump(self.summary, f, indent=1)
        text = format_summary(self.summary, self.title)
        with open(base + ".txt", "w") as f:
            f.write(text + "\n")
        if self.rank == 0:
            log.info("profile of steps %d-%d (trace %s):\n%s", self.first, self.last, trace, text)


class _StepSpan:
    def __init__(self, owner, it):
        self.owner, self.it = owner, it
        self.rf = torch.profiler.record_function(STEP) if owner.prof is not None else None

    def __enter__(self):
        if self.rf is not None:
            self.rf.__enter__()
        return self

    def __exit__(self, *exc):
        if self.rf is not None:
            self.rf.__exit__(*exc)
        if exc[0] is None:
            self.owner._end_step(self.it)
        return False
