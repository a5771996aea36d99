"""Triton kernels of ops/peer_grouped.py (read that first). Imported only when used.

Each block holds up to BM (token, expert) pairs of one expert, sorted by expert; offsets
are int64. Blocks of expert n_exp (the sentinel: other expert-parallel ranks' pairs) read
nothing: the dot writes their outputs as zeros, the axpy zero rows (or adds nothing),
skipping the work by a branch (the dot; the axpy with SKIP_IF) or by masked loads. m is
padded to MB >= 16 (tensor-core tiles) and masked; wide experts are cut into chunks of
MC <= MB columns (grid axis of the dot and scatter, a loop in the axpy). The axpy and
scatter run on a 1-D grid; with LOCAL the programs that share a block's (axpy) or an
expert's (scatter) gathered rows are consecutive, so those rows are read from memory once
and then from L2 (without it, each d-tile's wave re-reads them all).

hk (pairs per token: heads x top-k) is a compile-time constant, one compile per model: a
pair's token is pair // hk, and a runtime 64-bit division is a subroutine call per row
(sm_90a SASS of the deferred pass's scatter: 12 calls and 1720 instructions -> none and
1504; bench/triton_ptx.py).
"""
import triton
import triton.language as tl


@triton.jit
def _block(b, order, block_expert, block_start, expert_off, counts, hk: tl.constexpr, n_exp,
           BM: tl.constexpr):
    """Block b's expert (n_exp for the sentinel's blocks and those past the last), its
    pairs, their tokens, which are real, and their places in the expert order."""
    e = tl.load(block_expert + b)
    es = tl.where(e >= 0, e, n_exp)
    local = (b - tl.load(block_start + es)) * BM + tl.arange(0, BM)
    cnt = tl.where(e >= 0, tl.load(counts + es), 0)
    valid = local < cnt
    pos = tl.load(expert_off + es) + local        # place in the expert order
    pair = tl.load(order + pos, mask=valid, other=0).to(tl.int64)
    return es.to(tl.int64), pair, pair // hk, valid, pos.to(tl.int64)


@triton.jit
def _dot_sum(acc, x, ldx, tab, ldt, tok, valid, rows, jv, d, BK: tl.constexpr,
             IEEE: tl.constexpr):
    """acc [BM, MC] += x[tok] . tab[rows]^T over d."""
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < d
        xt = tl.load(x + tok[:, None] * ldx + kk[None, :], mask=valid[:, None] & km[None, :],
                     other=0.0)
        ut = tl.load(tab + rows[:, None] * ldt + kk[None, :], mask=jv[:, None] & km[None, :],
                     other=0.0)
        if IEEE:
            acc += tl.dot(xt, tl.trans(ut), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(ut))
    return acc


@triton.jit
def peer_grouped_dot(x, ldx, tab, ldt, s, order, block_expert, block_start, expert_off,
                     counts, inv, hk: tl.constexpr, m, d, n_exp, BM: tl.constexpr,
                     MB: tl.constexpr,
                     BK: tl.constexpr, MC: tl.constexpr, IEEE: tl.constexpr,
                     SORTED: tl.constexpr = False, INV_STORE: tl.constexpr = True):
    e, pair, tok, valid, pos = _block(tl.program_id(0), order, block_expert, block_start,
                                      expert_off, counts, hk, n_exp, BM)
    j = tl.program_id(1) * MC + tl.arange(0, MC)
    jv = j < m
    rows = e * m + j
    acc = tl.zeros((BM, MC), dtype=tl.float32)
    # the sentinel's blocks (e = n_exp) skip the loop (a branch: masked loads would still
    # run the tensor-core work); their outputs are stored as zeros
    if e < n_exp:
        acc = _dot_sum(acc, x, ldx, tab, ldt, tok, valid, rows, jv, d, BK, IEEE)
    dst = pair
    if SORTED:   # s in expert order, [P, m]: row pos (= inv[pair])
        if INV_STORE:   # read from inv: stored as the token-ordered rows are (faster, H200)
            dst = tl.load(inv + pair, mask=valid, other=0).to(tl.int64)
        else:
            dst = pos
    tl.store(s + dst[:, None] * m + j[None, :], acc.to(s.dtype.element_ty),
             mask=valid[:, None] & jv[None, :])


@triton.jit
def _axpy_sum(acc, coef, tab, ldt, pair, valid, e, n, nm, m, mlim, MB: tl.constexpr,
              MC: tl.constexpr, IEEE: tl.constexpr):
    """acc [BM, BN] += coef[pair] . tab[e's rows, n]; expert columns from mlim on: zeros."""
    for j0 in range(0, MB, MC):
        j = j0 + tl.arange(0, MC)
        jv = j < mlim
        c = tl.load(coef + pair[:, None] * m + j[None, :], mask=valid[:, None] & jv[None, :],
                    other=0.0)
        v = tl.load(tab + (e * m + j)[:, None] * ldt + n[None, :],
                    mask=jv[:, None] & nm[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(c, v, input_precision="ieee")
        else:
            acc += tl.dot(c, v)
    return acc


@triton.jit
def peer_grouped_axpy(coef, tab, ldt, out, order, block_expert, block_start, expert_off,
                      counts, hk: tl.constexpr, m, d, n_blocks, n_exp, BM: tl.constexpr,
                      MB: tl.constexpr, BN: tl.constexpr, MC: tl.constexpr,
                      IEEE: tl.constexpr, STORE: tl.constexpr, LOCAL: tl.constexpr,
                      SKIP_IF: tl.constexpr = True):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(d, BN)
    if LOCAL:   # a block's d-tiles in a row: its coef rows come from L2 after the first
        b, nt = pid // n_tiles, pid % n_tiles
    else:
        b, nt = pid % n_blocks, pid // n_blocks
    e, pair, tok, valid, _ = _block(b, order, block_expert, block_start, expert_off,
                                    counts, hk, n_exp, BM)
    n = nt * BN + tl.arange(0, BN)
    nm = n < d
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # the sentinel's blocks read nothing: zero rows (STORE), or nothing added
    if SKIP_IF:
        if e < n_exp:
            acc = _axpy_sum(acc, coef, tab, ldt, pair, valid, e, n, nm, m, m, MB, MC, IEEE)
    else:
        acc = _axpy_sum(acc, coef, tab, ldt, pair, valid, e, n, nm, m,
                        tl.where(e < n_exp, m, 0), MB, MC, IEEE)
    if STORE:   # one row per pair into out [P, d] (summed per token by the caller)
        tl.store(out + pair[:, None] * d + n[None, :], acc.to(out.dtype.element_ty),
                 mask=valid[:, None] & nm[None, :])
    else:
        add = valid & (tok * 0 + e < n_exp)
        tl.atomic_add(out + tok[:, None] * d + n[None, :], acc, mask=add[:, None] & nm[None, :],
                      sem="relaxed")  # a plain reduction: no ordering needed


@triton.jit
def _scatter_tile(pid, n_exp, d, BN: tl.constexpr, MB: tl.constexpr, MC: tl.constexpr,
                  LOCAL: tl.constexpr):
    """The (expert, d-tile, column chunk) of a scatter program."""
    n_tiles = tl.cdiv(d, BN)
    if LOCAL:   # an expert's (d-tile, chunk) programs in a row: its rows stay in L2
        e, rest = pid // (n_tiles * (MB // MC)), pid % (n_tiles * (MB // MC))
        nt, jc = rest % n_tiles, rest // n_tiles
    else:
        e, nt, jc = pid % n_exp, (pid // n_exp) % n_tiles, pid // (n_exp * n_tiles)
    return e.to(tl.int64), jc * MC + tl.arange(0, MC), nt * BN + tl.arange(0, BN)


@triton.jit
def _scatter_sum(acc, coef, src, lds, order, off, cnt, hk: tl.constexpr, m, j, n, d,
                 BM: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr,
                 SORTED: tl.constexpr, I32: tl.constexpr):
    """acc [MC, BN] += coef[pairs, j]^T . src[tokens, n] over one expert's cnt pairs,
    which start at `off` in `order` (each step divides its pair ids by hk). I32: every
    offset into coef and src is below 2**31, so the gathers' offsets are 32-bit (an int32
    order; the loop's instructions at the 1.3B layer shape 314 -> 264, sm_90a SASS)."""
    jv = j < m
    nm = n < d
    if PREFETCH:   # the next step's pair ids are loaded one step ahead (loop-carried)
        nxt = tl.load(order + off + tl.arange(0, BM), mask=tl.arange(0, BM) < cnt, other=0)
    for start in range(0, cnt, BM):
        local = start + tl.arange(0, BM)
        valid = local < cnt
        if PREFETCH:
            pair = nxt
            nxt = tl.load(order + off + local + BM, mask=local + BM < cnt, other=0)
        else:
            pair = tl.load(order + off + local, mask=valid, other=0)
        if not I32:   # an offset of coef or src may pass 2**31
            pair = pair.to(tl.int64)
        tok = pair // hk
        crow = (off + local).to(pair.dtype) if SORTED else pair   # SORTED: coef by expert
        c = tl.load(coef + crow[:, None] * m + j[None, :], mask=valid[:, None] & jv[None, :],
                    other=0.0)
        sx = tl.load(src + tok[:, None] * lds + n[None, :], mask=valid[:, None] & nm[None, :],
                     other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(c), sx, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(c), sx)
    return acc


@triton.jit
def peer_grouped_scatter(coef, src, lds, grad, order, expert_off, counts, hk: tl.constexpr, m,
                         d, n_exp, BM: tl.constexpr, MB: tl.constexpr, BN: tl.constexpr,
                         MC: tl.constexpr, IEEE: tl.constexpr, LOCAL: tl.constexpr,
                         PREFETCH: tl.constexpr, SORTED: tl.constexpr = False,
                         ACC: tl.constexpr = False, I32: tl.constexpr = False):
    """grad[e*m + j, n] = (ACC: grad + ) sum over e's pairs; grad may be fp32 (a main_grad)."""
    e, j, n = _scatter_tile(tl.program_id(0), n_exp, d, BN, MB, MC, LOCAL)
    acc = tl.zeros((MC, BN), dtype=tl.float32)
    acc = _scatter_sum(acc, coef, src, lds, order, tl.load(expert_off + e),
                       tl.load(counts + e), hk, m, j, n, d, BM, IEEE, PREFETCH, SORTED, I32)
    ptr = grad + (e * m + j)[:, None] * d + n[None, :]
    mask = (j < m)[:, None] & (n < d)[None, :]
    if ACC:
        acc += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, acc.to(grad.dtype.element_ty), mask=mask)


@triton.jit
def peer_gather_sum(rows, inv, out, ldo, T, hk, d, limit, BT: tl.constexpr, BN: tl.constexpr,
                    LIMIT: tl.constexpr = False):
    """out[t, :d] = sum over the token's hk pairs of rows[inv[t * hk + s]], in fp32 and in
    pair order: the per-token sum of pair rows [P, d] stored in expert order. LIMIT: rows
    from *limit on (the sentinel's, never written) count as zeros."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tv = t < T
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = n < d
    lim = tl.load(limit).to(tl.int64) if LIMIT else 0
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for s in range(0, hk):
        r = tl.load(inv + t.to(tl.int64) * hk + s, mask=tv, other=0).to(tl.int64)
        rv = tv & (r < lim) if LIMIT else tv
        acc += tl.load(rows + r[:, None] * d + n[None, :], mask=rv[:, None] & nm[None, :],
                       other=0.0).to(tl.float32)
    tl.store(out + t.to(tl.int64)[:, None] * ldo + n[None, :], acc.to(out.dtype.element_ty),
             mask=tv[:, None] & nm[None, :])


@triton.jit
def peer_layout_pairs(keys, order, order32, inv, bounds, P, n_exp, BP: tl.constexpr):
    """The layout's per-pair part, from keys [P] sorted stably (the expert ids) and order
    [P] int64: order32 = order, inv[order[i]] = i (int32), and bounds[g] (g in [0, n_exp +
    1]) = the first place of group g, i.e. P where g is past the last key. Position i in
    [0, P] (P: the end) starts groups keys[i - 1] + 1 .. keys[i] (-1 before the first;
    n_exp + 1 at the end); keys are clamped to [0, n_exp], so writes stay in bounds."""
    i = tl.program_id(0) * BP + tl.arange(0, BP)
    inr = i < P
    o = tl.load(order + i, mask=inr, other=0)
    tl.store(order32 + i, o.to(tl.int32), mask=inr)
    tl.store(inv + o, i.to(tl.int32), mask=inr)
    cur = tl.load(keys + i, mask=inr, other=0).to(tl.int32)
    cur = tl.where(inr, tl.minimum(tl.maximum(cur, 0), n_exp), n_exp + 1)
    prev = tl.load(keys + i - 1, mask=(i > 0) & (i <= P), other=0).to(tl.int32)
    prev = tl.where(i > 0, tl.minimum(tl.maximum(prev, 0), n_exp), -1)
    live = i <= P
    n = tl.where(live, cur - prev, 0)          # groups starting at i (0 inside a group)
    for j in range(0, tl.max(n, 0)):
        tl.store(bounds + prev + 1 + j, i.to(tl.int32), mask=live & (j < n))


@triton.jit
def peer_layout_blocks(bounds, expert_off, counts, block_start, block_expert, n_exp, bm,
                       n_blocks, GB: tl.constexpr, BB: tl.constexpr):
    """The layout's per-group part (one program): from bounds [n_exp + 2], each group's
    expert_off, counts, block_start (its first block of bm pairs) and block_expert (each
    block's group; -1 past the last block), groups in chunks of GB."""
    carry = tl.zeros((), tl.int32)
    for g0 in range(0, n_exp + 1, GB):
        g = g0 + tl.arange(0, GB)
        v = g <= n_exp
        lo = tl.load(bounds + g, mask=v, other=0)
        cnt = tl.where(v, tl.load(bounds + g + 1, mask=v, other=0) - lo, 0)
        blocks = (cnt + bm - 1) // bm
        start = tl.cumsum(blocks, 0) - blocks + carry
        tl.store(expert_off + g, lo, mask=v)
        tl.store(counts + g, cnt, mask=v)
        tl.store(block_start + g, start, mask=v)
        for j in range(0, tl.max(blocks, 0)):
            tl.store(block_expert + start + j, g, mask=v & (j < blocks))
        carry += tl.sum(blocks, 0)
    for b0 in range(0, n_blocks, BB):
        b = b0 + tl.arange(0, BB)
        tl.store(block_expert + b, -1, mask=(b >= carry) & (b < n_blocks))


@triton.jit
def peer_merge_prefix(counts, S, G, start, total, bases, GB: tl.constexpr):
    """merge_layouts' prefix sums (one program), from counts [S, G] (int32, row-major: group
    g's pairs in micro-batch i): total[g] = its pairs over all, start[g] = its first merged
    place, bases[i] = micro-batch i's first pair id (its pairs follow the earlier ones')."""
    carry = tl.zeros((), tl.int32)
    for g0 in range(0, G, GB):
        g = g0 + tl.arange(0, GB)
        v = g < G
        t = tl.zeros((GB,), tl.int32)
        for i in range(0, S):
            t += tl.load(counts + i * G + g, mask=v, other=0)
        tl.store(total + g, t, mask=v)
        tl.store(start + g, tl.cumsum(t, 0) - t + carry, mask=v)
        carry += tl.sum(t, 0)
    base = tl.zeros((), tl.int32)
    for i in range(0, S):
        tl.store(bases + i, base)
        for g0 in range(0, G, GB):
            g = g0 + tl.arange(0, GB)
            base += tl.sum(tl.load(counts + i * G + g, mask=g < G, other=0), 0)


@triton.jit
def peer_merge_orders(orders, offs, counts, G, S, start, bases, merged, BLOCK: tl.constexpr):
    """merge_layouts' places (one program per group g): merged[start[g]:] = g's pair ids of
    micro-batch 0, then 1, ..., each its place in its own order (orders: the micro-batches'
    orders one after another, micro-batch i's from bases[i]) plus bases[i]."""
    g = tl.program_id(0)
    dst = tl.load(start + g)
    for i in range(0, S):
        n = tl.load(counts + i * G + g)
        base = tl.load(bases + i)
        src = base + tl.load(offs + i * G + g)
        for c in range(0, n, BLOCK):
            j = c + tl.arange(0, BLOCK)
            jm = j < n
            tl.store(merged + dst + j, tl.load(orders + src + j, mask=jm, other=0) + base,
                     mask=jm)
        dst += n
