#pragma once

// Index math shared by the CPU and CUDA conv2d kernels.
//
// Notation (as in the design): input N x C x H x W, weight K x (C/groups) x R x S,
// output N x K x P x Q. Output pixel (p, q) and kernel tap (r, s) read input pixel
// (p*stride_h - pad_h + r*dilation_h, q*stride_w - pad_w + s*dilation_w).

#include <cstdint>

#include "host_device.h"

namespace cnnops {

struct Conv2dShape {
  int64_t N, C, H, W;  // input
  int64_t K, R, S;     // output channels, kernel height and width
  int64_t P, Q;        // output height and width
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups;

  CNNOPS_HOST_DEVICE int64_t channels_per_group() const { return C / groups; }
  CNNOPS_HOST_DEVICE int64_t outputs_per_group() const { return K / groups; }
  // Reduction length of one output element: the GEMM "K" dimension of im2col.
  CNNOPS_HOST_DEVICE int64_t reduction_size() const { return channels_per_group() * R * S; }
};

// A depthwise layer: one group per input channel, each with m = K / C filters (the channel
// multiplier). Output channel k reads input channel k / m.
CNNOPS_HOST_DEVICE bool is_depthwise(const Conv2dShape& s) {
  return s.groups == s.C && s.K % s.C == 0;
}

// Input coordinates spanned by `outputs` consecutive output coordinates through all `kernel`
// taps: the extent of the input tile, halo included, that a run of outputs reads. One output's
// extent is the dilated kernel size.
CNNOPS_HOST_DEVICE int64_t conv_input_extent(int64_t outputs, int64_t kernel, int64_t stride,
                                             int64_t dilation) {
  return (outputs - 1) * stride + (kernel - 1) * dilation + 1;
}

// Callers check first that the dilated kernel fits the padded input (conv2d_shape).
CNNOPS_HOST_DEVICE int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride,
                                            int64_t pad, int64_t dilation) {
  return (in + 2 * pad - conv_input_extent(1, kernel, stride, dilation)) / stride + 1;
}

// Input coordinate read by output coordinate `out` through kernel tap `tap`.
CNNOPS_HOST_DEVICE int64_t conv_input_coord(int64_t out, int64_t tap, int64_t stride, int64_t pad,
                                            int64_t dilation) {
  return out * stride - pad + tap * dilation;
}

// The helpers that divide take their integer type as an optional template argument (the
// arguments do not pick it; int64_t by default): GPU code whose values fit passes int, since
// 64-bit division there is a call, whose saved registers made a CUDA kernel spill.
// NotDeduced<T> is C++20's std::type_identity_t, spelled out: the GPU lane's torch (2.11) may
// build extensions as C++17.
template <typename T>
struct NotDeducedType {
  using type = T;
};
template <typename T>
using NotDeduced = typename NotDeducedType<T>::type;

template <typename index_t = int64_t>
CNNOPS_HOST_DEVICE index_t floor_div(NotDeduced<index_t> a,
                                     NotDeduced<index_t> b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// The output coordinates [begin, end) whose read through `tap` lands in input coordinates
// [in_begin, in_end), unclamped (they may lie outside the output, and the range may be empty).
// The CUDA depthwise grad input stages the grad output rows and columns that a tile of input
// pixels gathers from with these; the valid-output bounds below are the same with the input's
// own bounds.
template <typename index_t = int64_t>
CNNOPS_HOST_DEVICE index_t conv_outputs_reading_begin(
    NotDeduced<index_t> in_begin, NotDeduced<index_t> tap,
    NotDeduced<index_t> stride, NotDeduced<index_t> pad,
    NotDeduced<index_t> dilation) {
  // ceil((in_begin + pad - tap * dilation) / stride)
  return -floor_div<index_t>(tap * dilation - pad - in_begin, stride);
}

template <typename index_t = int64_t>
CNNOPS_HOST_DEVICE index_t conv_outputs_reading_end(
    NotDeduced<index_t> in_end, NotDeduced<index_t> tap,
    NotDeduced<index_t> stride, NotDeduced<index_t> pad,
    NotDeduced<index_t> dilation) {
  return floor_div<index_t>(in_end - 1 + pad - tap * dilation, stride) + 1;
}

// First output coordinate whose read through `tap` lands at input coordinate >= 0.
CNNOPS_HOST_DEVICE int64_t conv_first_valid_output(int64_t tap, int64_t stride, int64_t pad,
                                                   int64_t dilation) {
  const int64_t lo = conv_outputs_reading_begin(0, tap, stride, pad, dilation);
  return lo < 0 ? 0 : lo;
}

// One past the last output coordinate (clamped to `out_size`) whose read through `tap` lands at
// input coordinate < in_size. Together with conv_first_valid_output this lets inner loops run
// over [lo, hi) with no bounds checks; the range may be empty (lo >= hi).
CNNOPS_HOST_DEVICE int64_t conv_last_valid_output(int64_t tap, int64_t in_size, int64_t out_size,
                                                  int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t hi = conv_outputs_reading_end(in_size, tap, stride, pad, dilation);
  return hi > out_size ? out_size : hi;
}

// For grad input as a gather: the output coordinate that reads input coordinate `in` through
// tap `tap`, or -1 if none does (stride does not divide the offset, or it lies outside the output).
CNNOPS_HOST_DEVICE int64_t conv_output_coord_for_input(int64_t in, int64_t tap, int64_t stride,
                                                       int64_t pad, int64_t dilation,
                                                       int64_t out_size) {
  const int64_t offset = in + pad - tap * dilation;
  if (offset < 0 || offset % stride != 0) return -1;
  const int64_t out = offset / stride;
  return out < out_size ? out : -1;
}

}  // namespace cnnops

// ---- Host-only: argument checks shared by the C++ backends (defined in conv2d.cpp). ----
#include <ATen/core/Tensor.h>

#include <initializer_list>

namespace cnnops {

// Checks input/weight/stride/padding/dilation/groups and returns the problem's shape.
Conv2dShape conv2d_shape(const at::Tensor& input, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups);
// The same from sizes alone (no dtype or device checks): for a problem whose input is not a
// tensor at hand, as in conv_transpose2d, whose output is a conv2d's grad input.
Conv2dShape conv2d_shape_from_sizes(at::IntArrayRef input_sizes, at::IntArrayRef weight_sizes,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups);
// conv_transpose2d(input, weight) is the grad input of the conv2d (same weight, stride, padding,
// dilation, groups) whose input has the transposed output's size and whose grad output is
// `input`. Checks the arguments and returns that conv2d's shape: its input (N, C, H, W) is the
// transposed output, its output (N, K, P, Q) the transposed input, except that P and Q exceed
// the input's height and width when output_padding >= stride (see
// conv_transpose2d_padded_input).
Conv2dShape conv_transpose2d_shape(const at::Tensor& input, const at::Tensor& weight,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                   int64_t groups);
// `input` zero-padded at the bottom and right to (P, Q) of conv_transpose2d_shape, or `input`
// itself when no padding is needed (the usual case).
at::Tensor conv_transpose2d_padded_input(const at::Tensor& input, const Conv2dShape& s);
// Checks that bias is None or a (C_out,) tensor of input's dtype and device.
void check_conv_transpose2d_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input,
                                 const Conv2dShape& s);
void check_conv2d_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input,
                       const Conv2dShape& s);
void check_conv2d_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                              const Conv2dShape& s);
// Raises unless `algo` is one of `supported` on `backend`.
void check_conv2d_algo(c10::string_view algo, std::initializer_list<c10::string_view> supported,
                       c10::string_view backend);
// Raises if algo is "depthwise" and the layer is not (is_depthwise).
void check_conv2d_depthwise_algo(c10::string_view algo, const Conv2dShape& s);
// The memory format of conv2d's output (and grad input) for this input.
at::MemoryFormat conv2d_memory_format(const at::Tensor& input);

}  // namespace cnnops
