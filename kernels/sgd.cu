// SGD with momentum, weight decay and optional Nesterov, in place: torch.optim.SGD with dampening 0.
//
// Each element e of a parameter, with its gradient and momentum buffer:
//   g        = grad[e] + weight_decay * param[e]
//   buf[e]   = momentum * buf[e] + g              (buf starts at 0, so the first step gives buf = g)
//   param[e] = param[e] - lr * (nesterov ? g + momentum * buf[e] : buf[e])
//
// Two kernels do this:
// - sgd_update_kernel: one tensor. One thread per element (grid-stride loop over `total`).
// - sgd_update_many_kernel: up to SGD_TENSORS tensors (all of NIN's 18) in ONE launch: a launch
//   costs the host a few microseconds. The tensors stay where they are; the kernel gets their
//   addresses and settings in a struct passed BY VALUE (it travels with the launch, like any
//   argument: nothing is copied to the device first), as PyTorch's multi-tensor optimisers do.
//   Tensor t holds the flat positions end[t-1] .. end[t]-1 when the tensors are laid end to end
//   (end[-1] = 0). One thread per flat position (grid-stride loop over `total` = the last end); a
//   thread's positions only grow, so it finds the tensor holding each one by moving t forward.
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

constexpr int SGD_TENSORS = 32;  // tensors one sgd_update_many_kernel launch takes (gpu_kernels.py too)

template <typename T>
struct SgdTensors {
    unsigned long long param[SGD_TENSORS];  // the address of tensor t's param (a T*)
    unsigned long long grad[SGD_TENSORS];   // ... of its grad
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
        sgd_element(param[i], grad[i], buf[i], tensors.lr[t], tensors.momentum[t],
                    tensors.weight_decay[t], tensors.nesterov[t] != 0);
    }
}
