// effx C++ benchmark: Pixelfly block-sparse matmul CPU kernels, torch-free. Square weights
// (n = 1024, 4096) of 32 x 32 blocks in the flat block-butterfly pattern of PixelflyLinear
// (butterfly 4, its default, and the full butterfly), 1024 rows, fp32: forward and backward
// (grad_x + grad_blocks) time, GFLOP/s counted from the stored blocks, GB/s of the operands,
// and the fraction of two roofs measured here: register-only FMA chains (effx::cpu::fma_peak)
// and the same kernel at full density (every block stored, i.e. a dense GEMM through this code).
// Before timing it checks the kernels against naive loops (a tiny irregular shape in full,
// sampled entries at every benchmarked shape) and exits 1 on a mismatch.
// --quick: n = 1024 only; --threads N: thread count (default: all cores).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "effx/peak.h"
#include "effx/pixelfly.h"
#include "timing.h"

namespace {

struct Csr {
  std::vector<int64_t> row_offsets, col_indices;
};

// Flat block butterfly of a square R x R grid (python/effx/pixelfly.py butterfly_layout):
// block (i, j) is present when i ^ j is 0 or a power of two below `size`.
Csr butterfly(int64_t r, int64_t size) {
  Csr c;
  c.row_offsets.push_back(0);
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      const int64_t d = i ^ j;
      if ((d & (d - 1)) == 0 && d < size) c.col_indices.push_back(j);
    }
    c.row_offsets.push_back(static_cast<int64_t>(c.col_indices.size()));
  }
  return c;
}

Csr dense(int64_t r) {
  Csr c;
  c.row_offsets.push_back(0);
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) c.col_indices.push_back(j);
    c.row_offsets.push_back(static_cast<int64_t>(c.col_indices.size()));
  }
  return c;
}

int64_t row_of(const Csr& c, int64_t e) {
  int64_t rb = 0;
  while (c.row_offsets[rb + 1] <= e) ++rb;
  return rb;
}

// Naive sums (fp64) of single entries, straight from the layout in include/effx/pixelfly.h.
double ref_out(const effx::BlockSparseShape& s, const Csr& c, const float* x, const float* blocks,
               int64_t t, int64_t o) {
  const int64_t bs = s.block, rb = o / bs, a = o % bs;
  double acc = 0;
  for (int64_t e = c.row_offsets[rb]; e < c.row_offsets[rb + 1]; ++e)
    for (int64_t b = 0; b < bs; ++b)
      acc += double(blocks[(e * bs + a) * bs + b]) * x[t * s.x_row_stride + c.col_indices[e] * bs + b];
  return acc;
}

double ref_dx(const effx::BlockSparseShape& s, const Csr& c, const float* dout, const float* blocks,
              int64_t t, int64_t i) {
  const int64_t bs = s.block, cb = i / bs, b = i % bs;
  double acc = 0;
  for (int64_t e = 0; e < s.nnz; ++e) {
    if (c.col_indices[e] != cb) continue;
    const int64_t rb = row_of(c, e);
    for (int64_t a = 0; a < bs; ++a)
      acc += double(blocks[(e * bs + a) * bs + b]) * dout[t * s.out_features() + rb * bs + a];
  }
  return acc;
}

double ref_dblock(const effx::BlockSparseShape& s, const Csr& c, const float* dout, const float* x,
                  int64_t e, int64_t a, int64_t b) {
  const int64_t bs = s.block, rb = row_of(c, e), cb = c.col_indices[e];
  double acc = 0;
  for (int64_t t = 0; t < s.rows; ++t)
    acc += double(dout[t * s.out_features() + rb * bs + a]) * x[t * s.x_row_stride + cb * bs + b];
  return acc;
}

// |got - want| within fp32 accumulation error of a `terms`-term sum of values of size ~`mag`.
bool close(double got, double want, int64_t terms, double mag) {
  return std::isfinite(got) && std::fabs(got - want) <= 1e-5 * std::sqrt(double(terms)) * mag + 1e-6 * std::fabs(want);
}

int failures = 0;

void expect(bool ok, const char* what, const effx::BlockSparseShape& s, int64_t i, int64_t j, double got,
            double want) {
  if (ok) return;
  if (++failures <= 10)
    std::printf("MISMATCH %s (rows %lld, block %lld, %lldx%lld blocks, nnz %lld) at (%lld, %lld): %.7g vs %.7g\n",
                what, (long long)s.rows, (long long)s.block, (long long)s.row_blocks, (long long)s.col_blocks,
                (long long)s.nnz, (long long)i, (long long)j, got, want);
}

struct Problem {
  effx::BlockSparseShape s;
  Csr c;
  std::vector<float> x, blocks, out, dout, dx, dblocks;
};

Problem make(int64_t rows, int64_t bs, int64_t rblocks, int64_t cblocks, Csr c, int64_t x_stride,
             std::mt19937& rng) {
  Problem p;
  const int64_t nnz = c.row_offsets.back();
  p.s = {rows, bs, rblocks, cblocks, nnz, x_stride};
  p.c = std::move(c);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  p.x.resize(rows * x_stride);
  p.blocks.resize(nnz * bs * bs);
  p.dout.resize(rows * p.s.out_features());
  for (auto* v : {&p.x, &p.blocks, &p.dout})
    for (auto& e : *v) e = u(rng);
  p.out.assign(rows * p.s.out_features(), 0.0f);
  p.dx.assign(rows * p.s.in_features(), 0.0f);
  p.dblocks.assign(nnz * bs * bs, 0.0f);
  return p;
}

void run_forward(Problem& p, int threads) {
  effx::cpu::block_sparse_forward(p.s, effx::DType::Float32, p.x.data(), p.blocks.data(), p.c.row_offsets.data(),
                                  p.c.col_indices.data(), p.out.data(), threads);
}

void run_backward(Problem& p, int threads) {
  effx::cpu::block_sparse_backward(p.s, effx::DType::Float32, p.dout.data(), p.x.data(), p.blocks.data(),
                                   p.c.row_offsets.data(), p.c.col_indices.data(), p.dx.data(), p.dblocks.data(),
                                   threads);
}

// Checks `samples` random entries of out, dx and dblocks (every entry when samples < 0).
void check(const Problem& p, int64_t samples, std::mt19937& rng) {
  const auto& s = p.s;
  const int64_t bs = s.block;
  auto each = [&](int64_t n0, int64_t n1, auto&& f) {
    if (samples < 0) {
      for (int64_t i = 0; i < n0; ++i)
        for (int64_t j = 0; j < n1; ++j) f(i, j);
    } else {
      for (int64_t k = 0; k < samples; ++k) f(int64_t(rng() % n0), int64_t(rng() % n1));
    }
  };
  const int64_t per_row = s.nnz / std::max<int64_t>(1, s.row_blocks) + 1;
  each(s.rows, s.out_features(), [&](int64_t t, int64_t o) {
    const double got = p.out[t * s.out_features() + o], want = ref_out(s, p.c, p.x.data(), p.blocks.data(), t, o);
    expect(close(got, want, per_row * bs, 1.0), "forward out", s, t, o, got, want);
  });
  const int64_t per_col = s.nnz / std::max<int64_t>(1, s.col_blocks) + 1;
  each(s.rows, s.in_features(), [&](int64_t t, int64_t i) {
    const double got = p.dx[t * s.in_features() + i], want = ref_dx(s, p.c, p.dout.data(), p.blocks.data(), t, i);
    expect(close(got, want, per_col * bs, 1.0), "backward grad_x", s, t, i, got, want);
  });
  if (s.nnz == 0) return;
  each(s.nnz, bs * bs, [&](int64_t e, int64_t ab) {
    const double got = p.dblocks[e * bs * bs + ab];
    const double want = ref_dblock(s, p.c, p.dout.data(), p.x.data(), e, ab / bs, ab % bs);
    expect(close(got, want, s.rows, 1.0), "backward grad_blocks", s, e, ab, got, want);
  });
}

}  // namespace

int main(int argc, char** argv) {
  const auto [quick, threads] = effx_bench::parse_options(argc, argv);
  std::mt19937 rng(0);

  // Correctness first: an irregular tiny shape (an empty block-row, an unused block-column,
  // repeated columns across rows, strided x) against naive loops at every entry.
  {
    Csr c{{0, 2, 2, 5}, {0, 3, 1, 3, 0}};
    Problem p = make(7, 8, 3, 5, c, 5 * 8 + 3, rng);
    run_forward(p, threads);
    run_backward(p, threads);
    check(p, -1, rng);
    // Every block present (2 x 3), 131 rows: more than one row tile.
    Problem d = make(131, 16, 2, 3, Csr{{0, 3, 6}, {0, 1, 2, 0, 1, 2}}, 48, rng);
    run_forward(d, threads);
    run_backward(d, threads);
    check(d, -1, rng);
  }

  const effx::cpu::FmaPeak peak = effx::cpu::fma_peak(threads);
  const double roof_gflops = peak.flops / 1e9;
  const int64_t bs = 32, rows = 1024;
  std::printf("fp32 FMA roof: %.1f GFLOP/s (%s), threads: %d; block %lld, rows %lld, fp32\n", roof_gflops, peak.isa,
              threads, (long long)bs, (long long)rows);

  // The kernel's own dense rate: every block of the n = 1024 grid stored.
  double dense_fwd = 0, dense_bwd = 0;
  std::printf("%-6s %-10s %8s %9s %9s %7s %6s %8s %9s %7s %6s\n", "n", "pattern", "density", "fwd ms", "GFLOP/s",
              "GB/s", "roof%", "bwd ms", "GFLOP/s", "roof%", "dense%");
  struct Case {
    int64_t n;
    const char* name;
    int64_t size;  // butterfly size in blocks; 0: dense
  };
  std::vector<Case> cases = {{1024, "dense", 0}, {1024, "bfly-4", 4}, {1024, "bfly-full", 1024 / bs}};
  if (!quick) {
    cases.push_back({4096, "bfly-4", 4});
    cases.push_back({4096, "bfly-full", 4096 / bs});
  }
  for (const Case& k : cases) {
    const int64_t r = k.n / bs;
    Problem p = make(rows, bs, r, r, k.size == 0 ? dense(r) : butterfly(r, k.size), k.n, rng);
    run_forward(p, threads);
    run_backward(p, threads);
    check(p, 48, rng);
    const double tf = effx_bench::median_seconds([&] { run_forward(p, threads); }, 2, 9);
    const double tb = effx_bench::median_seconds([&] { run_backward(p, threads); }, 2, 9);
    const double flops = 2.0 * rows * p.s.nnz * bs * bs;
    const double fwd_bytes = 4.0 * (p.x.size() + p.blocks.size() + p.out.size());
    const double gf = flops / tf / 1e9, gb = 2 * flops / tb / 1e9;
    if (k.size == 0) dense_fwd = gf, dense_bwd = gb;
    char dense_pct[32];
    std::snprintf(dense_pct, sizeof dense_pct, "%.0f/%.0f", 100 * gf / dense_fwd, 100 * gb / dense_bwd);
    std::printf("%-6lld %-10s %7.2f%% %9.3f %9.1f %7.1f %5.1f%% %8.3f %9.1f %6.1f%% %6s\n", (long long)k.n, k.name,
                100.0 * p.s.nnz / (r * r), tf * 1e3, gf, fwd_bytes / tf / 1e9, 100 * gf / roof_gflops, tb * 1e3, gb,
                100 * gb / roof_gflops, dense_pct);
  }
  std::printf("(dense%%: forward/backward GFLOP/s as a fraction of the same kernel at full density, n = 1024)\n");
  if (failures) {
    std::printf("FAILED: %d mismatches against the naive loops\n", failures);
    return 1;
  }
  std::printf("checks passed: forward, grad_x, grad_blocks against naive loops\n");
  return 0;
}
