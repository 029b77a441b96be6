// gather_cuda_kernel.cu -- plain CUDA kernels + raw-pointer launcher for
// minitron::compact_ on CUDA. Deliberately torch-free (only cuda_runtime + gather_plan.h)
// so it compiles with bare nvcc, e.g. on a CPU-only torch install:
//   nvcc -std=c++17 -c csrc/gather_cuda_kernel.cu -o /tmp/k.o
// The torch-facing glue is csrc/gather_cuda.cpp (compiled only with a CUDA torch).
//
// Race freedom: the host walks the wave schedule of gather_plan.h. DIRECT waves copy
// in place with one kernel (no destination of the wave aliases any source of the wave
// or of later waves). STAGED waves use two kernels on the same stream: gather the wave's
// sources into a staging buffer (reads only from the tensor), then copy the staging
// buffer to the destinations (writes only). Stream order serialises waves.
#include <cuda_runtime.h>
#include <cstdint>

#include "gather_plan.h"

namespace {

struct DevGeom {
  int64_t C, oc, dim;
  const int64_t* idx;  // device index
};

__device__ __forceinline__ int64_t dev_src(const DevGeom& g, int64_t q) {
  const int64_t a = q / g.oc, b = q - a * g.oc;
  return g.dim == 0 ? g.idx[a] * g.C + b : a * g.C + g.idx[b];
}

// mode 0: base[q] = base[src(q)]         (DIRECT wave)
// mode 1: stage[q - q0] = base[src(q)]   (STAGED wave, gather step)
template <class T>
__global__ void gather_kernel(T* dst, const T* base, DevGeom g,
                              int64_t q0, int64_t q1, int64_t dst_off) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t q = q0 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < q1; q += stride)
    dst[q - dst_off] = base[dev_src(g, q)];
}

// STAGED wave, scatter step: base[q] = stage[q - q0]
template <class T>
__global__ void copy_kernel(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = src[i];
}

inline unsigned grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535) b = 65535;  // grid-stride loops cover the rest
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

template <class T>
cudaError_t run_typed(void* base_v, const minitron::GatherGeom& hg, const int64_t* idx_dev,
                      void* stage_v, int64_t stage_cap, cudaStream_t stream) {
  T* base = static_cast<T*>(base_v);
  T* stage = static_cast<T*>(stage_v);
  const DevGeom g{hg.C, hg.out_cols(), hg.dim, idx_dev};
  constexpr int kThreads = 256;
  cudaError_t err = cudaSuccess;
  auto direct = [&](int64_t q0, int64_t q1) {
    if (err != cudaSuccess) return;
    // dst and base alias on purpose, but the wave's writes and reads are disjoint.
    gather_kernel<T><<<grid_for(q1 - q0, kThreads), kThreads, 0, stream>>>(base, base, g, q0, q1, 0);
    err = cudaGetLastError();
  };
  auto staged = [&](int64_t q0, int64_t q1) {
    if (err != cudaSuccess) return;
    if (stage == nullptr) { err = cudaErrorInvalidValue; return; }
    gather_kernel<T><<<grid_for(q1 - q0, kThreads), kThreads, 0, stream>>>(stage, base, g, q0, q1, q0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return;
    copy_kernel<T><<<grid_for(q1 - q0, kThreads), kThreads, 0, stream>>>(base + q0, stage, q1 - q0);
    err = cudaGetLastError();
  };
  minitron::run_waves(hg, stage_cap, direct, staged);
  return err;
}

}  // namespace

// Raw-pointer launcher (C ABI-ish; called from gather_cuda.cpp).
//   base:      device pointer to the contiguous [R, C] tensor (modified in place)
//   elem_size: 1, 2, 4 or 8 bytes (dtype-agnostic bit copy)
//   idx_host:  host copy of the sorted unique index (drives the wave schedule)
//   idx_dev:   same index on the device (read by the kernels)
//   stage:     device staging buffer of stage_cap elements (may be null if the
//              schedule needs no staged wave; see minitron_cuda_needs_stage)
//   stream:    cudaStream_t to enqueue on (asynchronous; no sync here)
// Returns a cudaError_t code (0 = success).
int minitron_compact_cuda_launch(void* base, int64_t elem_size, int64_t R, int64_t C,
                                 int64_t dim, int64_t k, const int64_t* idx_host,
                                 const int64_t* idx_dev, void* stage, int64_t stage_cap,
                                 void* stream) {
  minitron::GatherGeom g;
  g.R = R; g.C = C; g.dim = dim; g.k = k; g.idx = idx_host;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (elem_size) {
    case 1: return run_typed<uint8_t>(base, g, idx_dev, stage, stage_cap, s);
    case 2: return run_typed<uint16_t>(base, g, idx_dev, stage, stage_cap, s);
    case 4: return run_typed<uint32_t>(base, g, idx_dev, stage, stage_cap, s);
    case 8: return run_typed<uint64_t>(base, g, idx_dev, stage, stage_cap, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Elements of staging the schedule needs (0 if it is all DIRECT waves / no-op), so the
// glue allocates only what is used.
int64_t minitron_cuda_stage_needed(int64_t R, int64_t C, int64_t dim, int64_t k,
                                   const int64_t* idx_host, int64_t stage_cap) {
  minitron::GatherGeom g;
  g.R = R; g.C = C; g.dim = dim; g.k = k; g.idx = idx_host;
  int64_t need = 0;
  minitron::run_waves(g, stage_cap, [](int64_t, int64_t) {},
                      [&](int64_t q0, int64_t q1) { if (q1 - q0 > need) need = q1 - q0; });
  return need;
}

const char* minitron_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
