"""Convolution shapes of real networks, kept as data (shared/reference/benchmark-shapes.md).

Layer names are the module names in the torchvision model, so a row can be traced to its layer.
"""

from collections import namedtuple

# One conv layer at input size `size` x `size`.
ConvLayer = namedtuple("ConvLayer", "name c_in c_out kernel stride padding dilation groups size")

# ResNet-50 v1.5 (the stride sits on the 3x3 of each first bottleneck). As in the reference list,
# layer1.0.downsample.0 has the same shape as layer1.0.conv3; both are kept.
RESNET50 = (
    ConvLayer("conv1", 3, 64, 7, 2, 3, 1, 1, 224),
    ConvLayer("layer1.0.conv1", 64, 64, 1, 1, 0, 1, 1, 56),
    ConvLayer("layer1.0.conv2", 64, 64, 3, 1, 1, 1, 1, 56),
    ConvLayer("layer1.0.conv3", 64, 256, 1, 1, 0, 1, 1, 56),
    ConvLayer("layer1.1.conv1", 256, 64, 1, 1, 0, 1, 1, 56),
    ConvLayer("layer1.0.downsample.0", 64, 256, 1, 1, 0, 1, 1, 56),
    ConvLayer("layer2.0.conv1", 256, 128, 1, 1, 0, 1, 1, 56),
    ConvLayer("layer2.0.conv2", 128, 128, 3, 2, 1, 1, 1, 56),
    ConvLayer("layer2.1.conv2", 128, 128, 3, 1, 1, 1, 1, 28),
    ConvLayer("layer2.0.conv3", 128, 512, 1, 1, 0, 1, 1, 28),
    ConvLayer("layer2.1.conv1", 512, 128, 1, 1, 0, 1, 1, 28),
    ConvLayer("layer2.0.downsample.0", 256, 512, 1, 2, 0, 1, 1, 56),
    ConvLayer("layer3.0.conv1", 512, 256, 1, 1, 0, 1, 1, 28),
    ConvLayer("layer3.0.conv2", 256, 256, 3, 2, 1, 1, 1, 28),
    ConvLayer("layer3.1.conv2", 256, 256, 3, 1, 1, 1, 1, 14),
    ConvLayer("layer3.0.conv3", 256, 1024, 1, 1, 0, 1, 1, 14),
    ConvLayer("layer3.1.conv1", 1024, 256, 1, 1, 0, 1, 1, 14),
    ConvLayer("layer3.0.downsample.0", 512, 1024, 1, 2, 0, 1, 1, 28),
    ConvLayer("layer4.0.conv1", 1024, 512, 1, 1, 0, 1, 1, 14),
    ConvLayer("layer4.0.conv2", 512, 512, 3, 2, 1, 1, 1, 14),
    ConvLayer("layer4.1.conv2", 512, 512, 3, 1, 1, 1, 1, 7),
    ConvLayer("layer4.0.conv3", 512, 2048, 1, 1, 0, 1, 1, 7),
    ConvLayer("layer4.1.conv1", 2048, 512, 1, 1, 0, 1, 1, 7),
    ConvLayer("layer4.0.downsample.0", 1024, 2048, 1, 2, 0, 1, 1, 14),
)

# MobileNetV2 depthwise 3x3, (name, C, H_in, stride); groups = C, padding 1.
_MOBILENETV2_DEPTHWISE_TABLE = (
    ("features.1.conv.0.0", 32, 112, 1),
    ("features.2.conv.1.0", 96, 112, 2),
    ("features.3.conv.1.0", 144, 56, 1),
    ("features.4.conv.1.0", 144, 56, 2),
    ("features.5.conv.1.0", 192, 28, 1),
    ("features.7.conv.1.0", 192, 28, 2),
    ("features.8.conv.1.0", 384, 14, 1),
    ("features.12.conv.1.0", 576, 14, 1),
    ("features.14.conv.1.0", 576, 14, 2),
    ("features.15.conv.1.0", 960, 7, 1),
)
MOBILENETV2_DEPTHWISE = tuple(
    ConvLayer(name, c, c, 3, stride, 1, 1, c, size)
    for name, c, size, stride in _MOBILENETV2_DEPTHWISE_TABLE
)

# ResNeXt-50 32x4d grouped 3x3, (name, C, H_in, stride); groups 32, padding 1.
_RESNEXT50_GROUPED_TABLE = (
    ("layer1.0.conv2", 128, 56, 1),
    ("layer2.0.conv2", 256, 56, 2),
    ("layer2.1.conv2", 256, 28, 1),
    ("layer3.0.conv2", 512, 28, 2),
    ("layer3.1.conv2", 512, 14, 1),
    ("layer4.0.conv2", 1024, 14, 2),
    ("layer4.1.conv2", 1024, 7, 1),
)
RESNEXT50_GROUPED = tuple(
    ConvLayer(name, c, c, 3, stride, 1, 1, 32, size)
    for name, c, size, stride in _RESNEXT50_GROUPED_TABLE
)

# DeepLabV3-ResNet50 at output stride 8 on a 513 x 513 input: the dilated 3x3s run at 65 x 65.
DEEPLABV3_DILATED = (
    ConvLayer("backbone.layer3.1.conv2", 256, 256, 3, 1, 2, 2, 1, 65),
    ConvLayer("backbone.layer4.1.conv2", 512, 512, 3, 1, 4, 4, 1, 65),
    ConvLayer("aspp.d12", 2048, 256, 3, 1, 12, 12, 1, 65),
    ConvLayer("aspp.d24", 2048, 256, 3, 1, 24, 24, 1, 65),
    ConvLayer("aspp.d36", 2048, 256, 3, 1, 36, 36, 1, 65),
)

# Large-kernel depthwise at 56: ConvNeXt 7x7 and RepLKNet 31x31 (C = 96 to 128 in the reference).
LARGE_KERNEL_DEPTHWISE = (
    ConvLayer("convnext.stage1.dwconv7x7", 96, 96, 7, 1, 3, 1, 96, 56),
    ConvLayer("replknet.stage1.dwconv31x31", 128, 128, 31, 1, 15, 1, 128, 56),
)

CONV_SETS = {
    "resnet50": RESNET50,
    "mobilenetv2_dw": MOBILENETV2_DEPTHWISE,
    "resnext50_grouped": RESNEXT50_GROUPED,
    "deeplabv3_dilated": DEEPLABV3_DILATED,
    "large_kernel_dw": LARGE_KERNEL_DEPTHWISE,
}

# Per device type: the sets, batch sizes and dtypes a default run uses.
# TODO(gpu): the GPU set list and dtypes are to be settled with the GPU lane.
CONV_SETS_BY_DEVICE = {"cpu": tuple(CONV_SETS), "cuda": tuple(CONV_SETS)}
BATCHES_BY_DEVICE = {"cpu": (1, 8), "cuda": (32,)}
# On a GPU, float16 is where tensor cores (implicit GEMM, cuDNN) are judged; float32 follows
# torch.backends.cudnn.allow_tf32 on both sides.
DTYPES_BY_DEVICE = {"cpu": ("float32",), "cuda": ("float32", "float16")}
