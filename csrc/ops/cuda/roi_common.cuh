// What the CUDA kernels of roi_align and roi_pool share: the (RoI, channel chunk) work split of
// their forward and atomic backward kernels, the (image, channel chunk, pixel tile) split and the
// ordered per-tile RoI list of their deterministic (gather) backward kernels, and the host code
// around them (RoIs copied to the host and sorted by image, layout and device checks).
//
// Included by roi_align_kernel.cu and roi_pool_kernel.cu, which are linked into one extension:
// everything here is a template, `inline` or `inline constexpr`, so the two copies are one entity
// (no duplicate symbols, no ODR clash), and nothing here names anything a .cu file keeps in its
// own anonymous namespace. Op-specific parts (shapes, bin math, kernel bodies) stay in the .cu
// files; a change here rebuilds both.

#pragma once

#include "ops/roi_align.h"  // check_roi_boxes

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace cnnops {

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
// Grid-stride loops cover anything beyond this many blocks.
inline constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// Outputs per (RoI, channel chunk) work item, about 8 per thread: enough to amortise the item's
// per-RoI set-up (roi_align's tap table, roi_pool's window), small enough to give the GPU
// thousands of blocks at detector sizes.
inline constexpr int64_t kTargetOutputsPerItem = 2048;

struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int grid_size(int64_t blocks) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

inline bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

__host__ __device__ inline int64_t clamp_image(int64_t image, int64_t batch_size) {
  return image < 0 ? 0 : (image >= batch_size ? batch_size - 1 : image);
}

// ---- (RoI, channel chunk) work items --------------------------------------------------------

// The work split of the forward and atomic backward kernels. roi_align extends it with its
// shared-memory budget.
struct RoiItems {
  int64_t chunk;          // channels per item
  int64_t chunks;         // items per RoI
  bool channels_fastest;  // thread order: channel fastest (channels_last) or bin fastest (NCHW)
};

inline RoiItems make_roi_items(int64_t channels, int64_t bins, bool channels_fastest) {
  RoiItems it;
  // A multiple of 32 channels (whole warps along channels for channels_last), and item indices
  // (channel * bins + bin) that fit in 32 bits with room for one block of threads.
  it.chunk = std::min(channels, ceil_div(ceil_div(kTargetOutputsPerItem, bins), 32) * 32);
  it.chunk = std::max<int64_t>(
      1, std::min(it.chunk, (std::numeric_limits<int32_t>::max() - kThreads) / bins));
  it.chunks = ceil_div(channels, it.chunk);
  it.channels_fastest = channels_fastest;
  return it;
}

// Work item `item`: RoI k, its channels [c0, c0 + nc).
struct RoiItem {
  int64_t k, c0;
  int nc;
};

__device__ __forceinline__ RoiItem roi_item(const RoiItems& it, int64_t item, int64_t channels) {
  const int64_t k = item / it.chunks;
  const int64_t c0 = (item - k * it.chunks) * it.chunk;
  return {k, c0, static_cast<int>(std::min<int64_t>(it.chunk, channels - c0))};
}

// RoI k's five values in acc_t, and its image, clamped (the host has checked it already; the
// clamp keeps a bad index from reading out of bounds all the same).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_roi(const scalar_t* __restrict__ rois, int64_t k,
                                         int64_t batch_size, acc_t (&r)[5], int64_t& image) {
#pragma unroll
  for (int q = 0; q < 5; ++q) r[q] = static_cast<acc_t>(rois[5 * k + q]);
  image = clamp_image(static_cast<int64_t>(r[0]), batch_size);
}

// Splits a work item's flat output index into (channel, bin): channel fastest for channels_last
// (neighbouring threads read neighbouring channels of one pixel), bin fastest for NCHW
// (neighbouring threads write neighbouring outputs of one channel).
__device__ __forceinline__ void split_item_index(int i, int nc, int bins, bool channels_fastest,
                                                 int& c, int& bin) {
  if (channels_fastest) {
    bin = i / nc;
    c = i - bin * nc;
  } else {
    c = i / bins;
    bin = i - c * bins;
  }
}

// ---- (image, channel chunk, pixel tile) work items of the gather kernels --------------------

struct GatherTiling {
  int tile_h, tile_w;  // pixels of a work item
  int64_t tiles_y, tiles_x;
  int lanes_c;             // threads along channels (1: a thread's channels are consecutive)
  int per_thread;          // channels per thread, <= the kernel's register budget
  int64_t chunk, chunks;   // channels per item (lanes_c * per_thread), chunks per image
};

// max_per_thread: the channels a thread accumulates in registers.
inline GatherTiling make_gather_tiling(int64_t channels, int64_t height, int64_t width,
                                       bool channels_last, int max_per_thread) {
  GatherTiling t;
  t.lanes_c = 1;
  if (channels_last) {
    while (t.lanes_c < 32 && t.lanes_c < channels) t.lanes_c *= 2;
  }
  t.per_thread =
      static_cast<int>(std::min<int64_t>(max_per_thread, ceil_div(channels, t.lanes_c)));
  const int lanes_p = kThreads / t.lanes_c;
  // NCHW: rows of 32 pixels (coalesced stores); channels_last: near-square tiles (fewer RoIs
  // reach a square than a strip of the same area).
  int target_w = 32;
  if (channels_last) {
    int log2 = 0;
    while ((1 << (log2 + 1)) <= lanes_p) ++log2;
    target_w = 1 << ((log2 + 1) / 2);
  }
  t.tile_w = static_cast<int>(std::min<int64_t>(width, target_w));
  t.tile_h = std::max(1, lanes_p / t.tile_w);
  t.tiles_y = ceil_div(height, t.tile_h);
  t.tiles_x = ceil_div(width, t.tile_w);
  t.chunk = int64_t(t.lanes_c) * t.per_thread;
  t.chunks = ceil_div(channels, t.chunk);
  return t;
}

inline unsigned int gather_grid_size(const GatherTiling& t, int64_t batch_size) {
  return grid_size(batch_size * t.chunks * t.tiles_y * t.tiles_x);
}

// A gather work item as this thread sees it: image n, the tile [y0, y1] x [x0, x1], the
// thread's pixel (y, x), its first channel c and how many channels it owns (0: none).
struct GatherItem {
  int64_t n, y0, y1, x0, x1, y, x, c;
  int nch;
};

__device__ __forceinline__ GatherItem gather_item(const GatherTiling& t, int64_t item,
                                                  int64_t tiles, int lane_c, int lane_p,
                                                  int64_t channels, int64_t height,
                                                  int64_t width) {
  GatherItem g;
  // Item order (image, chunk, tile): neighbouring blocks take neighbouring tiles, which share
  // RoIs and grad rows in L2.
  const int64_t tile = item % tiles;
  const int64_t rest = item / tiles;
  const int64_t chunk = rest % t.chunks;
  g.n = rest / t.chunks;
  g.y0 = (tile / t.tiles_x) * t.tile_h;
  g.x0 = (tile % t.tiles_x) * t.tile_w;
  g.y1 = std::min<int64_t>(g.y0 + t.tile_h, height) - 1;
  g.x1 = std::min<int64_t>(g.x0 + t.tile_w, width) - 1;
  g.y = g.y0 + lane_p / t.tile_w;
  g.x = g.x0 + lane_p % t.tile_w;
  g.c = chunk * t.chunk + lane_c;
  g.nch = 0;
  if (lane_p < t.tile_h * t.tile_w && g.y < height && g.x < width && g.c < channels) {
    g.nch = static_cast<int>(std::min<int64_t>(t.per_thread, ceil_div(channels - g.c, t.lanes_c)));
  }
  return g;
}

// One pass of a gather kernel's RoI list: each of the block's threads offers one entry (`hit`:
// whether it has one), and the block writes the offered entries to `listed` in thread order
// (warp ballots and a block prefix sum over `warp_counts`), so RoIs stay in index order and the
// sums stay deterministic. Returns the number listed. Every thread of the block must call it.
template <typename Entry>
__device__ __forceinline__ int list_in_order(bool hit, const Entry& entry, Entry* listed,
                                             int* warp_counts) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned int ballot = __ballot_sync(0xffffffffu, hit);
  __syncthreads();  // the previous pass is done with `listed` and `warp_counts`
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int count = warp_counts[w];
    before += w < warp ? count : 0;
    total += count;
  }
  if (hit) listed[before + __popc(ballot & ((1u << lane) - 1u))] = entry;  // keeps RoI order
  __syncthreads();
  return total;
}

// ---- Host -----------------------------------------------------------------------------------

// The RoIs on the CPU (one device-to-host copy), checked as every backend checks them.
inline at::Tensor host_rois(const char* op, const at::Tensor& rois, int64_t batch_size) {
  const at::Tensor cpu = rois.to(at::kCPU).contiguous();
  check_roi_boxes(op, cpu, batch_size);
  return cpu.to(at::kDouble);
}

// [K + N + 1] int64 on the device: the RoI indices sorted by image (ascending within an image),
// then the position of each image's first RoI in that order, and K. The gather kernels walk
// their image's RoIs in this order.
inline at::Tensor roi_order_by_image(const at::Tensor& rois_cpu, int64_t batch_size,
                                     const at::Device& device) {
  const int64_t num_rois = rois_cpu.size(0);
  const double* r = rois_cpu.const_data_ptr<double>();
  at::Tensor order = at::empty({num_rois + batch_size + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = order.mutable_data_ptr<int64_t>();
  int64_t* begin = o + num_rois;
  std::fill(begin, begin + batch_size + 1, int64_t(0));
  for (int64_t k = 0; k < num_rois; ++k) ++begin[static_cast<int64_t>(r[5 * k]) + 1];
  for (int64_t n = 0; n < batch_size; ++n) begin[n + 1] += begin[n];
  std::vector<int64_t> next(begin, begin + batch_size);
  for (int64_t k = 0; k < num_rois; ++k) o[next[static_cast<int64_t>(r[5 * k])]++] = k;
  return order.to(device);
}

inline void check_cuda(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& rois) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): ", name, " must be a CUDA tensor, got one on ",
              t.device());
  TORCH_CHECK(rois.device() == t.device(), op, " (cuda): rois are on ", rois.device(), " but ",
              name, " is on ", t.device());
}

// The backward ops' checks of the grad-input size they are given.
inline void check_grad_input_size(const char* op, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width) {
  TORCH_CHECK(batch_size >= 0 && channels >= 0, op,
              " backward: batch_size and channels must be >= 0");
  TORCH_CHECK(height > 0 && width > 0, op, " backward: height and width must be positive, got (",
              height, ", ", width, ")");
}

// Where the atomic backward kernels add: grad input itself (zeroed) for float and double, a
// zeroed float32 buffer in `format` for half and bfloat16 (half atomics would round every
// partial sum to 11 bits), which finish_atomic_target copies back.
template <typename scalar_t, typename acc_t>
at::Tensor atomic_target(at::Tensor& grad_input, at::MemoryFormat format) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return grad_input.zero_();
  } else {
    return at::zeros(grad_input.sizes(),
                     grad_input.options().dtype(at::kFloat).memory_format(format));
  }
}

template <typename scalar_t, typename acc_t>
void finish_atomic_target(at::Tensor& grad_input, const at::Tensor& target) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) grad_input.copy_(target);
}

}  // namespace cnnops
