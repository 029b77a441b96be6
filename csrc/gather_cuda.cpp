// gather_cuda.cpp -- torch glue for the CUDA implementation of minitron::compact_.
// Compiled only when torch has CUDA (setup.py / the JIT loader define MINITRON_WITH_CUDA);
// the kernels themselves are in gather_cuda_kernel.cu (plain CUDA, raw pointers).
#ifdef MINITRON_WITH_CUDA
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "gather_plan.h"

int minitron_compact_cuda_launch(void* base, int64_t elem_size, int64_t R, int64_t C,
                                 int64_t dim, int64_t k, const int64_t* idx_host,
                                 const int64_t* idx_dev, void* stage, int64_t stage_cap,
                                 void* stream);
int64_t minitron_cuda_stage_needed(int64_t R, int64_t C, int64_t dim, int64_t k,
                                   const int64_t* idx_host, int64_t stage_cap);
const char* minitron_cuda_error_string(int code);

namespace minitron {
GatherGeom make_geom(const at::Tensor& self, int64_t dim, const at::Tensor& index_cpu_contig);
int64_t stage_elems(int64_t stage_bytes, int64_t default_bytes, int64_t elem_size);

constexpr int64_t kDefaultCudaStageBytes = int64_t(32) << 20;  // 32 MiB staging cap

static void compact_cuda(at::Tensor self, int64_t dim, const at::Tensor& index,
                         int64_t stage_bytes) {
  TORCH_CHECK(self.is_cuda() && index.device() == self.device(),
              "minitron::compact_ (CUDA): index must be on the tensor's device");
  const c10::cuda::CUDAGuard guard(self.device());
  // Host copy of the index drives the wave schedule and validation (k int64s: tiny).
  at::Tensor idx_host = index.to(at::kCPU).contiguous();
  const GatherGeom g = make_geom(self, dim, idx_host);  // validates before any write
  if (self.numel() == 0) return;
  at::Tensor idx_dev = index.contiguous();
  const int64_t es = self.element_size();
  const int64_t cap = stage_elems(stage_bytes, kDefaultCudaStageBytes, es);
  const int64_t need = minitron_cuda_stage_needed(g.R, g.C, g.dim, g.k, g.idx, cap);
  at::Tensor stage;  // staging from the caching allocator: <= min(cap, need) elements
  if (need > 0) stage = at::empty({need * es}, self.options().dtype(at::kByte));
  c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(self.device().index());
  const int err = minitron_compact_cuda_launch(
      self.data_ptr(), es, g.R, g.C, g.dim, g.k, g.idx, idx_dev.data_ptr<int64_t>(),
      need > 0 ? stage.data_ptr() : nullptr, cap, stream.stream());
  TORCH_CHECK(err == 0, "minitron::compact_ CUDA launch failed: ", minitron_cuda_error_string(err));
  // `stage`/`idx_dev` are freed to the caching allocator, which is stream-ordered.
}
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) { m.impl("compact_", &minitron::compact_cuda); }
#endif  // MINITRON_WITH_CUDA
