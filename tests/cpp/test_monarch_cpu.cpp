// effx C++ test: Monarch CPU kernels (include/effx/monarch.h), torch-free. Compares forward
// and backward against a direct float64 evaluation of the formulas in monarch.h, on square,
// rectangular and odd shapes, strided x, 1 and several threads, in every storage dtype, and
// every instruction set this CPU runs.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "effx/monarch.h"

using effx::DType;
using effx::MonarchShape;

namespace {

struct Reference {
  std::vector<double> out, dx, dw1, dw2;
};

// Direct evaluation of monarch.h, one row at a time.
Reference reference(const MonarchShape& m, const std::vector<double>& x,
                    const std::vector<double>& w1, const std::vector<double>& w2,
                    const std::vector<double>& dout) {
  const int64_t n_in = m.n_in(), n_mid = m.n_mid(), n_out = m.n_out();
  Reference ref{std::vector<double>(m.rows * n_out), std::vector<double>(m.rows * n_in),
                std::vector<double>(w1.size()), std::vector<double>(w2.size())};
  std::vector<double> out1(n_mid), dout1(n_mid);
  for (int64_t t = 0; t < m.rows; ++t) {
    const double* xt = &x[t * m.x_row_stride];
    for (int64_t i = 0; i < m.k; ++i)
      for (int64_t a = 0; a < m.q; ++a) {
        double acc = 0;
        for (int64_t b = 0; b < m.p; ++b) acc += w1[(i * m.q + a) * m.p + b] * xt[i * m.p + b];
        out1[i * m.q + a] = acc;
      }
    std::fill(dout1.begin(), dout1.end(), 0.0);
    for (int64_t j = 0; j < m.l; ++j)
      for (int64_t d = 0; d < m.s; ++d) {
        double acc = 0;
        const double g = dout[t * n_out + d * m.l + j];
        for (int64_t c = 0; c < m.r; ++c) {
          acc += w2[(j * m.s + d) * m.r + c] * out1[c * m.l + j];
          ref.dw2[(j * m.s + d) * m.r + c] += g * out1[c * m.l + j];
          dout1[c * m.l + j] += g * w2[(j * m.s + d) * m.r + c];
        }
        ref.out[t * n_out + d * m.l + j] = acc;
      }
    for (int64_t i = 0; i < m.k; ++i)
      for (int64_t a = 0; a < m.q; ++a)
        for (int64_t b = 0; b < m.p; ++b) {
          ref.dx[t * n_in + i * m.p + b] += dout1[i * m.q + a] * w1[(i * m.q + a) * m.p + b];
          ref.dw1[(i * m.q + a) * m.p + b] += dout1[i * m.q + a] * xt[i * m.p + b];
        }
  }
  return ref;
}

template <typename T> T store(double v) { return effx::from_float<T>(static_cast<float>(v)); }
template <> double store<double>(double v) { return v; }
double load(double v) { return v; }
template <typename T> double load(T v) { return effx::to_float(v); }

double rel_error(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t e = 0; e < got.size(); ++e) {
    EFFX_EXPECT(std::isfinite(got[e]), "non-finite value at %zu", e);
    num += (got[e] - want[e]) * (got[e] - want[e]);
    den += want[e] * want[e];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

template <typename T>
void check(MonarchShape m, DType dtype, double tol, int threads) {
  std::mt19937 rng(static_cast<unsigned>(m.rows * 31 + m.k * 7 + m.q + m.l * 3 + m.s));
  std::normal_distribution<double> dist;
  auto draw = [&](size_t n) {
    std::vector<T> v(n);
    for (auto& e : v) e = store<T>(dist(rng));
    return v;
  };
  const auto x = draw(m.rows * m.x_row_stride), w1 = draw(m.k * m.q * m.p),
             w2 = draw(m.l * m.s * m.r), dout = draw(m.rows * m.n_out());
  auto wide = [](const std::vector<T>& v) {
    std::vector<double> d(v.size());
    for (size_t e = 0; e < v.size(); ++e) d[e] = load(v[e]);
    return d;
  };
  const Reference ref = reference(m, wide(x), wide(w1), wide(w2), wide(dout));
  std::vector<T> out(m.rows * m.n_out()), dx(m.rows * m.n_in()), dw1(w1.size()), dw2(w2.size());
  effx::cpu::monarch_forward(m, dtype, x.data(), w1.data(), w2.data(), out.data(), threads);
  effx::cpu::monarch_backward(m, dtype, dout.data(), x.data(), w1.data(), w2.data(), dx.data(),
                              dw1.data(), dw2.data(), threads);
  const char* name = effx::dtype_name(dtype);
  const double e_out = rel_error(wide(out), ref.out), e_dx = rel_error(wide(dx), ref.dx),
               e_dw1 = rel_error(wide(dw1), ref.dw1), e_dw2 = rel_error(wide(dw2), ref.dw2);
  EFFX_EXPECT(e_out <= tol, "%s forward rel error %g", name, e_out);
  EFFX_EXPECT(e_dx <= tol, "%s dx rel error %g", name, e_dx);
  EFFX_EXPECT(e_dw1 <= tol, "%s dw1 rel error %g", name, e_dw1);
  EFFX_EXPECT(e_dw2 <= tol, "%s dw2 rel error %g", name, e_dw2);
}

void check_all_dtypes(MonarchShape m, int threads) {
  check<double>(m, DType::Float64, 1e-12, threads);
  check<float>(m, DType::Float32, 1e-5, threads);
  check<effx::Half>(m, DType::Float16, 1e-2, threads);
  check<effx::BFloat16>(m, DType::BFloat16, 1e-2, threads);
}

void check_shapes() {
  // rows, (k, q, p), (l, s, r), x_row_stride
  check_all_dtypes({5, 4, 4, 4, 4, 4, 4, 16}, 1);             // square, sqrt(n) blocks
  check_all_dtypes({37, 3, 5, 7, 5, 2, 3, 21 + 4}, 2);        // rectangular, odd, strided x
  check_all_dtypes({300, 8, 16, 16, 8, 16, 16, 128}, 4);      // 3 row tiles shared by 4 threads
  check_all_dtypes({300, 8, 16, 16, 8, 16, 16, 128}, 2);      // whole tiles per thread
  check_all_dtypes({130, 2, 12, 9, 6, 5, 4, 18}, 3);          // l != k, chunked blocks
  check_all_dtypes({150, 20, 3, 5, 20, 4, 3, 103}, 2);        // l past a vector: the P2 transpose
  check_all_dtypes({1, 1, 1, 1, 1, 1, 1, 1}, 2);               // the smallest shape
  // bf16 on pairs (AVX512_BF16 / AMX): reductions of 18 pairs (a tile's 16 and 2 on vectors)
  // and 10; whole 32-pair reductions. Fewer row tiles than threads (these, and 300 rows over 4
  // threads above) run the forward with the threads sharing a tile's columns, each block packed
  // a chunk of columns at a time (q = 160: two chunks); 300 rows over 2 threads run whole tiles.
  check_all_dtypes({100, 4, 40, 36, 8, 22, 20, 150}, 2);
  check_all_dtypes({70, 2, 64, 64, 2, 64, 64, 128}, 2);
  check_all_dtypes({40, 2, 160, 4, 4, 6, 80, 8}, 2);
  // One tile's bf16 backward packs each weight a chunk of columns at a time: 136 columns in every
  // product (two chunks) and in the weight gradients; 25 rows, a zero pair half in the weight
  // gradients' reductions.
  check_all_dtypes({25, 2, 136, 136, 2, 6, 136, 272}, 2);
  // The many-tile bf16 backward with an odd last tile (273 rows: 17 in the last) and two blocks
  // over three threads (products split by column panels).
  check_all_dtypes({273, 2, 48, 40, 2, 96, 48, 82}, 3);
}

}  // namespace

int main() {
  // Every instruction-set variant of the kernels this CPU can run, widest last (avx512bf16 and
  // amx: bf16 on pairs, on vectors and on AMX tiles).
  for (const char* isa : {"baseline", "avx2", "avx512", "avx512bf16", "amx"}) {
    setenv("EFFX_CPU_ISA", isa, 1);
    check_shapes();
    std::printf("monarch cpu (ISA cap %s): ok\n", isa);
  }
  return 0;
}
