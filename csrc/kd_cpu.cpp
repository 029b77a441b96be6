// kd_cpu.cpp -- fused CPU kernel of one KD chunk's softmax/KL pass (forward KL), part of `minitron._C`.
//
// The pure-PyTorch reference (minitron/losses/kd/reference.py, kd_chunk_reference) makes about ten
// passes over the chunk's (c, V) fp32 logits (scale, max, exp, sum, log, subtract, exp, multiply,
// mask, sum) through (c, V) temporaries. This kernel reads each row three times and writes it once,
// with no temporary; one row of V = 49152 fp32 logits is 192 KiB per side, so passes 2 and 3 read L2:
//
//   pass 1: ms = max_j s_j / tau, mt = max_j t_j / tau
//   pass 2: lse_s = ms + log sum_j exp(s_j / tau - ms)                 (same for t); sums in fp64
//   pass 3: ls_j = s_j / tau - lse_s, lt_j = t_j / tau - lse_t, p_j = exp(lt_j)
//           loss  = tau^2 sum_j [p_j != 0] p_j (lt_j - ls_j)             (0 * inf from -inf logits -> 0)
//           grad_j = tau row_scale (exp(ls_j) - p_j), written over s_j   (only with a row_scale)
//
// The row loop is AVX-512 (kd_cpu_avx512.cpp, chosen at run time); without AVX-512 the Python
// side runs the reference instead (kd_forward_kl_fast_available() says which).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__)
extern "C" void minitron_kd_fkl_rows_avx512(float* s, const float* t, const float* row_scale, float* loss,
                                            int64_t r0, int64_t r1, int64_t v, float tau);
#endif

namespace minitron {

bool kd_forward_kl_fast_available() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Per-token forward KL (c,) of a chunk; with row_scale, the gradient w.r.t. s overwrites s.
torch::Tensor kd_forward_kl_chunk_cpu(torch::Tensor s, torch::Tensor t, c10::optional<torch::Tensor> row_scale,
                                      double temperature) {
  TORCH_CHECK(kd_forward_kl_fast_available(), "kd_forward_kl_chunk_: this CPU has no AVX-512 (use the reference)");
  TORCH_CHECK(s.device().is_cpu() && t.device().is_cpu(), "kd_forward_kl_chunk_: CPU tensors expected");
  TORCH_CHECK(s.scalar_type() == at::kFloat && t.scalar_type() == at::kFloat, "kd_forward_kl_chunk_: fp32 logits expected");
  TORCH_CHECK(s.dim() == 2 && s.sizes() == t.sizes(), "kd_forward_kl_chunk_: s and t must be (c, V) of one shape");
  TORCH_CHECK(s.is_contiguous() && t.is_contiguous(), "kd_forward_kl_chunk_: contiguous logits expected");
  TORCH_CHECK(temperature > 0, "kd_forward_kl_chunk_: temperature must be > 0");
  const int64_t c = s.size(0), v = s.size(1);
  torch::Tensor rs;
  if (row_scale.has_value() && row_scale->defined()) {
    rs = row_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(rs.numel() == c, "kd_forward_kl_chunk_: row_scale must have one value per row");
  }
  auto loss = torch::empty({c}, s.options());
#if defined(__x86_64__)
  float* sp = s.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const float* rp = rs.defined() ? rs.data_ptr<float>() : nullptr;
  float* lp = loss.data_ptr<float>();
  const float tau = static_cast<float>(temperature);
  at::parallel_for(0, c, 1, [&](int64_t r0, int64_t r1) {
    minitron_kd_fkl_rows_avx512(sp, tp, rp, lp, r0, r1, v, tau);
  });
#endif
  return loss;
}

}  // namespace minitron
