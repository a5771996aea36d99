// fp32 instantiations of the PEER kernels (peer_kernels.cuh).
#include "peer_kernels.cuh"

namespace megapeer {
MEGAPEER_INSTANTIATE(float)
}  // namespace megapeer
