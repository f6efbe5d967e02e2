// CUDA kernels for cnnops::nms (nms and batched_nms), cnnops::soft_nms and cnnops::box_iou.
//
// nms runs in four steps, all on the device:
//   1. sort the scores (stable, descending: equal scores keep the lower index first) and gather
//      the boxes, converted to the accumulation type, and their class ids in that order;
//   2. nms_iou_mask_kernel: bit j of mask[i][w] says that sorted box i, if kept, suppresses
//      sorted box 64 * w + j (IoU above the threshold, same class);
//   3. nms_greedy_kernel: one block walks the sorted boxes in order and keeps a box unless an
//      earlier kept box suppressed it, writing one keep flag per sorted position;
//   4. the kept positions are mapped back to the original indices by masked_select.
// torchvision copies the mask to the host and does step 3 there; here the only synchronisation is
// the one inside masked_select, which must learn the number of kept boxes to size the output (an
// eager op returning an exact-size tensor cannot avoid it).
//
// Arithmetic: box_iou_pair from nms.h, in float for float/half/bfloat16 boxes and in double for
// double ones. torchvision computes in the input type; half and bfloat16 are converted to float
// first on purpose (IoU in half is too coarse for a threshold). The threshold is compared as
// torchvision's CPU kernel does (float IoU > double threshold, see float_threshold_below);
// torchvision's CUDA kernel compares with float(threshold) instead, which differs only when the
// IoU equals that float exactly. Every product in box_area and box_iou_pair has more than one use
// or is stored, so ptxas keeps each multiply and add separately rounded (no FMA contraction;
// checked in the sm_90 SASS), as in torchvision's CPU kernel.

#include "ops/nms.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace cnnops {
namespace {

// ---- Tiling --------------------------------------------------------------------------------
//
// IoU mask: the sorted boxes are cut into tiles of 64, one bit per box of a uint64 word. Block
// (column tile w, row tile r) has 64 threads; it stages the 64 column boxes (with their areas
// and class ids) in shared memory, where every thread of a warp reads the same box at once (a
// broadcast), and each thread compares its own row box, held in registers, with them and writes
// one word. Only tiles with w >= r are computed: a box is only ever suppressed by a higher-ranked
// one, so the lower triangle is never read (those blocks exit at once; the grid stays a simple
// rectangle). Memory: n * ceil(n / 64) words, 1.25 GB at 100k boxes, as in torchvision; fine for
// the sizes detectors produce, too much for millions of boxes.
//
// Greedy pass: the decision for box i depends on every decision before it, so it runs in one
// block, 64 boxes at a time. Thread 0 decides the 64 boxes of a tile in order from the tile's
// 'removed' word and the tile's diagonal words (staged in shared memory): a kept box ORs its
// diagonal word into the removed word at once, so later boxes of the same tile see it. Then all
// threads OR the kept rows' words into the removed words of the later tiles, one tile column per
// thread: neighbouring threads read neighbouring words of a mask row, so the loads coalesce, and
// up to 1024 threads keep many loads in flight on the one SM (fewer for small n: every barrier
// waits for all of them). The removed words live in shared memory
// up to kMaxSharedRemovedWords (327,680 boxes) and in global memory beyond.
//
// box_iou: tiles of 32 boxes1 rows x 64 boxes2 columns, 256 threads. The 32 row boxes are staged
// in shared memory (broadcast reads); each thread holds one column box in registers and writes 8
// outputs of its column; a warp writes 32 consecutive outputs of a row, so stores coalesce.

constexpr int kBoxesPerWord = 64;
constexpr int kGreedyThreads = 1024;
// Leaves room under the 48 KB that a block may use without opting in for the static arrays.
constexpr int64_t kMaxSharedRemovedWords = 5 * 1024;
constexpr int kIouTileRows = 32;
constexpr int kIouTileCols = 64;
constexpr int kIouThreadRows = 4;  // blockDim.y: each thread computes kIouTileRows / 4 outputs
constexpr int64_t kMaxGridY = 65535;

__host__ __device__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A box converted to the accumulation type, with its area.
template <typename acc_t>
struct AreaBox {
  acc_t x1, y1, x2, y2, area;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ AreaBox<acc_t> load_area_box(const scalar_t* box) {
  AreaBox<acc_t> b;
  b.x1 = static_cast<acc_t>(box[0]);
  b.y1 = static_cast<acc_t>(box[1]);
  b.x2 = static_cast<acc_t>(box[2]);
  b.y2 = static_cast<acc_t>(box[3]);
  b.area = box_area(b.x1, b.y1, b.x2, b.y2);
  return b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t iou_of(const AreaBox<acc_t>& a, const AreaBox<acc_t>& b) {
  return box_iou_pair(a.x1, a.y1, a.x2, a.y2, a.area, b.x1, b.y1, b.x2, b.y2, b.area);
}

// boxes: the sorted boxes [n, 4] in acc_t. class_ids: their classes, or null (one class).
// candidates: per sorted box, whether it passed score_threshold, or null (all did). Rows of
// non-candidates are not written: the greedy pass never reads them.
template <typename acc_t>
__global__ void __launch_bounds__(kBoxesPerWord)
    nms_iou_mask_kernel(const acc_t* __restrict__ boxes, const int64_t* __restrict__ class_ids,
                        const bool* __restrict__ candidates, int64_t n, int64_t words_per_row,
                        acc_t iou_threshold, uint64_t* __restrict__ mask) {
  const int64_t col_tile = blockIdx.x;
  const int64_t row_tile = blockIdx.y;
  if (col_tile < row_tile) return;

  __shared__ AreaBox<acc_t> col_boxes[kBoxesPerWord];
  __shared__ int64_t col_classes[kBoxesPerWord];
  const int t = threadIdx.x;
  const int64_t col0 = col_tile * kBoxesPerWord;
  const int cols = static_cast<int>(std::min<int64_t>(n - col0, kBoxesPerWord));
  if (t < cols) {
    col_boxes[t] = load_area_box<acc_t>(boxes + (col0 + t) * 4);
    col_classes[t] = class_ids != nullptr ? class_ids[col0 + t] : 0;
  }
  __syncthreads();

  const int64_t row = row_tile * kBoxesPerWord + t;
  if (row >= n || (candidates != nullptr && !candidates[row])) return;
  const AreaBox<acc_t> row_box = load_area_box<acc_t>(boxes + row * 4);
  const int64_t row_class = class_ids != nullptr ? class_ids[row] : 0;
  // On the diagonal tile only the boxes ranked after this one.
  uint64_t bits = 0;
  for (int j = col_tile == row_tile ? t + 1 : 0; j < cols; ++j) {
    if (iou_of(row_box, col_boxes[j]) > iou_threshold && col_classes[j] == row_class) {
      bits |= uint64_t(1) << j;
    }
  }
  mask[row * words_per_row + col_tile] = bits;
}

// keep must be zeroed; max_output < 0: no limit. removed_global: words_per_row zeroed words, or
// null to use words_per_row words of dynamic shared memory.
__global__ void __launch_bounds__(kGreedyThreads)
    nms_greedy_kernel(const uint64_t* __restrict__ mask, const bool* __restrict__ candidates,
                      int64_t n, int64_t words_per_row, int64_t max_output,
                      uint64_t* removed_global, bool* __restrict__ keep) {
  extern __shared__ uint64_t removed_shared[];
  __shared__ uint64_t diagonal[kBoxesPerWord];
  __shared__ uint32_t live_halves[2];
  __shared__ uint64_t tile_kept;
  __shared__ bool done;
  const int t = threadIdx.x;
  uint64_t* removed = removed_global != nullptr ? removed_global : removed_shared;
  if (removed_global == nullptr) {
    for (int64_t w = t; w < words_per_row; w += blockDim.x) removed_shared[w] = 0;
  }
  int64_t kept_total = 0;  // thread 0's count

  for (int64_t tile = 0; tile < words_per_row; ++tile) {
    const int64_t row0 = tile * kBoxesPerWord;
    if (t < kBoxesPerWord) {  // warps 0 and 1, whole
      const int64_t row = row0 + t;
      const bool live = row < n && (candidates == nullptr || candidates[row]);
      diagonal[t] = live ? mask[row * words_per_row + tile] : 0;
      const uint32_t ballot = __ballot_sync(0xffffffffu, live);
      if (t % 32 == 0) live_halves[t / 32] = ballot;
    }
    __syncthreads();  // also orders the zeroing of removed_shared and the previous tile's ORs

    if (t == 0) {
      // Padding rows past n and boxes under score_threshold count as removed.
      const uint64_t live = (uint64_t(live_halves[1]) << 32) | live_halves[0];
      uint64_t removed_word = removed[tile] | ~live;
      uint64_t kept = 0;
      for (int k = 0; k < kBoxesPerWord && kept_total != max_output; ++k) {
        if (!((removed_word >> k) & 1)) {
          kept |= uint64_t(1) << k;
          ++kept_total;
          removed_word |= diagonal[k];
        }
      }
      tile_kept = kept;
      done = kept_total == max_output;
    }
    __syncthreads();

    const uint64_t kept = tile_kept;
    if (kept != 0) {
      for (int64_t w = tile + 1 + t; w < words_per_row; w += blockDim.x) {
        uint64_t suppressed = 0;
        for (uint64_t rest = kept; rest != 0; rest &= rest - 1) {
          const int k = __ffsll(static_cast<long long>(rest)) - 1;
          suppressed |= mask[(row0 + k) * words_per_row + w];
        }
        removed[w] |= suppressed;
      }
      if (t < kBoxesPerWord && ((kept >> t) & 1)) keep[row0 + t] = true;
    }
    if (done) break;  // every thread read the same flag, set before the barrier above
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kIouTileCols* kIouThreadRows)
    box_iou_kernel(const scalar_t* __restrict__ boxes1, const scalar_t* __restrict__ boxes2,
                   int64_t n, int64_t m, scalar_t* __restrict__ out) {
  __shared__ AreaBox<acc_t> row_boxes[kIouTileRows];
  const int64_t col = int64_t(blockIdx.x) * kIouTileCols + threadIdx.x;
  const bool has_col = col < m;
  const AreaBox<acc_t> col_box =
      load_area_box<acc_t>(boxes2 + (has_col ? col : 0) * 4);  // m >= 1: box 0 exists
  const int flat = threadIdx.y * kIouTileCols + threadIdx.x;
  const int64_t row_tiles = ceil_div(n, kIouTileRows);

  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row0 = tile * kIouTileRows;
    const int rows = static_cast<int>(std::min<int64_t>(n - row0, kIouTileRows));
    if (flat < rows) row_boxes[flat] = load_area_box<acc_t>(boxes1 + (row0 + flat) * 4);
    __syncthreads();
    if (has_col) {
      for (int r = threadIdx.y; r < rows; r += kIouThreadRows) {
        out[(row0 + r) * m + col] = static_cast<scalar_t>(iou_of(row_boxes[r], col_box));
      }
    }
    __syncthreads();
  }
}

void check_cuda_boxes(const at::Tensor& boxes, const char* op, const char* name) {
  TORCH_CHECK(boxes.is_cuda(), op, " (cuda): ", name, " must be a CUDA tensor, got one on ",
              boxes.device());
}

template <typename acc_t>
void launch_nms_iou_mask(const at::Tensor& sorted_boxes, const at::Tensor& sorted_class_ids,
                         const at::Tensor& candidates, int64_t words_per_row,
                         acc_t iou_threshold, at::Tensor& mask, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(words_per_row),
                  static_cast<unsigned int>(words_per_row));
  nms_iou_mask_kernel<acc_t><<<grid, kBoxesPerWord, 0, stream>>>(
      sorted_boxes.const_data_ptr<acc_t>(),
      sorted_class_ids.defined() ? sorted_class_ids.const_data_ptr<int64_t>() : nullptr,
      candidates.defined() ? candidates.const_data_ptr<bool>() : nullptr, sorted_boxes.size(0),
      words_per_row, iou_threshold, reinterpret_cast<uint64_t*>(mask.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                    const std::optional<at::Tensor>& idxs, double iou_threshold,
                    std::optional<double> score_threshold, std::optional<int64_t> max_output) {
  check_nms_args(boxes, scores, idxs, max_output);
  check_cuda_boxes(boxes, "nms", "boxes");
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  const at::TensorOptions index_options = boxes.options().dtype(at::kLong);
  if (n == 0 || max_output == int64_t(0)) return at::empty({0}, index_options);

  const int64_t words_per_row = ceil_div(n, kBoxesPerWord);
  TORCH_CHECK(words_per_row <= kMaxGridY, "nms (cuda): at most ", kMaxGridY * kBoxesPerWord,
              " boxes, got ", n);
  const auto [sorted_scores, order] =
      at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  // Compared in double: a half tensor compared with a scalar would round the threshold to half.
  // A NaN score is not above any threshold: dropped, as by the CPU kernel.
  const at::Tensor candidates = score_threshold.has_value()
                                    ? sorted_scores.to(at::kDouble).gt(*score_threshold)
                                    : at::Tensor();
  const bool in_double = boxes.scalar_type() == at::kDouble;
  const at::Tensor sorted_boxes =
      boxes.index_select(0, order).to(in_double ? at::kDouble : at::kFloat).contiguous();
  const at::Tensor sorted_class_ids =
      idxs.has_value() ? idxs->index_select(0, order).to(at::kLong).contiguous() : at::Tensor();

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor mask = at::empty({n * words_per_row}, index_options);
  if (in_double) {
    launch_nms_iou_mask<double>(sorted_boxes, sorted_class_ids, candidates, words_per_row,
                                iou_threshold, mask, stream);
  } else {
    launch_nms_iou_mask<float>(sorted_boxes, sorted_class_ids, candidates, words_per_row,
                               float_threshold_below(iou_threshold), mask, stream);
  }

  const bool removed_in_shared = words_per_row <= kMaxSharedRemovedWords;
  const at::Tensor removed_global =
      removed_in_shared ? at::Tensor() : at::zeros({words_per_row}, index_options);
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  // One thread per later tile column, in whole warps; at least the two warps that stage a tile.
  const int greedy_threads = static_cast<int>(
      std::clamp<int64_t>(ceil_div(words_per_row, 32) * 32, 2 * 32, kGreedyThreads));
  nms_greedy_kernel<<<1, greedy_threads,
                      removed_in_shared ? words_per_row * sizeof(uint64_t) : 0, stream>>>(
      reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>()),
      candidates.defined() ? candidates.const_data_ptr<bool>() : nullptr, n, words_per_row,
      max_output.value_or(-1),
      removed_in_shared ? nullptr
                        : reinterpret_cast<uint64_t*>(removed_global.mutable_data_ptr<int64_t>()),
      keep.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The one host synchronisation: the output's size is the number of kept boxes.
  return order.masked_select(keep);
}

// ---- soft_nms ----------------------------------------------------------------------------------
//
// One block of up to 1024 threads runs the whole loop, as the picks are sequential: thread t owns
// the boxes t, t + blockDim, ... (coalesced loads). Before the loop each thread converts its
// boxes to acc_t into a scratch of six columns (x1, y1, x2, y2, area, score; global memory, so
// any N fits; at 24 bytes a box in float, about ten thousand boxes fit the SM's L1, 256 KB on
// H100, and every pick rereads them from there or from L2), drops the boxes under
// score_threshold (score NaN: dead) and finds its best. Then per pick: one block-wide argmax
// (warp shuffles, then one warp over the warps' results, in shared memory double-buffered by
// pick parity, so two barriers a pick), thread 0 writes the pick, and every thread decays its
// live boxes by soft_nms_weight (nms.h, the CPU kernel's arithmetic) and finds its next best
// (strictly greater only, so its lower index wins a tie; the reduction prefers the lower index
// among equal scores). The kept count goes to device memory; the host reads it once, at the
// end, to size the outputs.
constexpr int kSoftNmsThreads = 1024;
constexpr int kWarpSize = 32;

template <typename acc_t>
struct SoftNmsCandidate {
  acc_t score;
  int32_t index;  // -1: none
};

template <typename acc_t>
__device__ __forceinline__ SoftNmsCandidate<acc_t> better_candidate(SoftNmsCandidate<acc_t> a,
                                                                    SoftNmsCandidate<acc_t> b) {
  const bool take_b = b.index >= 0 && (a.index < 0 || b.score > a.score ||
                                       (b.score == a.score && b.index < a.index));
  return take_b ? b : a;
}

template <typename acc_t>
__device__ __forceinline__ SoftNmsCandidate<acc_t> warp_best(SoftNmsCandidate<acc_t> c) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    SoftNmsCandidate<acc_t> other;
    other.score = __shfl_down_sync(0xffffffffu, c.score, offset);
    other.index = __shfl_down_sync(0xffffffffu, c.index, offset);
    c = better_candidate(c, other);
  }
  return c;
}

// The best candidate of the block; every thread gets it. partial: [2][32], result: [2], used
// alternately by `parity`, so that a pick's writes never race with the previous pick's reads.
template <typename acc_t>
__device__ __forceinline__ SoftNmsCandidate<acc_t> block_best(
    SoftNmsCandidate<acc_t> c, SoftNmsCandidate<acc_t> (*partial)[kWarpSize],
    SoftNmsCandidate<acc_t>* result, int parity) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  c = warp_best(c);
  if (lane == 0) partial[parity][warp] = c;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarpSize;
    c = lane < warps ? partial[parity][lane] : SoftNmsCandidate<acc_t>{acc_t(0), -1};
    c = warp_best(c);
    if (lane == 0) result[parity] = c;
  }
  __syncthreads();
  return result[parity];
}

// boxes [n, 4] and scores [n]: contiguous. work: [6, n] scratch. keep [n], kept_scores [n]:
// the first *count entries are written.
template <bool kGaussian, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSoftNmsThreads)
    soft_nms_kernel(const scalar_t* __restrict__ boxes, const scalar_t* __restrict__ scores,
                    int32_t n, acc_t sigma, acc_t iou_threshold, acc_t score_threshold,
                    acc_t* __restrict__ work, int64_t* __restrict__ keep,
                    scalar_t* __restrict__ kept_scores, int64_t* __restrict__ count) {
  __shared__ SoftNmsCandidate<acc_t> partial[2][kWarpSize];
  __shared__ SoftNmsCandidate<acc_t> result[2];
  acc_t* x1 = work;
  acc_t* y1 = work + n;
  acc_t* x2 = work + 2 * int64_t(n);
  acc_t* y2 = work + 3 * int64_t(n);
  acc_t* area = work + 4 * int64_t(n);
  acc_t* score = work + 5 * int64_t(n);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  SoftNmsCandidate<acc_t> mine{acc_t(0), -1};
  // 64-bit counters: n may come within a block of 2^31.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const AreaBox<acc_t> b = load_area_box<acc_t>(boxes + i * 4);
    x1[i] = b.x1;
    y1[i] = b.y1;
    x2[i] = b.x2;
    y2[i] = b.y2;
    area[i] = b.area;
    const acc_t s = static_cast<acc_t>(scores[i]);
    const bool alive = s >= score_threshold;  // NaN: dead
    score[i] = alive ? s : nan;
    if (alive && (mine.index < 0 || s > mine.score)) {
      mine = SoftNmsCandidate<acc_t>{s, static_cast<int32_t>(i)};
    }
  }
  int parity = 0;
  SoftNmsCandidate<acc_t> picked = block_best(mine, partial, result, parity);
  int64_t picks = 0;  // thread 0's count
  while (picked.index >= 0) {
    if (threadIdx.x == 0) {
      keep[picks] = picked.index;
      kept_scores[picks] = static_cast<scalar_t>(picked.score);
      ++picks;
    }
    const int32_t p = picked.index;  // the scratch was written before block_best's barriers
    const acc_t px1 = x1[p], py1 = y1[p], px2 = x2[p], py2 = y2[p], parea = area[p];
    mine = SoftNmsCandidate<acc_t>{acc_t(0), -1};
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const acc_t s = score[i];
      if (!(s == s)) continue;  // dead
      if (i == p) {
        score[i] = nan;
        continue;
      }
      const acc_t iou = box_iou_pair(px1, py1, px2, py2, parea, x1[i], y1[i], x2[i], y2[i],
                                     area[i]);
      const acc_t decayed = s * soft_nms_weight<kGaussian>(iou, sigma, iou_threshold);
      const bool alive = decayed >= score_threshold;
      score[i] = alive ? decayed : nan;
      if (alive && (mine.index < 0 || decayed > mine.score)) {
        mine = SoftNmsCandidate<acc_t>{decayed, static_cast<int32_t>(i)};
      }
    }
    parity ^= 1;
    picked = block_best(mine, partial, result, parity);
  }
  if (threadIdx.x == 0) *count = picks;
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(const at::Tensor& boxes,
                                                 const at::Tensor& scores, double sigma,
                                                 double iou_threshold, double score_threshold,
                                                 c10::string_view method) {
  const bool gaussian =
      check_soft_nms_args(boxes, scores, sigma, iou_threshold, score_threshold, method);
  check_cuda_boxes(boxes, "soft_nms", "boxes");
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  at::Tensor keep = at::empty({n}, boxes.options().dtype(at::kLong));
  at::Tensor kept_scores = at::empty({n}, scores.options());
  if (n == 0) return {keep, kept_scores};

  const at::Tensor b = boxes.contiguous();
  const at::Tensor s = scores.contiguous();
  at::Tensor count = at::empty({1}, boxes.options().dtype(at::kLong));
  const bool in_double = boxes.scalar_type() == at::kDouble;
  at::Tensor work = at::empty({6 * n}, boxes.options().dtype(in_double ? at::kDouble : at::kFloat));
  // Whole warps, no more than there are boxes (every barrier waits for all of them).
  const int threads = static_cast<int>(
      std::clamp<int64_t>(ceil_div(n, kWarpSize) * kWarpSize, kWarpSize, kSoftNmsThreads));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, boxes.scalar_type(), "cnnops_soft_nms_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // The float64 reference's comparisons, made in float (see float_threshold_below).
        const acc_t iou_t = in_double ? static_cast<acc_t>(iou_threshold)
                                      : static_cast<acc_t>(float_threshold_below(iou_threshold));
        const acc_t score_t =
            in_double ? static_cast<acc_t>(score_threshold)
                      : static_cast<acc_t>(float_threshold_at_or_above(score_threshold));
        const auto kernel = gaussian ? soft_nms_kernel<true, scalar_t, acc_t>
                                     : soft_nms_kernel<false, scalar_t, acc_t>;
        kernel<<<1, threads, 0, stream>>>(
            b.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), static_cast<int32_t>(n),
            soft_nms_sigma<acc_t>(sigma), iou_t, score_t, work.mutable_data_ptr<acc_t>(),
            keep.mutable_data_ptr<int64_t>(), kept_scores.mutable_data_ptr<scalar_t>(),
            count.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  // The one host synchronisation: the outputs' size is the number of picks (an eager op
  // returning exact-size tensors cannot avoid it; nms's masked_select makes the same one).
  const int64_t picked = count.item<int64_t>();
  return {keep.narrow(0, 0, picked), kept_scores.narrow(0, 0, picked)};
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou_args(boxes1, boxes2);
  check_cuda_boxes(boxes1, "box_iou", "boxes1");
  c10::cuda::CUDAGuard guard(boxes1.device());
  const int64_t n = boxes1.size(0);
  const int64_t m = boxes2.size(0);
  at::Tensor out = at::empty({n, m}, boxes1.options());
  if (n == 0 || m == 0) return out;  // a zero-size grid is a launch error

  const int64_t col_tiles = ceil_div(m, kIouTileCols);
  TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "box_iou (cuda): boxes2 has ", m,
              " boxes, more than the grid can cover");
  const dim3 grid(static_cast<unsigned int>(col_tiles),
                  static_cast<unsigned int>(std::min(ceil_div(n, kIouTileRows), kMaxGridY)));
  const dim3 block(kIouTileCols, kIouThreadRows);
  const at::Tensor b1 = boxes1.contiguous();
  const at::Tensor b2 = boxes2.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, boxes1.scalar_type(), "cnnops_box_iou_cuda", [&] {
        box_iou_kernel<scalar_t, at::opmath_type<scalar_t>><<<grid, block, 0, stream>>>(
            b1.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(), n, m,
            out.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("nms", TORCH_FN(cnnops::nms_cuda));
  m.impl("soft_nms", TORCH_FN(cnnops::soft_nms_cuda));
  m.impl("box_iou", TORCH_FN(cnnops::box_iou_cuda));
}
