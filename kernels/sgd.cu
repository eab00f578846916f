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

// The same update for many tensors in ONE launch (a launch costs the host a few microseconds; NIN
// has 18 parameter tensors). The tensors stay where they are: the kernel gets their addresses and
// settings in a struct passed BY VALUE, which travels with the launch like any argument (nothing is
// copied to the device first), as PyTorch's multi-tensor optimisers do; SGD_TENSORS of them a launch.
// Tensor t holds the flat positions end[t-1] .. end[t]-1 when the tensors are laid end to end
// (end[-1] = 0). One thread per flat position (grid-stride loop over `total`, the last end); a
// thread's positions only grow, so it finds the tensor holding each one by moving t forward. Each
// element is then updated by the four lines of sgd_update_kernel, by this one thread only.

constexpr int SGD_TENSORS = 32;  // gpu_kernels._SGD_TENSORS says the same

template <typename T>
struct SgdTensors {
    unsigned long long param[SGD_TENSORS];  // the address of tensor t's param (a T*)
    unsigned long long grad[SGD_TENSORS];   // ... of its gradient
    unsigned long long buf[SGD_TENSORS];    // ... of its momentum buffer
    long long end[SGD_TENSORS];             // where its flat positions end
    T lr[SGD_TENSORS];
    T momentum[SGD_TENSORS];
    T weight_decay[SGD_TENSORS];
    int nesterov[SGD_TENSORS];
};

template <typename T, typename Index>
__global__ void sgd_update_many_kernel(const SgdTensors<T> tensors, Index total) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    int t = 0;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        while (e >= (Index)tensors.end[t]) ++t;              // the tensor holding position e
        const Index i = e - (t == 0 ? 0 : (Index)tensors.end[t - 1]);
        T* param = reinterpret_cast<T*>(tensors.param[t]);
        const T* grad = reinterpret_cast<const T*>(tensors.grad[t]);
        T* buf = reinterpret_cast<T*>(tensors.buf[t]);
        const T weight_decay = tensors.weight_decay[t], momentum = tensors.momentum[t];
        const T g = grad[i] + weight_decay * param[i];
        const T b = momentum * buf[i] + g;
        buf[i] = b;
        param[i] -= tensors.lr[t] * (tensors.nesterov[t] ? g + momentum * b : b);
    }
}
