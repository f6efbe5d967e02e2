"""Triton kernels for nms, batched_nms and box_iou. Imports nothing from cnnops:
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
