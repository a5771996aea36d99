// PEER expert-step kernels: gathers, dot products and scatters over expert
// tables with CuTe tensors and copy atoms (CUTLASS headers from the nvidia-cutlass
// wheel). One warp owns one work item (a token, a block of sorted pairs, or a
// heavy expert's chunk) for one d-slice; each lane holds NV vectors of VEC
// contiguous elements of the slice (16-byte accesses on the vector path), so a
// 1024-wide bf16 row is 4 x 16 B per lane. Design and measurements: docs/kernels.md.
//
// Included by peer_f32.cu and peer_bf16.cu, which instantiate the launchers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "peer_api.h"
#include "peer_launch.h"

namespace megapeer {

using namespace cute;

constexpr int kWarps = 8;               // warps per block
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;

template <class T> struct VecOf { static constexpr int value = 16 / int(sizeof(T)); };
template <class T> struct MaxNV { static constexpr int value = 4; };  // 8 spills in the fused walk

// Independent table rows in flight per lane: UNR * NV 16-byte loads.
template <int NV> struct Unroll { static constexpr int value = NV >= 8 ? 1 : 8 / NV; };

// ---------------------------------------------------------------------------
// Copy operations.
// Table rows are streamed: read-only path, no L1 allocation, and an L2
// evict-first policy so that the per-token operand (x or grad_out, a few tens of
// MB, re-read by every pair of that token) stays resident in L2.
struct LdgStream128 {
  using SRegisters = uint128_t[1];
  using DRegisters = uint128_t[1];
  CUTE_DEVICE static void copy(uint128_t const& src, uint128_t& dst) {
    uint64_t pol;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    uint32_t* d = reinterpret_cast<uint32_t*>(&dst);
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "l"(&src), "l"(pol));
  }
};

}  // namespace megapeer

namespace cute {
template <>
struct Copy_Traits<megapeer::LdgStream128> {
  using ThrID = Layout<_1>;
  using SrcLayout = Layout<Shape<_1, Int<128>>>;
  using DstLayout = Layout<Shape<_1, Int<128>>>;
  using RefLayout = SrcLayout;
};
}  // namespace cute

namespace megapeer {

// Copy atom for one lane vector of VEC elements of T.
template <class T, int VEC, bool kStream>
struct VecAtom {
  using Op = conditional_t<(VEC * sizeof(T) == 16), conditional_t<kStream, LdgStream128, UniversalCopy<uint128_t>>,
                           UniversalCopy<T>>;
  using type = Copy_Atom<Op, T>;
};

// The lane's share of one slice of a row: (VEC, NV) elements, vector i at
// element (v0 + 32 i) * VEC of the row, where v0 = slice * 32 * NV + lane.
template <int VEC, int NV, class T>
CUTE_DEVICE auto lane_view(T* row, int v0) {
  return make_tensor(make_gmem_ptr(row + int64_t(v0) * VEC),
                     Layout<Shape<Int<VEC>, Int<NV>>, Stride<_1, Int<32 * VEC>>>{});
}

// Load the lane's share into a (VEC, NV) register tensor of T; vectors past the
// row end read as zeros.
template <bool kStream, int VEC, int NV, class T, class RT>
CUTE_DEVICE void load_lane(const T* row, int v0, int nvec, RT&& r) {
  Tensor g = lane_view<VEC, NV>(row, v0);
  typename VecAtom<T, VEC, kStream>::type atom;
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i) {
    if (v0 + 32 * i < nvec) copy(atom, g(_, i), r(_, i));
    else clear(r(_, i));
  }
}

template <bool kStream, int VEC, int NV, class T>
CUTE_DEVICE void load_f32(const T* row, int v0, int nvec, float (&f)[NV][VEC]) {
  Tensor r = make_tensor<T>(Shape<Int<VEC>, Int<NV>>{});
  load_lane<kStream, VEC, NV>(row, v0, nvec, r);
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    CUTE_UNROLL
    for (int v = 0; v < VEC; ++v) f[i][v] = static_cast<float>(r(v, i));
}

// fp32 rows of the heavy-expert scratch (VEC floats per lane vector).
template <int VEC, int NV>
CUTE_DEVICE void load_scratch(const float* row, int v0, int nvec, float (&f)[NV][VEC]) {
  Tensor g = lane_view<VEC, NV>(row, v0);
  Tensor r = make_tensor<float>(Shape<Int<VEC>, Int<NV>>{});
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i) {
    if (v0 + 32 * i < nvec) copy(AutoVectorizingCopyWithAssumedAlignment<128>{}, g(_, i), r(_, i));
    else clear(r(_, i));
  }
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    CUTE_UNROLL
    for (int v = 0; v < VEC; ++v) f[i][v] = r(v, i);
}

// Store fp32 accumulators as T (rounded once) to the lane's share of a row.
template <int VEC, int NV, class T>
CUTE_DEVICE void store_lane(T* row, int v0, int nvec, const float (&f)[NV][VEC]) {
  Tensor r = make_tensor<T>(Shape<Int<VEC>, Int<NV>>{});
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    CUTE_UNROLL
    for (int v = 0; v < VEC; ++v) r(v, i) = T(f[i][v]);
  Tensor g = lane_view<VEC, NV>(row, v0);
  constexpr int kBits = VEC * sizeof_bits_v<T> < 128 ? VEC * sizeof_bits_v<T> : 128;
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    if (v0 + 32 * i < nvec) copy(AutoVectorizingCopyWithAssumedAlignment<kBits>{}, r(_, i), g(_, i));
}

template <class RT, int NV, int VEC>
CUTE_DEVICE float dot_lane(RT const& r, const float (&f)[NV][VEC]) {
  float acc = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    CUTE_UNROLL
    for (int v = 0; v < VEC; ++v) acc = fmaf(static_cast<float>(r(v, i)), f[i][v], acc);
  return acc;
}

template <class RT, int NV, int VEC>
CUTE_DEVICE void axpy_lane(float c, RT const& r, float (&acc)[NV][VEC]) {
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    CUTE_UNROLL
    for (int v = 0; v < VEC; ++v) acc[i][v] = fmaf(c, static_cast<float>(r(v, i)), acc[i][v]);
}

template <int VEC, int NV>
CUTE_DEVICE void zero_acc(float (&acc)[NV][VEC]) {
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    CUTE_UNROLL
    for (int v = 0; v < VEC; ++v) acc[i][v] = 0.f;
}

CUTE_DEVICE float warp_sum(float v) {
  CUTE_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Atomic accumulation of c * x into the lane's share of a row.
template <int VEC, int NV>
CUTE_DEVICE void atomic_axpy(float* row, int v0, int nvec, float c, const float (&x)[NV][VEC]) {
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i) {
    if (v0 + 32 * i >= nvec) continue;
    float* p = row + int64_t(v0 + 32 * i) * VEC;
    if constexpr (VEC == 4) {
      atomicAdd(reinterpret_cast<float4*>(p), make_float4(c * x[i][0], c * x[i][1], c * x[i][2], c * x[i][3]));
    } else {
      CUTE_UNROLL
      for (int v = 0; v < VEC; ++v) atomicAdd(p + v, c * x[i][v]);
    }
  }
}

CUTE_DEVICE uint32_t pack_bf16x2(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <int VEC, int NV>
CUTE_DEVICE void atomic_axpy(cutlass::bfloat16_t* row, int v0, int nvec, float c, const float (&x)[NV][VEC]) {
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i) {
    if (v0 + 32 * i >= nvec) continue;
    cutlass::bfloat16_t* p = row + int64_t(v0 + 32 * i) * VEC;
    if constexpr (VEC == 8) {
      asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1, %2, %3, %4};" ::"l"(p),
                   "r"(pack_bf16x2(c * x[i][0], c * x[i][1])), "r"(pack_bf16x2(c * x[i][2], c * x[i][3])),
                   "r"(pack_bf16x2(c * x[i][4], c * x[i][5])), "r"(pack_bf16x2(c * x[i][6], c * x[i][7]))
                   : "memory");
    } else {
      CUTE_UNROLL
      for (int v = 0; v < VEC; ++v)
        atomicAdd(reinterpret_cast<__nv_bfloat16*>(p + v), __float2bfloat16_rn(c * x[i][v]));
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel arguments (one struct for all kernels; unused fields stay null).
template <class T>
struct KArgs {
  Geom g;
  int nvec;                // vectors per row (d / VEC)
  int slices;              // gridDim.y
  int64_t pm;              // P * m: entries of s / w
  const T* x; int64_t ldx;       // per-token operand [T, d]: x, src, grad_out
  const int64_t* idx;            // [T, hk]
  const T* tab; int64_t ldt;     // table [n_exp*m, d]
  const T* coef;                 // [P*m]: w or grad_s
  T* out;                        // dot outputs [P*m], or token outputs [T, d]
  T* grad;                       // table gradient [n_exp*m, d], ld = d
  float* grad_acc;               // or, when set, fp32 rows that the gradient is added to (ld = d)
  float* partial;                // [slices, P*m] when slices > 1
  float* scratch;                // heavy-expert partial rows, ld = d
  Sorted so;
};

template <class T>
CUTE_DEVICE void write_dot(const KArgs<T>& a, int64_t o, float v) {
  if (a.slices == 1) a.out[o] = T(v);
  else a.partial[int64_t(blockIdx.y) * a.pm + o] = v;
}

// The lane's share of table-gradient row `row`: stored (rounded once), or, with
// grad_acc, added to the fp32 row there (gradient-accumulation fusion). Each row has
// one writer, so the read-modify-write needs no atomics.
template <class T, int VEC, int NV>
CUTE_DEVICE void put_grad_row(const KArgs<T>& a, int64_t row, int v0, float (&acc)[NV][VEC]) {
  if (a.grad_acc == nullptr) {
    store_lane<VEC, NV>(a.grad + row * a.g.d, v0, a.nvec, acc);
    return;
  }
  float* r = a.grad_acc + row * a.g.d;
  float old[NV][VEC];
  load_scratch<VEC, NV>(r, v0, a.nvec, old);
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i)
    CUTE_UNROLL
    for (int v = 0; v < VEC; ++v) old[i][v] += acc[i][v];
  store_lane<VEC, NV>(r, v0, a.nvec, old);
}

CUTE_DEVICE int64_t warp_item() { return int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); }
CUTE_DEVICE int lane_v0(int NV) { return int(blockIdx.y) * 32 * NV + int(threadIdx.x & 31); }

// Table row of (token t, entry q = i*m + j), or -1 for an expert id out of range
// (such a pair reads nothing and contributes nothing).
CUTE_DEVICE int64_t pair_row(const int64_t* idx, const Geom& g, int64_t t, int64_t q) {
  const int64_t e = idx[t * g.hk + q / g.m];
  return (e >= 0 && e < g.n_exp) ? e * g.m + q % g.m : -1;
}

// Heavy-expert work item: (chunk of a heavy expert's sorted pairs, row j).
struct ChunkItem {
  int e;
  int j;
  int64_t seg0, seg1;  // range in perm
  int64_t slot;        // scratch slot (heavy chunk index)
};

CUTE_DEVICE bool heavy_chunk_item(const Sorted& so, int64_t m, int64_t item, ChunkItem& ci) {
  if (item >= int64_t(so.totals[1]) * m) return false;
  const int64_t c = item / m;
  ci.j = int(item - c * m);
  ci.e = so.heavy_chunk_expert[c];
  ci.slot = c;
  const int64_t local = c - so.starts[ci.e].y;
  const int64_t end = so.offsets[ci.e + 1];
  ci.seg0 = so.offsets[ci.e] + local * so.chunk;
  ci.seg1 = ci.seg0 + so.chunk < end ? ci.seg0 + so.chunk : end;
  return true;
}

// ---------------------------------------------------------------------------
// s[p, j] = tab[row(p, j)] . x[t]: one warp per (token, slice); x in registers,
// the token's hk*m table rows gathered UNR at a time.
template <class T, int VEC, int NV>
__global__ void __launch_bounds__(kThreads, 2) dot_token_kernel(KArgs<T> a) {
  constexpr int UNR = Unroll<NV>::value;
  const int lane = threadIdx.x & 31;
  const int64_t t = warp_item();
  if (t >= a.g.T) return;
  const int v0 = lane_v0(NV);
  float xf[NV][VEC];
  load_f32<false, VEC, NV>(a.x + t * a.ldx, v0, a.nvec, xf);
  const int64_t nq = a.g.hk * a.g.m;
  for (int64_t q0 = 0; q0 < nq; q0 += 32) {
    const int n = int(nq - q0 < 32 ? nq - q0 : 32);
    int64_t my_row = 0;
    if (lane < n) {
      const int64_t q = q0 + lane;
      my_row = pair_row(a.idx, a.g, t, q);
    }
    for (int u0 = 0; u0 < n; u0 += UNR) {
      Tensor f = make_tensor<T>(Shape<Int<VEC>, Int<NV>, Int<UNR>>{});
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        const int64_t row = __shfl_sync(kFull, my_row, (u0 + u) & 31);
        if (u0 + u < n && row >= 0) load_lane<true, VEC, NV>(a.tab + row * a.ldt, v0, a.nvec, f(_, _, u));
        else clear(f(_, _, u));
      }
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        if (u0 + u < n) {
          const float s = warp_sum(dot_lane(f(_, _, u), xf));
          if (lane == 0) write_dot(a, t * nq + q0 + u0 + u, s);
        }
      }
    }
  }
}

// out[t] = sum_q w[t, q] * tab[row(t, q)]: one warp per (token, slice),
// fp32 accumulators, rows gathered UNR at a time; fixed order, deterministic.
template <class T, int VEC, int NV>
__global__ void __launch_bounds__(kThreads, 2) axpy_token_kernel(KArgs<T> a) {
  constexpr int UNR = Unroll<NV>::value;
  const int lane = threadIdx.x & 31;
  const int64_t t = warp_item();
  if (t >= a.g.T) return;
  const int v0 = lane_v0(NV);
  float acc[NV][VEC];
  zero_acc(acc);
  const int64_t nq = a.g.hk * a.g.m;
  for (int64_t q0 = 0; q0 < nq; q0 += 32) {
    const int n = int(nq - q0 < 32 ? nq - q0 : 32);
    int64_t my_row = 0;
    float my_c = 0.f;
    if (lane < n) {
      const int64_t q = q0 + lane;
      my_row = pair_row(a.idx, a.g, t, q);
      my_c = static_cast<float>(a.coef[t * nq + q]);
    }
    for (int u0 = 0; u0 < n; u0 += UNR) {
      Tensor f = make_tensor<T>(Shape<Int<VEC>, Int<NV>, Int<UNR>>{});
      float cu[UNR];
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        const int64_t row = __shfl_sync(kFull, my_row, (u0 + u) & 31);
        cu[u] = __shfl_sync(kFull, my_c, (u0 + u) & 31);
        if (u0 + u < n && row >= 0) load_lane<true, VEC, NV>(a.tab + row * a.ldt, v0, a.nvec, f(_, _, u));
        else clear(f(_, _, u));
      }
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u)
        if (u0 + u < n) axpy_lane(cu[u], f(_, _, u), acc);
    }
  }
  store_lane<VEC, NV>(a.out + t * a.g.d, v0, a.nvec, acc);
}

// The sorted positions [q, qend) of walk item `item` (a block of so.block positions, for
// table row j of each expert). kOwned (table gradients): only the rows the block owns:
// a row whose first pair lies in an earlier block is skipped, a light row running past
// the block end is finished here, a heavy row is left to heavy_chunk_kernel. False when
// there is nothing to do.
template <bool kOwned, class T>
CUTE_DEVICE bool walk_range(const KArgs<T>& a, int64_t item, int64_t& q, int64_t& qend, int& j) {
  const int64_t m = a.g.m;
  const int64_t P = a.g.T * a.g.hk;
  const int64_t B = a.so.block;
  if (item >= (P + B - 1) / B * m) return false;
  const int64_t blk = item / m;
  j = int(item - blk * m);
  const int32_t* __restrict__ keys = a.so.keys;
  const int n_exp = int(a.g.n_exp);
  const int64_t bstart = blk * B, bend = bstart + B < P ? bstart + B : P;
  q = bstart;
  qend = bend;
  if constexpr (kOwned) {
    const int k0 = keys[bstart];
    const int kp = bstart > 0 ? keys[bstart - 1] : -1;
    const int kl = keys[bend - 1];
    if (k0 == kp) q = k0 < n_exp ? a.so.offsets[k0 + 1] : P;       // row owned by an earlier block
    if (kl >= n_exp) {
      qend = a.so.offsets[n_exp];
    } else {
      const int64_t s0 = a.so.offsets[kl], s1 = a.so.offsets[kl + 1];
      qend = s1 - s0 > a.so.chunk ? s0 : s1;                         // heavy: heavy_chunk_kernel
    }
  }
  return q < qend;
}

// Walk the sorted pairs: one warp per (block of consecutive sorted positions,
// row j, slice). kMode 0: s[p, j] = tab[row] . x[t] for the block's positions
// (the table row is loaded when the expert changes). kMode 1: table gradient
// grad[row] = sum coef * src[t] over the rows whose first pair lies in the block
// (a light row extending past the block end is finished here; a heavy expert is
// left to heavy_chunk_kernel); each row is stored once, summed in pair-id order.
// kMode 2: both in one pass (grad_V and grad_w = V[row] . grad_out).
// Index loads are one coalesced load per 32 positions; the per-pair loads (x
// rows, L2-resident, and table rows at expert changes) are issued UNR at a time.
template <class T, int VEC, int NV, int kMode, bool kPrefetch>
__global__ void __launch_bounds__(kThreads, 2) walk_kernel(KArgs<T> a) {
  constexpr bool kDot = kMode != 1, kAcc = kMode != 0;
  // The fused mode also holds the accumulators and table rows: fewer x rows in flight.
  constexpr int UNR = (kMode == 2 || (kDot && !kPrefetch)) && Unroll<NV>::value > 1 ? Unroll<NV>::value / 2
                                                                                       : Unroll<NV>::value;
  const int lane = threadIdx.x & 31;
  const int64_t m = a.g.m;
  const int32_t* __restrict__ keys = a.so.keys;
  const int n_exp = int(a.g.n_exp);
  int64_t q, qend;
  int j;
  if (!walk_range<kAcc>(a, warp_item(), q, qend, j)) return;
  const int v0 = lane_v0(NV);
  float acc[NV][VEC];
  zero_acc(acc);
  // kDot: tcur holds the current expert's table row. kPrefetch: tnext is always
  // in flight for the next expert to start, so its latency hides behind the
  // current one; otherwise a new expert's row is loaded with the x rows of its
  // first pair's group (tf).
  Tensor tcur = make_tensor<T>(Shape<Int<VEC>, Int<NV>>{});
  Tensor tnext = make_tensor<T>(Shape<Int<VEC>, Int<NV>>{});
  bool need_next = true;  // no load in flight for the next start yet
  int cur = -1;     // current expert
  int carry = -1;   // expert of the position before the batch
  for (int64_t q0 = q; q0 < qend; q0 += 32) {
    const int n = int(qend - q0 < 32 ? qend - q0 : 32);
    int my_key = n_exp, my_p = 0;
    float my_c = 0.f;
    if (lane < n) {
      my_key = keys[q0 + lane];
      my_p = a.so.perm[q0 + lane];
      if constexpr (kAcc) my_c = static_cast<float>(a.coef[int64_t(my_p) * m + j]);
    }
    const int up = __shfl_up_sync(kFull, my_key, 1);
    const int my_start = (lane < n && my_key < n_exp && my_key != (lane == 0 ? carry : up)) ? 1 : 0;
    const unsigned smask = __ballot_sync(kFull, my_start);   // live positions where an expert starts
    carry = __shfl_sync(kFull, my_key, n - 1);
    if constexpr (kDot && kPrefetch) {
      if (need_next && smask != 0u) {
        const int nk = __shfl_sync(kFull, my_key, __ffs(smask) - 1);
        load_lane<true, VEC, NV>(a.tab + (int64_t(nk) * m + j) * a.ldt, v0, a.nvec, tnext);
        need_next = false;
      }
    }
    for (int u0 = 0; u0 < n; u0 += UNR) {
      Tensor f = make_tensor<T>(Shape<Int<VEC>, Int<NV>, Int<UNR>>{});
      Tensor tf = make_tensor<T>(Shape<Int<VEC>, Int<NV>, Int<kDot && !kPrefetch ? UNR : 1>>{});
      int ku[UNR];
      int64_t pu[UNR];
      float cu[UNR];
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        const int src = (u0 + u) & 31;
        ku[u] = __shfl_sync(kFull, my_key, src);
        pu[u] = __shfl_sync(kFull, my_p, src);
        cu[u] = __shfl_sync(kFull, my_c, src);
        if (u0 + u < n && ku[u] < n_exp) {
          load_lane<false, VEC, NV>(a.x + (pu[u] / a.g.hk) * a.ldx, v0, a.nvec, f(_, _, u));
          if constexpr (kDot && !kPrefetch) {
            if ((smask >> (u0 + u)) & 1u)
              load_lane<true, VEC, NV>(a.tab + (int64_t(ku[u]) * m + j) * a.ldt, v0, a.nvec, tf(_, _, u));
          }
        }
      }
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        const int w = u0 + u;
        if (w < n && ku[u] < n_exp) {
          if ((smask >> w) & 1u) {
            if constexpr (kAcc) {
              if (cur >= 0) {
                put_grad_row(a, int64_t(cur) * m + j, v0, acc);
                zero_acc(acc);
              }
            }
            if constexpr (kDot && !kPrefetch) {
              CUTE_UNROLL
              for (int i = 0; i < NV; ++i)
                CUTE_UNROLL
                for (int v = 0; v < VEC; ++v) tcur(v, i) = tf(v, i, u);
            }
            if constexpr (kDot && kPrefetch) {
              CUTE_UNROLL
              for (int i = 0; i < NV; ++i)
                CUTE_UNROLL
                for (int v = 0; v < VEC; ++v) tcur(v, i) = tnext(v, i);
              const unsigned later = w < 31 ? smask & (~0u << (w + 1)) : 0u;
              if (later != 0u) {
                const int nk = __shfl_sync(kFull, my_key, __ffs(later) - 1);
                load_lane<true, VEC, NV>(a.tab + (int64_t(nk) * m + j) * a.ldt, v0, a.nvec, tnext);
              } else {
                need_next = true;
              }
            }
            cur = ku[u];
          }
          if constexpr (kDot) {
            float d = 0.f;
            CUTE_UNROLL
            for (int i = 0; i < NV; ++i)
              CUTE_UNROLL
              for (int v = 0; v < VEC; ++v)
                d = fmaf(static_cast<float>(tcur(v, i)), static_cast<float>(f(v, i, u)), d);
            d = warp_sum(d);
            if (lane == 0) write_dot(a, pu[u] * m + j, d);
          }
          if constexpr (kAcc) axpy_lane(cu[u], f(_, _, u), acc);
        }
      }
    }
  }
  if constexpr (kAcc) {
    if (cur >= 0) put_grad_row(a, int64_t(cur) * m + j, v0, acc);
  }
}

// Staged walk (table gradients, modes 1 and 2, 16-byte vectors): the same work items,
// order and sums as walk_kernel, but each warp copies the rows of the next L sorted
// positions into its ring of S = L + 1 slots in shared memory with cp.async (x rows, and
// in mode 2 the table row where an expert starts, with L2 evict_first), so L + 1 rows per
// warp are in flight where walk_kernel's registers allow UNR (1 in mode 2). A lane reads
// back only the vectors it copied: no warp barrier. Index batches of 32 positions are
// loaded one batch ahead.
// Slots per warp: 3 (x and table rows in mode 2: 96 KiB a block at 1024 bf16; two blocks
// per SM).
constexpr int kStageSlots = 3;

template <class T, int VEC, int NV, int kMode>
constexpr int staged_smem_bytes() {
  return kWarps * kStageSlots * (kMode == 2 ? 2 : 1) * 32 * NV * VEC * int(sizeof(T));
}

CUTE_DEVICE void cp_async_stream16(void* smem, const void* gmem) {
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem), "l"(pol));
}

// The lane's vectors of a row slice into its places of a slot (same layout as lane_view,
// relative to the slice).
template <bool kStream, int VEC, int NV, class T>
CUTE_DEVICE void stage_lane(T* slot, const T* row, int v0, int lane, int nvec) {
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i) {
    if (v0 + 32 * i >= nvec) continue;
    T* dst = slot + (32 * i + lane) * VEC;
    const T* src = row + int64_t(v0 + 32 * i) * VEC;
    if constexpr (kStream) cp_async_stream16(dst, src);
    else SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                    *reinterpret_cast<uint128_t*>(dst));
  }
}

template <int VEC, int NV, class T, class RT>
CUTE_DEVICE void read_lane(const T* slot, int v0, int lane, int nvec, RT&& r) {
  CUTE_UNROLL
  for (int i = 0; i < NV; ++i) {
    if (v0 + 32 * i < nvec) *reinterpret_cast<uint128_t*>(&r(0, i)) = *reinterpret_cast<const uint128_t*>(slot + (32 * i + lane) * VEC);
    else clear(r(_, i));
  }
}

// One batch of 32 sorted positions from b: the lane's (key, pair, coef) and the mask of
// positions where an expert starts (carry: the key before b, updated to the batch's last).
template <class T>
CUTE_DEVICE void load_batch(const KArgs<T>& a, int64_t b, int64_t qend, int j, int lane, int& carry, int& k,
                            int& p, float& c, unsigned& starts) {
  const int n_exp = int(a.g.n_exp);
  const int n = b < qend ? int(qend - b < 32 ? qend - b : 32) : 0;
  k = n_exp; p = 0; c = 0.f;
  if (lane < n) {
    k = a.so.keys[b + lane];
    p = a.so.perm[b + lane];
    c = static_cast<float>(a.coef[int64_t(p) * a.g.m + j]);
  }
  const int up = __shfl_up_sync(kFull, k, 1);
  starts = __ballot_sync(kFull, lane < n && k < n_exp && k != (lane == 0 ? carry : up));
  if (n > 0) carry = __shfl_sync(kFull, k, n - 1);
}

template <class T, int VEC, int NV, int kMode>
__global__ void __launch_bounds__(kThreads, 2) walk_staged_kernel(KArgs<T> a) {
  static_assert(kMode == 1 || kMode == 2, "the staged walk makes table gradients");
  constexpr int S = kStageSlots, L = S - 1;
  constexpr int kRow = 32 * NV * VEC;                  // elements of a warp's row slice
  constexpr int kSlot = (kMode == 2 ? 2 : 1) * kRow;   // x row, then the table row
  extern __shared__ __align__(16) unsigned char staged_smem[];
  const int lane = threadIdx.x & 31;
  T* ring = reinterpret_cast<T*>(staged_smem) + (threadIdx.x >> 5) * S * kSlot;
  const int64_t m = a.g.m;
  const int n_exp = int(a.g.n_exp);
  int64_t q, qend;
  int j;
  if (!walk_range<true>(a, warp_item(), q, qend, j)) return;
  const int v0 = lane_v0(NV);
  float acc[NV][VEC];
  zero_acc(acc);
  // Two batches of indices: positions [b0, b0 + 32) and the next 32.
  int carry = -1, k0, p0, k1, p1;
  float c0, c1;
  unsigned st0, st1;
  int64_t b0 = q;
  load_batch(a, b0, qend, j, lane, carry, k0, p0, c0, st0);
  load_batch(a, b0 + 32, qend, j, lane, carry, k1, p1, c1, st1);
  auto issue = [&](int64_t jp, int slot) {
    if (jp < qend) {
      const bool first = jp < b0 + 32;
      const int l = int(jp - (first ? b0 : b0 + 32));
      const int kj = __shfl_sync(kFull, first ? k0 : k1, l);
      const int pj = __shfl_sync(kFull, first ? p0 : p1, l);
      if (kj < n_exp) {
        T* dst = ring + slot * kSlot;
        stage_lane<false, VEC, NV>(dst, a.x + int64_t(pj / int(a.g.hk)) * a.ldx, v0, lane, a.nvec);
        if constexpr (kMode == 2) {
          if ((((first ? st0 : st1) >> l) & 1u) != 0u)
            stage_lane<true, VEC, NV>(dst + kRow, a.tab + (int64_t(kj) * m + j) * a.ldt, v0, lane, a.nvec);
        }
      }
    }
    cp_async_fence();  // one group per position, empty or not: wait_group counts positions
  };
  CUTE_UNROLL
  for (int t = 0; t < L; ++t) issue(q + t, t);
  Tensor tcur = make_tensor<T>(Shape<Int<VEC>, Int<NV>>{});
  Tensor f = make_tensor<T>(Shape<Int<VEC>, Int<NV>>{});
  int cur = -1;
  int slot = 0;  // slot of position i; the issue for i + L goes to the slot i - 1 used
  for (int64_t i = q; i < qend; ++i) {
    if (i == b0 + 32) {  // next batch
      b0 += 32;
      k0 = k1; p0 = p1; c0 = c1; st0 = st1;
      load_batch(a, b0 + 32, qend, j, lane, carry, k1, p1, c1, st1);
    }
    issue(i + L, slot == 0 ? S - 1 : slot - 1);
    cp_async_wait<L>();
    const int l = int(i - b0);
    const int ki = __shfl_sync(kFull, k0, l);
    const int pi = __shfl_sync(kFull, p0, l);
    const float ci = __shfl_sync(kFull, c0, l);
    const T* src = ring + slot * kSlot;
    slot = slot == S - 1 ? 0 : slot + 1;
    if (ki >= n_exp) continue;
    if (((st0 >> l) & 1u) != 0u) {
      if (cur >= 0) {
        put_grad_row(a, int64_t(cur) * m + j, v0, acc);
        zero_acc(acc);
      }
      if constexpr (kMode == 2) read_lane<VEC, NV>(src + kRow, v0, lane, a.nvec, tcur);
      cur = ki;
    }
    read_lane<VEC, NV>(src, v0, lane, a.nvec, f);
    if constexpr (kMode == 2) {
      float d = 0.f;
      CUTE_UNROLL
      for (int ii = 0; ii < NV; ++ii)
        CUTE_UNROLL
        for (int v = 0; v < VEC; ++v) d = fmaf(static_cast<float>(tcur(v, ii)), static_cast<float>(f(v, ii)), d);
      d = warp_sum(d);
      if (lane == 0) write_dot(a, int64_t(pi) * m + j, d);
    }
    axpy_lane(ci, f, acc);
  }
  cp_async_wait<0>();
  if (cur >= 0) put_grad_row(a, int64_t(cur) * m + j, v0, acc);
}

// Zero gradient rows of experts nobody chose: one warp per 32 experts.
template <class T, int VEC, int NV>
__global__ void __launch_bounds__(kThreads) zero_rows_kernel(KArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t e0 = warp_item() * 32;
  if (e0 >= a.g.n_exp) return;
  const int64_t e = e0 + lane;
  const bool empty = e < a.g.n_exp && a.so.offsets[e] == a.so.offsets[e + 1];
  unsigned mask = __ballot_sync(kFull, empty);
  const int v0 = lane_v0(NV);
  float z[NV][VEC];
  zero_acc(z);
  while (mask) {
    const int l = __ffs(mask) - 1;
    mask &= mask - 1;
    for (int64_t j = 0; j < a.g.m; ++j) store_lane<VEC, NV>(a.grad + ((e0 + l) * a.g.m + j) * a.g.d, v0, a.nvec, z);
  }
}

// Heavy experts (more than `chunk` pairs): one warp per (chunk, row j, slice)
// sums coef * src[t] over the chunk's pairs in sorted order into an fp32 scratch
// row; finalize_heavy_kernel adds a heavy expert's chunk rows in chunk order.
// kDot: also dot[p, j] = tab[row] . src[t].
template <class T, int VEC, int NV, bool kDot>
__global__ void __launch_bounds__(kThreads, 2) heavy_chunk_kernel(KArgs<T> a) {
  // The fused dot keeps the table row in registers too: fewer rows in flight.
  constexpr int UNR = kDot && Unroll<NV>::value > 1 ? Unroll<NV>::value / 2 : Unroll<NV>::value;
  const int lane = threadIdx.x & 31;
  ChunkItem ci;
  if (!heavy_chunk_item(a.so, a.g.m, warp_item(), ci)) return;
  const int v0 = lane_v0(NV);
  const int64_t m = a.g.m;
  const int64_t row = int64_t(ci.e) * m + ci.j;
  float tf[NV][VEC];
  if constexpr (kDot) load_f32<true, VEC, NV>(a.tab + row * a.ldt, v0, a.nvec, tf);
  float acc[NV][VEC];
  zero_acc(acc);
  for (int64_t q0 = ci.seg0; q0 < ci.seg1; q0 += 32) {
    const int n = int(ci.seg1 - q0 < 32 ? ci.seg1 - q0 : 32);
    int my_p = 0;
    float my_c = 0.f;
    if (lane < n) {
      my_p = a.so.perm[q0 + lane];
      my_c = static_cast<float>(a.coef[int64_t(my_p) * m + ci.j]);
    }
    for (int u0 = 0; u0 < n; u0 += UNR) {
      Tensor f = make_tensor<T>(Shape<Int<VEC>, Int<NV>, Int<UNR>>{});
      int64_t pu[UNR];
      float cu[UNR];
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        pu[u] = __shfl_sync(kFull, my_p, (u0 + u) & 31);
        cu[u] = __shfl_sync(kFull, my_c, (u0 + u) & 31);
        if (u0 + u < n) load_lane<false, VEC, NV>(a.x + (pu[u] / a.g.hk) * a.ldx, v0, a.nvec, f(_, _, u));
      }
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        if (u0 + u < n) {
          axpy_lane(cu[u], f(_, _, u), acc);
          if constexpr (kDot) {
            const float s = warp_sum(dot_lane(f(_, _, u), tf));
            if (lane == 0) write_dot(a, pu[u] * m + ci.j, s);
          }
        }
      }
    }
  }
  store_lane<VEC, NV>(a.scratch + (ci.slot * m + ci.j) * a.g.d, v0, a.nvec, acc);
}

// Sum the chunk partials of each heavy expert's rows, in chunk order.
template <class T, int VEC, int NV>
__global__ void __launch_bounds__(kThreads, 2) finalize_heavy_kernel(KArgs<T> a) {
  const int64_t item = warp_item();
  const int64_t m = a.g.m;
  if (item >= int64_t(a.so.totals[2]) * m) return;
  const int64_t h = item / m;
  const int j = int(item - h * m);
  const int e = a.so.heavy_list[h];
  const int4 cnt = a.so.counts[e];
  const int4 st = a.so.starts[e];
  const int v0 = lane_v0(NV);
  float acc[NV][VEC];
  zero_acc(acc);
  for (int c = 0; c < cnt.x; ++c) {
    float f[NV][VEC];
    load_scratch<VEC, NV>(a.scratch + ((int64_t(st.y) + c) * m + j) * a.g.d, v0, a.nvec, f);
    CUTE_UNROLL
    for (int i = 0; i < NV; ++i)
      CUTE_UNROLL
      for (int v = 0; v < VEC; ++v) acc[i][v] += f[i][v];
  }
  put_grad_row(a, int64_t(e) * m + j, v0, acc);
}

// Table gradient with atomics: one warp per (token, slice) holds src[t] and adds
// coef * src[t] into every row the token chose (grad zeroed beforehand).
template <class T, class G, int VEC, int NV, bool kDot>
__global__ void __launch_bounds__(kThreads, 2) scatter_atomic_kernel(KArgs<T> a, G* gacc) {
  constexpr int UNR = Unroll<NV>::value;
  const int lane = threadIdx.x & 31;
  const int64_t t = warp_item();
  if (t >= a.g.T) return;
  const int v0 = lane_v0(NV);
  float xf[NV][VEC];
  load_f32<false, VEC, NV>(a.x + t * a.ldx, v0, a.nvec, xf);
  const int64_t nq = a.g.hk * a.g.m;
  for (int64_t q0 = 0; q0 < nq; q0 += 32) {
    const int n = int(nq - q0 < 32 ? nq - q0 : 32);
    int64_t my_row = 0;
    float my_c = 0.f;
    if (lane < n) {
      const int64_t q = q0 + lane;
      my_row = pair_row(a.idx, a.g, t, q);
      my_c = static_cast<float>(a.coef[t * nq + q]);
    }
    for (int u0 = 0; u0 < n; u0 += UNR) {
      int64_t ru[UNR];
      float cu[UNR];
      Tensor f = make_tensor<T>(Shape<Int<VEC>, Int<NV>, Int<UNR>>{});
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        ru[u] = __shfl_sync(kFull, my_row, (u0 + u) & 31);
        cu[u] = __shfl_sync(kFull, my_c, (u0 + u) & 31);
        if constexpr (kDot) {
          if (u0 + u < n && ru[u] >= 0) load_lane<true, VEC, NV>(a.tab + ru[u] * a.ldt, v0, a.nvec, f(_, _, u));
          else clear(f(_, _, u));
        }
      }
      CUTE_UNROLL
      for (int u = 0; u < UNR; ++u) {
        if (u0 + u < n) {
          if (ru[u] >= 0) atomic_axpy<VEC, NV>(gacc + ru[u] * a.g.d, v0, a.nvec, cu[u], xf);
          if constexpr (kDot) {
            const float s = warp_sum(dot_lane(f(_, _, u), xf));
            if (lane == 0) write_dot(a, t * nq + q0 + u0 + u, s);
          }
        }
      }
    }
  }
}

template <class T>
__global__ void reduce_partials_kernel(const float* partial, int64_t slices, int64_t n, T* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t k = 0; k < slices; ++k) s += partial[k * n + i];
    out[i] = T(s);
  }
}

// ---------------------------------------------------------------------------
// Host side: pick the vector width and the per-lane vector count, launch.

template <class T>
int choose_nv(int64_t nvec, bool vec) {
  if (!vec) return 4;
  if (nvec <= 32) return 1;
  if (nvec <= 64) return 2;
  if (nvec <= 128 || MaxNV<T>::value == 4) return 4;
  return 8;
}

template <class T>
int64_t num_slices_t(int64_t d, bool vec) {
  const int64_t nvec = vec ? d / VecOf<T>::value : d;
  const int nv = choose_nv<T>(nvec, vec);
  return (nvec + 32 * nv - 1) / (32 * nv);
}

// Calls f(integral_constant<VEC>, integral_constant<NV>) for the chosen shape.
template <class T, class F>
cudaError_t with_shape(bool vec, int64_t d, F&& f) {
  constexpr int V = VecOf<T>::value;
  if (!vec) return f(cute::Int<1>{}, cute::Int<4>{});
  switch (choose_nv<T>(d / V, vec)) {
    case 1: return f(cute::Int<V>{}, cute::Int<1>{});
    case 2: return f(cute::Int<V>{}, cute::Int<2>{});
    case 4: return f(cute::Int<V>{}, cute::Int<4>{});
    default:
      if constexpr (MaxNV<T>::value >= 8) return f(cute::Int<V>{}, cute::Int<8>{});
      return cudaErrorInvalidValue;
  }
}

template <class T>
KArgs<T> base_args(bool vec, Geom g) {
  KArgs<T> a{};
  a.g = g;
  a.nvec = int(vec ? g.d / VecOf<T>::value : g.d);
  a.slices = int(num_slices_t<T>(g.d, vec));
  a.pm = g.T * g.hk * g.m;
  return a;
}

inline dim3 grid_for(int64_t items, int slices) {
  return dim3(unsigned((items + kWarps - 1) / kWarps), unsigned(slices));
}

template <class T>
cudaError_t finish_dot(const KArgs<T>& a, T* out, cudaStream_t stream) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.slices == 1) return err;
  return reduce_partials_t<T>(a.partial, a.slices, a.pm, out, stream);
}

template <class T>
cudaError_t dot_token_t(bool vec, Geom g, const T* x, int64_t ldx, const int64_t* idx, const T* tab,
                        int64_t ldt, T* s, float* partial, cudaStream_t stream) {
  KArgs<T> a = base_args<T>(vec, g);
  a.x = x; a.ldx = ldx; a.idx = idx; a.tab = tab; a.ldt = ldt; a.out = s; a.partial = partial;
  if (g.T == 0) return cudaSuccess;
  cudaError_t err = with_shape<T>(vec, g.d, [&](auto V, auto NV) {
    dot_token_kernel<T, decltype(V)::value, decltype(NV)::value><<<grid_for(g.T, a.slices), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
  return err != cudaSuccess ? err : finish_dot(a, s, stream);
}

template <class T, int VEC, int NV, int kMode>
cudaError_t launch_walk_staged(const KArgs<T>& a, int64_t items, cudaStream_t stream) {
  constexpr int bytes = staged_smem_bytes<T, VEC, NV, kMode>();
  cudaError_t e = cudaFuncSetAttribute(walk_staged_kernel<T, VEC, NV, kMode>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  walk_staged_kernel<T, VEC, NV, kMode><<<grid_for(items, a.slices), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

// The staged walks by default where the experts average at most kStagePairs pairs each
// (H200, calls 130-131 of docs/benchmarks.md: -4% fwd+bwd at 2 pairs an expert, +3% at 4).
constexpr int64_t kStagePairs = 3;

inline bool stage_walks(const Sorted& so, const Geom& g) {
  if (so.stage >= 0) return so.stage == 1;
  return g.T * g.hk <= kStagePairs * g.n_exp;
}

inline int64_t walk_items(const Geom& g, const Sorted& so) {
  const int64_t P = g.T * g.hk;
  return (P + so.block - 1) / so.block * g.m;
}

template <class T>
cudaError_t dot_expert_t(bool vec, Geom g, const Sorted& so, const T* x, int64_t ldx, const T* tab,
                         int64_t ldt, T* s, float* partial, cudaStream_t stream) {
  KArgs<T> a = base_args<T>(vec, g);
  a.x = x; a.ldx = ldx; a.tab = tab; a.ldt = ldt; a.out = s; a.partial = partial; a.so = so;
  if (a.pm == 0) return cudaSuccess;
  cudaError_t err = with_shape<T>(vec, g.d, [&](auto V, auto NV) {
    constexpr int kV = decltype(V)::value, kNV = decltype(NV)::value;
    const dim3 grid = grid_for(walk_items(g, so), a.slices);
    if (so.prefetch != 0) walk_kernel<T, kV, kNV, 0, true><<<grid, kThreads, 0, stream>>>(a);
    else walk_kernel<T, kV, kNV, 0, false><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
  return err != cudaSuccess ? err : finish_dot(a, s, stream);
}

template <class T>
cudaError_t axpy_token_t(bool vec, Geom g, const T* w, const int64_t* idx, const T* tab, int64_t ldt,
                         T* out, cudaStream_t stream) {
  KArgs<T> a = base_args<T>(vec, g);
  a.coef = w; a.idx = idx; a.tab = tab; a.ldt = ldt; a.out = out;
  if (g.T == 0) return cudaSuccess;
  return with_shape<T>(vec, g.d, [&](auto V, auto NV) {
    axpy_token_kernel<T, decltype(V)::value, decltype(NV)::value><<<grid_for(g.T, a.slices), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

template <class T>
cudaError_t scatter_sorted_t(bool vec, Geom g, const Sorted& so, const T* coef, const T* src, int64_t lds,
                             const T* tab, int64_t ldt, T* grad, float* grad_acc, T* dot, float* partial,
                             float* scratch, cudaStream_t stream) {
  KArgs<T> a = base_args<T>(vec, g);
  a.coef = coef; a.x = src; a.ldx = lds; a.tab = tab; a.ldt = ldt; a.grad = grad; a.grad_acc = grad_acc;
  a.out = dot;
  a.partial = partial; a.scratch = scratch; a.so = so;
  cudaError_t err = with_shape<T>(vec, g.d, [&](auto V, auto NV) {
    constexpr int kV = decltype(V)::value, kNV = decltype(NV)::value;
    if (grad_acc == nullptr)  // accumulating: unused rows stay as they are
      zero_rows_kernel<T, kV, kNV><<<grid_for((g.n_exp + 31) / 32, a.slices), kThreads, 0, stream>>>(a);
    if (a.pm > 0) {
      const int64_t items = walk_items(g, so);
      const dim3 grid = grid_for(items, a.slices);
      constexpr bool kVector = kV * sizeof(T) == 16;
      const int mode = tab == nullptr ? 1 : 2;
      bool staged = false;  // the staged walk (16-byte vectors; not with the prefetching mode 2)
      if constexpr (kVector) {
        if (stage_walks(so, g) && !(mode == 2 && so.prefetch == 1)) {
          const cudaError_t w = mode == 1 ? launch_walk_staged<T, kV, kNV, 1>(a, items, stream)
                                          : launch_walk_staged<T, kV, kNV, 2>(a, items, stream);
          if (w != cudaSuccess) return w;
          staged = true;
        }
      }
      if (!staged) {
        if (mode == 1) walk_kernel<T, kV, kNV, 1, false><<<grid, kThreads, 0, stream>>>(a);
        else if (so.prefetch == 1) walk_kernel<T, kV, kNV, 2, true><<<grid, kThreads, 0, stream>>>(a);
        else walk_kernel<T, kV, kNV, 2, false><<<grid, kThreads, 0, stream>>>(a);
      }
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || so.max_heavy == 0) return e;
    const dim3 hgrid = grid_for(so.max_heavy_slots * g.m, a.slices);
    if (tab != nullptr) heavy_chunk_kernel<T, kV, kNV, true><<<hgrid, kThreads, 0, stream>>>(a);
    else heavy_chunk_kernel<T, kV, kNV, false><<<hgrid, kThreads, 0, stream>>>(a);
    finalize_heavy_kernel<T, kV, kNV><<<grid_for(so.max_heavy * g.m, a.slices), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || tab == nullptr) return err;
  return finish_dot(a, dot, stream);
}

template <class T>
cudaError_t scatter_atomic_t(bool vec, Geom g, const int64_t* idx, const T* coef, const T* src, int64_t lds,
                             const T* tab, int64_t ldt, void* grad, bool grad_f32, T* dot, float* partial,
                             cudaStream_t stream) {
  KArgs<T> a = base_args<T>(vec, g);
  a.idx = idx; a.coef = coef; a.x = src; a.ldx = lds; a.tab = tab; a.ldt = ldt; a.out = dot;
  a.partial = partial;
  if (g.T == 0) return cudaSuccess;
  cudaError_t err = with_shape<T>(vec, g.d, [&](auto V, auto NV) {
    constexpr int kV = decltype(V)::value, kNV = decltype(NV)::value;
    const dim3 grid = grid_for(g.T, a.slices);
    if (grad_f32) {
      float* gp = static_cast<float*>(grad);
      if (tab != nullptr) scatter_atomic_kernel<T, float, kV, kNV, true><<<grid, kThreads, 0, stream>>>(a, gp);
      else scatter_atomic_kernel<T, float, kV, kNV, false><<<grid, kThreads, 0, stream>>>(a, gp);
    } else {
      T* gp = static_cast<T*>(grad);
      if (tab != nullptr) scatter_atomic_kernel<T, T, kV, kNV, true><<<grid, kThreads, 0, stream>>>(a, gp);
      else scatter_atomic_kernel<T, T, kV, kNV, false><<<grid, kThreads, 0, stream>>>(a, gp);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess || tab == nullptr) return err;
  return finish_dot(a, dot, stream);
}

template <class T>
cudaError_t reduce_partials_t(const float* partial, int64_t slices, int64_t n, T* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256;
  reduce_partials_kernel<T><<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(partial, slices, n, out);
  return cudaGetLastError();
}

#define MEGAPEER_INSTANTIATE(T)                                                                             \
  template int64_t num_slices_t<T>(int64_t, bool);                                                          \
  template cudaError_t dot_token_t<T>(bool, Geom, const T*, int64_t, const int64_t*, const T*, int64_t, T*, \
                                      float*, cudaStream_t);                                                \
  template cudaError_t dot_expert_t<T>(bool, Geom, const Sorted&, const T*, int64_t, const T*, int64_t, T*, \
                                       float*, cudaStream_t);                                               \
  template cudaError_t axpy_token_t<T>(bool, Geom, const T*, const int64_t*, const T*, int64_t, T*,         \
                                       cudaStream_t);                                                       \
  template cudaError_t scatter_sorted_t<T>(bool, Geom, const Sorted&, const T*, const T*, int64_t, const T*, \
                                           int64_t, T*, float*, T*, float*, float*, cudaStream_t);          \
  template cudaError_t scatter_atomic_t<T>(bool, Geom, const int64_t*, const T*, const T*, int64_t,         \
                                           const T*, int64_t, void*, bool, T*, float*, cudaStream_t);       \
  template cudaError_t reduce_partials_t<T>(const float*, int64_t, int64_t, T*, cudaStream_t);

}  // namespace megapeer
