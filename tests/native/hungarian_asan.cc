// tests/test_assignment.py builds this with -fsanitize=address,undefined against csrc/hungarian.cc and runs
// it on matrices the test writes: argv[1] holds records of int64 batch, rows, cols, then int32
// counts[batch], then float32 cost[batch * rows * cols]; argv[2] gets, per record, int32
// rows_out[batch * k] then cols_out[batch * k] (k = min(rows, cols)). Every buffer is sized exactly, so a
// read or write past one is an AddressSanitizer error; the test compares the pairs with scipy's.
#include <cstdio>
#include <vector>

#include "bf16_gemm.h"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t shape[3];
  while (std::fread(shape, sizeof(int64_t), 3, in) == 3) {
    const int64_t batch = shape[0], rows = shape[1], cols = shape[2], k = rows < cols ? rows : cols;
    std::vector<int32_t> counts(batch), r(batch * k), c(batch * k);
    std::vector<float> cost(batch * rows * cols);
    if ((!counts.empty() && std::fread(counts.data(), sizeof(int32_t), counts.size(), in) != counts.size()) ||
        (!cost.empty() && std::fread(cost.data(), sizeof(float), cost.size(), in) != cost.size()))
      return 3;
    if (san_linear_sum_assignment(batch, rows, cols, cost.data(), counts.data(), r.data(), c.data()) != 0) return 4;
    if (!r.empty()) std::fwrite(r.data(), sizeof(int32_t), r.size(), out);
    if (!c.empty()) std::fwrite(c.data(), sizeof(int32_t), c.size(), out);
  }
  std::fclose(in);
  std::fclose(out);
  return 0;
}
