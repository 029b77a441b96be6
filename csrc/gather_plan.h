// gather_plan.h -- torch-free geometry + wave planner shared by the CPU and CUDA
// implementations of minitron::compact_ (in-place structured gather).
//
// Problem: a contiguous row-major matrix X[R, C] lives at `base`. Given a sorted,
// unique index of length k we want, in the SAME buffer, the contiguous result
//   dim == 0:  Y[k, C] = X[index, :]      (keep rows)
//   dim == 1:  Y[R, k] = X[:, index]      (keep columns)
// Flatten Y: output element q (0 <= q < N_out) comes from input element src(q):
//   dim 0: q = a*C + b  -> src = index[a]*C + b
//   dim 1: q = a*k + b  -> src = a*C + index[b]
// Because index is sorted and unique (index[i] >= i) and k <= size, src is strictly
// increasing and src(q) >= q. Hence the "gap" g(q) = src(q) - q is non-decreasing.
//
// Wave schedule (what makes the in-place copy race-free even when all copies of a
// wave run in parallel, on CPU threads or on GPU blocks):
//   * skip the identity prefix (g == 0: element already in place);
//   * at the first unprocessed q0 with gap g:
//       - if g >= stage_cap: DIRECT wave [q0, q0 + min(g, N_out - q0)). Every destination
//         in it is < q0 + g = src(q0) <= every source of this or any later wave, so the
//         wave's writes never touch a value that is still to be read.
//       - else: STAGED wave [q0, q0 + min(stage_cap, N_out - q0)). Sources are first gathered
//         into a staging buffer (reads only), then scattered to the destinations (writes
//         only). Later waves read src(q) >= src(q0 + L) >= q0 + L, beyond every write.
// The number of waves is small: once g >= stage_cap the gap keeps growing (for a
// keep ratio p, g(q) ~ q*(1-p)/p), so DIRECT waves grow geometrically.
#pragma once
#include <cstdint>

namespace minitron {

struct GatherGeom {
  int64_t R = 0;        // input rows
  int64_t C = 0;        // input cols
  int64_t dim = 0;      // 0: keep rows, 1: keep cols
  int64_t k = 0;        // len(index)
  const int64_t* idx = nullptr;  // host copy of index (sorted, unique, in range)

  int64_t out_cols() const { return dim == 0 ? C : k; }
  int64_t out_rows() const { return dim == 0 ? k : R; }
  int64_t n_out() const { return out_rows() * out_cols(); }
  int64_t src(int64_t q) const {
    const int64_t oc = out_cols();
    const int64_t a = q / oc, b = q - a * oc;
    return dim == 0 ? idx[a] * C + b : a * C + idx[b];
  }
  // First output element that is not already in place (n_out() if none).
  int64_t first_moved() const {
    if (dim == 0) {
      int64_t i = 0;
      while (i < k && idx[i] == i) ++i;
      return i * C;  // == n_out() when every kept row is already in place
    }
    if (k == C || R == 0) return n_out();  // all columns kept: identity
    int64_t j = 0;
    while (j < k && idx[j] == j) ++j;
    return j;  // row 0, column j; rows >= 1 always move because C > k
  }
};

// Check that idx is strictly increasing and inside [0, size). Returns 0 if ok,
// 1: out of range, 2: duplicate, 3: unsorted.
inline int check_index(const int64_t* idx, int64_t k, int64_t size) {
  for (int64_t i = 0; i < k; ++i) {
    if (idx[i] < 0 || idx[i] >= size) return 1;
    if (i > 0 && idx[i] == idx[i - 1]) return 2;
    if (i > 0 && idx[i] < idx[i - 1]) return 3;
  }
  return 0;
}

// Run the wave schedule. `direct(q0, q1)` must copy Y[q] = X[src(q)] for q in [q0,q1)
// (safe to parallelise freely). `staged(q0, q1)` must gather X[src(q)] into a staging
// buffer and then write it to Y[q0:q1] (q1 - q0 <= stage_cap).
// Returns the number of waves (for tests / debugging).
template <class Direct, class Staged>
int64_t run_waves(const GatherGeom& g, int64_t stage_cap, Direct&& direct, Staged&& staged) {
  if (stage_cap < 1) stage_cap = 1;
  const int64_t n = g.n_out();
  int64_t q = g.first_moved();
  int64_t waves = 0;
  while (q < n) {
    const int64_t gap = g.src(q) - q;  // > 0 here, non-decreasing in q
    int64_t len;
    if (gap >= stage_cap) {
      len = gap < n - q ? gap : n - q;
      direct(q, q + len);
    } else {
      len = stage_cap < n - q ? stage_cap : n - q;
      staged(q, q + len);
    }
    q += len;
    ++waves;
  }
  return waves;
}

}  // namespace minitron
