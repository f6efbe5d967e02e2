// CUDA kernels for cnnops::roi_align and cnnops::_roi_align_backward.
//
// Three kernels:
//   roi_align_forward_kernel          - one block per (RoI, chunk of channels) work item;
//   roi_align_backward_atomic_kernel  - the same split, scattering with atomicAdd (default);
//   roi_align_backward_gather_kernel  - deterministic: one thread per grad-input element, which
//                                       gathers from the RoIs of its image (no atomics).
// All index math comes from roi_align.h (roi_align_geometry, bilinear_taps), shared with and
// tested through the CPU kernel.
//
// Separable taps. A sample's bilinear taps factor into a row part (y_low, y_high, hy, ly), which
// depends only on the sample's row j = ph * grid_h + iy, and a column part (x_low, x_high, hx,
// lx), which depends only on its column. bilinear_taps(y, 0, H, W) returns the row part exactly
// (the column weights are then hx = 1, lx = 0, and hy * 1 is hy), bilinear_taps(0, x, H, W) the
// column part, and a full tap weight is the product of the two, just as bilinear_taps forms it
// (w_ll = hy * hx). So a RoI needs pooled_h * grid_h + pooled_w * grid_w tap computations
// instead of one per sample of every bin, channel and thread, and the weights are bit-identical
// to bilinear_taps'. A sample more than one pixel outside the map reads nothing (bilinear_taps'
// zero weights, skipped, as torchvision's CUDA kernel returns early). The NCHW forward also sums
// in factored form (sample columns of sample-row sums), so its results equal torchvision's up
// to the order of the additions.
//
// Sample positions are computed by sample_coord with every operation separately rounded (no FMA
// contraction), so that every kernel here computes bit-identical positions: the deterministic
// backward recomputes positions and must find exactly the samples the forward and the atomic
// backward use.
//
// Arithmetic in at::opmath_type<scalar_t>: float for float/half/bfloat16 (geometry included,
// where torchvision computes half geometry in half), double for double.
//
// The RoIs are validated on the host (check_roi_boxes) from one copy of the [K, 5] tensor to the
// CPU, before any kernel runs; the kernels clamp the batch index anyway, and bilinear_taps keeps
// every pixel index inside the map, so nothing reads out of bounds. The host also rejects RoIs
// that leave the floating-point range once scaled and sampling grids of more than 2^30 points
// per bin, on which torchvision overflows or runs for hours (check_sampling_grids).

#include "ops/cuda/roi_common.cuh"  // work splits, RoI lists and host code shared with roi_pool
#include "ops/roi_align.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace cnnops {
namespace {

// Dynamic shared memory for a work item's tap table (RoIs whose table does not fit, grids of
// about 70 samples per side and more at 7 x 7 bins, compute their taps in the sample loop
// instead), and for the NCHW forward's bin-row sums. Together under the 48 KB a block may use
// without opting in.
constexpr int64_t kTapTableBytes = 16 * 1024;
constexpr int64_t kRowSumBytes = 30 * 1024;
// Sampling points per bin (and so per bin side). torchvision loops for ever (or overflows) on
// RoIs whose adaptive grid is absurd; these raise instead. 2^30 leaves room for the device's
// rounding of a grid size to differ from the host's by one and still fit the kernels' 32-bit
// sample indices.
constexpr int64_t kMaxSamplesPerBin = int64_t(1) << 30;
// Channels each thread of the deterministic backward accumulates in registers (fewer in double,
// whose accumulators take two registers each).
constexpr int kMaxChannelsPerThread = 8;
template <typename acc_t>
constexpr int channels_per_thread() {
  return sizeof(acc_t) > 4 ? kMaxChannelsPerThread / 2 : kMaxChannelsPerThread;
}

struct RoiAlignShape {
  int64_t num_rois, batch_size, channels, height, width;
  int64_t pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

// The (RoI, channel chunk) work split of the forward and atomic backward kernels, and the
// dynamic shared memory each item gets.
struct RoiAlignItems : RoiItems {
  int64_t tap_capacity;      // TapEntry slots of dynamic shared memory
  int64_t row_sum_capacity;  // acc_t slots after them for the NCHW forward (0: direct form)
};

// ---- Exact arithmetic helpers ---------------------------------------------------------------

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// Coordinate of sample i of bin p: start + p * bin + (i + .5) * bin / grid, torchvision's (and
// the CPU kernel's) expression, each operation rounded on its own.
template <typename T>
__device__ __forceinline__ T sample_coord(T start, int64_t p, T bin, int64_t i, int64_t grid) {
  return add_rn(add_rn(start, mul_rn(static_cast<T>(p), bin)),
                div_rn(mul_rn(static_cast<T>(i + .5f), bin), static_cast<T>(grid)));
}

// One axis of a sample's taps: pixels `low`, `high` and their weights; `valid` is false for a
// coordinate more than one pixel outside the map (bilinear_taps' all-zero case).
template <typename T>
struct AxisTap {
  int64_t low, high;
  T w_low, w_high;
  bool valid;
};

template <typename T>
__device__ __forceinline__ AxisTap<T> row_tap(T y, int64_t height, int64_t width) {
  const BilinearTaps<T> t = bilinear_taps(y, T(0), height, width);
  return {t.y_low, t.y_high, t.w_ll, t.w_hl, !(y < T(-1) || y > static_cast<T>(height))};
}

template <typename T>
__device__ __forceinline__ AxisTap<T> col_tap(T x, int64_t height, int64_t width) {
  const BilinearTaps<T> t = bilinear_taps(T(0), x, height, width);
  return {t.x_low, t.x_high, t.w_ll, t.w_lh, !(x < T(-1) || x > static_cast<T>(width))};
}

// A row (or column) of a RoI's samples as the forward and atomic kernels use it: its two pixel
// rows (columns) and their weights; low < 0 marks a row outside the map. Pixel indices, not
// offsets: 32 bits (the host checks H, W < 2^31), and usable in any tensor and in shared memory.
template <typename T>
struct TapEntry {
  int32_t low, high;
  T w_low, w_high;
};

template <typename T>
__device__ __forceinline__ TapEntry<T> row_entry(const RoiGeometry<T>& g, int64_t ph, int64_t iy,
                                                 int64_t height, int64_t width) {
  const AxisTap<T> t = row_tap(sample_coord(g.start_h, ph, g.bin_h, iy, g.grid_h), height, width);
  if (!t.valid) return {-1, -1, T(0), T(0)};
  return {static_cast<int32_t>(t.low), static_cast<int32_t>(t.high), t.w_low, t.w_high};
}

template <typename T>
__device__ __forceinline__ TapEntry<T> col_entry(const RoiGeometry<T>& g, int64_t pw, int64_t ix,
                                                 int64_t height, int64_t width) {
  const AxisTap<T> t = col_tap(sample_coord(g.start_w, pw, g.bin_w, ix, g.grid_w), height, width);
  if (!t.valid) return {-1, -1, T(0), T(0)};
  return {static_cast<int32_t>(t.low), static_cast<int32_t>(t.high), t.w_low, t.w_high};
}

// RoI k's geometry in acc_t, and its image (clamped: the host has checked it already).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RoiGeometry<acc_t> load_geometry(const scalar_t* __restrict__ rois,
                                                            int64_t k, acc_t spatial_scale,
                                                            const RoiAlignShape& s,
                                                            int64_t& image) {
  acc_t r[5];
  load_roi(rois, k, s.batch_size, r, image);
  return roi_align_geometry(r, spatial_scale, s.pooled_h, s.pooled_w, s.sampling_ratio,
                            s.aligned);
}

// Fills the item's tap table: rows [0, rows) then columns [rows, rows + cols). With col_span,
// also the smallest and largest pixel column of the valid column taps (shared-memory atomic
// min/max: the result does not depend on their order).
template <typename acc_t>
__device__ __forceinline__ void fill_tap_table(TapEntry<acc_t>* taps, const RoiGeometry<acc_t>& g,
                                               int64_t rows, int64_t cols, int64_t height,
                                               int64_t width, int* col_span) {
  for (int64_t t = threadIdx.x; t < rows + cols; t += blockDim.x) {
    if (t < rows) {
      const int64_t ph = t / g.grid_h;
      taps[t] = row_entry(g, ph, t - ph * g.grid_h, height, width);
    } else {
      const int64_t j = t - rows;
      const int64_t pw = j / g.grid_w;
      const TapEntry<acc_t> e = col_entry(g, pw, j - pw * g.grid_w, height, width);
      taps[t] = e;
      if (col_span != nullptr && e.low >= 0) {
        atomicMin(col_span, e.low);
        atomicMax(col_span + 1, e.high);
      }
    }
  }
}

// ---- Forward --------------------------------------------------------------------------------
//
// Tiling: a block takes one (RoI, chunk of channels) item at a time (grid-stride over items;
// consecutive blocks take the chunks of one RoI, which read the same region of the map from L2).
// It first builds the RoI's tap table in shared memory - one TapEntry per sample row and per
// sample column, pooled_h * grid_h + pooled_w * grid_w entries - so the position and weight
// arithmetic (with the divisions torchvision repeats per sample and thread) is done once per
// item, not once per sample, channel and thread. Then, by layout:
// - channels_last (direct): each thread computes one (channel, bin) output, 4 loads and 4
//   multiply-adds per sample, taps from the table (shared-memory broadcasts: a warp shares one
//   bin or a few). A warp reads 32 consecutive channels of each tap pixel (one or two full
//   128-byte lines) and writes 32 consecutive outputs.
// - NCHW (separable): bilinear weights factor (w = w_row * w_col), so a bin's sum is
//   sum_ix w_col(ix) * T[ph][x(ix)] with T[ph][x] = sum_iy w_row(iy) * input[y(iy)][x]. Pass 1:
//   threads take (channel, ph, x) with x fastest over the RoI's column span and sum the bin
//   row's sample rows: a warp reads consecutive pixels of one image row (coalesced), instead of
//   the 32 scattered pixels a warp of per-output threads reads per tap (several cache lines per
//   load, where the direct form is L1-bound). T goes to shared memory. Pass 2: threads take
//   (channel, bin) with pw fastest, sum the bin's sample columns from T and write contiguously.
//   Channels go through in groups whose T fits the shared buffer.
// - Either layout falls back to the direct form, with taps computed in the sample loop, for a
//   RoI whose tap table does not fit (grids of hundreds of samples per side), and NCHW to the
//   direct form for a RoI whose T row does not fit (very wide RoIs with many bin rows).
// Input and output are addressed through their strides: non-contiguous inputs are read in place.
template <bool kCached, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t sum_bin(const scalar_t* __restrict__ plane,
                                         const TapEntry<acc_t>* taps, int64_t rows,
                                         const RoiGeometry<acc_t>& g, int64_t ph, int64_t pw,
                                         int64_t height, int64_t width, const Strides4& in) {
  acc_t sum(0);
  const int grid_h = static_cast<int>(g.grid_h), grid_w = static_cast<int>(g.grid_w);
  for (int iy = 0; iy < grid_h; ++iy) {
    const TapEntry<acc_t> r =
        kCached ? taps[ph * grid_h + iy] : row_entry(g, ph, iy, height, width);
    if (r.low < 0) continue;
    const scalar_t* __restrict__ low = plane + r.low * in.h;
    const scalar_t* __restrict__ high = plane + r.high * in.h;
    for (int ix = 0; ix < grid_w; ++ix) {
      const TapEntry<acc_t> c =
          kCached ? taps[rows + pw * grid_w + ix] : col_entry(g, pw, ix, height, width);
      if (c.low < 0) continue;
      const int64_t x_low = c.low * in.w, x_high = c.high * in.w;
      const acc_t v_ll = static_cast<acc_t>(low[x_low]);
      const acc_t v_lh = static_cast<acc_t>(low[x_high]);
      const acc_t v_hl = static_cast<acc_t>(high[x_low]);
      const acc_t v_hh = static_cast<acc_t>(high[x_high]);
      sum += (r.w_low * c.w_low) * v_ll + (r.w_low * c.w_high) * v_lh +
             (r.w_high * c.w_low) * v_hl + (r.w_high * c.w_high) * v_hh;
    }
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void pool_item_direct(const scalar_t* __restrict__ src,
                                                 scalar_t* __restrict__ dst,
                                                 const TapEntry<acc_t>* taps, bool cached,
                                                 int64_t rows, const RoiGeometry<acc_t>& g,
                                                 int nc, const RoiAlignShape& s,
                                                 const RoiAlignItems& it, const Strides4& in,
                                                 const Strides4& out) {
  const int bins = static_cast<int>(s.pooled_h * s.pooled_w);
  const int pooled_w = static_cast<int>(s.pooled_w);
  const int outputs = nc * bins;
  for (int i = threadIdx.x; i < outputs; i += kThreads) {
    int c, bin;
    split_item_index(i, nc, bins, it.channels_fastest, c, bin);
    const int ph = bin / pooled_w, pw = bin - ph * pooled_w;
    const scalar_t* __restrict__ plane = src + c * in.c;
    const acc_t sum = cached ? sum_bin<true>(plane, taps, rows, g, ph, pw, s.height, s.width, in)
                             : sum_bin<false>(plane, taps, rows, g, ph, pw, s.height, s.width, in);
    dst[c * out.c + ph * out.h + pw * out.w] = static_cast<scalar_t>(sum / g.count);
  }
}

// The NCHW separable form for channels [0, nc) of an item; x0, span: the valid column taps'
// pixel columns. Two barriers per group of channels.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void pool_item_separable(const scalar_t* __restrict__ src,
                                                    scalar_t* __restrict__ dst,
                                                    const TapEntry<acc_t>* taps, acc_t* row_sums,
                                                    int group, int64_t rows,
                                                    const RoiGeometry<acc_t>& g, int nc, int x0,
                                                    int span, const RoiAlignShape& s,
                                                    const Strides4& in, const Strides4& out) {
  const int pooled_h = static_cast<int>(s.pooled_h), pooled_w = static_cast<int>(s.pooled_w);
  const int grid_h = static_cast<int>(g.grid_h), grid_w = static_cast<int>(g.grid_w);
  const TapEntry<acc_t>* col_taps = taps + rows;
  for (int c0 = 0; c0 < nc; c0 += group) {
    const int gc = min(group, nc - c0);
    // Pass 1: row_sums[c][ph][x - x0] = sum over the bin row's sample rows.
    const int row_outputs = gc * pooled_h * span;
    for (int i = threadIdx.x; i < row_outputs; i += kThreads) {
      const int line = i / span;
      const int x = x0 + (i - line * span);
      const int c = line / pooled_h, ph = line - c * pooled_h;
      const scalar_t* __restrict__ column = src + (c0 + c) * in.c + x * in.w;
      const TapEntry<acc_t>* row_taps = taps + ph * grid_h;
      acc_t sum(0);
      for (int iy = 0; iy < grid_h; ++iy) {
        const TapEntry<acc_t> r = row_taps[iy];
        if (r.low < 0) continue;
        sum += r.w_low * static_cast<acc_t>(column[r.low * in.h]) +
               r.w_high * static_cast<acc_t>(column[r.high * in.h]);
      }
      row_sums[i] = sum;
    }
    __syncthreads();
    // Pass 2: each bin from its bin row's sums.
    const int outputs = gc * pooled_h * pooled_w;
    for (int i = threadIdx.x; i < outputs; i += kThreads) {
      const int line = i / pooled_w;
      const int pw = i - line * pooled_w;
      const int c = line / pooled_h, ph = line - c * pooled_h;
      const acc_t* sums = row_sums + line * span - x0;
      const TapEntry<acc_t>* bin_cols = col_taps + pw * grid_w;
      acc_t sum(0);
      for (int ix = 0; ix < grid_w; ++ix) {
        const TapEntry<acc_t> t = bin_cols[ix];
        if (t.low < 0) continue;
        sum += t.w_low * sums[t.low] + t.w_high * sums[t.high];
      }
      dst[(c0 + c) * out.c + ph * out.h + pw * out.w] = static_cast<scalar_t>(sum / g.count);
    }
    __syncthreads();  // pass 2 is done with row_sums before the next group's pass 1
  }
}

// Three blocks per SM (two in double): ptxas's default budget for 256 threads, 64 registers,
// spills the three forms inlined together.
template <typename acc_t>
constexpr int forward_min_blocks() {
  return sizeof(acc_t) > 4 ? 2 : 3;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, forward_min_blocks<acc_t>())
    roi_align_forward_kernel(const scalar_t* __restrict__ input,
                             const scalar_t* __restrict__ rois, acc_t spatial_scale,
                             RoiAlignShape s, RoiAlignItems it, Strides4 in, Strides4 out,
                             scalar_t* __restrict__ output) {
  extern __shared__ __align__(16) unsigned char roi_align_smem[];
  TapEntry<acc_t>* taps = reinterpret_cast<TapEntry<acc_t>*>(roi_align_smem);
  acc_t* row_sums = reinterpret_cast<acc_t*>(roi_align_smem +
                                             it.tap_capacity * sizeof(TapEntry<acc_t>));
  __shared__ int col_span[2];  // separable form: the columns the RoI's taps read
  const bool separable = it.row_sum_capacity > 0;
  const int64_t items = s.num_rois * it.chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const auto [k, c0, nc] = roi_item(it, item, s.channels);
    int64_t image;
    const RoiGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, s, image);
    const int64_t rows = s.pooled_h * (g.grid_h > 0 ? g.grid_h : 0);
    const int64_t cols = s.pooled_w * (g.grid_w > 0 ? g.grid_w : 0);
    const bool cached = rows + cols <= it.tap_capacity;
    __syncthreads();  // the previous item's threads are done with the shared memory
    if (separable && threadIdx.x == 0) {
      col_span[0] = std::numeric_limits<int>::max();
      col_span[1] = -1;
    }
    if (separable) __syncthreads();
    if (cached) {
      fill_tap_table(taps, g, rows, cols, s.height, s.width, separable ? col_span : nullptr);
    }
    __syncthreads();
    const scalar_t* __restrict__ src = input + image * in.n + c0 * in.c;
    scalar_t* __restrict__ dst = output + k * out.n + c0 * out.c;
    if (separable && cached) {
      const bool any_column = col_span[1] >= col_span[0];  // else every output is 0
      const int x0 = any_column ? col_span[0] : 0;
      const int span = any_column ? col_span[1] - x0 + 1 : 0;
      const int64_t per_channel = s.pooled_h * std::max(span, 1);
      const int group = static_cast<int>(std::min<int64_t>(nc, it.row_sum_capacity / per_channel));
      if (group > 0) {
        pool_item_separable(src, dst, taps, row_sums, group, rows, g, nc, x0, span, s, in, out);
        continue;
      }
    }
    pool_item_direct(src, dst, taps, cached, rows, g, nc, s, it, in, out);
  }
}

// ---- Backward, atomic -----------------------------------------------------------------------
//
// The forward's split and tap table, run in reverse: each thread takes one (channel, bin) of the
// item, scales its gradient by 1 / count once, and adds weight * gradient to the 4 tap pixels of
// every sample with atomicAdd into an acc_t grad input (grad input itself for float and double,
// a float32 buffer for half and bfloat16, cast at the end: half atomics would round every
// partial sum to 11 bits). channels_last: a warp's atomics hit 32 consecutive channels of a
// pixel, which the memory system merges into full-line updates. The order in which the atomics
// land varies from run to run: not deterministic.
template <bool kCached, typename acc_t>
__device__ __forceinline__ void scatter_bin(acc_t* __restrict__ plane, const TapEntry<acc_t>* taps,
                                            int64_t rows, const RoiGeometry<acc_t>& g,
                                            int64_t ph, int64_t pw, int64_t height,
                                            int64_t width, const Strides4& gi, acc_t grad) {
  const int grid_h = static_cast<int>(g.grid_h), grid_w = static_cast<int>(g.grid_w);
  for (int iy = 0; iy < grid_h; ++iy) {
    const TapEntry<acc_t> r =
        kCached ? taps[ph * grid_h + iy] : row_entry(g, ph, iy, height, width);
    if (r.low < 0) continue;
    acc_t* low = plane + r.low * gi.h;
    acc_t* high = plane + r.high * gi.h;
    for (int ix = 0; ix < grid_w; ++ix) {
      const TapEntry<acc_t> c =
          kCached ? taps[rows + pw * grid_w + ix] : col_entry(g, pw, ix, height, width);
      if (c.low < 0) continue;
      const int64_t x_low = c.low * gi.w, x_high = c.high * gi.w;
      atomicAdd(low + x_low, mul_rn(mul_rn(r.w_low, c.w_low), grad));
      atomicAdd(low + x_high, mul_rn(mul_rn(r.w_low, c.w_high), grad));
      atomicAdd(high + x_low, mul_rn(mul_rn(r.w_high, c.w_low), grad));
      atomicAdd(high + x_high, mul_rn(mul_rn(r.w_high, c.w_high), grad));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_backward_atomic_kernel(const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ rois, acc_t spatial_scale,
                                     RoiAlignShape s, RoiAlignItems it, Strides4 gs,
                                     Strides4 gi, acc_t* __restrict__ grad_input) {
  extern __shared__ __align__(16) unsigned char roi_align_smem[];
  TapEntry<acc_t>* taps = reinterpret_cast<TapEntry<acc_t>*>(roi_align_smem);
  const int bins = static_cast<int>(s.pooled_h * s.pooled_w);
  const int pooled_w = static_cast<int>(s.pooled_w);
  const int64_t items = s.num_rois * it.chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const auto [k, c0, nc] = roi_item(it, item, s.channels);
    int64_t image;
    const RoiGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, s, image);
    const int64_t rows = s.pooled_h * (g.grid_h > 0 ? g.grid_h : 0);
    const int64_t cols = s.pooled_w * (g.grid_w > 0 ? g.grid_w : 0);
    const bool cached = rows + cols <= it.tap_capacity;
    const acc_t inv_count = acc_t(1) / g.count;
    __syncthreads();
    if (cached) fill_tap_table(taps, g, rows, cols, s.height, s.width, nullptr);
    __syncthreads();
    if (rows == 0 || cols == 0) continue;  // no samples: nothing to add
    const scalar_t* __restrict__ src = grad + k * gs.n + c0 * gs.c;
    acc_t* __restrict__ dst = grad_input + image * gi.n + c0 * gi.c;
    const int outputs = nc * bins;
    for (int i = threadIdx.x; i < outputs; i += kThreads) {
      int c, bin;
      split_item_index(i, nc, bins, it.channels_fastest, c, bin);
      const int ph = bin / pooled_w, pw = bin - ph * pooled_w;
      const acc_t g_bin =
          mul_rn(static_cast<acc_t>(src[c * gs.c + ph * gs.h + pw * gs.w]), inv_count);
      acc_t* __restrict__ plane = dst + c * gi.c;
      if (cached) {
        scatter_bin<true>(plane, taps, rows, g, ph, pw, s.height, s.width, gi, g_bin);
      } else {
        scatter_bin<false>(plane, taps, rows, g, ph, pw, s.height, s.width, gi, g_bin);
      }
    }
  }
}

// ---- Backward, deterministic (gather) -------------------------------------------------------
//
// Each thread owns grad-input elements - one pixel (y, x) of image n and up to
// channels_per_thread<acc_t>() channels (8; 4 in double) - and sums, in registers and in a fixed
// order (RoI index, then sample row, then sample column), every term the atomic kernel would add
// to them; one plain store per element, no atomics, no zero fill.
// Work items: (image, channel chunk, pixel tile). A block first lists, in shared memory, the
// RoIs of its image (host-sorted by image, ascending index) whose samples can reach the tile,
// 256 at a time, in order (warp ballots and a block prefix sum); then every thread walks the
// list. For its pixel and a listed RoI it inverts the sample position
// y_j = start_h + (j + 0.5) * bin_h / grid_h to the few sample rows j that can tap it (taps reach
// one pixel each way; the range is widened by one sample plus a rounding margin), recomputes
// each candidate's row taps exactly as the other kernels do (sample_coord, bilinear_taps) and
// keeps those whose y_low or y_high is y; the same for columns. So it adds exactly the terms the
// atomic kernel adds, (w_row * w_col) * (grad * (1 / count)), in a fixed order: two runs are
// bitwise equal, and equal to the atomic path up to summation order.
// Thread order follows the grad-input layout: channels_last - a warp holds 32 consecutive
// channels of one pixel, so all the candidate arithmetic is warp-uniform and the grad reads and
// the final stores are coalesced; NCHW - a warp holds 32 consecutive pixels of a row, each with
// 8 (4) consecutive channels, so the stores of each channel are coalesced.
// Memory: the per-image RoI order (K + N + 1 integers); nothing of size K * C * H * W.
template <typename T>
struct ListedRoi {
  T start_h, start_w, bin_h, bin_w;
  T step_h, step_w;      // bin / grid: the sample spacing
  T margin_h, margin_w;  // widening of the candidate ranges, in samples
  T inv_count;
  int64_t k;
  int grid_h, grid_w;  // <= kMaxSamplesPerBin
};

// Whether the samples of one axis of a RoI can tap pixels [lo, hi]: a tap reaches one pixel
// either way of its sample, so samples in [lo - 1, hi + 1] (which includes the clamped ones in
// [-1, 0] and [size - 1, size]). The first and last sample bound the rest, up to rounding.
template <typename T>
__device__ __forceinline__ bool axis_reaches(T start, T bin, int64_t pooled, int64_t grid,
                                             int64_t lo, int64_t hi) {
  const T first = sample_coord(start, int64_t(0), bin, int64_t(0), grid);
  const T last = sample_coord(start, pooled - 1, bin, grid - 1, grid);
  const T slack = T(1) + T(8) * std::numeric_limits<T>::epsilon() *
                             (fabs(start) + fabs(static_cast<T>(pooled) * bin));
  const T low = (first < last ? first : last) - slack;
  const T high = (first < last ? last : first) + slack;
  return high >= static_cast<T>(lo - 1) && low <= static_cast<T>(hi + 1);
}

// Candidate sample indices along one axis: every j in [0, count) whose sample can tap `pixel`
// lies in [first, last]. Samples tapping `pixel` sit in [pixel - 1, pixel + 1] (down to -1 for
// the first pixel and up to `size` for the last, where bilinear_taps clamps). Rounding of the
// exact positions and of this estimate is covered by `margin` (at least one sample).
template <typename T>
__device__ __forceinline__ void candidate_range(int64_t pixel, int64_t size, T start, T step,
                                                T margin, int64_t count, int64_t& first,
                                                int64_t& last) {
  first = 0;
  last = count - 1;
  if (step == T(0)) return;  // every sample at one place: verify them all
  const T lo = pixel == 0 ? T(-1) : static_cast<T>(pixel - 1);
  const T hi = pixel == size - 1 ? static_cast<T>(size) : static_cast<T>(pixel + 1);
  T a = (lo - start) / step - T(0.5);
  T b = (hi - start) / step - T(0.5);
  if (step < T(0)) {
    const T t = a;
    a = b;
    b = t;
  }
  a -= margin;
  b += margin;
  const T top = static_cast<T>(count);
  // Comparisons first, so that huge or non-finite estimates never reach an integer conversion.
  if (a > T(0)) first = a >= top ? count : static_cast<int64_t>(a);
  if (b < top - T(1)) last = b < T(0) ? int64_t(-1) : ceil_to_int(b);
}

template <typename T>
__device__ __forceinline__ T sample_margin(T start, T bin, int64_t pooled, int64_t size, T step) {
  return T(1) + T(8) * std::numeric_limits<T>::epsilon() *
                    (fabs(start) + fabs(static_cast<T>(pooled) * bin) + static_cast<T>(size) +
                     T(2)) /
                    fabs(step);
}

// Whether RoI k can add to the tile [y0, y1] x [x0, x1]; if so, fills `e`.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool list_roi(const scalar_t* __restrict__ rois, int64_t k,
                                         acc_t spatial_scale, const RoiAlignShape& s, int64_t y0,
                                         int64_t y1, int64_t x0, int64_t x1, ListedRoi<acc_t>& e) {
  int64_t image;
  const RoiGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, s, image);
  if (g.grid_h <= 0 || g.grid_w <= 0) return false;  // no samples
  if (!axis_reaches(g.start_h, g.bin_h, s.pooled_h, g.grid_h, y0, y1) ||
      !axis_reaches(g.start_w, g.bin_w, s.pooled_w, g.grid_w, x0, x1)) {
    return false;
  }
  e.start_h = g.start_h;
  e.start_w = g.start_w;
  e.bin_h = g.bin_h;
  e.bin_w = g.bin_w;
  e.step_h = g.bin_h / static_cast<acc_t>(g.grid_h);
  e.step_w = g.bin_w / static_cast<acc_t>(g.grid_w);
  e.margin_h = sample_margin(g.start_h, g.bin_h, s.pooled_h, s.height, e.step_h);
  e.margin_w = sample_margin(g.start_w, g.bin_w, s.pooled_w, s.width, e.step_w);
  e.inv_count = acc_t(1) / g.count;  // as the atomic kernel computes it
  e.k = k;
  e.grid_h = static_cast<int>(g.grid_h);
  e.grid_w = static_cast<int>(g.grid_w);
  return true;
}

// Adds RoI e's terms for pixel (y, x) and the thread's channels to acc. grad_c: the grad of the
// thread's first channel at RoI 0, bin (0, 0); its further channels are channel_step apart.
template <int kChannels, typename scalar_t, typename acc_t>
__device__ __forceinline__ void gather_roi(const ListedRoi<acc_t>& e, int64_t y, int64_t x,
                                           const RoiAlignShape& s, const Strides4& gs,
                                           const scalar_t* __restrict__ grad_c,
                                           int64_t channel_step, int nch,
                                           acc_t (&acc)[kChannels]) {
  int64_t jy0, jy1, jx0, jx1;
  candidate_range(y, s.height, e.start_h, e.step_h, e.margin_h, s.pooled_h * e.grid_h, jy0, jy1);
  candidate_range(x, s.width, e.start_w, e.step_w, e.margin_w, s.pooled_w * e.grid_w, jx0, jx1);
  if (jy0 > jy1 || jx0 > jx1) return;
  // Bin and sample indices fit in 32 bits (pooled sizes and grids are checked on the host).
  const int pw0 = static_cast<int>(jx0 / e.grid_w);
  const int ix0 = static_cast<int>(jx0 - int64_t(pw0) * e.grid_w);
  int ph = static_cast<int>(jy0 / e.grid_h);
  int iy = static_cast<int>(jy0 - int64_t(ph) * e.grid_h);
  const scalar_t* __restrict__ grad_k = grad_c + e.k * gs.n;
  for (int64_t rows_left = jy1 - jy0; rows_left >= 0; --rows_left) {
    const AxisTap<acc_t> ty =
        row_tap(sample_coord(e.start_h, ph, e.bin_h, iy, e.grid_h), s.height, s.width);
    if (ty.valid && (ty.low == y || ty.high == y)) {
      int pw = pw0, ix = ix0;
      for (int64_t cols_left = jx1 - jx0; cols_left >= 0; --cols_left) {
        const AxisTap<acc_t> tx =
            col_tap(sample_coord(e.start_w, pw, e.bin_w, ix, e.grid_w), s.height, s.width);
        if (tx.valid && (tx.low == x || tx.high == x)) {
          // The atomic kernel's terms for this pixel, each formed as it forms them.
          const bool ll = ty.low == y && tx.low == x, lh = ty.low == y && tx.high == x;
          const bool hl = ty.high == y && tx.low == x, hh = ty.high == y && tx.high == x;
          const acc_t w_ll = mul_rn(ty.w_low, tx.w_low), w_lh = mul_rn(ty.w_low, tx.w_high);
          const acc_t w_hl = mul_rn(ty.w_high, tx.w_low), w_hh = mul_rn(ty.w_high, tx.w_high);
          const scalar_t* __restrict__ gp = grad_k + ph * gs.h + pw * gs.w;
#pragma unroll
          for (int q = 0; q < kChannels; ++q) {
            if (q < nch) {
              const acc_t g = mul_rn(static_cast<acc_t>(gp[q * channel_step]), e.inv_count);
              if (ll) acc[q] = add_rn(acc[q], mul_rn(w_ll, g));
              if (lh) acc[q] = add_rn(acc[q], mul_rn(w_lh, g));
              if (hl) acc[q] = add_rn(acc[q], mul_rn(w_hl, g));
              if (hh) acc[q] = add_rn(acc[q], mul_rn(w_hh, g));
            }
          }
        }
        if (++ix == e.grid_w) {
          ix = 0;
          ++pw;
        }
      }
    }
    if (++iy == e.grid_h) {
      iy = 0;
      ++ph;
    }
  }
}

// Two blocks per SM in float (about 120 registers a thread: the candidate search keeps many
// indices live); one in double, whose arithmetic needs more and would otherwise spill.
template <typename acc_t>
constexpr int gather_min_blocks() {
  return sizeof(acc_t) > 4 ? 1 : 2;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, gather_min_blocks<acc_t>())
    roi_align_backward_gather_kernel(const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ rois,
                                     const int64_t* __restrict__ roi_order,
                                     const int64_t* __restrict__ image_begin,
                                     acc_t spatial_scale, RoiAlignShape s, GatherTiling t,
                                     Strides4 gs, Strides4 gi, scalar_t* __restrict__ grad_input) {
  __shared__ ListedRoi<acc_t> listed[kThreads];
  __shared__ int warp_counts[kWarps];
  const int lane_c = threadIdx.x % t.lanes_c, lane_p = threadIdx.x / t.lanes_c;
  const int64_t tiles = t.tiles_y * t.tiles_x;
  const int64_t items = s.batch_size * t.chunks * tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const auto [n, y0, y1, x0, x1, y, x, c, nch] =
        gather_item(t, item, tiles, lane_c, lane_p, s.channels, s.height, s.width);
    constexpr int kChannels = channels_per_thread<acc_t>();
    acc_t acc[kChannels];
#pragma unroll
    for (int q = 0; q < kChannels; ++q) acc[q] = acc_t(0);
    const scalar_t* __restrict__ grad_c = grad + c * gs.c;
    const int64_t channel_step = t.lanes_c * gs.c;

    const int64_t begin = image_begin[n], end = image_begin[n + 1];
    for (int64_t base = begin; base < end; base += kThreads) {
      ListedRoi<acc_t> e;
      const int64_t idx = base + threadIdx.x;
      const bool hit =
          idx < end && list_roi(rois, roi_order[idx], spatial_scale, s, y0, y1, x0, x1, e);
      const int total = list_in_order(hit, e, listed, warp_counts);
      if (nch > 0) {
        for (int j = 0; j < total; ++j) {
          gather_roi<kChannels>(listed[j], y, x, s, gs, grad_c, channel_step, nch, acc);
        }
      }
    }
    if (nch > 0) {
      scalar_t* __restrict__ out = grad_input + n * gi.n + c * gi.c + y * gi.h + x * gi.w;
#pragma unroll
      for (int q = 0; q < kChannels; ++q) {
        if (q < nch) out[q * t.lanes_c * gi.c] = static_cast<scalar_t>(acc[q]);
      }
    }
  }
}

// ---- Host -----------------------------------------------------------------------------------

// Checks every RoI's sampling grid (a RoI scaled past the floating-point range, or a grid of
// more than kMaxSamplesPerBin points, would overflow or run for hours) and returns the largest
// tap table any RoI needs. The sizes follow roi_align_geometry's formulas in acc_t, as the
// kernels compute them, but the grid sides are taken in double after the range checks (the
// shared ceil_to_int cannot take huge values on the host); the device may round a size
// differently by one, which make_items leaves room for and the kernels check.
template <typename acc_t>
int64_t check_sampling_grids(const at::Tensor& rois_cpu, acc_t spatial_scale,
                             const RoiAlignShape& s) {
  const double* r = rois_cpu.const_data_ptr<double>();
  const acc_t offset = s.aligned ? acc_t(0.5) : acc_t(0);
  const double max_side = static_cast<double>(kMaxSamplesPerBin);
  int64_t largest = 0;
  for (int64_t k = 0; k < s.num_rois; ++k) {
    acc_t roi[5];
    for (int q = 0; q < 5; ++q) roi[q] = static_cast<acc_t>(r[5 * k + q]);
    const acc_t x1 = roi[1] * spatial_scale - offset, y1 = roi[2] * spatial_scale - offset;
    const acc_t x2 = roi[3] * spatial_scale - offset, y2 = roi[4] * spatial_scale - offset;
    acc_t height = y2 - y1, width = x2 - x1;
    if (!s.aligned) {  // as roi_align_geometry: at least 1 x 1
      height = height > acc_t(1) ? height : acc_t(1);
      width = width > acc_t(1) ? width : acc_t(1);
    }
    const double side_h = static_cast<double>(height / static_cast<acc_t>(s.pooled_h));
    const double side_w = static_cast<double>(width / static_cast<acc_t>(s.pooled_w));
    TORCH_CHECK(std::isfinite(static_cast<double>(x1)) && std::isfinite(static_cast<double>(y1)) &&
                    std::isfinite(side_h) && std::isfinite(side_w),
                "roi_align (cuda): rois[", k, "] = (", r[5 * k + 1], ", ", r[5 * k + 2], ", ",
                r[5 * k + 3], ", ", r[5 * k + 4],
                ") leaves the floating-point range once scaled by spatial_scale ",
                static_cast<double>(spatial_scale));
    int64_t gh = s.sampling_ratio, gw = s.sampling_ratio;
    if (s.sampling_ratio <= 0) {
      TORCH_CHECK(side_h <= max_side && side_w <= max_side, "roi_align (cuda): rois[", k,
                  "] is ", side_w, " x ", side_h,
                  " pixels per bin, too large for an adaptive sampling grid (sampling_ratio <= "
                  "0); at most ",
                  kMaxSamplesPerBin, " samples per bin");
      gh = side_h > 0 ? static_cast<int64_t>(std::ceil(side_h)) : 0;  // <= 0: no samples
      gw = side_w > 0 ? static_cast<int64_t>(std::ceil(side_w)) : 0;
    }
    TORCH_CHECK(gh <= kMaxSamplesPerBin && gw <= kMaxSamplesPerBin &&
                    gh * gw <= kMaxSamplesPerBin,
                "roi_align (cuda): rois[", k, "] needs a ", gh, " x ", gw,
                " sampling grid per bin; at most ", kMaxSamplesPerBin, " samples per bin");
    largest = std::max(largest, s.pooled_h * gh + s.pooled_w * gw);
  }
  return largest;
}

RoiAlignShape make_shape(int64_t num_rois, int64_t batch_size, int64_t channels, int64_t height,
                         int64_t width, int64_t pooled_h, int64_t pooled_w,
                         int64_t sampling_ratio, bool aligned) {
  // Item indices are 32-bit; a single RoI's bins must fit with room for one block of threads.
  constexpr int64_t kMaxBins = std::numeric_limits<int32_t>::max() - kThreads;
  TORCH_CHECK(pooled_h <= kMaxBins && pooled_w <= kMaxBins && pooled_h * pooled_w <= kMaxBins,
              "roi_align (cuda): output_size (", pooled_h, ", ", pooled_w, ") is too large");
  // Tap tables hold 32-bit pixel rows and columns.
  TORCH_CHECK(height <= std::numeric_limits<int32_t>::max() &&
                  width <= std::numeric_limits<int32_t>::max(),
              "roi_align (cuda): height and width must be below 2^31, got ", height, " x ", width);
  return {num_rois, batch_size, channels, height, width, pooled_h, pooled_w, sampling_ratio,
          aligned};
}

// separable: the NCHW forward's bin-row sums get shared memory.
template <typename acc_t>
RoiAlignItems make_items(const RoiAlignShape& s, bool channels_fastest, int64_t largest_table,
                    bool separable) {
  RoiAlignItems it{make_roi_items(s.channels, s.pooled_h * s.pooled_w, channels_fastest)};
  // Room for the largest table, plus one bin's worth per axis in case the device's rounding of
  // a grid size differs from the host's (the kernels check each item's size themselves).
  const int64_t wanted = largest_table + s.pooled_h + s.pooled_w;
  it.tap_capacity = std::min<int64_t>(
      wanted, kTapTableBytes / static_cast<int64_t>(sizeof(TapEntry<acc_t>)));
  // Room for the item's channels' sums over the whole map width, or what the budget allows
  // (each item takes as many channels at a time as its RoI's column span lets fit).
  it.row_sum_capacity =
      separable ? std::min<int64_t>(kRowSumBytes / static_cast<int64_t>(sizeof(acc_t)),
                                    it.chunk * s.pooled_h * s.width)
                : 0;
  return it;
}

template <typename acc_t>
size_t shared_bytes(const RoiAlignItems& it) {
  return static_cast<size_t>(it.tap_capacity * sizeof(TapEntry<acc_t>) +
                             it.row_sum_capacity * sizeof(acc_t));
}

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                          int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                          bool aligned) {
  check_roi_args("roi_align", input, rois, spatial_scale, pooled_h, pooled_w);
  check_cuda("roi_align", input, "input", rois);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  const RoiAlignShape s = make_shape(num_rois, input.size(0), channels, input.size(2),
                                     input.size(3), pooled_h, pooled_w, sampling_ratio, aligned);
  const bool channels_last = is_channels_last(input);
  at::Tensor output = at::empty({num_rois, channels, pooled_h, pooled_w},
                                input.options().memory_format(memory_format(channels_last)));
  if (num_rois == 0) return output;
  const at::Tensor rois_cpu = host_rois("roi_align", rois, input.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_roi_align_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t scale = static_cast<acc_t>(spatial_scale);
        const int64_t largest_table = check_sampling_grids<acc_t>(rois_cpu, scale, s);
        if (output.numel() == 0) return;  // no channels: a zero-size grid is a launch error
        const RoiAlignItems it =
            make_items<acc_t>(s, channels_last, largest_table, /*separable=*/!channels_last);
        const at::Tensor r = rois.contiguous();
        cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        roi_align_forward_kernel<scalar_t, acc_t>
            <<<grid_size(num_rois * it.chunks), kThreads, shared_bytes<acc_t>(it), stream>>>(
                input.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), scale, s, it,
                strides_of(input), strides_of(output), output.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                   int64_t batch_size, int64_t channels, int64_t height,
                                   int64_t width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(rois.dim() == 2 && grad.dim() == 4 && grad.size(0) == rois.size(0) &&
                  grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              "roi_align backward: grad must be (K, C, pooled_height, pooled_width) = (",
              rois.dim() == 2 ? rois.size(0) : -1, ", ", channels, ", ", pooled_h, ", ",
              pooled_w, "), got ", grad.sizes());
  check_grad_input_size("roi_align", batch_size, channels, height, width);
  check_cuda("roi_align", grad, "grad", rois);
  c10::cuda::CUDAGuard guard(grad.device());
  // The result takes the layout the forward's output had (channels_last in, channels_last out).
  const bool channels_last = is_channels_last(grad);
  const at::MemoryFormat format = memory_format(channels_last);
  at::Tensor grad_input =
      at::empty({batch_size, channels, height, width}, grad.options().memory_format(format));
  check_roi_args("roi_align", grad_input, rois, spatial_scale, pooled_h, pooled_w);
  const int64_t num_rois = rois.size(0);
  const RoiAlignShape s = make_shape(num_rois, batch_size, channels, height, width, pooled_h,
                                     pooled_w, sampling_ratio, aligned);
  if (num_rois == 0 || grad_input.numel() == 0) return grad_input.zero_();
  const at::Tensor rois_cpu = host_rois("roi_align", rois, batch_size);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const at::Tensor r = rois.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "cnnops_roi_align_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t scale = static_cast<acc_t>(spatial_scale);
        const int64_t largest_table = check_sampling_grids<acc_t>(rois_cpu, scale, s);
        if (deterministic) {
          const GatherTiling t = make_gather_tiling(channels, height, width, channels_last,
                                                    channels_per_thread<acc_t>());
          const at::Tensor order = roi_order_by_image(rois_cpu, batch_size, grad.device());
          const int64_t* order_ptr = order.const_data_ptr<int64_t>();
          roi_align_backward_gather_kernel<scalar_t, acc_t>
              <<<gather_grid_size(t, batch_size), kThreads, 0, stream>>>(
                  grad.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), order_ptr,
                  order_ptr + num_rois, scale, s, t, strides_of(grad), strides_of(grad_input),
                  grad_input.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        at::Tensor target = atomic_target<scalar_t, acc_t>(grad_input, format);
        const RoiAlignItems it =
            make_items<acc_t>(s, channels_last, largest_table, /*separable=*/false);
        roi_align_backward_atomic_kernel<scalar_t, acc_t>
            <<<grid_size(num_rois * it.chunks), kThreads, shared_bytes<acc_t>(it), stream>>>(
                grad.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), scale, s, it,
                strides_of(grad), strides_of(target), target.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        finish_atomic_target<scalar_t, acc_t>(grad_input, target);
      });
  return grad_input;
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("roi_align", TORCH_FN(cnnops::roi_align_cuda));
  m.impl("_roi_align_backward", TORCH_FN(cnnops::roi_align_backward_cuda));
}
