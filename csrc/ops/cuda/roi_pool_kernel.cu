// CUDA kernels for cnnops::roi_pool (output and argmax) and cnnops::_roi_pool_backward.
//
// Three kernels:
//   roi_pool_forward_kernel          - one block per (RoI, chunk of channels) work item;
//   roi_pool_backward_atomic_kernel  - the same split, adding each bin's gradient to its argmax
//                                      pixel with atomicAdd (default);
//   roi_pool_backward_gather_kernel  - deterministic: one thread per grad-input element, which
//                                      gathers from the bins of its image's RoIs that chose it.
// The bin math is roi_pool.h's (roi_pool_window, roi_pool_bin_range), shared with the CPU
// kernel; the semantics are torchvision's: a bin's output is the largest of its pixels, compared
// with a strict `>` from -FLT_MAX (so the first of equal maxima wins, scanning rows then
// columns, and NaNs never win), 0 with argmax -1 for a bin with no pixels; argmax is the offset
// y * W + x in the RoI's image plane, int32 as torchvision's (planes of 2^31 pixels or more
// raise).
//
// Arithmetic in at::opmath_type<scalar_t>: the RoI window is computed in float for
// float/half/bfloat16 (torchvision rounds the scaled half coordinates to half first) and in
// double for double; maxima are exact in any type, gradients are summed in float (double).
//
// The RoIs are validated on the host (check_roi_boxes) from one copy of the [K, 5] tensor to the
// CPU, before any kernel runs, and the backward checks that argmax holds -1 or pixel offsets
// (one reduction); the kernels clamp the batch index anyway, bin ranges are clipped to the map,
// and argmax values outside [0, H * W) are skipped, so nothing reads or writes out of bounds.

#include "ops/cuda/roi_common.cuh"  // work splits, RoI lists and host code shared with roi_align
#include "ops/roi_align.h"  // check_roi_args, check_roi_boxes (shared by roi_align and roi_pool)
#include "ops/roi_pool.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <limits>
#include <tuple>

namespace cnnops {
namespace {

// Channels each thread of the deterministic backward accumulates in registers.
constexpr int kChannelsPerThread = 8;

struct RoiPoolShape {
  int64_t num_rois, batch_size, channels, height, width, pooled_h, pooled_w;
};

// RoI k's window in acc_t, and its image (clamped: the host has checked it already).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RoiPoolWindow<acc_t> load_window(const scalar_t* __restrict__ rois,
                                                            int64_t k, acc_t spatial_scale,
                                                            const RoiPoolShape& s,
                                                            int64_t& image) {
  acc_t r[5];
  load_roi(rois, k, s.batch_size, r, image);
  return roi_pool_window(r, spatial_scale, s.pooled_h, s.pooled_w);
}

// ---- Forward --------------------------------------------------------------------------------
//
// Tiling: a block takes one (RoI, chunk of channels) item at a time (grid-stride; consecutive
// blocks take the chunks of one RoI, which read the same region of the map from L2). Every thread
// computes the RoI's window (4 roundings and 2 divisions, once per item rather than once per
// output as in torchvision) and then one (channel, bin) output at a time: the bin's pixel ranges
// (roi_pool_bin_range) and a max over them. Memory access: channels_last - a warp reads 32
// consecutive channels of each pixel of the bin (full lines) and writes 32 consecutive outputs
// and argmaxes; NCHW - a warp covers 32 consecutive bins of a channel, reading neighbouring
// windows of one plane and writing contiguously. The input is addressed through its strides, so
// non-contiguous inputs are read in place; argmax has the output's layout.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_pool_forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois,
                            acc_t spatial_scale, RoiPoolShape s, RoiItems it, Strides4 in,
                            Strides4 out, scalar_t* __restrict__ output,
                            int32_t* __restrict__ argmax) {
  const int bins = static_cast<int>(s.pooled_h * s.pooled_w);
  const int pooled_w = static_cast<int>(s.pooled_w);
  const int64_t items = s.num_rois * it.chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const auto [k, c0, nc] = roi_item(it, item, s.channels);
    int64_t image;
    const RoiPoolWindow<acc_t> win = load_window(rois, k, spatial_scale, s, image);
    const scalar_t* __restrict__ src = input + image * in.n + c0 * in.c;
    const int64_t dst = k * out.n + c0 * out.c;
    const int outputs = nc * bins;
    for (int i = threadIdx.x; i < outputs; i += kThreads) {
      int c, bin;
      split_item_index(i, nc, bins, it.channels_fastest, c, bin);
      const int ph = bin / pooled_w, pw = bin - ph * pooled_w;
      const PixelRange rows = roi_pool_bin_range(int64_t(ph), win.start_h, win.bin_h, s.height);
      const PixelRange cols = roi_pool_bin_range(int64_t(pw), win.start_w, win.bin_w, s.width);
      const bool empty = rows.end <= rows.begin || cols.end <= cols.begin;
      acc_t best = empty ? acc_t(0) : acc_t(-FLT_MAX);
      int64_t best_at = -1;
      const scalar_t* __restrict__ plane = src + c * in.c;
      for (int64_t y = rows.begin; y < rows.end; ++y) {
        const scalar_t* __restrict__ row = plane + y * in.h;
        for (int64_t x = cols.begin; x < cols.end; ++x) {
          const acc_t v = static_cast<acc_t>(row[x * in.w]);
          if (v > best) {
            best = v;
            best_at = y * s.width + x;
          }
        }
      }
      const int64_t o = dst + c * out.c + ph * out.h + pw * out.w;
      output[o] = static_cast<scalar_t>(best);
      argmax[o] = static_cast<int32_t>(best_at);
    }
  }
}

// ---- Backward, atomic -----------------------------------------------------------------------
//
// The forward's split: each thread takes one (channel, bin) of the item and adds its gradient
// to its argmax pixel with atomicAdd, into an acc_t grad input (grad input itself for float and
// double, a float32 buffer for half and bfloat16, cast at the end). grad input is allocated
// NCHW-contiguous or channels_last, where the pixel y * W + x of a plane sits at
// (y * W + x) * stride(3), so argmax needs no division. channels_last: a warp's atomics hit 32
// consecutive channels of a pixel when the bins' winners coincide. Not deterministic.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_pool_backward_atomic_kernel(const scalar_t* __restrict__ grad,
                                    const scalar_t* __restrict__ rois,
                                    const int32_t* __restrict__ argmax, RoiPoolShape s,
                                    RoiItems it, Strides4 gs, Strides4 as, Strides4 gi,
                                    acc_t* __restrict__ grad_input) {
  const int bins = static_cast<int>(s.pooled_h * s.pooled_w);
  const int pooled_w = static_cast<int>(s.pooled_w);
  const int64_t plane_size = s.height * s.width;
  const int64_t items = s.num_rois * it.chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const auto [k, c0, nc] = roi_item(it, item, s.channels);
    const int64_t image =
        clamp_image(static_cast<int64_t>(static_cast<acc_t>(rois[5 * k])), s.batch_size);
    const scalar_t* __restrict__ src = grad + k * gs.n + c0 * gs.c;
    const int32_t* __restrict__ arg = argmax + k * as.n + c0 * as.c;
    acc_t* __restrict__ dst = grad_input + image * gi.n + c0 * gi.c;
    const int outputs = nc * bins;
    for (int i = threadIdx.x; i < outputs; i += kThreads) {
      int c, bin;
      split_item_index(i, nc, bins, it.channels_fastest, c, bin);
      const int ph = bin / pooled_w, pw = bin - ph * pooled_w;
      const int64_t a = arg[c * as.c + ph * as.h + pw * as.w];
      if (a < 0 || a >= plane_size) continue;  // empty bin (-1), or not an argmax of this map
      atomicAdd(dst + c * gi.c + a * gi.w,
                static_cast<acc_t>(src[c * gs.c + ph * gs.h + pw * gs.w]));
    }
  }
}

// ---- Backward, deterministic (gather) -------------------------------------------------------
//
// The backward op has no spatial_scale argument, so it cannot recompute the forward's bin
// windows; it finds, for each grad-input pixel, the bins that can route gradient to it from
// argmax itself, in two kernels:
//   roi_pool_argmax_extent_kernel - for every (RoI, bin row) the range of pixel rows, and for
//     every (RoI, bin column) the range of pixel columns, of the valid argmaxes of its bins
//     over all channels. One warp per line: lanes stride over the line's (channel, bin)
//     elements, then a shuffle min/max; no atomics. Memory: K * (pooled_h + pooled_w) pairs.
//   roi_pool_backward_gather_kernel - each thread owns grad-input elements (one pixel (y, x)
//     of image n, up to kChannelsPerThread channels) and sums in registers, in a fixed order
//     (RoI index, then bin row, then bin column), the gradient of every bin whose argmax is its
//     offset y * W + x: for each RoI of image n, the bin rows whose row range contains y and,
//     within them, the bin columns whose column range contains x, comparing argmax per channel.
//     Those ranges include every bin whose argmax is (y, x), so each pixel receives exactly the
//     terms the atomic kernel adds to it (argmaxes outside [0, H * W) are ignored by both); one
//     plain store per element, no atomics, no zero fill, and two runs are bitwise equal.
// Gather work items: (image, channel chunk, pixel tile). A block first lists, in shared memory,
// the RoIs of its image (host-sorted by image, ascending index) whose argmax extent reaches the
// tile, 256 at a time, in order (warp ballots and a block prefix sum); then every thread walks
// the list. Thread order follows the grad-input layout: channels_last - a warp holds 32
// consecutive channels of one pixel (the bin search is warp-uniform; argmax and grad reads and
// the stores are coalesced); NCHW - a warp holds 32 consecutive pixels of a row, each with 8
// consecutive channels (coalesced stores). Memory: the per-image RoI order (K + N + 1 integers)
// and the extents; nothing of size K * C * H * W.
__global__ void __launch_bounds__(kThreads)
    roi_pool_argmax_extent_kernel(const int32_t* __restrict__ argmax, RoiPoolShape s,
                                  Strides4 as, int32_t* __restrict__ extent) {
  const int64_t lines = s.pooled_h + s.pooled_w;
  const int64_t total = s.num_rois * lines;
  const int32_t plane_size = static_cast<int32_t>(s.height * s.width);  // < 2^31 (host check)
  const int32_t width = static_cast<int32_t>(s.width);
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t line = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; line < total;
       line += warps) {
    const int64_t k = line / lines, j = line - k * lines;
    const bool is_row = j < s.pooled_h;
    const int64_t other = is_row ? s.pooled_w : s.pooled_h;  // bins along the line
    const int32_t* __restrict__ base =
        argmax + k * as.n + (is_row ? j * as.h : (j - s.pooled_h) * as.w);
    const int64_t other_stride = is_row ? as.w : as.h;
    int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
    for (int64_t f = lane; f < s.channels * other; f += 32) {
      const int64_t c = f / other;
      const int32_t a = base[c * as.c + (f - c * other) * other_stride];
      if (a < 0 || a >= plane_size) continue;
      const int32_t v = is_row ? a / width : a % width;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const int32_t other_lo = __shfl_xor_sync(0xffffffffu, lo, d);
      const int32_t other_hi = __shfl_xor_sync(0xffffffffu, hi, d);
      lo = other_lo < lo ? other_lo : lo;
      hi = other_hi > hi ? other_hi : hi;
    }
    if (lane == 0) {
      extent[2 * line] = lo;
      extent[2 * line + 1] = hi;
    }
  }
}

// Whether RoI k's argmaxes can reach the tile [y0, y1] x [x0, x1] (the union of its lines'
// extents meets it).
__device__ __forceinline__ bool roi_reaches_tile(const int32_t* __restrict__ extent, int64_t k,
                                                 const RoiPoolShape& s, int64_t y0, int64_t y1,
                                                 int64_t x0, int64_t x1) {
  const int32_t* __restrict__ e = extent + 2 * k * (s.pooled_h + s.pooled_w);
  bool rows = false, cols = false;
  for (int64_t j = 0; j < s.pooled_h && !rows; ++j) rows = e[2 * j] <= y1 && e[2 * j + 1] >= y0;
  if (!rows) return false;
  for (int64_t j = s.pooled_h; j < s.pooled_h + s.pooled_w && !cols; ++j) {
    cols = e[2 * j] <= x1 && e[2 * j + 1] >= x0;
  }
  return cols;
}

// Two blocks per SM (about 95 registers a thread: 8 channels' accumulators and 64-bit strides
// and offsets); with ptxas's default budget for 256 threads, 64 registers, it spills.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
    roi_pool_backward_gather_kernel(const scalar_t* __restrict__ grad,
                                    const int32_t* __restrict__ argmax,
                                    const int32_t* __restrict__ extent,
                                    const int64_t* __restrict__ roi_order,
                                    const int64_t* __restrict__ image_begin, RoiPoolShape s,
                                    GatherTiling t, Strides4 gs, Strides4 as, Strides4 gi,
                                    scalar_t* __restrict__ grad_input) {
  __shared__ int64_t listed[kThreads];
  __shared__ int warp_counts[kWarps];
  const int lane_c = threadIdx.x % t.lanes_c, lane_p = threadIdx.x / t.lanes_c;
  const int64_t lines = s.pooled_h + s.pooled_w;
  const int64_t tiles = t.tiles_y * t.tiles_x;
  const int64_t items = s.batch_size * t.chunks * tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const auto [n, y0, y1, x0, x1, y, x, c, nch] =
        gather_item(t, item, tiles, lane_c, lane_p, s.channels, s.height, s.width);
    const int32_t offset = static_cast<int32_t>(y * s.width + x);  // plane < 2^31 (host check)
    acc_t acc[kChannelsPerThread];
#pragma unroll
    for (int q = 0; q < kChannelsPerThread; ++q) acc[q] = acc_t(0);
    const int64_t grad_step = t.lanes_c * gs.c, arg_step = t.lanes_c * as.c;

    const int64_t begin = image_begin[n], end = image_begin[n + 1];
    for (int64_t base = begin; base < end; base += kThreads) {
      const int64_t idx = base + threadIdx.x;
      const int64_t k = idx < end ? roi_order[idx] : 0;
      const bool hit = idx < end && roi_reaches_tile(extent, k, s, y0, y1, x0, x1);
      const int total = list_in_order(hit, k, listed, warp_counts);
      if (nch == 0) continue;
      for (int j = 0; j < total; ++j) {
        const int64_t r = listed[j];
        const int32_t* __restrict__ e = extent + 2 * r * lines;
        const int32_t* __restrict__ a_r = argmax + r * as.n + c * as.c;
        const scalar_t* __restrict__ g_r = grad + r * gs.n + c * gs.c;
        for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
          if (y < e[2 * ph] || y > e[2 * ph + 1]) continue;
          for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
            const int32_t* __restrict__ ec = e + 2 * (s.pooled_h + pw);
            if (x < ec[0] || x > ec[1]) continue;
            const int32_t* __restrict__ a = a_r + ph * as.h + pw * as.w;
            const scalar_t* __restrict__ g = g_r + ph * gs.h + pw * gs.w;
#pragma unroll
            for (int q = 0; q < kChannelsPerThread; ++q) {
              if (q < nch && a[q * arg_step] == offset) {
                acc[q] += static_cast<acc_t>(g[q * grad_step]);
              }
            }
          }
        }
      }
    }
    if (nch > 0) {
      scalar_t* __restrict__ out = grad_input + n * gi.n + c * gi.c + y * gi.h + x * gi.w;
#pragma unroll
      for (int q = 0; q < kChannelsPerThread; ++q) {
        if (q < nch) out[q * t.lanes_c * gi.c] = static_cast<scalar_t>(acc[q]);
      }
    }
  }
}

// ---- Host -----------------------------------------------------------------------------------

RoiPoolShape make_shape(int64_t num_rois, int64_t batch_size, int64_t channels, int64_t height,
                        int64_t width, int64_t pooled_h, int64_t pooled_w) {
  // Item indices are 32-bit; a single RoI's bins must fit with room for one block of threads.
  constexpr int64_t kMaxBins = std::numeric_limits<int32_t>::max() - kThreads;
  TORCH_CHECK(pooled_h <= kMaxBins && pooled_w <= kMaxBins && pooled_h * pooled_w <= kMaxBins,
              "roi_pool (cuda): output_size (", pooled_h, ", ", pooled_w, ") is too large");
  // argmax is int32 (torchvision's type).
  TORCH_CHECK(height * width < (int64_t{1} << 31),
              "roi_pool (cuda): height * width must be below 2^31, got ", height, " x ", width);
  return {num_rois, batch_size, channels, height, width, pooled_h, pooled_w};
}

std::tuple<at::Tensor, at::Tensor> roi_pool_cuda(const at::Tensor& input, const at::Tensor& rois,
                                                 double spatial_scale, int64_t pooled_h,
                                                 int64_t pooled_w) {
  check_roi_args("roi_pool", input, rois, spatial_scale, pooled_h, pooled_w);
  check_cuda("roi_pool", input, "input", rois);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  const RoiPoolShape s = make_shape(num_rois, input.size(0), channels, input.size(2),
                                    input.size(3), pooled_h, pooled_w);
  const bool channels_last = is_channels_last(input);
  at::Tensor output = at::empty({num_rois, channels, pooled_h, pooled_w},
                                input.options().memory_format(memory_format(channels_last)));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kInt));
  if (num_rois == 0) return {output, argmax};
  // Validation only (one device-to-host copy): the kernel reads the RoIs on the device.
  check_roi_boxes("roi_pool", rois.to(at::kCPU), input.size(0));
  if (output.numel() == 0) return {output, argmax};  // a zero-size grid is a launch error
  const RoiItems it = make_roi_items(channels, pooled_h * pooled_w, channels_last);
  const at::Tensor r = rois.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_roi_pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        roi_pool_forward_kernel<scalar_t, acc_t>
            <<<grid_size(num_rois * it.chunks), kThreads, 0, stream>>>(
                input.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                static_cast<acc_t>(spatial_scale), s, it, strides_of(input), strides_of(output),
                output.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                  const at::Tensor& argmax, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width) {
  TORCH_CHECK(rois.dim() == 2 && grad.dim() == 4 && grad.size(0) == rois.size(0) &&
                  grad.size(1) == channels,
              "roi_pool backward: grad must be (K, C, pooled_height, pooled_width) with K = ",
              rois.dim() == 2 ? rois.size(0) : -1, " and C = ", channels, ", got ",
              grad.sizes());
  TORCH_CHECK(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt &&
                  argmax.device() == grad.device(),
              "roi_pool backward: argmax must be an int32 tensor shaped like grad ",
              grad.sizes(), " on ", grad.device(), ", got ", argmax.scalar_type(), " ",
              argmax.sizes(), " on ", argmax.device());
  check_grad_input_size("roi_pool", batch_size, channels, height, width);
  check_cuda("roi_pool", grad, "grad", rois);
  check_cuda("roi_pool", argmax, "argmax", rois);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t pooled_h = grad.size(2), pooled_w = grad.size(3);
  // The result takes the layout the forward's output had (channels_last in, channels_last out).
  const bool channels_last = is_channels_last(grad);
  const at::MemoryFormat format = memory_format(channels_last);
  at::Tensor grad_input =
      at::empty({batch_size, channels, height, width}, grad.options().memory_format(format));
  // spatial_scale does not enter the backward pass; 1 passes the check.
  check_roi_args("roi_pool", grad_input, rois, 1.0, pooled_h, pooled_w);
  const int64_t num_rois = rois.size(0);
  const RoiPoolShape s =
      make_shape(num_rois, batch_size, channels, height, width, pooled_h, pooled_w);
  if (num_rois == 0 || grad_input.numel() == 0) return grad_input.zero_();
  // argmax must hold -1 or pixel offsets, as the CPU backend checks: the reduction is queued
  // before the RoIs' copy to the host, whose synchronisation then covers both.
  const auto [lowest, highest] = at::aminmax(argmax);
  const at::Tensor rois_cpu = host_rois("roi_pool", rois, batch_size);
  const int64_t plane = height * width;
  TORCH_CHECK(lowest.item<int32_t>() >= -1 && highest.item<int32_t>() < plane,
              "roi_pool backward: argmax values must be -1 or pixel offsets in [0, ", plane, ")");
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const at::Tensor r = rois.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "cnnops_roi_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (deterministic) {
          at::Tensor extent = at::empty({num_rois * (pooled_h + pooled_w) * 2},
                                        grad.options().dtype(at::kInt));
          roi_pool_argmax_extent_kernel<<<grid_size(ceil_div(num_rois * (pooled_h + pooled_w),
                                                             kThreads / 32)),
                                          kThreads, 0, stream>>>(
              argmax.const_data_ptr<int32_t>(), s, strides_of(argmax),
              extent.mutable_data_ptr<int32_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const GatherTiling t =
              make_gather_tiling(channels, height, width, channels_last, kChannelsPerThread);
          const at::Tensor order = roi_order_by_image(rois_cpu, batch_size, grad.device());
          const int64_t* order_ptr = order.const_data_ptr<int64_t>();
          roi_pool_backward_gather_kernel<scalar_t, acc_t>
              <<<gather_grid_size(t, batch_size), kThreads, 0, stream>>>(
                  grad.const_data_ptr<scalar_t>(), argmax.const_data_ptr<int32_t>(),
                  extent.const_data_ptr<int32_t>(), order_ptr, order_ptr + num_rois, s, t,
                  strides_of(grad), strides_of(argmax), strides_of(grad_input),
                  grad_input.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        at::Tensor target = atomic_target<scalar_t, acc_t>(grad_input, format);
        const RoiItems it = make_roi_items(channels, pooled_h * pooled_w, channels_last);
        roi_pool_backward_atomic_kernel<scalar_t, acc_t>
            <<<grid_size(num_rois * it.chunks), kThreads, 0, stream>>>(
                grad.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                argmax.const_data_ptr<int32_t>(), s, it, strides_of(grad), strides_of(argmax),
                strides_of(target), target.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        finish_atomic_target<scalar_t, acc_t>(grad_input, target);
      });
  return grad_input;
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("roi_pool", TORCH_FN(cnnops::roi_pool_cuda));
  m.impl("_roi_pool_backward", TORCH_FN(cnnops::roi_pool_backward_cuda));
}
