// Plain C++ interface between the torch binding (peer_binding.cpp) and the CUDA
// kernels (peer_*.cu). No torch headers here, so the .cu files compile with nvcc
// and the CUDA/CUTLASS headers alone (tools/check_cuda_sources.py does that in CI).
//
// Shapes (all row-major; "ld" = elements between consecutive rows):
//   x / src   [T, d]        activations or output gradients (one row per token)
//   idx       [T, hk]       int64 expert ids in [0, n_exp); hk = heads * k
//   tab       [n_exp*m, d]  expert table U or V (a d-slice under tensor parallelism)
//   s / w     [T, hk, m]    contiguous, same dtype as the table
// A "pair" p = t*hk + i is one (token, retrieved expert); row(p, j) = idx[p]*m + j.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace megapeer {

enum DType : int { kF32 = 0, kBF16 = 1 };

struct Geom {
  int64_t T;      // tokens
  int64_t hk;     // retrieved experts per token (heads * k)
  int64_t m;      // table rows per expert (expert hidden size; 1 for PEER)
  int64_t n_exp;  // experts; the table has n_exp * m rows
  int64_t d;      // row length (local slice of the hidden size)
};

// Result of sorting the pairs by expert (see peer_sort.cu). The expert-major
// kernels walk the sorted pairs in blocks of `block` consecutive positions, one
// warp per block (equal work per warp whatever the expert sizes). A table row
// belongs to the block holding its first pair and is written once, by that warp,
// in pair-id order. An expert with more than `chunk` pairs is "heavy": its pairs
// are cut into chunks whose warps write fp32 partial rows to a scratch buffer,
// which a finalize kernel sums in chunk order. Both orders are fixed, so the
// results are bitwise repeatable.
struct Sorted {
  const int32_t* keys = nullptr;          // [P] expert of each sorted position (n_exp: invalid id)
  const int32_t* perm = nullptr;          // [P] pair ids, sorted by expert, stable
  const int32_t* offsets = nullptr;       // [n_exp + 1] start of each expert's pairs in perm
  const int4* counts = nullptr;           // [n_exp] (chunks, heavy slots, is_heavy, 0)
  const int4* starts = nullptr;           // [n_exp] exclusive scan of counts
  const int32_t* heavy_chunk_expert = nullptr;  // [max_heavy_slots] expert of each heavy chunk
  const int32_t* heavy_list = nullptr;    // [max_heavy] heavy experts
  const int32_t* totals = nullptr;        // [4] chunks, heavy chunks, heavy experts, 0
  int64_t chunk = 256;
  int64_t block = 64;                     // min(64, chunk): a heavy expert never fits in a block
  // Walk kernels: prefetch the next expert's table row (1), or load it with its
  // first pair (0); -1 (default): prefetch in the forward dot, not in the fused
  // grad_V + grad_w walk, where the extra registers spill (docs/kernels.md).
  int prefetch = -1;
  // Table-gradient walks on the 16-byte vector path: rows staged through shared memory by
  // cp.async (1), or loaded into registers (0); -1 (default): staged where the experts
  // average at most 3 pairs each (stage_walks in peer_kernels.cuh).
  int stage = -1;
  int64_t max_heavy = 0;                  // upper bounds used for grid sizes
  int64_t max_heavy_slots = 0;
};

// Upper bounds and workspace sizes for sort_pairs_by_expert.
int64_t sort_max_heavy(int64_t P, int64_t chunk);
int64_t sort_max_heavy_slots(int64_t P, int64_t chunk);
size_t sort_cub_bytes(int64_t P, int64_t n_exp);

struct SortWorkspace {
  int32_t* keys_in; int32_t* vals_in; int32_t* keys_out; int32_t* perm;  // [P] each
  int32_t* offsets;        // [n_exp + 1]
  int4* counts; int4* starts;  // [n_exp] each
  int32_t* heavy_chunk_expert;  // [max_heavy_slots]
  int32_t* heavy_list;     // [max_heavy + 1]
  int32_t* totals;         // [4]
  void* cub_tmp; size_t cub_bytes;
};

// full = false: keys and perm only (enough for the forward dot).
cudaError_t sort_pairs_by_expert(const int64_t* idx, int64_t P, int64_t n_exp, int64_t chunk, bool full,
                                 const SortWorkspace& ws, Sorted* out, cudaStream_t stream);

// Vector path: 16-byte accesses (needs d and every ld a multiple of 16/sizeof(T)
// and 16-byte aligned bases); otherwise a scalar path. A row is processed in
// `slices` pieces of at most 32 lanes * NV vectors; with more than one slice,
// dot products are summed through `partial` ([slices, P*m] fp32) in slice order.
int64_t num_slices(DType dt, int64_t d, bool vec);

// s[p, j] = tab[row(p, j)] . x[t(p)]. Token-major: each token's x is read once
// and the table rows are gathered.
cudaError_t dot_token(DType dt, bool vec, Geom g, const void* x, int64_t ldx, const int64_t* idx,
                      const void* tab, int64_t ldt, void* s, float* partial, cudaStream_t stream);

// The same function, expert-major: the sorted pairs are walked in blocks, each
// table row read once per block that holds its pairs (about once), and x
// (L2-resident) read per pair.
cudaError_t dot_expert(DType dt, bool vec, Geom g, const Sorted& so, const void* x, int64_t ldx,
                       const void* tab, int64_t ldt, void* s, float* partial, cudaStream_t stream);

// out[t] = sum_{i, j} w[t, i, j] * tab[row(t*hk+i, j)]   (token-major, deterministic)
cudaError_t axpy_token(DType dt, bool vec, Geom g, const void* w, const int64_t* idx,
                       const void* tab, int64_t ldt, void* out, cudaStream_t stream);

// grad[r] = sum over pairs p, j with row(p, j) = r of coef[p, j] * src[t(p)], every row
// written once (zeros for unused rows), no atomics; fixed summation order.
// With tab != nullptr, also dot[p, j] = tab[row(p, j)] . src[t(p)] in the same pass.
// With grad_acc != nullptr (fp32 [n_exp*m, d]) the rows are added there instead
// (gradient-accumulation fusion; grad unused, unused rows untouched).
// scratch: [max_heavy_slots * m, d] fp32 (heavy experts only; null if max_heavy == 0).
cudaError_t scatter_sorted(DType dt, bool vec, Geom g, const Sorted& so, const void* coef,
                           const void* src, int64_t lds, const void* tab, int64_t ldt,
                           void* grad, float* grad_acc, void* dot, float* partial, float* scratch,
                           cudaStream_t stream);

// The same with atomics (token-major, nondeterministic order) into a zeroed
// gradient: fp32 when grad_f32 (for bf16 the caller casts afterwards), else the
// table dtype itself (bf16 atomics round at every addition).
cudaError_t scatter_atomic(DType dt, bool vec, Geom g, const int64_t* idx, const void* coef,
                           const void* src, int64_t lds, const void* tab, int64_t ldt,
                           void* grad, bool grad_f32, void* dot, float* partial, cudaStream_t stream);

// out[i] = sum_s partial[s * n + i], cast to dt.
cudaError_t reduce_partials(DType dt, const float* partial, int64_t slices, int64_t n, void* out,
                            cudaStream_t stream);

// binaryVersion of the loaded kernels (e.g. 90), or -1 and a message when no
// kernel image fits the current device.
int kernel_binary_version(char* msg, int msg_len);

}  // namespace megapeer
