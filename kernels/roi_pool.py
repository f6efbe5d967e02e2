"""Triton kernels for roi_pool, forward and backward. Imports nothing from cnnops:
cnnops/ops/roi_pool.py checks the arguments (with the RoI check of cnnops.kernels.roi_align),
allocates the results and launches these.

The window math is torchvision's (Fast R-CNN's), step for step (csrc/ops/roi_pool.h): the RoI,
scaled and rounded half away from zero to whole pixels, spans at least 1 x 1 pixels and is cut
into pooled_h x pooled_w bins of real-valued size; bin p takes the pixels from floor(p * bin) to
ceil((p + 1) * bin), offset by the RoI's start and clipped to the map. A bin's output is the
largest of its pixels, found with a strict `>` from -FLT_MAX in row-major order (the first
maximum wins, NaN never does, a bin of -inf keeps -FLT_MAX and argmax -1); an empty bin gives 0
and argmax -1. argmax is the offset y * W + x in the image plane (int32, as torchvision's).
The window is computed in float32 (float64 with FP64); the spatial scale arrives as the bits of
a float32 (int32) or of a float64 (int64).

Tiling as roi_align's (kernels/roi_align.py): the forward and the atomic backward give a
program one RoI, BLOCK_BINS of its bins and BLOCK_C channels, the channels the vector dimension
([bins, channels] with CHANNELS_FAST, for channels_last; [channels, bins] otherwise). The
forward walks the largest bin of its block pixel by pixel, each pixel a load of every bin's
channels (masked for the smaller bins). The deterministic backward (no atomics) first bounds the
pixels each bin routes to (_roi_pool_bin_boxes_kernel), then gives a program one pixel of grad
input and a block of channels, walking the RoIs in order.
"""

import triton
import triton.language as tl

from .roi_align import _spatial_scale  # spatial_scale arrives as its bits

_FLOAT_MAX = tl.constexpr(3.4028234663852886e38)  # torchvision's start value, -FLT_MAX
_ROUND_LIMIT = tl.constexpr(1099511627776.0)  # 2^40: round_to_pixel's clamp


# The helpers below call no other helper: in Triton's interpreter every call of a jit function
# costs as much as dozens of tensor operations.


@triton.jit
def _roi_pool_window(rois_ptr, k, s_roi_k, s_roi_c, scale, N, pooled_h, pooled_w,
                     FP64: tl.constexpr):  # fmt: skip
    """roi_pool_window: RoI k's image (clamped into [0, N): the launcher has checked it, and
    this keeps every read in bounds whatever the RoIs hold), top-left pixel (int64), size in
    pixels (int64, at least 1) and bin size. The corners are rounded as C's round() (half away
    from zero) after a clamp to +-2^40 (NaN: -2^40), as round_to_pixel."""
    compute = tl.float64 if FP64 else tl.float32
    roi = rois_ptr + tl.cast(k, tl.int64) * s_roi_k
    n = tl.load(roi).to(compute)
    n = tl.where(n > 0, n, 0.0)
    n = tl.where(n < N - 1, n, N - 1).to(tl.int32)
    # The corners (x1, y1, x2, y2) as one vector.
    corner = tl.arange(0, 4)
    v = tl.load(roi + (corner + 1) * s_roi_c).to(compute) * scale
    v = tl.where(v > -_ROUND_LIMIT, v, -_ROUND_LIMIT)
    v = tl.where(v < _ROUND_LIMIT, v, _ROUND_LIMIT)
    a = tl.abs(v)
    whole = tl.floor(a)
    r = whole + tl.where(a - whole >= 0.5, 1.0, 0.0)  # a - whole is exact
    r = tl.where(v < 0, -r, r).to(tl.int64)
    start_w = tl.sum(tl.where(corner == 0, r, 0), axis=0)
    start_h = tl.sum(tl.where(corner == 1, r, 0), axis=0)
    end_w = tl.sum(tl.where(corner == 2, r, 0), axis=0)
    end_h = tl.sum(tl.where(corner == 3, r, 0), axis=0)
    roi_w = tl.maximum(end_w - start_w + 1, 1)
    roi_h = tl.maximum(end_h - start_h + 1, 1)
    if FP64:
        bin_h = roi_h.to(compute) / tl.cast(pooled_h, compute)
        bin_w = roi_w.to(compute) / tl.cast(pooled_w, compute)
    else:
        bin_h = tl.div_rn(roi_h.to(compute), tl.cast(pooled_h, compute))
        bin_w = tl.div_rn(roi_w.to(compute), tl.cast(pooled_w, compute))
    return n, start_h, start_w, roi_h, roi_w, bin_h, bin_w


@triton.jit
def _bin_range(p, start, bin_size, size):
    """roi_pool_bin_range: pixels [begin, end) (int32) of bin p, clipped to [0, size)."""
    lo = tl.cast(p, bin_size.dtype) * bin_size
    hi = tl.cast(p + 1, bin_size.dtype) * bin_size
    begin = lo.to(tl.int64)  # floor: lo >= 0
    end = hi.to(tl.int64)
    end = tl.where(end.to(hi.dtype) < hi, end + 1, end)  # ceil
    begin = tl.minimum(tl.maximum(begin + start, 0), size)
    end = tl.minimum(tl.maximum(end + start, 0), size)
    return begin.to(tl.int32), end.to(tl.int32)


@triton.jit
def _roi_pool_fwd_kernel(
    input_ptr, rois_ptr, out_ptr, argmax_ptr,
    N, C, H, W, pooled_h, pooled_w, scale_bits,
    s_in_n, s_in_c, s_in_h, s_in_w, s_roi_k, s_roi_c, s_out_k, s_out_c, s_out_h, s_out_w,
    FP64: tl.constexpr, CHANNELS_FAST: tl.constexpr,
    BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[k, c, ph, pw] and argmax[k, c, ph, pw] (both with out's strides). Grid:
    (K * bin blocks, channel blocks)."""
    compute = tl.float64 if FP64 else tl.float32
    BINS: tl.constexpr = 1 if CHANNELS_FAST else 0  # the tile's axis for [bins] vectors
    n_bins = pooled_h * pooled_w
    bin_blocks = tl.cdiv(n_bins, BLOCK_BINS)
    k = tl.program_id(0) // bin_blocks
    bins = (tl.program_id(0) % bin_blocks) * BLOCK_BINS + tl.arange(0, BLOCK_BINS)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bin_ok = bins < n_bins
    ph = bins // pooled_w
    pw = bins % pooled_w
    c_ok = tl.expand_dims(chans < C, 1 - BINS)
    scale = _spatial_scale(scale_bits, FP64)
    n, start_h, start_w, _, _, bin_h, bin_w = _roi_pool_window(
        rois_ptr, k, s_roi_k, s_roi_c, scale, N, pooled_h, pooled_w, FP64
    )
    h_begin, h_end = _bin_range(ph, start_h, bin_h, H)
    w_begin, w_end = _bin_range(pw, start_w, bin_w, W)
    rows = tl.where(bin_ok, h_end - h_begin, 0)
    cols = tl.where(bin_ok, w_end - w_begin, 0)
    image = input_ptr + n.to(tl.int64) * s_in_n
    c_off = tl.expand_dims(chans.to(tl.int64) * s_in_c, 1 - BINS)
    if CHANNELS_FAST:
        best = tl.full((BLOCK_BINS, BLOCK_C), -_FLOAT_MAX, compute)
        best_at = tl.full((BLOCK_BINS, BLOCK_C), -1, tl.int32)
    else:
        best = tl.full((BLOCK_C, BLOCK_BINS), -_FLOAT_MAX, compute)
        best_at = tl.full((BLOCK_C, BLOCK_BINS), -1, tl.int32)
    # Row-major over each bin, as torchvision: with a strict `>` the first maximum wins.
    for dy in range(0, tl.max(rows, axis=0)):
        y = h_begin + dy
        for dx in range(0, tl.max(cols, axis=0)):
            x = w_begin + dx
            inside = tl.expand_dims((dy < rows) & (dx < cols), BINS) & c_ok
            pixel = y.to(tl.int64) * s_in_h + x.to(tl.int64) * s_in_w
            v = tl.load(image + tl.expand_dims(pixel, BINS) + c_off, mask=inside, other=0.0)
            v = v.to(compute)
            larger = inside & (v > best)
            best = tl.where(larger, v, best)
            best_at = tl.where(larger, tl.expand_dims(y * W + x, BINS), best_at)
    empty = (h_end <= h_begin) | (w_end <= w_begin)
    best = tl.where(tl.expand_dims(empty, BINS), 0.0, best)
    dst = (
        k.to(tl.int64) * s_out_k
        + tl.expand_dims(chans.to(tl.int64) * s_out_c, 1 - BINS)
        + tl.expand_dims(ph.to(tl.int64) * s_out_h + pw.to(tl.int64) * s_out_w, BINS)
    )
    ok = tl.expand_dims(bin_ok, BINS) & c_ok
    best = tl.where(ok, best, 0.0)  # masked-off lanes: no -FLT_MAX to convert to half types
    tl.store(out_ptr + dst, best.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(argmax_ptr + dst, best_at.to(argmax_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _roi_pool_bwd_kernel(
    grad_ptr, argmax_ptr, rois_ptr, gi_ptr,
    N, C, H, W, pooled_h, pooled_w,
    s_g_k, s_g_c, s_g_h, s_g_w, s_a_k, s_a_c, s_a_h, s_a_w, s_roi_k, s_roi_c,
    s_gi_n, s_gi_c, s_gi_h, s_gi_w,
    FP64: tl.constexpr, CHANNELS_FAST: tl.constexpr,
    BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """gi[n, c, argmax] += grad[k, c, ph, pw] with atomic adds into gi (float32, or float64
    with FP64; zeroed by the launcher); argmax -1 (or any value outside the plane) adds
    nothing. Grid and tiling as the forward's."""
    compute = tl.float64 if FP64 else tl.float32
    BINS: tl.constexpr = 1 if CHANNELS_FAST else 0  # the tile's axis for [bins] vectors
    n_bins = pooled_h * pooled_w
    bin_blocks = tl.cdiv(n_bins, BLOCK_BINS)
    k = tl.program_id(0) // bin_blocks
    bins = (tl.program_id(0) % bin_blocks) * BLOCK_BINS + tl.arange(0, BLOCK_BINS)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bin_ok = tl.expand_dims(bins < n_bins, BINS)
    ph = (bins // pooled_w).to(tl.int64)
    pw = (bins % pooled_w).to(tl.int64)
    c64 = chans.to(tl.int64)
    c_ok = tl.expand_dims(chans < C, 1 - BINS)
    n = tl.load(rois_ptr + k.to(tl.int64) * s_roi_k).to(compute)
    n = tl.where(n > 0, n, 0.0)
    n = tl.where(n < N - 1, n, N - 1).to(tl.int64)
    a_src = (
        argmax_ptr
        + k.to(tl.int64) * s_a_k
        + tl.expand_dims(c64 * s_a_c, 1 - BINS)
        + tl.expand_dims(ph * s_a_h + pw * s_a_w, BINS)
    )
    g_src = (
        grad_ptr
        + k.to(tl.int64) * s_g_k
        + tl.expand_dims(c64 * s_g_c, 1 - BINS)
        + tl.expand_dims(ph * s_g_h + pw * s_g_w, BINS)
    )
    a = tl.load(a_src, mask=bin_ok & c_ok, other=-1).to(tl.int64)
    ok = bin_ok & c_ok & (a >= 0) & (a < H * W)
    g = tl.load(g_src, mask=ok, other=0.0).to(compute)
    a = tl.where(ok, a, 0)
    dst = (
        gi_ptr
        + n * s_gi_n
        + tl.expand_dims(c64 * s_gi_c, 1 - BINS)
        + (a // W) * s_gi_h
        + (a % W) * s_gi_w
    )
    tl.atomic_add(dst, g, mask=ok, sem="relaxed")


@triton.jit
def _roi_pool_bin_boxes_kernel(
    argmax_ptr, boxes_ptr,
    C, H, W, pooled_h, pooled_w,
    s_a_k, s_a_c, s_a_h, s_a_w,
    BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The first pass of the deterministic backward. boxes[k, b] (int32, [K, bins + 1, 4],
    contiguous) = (first row, last row, first column, last column) of the pixels that bin b of
    RoI k routes gradient to (its argmaxes in [0, H * W), over every channel); (H, -1, W, -1)
    for none. Row `bins` holds the union over the RoI's bins. One program per RoI: it reads the
    RoI's argmax once, BLOCK_BINS bins x BLOCK_C channels at a time. The backward op takes no
    spatial scale (as the C++ op's schema), so the bins' pixel windows are found from their
    argmaxes rather than from the RoIs: a bin's box holds every pixel it can route to."""
    k = tl.program_id(0)
    n_bins = pooled_h * pooled_w
    a_roi = argmax_ptr + k.to(tl.int64) * s_a_k
    box_roi = boxes_ptr + k.to(tl.int64) * (n_bins + 1) * 4
    all_y0 = tl.full((), 0, tl.int32) + H
    all_y1 = tl.full((), -1, tl.int32)
    all_x0 = tl.full((), 0, tl.int32) + W
    all_x1 = tl.full((), -1, tl.int32)
    for b0 in range(0, n_bins, BLOCK_BINS):
        bins = b0 + tl.arange(0, BLOCK_BINS)
        bin_ok = bins < n_bins
        bin_off = (bins // pooled_w).to(tl.int64) * s_a_h + (bins % pooled_w).to(tl.int64) * s_a_w
        y0 = tl.full((BLOCK_BINS,), 0, tl.int32) + H
        y1 = tl.full((BLOCK_BINS,), -1, tl.int32)
        x0 = tl.full((BLOCK_BINS,), 0, tl.int32) + W
        x1 = tl.full((BLOCK_BINS,), -1, tl.int32)
        for c0 in range(0, C, BLOCK_C):
            chans = c0 + tl.arange(0, BLOCK_C)
            ok = bin_ok[:, None] & (chans < C)[None, :]
            a = tl.load(a_roi + bin_off[:, None] + chans.to(tl.int64)[None, :] * s_a_c,
                        mask=ok, other=-1).to(tl.int64)  # fmt: skip
            ok = ok & (a >= 0) & (a < H * W)
            y = (a // W).to(tl.int32)
            x = (a % W).to(tl.int32)
            y0 = tl.minimum(y0, tl.min(tl.where(ok, y, H), axis=1))
            y1 = tl.maximum(y1, tl.max(tl.where(ok, y, -1), axis=1))
            x0 = tl.minimum(x0, tl.min(tl.where(ok, x, W), axis=1))
            x1 = tl.maximum(x1, tl.max(tl.where(ok, x, -1), axis=1))
        box = box_roi + bins * 4
        tl.store(box, y0, mask=bin_ok)
        tl.store(box + 1, y1, mask=bin_ok)
        tl.store(box + 2, x0, mask=bin_ok)
        tl.store(box + 3, x1, mask=bin_ok)
        all_y0 = tl.minimum(all_y0, tl.min(y0, axis=0))
        all_y1 = tl.maximum(all_y1, tl.max(y1, axis=0))
        all_x0 = tl.minimum(all_x0, tl.min(x0, axis=0))
        all_x1 = tl.maximum(all_x1, tl.max(x1, axis=0))
    union = box_roi + n_bins * 4
    tl.store(union, all_y0)
    tl.store(union + 1, all_y1)
    tl.store(union + 2, all_x0)
    tl.store(union + 3, all_x1)


@triton.jit
def _roi_pool_bwd_deterministic_kernel(
    grad_ptr, argmax_ptr, rois_ptr, boxes_ptr, gi_ptr,
    K, N, C, H, W, pooled_h, pooled_w,
    s_g_k, s_g_c, s_g_h, s_g_w, s_a_k, s_a_c, s_a_h, s_a_w, s_roi_k, s_roi_c,
    s_gi_n, s_gi_c, s_gi_h, s_gi_w,
    FP64: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad input without atomics, bitwise reproducible: a program owns pixel (n, py, px) for
    BLOCK_C channels (grid: (N * H * W, channel blocks)) and walks the RoIs in order. A RoI of
    image n whose box (boxes, from _roi_pool_bin_boxes_kernel) holds the pixel has its bins'
    boxes checked BLOCK_BINS at a time; the bins whose box holds the pixel have their argmax
    and gradient loaded as a [BLOCK_BINS, BLOCK_C] tile, and the gradients whose argmax is the
    pixel are summed over the bins (a fixed order). Writes gi (the result's dtype and layout)
    once; memory O(output)."""
    compute = tl.float64 if FP64 else tl.float32
    pixel = tl.program_id(0)
    plane = H * W
    n = pixel // plane
    py = (pixel % plane) // W
    px = pixel % W
    offset = py * W + px
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chans < C
    c64 = chans.to(tl.int64)
    n_bins = pooled_h * pooled_w
    acc = tl.zeros((BLOCK_C,), compute)
    for k in range(0, K):
        k64 = tl.cast(k, tl.int64)
        image = tl.load(rois_ptr + k64 * s_roi_k).to(compute)
        image = tl.where(image > 0, image, 0.0)
        image = tl.where(image < N - 1, image, N - 1).to(tl.int32)
        union = boxes_ptr + k64 * (n_bins + 1) * 4 + n_bins * 4
        inside = (tl.load(union) <= py) & (py <= tl.load(union + 1))
        inside = inside & (tl.load(union + 2) <= px) & (px <= tl.load(union + 3))
        if (image == n) & inside:
            a_roi = argmax_ptr + k64 * s_a_k + c64[None, :] * s_a_c
            g_roi = grad_ptr + k64 * s_g_k + c64[None, :] * s_g_c
            for b0 in range(0, n_bins, BLOCK_BINS):
                bins = b0 + tl.arange(0, BLOCK_BINS)
                box = boxes_ptr + k64 * (n_bins + 1) * 4 + bins * 4
                ok = bins < n_bins
                holds = ok & (tl.load(box, mask=ok, other=H) <= py)
                holds = holds & (py <= tl.load(box + 1, mask=ok, other=-1))
                holds = holds & (tl.load(box + 2, mask=ok, other=W) <= px)
                holds = holds & (px <= tl.load(box + 3, mask=ok, other=-1))
                if tl.max(holds.to(tl.int32), axis=0) > 0:
                    ph = (bins // pooled_w).to(tl.int64)
                    pw = (bins % pooled_w).to(tl.int64)
                    mask = holds[:, None] & c_ok[None, :]
                    a = tl.load(a_roi + (ph * s_a_h + pw * s_a_w)[:, None], mask=mask, other=-1)
                    won = mask & (a == offset)
                    g = tl.load(g_roi + (ph * s_g_h + pw * s_g_w)[:, None], mask=won, other=0.0)
                    acc += tl.sum(g.to(compute), axis=0)
    dst = (
        gi_ptr
        + n.to(tl.int64) * s_gi_n
        + py.to(tl.int64) * s_gi_h
        + px.to(tl.int64) * s_gi_w
        + c64 * s_gi_c
    )
    tl.store(dst, acc.to(gi_ptr.dtype.element_ty), mask=c_ok)
