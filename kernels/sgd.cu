// SGD with momentum, weight decay and optional Nesterov, in place: torch.optim.SGD with dampening 0.
//
// Each element e of a parameter, with its gradient and momentum buffer:
//   g        = grad[e] + weight_decay * param[e]
//   buf[e]   = momentum * buf[e] + g              (buf starts at 0, so the first step gives buf = g)
//   param[e] = param[e] - lr * (nesterov ? g + momentum * buf[e] : buf[e])
//
// Two kernels do this:
// - sgd_update_kernel: one tensor. One thread per element (grid-stride loop over `total`).
// - sgd_update_many_kernel: every tensor of a model in ONE launch (a launch costs the host a few
//   microseconds; NIN has 18 parameter tensors). The tensors stay where they are; `tensors` is a
//   table of 4 numbers per tensor t:
//       tensors[4t + 0, 1, 2] = the addresses of its param, grad and buf (each a T*),
//       tensors[4t + 3]       = end[t], where its elements end when the tensors are laid end to end
//                               (tensor t holds the flat positions end[t-1] .. end[t]-1, end[-1] = 0),
//   and `settings` holds lr, momentum, weight_decay and nesterov (0 or 1) for each tensor, in T.
//   One thread per flat position (grid-stride loop over `total` = end[count-1]); a thread's positions
//   only grow, so the tensor it is in is found by moving t forward, never back.
// Each element is read and written by one thread only: deterministic, no atomics.
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise.
// T is float or double; lr, momentum and weight_decay arrive in T.

template <typename T>
__device__ inline void sgd_element(T& param, T grad, T& buf, T lr, T momentum, T weight_decay,
                                   bool nesterov) {
    const T g = grad + weight_decay * param;
    const T b = momentum * buf + g;
    buf = b;
    param -= lr * (nesterov ? g + momentum * b : b);
}

template <typename T, typename Index>
__global__ void sgd_update_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                  T* __restrict__ buf, Index total, T lr, T momentum,
                                  T weight_decay, int nesterov) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        sgd_element(param[e], grad[e], buf[e], lr, momentum, weight_decay, nesterov != 0);
    }
}

template <typename T, typename Index>
__global__ void sgd_update_many_kernel(const unsigned long long* __restrict__ tensors,
                                       const T* __restrict__ settings, Index total) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    int t = 0;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        while (e >= (Index)tensors[4 * t + 3]) ++t;          // the tensor holding position e
        const Index i = e - (t == 0 ? 0 : (Index)tensors[4 * t - 1]);
        T* param = reinterpret_cast<T*>(tensors[4 * t]);
        const T* grad = reinterpret_cast<const T*>(tensors[4 * t + 1]);
        T* buf = reinterpret_cast<T*>(tensors[4 * t + 2]);
        const T* s = settings + 4 * t;                       // lr, momentum, weight_decay, nesterov
        sgd_element(param[i], grad[i], buf[i], s[0], s[1], s[2], s[3] != T(0));
    }
}
