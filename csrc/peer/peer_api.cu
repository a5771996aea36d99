// Runtime-dtype entry points of peer_api.h over the typed launchers.
#include <cutlass/numeric_types.h>

#include "peer_api.h"
#include "peer_launch.h"

namespace megapeer {
namespace {
using bf16 = cutlass::bfloat16_t;
template <class T> const T* c(const void* p) { return static_cast<const T*>(p); }
template <class T> T* w(void* p) { return static_cast<T*>(p); }
}  // namespace

int64_t num_slices(DType dt, int64_t d, bool vec) {
  return dt == kBF16 ? num_slices_t<bf16>(d, vec) : num_slices_t<float>(d, vec);
}

cudaError_t dot_token(DType dt, bool vec, Geom g, const void* x, int64_t ldx, const int64_t* idx, const void* tab,
                      int64_t ldt, void* s, float* partial, cudaStream_t st) {
  if (dt == kBF16) return dot_token_t<bf16>(vec, g, c<bf16>(x), ldx, idx, c<bf16>(tab), ldt, w<bf16>(s), partial, st);
  return dot_token_t<float>(vec, g, c<float>(x), ldx, idx, c<float>(tab), ldt, w<float>(s), partial, st);
}

cudaError_t dot_expert(DType dt, bool vec, Geom g, const Sorted& so, const void* x, int64_t ldx, const void* tab,
                       int64_t ldt, void* s, float* partial, cudaStream_t st) {
  if (dt == kBF16)
    return dot_expert_t<bf16>(vec, g, so, c<bf16>(x), ldx, c<bf16>(tab), ldt, w<bf16>(s), partial, st);
  return dot_expert_t<float>(vec, g, so, c<float>(x), ldx, c<float>(tab), ldt, w<float>(s), partial, st);
}

cudaError_t axpy_token(DType dt, bool vec, Geom g, const void* wt, const int64_t* idx, const void* tab, int64_t ldt,
                       void* out, cudaStream_t st) {
  if (dt == kBF16) return axpy_token_t<bf16>(vec, g, c<bf16>(wt), idx, c<bf16>(tab), ldt, w<bf16>(out), st);
  return axpy_token_t<float>(vec, g, c<float>(wt), idx, c<float>(tab), ldt, w<float>(out), st);
}

cudaError_t scatter_sorted(DType dt, bool vec, Geom g, const Sorted& so, const void* coef, const void* src,
                           int64_t lds, const void* tab, int64_t ldt, void* grad, float* grad_acc, void* dot,
                           float* partial, float* scratch, cudaStream_t st) {
  if (dt == kBF16)
    return scatter_sorted_t<bf16>(vec, g, so, c<bf16>(coef), c<bf16>(src), lds, c<bf16>(tab), ldt, w<bf16>(grad),
                                  grad_acc, w<bf16>(dot), partial, scratch, st);
  return scatter_sorted_t<float>(vec, g, so, c<float>(coef), c<float>(src), lds, c<float>(tab), ldt, w<float>(grad),
                                 grad_acc, w<float>(dot), partial, scratch, st);
}

cudaError_t scatter_atomic(DType dt, bool vec, Geom g, const int64_t* idx, const void* coef, const void* src,
                           int64_t lds, const void* tab, int64_t ldt, void* grad, bool grad_f32, void* dot,
                           float* partial, cudaStream_t st) {
  if (dt == kBF16)
    return scatter_atomic_t<bf16>(vec, g, idx, c<bf16>(coef), c<bf16>(src), lds, c<bf16>(tab), ldt, grad, grad_f32,
                                  w<bf16>(dot), partial, st);
  return scatter_atomic_t<float>(vec, g, idx, c<float>(coef), c<float>(src), lds, c<float>(tab), ldt, grad, true,
                                 w<float>(dot), partial, st);
}

cudaError_t reduce_partials(DType dt, const float* partial, int64_t slices, int64_t n, void* out, cudaStream_t st) {
  if (dt == kBF16) return reduce_partials_t<bf16>(partial, slices, n, w<bf16>(out), st);
  return reduce_partials_t<float>(partial, slices, n, w<float>(out), st);
}

}  // namespace megapeer
