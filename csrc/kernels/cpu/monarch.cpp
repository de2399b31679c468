// effx family: Monarch structured matrices, multithreaded CPU kernels (layout in
// include/effx/monarch.h). Rows are processed in tiles of kTileRows; for each tile, stage 1
// (k blocks of w1) writes the intermediate out1 as [n_mid][tile] into a buffer that stays in
// cache, and stage 2 (l blocks of w2) reads it back through the P1 stride pattern, so out1
// never goes to memory. The forward's stage 2 writes a second tile buffer, which one transpose
// per output column group copies to out in whole vectors (the P2 permutation). The forward
// gives whole tiles to threads when there are enough of them. Otherwise, and in the backward,
// threads split each tile's stages by weight blocks (row chunks when blocks are fewer than
// threads), so the weight gradients need no reduction across threads. bf16 runs on bf16 pairs
// where the CPU has them (forward_bf16_pairs, forward_bf16_pairs_shared, backward_bf16_pairs).
#include "effx/monarch.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "bf16_gemm.h"
#include "block_gemm.h"
#include "scratch.h"

namespace effx {
namespace cpu {
namespace {

#include "block_gemm_variants.inc"

using block_gemm::chunk_begin;
using block_gemm::chunks_per_block;
using block_gemm::MatA;
using block_gemm::MatB;
using block_gemm::MatC;
using block_gemm::Workspace;

// Rows per tile: the tile's out1 (n_mid x 128 fp32, 2 MiB at n_mid = 4096) fits in L2/L3 while
// 128 rows amortize one read of the weights over 128 multiply-adds per weight.
constexpr int64_t kTileRows = 128;
// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kSerialWork = int64_t{1} << 18;

int threads_for(const MonarchShape& m, int num_threads) {
  const int64_t work = m.rows * (m.n_mid() * m.p + m.n_out() * m.r);
  return work < kSerialWork ? 1 : std::max(1, num_threads);
}

// Stage 1, work item `item` of k * chunks (block i, a row chunk of it):
// mid[(i*q + a) * tile + t] = sum_b w1[i, a, b] x[t0 + t, i*p + b].
template <class K, typename T, typename Acc>
void stage1_item(const MonarchShape& m, const Acc* w1, const T* x, int64_t t0, int64_t nt,
                 int64_t tile, Acc* mid, int64_t chunks, int64_t item, Workspace<Acc>& ws) {
  const int64_t i = item / chunks, ch = item % chunks;
  const int64_t a0 = chunk_begin(m.q, chunks, ch), a1 = chunk_begin(m.q, chunks, ch + 1);
  K::run(a1 - a0, nt, m.p, MatA<Acc>{w1 + (i * m.q + a0) * m.p, m.p, 1},
         MatB<T>{x + t0 * m.x_row_stride + i * m.p, 1, m.x_row_stride},
         MatC<Acc>{mid + (i * m.q + a0) * tile, tile, 1}, false, ws);
}

// Stage 2 of the forward, work item `item` of l * chunks, into the tile buffer:
// out2[(d*l + j) * tile + t] = sum_c w2[j, d, c] mid[(c*l + j) * tile + t].
template <class K, typename Acc>
void stage2_item(const MonarchShape& m, const Acc* w2, const Acc* mid, int64_t nt, int64_t tile,
                 Acc* out2, int64_t chunks, int64_t item, Workspace<Acc>& ws) {
  const int64_t j = item / chunks, ch = item % chunks;
  const int64_t d0 = chunk_begin(m.s, chunks, ch), d1 = chunk_begin(m.s, chunks, ch + 1);
  K::run(d1 - d0, nt, m.r, MatA<Acc>{w2 + (j * m.s + d0) * m.r, m.r, 1},
         MatB<Acc>{mid + j * tile, m.l * tile, 1}, MatC<Acc>{out2 + (d0 * m.l + j) * tile, m.l * tile, 1},
         false, ws);
}

// out[t0 + t, d*l + j] = out2[(d*l + j) * tile + t] for d in [d0, d1): the permutation P2, one
// l x nt transpose per d. Stage 2 writing out directly scattered every element to its own
// cache line (stride l along d, n_out along t).
template <class K, typename T, typename Acc>
void write_out(const MonarchShape& m, const Acc* out2, int64_t t0, int64_t nt, int64_t tile,
               int64_t d0, int64_t d1, T* out) {
  // Row bands of out outer: a band's rows are written front to back as d advances, a few
  // sequential streams instead of one per row of the tile.
  constexpr int64_t kBand = 16;
  for (int64_t b0 = 0; b0 < nt; b0 += kBand)
    for (int64_t d = d0; d < d1; ++d)
      K::transpose_out(m.l, std::min(kBand, nt - b0), out2 + d * m.l * tile + b0, tile,
                       out + (t0 + b0) * m.n_out() + d * m.l, m.n_out());
}

template <class K, typename T>
void forward_impl(const MonarchShape& m, const T* x, const T* w1_in, const T* w2_in, T* out,
                  int num_threads) {
  using Acc = typename block_gemm::AccOf<T>::type;
  if (m.rows == 0) return;
  // Weights in Acc (fp16/bf16 widened) in buffers kept between calls: fresh pages for them cost
  // ten times the products at 16 rows (fp16, n = 4096 in 4 blocks: 23 ms, fp32 2.2 ms).
  const Acc* w1 = K::template weights<Acc>(w1_in, m.k, m.q, m.p, false,
                                           scratch_vector<Acc, struct MonarchW1Acc>(), num_threads);
  const Acc* w2 = K::template weights<Acc>(w2_in, m.l, m.s, m.r, false,
                                           scratch_vector<Acc, struct MonarchW2Acc>(), num_threads);
  const int threads = threads_for(m, num_threads);
  const int64_t tile = std::min(kTileRows, m.rows);
  const int64_t tiles = (m.rows + tile - 1) / tile;

  if (tiles >= threads) {
    // Enough tiles for every thread: each runs whole tiles through both stages with its own
    // out1 buffer, and the only barrier is the region's end (no per-tile barrier to stall on
    // when another process holds a core).
#pragma omp parallel num_threads(threads)
    {
      Workspace<Acc> ws;
      std::vector<Acc> mid(m.n_mid() * tile), out2(m.n_out() * tile);
#pragma omp for schedule(dynamic, 1)
      for (int64_t tt = 0; tt < tiles; ++tt) {
        const int64_t t0 = tt * tile, nt = std::min(tile, m.rows - t0);
        for (int64_t i = 0; i < m.k; ++i) stage1_item<K>(m, w1, x, t0, nt, tile, mid.data(), 1, i, ws);
        for (int64_t j = 0; j < m.l; ++j) stage2_item<K>(m, w2, mid.data(), nt, tile, out2.data(), 1, j, ws);
        write_out<K>(m, out2.data(), t0, nt, tile, 0, m.s, out);
      }
    }
    return;
  }
  // Few rows: threads share each tile, split by weight blocks, with a barrier per stage.
  const int64_t c1 = chunks_per_block(m.k, m.q, threads), c2 = chunks_per_block(m.l, m.s, threads);
  std::vector<Acc> mid(m.n_mid() * tile), out2(m.n_out() * tile);
#pragma omp parallel num_threads(threads)
  {
    Workspace<Acc> ws;
    for (int64_t t0 = 0; t0 < m.rows; t0 += tile) {
      const int64_t nt = std::min(tile, m.rows - t0);
#pragma omp for schedule(static)
      for (int64_t item = 0; item < m.k * c1; ++item)
        stage1_item<K>(m, w1, x, t0, nt, tile, mid.data(), c1, item, ws);
#pragma omp for schedule(static)
      for (int64_t item = 0; item < m.l * c2; ++item)
        stage2_item<K>(m, w2, mid.data(), nt, tile, out2.data(), c2, item, ws);
#pragma omp for schedule(static)
      for (int64_t th = 0; th < threads; ++th)
        write_out<K>(m, out2.data(), t0, nt, tile, chunk_begin(m.s, threads, th),
                     chunk_begin(m.s, threads, th + 1), out);
    }
  }
}

template <class K, typename T>
void backward_impl(const MonarchShape& m, const T* dout, const T* x, const T* w1_in,
                   const T* w2_in, T* dx, T* dw1_out, T* dw2_out, int num_threads) {
  using Acc = typename block_gemm::AccOf<T>::type;
  const int64_t n_in = m.n_in(), n_out = m.n_out();
  const Acc* w1 = K::template weights<Acc>(w1_in, m.k, m.q, m.p, false,
                                           scratch_vector<Acc, struct MonarchW1Acc>(), num_threads);
  // The products with transposed weights (dmid, dx) take them as A. Over several row tiles a
  // transposed copy pays: A rows read along unit strides (n = 4096 in 4 blocks, 1024 rows,
  // fp32: 276-287 ms, in place 300-330). A single tile reads them in place, column-major: the
  // copies took 93 of 220 ms (n = 8192 in 4 blocks, 16 rows).
  const bool copies = m.rows > kTileRows;
  const Acc* w1t = copies ? K::template weights<Acc>(w1_in, m.k, m.q, m.p, true,
                                                     scratch_vector<Acc, struct MonarchW1AccT>(), num_threads)
                          : nullptr;
  const Acc* w2a = K::template weights<Acc>(w2_in, m.l, m.s, m.r, copies,
                                            scratch_vector<Acc, struct MonarchW2Acc>(), num_threads);
  // A(c, d) = w2[j, d, c] of block j and A(b, a) = w1[i, a, b] of block i, from either layout.
  auto w2_t = [&](int64_t j, int64_t c0) {
    return copies ? MatA<Acc>{w2a + (j * m.r + c0) * m.s, m.s, 1} : MatA<Acc>{w2a + j * m.s * m.r + c0, 1, m.r};
  };
  auto w1_t = [&](int64_t i, int64_t b0) {
    return copies ? MatA<Acc>{w1t + (i * m.p + b0) * m.q, m.q, 1} : MatA<Acc>{w1 + i * m.q * m.p + b0, 1, m.p};
  };
  // Weight gradients accumulate over tiles in Acc: in place for fp32/fp64, else in buffers.
  Acc* dw1;
  Acc* dw2;
  if constexpr (std::is_same_v<T, Acc>) {
    dw1 = dw1_out;
    dw2 = dw2_out;
  } else {
    dw1 = scratch<Acc, struct MonarchGradW1Acc>(m.k * m.q * m.p);
    dw2 = scratch<Acc, struct MonarchGradW2Acc>(m.l * m.s * m.r);
  }
  // The first tile's products store the weight gradients, later ones add to them: a separate
  // zeroing pass over fresh memory cost as much as the products at 16 rows.
  if (m.rows == 0) {
    std::fill(dw1, dw1 + m.k * m.q * m.p, Acc(0));
    std::fill(dw2, dw2 + m.l * m.s * m.r, Acc(0));
  } else {
    const int threads = threads_for(m, num_threads);
    const int64_t tile = std::min(kTileRows, m.rows);
    const int64_t c1 = chunks_per_block(m.k, std::min(m.q, m.p), threads);
    const int64_t c2 = chunks_per_block(m.l, std::min(m.r, m.s), threads);
    std::vector<Acc> mid(m.n_mid() * tile), dmid(m.n_mid() * tile);

#pragma omp parallel num_threads(threads)
    {
      Workspace<Acc> ws;
      for (int64_t t0 = 0; t0 < m.rows; t0 += tile) {
        const int64_t nt = std::min(tile, m.rows - t0);
        const T* dout_tile = dout + t0 * n_out;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < m.k * c1; ++item)
          stage1_item<K>(m, w1, x, t0, nt, tile, mid.data(), c1, item, ws);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < m.l * c2; ++item) {
          const int64_t j = item / c2, ch = item % c2;
          // dmid[(c*l + j) * tile + t] = sum_d w2[j, d, c] dout[t, d*l + j]
          const int64_t c0 = chunk_begin(m.r, c2, ch), c1e = chunk_begin(m.r, c2, ch + 1);
          K::run(c1e - c0, nt, m.s, w2_t(j, c0),
                 MatB<T>{dout_tile + j, m.l, n_out},
                 MatC<Acc>{dmid.data() + (c0 * m.l + j) * tile, m.l * tile, 1}, false, ws);
          // dw2[j, d, c] += sum_t dout[t, d*l + j] mid[(c*l + j) * tile + t]
          const int64_t d0 = chunk_begin(m.s, c2, ch), d1 = chunk_begin(m.s, c2, ch + 1);
          K::run(d1 - d0, m.r, nt, MatA<T>{dout_tile + d0 * m.l + j, m.l, n_out},
                 MatB<Acc>{mid.data() + j * tile, 1, m.l * tile},
                 MatC<Acc>{dw2 + (j * m.s + d0) * m.r, m.r, 1}, t0 > 0, ws);
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < m.k * c1; ++item) {
          const int64_t i = item / c1, ch = item % c1;
          // dx[t, i*p + b] = sum_a w1[i, a, b] dmid[(i*q + a) * tile + t]
          const int64_t b0 = chunk_begin(m.p, c1, ch), b1 = chunk_begin(m.p, c1, ch + 1);
          K::run(b1 - b0, nt, m.q, w1_t(i, b0),
                 MatB<Acc>{dmid.data() + i * m.q * tile, tile, 1},
                 MatC<T>{dx + t0 * n_in + i * m.p + b0, 1, n_in}, false, ws);
          // dw1[i, a, b] += sum_t dmid[(i*q + a) * tile + t] x[t, i*p + b]
          const int64_t a0 = chunk_begin(m.q, c1, ch), a1 = chunk_begin(m.q, c1, ch + 1);
          K::run(a1 - a0, m.p, nt, MatA<Acc>{dmid.data() + (i * m.q + a0) * tile, tile, 1},
                 MatB<T>{x + t0 * m.x_row_stride + i * m.p, m.x_row_stride, 1},
                 MatC<Acc>{dw1 + (i * m.q + a0) * m.p, m.p, 1}, t0 > 0, ws);
        }
      }
    }
  }
  if constexpr (!std::is_same_v<T, Acc>) {
    for (int64_t e = 0; e < m.k * m.q * m.p; ++e) dw1_out[e] = block_gemm::narrow<T>(dw1[e]);
    for (int64_t e = 0; e < m.l * m.s * m.r; ++e) dw2_out[e] = block_gemm::narrow<T>(dw2[e]);
  }
}

// Rows per tile of the bf16 forward: each packed weight panel serves 128 rows. The tile's fp32
// out1, bf16 z and fp32 out2 (5 MiB at n = 4096) then spill from L2, which costs less than
// reading the weights twice as often (n = 4096, 16 blocks, 1024 tokens on a 2-core Xeon with
// AMX, interleaved: 64 rows 3.83-4.17 ms, 128 rows 3.61-3.89 ms).
constexpr int64_t kPairTileRows = 128;

// Column chunks of a product with N columns, whole panels each, so that `blocks` blocks of them
// keep the threads busy.
int64_t column_chunks(int64_t blocks, int64_t N, int threads) {
  const int64_t panels = (N + bf16::kPanel - 1) / bf16::kPanel;
  return std::max<int64_t>(1, std::min<int64_t>((threads + blocks - 1) / blocks, panels));
}

// Columns [first, second) of chunk ch of column_chunks.
std::pair<int64_t, int64_t> column_chunk(int64_t N, int64_t chunks, int64_t ch) {
  const int64_t panels = (N + bf16::kPanel - 1) / bf16::kPanel;
  return {chunk_begin(panels, chunks, ch) * bf16::kPanel, std::min(N, chunk_begin(panels, chunks, ch + 1) * bf16::kPanel)};
}

// Columns of a weight block packed at a time by the few-rows forward: 128 columns of 512 pairs
// (n = 4096 in 4 blocks) are 256 KiB, which stay in L2 for the product that follows.
constexpr int64_t kSharedPackColumns = 128;

// How a weight block lies for a product over pairs of its reduction: kColumns, output column
// j's 2 KP values contiguous at w + j * ld (pack_columns); kRows, reduction row k's output
// values contiguous at w + k * ld (pack_rows).
enum class Layout { kColumns, kRows };

// c[t * ldc + j] = sum_p a_t[p] . w[p][j] for t < nt, j in [c0, c1): one product of the few-rows
// passes, whose rows `a` are nt rows of KP pairs at stride lda (words). Every kSharedPackColumns
// columns of the weight block are packed into this thread's buffer just before their product.
void shared_product(int64_t nt, int64_t KP, const uint32_t* a, int64_t lda, const BFloat16* w, int64_t ldw,
                    Layout layout, int64_t c0, int64_t c1, float* c, int64_t ldc) {
  uint32_t* packed = scratch<uint32_t, struct MonarchChunkPairs>(bf16::packed_words(kSharedPackColumns, KP));
  for (int64_t j0 = c0; j0 < c1; j0 += kSharedPackColumns) {
    const int64_t nj = std::min(kSharedPackColumns, c1 - j0);
    if (layout == Layout::kColumns) {
      bf16::pack_columns(nj, KP, w + j0 * ldw, ldw, packed);
    } else {
      bf16::pack_rows(2 * KP, nj, w + j0, ldw, packed);
    }
    bf16::gemm(nt, nj, KP, a, lda, packed, 1.0f, c + j0, ldc, false);
  }
}

// Stage 1 over nt rows of x (pairs from xp, at x's row stride), inside a parallel region, its
// work split by weight blocks and `chunks` column chunks: out1[t, i*q + a] = x[t, i*p + :] .
// w1[i, a, :], fp32 at stride n_mid.
void shared_stage1(const MonarchShape& m, int64_t nt, const uint32_t* xp, const BFloat16* w1, int64_t chunks,
                   float* out1) {
#pragma omp for schedule(static)
  for (int64_t item = 0; item < m.k * chunks; ++item) {
    const int64_t i = item / chunks;
    const auto [a0, a1] = column_chunk(m.q, chunks, item % chunks);
    shared_product(nt, m.p / 2, xp + i * m.p / 2, m.x_row_stride / 2, w1 + i * m.q * m.p, m.p, Layout::kColumns,
                   a0, a1, out1 + i * m.q, m.n_mid());
  }
}

// forward_bf16_pairs for one row tile (decode batches of 16 to 128 tokens) or fewer tiles than
// threads: the threads share each tile, each stage split by weight blocks and column chunks, and
// every weight is read from memory once per tile, packed a chunk at a time into L2. Packing all
// weights up front, as the many-tile path does to reuse them across tiles, moves them three
// times and left threads idle (16 tokens, n = 4096 in 4 blocks on a 2-core Zen 4, interleaved:
// 2.6-5.2 ms before, 1.03-1.12 ms now; PyTorch's two bmm 1.3-1.6 ms).
void forward_bf16_pairs_shared(const MonarchShape& m, const BFloat16* x, const BFloat16* w1, const BFloat16* w2,
                               BFloat16* out, int threads) {
  const int64_t n_mid = m.n_mid(), n_out = m.n_out(), tile = std::min(kPairTileRows, m.rows);
  float* out1 = scratch<float, struct MonarchMid>(tile * n_mid);
  float* out2 = scratch<float, struct MonarchOut2>(tile * n_out);
  BFloat16* z = scratch<BFloat16, struct MonarchZ>(tile * n_mid);
  const uint32_t* zp = reinterpret_cast<const uint32_t*>(z);
  const int64_t c1 = column_chunks(m.k, m.q, threads), c2 = column_chunks(m.l, m.s, threads);
#pragma omp parallel num_threads(threads)
  for (int64_t t0 = 0; t0 < m.rows; t0 += tile) {
    const int64_t nt = std::min(tile, m.rows - t0);
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(x + t0 * m.x_row_stride);
    shared_stage1(m, nt, xp, w1, c1, out1);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) bf16::transpose_to_bf16(m.l, m.r, out1 + t * n_mid, z + t * n_mid);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < m.l * c2; ++item) {
      const int64_t j = item / c2;
      const auto [d0, d1] = column_chunk(m.s, c2, item % c2);
      shared_product(nt, m.r / 2, zp + j * m.r / 2, n_mid / 2, w2 + j * m.s * m.r, m.r, Layout::kColumns, d0, d1,
                     out2 + j * m.s, n_out);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) {
      bf16::transpose_to_bf16(m.s, m.l, out2 + t * n_out, out + (t0 + t) * n_out);
    }
  }
}

// The bf16 forward on bf16 pairs (bf16_gemm.h: AMX tiles, else AVX512_BF16 vectors), where the
// CPU has them, the reductions have even lengths and x's rows start on pairs: per row tile,
// stage 1 block by block into fp32 out1 [t][n_mid], P1 as a transpose into bf16 z [t][l][r]
// (out1 rounded to bf16 between the stages, as on CUDA), stage 2 into fp32 out2 [t][l][s], and
// P2 as a transpose into out. The weights are packed once per call, where there are several row
// tiles and every thread has one (else forward_bf16_pairs_shared). False where it does not apply.
bool forward_bf16_pairs(const MonarchShape& m, const BFloat16* x, const BFloat16* w1, const BFloat16* w2,
                        BFloat16* out, int num_threads) {
  if (m.p % 2 != 0 || m.r % 2 != 0 || !bf16::rows_as_pairs(x, m.rows, m.x_row_stride)) return false;
  const int64_t n_mid = m.n_mid(), n_out = m.n_out();
  const int64_t tile = std::min(kPairTileRows, m.rows);
  const int64_t tiles = (m.rows + tile - 1) / tile;
  const int threads = threads_for(m, num_threads);
  if (tiles < threads || tiles == 1) {
    forward_bf16_pairs_shared(m, x, w1, w2, out, threads);
    return true;
  }
  const int64_t pw1 = bf16::packed_words(m.q, m.p / 2), pw2 = bf16::packed_words(m.s, m.r / 2);
  uint32_t* w1p = scratch<uint32_t, struct MonarchW1Pairs>(m.k * pw1);
  uint32_t* w2p = scratch<uint32_t, struct MonarchW2Pairs>(m.l * pw2);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < m.k + m.l; ++blk) {
      if (blk < m.k) bf16::pack_columns(m.q, m.p / 2, w1 + blk * m.q * m.p, m.p, w1p + blk * pw1);
      else bf16::pack_columns(m.s, m.r / 2, w2 + (blk - m.k) * m.s * m.r, m.r, w2p + (blk - m.k) * pw2);
    }
    float* out1 = scratch<float, struct MonarchMid>(tile * n_mid);
    float* out2 = scratch<float, struct MonarchOut2>(tile * n_out);
    BFloat16* z = scratch<BFloat16, struct MonarchZ>(tile * n_mid);
    const uint32_t* zp = reinterpret_cast<const uint32_t*>(z);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tt = 0; tt < tiles; ++tt) {
      const int64_t t0 = tt * tile, nt = std::min(tile, m.rows - t0);
      const uint32_t* xp = reinterpret_cast<const uint32_t*>(x + t0 * m.x_row_stride);
      for (int64_t i = 0; i < m.k; ++i) {
        bf16::gemm(nt, m.q, m.p / 2, xp + i * m.p / 2, m.x_row_stride / 2, w1p + i * pw1, 1.0f,
                   out1 + i * m.q, n_mid, false);
      }
      for (int64_t t = 0; t < nt; ++t) bf16::transpose_to_bf16(m.l, m.r, out1 + t * n_mid, z + t * n_mid);
      for (int64_t j = 0; j < m.l; ++j) {
        bf16::gemm(nt, m.s, m.r / 2, zp + j * m.r / 2, n_mid / 2, w2p + j * pw2, 1.0f, out2 + j * m.s,
                   n_out, false);
      }
      for (int64_t t = 0; t < nt; ++t) {
        bf16::transpose_to_bf16(m.s, m.l, out2 + t * n_out, out + (t0 + t) * n_out);
      }
    }
  }
  return true;
}

// Rows per tile of the bf16 backward: the weight gradients' reductions run over a tile's tokens,
// and 64 pairs of them keep the dot products near their peak (32 lose about an eighth).
constexpr int64_t kPairBackwardTileRows = 128;

// A bf16 backward tile's intermediates for up to `rows` tokens, this thread's buffers (both
// variants of the backward): fp32 out1 and then dz [t][n_mid], fp32 dx [t][n_in], and bf16 z
// [t][n_mid], g [t][n_out] and dmid [t][n_mid].
struct BackwardTile {
  float* mid;
  float* dxf;
  BFloat16* z;
  BFloat16* g;
  BFloat16* dmid;
};

BackwardTile backward_tile_buffers(const MonarchShape& m, int64_t rows) {
  return {scratch<float, struct MonarchMid>(rows * m.n_mid()), scratch<float, struct MonarchGradX>(rows * m.n_in()),
          scratch<BFloat16, struct MonarchZ>(rows * m.n_mid()), scratch<BFloat16, struct MonarchGradOut>(rows * m.n_out()),
          scratch<BFloat16, struct MonarchGradMid>(rows * m.n_mid())};
}

// backward_bf16_pairs for one row tile (up to kPairBackwardTileRows tokens), in the passes of
// the many-tile path but with every weight read once, packed a chunk of columns at a time as
// its product needs it (forward_bf16_pairs_shared), and each weight gradient rounded to bf16
// from a chunk's fp32 products while they are in cache: one tile adds nothing to them later.
// Packing all weights and keeping fp32 gradients of every weight moved each byte of them
// several times (16 rows on a 2-core Zen 4, interleaved: n = 8192 in 4 blocks 123-129 -> 43-49
// ms, n = 4096 in 16 blocks 1.4-4.0 -> 0.95-1.24 ms).
void backward_bf16_pairs_shared(const MonarchShape& m, const BFloat16* dout, const BFloat16* x, const BFloat16* w1,
                                const BFloat16* w2, BFloat16* dx, BFloat16* dw1, BFloat16* dw2, int threads) {
  const int64_t n_in = m.n_in(), n_mid = m.n_mid(), n_out = m.n_out(), xs = m.x_row_stride, nt = m.rows;
  const auto [mid, dxf, z, g, dmid] = backward_tile_buffers(m, nt);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x);
  const uint32_t* gp = reinterpret_cast<const uint32_t*>(g);
  const uint32_t* dmidp = reinterpret_cast<const uint32_t*>(dmid);
  const int64_t cq = column_chunks(m.k, m.q, threads), cr = column_chunks(m.l, m.r, threads);
  const int64_t cp = column_chunks(m.k, m.p, threads);
  const int64_t dx_items = m.k * cp, dw1_items = m.k * cp, dw2_items = m.l * cr;
  // u^T v for a weight gradient's columns [c0, c1), M rows, written as bf16 rows at dst (ld).
  auto gradient = [&](int64_t M, const BFloat16* u, int64_t ldu, const BFloat16* v, int64_t ldv, int64_t c0,
                      int64_t c1, BFloat16* dst, int64_t ld) {
    const int64_t pairs = (nt + 1) / 2;
    uint32_t* at = scratch<uint32_t, struct MonarchTokenPairsA>(M * pairs);
    uint32_t* bt = scratch<uint32_t, struct MonarchTokenPairsB>(bf16::packed_words(kSharedPackColumns, pairs));
    float* c = scratch<float, struct MonarchGradChunk>(M * kSharedPackColumns);
    for (int64_t j0 = c0; j0 < c1; j0 += kSharedPackColumns) {
      const int64_t nj = std::min(kSharedPackColumns, c1 - j0);
      bf16::gemm_tokens(nt, M, nj, u, ldu, v + j0, ldv, at, bt, c, nj, false);
      for (int64_t row = 0; row < M; ++row) bf16::round_to_bf16(c + row * nj, nj, nj, dst + row * ld + j0);
    }
  };
#pragma omp parallel num_threads(threads)
  {
    shared_stage1(m, nt, xp, w1, cq, mid);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) {
      bf16::transpose_to_bf16(m.l, m.r, mid + t * n_mid, z + t * n_mid);
      bf16::transpose(m.l, m.s, dout + t * n_out, g + t * n_out);
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < m.l * cr; ++item) {  // dz[t, j*r + c] = sum_d g[t, j*s + d] w2[j, d, c]
      const int64_t j = item / cr;
      const auto [c0, c1] = column_chunk(m.r, cr, item % cr);
      shared_product(nt, m.s / 2, gp + j * m.s / 2, n_out / 2, w2 + j * m.s * m.r, m.r, Layout::kRows, c0, c1,
                     mid + j * m.r, n_mid);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) bf16::transpose_to_bf16(m.r, m.l, mid + t * n_mid, dmid + t * n_mid);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < dx_items + dw1_items + dw2_items; ++item) {
      if (item < dx_items) {  // dx[t, i*p + b] = sum_a dmid[t, i*q + a] w1[i, a, b]
        const int64_t i = item / cp;
        const auto [b0, b1] = column_chunk(m.p, cp, item % cp);
        shared_product(nt, m.q / 2, dmidp + i * m.q / 2, n_mid / 2, w1 + i * m.q * m.p, m.p, Layout::kRows, b0, b1,
                       dxf + i * m.p, n_in);
        for (int64_t t = 0; t < nt; ++t) {
          bf16::round_to_bf16(dxf + t * n_in + i * m.p + b0, b1 - b0, b1 - b0, dx + t * n_in + i * m.p + b0);
        }
      } else if (item < dx_items + dw1_items) {  // dw1[i, a, b] = sum_t dmid[t, i*q + a] x[t, i*p + b]
        const int64_t i = (item - dx_items) / cp;
        const auto [b0, b1] = column_chunk(m.p, cp, (item - dx_items) % cp);
        gradient(m.q, dmid + i * m.q, n_mid, x + i * m.p, xs, b0, b1, dw1 + i * m.q * m.p, m.p);
      } else {  // dw2[j, d, c] = sum_t g[t, j*s + d] z[t, j*r + c]
        const int64_t j = (item - dx_items - dw1_items) / cr;
        const auto [c0, c1] = column_chunk(m.r, cr, (item - dx_items - dw1_items) % cr);
        gradient(m.s, g + j * m.s, n_out, z + j * m.r, n_mid, c0, c1, dw2 + j * m.s * m.r, m.r);
      }
    }
  }
}

// The bf16 backward on bf16 pairs, where forward_bf16_pairs runs and q and s are even too. Per
// row tile: stage 1 again (fp32 out1, bf16 z as in the forward); the incoming gradient out of
// the P2 order into bf16 g [t][l][s]; dz = g W2 block by block into fp32 [t][l][r], and P1
// undone into bf16 dmid [t][k][q] (the intermediates in bf16, as on CUDA); then dx = dmid W1
// and the weight gradients dW1 += dmid^T x, dW2 += g^T z, whose reductions run over the tile's
// tokens (gemm_tokens), accumulated in fp32 across tiles. Threads split every product
// by weight blocks and column panels, so no gradient needs a reduction across threads. A single
// tile runs backward_bf16_pairs_shared. False where it does not apply.
bool backward_bf16_pairs(const MonarchShape& m, const BFloat16* dout, const BFloat16* x, const BFloat16* w1,
                         const BFloat16* w2, BFloat16* dx, BFloat16* dw1_out, BFloat16* dw2_out, int num_threads) {
  if (m.p % 2 != 0 || m.q % 2 != 0 || m.r % 2 != 0 || m.s % 2 != 0 ||
      !bf16::rows_as_pairs(x, m.rows, m.x_row_stride) || reinterpret_cast<uintptr_t>(dout) % 4 != 0) {
    return false;
  }
  if (m.rows <= kPairBackwardTileRows) {
    backward_bf16_pairs_shared(m, dout, x, w1, w2, dx, dw1_out, dw2_out, threads_for(m, num_threads));
    return true;
  }
  const int64_t n_in = m.n_in(), n_mid = m.n_mid(), n_out = m.n_out(), xs = m.x_row_stride;
  const int64_t pw1 = bf16::packed_words(m.q, m.p / 2);   // w1 for stage 1: columns a, pairs along b
  const int64_t pw1r = bf16::packed_words(m.p, m.q / 2);  // w1 for dx: columns b, pairs along a
  const int64_t pw2r = bf16::packed_words(m.r, m.s / 2);  // w2 for dz: columns c, pairs along d
  const int64_t n_w1 = m.k * m.q * m.p, n_w2 = m.l * m.s * m.r;
  const int64_t tile = std::min(kPairBackwardTileRows, m.rows);
  uint32_t* w1p = scratch<uint32_t, struct MonarchW1Pairs>(m.k * pw1);
  uint32_t* w1r = scratch<uint32_t, struct MonarchW1RowPairs>(m.k * pw1r);
  uint32_t* w2r = scratch<uint32_t, struct MonarchW2RowPairs>(m.l * pw2r);
  float* dw1 = scratch<float, struct MonarchGradW1>(n_w1);
  float* dw2 = scratch<float, struct MonarchGradW2>(n_w2);
  const auto [mid, dxf, z, g, dmid] = backward_tile_buffers(m, tile);
  const uint32_t* gp = reinterpret_cast<const uint32_t*>(g);
  const uint32_t* dmidp = reinterpret_cast<const uint32_t*>(dmid);
  const int threads = threads_for(m, num_threads);
  const int64_t cq = column_chunks(m.k, m.q, threads), cr = column_chunks(m.l, m.r, threads);
  const int64_t cp = column_chunks(m.k, m.p, threads);
  const int64_t dx_items = m.k * cp, dw1_items = m.k * cp, dw2_items = m.l * cr;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < m.k + m.l; ++blk) {
      if (blk < m.k) {
        bf16::pack_columns(m.q, m.p / 2, w1 + blk * m.q * m.p, m.p, w1p + blk * pw1);
        bf16::pack_rows(m.q, m.p, w1 + blk * m.q * m.p, m.p, w1r + blk * pw1r);
      } else {
        bf16::pack_rows(m.s, m.r, w2 + (blk - m.k) * m.s * m.r, m.r, w2r + (blk - m.k) * pw2r);
      }
    }
    const int64_t tile_pairs = (tile + 1) / 2;
    uint32_t* at = scratch<uint32_t, struct MonarchTokenPairsA>(std::max(m.q, m.s) * tile_pairs);
    uint32_t* bt = scratch<uint32_t, struct MonarchTokenPairsB>(bf16::packed_words(std::max(m.p, m.r), tile_pairs));
    for (int64_t t0 = 0; t0 < m.rows; t0 += tile) {
      const int64_t nt = std::min(tile, m.rows - t0);
      const uint32_t* xp = reinterpret_cast<const uint32_t*>(x + t0 * xs);
#pragma omp for schedule(static)
      for (int64_t item = 0; item < m.k * cq; ++item) {
        const int64_t i = item / cq;
        const auto [a0, a1] = column_chunk(m.q, cq, item % cq);
        bf16::gemm(nt, a1 - a0, m.p / 2, xp + i * m.p / 2, xs / 2, w1p + i * pw1 + a0 * (m.p / 2), 1.0f,
                   mid + i * m.q + a0, n_mid, false);
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < nt; ++t) {
        bf16::transpose_to_bf16(m.l, m.r, mid + t * n_mid, z + t * n_mid);
        bf16::transpose(m.l, m.s, dout + (t0 + t) * n_out, g + t * n_out);
      }
#pragma omp for schedule(static)
      for (int64_t item = 0; item < m.l * cr; ++item) {
        const int64_t j = item / cr;
        const auto [c0, c1] = column_chunk(m.r, cr, item % cr);
        bf16::gemm(nt, c1 - c0, m.s / 2, gp + j * m.s / 2, n_out / 2, w2r + j * pw2r + c0 * (m.s / 2), 1.0f,
                   mid + j * m.r + c0, n_mid, false);
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < nt; ++t) bf16::transpose_to_bf16(m.r, m.l, mid + t * n_mid, dmid + t * n_mid);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < dx_items + dw1_items + dw2_items; ++item) {
        if (item < dx_items) {  // dx[t, i*p + b] = sum_a dmid[t, i*q + a] w1[i, a, b]
          const int64_t i = item / cp;
          const auto [b0, b1] = column_chunk(m.p, cp, item % cp);
          float* c = dxf + i * m.p + b0;
          bf16::gemm(nt, b1 - b0, m.q / 2, dmidp + i * m.q / 2, n_mid / 2, w1r + i * pw1r + b0 * (m.q / 2),
                     1.0f, c, n_in, false);
          for (int64_t t = 0; t < nt; ++t) bf16::round_to_bf16(c + t * n_in, b1 - b0, b1 - b0, dx + (t0 + t) * n_in + i * m.p + b0);
        } else if (item < dx_items + dw1_items) {  // dw1[i, a, b] += sum_t dmid[t, i*q + a] x[t, i*p + b]
          const int64_t i = (item - dx_items) / cp;
          const auto [b0, b1] = column_chunk(m.p, cp, (item - dx_items) % cp);
          bf16::gemm_tokens(nt, m.q, b1 - b0, dmid + i * m.q, n_mid, x + t0 * xs + i * m.p + b0, xs, at, bt,
                            dw1 + i * m.q * m.p + b0, m.p, t0 > 0);
        } else {  // dw2[j, d, c] += sum_t g[t, j*s + d] z[t, j*r + c]
          const int64_t j = (item - dx_items - dw1_items) / cr;
          const auto [c0, c1] = column_chunk(m.r, cr, (item - dx_items - dw1_items) % cr);
          bf16::gemm_tokens(nt, m.s, c1 - c0, g + j * m.s, n_out, z + j * m.r + c0, n_mid, at, bt,
                            dw2 + j * m.s * m.r + c0, m.r, t0 > 0);
        }
      }
    }
    constexpr int64_t kSpan = 4096;  // elements of a weight gradient rounded per work item
    const int64_t spans1 = (n_w1 + kSpan - 1) / kSpan, spans2 = (n_w2 + kSpan - 1) / kSpan;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < spans1 + spans2; ++item) {
      const bool first = item < spans1;
      const int64_t e = (first ? item : item - spans1) * kSpan, n = std::min(kSpan, (first ? n_w1 : n_w2) - e);
      bf16::round_to_bf16((first ? dw1 : dw2) + e, n, n, (first ? dw1_out : dw2_out) + e);
    }
  }
  return true;
}

template <typename T>
void forward_typed(const MonarchShape& m, const void* x, const void* w1, const void* w2,
                   void* out, int num_threads) {
  const T* xt = static_cast<const T*>(x);
  const T* w1t = static_cast<const T*>(w1);
  const T* w2t = static_cast<const T*>(w2);
  T* ot = static_cast<T*>(out);
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (forward_bf16_pairs(m, xt, w1t, w2t, ot, num_threads)) return;
  }
  switch (block_gemm::best_isa()) {
    case block_gemm::Isa::Avx512:
      return forward_impl<isa_avx512::Kernels>(m, xt, w1t, w2t, ot, num_threads);
    case block_gemm::Isa::Avx2:
      return forward_impl<isa_avx2::Kernels>(m, xt, w1t, w2t, ot, num_threads);
    case block_gemm::Isa::Baseline:
      return forward_impl<isa_baseline::Kernels>(m, xt, w1t, w2t, ot, num_threads);
  }
}

template <typename T>
void backward_typed(const MonarchShape& m, const void* dout, const void* x, const void* w1,
                    const void* w2, void* dx, void* dw1, void* dw2, int num_threads) {
  auto in = [](const void* p) { return static_cast<const T*>(p); };
  auto out = [](void* p) { return static_cast<T*>(p); };
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (backward_bf16_pairs(m, in(dout), in(x), in(w1), in(w2), out(dx), out(dw1), out(dw2), num_threads)) return;
  }
  switch (block_gemm::best_isa()) {
    case block_gemm::Isa::Avx512:
      return backward_impl<isa_avx512::Kernels>(m, in(dout), in(x), in(w1), in(w2), out(dx),
                                                out(dw1), out(dw2), num_threads);
    case block_gemm::Isa::Avx2:
      return backward_impl<isa_avx2::Kernels>(m, in(dout), in(x), in(w1), in(w2), out(dx),
                                              out(dw1), out(dw2), num_threads);
    case block_gemm::Isa::Baseline:
      return backward_impl<isa_baseline::Kernels>(m, in(dout), in(x), in(w1), in(w2), out(dx),
                                                  out(dw1), out(dw2), num_threads);
  }
}

}  // namespace

void monarch_forward(const MonarchShape& m, DType dtype, const void* x, const void* w1,
                     const void* w2, void* out, int num_threads) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(m, x, w1, w2, out, num_threads);
    case DType::Float16: return forward_typed<Half>(m, x, w1, w2, out, num_threads);
    case DType::BFloat16: return forward_typed<BFloat16>(m, x, w1, w2, out, num_threads);
    case DType::Float64: return forward_typed<double>(m, x, w1, w2, out, num_threads);
  }
}

void monarch_backward(const MonarchShape& m, DType dtype, const void* grad_out, const void* x,
                      const void* w1, const void* w2, void* grad_x, void* grad_w1,
                      void* grad_w2, int num_threads) {
  switch (dtype) {
    case DType::Float32:
      return backward_typed<float>(m, grad_out, x, w1, w2, grad_x, grad_w1, grad_w2, num_threads);
    case DType::Float16:
      return backward_typed<Half>(m, grad_out, x, w1, w2, grad_x, grad_w1, grad_w2, num_threads);
    case DType::BFloat16:
      return backward_typed<BFloat16>(m, grad_out, x, w1, w2, grad_x, grad_w1, grad_w2,
                                      num_threads);
    case DType::Float64:
      return backward_typed<double>(m, grad_out, x, w1, w2, grad_x, grad_w1, grad_w2, num_threads);
  }
}

}  // namespace cpu
}  // namespace effx
