"""Triton kernels for nms, batched_nms, soft_nms and box_iou. Imports nothing from cnnops:
cnnops/ops/nms.py sorts the boxes, launches these kernels and maps the result back.

Boxes are (x1, y1, x2, y2). The arithmetic is torchvision's, operation for operation
(csrc/ops/nms.h): area = (x2 - x1) * (y2 - y1), the intersection is the clamped overlap, and
IoU = inter / (area_a + area_b - inter), divided with round-to-nearest (tl.div_rn: Triton's `/`
on float32 is an approximate division). One difference may remain on a GPU: Triton, like nvcc for
torchvision's CUDA kernel, may fuse inter's product into the union's subtraction (an FMA).
Coordinates are loaded in their own dtype and computed in float32, or float64 (FP64).

nms runs in two kernels over the boxes sorted by descending score:
1. nms_iou_mask_kernel writes, for every sorted box i and every word w of WORD_BITS later boxes,
   one int64 word whose bit b says "box i suppresses box w * WORD_BITS + b" (IoU above the
   threshold, same class when classes are given, and j > i). A program computes a BLOCK_ROWS x
   WORD_BITS tile of IoUs and packs each row into its word; words before a row's own word are
   never read, and programs whose words all lie before their rows do nothing.
2. nms_greedy_kernel, one program, walks the sorted boxes a word (WORD_BITS boxes) at a time.
   Inside the word the greedy choice is found as a fixed point, in as many rounds as its longest
   chain of suppressions; the kept boxes' mask rows are then OR-ed, a chunk of words at a time,
   into the "removed" words of the boxes after the block, which live in a global scratch
   tensor. No host round trip: the mask never leaves the device.

soft_nms_kernel runs Soft-NMS in one program, one sweep over the boxes per pick (see there).
"""

import triton
import triton.language as tl


@triton.jit
def _box_iou_tile(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, FP64: tl.constexpr):
    """IoU of every row box a (column vectors [R, 1]) with every column box b ([1, C])."""
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1)
    h = tl.minimum(ay2, by2) - tl.maximum(ay1, by1)
    inter = tl.maximum(w, 0.0) * tl.maximum(h, 0.0)
    union = area_a + area_b - inter
    if FP64:
        iou = inter / union  # float64 division is IEEE-rounded already
    else:
        iou = tl.div_rn(inter, union)
    return iou


@triton.jit
def _load_boxes(ptr, index, ok, stride_n, stride_c, dtype):
    """The four coordinates of boxes `index` (masked by `ok`), converted to `dtype`."""
    base = ptr + index.to(tl.int64) * stride_n
    x1 = tl.load(base, mask=ok, other=0.0).to(dtype)
    y1 = tl.load(base + stride_c, mask=ok, other=0.0).to(dtype)
    x2 = tl.load(base + 2 * stride_c, mask=ok, other=0.0).to(dtype)
    y2 = tl.load(base + 3 * stride_c, mask=ok, other=0.0).to(dtype)
    return x1, y1, x2, y2


@triton.jit
def box_iou_kernel(
    a_ptr, b_ptr, out_ptr,
    N, M,
    sa_n, sa_c, sb_n, sb_c, so_n, so_m,
    FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """out[i, j] = IoU(a[i], b[j]). A program computes a BLOCK_N x BLOCK_M tile from
    BLOCK_N + BLOCK_M boxes; the store along j is contiguous (out is row-major)."""
    compute = tl.float64 if FP64 else tl.float32
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < N
    j_ok = j < M
    ax1, ay1, ax2, ay2 = _load_boxes(a_ptr, i, i_ok, sa_n, sa_c, compute)
    bx1, by1, bx2, by2 = _load_boxes(b_ptr, j, j_ok, sb_n, sb_c, compute)
    iou = _box_iou_tile(
        ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None],
        bx1[None, :], by1[None, :], bx2[None, :], by2[None, :], FP64,
    )  # fmt: skip
    out = out_ptr + i[:, None].to(tl.int64) * so_n + j[None, :].to(tl.int64) * so_m
    tl.store(out, iou.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def nms_iou_mask_kernel(
    boxes_ptr, classes_ptr, threshold_ptr, mask_ptr,
    N, n_words,
    HAS_CLASSES: tl.constexpr, FP64: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    WORD_BITS: tl.constexpr,
):  # fmt: skip
    """mask[i, w] (int64, [N, n_words]): bit b set when sorted box i suppresses sorted box
    j = w * WORD_BITS + b. boxes: [N, 4] contiguous, in the compute dtype (float64 with FP64,
    else float32); classes: [N] int64;
    threshold: one element of the compute dtype (see the launcher: the float32 value below the
    float64 threshold reproduces torchvision's float-vs-double comparison)."""
    row_block = tl.program_id(0)
    word = tl.program_id(1)
    first_row = row_block * BLOCK_ROWS
    # Only the words at or after a row's own word are read by the greedy pass.
    if (word + 1) * WORD_BITS > first_row:
        rows = first_row + tl.arange(0, BLOCK_ROWS)
        bits = tl.arange(0, WORD_BITS)
        cols = word * WORD_BITS + bits
        row_ok = rows < N
        col_ok = cols < N
        compute = boxes_ptr.dtype.element_ty
        ax1, ay1, ax2, ay2 = _load_boxes(boxes_ptr, rows, row_ok, 4, 1, compute)
        bx1, by1, bx2, by2 = _load_boxes(boxes_ptr, cols, col_ok, 4, 1, compute)
        iou = _box_iou_tile(
            ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None],
            bx1[None, :], by1[None, :], bx2[None, :], by2[None, :], FP64,
        )  # fmt: skip
        threshold = tl.load(threshold_ptr)
        # NaN IoUs (two empty boxes) compare false, as in torchvision.
        over = (iou > threshold) & (cols[None, :] > rows[:, None]) & col_ok[None, :]
        if HAS_CLASSES:
            row_class = tl.load(classes_ptr + rows, mask=row_ok, other=0)
            col_class = tl.load(classes_ptr + cols, mask=col_ok, other=0)
            over = over & (row_class[:, None] == col_class[None, :])
        one = tl.full((1, WORD_BITS), 1, tl.int64)
        flags = tl.where(over, one << bits[None, :].to(tl.int64), 0)
        # Each column owns a distinct bit, so their sum is their OR.
        words = tl.sum(flags, axis=1)
        tl.store(mask_ptr + rows.to(tl.int64) * n_words + word, words, mask=row_ok)


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def nms_greedy_kernel(
    mask_ptr, valid_ptr, removed_ptr, keep_ptr,
    N, n_words, max_output,
    WORD_BITS: tl.constexpr, CHUNK_WORDS: tl.constexpr,
):  # fmt: skip
    """Launched with one program. keep[i] (int8) = 1 when sorted box i is kept: valid (it
    passed the score threshold), not suppressed by an earlier kept box, and among the first
    max_output kept. removed: [n_words] int64 scratch, zeroed, the suppression bits that kept
    boxes of earlier blocks have set on later boxes.

    Per block of WORD_BITS boxes: the block's removed word and its diagonal mask words (each
    box's bits on the boxes after it in the block) come into registers. The greedy choice inside
    the block is the fixed point of kept = candidates & ~OR(diagonal of the kept boxes): bit b of
    the right side depends only on the bits below b, so the fixed point is unique (it is the
    greedy answer), and iterating from kept = candidates fixes at least the lowest wrong bit
    each round. That takes as many rounds as the longest chain of suppressions in the block,
    plus one, at most WORD_BITS + 1; a box-by-box walk would take WORD_BITS rounds, each as
    costly (one reduction across the block). Then the kept boxes' rows of the mask,
    CHUNK_WORDS words at a time, are OR-ed down the rows into the removed words of the later
    blocks; masked-off rows (boxes not kept) are not read."""
    lanes = tl.arange(0, WORD_BITS)
    lane_bits = tl.full((WORD_BITS,), 1, tl.int64) << lanes.to(tl.int64)
    count = tl.full((), 0, tl.int32)
    for block in range(0, n_words):
        rows = block * WORD_BITS + lanes
        row_ok = rows < N
        mask_rows = mask_ptr + rows.to(tl.int64) * n_words
        diagonal = tl.load(mask_rows + block, mask=row_ok, other=0)
        valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
        # Boxes that fail the score threshold (or lie past N) are no candidates. The scratch
        # is read past L1 (.cg): this program wrote it, on other threads, before the barrier.
        removed = tl.load(removed_ptr + block, cache_modifier=".cg")
        candidates = tl.sum(tl.where(valid, lane_bits, 0), axis=0) & ~removed
        kept = candidates
        previous = ~candidates  # differs from kept: at least one round
        while kept != previous:
            previous = kept
            kept_rows = (kept & lane_bits) != 0
            suppressed = tl.reduce(tl.where(kept_rows, diagonal, 0), 0, _bitwise_or)
            kept = candidates & ~suppressed
        kept_rows = (kept & lane_bits) != 0
        # max_output: the block's kept boxes are a prefix of the greedy answer, so the first
        # (max_output - count) of them stay kept.
        rank = tl.cumsum(kept_rows.to(tl.int32), axis=0)
        kept_rows = kept_rows & (count + rank <= max_output)
        count += tl.sum(kept_rows.to(tl.int32), axis=0)
        tl.store(keep_ptr + rows, kept_rows.to(tl.int8), mask=row_ok)
        if tl.max(kept_rows.to(tl.int32), axis=0) != 0:
            for start in range(block + 1, n_words, CHUNK_WORDS):
                words = start + tl.arange(0, CHUNK_WORDS)
                words_ok = words < n_words
                tile = tl.load(
                    mask_rows[:, None] + words[None, :],
                    mask=kept_rows[:, None] & words_ok[None, :],
                    other=0,
                )
                set_bits = tl.reduce(tile, 0, _bitwise_or)
                old = tl.load(removed_ptr + words, mask=words_ok, other=0, cache_modifier=".cg")
                tl.store(removed_ptr + words, old | set_bits, mask=words_ok)
        # The next block reads words that other threads of this program have just stored.
        tl.debug_barrier()


@triton.jit
def _exp_nonpositive(x, FP64: tl.constexpr):
    """exp(x) for x <= 0, as csrc/ops/nms.h's exp_nonpositive (the CPU and CUDA kernels' weight),
    operation for operation: Cody-Waite reduction, Taylor polynomial, 2^n built in the exponent
    bits, 0 below -87 (float32) or -708 (float64). tl.exp would be the GPU's approximate exp2."""
    if FP64:
        underflow = x < -708.0
        x = tl.where(underflow, 0.0, x)
        shifter = 6755399441055744.0  # 1.5 * 2^52: adding and subtracting it rounds
        n = (x * 1.4426950408889634 + shifter) - shifter
        r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6
        p = tl.full(r.shape, 1.0 / 6227020800.0, tl.float64)
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        bits = tl.where(underflow, 0, (n.to(tl.int64) + 1023) << 52)
        scale = bits.to(tl.float64, bitcast=True)
    else:
        underflow = x < -87.0
        x = tl.where(underflow, 0.0, x)
        shifter = 12582912.0  # 1.5 * 2^23
        n = (x * 1.44269504088896341 + shifter) - shifter
        r = (x - n * 0.693359375) - n * -2.12194440e-4
        p = tl.full(r.shape, 1.0 / 5040.0, tl.float32)
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        bits = tl.where(underflow, 0, (n.to(tl.int32) + 127) << 23)
        scale = bits.to(tl.float32, bitcast=True)
    return p * scale


@triton.jit
def soft_nms_kernel(
    boxes_ptr, work_ptr, params_ptr, keep_ptr, kept_scores_ptr, count_ptr,
    N,
    GAUSSIAN: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Soft-NMS in one program. boxes: [N, 4] contiguous, in the compute dtype (float64 with
    FP64, else float32); work: [N] the scores in the compute dtype, overwritten with the current
    scores (NaN: dropped or picked); params: [sigma, iou_threshold, score_threshold] in the compute
    dtype (the launcher rounds the thresholds so that the comparisons are the float64 ones).
    Writes the picks to keep (int64) and kept_scores (compute dtype), and their count to count.

    A pick is one sweep over the boxes, BLOCK at a time: decay every live box by the weight of its
    IoU with the last pick (csrc/ops/nms.h's soft_nms_weight: the IoU clamped to [0, 1], NaN as
    0), drop those now below score_threshold, and keep per lane the best live box so far (strictly
    greater only: lanes see increasing indices, so the lower index wins a tie). One reduction over
    the lanes then gives the next pick: the highest score, the lowest index among equals. The
    first sweep has no pick to decay by and only applies score_threshold. The loop runs while a
    sweep finds a box; each pick kills at least itself."""
    compute = tl.float64 if FP64 else tl.float32
    sigma = tl.load(params_ptr)
    iou_threshold = tl.load(params_ptr + 1)
    score_threshold = tl.load(params_ptr + 2)
    lanes = tl.arange(0, BLOCK)
    picked = tl.full((), -1, tl.int32)  # none yet
    count = tl.full((), 0, tl.int32)
    go = tl.full((), 1, tl.int1)  # the launcher runs it only for N > 0
    while go:
        has_pick = picked >= 0
        p = tl.maximum(picked, 0).to(tl.int64) * 4
        px1 = tl.load(boxes_ptr + p)
        py1 = tl.load(boxes_ptr + p + 1)
        px2 = tl.load(boxes_ptr + p + 2)
        py2 = tl.load(boxes_ptr + p + 3)
        lane_best = tl.full((BLOCK,), 0.0, compute)
        lane_index = tl.full((BLOCK,), -1, tl.int32)
        for start in range(0, N, BLOCK):
            index = start + lanes
            in_range = index < N
            score = tl.load(work_ptr + index, mask=in_range, other=float("nan"))
            live = in_range & (score == score)
            base = boxes_ptr + index.to(tl.int64) * 4
            x1 = tl.load(base, mask=live, other=0.0)
            y1 = tl.load(base + 1, mask=live, other=0.0)
            x2 = tl.load(base + 2, mask=live, other=0.0)
            y2 = tl.load(base + 3, mask=live, other=0.0)
            iou = _box_iou_tile(px1, py1, px2, py2, x1, y1, x2, y2, FP64)
            overlap = tl.where(iou > 0.0, tl.where(iou < 1.0, iou, 1.0), 0.0)
            if GAUSSIAN:
                if FP64:
                    exponent = -(overlap * overlap) / sigma
                else:
                    exponent = tl.div_rn(-(overlap * overlap), sigma)  # `/` is approximate
                weight = _exp_nonpositive(exponent, FP64)
            else:
                weight = 1.0 - tl.where(overlap > iou_threshold, overlap, 0.0)
            decayed = score * tl.where(has_pick, weight, 1.0)
            alive = (decayed >= score_threshold) & (index != picked)
            tl.store(work_ptr + index, tl.where(alive, decayed, float("nan")), mask=live)
            take = alive & ((lane_index < 0) | (decayed > lane_best))
            lane_best = tl.where(take, decayed, lane_best)
            lane_index = tl.where(take, index, lane_index)
        found = lane_index >= 0
        best = tl.max(tl.where(found, lane_best, -float("inf")), axis=0)
        best_index = tl.min(tl.where(found & (lane_best == best), lane_index, N), axis=0)
        go = best_index < N
        tl.store(keep_ptr + count, best_index.to(tl.int64), mask=go)
        tl.store(kept_scores_ptr + count, best, mask=go)
        count += go.to(tl.int32)
        picked = best_index
        # The next sweep reads the scores this one stored (each lane its own, but the barrier
        # keeps that safe whatever layout the compiler picks for the loads and the stores).
        tl.debug_barrier()
    tl.store(count_ptr, count)
