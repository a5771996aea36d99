"""The optimizer step on one large fp32 main parameter with a bf16 model copy, on a GPU.

Times (triton.testing.do_bench, ms) and effective GB/s of:
  torch    torch's fused AdamW (fused=True) on the fp32 parameter, then the fp32 -> bf16
           copy into the model parameter (what Megatron runs without TE / apex)
  triton   ops/adam.py: the same update and the copy in one pass (training.triton_adam)
and a device-to-device copy of the same byte count for scale; checks that both give the
same parameters after one step from the same state (largest difference over the largest
update and over the largest parameter: fp32 roundings, not bitwise).

  python3 bench/adam_copy.py [--numel 134217728] [--json out.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=256 * 256 * 2048,
                    help="elements (default: one 1.3B mla_peer_wider table, 16^2 x 256 x 2048)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.numel < 1:
        ap.error(f"--numel must be >= 1, got {a.numel}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernels are timed there)")
    import triton.testing
    from megapeer.ops import adam
    n = a.numel
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", generator=g)
    grad = torch.randn(n, device="cuda", generator=g)
    model = p.to(torch.bfloat16)
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tp = torch.nn.Parameter(p.clone())
    tp.grad = grad
    opt = torch.optim.AdamW([tp], fused=True, **hp)
    opt.step()    # state made
    st = opt.state[tp]
    m, v, step = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), st["step"].clone()
    q = p.clone()

    def torch_step():
        opt.step()
        model.copy_(tp.detach())

    def triton_step():
        step.add_(1.0)
        adam.adamw_copy_(q, grad, m, v, model, step, hp["lr"], *hp["betas"], hp["eps"],
                         hp["weight_decay"])

    # the same one step from the same state (bias corrections at step 2)
    ref = tp.detach().clone()
    st_m, st_v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    opt.step()
    want = tp.detach().clone()
    tp.data.copy_(ref)
    st["exp_avg"].copy_(st_m)
    st["exp_avg_sq"].copy_(st_v)
    st["step"].fill_(1.0)
    q.copy_(ref)
    m.copy_(st_m)
    v.copy_(st_v)
    step.fill_(1.0)
    triton_step()
    diff = (q - want).abs().max()
    err = float(diff / (want - ref).abs().max())     # in units of the largest update
    err_p = float(diff / want.abs().max())           # relative to the largest parameter
    # a copy reading 15 B and writing 15 B per element of n: the kernel's 30 B in all
    src, dst = torch.empty(n * 15 // 4, device="cuda"), torch.empty(n * 15 // 4, device="cuda")
    rows = []
    for name, fn, nbytes in (("copy (same bytes: 30 B/element)", lambda: dst.copy_(src), 30 * n),
                             ("torch fused AdamW + bf16 copy", torch_step, 34 * n),
                             ("triton AdamW writing the bf16 copy", triton_step, 30 * n)):
        ms = triton.testing.do_bench(fn, warmup=5, rep=50)
        rows.append({"form": name, "ms": round(ms, 3), "GB/s": round(nbytes / ms / 1e6)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"card": torch.cuda.get_device_name(), "numel": n, "rows": rows,
           "max_diff_over_update": err, "max_diff_over_param": err_p}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
