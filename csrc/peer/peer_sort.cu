// Sort the (token, expert) pairs by expert, deterministically, and cut each
// expert's pairs into chunks for the expert-major kernels (see peer_api.h).
//
//   keys = expert id (ids out of range get the sentinel n_exp and land in no
//   expert's range), values = pair id; a stable LSD radix sort over just the bits
//   that n_exp needs (cub) keeps equal experts in pair-id order, so the
//   summation order of every gradient row is fixed.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "peer_api.h"

namespace megapeer {
namespace {

constexpr int kBlock = 256;

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kBlock - 1) / kBlock;
  return unsigned(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

int key_bits(int64_t n_exp) {
  int bits = 1;
  while ((int64_t(1) << bits) <= n_exp) ++bits;
  return bits;
}

__global__ void prep_keys_kernel(const int64_t* __restrict__ idx, int64_t P, int64_t n_exp,
                                 int32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < P; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = idx[i];
    keys[i] = int32_t((e >= 0 && e < n_exp) ? e : n_exp);
    vals[i] = int32_t(i);
  }
}

// offsets[e] = first sorted position with key >= e, for e in [0, n_exp]; each
// entry written exactly once.
__global__ void offsets_kernel(const int32_t* __restrict__ sk, int64_t P, int64_t n_exp,
                               int32_t* __restrict__ off) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < P; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = sk[i];
    const int64_t prev = i == 0 ? -1 : sk[i - 1];
    for (int64_t e = prev + 1; e <= k && e <= n_exp; ++e) off[e] = int32_t(i);
    if (i == P - 1)
      for (int64_t e = k + 1; e <= n_exp; ++e) off[e] = int32_t(P);
  }
}

__global__ void zero_offsets_kernel(int64_t n, int32_t* off) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    off[i] = 0;
}

__global__ void chunk_count_kernel(const int32_t* __restrict__ off, int64_t n_exp, int64_t chunk,
                                   int4* __restrict__ counts) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n_exp; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = off[e + 1] - off[e];
    const int heavy = c > chunk ? 1 : 0;
    const int nch = heavy ? int((c + chunk - 1) / chunk) : 1;
    counts[e] = make_int4(nch, heavy ? nch : 0, heavy, 0);
  }
}

struct Int4Sum {
  __host__ __device__ int4 operator()(const int4& a, const int4& b) const {
    return make_int4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
  }
};

__global__ void chunk_fill_kernel(const int4* __restrict__ counts, const int4* __restrict__ starts, int64_t n_exp,
                                  int32_t* __restrict__ heavy_chunk_expert, int32_t* __restrict__ heavy_list,
                                  int32_t* __restrict__ totals) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n_exp; e += int64_t(gridDim.x) * blockDim.x) {
    const int4 c = counts[e];
    const int4 s = starts[e];
    if (c.z) {
      for (int i = 0; i < c.y; ++i) heavy_chunk_expert[s.y + i] = int32_t(e);
      heavy_list[s.z] = int32_t(e);
    }
    if (e == n_exp - 1) {
      totals[0] = s.x + c.x;
      totals[1] = s.y + c.y;
      totals[2] = s.z + c.z;
      totals[3] = 0;
    }
  }
}

}  // namespace

int64_t sort_max_heavy(int64_t P, int64_t chunk) { return P / (chunk + 1); }
int64_t sort_max_heavy_slots(int64_t P, int64_t chunk) { return 2 * (P / (chunk + 1)) + 1; }

size_t sort_cub_bytes(int64_t P, int64_t n_exp) {
  size_t sort_bytes = 0, scan_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), P > 0 ? P : 1, 0, key_bits(n_exp));
  cub::DeviceScan::ExclusiveScan(nullptr, scan_bytes, static_cast<const int4*>(nullptr), static_cast<int4*>(nullptr),
                                 Int4Sum{}, make_int4(0, 0, 0, 0), n_exp > 0 ? n_exp : 1);
  return sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
}

cudaError_t sort_pairs_by_expert(const int64_t* idx, int64_t P, int64_t n_exp, int64_t chunk, bool full,
                                 const SortWorkspace& ws, Sorted* out, cudaStream_t stream) {
  if (n_exp < 1 || chunk < 1) return cudaErrorInvalidValue;
  cudaError_t err;
  if (P > 0) {
    prep_keys_kernel<<<blocks_for(P), kBlock, 0, stream>>>(idx, P, n_exp, ws.keys_in, ws.vals_in);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    size_t bytes = ws.cub_bytes;
    err = cub::DeviceRadixSort::SortPairs(ws.cub_tmp, bytes, ws.keys_in, ws.keys_out, ws.vals_in, ws.perm, P, 0,
                                          key_bits(n_exp), stream);
    if (err != cudaSuccess) return err;
    if (full) offsets_kernel<<<blocks_for(P), kBlock, 0, stream>>>(ws.keys_out, P, n_exp, ws.offsets);
  } else if (full) {
    zero_offsets_kernel<<<blocks_for(n_exp + 1), kBlock, 0, stream>>>(n_exp + 1, ws.offsets);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  out->keys = ws.keys_out;
  out->perm = ws.perm;
  out->chunk = chunk;
  out->block = chunk < 64 ? chunk : 64;
  if (!full) return cudaSuccess;
  chunk_count_kernel<<<blocks_for(n_exp), kBlock, 0, stream>>>(ws.offsets, n_exp, chunk, ws.counts);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  size_t bytes = ws.cub_bytes;
  err = cub::DeviceScan::ExclusiveScan(ws.cub_tmp, bytes, ws.counts, ws.starts, Int4Sum{}, make_int4(0, 0, 0, 0),
                                       n_exp, stream);
  if (err != cudaSuccess) return err;
  chunk_fill_kernel<<<blocks_for(n_exp), kBlock, 0, stream>>>(ws.counts, ws.starts, n_exp, ws.heavy_chunk_expert,
                                                              ws.heavy_list, ws.totals);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  out->offsets = ws.offsets;
  out->counts = ws.counts;
  out->starts = ws.starts;
  out->heavy_chunk_expert = ws.heavy_chunk_expert;
  out->heavy_list = ws.heavy_list;
  out->totals = ws.totals;
  out->max_heavy = sort_max_heavy(P, chunk);
  out->max_heavy_slots = sort_max_heavy_slots(P, chunk);
  return cudaSuccess;
}

int kernel_binary_version(char* msg, int msg_len) {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, prep_keys_kernel);
  if (err != cudaSuccess) {
    if (msg != nullptr && msg_len > 0) {
      const char* s = cudaGetErrorString(err);
      int i = 0;
      for (; s[i] != '\0' && i < msg_len - 1; ++i) msg[i] = s[i];
      msg[i] = '\0';
    }
    cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    return -1;
  }
  return attr.binaryVersion;
}

}  // namespace megapeer
