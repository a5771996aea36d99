"""PEER's expert step as a tensor-parallel rank runs it (x's column slice, half-width
tables), compiled with torch.compile against eager, forward and backward, on one GPU.

A check for the compiled TP2 hang on GPUs (docs/benchmarks.md): whether the fused ops on
a strided slice misbehave inside inductor's graphs without any collective. Each case runs
in a child process with a time limit, so a hang is reported instead of waited on.

    python3 bench/compile_tp_slice.py [--kernel fused] [--limit 120]
"""
import argparse
import multiprocessing as mp
import time


def case(kernel, compiled, out):
    import torch
    from megapeer.ops.dispatch import gather_axpy, gather_dot
    torch.manual_seed(0)
    T, d, n, h, k = 4096, 768, 128 * 128, 8, 16
    lo, dl = d // 2, d // 2                       # rank 1 of TP2
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    U = (torch.randn(n, dl, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
    V = (torch.randn(n, dl, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
    idx = torch.randint(0, n, (T, h, k), device="cuda")
    gates = torch.softmax(torch.randn(T, h, k, device="cuda"), -1).to(torch.bfloat16)

    def step(x):
        xs = x * 1.0                               # copy_to_tensor_model_parallel_region
        s = gather_dot(xs[:, lo:lo + dl], idx, U, 1, kernel)
        w = torch.nn.functional.gelu(s) * gates.unsqueeze(-1)
        return gather_axpy(w * 1.0, idx, V, 1, kernel)

    f = torch.compile(step) if compiled else step
    t0 = time.time()
    for _ in range(3):
        for p in (x, U, V):
            p.grad = None
        o = f(x)
        o.float().square().sum().backward()
    torch.cuda.synchronize()
    out.put((float(o.float().abs().sum()), float(x.grad.float().abs().sum()),
             float(U.grad.float().abs().sum()), float(V.grad.float().abs().sum()),
             time.time() - t0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="fused")
    ap.add_argument("--limit", type=float, default=120)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    res = {}
    for compiled in (False, True):
        q = ctx.Queue()
        p = ctx.Process(target=case, args=(a.kernel, compiled, q))
        p.start()
        p.join(a.limit)
        name = "compiled" if compiled else "eager"
        if p.is_alive():
            p.kill()
            print(f"{name}: did not finish in {a.limit:.0f} s (hang)", flush=True)
            continue
        if p.exitcode != 0:
            print(f"{name}: failed (exit {p.exitcode})", flush=True)
            continue
        res[name] = q.get()
        print(f"{name}: |out| {res[name][0]:.6g} |dx| {res[name][1]:.6g} |dU| {res[name][2]:.6g} "
              f"|dV| {res[name][3]:.6g} in {res[name][4]:.1f} s", flush=True)
    if len(res) == 2:
        rel = max(abs(a - b) / max(abs(b), 1e-30)
                  for a, b in zip(res["compiled"][:4], res["eager"][:4]))
        print(f"largest relative difference of the sums, compiled vs eager: {rel:.2e}")


if __name__ == "__main__":
    main()
