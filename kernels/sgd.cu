// SGD with momentum, weight decay and optional Nesterov, in place: torch.optim.SGD with dampening 0.
//
// Mapping: one thread per parameter element e (grid-stride loop over `total` elements):
//   g        = grad[e] + weight_decay * param[e]
//   buf[e]   = momentum * buf[e] + g              (buf starts at 0, so the first step gives buf = g)
//   param[e] = param[e] - lr * (nesterov ? g + momentum * buf[e] : buf[e])
// Each element is read and written by one thread only: deterministic, no atomics.
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise.
// T is float or double; lr, momentum and weight_decay arrive in T.

template <typename T, typename Index>
__global__ void sgd_update_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                  T* __restrict__ buf, Index total, T lr, T momentum,
                                  T weight_decay, int nesterov) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const T g = grad[e] + weight_decay * param[e];
        const T b = momentum * buf[e] + g;
        buf[e] = b;
        param[e] -= lr * (nesterov ? g + momentum * b : b);
    }
}
