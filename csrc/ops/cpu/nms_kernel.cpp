// CPU kernels of the box ops: nms (batched_nms when class ids are given), soft_nms and box_iou.
//
// nms is greedy: in descending score order, a box is kept unless a kept box before it overlaps
// it by more than the threshold. Memory is O(N) (one "removed" byte per box, no N x N mask).
// The boxes are gathered in score order into one array per coordinate, so that one box's IoU
// with a run of later boxes is a vector loop (AVX-512 where the CPU has it). The greedy order is
// kept exactly, yet the work spreads over the cores: the sorted boxes are taken in blocks; a
// block is first resolved alone (each kept box removes the later ones of its block), then its
// kept boxes remove boxes in the rest of the list, which the cores share. A box is kept iff no
// kept box before it overlaps it, so the order in which the removals land does not matter.
// batched_nms sorts each class's boxes into a segment of their own and runs the segments in
// parallel: boxes of different classes are never compared (no coordinate-offset trick).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops/cpu/isa.h"
#include "ops/nms.h"

namespace cnnops {
namespace {

// Boxes in processing order, one array per coordinate.
template <typename T>
struct BoxColumns {
  std::vector<T> x1, y1, x2, y2, area;

  explicit BoxColumns(int64_t n) : x1(n), y1(n), x2(n), y2(n), area(n) {}
};

template <typename T>
BoxColumns<T> gather_box_columns(const at::Tensor& boxes, const at::Tensor& order) {
  const int64_t n = order.numel();
  BoxColumns<T> b(n);
  const auto box = boxes.accessor<T, 2>();
  const int64_t* idx = order.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    b.x1[i] = box[k][0];
    b.y1[i] = box[k][1];
    b.x2[i] = box[k][2];
    b.y2[i] = box[k][3];
    b.area[i] = box_area(b.x1[i], b.y1[i], b.x2[i], b.y2[i]);
  }
  return b;
}

// Marks every box j in [begin, end) whose IoU with box i is above `threshold` as removed.
// Branch-free, so that it vectorises; the comparison is torchvision's (see float_threshold_below).
template <typename T>
__attribute__((always_inline)) inline void remove_overlapping(const BoxColumns<T>& b, int64_t i,
                                                              int64_t begin, int64_t end,
                                                              T threshold, uint8_t* removed) {
  const T ax1 = b.x1[i], ay1 = b.y1[i], ax2 = b.x2[i], ay2 = b.y2[i], aarea = b.area[i];
  const T* x1 = b.x1.data();
  const T* y1 = b.y1.data();
  const T* x2 = b.x2.data();
  const T* y2 = b.y2.data();
  const T* area = b.area.data();
  for (int64_t j = begin; j < end; ++j) {
    const T iou = box_iou_pair(ax1, ay1, ax2, ay2, aarea, x1[j], y1[j], x2[j], y2[j], area[j]);
    removed[j] |= static_cast<uint8_t>(iou > threshold);
  }
}

template <typename T>
void remove_overlapping_baseline(const BoxColumns<T>& b, int64_t i, int64_t begin, int64_t end,
                                 T threshold, uint8_t* removed) {
  remove_overlapping(b, i, begin, end, threshold, removed);
}

#ifdef CNNOPS_HAS_ISA_VARIANTS
template <typename T>
CNNOPS_AVX512 void remove_overlapping_avx512(const BoxColumns<T>& b, int64_t i, int64_t begin,
                                             int64_t end, T threshold, uint8_t* removed) {
  remove_overlapping(b, i, begin, end, threshold, removed);
}
#endif

// Box `a` (of score rank `rank_a`) marks the boxes [begin, end) of `b` that rank after it and
// overlap it by more than `threshold` as removed. `b` is in x1 order (nms_segment_windowed).
template <typename T>
__attribute__((always_inline)) inline void remove_overlapping_later(
    const BoxColumns<T>& a, int64_t i, const BoxColumns<T>& b, const int64_t* rank,
    int64_t rank_a, int64_t begin, int64_t end, T threshold, uint8_t* removed) {
  const T ax1 = a.x1[i], ay1 = a.y1[i], ax2 = a.x2[i], ay2 = a.y2[i], aarea = a.area[i];
  const T* x1 = b.x1.data();
  const T* y1 = b.y1.data();
  const T* x2 = b.x2.data();
  const T* y2 = b.y2.data();
  const T* area = b.area.data();
  for (int64_t j = begin; j < end; ++j) {
    const T iou = box_iou_pair(ax1, ay1, ax2, ay2, aarea, x1[j], y1[j], x2[j], y2[j], area[j]);
    removed[j] |= static_cast<uint8_t>((iou > threshold) & (rank[j] > rank_a));
  }
}

template <typename T>
void remove_overlapping_later_baseline(const BoxColumns<T>& a, int64_t i, const BoxColumns<T>& b,
                                       const int64_t* rank, int64_t rank_a, int64_t begin,
                                       int64_t end, T threshold, uint8_t* removed) {
  remove_overlapping_later(a, i, b, rank, rank_a, begin, end, threshold, removed);
}

#ifdef CNNOPS_HAS_ISA_VARIANTS
template <typename T>
CNNOPS_AVX512 void remove_overlapping_later_avx512(const BoxColumns<T>& a, int64_t i,
                                                   const BoxColumns<T>& b, const int64_t* rank,
                                                   int64_t rank_a, int64_t begin, int64_t end,
                                                   T threshold, uint8_t* removed) {
  remove_overlapping_later(a, i, b, rank, rank_a, begin, end, threshold, removed);
}
#endif

template <typename T>
using RemoveFn = void (*)(const BoxColumns<T>&, int64_t, int64_t, int64_t, T, uint8_t*);

template <typename T>
RemoveFn<T> remove_overlapping_for_this_cpu() {
#ifdef CNNOPS_HAS_ISA_VARIANTS
  if (cpu_has_avx512()) return &remove_overlapping_avx512<T>;
#endif
  return &remove_overlapping_baseline<T>;
}

// Boxes per block: the block's own resolution is sequential (at most kBlock^2 / 2 IoUs), the
// removals after it are shared by the cores, one parallel_for per block.
constexpr int64_t kBlock = 256;
// Later boxes per task of that parallel_for.
constexpr int64_t kGrain = 4096;
// The windowed search's blocks are larger: its removals after a block are cheap (a window, not
// the rest of the list), so the cores' wake-ups, one per block, would weigh more.
constexpr int64_t kWindowedBlock = 1024;
// IoUs a block's removals must take before the windowed search shares them among the cores.
constexpr int64_t kParallelWork = int64_t(1) << 19;

// Greedy NMS of the boxes [begin, end) of `b` (a segment, in score order), comparing each kept
// box with every later one. Appends the positions of the kept boxes to `kept`, stopping once it
// holds `limit`.
template <typename T>
void nms_segment_all_pairs(const BoxColumns<T>& b, int64_t begin, int64_t end, T threshold,
                           int64_t limit, uint8_t* removed, std::vector<int64_t>& kept,
                           RemoveFn<T> remove) {
  std::vector<int64_t> block_kept;
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t block_end = std::min(end, block + kBlock);
    block_kept.clear();
    for (int64_t i = block; i < block_end; ++i) {
      if (removed[i]) continue;
      block_kept.push_back(i);
      kept.push_back(i);
      if (static_cast<int64_t>(kept.size()) >= limit) return;
      remove(b, i, i + 1, block_end, threshold, removed);
    }
    if (block_kept.empty() || block_end == end) continue;
    at::parallel_for(block_end, end, kGrain, [&](int64_t lo, int64_t hi) {
      for (const int64_t i : block_kept) remove(b, i, lo, hi, threshold, removed);
    });
  }
}

// The same result, comparing each kept box only with the boxes that can overlap it. With a
// threshold >= 0 a box is removed only by a positive intersection, so only boxes whose x-range
// meets the kept box's matter: with a copy of the segment sorted by x1, those lie in one run,
// x1 in [x1_i - widest, x2_i] (widened a little, so that rounding cannot drop a box), which the
// vector loop scans, masking the boxes that rank before. Random detections overlap few boxes
// each, so the runs are a fraction of the segment. The cores share the work as in the all-pairs
// version: a block of boxes is resolved alone (in score order, each kept box against the rest
// of the block), then the cores split the x-sorted copy, each applying the block's kept boxes'
// runs to its part, for the boxes ranked after the block.
template <typename T>
void nms_segment_windowed(const BoxColumns<T>& b, int64_t begin, int64_t end, T threshold,
                          int64_t limit, uint8_t* removed_in_block, std::vector<int64_t>& kept,
                          RemoveFn<T> remove) {
  const int64_t n = end - begin;
  std::vector<int64_t> by_x(n);  // score positions, in x1 order
  for (int64_t k = 0; k < n; ++k) by_x[k] = begin + k;
  std::stable_sort(by_x.begin(), by_x.end(),
                   [&](int64_t p, int64_t q) { return b.x1[p] < b.x1[q]; });
  BoxColumns<T> xb(n);
  std::vector<int64_t> x_position(n);  // of each score position
  std::vector<double> x1_sorted(n);
  double widest = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t p = by_x[k];
    xb.x1[k] = b.x1[p];
    xb.y1[k] = b.y1[p];
    xb.x2[k] = b.x2[p];
    xb.y2[k] = b.y2[p];
    xb.area[k] = b.area[p];
    x_position[p - begin] = k;
    x1_sorted[k] = b.x1[p];
    widest = std::max(widest, static_cast<double>(b.x2[p]) - b.x1[p]);
  }
  auto remove_later = &remove_overlapping_later_baseline<T>;
#ifdef CNNOPS_HAS_ISA_VARIANTS
  if (cpu_has_avx512()) remove_later = &remove_overlapping_later_avx512<T>;
#endif
  struct KeptRun {
    int64_t box, lo, hi;  // score position; its run in x order
  };
  std::vector<KeptRun> block_kept;
  std::vector<uint8_t> removed(n, 0);  // in x order, by the kept boxes of earlier blocks
  for (int64_t block = begin; block < end; block += kWindowedBlock) {
    const int64_t block_end = std::min(end, block + kWindowedBlock);
    block_kept.clear();
    for (int64_t i = block; i < block_end; ++i) {
      if (removed[x_position[i - begin]] || removed_in_block[i]) continue;
      kept.push_back(i);
      if (static_cast<int64_t>(kept.size()) >= limit) return;
      remove(b, i, i + 1, block_end, threshold, removed_in_block);
      const double x1 = b.x1[i], x2 = b.x2[i];
      const double slack = (std::abs(x1) + std::abs(x2) + widest) * 1e-5;
      const auto lo = std::lower_bound(x1_sorted.begin(), x1_sorted.end(), x1 - widest - slack);
      const auto hi = std::upper_bound(x1_sorted.begin(), x1_sorted.end(), x2 + slack);
      block_kept.push_back({i, lo - x1_sorted.begin(), hi - x1_sorted.begin()});
    }
    if (block_kept.empty() || block_end == end) continue;
    const auto apply_runs = [&](int64_t part_lo, int64_t part_hi) {
      for (const KeptRun& run : block_kept) {
        const int64_t lo = std::max(run.lo, part_lo), hi = std::min(run.hi, part_hi);
        if (lo < hi) {
          remove_later(b, run.box, xb, by_x.data(), block_end - 1, lo, hi, threshold,
                       removed.data());
        }
      }
    };
    // Only a block with enough work is worth waking the other cores for (each wake-up is a few
    // microseconds, and a descheduled core stalls the block).
    int64_t work = 0;
    for (const KeptRun& run : block_kept) work += run.hi - run.lo;
    if (work < kParallelWork) {
      apply_runs(0, n);
    } else {
      at::parallel_for(0, n, kGrain, apply_runs);
    }
  }
}

// The windows need a threshold >= 0 (below it, disjoint boxes suppress each other) and finite
// coordinates (the x1 order and the window bounds must mean something).
template <typename T>
bool windows_apply(const BoxColumns<T>& b, double threshold) {
  if (!(threshold >= 0)) return false;
  for (size_t k = 0; k < b.x1.size(); ++k) {
    if (!std::isfinite(b.x1[k]) || !std::isfinite(b.x2[k]) || !std::isfinite(b.y1[k]) ||
        !std::isfinite(b.y2[k])) {
      return false;
    }
  }
  return true;
}

// Where each class's boxes start and end in `classes` (sorted).
std::vector<int64_t> segment_starts(const at::Tensor& classes) {
  std::vector<int64_t> starts{0};
  const int64_t n = classes.numel();
  const int64_t* c = classes.const_data_ptr<int64_t>();
  for (int64_t i = 1; i < n; ++i) {
    if (c[i] != c[i - 1]) starts.push_back(i);
  }
  starts.push_back(n);
  return starts;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                   const std::optional<at::Tensor>& idxs, double iou_threshold,
                   std::optional<double> score_threshold, std::optional<int64_t> max_output) {
  check_nms_args(boxes, scores, idxs, max_output);
  TORCH_CHECK(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble,
              "nms (cpu backend): boxes must be float32 or float64, got ", boxes.scalar_type());
  const auto by_descending_score = [](const at::Tensor& t) {
    return std::get<1>(t.sort(/*stable=*/true, 0, /*descending=*/true));
  };
  // The candidates, in torchvision's order: descending score, ties by index (a stable sort).
  at::Tensor by_score;
  if (score_threshold.has_value()) {
    const at::Tensor candidates = at::nonzero(scores > *score_threshold).view(-1);
    by_score = candidates.index_select(0, by_descending_score(scores.index_select(0, candidates)));
  } else {
    by_score = by_descending_score(scores);
  }
  if (by_score.numel() == 0 || max_output.value_or(1) == 0) {
    return at::empty({0}, boxes.options().dtype(at::kLong));
  }
  // With class ids, each class's boxes become a segment of their own, still in score order.
  at::Tensor order = by_score;
  at::Tensor rank;  // of each position of `order` in by_score
  std::vector<int64_t> starts{0, by_score.numel()};
  if (idxs.has_value()) {
    const auto [classes, within] = idxs->index_select(0, by_score).to(at::kLong).sort(true, 0, false);
    order = by_score.index_select(0, within);
    rank = within;
    starts = segment_starts(classes);
  }
  const int64_t n = order.numel();
  const int64_t limit = max_output.value_or(n);
  std::vector<uint8_t> removed(n, 0);
  std::vector<int64_t> kept_positions;

  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cpu", [&] {
    const BoxColumns<scalar_t> b = gather_box_columns<scalar_t>(boxes.contiguous(), order);
    const scalar_t threshold = std::is_same_v<scalar_t, float>
                                   ? static_cast<scalar_t>(float_threshold_below(iou_threshold))
                                   : static_cast<scalar_t>(iou_threshold);
    const RemoveFn<scalar_t> remove = remove_overlapping_for_this_cpu<scalar_t>();
    const auto nms_segment = windows_apply(b, iou_threshold) ? &nms_segment_windowed<scalar_t>
                                                              : &nms_segment_all_pairs<scalar_t>;
    const int64_t segments = static_cast<int64_t>(starts.size()) - 1;
    if (segments == 1) {
      nms_segment(b, 0, n, threshold, limit, removed.data(), kept_positions, remove);
      return;
    }
    // Classes in parallel (the removals inside a class then run on its thread).
    std::vector<std::vector<int64_t>> kept_per_segment(segments);
    at::parallel_for(0, segments, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s) {
        nms_segment(b, starts[s], starts[s + 1], threshold, n, removed.data(),
                    kept_per_segment[s], remove);
      }
    });
    for (const auto& kept : kept_per_segment) {
      kept_positions.insert(kept_positions.end(), kept.begin(), kept.end());
    }
  });

  at::Tensor positions = at::tensor(kept_positions, boxes.options().dtype(at::kLong));
  if (rank.defined()) {
    // Back to one list by descending score: the kept boxes' ranks in by_score, in order.
    const at::Tensor ranks = std::get<0>(rank.index_select(0, positions).sort());
    positions = ranks.slice(0, 0, std::min<int64_t>(limit, ranks.numel()));
    return by_score.index_select(0, positions);
  }
  return order.index_select(0, positions);
}

// ---- soft_nms --------------------------------------------------------------------------------
//
// The surviving boxes live compacted, in index order, one array per coordinate (with the area
// and the current score). A step picks the best survivor and runs one pass over the survivors
// that decays each score (soft_nms_weight of its IoU with the picked box), marks the boxes that
// fall below the threshold as dead (score NaN, which stays NaN and fails every comparison), and
// finds the next pick, all in one SIMD loop: each of kSoftNmsLanes lanes keeps its own best
// (score, position), replaced only by a strictly greater score, so within a lane the lower
// position wins a tie; the lanes are merged after the loop (again the lower position among
// equals). Positions are in index order, so ties go to the lower index, as in torchvision's
// stable sort. (A lane's best starts at -inf and a dead box's NaN never beats it: GCC vectorises
// that form, but not one that also tests an "empty lane" flag. So a survivor scoring -inf is never
// found by the pass; when only such survivors are left, a scan picks the first.) Dead boxes are
// swept out (a stable compaction) once they are more than an eighth of the array, so a pass
// touches at most 8/7 of the survivors and the sweeps cost O(1) per dead box, amortised.
// Memory: O(N).
//
// The work is O(N * picks), a pass about a nanosecond per survivor (float32, Gaussian, AVX-512;
// two divisions and the exp per box). The cores share a pass only from kSoftNmsParallelSurvivors
// survivors on (a pass of some 60 us), each taking chunks and returning each chunk's best, merged
// in chunk order: a pass is one wake-up of the cores per pick, and on the 2-core CI machine,
// shared, sharing passes of 8k-20k survivors made 20k boxes 6x slower instead of faster.

constexpr int kSoftNmsLanes = 16;
constexpr int64_t kSoftNmsParallelSurvivors = int64_t(1) << 16;
constexpr int64_t kSoftNmsChunk = int64_t(1) << 14;

template <typename T>
struct Survivors {
  std::vector<T> x1, y1, x2, y2, area, score;
  std::vector<int64_t> index;
};

// The best survivor of a pass (position -1: none found) and how many survive.
template <typename T>
struct SoftNmsPass {
  T best;
  int64_t position;
  int64_t alive;
};

template <typename T>
struct SoftNmsParams {
  T x1, y1, x2, y2, area;  // the picked box
  T sigma, iou_threshold, score_threshold;
};

template <bool kGaussian, typename T>
__attribute__((always_inline)) inline SoftNmsPass<T> soft_nms_decay(Survivors<T>& s,
                                                                    const SoftNmsParams<T>& p,
                                                                    int64_t begin, int64_t end) {
  const T* x1 = s.x1.data();
  const T* y1 = s.y1.data();
  const T* x2 = s.x2.data();
  const T* y2 = s.y2.data();
  const T* area = s.area.data();
  T* score = s.score.data();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T minus_inf = -std::numeric_limits<T>::infinity();
  T lane_best[kSoftNmsLanes];
  int32_t lane_position[kSoftNmsLanes];
  int32_t lane_alive[kSoftNmsLanes];
  for (int l = 0; l < kSoftNmsLanes; ++l) {
    lane_best[l] = minus_inf;
    lane_position[l] = -1;
    lane_alive[l] = 0;
  }
  const auto decay = [&](int64_t j, int l) __attribute__((always_inline)) {
    const T iou = box_iou_pair(p.x1, p.y1, p.x2, p.y2, p.area, x1[j], y1[j], x2[j], y2[j], area[j]);
    const T decayed = score[j] * soft_nms_weight<kGaussian>(iou, p.sigma, p.iou_threshold);
    const bool alive = decayed >= p.score_threshold;
    const T kept = alive ? decayed : nan;
    score[j] = kept;
    const bool take = kept > lane_best[l];
    lane_best[l] = take ? kept : lane_best[l];
    lane_position[l] = take ? static_cast<int32_t>(j) : lane_position[l];
    lane_alive[l] += alive;
  };
  int64_t j0 = begin;
  for (; j0 + kSoftNmsLanes <= end; j0 += kSoftNmsLanes) {
#pragma omp simd
    for (int l = 0; l < kSoftNmsLanes; ++l) decay(j0 + l, l);
  }
  for (int l = 0; j0 + l < end; ++l) decay(j0 + l, l);

  SoftNmsPass<T> result{minus_inf, -1, 0};
  for (int l = 0; l < kSoftNmsLanes; ++l) {
    result.alive += lane_alive[l];
    // Lanes hold interleaved positions: among equal scores the lower position wins.
    if (lane_position[l] >= 0 &&
        (result.position < 0 || lane_best[l] > result.best ||
         (lane_best[l] == result.best && lane_position[l] < result.position))) {
      result.best = lane_best[l];
      result.position = lane_position[l];
    }
  }
  return result;
}

template <bool kGaussian, typename T>
SoftNmsPass<T> soft_nms_decay_baseline(Survivors<T>& s, const SoftNmsParams<T>& p, int64_t begin,
                                       int64_t end) {
  return soft_nms_decay<kGaussian>(s, p, begin, end);
}

#ifdef CNNOPS_HAS_ISA_VARIANTS
template <bool kGaussian, typename T>
CNNOPS_AVX512 SoftNmsPass<T> soft_nms_decay_avx512(Survivors<T>& s, const SoftNmsParams<T>& p,
                                                   int64_t begin, int64_t end) {
  return soft_nms_decay<kGaussian>(s, p, begin, end);
}
#endif

template <typename T>
using SoftNmsDecayFn = SoftNmsPass<T> (*)(Survivors<T>&, const SoftNmsParams<T>&, int64_t,
                                          int64_t);

template <bool kGaussian, typename T>
SoftNmsDecayFn<T> soft_nms_decay_for_this_cpu() {
#ifdef CNNOPS_HAS_ISA_VARIANTS
  if (cpu_has_avx512()) return &soft_nms_decay_avx512<kGaussian, T>;
#endif
  return &soft_nms_decay_baseline<kGaussian, T>;
}

// One pass over survivors [0, m), on the cores when it is long enough.
template <typename T>
SoftNmsPass<T> soft_nms_pass(Survivors<T>& s, const SoftNmsParams<T>& p, int64_t m,
                             SoftNmsDecayFn<T> decay) {
  if (m < kSoftNmsParallelSurvivors || at::get_num_threads() == 1) return decay(s, p, 0, m);
  const int64_t chunks = (m + kSoftNmsChunk - 1) / kSoftNmsChunk;
  std::vector<SoftNmsPass<T>> parts(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      parts[c] = decay(s, p, c * kSoftNmsChunk, std::min(m, (c + 1) * kSoftNmsChunk));
    }
  });
  SoftNmsPass<T> result{-std::numeric_limits<T>::infinity(), -1, 0};
  for (const SoftNmsPass<T>& part : parts) {  // in position order: strictly better only
    result.alive += part.alive;
    if (part.position >= 0 && (result.position < 0 || part.best > result.best)) {
      result.best = part.best;
      result.position = part.position;
    }
  }
  return result;
}

// Stable removal of the dead boxes (score NaN) of [0, m); returns the survivors' count and moves
// `position` along with its box.
template <typename T>
int64_t soft_nms_sweep(Survivors<T>& s, int64_t m, int64_t& position) {
  int64_t out = 0;
  for (int64_t j = 0; j < m; ++j) {
    if (std::isnan(s.score[j])) continue;
    if (j == position) position = out;
    s.x1[out] = s.x1[j];
    s.y1[out] = s.y1[j];
    s.x2[out] = s.x2[j];
    s.y2[out] = s.y2[j];
    s.area[out] = s.area[j];
    s.score[out] = s.score[j];
    s.index[out] = s.index[j];
    ++out;
  }
  return out;
}

template <bool kGaussian, typename T>
void soft_nms_cpu_typed(const at::Tensor& boxes, const at::Tensor& scores, double sigma,
                        double iou_threshold, double score_threshold, std::vector<int64_t>& keep,
                        std::vector<T>& kept_scores) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  SoftNmsParams<T> p{};
  p.sigma = soft_nms_sigma<T>(sigma);
  // The comparisons of the float64 reference, made in float (see float_threshold_below).
  p.iou_threshold = kFloat ? static_cast<T>(float_threshold_below(iou_threshold))
                           : static_cast<T>(iou_threshold);
  p.score_threshold = kFloat ? static_cast<T>(float_threshold_at_or_above(score_threshold))
                             : static_cast<T>(score_threshold);

  // The candidates: scores at or above the threshold (NaN is not), in index order.
  const int64_t n = boxes.size(0);
  const auto box = boxes.accessor<T, 2>();
  const auto score = scores.accessor<T, 1>();
  Survivors<T> s;
  for (int64_t i = 0; i < n; ++i) {
    if (!(score[i] >= p.score_threshold)) continue;
    s.x1.push_back(box[i][0]);
    s.y1.push_back(box[i][1]);
    s.x2.push_back(box[i][2]);
    s.y2.push_back(box[i][3]);
    s.area.push_back(box_area(box[i][0], box[i][1], box[i][2], box[i][3]));
    s.score.push_back(score[i]);
    s.index.push_back(i);
  }
  int64_t m = static_cast<int64_t>(s.index.size());
  int64_t best = -1;
  for (int64_t j = 0; j < m; ++j) {
    if (best < 0 || s.score[j] > s.score[best]) best = j;
  }

  const SoftNmsDecayFn<T> decay = soft_nms_decay_for_this_cpu<kGaussian, T>();
  while (best >= 0) {
    keep.push_back(s.index[best]);
    kept_scores.push_back(s.score[best]);
    p.x1 = s.x1[best];
    p.y1 = s.y1[best];
    p.x2 = s.x2[best];
    p.y2 = s.y2[best];
    p.area = s.area[best];
    s.score[best] = std::numeric_limits<T>::quiet_NaN();  // picked: dead
    const SoftNmsPass<T> pass = soft_nms_pass(s, p, m, decay);
    best = pass.position;
    if (best < 0 && pass.alive > 0) {  // only survivors scoring -inf: the first
      while (std::isnan(s.score[++best])) {
      }
    }
    if ((m - pass.alive) * 8 > m) m = soft_nms_sweep(s, m, best);
  }
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                                                double sigma, double iou_threshold,
                                                double score_threshold, c10::string_view method) {
  const bool gaussian =
      check_soft_nms_args(boxes, scores, sigma, iou_threshold, score_threshold, method);
  TORCH_CHECK(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble,
              "soft_nms (cpu backend): boxes must be float32 or float64, got ",
              boxes.scalar_type());
  at::Tensor keep_tensor, score_tensor;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "soft_nms_cpu", [&] {
    std::vector<int64_t> keep;
    std::vector<scalar_t> kept_scores;
    const at::Tensor b = boxes.contiguous();
    const at::Tensor s = scores.contiguous();
    if (gaussian) {
      soft_nms_cpu_typed<true, scalar_t>(b, s, sigma, iou_threshold, score_threshold, keep,
                                         kept_scores);
    } else {
      soft_nms_cpu_typed<false, scalar_t>(b, s, sigma, iou_threshold, score_threshold, keep,
                                          kept_scores);
    }
    const int64_t k = static_cast<int64_t>(keep.size());
    keep_tensor = at::empty({k}, boxes.options().dtype(at::kLong));
    score_tensor = at::empty({k}, scores.options());
    std::copy(keep.begin(), keep.end(), keep_tensor.mutable_data_ptr<int64_t>());
    std::copy(kept_scores.begin(), kept_scores.end(), score_tensor.mutable_data_ptr<scalar_t>());
  });
  return {keep_tensor, score_tensor};
}

template <typename T>
__attribute__((always_inline)) inline void box_iou_rows(const BoxColumns<T>& a,
                                                        const BoxColumns<T>& b, T* out,
                                                        int64_t begin, int64_t end) {
  const int64_t m = static_cast<int64_t>(b.x1.size());
  for (int64_t i = begin; i < end; ++i) {
    const T ax1 = a.x1[i], ay1 = a.y1[i], ax2 = a.x2[i], ay2 = a.y2[i], aarea = a.area[i];
    T* row = out + i * m;
    for (int64_t j = 0; j < m; ++j) {
      row[j] = box_iou_pair(ax1, ay1, ax2, ay2, aarea, b.x1[j], b.y1[j], b.x2[j], b.y2[j],
                            b.area[j]);
    }
  }
}

template <typename T>
void box_iou_rows_baseline(const BoxColumns<T>& a, const BoxColumns<T>& b, T* out, int64_t begin,
                           int64_t end) {
  box_iou_rows(a, b, out, begin, end);
}

#ifdef CNNOPS_HAS_ISA_VARIANTS
template <typename T>
CNNOPS_AVX512 void box_iou_rows_avx512(const BoxColumns<T>& a, const BoxColumns<T>& b, T* out,
                                       int64_t begin, int64_t end) {
  box_iou_rows(a, b, out, begin, end);
}
#endif

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou_args(boxes1, boxes2);
  TORCH_CHECK(boxes1.scalar_type() == at::kFloat || boxes1.scalar_type() == at::kDouble,
              "box_iou (cpu backend): boxes must be float32 or float64, got ",
              boxes1.scalar_type());
  const int64_t n = boxes1.size(0), m = boxes2.size(0);
  at::Tensor out = at::empty({n, m}, boxes1.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "box_iou_cpu", [&] {
    const auto all = [](int64_t count, const at::Tensor& like) {
      return at::arange(count, like.options().dtype(at::kLong));
    };
    const BoxColumns<scalar_t> a = gather_box_columns<scalar_t>(boxes1.contiguous(), all(n, boxes1));
    const BoxColumns<scalar_t> b = gather_box_columns<scalar_t>(boxes2.contiguous(), all(m, boxes2));
    auto rows = &box_iou_rows_baseline<scalar_t>;
#ifdef CNNOPS_HAS_ISA_VARIANTS
    if (cpu_has_avx512()) rows = &box_iou_rows_avx512<scalar_t>;
#endif
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1)),
                     [&](int64_t lo, int64_t hi) { rows(a, b, dst, lo, hi); });
  });
  return out;
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CPU, m) {
  m.impl("nms", &cnnops::nms_cpu);
  m.impl("soft_nms", &cnnops::soft_nms_cpu);
  m.impl("box_iou", &cnnops::box_iou_cpu);
}
