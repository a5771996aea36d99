"""DDP's gradient-accumulation add (main_grad fp32 += grad bf16) on a GPU: torch's add_
against ops/grad_add.py's Triton kernel, next to a device-to-device copy of the same bytes.

Sizes: a PEER table of the 1.3B `mla_peer_wider` (65536 x 2048), a dense MLP weight of the
1.3B model (5632 x 2048) and a norm weight (2048). Prints ms (triton.testing.do_bench,
median), GB/s at 10 bytes per element (read 4 + 2, write 4) and the copy's GB/s; checks
that both adds give the same bits.

  python3 bench/grad_add.py [--json out.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {"peer_table": 65536 * 2048, "mlp_weight": 5632 * 2048, "norm": 2048}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import triton

    from megapeer.ops import grad_add
    dev = "cuda"
    card = torch.cuda.get_device_name()
    rows = []
    for name, n in SIZES.items():
        acc = torch.randn(n, device=dev)
        g = torch.randn(n, device=dev).to(torch.bfloat16)
        src = torch.empty(n * 10 // 2, dtype=torch.bfloat16, device=dev)   # 10 bytes per element
        dst = torch.empty_like(src)
        want = acc.clone().add_(g)
        got = grad_add.add_(acc.clone(), g)
        assert torch.equal(got, want), name
        t_torch = triton.testing.do_bench(lambda: acc.add_(g), return_mode="median")
        t_triton = triton.testing.do_bench(lambda: grad_add.add_(acc, g), return_mode="median")
        t_copy = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        gbs = lambda t: n * 10 / t / 1e6   # noqa: E731
        r = {"card": card, "size": name, "elements": n, "torch_ms": t_torch,
             "triton_ms": t_triton, "torch_GBs": gbs(t_torch), "triton_GBs": gbs(t_triton),
             "copy_GBs": 2 * src.numel() * 2 / t_copy / 1e6, "speedup": t_torch / t_triton}
        rows.append(r)
        print(f"{card} {name:10s} n={n:>11,d} torch {t_torch:.4f} ms ({r['torch_GBs']:.0f} GB/s) "
              f"triton {t_triton:.4f} ms ({r['triton_GBs']:.0f} GB/s) copy {r['copy_GBs']:.0f} GB/s "
              f"x{r['speedup']:.2f}", flush=True)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
