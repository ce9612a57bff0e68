// The matcher's minimum-cost assignment (san_jax/losses/matcher.py) as native code, so the train step needs
// no host callback: JAX never writes a program with a host callback to its persistent compilation cache, and
// the callback is a round trip through Python (and its GIL) in every step.
//
// The answer must be scipy.optimize.linear_sum_assignment's, pair for pair, ties included (the matcher has
// always returned scipy's assignment, and the golden cases were made with it). So this is the method scipy
// runs (the shortest augmenting path algorithm of D. F. Crouse, "On implementing 2D rectangular assignment
// algorithms", IEEE TAES 52(4), 2016) with the same choices wherever the algorithm leaves one open, and the
// same float64 arithmetic in the same order:
//   - costs are widened to float64 (scipy converts its input with NPY_DOUBLE); a matrix with more rows than
//     columns is solved transposed, and the pairs are then listed by ascending row;
//   - rows are added one at a time, in order; each search keeps the not yet reached columns in a list that
//     starts in descending order and loses its chosen entry by moving the list's last entry into its slot;
//   - a search reaches, among the columns of least reduced distance, the first in that list's order, unless
//     a later one of the same distance is still unassigned (it ends the search);
//   - reduced distances are `min + c[i][j] - u[i] - v[j]`, evaluated left to right, and the dual updates are
//     u[cur] += min, u[i] += min - d[col of i] for the other reached rows, v[j] -= min - d[j].
// Non-finite costs are first replaced as the Python path does it, in float32 (np.nan_to_num(block, nan=0,
// posinf=1e30, neginf=-1e30)): a diverged step's assignment is arbitrary but defined, and the step discards
// its update anyway. tests/test_assignment.py compares every pair with scipy.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "bf16_gemm.h"

namespace {

double Widen(float x) {
  if (std::isnan(x)) return 0.0;
  if (std::isinf(x)) return x > 0 ? static_cast<double>(1e30f) : static_cast<double>(-1e30f);
  return static_cast<double>(x);
}

// Solves one matrix given as n rows of m >= n float64 costs (row-major): fills row_to_col[n]. Returns false
// when no finite assignment exists (cannot happen for finite costs; kept for a defined answer).
class ShortestAugmentingPath {
 public:
  bool Solve(const std::vector<double>& c, int64_t n, int64_t m, std::vector<int64_t>& row_to_col) {
    const double inf = std::numeric_limits<double>::infinity();
    u_.assign(n, 0.0);
    v_.assign(m, 0.0);
    dist_.resize(m);
    pred_.assign(m, -1);
    col_to_row_.assign(m, -1);
    row_to_col.assign(n, -1);
    row_reached_.resize(n);
    col_reached_.resize(m);
    open_.resize(m);
    for (int64_t cur = 0; cur < n; ++cur) {
      std::fill(row_reached_.begin(), row_reached_.end(), 0);
      std::fill(col_reached_.begin(), col_reached_.end(), 0);
      std::fill(dist_.begin(), dist_.end(), inf);
      for (int64_t k = 0; k < m; ++k) open_[k] = m - 1 - k;
      int64_t num_open = m, row = cur, sink = -1;
      double shortest = 0.0;
      while (sink < 0) {
        row_reached_[row] = 1;
        int64_t pick = -1;
        double lowest = inf;
        const double* c_row = c.data() + row * m;
        for (int64_t k = 0; k < num_open; ++k) {
          const int64_t j = open_[k];
          const double d = shortest + c_row[j] - u_[row] - v_[j];
          if (d < dist_[j]) {
            dist_[j] = d;
            pred_[j] = row;
          }
          if (dist_[j] < lowest || (dist_[j] == lowest && col_to_row_[j] < 0)) {
            lowest = dist_[j];
            pick = k;
          }
        }
        shortest = lowest;
        if (shortest == inf) return false;
        const int64_t j = open_[pick];
        col_reached_[j] = 1;
        open_[pick] = open_[--num_open];
        if (col_to_row_[j] < 0) {
          sink = j;
        } else {
          row = col_to_row_[j];
        }
      }
      u_[cur] += shortest;
      for (int64_t i = 0; i < n; ++i)
        if (row_reached_[i] && i != cur) u_[i] += shortest - dist_[row_to_col[i]];
      for (int64_t j = 0; j < m; ++j)
        if (col_reached_[j]) v_[j] -= shortest - dist_[j];
      // Flip the path's edges back from the sink to the new row.
      for (int64_t j = sink;;) {
        const int64_t i = pred_[j];
        col_to_row_[j] = i;
        std::swap(row_to_col[i], j);
        if (i == cur) break;
      }
    }
    return true;
  }

 private:
  std::vector<double> u_, v_, dist_;
  std::vector<int64_t> pred_, col_to_row_, open_;
  std::vector<char> row_reached_, col_reached_;
};

}  // namespace

extern "C" int san_linear_sum_assignment(int64_t batch, int64_t rows, int64_t cols, const float* cost,
                                         const int32_t* counts, int32_t* rows_out, int32_t* cols_out) {
  if (batch < 0 || rows < 0 || cols < 0) return 1;
  const int64_t k = std::min(rows, cols);
  std::fill(rows_out, rows_out + batch * k, 0);
  std::fill(cols_out, cols_out + batch * k, 0);
  ShortestAugmentingPath solver;
  std::vector<double> c;
  std::vector<int64_t> assigned, order;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t used = std::clamp<int64_t>(counts[b], 0, cols);  // the block's valid columns
    if (rows == 0 || used == 0) continue;
    const float* src = cost + b * rows * cols;
    const bool transpose = used < rows;  // solve with the shorter side as rows
    const int64_t n = transpose ? used : rows, m = transpose ? rows : used;
    c.resize(n * m);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < used; ++j) c[transpose ? j * m + i : i * m + j] = Widen(src[i * cols + j]);
    if (!solver.Solve(c, n, m, assigned)) return 2;
    int32_t* r = rows_out + b * k;
    int32_t* t = cols_out + b * k;
    if (!transpose) {
      for (int64_t i = 0; i < n; ++i) {
        r[i] = static_cast<int32_t>(i);
        t[i] = static_cast<int32_t>(assigned[i]);
      }
    } else {  // assigned[target] = query: list the pairs by ascending query (the queries are distinct)
      order.resize(n);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t z) { return assigned[a] < assigned[z]; });
      for (int64_t p = 0; p < n; ++p) {
        r[p] = static_cast<int32_t>(assigned[order[p]]);
        t[p] = static_cast<int32_t>(order[p]);
      }
    }
  }
  return 0;
}
