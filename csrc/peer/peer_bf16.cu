// bf16 instantiations of the PEER kernels (peer_kernels.cuh); cutlass::bfloat16_t
// has the storage layout of torch.bfloat16.
#include "peer_kernels.cuh"

namespace megapeer {
MEGAPEER_INSTANTIATE(cutlass::bfloat16_t)
}  // namespace megapeer
