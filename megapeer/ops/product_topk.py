"""Product-key top-k for PEER retrieval, as one Triton kernel.

PEER scores two sets of sub-keys per (token, head) row, s0 [R, n0] and s1 [R, n1]. The
product key (a, b) scores s0[a] + s1[b]; retrieval keeps the top-ck sub-keys of each set,
forms the ck*ck sums (fp32) and returns the top-k pairs (i0, i1), both int64 [R, k], sorted
by descending sum. In torch that is three topk calls plus gathers, ~14 ms of short kernels
per H200 training step; here it is one launch.

Ties go to the lower index, at both stages (sub-key index; then the candidate's position
a * ck + b in the two sorted top-ck lists); -0.0 equals +0.0 and NaN ranks as -inf.
product_topk_ref states this with stable sorts; the kernel matches it exactly.

The kernel: one program per BLOCK_R rows. Each fp32 score becomes an int32 whose signed
order is the float order, packed as (ordered << 32) | low into an int64 key, so one
descending bitonic top-m orders by score, then by low: the complemented index (lower index
first) in stage 1; in stage 2 the complemented position a * CKP + b with both sub-key
indices below it (2 log2(CKP) + log2(n0p) + log2(n1p) <= 32 bits). Rows are padded to
powers of two with the lowest int64. Stage 1 takes the top CKP (ck rounded up) of each
padded row of s0 and s1; stage 2 the top k of the candidate sums, over the CKP x CKP grid
or, for small k, over two strips (a < SP or b < SP, SP = pow2(isqrt(k))) that hold every
pair that can make the top k. The top-m is Triton's tl.topk algorithm (sort runs of m, then
halve by elementwise max of run pairs and re-merge), written out here on a [2] * D hypercube
with a compare-and-swap that the Triton interpreter runs in numpy; its output is the m
largest keys in order, so no slicing is needed.

product_topk runs the kernel on CUDA tensors (or on CPU ones under TRITON_INTERPRET=1, how
the tests run it without a GPU) and the reference otherwise, or where the sizes do not fit
the packing or a program's tile (see _config). Tests: tests/test_product_topk.py; timings:
bench/product_topk.py.
"""
import math

import torch

# available(): Triton imports (uses_kernel checks the tensors' device)
from .triton_util import importable as available, interpret, lazy_kernel

MAX_ROW = 4096     # longest row one program sorts (padded n, or the stage-2 candidates)
# Block sizes (_config), from an ad-hoc H200 sweep of the kernel alone at bf16 (2026-11-29,
# not a benchmark script; docs/benchmarks.md "PEER retrieval's top-k"), median ms:
#   rows x n, ck = k     BLOCK_R, warps: ms (others tried)
#   32768 x 16, 8        64, 4: 0.094  (32, 4: 0.117; 64, 2: 0.109; 128, 2: 0.083)
#   65536 x 64, 32        2, 4: 0.716  (4, 4: 0.707; 2, 1: 0.708; 8, 1: 7.6)
#   131072 x 256, 16      4, 4: 2.25   (2, 4: 2.35; 8, 4: 3.57; 4, 1: 21.9; 16, 4: 26.7)
#   16384 x 1024, 16      1, 1: 0.667  (1, 4: 1.24; 1, 8: 1.23; 2, 2: 1.26; 4, 4: 13.5)
# Some (larger BLOCK_R, 1 warp at BLOCK_R > 1) are ~10x slower: untried sizes may be too.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

tl = LOWEST = None   # set by _build: the jit functions read them as globals


def _pow2(n):
    """Next power of two >= n, at least 2 (Triton's sort needs a dimension of >= 2)."""
    return max(2, 1 << (int(n) - 1).bit_length())


def _log2(n):
    return n.bit_length() - 1


def _build(triton, tl):
    # the jit functions find each other (and tl, LOWEST) among the module's globals
    globals().update(tl=tl, LOWEST=tl.constexpr(-(1 << 63)))

    @triton.jit
    def _pack(x, low, mask):
        # fp32 -> int32 with the float's order (-0 -> +0, NaN -> -inf), then
        # (ordered << 32) | low as int64; masked entries the lowest int64
        b = x.to(tl.int32, bitcast=True)
        b = tl.where(b == -2147483648, 0, b)
        b = tl.where((b & 0x7FFFFFFF) > 0x7F800000, -8388608, b)      # -inf's bits
        o = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        return tl.where(mask, (o.to(tl.int64) << 32) | low, LOWEST)

    @triton.jit
    def _score(key):
        o = (key >> 32).to(tl.int32)
        return tl.where(o >= 0, o, o ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def _first(x, BR: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
        # columns [0, M) of a [BR, N] tensor (Triton has no slicing)
        x3 = tl.reshape(x, (BR, N // M, M))
        j = tl.arange(0, N // M)[None, :, None]
        return tl.max(tl.where(j == 0, x3, LOWEST), axis=1)

    # Bitonic top-m of int64 keys (Triton's tl.topk algorithm on a [2] * D hypercube), with
    # a compare-and-swap that finds each partner as (pair sum - self): the interpreter
    # runs tl.sum in numpy but tl.sort's xor reduction element by element in Python.
    @triton.jit
    def _ind(D: tl.constexpr, j: tl.constexpr):
        return tl.reshape(tl.arange(0, 2), [1] * (D - j - 1) + [2] + [1] * j)

    @triton.jit
    def _merge(h, stage: tl.constexpr, order: tl.constexpr, D: tl.constexpr):
        # order 1: descending, 2: alternating by the bit `stage` (bitonic runs)
        if order == 2:
            flip = _ind(D, stage)
        else:
            flip = order
        for s in tl.static_range(stage):        # pairs along axis D - stage + s
            y = tl.sum(h, axis=D - stage + s, keep_dims=True) - h     # partner (wraps)
            h = tl.where((h > y) != (flip ^ _ind(D, stage - 1 - s)).to(tl.int1), y, h)
        return h

    @triton.jit
    def _topm(x, BR: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
              LOGN: tl.constexpr, LOGM: tl.constexpr, D: tl.constexpr):
        # x [BR, N] -> its M largest per row, sorted descending; D = log2(BR * N)
        h = tl.reshape(x, [2] * D)
        for i in tl.static_range(1, LOGM + 1):          # sort runs of M
            h = _merge(h, i, 2 if i < LOGN else 1, D)
        for i in tl.static_range(LOGM + 1, LOGN + 1):   # halve: max of run pairs, merge
            h = tl.max(h, axis=D - i)
            h = _merge(h, LOGM, 2 if i < LOGN else 1, D - i + LOGM)
        return tl.reshape(h, (BR, M))

    @triton.jit
    def _top(ptr, rows, rmask, n, sr, sc, BR: tl.constexpr, NP: tl.constexpr,
             CKP: tl.constexpr, LOGB: tl.constexpr, LOGN: tl.constexpr, LOGC: tl.constexpr):
        # keys of the top CKP of BR rows of length n, sorted descending: [BR, CKP]
        c = tl.arange(0, NP)
        m = rmask[:, None] & (c[None, :] < n)
        x = tl.load(ptr + rows[:, None] * sr + c.to(tl.int64)[None, :] * sc, mask=m,
                    other=0.0)
        low = (NP - 1 - c).to(tl.int64)[None, :]         # lower index sorts first
        return _topm(_pack(x.to(tl.float32), low, m), BR, NP, CKP, LOGN, LOGC, LOGB + LOGN)

    @triton.jit
    def _pairs(ka, kb, a0, ck, BR: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
               NP0: tl.constexpr, NP1: tl.constexpr, CKP: tl.constexpr,
               IB0: tl.constexpr, IB1: tl.constexpr):
        # keys [BR, A * B] of the candidates (a, b), a0 <= a < ck, b < ck, from the sorted
        # stage-1 keys ka [BR, A], kb [BR, B]; low bits: CKP * CKP - 1 - (a * CKP + b)
        # (ties: lower a * ck + b first), then i0 and i1
        a = tl.arange(0, A)[:, None]
        b = tl.arange(0, B)[None, :]
        ok = (a >= a0) & (a < ck) & (b < ck)
        ia = (NP0 - 1) - (ka & (NP0 - 1))
        ib = (NP1 - 1) - (kb & (NP1 - 1))
        low = (((CKP * CKP - 1 - (a * CKP + b)).to(tl.int64) << (IB0 + IB1))[None, :, :]
               | (ia[:, :, None] << IB1) | ib[:, None, :])
        key = _pack(_score(ka)[:, :, None] + _score(kb)[:, None, :], low, ok[None, :, :])
        return tl.reshape(key, (BR, A * B))

    @triton.jit
    def product_topk_kernel(s0, s1, o0, o1, R, n0, n1, ck, k, s0r, s0c, s1r, s1c,
                            BR: tl.constexpr, NP0: tl.constexpr, NP1: tl.constexpr,
                            CKP: tl.constexpr, SP: tl.constexpr, KP: tl.constexpr,
                            LOGB: tl.constexpr, IB0: tl.constexpr, IB1: tl.constexpr,
                            LOGC: tl.constexpr, LOGG: tl.constexpr, LOGK: tl.constexpr):
        # BR = 2**LOGB rows; NP0 = 2**IB0, NP1 = 2**IB1 (padded n); CKP = 2**LOGC;
        # KP = 2**LOGK; the stage-2 grid has 2**LOGG candidates
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        rmask = rows < R
        ka = _top(s0, rows, rmask, n0, s0r, s0c, BR, NP0, CKP, LOGB, IB0, LOGC)
        kb = _top(s1, rows, rmask, n1, s1r, s1c, BR, NP1, CKP, LOGB, IB1, LOGC)
        if SP == CKP:       # all ck x ck candidates
            key = _pairs(ka, kb, 0, ck, BR, CKP, CKP, NP0, NP1, CKP, IB0, IB1)
        else:
            # a member (a, b) of the top k has (a + 1)(b + 1) <= k (the pairs (a' <= a,
            # b' <= b) all rank above it: sums are monotone with NaN as -inf), so
            # min(a, b) < SP: two strips suffice, a < SP (any b) and b < SP (a >= SP)
            ks = _pairs(_first(ka, BR, CKP, SP), kb, 0, ck, BR, SP, CKP, NP0, NP1, CKP,
                        IB0, IB1)
            kt = _pairs(ka, _first(kb, BR, CKP, SP), SP, ck, BR, CKP, SP, NP0, NP1, CKP,
                        IB0, IB1)
            key = tl.reshape(tl.join(ks, kt), (BR, 2 * SP * CKP))
        key = _topm(key, BR, 2 ** LOGG, KP, LOGG, LOGK, LOGB + LOGG)        # [BR, KP]
        j = tl.arange(0, KP)
        out = rows[:, None] * k + j[None, :]
        sm = rmask[:, None] & (j[None, :] < k)
        tl.store(o0 + out, (key >> IB1) & (NP0 - 1), mask=sm)
        tl.store(o1 + out, key & (NP1 - 1), mask=sm)

    globals().update(_pack=_pack, _score=_score, _first=_first, _ind=_ind, _merge=_merge,
                     _topm=_topm, _top=_top, _pairs=_pairs)
    return product_topk_kernel


_k = lazy_kernel(_build)


def _check(s0, s1, ck, k):
    for name, s in (("s0", s0), ("s1", s1)):
        if not isinstance(s, torch.Tensor) or s.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [R, n], got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s)}")
        if not s.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {s.dtype}")
    if s0.shape[0] != s1.shape[0]:
        raise ValueError(f"s0 and s1 must have the same number of rows R, got "
                         f"{s0.shape[0]} and {s1.shape[0]}")
    if s0.device != s1.device:
        raise ValueError(f"s0 and s1 must be on one device, got {s0.device} and {s1.device}")
    n = min(s0.shape[1], s1.shape[1])
    if isinstance(ck, bool) or not isinstance(ck, int) or not 1 <= ck <= n:
        raise ValueError(f"ck must be an int in [1, min(n0, n1) = {n}], got {ck!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ck * ck:
        raise ValueError(f"k must be an int in [1, ck * ck = {ck * ck}], got {k!r}")


def _config(n0, n1, ck, k):
    """Block sizes for these sizes, or None where the kernel does not take them.

    Stage 2 sorts the CKP x CKP candidates, or, where k is small enough for two strips
    SP wide (SP = pow2(isqrt(k)) < CKP / 2), the 2 * SP * CKP candidates in them. The low 32
    bits of its keys hold the position and both indices, so 2 log2(CKP) + log2(NP0) +
    log2(NP1) <= 32 (n0 = n1 = 1024 with ck <= 64; n = 4096 with ck <= 16), and no row
    sorted in one program may exceed MAX_ROW keys (registers); the reference serves the rest.
    """
    np0, np1, ckp, kp = _pow2(n0), _pow2(n1), _pow2(ck), _pow2(k)
    sp = _pow2(math.isqrt(k))
    sp = ckp if 2 * sp >= ckp else sp
    grid = ckp * ckp if sp == ckp else 2 * sp * ckp
    row = max(np0, np1, grid)
    if 2 * _log2(ckp) + _log2(np0) + _log2(np1) > 32 or row > MAX_ROW or kp > grid:
        return None
    br = max(1, (2048 if row <= 64 else 1024) // row)      # rows per program (see above)
    return dict(BR=br, NP0=np0, NP1=np1, CKP=ckp, SP=sp, KP=kp, LOGB=_log2(br),
                IB0=_log2(np0), IB1=_log2(np1), LOGC=_log2(ckp), LOGG=_log2(grid),
                LOGK=_log2(kp), num_warps=4 if br > 1 else max(1, row // 1024))


def _kernel_config(s0, s1, ck, k):
    """The kernel's block sizes for these (valid) inputs, or None where the reference runs."""
    if (s0.dtype in KERNEL_DTYPES and s1.dtype in KERNEL_DTYPES
            and (s0.is_cuda or interpret()) and available()):
        return _config(s0.shape[1], s1.shape[1], ck, k)
    return None


def uses_kernel(s0, s1, ck, k) -> bool:
    """Whether product_topk runs the Triton kernel for these (valid) inputs."""
    return _kernel_config(s0, s1, ck, k) is not None


def _clean(x):
    return x.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def product_topk_ref(s0, s1, ck, k):
    """Reference (any device): (i0, i1) int64 [R, k] of the top-k sums s0[i0] + s1[i1]
    among the top-ck of each side, sorted by descending fp32 sum; ties: lower index first."""
    _check(s0, s1, ck, k)
    # stable sorts define the tie order (torch.topk's is unspecified); NaN ranks as -inf
    v0, i0 = _clean(s0.float()).sort(dim=-1, descending=True, stable=True)
    v1, i1 = _clean(s1.float()).sort(dim=-1, descending=True, stable=True)
    v0, i0, v1, i1 = v0[:, :ck], i0[:, :ck], v1[:, :ck], i1[:, :ck]
    comb = _clean(v0[:, :, None] + v1[:, None, :]).flatten(1)
    pos = comb.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return i0.gather(-1, pos // ck), i1.gather(-1, pos % ck)


def product_topk(s0, s1, ck, k):
    """product_topk_ref's result, from one Triton kernel where it runs (see uses_kernel).

    Needs no host-GPU synchronisation; s0, s1 may be strided views.
    """
    _check(s0, s1, ck, k)
    cfg = _kernel_config(s0, s1, ck, k)
    if cfg is None:
        return product_topk_ref(s0, s1, ck, k)
    R, n0 = s0.shape
    n1 = s1.shape[1]
    i0 = torch.empty((R, k), dtype=torch.int64, device=s0.device)
    i1 = torch.empty((R, k), dtype=torch.int64, device=s0.device)
    if R == 0:
        return i0, i1
    triton, kernel = _k()
    kernel[(triton.cdiv(R, cfg["BR"]),)](
        s0, s1, i0, i1, R, n0, n1, ck, k, s0.stride(0), s0.stride(1), s1.stride(0), s1.stride(1),
        **cfg)
    return i0, i1


# As a custom op, so that torch.compile keeps it as one opaque call in a layer's graph.
@torch.library.custom_op("megapeer::product_topk", mutates_args=())
def _product_topk_op(s0: torch.Tensor, s1: torch.Tensor, ck: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return product_topk(s0, s1, ck, k)


@_product_topk_op.register_fake
def _(s0, s1, ck, k):
    _check(s0, s1, ck, k)
    return (s0.new_empty((s0.shape[0], k), dtype=torch.int64),
            s0.new_empty((s0.shape[0], k), dtype=torch.int64))
