// CPU kernel of dcn_fast::srf_tiled_conv2d (the "cpu" backend): the separable basis algorithm
// (DESIGN.md §2), tiled over (image, block of output rows); small images go
// several whole to a tile.
//
// Per tile, image and group: the input footprint is laid out channels-innermost,
// one 1-D pass along W with the N+1 taps, then one pass along H per basis pair
// (l, m); the F basis responses of the tile's C_in/groups channels, all its
// images together, feed one GEMM with α.
// Only one tile's responses exist at a time per thread, never the whole
// [B, F*C_in, Ho, Wo] stack. The backward recomputes them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <array>
#include <new>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace dcn_fast {
namespace {

// About this many output pixels per tile: enough columns for the GEMMs to run
// near their peak and few overlapping input rows to recompute, few enough that
// a tile's buffers stay in L2. The backward holds about twice the buffers of
// the forward, so its tiles are smaller. (On a 2-core Xeon at the DCN-ODE block
// shapes, batch 8: 1024 / 512 took ~10 % / ~7 % off 256 / 256, interleaved.)
constexpr int64_t kForwardTilePixels = 1024;
constexpr int64_t kBackwardTilePixels = 512;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geometry {
  int64_t batch, c_in, height, width, c_out, groups, c_in_g, c_out_g;
  int64_t order1, n_basis, k, stride_h, stride_w, pad_h, pad_w;
  int64_t out_h, out_w, padded_w, tile_rows, n_tiles, max_footprint;
  // Small images are tiled whole, several to a tile (their GEMMs would be
  // short otherwise): the batch in image_groups consecutive groups of at most
  // images_per_tile images, sizes differing by at most one.
  int64_t images_per_tile, image_groups;
  std::vector<int64_t> row_tap, col_tap;  // (l, m) of each basis function

  int64_t footprint(int64_t rows) const { return (rows - 1) * stride_h + k; }
};

Geometry make_geometry(const at::Tensor& input, const at::Tensor& taps, const at::Tensor& alpha,
                       at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, int64_t tile_pixels,
                       bool whole_images) {
  TORCH_CHECK(input.dim() == 4, "srf_conv2d: input must be 4-D [B, C_in, H, W], got ", input.sizes());
  TORCH_CHECK(taps.dim() == 2 && taps.size(1) % 2 == 1,
              "srf_conv2d: taps must be [order+1, K] with K odd, got ", taps.sizes());
  TORCH_CHECK(alpha.dim() == 3, "srf_conv2d: alpha must be [F, C_in/groups, C_out], got ", alpha.sizes());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "srf_conv2d: stride must be >= 1, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "srf_conv2d: padding must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1, "srf_conv2d: groups must be >= 1, got ", groups);
  TORCH_CHECK(input.scalar_type() == taps.scalar_type() && input.scalar_type() == alpha.scalar_type(),
              "srf_conv2d: input, taps and alpha must share one dtype, got ", input.scalar_type(), ", ",
              taps.scalar_type(), ", ", alpha.scalar_type());
  Geometry g;
  g.batch = input.size(0);
  g.c_in = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.c_out = alpha.size(2);
  g.groups = groups;
  g.order1 = taps.size(0);
  g.k = taps.size(1);
  g.n_basis = g.order1 * (g.order1 + 1) / 2;
  TORCH_CHECK(alpha.size(0) == g.n_basis, "srf_conv2d: alpha.size(0) must be F = ", g.n_basis, " for ", g.order1,
              " tap rows, got ", alpha.size(0));
  TORCH_CHECK(g.c_in % groups == 0 && alpha.size(1) * groups == g.c_in,
              "srf_conv2d: alpha.size(1) * groups must equal C_in = ", g.c_in, ", got ", alpha.size(1), " * ", groups);
  TORCH_CHECK(g.c_out % groups == 0, "srf_conv2d: groups must divide C_out = ", g.c_out);
  g.c_in_g = g.c_in / groups;
  g.c_out_g = g.c_out / groups;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  TORCH_CHECK(g.height + 2 * g.pad_h >= g.k && g.width + 2 * g.pad_w >= g.k, "srf_conv2d: padded input ",
              g.height + 2 * g.pad_h, "x", g.width + 2 * g.pad_w, " is smaller than the kernel (", g.k, ")");
  g.out_h = (g.height + 2 * g.pad_h - g.k) / g.stride_h + 1;
  g.out_w = (g.width + 2 * g.pad_w - g.k) / g.stride_w + 1;
  g.padded_w = g.width + 2 * g.pad_w;
  for (int64_t l = 0; l < g.order1; ++l)
    for (int64_t m = g.order1 - 1 - l; m >= 0; --m) {
      g.row_tap.push_back(l);
      g.col_tap.push_back(m);
    }
  // Small batches are cut into more tiles, so that every thread has one.
  const int64_t tiles_per_image = ceil_div(at::get_num_threads(), std::max<int64_t>(g.batch, 1));
  const int64_t rows = std::min(ceil_div(tile_pixels, g.out_w), ceil_div(g.out_h, tiles_per_image));
  // Tall enough that the input footprints of tiles two apart never overlap:
  // the backward scatters into grad_input in an even and an odd sweep.
  g.tile_rows = std::min(std::max(rows, ceil_div(g.k, g.stride_h)), g.out_h);
  g.n_tiles = ceil_div(g.out_h, g.tile_rows);
  g.max_footprint = g.footprint(g.tile_rows);
  // As many whole images to a tile as its pixels allow, in a number of tiles
  // that the threads share evenly (8 images of 7x7 on 2 threads: 2 tiles of 4;
  // 50 of them: 4 tiles of 12 or 13).
  // Only the forward (whole_images): the backward would have to keep every
  // image's xt and z until after its GEMMs, which spilled L2 and ran slower.
  g.image_groups = g.batch;
  if (whole_images && g.n_tiles == 1 && g.batch > 1) {
    const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
    const int64_t most = std::max<int64_t>(tile_pixels / (g.out_h * g.out_w), 1);
    g.image_groups = std::min(ceil_div(ceil_div(g.batch, most), threads) * threads, g.batch);
  }
  g.images_per_tile = ceil_div(g.batch, std::max<int64_t>(g.image_groups, 1));
  return g;
}

// The per-tile work both directions share: where the tile is (images
// [b, b + images), output rows [first_out_row, + rows) of each; pixels and
// footprint are per image), and its window of an output-shaped tensor.
struct Tile {
  int64_t b, images, first_out_row, rows, pixels, footprint, first_padded_row;
};

// Tile t of group `group` of images (there are no groups, and no tiles, at batch 0).
Tile make_tile(const Geometry& g, int64_t group, int64_t t) {
  Tile tile;
  tile.b = group * g.batch / g.image_groups;
  tile.images = (group + 1) * g.batch / g.image_groups - tile.b;
  tile.first_out_row = t * g.tile_rows;
  tile.rows = std::min(g.tile_rows, g.out_h - tile.first_out_row);
  tile.pixels = tile.rows * g.out_w;
  tile.footprint = g.footprint(tile.rows);
  tile.first_padded_row = tile.first_out_row * g.stride_h;
  return tile;
}

// The backward's [C_out_g, pixels] window of an output-shaped tensor (one image, group grp).
at::Tensor output_window(const at::Tensor& out, const Geometry& g, const Tile& tile, int64_t grp) {
  return out.select(0, tile.b)
      .narrow(0, grp * g.c_out_g, g.c_out_g)
      .narrow(1, tile.first_out_row, tile.rows)
      .view({g.c_out_g, tile.pixels});
}

// Tile buffers keep the group's channels innermost, padded to whole lanes of
// kLane values ([..][C_in_g padded]); the 1-D passes are then sums of a few
// lane-wide rows, accumulated in registers, whatever the stride. The basis
// responses are written compactly as the [pixels, F*C_in_g] operand of the
// GEMM with α. Lanes past C_in_g hold leftovers (of a previous call, or read
// from neighbouring compact rows; possibly non-finite): every step is lane-wise
// and none of them is stored into a result or reduced.
#if defined(__AVX512F__)
constexpr int64_t kLaneBytes = 64;
#else
constexpr int64_t kLaneBytes = 32;
#endif
template <typename scalar_t>
constexpr int64_t kLane = kLaneBytes / sizeof(scalar_t);

// One lane as a GCC/Clang vector: explicit SIMD, independent of what the
// auto-vectoriser makes of the loops (it tends to gather across rows instead).
template <typename scalar_t>
struct LaneOf {
  typedef scalar_t type __attribute__((vector_size(kLaneBytes)));
};
template <typename scalar_t>
using Lane = typename LaneOf<scalar_t>::type;

template <typename scalar_t>
inline Lane<scalar_t> load_lane(const scalar_t* p) {
  Lane<scalar_t> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[v] (+)= sum[v], v < store ≤ kLane. The sum comes by value: an accumulator
// whose address escaped would live on the stack instead of in a register.
template <typename scalar_t>
inline void store_lane(scalar_t* out, Lane<scalar_t> sum, bool accumulate, int64_t store) {
  if (store == kLane<scalar_t>) {  // whole lane: one vector store (a constant-size copy)
    if (accumulate) sum += load_lane(out);
    std::memcpy(out, &sum, sizeof sum);
  } else {  // the last, partial lane of a compact row
    scalar_t part[kLane<scalar_t>];
    std::memcpy(part, &sum, sizeof part);
    for (int64_t v = 0; v < store; ++v) out[v] = accumulate ? out[v] + part[v] : part[v];
  }
}

// rows[q][v] -> rows[v][q]: the kLane x kLane block transposed in registers,
// in log2(kLane) stages; stage s swaps the off-diagonal s x s blocks of every
// 2s x 2s block (two-source shuffles: vpermt2ps/pd with AVX-512). Compilers
// without GCC's __builtin_shuffle go element by element.
// The integer of scalar_t's width: a shuffle pattern's element.
template <typename scalar_t>
using IndexOf = std::conditional_t<sizeof(scalar_t) == 8, int64_t, int32_t>;

template <typename scalar_t>
struct LaneIndexOf {
  typedef IndexOf<scalar_t> type
      __attribute__((vector_size(kLaneBytes)));
};

// Stage S's two shuffle patterns, compile-time constants.
template <typename scalar_t, int64_t S>
struct StageIndices {
  using index_t = IndexOf<scalar_t>;
  index_t low[kLane<scalar_t>], high[kLane<scalar_t>];
  constexpr StageIndices() : low(), high() {
    for (int64_t k = 0; k < kLane<scalar_t>; ++k) {
      low[k] = static_cast<index_t>((k & S) ? kLane<scalar_t> + k - S : k);
      high[k] = static_cast<index_t>((k & S) ? kLane<scalar_t> + k : k + S);
    }
  }
};

template <typename scalar_t, int64_t S = kLane<scalar_t> / 2>
inline void transpose_lanes(Lane<scalar_t> (&rows)[kLane<scalar_t>]) {
#if defined(__GNUC__) && !defined(__clang__)
  using Index = typename LaneIndexOf<scalar_t>::type;
  static constexpr StageIndices<scalar_t, S> indices{};
  Index low, high;
  std::memcpy(&low, indices.low, sizeof low);
  std::memcpy(&high, indices.high, sizeof high);
#pragma GCC unroll 16
  for (int64_t i = 0; i < kLane<scalar_t>; ++i) {
    if (i & S) continue;
    const Lane<scalar_t> a = rows[i], b = rows[i + S];
    rows[i] = __builtin_shuffle(a, b, low);
    rows[i + S] = __builtin_shuffle(a, b, high);
  }
  if constexpr (S > 1) transpose_lanes<scalar_t, S / 2>(rows);
#else
  if constexpr (S == kLane<scalar_t> / 2) {
    constexpr int64_t V = kLane<scalar_t>;
    scalar_t block[V][V];
    for (int64_t q = 0; q < V; ++q) std::memcpy(block[q], &rows[q], sizeof rows[q]);
    for (int64_t v = 0; v < V; ++v)
      for (int64_t q = 0; q < V; ++q) rows[v][q] = block[q][v];
  }
#endif
}

// For R outputs at once (independent accumulator chains, held in registers):
// dst[q·dst_row + v] (+)= Σ_j coef[j·coef_step] · src[q·src_row + j·src_step + v],
// q < R, v < store ≤ kLane.
template <int64_t R, typename scalar_t>
inline void lane_sum(scalar_t* __restrict__ dst, int64_t dst_row, bool accumulate, int64_t store,
                     const scalar_t* __restrict__ src, int64_t src_row, int64_t src_step,
                     const scalar_t* __restrict__ coef, int64_t coef_step, int64_t terms) {
  Lane<scalar_t> acc[R] = {};
  for (int64_t j = 0; j < terms; ++j) {
    const scalar_t w = coef[j * coef_step];
    for (int64_t q = 0; q < R; ++q) acc[q] += w * load_lane(src + q * src_row + j * src_step);
  }
  for (int64_t q = 0; q < R; ++q) store_lane(dst + q * dst_row, acc[q], accumulate, store);
}

// lane_sum over n outputs: blocks of 8, then 4, then single ones.
template <typename scalar_t>
inline void lane_sums(int64_t n, scalar_t* dst, int64_t dst_row, bool accumulate, int64_t store, const scalar_t* src,
                      int64_t src_row, int64_t src_step, const scalar_t* coef, int64_t coef_step, int64_t terms) {
  int64_t q = 0;
  for (; q + 8 <= n; q += 8)
    lane_sum<8>(dst + q * dst_row, dst_row, accumulate, store, src + q * src_row, src_row, src_step, coef, coef_step,
                terms);
  for (; q + 4 <= n; q += 4)
    lane_sum<4>(dst + q * dst_row, dst_row, accumulate, store, src + q * src_row, src_row, src_step, coef, coef_step,
                terms);
  for (; q < n; ++q)
    lane_sum<1>(dst + q * dst_row, dst_row, accumulate, store, src + q * src_row, src_row, src_step, coef, coef_step,
                terms);
}

// Correlation of g with A shifted windows of s, over a 2-D range of terms:
// dst[a·dst_step + v] += Σ_(o < outer, n < inner) g[o·g_outer + n·g_inner + v] ·
// s[o·s_outer + n·s_inner + a·s_tap + v], a < A. Each load of g serves all A
// taps, and the sums stay in registers for the whole range: two interleaved
// accumulators per tap (even and odd n) keep the FMA chains independent.
template <int64_t A, typename scalar_t>
inline void lane_correlate(scalar_t* __restrict__ dst, int64_t dst_step, const scalar_t* __restrict__ g,
                           const scalar_t* __restrict__ s, int64_t s_tap, int64_t outer, int64_t g_outer,
                           int64_t s_outer, int64_t inner, int64_t g_inner, int64_t s_inner) {
  Lane<scalar_t> acc[2][A] = {};
  for (int64_t o = 0; o < outer; ++o) {
    const scalar_t* go = g + o * g_outer;
    const scalar_t* so = s + o * s_outer;
    int64_t n = 0;
    for (; n + 2 <= inner; n += 2)
      for (int64_t h = 0; h < 2; ++h) {
        const Lane<scalar_t> gv = load_lane(go + (n + h) * g_inner);
        for (int64_t a = 0; a < A; ++a) acc[h][a] += gv * load_lane(so + (n + h) * s_inner + a * s_tap);
      }
    if (n < inner) {
      const Lane<scalar_t> gv = load_lane(go + n * g_inner);
      for (int64_t a = 0; a < A; ++a) acc[0][a] += gv * load_lane(so + n * s_inner + a * s_tap);
    }
  }
  for (int64_t a = 0; a < A; ++a) {
    const Lane<scalar_t> sum = acc[0][a] + acc[1][a] + load_lane(dst + a * dst_step);
    std::memcpy(dst + a * dst_step, &sum, sizeof sum);
  }
}

// The most taps one lane_correlate takes: its 2·A accumulators, the g lane and
// a source lane fit in the vector registers (32 with AVX-512, 16 with AVX2).
#if defined(__AVX512F__)
constexpr int64_t kTapBlock = 13;
#else
constexpr int64_t kTapBlock = 6;
#endif

// lane_correlate<A> for the runtime A = width ≤ W.
template <int64_t W, typename scalar_t>
inline void lane_correlate_width(int64_t width, scalar_t* dst, int64_t dst_step, const scalar_t* g, const scalar_t* s,
                                 int64_t s_tap, int64_t outer, int64_t g_outer, int64_t s_outer, int64_t inner,
                                 int64_t g_inner, int64_t s_inner) {
  if (width == W)
    lane_correlate<W>(dst, dst_step, g, s, s_tap, outer, g_outer, s_outer, inner, g_inner, s_inner);
  else if constexpr (W > 1)
    lane_correlate_width<W - 1>(width, dst, dst_step, g, s, s_tap, outer, g_outer, s_outer, inner, g_inner, s_inner);
}

// lane_correlate over `taps` taps, as few blocks as the registers allow (one
// for K ≤ kTapBlock: a short tail block would run on few FMA chains).
template <typename scalar_t>
inline void lane_correlates(int64_t taps, scalar_t* dst, int64_t dst_step, const scalar_t* g, const scalar_t* s,
                            int64_t s_tap, int64_t outer, int64_t g_outer, int64_t s_outer, int64_t inner,
                            int64_t g_inner, int64_t s_inner) {
  const int64_t blocks = ceil_div(taps, kTapBlock);
  for (int64_t a = 0, b = 0; b < blocks; ++b) {
    const int64_t width = (taps - a) / (blocks - b);  // even blocks: 15 taps as 7 + 8, not 13 + 2
    lane_correlate_width<kTapBlock>(width, dst + a * dst_step, dst_step, g, s + a * s_tap, s_tap, outer, g_outer,
                                    s_outer, inner, g_inner, s_inner);
    a += width;
  }
}

// A thread's tile buffer, aligned to whole lanes: every lane of a buffer then
// sits in one cache line (malloc's 16-byte alignment split each 64-byte load
// across two).
template <typename T>
struct LaneAligned {
  using value_type = T;
  LaneAligned() = default;
  template <typename U>
  LaneAligned(const LaneAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kLaneBytes))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kLaneBytes)); }
  bool operator==(const LaneAligned&) const { return true; }
  bool operator!=(const LaneAligned&) const { return false; }
};
template <typename scalar_t>
using TileBuffer = std::vector<scalar_t, LaneAligned<scalar_t>>;

// A thread keeps its tile buffers from call to call (each up to kKeptBytes; a
// larger one lives for the call only). Allocated afresh per call, they were
// mapped and zeroed page by page each time: ~10 % of a forward at the DCN-ODE
// shapes went to page faults and memset. Kept ones hold whatever the last
// call left (any role, any values: see the lanes past C_in_g above); every
// value a result depends on is written before it is read. A thread holds at
// most 6 · 4 MiB per dtype for its lifetime.
constexpr int64_t kKeptBytes = int64_t(4) << 20;
constexpr int kScratchSlots = 6;

template <typename scalar_t>
class Scratch {
 public:
  Scratch(int slot, int64_t n) {
    static thread_local std::array<TileBuffer<scalar_t>, kScratchSlots> kept;
    TileBuffer<scalar_t>& buffer = n * int64_t(sizeof(scalar_t)) <= kKeptBytes ? kept.at(slot) : own_;
    if (static_cast<int64_t>(buffer.size()) < n) {
      buffer.reserve(n);  // exactly n: resize alone may double the capacity
      buffer.resize(n, scalar_t(0));
    }
    data_ = buffer.data();
  }
  scalar_t* data() const { return data_; }

 private:
  TileBuffer<scalar_t> own_;
  scalar_t* data_;
};

// Sizes of one thread's tile buffers.
template <typename scalar_t>
struct Buffers {
  int64_t lanes;       // C_in_g rounded up to whole lanes
  int64_t xt, z;       // one image's
  int64_t resp, window;  // the whole tile's
  explicit Buffers(const Geometry& g) {
    lanes = ceil_div(g.c_in_g, kLane<scalar_t>) * kLane<scalar_t>;
    xt = g.max_footprint * g.padded_w * lanes;
    z = g.order1 * g.max_footprint * g.out_w * lanes;
    // + one lane: a lane-wide read of the last compact row stays in bounds.
    resp = g.images_per_tile * g.tile_rows * g.out_w * g.n_basis * g.c_in_g + kLane<scalar_t>;
    window = g.c_out_g * g.images_per_tile * g.tile_rows * g.out_w;
  }
};

// xt[r][w][i] = zero-padded input of channel i at padded row first_padded_row + r.
// Blocks of kLane channels x kLane columns are transposed in registers (the
// last block of a row overlapping the one before), in rows of at least kLane
// columns; other channels and narrower rows element by element.
template <typename scalar_t>
void load_tile(const scalar_t* planes, const Geometry& g, const Tile& tile, int64_t lanes, scalar_t* xt) {
  constexpr int64_t V = kLane<scalar_t>;
  const int64_t row = g.padded_w * lanes;
  for (int64_t r = 0; r < tile.footprint; ++r) {
    scalar_t* dst_row = xt + r * row;
    const int64_t h = tile.first_padded_row + r - g.pad_h;
    if (h < 0 || h >= g.height) {
      std::fill(dst_row, dst_row + row, scalar_t(0));
      continue;
    }
    // Zeros in the padding columns (the buffer is reused); the lanes past
    // C_in_g keep leftovers, which no result reads.
    std::fill(dst_row, dst_row + g.pad_w * lanes, scalar_t(0));
    std::fill(dst_row + (g.pad_w + g.width) * lanes, dst_row + row, scalar_t(0));
    scalar_t* image_row = dst_row + g.pad_w * lanes;
    const scalar_t* src_row = planes + h * g.width;  // channel i's row at src_row + i·H·W
    int64_t i0 = 0;
    for (; g.width >= V && i0 + V <= g.c_in_g; i0 += V)
      for (int64_t w0 = 0; w0 < g.width; w0 += V) {
        const int64_t first = std::min(w0, g.width - V);  // an overlapping last block: a copy, written twice
        Lane<scalar_t> block[V];
        for (int64_t q = 0; q < V; ++q) block[q] = load_lane(src_row + (i0 + q) * g.height * g.width + first);
        transpose_lanes<scalar_t>(block);
        for (int64_t v = 0; v < V; ++v) std::memcpy(image_row + (first + v) * lanes + i0, &block[v], sizeof block[v]);
      }
    for (int64_t i = i0; i < g.c_in_g; ++i) {
      const scalar_t* src = src_row + i * g.height * g.width;
      for (int64_t w = 0; w < g.width; ++w) image_row[w * lanes + i] = src[w];
    }
  }
}

// z[m][r][wo][:] = Σ_c b_m[c] · xt[r][wo·sW + c][:]
template <typename scalar_t>
void pass_along_w(const scalar_t* xt, const scalar_t* taps, const Geometry& g, const Tile& tile, int64_t lanes,
                  scalar_t* z) {
  constexpr int64_t V = kLane<scalar_t>;
  for (int64_t m = 0; m < g.order1; ++m)
    for (int64_t r = 0; r < tile.footprint; ++r)
      for (int64_t i0 = 0; i0 < lanes; i0 += V)
        lane_sums(g.out_w, z + (m * tile.footprint + r) * g.out_w * lanes + i0, lanes, false, V,
                  xt + r * g.padded_w * lanes + i0, g.stride_w * lanes, lanes, taps + m * g.k, 1, g.k);
}

// resp[ho·Wo + wo][f][:] = Σ_a b_l[a] · z[m][ho·sH + a][wo][:], (l, m) = pair f.
template <typename scalar_t>
void pass_along_h(const scalar_t* z, const scalar_t* taps, const Geometry& g, const Tile& tile, int64_t lanes,
                  scalar_t* resp) {
  constexpr int64_t V = kLane<scalar_t>;
  for (int64_t f = 0; f < g.n_basis; ++f)
    for (int64_t i0 = 0; i0 < g.c_in_g; i0 += V)
      for (int64_t ho = 0; ho < tile.rows; ++ho)
        lane_sums(g.out_w, resp + (ho * g.out_w * g.n_basis + f) * g.c_in_g + i0, g.n_basis * g.c_in_g, false,
                  std::min(V, g.c_in_g - i0),
                  z + (g.col_tap[f] * tile.footprint + ho * g.stride_h) * g.out_w * lanes + i0, lanes,
                  g.out_w * lanes, taps + g.row_tap[f] * g.k, 1, g.k);
}

// The tile's GEMM result, window[images·pixels][C_out_g] (pixel-major: MKL
// ran these GEMMs ~30 % faster with the short C_out_g side innermost), into the
// NCHW output, one kLane x kLane block transposed in registers at a time, the
// rest element by element. bias [C_out] and shift [C_out, Ho, Wo] (each
// optional) are added on the way: no pass of their own.
template <typename scalar_t>
void store_window(const scalar_t* window, const Geometry& g, const Tile& tile, int64_t grp, const scalar_t* bias,
                  const scalar_t* shift, scalar_t* out) {
  constexpr int64_t V = kLane<scalar_t>;
  const int64_t plane = g.out_h * g.out_w, first = tile.first_out_row * g.out_w;  // the tile's first pixel
  for (int64_t img = 0; img < tile.images; ++img) {
    const scalar_t* src = window + img * tile.pixels * g.c_out_g;
    scalar_t* dst = out + ((tile.b + img) * g.c_out + grp * g.c_out_g) * plane + first;
    const scalar_t* shifts = shift ? shift + grp * g.c_out_g * plane + first : nullptr;
    for (int64_t o0 = 0; o0 < g.c_out_g; o0 += V) {
      const int64_t channels = std::min(V, g.c_out_g - o0);
      int64_t p0 = 0;
      if (channels == V)
        for (; p0 + V <= tile.pixels; p0 += V) {
          Lane<scalar_t> rows[V];
          for (int64_t q = 0; q < V; ++q) rows[q] = load_lane(src + (p0 + q) * g.c_out_g + o0);
          transpose_lanes<scalar_t>(rows);
          for (int64_t v = 0; v < V; ++v) {
            const int64_t o = o0 + v;
            Lane<scalar_t> row = rows[v];
            if (bias) row += bias[grp * g.c_out_g + o];
            if (shifts) row += load_lane(shifts + o * plane + p0);
            std::memcpy(dst + o * plane + p0, &row, sizeof row);
          }
        }
      for (int64_t o = o0; o < o0 + channels; ++o)
        for (int64_t p = p0; p < tile.pixels; ++p) {
          scalar_t value = src[p * g.c_out_g + o];
          if (bias) value += bias[grp * g.c_out_g + o];
          if (shifts) value += shifts[o * plane + p];
          dst[o * plane + p] = value;
        }
    }
  }
}

at::Tensor srf_conv2d_cpu(const at::Tensor& input_, const at::Tensor& taps_, const at::Tensor& alpha_,
                          const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& shift_,
                          at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups) {
  const Geometry g = make_geometry(input_, taps_, alpha_, stride, padding, groups, kForwardTilePixels, true);
  // Detached: the GEMMs below must not meet autograd, here or in worker threads.
  const at::Tensor input = input_.detach().contiguous(), taps = taps_.detach().contiguous(),
                   alpha = alpha_.detach().contiguous();
  const auto addend = [&](const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->sizes() == shape, "srf_conv2d: ", name, " must have shape ", shape, ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), "srf_conv2d: ", name, " must have the input's dtype");
    TORCH_CHECK(t->device() == input.device(), "srf_conv2d: ", name, " must be on the input's device");
    return t->detach().contiguous();
  };
  const at::Tensor bias = addend(bias_, "bias", {g.c_out});
  const at::Tensor shift = addend(shift_, "shift", {g.c_out, g.out_h, g.out_w});
  at::Tensor out = at::empty({g.batch, g.c_out, g.out_h, g.out_w}, input.options());
  const at::Tensor alpha2d = alpha.view({g.n_basis * g.c_in_g, g.c_out});

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "srf_conv2d_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* tp = taps.const_data_ptr<scalar_t>();
    const scalar_t* bs = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sh = shift.defined() ? shift.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const Buffers<scalar_t> size(g);
    const int64_t compact = g.n_basis * g.c_in_g;  // one pixel's responses
    at::parallel_for(0, g.image_groups * g.n_tiles, 1, [&](int64_t begin, int64_t end) {
      const Scratch<scalar_t> xt(0, size.xt), z(1, size.z), resp(2, size.resp), window(3, size.window);
      for (int64_t item = begin; item < end; ++item) {
        const Tile tile = make_tile(g, item / g.n_tiles, item % g.n_tiles);
        const int64_t columns = tile.images * tile.pixels;
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t img = 0; img < tile.images; ++img) {
            load_tile(x + ((tile.b + img) * g.c_in + grp * g.c_in_g) * g.height * g.width, g, tile, size.lanes,
                      xt.data());
            pass_along_w(xt.data(), tp, g, tile, size.lanes, z.data());
            pass_along_h(z.data(), tp, g, tile, size.lanes, resp.data() + img * tile.pixels * compact);
          }
          const at::Tensor responses = at::from_blob(resp.data(), {columns, compact}, input.options());
          const at::Tensor a = alpha2d.narrow(1, grp * g.c_out_g, g.c_out_g);
          at::Tensor y_tile = at::from_blob(window.data(), {columns, g.c_out_g}, input.options());
          at::mm_out(y_tile, responses, a);
          store_window(window.data(), g, tile, grp, bs, sh, y);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> srf_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input_, const at::Tensor& taps_, const at::Tensor& alpha_,
    at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, std::array<bool, 3> output_mask) {
  const Geometry g = make_geometry(input_, taps_, alpha_, stride, padding, groups, kBackwardTilePixels, false);
  const auto [need_input, need_taps, need_alpha] = output_mask;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.batch, g.c_out, g.out_h, g.out_w}),
              "srf_conv2d_backward: grad_output has shape ", grad_output.sizes());
  // The input is read only for the taps and alpha gradients (the autograd
  // formula passes a broadcast placeholder otherwise).
  const bool read_input = need_taps || need_alpha;
  const at::Tensor input = read_input ? input_.detach().contiguous() : input_;
  // Detached: the GEMMs below must not meet autograd, here or in worker threads.
  const at::Tensor taps = taps_.detach().contiguous(), alpha = alpha_.detach().contiguous(),
                   gy = grad_output.detach().contiguous();
  const at::Tensor alpha2d = alpha.view({g.n_basis * g.c_in_g, g.c_out});
  const auto options = taps.options();

  // One partial sum per thread, reduced in thread order: deterministic for a
  // given number of threads.
  const int64_t n_threads = at::get_num_threads();
  at::Tensor grad_input, alpha_parts, taps_parts;
  if (need_input) grad_input = at::zeros({g.batch, g.c_in, g.height, g.width}, options);
  if (need_alpha) alpha_parts = at::zeros({n_threads, g.n_basis * g.c_in_g, g.c_out}, options);
  if (need_taps) taps_parts = at::zeros({n_threads, g.order1, g.k}, options);

  AT_DISPATCH_FLOATING_TYPES(taps.scalar_type(), "srf_conv2d_backward_cpu", [&] {
    constexpr int64_t V = kLane<scalar_t>;
    const scalar_t* x = read_input ? input.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* tp = taps.const_data_ptr<scalar_t>();
    scalar_t* gx = need_input ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    const Buffers<scalar_t> size(g);
    const int64_t lanes = size.lanes, cig = g.c_in_g, nb = g.n_basis;

    for (int64_t parity = 0; parity < 2; ++parity) {
      const int64_t per_image = (g.n_tiles - parity + 1) / 2;
      at::parallel_for(0, g.batch * per_image, 1, [&](int64_t begin, int64_t end) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid < n_threads, "srf_conv2d_backward: thread id ", tid, " >= ", n_threads);
        const Scratch<scalar_t> xt(0, read_input ? size.xt : 0), z(1, read_input ? size.z : 0);
        const Scratch<scalar_t> resp(2, need_alpha ? size.resp : 0), grad_resp(3, size.resp);
        const Scratch<scalar_t> grad_z(4, size.z), grad_xt(5, need_input ? size.xt : 0);
        // Lane-wise partial sums of the tap gradient, reduced over channels at the end.
        TileBuffer<scalar_t> tap_acc(need_taps ? g.order1 * g.k * lanes : 0, scalar_t(0));
        for (int64_t item = begin; item < end; ++item) {
          const Tile tile = make_tile(g, item / per_image, parity + 2 * (item % per_image));
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            const at::Tensor gy_tile = output_window(gy, g, tile, grp);
            const at::Tensor a = alpha2d.narrow(1, grp * g.c_out_g, g.c_out_g);
            const int64_t first_plane = (tile.b * g.c_in + grp * cig) * g.height * g.width;
            if (read_input) {
              load_tile(x + first_plane, g, tile, lanes, xt.data());
              pass_along_w(xt.data(), tp, g, tile, lanes, z.data());
            }
            if (need_alpha) {
              pass_along_h(z.data(), tp, g, tile, lanes, resp.data());
              const at::Tensor responses = at::from_blob(resp.data(), {tile.pixels, nb * cig}, options);
              alpha_parts.select(0, tid).narrow(1, grp * g.c_out_g, g.c_out_g).addmm_(responses.t(), gy_tile.t());
            }
            if (!(need_input || need_taps)) continue;
            at::Tensor grad_responses = at::from_blob(grad_resp.data(), {tile.pixels, nb * cig}, options);
            at::mm_out(grad_responses, gy_tile.t(), a.t());

            // Transposed H pass, as a gather: grad_z[m][r][wo] = Σ_(f: m_f = m) Σ_ho b_l[r - ho·sH] ·
            // grad_resp[ho·Wo + wo][f] over the ho with 0 <= r - ho·sH < K. Row by row within one
            // (lane, basis function): the K rows of grad_resp a row reads stay in L1 for the next.
            for (int64_t m = 0; m < g.order1; ++m) {
              scalar_t* plane = grad_z.data() + m * tile.footprint * g.out_w * lanes;
              std::fill(plane, plane + tile.footprint * g.out_w * lanes, scalar_t(0));
              for (int64_t i0 = 0; i0 < lanes; i0 += V)
                for (int64_t f = 0; f < nb; ++f) {
                  if (g.col_tap[f] != m) continue;
                  for (int64_t r = 0; r < tile.footprint; ++r) {
                    const int64_t ho_lo = ceil_div(std::max<int64_t>(r - g.k + 1, 0), g.stride_h);
                    const int64_t ho_hi = std::min(tile.rows - 1, r / g.stride_h);
                    if (ho_hi < ho_lo) continue;
                    lane_sums(g.out_w, plane + r * g.out_w * lanes + i0, lanes, true, V,
                              grad_resp.data() + (ho_lo * g.out_w * nb + f) * cig + i0, nb * cig,
                              g.out_w * nb * cig, tp + g.row_tap[f] * g.k + (r - ho_lo * g.stride_h), -g.stride_h,
                              ho_hi - ho_lo + 1);
                  }
                }
            }
            if (need_taps) {
              // b_l in its row role: Σ_pixels grad_resp[.][f] · z[m][ho·sH + a][wo], a < K.
              for (int64_t f = 0; f < nb; ++f)
                for (int64_t i0 = 0; i0 < lanes; i0 += V)
                  lane_correlates(g.k, tap_acc.data() + g.row_tap[f] * g.k * lanes + i0, lanes,
                                  grad_resp.data() + f * cig + i0,
                                  z.data() + g.col_tap[f] * tile.footprint * g.out_w * lanes + i0, g.out_w * lanes,
                                  tile.rows, g.out_w * nb * cig, g.stride_h * g.out_w * lanes, g.out_w, nb * cig,
                                  lanes);
              // b_m in its column role: Σ grad_z[m][r][wo] · xt[r][wo·sW + c], c < K.
              for (int64_t m = 0; m < g.order1; ++m)
                for (int64_t i0 = 0; i0 < lanes; i0 += V)
                  lane_correlates(g.k, tap_acc.data() + m * g.k * lanes + i0, lanes,
                                  grad_z.data() + m * tile.footprint * g.out_w * lanes + i0, xt.data() + i0, lanes,
                                  tile.footprint, g.out_w * lanes, g.padded_w * lanes, g.out_w, lanes,
                                  g.stride_w * lanes);
            }
            if (need_input) {
              // Transposed W pass, scattered: grad_xt[r][wo·sW + c] += Σ_m b_m[c] · grad_z[m][r][wo],
              // the sum over m formed in registers; for each c a run of outputs wo at once
              // (distinct addresses, independent chains).
              for (int64_t r = 0; r < tile.footprint; ++r) {
                const int64_t h = tile.first_padded_row + r - g.pad_h;
                if (h < 0 || h >= g.height) continue;
                scalar_t* grad_row = grad_xt.data() + r * g.padded_w * lanes;
                std::fill(grad_row, grad_row + g.padded_w * lanes, scalar_t(0));
                const int64_t m_step = tile.footprint * g.out_w * lanes;
                for (int64_t i0 = 0; i0 < lanes; i0 += V)
                  for (int64_t c = 0; c < g.k; ++c)
                    lane_sums(g.out_w, grad_row + c * lanes + i0, g.stride_w * lanes, true, V,
                              grad_z.data() + r * g.out_w * lanes + i0, lanes, m_step, tp + c, g.k, g.order1);
                for (int64_t i = 0; i < cig; ++i) {
                  scalar_t* dst = gx + first_plane + (i * g.height + h) * g.width;
                  const scalar_t* src = grad_xt.data() + (r * g.padded_w + g.pad_w) * lanes + i;
                  for (int64_t w = 0; w < g.width; ++w) dst[w] += src[w * lanes];
                }
              }
            }
          }
        }
        if (need_taps) {
          scalar_t* part = taps_parts.select(0, tid).mutable_data_ptr<scalar_t>();
          for (int64_t j = 0; j < g.order1 * g.k; ++j)
            for (int64_t i = 0; i < cig; ++i) part[j] += tap_acc[j * lanes + i];
        }
      });
    }
  });

  at::Tensor grad_taps, grad_alpha;
  if (need_taps) grad_taps = taps_parts.sum(0);
  if (need_alpha) grad_alpha = alpha_parts.sum(0).view({g.n_basis, g.c_in_g, g.c_out});
  return {grad_input, grad_taps, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_fast, CPU, m) {
  m.impl("srf_tiled_conv2d", &srf_conv2d_cpu);
  m.impl("srf_tiled_conv2d_backward", &srf_conv2d_backward_cpu);
}

}  // namespace dcn_fast
