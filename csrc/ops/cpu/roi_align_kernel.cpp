// CPU kernels of roi_align, forward and backward.
//
// Both work on channels_last data (an NCHW input is converted once): a sample point's 4 taps are
// then 4 contiguous runs of channels, and the inner loop is a vector multiply-add over channels.
// The taps (4 pixel offsets, 4 bilinear weights) of every sample point of every bin are computed
// once per RoI (roi_align.h, shared with the CUDA kernel) and reused for all channels.
// - Forward: the RoIs are shared by the cores; a RoI's bins accumulate in a [bins, C] block,
//   written out channels-first for an NCHW result.
// - Backward: the channels are shared by the cores: each core adds every RoI's gradient into its
//   own channels of grad input, so nothing is written by two cores (no atomics) and the sums run
//   in a fixed order (deterministic).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops/cpu/isa.h"
#include "ops/roi_align.h"

namespace cnnops {
namespace {

// One sample point: the offsets (y * W + x) of its 4 pixels in its image, and their weights.
template <typename T>
struct SampleTap {
  int64_t offset[4];
  T weight[4];
};

// The taps of a group of RoIs: the group's RoI k's bin b spans taps[bin_begin[k * bins + b] ...
// bin_begin[k * bins + b + 1]); its samples are averaged by `count[k]`.
template <typename T>
struct RoiTaps {
  int64_t bins;
  std::vector<int64_t> image, bin_begin;
  std::vector<T> count;
  std::vector<SampleTap<T>> taps;
};

// Sampling points per bin, and taps in one group's table (48 MB in float32). torchvision loops
// for hours (or overflows) on grids past the first; a single RoI past the second (over 1.3
// million points per bin at 7 x 7) raises rather than allocate gigabytes.
constexpr int64_t kMaxSamplesPerBin = int64_t(1) << 30;
constexpr int64_t kMaxGroupTaps = int64_t(1) << 20;
constexpr int64_t kMaxRoiTaps = int64_t(1) << 26;

// Every RoI's sampling grid, checked.
template <typename T>
std::vector<RoiGeometry<T>> roi_geometries(const at::Tensor& rois, T spatial_scale,
                                           int64_t pooled_h, int64_t pooled_w,
                                           int64_t sampling_ratio, bool aligned) {
  const T* r = rois.const_data_ptr<T>();
  std::vector<RoiGeometry<T>> geometry(rois.size(0));
  for (int64_t k = 0; k < rois.size(0); ++k) {
    const RoiGeometry<T>& g = geometry[k] = roi_align_geometry(
        r + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
    TORCH_CHECK(g.grid_h <= kMaxSamplesPerBin && g.grid_w <= kMaxSamplesPerBin &&
                    g.grid_h * g.grid_w <= kMaxSamplesPerBin &&
                    g.grid_h * g.grid_w * pooled_h * pooled_w <= kMaxRoiTaps,
                "roi_align: rois[", k, "] needs a ", g.grid_h, " x ", g.grid_w,
                " sampling grid in each of its ", pooled_h, " x ", pooled_w,
                " bins, more than the cpu backend takes (", kMaxRoiTaps,
                " points per RoI); pass a smaller sampling_ratio");
  }
  return geometry;
}

// RoIs [k0, k1)'s taps.
template <typename T>
RoiTaps<T> compute_taps(const at::Tensor& rois, const std::vector<RoiGeometry<T>>& geometry,
                        int64_t k0, int64_t k1, int64_t height, int64_t width, int64_t pooled_h,
                        int64_t pooled_w) {
  const int64_t num_rois = k1 - k0;
  const T* r = rois.const_data_ptr<T>() + 5 * k0;
  RoiTaps<T> t;
  t.bins = pooled_h * pooled_w;
  t.image.resize(num_rois);
  t.count.resize(num_rois);
  t.bin_begin.resize(num_rois * t.bins + 1);
  int64_t total = 0;
  for (int64_t k = 0; k < num_rois; ++k) {
    const RoiGeometry<T>& g = geometry[k0 + k];
    t.image[k] = static_cast<int64_t>(r[5 * k]);
    t.count[k] = g.count;
    for (int64_t b = 0; b < t.bins; ++b) {
      t.bin_begin[k * t.bins + b] = total;
      total += g.grid_h * g.grid_w;
    }
  }
  t.bin_begin[num_rois * t.bins] = total;
  t.taps.resize(total);
  at::parallel_for(0, num_rois, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const RoiGeometry<T>& g = geometry[k0 + k];
      SampleTap<T>* tap = t.taps.data() + t.bin_begin[k * t.bins];
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          for (int64_t iy = 0; iy < g.grid_h; ++iy) {
            const T y = g.start_h + static_cast<T>(ph) * g.bin_h +
                        static_cast<T>(iy + .5f) * g.bin_h / static_cast<T>(g.grid_h);
            for (int64_t ix = 0; ix < g.grid_w; ++ix) {
              const T x = g.start_w + static_cast<T>(pw) * g.bin_w +
                          static_cast<T>(ix + .5f) * g.bin_w / static_cast<T>(g.grid_w);
              const BilinearTaps<T> b = bilinear_taps(y, x, height, width);
              *tap++ = SampleTap<T>{{b.y_low * width + b.x_low, b.y_low * width + b.x_high,
                                     b.y_high * width + b.x_low, b.y_high * width + b.x_high},
                                    {b.w_ll, b.w_lh, b.w_hl, b.w_hh}};
            }
          }
        }
      }
    }
  });
  return t;
}

// Consecutive RoIs grouped so that a group's tap table stays under kMaxGroupTaps (or holds one
// RoI): group g is RoIs [bounds[g], bounds[g + 1]). The kernels compute one group's taps at a
// time, so memory stays bounded however many RoIs there are.
template <typename T>
std::vector<int64_t> roi_groups(const std::vector<RoiGeometry<T>>& geometry, int64_t bins) {
  std::vector<int64_t> bounds{0};
  int64_t taps = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(geometry.size()); ++k) {
    const int64_t roi_taps = geometry[k].grid_h * geometry[k].grid_w * bins;
    if (taps > 0 && taps + roi_taps > kMaxGroupTaps) {
      bounds.push_back(k);
      taps = 0;
    }
    taps += roi_taps;
  }
  bounds.push_back(static_cast<int64_t>(geometry.size()));
  return bounds;
}

// RoI k's bins into `block` ([bins, C]), from the channels_last input.
template <typename T>
__attribute__((always_inline)) inline void pool_roi(const RoiTaps<T>& t, int64_t k, const T* input,
                                                    int64_t image_pixels, int64_t channels,
                                                    T* block) {
  const T* image = input + t.image[k] * image_pixels * channels;
  for (int64_t b = 0; b < t.bins; ++b) {
    T* acc = block + b * channels;
    for (int64_t c = 0; c < channels; ++c) acc[c] = T(0);
    for (int64_t i = t.bin_begin[k * t.bins + b]; i < t.bin_begin[k * t.bins + b + 1]; ++i) {
      const SampleTap<T>& tap = t.taps[i];
      for (int q = 0; q < 4; ++q) {
        const T w = tap.weight[q];
        const T* pixel = image + tap.offset[q] * channels;
        for (int64_t c = 0; c < channels; ++c) acc[c] += w * pixel[c];
      }
    }
    const T count = t.count[k];
    for (int64_t c = 0; c < channels; ++c) acc[c] /= count;
  }
}

// grad input's channels [c0, c1) (channels_last) from every RoI's grad output (channels_last).
template <typename T>
__attribute__((always_inline)) inline void unpool_channels(const RoiTaps<T>& t, const T* grad,
                                                           int64_t image_pixels, int64_t channels,
                                                           int64_t c0, int64_t c1,
                                                           T* grad_input) {
  const int64_t num_rois = static_cast<int64_t>(t.image.size());
  for (int64_t k = 0; k < num_rois; ++k) {
    T* image = grad_input + t.image[k] * image_pixels * channels;
    const T inv_count = T(1) / t.count[k];
    for (int64_t b = 0; b < t.bins; ++b) {
      const T* g = grad + (k * t.bins + b) * channels;
      for (int64_t i = t.bin_begin[k * t.bins + b]; i < t.bin_begin[k * t.bins + b + 1]; ++i) {
        const SampleTap<T>& tap = t.taps[i];
        for (int q = 0; q < 4; ++q) {
          const T w = tap.weight[q] * inv_count;
          T* pixel = image + tap.offset[q] * channels;
          for (int64_t c = c0; c < c1; ++c) pixel[c] += w * g[c];
        }
      }
    }
  }
}

template <typename T>
void pool_roi_baseline(const RoiTaps<T>& t, int64_t k, const T* in, int64_t px, int64_t ch,
                       T* block) {
  pool_roi(t, k, in, px, ch, block);
}
template <typename T>
void unpool_channels_baseline(const RoiTaps<T>& t, const T* g, int64_t px, int64_t ch, int64_t c0,
                              int64_t c1, T* gi) {
  unpool_channels(t, g, px, ch, c0, c1, gi);
}
#ifdef CNNOPS_HAS_ISA_VARIANTS
template <typename T>
CNNOPS_AVX512 void pool_roi_avx512(const RoiTaps<T>& t, int64_t k, const T* in, int64_t px,
                                   int64_t ch, T* block) {
  pool_roi(t, k, in, px, ch, block);
}
template <typename T>
CNNOPS_AVX512 void unpool_channels_avx512(const RoiTaps<T>& t, const T* g, int64_t px, int64_t ch,
                                          int64_t c0, int64_t c1, T* gi) {
  unpool_channels(t, g, px, ch, c0, c1, gi);
}
#endif

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "roi_align (cpu backend): input must be float32 or float64, got ",
              input.scalar_type());
}

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                         int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                         bool aligned) {
  check_roi_args("roi_align", input, rois, spatial_scale, pooled_h, pooled_w);
  check_roi_boxes("roi_align", rois, input.size(0));
  check_cpu_dtype(input);
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const at::MemoryFormat format =
      is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output =
      at::empty({num_rois, channels, pooled_h, pooled_w}, input.options().memory_format(format));
  if (output.numel() == 0) return output;
  const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "roi_align_cpu", [&] {
    const auto geometry = roi_geometries<scalar_t>(
        r, static_cast<scalar_t>(spatial_scale), pooled_h, pooled_w, sampling_ratio, aligned);
    auto pool = &pool_roi_baseline<scalar_t>;
#ifdef CNNOPS_HAS_ISA_VARIANTS
    if (cpu_has_avx512()) pool = &pool_roi_avx512<scalar_t>;
#endif
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = output.mutable_data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w, block_size = bins * channels;
    const std::vector<int64_t> groups = roi_groups(geometry, bins);
    for (size_t group = 0; group + 1 < groups.size(); ++group) {
      const int64_t k0 = groups[group], k1 = groups[group + 1];
      const RoiTaps<scalar_t> t =
          compute_taps(r, geometry, k0, k1, height, width, pooled_h, pooled_w);
      at::parallel_for(0, k1 - k0, 1, [&](int64_t lo, int64_t hi) {
        std::vector<scalar_t> block(format == at::MemoryFormat::Contiguous ? block_size : 0);
        for (int64_t k = lo; k < hi; ++k) {
          scalar_t* out = dst + (k0 + k) * block_size;
          if (format == at::MemoryFormat::ChannelsLast) {
            pool(t, k, src, height * width, channels, out);  // [bins, C] is this layout
            continue;
          }
          pool(t, k, src, height * width, channels, block.data());
          for (int64_t c = 0; c < channels; ++c) {
            for (int64_t b = 0; b < bins; ++b) out[c * bins + b] = block[b * channels + c];
          }
        }
      });
    }
  });
  return output;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t batch_size, int64_t channels, int64_t height,
                                  int64_t width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "roi_align backward: grad must be (K, C, pooled_height, pooled_width) = (",
              rois.size(0), ", ", channels, ", ", pooled_h, ", ", pooled_w, "), got ",
              grad.sizes());
  TORCH_CHECK(batch_size >= 0 && channels >= 0,
              "roi_align backward: batch_size and channels must be >= 0");
  const at::Tensor like = at::empty({batch_size, channels, height, width}, grad.options());
  check_roi_args("roi_align", like, rois, spatial_scale, pooled_h, pooled_w);
  check_roi_boxes("roi_align", rois, batch_size);
  check_cpu_dtype(grad);
  // The result takes the layout the forward's output had (channels_last in, channels_last out).
  const bool channels_last = is_channels_last(grad);
  at::Tensor grad_input =
      at::empty({batch_size, channels, height, width},
                grad.options().memory_format(at::MemoryFormat::ChannelsLast))
          .zero_();
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return channels_last ? grad_input : grad_input.contiguous();
  }
  const at::Tensor g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "roi_align_backward_cpu", [&] {
    const auto geometry = roi_geometries<scalar_t>(
        r, static_cast<scalar_t>(spatial_scale), pooled_h, pooled_w, sampling_ratio, aligned);
    auto unpool = &unpool_channels_baseline<scalar_t>;
#ifdef CNNOPS_HAS_ISA_VARIANTS
    if (cpu_has_avx512()) unpool = &unpool_channels_avx512<scalar_t>;
#endif
    const int64_t block_size = pooled_h * pooled_w * channels;
    scalar_t* dst = grad_input.mutable_data_ptr<scalar_t>();
    // Channel blocks of whole cache lines, so that no two cores write one line.
    constexpr int64_t kChannelBlock = 64 / sizeof(scalar_t);
    const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
    // Groups in RoI order, each group's RoIs in order: a fixed order of summation.
    const std::vector<int64_t> groups = roi_groups(geometry, pooled_h * pooled_w);
    for (size_t group = 0; group + 1 < groups.size(); ++group) {
      const int64_t k0 = groups[group], k1 = groups[group + 1];
      const RoiTaps<scalar_t> t =
          compute_taps(r, geometry, k0, k1, height, width, pooled_h, pooled_w);
      const scalar_t* src = g.const_data_ptr<scalar_t>() + k0 * block_size;
      at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
        unpool(t, src, height * width, channels, lo * kChannelBlock,
               std::min(channels, hi * kChannelBlock), dst);
      });
    }
  });
  return channels_last ? grad_input : grad_input.contiguous();
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("roi_align", &cnnops::roi_align_cpu);
  m.impl("_roi_align_backward", &cnnops::roi_align_backward_cpu);
}
