// torch binding of the PEER kernels: megapeer._C. Checks shapes, dtypes and
// devices, allocates outputs and workspaces through torch's caching allocator,
// and launches on the current stream. The autograd formulas and the
// torch.library registration live in megapeer/ops/peer_cuda.py.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "peer_api.h"

namespace mp = megapeer;

namespace {

// setup.py passes the targets as one token (e.g. 90a or 90a_100a), stringized here.
#define MEGAPEER_STR2(x) #x
#define MEGAPEER_STR(x) MEGAPEER_STR2(x)
#ifdef MEGAPEER_CUDA_ARCHS_LIST
#define MEGAPEER_CUDA_ARCHS MEGAPEER_STR(MEGAPEER_CUDA_ARCHS_LIST)
#else
#define MEGAPEER_CUDA_ARCHS "unknown"
#endif

constexpr int64_t kDotToken = 0, kDotExpert = 1;
constexpr int64_t kScatterSorted = 0, kScatterAtomic = 1, kScatterAtomicNative = 2;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "megapeer._C ", what, ": ", cudaGetErrorString(err));
}

mp::DType dtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return mp::kBF16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "megapeer._C: expected bfloat16 or float32, got ", t.scalar_type());
  return mp::kF32;
}

// A [rows, d] operand with unit column stride (row stride may be anything).
at::Tensor rows2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "megapeer._C: ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.is_cuda(), "megapeer._C: ", name, " must be a CUDA tensor");
  if (t.stride(1) != 1 || (t.size(0) > 1 && t.stride(0) < t.size(1))) return t.contiguous();
  return t;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16-byte vector path: d and every row stride a multiple of 16 B, bases aligned.
bool vec_ok(const at::Tensor& ref, int64_t d, std::initializer_list<const at::Tensor*> ts) {
  const int64_t vec = 16 / ref.element_size();
  if (d % vec != 0) return false;
  for (const at::Tensor* t : ts) {
    if (t == nullptr || !t->defined() || t->numel() == 0) continue;
    if (!aligned16(t->data_ptr())) return false;
    if (t->dim() == 2 && t->size(0) > 1 && t->stride(0) % vec != 0) return false;
  }
  return true;
}

struct Problem {
  mp::Geom g;
  at::Tensor idx;  // [T, hk] contiguous int64
  std::vector<int64_t> pair_shape;  // idx.shape
};

Problem make_problem(const at::Tensor& idx, int64_t T, int64_t n_rows, int64_t m, int64_t d) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "megapeer._C: idx must be int64");
  TORCH_CHECK(idx.is_cuda(), "megapeer._C: idx must be a CUDA tensor");
  TORCH_CHECK(idx.dim() >= 1 && idx.size(0) == T, "megapeer._C: idx must be [T, ...] with T = ", T, ", got ",
              idx.sizes());
  TORCH_CHECK(m >= 1 && n_rows % m == 0 && n_rows >= m, "megapeer._C: table rows (", n_rows,
              ") must be a positive multiple of m (", m, ")");
  Problem pr;
  int64_t hk = 1;
  for (int64_t i = 1; i < idx.dim(); ++i) hk *= idx.size(i);
  pr.g = mp::Geom{T, hk, m, n_rows / m, d};
  pr.idx = idx.contiguous();
  pr.pair_shape = idx.sizes().vec();
  TORCH_CHECK(T * hk < (int64_t(1) << 31), "megapeer._C: more than 2^31 (token, expert) pairs");
  TORCH_CHECK(n_rows / m < (int64_t(1) << 30), "megapeer._C: more than 2^30 experts");
  return pr;
}

std::vector<int64_t> with_m(const std::vector<int64_t>& s, int64_t m) {
  std::vector<int64_t> r(s);
  r.push_back(m);
  return r;
}

// Sorted pairs with their workspace (kept alive by `buf`).
struct SortHolder {
  at::Tensor buf;
  mp::Sorted so;
};

// A 0/1 switch from the environment: -1 when unset or empty; anything else is an error.
int env_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return -1;
  const std::string s(v);
  TORCH_CHECK(s == "0" || s == "1", name, " must be 0 or 1, got '", s, "'");
  return s == "1" ? 1 : 0;
}

SortHolder sort_pairs_impl(const at::Tensor& idx, int64_t P, int64_t n_exp, int64_t chunk, bool full,
                           cudaStream_t stream) {
  TORCH_CHECK(chunk >= 1, "megapeer._C: chunk must be >= 1");
  const int64_t max_heavy = full ? mp::sort_max_heavy(P, chunk) : 0;
  const int64_t max_slots = full ? mp::sort_max_heavy_slots(P, chunk) : 0;
  const int64_t ne = full ? n_exp : 0;
  const size_t cub = mp::sort_cub_bytes(P, n_exp);
  auto al = [](int64_t b) { return (b + 255) / 256 * 256; };
  const int64_t sizes[] = {al(P * 4),       al(P * 4),         al(P * 4),         al(P * 4),
                           al((ne + 1) * 4), al(ne * 16),       al(ne * 16),       al(max_slots * 4),
                           al((max_heavy + 1) * 4), al(16),     al(int64_t(cub))};
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  SortHolder h;
  h.buf = at::empty({total}, idx.options().dtype(at::kByte));
  char* p = static_cast<char*>(h.buf.data_ptr());
  char* ptrs[11];
  for (int i = 0; i < 11; ++i) { ptrs[i] = p; p += sizes[i]; }
  mp::SortWorkspace ws;
  ws.keys_in = reinterpret_cast<int32_t*>(ptrs[0]);
  ws.vals_in = reinterpret_cast<int32_t*>(ptrs[1]);
  ws.keys_out = reinterpret_cast<int32_t*>(ptrs[2]);
  ws.perm = reinterpret_cast<int32_t*>(ptrs[3]);
  ws.offsets = reinterpret_cast<int32_t*>(ptrs[4]);
  ws.counts = reinterpret_cast<int4*>(ptrs[5]);
  ws.starts = reinterpret_cast<int4*>(ptrs[6]);
  ws.heavy_chunk_expert = reinterpret_cast<int32_t*>(ptrs[7]);
  ws.heavy_list = reinterpret_cast<int32_t*>(ptrs[8]);
  ws.totals = reinterpret_cast<int32_t*>(ptrs[9]);
  ws.cub_tmp = ptrs[10];
  ws.cub_bytes = cub;
  check_cuda(mp::sort_pairs_by_expert(idx.data_ptr<int64_t>(), P, n_exp, chunk, full, ws, &h.so, stream), "sort");
  // Tuning switch for the benchmark and tests: MEGAPEER_PEER_PREFETCH=1 prefetches
  // the next expert's table row in every walk, =0 in none; unset: the measured
  // best per kernel (see Sorted::prefetch and docs/kernels.md).
  h.so.prefetch = env_switch("MEGAPEER_PEER_PREFETCH");
  // MEGAPEER_PEER_STAGE=1 / 0: the table-gradient walks staged through shared memory, or
  // not; unset: by the pairs per expert (Sorted::stage).
  h.so.stage = env_switch("MEGAPEER_PEER_STAGE");
  return h;
}

// One sort for both table-gradient passes of a layer's backward (grad_V + grad_w, then
// grad_U sort the same idx). A pass stores its sort here; the next pass with the same idx
// (storage, shape, version), expert count, chunk, device and stream takes it instead of
// sorting again, and empties the entry. The entry holds idx, so that its memory cannot
// be reused while cached. MEGAPEER_PEER_SORT_REUSE=0 sorts every time (benchmarks).
struct SortEntry {
  bool valid = false;
  at::Tensor idx;
  int64_t version = 0, n_exp = 0, chunk = 0;
  cudaStream_t stream = nullptr;
  SortHolder h;
};

bool same_idx(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.device() == b.device() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

SortHolder full_sort(const at::Tensor& idx, int64_t P, int64_t n_exp, int64_t chunk, cudaStream_t stream) {
  if (env_switch("MEGAPEER_PEER_SORT_REUSE") == 0)
    return sort_pairs_impl(idx, P, n_exp, chunk, /*full=*/true, stream);
  static std::mutex mu;
  static SortEntry& cached = *new SortEntry();  // never destroyed: no CUDA free at exit
  std::lock_guard<std::mutex> lock(mu);
  if (cached.valid && same_idx(cached.idx, idx) && cached.version == idx._version() && cached.n_exp == n_exp &&
      cached.chunk == chunk && cached.stream == stream) {
    SortHolder h = cached.h;
    cached = SortEntry();
    return h;
  }
  cached = SortEntry{true, idx, idx._version(), n_exp, chunk, stream,
                     sort_pairs_impl(idx, P, n_exp, chunk, /*full=*/true, stream)};
  return cached.h;
}

at::Tensor partial_buffer(const at::Tensor& like, mp::DType dt, int64_t d, bool vec, int64_t n) {
  const int64_t slices = mp::num_slices(dt, d, vec);
  if (slices <= 1) return at::Tensor();
  return at::empty({slices, n}, like.options().dtype(at::kFloat));
}

float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// s = gather_dot(x, idx, U, m): s[..., j] = U[idx*m + j] . x[t]
at::Tensor gather_dot(const at::Tensor& x_, const at::Tensor& idx_, const at::Tensor& U_, int64_t m, int64_t algo,
                      int64_t chunk) {
  at::Tensor x = rows2d(x_, "x"), U = rows2d(U_, "U");
  TORCH_CHECK(x.scalar_type() == U.scalar_type(), "megapeer._C gather_dot: x and U dtypes differ");
  TORCH_CHECK(x.size(1) == U.size(1), "megapeer._C gather_dot: x and U widths differ");
  const c10::cuda::CUDAGuard guard(x.device());
  const mp::DType dt = dtype_of(x);
  Problem pr = make_problem(idx_, x.size(0), U.size(0), m, x.size(1));
  const bool vec = vec_ok(x, pr.g.d, {&x, &U});
  const int64_t pm = pr.g.T * pr.g.hk * m;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial = partial_buffer(x, dt, pr.g.d, vec, pm);
  if (algo == kDotExpert) {
    at::Tensor s = at::zeros(with_m(pr.pair_shape, m), x.options());
    if (pm == 0) return s;
    SortHolder h = sort_pairs_impl(pr.idx, pr.g.T * pr.g.hk, pr.g.n_exp, chunk, /*full=*/false, stream);
    if (partial.defined()) partial.zero_();
    check_cuda(mp::dot_expert(dt, vec, pr.g, h.so, x.data_ptr(), x.stride(0), U.data_ptr(), U.stride(0),
                              s.data_ptr(), fptr(partial), stream),
               "dot_expert");
    return s;
  }
  TORCH_CHECK(algo == kDotToken, "megapeer._C gather_dot: unknown algo ", algo);
  at::Tensor s = at::empty(with_m(pr.pair_shape, m), x.options());
  check_cuda(mp::dot_token(dt, vec, pr.g, x.data_ptr(), x.stride(0), pr.idx.data_ptr<int64_t>(), U.data_ptr(),
                           U.stride(0), s.data_ptr(), fptr(partial), stream),
             "dot_token");
  return s;
}

// out = gather_axpy(w, idx, V, m): out[t] = sum w[t, i, j] V[idx*m + j]
at::Tensor gather_axpy(const at::Tensor& w_, const at::Tensor& idx_, const at::Tensor& V_, int64_t m) {
  at::Tensor V = rows2d(V_, "V");
  TORCH_CHECK(w_.scalar_type() == V.scalar_type(), "megapeer._C gather_axpy: w and V dtypes differ");
  const c10::cuda::CUDAGuard guard(V.device());
  const mp::DType dt = dtype_of(V);
  Problem pr = make_problem(idx_, idx_.size(0), V.size(0), m, V.size(1));
  TORCH_CHECK(w_.sizes().vec() == with_m(pr.pair_shape, m), "megapeer._C gather_axpy: w must be idx.shape + [m]");
  at::Tensor w = w_.contiguous();
  const bool vec = vec_ok(V, pr.g.d, {&V});
  at::Tensor out = at::empty({pr.g.T, pr.g.d}, V.options());
  check_cuda(mp::axpy_token(dt, vec, pr.g, w.data_ptr(), pr.idx.data_ptr<int64_t>(), V.data_ptr(), V.stride(0),
                            out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "axpy_token");
  return out;
}

// (grad, dot) = expert_scatter(coef, idx, src, tab, n_rows, m, algo, chunk, acc):
//   grad[r] = sum_{(p, j): idx[p]*m + j = r} coef[p, j] * src[t(p)]   ([n_rows, d])
//   dot[p, j] = tab[idx[p]*m + j] . src[t(p)]                         (empty without tab)
// With acc (fp32 [n_rows, d], contiguous) grad is added to acc in fp32 instead and
// the returned grad is empty (gradient-accumulation fusion).
std::tuple<at::Tensor, at::Tensor> expert_scatter(const at::Tensor& coef_, const at::Tensor& idx_,
                                                  const at::Tensor& src_, const c10::optional<at::Tensor>& tab_,
                                                  int64_t n_rows, int64_t m, int64_t algo, int64_t chunk,
                                                  const c10::optional<at::Tensor>& acc_) {
  at::Tensor src = rows2d(src_, "src");
  at::Tensor acc;
  if (acc_.has_value() && acc_->defined()) {
    acc = *acc_;
    TORCH_CHECK(acc.is_cuda() && acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.dim() == 2 &&
                    acc.size(0) == n_rows && acc.size(1) == src.size(1),
                "megapeer._C expert_scatter: acc must be a contiguous CUDA fp32 [n_rows, d] tensor");
  }
  at::Tensor tab;
  if (tab_.has_value() && tab_->defined()) {
    tab = rows2d(*tab_, "tab");
    TORCH_CHECK(tab.size(0) == n_rows && tab.size(1) == src.size(1), "megapeer._C expert_scatter: tab shape");
    TORCH_CHECK(tab.scalar_type() == src.scalar_type(), "megapeer._C expert_scatter: tab dtype");
  }
  TORCH_CHECK(coef_.scalar_type() == src.scalar_type(), "megapeer._C expert_scatter: coef and src dtypes differ");
  const c10::cuda::CUDAGuard guard(src.device());
  const mp::DType dt = dtype_of(src);
  Problem pr = make_problem(idx_, src.size(0), n_rows, m, src.size(1));
  TORCH_CHECK(coef_.sizes().vec() == with_m(pr.pair_shape, m), "megapeer._C expert_scatter: coef shape");
  at::Tensor coef = coef_.contiguous();
  const bool vec = vec_ok(src, pr.g.d, {&src, &tab, &acc});
  const int64_t pm = pr.g.T * pr.g.hk * m;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dot = tab.defined() ? at::zeros(with_m(pr.pair_shape, m), src.options()) : at::empty({0}, src.options());
  at::Tensor partial = tab.defined() ? partial_buffer(src, dt, pr.g.d, vec, pm) : at::Tensor();
  if (partial.defined()) partial.zero_();
  const void* tptr = tab.defined() ? tab.data_ptr() : nullptr;
  const int64_t ldt = tab.defined() ? tab.stride(0) : 0;
  if (algo == kScatterAtomic || algo == kScatterAtomicNative) {
    // fp32 accumulation (then one rounding) unless the table dtype's own atomics were asked for
    // (with acc: fp32 atomics straight into it)
    const bool f32 = algo == kScatterAtomic || dt == mp::kF32 || acc.defined();
    at::Tensor grad = acc.defined() ? acc
                                    : at::zeros({n_rows, pr.g.d}, src.options().dtype(f32 ? at::kFloat : src.scalar_type()));
    check_cuda(mp::scatter_atomic(dt, vec, pr.g, pr.idx.data_ptr<int64_t>(), coef.data_ptr(), src.data_ptr(),
                                  src.stride(0), tptr, ldt, grad.data_ptr(), f32,
                                  tab.defined() ? dot.data_ptr() : nullptr, fptr(partial), stream),
               "scatter_atomic");
    if (acc.defined()) return {at::empty({0}, src.options()), dot};
    return {grad.scalar_type() == src.scalar_type() ? grad : grad.to(src.scalar_type()), dot};
  }
  TORCH_CHECK(algo == kScatterSorted, "megapeer._C expert_scatter: unknown algo ", algo);
  at::Tensor grad = at::empty({acc.defined() ? 0 : n_rows, pr.g.d}, src.options());
  SortHolder h = full_sort(pr.idx, pr.g.T * pr.g.hk, pr.g.n_exp, chunk, stream);
  at::Tensor scratch;
  if (h.so.max_heavy > 0)
    scratch = at::empty({h.so.max_heavy_slots * m, pr.g.d}, src.options().dtype(at::kFloat));
  check_cuda(mp::scatter_sorted(dt, vec, pr.g, h.so, coef.data_ptr(), src.data_ptr(), src.stride(0), tptr, ldt,
                                acc.defined() ? nullptr : grad.data_ptr(), fptr(acc),
                                tab.defined() ? dot.data_ptr() : nullptr, fptr(partial),
                                fptr(scratch), stream),
             "scatter_sorted");
  return {grad, dot};
}

// For tests: the sorted pair ids and each expert's start in them.
std::tuple<at::Tensor, at::Tensor> sort_pairs(const at::Tensor& idx_, int64_t n_exp, int64_t chunk) {
  TORCH_CHECK(idx_.is_cuda() && idx_.scalar_type() == at::kLong, "megapeer._C sort_pairs: CUDA int64 idx");
  const c10::cuda::CUDAGuard guard(idx_.device());
  at::Tensor idx = idx_.contiguous();
  const int64_t P = idx.numel();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SortHolder h = sort_pairs_impl(idx, P, n_exp, chunk, /*full=*/true, stream);
  auto opts = idx.options().dtype(at::kInt);
  at::Tensor perm = at::empty({P}, opts), offsets = at::empty({n_exp + 1}, opts);
  if (P > 0) check_cuda(cudaMemcpyAsync(perm.data_ptr(), h.so.perm, P * 4, cudaMemcpyDeviceToDevice, stream), "copy");
  check_cuda(cudaMemcpyAsync(offsets.data_ptr(), h.so.offsets, (n_exp + 1) * 4, cudaMemcpyDeviceToDevice, stream),
             "copy");
  return {perm, offsets};
}

std::tuple<int64_t, std::string> binary_version() {
  char msg[256] = {0};
  const int v = mp::kernel_binary_version(msg, sizeof(msg));
  return {int64_t(v), std::string(msg)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "megapeer PEER expert-step kernels (csrc/peer)";
  mod.attr("ARCHS") = MEGAPEER_CUDA_ARCHS;
  mod.attr("DOT_TOKEN") = kDotToken;
  mod.attr("DOT_EXPERT") = kDotExpert;
  mod.attr("SCATTER_SORTED") = kScatterSorted;
  mod.attr("SCATTER_ATOMIC") = kScatterAtomic;
  mod.attr("SCATTER_ATOMIC_NATIVE") = kScatterAtomicNative;
  mod.def("gather_dot", &gather_dot, "s[..., j] = U[idx*m + j] . x[t]", py::arg("x"), py::arg("idx"), py::arg("U"),
          py::arg("m"), py::arg("algo"), py::arg("chunk"));
  mod.def("gather_axpy", &gather_axpy, "out[t] = sum w[t, i, j] V[idx*m + j]", py::arg("w"), py::arg("idx"),
          py::arg("V"), py::arg("m"));
  mod.def("expert_scatter", &expert_scatter, "table gradient (and fused dot)", py::arg("coef"), py::arg("idx"),
          py::arg("src"), py::arg("tab"), py::arg("n_rows"), py::arg("m"), py::arg("algo"), py::arg("chunk"),
          py::arg("acc") = py::none());
  mod.def("sort_pairs", &sort_pairs, "pairs sorted by expert: (perm, offsets)", py::arg("idx"), py::arg("n_exp"),
          py::arg("chunk"));
  mod.def("binary_version", &binary_version, "(binaryVersion, error) of the loaded kernels on the current device");
}
