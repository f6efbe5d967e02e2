"""Triton kernels for roi_align, forward and backward, and the RoI check that roi_align and
roi_pool run before their kernels. Imports nothing from cnnops: cnnops/ops/roi_align.py checks
the arguments, allocates the results and launches these.

The arithmetic is torchvision's, operation for operation (csrc/ops/roi_align.h:
roi_align_geometry and bilinear_taps; the sample positions of compute_taps in
csrc/ops/cpu/roi_align_kernel.cpp): a RoI is scaled, shifted by -0.5 when aligned, cut into
pooled_h x pooled_w bins of grid_h x grid_w sample points, and each sample is the bilinear
interpolation of the 4 pixels around it. Divisions round to nearest (tl.div_rn: Triton's `/` on
float32 is approximate on the GPU). Values are loaded in their own dtype and computed in float32,
or float64 (FP64). On a GPU, Triton may fuse a product into the following addition (an FMA), as
nvcc does in torchvision's CUDA kernel; the interpreter does not. The backward adds
grad * (tap weight / count) for each tap (torchvision: grad * tap weight / count, one rounding
apart); the atomic and the deterministic kernels add the same terms, in different orders.

The spatial scale arrives as the bits of a float32 (an int32), or of a float64 (an int64) with
FP64: exact, and no tensor to allocate for it.

Tiling. The forward and the atomic backward give a program one RoI, a block of BLOCK_BINS of its
bins and a block of BLOCK_C channels: the sample positions and bilinear taps of the bins are
computed once per program (per thread, for the bins it holds) and serve all its channels, which
are the vector dimension. CHANNELS_FAST lays the tile out [bins, channels] with the channels
across the threads of a warp (channels_last: a tap of BLOCK_C channels is one contiguous,
coalesced run); otherwise [channels, bins] with the bins across the threads (NCHW: neighbouring
bins read neighbouring pixels of one plane, and the bins of a channel are stored contiguously).
The deterministic backward (no atomics) gives a program one pixel of grad input and a block of
channels, and walks the RoIs in order (see _roi_align_bwd_deterministic_kernel).
"""

import triton
import triton.language as tl

# The largest sampling grids the kernels take (the launcher raises on larger ones, as the C++
# backends do: torchvision overflows, or loops for hours): MAX_GRID points a side (so that a
# RoI's sample rows, pooled_h * grid_h, stay an int32 for output sizes below 32768) and
# MAX_ROI_SAMPLES in all of a RoI's bins. The kernels clamp the adaptive grid (ceil(bin size)
# points a side, sampling_ratio <= 0) to MAX_GRID too, which matters only where the check did
# not run (a graph torch.compile traced into the kernels).
MAX_GRID = tl.constexpr(65536)
MAX_ROI_SAMPLES = tl.constexpr(2**26)
# The largest finite values: |v| <= these is "finite" (NaN compares false).
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
_FLOAT64_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def _spatial_scale(scale_bits, FP64: tl.constexpr):
    if FP64:
        scale = tl.cast(tl.cast(scale_bits, tl.int64), tl.float64, bitcast=True)
    else:
        scale = tl.cast(tl.cast(scale_bits, tl.int32), tl.float32, bitcast=True)
    return scale


# The helpers below divide in place (IEEE `/` for float64, tl.div_rn for float32) and call no
# other helper: in Triton's interpreter every call of a jit function costs as much as dozens of
# tensor operations, and these run in the kernels' inner loops.


@triton.jit
def _roi_align_geometry(
    rois_ptr, k, s_roi_k, s_roi_c, scale, N, pooled_h, pooled_w, sampling_ratio,
    ALIGNED: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """roi_align_geometry: RoI k's image, top-left corner, bin size, sampling grid (grid_h x
    grid_w points per bin) and count (the average's divisor). The image is clamped into
    [0, N): the launcher has checked it, and this keeps every read in bounds whatever the RoIs
    hold (a NaN reads image 0). Adaptive grids (ceil of the bin size) of a negative or NaN size
    are 0, and capped at MAX_GRID."""
    compute = tl.float64 if FP64 else tl.float32
    roi = rois_ptr + tl.cast(k, tl.int64) * s_roi_k
    n = tl.load(roi).to(compute)
    n = tl.where(n > 0, n, 0.0)
    n = tl.where(n < N - 1, n, N - 1).to(tl.int32)
    offset = 0.5 if ALIGNED else 0.0
    start_w = tl.load(roi + s_roi_c).to(compute) * scale - offset
    start_h = tl.load(roi + 2 * s_roi_c).to(compute) * scale - offset
    end_w = tl.load(roi + 3 * s_roi_c).to(compute) * scale - offset
    end_h = tl.load(roi + 4 * s_roi_c).to(compute) * scale - offset
    width = end_w - start_w
    height = end_h - start_h
    if not ALIGNED:  # torchvision's legacy behaviour: RoIs at least 1 x 1
        width = tl.where(width > 1.0, width, 1.0)
        height = tl.where(height > 1.0, height, 1.0)
    if FP64:
        bin_h = height / tl.cast(pooled_h, compute)
        bin_w = width / tl.cast(pooled_w, compute)
    else:
        bin_h = tl.div_rn(height, tl.cast(pooled_h, compute))
        bin_w = tl.div_rn(width, tl.cast(pooled_w, compute))
    # ceil_to_int
    adaptive_h = tl.where(bin_h > 0, bin_h, 0.0)
    adaptive_h = tl.where(adaptive_h < MAX_GRID, adaptive_h, MAX_GRID)
    ceil_h = adaptive_h.to(tl.int32)
    ceil_h = tl.where(ceil_h.to(compute) < adaptive_h, ceil_h + 1, ceil_h)
    adaptive_w = tl.where(bin_w > 0, bin_w, 0.0)
    adaptive_w = tl.where(adaptive_w < MAX_GRID, adaptive_w, MAX_GRID)
    ceil_w = adaptive_w.to(tl.int32)
    ceil_w = tl.where(ceil_w.to(compute) < adaptive_w, ceil_w + 1, ceil_w)
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, ceil_h)
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, ceil_w)
    count = grid_h.to(compute) * grid_w.to(compute)
    count = tl.where(count > 1.0, count, 1.0)
    return n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _sample_position(first, i, bin_size, grid, FP64: tl.constexpr):
    """Sample i of a bin whose first edge is `first` (start + p * bin_size):
    first + (i + .5) * bin_size / grid, in torchvision's order of operations."""
    along, steps = tl.broadcast((tl.cast(i, bin_size.dtype) + 0.5) * bin_size,
                                tl.cast(grid, bin_size.dtype))  # fmt: skip
    if FP64:
        along = along / steps
    else:
        along = tl.div_rn(along, steps)
    return first + along


@triton.jit
def _bilinear_axis(v, size):
    """bilinear_taps along one axis: (low, high, weight of low, weight of high, inside). Outside
    (more than a pixel off the map, or NaN) gives indices 0 and inside False."""
    inside = (v >= -1.0) & (v <= size)
    v = tl.where(inside & (v > 0), v, 0.0)
    low = v.to(tl.int32)
    at_end = low >= size - 1
    low = tl.where(at_end, size - 1, low)
    high = tl.where(at_end, size - 1, low + 1)
    v = tl.where(at_end, low.to(v.dtype), v)
    frac = v - low.to(v.dtype)
    return low, high, 1.0 - frac, frac, inside


@triton.jit
def _tap_shares(hy, ly, hx, lx, count, FP64: tl.constexpr):
    """The backward's weights of a sample's 4 taps: tap weight / count."""
    if FP64:
        w1 = hy * hx / count
        w2 = hy * lx / count
        w3 = ly * hx / count
        w4 = ly * lx / count
    else:
        c = tl.broadcast_to(count, (hy * hx).shape)
        w1 = tl.div_rn(hy * hx, c)
        w2 = tl.div_rn(hy * lx, c)
        w3 = tl.div_rn(ly * hx, c)
        w4 = tl.div_rn(ly * lx, c)
    return w1, w2, w3, w4


@triton.jit
def roi_check_kernel(
    rois_ptr, result_ptr,
    K, N, s_roi_k, s_roi_c, scale_bits, pooled_h, pooled_w, sampling_ratio,
    FP64: tl.constexpr, CHECK_GRID: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program, BLOCK RoIs a step. result (int32, [2]): the first RoI with a non-finite
    coordinate or a batch index that is not an integer in [0, N) (check_roi_boxes), and with
    CHECK_GRID (roi_align) the first whose sampling grid (roi_align_geometry's) has more than
    MAX_GRID points a side or MAX_ROI_SAMPLES in all its bins; K where there is none."""
    compute = tl.float64 if FP64 else tl.float32
    largest = _FLOAT64_MAX if FP64 else _FLOAT32_MAX
    scale = _spatial_scale(scale_bits, FP64)
    first_box = tl.full((), 0, tl.int32) + K
    first_grid = tl.full((), 0, tl.int32) + K
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        k_ok = k < K
        roi = rois_ptr + k.to(tl.int64) * s_roi_k
        b = tl.load(roi, mask=k_ok, other=0.0).to(compute)
        x1 = tl.load(roi + s_roi_c, mask=k_ok, other=0.0).to(compute)
        y1 = tl.load(roi + 2 * s_roi_c, mask=k_ok, other=0.0).to(compute)
        x2 = tl.load(roi + 3 * s_roi_c, mask=k_ok, other=0.0).to(compute)
        y2 = tl.load(roi + 4 * s_roi_c, mask=k_ok, other=0.0).to(compute)
        good = (b >= 0.0) & (b < N) & (b == tl.floor(b))
        good = good & (tl.abs(x1) <= largest) & (tl.abs(y1) <= largest)  # NaN compares false
        good = good & (tl.abs(x2) <= largest) & (tl.abs(y2) <= largest)
        first_box = tl.minimum(first_box, tl.min(tl.where(good | ~k_ok, K, k), axis=0))
        if CHECK_GRID:
            offset = 0.5 if ALIGNED else 0.0
            width = (x2 * scale - offset) - (x1 * scale - offset)
            height = (y2 * scale - offset) - (y1 * scale - offset)
            if not ALIGNED:
                width = tl.where(width > 1.0, width, 1.0)
                height = tl.where(height > 1.0, height, 1.0)
            ph = tl.cast(pooled_h, compute)
            pw = tl.cast(pooled_w, compute)
            if FP64:
                bin_h = height / ph
                bin_w = width / pw
            else:
                bin_h = tl.div_rn(height, tl.broadcast_to(ph, height.shape))
                bin_w = tl.div_rn(width, tl.broadcast_to(pw, width.shape))
            ratio = tl.cast(sampling_ratio, compute)
            grid_h = tl.where(sampling_ratio > 0, ratio, tl.ceil(tl.where(bin_h > 0, bin_h, 0.0)))
            grid_w = tl.where(sampling_ratio > 0, ratio, tl.ceil(tl.where(bin_w > 0, bin_w, 0.0)))
            samples = grid_h * grid_w * (ph * pw)
            big = (grid_h > MAX_GRID) | (grid_w > MAX_GRID) | (samples > MAX_ROI_SAMPLES)
            first_grid = tl.minimum(first_grid,
                                    tl.min(tl.where(big & good & k_ok, k, K), axis=0))  # fmt: skip
    tl.store(result_ptr, first_box)
    tl.store(result_ptr + 1, first_grid)


@triton.jit
def _roi_align_fwd_kernel(
    input_ptr, rois_ptr, out_ptr,
    N, C, H, W, pooled_h, pooled_w, sampling_ratio, scale_bits,
    s_in_n, s_in_c, s_in_h, s_in_w, s_roi_k, s_roi_c, s_out_k, s_out_c, s_out_h, s_out_w,
    ALIGNED: tl.constexpr, FP64: tl.constexpr, CHANNELS_FAST: tl.constexpr,
    BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[k, c, ph, pw]: the mean over bin (ph, pw)'s sample points of the bilinear
    interpolation of channel c of RoI k's image. Grid: (K * bin blocks, channel blocks)."""
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
    n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _roi_align_geometry(
        rois_ptr, k, s_roi_k, s_roi_c, scale, N, pooled_h, pooled_w, sampling_ratio,
        ALIGNED, FP64,
    )  # fmt: skip
    first_y = start_h + ph.to(compute) * bin_h
    first_x = start_w + pw.to(compute) * bin_w
    image = input_ptr + n.to(tl.int64) * s_in_n
    c_off = tl.expand_dims(chans.to(tl.int64) * s_in_c, 1 - BINS)
    acc = tl.zeros_like(c_off + tl.expand_dims(first_y, BINS))
    for iy in range(0, grid_h):
        y = _sample_position(first_y, iy, bin_h, grid_h, FP64)
        y_low, y_high, hy, ly, y_in = _bilinear_axis(y, H)
        row_low = y_low.to(tl.int64) * s_in_h
        row_high = y_high.to(tl.int64) * s_in_h
        for ix in range(0, grid_w):
            x = _sample_position(first_x, ix, bin_w, grid_w, FP64)
            x_low, x_high, hx, lx, x_in = _bilinear_axis(x, W)
            col_low = x_low.to(tl.int64) * s_in_w
            col_high = x_high.to(tl.int64) * s_in_w
            # Samples off the map add nothing and read nothing (NaN/inf there stay out).
            ok = tl.expand_dims(y_in & x_in & bin_ok, BINS) & c_ok
            src = image + c_off
            v1 = tl.load(src + tl.expand_dims(row_low + col_low, BINS), mask=ok, other=0.0)
            v2 = tl.load(src + tl.expand_dims(row_low + col_high, BINS), mask=ok, other=0.0)
            v3 = tl.load(src + tl.expand_dims(row_high + col_low, BINS), mask=ok, other=0.0)
            v4 = tl.load(src + tl.expand_dims(row_high + col_high, BINS), mask=ok, other=0.0)
            acc += (
                tl.expand_dims(hy * hx, BINS) * v1.to(compute)
                + tl.expand_dims(hy * lx, BINS) * v2.to(compute)
                + tl.expand_dims(ly * hx, BINS) * v3.to(compute)
                + tl.expand_dims(ly * lx, BINS) * v4.to(compute)
            )
    if FP64:
        out = acc / count
    else:
        out = tl.div_rn(acc, tl.broadcast_to(count, acc.shape))
    dst = (
        out_ptr
        + k.to(tl.int64) * s_out_k
        + tl.expand_dims(chans.to(tl.int64) * s_out_c, 1 - BINS)
        + tl.expand_dims(ph.to(tl.int64) * s_out_h + pw.to(tl.int64) * s_out_w, BINS)
    )
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=tl.expand_dims(bin_ok, BINS) & c_ok)


@triton.jit
def _roi_align_bwd_kernel(
    grad_ptr, rois_ptr, gi_ptr,
    N, C, H, W, pooled_h, pooled_w, sampling_ratio, scale_bits,
    s_g_k, s_g_c, s_g_h, s_g_w, s_roi_k, s_roi_c, s_gi_n, s_gi_c, s_gi_h, s_gi_w,
    ALIGNED: tl.constexpr, FP64: tl.constexpr, CHANNELS_FAST: tl.constexpr,
    BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad input += each sample's share of its bin's gradient, on its 4 taps, with atomic adds
    into gi (float32, or float64 with FP64; zeroed by the launcher). A term is
    grad * (tap weight / count). Grid and tiling as the forward's."""
    compute = tl.float64 if FP64 else tl.float32
    BINS: tl.constexpr = 1 if CHANNELS_FAST else 0
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
    n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _roi_align_geometry(
        rois_ptr, k, s_roi_k, s_roi_c, scale, N, pooled_h, pooled_w, sampling_ratio,
        ALIGNED, FP64,
    )  # fmt: skip
    src = (
        grad_ptr
        + k.to(tl.int64) * s_g_k
        + tl.expand_dims(chans.to(tl.int64) * s_g_c, 1 - BINS)
        + tl.expand_dims(ph.to(tl.int64) * s_g_h + pw.to(tl.int64) * s_g_w, BINS)
    )
    g = tl.load(src, mask=tl.expand_dims(bin_ok, BINS) & c_ok, other=0.0).to(compute)
    first_y = start_h + ph.to(compute) * bin_h
    first_x = start_w + pw.to(compute) * bin_w
    image = gi_ptr + n.to(tl.int64) * s_gi_n
    c_off = tl.expand_dims(chans.to(tl.int64) * s_gi_c, 1 - BINS)
    for iy in range(0, grid_h):
        y = _sample_position(first_y, iy, bin_h, grid_h, FP64)
        y_low, y_high, hy, ly, y_in = _bilinear_axis(y, H)
        row_low = y_low.to(tl.int64) * s_gi_h
        row_high = y_high.to(tl.int64) * s_gi_h
        for ix in range(0, grid_w):
            x = _sample_position(first_x, ix, bin_w, grid_w, FP64)
            x_low, x_high, hx, lx, x_in = _bilinear_axis(x, W)
            col_low = x_low.to(tl.int64) * s_gi_w
            col_high = x_high.to(tl.int64) * s_gi_w
            ok = tl.expand_dims(y_in & x_in & bin_ok, BINS) & c_ok
            w1, w2, w3, w4 = _tap_shares(hy, ly, hx, lx, count, FP64)
            tl.atomic_add(image + tl.expand_dims(row_low + col_low, BINS) + c_off,
                          g * tl.expand_dims(w1, BINS), mask=ok, sem="relaxed")  # fmt: skip
            tl.atomic_add(image + tl.expand_dims(row_low + col_high, BINS) + c_off,
                          g * tl.expand_dims(w2, BINS), mask=ok, sem="relaxed")  # fmt: skip
            tl.atomic_add(image + tl.expand_dims(row_high + col_low, BINS) + c_off,
                          g * tl.expand_dims(w3, BINS), mask=ok, sem="relaxed")  # fmt: skip
            tl.atomic_add(image + tl.expand_dims(row_high + col_high, BINS) + c_off,
                          g * tl.expand_dims(w4, BINS), mask=ok, sem="relaxed")  # fmt: skip


@triton.jit
def _sample_candidates(p, start, bin_size, grid, pooled, FP64: tl.constexpr):
    """[lo, hi]: the sample indices s = bin * grid + i along one axis (clamped to
    [0, pooled * grid)) whose taps may touch pixel p. A sample touches p only from a position
    in [p - 1, p + 1), or [-1, 0] (read as 0) for p <= 1, or [size - 1, size] for the last
    pixel: all inside [p - 2, p + 1]. Inverting the position start + (s + .5) * step, step =
    bin_size / grid, gives the range, widened by one sample for rounding: a position's rounding
    error is a few ulps of `far` (the largest magnitude in it), which the test below keeps
    under 1/16 of a step. Otherwise (steps of about zero) every sample is a candidate. The
    caller checks each candidate exactly: the range only has to hold every sample that touches
    p."""
    compute = tl.float64 if FP64 else tl.float32
    rel = 7.105427357601002e-15 if FP64 else 3.814697265625e-06  # 2^-47, 2^-18
    last = (pooled * grid - 1).to(compute)
    step = bin_size / tl.cast(grid, compute)
    pf = p.to(compute)
    far = tl.abs(start) + tl.abs(bin_size) * tl.cast(pooled, compute) + pf + 2.0
    if tl.abs(step) > far * rel:  # False for NaN and 0; then |a|, |b| < 1 / rel
        a = (pf - 2.0 - start) / step - 0.5
        b = (pf + 1.0 - start) / step - 0.5
        lo = tl.floor(tl.minimum(a, b)) - 1.0
        hi = tl.ceil(tl.maximum(a, b)) + 1.0
        lo = tl.where(lo > 0.0, lo, 0.0)
        hi = tl.where(hi < last, hi, last)
    else:
        lo = tl.zeros_like(last)
        hi = last
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _roi_align_bwd_deterministic_kernel(
    grad_ptr, rois_ptr, gi_ptr,
    K, N, C, H, W, pooled_h, pooled_w, sampling_ratio, scale_bits,
    s_g_k, s_g_c, s_g_h, s_g_w, s_roi_k, s_roi_c, s_gi_n, s_gi_c, s_gi_h, s_gi_w,
    ALIGNED: tl.constexpr, FP64: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad input without atomics, bitwise reproducible: a program owns pixel (n, py, px) for
    BLOCK_C channels (grid: (N * H * W, channel blocks)) and sums, RoI by RoI in order, the
    terms the atomic kernel adds there (the same grad * (tap weight / count)), in a fixed order.
    Per RoI of image n near the pixel: the sample rows and columns whose taps may touch it come
    from inverting the sample position (_sample_candidates); they are taken BLOCK_Y rows x
    BLOCK_X columns at a time, their taps computed as vectors and checked exactly, and where a
    (row, column) sample touches the pixel its bin's gradient is loaded (a [BLOCK_Y, BLOCK_X,
    BLOCK_C] tile, masked to the touching samples), weighted per tap and summed. Writes gi (the
    result's dtype and layout) once; memory O(output)."""
    compute = tl.float64 if FP64 else tl.float32
    pixel = tl.program_id(0)
    plane = H * W
    n = pixel // plane
    py = (pixel % plane) // W
    px = pixel % W
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chans < C
    g_chan = (chans.to(tl.int64) * s_g_c)[None, None, :]
    c_mask = c_ok[None, None, :]
    scale = _spatial_scale(scale_bits, FP64)
    acc = tl.zeros((BLOCK_C,), compute)
    offset = 0.5 if ALIGNED else 0.0
    rel = 7.105427357601002e-15 if FP64 else 3.814697265625e-06  # 2^-47, 2^-18
    pyf = py.to(compute)
    pxf = px.to(compute)
    for k in range(0, K):
        # Most RoIs are of another image or far from the pixel: those are passed over from
        # their corners, without their geometry. The clamp of the image index is the
        # geometry's. The samples lie between the scaled corners, or within a pixel past the
        # start (unaligned RoIs are at least 1 x 1); their taps within 2 pixels of them.
        roi = rois_ptr + tl.cast(k, tl.int64) * s_roi_k
        image = tl.load(roi).to(compute)
        image = tl.where(image > 0, image, 0.0)
        image = tl.where(image < N - 1, image, N - 1).to(tl.int32)
        y1 = tl.load(roi + 2 * s_roi_c).to(compute) * scale - offset
        y2 = tl.load(roi + 4 * s_roi_c).to(compute) * scale - offset
        x1 = tl.load(roi + s_roi_c).to(compute) * scale - offset
        x2 = tl.load(roi + 3 * s_roi_c).to(compute) * scale - offset
        slack_y = 3.0 + (tl.abs(y1) + tl.abs(y2)) * rel
        slack_x = 3.0 + (tl.abs(x1) + tl.abs(x2)) * rel
        near = (pyf >= tl.minimum(y1, y2) - slack_y) & (pyf <= tl.maximum(y1 + 1.0, y2) + slack_y)
        near = near & (pxf >= tl.minimum(x1, x2) - slack_x)
        near = near & (pxf <= tl.maximum(x1 + 1.0, x2) + slack_x)
        if (image == n) & near:
            _, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _roi_align_geometry(
                rois_ptr, k, s_roi_k, s_roi_c, scale, N, pooled_h, pooled_w, sampling_ratio,
                ALIGNED, FP64,
            )  # fmt: skip
            sy_lo, sy_hi = _sample_candidates(py, start_h, bin_h, grid_h, pooled_h, FP64)
            sx_lo, sx_hi = _sample_candidates(px, start_w, bin_w, grid_w, pooled_w, FP64)
            g_roi = grad_ptr + tl.cast(k, tl.int64) * s_g_k + g_chan
            for sy0 in range(sy_lo, sy_hi + 1, BLOCK_Y):
                sy = sy0 + tl.arange(0, BLOCK_Y)
                ph = sy // grid_h
                y = _sample_position(start_h + ph.to(compute) * bin_h, sy - ph * grid_h, bin_h,
                                     grid_h, FP64)  # fmt: skip
                y_low, y_high, hy, ly, y_in = _bilinear_axis(y, H)
                y_in = y_in & (sy <= sy_hi)
                low_y = y_in & (y_low == py)
                high_y = y_in & (y_high == py)
                if tl.max((low_y | high_y).to(tl.int32), axis=0) > 0:
                    g_rows = g_roi + (ph.to(tl.int64) * s_g_h)[:, None, None]
                    for sx0 in range(sx_lo, sx_hi + 1, BLOCK_X):
                        sx = sx0 + tl.arange(0, BLOCK_X)
                        pw = sx // grid_w
                        x = _sample_position(start_w + pw.to(compute) * bin_w, sx - pw * grid_w,
                                             bin_w, grid_w, FP64)  # fmt: skip
                        x_low, x_high, hx, lx, x_in = _bilinear_axis(x, W)
                        x_in = x_in & (sx <= sx_hi)
                        low_x = x_in & (x_low == px)
                        high_x = x_in & (x_high == px)
                        if tl.max((low_x | high_x).to(tl.int32), axis=0) > 0:
                            m1 = low_y[:, None] & low_x[None, :]
                            m2 = low_y[:, None] & high_x[None, :]
                            m3 = high_y[:, None] & low_x[None, :]
                            m4 = high_y[:, None] & high_x[None, :]
                            touch = (m1 | m2 | m3 | m4)[:, :, None]
                            src = g_rows + (pw.to(tl.int64) * s_g_w)[None, :, None]
                            g = tl.load(src, mask=touch & c_mask, other=0.0).to(compute)
                            w1, w2, w3, w4 = _tap_shares(hy[:, None], ly[:, None], hx[None, :],
                                                         lx[None, :], count, FP64)  # fmt: skip
                            term = tl.where(m1[:, :, None], g * w1[:, :, None], 0.0)
                            term += tl.where(m2[:, :, None], g * w2[:, :, None], 0.0)
                            term += tl.where(m3[:, :, None], g * w3[:, :, None], 0.0)
                            term += tl.where(m4[:, :, None], g * w4[:, :, None], 0.0)
                            acc += tl.sum(tl.sum(term, axis=0), axis=0)
    dst = (
        gi_ptr
        + n.to(tl.int64) * s_gi_n
        + py.to(tl.int64) * s_gi_h
        + px.to(tl.int64) * s_gi_w
        + chans.to(tl.int64) * s_gi_c
    )
    tl.store(dst, acc.to(gi_ptr.dtype.element_ty), mask=c_ok)
