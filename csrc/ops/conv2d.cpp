// conv2d schemas and the argument checks shared by every C++ backend.
//
// The public Python function (cnnops/ops/conv2d.py) normalises arguments and resolves
// algo="auto" before it calls these ops, so the ops take a concrete algorithm name. The checks
// below repeat the Python ones on purpose: torch.ops.cnnops.conv2d can be called directly, and it
// must raise rather than read out of bounds.

#include "conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace cnnops {

namespace {

void check_pair(at::IntArrayRef values, const char* op, const char* name, int64_t min_value) {
  TORCH_CHECK(values.size() == 2, op, ": ", name, " must have 2 values (height, width), got ",
              values.size());
  for (const int64_t v : values) {
    TORCH_CHECK(v >= min_value, op, ": ", name, " must be >= ", min_value, ", got ", values);
  }
}

void check_input_and_weight(const at::Tensor& input, const at::Tensor& weight, const char* op,
                            const char* weight_layout) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D ", weight_layout, ", got shape ",
              weight.sizes());
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), op,
              ": input and weight must have the same dtype, got ", input.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(), op,
              ": input and weight must be on the same device, got ", input.device(), " and ",
              weight.device());
}

}  // namespace

Conv2dShape conv2d_shape(const at::Tensor& input, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  check_input_and_weight(input, weight, "conv2d", "(C_out, C_in/groups, kH, kW)");
  return conv2d_shape_from_sizes(input.sizes(), weight.sizes(), stride, padding, dilation,
                                 groups);
}

Conv2dShape conv2d_shape_from_sizes(at::IntArrayRef input_sizes, at::IntArrayRef weight_sizes,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input_sizes.size() == 4 && weight_sizes.size() == 4,
              "conv2d: input and weight must be 4-D, got shapes ", input_sizes, " and ",
              weight_sizes);
  check_pair(stride, "conv2d", "stride", 1);
  check_pair(padding, "conv2d", "padding", 0);
  check_pair(dilation, "conv2d", "dilation", 1);
  TORCH_CHECK(groups >= 1, "conv2d: groups must be >= 1, got ", groups);

  Conv2dShape s{};
  s.N = input_sizes[0];
  s.C = input_sizes[1];
  s.H = input_sizes[2];
  s.W = input_sizes[3];
  s.K = weight_sizes[0];
  s.R = weight_sizes[2];
  s.S = weight_sizes[3];
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
  TORCH_CHECK(weight_sizes[1] * groups == s.C, "conv2d: weight.size(1) (", weight_sizes[1],
              ") times groups (", groups, ") must equal the input channels (", s.C, ")");
  TORCH_CHECK(s.R > 0 && s.S > 0 && s.K > 0, "conv2d: weight must have no zero-sized dimension, got ",
              weight_sizes);
  TORCH_CHECK(s.C > 0 && s.H > 0 && s.W > 0,
              "conv2d: input must have non-zero channels, height and width, got shape ",
              input_sizes);
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

Conv2dShape conv_transpose2d_shape(const at::Tensor& input, const at::Tensor& weight,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  constexpr const char* op = "conv_transpose2d";
  check_input_and_weight(input, weight, op, "(C_in, C_out/groups, kH, kW)");
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(output_padding, op, "output_padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  for (int d = 0; d < 2; ++d) {
    // torch's rule: the extra rows/columns must be ones that stride or dilation leaves unread.
    TORCH_CHECK(output_padding[d] < stride[d] || output_padding[d] < dilation[d], op,
                ": output_padding must be smaller than stride or dilation, got output_padding ",
                output_padding, ", stride ", stride, ", dilation ", dilation);
  }
  const int64_t c_in = input.size(1);
  TORCH_CHECK(weight.size(0) == c_in, op, ": weight.size(0) (", weight.size(0),
              ") must equal the input channels (", c_in, ")");
  TORCH_CHECK(c_in % groups == 0, op, ": groups (", groups, ") must divide the input channels (",
              c_in, ")");
  TORCH_CHECK(weight.size(1) > 0 && weight.size(2) > 0 && weight.size(3) > 0, op,
              ": weight must have no zero-sized dimension, got ", weight.sizes());
  TORCH_CHECK(c_in > 0 && input.size(2) > 0 && input.size(3) > 0, op,
              ": input must have non-zero channels, height and width, got shape ", input.sizes());
  int64_t out_size[2];
  for (int d = 0; d < 2; ++d) {
    out_size[d] = (input.size(2 + d) - 1) * stride[d] - 2 * padding[d] +
                  dilation[d] * (weight.size(2 + d) - 1) + output_padding[d] + 1;
  }
  TORCH_CHECK(out_size[0] > 0 && out_size[1] > 0, op, ": the output size (", out_size[0], " x ",
              out_size[1], ") must be positive; padding ", padding, " is too large");
  const Conv2dShape s = conv2d_shape_from_sizes(
      {input.size(0), weight.size(1) * groups, out_size[0], out_size[1]}, weight.sizes(), stride,
      padding, dilation, groups);
  // P = H_in + output_padding / stride (integer division), and likewise Q.
  TORCH_CHECK(s.P >= input.size(2) && s.Q >= input.size(3), op, ": internal size mismatch");
  return s;
}

at::Tensor conv_transpose2d_padded_input(const at::Tensor& input, const Conv2dShape& s) {
  const int64_t extra_h = s.P - input.size(2), extra_w = s.Q - input.size(3);
  if (extra_h == 0 && extra_w == 0) return input;
  // output_padding >= stride (allowed when dilation is larger): the last output rows are then
  // reached by the taps of input rows past the end, which a conv2d over the output has as its
  // own extra output rows. Those rows of the conv2d's grad output are zeros: they add nothing.
  return at::constant_pad_nd(input, {0, extra_w, 0, extra_h}, 0);
}

void check_conv_transpose2d_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input,
                                 const Conv2dShape& s) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.C, "conv_transpose2d: bias must have shape (",
              s.C, ",), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
              "conv_transpose2d: bias must match the input's dtype and device (",
              input.scalar_type(), ", ", input.device(), "), got ", bias->scalar_type(), ", ",
              bias->device());
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
  // The transposed convolution is conv2d's grad input, with `input` as the grad output and a
  // conv2d input of the transposed output's size, so its kernels are conv2d's grad-input ones
  // (weight (C_in, C_out/groups, kH, kW) is conv2d's (K, C/groups, R, S)). Its backward is a
  // conv2d forward (grad input) and conv2d's grad weight with grad output and input exchanged,
  // written in Python (cnnops/ops/conv_transpose2d.py) on the ops above.
  m.def(
      "conv_transpose2d(Tensor input, Tensor weight, Tensor? bias, SymInt[2] stride, "
      "SymInt[2] padding, SymInt[2] output_padding, SymInt[2] dilation, SymInt groups, str algo) "
      "-> Tensor");
}
