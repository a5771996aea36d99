"""Which fused SDPA kernel serves MLA's head dims, and how fast (GPU).

MLA's q/k heads are qk_head_dim + qk_pos_emb_head_dim wide (e.g. 192) and its v heads
v_head_dim (e.g. 128). Times causal attention forward+backward in bf16 for each SDPA
backend, plus flash attention with v zero-padded to the q/k width, and prints which
kernels the default dispatch launched (from the profiler).

  python bench/sdpa_mla.py [--b 4 --h 16 --s 4096 --dqk 192 --dv 128]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--dqk", type=int, default=192)
    ap.add_argument("--dv", type=int, default=128)
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(a.b, a.h, a.s, a.dqk, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(a.b, a.h, a.s, a.dqk, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(a.b, a.h, a.s, a.dv, device=dev, dtype=dt, requires_grad=True)
    go = torch.randn(a.b, a.h, a.s, a.dv, device=dev, dtype=dt)
    flops = 4 * a.b * a.h * a.s * a.s / 2 * (a.dqk + a.dv) / 2 * 3.5  # causal fwd+bwd approx

    def run(pad=False):
        vv = F.pad(v, (0, a.dqk - a.dv)) if pad else v
        o = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
        (o[..., :a.dv] if pad else o).backward(go)

    print(f"{torch.cuda.get_device_name()}  b={a.b} h={a.h} s={a.s} dqk={a.dqk} dv={a.dv}")
    ref = None
    for name, backends, pad in [("default dispatch", None, False),
                                ("flash", [SDPBackend.FLASH_ATTENTION], False),
                                ("flash, v padded", [SDPBackend.FLASH_ATTENTION], True),
                                ("cudnn", [SDPBackend.CUDNN_ATTENTION], False),
                                ("efficient", [SDPBackend.EFFICIENT_ATTENTION], False),
                                ("math", [SDPBackend.MATH], False)]:
        try:
            if backends is None:
                ms = timed(lambda: run(pad))
            else:
                with sdpa_kernel(backends):
                    ms = timed(lambda: run(pad))
            print(f"  {name:18s} {ms:8.2f} ms fwd+bwd  ~{flops / ms / 1e9:6.0f} TFLOP/s")
        except RuntimeError as e:
            print(f"  {name:18s} unavailable: {str(e).splitlines()[0][:90]}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "attention" in e.name.lower() or "fmha" in
             e.name.lower() or "flash" in e.name.lower()}
    print("  default dispatch launched:", sorted(names)[:6])


if __name__ == "__main__":
    main()
