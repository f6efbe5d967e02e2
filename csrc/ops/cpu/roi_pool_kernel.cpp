// CPU kernels of roi_pool, forward and backward.
//
// - Forward works on channels_last data (an NCHW input is converted once): a bin's pixels are
//   then runs of C contiguous values, and the max and its argmax are kept per channel in a [C]
//   vector that every pixel of the bin updates with a vector compare-and-select. The RoIs are
//   shared by the cores; a RoI's bins are reduced into a [bins, C] block, written out
//   channels-first for an NCHW result.
// - Backward works on NCHW planes: the channels are shared by the cores, and each core adds every
//   RoI's bin gradients into its own channels' planes, a tile of channels at a time (their
//   planes stay in cache).
//   Nothing is written by two cores (no atomics) and the sums run in a fixed order
//   (deterministic).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <vector>

#include "ops/cpu/isa.h"
#include "ops/roi_align.h"
#include "ops/roi_pool.h"

namespace cnnops {
namespace {

// RoI k's bins into `out` ([bins, C] values and argmaxes), from the channels_last input.
template <typename T>
__attribute__((always_inline)) inline void pool_roi(const T* roi, T spatial_scale,
                                                    const T* image, int64_t height, int64_t width,
                                                    int64_t channels, int64_t pooled_h,
                                                    int64_t pooled_w, T* out, int32_t* argmax) {
  const RoiPoolWindow<T> win = roi_pool_window(roi, spatial_scale, pooled_h, pooled_w);
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    const PixelRange rows = roi_pool_bin_range(ph, win.start_h, win.bin_h, height);
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      const PixelRange cols = roi_pool_bin_range(pw, win.start_w, win.bin_w, width);
      T* m = out + (ph * pooled_w + pw) * channels;
      int32_t* a = argmax + (ph * pooled_w + pw) * channels;
      const bool empty = rows.end <= rows.begin || cols.end <= cols.begin;
      // torchvision's start value: a bin of -inf (or NaN) values keeps -FLT_MAX and argmax -1.
      const T start = empty ? T(0) : static_cast<T>(-FLT_MAX);
      for (int64_t c = 0; c < channels; ++c) {
        m[c] = start;
        a[c] = -1;
      }
      for (int64_t y = rows.begin; y < rows.end; ++y) {
        for (int64_t x = cols.begin; x < cols.end; ++x) {
          const int32_t offset = static_cast<int32_t>(y * width + x);
          const T* pixel = image + (y * width + x) * channels;
          for (int64_t c = 0; c < channels; ++c) {
            const bool larger = pixel[c] > m[c];
            m[c] = larger ? pixel[c] : m[c];
            a[c] = larger ? offset : a[c];
          }
        }
      }
    }
  }
}

template <typename T>
void pool_roi_baseline(const T* roi, T scale, const T* image, int64_t h, int64_t w, int64_t c,
                       int64_t ph, int64_t pw, T* out, int32_t* argmax) {
  pool_roi(roi, scale, image, h, w, c, ph, pw, out, argmax);
}
#ifdef CNNOPS_HAS_ISA_VARIANTS
template <typename T>
CNNOPS_AVX512 void pool_roi_avx512(const T* roi, T scale, const T* image, int64_t h, int64_t w,
                                   int64_t c, int64_t ph, int64_t pw, T* out, int32_t* argmax) {
  pool_roi(roi, scale, image, h, w, c, ph, pw, out, argmax);
}
#endif

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "roi_pool (cpu backend): input must be float32 or float64, got ",
              input.scalar_type());
}

void check_plane_size(int64_t height, int64_t width) {
  TORCH_CHECK(height * width < (int64_t{1} << 31),
              "roi_pool (cpu backend): height * width must be below 2^31, got ", height, " x ",
              width);
}

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

std::tuple<at::Tensor, at::Tensor> roi_pool_cpu(const at::Tensor& input, const at::Tensor& rois,
                                                double spatial_scale, int64_t pooled_h,
                                                int64_t pooled_w) {
  check_roi_args("roi_pool", input, rois, spatial_scale, pooled_h, pooled_w);
  check_roi_boxes("roi_pool", rois, input.size(0));
  check_cpu_dtype(input);
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  check_plane_size(height, width);
  const at::MemoryFormat format =
      is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output =
      at::empty({num_rois, channels, pooled_h, pooled_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kInt));
  if (output.numel() == 0) return {output, argmax};
  const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor r = rois.contiguous();
  const int64_t bins = pooled_h * pooled_w, block_size = bins * channels;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "roi_pool_cpu", [&] {
    auto pool = &pool_roi_baseline<scalar_t>;
#ifdef CNNOPS_HAS_ISA_VARIANTS
    if (cpu_has_avx512()) pool = &pool_roi_avx512<scalar_t>;
#endif
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    const scalar_t* roi_data = r.const_data_ptr<scalar_t>();
    const scalar_t scale = static_cast<scalar_t>(spatial_scale);
    scalar_t* dst = output.mutable_data_ptr<scalar_t>();
    int32_t* dst_argmax = argmax.mutable_data_ptr<int32_t>();
    at::parallel_for(0, num_rois, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> block(format == at::MemoryFormat::Contiguous ? block_size : 0);
      std::vector<int32_t> block_argmax(format == at::MemoryFormat::Contiguous ? block_size : 0);
      for (int64_t k = lo; k < hi; ++k) {
        const scalar_t* roi = roi_data + 5 * k;
        const scalar_t* image =
            src + static_cast<int64_t>(roi[0]) * height * width * channels;
        scalar_t* out = dst + k * block_size;
        int32_t* out_argmax = dst_argmax + k * block_size;
        if (format == at::MemoryFormat::ChannelsLast) {  // [bins, C] is this layout
          pool(roi, scale, image, height, width, channels, pooled_h, pooled_w, out, out_argmax);
          continue;
        }
        pool(roi, scale, image, height, width, channels, pooled_h, pooled_w, block.data(),
             block_argmax.data());
        // [bins, C] to [C, bins]: each channel's bins are written contiguously, read from the
        // block (in L2) a line per bin. (Tiling the channels measured slower.)
        for (int64_t c = 0; c < channels; ++c) {
          for (int64_t b = 0; b < bins; ++b) {
            out[c * bins + b] = block[b * channels + c];
            out_argmax[c * bins + b] = block_argmax[b * channels + c];
          }
        }
      }
    });
  });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                 const at::Tensor& argmax, int64_t batch_size, int64_t channels,
                                 int64_t height, int64_t width) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels,
              "roi_pool backward: grad must be (K, C, pooled_height, pooled_width) with K = ",
              rois.size(0), " and C = ", channels, ", got ", grad.sizes());
  TORCH_CHECK(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt &&
                  argmax.device() == grad.device(),
              "roi_pool backward: argmax must be an int32 tensor shaped like grad ",
              grad.sizes(), " on ", grad.device(), ", got ", argmax.scalar_type(), " ",
              argmax.sizes(), " on ", argmax.device());
  TORCH_CHECK(batch_size >= 0 && channels >= 0,
              "roi_pool backward: batch_size and channels must be >= 0");
  const at::Tensor like = at::empty({batch_size, channels, height, width}, grad.options());
  check_roi_args("roi_pool", like, rois, 1.0, grad.size(2), grad.size(3));
  check_roi_boxes("roi_pool", rois, batch_size);
  check_cpu_dtype(grad);
  check_plane_size(height, width);
  const int64_t plane = height * width;
  if (argmax.numel() > 0) {
    const auto [lowest, highest] = at::aminmax(argmax);
    TORCH_CHECK(lowest.item<int32_t>() >= -1 && highest.item<int32_t>() < plane,
                "roi_pool backward: argmax values must be -1 or pixel offsets in [0, ", plane,
                ")");
  }
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (grad.numel() > 0 && grad_input.numel() > 0) {
    const at::Tensor g = grad.contiguous();
    const at::Tensor a = argmax.contiguous();
    const at::Tensor r = rois.contiguous();
    const int64_t num_rois = r.size(0), bins = g.size(2) * g.size(3);
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "roi_pool_backward_cpu", [&] {
      const scalar_t* g_data = g.const_data_ptr<scalar_t>();
      const int32_t* a_data = a.const_data_ptr<int32_t>();
      const scalar_t* roi_data = r.const_data_ptr<scalar_t>();
      scalar_t* dst = grad_input.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
        // A tile of channels at a time, all RoIs: the tile's planes (one per channel and image)
        // stay in L2 while every RoI adds into them, and each RoI's grad and argmax for the tile
        // are read as one contiguous run.
        constexpr int64_t kChannelTile = 16;
        for (int64_t t0 = c0; t0 < c1; t0 += kChannelTile) {
          const int64_t t1 = std::min(c1, t0 + kChannelTile);
          for (int64_t k = 0; k < num_rois; ++k) {
            const int64_t n = static_cast<int64_t>(roi_data[5 * k]);
            for (int64_t c = t0; c < t1; ++c) {
              scalar_t* out = dst + (n * channels + c) * plane;
              const scalar_t* gk = g_data + (k * channels + c) * bins;
              const int32_t* ak = a_data + (k * channels + c) * bins;
              for (int64_t b = 0; b < bins; ++b) {
                if (ak[b] >= 0) out[ak[b]] += gk[b];
              }
            }
          }
        }
      });
    });
  }
  // The result takes the layout the forward's output had (channels_last in, channels_last out).
  return is_channels_last(grad) ? grad_input.contiguous(at::MemoryFormat::ChannelsLast)
                                : grad_input;
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("roi_pool", &cnnops::roi_pool_cpu);
  m.impl("_roi_pool_backward", &cnnops::roi_pool_backward_cpu);
}
