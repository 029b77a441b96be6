// gather_cpu.cpp -- CPU kernel of minitron::compact_ (schema: minitron/ops/library.py) and the
// pybind11 module `minitron._C` (also built JIT by minitron/ops/_loader.py).
//
// Op contract (in-place, storage-level):
//   compact_(Tensor(a!) self, int dim, Tensor index, int stage_bytes=-1) -> ()
//   self: contiguous 2-D [R, C] (1-D [N] is handled as [1, N] with dim=1 by the caller)
//   After the call the first out_numel elements of self's memory hold the contiguous
//   result of self.index_select(dim, index); the remaining elements are unspecified
//   (left-over input data). self's shape is unchanged -- shrinking the storage and
//   re-viewing it is done by minitron/ops/gather.py (not traceable).
//   Extra memory: at most `stage_bytes` (default 4 MiB on CPU) of staging, see gather_plan.h.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "gather_plan.h"

namespace minitron {

constexpr int64_t kDefaultCpuStageBytes = int64_t(4) << 20;  // 4 MiB
constexpr int64_t kGrain = int64_t(1) << 16;                   // elements per task

// y[q - y_off] = x[src(q)] for q in [q0, q1). Caller guarantees no overlap between
// the written range and any source read by this call.
template <class T>
static void gather_range(const GatherGeom& g, const T* x, T* y, int64_t q0, int64_t q1,
                         int64_t y_off) {
  if (q0 >= q1) return;
  const int64_t oc = g.out_cols();
  int64_t a = q0 / oc, b = q0 - a * oc;
  int64_t q = q0;
  if (g.dim == 0) {
    while (q < q1) {  // contiguous pieces of kept rows
      const int64_t len = std::min<int64_t>(q1 - q, oc - b);
      std::memcpy(y + (q - y_off), x + g.idx[a] * g.C + b, size_t(len) * sizeof(T));
      q += len;
      ++a;
      b = 0;
    }
  } else {
    while (q < q1) {  // per row: kept columns
      const int64_t stop = std::min<int64_t>(q1 - q, oc - b);
      const T* xr = x + a * g.C;
      T* yr = y + (q - y_off) - b;
      for (int64_t j = b; j < b + stop; ++j) yr[j] = xr[g.idx[j]];
      q += stop;
      ++a;
      b = 0;
    }
  }
}

template <class T>
static int64_t compact_cpu_typed(T* base, const GatherGeom& g, int64_t stage_cap) {
  // Staging (<= stage_cap elements): allocated lazily, only if a staged wave occurs, and
  // not zero-filled, so only the pages actually used become resident.
  std::unique_ptr<T[]> stage;
  auto direct = [&](int64_t q0, int64_t q1) {
    at::parallel_for(q0, q1, kGrain, [&](int64_t b, int64_t e) {
      gather_range<T>(g, base, base, b, e, 0);
    });
  };
  auto staged = [&](int64_t q0, int64_t q1) {
    if (!stage) stage.reset(new T[size_t(std::min(stage_cap, g.n_out()))]);  // >= q1 - q0
    T* s = stage.get();
    at::parallel_for(q0, q1, kGrain, [&](int64_t b, int64_t e) {
      gather_range<T>(g, base, s, b, e, q0);  // reads only from base
    });
    at::parallel_for(q0, q1, kGrain, [&](int64_t b, int64_t e) {
      std::memcpy(base + b, s + (b - q0), size_t(e - b) * sizeof(T));  // writes only
    });
  };
  return run_waves(g, stage_cap, direct, staged);
}

static const char* index_problem(int code) {
  switch (code) {
    case 1: return "index out of range";
    case 2: return "index has duplicates";
    case 3: return "index is not sorted ascending";
    default: return "ok";
  }
}

// Shared argument checks (also used by the CUDA glue). Does not mutate anything.
GatherGeom make_geom(const at::Tensor& self, int64_t dim, const at::Tensor& index_cpu_contig) {
  TORCH_CHECK(self.dim() == 2, "minitron::compact_: expected a 2-D tensor, got ", self.dim(), "-D");
  TORCH_CHECK(dim == 0 || dim == 1, "minitron::compact_: dim must be 0 or 1, got ", dim);
  TORCH_CHECK(self.is_contiguous(), "minitron::compact_: tensor must be contiguous");
  TORCH_CHECK(index_cpu_contig.scalar_type() == at::kLong && index_cpu_contig.dim() == 1,
              "minitron::compact_: index must be a 1-D int64 tensor");
  const int64_t es = self.element_size();
  TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8,
              "minitron::compact_: unsupported element size ", es);
  GatherGeom g;
  g.R = self.size(0);
  g.C = self.size(1);
  g.dim = dim;
  g.k = index_cpu_contig.numel();
  g.idx = index_cpu_contig.data_ptr<int64_t>();
  const int code = check_index(g.idx, g.k, self.size(dim));
  TORCH_CHECK(code == 0, "minitron::compact_: ", index_problem(code));
  return g;
}

int64_t stage_elems(int64_t stage_bytes, int64_t default_bytes, int64_t elem_size) {
  const int64_t bytes = stage_bytes > 0 ? stage_bytes : default_bytes;
  return std::max<int64_t>(1, bytes / elem_size);
}

static void compact_cpu(at::Tensor self, int64_t dim, const at::Tensor& index,
                        int64_t stage_bytes) {
  TORCH_CHECK(self.device().is_cpu() && index.device().is_cpu(),
              "minitron::compact_ (CPU): tensor and index must be on the CPU");
  at::Tensor idx = index.contiguous();
  const GatherGeom g = make_geom(self, dim, idx);  // validates before any write
  if (self.numel() == 0) return;
  const int64_t es = self.element_size();
  const int64_t cap = stage_elems(stage_bytes, kDefaultCpuStageBytes, es);
  void* p = self.data_ptr();
  switch (es) {
    case 1: compact_cpu_typed(static_cast<uint8_t*>(p), g, cap); break;
    case 2: compact_cpu_typed(static_cast<uint16_t*>(p), g, cap); break;
    case 4: compact_cpu_typed(static_cast<uint32_t*>(p), g, cap); break;
    default: compact_cpu_typed(static_cast<uint64_t*>(p), g, cap); break;
  }
}

// Number of waves the schedule uses (testing / debugging aid; no data is touched).
static int64_t plan_waves(int64_t R, int64_t C, int64_t dim, const at::Tensor& index,
                          int64_t stage_cap) {
  at::Tensor idx = index.to(at::kCPU).to(at::kLong).contiguous();
  GatherGeom g;
  g.R = R; g.C = C; g.dim = dim; g.k = idx.numel(); g.idx = idx.data_ptr<int64_t>();
  return run_waves(g, stage_cap, [](int64_t, int64_t) {}, [](int64_t, int64_t) {});
}

// Shrink a CPU storage to new_nbytes WITHOUT copying, via realloc() of the block that
// c10's default CPU allocator got from posix_memalign (glibc shrinks in place: mremap for
// mmap'ed chunks, chunk split otherwise). Only done when the storage is resizable, owns
// its memory through the default CPU allocator's deleter, and new_nbytes <= nbytes.
// Returns false (storage untouched) when these conditions do not hold; the caller then
// uses the generic `untyped_storage().resize_()` (which copies the kept bytes).
static bool shrink_storage_cpu_(const at::Tensor& t, int64_t new_nbytes) {
  c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
  if (!t.device().is_cpu() || !impl->resizable()) return false;
  const int64_t old_nbytes = static_cast<int64_t>(impl->nbytes());
  if (new_nbytes < 0 || new_nbytes > old_nbytes) return false;
  if (new_nbytes == old_nbytes) return true;
  c10::DataPtr& dp = impl->mutable_data_ptr();
  void* p = dp.get();
  c10::Allocator* alloc = c10::GetDefaultCPUAllocator();
  c10::DeleterFnPtr del = alloc->raw_deleter();
  if (p == nullptr || del == nullptr || dp.get_context() != p || dp.get_deleter() != del)
    return false;
  if (new_nbytes == 0) {
    impl->set_data_ptr_noswap(alloc->allocate(0));  // frees the old block
    impl->set_nbytes(0);
    return true;
  }
  void* np = std::realloc(p, static_cast<size_t>(new_nbytes));
  if (np == nullptr) return false;  // old block still valid and unchanged
  if (np != p) {
    // realloc moved (and already freed) the block: drop the old DataPtr without freeing.
    (void)dp.release_context();  // DataPtr no longer owns (or frees) the old pointer
    impl->set_data_ptr_noswap(c10::DataPtr(np, np, del, c10::Device(c10::DeviceType::CPU)));
  }
  impl->set_nbytes(static_cast<size_t>(new_nbytes));
  return true;
}

#ifdef MINITRON_WITH_CUDA
bool cuda_kernels_compiled() { return true; }
#else
bool cuda_kernels_compiled() { return false; }
#endif

}  // namespace minitron

#ifndef MINITRON_EXT_ABI
#error "build with -DMINITRON_EXT_ABI=<n>: setup.py and the JIT loader pass it from minitron/ops/build_spec.py"
#endif
#define MINITRON_STR2(x) #x
#define MINITRON_STR(x) MINITRON_STR2(x)
// Read from the binary by minitron/ops/_loader.py BEFORE it imports this module (build_spec.EXT_ABI_TAG):
// loading a build whose registrations clash with the Python ones would abort the process.
extern "C" __attribute__((visibility("default"), used)) const char minitron_ext_abi[] =
    "minitron-ext-abi=" MINITRON_STR(MINITRON_EXT_ABI) ";";

// The schema of minitron::compact_, its fake kernel and its pure-PyTorch kernel are defined in
// Python at import (minitron/ops/library.py); this library only adds the CPU (and, in
// gather_cuda.cpp, CUDA) kernels. Registering an impl before the schema exists is allowed.
TORCH_LIBRARY_IMPL(minitron, CPU, m) { m.impl("compact_", &minitron::compact_cpu); }

namespace minitron {  // kd_cpu.cpp
torch::Tensor kd_forward_kl_chunk_cpu(torch::Tensor s, torch::Tensor t, c10::optional<torch::Tensor> row_scale,
                                      double temperature);
bool kd_forward_kl_fast_available();
}  // namespace minitron

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minitron C++/CUDA ops (in-place structured gather: torch.ops.minitron; fused KD chunk on CPU)";
  m.def("shrink_storage_cpu_", &minitron::shrink_storage_cpu_,
        "Shrink a CPU tensor's storage to nbytes in place via realloc; False if not possible");
  m.def("plan_waves", &minitron::plan_waves, "Number of copy waves for a given geometry");
  m.def("cuda_kernels_compiled", &minitron::cuda_kernels_compiled);
  m.def("kd_forward_kl_chunk_", &minitron::kd_forward_kl_chunk_cpu,
        "Fused forward-KL pass of one KD chunk (fp32 CPU logits); the gradient overwrites s",
        pybind11::arg("s"), pybind11::arg("t"), pybind11::arg("row_scale"), pybind11::arg("temperature"));
  m.def("kd_forward_kl_fast_available", &minitron::kd_forward_kl_fast_available,
        "Whether this CPU runs kd_forward_kl_chunk_ (AVX-512)");
  m.attr("EXT_ABI") = MINITRON_EXT_ABI;
}
