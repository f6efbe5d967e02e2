// conv2d schemas and the argument checks shared by every C++ backend.
//
// The public Python function (cnnops/ops/conv2d.py) normalises arguments and resolves
// algo="auto" before it calls these ops, so the ops take a concrete algorithm name. The checks
// below repeat the Python ones on purpose: torch.ops.cnnops.conv2d can be called directly, and it
// must raise rather than read out of bounds.

#include "conv2d.h"

#include <torch/library.h>

namespace cnnops {

namespace {

void check_pair(at::IntArrayRef values, const char* name, int64_t min_value) {
  TORCH_CHECK(values.size() == 2, "conv2d: ", name, " must have 2 values (height, width), got ",
              values.size());
  for (const int64_t v : values) {
    TORCH_CHECK(v >= min_value, "conv2d: ", name, " must be >= ", min_value, ", got ", values);
  }
}

}  // namespace

Conv2dShape conv2d_shape(const at::Tensor& input, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "conv2d: input must be 4-D (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4,
              "conv2d: weight must be 4-D (C_out, C_in/groups, kH, kW), got shape ",
              weight.sizes());
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(),
              "conv2d: input and weight must have the same dtype, got ", input.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(),
              "conv2d: input and weight must be on the same device, got ", input.device(),
              " and ", weight.device());
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1, "conv2d: groups must be >= 1, got ", groups);

  Conv2dShape s{};
  s.N = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.K = weight.size(0);
  s.R = weight.size(2);
  s.S = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  s.groups = groups;
  TORCH_CHECK(s.C % groups == 0, "conv2d: groups (", groups,
              ") must divide the input channels (", s.C, ")");
  TORCH_CHECK(s.K % groups == 0, "conv2d: groups (", groups,
              ") must divide the output channels (weight.size(0) = ", s.K, ")");
  TORCH_CHECK(weight.size(1) * groups == s.C, "conv2d: weight.size(1) (", weight.size(1),
              ") times groups (", groups, ") must equal the input channels (", s.C, ")");
  TORCH_CHECK(s.R > 0 && s.S > 0 && s.K > 0, "conv2d: weight must have no zero-sized dimension, got ",
              weight.sizes());
  TORCH_CHECK(s.C > 0 && s.H > 0 && s.W > 0,
              "conv2d: input must have non-zero channels, height and width, got shape ",
              input.sizes());
  const int64_t eff_h = conv_input_extent(1, s.R, s.stride_h, s.dilation_h);
  const int64_t eff_w = conv_input_extent(1, s.S, s.stride_w, s.dilation_w);
  TORCH_CHECK(eff_h <= s.H + 2 * s.pad_h && eff_w <= s.W + 2 * s.pad_w,
              "conv2d: the dilated kernel (", eff_h, " x ", eff_w,
              ") is larger than the padded input (", s.H + 2 * s.pad_h, " x ",
              s.W + 2 * s.pad_w, ")");
  s.P = conv_output_size(s.H, s.R, s.stride_h, s.pad_h, s.dilation_h);
  s.Q = conv_output_size(s.W, s.S, s.stride_w, s.pad_w, s.dilation_w);
  return s;
}

void check_conv2d_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input,
                       const Conv2dShape& s) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.K, "conv2d: bias must have shape (", s.K,
              ",), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
              "conv2d: bias must match the input's dtype and device (", input.scalar_type(), ", ",
              input.device(), "), got ", bias->scalar_type(), ", ", bias->device());
}

void check_conv2d_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                              const Conv2dShape& s) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.K &&
                  grad_output.size(2) == s.P && grad_output.size(3) == s.Q,
              "conv2d backward: grad_output must have shape (", s.N, ", ", s.K, ", ", s.P, ", ",
              s.Q, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() &&
                  grad_output.device() == input.device(),
              "conv2d backward: grad_output must match the input's dtype and device");
}

void check_conv2d_algo(c10::string_view algo, std::initializer_list<c10::string_view> supported,
                       c10::string_view backend) {
  for (const auto& name : supported) {
    if (algo == name) return;
  }
  TORCH_CHECK(false, "conv2d: algo '", algo, "' is not available on the ", backend, " backend");
}

void check_conv2d_depthwise_algo(c10::string_view algo, const Conv2dShape& s) {
  TORCH_CHECK(algo != "depthwise" || is_depthwise(s),
              "conv2d: algo 'depthwise' needs a depthwise layer (groups == input channels, output "
              "channels a multiple of them); got groups=", s.groups, ", ", s.C, " input and ", s.K,
              " output channels");
}

at::MemoryFormat conv2d_memory_format(const at::Tensor& input) {
  // Channels_last in, channels_last out, as torch's convolution does. The rule is written so
  // that the fake kernel (cnnops/ops/conv2d.py, conv2d_memory_format) can repeat it exactly:
  // compiled graphs need the fake and real output strides to agree.
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace cnnops

TORCH_LIBRARY_FRAGMENT(cnnops, m) {
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, SymInt[2] stride, SymInt[2] padding, "
      "SymInt[2] dilation, SymInt groups, str algo) -> Tensor");
  // Gradients with respect to (input, weight, bias). Entries whose output_mask is false are
  // returned as empty tensors (numel 0), so the schema keeps plain Tensor outputs.
  m.def(
      "_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, SymInt[2] stride, "
      "SymInt[2] padding, SymInt[2] dilation, SymInt groups, str algo, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}
