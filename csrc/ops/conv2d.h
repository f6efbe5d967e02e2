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

CNNOPS_HOST_DEVICE int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride,
                                            int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// Input coordinate read by output coordinate `out` through kernel tap `tap`.
CNNOPS_HOST_DEVICE int64_t conv_input_coord(int64_t out, int64_t tap, int64_t stride, int64_t pad,
                                            int64_t dilation) {
  return out * stride - pad + tap * dilation;
}

CNNOPS_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// First output coordinate whose read through `tap` lands at input coordinate >= 0.
CNNOPS_HOST_DEVICE int64_t conv_first_valid_output(int64_t tap, int64_t stride, int64_t pad,
                                                   int64_t dilation) {
  const int64_t lo = -floor_div(tap * dilation - pad, stride);  // ceil((pad - tap*d) / stride)
  return lo < 0 ? 0 : lo;
}

// One past the last output coordinate (clamped to `out_size`) whose read through `tap` lands at
// input coordinate < in_size. Together with conv_first_valid_output this lets inner loops run
// over [lo, hi) with no bounds checks; the range may be empty (lo >= hi).
CNNOPS_HOST_DEVICE int64_t conv_last_valid_output(int64_t tap, int64_t in_size, int64_t out_size,
                                                  int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t hi = floor_div(in_size - 1 + pad - tap * dilation, stride) + 1;
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
void check_conv2d_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input,
                       const Conv2dShape& s);
void check_conv2d_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                              const Conv2dShape& s);
// Raises unless `algo` is one of `supported` on `backend`.
void check_conv2d_algo(c10::string_view algo, std::initializer_list<c10::string_view> supported,
                       c10::string_view backend);
// The memory format of conv2d's output (and grad input) for this input.
at::MemoryFormat conv2d_memory_format(const at::Tensor& input);

}  // namespace cnnops
