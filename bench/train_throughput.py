"""Training-step throughput: tokens/s, model TFLOP/s and MFU per model variant.

Full steps (forward, backward, optimizer) through the same code the trainer uses,
on random token ids (throughput does not depend on the text). MFU is measured
against the bf16 matmul rate of this device, measured in the same run. Step time: the
median over --steps steps timed with CUDA events, the host waiting for the GPU only where
the step does (as in the trainer); "synced ms": the same steps with the loss read back
after each (the method of the figures before 2026-11-29).

  python bench/train_throughput.py                 # GPU: ~1B dense MLA, MLA+PEER, baseline
  python bench/train_throughput.py --size 100m     # ~100M MLA+PEER, seq 2048 (foundation)
  python bench/train_throughput.py --size tiny     # CPU smoke run of the same code
Variants:
  megatron_local  Megatron-Core's local spec, standard attention (the baseline)
  mla_dense       megapeer MLA + dense SwiGLU (SDPA core attention)
  mla_peer        megapeer MLA, every other MLP replaced by PEER of equal active FLOPs
  mla_peer_wide   the same with 4x wider experts, 4x fewer retrieved per token (the same
                  expert FLOPs and table size; retrieval is cheaper: 9.33 against 9.64
                  GFLOP/token at 1b): 4x fewer (token, expert) pairs, which is what the
                  grouped kernels' cost follows (their axpy does one atomic row per pair)
  mla_peer_wider  16x wider experts than mla_peer, 16x fewer retrieved per token (at 1b:
                  256 experts of width 256, 32 per token; close to a fine-grained MoE)
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPU_1B = ["model.num_layers=24", "model.hidden_size=2048", "model.num_attention_heads=16",
          "model.ffn_hidden_size=5632", "model.vocab_size=32000", "model.seq_length=4096",
          "model.mla.q_lora_rank=1536", "model.mla.kv_lora_rank=512",
          "model.mla.qk_head_dim=128", "model.mla.qk_pos_emb_head_dim=64",
          "model.mla.v_head_dim=128", "training.micro_batch_size=1",
          "training.global_batch_size=4", "training.precision=bf16"]
# PEER layers with h*k*m = 16*32*16 = 8192 ~ 1.5 * ffn: the same active FLOPs as SwiGLU
GPU_PEER = ["model.layer_pattern=DP", "model.peer.num_experts=[64,64]",
            "model.peer.expert_hidden=16", "model.peer.heads=16", "model.peer.topk=32",
            "model.peer.key_dim=256"]
# ~100M MLA+PEER and the 134M dense baseline of the foundation issue: seq 2048, mb 8
GPU_100M = ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12",
            "model.ffn_hidden_size=2048", "model.vocab_size=32000", "model.seq_length=2048",
            "model.mla.q_lora_rank=null", "model.mla.kv_lora_rank=256",
            "model.mla.qk_head_dim=64", "model.mla.qk_pos_emb_head_dim=32",
            "model.mla.v_head_dim=64", "training.micro_batch_size=8",
            "training.global_batch_size=8", "training.precision=bf16"]
GPU_100M_PEER = ["model.layer_pattern=DP", "model.peer.num_experts=[256,256]",
                 "model.peer.heads=8", "model.peer.topk=16", "model.peer.key_dim=128"]


def _width(sizes, m, h, k):
    return [f"model.peer.num_experts=[{sizes[0]},{sizes[1]}]", f"model.peer.expert_hidden={m}",
            f"model.peer.heads={h}", f"model.peer.topk={k}"]


# wider experts, fewer per token, the same rows per table (appended to *_PEER)
WIDE = {"1b": {"mla_peer_wide": _width([32, 32], 64, 8, 16),
               "mla_peer_wider": _width([16, 16], 256, 4, 8)},
        "100m": {"mla_peer_wide": _width([128, 128], 4, 4, 8),
                 "mla_peer_wider": _width([64, 64], 16, 2, 4)},
        "tiny": {"mla_peer_wide": _width([8, 8], 16, 2, 4),
                 "mla_peer_wider": _width([4, 4], 64, 1, 2)}}
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.ffn_hidden_size=192", "model.vocab_size=512", "model.seq_length=64",
        "training.micro_batch_size=2", "training.global_batch_size=2",
        "training.precision=fp32"]
TINY_PEER = ["model.layer_pattern=DP", "model.peer.num_experts=[16,16]",
             "model.peer.expert_hidden=4", "model.peer.heads=4", "model.peer.topk=8",
             "model.peer.key_dim=32"]


def matmul_tflops(dtype):
    if not torch.cuda.is_available():
        return None
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda",
                                                                      dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2] / 1e12


def _baseline_chunks(cfg, tcfg):
    """Megatron-Core's own local GPT spec: standard attention, same sizes, dense SwiGLU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    m = cfg.model
    base = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=tcfg.activation_func,
        add_bias_linear=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, attention_dropout=0.0,
        hidden_dropout=0.0, params_dtype=tcfg.params_dtype, bf16=tcfg.bf16,
        pipeline_dtype=tcfg.params_dtype, use_cpu_initialization=tcfg.use_cpu_initialization)
    from megapeer.models import padded_vocab_size
    model = GPTModel(config=base, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), vocab_size=padded_vocab_size(m, 1),
        max_sequence_length=m.seq_length, position_embedding_type="rope")
    if torch.cuda.is_available():
        model.cuda()
    return [model], base


def _baseline_flops(cfg):
    m = cfg.model
    d, L, S, V, f = m.hidden_size, m.num_layers, m.seq_length, m.vocab_size, m.ffn_hidden_size
    per_layer = 2 * (4 * d * d) + 2 * 3 * d * f + 2 * 2 * d * (S / 2)
    return 3 * (L * per_layer + 2 * d * V)


def _alloc_counts():
    if not torch.cuda.is_available():
        return {}
    st = torch.cuda.memory_stats()
    return {"cuda_mallocs": st.get("num_device_alloc", 0),
            "alloc_retries": st.get("num_alloc_retries", 0)}


def run_variant(name, overrides, steps, warmup, profile_dir=None, compile_mode=None):
    from megapeer.config import load_config
    from megapeer.models import build_model_chunks, flops_per_token, padded_vocab_size
    from megapeer.models.gpt import param_dtype, transformer_config
    from megapeer.parallel import init_model_parallel
    from megapeer.training.optimizer import build_optimizer, optimizer_step
    from megapeer.training.step import forward_backward, wrap_ddp
    cfg = load_config(overrides=overrides, world_size=1)
    init_model_parallel(cfg.parallel, 1234)
    m, t = cfg.model, cfg.training
    tcfg = transformer_config(m, cfg.parallel, t)
    if name == "megatron_local":
        chunks, tcfg = _baseline_chunks(cfg, tcfg)
        fpt = _baseline_flops(cfg)
    else:
        chunks = build_model_chunks(cfg, tcfg)
        if compile_mode:
            from megapeer.models import compile_layers as compile_all
            compile_all(chunks, compile_mode)
        fpt = flops_per_token(m, vocab_size=padded_vocab_size(m, 1))
    ddp = wrap_ddp(chunks, tcfg, triton_grad_add=t.triton_grad_add)
    opt = build_optimizer(ddp, t, param_dtype(t))
    S, B = m.seq_length, t.micro_batch_size
    n_micro = t.global_batch_size // B
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, m.vocab_size, (B, S + 1), generator=g)
    batch = {"tokens": toks[:, :-1], "labels": toks[:, 1:], "loss_mask": torch.ones(B, S),
             "position_ids": torch.arange(S).expand(B, S)}

    def step():
        for c in ddp:
            c.zero_grad_buffer()
        opt.zero_grad()
        loss = forward_backward(ddp, [iter([batch] * n_micro)], n_micro, S, B)
        optimizer_step(opt, t.clip_grad)
        return loss

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    alloc0 = _alloc_counts()
    if torch.cuda.is_available():
        # As the trainer runs: the host waits for the GPU only where the step itself does
        # (the gradient norm); per-step times from CUDA events between the steps.
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        ev[0].record()
        for i in range(steps):
            loss = step()
            ev[i + 1].record()
        torch.cuda.synchronize()
        times = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(ev, ev[1:]))
    else:
        times = []
    # the same steps with the loss read back after each (how the trainer ran before
    # 2026-11-29, and this benchmark's figures before then)
    synced = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        float(loss)  # forces completion
        synced.append(time.perf_counter() - t0)
    # allocator work during the timed steps (cudaMalloc and retries synchronise the host)
    alloc = {k: v - alloc0[k] for k, v in _alloc_counts().items()}
    synced.sort()
    dt_synced = synced[len(synced) // 2]
    dt = times[len(times) // 2] if times else dt_synced
    summary = None
    if profile_dir:  # two more steps under torch.profiler: where the time goes
        from megapeer.training.profiling import StepProfiler
        sp = StepProfiler((1, 2), os.path.join(profile_dir, name), title=name)
        for i in (1, 2):
            with sp.step(i):
                float(step())
        summary = sp.summary
    tokens = t.global_batch_size * S
    nparams = sum(p.numel() for c in chunks for p in c.parameters())
    res = {"variant": name, "params_M": nparams / 1e6, "step_s": dt, "tokens_per_s": tokens / dt,
           "step_s_synced": dt_synced,
           "flops_per_token_G": fpt / 1e9, "tflops": fpt * tokens / dt / 1e12,
           "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                            if torch.cuda.is_available() else None), "loss": float(loss),
           "profile": summary, **alloc}
    del ddp, chunks, opt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b", choices=["1b", "100m", "tiny"],
                    help="1b: ~1B dense MLA vs PEER at equal active FLOPs, seq 4096; 100m: "
                         "~100M MLA+PEER, seq 2048, mb 8; tiny: CPU smoke run")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="megatron_local,mla_dense,mla_peer")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also profile two steps per variant; traces and summaries in DIR")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile each transformer layer (training.compile; megapeer "
                         "variants); MODE: default or reduce-overhead (CUDA graphs)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every megapeer variant")
    args = ap.parse_args()
    from megapeer.parallel import init_distributed
    init_distributed()
    base, peer = {"1b": (GPU_1B, GPU_PEER), "100m": (GPU_100M, GPU_100M_PEER),
                  "tiny": (TINY, TINY_PEER)}[args.size]
    rate = matmul_tflops(torch.bfloat16)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = []
    for name in args.variants.split(","):
        if name == "mla_peer" or name in WIDE[args.size]:
            ov = base + peer + WIDE[args.size].get(name, [])
        else:
            ov = base + ["model.layer_pattern=D"]
        r = run_variant(name, ov + args.set, args.steps, args.warmup, args.profile,
                        args.compile if name != "megatron_local" else None)
        r["mfu"] = r["tflops"] / rate if rate else None
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        if r["profile"]:
            from megapeer.training.profiling import format_summary
            print(format_summary(r["profile"], name), flush=True)
    print(f"\n{card}, bf16 matmul {rate:.0f} TFLOP/s measured" if rate else f"\n{card}")
    print(f"{'variant':16s} {'params':>9s} {'step ms':>8s} {'tok/s':>9s} {'GFLOP/tok':>9s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s} {'synced ms':>9s}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
        print(f"{r['variant']:16s} {r['params_M']:8.0f}M {1e3 * r['step_s']:8.1f} "
              f"{r['tokens_per_s']:9.0f} {r['flops_per_token_G']:9.2f} {r['tflops']:8.1f} "
              f"{mfu:>6s} {mem:>8s} {1e3 * r['step_s_synced']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "matmul_tflops": rate, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
