"""Gradient-accumulation fusion of the PEER tables (ops/grad_accum.py, model.peer.grad_accum_fusion).

Op level (tests/workers/grad_accum_check.py, fresh random inputs, fp32 to 1e-5 of the
largest fp64 reference magnitude): on the paths that take an accumulator (reference,
fused) it ends as its start plus the table gradient, the tables get no gradient, rows of
unchosen experts keep their bits, and x / gate gradients are unchanged. On a GPU also
bf16 (fused kernels): the fp32 sums are no further from the fp64 gradient than the
unfused bf16 gradient is (+1e-3). Trainer level: the same per-step losses and gradient norms with and
without the fusion (tiny MLA+PEER, CPU, fp32).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_trains_like_reference


def test_ops_add_table_gradients_to_the_accumulator():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "grad_accum_check.py")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    seen = set()
    for case, by_path in res.items():
        for path, r in by_path.items():
            seen.add(path)
            assert r.pop("table_grads_none") == 1.0, (case, path)
            if path == "fused" and case.endswith("fp32"):
                assert r.pop("compiled_table_grads_none") == 1.0, case
                assert r["compiled_vs_eager"] < 1e-6, (case, r)
            assert r.pop("unused_rows_kept") == 0.0, (case, path)
            if case.endswith("bf16"):
                for t in ("U", "V"):
                    assert r[t] <= r[f"{t}_unfused"] + 1e-3, (case, path, t, r)
                continue
            for name, err in r.items():
                assert err < 1e-5, (case, path, name, err)
    # the fused path: on a CPU its ops' CPU forms; on a GPU only with the extension built
    from megapeer.ops import peer_cuda
    fused = not torch.cuda.is_available() or peer_cuda.available()[0]
    assert seen == ({"reference", "fused"} if fused else {"reference"}), seen


def test_trains_like_the_unfused_accumulation(tmp_path, parity_demo):
    # reference path: RouteGrad + the DDP hook told to skip, against the hook's own add
    assert_trains_like_reference(tmp_path, parity_demo, "reference", base="reference+nofuse")


def test_accumulators_only_for_fused_tables_with_an_fp32_main_grad():
    from megapeer.ops.grad_accum import accumulator, prepare_accumulators
    m = torch.nn.Module()
    m.a, m.b, m.c, m.d = (torch.nn.Parameter(torch.zeros(4, 2)) for _ in range(4))
    m.a.peer_fused_accum = m.b.peer_fused_accum = m.d.peer_fused_accum = True
    buf = torch.zeros(24)                                 # DDP's flat buffer
    m.a.main_grad, m.c.main_grad = buf[:8].view(4, 2), buf[8:16].view(4, 2)
    m.d.main_grad = buf[16:24].view(4, 2).to(torch.bfloat16)   # not fp32: not fused
    m.forward = lambda: None
    assert prepare_accumulators(m) == 1
    assert accumulator(m.a) is None                       # made by the forward pre-hook
    m()
    acc = accumulator(m.a)
    assert accumulator(m.b) is None and accumulator(m.c) is None and accumulator(m.d) is None
    acc.add_(1.0)                                         # the same memory as main_grad
    assert buf[:8].eq(1).all() and buf[8:].eq(0).all()
    v = m.a.main_grad._version
    acc.add_(1.0)
    assert m.a.main_grad._version == v                    # its own version counter
    m()
    acc2 = accumulator(m.a)
    assert acc2 is not acc and acc2.data_ptr() == acc.data_ptr()   # fresh per forward
    v2 = acc2._version
    acc.add_(1.0)
    assert acc2._version == v2                            # micro-batches kept apart
    with torch.no_grad():
        assert accumulator(m.a) is None                   # no backward will run
    compiled = torch.compile(lambda x: x * 2 if accumulator(m.a) is None else x * 3)
    assert compiled(torch.ones(1)).item() == 2            # compiled layers: plain gradients
    assert prepare_accumulators(m, enabled=False) == 0
    m()
    assert accumulator(m.a) is None and len(m._forward_pre_hooks) == 0


def test_no_accumulators_for_tables_of_compiled_layers():
    """Compiled layers take plain gradients, so their tables get no accumulator (nor a
    hook renewing it every micro-batch); eager layers of the same model keep theirs."""
    from megapeer.ops.grad_accum import prepare_accumulators
    m = torch.nn.Module()
    m.eager, m.comp = torch.nn.Module(), torch.nn.Module()
    for sub in (m.eager, m.comp):
        sub.t = torch.nn.Parameter(torch.zeros(4, 2))
        sub.t.peer_fused_accum = True
        sub.t.main_grad = torch.zeros(4, 2)
    m.comp.compile()
    assert prepare_accumulators(m) == 1
    m.eager.compile()
    assert prepare_accumulators(m) == 0 and len(m._forward_pre_hooks) == 0


@pytest.mark.parametrize("flag", ["true", "false"])
def test_config_key(flag):
    from megapeer.config import load_config
    cfg = load_config(os.path.join(ROOT, "examples", "tiny_cpu.yaml"),
                      [f"model.peer.grad_accum_fusion={flag}"])
    assert cfg.model.peer.grad_accum_fusion is (flag == "true")


def test_opcheck_accumulating_ops():
    """Schema (acc declared mutated), fake implementations and autograd registration of the
    fused path's ops with acc, through their CPU implementations."""
    from megapeer.ops import peer_cuda  # noqa: F401  (registers the ops)
    g = torch.Generator().manual_seed(3)
    T, d, n, m = 6, 8, 5, 2
    idx = torch.randint(0, n, (T, 2, 2), generator=g)
    x = torch.randn(T, d, generator=g, requires_grad=True)
    U = torch.randn(n * m, d, generator=g, requires_grad=True)
    w = torch.randn(T, 2, 2, m, generator=g, requires_grad=True)
    acc = torch.zeros(n * m, d)
    torch.library.opcheck(torch.ops.megapeer.expert_scatter_acc, (w.detach(), idx, x.detach(), U.detach(),
                                                                  acc, m, 0, 4))
    torch.library.opcheck(torch.ops.megapeer.gather_dot, (x, idx, U, m, 0, 4, acc))
    torch.library.opcheck(torch.ops.megapeer.gather_axpy, (w, idx, U, m, acc))
