"""Step profiles: kernel categories, idle time and labelled spans from a Chrome trace."""
import pytest

from megapeer.training.profiling import (comm_without_waiting, format_summary, kernel_category,
                                         summarize_trace)


@pytest.mark.parametrize("name,cat,want", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "kernel", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "kernel", "GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128",
     "kernel", "attention"),
    ("void megapeer::walk_kernel<__nv_bfloat16, 8, 2>(megapeer::KArgs<__nv_bfloat16>)",
     "kernel", "PEER kernels"),
    ("peer_grouped_axpy", "kernel", "PEER kernels"),  # the grouped Triton kernels
    ("peer_gather_sum", "kernel", "PEER kernels"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "kernel",
     "communication (NCCL)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "kernel",
     "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "gpu_memcpy", "memory copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu...>", "kernel",
     "elementwise / norms / other"),
])
def test_kernel_category(name, cat, want):
    assert kernel_category(name, cat) == want


def _x(name, cat, ts, dur, **kw):
    return dict(ph="X", name=name, cat=cat, ts=ts, dur=dur, **kw)


def test_summary_of_two_steps():
    ev = [
        # two steps of 100 us each on the CPU timeline, 50 us apart
        _x("megapeer.step", "user_annotation", 0, 100), _x("megapeer.step", "user_annotation",
                                                            150, 100),
        _x("gemm_a", "kernel", 10, 30), _x("gemm_a", "kernel", 160, 30),
        _x("flash_fwd", "kernel", 35, 20),                  # overlaps the GEMM by 5 us
        # NCCL kernels launched (correlation 1 and 2) from thread 7; only the first launch
        # is inside a 'peer.comm' span of that thread (another thread's span does not count)
        _x("ncclDevKernel_AllReduce", "kernel", 60, 10, args={"correlation": 1}),
        _x("ncclDevKernel_AllGather", "kernel", 200, 20, args={"correlation": 2}),
        _x("cudaLaunchKernelExC", "cuda_runtime", 52, 2, pid=1, tid=7, args={"correlation": 1}),
        _x("cuLaunchKernelEx", "cuda_driver", 170, 2, pid=1, tid=7, args={"correlation": 2}),
        _x("peer.comm", "user_annotation", 50, 10, pid=1, tid=7),
        _x("peer.comm", "user_annotation", 165, 10, pid=1, tid=8),
        _x("Memset (Device)", "gpu_memset", 80, 4),
        _x("elementwise_kernel", "kernel", 400, 50),         # outside the steps: ignored
        {"ph": "i", "name": "marker", "ts": 5},
    ]
    s = summarize_trace({"traceEvents": ev})
    assert s["steps"] == 2 and s["device_kernels"] == 6
    assert s["wall_ms"] == pytest.approx(0.1)                 # 200 us / 2 steps
    c = s["categories_ms"]
    assert c["GEMM"] == pytest.approx(0.03) and c["attention"] == pytest.approx(0.01)
    assert c["communication (NCCL)"] == pytest.approx(0.015)
    assert c["memory copies"] == pytest.approx(0.002)
    assert c["elementwise / norms / other"] == 0
    busy = (45 + 10 + 4 + 30 + 20) / 2 / 1e3                  # union: 10..55 is 45 us
    assert s["busy_ms"] == pytest.approx(busy)
    assert s["idle_ms"] == pytest.approx(0.1 - busy)
    assert s["labels_ms"] == pytest.approx({"peer.comm": 0.005, "grad_sync": 0.0})
    assert s["top_kernels"][0]["name"] == "gemm_a" and s["top_kernels"][0]["calls"] == 1
    text = format_summary(s, "test")
    assert "idle (no kernel running)" in text and "inside 'peer.comm' spans" in text


def _rank_trace(gather_us, scatter_us, gpu_order=("AllGather", "ReduceScatter")):
    """One step of one rank: a 'peer.comm' all-gather launched at 10, a reduce-scatter at
    20 (CPU times); the GPU runs them in gpu_order."""
    L = dict(pid=1, tid=7)
    dur = {"AllGather": gather_us, "ReduceScatter": scatter_us}
    corr = {"AllGather": 1, "ReduceScatter": 2}
    ev = [_x("megapeer.step", "user_annotation", 0, 1000),
          _x("peer.comm", "user_annotation", 5, 30, **L),
          _x("cudaLaunchKernel", "cuda_runtime", 10, 1, args={"correlation": 1}, **L),
          _x("cudaLaunchKernel", "cuda_runtime", 20, 1, args={"correlation": 2}, **L)]
    ts = 100
    for k in gpu_order:
        ev.append(_x(f"ncclDevKernel_{k}", "kernel", ts, dur[k],
                     args={"correlation": corr[k]}))
        ts += 200
    return summarize_trace(ev)


def test_comm_without_waiting_takes_each_collective_from_the_last_rank_to_arrive():
    # rank 0 waited 15 us in the all-gather, rank 1 6 us in the reduce-scatter; rank 1's
    # GPU ran its kernels in the other order (another stream): matched by launch order
    r0 = _rank_trace(20, 3)
    r1 = _rank_trace(5, 9, gpu_order=("ReduceScatter", "AllGather"))
    assert r0["labels_ms"]["peer.comm"] == pytest.approx(0.023)
    assert comm_without_waiting([r0, r1], "peer.comm") == pytest.approx(0.008)
    assert comm_without_waiting([r0], "peer.comm") == pytest.approx(0.023)
    assert comm_without_waiting([r0, r1], "grad_sync") == 0
    other = summarize_trace([_x("megapeer.step", "user_annotation", 0, 10)])  # no comm
    assert comm_without_waiting([r0, other], "peer.comm") is None


def test_trace_without_steps_is_an_error():
    with pytest.raises(ValueError, match="megapeer.step"):
        summarize_trace({"traceEvents": [_x("gemm", "kernel", 0, 1)]})


def test_cpu_run_summary_says_so():
    s = summarize_trace([_x("megapeer.step", "user_annotation", 0, 1000),
                         _x("aten::mm", "cpu_op", 10, 100)])
    assert s["device_kernels"] == 0
    assert "no GPU kernels recorded" in format_summary(s)


def test_idle_split_by_what_the_gpu_waited_for():
    L = dict(pid=1, tid=7)
    ev = [
        _x("megapeer.step", "user_annotation", 0, 1000),
        _x("k0", "kernel", 0, 100, args={"correlation": 1}),
        # gap 100..300: k1 launched at 250 inside Optimizer.step > aten::_fused_adam_,
        # after a stream synchronisation that ended at 200 (inside the gap)
        _x("cudaStreamSynchronize", "cuda_runtime", 120, 80, **L),
        _x("Optimizer.step", "cpu_op", 200, 100, **L),
        _x("aten::_fused_adam_", "cpu_op", 240, 20, **L),
        _x("cudaLaunchKernel", "cuda_runtime", 250, 5, args={"correlation": 2}, **L),
        _x("k1", "kernel", 300, 100, args={"correlation": 2}),
        # gap 400..450: k2 was launched at 50, long before: a device-side wait
        _x("cudaLaunchKernel", "cuda_runtime", 50, 5, args={"correlation": 3}, **L),
        _x("k2", "kernel", 450, 100, args={"correlation": 3}),
        # gap 550..555 is under MIN_GAP_US; then 560..900 host-bound in a nested forward
        _x("k3", "kernel", 555, 5, args={"correlation": 4}),
        _x("forward", "cpu_op", 600, 300, **L),
        _x("aten::linear", "cpu_op", 700, 200, **L),
        _x("aten::mm", "cpu_op", 800, 50, **L),
        _x("aten::x", "cpu_op", 810, 30, **L),
        _x("cudaLaunchKernel", "cuda_runtime", 820, 5, args={"correlation": 5}, **L),
        _x("k4", "kernel", 900, 100, args={"correlation": 5}),
    ]
    s = summarize_trace(ev)
    got = {c["cause"]: round(c["ms"] * 1e3) for c in s["idle_causes"]}
    assert got == {"host: forward > aten::linear > ... > aten::x": 340,
                   "cudaStreamSynchronize then host: Optimizer.step > aten::_fused_adam_": 200,
                   "device: launched before the gap": 50}
    assert s["idle_ms"] * 1e3 == pytest.approx(340 + 200 + 50 + 5)
    assert "by what the GPU waited for" in format_summary(s)
