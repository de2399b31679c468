// effx family: Pixelated butterfly block-sparse matmul, multithreaded CPU kernels (layout in
// include/effx/pixelfly.h). Rows are processed in tiles; a thread owns a block-row of the
// output (forward) or a block-column of grad_x (backward), summing its blocks' products in an
// fp32 tile before one rounding store, so no two threads write the same values. grad_blocks
// is one small GEMM per stored block over all rows, parallel over blocks. bf16 runs on bf16
// pairs where the CPU has them (forward_bf16_pairs, backward_bf16_pairs).
#include "effx/pixelfly.h"

#include <algorithm>
#include <vector>

#include "bf16_gemm.h"
#include "block_gemm.h"
#include "scratch.h"

namespace effx {
namespace cpu {
namespace {

#include "block_gemm_variants.inc"

using block_gemm::MatA;
using block_gemm::MatB;
using block_gemm::MatC;
using block_gemm::Workspace;

constexpr int64_t kTileRows = 128;
// Rows per step of the grad_blocks reduction: bounds the packed panel of x.
constexpr int64_t kReduceRows = 512;
constexpr int64_t kSerialWork = int64_t{1} << 18;

int threads_for(const BlockSparseShape& s, int num_threads) {
  const int64_t work = s.rows * s.nnz * s.block * s.block;
  return work < kSerialWork ? 1 : std::max(1, num_threads);
}

template <class K, typename T>
void forward_impl(const BlockSparseShape& s, const T* x, const T* blocks_in,
                  const int64_t* row_offsets, const int64_t* col_indices, T* out,
                  int num_threads) {
  using Acc = typename block_gemm::AccOf<T>::type;
  if (s.rows == 0) return;
  const int64_t bs = s.block, n_out = s.out_features();
  const Acc* blocks = K::template weights<Acc>(blocks_in, s.nnz, bs, bs, false,
                                               scratch_vector<Acc, struct PixelflyBlocksAcc>(), num_threads);
  const int64_t tile = std::min(kTileRows, s.rows);
#pragma omp parallel num_threads(threads_for(s, num_threads))
  {
    Workspace<Acc> ws;
    std::vector<Acc> acc(bs * tile);
    for (int64_t t0 = 0; t0 < s.rows; t0 += tile) {
      const int64_t nt = std::min(tile, s.rows - t0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t rb = 0; rb < s.row_blocks; ++rb) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t e = row_offsets[rb]; e < row_offsets[rb + 1]; ++e) {
          // acc(a, t) += sum_b blocks[e, a, b] x[t0 + t, col*bs + b]
          K::run(bs, nt, bs, MatA<Acc>{blocks + e * bs * bs, bs, 1},
                 MatB<T>{x + t0 * s.x_row_stride + col_indices[e] * bs, 1, s.x_row_stride},
                 MatC<Acc>{acc.data(), tile, 1}, true, ws);
        }
        K::transpose_out(bs, nt, acc.data(), tile, out + t0 * n_out + rb * bs, n_out);  // rounded once
      }
    }
  }
}

template <class K, typename T>
void backward_impl(const BlockSparseShape& s, const T* dout, const T* x, const T* blocks_in,
                   const int64_t* row_offsets, const int64_t* col_indices, T* dx, T* dblocks,
                   int num_threads) {
  using Acc = typename block_gemm::AccOf<T>::type;
  const int64_t bs = s.block, n_out = s.out_features(), n_in = s.in_features();
  const Acc* blocks_t = K::template weights<Acc>(blocks_in, s.nnz, bs, bs, true,
                                                 scratch_vector<Acc, struct PixelflyBlocksAccT>(), num_threads);
  std::vector<int64_t> row_of(s.nnz);
  for (int64_t rb = 0; rb < s.row_blocks; ++rb)
    for (int64_t e = row_offsets[rb]; e < row_offsets[rb + 1]; ++e) row_of[e] = rb;
  const int threads = threads_for(s, num_threads);
  const int64_t tile = std::max<int64_t>(1, std::min(kTileRows, s.rows));
#pragma omp parallel num_threads(threads)
  {
    Workspace<Acc> ws;
    std::vector<Acc> acc(std::max(bs * tile, bs * bs));
    for (int64_t t0 = 0; t0 < s.rows; t0 += tile) {
      const int64_t nt = std::min(tile, s.rows - t0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t cb = 0; cb < s.col_blocks; ++cb) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t e = 0; e < s.nnz; ++e) {
          if (col_indices[e] != cb) continue;
          // acc(b, t) += sum_a blocks[e, a, b] dout[t0 + t, row*bs + a]
          K::run(bs, nt, bs, MatA<Acc>{blocks_t + e * bs * bs, bs, 1},
                 MatB<T>{dout + t0 * n_out + row_of[e] * bs, 1, n_out},
                 MatC<Acc>{acc.data(), tile, 1}, true, ws);
        }
        K::transpose_out(bs, nt, acc.data(), tile, dx + t0 * n_in + cb * bs, n_in);
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t e = 0; e < s.nnz; ++e) {
      std::fill(acc.begin(), acc.begin() + bs * bs, Acc(0));
      const int64_t rb = row_of[e], cb = col_indices[e];
      for (int64_t t0 = 0; t0 < s.rows; t0 += kReduceRows) {
        const int64_t nt = std::min(kReduceRows, s.rows - t0);
        // acc(a, b) += sum_t dout[t, rb*bs + a] x[t, cb*bs + b]
        K::run(bs, bs, nt, MatA<T>{dout + t0 * n_out + rb * bs, 1, n_out},
               MatB<T>{x + t0 * s.x_row_stride + cb * bs, s.x_row_stride, 1},
               MatC<Acc>{acc.data(), bs, 1}, true, ws);
      }
      for (int64_t v = 0; v < bs * bs; ++v)
        dblocks[e * bs * bs + v] = block_gemm::narrow<T>(acc[v]);
    }
  }
}

// Rows per tile of the bf16 forward.
constexpr int64_t kPairTileRows = 64;

// The bf16 forward on bf16 pairs (bf16_gemm.h: AMX tiles, else AVX512_BF16 vectors) where the
// CPU has them, the block size is even and x's rows start on pairs: the blocks packed once per
// call, then per (row tile, block-row) one gemm_sum over the row's stored blocks into fp32,
// rounded once. False where it does not apply.
bool forward_bf16_pairs(const BlockSparseShape& s, const BFloat16* x, const BFloat16* blocks,
                        const int64_t* row_offsets, const int64_t* col_indices, BFloat16* out, int num_threads) {
  const int64_t bs = s.block;
  if (bs % 2 != 0 || !bf16::rows_as_pairs(x, s.rows, s.x_row_stride)) return false;
  const int64_t words = bf16::packed_words(bs, bs / 2), n_out = s.out_features();
  uint32_t* packed = scratch<uint32_t, struct PixelflyBlockPairs>(s.nnz * words);
  const int64_t tiles = (s.rows + kPairTileRows - 1) / kPairTileRows;
#pragma omp parallel num_threads(threads_for(s, num_threads))
  {
#pragma omp for schedule(static)
    for (int64_t e = 0; e < s.nnz; ++e) bf16::pack_columns(bs, bs / 2, blocks + e * bs * bs, bs, packed + e * words);
    float* acc = scratch<float, struct PixelflyTile>(kPairTileRows * bs);
    std::vector<const uint32_t*> a, b;
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(x);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * s.row_blocks; ++item) {
      const int64_t t0 = item / s.row_blocks * kPairTileRows, rb = item % s.row_blocks;
      const int64_t nt = std::min(kPairTileRows, s.rows - t0);
      a.clear();
      b.clear();
      for (int64_t e = row_offsets[rb]; e < row_offsets[rb + 1]; ++e) {
        a.push_back(xp + (t0 * s.x_row_stride + col_indices[e] * bs) / 2);
        b.push_back(packed + e * words);
      }
      // acc[t][a] = sum_e sum_b x[t0 + t, col_e * bs + b] blocks[e, a, b]
      bf16::gemm_sum(nt, bs, bs / 2, static_cast<int64_t>(a.size()), a.data(), s.x_row_stride / 2, b.data(), 1.0f,
                     acc, bs, false);
      for (int64_t t = 0; t < nt; ++t) bf16::round_to_bf16(acc + t * bs, bs, bs, out + (t0 + t) * n_out + rb * bs);
    }
  }
  return true;
}

// The bf16 backward on bf16 pairs, where forward_bf16_pairs runs: grad_x per (row tile,
// block-column) as one gemm_sum over the column's stored blocks (grad_out's block-row slices
// times the blocks packed along their rows), rounded once; grad_blocks per stored block, reduced
// over the rows kReduceRows at a time (gemm_tokens) in fp32. False where it does not apply.
bool backward_bf16_pairs(const BlockSparseShape& s, const BFloat16* dout, const BFloat16* x, const BFloat16* blocks,
                         const int64_t* row_offsets, const int64_t* col_indices, BFloat16* dx, BFloat16* dblocks,
                         int num_threads) {
  const int64_t bs = s.block;
  if (bs % 2 != 0 || !bf16::rows_as_pairs(x, s.rows, s.x_row_stride) || reinterpret_cast<uintptr_t>(dout) % 4 != 0) {
    return false;
  }
  const int64_t words = bf16::packed_words(bs, bs / 2), n_out = s.out_features(), n_in = s.in_features();
  const int64_t xs = s.x_row_stride;
  // The stored blocks by block-column (CSC order) and each one's block-row.
  std::vector<int64_t> row_of(s.nnz), col_start(s.col_blocks + 1, 0), by_col(s.nnz);
  for (int64_t rb = 0; rb < s.row_blocks; ++rb)
    for (int64_t e = row_offsets[rb]; e < row_offsets[rb + 1]; ++e) row_of[e] = rb;
  for (int64_t e = 0; e < s.nnz; ++e) ++col_start[col_indices[e] + 1];
  for (int64_t cb = 0; cb < s.col_blocks; ++cb) col_start[cb + 1] += col_start[cb];
  std::vector<int64_t> fill(col_start.begin(), col_start.end() - 1);
  for (int64_t e = 0; e < s.nnz; ++e) by_col[fill[col_indices[e]]++] = e;

  uint32_t* packed = scratch<uint32_t, struct PixelflyBlockRowPairs>(s.nnz * words);
  const int64_t tiles = (s.rows + kPairTileRows - 1) / kPairTileRows;
  const uint32_t* doutp = reinterpret_cast<const uint32_t*>(dout);
#pragma omp parallel num_threads(threads_for(s, num_threads))
  {
#pragma omp for schedule(static)
    for (int64_t e = 0; e < s.nnz; ++e) bf16::pack_rows(bs, bs, blocks + e * bs * bs, bs, packed + e * words);
    float* acc = scratch<float, struct PixelflyTile>(std::max(kPairTileRows, bs) * bs);
    std::vector<const uint32_t*> a, b;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * s.col_blocks; ++item) {
      const int64_t t0 = item / s.col_blocks * kPairTileRows, cb = item % s.col_blocks;
      const int64_t nt = std::min(kPairTileRows, s.rows - t0);
      a.clear();
      b.clear();
      for (int64_t k = col_start[cb]; k < col_start[cb + 1]; ++k) {
        a.push_back(doutp + (t0 * n_out + row_of[by_col[k]] * bs) / 2);
        b.push_back(packed + by_col[k] * words);
      }
      // acc[t][b] = sum_e sum_a dout[t0 + t, row_e * bs + a] blocks[e, a, b]
      bf16::gemm_sum(nt, bs, bs / 2, static_cast<int64_t>(a.size()), a.data(), n_out / 2, b.data(), 1.0f, acc, bs,
                     false);
      for (int64_t t = 0; t < nt; ++t) bf16::round_to_bf16(acc + t * bs, bs, bs, dx + (t0 + t) * n_in + cb * bs);
    }
    constexpr int64_t kReducePairs = kReduceRows / 2;
    uint32_t* at = scratch<uint32_t, struct PixelflyTokenPairsA>(bs * kReducePairs);
    uint32_t* bt = scratch<uint32_t, struct PixelflyTokenPairsB>(bf16::packed_words(bs, kReducePairs));
#pragma omp for schedule(dynamic, 1)
    for (int64_t e = 0; e < s.nnz; ++e) {
      // acc[a][b] = sum_t dout[t, row_e * bs + a] x[t, col_e * bs + b]
      for (int64_t t0 = 0; t0 < s.rows; t0 += kReduceRows) {
        bf16::gemm_tokens(std::min(kReduceRows, s.rows - t0), bs, bs, dout + t0 * n_out + row_of[e] * bs, n_out,
                          x + t0 * xs + col_indices[e] * bs, xs, at, bt, acc, bs, t0 > 0);
      }
      bf16::round_to_bf16(acc, bs * bs, bs * bs, dblocks + e * bs * bs);
    }
  }
  return true;
}

template <typename T>
void forward_typed(const BlockSparseShape& s, const void* x, const void* blocks,
                   const int64_t* ro, const int64_t* ci, void* out, int threads) {
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(blocks);
  T* ot = static_cast<T*>(out);
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (forward_bf16_pairs(s, xt, bt, ro, ci, ot, threads)) return;
  }
  switch (block_gemm::best_isa()) {
    case block_gemm::Isa::Avx512:
      return forward_impl<isa_avx512::Kernels>(s, xt, bt, ro, ci, ot, threads);
    case block_gemm::Isa::Avx2:
      return forward_impl<isa_avx2::Kernels>(s, xt, bt, ro, ci, ot, threads);
    case block_gemm::Isa::Baseline:
      return forward_impl<isa_baseline::Kernels>(s, xt, bt, ro, ci, ot, threads);
  }
}

template <typename T>
void backward_typed(const BlockSparseShape& s, const void* dout, const void* x,
                    const void* blocks, const int64_t* ro, const int64_t* ci, void* dx,
                    void* dblocks, int threads) {
  auto in = [](const void* p) { return static_cast<const T*>(p); };
  auto out = [](void* p) { return static_cast<T*>(p); };
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (backward_bf16_pairs(s, in(dout), in(x), in(blocks), ro, ci, out(dx), out(dblocks), threads)) return;
  }
  switch (block_gemm::best_isa()) {
    case block_gemm::Isa::Avx512:
      return backward_impl<isa_avx512::Kernels>(s, in(dout), in(x), in(blocks), ro, ci, out(dx),
                                                out(dblocks), threads);
    case block_gemm::Isa::Avx2:
      return backward_impl<isa_avx2::Kernels>(s, in(dout), in(x), in(blocks), ro, ci, out(dx),
                                              out(dblocks), threads);
    case block_gemm::Isa::Baseline:
      return backward_impl<isa_baseline::Kernels>(s, in(dout), in(x), in(blocks), ro, ci,
                                                  out(dx), out(dblocks), threads);
  }
}

}  // namespace

void block_sparse_forward(const BlockSparseShape& s, DType dtype, const void* x,
                          const void* blocks, const int64_t* row_offsets,
                          const int64_t* col_indices, void* out, int num_threads) {
  switch (dtype) {
    case DType::Float32:
      return forward_typed<float>(s, x, blocks, row_offsets, col_indices, out, num_threads);
    case DType::Float16:
      return forward_typed<Half>(s, x, blocks, row_offsets, col_indices, out, num_threads);
    case DType::BFloat16:
      return forward_typed<BFloat16>(s, x, blocks, row_offsets, col_indices, out, num_threads);
    case DType::Float64:
      return forward_typed<double>(s, x, blocks, row_offsets, col_indices, out, num_threads);
  }
}

void block_sparse_backward(const BlockSparseShape& s, DType dtype, const void* grad_out,
                           const void* x, const void* blocks, const int64_t* row_offsets,
                           const int64_t* col_indices, void* grad_x, void* grad_blocks,
                           int num_threads) {
  switch (dtype) {
    case DType::Float32:
      return backward_typed<float>(s, grad_out, x, blocks, row_offsets, col_indices, grad_x,
                                   grad_blocks, num_threads);
    case DType::Float16:
      return backward_typed<Half>(s, grad_out, x, blocks, row_offsets, col_indices, grad_x,
                                  grad_blocks, num_threads);
    case DType::BFloat16:
      return backward_typed<BFloat16>(s, grad_out, x, blocks, row_offsets, col_indices, grad_x,
                                      grad_blocks, num_threads);
    case DType::Float64:
      return backward_typed<double>(s, grad_out, x, blocks, row_offsets, col_indices, grad_x,
                                    grad_blocks, num_threads);
  }
}

}  // namespace cpu
}  // namespace effx
