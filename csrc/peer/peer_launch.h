// Typed launchers, defined in peer_kernels.cuh and instantiated once per element
// type in peer_f32.cu and peer_bf16.cu (so the two compile in parallel);
// peer_api.cu switches on the runtime dtype and calls these.
#pragma once
#include "peer_api.h"

namespace megapeer {

template <class T> int64_t num_slices_t(int64_t d, bool vec);

template <class T>
cudaError_t dot_token_t(bool vec, Geom g, const T* x, int64_t ldx, const int64_t* idx, const T* tab,
                        int64_t ldt, T* s, float* partial, cudaStream_t stream);
template <class T>
cudaError_t dot_expert_t(bool vec, Geom g, const Sorted& so, const T* x, int64_t ldx, const T* tab,
                         int64_t ldt, T* s, float* partial, cudaStream_t stream);
template <class T>
cudaError_t axpy_token_t(bool vec, Geom g, const T* w, const int64_t* idx, const T* tab,
                         int64_t ldt, T* out, cudaStream_t stream);
template <class T>
cudaError_t scatter_sorted_t(bool vec, Geom g, const Sorted& so, const T* coef, const T* src,
                             int64_t lds, const T* tab, int64_t ldt, T* grad, float* grad_acc, T* dot,
                             float* partial, float* scratch, cudaStream_t stream);
template <class T>
cudaError_t scatter_atomic_t(bool vec, Geom g, const int64_t* idx, const T* coef, const T* src,
                             int64_t lds, const T* tab, int64_t ldt, void* grad, bool grad_f32, T* dot,
                             float* partial, cudaStream_t stream);
template <class T>
cudaError_t reduce_partials_t(const float* partial, int64_t slices, int64_t n, T* out,
                              cudaStream_t stream);

}  // namespace megapeer
