"""Triton kernels for conv2d. Imports nothing from cnnops: cnnops/ops/conv2d.py launches them.

Every kernel takes its tensors' element strides, so one kernel serves NCHW and channels_last
(in channels_last, a block of channels is contiguous and its loads coalesce). Accumulation is in
float32 (float64 for float64 inputs, FP64 set); the result is cast back on store.

depthwise: groups == C_in, `mult` output channels per input channel (output channel k reads
input channel k // mult). A program computes BLOCK_Q output columns x BLOCK_C output channels of
one output row: in channels_last the channels are the contiguous, vectorised dimension. The
forward loads each input row of its tile, halo included, once. The kernel's taps are unrolled
(R and S are constexpr: the 3x3, 5x5 and 7x7 layers each get their own specialisation, as do
strides 1 and 2).
"""

import triton
import triton.language as tl


@triton.jit
def depthwise_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, P, Q, K, mult,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP64: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_X: tl.constexpr,
):  # fmt: skip
    """BLOCK_X > 0: each of the R input rows the program reads is loaded once, as a tile of
    BLOCK_X columns (the BLOCK_Q outputs' columns and their halo, (BLOCK_Q - 1) * stride +
    (S - 1) * dilation + 1 of them, rounded up to a power of two) x BLOCK_C channels; each tap's
    window is then gathered from that tile in registers and shared memory, not reloaded.
    BLOCK_X == 0 (a halo too wide for registers: large dilations): each tap loads its window."""
    np_ = tl.program_id(0)
    n = (np_ // P).to(tl.int64)  # offsets in int64: tensors may pass 2^31 elements
    p = (np_ % P).to(tl.int64)
    q0 = tl.program_id(1) * BLOCK_Q
    q = q0 + tl.arange(0, BLOCK_Q)
    k = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok = q < Q
    k_ok = k < K
    c = k // mult
    c64 = c.to(tl.int64)  # a channel's plane offset may pass 2^31 (NCHW)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    if BLOCK_X > 0:
        # The tile's input columns: the first output's first tap onwards.
        x = q0 * STRIDE_W - pad_w + tl.arange(0, BLOCK_X)
        x_ok = (
            (x >= 0)
            & (x < W)
            & (tl.arange(0, BLOCK_X) < (BLOCK_Q - 1) * STRIDE_W + (S - 1) * dil_w + 1)
        )
        for r in tl.static_range(R):
            y = (p * STRIDE_H - pad_h + r * dil_h).to(tl.int64)
            ok = (x_ok & (y >= 0) & (y < H))[:, None] & k_ok[None, :]
            src = x_ptr + n * sxn + y * sxh + x[:, None].to(tl.int64) * sxw + c64[None, :] * sxc
            tile = tl.load(src, mask=ok, other=0.0).to(acc.dtype)
            for s in tl.static_range(S):
                window = tl.arange(0, BLOCK_Q) * STRIDE_W + s * dil_w  # columns within the tile
                xv = tl.gather(tile, tl.broadcast_to(window[:, None], (BLOCK_Q, BLOCK_C)), axis=0)
                wv = tl.load(w_ptr + k * (R * S) + (r * S + s), mask=k_ok, other=0.0)
                acc += xv * wv.to(acc.dtype)[None, :]
    else:
        for r in tl.static_range(R):
            y = (p * STRIDE_H - pad_h + r * dil_h).to(tl.int64)
            row_ok = (y >= 0) & (y < H)
            for s in tl.static_range(S):
                x = q * STRIDE_W - pad_w + s * dil_w
                ok = (row_ok & (x >= 0) & (x < W) & q_ok)[:, None] & k_ok[None, :]
                src = x_ptr + n * sxn + y * sxh + x[:, None] * sxw + c64[None, :] * sxc
                xv = tl.load(src, mask=ok, other=0.0)
                wv = tl.load(w_ptr + k * (R * S) + (r * S + s), mask=k_ok, other=0.0)
                acc += xv.to(acc.dtype) * wv.to(acc.dtype)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + k, mask=k_ok, other=0.0).to(acc.dtype)[None, :]
    out = y_ptr + n * syn + p * syh + q[:, None] * syw + k[None, :].to(tl.int64) * syc
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=q_ok[:, None] & k_ok[None, :])


@triton.jit
def depthwise_grad_input_kernel(
    go_ptr, w_ptr, gi_ptr,
    H, W, P, Q, C, mult,
    son, soc, soh, sow,
    sin_, sic, sih, siw,
    pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    FP64: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """A gather: input pixel (y, x) of channel c sums grad output (p, q) of channels
    c * mult + j times their tap (r, s), over the taps whose read lands on it. Each program
    writes its own block of grad input: no atomics, so the result is deterministic."""
    ny = tl.program_id(0)
    n = (ny // H).to(tl.int64)  # offsets in int64: tensors may pass 2^31 elements
    y = (ny % H).to(tl.int64)
    x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_ok = x < W
    c_ok = c < C
    acc = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    for r in tl.static_range(R):
        p_num = y + pad_h - r * dil_h
        p = p_num // STRIDE_H
        row_ok = (p_num >= 0) & (p_num % STRIDE_H == 0) & (p < P)
        for s in tl.static_range(S):
            q_num = x + pad_w - s * dil_w
            q = q_num // STRIDE_W
            ok = row_ok & (q_num >= 0) & (q_num % STRIDE_W == 0) & (q < Q) & x_ok
            ok2 = ok[:, None] & c_ok[None, :]
            for j in range(mult):
                k = (c * mult + j).to(tl.int64)
                gv = tl.load(
                    go_ptr + n * son + p * soh + q[:, None] * sow + k[None, :] * soc,
                    mask=ok2,
                    other=0.0,
                )
                wv = tl.load(w_ptr + k * (R * S) + (r * S + s), mask=c_ok, other=0.0)
                acc += gv.to(acc.dtype) * wv.to(acc.dtype)[None, :]
    out = gi_ptr + n * sin_ + y * sih + x[:, None] * siw + c[None, :].to(tl.int64) * sic
    tl.store(out, acc.to(gi_ptr.dtype.element_ty), mask=x_ok[:, None] & c_ok[None, :])


@triton.jit
def depthwise_grad_weight_kernel(
    go_ptr, x_ptr, gw_ptr,
    N, H, W, P, Q, K, mult,
    son, soc, soh, sow,
    sxn, sxc, sxh, sxw,
    pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    FP64: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Tap (r, s) of output channels [k0, k0 + BLOCK_C): the sum over every output pixel of grad
    output times the input that tap reads. One program per (channel block, tap) reduces the
    whole batch in a fixed order: deterministic, no atomics."""
    k = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(1)
    r = tap // S
    s = tap % S
    k_ok = k < K
    c = k // mult
    k64 = k.to(tl.int64)  # plane offsets may pass 2^31 (NCHW)
    c64 = c.to(tl.int64)
    acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    for start in range(0, N * P * Q, BLOCK_PIX):
        pix = start + tl.arange(0, BLOCK_PIX).to(tl.int64)  # may pass 2^31 elements
        pix_ok = pix < N * P * Q
        n = pix // (P * Q)
        p = (pix // Q) % P
        q = pix % Q
        y = p * STRIDE_H - pad_h + r * dil_h
        x = q * STRIDE_W - pad_w + s * dil_w
        ok = (pix_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W))[:, None] & k_ok[None, :]
        gv = tl.load(
            go_ptr + n[:, None] * son + p[:, None] * soh + q[:, None] * sow + k64[None, :] * soc,
            mask=ok,
            other=0.0,
        )
        xv = tl.load(
            x_ptr + n[:, None] * sxn + y[:, None] * sxh + x[:, None] * sxw + c64[None, :] * sxc,
            mask=ok,
            other=0.0,
        )
        acc += gv.to(acc.dtype) * xv.to(acc.dtype)
    tl.store(gw_ptr + k * (R * S) + tap, tl.sum(acc, axis=0).to(gw_ptr.dtype.element_ty), mask=k_ok)


# ---------------------------------------------------------------------------------------------
# direct and implicit_gemm: the GEMM-shaped kernels.
#
# A convolution is a GEMM whose operands are gathered on the fly, never written to memory (no
# im2col buffer): forward is (N*P*Q) x (C_in/groups * R * S) times (C_in/groups * R * S) x
# (C_out/groups), one GEMM per group, the group on grid axis 1. Each program owns a
# BLOCK_M x BLOCK_N tile of the result and walks the reduction in one flat loop over
# (tap, channel block), so that Triton pipelines the loads across taps too (a layer with 64
# channels per group has only two channel blocks per tap). Per iteration the rows' input
# coordinates and padding masks are recomputed (vectors of BLOCK_M), then a BLOCK_M x BLOCK_K
# tile of the input and a BLOCK_K x BLOCK_N tile of the weight are loaded through their strides.
# The launcher passes the activations in channels_last, so that the tiles' channels are
# contiguous and their loads vectorise, and the weight permuted so that its tile's inner
# dimension is contiguous; results are stored in whatever layout the caller's tensor has.
#
# implicit_gemm multiplies the tiles with tl.dot (tensor cores; float32 as TF32 when the caller
# allows it). direct multiplies them with plain FMAs (a broadcast product summed over BLOCK_K),
# exact in any dtype including float64, which tensor cores do not take.
#
# Backward: grad input is the transposed problem, (N*H*W) x (C_out/groups * R * S) times
# (C_out/groups * R * S) x (C_in/groups): input pixel (y, x) gathers grad output (p, q) over the
# taps whose read lands on it (with stride > 1, only the taps where the stride divides the
# offset; the rest are masked). grad weight is (C_out/groups) x (N*P*Q) times (N*P*Q) x
# (C_in/groups) for each tap: the reduction over N*P*Q is split into SPLIT chunks, each program
# writes its chunk's partial sum, and the launcher adds the partials: deterministic, no atomics,
# and enough programs for a GPU even when C_out * C_in is small.


@triton.jit
def _multiply_accumulate(acc, a, b, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if USE_DOT:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        return acc + tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)


@triton.jit
def conv2d_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, H, W, P, Q, CG, KG, R, S,
    sxn, sxc, sxh, sxw,
    swr, sws, swc, swk,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(1)
    # Neighbouring programs take the output-channel tiles of one pixel tile: its input tile is
    # read from L2 by all of them (the weight is small enough to stay there anyway).
    n_tiles = tl.cdiv(KG, BLOCK_N)
    # Rows: output pixels n*P*Q + p*Q + q (fewer than 2^31: the launcher checks). What a row
    # keeps across the loop is small, because a warp's threads may all hold the same rows: its
    # address (int64: tensors may pass 2^31 elements) and its first input row and column, which
    # rows past the end push out of range so that one bounds test covers them.
    m = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = m // (P * Q)
    p = (m // Q) % P
    q = m % Q
    y0 = tl.where(m < N * P * Q, p * stride_h - pad_h, -H - (R - 1) * dil_h - 1)
    x0 = q * stride_w - pad_w
    x_rows = x_ptr + n.to(tl.int64) * sxn + (g * CG).to(tl.int64) * sxc
    k = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # channel in the group
    k_ok = k < KG
    cb = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + (g * KG + k) * swk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if FP64 else tl.float32)
    channel_blocks = tl.cdiv(CG, BLOCK_K)
    for i in range(R * S * channel_blocks):
        tap = i // channel_blocks
        r = tap // S
        s = tap % S
        c = (i % channel_blocks) * BLOCK_K + cb
        c_ok = c < CG
        y = y0 + r * dil_h
        x = x0 + s * dil_w
        row_ok = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        a = tl.load(
            x_rows[:, None]
            + (y.to(tl.int64) * sxh + x.to(tl.int64) * sxw)[:, None]
            + c[None, :].to(tl.int64) * sxc,
            mask=row_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_cols[None, :] + r * swr + s * sws + c[:, None] * swc,
            mask=c_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = _multiply_accumulate(acc, a, b, USE_DOT, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * KG + k, mask=k_ok, other=0.0).to(acc.dtype)[None, :]
    m_ok = m < N * P * Q
    out = (
        y_ptr
        + (n.to(tl.int64) * syn + p.to(tl.int64) * syh + q.to(tl.int64) * syw)[:, None]
        + (g * KG + k)[None, :].to(tl.int64) * syc
    )
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def conv2d_grad_input_kernel(
    go_ptr, w_ptr, gi_ptr,
    N, H, W, P, Q, CG, KG, R, S,
    son, soc, soh, sow,
    swr, sws, swk, swc,
    sin_, sic, sih, siw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(1)
    n_tiles = tl.cdiv(CG, BLOCK_N)  # neighbouring programs share a pixel tile, as in the forward
    # Rows: input pixels n*H*W + y*W + x, kept as lean as in the forward kernel. p_num and
    # q_num are the output coordinates times the stride that read (y, x) through tap (0, 0).
    m = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = m // (H * W)
    y = (m // W) % H
    x = m % W
    p0 = tl.where(m < N * H * W, y + pad_h, -1)
    q0 = x + pad_w
    go_rows = go_ptr + n.to(tl.int64) * son + (g * KG).to(tl.int64) * soc
    c = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # channel in the group
    c_ok = c < CG
    kb = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + (g * KG) * swk + c * swc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if FP64 else tl.float32)
    channel_blocks = tl.cdiv(KG, BLOCK_K)
    for i in range(R * S * channel_blocks):
        tap = i // channel_blocks
        r = tap // S
        s = tap % S
        k = (i % channel_blocks) * BLOCK_K + kb
        k_ok = k < KG
        # The output pixel that reads (y, x) through tap (r, s), where there is one.
        p_num = p0 - r * dil_h
        q_num = q0 - s * dil_w
        p = p_num // stride_h
        q = q_num // stride_w
        row_ok = (p_num >= 0) & (q_num >= 0) & (p < P) & (q < Q)
        row_ok = row_ok & (p_num % stride_h == 0) & (q_num % stride_w == 0)
        a = tl.load(
            go_rows[:, None]
            + (p.to(tl.int64) * soh + q.to(tl.int64) * sow)[:, None]
            + k[None, :].to(tl.int64) * soc,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_cols[None, :] + r * swr + s * sws + k[:, None] * swk,
            mask=k_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = _multiply_accumulate(acc, a, b, USE_DOT, INPUT_PRECISION)
    m_ok = m < N * H * W
    out = (
        gi_ptr
        + (n.to(tl.int64) * sin_ + y.to(tl.int64) * sih + x.to(tl.int64) * siw)[:, None]
        + (g * CG + c)[None, :].to(tl.int64) * sic
    )
    tl.store(out, acc.to(gi_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def conv2d_grad_weight_kernel(
    go_ptr, x_ptr, gw_ptr,
    N, H, W, P, Q, CG, KG, R, S, PIX_PER_SPLIT,
    son, soc, soh, sow,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Writes partial sums: gw_ptr is (SPLIT, C_out, C_in/groups, R, S), contiguous."""
    n_blocks = tl.cdiv(CG, BLOCK_N)
    k = (tl.program_id(0) // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel in group
    c = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel in group
    k_ok = k < KG
    c_ok = c < CG
    groups = tl.num_programs(1) // (R * S)
    g = tl.program_id(1) // (R * S)
    tap = tl.program_id(1) % (R * S)
    r = tap // S
    s = tap % S
    split = tl.program_id(2)
    go_cols = go_ptr + (g * KG + k).to(tl.int64) * soc
    x_cols = x_ptr + (g * CG + c).to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if FP64 else tl.float32)
    start = split * PIX_PER_SPLIT  # output pixels n*P*Q + p*Q + q (fewer than 2^31)
    end = tl.minimum(start + PIX_PER_SPLIT, N * P * Q)
    for pix0 in range(start, end, BLOCK_K):
        pix = pix0 + tl.arange(0, BLOCK_K)
        pix_ok = pix < end
        n = (pix // (P * Q)).to(tl.int64)
        p = (pix // Q) % P
        q = pix % Q
        y = p * stride_h - pad_h + r * dil_h
        x = q * stride_w - pad_w + s * dil_w
        in_ok = pix_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        a = tl.load(
            go_cols[:, None] + (n * son + p.to(tl.int64) * soh + q.to(tl.int64) * sow)[None, :],
            mask=k_ok[:, None] & pix_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            x_cols[None, :] + (n * sxn + y.to(tl.int64) * sxh + x.to(tl.int64) * sxw)[:, None],
            mask=in_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = _multiply_accumulate(acc, a, b, USE_DOT, INPUT_PRECISION)
    out = gw_ptr + (((split * groups + g) * KG + k[:, None]).to(tl.int64) * CG + c[None, :]) * (
        R * S
    )
    tl.store(out + tap, acc.to(gw_ptr.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])
