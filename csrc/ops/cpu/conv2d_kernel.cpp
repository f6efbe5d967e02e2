// conv2d on the CPU: the `direct` and `im2col` algorithms, forward and backward, float32/64.
//
// im2col works in both memory formats natively. The GEMM is handed to at::mm (MKL/oneDNN);
// the column matrix is built here. The output rows are split into *row bands*: within a band the
// same contiguous range of kernel rows [r_lo, r_hi) reads inside the input, and only those taps
// are put in the column matrix. With large dilation and padding (DeepLab's ASPP at dilation 36)
// most taps of the border rows read padding, and skipping them removes up to a third of the FLOPs;
// where the border columns also skip much, the NCHW forward splits columns the same way (2-D
// blocks). Bands are capped in size so the column buffer stays bounded. Small NCHW images in a
// batch are computed in NHWC, where the whole batch is one GEMM (im2col_work_format).
//
// direct needs no column buffer: the forward pass reads a padded polyphase copy of the input in
// register tiles (see conv2d_direct_forward); the backward passes loop over output planes with the
// valid range of each tap precomputed (no bounds checks inside). It works in NCHW; channels_last
// inputs are converted on entry and the result converted back.
//
// depthwise is the direct algorithm in NCHW; in channels_last, a depthwise layer with one filter
// per channel runs NHWC kernels vectorised over channels, forward and backward (see
// conv2d_depthwise_nhwc_forward).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "ops/conv2d.h"
#include "ops/cpu/isa.h"

namespace cnnops {
namespace {

// Column buffers are capped near this size, but a GEMM always gets at least kMinGemmColumns
// columns: the BLAS repacks the weight matrix on every call, and with a large C*R*S (ASPP's
// 2048 x 3 x 3) thin calls would spend their time repacking.
constexpr int64_t kColumnBufferBytes = int64_t{32} << 20;
constexpr int64_t kMinGemmColumns = 1024;

// ---------------------------------------------------------------------------------------------
// Row bands

struct RowBand {
  int64_t p0, p1;      // output rows [p0, p1)
  int64_t r_lo, r_hi;  // kernel rows that read inside the input for every row of the band
};

// Splits the output rows into bands of uniform valid kernel rows, merges neighbours where that
// wastes little work (merging is always correct: taps outside the input are written as zeros),
// then caps each band at `max_rows` rows.
std::vector<RowBand> plan_row_bands(const Conv2dShape& s, int64_t max_rows) {
  std::vector<int64_t> cuts = {0, s.P};
  for (int64_t r = 0; r < s.R; ++r) {
    const int64_t lo = conv_first_valid_output(r, s.stride_h, s.pad_h, s.dilation_h);
    const int64_t hi = conv_last_valid_output(r, s.H, s.P, s.stride_h, s.pad_h, s.dilation_h);
    if (lo < hi) {
      cuts.push_back(std::min(lo, s.P));
      cuts.push_back(std::max<int64_t>(hi, 0));
    }
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  std::vector<RowBand> segments;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    const int64_t p0 = cuts[i], p1 = cuts[i + 1];
    int64_t r_lo = s.R, r_hi = 0;
    for (int64_t r = 0; r < s.R; ++r) {
      const int64_t lo = conv_first_valid_output(r, s.stride_h, s.pad_h, s.dilation_h);
      const int64_t hi = conv_last_valid_output(r, s.H, s.P, s.stride_h, s.pad_h, s.dilation_h);
      if (lo <= p0 && p0 < hi) {  // uniform over the segment, so its first row decides
        r_lo = std::min(r_lo, r);
        r_hi = std::max(r_hi, r + 1);
      }
    }
    if (r_lo >= r_hi) r_lo = r_hi = 0;  // every tap reads padding: the band is bias only
    segments.push_back({p0, p1, r_lo, r_hi});
  }

  std::vector<RowBand> merged;
  for (const RowBand& seg : segments) {
    if (!merged.empty()) {
      RowBand& last = merged.back();
      // Union of the two tap ranges; an empty range (a bias-only band) adds nothing to it.
      int64_t lo = std::min(last.r_lo, seg.r_lo), hi = std::max(last.r_hi, seg.r_hi);
      if (last.r_lo == last.r_hi) lo = seg.r_lo, hi = seg.r_hi;
      if (seg.r_lo == seg.r_hi) lo = last.r_lo, hi = last.r_hi;
      const int64_t apart = (last.p1 - last.p0) * (last.r_hi - last.r_lo) +
                            (seg.p1 - seg.p0) * (seg.r_hi - seg.r_lo);
      const int64_t together = (seg.p1 - last.p0) * (hi - lo);
      if (16 * (together - apart) <= together) {  // at most 1/16 of the merged work is wasted
        last = {last.p0, seg.p1, lo, hi};
        continue;
      }
    }
    merged.push_back(seg);
  }

  std::vector<RowBand> bands;
  for (const RowBand& b : merged) {
    for (int64_t p = b.p0; p < b.p1; p += max_rows) {
      bands.push_back({p, std::min(p + max_rows, b.p1), b.r_lo, b.r_hi});
    }
  }
  return bands;
}

// Weight packed for kernel rows [r_lo, r_hi) and columns [s_lo, s_hi), per group: NCHW as
// (c, r, s), NHWC as (r, s, c).
at::Tensor pack_weight(const at::Tensor& weight, const Conv2dShape& s, int64_t r_lo, int64_t r_hi,
                       int64_t s_lo, int64_t s_hi, bool channels_last) {
  at::Tensor w = weight.slice(2, r_lo, r_hi).slice(3, s_lo, s_hi);
  if (channels_last) w = w.permute({0, 2, 3, 1});
  return w.contiguous().view({s.groups, s.outputs_per_group(), -1});
}

// Adds a packed weight gradient back into the (K, C/groups, R, S) gradient.
void unpack_weight_grad(const at::Tensor& packed, at::Tensor& grad_weight, const Conv2dShape& s,
                        int64_t r_lo, int64_t r_hi, bool channels_last) {
  const int64_t nr = r_hi - r_lo, cg = s.channels_per_group();
  at::Tensor target = grad_weight.slice(2, r_lo, r_hi);
  if (channels_last) {
    target.add_(packed.view({s.K, nr, s.S, cg}).permute({0, 3, 1, 2}));
  } else {
    target.add_(packed.view({s.K, cg, nr, s.S}));
  }
}

// Row copies for im2col and the direct algorithm's polyphase build. Rows are short (7 to 65
// columns in the benchmark layers), and there are many: a memcpy call or a scalar loop per row
// cost as much as the convolution itself for ResNeXt's stride-2 layers, and a fifth of a tiled
// ASPP forward. These copy a row with a few vectors of the widest size that fits in it, the
// last one aligned to the row's end (an overlap rewrites the same values). GCC's vector types
// are ISA-neutral, so this inlines into every instruction-set variant of the kernel.
template <typename T, int kBytes>
struct Vector {
  typedef T type __attribute__((vector_size(kBytes)));
};

template <typename T, int kBytes>
__attribute__((always_inline)) inline void copy_with_vectors(const T* src, T* dst, int64_t n) {
  constexpr int64_t kLanes = kBytes / sizeof(T);
  for (int64_t x = 0; x < n; x += kLanes) {
    const int64_t at = std::min(x, n - kLanes);
    typename Vector<T, kBytes>::type v;
    std::memcpy(&v, src + at, kBytes);
    std::memcpy(dst + at, &v, kBytes);
  }
}

// kMaxBytes: the widest vector to use. Code compiled for the baseline ISA (im2col) passes 16:
// wider GCC vectors there are emulated through the stack.
template <typename T, int kMaxBytes = 64>
__attribute__((always_inline)) inline void copy_row(const T* src, T* dst, int64_t n) {
  if (kMaxBytes >= 64 && n * int64_t{sizeof(T)} >= 64) {
    copy_with_vectors<T, 64>(src, dst, n);
  } else if (kMaxBytes >= 32 && n * int64_t{sizeof(T)} >= 32) {
    copy_with_vectors<T, 32>(src, dst, n);
  } else if (n * int64_t{sizeof(T)} >= 16) {
    copy_with_vectors<T, 16>(src, dst, n);
  } else {
    for (int64_t x = 0; x < n; ++x) dst[x] = src[x];
  }
}

// ---------------------------------------------------------------------------------------------
// im2col / col2im, NCHW: column matrix (C * nr * ns) x (band rows * band columns) for one
// sample, where the column band `cb` is a row band of the transposed problem (see
// plan_column_bands): output columns [cb.p0, cb.p1) and kernel columns [cb.r_lo, cb.r_hi).

RowBand all_columns(const Conv2dShape& s) { return {0, s.Q, 0, s.S}; }

constexpr int64_t kIm2colPrefetchChannels = 4;

template <typename T>
void im2col_nchw(const T* in, T* col, const Conv2dShape& s, const RowBand& b, const RowBand& cb) {
  const int64_t nr = b.r_hi - b.r_lo, ns = cb.r_hi - cb.r_lo, rows = s.C * nr * ns;
  const int64_t band_q = cb.p1 - cb.p0, width = (b.p1 - b.p0) * band_q;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row / (nr * ns), r = b.r_lo + (row / ns) % nr, tap_s = cb.r_lo + row % ns;
      // Output columns [q_lo, q_hi) read inside the input; the rest are padding.
      const int64_t q_lo = std::clamp(
          conv_first_valid_output(tap_s, s.stride_w, s.pad_w, s.dilation_w), cb.p0, cb.p1);
      const int64_t q_hi = std::clamp(
          conv_last_valid_output(tap_s, s.W, s.Q, s.stride_w, s.pad_w, s.dilation_w), q_lo, cb.p1);
      const int64_t w0 = conv_input_coord(0, tap_s, s.stride_w, s.pad_w, s.dilation_w);
      T* dst = col + row * width - cb.p0;  // dst[q] for q in [cb.p0, cb.p1)
      for (int64_t p = b.p0; p < b.p1; ++p, dst += band_q) {
        const int64_t h = conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h);
        if (h < 0 || h >= s.H) {
          std::fill(dst + cb.p0, dst + cb.p1, T(0));
          continue;
        }
        const T* src = in + (c * s.H + h) * s.W + w0;
        if (c + kIm2colPrefetchChannels < s.C) {
          // The same row a few channels on: each channel's rows sit in their own page, where the
          // hardware prefetcher starts cold, and im2col of a large input waited on every miss.
          const char* ahead = reinterpret_cast<const char*>(src + kIm2colPrefetchChannels * s.H * s.W);
          const int64_t first = q_lo * s.stride_w * int64_t{sizeof(T)};
          const int64_t last = (q_hi - 1) * s.stride_w * int64_t{sizeof(T)};
          for (int64_t at = first; at <= last; at += 64) __builtin_prefetch(ahead + at);
        }
        std::fill(dst + cb.p0, dst + q_lo, T(0));
        if (s.stride_w == 1) {
          copy_row<T, 16>(src + q_lo, dst + q_lo, q_hi - q_lo);
        } else {
          for (int64_t q = q_lo; q < q_hi; ++q) dst[q] = src[q * s.stride_w];
        }
        std::fill(dst + q_hi, dst + cb.p1, T(0));
      }
    }
  });
}

// Adds the column matrix back into one sample's grad input. Tasks own whole channels, so no two
// threads write the same element.
template <typename T>
void col2im_nchw(const T* col, T* grad_in, const Conv2dShape& s, const RowBand& b) {
  const int64_t nr = b.r_hi - b.r_lo, width = (b.p1 - b.p0) * s.Q;
  at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t r = b.r_lo; r < b.r_hi; ++r) {
        for (int64_t tap_s = 0; tap_s < s.S; ++tap_s) {
          const int64_t row = (c * nr + (r - b.r_lo)) * s.S + tap_s;
          const int64_t q_lo = conv_first_valid_output(tap_s, s.stride_w, s.pad_w, s.dilation_w);
          const int64_t q_hi =
              conv_last_valid_output(tap_s, s.W, s.Q, s.stride_w, s.pad_w, s.dilation_w);
          const int64_t w0 = conv_input_coord(0, tap_s, s.stride_w, s.pad_w, s.dilation_w);
          const T* src = col + row * width;
          for (int64_t p = b.p0; p < b.p1; ++p, src += s.Q) {
            const int64_t h = conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h);
            if (h < 0 || h >= s.H) continue;
            T* dst = grad_in + (c * s.H + h) * s.W + w0;
            for (int64_t q = q_lo; q < q_hi; ++q) dst[q * s.stride_w] += src[q];
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// im2col / col2im, NHWC: column matrix (pixels) x (groups * nr * S * C/groups), one row per output
// pixel of the tile, which covers samples [n0, n1) and the output rows of band b.

template <typename T>
void im2col_nhwc(const T* in, T* col, const Conv2dShape& s, const RowBand& b, int64_t n0,
                 int64_t n1) {
  const int64_t nr = b.r_hi - b.r_lo, cg = s.channels_per_group();
  const int64_t band_pixels = (b.p1 - b.p0) * s.Q, row_len = s.groups * nr * s.S * cg;
  at::parallel_for(0, (n1 - n0) * band_pixels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = n0 + m / band_pixels, p = b.p0 + (m % band_pixels) / s.Q, q = m % s.Q;
      T* dst = col + m * row_len;
      for (int64_t r = b.r_lo; r < b.r_hi; ++r) {
        const int64_t h = conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h);
        for (int64_t tap_s = 0; tap_s < s.S; ++tap_s) {
          const int64_t w = conv_input_coord(q, tap_s, s.stride_w, s.pad_w, s.dilation_w);
          const bool inside = h >= 0 && h < s.H && w >= 0 && w < s.W;
          const T* src = in + ((n * s.H + h) * s.W + w) * s.C;
          const int64_t offset = ((r - b.r_lo) * s.S + tap_s) * cg;
          for (int64_t g = 0; g < s.groups; ++g) {
            T* d = dst + g * nr * s.S * cg + offset;
            if (inside) {
              std::memcpy(d, src + g * cg, cg * sizeof(T));
            } else {
              std::fill(d, d + cg, T(0));
            }
          }
        }
      }
    }
  });
}

// Gathers the column entries that read each input pixel. Tasks own input rows (n, h), so no two
// threads write the same element.
template <typename T>
void col2im_nhwc(const T* col, T* grad_in, const Conv2dShape& s, const RowBand& b, int64_t n0,
                 int64_t n1) {
  const int64_t nr = b.r_hi - b.r_lo, cg = s.channels_per_group();
  const int64_t band_pixels = (b.p1 - b.p0) * s.Q, row_len = s.groups * nr * s.S * cg;
  at::parallel_for(0, (n1 - n0) * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = n0 + task / s.H, h = task % s.H;
      for (int64_t r = b.r_lo; r < b.r_hi; ++r) {
        const int64_t p = conv_output_coord_for_input(h, r, s.stride_h, s.pad_h, s.dilation_h, s.P);
        if (p < b.p0 || p >= b.p1) continue;
        for (int64_t w = 0; w < s.W; ++w) {
          T* dst = grad_in + ((n * s.H + h) * s.W + w) * s.C;
          for (int64_t tap_s = 0; tap_s < s.S; ++tap_s) {
            const int64_t q =
                conv_output_coord_for_input(w, tap_s, s.stride_w, s.pad_w, s.dilation_w, s.Q);
            if (q < 0) continue;
            const int64_t m = (n - n0) * band_pixels + (p - b.p0) * s.Q + q;
            const T* src = col + m * row_len + ((r - b.r_lo) * s.S + tap_s) * cg;
            for (int64_t g = 0; g < s.groups; ++g) {
              const T* sg = src + g * nr * s.S * cg;
              T* dg = dst + g * cg;
              for (int64_t c = 0; c < cg; ++c) dg[c] += sg[c];
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// im2col driver. One "tile" = samples [n0, n1) x one row band. NCHW tiles hold one sample (a
// sample's output is its own K x PQ matrix); NHWC tiles hold several when the band spans all
// rows, since then their output rows are contiguous in the (N*P*Q) x K output matrix.

struct Tile {
  int64_t n0, n1;
  RowBand band;
};

// `columns`: the output columns of each GEMM's row (Q, or the narrowest column band in the 2-D
// block path).
std::vector<Tile> plan_tiles(const Conv2dShape& s, bool channels_last, int64_t element_size,
                             int64_t columns) {
  // Column-buffer bytes per output row of one sample, for the widest band (all kernel taps).
  const int64_t row_bytes = std::max<int64_t>(1, s.C * s.R * s.S * s.Q * element_size);
  const int64_t max_rows = std::max({int64_t{1}, kColumnBufferBytes / row_bytes,
                                     (kMinGemmColumns + columns - 1) / columns});
  std::vector<RowBand> bands = plan_row_bands(s, max_rows);
  std::vector<Tile> tiles;
  if (channels_last && bands.size() == 1 && bands[0].p0 == 0 && bands[0].p1 == s.P) {
    const int64_t per_tile = std::max<int64_t>(1, max_rows / std::max<int64_t>(1, s.P));
    for (int64_t n = 0; n < s.N; n += per_tile) tiles.push_back({n, std::min(s.N, n + per_tile), bands[0]});
    return tiles;
  }
  for (int64_t n = 0; n < s.N; ++n) {
    for (const RowBand& b : bands) tiles.push_back({n, n + 1, b});
  }
  return tiles;
}

// A 1x1, stride-1, unpadded convolution reads the input itself as its column matrix.
bool is_pointwise(const Conv2dShape& s) {
  return s.R == 1 && s.S == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 &&
         s.pad_w == 0;
}

// An NHWC-contiguous tensor as the (pixels x channels) matrix it is in memory. view(), not
// reshape(): the result is written through, so a silent copy would lose the writes.
at::Tensor pixel_matrix(const at::Tensor& t, const Conv2dShape& s) {
  return t.permute({0, 2, 3, 1}).view({-1, t.size(1)});
}

// The column matrix of one tile, built in `buffer` unless the input can serve as it is.
template <typename T>
at::Tensor columns_for_tile(const at::Tensor& input, at::Tensor& buffer, const Conv2dShape& s,
                            const Tile& t, bool channels_last) {
  const int64_t nr = t.band.r_hi - t.band.r_lo;
  if (channels_last) {
    const int64_t rows = (t.n1 - t.n0) * (t.band.p1 - t.band.p0) * s.Q;
    if (is_pointwise(s)) return pixel_matrix(input, s).narrow(0, (t.n0 * s.P + t.band.p0) * s.Q, rows);
    at::Tensor col = buffer.narrow(0, 0, rows * s.C * nr * s.S).view({rows, s.C * nr * s.S});
    im2col_nhwc(input.const_data_ptr<T>(), col.data_ptr<T>(), s, t.band, t.n0, t.n1);
    return col;
  }
  const int64_t width = (t.band.p1 - t.band.p0) * s.Q;
  if (is_pointwise(s)) return input[t.n0].view({s.C, s.H * s.W}).narrow(1, t.band.p0 * s.Q, width);
  at::Tensor col = buffer.narrow(0, 0, s.C * nr * s.S * width).view({s.C * nr * s.S, width});
  im2col_nchw(input[t.n0].const_data_ptr<T>(), col.data_ptr<T>(), s, t.band, all_columns(s));
  return col;
}

// The GEMMs go one batched call per tile, groups as the batch: a call per group costs ~1 us of
// dispatch, and a depthwise layer (hundreds of groups, tiny GEMMs) spent all its time there.

// The tile's output, one matrix per group: (groups, K_g, pixels) in NCHW, (groups, pixels, K_g)
// in NHWC.
at::Tensor output_blocks(const at::Tensor& out, const Conv2dShape& s, const Tile& t, bool channels_last) {
  const int64_t kg = s.outputs_per_group();
  if (channels_last) {
    const int64_t first = (t.n0 * s.P + t.band.p0) * s.Q;
    const int64_t rows = (t.n1 - t.n0) * (t.band.p1 - t.band.p0) * s.Q;
    return pixel_matrix(out, s).narrow(0, first, rows).view({rows, s.groups, kg}).transpose(0, 1);
  }
  return out[t.n0].view({s.groups, kg, s.P * s.Q}).narrow(2, t.band.p0 * s.Q, (t.band.p1 - t.band.p0) * s.Q);
}

// The column matrix, one per group: (groups, taps of a group, pixels) in NCHW, (groups, pixels,
// taps of a group) in NHWC.
at::Tensor column_blocks(const at::Tensor& col, const Conv2dShape& s, bool channels_last) {
  return channels_last ? col.view({col.size(0), s.groups, -1}).transpose(0, 1)
                       : col.view({s.groups, -1, col.size(1)});
}

at::Tensor column_buffer(const at::TensorOptions& options, const Conv2dShape& s, const std::vector<Tile>& tiles) {
  int64_t most = 0;
  for (const Tile& t : tiles) {
    most = std::max(most, (t.n1 - t.n0) * (t.band.p1 - t.band.p0) * s.Q * s.C *
                              (t.band.r_hi - t.band.r_lo) * s.S);
  }
  return at::empty({is_pointwise(s) ? 0 : most}, options);
}

// Caches the packed weight for each kernel-row range the bands use (usually one, at most a few).
class PackedWeights {
 public:
  PackedWeights(const at::Tensor& weight, const Conv2dShape& s, bool channels_last)
      : weight_(weight), s_(s), channels_last_(channels_last) {}
  const at::Tensor& get(const RowBand& b, const RowBand& cb) {
    auto key = std::make_tuple(b.r_lo, b.r_hi, cb.r_lo, cb.r_hi);
    auto it = packed_.find(key);
    if (it == packed_.end()) {
      it = packed_.emplace(key, pack_weight(weight_, s_, b.r_lo, b.r_hi, cb.r_lo, cb.r_hi, channels_last_)).first;
    }
    return it->second;
  }
  const at::Tensor& get(const RowBand& b) { return get(b, all_columns(s_)); }

 private:
  at::Tensor weight_;
  Conv2dShape s_;
  bool channels_last_;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, at::Tensor> packed_;
};

void fill_bias(at::Tensor& out, const std::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) {
    out.copy_(bias->view({1, -1, 1, 1}).expand_as(out));
  } else {
    out.zero_();
  }
}

// The problem with rows and columns exchanged: its row bands are the column bands of `s`.
Conv2dShape transposed(const Conv2dShape& s) {
  Conv2dShape t = s;
  std::swap(t.H, t.W);
  std::swap(t.R, t.S);
  std::swap(t.P, t.Q);
  std::swap(t.stride_h, t.stride_w);
  std::swap(t.pad_h, t.pad_w);
  std::swap(t.dilation_h, t.dilation_w);
  return t;
}

// NCHW forward in 2-D blocks (row band x column band), for convolutions whose border columns also
// read mostly padding (DeepLab's ASPP): each block's GEMM has only the taps that read the input.
// A block's output is not one matrix in NCHW, so its GEMM goes to a scratch tile that is then
// added to the output (which holds the bias).
template <typename T>
void conv2d_im2col_forward_blocks(const at::Tensor& input, const at::Tensor& weight, at::Tensor& out,
                                  const Conv2dShape& s, const std::vector<RowBand>& column_bands) {
  int64_t narrowest = s.Q;
  for (const RowBand& cb : column_bands) {
    if (cb.r_lo < cb.r_hi) narrowest = std::min(narrowest, cb.p1 - cb.p0);
  }
  const std::vector<Tile> tiles = plan_tiles(s, /*channels_last=*/false, sizeof(T), narrowest);
  at::Tensor buffer = column_buffer(input.options(), s, tiles);
  PackedWeights packed(weight, s, /*channels_last=*/false);
  for (const Tile& t : tiles) {
    if (t.band.r_lo == t.band.r_hi) continue;
    const int64_t rows = t.band.p1 - t.band.p0;
    for (const RowBand& cb : column_bands) {
      if (cb.r_lo == cb.r_hi) continue;
      const int64_t band_q = cb.p1 - cb.p0, depth = s.C * (t.band.r_hi - t.band.r_lo) * (cb.r_hi - cb.r_lo);
      at::Tensor col = buffer.narrow(0, 0, depth * rows * band_q).view({depth, rows * band_q});
      im2col_nchw(input[t.n0].const_data_ptr<T>(), col.data_ptr<T>(), s, t.band, cb);
      const at::Tensor& w = packed.get(t.band, cb);
      at::Tensor block = out[t.n0].narrow(1, t.band.p0, rows).narrow(2, cb.p0, band_q);
      block.add_(at::bmm(w, column_blocks(col, s, false)).view({s.K, rows, band_q}));
    }
  }
}

// NCHW forward of a dense convolution in cache-sized tiles, for problems whose column matrix is
// too large for the cache (DeepLab's 65 x 65 layers: 39 MB per sample at 256 channels, 311 MB for
// ASPP's 2048). A tile is a few output rows of one sample's 2-D block (row band x column band,
// each with one set of taps that read the input). For each chunk of input channels and each of
// its valid taps, the thread that owns the tile builds that tap's columns (channels x tile
// pixels, sized for L2) and adds their product with the tap's weights into the tile's output.
// Nothing the size of the column matrix goes through memory, a chunk's input rows are read once
// for the kernel row's taps, and the GEMMs run one per core on data already in its cache.
// Measured on ASPP at batch 1 (2 threads, same process): 1.25x the GEMM path at dilation 12,
// 1.5x at 24, 1.4x at 36 (where the GEMM path already skipped column padding in blocks); equal
// on the dense dilation-2/4 layers. Smaller problems keep the GEMM path: on ResNet-50's 14 x 14
// and 7 x 7 layers tiles measured 2x slower, their GEMMs too small to run one per core.
constexpr int64_t kTilePixels = 2048;
constexpr int64_t kTileChannels = 256;

template <typename T>
void conv2d_im2col_forward_tiled(const at::Tensor& input, const at::Tensor& weight, at::Tensor& out,
                                 const Conv2dShape& s, const std::vector<RowBand>& column_bands) {
  struct Task {
    int64_t n;
    RowBand rows, cols;
  };
  // Blocks of one sample, and how many tiles each splits into.
  std::vector<std::pair<RowBand, RowBand>> blocks;
  std::vector<int64_t> splits;
  int64_t tiles = 0;
  for (const RowBand& b : plan_row_bands(s, s.P)) {
    if (b.r_lo == b.r_hi) continue;  // all padding: the output is the bias
    for (const RowBand& cb : column_bands) {
      if (cb.r_lo == cb.r_hi) continue;
      blocks.emplace_back(b, cb);
      const int64_t band_q = cb.p1 - cb.p0, rows = b.p1 - b.p0;
      splits.push_back(std::min(rows, (rows * band_q + kTilePixels - 1) / kTilePixels));
      tiles += s.N * splits.back();
    }
  }
  // A few large tiles leave a thread idle at the end (65 rows in 3 tiles: one of two threads runs
  // two of them): then each block splits into a multiple of the thread count.
  const int64_t threads = at::get_num_threads();
  if (tiles < 4 * threads) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      const int64_t rows = blocks[i].first.p1 - blocks[i].first.p0;
      splits[i] = std::min(rows, (splits[i] + threads - 1) / threads * threads);
    }
  }
  std::vector<Task> tasks;
  for (int64_t n = 0; n < s.N; ++n) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      const RowBand& b = blocks[i].first;
      // Rows split evenly: tiles differ by at most one row.
      for (int64_t part = 0; part < splits[i]; ++part) {
        const int64_t p0 = b.p0 + (b.p1 - b.p0) * part / splits[i];
        const int64_t p1 = b.p0 + (b.p1 - b.p0) * (part + 1) / splits[i];
        tasks.push_back({n, {p0, p1, b.r_lo, b.r_hi}, blocks[i].second});
      }
    }
  }
  // Weights as (K, R, S, C): a tap's chunk of channels is then one slice of columns.
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous().view({s.K, s.R * s.S * s.C});
  const int64_t chunk_c = std::min(s.C, kTileChannels);
  int64_t widest = 0;  // pixels of the largest tile
  for (const Task& t : tasks) widest = std::max(widest, (t.rows.p1 - t.rows.p0) * (t.cols.p1 - t.cols.p0));
  // Tiles differ in cost (a corner block has 4 taps, the centre 9): threads take the next tile
  // from a shared counter rather than a fixed share.
  std::atomic<int64_t> next{0};
  // The tiles run tensor ops on the pool's threads, which do not inherit the caller's
  // InferenceMode: under torch.inference_mode() `out` is an inference tensor, and an in-place op
  // on it outside that mode raises.
  const bool inference_mode = c10::InferenceMode::is_enabled();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::optional<c10::InferenceMode> inference_guard;
    if (inference_mode) inference_guard.emplace();
    at::Tensor col = at::empty({chunk_c * widest}, input.options());
    at::Tensor scratch = at::empty({s.K * widest}, input.options());
    Conv2dShape chunk_shape = s;
    for (int64_t i = next++; i < static_cast<int64_t>(tasks.size()); i = next++) {
      const Task& t = tasks[i];
      const int64_t rows = t.rows.p1 - t.rows.p0, band_q = t.cols.p1 - t.cols.p0, pixels = rows * band_q;
      // Full-width rows are one (K x pixels) matrix of the output: the GEMMs add into it there.
      const bool in_place = band_q == s.Q;
      at::Tensor target = in_place ? out[t.n].view({s.K, s.P * s.Q}).narrow(1, t.rows.p0 * s.Q, pixels)
                                   : scratch.narrow(0, 0, s.K * pixels).view({s.K, pixels}).zero_();
      const T* in = input.const_data_ptr<T>() + t.n * s.C * s.H * s.W;
      for (int64_t c0 = 0; c0 < s.C; c0 += chunk_c) {
        chunk_shape.C = std::min(chunk_c, s.C - c0);
        for (int64_t r = t.rows.r_lo; r < t.rows.r_hi; ++r) {
          for (int64_t tap_s = t.cols.r_lo; tap_s < t.cols.r_hi; ++tap_s) {
            at::Tensor c = col.narrow(0, 0, chunk_shape.C * pixels).view({chunk_shape.C, pixels});
            im2col_nchw(in + c0 * s.H * s.W, c.data_ptr<T>(), chunk_shape, {t.rows.p0, t.rows.p1, r, r + 1},
                        {t.cols.p0, t.cols.p1, tap_s, tap_s + 1});
            target.addmm_(w.narrow(1, (r * s.S + tap_s) * s.C + c0, chunk_shape.C), c);
          }
        }
      }
      if (!in_place) {
        out[t.n].narrow(1, t.rows.p0, rows).narrow(2, t.cols.p0, band_q).add_(target.view({s.K, rows, band_q}));
      }
    }
  });
}

// Writes the convolution of `input` plus the bias into `out`.
template <typename T>
void conv2d_im2col_forward(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::Tensor& out, const Conv2dShape& s,
                           bool channels_last) {
  const bool has_bias = bias.has_value() && bias->defined();
  // Without a bias the GEMMs overwrite their output block (beta = 0) instead of adding onto
  // zeros: the BLAS then never reads the output, and the zero fill goes too. That is a third of
  // the memory traffic of a 1x1 layer over a large image (MobileNetV2's expansions: 1.6x faster
  // at batch 1, measured). ResNets' and MobileNets' convolutions have no bias.
  const double beta = has_bias ? 1.0 : 0.0;
  if (is_pointwise(s) && s.groups == 1) {
    // One GEMM per sample (NCHW) or for the whole batch (NHWC) on the tensors as they are. The
    // tile loop below would do the same GEMMs, but at batch 1 its views and packing cost ~15 us
    // a layer, 8% of a small 1x1 layer's time.
    if (has_bias) fill_bias(out, bias);
    const at::Tensor w = weight.reshape({s.K, s.C});
    if (channels_last) {
      pixel_matrix(out, s).addmm_(pixel_matrix(input, s), w.t(), beta);
      return;
    }
    for (int64_t n = 0; n < s.N; ++n) {
      out.select(0, n).view({s.K, s.P * s.Q}).addmm_(w, input.select(0, n).view({s.C, s.H * s.W}), beta);
    }
    return;
  }
  if (!channels_last && !is_pointwise(s)) {
    const std::vector<RowBand> column_bands = plan_row_bands(transposed(s), s.Q);
    int64_t column_taps = 0;  // kernel columns summed over output columns, padding skipped
    for (const RowBand& cb : column_bands) column_taps += (cb.p1 - cb.p0) * (cb.r_hi - cb.r_lo);
    // Blocks pay for their narrower GEMMs only when they skip at least a third of the work
    // (measured on the GEMM path: ASPP at dilation 36 gains, at 12 loses).
    const bool skips_columns = 3 * column_taps <= 2 * s.Q * s.S;
    // Cache-sized tiles when the column matrix would not fit the buffer, and whenever a sample's
    // output fills at least one tile: a 56 x 56 ResNet layer's column matrix (7 MB) spills the
    // L2 between im2col and the GEMM, and tiles measured 1.3x faster at batch 8 and 1.4x at
    // batch 1 (2 threads). At 28 x 28 they were even, at 14 x 14 slower (see the tiled path).
    const bool large = s.C * s.R * s.S * s.P * s.Q * int64_t{sizeof(T)} > kColumnBufferBytes ||
                       s.P * s.Q >= kTilePixels;
    if (s.groups == 1 && (large || skips_columns)) {
      fill_bias(out, bias);  // the GEMMs accumulate onto it
      conv2d_im2col_forward_tiled<T>(input, weight, out, s, column_bands);
      return;
    }
    if (skips_columns) {
      fill_bias(out, bias);
      conv2d_im2col_forward_blocks<T>(input, weight, out, s, column_bands);
      return;
    }
  }
  // The tiles partition the output, one GEMM each, so beta = 0 is safe without a bias.
  if (has_bias) fill_bias(out, bias);
  const std::vector<Tile> tiles = plan_tiles(s, channels_last, sizeof(T), s.Q);
  at::Tensor buffer = column_buffer(input.options(), s, tiles);
  PackedWeights packed(weight, s, channels_last);
  for (const Tile& t : tiles) {
    at::Tensor dst = output_blocks(out, s, t, channels_last);
    if (t.band.r_lo == t.band.r_hi) {  // all padding: the output is the bias
      if (!has_bias) dst.zero_();
      continue;
    }
    at::Tensor col = columns_for_tile<T>(input, buffer, s, t, channels_last);
    const at::Tensor& w = packed.get(t.band);
    at::Tensor cols = column_blocks(col, s, channels_last);
    if (channels_last) {
      dst.baddbmm_(cols, w.transpose(1, 2), beta);
    } else {
      dst.baddbmm_(w, cols, beta);
    }
  }
}

// grad_in and grad_w are computed where defined; input is read only for grad_w.
template <typename T>
void conv2d_im2col_backward(const at::Tensor& grad_out, const at::Tensor& input,
                            const at::Tensor& weight, at::Tensor& grad_in, at::Tensor& grad_w,
                            const Conv2dShape& s, bool channels_last) {
  const std::vector<Tile> tiles = plan_tiles(s, channels_last, sizeof(T), s.Q);
  at::Tensor buffer = column_buffer(weight.options(), s, tiles);
  PackedWeights packed(weight, s, channels_last);
  std::map<std::pair<int64_t, int64_t>, at::Tensor> packed_grads;
  for (const Tile& t : tiles) {
    if (t.band.r_lo == t.band.r_hi) continue;
    const int64_t nr = t.band.r_hi - t.band.r_lo;
    if (grad_w.defined()) {
      auto key = std::make_pair(t.band.r_lo, t.band.r_hi);
      auto it = packed_grads.find(key);
      if (it == packed_grads.end()) {
        it = packed_grads.emplace(key, at::zeros({s.groups, s.outputs_per_group(), s.channels_per_group() * nr * s.S}, weight.options())).first;
      }
      at::Tensor col = columns_for_tile<T>(input, buffer, s, t, channels_last);
      at::Tensor go = output_blocks(grad_out, s, t, channels_last);
      at::Tensor cols = column_blocks(col, s, channels_last);
      if (channels_last) {
        it->second.baddbmm_(go.transpose(1, 2), cols);
      } else {
        it->second.baddbmm_(go, cols.transpose(1, 2));
      }
    }
    if (grad_in.defined()) {
      const at::Tensor& w = packed.get(t.band);
      const int64_t pixels = (t.n1 - t.n0) * (t.band.p1 - t.band.p0) * s.Q;
      const int64_t col_len = s.C * nr * s.S;
      at::Tensor col;
      if (is_pointwise(s)) {
        // The column matrix *is* the grad input: write the GEMM straight into it.
        col = channels_last ? pixel_matrix(grad_in, s).narrow(0, (t.n0 * s.P + t.band.p0) * s.Q, pixels)
                            : grad_in[t.n0].view({s.C, s.H * s.W}).narrow(1, t.band.p0 * s.Q, pixels);
      } else if (channels_last) {
        col = buffer.narrow(0, 0, pixels * col_len).view({pixels, col_len});
      } else {
        col = buffer.narrow(0, 0, pixels * col_len).view({col_len, pixels});
      }
      at::Tensor go = output_blocks(grad_out, s, t, channels_last);
      at::Tensor cols = column_blocks(col, s, channels_last);
      if (channels_last) {
        at::bmm_out(cols, go, w);
      } else {
        at::bmm_out(cols, w.transpose(1, 2), go);
      }
      if (!is_pointwise(s)) {
        if (channels_last) {
          col2im_nhwc(col.const_data_ptr<T>(), grad_in.data_ptr<T>(), s, t.band, t.n0, t.n1);
        } else {
          col2im_nchw(col.const_data_ptr<T>(), grad_in[t.n0].data_ptr<T>(), s, t.band);
        }
      }
    }
  }
  for (const auto& [key, dw] : packed_grads) {
    unpack_weight_grad(dw.view({s.K, -1}), grad_w, s, key.first, key.second, channels_last);
  }
}

// ---------------------------------------------------------------------------------------------
// direct, NCHW.

// The forward pass works on a zero-padded, *polyphase* copy of the input: phase (a, b) of a
// channel holds padded pixels (i*stride_h + a, j*stride_w + b). Every tap then reads its phase
// at a fixed offset with unit stride, whatever the stride, padding or dilation, so an output
// plane is computed as one long "wide" row of P x Wph values (the Wph - Q extra columns per row
// are computed and dropped) with no bounds checks. Each task computes a block of kKB output
// channels of one sample in register tiles of kKB x kJB values; every input vector loaded is used
// by kKB FMAs. That reuse is what a grouped convolution's small channel count leaves, and it beats
// im2col there: no 9x column buffer goes through memory.

struct DirectPlan {
  int64_t Hph, Wph;        // rows and columns of one phase of the padded input
  int64_t phase_rows;      // rows allocated per phase: Hph plus zero slack rows
  int64_t channel_stride;  // elements per (sample, channel): stride_h * stride_w phases
};

// Output values per register-tile row: 64 (four 16-float vectors) with AVX-512's 32 vector
// registers, 32 elsewhere. Buffers are sized for the larger.
constexpr int64_t kMaxJB = 64;

// `overrun`: how many values past the last wide position a tile reads.
DirectPlan plan_direct(const Conv2dShape& s, int64_t overrun = kMaxJB) {
  DirectPlan d{};
  d.Hph = (s.H + 2 * s.pad_h + s.stride_h - 1) / s.stride_h;
  d.Wph = (s.W + 2 * s.pad_w + s.stride_w - 1) / s.stride_w;
  // Tiles run past the last output row by up to `overrun` values, and a tap adds up to one more
  // row: zero rows of slack keep those reads inside the buffer.
  d.phase_rows = d.Hph + (overrun + d.Wph - 1) / d.Wph + 1;
  d.channel_stride = s.stride_h * s.stride_w * d.phase_rows * d.Wph;
  return d;
}

// even[k] = src[2k], odd[k] = src[2k + 1] for 2k (+ 1) < n: the two column phases of stride 2.
template <typename T, int kBytes>
__attribute__((always_inline)) inline void split_with_vectors(const T* src, T* even, T* odd, int64_t n) {
  constexpr int64_t kLanes = kBytes / sizeof(T);
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index_t;
  typedef index_t index_vec __attribute__((vector_size(kBytes)));
  index_vec even_index, odd_index;
  for (int64_t l = 0; l < kLanes; ++l) {
    even_index[l] = index_t(2 * l);
    odd_index[l] = index_t(2 * l + 1);
  }
  // Steps of 2 * kLanes inputs from even offsets; the last step ends at or one before n.
  const int64_t last = (n - 2 * kLanes) & ~int64_t{1};
  for (int64_t x = 0;; x += 2 * kLanes) {
    const int64_t at = std::min(x, last);
    typename Vector<T, kBytes>::type lo, hi;
    std::memcpy(&lo, src + at, kBytes);
    std::memcpy(&hi, src + at + kLanes, kBytes);
    const typename Vector<T, kBytes>::type e = __builtin_shuffle(lo, hi, even_index);
    const typename Vector<T, kBytes>::type o = __builtin_shuffle(lo, hi, odd_index);
    std::memcpy(even + at / 2, &e, kBytes);
    std::memcpy(odd + at / 2, &o, kBytes);
    if (at == last) break;
  }
  if (n % 2) even[n / 2] = src[n - 1];  // the step at `last` stopped one short
}

template <typename T>
__attribute__((always_inline)) inline void split_even_odd(const T* src, T* even, T* odd, int64_t n) {
#if defined(__GNUC__) && !defined(__clang__)
  if (n >= 128 / int64_t{sizeof(T)}) return split_with_vectors<T, 64>(src, even, odd, n);
  if (n >= 64 / int64_t{sizeof(T)}) return split_with_vectors<T, 32>(src, even, odd, n);
  if (n >= 32 / int64_t{sizeof(T)}) return split_with_vectors<T, 16>(src, even, odd, n);
#endif
  for (int64_t k = 0; 2 * k < n; ++k) {
    even[k] = src[2 * k];
    if (2 * k + 1 < n) odd[k] = src[2 * k + 1];
  }
}

// Coordinates [lo, hi) of phase `phase` (of `phase_size`) along one padded dimension that hold
// input pixels: i * stride + phase - pad in [0, in). A phase reads like a kernel tap of
// dilation 1, so the tap bounds serve.
std::pair<int64_t, int64_t> phase_range(int64_t phase, int64_t in, int64_t phase_size, int64_t stride,
                                        int64_t pad) {
  const int64_t lo = std::min(phase_size, conv_first_valid_output(phase, stride, pad, 1));
  return {lo, std::max(lo, conv_last_valid_output(phase, in, phase_size, stride, pad, 1))};
}

// Writes the polyphase copy of `channels` input planes into a buffer that was zero-filled once:
// padding and slack are zeros at fixed places, so only the input pixels are copied, every time
// to the same places. It runs inside each task, on the task's own group, so the copy stays in
// cache and is vectorised with the task's instruction set.
template <typename T>
__attribute__((always_inline)) inline void build_group_phases(const T* in, T* phases, int64_t channels,
                                                              const Conv2dShape& s,
                                                              const DirectPlan& d) {
  const int64_t phase_size = d.phase_rows * d.Wph;
  // Phase rows [i_lo, i_hi) map to input rows i * stride_h + a - pad_h inside the input.
  auto phase_rows = [&](int64_t a) { return phase_range(a, s.H, d.Hph, s.stride_h, s.pad_h); };
  if (s.stride_w == 2) {
    // Input column x lands in phase (x + pad_w) % 2, at column (x + pad_w) / 2. Channel by
    // channel, so that one pass over a channel's rows fills all its phases.
    const int64_t pw = s.pad_w;
    for (int64_t c = 0; c < channels; ++c) {
      const T* plane = in + c * s.H * s.W;
      for (int64_t a = 0; a < s.stride_h; ++a) {
        const auto [i_lo, i_hi] = phase_rows(a);
        T* even = phases + c * d.channel_stride + (a * 2 + pw % 2) * phase_size + pw / 2;
        T* odd = phases + c * d.channel_stride + (a * 2 + (pw + 1) % 2) * phase_size + (pw + 1) / 2;
        for (int64_t i = i_lo; i < i_hi; ++i) {
          split_even_odd(plane + (i * s.stride_h + a - s.pad_h) * s.W, even + i * d.Wph, odd + i * d.Wph, s.W);
        }
      }
    }
    return;
  }
  // Here the phase loops are outermost: which columns of a phase hold input pixels takes
  // divisions to find, the same for every row, and worked out per row they cost more than
  // copying the row (ResNeXt's 7- and 14-column rows: 10-20% of those layers' time).
  for (int64_t a = 0; a < s.stride_h; ++a) {
    const auto [i_lo, i_hi] = phase_rows(a);
    for (int64_t b = 0; b < s.stride_w; ++b) {
      // Phase columns [j_lo, j_hi) map to input columns j * stride_w + b - pad_w.
      const auto [j_lo, j_hi] = phase_range(b, s.W, d.Wph, s.stride_w, s.pad_w);
      for (int64_t c = 0; c < channels; ++c) {
        const T* plane = in + c * s.H * s.W + b - s.pad_w;
        T* rows = phases + c * d.channel_stride + (a * s.stride_w + b) * phase_size;
        for (int64_t i = i_lo; i < i_hi; ++i) {
          const T* from = plane + (i * s.stride_h + a - s.pad_h) * s.W;
          T* row = rows + i * d.Wph;
          if (s.stride_w == 1) {
            copy_row(from + j_lo, row + j_lo, j_hi - j_lo);
          } else {
            for (int64_t j = j_lo; j < j_hi; ++j) row[j] = from[j * s.stride_w];
          }
        }
      }
    }
  }
}

// Register tile: kKB output channels x kJB wide positions, accumulated over every tap of the group.
// Each tap also prefetches the next line of [prefetch, prefetch_end), the next task's input.
template <typename T, int kKB, int kJB>
__attribute__((always_inline)) inline void direct_tile(const T* group_phases, const int64_t* tap_offsets,
                                                       const T* weight, int64_t taps, int64_t j0,
                                                       const T* bias, T* wide, const char*& prefetch,
                                                       const char* prefetch_end) {
  typedef T vec __attribute__((vector_size(64)));
  constexpr int kLanes = 64 / sizeof(T), kVecs = kJB / kLanes;
  vec acc[kKB][kVecs];
  for (int kb = 0; kb < kKB; ++kb) {
    for (int v = 0; v < kVecs; ++v) acc[kb][v] = vec{} + (bias ? bias[kb] : T(0));
  }
  for (int64_t t = 0; t < taps; ++t) {
    if (prefetch < prefetch_end) {
      __builtin_prefetch(prefetch, 0, 2);
      prefetch += 64;
    }
    const T* src = group_phases + tap_offsets[t] + j0;
    vec x[kVecs];
    for (int v = 0; v < kVecs; ++v) std::memcpy(&x[v], src + v * kLanes, sizeof(vec));
    for (int kb = 0; kb < kKB; ++kb) {
      const T wv = weight[kb * taps + t];
      for (int v = 0; v < kVecs; ++v) acc[kb][v] += x[v] * wv;
    }
  }
  for (int kb = 0; kb < kKB; ++kb) {
    for (int v = 0; v < kVecs; ++v) std::memcpy(wide + kb * kJB + v * kLanes, &acc[kb][v], sizeof(vec));
  }
}

constexpr int64_t kPrefetchInputBytes = int64_t{32} << 10;

struct DirectTasks {
  const void* input;     // NCHW-contiguous
  int64_t chunks;        // tasks per (sample, group), or per group for channel tiles: each takes a
                         // share of its output blocks
  const void* weight;    // (K, C/groups, R, S), contiguous
  const void* bias;      // or nullptr
  void* out;
  const int64_t* tap_offsets;
  Conv2dShape s;
  DirectPlan d;
};

// Tasks are (sample, group, chunk of the group's blocks of kKB output channels). Each builds its
// group's phases, then runs the register tiles of its blocks over the whole wide plane.
template <typename T, int kKB, int kJB>
__attribute__((always_inline)) inline void direct_forward_tasks(const DirectTasks& a, int64_t begin,
                                                                int64_t end) {
  const Conv2dShape& s = a.s;
  const DirectPlan& d = a.d;
  const int64_t cg = s.channels_per_group(), kg = s.outputs_per_group(), taps = cg * s.R * s.S;
  const int64_t group_blocks = kg / kKB;
  const int64_t blocks_per_chunk = (group_blocks + a.chunks - 1) / a.chunks;
  std::vector<T> phases(cg * d.channel_stride);  // zero-filled once: see build_group_phases
  T tile[kKB * kJB];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % a.chunks, ng = task / a.chunks;
    const int64_t n = ng / s.groups, g = ng % s.groups;
    const int64_t b_lo = chunk * blocks_per_chunk, b_hi = std::min(group_blocks, b_lo + blocks_per_chunk);
    if (b_lo >= b_hi) continue;
    build_group_phases(static_cast<const T*>(a.input) + (n * s.C + g * cg) * s.H * s.W, phases.data(),
                       cg, s, d);
    // The next task's input, when it is another group's and large (ResNeXt's early layers: 50 to
    // 100 KB), is prefetched into L2 a line per tap while this one computes: 1.13x at layer1.0 and
    // 1.06x at layer3.0 at batch 8. Small inputs gain nothing, as the hardware prefetcher keeps up.
    const char* prefetch = nullptr;
    const char* prefetch_end = nullptr;
    const int64_t next_ng = (task + 1) / a.chunks, input_bytes = cg * s.H * s.W * int64_t{sizeof(T)};
    if (input_bytes >= kPrefetchInputBytes && task + 1 < end && next_ng != ng) {
      prefetch = reinterpret_cast<const char*>(static_cast<const T*>(a.input) +
                                               ((next_ng / s.groups) * s.C + (next_ng % s.groups) * cg) * s.H * s.W);
      prefetch_end = prefetch + input_bytes;
    }
    for (int64_t blk = b_lo; blk < b_hi; ++blk) {
      const int64_t k0 = g * kg + blk * kKB;
      const T* w = static_cast<const T*>(a.weight) + k0 * taps;
      const T* bias = a.bias ? static_cast<const T*>(a.bias) + k0 : nullptr;
      T* out = static_cast<T*>(a.out) + (n * s.K + k0) * s.P * s.Q;
      const int64_t wide = s.P * d.Wph;
      for (int64_t j0 = 0; j0 < wide;) {
        // Full tiles, then the plane's tail in the narrowest tile that covers it.
        const int64_t left = wide - j0;
        const int64_t width = left >= kJB ? kJB : left <= 16 ? 16 : left <= 32 ? 32 : kJB;
        if (width == 16) {
          direct_tile<T, kKB, 16>(phases.data(), a.tap_offsets, w, taps, j0, bias, tile, prefetch, prefetch_end);
        } else if (width == 32) {
          direct_tile<T, kKB, 32>(phases.data(), a.tap_offsets, w, taps, j0, bias, tile, prefetch, prefetch_end);
        } else {
          direct_tile<T, kKB, kJB>(phases.data(), a.tap_offsets, w, taps, j0, bias, tile, prefetch, prefetch_end);
        }
        // Copy the tile's wide positions j = p * Wph + q back to output rows, one run per output
        // row it touches, dropping the columns q >= Q.
        const int64_t stop = std::min<int64_t>(j0 + width, wide);
        for (int64_t j = j0; j < stop;) {
          const int64_t p = j / d.Wph, q = j % d.Wph;
          const int64_t run_end = std::min(stop, (p + 1) * d.Wph);
          const int64_t valid = std::min(run_end - j, s.Q - q);
          for (int kb = 0; valid > 0 && kb < kKB; ++kb) {
            copy_row(tile + kb * width + (j - j0), out + (kb * s.P + p) * s.Q + q, valid);
          }
          j = run_end;
        }
        j0 += width;
      }
    }
  }
}

// One copy of the hot loop per instruction set, chosen at run time (isa.h): AVX-512 / AVX2+FMA
// are what make this kernel worth having.
#ifdef CNNOPS_HAS_ISA_VARIANTS
template <int kKB>
CNNOPS_AVX512 void direct_forward_tasks_avx512(
    const DirectTasks& a, int64_t begin, int64_t end) {
  // 32 zmm registers: kKB x kJB / 16 accumulators must leave room for the inputs. With 8 output
  // channels, 48-wide tiles (24 accumulators) run the tap loop faster than 32-wide ones (89% of
  // FMA peak against 69% in isolation; in the kernel, 1.02-1.07x on ResNeXt's layers 2.1 and 3.0
  // at batch 8, 3.1 even), unless the plane ends in a 16-wide tail tile, whose 8 accumulators
  // cannot hide the FMA latency (layer4's 7 x 7 planes: 0.93-0.97x).
  if constexpr (kKB >= 8) {
    const int64_t tail = a.s.P * a.d.Wph % 48;
    if (tail == 0 || tail > 16) return direct_forward_tasks<float, kKB, 48>(a, begin, end);
  }
  direct_forward_tasks<float, kKB, (kKB >= 8 ? 32 : 64)>(a, begin, end);
}
template <int kKB>
__attribute__((target("avx2,fma"))) void direct_forward_tasks_avx2(const DirectTasks& a,
                                                                  int64_t begin, int64_t end) {
  direct_forward_tasks<float, kKB, 32>(a, begin, end);
}

// Channel tiles (AVX-512, float32), for small planes. On a 7 x 7 plane a wide row computes 64
// values for 49 outputs, and the 16-wide tail tile that leaves cannot hide the FMA latency. Here
// the vectors run over 32 output channels instead, and a tile covers 2 output rows x 7 columns:
// 28 accumulators of the 32 zmm registers, and every value computed is an output, bar the
// columns past Q of a row's last tile. Each tap loads two weight vectors, repacked tap-major, and
// broadcasts the tile's 14 input pixels; the finished tile is transposed back to planes.
// ResNeXt-50's layer 4 at batch 8: 1.17-1.27x the wide rows. With 16 channels (layer 3) the
// tiles gained nothing (0.93-1.04x), so blocks are always 32 channels.
constexpr int kChannelBlock = 32, kChannelVectors = 2, kChannelTileRows = 2, kChannelTileCols = 7;

// In place: r[i][j] becomes r[j][i].
CNNOPS_AVX512 __attribute__((always_inline)) inline void transpose_16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// packed[t][k] = weight[k][t] for the 32 filters of one block, 16 x 16 squares at a time.
CNNOPS_AVX512 void pack_channel_block(const float* weight, float* packed, int64_t taps) {
  int64_t t0 = 0;
  for (; t0 + 16 <= taps; t0 += 16) {
    for (int v = 0; v < kChannelVectors; ++v) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(weight + (v * 16 + i) * taps + t0);
      transpose_16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(packed + (t0 + i) * kChannelBlock + v * 16, r[i]);
    }
  }
  for (; t0 < taps; ++t0) {
    for (int k = 0; k < kChannelBlock; ++k) packed[t0 * kChannelBlock + k] = weight[k * taps + t0];
  }
}

// tile[pixel][channel] for output rows [p0, p0 + kRows) x columns [q0, q0 + 7) of one block,
// accumulated over every tap of the group.
template <int kRows>
CNNOPS_AVX512 __attribute__((always_inline)) inline void channel_tile(const float* phases, const DirectTasks& a,
                                                                      const float* weight, const float* bias,
                                                                      int64_t p0, int64_t q0, float* tile) {
  constexpr int kCols = kChannelTileCols, kPixels = kRows * kCols, kV = kChannelVectors;
  const Conv2dShape& s = a.s;
  const int64_t taps = s.channels_per_group() * s.R * s.S, Wph = a.d.Wph;
  const float* src0 = phases + p0 * Wph + q0;
  __m512 acc[kPixels][kV];
  for (int v = 0; v < kV; ++v) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + v * 16) : _mm512_setzero_ps();
    for (int i = 0; i < kPixels; ++i) acc[i][v] = b;
  }
  for (int64_t t = 0; t < taps; ++t) {
    // One pointer stepped down the rows: the pixels of a row are then immediate offsets.
    const float* row = src0 + a.tap_offsets[t];
    __m512 w[kV];
    for (int v = 0; v < kV; ++v) w[v] = _mm512_loadu_ps(weight + t * kChannelBlock + v * 16);
    for (int r = 0; r < kRows; ++r, row += Wph) {
      for (int c = 0; c < kCols; ++c) {
        const __m512 x = _mm512_set1_ps(row[c]);
        for (int v = 0; v < kV; ++v) acc[r * kCols + c][v] = _mm512_fmadd_ps(w[v], x, acc[r * kCols + c][v]);
      }
    }
  }
  for (int i = 0; i < kPixels; ++i) {
    for (int v = 0; v < kV; ++v) _mm512_storeu_ps(tile + i * kChannelBlock + v * 16, acc[i][v]);
  }
}

// Writes a tile to its 32 output planes, `cols` columns of each row. A transpose takes the tile's
// (up to 14) pixels of 16 channels; channel k's pixels of the first row are then lanes [0, 7),
// of the second lanes [7, 14), stored with masks. Not inlined: inside the tile loop's function,
// GCC kept the accumulators in memory.
template <int kRows>
CNNOPS_AVX512 __attribute__((noinline)) void store_channel_tile(const float* tile, const Conv2dShape& s, float* out,
                                                                int64_t p0, int64_t q0, int64_t cols) {
  constexpr int kPixels = kRows * kChannelTileCols;
  static_assert(kPixels <= 16, "one transpose per tile");
  const __mmask16 first = static_cast<__mmask16>((1u << cols) - 1);
  const __m512i second = _mm512_setr_epi32(7, 8, 9, 10, 11, 12, 13, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int v = 0; v < kChannelVectors; ++v) {
    __m512 x[16];
    for (int i = 0; i < 16; ++i) {
      x[i] = i < kPixels ? _mm512_loadu_ps(tile + i * kChannelBlock + v * 16) : _mm512_setzero_ps();
    }
    transpose_16x16(x);
    float* plane = out + (v * 16 * s.P + p0) * s.Q + q0;
    for (int k = 0; k < 16; ++k, plane += s.P * s.Q) {
      _mm512_mask_storeu_ps(plane, first, x[k]);
      if (kRows == 2) _mm512_mask_storeu_ps(plane + s.Q, first, _mm512_permutexvar_ps(second, x[k]));
    }
  }
}

// Output rows [p0, p0 + kRows) of one block, in tiles of 7 columns.
template <int kRows>
CNNOPS_AVX512 __attribute__((always_inline)) inline void channel_rows(const float* phases, const DirectTasks& a,
                                                                      const float* weight, const float* bias,
                                                                      float* out, int64_t p0) {
  alignas(64) float tile[kRows * kChannelTileCols * kChannelBlock];
  for (int64_t q0 = 0; q0 < a.s.Q; q0 += kChannelTileCols) {
    channel_tile<kRows>(phases, a, weight, bias, p0, q0, tile);
    store_channel_tile<kRows>(tile, a.s, out, p0, q0, std::min<int64_t>(kChannelTileCols, a.s.Q - q0));
  }
}

// Tasks are (group, chunk of the group's blocks of 32 output channels), over the whole batch: a
// task repacks its blocks' weights tap-major once, then for each sample builds the group's phases
// and runs the tiles.
CNNOPS_AVX512 void channel_forward_tasks(const DirectTasks& a, int64_t begin, int64_t end) {
  const Conv2dShape& s = a.s;
  const int64_t cg = s.channels_per_group(), kg = s.outputs_per_group(), taps = cg * s.R * s.S;
  const int64_t group_blocks = kg / kChannelBlock;
  const int64_t blocks_per_chunk = (group_blocks + a.chunks - 1) / a.chunks;
  std::vector<float> phases(cg * a.d.channel_stride);  // zero-filled once: see build_group_phases
  std::vector<float> packed(blocks_per_chunk * kChannelBlock * taps);
  const float* input = static_cast<const float*>(a.input);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % a.chunks, g = task / a.chunks;
    const int64_t b_lo = chunk * blocks_per_chunk, b_hi = std::min(group_blocks, b_lo + blocks_per_chunk);
    if (b_lo >= b_hi) continue;
    const int64_t k_lo = g * kg + b_lo * kChannelBlock, k_hi = g * kg + b_hi * kChannelBlock;
    for (int64_t k0 = k_lo; k0 < k_hi; k0 += kChannelBlock) {
      pack_channel_block(static_cast<const float*>(a.weight) + k0 * taps, packed.data() + (k0 - k_lo) * taps, taps);
    }
    for (int64_t n = 0; n < s.N; ++n) {
      build_group_phases(input + (n * s.C + g * cg) * s.H * s.W, phases.data(), cg, s, a.d);
      for (int64_t k0 = k_lo; k0 < k_hi; k0 += kChannelBlock) {
        const float* w = packed.data() + (k0 - k_lo) * taps;
        const float* bias = a.bias ? static_cast<const float*>(a.bias) + k0 : nullptr;
        float* out = static_cast<float*>(a.out) + (n * s.K + k0) * s.P * s.Q;
        int64_t p0 = 0;
        for (; p0 + kChannelTileRows <= s.P; p0 += kChannelTileRows) {
          channel_rows<kChannelTileRows>(phases.data(), a, w, bias, out, p0);
        }
        if (p0 < s.P) channel_rows<1>(phases.data(), a, w, bias, out, p0);  // an odd last row
      }
    }
  }
}

// Channel tiles where they compute no more values than the wide rows: a plane's wide rows are
// P x Wph values, rounded up to whole vectors; its channel tiles are P x Q rounded up to whole
// tiles of 7 columns per row. ResNeXt's 7 x 7 and 14 x 14 planes, not its 28 x 28 or 56 x 56.
bool use_channel_tiles(const Conv2dShape& s, const DirectPlan& d) {
  if (s.outputs_per_group() % kChannelBlock != 0 || !cpu_has_avx512()) return false;
  const int64_t wide = (s.P * d.Wph + 15) / 16 * 16;
  const int64_t tiles = s.P * ((s.Q + kChannelTileCols - 1) / kChannelTileCols * kChannelTileCols);
  return tiles <= wide;
}
#endif

template <int kKB>
void direct_forward_tasks_f32(const DirectTasks& a, int64_t begin, int64_t end) {
#ifdef CNNOPS_HAS_ISA_VARIANTS
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (cpu_has_avx512()) return direct_forward_tasks_avx512<kKB>(a, begin, end);
  if (avx2 && kKB <= 4) return direct_forward_tasks_avx2<kKB>(a, begin, end);  // 16 ymm registers
#endif
  direct_forward_tasks<float, kKB, 32>(a, begin, end);
}

template <typename T, int kKB>
void run_direct_forward(const DirectTasks& a, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    direct_forward_tasks_f32<kKB>(a, begin, end);
  } else {
    direct_forward_tasks<T, kKB, 32>(a, begin, end);
  }
}

// Tap t = (c, r, s) of a group reads phase ((r*dh) % sh, (s*dw) % sw) of channel c, shifted by
// ((r*dh) / sh) rows and ((s*dw) / sw) columns: offsets into the group's polyphase copy.
std::vector<int64_t> direct_tap_offsets(const Conv2dShape& s, const DirectPlan& d) {
  std::vector<int64_t> offsets;
  offsets.reserve(s.channels_per_group() * s.R * s.S);
  for (int64_t c = 0; c < s.channels_per_group(); ++c) {
    for (int64_t r = 0; r < s.R; ++r) {
      for (int64_t t = 0; t < s.S; ++t) {
        const int64_t dy = r * s.dilation_h, dx = t * s.dilation_w;
        const int64_t phase = (dy % s.stride_h) * s.stride_w + dx % s.stride_w;
        offsets.push_back(c * d.channel_stride + phase * d.phase_rows * d.Wph +
                          (dy / s.stride_h) * d.Wph + dx / s.stride_w);
      }
    }
  }
  return offsets;
}

template <typename T, int kKB>
void conv2d_direct_forward_blocked(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::Tensor& out,
                                   const Conv2dShape& s) {
  const DirectPlan d = plan_direct(s);
  const std::vector<int64_t> tap_offsets = direct_tap_offsets(s, d);
  at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  // Enough tasks to keep every thread busy even at batch 1 with few groups; a chunk rebuilds its
  // group's phases, a small cost next to the tiles of a dense group.
  const int64_t group_blocks = s.outputs_per_group() / kKB;
  const int64_t chunks = std::clamp<int64_t>(
      (4 * at::get_num_threads() + s.N * s.groups - 1) / std::max<int64_t>(1, s.N * s.groups), 1, group_blocks);
  // The weights are read in place: a tile's kKB filters are kKB streams walked in step, which the
  // prefetcher follows; repacking them would cost a copy of the whole weight on every call.
  const DirectTasks tasks{input.const_data_ptr<T>(), chunks, weight.const_data_ptr<T>(),
                          bias_c.defined() ? bias_c.const_data_ptr<T>() : nullptr,
                          out.data_ptr<T>(), tap_offsets.data(), s, d};
  at::parallel_for(0, s.N * s.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    run_direct_forward<T, kKB>(tasks, begin, end);
  });
}

#ifdef CNNOPS_HAS_ISA_VARIANTS
void conv2d_channel_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::Tensor& out, const Conv2dShape& s, const DirectPlan& d) {
  const std::vector<int64_t> tap_offsets = direct_tap_offsets(s, d);
  at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t group_blocks = s.outputs_per_group() / kChannelBlock;
  const int64_t chunks =
      std::clamp<int64_t>((4 * at::get_num_threads() + s.groups - 1) / s.groups, 1, group_blocks);
  const DirectTasks tasks{input.const_data_ptr<float>(), chunks, weight.const_data_ptr<float>(),
                          bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr,
                          out.data_ptr<float>(), tap_offsets.data(), s, d};
  at::parallel_for(0, s.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    channel_forward_tasks(tasks, begin, end);
  });
}
#endif

template <typename T>
void conv2d_direct_forward(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::Tensor& out,
                           const Conv2dShape& s) {
  const int64_t kg = s.outputs_per_group();
#ifdef CNNOPS_HAS_ISA_VARIANTS
  if constexpr (std::is_same_v<T, float>) {
    // Channel tiles read at most 6 columns past a row's last output.
    const DirectPlan d = plan_direct(s, kChannelTileCols);
    if (use_channel_tiles(s, d)) return conv2d_channel_forward(input, weight, bias, out, s, d);
  }
#endif
  if (kg % 8 == 0) {
    conv2d_direct_forward_blocked<T, 8>(input, weight, bias, out, s);
  } else if (kg % 4 == 0) {
    conv2d_direct_forward_blocked<T, 4>(input, weight, bias, out, s);
  } else if (kg % 2 == 0) {
    conv2d_direct_forward_blocked<T, 2>(input, weight, bias, out, s);
  } else {
    conv2d_direct_forward_blocked<T, 1>(input, weight, bias, out, s);
  }
}

// ---------------------------------------------------------------------------------------------
// depthwise, NHWC.
//
// A depthwise layer (groups == C, one filter per channel) in channels_last finds, at every input
// pixel a tap reads, the pixel's channels side by side: the vectors run over channels, and each
// tap is one multiply-add of an input vector by the tap's weights for those channels (the weight
// repacked as (R * S, C)). The direct kernel works in NCHW, and converting a channels_last layer
// to it and back made MobileNetV2's depthwise layers 4-7x slower (0.16-0.25x torch, against
// 1.07-1.16x here). One filter per channel only; a channel multiplier goes through NCHW.

// Output rows (n, p) in [begin, end), every column and channel; kBytes: the vector width. Pixel
// by pixel, all its channels: computing 2 or 4 pixels at once, to load each tap's weights once
// for them, was slower (0.80-0.85x on MobileNetV2's layers).
template <typename T, int kBytes>
__attribute__((always_inline)) inline void depthwise_nhwc_rows(const T* in, const T* weight, const T* bias, T* out,
                                                               const Conv2dShape& s, int64_t begin, int64_t end) {
  using V = typename Vector<T, kBytes>::type;
  constexpr int64_t kLanes = kBytes / sizeof(T), kVecs = 4, kBlock = kVecs * kLanes;
  const int64_t C = s.C;
  // Taps [lo, hi) of a kernel dimension that read inside the input for output coordinate o.
  auto taps = [](int64_t o, int64_t kernel, int64_t in_size, int64_t stride, int64_t pad, int64_t dilation) {
    int64_t lo = 0, hi = kernel;
    while (lo < hi && conv_input_coord(o, lo, stride, pad, dilation) < 0) ++lo;
    while (hi > lo && conv_input_coord(o, hi - 1, stride, pad, dilation) >= in_size) --hi;
    return std::pair<int64_t, int64_t>{lo, hi};
  };
  // Output columns [inner_lo, inner_hi) read inside the input through every tap.
  const int64_t inner_lo = std::min(s.Q, conv_first_valid_output(0, s.stride_w, s.pad_w, s.dilation_w));
  const int64_t inner_hi =
      std::max(inner_lo, conv_last_valid_output(s.S - 1, s.W, s.Q, s.stride_w, s.pad_w, s.dilation_w));
  for (int64_t np = begin; np < end; ++np) {
    const int64_t n = np / s.P, p = np % s.P;
    const auto [r_lo, r_hi] = taps(p, s.R, s.H, s.stride_h, s.pad_h, s.dilation_h);
    // Channels [c0, c0 + kN * kLanes) of output pixel (p, q), over taps [t_lo, t_hi) of a row.
    auto vectors = [&](auto vecs, int64_t q, int64_t c0, int64_t t_lo, int64_t t_hi) {
      constexpr int kN = decltype(vecs)::value;
      V acc[kN];
      for (int v = 0; v < kN; ++v) {
        acc[v] = V{};
        if (bias) std::memcpy(&acc[v], bias + c0 + v * kLanes, sizeof(V));
      }
      for (int64_t r = r_lo; r < r_hi; ++r) {
        const int64_t y = conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h);
        const T* row = in + (n * s.H + y) * s.W * C + c0;
        for (int64_t t = t_lo; t < t_hi; ++t) {
          const T* x = row + conv_input_coord(q, t, s.stride_w, s.pad_w, s.dilation_w) * C;
          const T* w = weight + (r * s.S + t) * C + c0;
          for (int v = 0; v < kN; ++v) {
            V xv, wv;
            std::memcpy(&xv, x + v * kLanes, sizeof(V));
            std::memcpy(&wv, w + v * kLanes, sizeof(V));
            acc[v] += xv * wv;
          }
        }
      }
      T* o = out + ((n * s.P + p) * s.Q + q) * C + c0;
      for (int v = 0; v < kN; ++v) std::memcpy(o + v * kLanes, &acc[v], sizeof(V));
    };
    auto pixel = [&](int64_t q, int64_t t_lo, int64_t t_hi) {
      int64_t c0 = 0;
      for (; c0 + kBlock <= C; c0 += kBlock) vectors(std::integral_constant<int, kVecs>{}, q, c0, t_lo, t_hi);
      for (; c0 + kLanes <= C; c0 += kLanes) vectors(std::integral_constant<int, 1>{}, q, c0, t_lo, t_hi);
      for (; c0 < C; ++c0) {  // channels past the last whole vector
        T acc = bias ? bias[c0] : T(0);
        for (int64_t r = r_lo; r < r_hi; ++r) {
          const int64_t y = conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h);
          for (int64_t t = t_lo; t < t_hi; ++t) {
            const int64_t x = conv_input_coord(q, t, s.stride_w, s.pad_w, s.dilation_w);
            acc += in[((n * s.H + y) * s.W + x) * C + c0] * weight[(r * s.S + t) * C + c0];
          }
        }
        out[((n * s.P + p) * s.Q + q) * C + c0] = acc;
      }
    };
    for (int64_t q = 0; q < s.Q; ++q) {
      if (q >= inner_lo && q < inner_hi) {
        pixel(q, 0, s.S);
      } else {
        const auto [t_lo, t_hi] = taps(q, s.S, s.W, s.stride_w, s.pad_w, s.dilation_w);
        pixel(q, t_lo, t_hi);
      }
    }
  }
}

template <typename T>
void depthwise_nhwc_rows_baseline(const T* in, const T* weight, const T* bias, T* out, const Conv2dShape& s,
                                  int64_t begin, int64_t end) {
  depthwise_nhwc_rows<T, 16>(in, weight, bias, out, s, begin, end);
}

#ifdef CNNOPS_HAS_ISA_VARIANTS
template <typename T>
CNNOPS_AVX512 void depthwise_nhwc_rows_avx512(const T* in, const T* weight, const T* bias, T* out,
                                              const Conv2dShape& s, int64_t begin, int64_t end) {
  depthwise_nhwc_rows<T, 64>(in, weight, bias, out, s, begin, end);
}
#endif

// input: channels_last; out: channels_last, of the layer's output shape. One filter per channel.
template <typename T>
void conv2d_depthwise_nhwc_forward(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::Tensor& out, const Conv2dShape& s) {
  const at::Tensor packed = weight.reshape({s.C, s.R * s.S}).t().contiguous();  // (R * S, C)
  const at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const T* in = input.const_data_ptr<T>();
  const T* w = packed.const_data_ptr<T>();
  const T* b = bias_c.defined() ? bias_c.const_data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  auto rows = &depthwise_nhwc_rows_baseline<T>;
#ifdef CNNOPS_HAS_ISA_VARIANTS
  if (cpu_has_avx512()) rows = &depthwise_nhwc_rows_avx512<T>;
#endif
  // Rows of about 16K multiply-adds per task at least.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, s.Q * s.C * s.R * s.S));
  at::parallel_for(0, s.N * s.P, grain, [&](int64_t begin, int64_t end) { rows(in, w, b, o, s, begin, end); });
}

// The backward passes in NHWC, vectorised over channels the same way. Grad input is a gather:
// input pixel (y, x) sums grad output pixel (p, q) times tap (r, s)'s weights over the taps whose
// read lands on it (conv_output_coord_for_input), so rows of it are independent tasks, for any
// stride. Grad weight sums grad output times input over every output pixel: each thread adds
// into its own (R * S, C) copy, and the copies are summed at the end.
template <typename T, int kBytes>
__attribute__((always_inline)) inline void depthwise_nhwc_grad_input_rows(const T* go, const T* weight, T* gi,
                                                                          const Conv2dShape& s, int64_t begin,
                                                                          int64_t end) {
  using V = typename Vector<T, kBytes>::type;
  constexpr int64_t kLanes = kBytes / sizeof(T);
  const int64_t C = s.C;
  for (int64_t ny = begin; ny < end; ++ny) {
    const int64_t n = ny / s.H, y = ny % s.H;
    for (int64_t x = 0; x < s.W; ++x) {
      T* g = gi + ((n * s.H + y) * s.W + x) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        const int64_t lanes = std::min(kLanes, C - c0);
        V acc{};
        T tail[kLanes] = {};
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t p = conv_output_coord_for_input(y, r, s.stride_h, s.pad_h, s.dilation_h, s.P);
          if (p < 0) continue;
          for (int64_t t = 0; t < s.S; ++t) {
            const int64_t q = conv_output_coord_for_input(x, t, s.stride_w, s.pad_w, s.dilation_w, s.Q);
            if (q < 0) continue;
            const T* o = go + ((n * s.P + p) * s.Q + q) * C + c0;
            const T* w = weight + (r * s.S + t) * C + c0;
            if (lanes == kLanes) {
              V ov, wv;
              std::memcpy(&ov, o, sizeof(V));
              std::memcpy(&wv, w, sizeof(V));
              acc += ov * wv;
            } else {
              for (int64_t l = 0; l < lanes; ++l) tail[l] += o[l] * w[l];
            }
          }
        }
        if (lanes == kLanes) {
          std::memcpy(g + c0, &acc, sizeof(V));
        } else {
          for (int64_t l = 0; l < lanes; ++l) g[c0 + l] = tail[l];
        }
      }
    }
  }
}

// Adds into gw (R * S, C) the grad weight over output rows (n, p) in [begin, end).
template <typename T, int kBytes>
__attribute__((always_inline)) inline void depthwise_nhwc_grad_weight_rows(const T* go, const T* in, T* gw,
                                                                           const Conv2dShape& s, int64_t begin,
                                                                           int64_t end) {
  using V = typename Vector<T, kBytes>::type;
  constexpr int64_t kLanes = kBytes / sizeof(T);
  const int64_t C = s.C;
  for (int64_t np = begin; np < end; ++np) {
    const int64_t n = np / s.P, p = np % s.P;
    for (int64_t r = 0; r < s.R; ++r) {
      const int64_t y = conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h);
      if (y < 0 || y >= s.H) continue;
      for (int64_t t = 0; t < s.S; ++t) {
        // Output columns [q_lo, q_hi) read inside the input through tap t.
        const int64_t q_lo = std::min(s.Q, conv_first_valid_output(t, s.stride_w, s.pad_w, s.dilation_w));
        const int64_t q_hi = conv_last_valid_output(t, s.W, s.Q, s.stride_w, s.pad_w, s.dilation_w);
        T* g = gw + (r * s.S + t) * C;
        for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
          const int64_t lanes = std::min(kLanes, C - c0);
          V acc{};
          for (int64_t q = q_lo; q < q_hi; ++q) {
            const T* o = go + ((n * s.P + p) * s.Q + q) * C + c0;
            const T* x = in + ((n * s.H + y) * s.W + conv_input_coord(q, t, s.stride_w, s.pad_w, s.dilation_w)) * C + c0;
            if (lanes == kLanes) {
              V ov, xv;
              std::memcpy(&ov, o, sizeof(V));
              std::memcpy(&xv, x, sizeof(V));
              acc += ov * xv;
            } else {
              for (int64_t l = 0; l < lanes; ++l) g[c0 + l] += o[l] * x[l];
            }
          }
          if (lanes == kLanes) {
            V sum;
            std::memcpy(&sum, g + c0, sizeof(V));
            sum += acc;
            std::memcpy(g + c0, &sum, sizeof(V));
          }
        }
      }
    }
  }
}

template <typename T>
void depthwise_nhwc_grad_input_baseline(const T* go, const T* w, T* gi, const Conv2dShape& s, int64_t b, int64_t e) {
  depthwise_nhwc_grad_input_rows<T, 16>(go, w, gi, s, b, e);
}
template <typename T>
void depthwise_nhwc_grad_weight_baseline(const T* go, const T* in, T* gw, const Conv2dShape& s, int64_t b,
                                         int64_t e) {
  depthwise_nhwc_grad_weight_rows<T, 16>(go, in, gw, s, b, e);
}
#ifdef CNNOPS_HAS_ISA_VARIANTS
template <typename T>
CNNOPS_AVX512 void depthwise_nhwc_grad_input_avx512(const T* go, const T* w, T* gi, const Conv2dShape& s, int64_t b,
                                                    int64_t e) {
  depthwise_nhwc_grad_input_rows<T, 64>(go, w, gi, s, b, e);
}
template <typename T>
CNNOPS_AVX512 void depthwise_nhwc_grad_weight_avx512(const T* go, const T* in, T* gw, const Conv2dShape& s,
                                                     int64_t b, int64_t e) {
  depthwise_nhwc_grad_weight_rows<T, 64>(go, in, gw, s, b, e);
}
#endif

// grad_output and input channels_last; grad_in (channels_last) and grad_w ((C, 1, R, S),
// contiguous) are written where defined, input read only for grad_w. One filter per channel.
template <typename T>
void conv2d_depthwise_nhwc_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                    at::Tensor& grad_in, at::Tensor& grad_w, const Conv2dShape& s) {
  const T* go = grad_output.const_data_ptr<T>();
  auto grad_input_rows = &depthwise_nhwc_grad_input_baseline<T>;
  auto grad_weight_rows = &depthwise_nhwc_grad_weight_baseline<T>;
#ifdef CNNOPS_HAS_ISA_VARIANTS
  if (cpu_has_avx512()) {
    grad_input_rows = &depthwise_nhwc_grad_input_avx512<T>;
    grad_weight_rows = &depthwise_nhwc_grad_weight_avx512<T>;
  }
#endif
  const int64_t taps_per_row = std::max<int64_t>(1, s.W * s.C * s.R * s.S);
  if (grad_in.defined()) {
    const at::Tensor packed = weight.reshape({s.C, s.R * s.S}).t().contiguous();  // (R * S, C)
    const T* w = packed.const_data_ptr<T>();
    T* gi = grad_in.data_ptr<T>();
    at::parallel_for(0, s.N * s.H, std::max<int64_t>(1, (int64_t{1} << 14) / taps_per_row),
                     [&](int64_t begin, int64_t end) { grad_input_rows(go, w, gi, s, begin, end); });
  }
  if (grad_w.defined()) {
    const int64_t threads = at::get_num_threads();
    at::Tensor partial = at::zeros({threads, s.R * s.S, s.C}, grad_w.options());
    const T* in = input.const_data_ptr<T>();
    at::parallel_for(0, s.N * s.P, std::max<int64_t>(1, (int64_t{1} << 14) / taps_per_row),
                     [&](int64_t begin, int64_t end) {
                       T* gw = partial[at::get_thread_num()].data_ptr<T>();
                       grad_weight_rows(go, in, gw, s, begin, end);
                     });
    grad_w.copy_(partial.sum(0).t().reshape(grad_w.sizes()));
  }
}

// Grad weight of a grouped convolution on the forward pass's polyphase copies. Weight tap t of
// output channel k is the dot product, over the batch and the output, of k's grad output with the
// input that tap reads: in the wide layout that is phases[tap_offsets[t] + j] against grad output
// at wide position j, whose padding columns are zero. A task owns a group: it copies the group's
// input (as phases) and grad output (as wide rows) for the whole batch, then runs register tiles
// of kKB output channels x kT taps, each accumulating 16-value vectors over every sample.
struct GradWeightTasks {
  const void* input;        // NCHW-contiguous
  const void* grad_output;  // NCHW-contiguous
  void* grad_weight;        // (K, C/groups, R, S), contiguous
  const int64_t* tap_offsets;
  Conv2dShape s;
  DirectPlan d;
};

template <typename T, int kKB, int kT>
__attribute__((always_inline)) inline void grad_weight_tile(const T* phases, int64_t sample_phases,
                                                            const T* wide_go, int64_t sample_go,
                                                            int64_t wide, int64_t samples,
                                                            const int64_t* tap_offsets, T* gw,
                                                            int64_t taps) {
  typedef T vec __attribute__((vector_size(64)));
  constexpr int kLanes = 64 / sizeof(T);
  vec acc[kKB][kT];
  for (int kb = 0; kb < kKB; ++kb) {
    for (int t = 0; t < kT; ++t) acc[kb][t] = vec{};
  }
  for (int64_t n = 0; n < samples; ++n) {
    const T* x = phases + n * sample_phases;
    const T* go = wide_go + n * sample_go;
    for (int64_t j = 0; j < wide; j += kLanes) {
      vec g[kKB], v[kT];
      for (int kb = 0; kb < kKB; ++kb) std::memcpy(&g[kb], go + kb * wide + j, sizeof(vec));
      for (int t = 0; t < kT; ++t) std::memcpy(&v[t], x + tap_offsets[t] + j, sizeof(vec));
      for (int kb = 0; kb < kKB; ++kb) {
        for (int t = 0; t < kT; ++t) acc[kb][t] += g[kb] * v[t];
      }
    }
  }
  for (int kb = 0; kb < kKB; ++kb) {
    for (int t = 0; t < kT; ++t) {
      T sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += acc[kb][t][l];
      gw[kb * taps + t] = sum;
    }
  }
}

template <typename T, int kKB, int kT>
__attribute__((always_inline)) inline void grad_weight_tasks(const GradWeightTasks& a, int64_t begin,
                                                             int64_t end) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  const Conv2dShape& s = a.s;
  const DirectPlan& d = a.d;
  const int64_t cg = s.channels_per_group(), kg = s.outputs_per_group(), taps = cg * s.R * s.S;
  // Wide positions j = p * Wph + q, rounded up to whole vectors; q >= Q and the tail stay zero.
  const int64_t wide = (s.P * d.Wph + kLanes - 1) / kLanes * kLanes;
  const int64_t sample_phases = cg * d.channel_stride, sample_go = kg * wide;
  std::vector<T> phases(s.N * sample_phases);  // zero-filled once: see build_group_phases
  std::vector<T> wide_go(s.N * sample_go);      // likewise: only the outputs are rewritten
  for (int64_t g = begin; g < end; ++g) {
    for (int64_t n = 0; n < s.N; ++n) {
      build_group_phases<T>(static_cast<const T*>(a.input) + (n * s.C + g * cg) * s.H * s.W,
                            phases.data() + n * sample_phases, cg, s, d);
      const T* go = static_cast<const T*>(a.grad_output) + (n * s.K + g * kg) * s.P * s.Q;
      for (int64_t k = 0; k < kg; ++k) {
        for (int64_t p = 0; p < s.P; ++p) {
          copy_row(go + (k * s.P + p) * s.Q, wide_go.data() + n * sample_go + k * wide + p * d.Wph, s.Q);
        }
      }
    }
    T* gw = static_cast<T*>(a.grad_weight) + g * kg * taps;
    for (int64_t k0 = 0; k0 < kg; k0 += kKB) {
      const T* go = wide_go.data() + k0 * wide;
      int64_t t0 = 0;
      for (; t0 + kT <= taps; t0 += kT) {
        grad_weight_tile<T, kKB, kT>(phases.data(), sample_phases, go, sample_go, wide, s.N,
                                     a.tap_offsets + t0, gw + k0 * taps + t0, taps);
      }
      for (; t0 < taps; ++t0) {
        grad_weight_tile<T, kKB, 1>(phases.data(), sample_phases, go, sample_go, wide, s.N,
                                    a.tap_offsets + t0, gw + k0 * taps + t0, taps);
      }
    }
  }
}

#ifdef CNNOPS_HAS_ISA_VARIANTS
template <int kKB, int kT>
CNNOPS_AVX512 void grad_weight_tasks_avx512(
    const GradWeightTasks& a, int64_t begin, int64_t end) {
  grad_weight_tasks<float, kKB, kT>(a, begin, end);
}
#endif

// kKB x kT = 24 accumulators: 4 output channels x 6 taps, or 1 x 12 for depthwise layers.
template <typename T, int kKB, int kT>
void run_grad_weight(const GradWeightTasks& a, int64_t begin, int64_t end) {
#ifdef CNNOPS_HAS_ISA_VARIANTS
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx512()) return grad_weight_tasks_avx512<kKB, kT>(a, begin, end);
  }
#endif
  grad_weight_tasks<T, kKB, kT>(a, begin, end);
}

// Whether the grouped grad-weight kernel serves: enough groups to share among the threads (a
// task owns a group), on a CPU with AVX-512 where it was measured. Forward + backward with it,
// against torch (python -m bench --backward, 2 threads): MobileNetV2 depthwise 1.05 -> 1.30 at
// batch 1 and 0.89 -> 1.09 at batch 8, ResNeXt-50 grouped 0.93 -> 1.05 and 0.79 -> 0.90. Its
// stride-2 layers at batch 8 lost some (0.55 -> 0.45 at layer3.0): the per-group copy of the
// batch's input is 4x the output there. Restricting it to stride 1 measured worse on both sets.
bool use_grouped_grad_weight(const Conv2dShape& s) {
#ifdef CNNOPS_HAS_ISA_VARIANTS
  return cpu_has_avx512() && s.groups >= 2 * at::get_num_threads();
#else
  (void)s;
  return false;
#endif
}

template <typename T>
void conv2d_grouped_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                at::Tensor& grad_weight, const Conv2dShape& s) {
  const DirectPlan d = plan_direct(s);
  const std::vector<int64_t> tap_offsets = direct_tap_offsets(s, d);
  const GradWeightTasks tasks{input.const_data_ptr<T>(), grad_output.const_data_ptr<T>(),
                              grad_weight.data_ptr<T>(), tap_offsets.data(), s, d};
  const bool four = s.outputs_per_group() % 4 == 0;
  at::parallel_for(0, s.groups, 1, [&](int64_t begin, int64_t end) {
    if (four) {
      run_grad_weight<T, 4, 6>(tasks, begin, end);
    } else {
      run_grad_weight<T, 1, 12>(tasks, begin, end);
    }
  });
}

// Grad input plane (n, c) receives every output plane of its group, scattered back through each
// tap: the mirror of the forward loop, race-free because a task owns its plane.
template <typename T>
void conv2d_direct_grad_input(const T* go, const T* w, T* gi, const Conv2dShape& s) {
  const int64_t cg = s.channels_per_group(), kg = s.outputs_per_group();
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.C, ci = task % s.C, g = ci / cg, c = ci % cg;
      T* plane = gi + task * s.H * s.W;
      for (int64_t k = g * kg; k < (g + 1) * kg; ++k) {
        const T* o = go + (n * s.K + k) * s.P * s.Q;
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t p_lo = conv_first_valid_output(r, s.stride_h, s.pad_h, s.dilation_h);
          const int64_t p_hi = conv_last_valid_output(r, s.H, s.P, s.stride_h, s.pad_h, s.dilation_h);
          for (int64_t tap_s = 0; tap_s < s.S; ++tap_s) {
            const T wv = w[((k * cg + c) * s.R + r) * s.S + tap_s];
            const int64_t q_lo = conv_first_valid_output(tap_s, s.stride_w, s.pad_w, s.dilation_w);
            const int64_t q_hi = conv_last_valid_output(tap_s, s.W, s.Q, s.stride_w, s.pad_w, s.dilation_w);
            const int64_t w0 = conv_input_coord(0, tap_s, s.stride_w, s.pad_w, s.dilation_w);
            for (int64_t p = p_lo; p < p_hi; ++p) {
              T* dst = plane + conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h) * s.W + w0;
              const T* src = o + p * s.Q;
              if (s.stride_w == 1) {
                for (int64_t q = q_lo; q < q_hi; ++q) dst[q] += wv * src[q];
              } else {
                for (int64_t q = q_lo; q < q_hi; ++q) dst[q * s.stride_w] += wv * src[q];
              }
            }
          }
        }
      }
    }
  });
}

// Each task owns one (k, c) filter and reduces its R x S taps over the batch and the output.
template <typename T>
void conv2d_direct_grad_weight(const T* go, const T* in, T* gw, const Conv2dShape& s) {
  const int64_t cg = s.channels_per_group(), kg = s.outputs_per_group();
  at::parallel_for(0, s.K * cg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / cg, c = task % cg, g = k / kg;
      for (int64_t r = 0; r < s.R; ++r) {
        const int64_t p_lo = conv_first_valid_output(r, s.stride_h, s.pad_h, s.dilation_h);
        const int64_t p_hi = conv_last_valid_output(r, s.H, s.P, s.stride_h, s.pad_h, s.dilation_h);
        for (int64_t tap_s = 0; tap_s < s.S; ++tap_s) {
          const int64_t q_lo = conv_first_valid_output(tap_s, s.stride_w, s.pad_w, s.dilation_w);
          const int64_t q_hi = conv_last_valid_output(tap_s, s.W, s.Q, s.stride_w, s.pad_w, s.dilation_w);
          const int64_t w0 = conv_input_coord(0, tap_s, s.stride_w, s.pad_w, s.dilation_w);
          T acc = 0;
          for (int64_t n = 0; n < s.N; ++n) {
            const T* plane = in + (n * s.C + g * cg + c) * s.H * s.W;
            const T* o = go + (n * s.K + k) * s.P * s.Q;
            for (int64_t p = p_lo; p < p_hi; ++p) {
              const T* src = plane + conv_input_coord(p, r, s.stride_h, s.pad_h, s.dilation_h) * s.W + w0;
              const T* og = o + p * s.Q;
              for (int64_t q = q_lo; q < q_hi; ++q) acc += og[q] * src[q * s.stride_w];
            }
          }
          gw[(task * s.R + r) * s.S + tap_s] = acc;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------

template <typename T>
void conv2d_grad_bias(const at::Tensor& grad_out, at::Tensor& grad_bias, const Conv2dShape& s,
                      bool channels_last) {
  const T* go = grad_out.const_data_ptr<T>();
  T* gb = grad_bias.data_ptr<T>();
  const int64_t pixels = s.P * s.Q;
  at::parallel_for(0, s.K, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      T acc = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        if (channels_last) {
          const T* o = go + n * pixels * s.K + k;
          for (int64_t i = 0; i < pixels; ++i) acc += o[i * s.K];
        } else {
          const T* o = go + (n * s.K + k) * pixels;
          for (int64_t i = 0; i < pixels; ++i) acc += o[i];
        }
      }
      gb[k] = acc;
    }
  });
}

// The memory format im2col computes in. NCHW gives one GEMM per sample with P*Q columns, which
// is too thin for the BLAS when the image is small (ResNet's 14x14 and 7x7 stages) and the batch
// is not one; NHWC puts the whole batch's pixels in one GEMM. Converting the input and output is
// cheap next to those GEMMs.
at::MemoryFormat im2col_work_format(const Conv2dShape& s, at::MemoryFormat fmt) {
  constexpr int64_t kThinGemmColumns = 256;  // measured: 28x28 (784) is faster per sample in NCHW
  // A 1x1 layer has no column matrix to build, so NCHW's per-sample GEMMs pay only their
  // thinness, less than the two layout copies until 7x7: ResNet-50's 14x14 1x1 layers at batch 8
  // took 2.3-2.5 ms in NCHW against 2.8-3.0 ms through NHWC, its 7x7 ones 3.3-3.7 against
  // 2.5-2.7 ms (2 threads); their backward passes (both gradients) 2.8-6.1 ms against 3.5-9.2 ms.
  constexpr int64_t kThinPointwiseColumns = 128;
  const int64_t thin = is_pointwise(s) ? kThinPointwiseColumns : kThinGemmColumns;
  if (fmt == at::MemoryFormat::Contiguous && s.N > 1 && s.P * s.Q < thin) {
    return at::MemoryFormat::ChannelsLast;
  }
  return fmt;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "conv2d (cpu backend): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "conv2d (cpu backend): ", name, " must be float32 or float64, got ", t.scalar_type());
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      c10::string_view algo) {
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  const Conv2dShape s = conv2d_shape(input, weight, stride, padding, dilation, groups);
  check_conv2d_bias(bias, input, s);
  check_conv2d_algo(algo, {"auto", "direct", "im2col", "depthwise"}, "cpu");
  check_conv2d_depthwise_algo(algo, s);
  // algo="auto": a grouped convolution has too few channels per group for a GEMM to pay for
  // im2col's column buffer (R*S times the input, written and read back), so it runs direct, which
  // reads the input once. So does a dense layer with few input channels (a network's stem: 3
  // channels in, 7x7 or 3x3): its GEMM is as thin as its column matrix is large, and direct
  // measured 1.1-1.6x faster up to 16 channels (ResNet's 7x7 stem at batch 1 and 8, MobileNet's
  // 3x3 stems, 1 thread, NCHW). Other dense convolutions are GEMM-shaped and go to the BLAS through
  // im2col, as do all 1x1 layers, whose input is their column matrix.
  // A depthwise layer runs the depthwise kernels: in channels_last the NHWC one, in NCHW the
  // direct kernel, whose tiles are one channel's there.
  constexpr int64_t kMaxDirectDenseChannels = 16;
  const at::MemoryFormat fmt = conv2d_memory_format(input);
  // (In NCHW only: direct computes in NCHW, and a channels_last stem would pay two layout copies.)
  const bool dense_direct = s.C <= kMaxDirectDenseChannels && !is_pointwise(s) &&
                            fmt == at::MemoryFormat::Contiguous;
  const bool use_im2col = algo == "im2col" || (algo == "auto" && s.groups == 1 && !dense_direct);
  const bool depthwise_nhwc = (algo == "auto" || algo == "depthwise") && is_depthwise(s) && s.K == s.C &&
                              fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({s.N, s.K, s.P, s.Q}, input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_cpu", [&] {
    if (depthwise_nhwc) {
      conv2d_depthwise_nhwc_forward<scalar_t>(input.contiguous(fmt), weight.contiguous(), bias, out, s);
    } else if (use_im2col) {
      const at::MemoryFormat work = im2col_work_format(s, fmt);
      at::Tensor result = work == fmt ? out : at::empty_like(out, out.options().memory_format(work));
      // The weight goes as it is: the im2col paths pack it into their own layout, which for a
      // channels_last model's weights (K, R, S, C) is a copy-free permute.
      conv2d_im2col_forward<scalar_t>(input.contiguous(work), weight, bias, result, s,
                                      work == at::MemoryFormat::ChannelsLast);
      if (!result.is_same(out)) out.copy_(result);
    } else {
      at::Tensor out_nchw = out.contiguous();
      conv2d_direct_forward<scalar_t>(input.contiguous(), weight.contiguous(), bias, out_nchw, s);
      if (!out_nchw.is_same(out)) out.copy_(out_nchw);
    }
  });
  return out;
}

// At stride 1, grad input is the correlation of grad output with the spatially flipped weight,
// input and output channels exchanged within each group, padded by dilation * (R - 1) - padding.
// For a grouped layer the direct forward kernel computes that as fast as im2col's backward GEMMs
// and col2im or up to 6x faster (ResNeXt-50 and MobileNetV2 depthwise layers, batch 1 and 8).
bool grad_input_is_a_forward_conv(const Conv2dShape& s) {
  return s.groups > 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.dilation_h * (s.R - 1) >= s.pad_h && s.dilation_w * (s.S - 1) >= s.pad_w;
}

at::Tensor grad_input_by_forward_conv(const at::Tensor& grad_output, const at::Tensor& weight,
                                      const Conv2dShape& s) {
  const int64_t kg = s.outputs_per_group(), cg = s.channels_per_group();
  const at::Tensor flipped = weight.view({s.groups, kg, cg, s.R, s.S})
                                 .transpose(1, 2)
                                 .flip({3, 4})
                                 .reshape({s.C, kg, s.R, s.S});
  const std::vector<int64_t> padding{s.dilation_h * (s.R - 1) - s.pad_h, s.dilation_w * (s.S - 1) - s.pad_w};
  const std::vector<int64_t> dilation{s.dilation_h, s.dilation_w};
  // "auto": the direct kernel, or for a channels_last depthwise layer the NHWC one.
  return conv2d_cpu(grad_output, flipped, std::nullopt, {1, 1}, padding, dilation, s.groups, "auto");
}

// How grad input is computed; the choices for algo="auto" are explained in conv2d_backward_cpu.
enum class GradInputPath { by_forward_conv, depthwise_nhwc, im2col, direct };

// A channels_last depthwise layer with one filter per channel: its backward stays in NHWC.
bool backward_in_nhwc(const Conv2dShape& s, at::MemoryFormat fmt, c10::string_view algo) {
  return (algo == "auto" || algo == "depthwise") && is_depthwise(s) && s.K == s.C &&
         fmt == at::MemoryFormat::ChannelsLast;
}

bool backward_by_im2col(const Conv2dShape& s, c10::string_view algo) {
  return algo == "im2col" || ((algo == "auto" || algo == "depthwise") && s.channels_per_group() > 1);
}

GradInputPath grad_input_path(const Conv2dShape& s, at::MemoryFormat fmt, c10::string_view algo) {
  if ((algo == "auto" || algo == "depthwise") && grad_input_is_a_forward_conv(s)) {
    return GradInputPath::by_forward_conv;
  }
  if (backward_in_nhwc(s, fmt, algo)) return GradInputPath::depthwise_nhwc;
  return backward_by_im2col(s, algo) ? GradInputPath::im2col : GradInputPath::direct;
}

// conv2d's grad input, (N, C, H, W) in `fmt`, from the grad output (N, K, P, Q) and the weight:
// the geometry comes from `s`, not from an input tensor, so that conv_transpose2d (whose output
// this is) needs none. Arguments are checked by the callers.
at::Tensor conv2d_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Conv2dShape& s, at::MemoryFormat fmt, c10::string_view algo) {
  const GradInputPath path = grad_input_path(s, fmt, algo);
  if (path == GradInputPath::by_forward_conv && s.N > 0) {
    return grad_input_by_forward_conv(grad_output, weight, s).contiguous(fmt);
  }
  // The other paths add into grad input; the NHWC depthwise gather writes every element of it.
  at::Tensor grad_in = at::empty({s.N, s.C, s.H, s.W}, weight.options().memory_format(fmt));
  if (path != GradInputPath::depthwise_nhwc) grad_in.zero_();
  if (s.N == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "conv2d_grad_input_cpu", [&] {
    at::Tensor no_grad_w;
    if (path == GradInputPath::depthwise_nhwc) {
      conv2d_depthwise_nhwc_backward<scalar_t>(grad_output.contiguous(fmt), at::Tensor(), weight.contiguous(),
                                               grad_in, no_grad_w, s);
    } else if (path == GradInputPath::im2col) {
      const at::MemoryFormat work = im2col_work_format(s, fmt);
      at::Tensor gi = work == fmt ? grad_in : at::zeros_like(grad_in, grad_in.options().memory_format(work));
      conv2d_im2col_backward<scalar_t>(grad_output.contiguous(work), at::Tensor(), weight.contiguous(), gi,
                                       no_grad_w, s, work == at::MemoryFormat::ChannelsLast);
      if (!gi.is_same(grad_in)) grad_in.copy_(gi);
    } else {
      at::Tensor gi = grad_in.contiguous();
      conv2d_direct_grad_input<scalar_t>(grad_output.contiguous().const_data_ptr<scalar_t>(),
                                         weight.contiguous().const_data_ptr<scalar_t>(),
                                         gi.data_ptr<scalar_t>(), s);
      if (!gi.is_same(grad_in)) grad_in.copy_(gi);
    }
  });
  return grad_in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo, std::array<bool, 3> output_mask) {
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  check_cpu(grad_output, "grad_output");
  const Conv2dShape s = conv2d_shape(input, weight, stride, padding, dilation, groups);
  check_conv2d_grad_output(grad_output, input, s);
  check_conv2d_algo(algo, {"auto", "direct", "im2col", "depthwise"}, "cpu");
  check_conv2d_depthwise_algo(algo, s);
  // algo="auto" chooses per gradient. A grouped layer's grad input at stride 1 runs on the direct
  // forward kernel and its grad weight on the grouped register tiles, where those serve. The
  // rest goes through im2col, except for depthwise layers: there each GEMM is one channel's, too
  // small to pay for its column matrix, and the direct loops were 1.2-7x faster.
  // A channels_last depthwise layer (one filter per channel) stays in NHWC: grad input on the
  // NHWC forward kernel at stride 1, else by the NHWC gather, and grad weight by the NHWC sums.
  // (Grad input's choice is grad_input_path's, shared with conv_transpose2d.)
  const bool by_default = algo == "auto" || algo == "depthwise";
  const at::MemoryFormat fmt = conv2d_memory_format(input);
  const bool depthwise_nhwc = backward_in_nhwc(s, fmt, algo);
  const bool grad_w_by_tiles = by_default && output_mask[1] && use_grouped_grad_weight(s) && !depthwise_nhwc;
  const bool use_im2col = backward_by_im2col(s, algo);
  const bool rest_of_grad_w = output_mask[1] && !grad_w_by_tiles;
  // When both gradients go through im2col, one pass over the tiles computes them together: the
  // grad output (and its conversion to the work format) is shared.
  const bool fused_im2col =
      output_mask[0] && rest_of_grad_w && grad_input_path(s, fmt, algo) == GradInputPath::im2col;
  at::Tensor grad_in = !output_mask[0] ? at::empty({0}, input.options())
                       : fused_im2col  ? at::zeros_like(input, input.options().memory_format(fmt))
                                       : conv2d_grad_input_cpu(grad_output, weight, s, fmt, algo);
  at::Tensor grad_w = output_mask[1] ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                                     : at::empty({0}, input.options());
  at::Tensor grad_b = output_mask[2] ? at::zeros({s.K}, input.options()) : at::empty({0}, input.options());
  if (s.N == 0 || (!rest_of_grad_w && !grad_w_by_tiles && !output_mask[2])) return {grad_in, grad_w, grad_b};

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_backward_cpu", [&] {
    if (depthwise_nhwc) {
      const at::Tensor go = grad_output.contiguous(fmt);
      at::Tensor no_grad_in;
      at::Tensor gw = rest_of_grad_w ? grad_w : at::Tensor();
      if (gw.defined()) {
        conv2d_depthwise_nhwc_backward<scalar_t>(go, input.contiguous(fmt), weight.contiguous(), no_grad_in, gw, s);
      }
      if (output_mask[2]) conv2d_grad_bias<scalar_t>(go, grad_b, s, true);
      return;
    }
    if (grad_w_by_tiles) {
      conv2d_grouped_grad_weight<scalar_t>(grad_output.contiguous(), input.contiguous(), grad_w, s);
    }
    if (use_im2col) {
      const at::MemoryFormat work = im2col_work_format(s, fmt);
      const bool work_channels_last = work == at::MemoryFormat::ChannelsLast;
      const at::Tensor go = grad_output.contiguous(work);
      at::Tensor gi;
      if (fused_im2col) {
        gi = work == fmt ? grad_in : at::zeros_like(grad_in, grad_in.options().memory_format(work));
      }
      at::Tensor gw = rest_of_grad_w ? grad_w : at::Tensor();
      if (gi.defined() || gw.defined()) {
        conv2d_im2col_backward<scalar_t>(go, input.contiguous(work), weight.contiguous(), gi, gw, s,
                                         work_channels_last);
      }
      if (gi.defined() && !gi.is_same(grad_in)) grad_in.copy_(gi);
      if (output_mask[2]) conv2d_grad_bias<scalar_t>(go, grad_b, s, work_channels_last);
    } else {
      const at::Tensor go = grad_output.contiguous();
      if (rest_of_grad_w) {
        conv2d_direct_grad_weight<scalar_t>(go.const_data_ptr<scalar_t>(),
                                            input.contiguous().const_data_ptr<scalar_t>(),
                                            grad_w.data_ptr<scalar_t>(), s);
      }
      if (output_mask[2]) conv2d_grad_bias<scalar_t>(go, grad_b, s, false);
    }
  });
  return {grad_in, grad_w, grad_b};
}

// conv_transpose2d is conv2d's grad input (csrc/ops/conv2d.cpp): `input` is the grad output of
// the conv2d whose input has the transposed output's shape.
at::Tensor conv_transpose2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef output_padding,
                                at::IntArrayRef dilation, int64_t groups, c10::string_view algo) {
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  const Conv2dShape s = conv_transpose2d_shape(input, weight, stride, padding, output_padding, dilation, groups);
  check_conv_transpose2d_bias(bias, input, s);
  check_conv2d_algo(algo, {"auto", "direct", "im2col", "depthwise"}, "cpu");
  check_conv2d_depthwise_algo(algo, s);
  at::Tensor out = conv2d_grad_input_cpu(conv_transpose2d_padded_input(input, s), weight, s,
                                         conv2d_memory_format(input), algo);
  if (bias.has_value() && bias->defined() && out.numel() > 0) out.add_(bias->view({1, -1, 1, 1}));
  return out;
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("conv2d", &cnnops::conv2d_cpu);
  m.impl("_conv2d_backward", &cnnops::conv2d_backward_cpu);
  m.impl("conv_transpose2d", &cnnops::conv_transpose2d_cpu);
}
