"""Triton kernels for conv2d. Imports nothing from cnnops: cnnops/ops/conv2d.py launches them.

Every kernel takes its tensors' element strides, so one kernel serves NCHW and channels_last
(in channels_last, a block of channels is contiguous and its loads coalesce). Accumulation is in
float32 (float64 for float64 inputs, FP64 set); the result is cast back on store.

depthwise: groups == C_in, `mult` output channels per input channel (output channel k reads
input channel k // mult). A program computes BLOCK_Q output columns x BLOCK_C output channels of
one output row; the kernel's taps are unrolled (R and S are constexpr: the 3x3, 5x5 and 7x7
layers each get their own specialisation, as do strides 1 and 2).
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
):  # fmt: skip
    np_ = tl.program_id(0)
    n = (np_ // P).to(tl.int64)  # offsets in int64: tensors may pass 2^31 elements
    p = (np_ % P).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    k = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok = q < Q
    k_ok = k < K
    c = k // mult
    c64 = c.to(tl.int64)  # a channel's plane offset may pass 2^31 (NCHW)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
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
