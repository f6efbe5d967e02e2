// CUDA kernels for cnnops::conv2d and cnnops::_conv2d_backward.
//
// Three algorithms, selected by the op's `algo` argument ("auto" runs depthwise for depthwise
// layers, im2col for the rest):
//   direct    - every output (or gradient) element is computed by its own loop over the taps that
//               touch it. No scratch memory, deterministic, and the natural choice for small
//               problems.
//   im2col    - the input is unfolded into a column matrix and the convolution becomes a batched
//               GEMM per group (at::bmm -> cuBLAS). The batch is processed in chunks so the column
//               buffer stays bounded.
//   depthwise - depthwise layers only (groups == C, any channel multiplier): tiles staged in
//               shared memory with their halo, several outputs per thread from registers; grad
//               weight as per-filter block reductions (see "depthwise: shared-memory tiles").
// All share the grad-bias reduction. Everything is deterministic: gradients that several
// outputs contribute to are gathered by one thread (or reduced by one block in a fixed order),
// never accumulated with atomics.
//
// Layouts: kernels address every tensor through its four strides, so NCHW, channels_last and
// other strided inputs (e.g. the stride-0 grad_output of `out.sum().backward()`) are read in
// place with no conversion. The output and grad input are allocated in
// conv2d_memory_format(input); the direct kernels order their threads by that layout so that
// the writes (and, for channels_last, the channel-fastest reads) stay coalesced.
//
// Accumulation: at::opmath_type<scalar_t>, i.e. float for float/half/bfloat16 and double for
// double. cuBLAS GEMMs on half/bfloat16 accumulate in float as well.
//
// Per-element index math comes from conv2d.h (shared with, and tested through, the CPU kernels).

#include "ops/conv2d.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace cnnops {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover anything beyond this many blocks, keeping huge problems inside the
// grid limits while still filling every SM many times over.
constexpr int64_t kMaxBlocks = int64_t(1) << 22;
// Upper bound on the im2col scratch (column matrix plus GEMM result / permuted grad_output) per
// batch chunk. A single sample larger than this is still processed (one sample per chunk).
constexpr int64_t kIm2colBudgetBytes = int64_t(256) << 20;
// Reductions over N*P*Q use a whole block per element when there is at least this much work per
// element, and a single warp otherwise (so small spatial sizes do not leave 7/8 of a block idle).
constexpr int64_t kBlockReduceMinCount = 2048;

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned int grid_size(int64_t blocks_needed) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks_needed, kMaxBlocks)));
}

// Largest element offset reachable in the first `n` samples of a tensor of `t`'s shape and
// strides; decides whether 32-bit index arithmetic is safe for a chunk.
int64_t max_offset(const at::Tensor& t, int64_t n) {
  int64_t off = (n - 1) * t.stride(0);
  for (int d = 1; d < 4; ++d) off += (t.size(d) - 1) * t.stride(d);
  return off;
}

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Runs f(index_tag) with an int32_t tag when every offset fits in 32 bits, else int64_t. The
// memory-bound im2col-side kernels decompose flat indices with several divisions per element,
// which are much cheaper in 32 bits; tensors over 2^31 elements take the 64-bit path.
template <typename F>
void with_index_type(bool fits_int32, const F& f) {
  if (fits_int32) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// ===================================================================================
// CUDA-only helpers (iteration / reduction machinery, not conv index math).
// Candidate for conv2d.h if a CPU kernel ever wants the same carry-based walk: BoxCursor.
// ===================================================================================

// Walks the points of an (unbounded) n x np x nq box in row-major order, starting at flat
// position `start` and moving `step` positions per advance(). `step` is pre-split in the same
// mixed radix, so each advance is two compares instead of 64-bit divisions (which are emulated on
// the GPU). Valid while step's digits are < (np, nq), which the construction guarantees.
// index_t: int64_t unless given (the arguments do not pick it); int for boxes known to be small,
// where the divisions are inline rather than calls.
template <typename index_t = int64_t>
struct BoxCursor {
  index_t n, p, q;
  index_t dn, dp, dq;
  index_t np, nq;

  __device__ __forceinline__ BoxCursor(NotDeduced<index_t> start,
                                       NotDeduced<index_t> step,
                                       NotDeduced<index_t> np_,
                                       NotDeduced<index_t> nq_)
      : np(np_), nq(nq_) {
    q = start % nq;
    index_t t = start / nq;
    p = t % np;
    n = t / np;
    dq = step % nq;
    t = step / nq;
    dp = t % np;
    dn = t / np;
  }

  __device__ __forceinline__ void advance() {
    q += dq;
    if (q >= nq) {
      q -= nq;
      ++p;
    }
    p += dp;  // p <= 2*np - 1 here, so one carry is enough
    if (p >= np) {
      p -= np;
      ++n;
    }
    n += dn;
  }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums `v` over each group of kLanes consecutive threads (kLanes = 32: a warp, or kThreads: the
// block). The total is valid in the group's first thread. Must be reached by the whole block
// when kLanes == kThreads. The order of additions is fixed, so results are deterministic.
template <int kLanes, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, acc_t* smem /* kThreads / 32 */) {
  static_assert(kLanes == 32 || kLanes == kThreads, "group_sum: a warp or the whole block");
  v = warp_sum(v);
  if constexpr (kLanes == kThreads) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    __syncthreads();  // the previous call's readers are done with smem
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = (warp == 0 && lane < kThreads / 32) ? smem[lane] : acc_t(0);
    if (warp == 0) v = warp_sum(v);
  }
  return v;
}

// ===================================================================================
// direct: forward
// ===================================================================================

// Splits a direct kernel's flat thread index into (sample, channel tile, row, column), with the
// fastest-moving coordinate matching the tensor layout so that neighbouring threads touch
// neighbouring addresses: the column for NCHW, the channel tile for channels_last.
__device__ __forceinline__ void split_thread_index(int64_t idx, int64_t tiles, int64_t rows,
                                                   int64_t cols, bool channels_last, int64_t& n,
                                                   int64_t& tile, int64_t& row, int64_t& col) {
  if (channels_last) {
    tile = idx % tiles;
    idx /= tiles;
    col = idx % cols;
    idx /= cols;
    row = idx % rows;
    n = idx / rows;
  } else {
    col = idx % cols;
    idx /= cols;
    row = idx % rows;
    idx /= rows;
    tile = idx % tiles;
    n = idx / tiles;
  }
}

// One thread per (n, tile of KT output channels of one group, p, q).
// Tiling: the KT channels share every input load, so each input value read from global memory
// feeds KT FMAs; the weight loads are warp-uniform (neighbouring threads differ in p/q only) and
// served by L1 broadcasts. Taps are bounds-checked per (r, s) row, outside the channel loop.
// Thread order follows the output layout: for NCHW, q is fastest, so input rows are read and
// output rows written coalesced; for channels_last, the channel tile is fastest, so the
// channel-contiguous input pixels (inner loop over c) and output pixels are coalesced.
// A tile that runs past the group's last channel recomputes that channel (clamped weight
// offsets) instead of branching in the inner loop, and only writes the valid channels.
template <typename scalar_t, typename acc_t, int KT>
__global__ void __launch_bounds__(kThreads)
    conv2d_direct_forward_kernel(const scalar_t* __restrict__ input,
                                 const scalar_t* __restrict__ weight,
                                 const scalar_t* __restrict__ bias,  // contiguous, or nullptr
                                 scalar_t* __restrict__ output, Conv2dShape cs, Strides4 in_st,
                                 Strides4 w_st, Strides4 out_st, bool channels_last,
                                 int64_t total) {
  const int64_t Cg = cs.channels_per_group();
  const int64_t Kg = cs.outputs_per_group();
  const int64_t tiles_per_group = (Kg + KT - 1) / KT;
  const int64_t ktiles = cs.groups * tiles_per_group;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    int64_t n, kt, p, q;
    split_thread_index(idx, ktiles, cs.P, cs.Q, channels_last, n, kt, p, q);
    const int64_t g = kt / tiles_per_group;
    const int64_t k_in_group = (kt - g * tiles_per_group) * KT;
    const int64_t k0 = g * Kg + k_in_group;
    const int64_t nk = (Kg - k_in_group) < KT ? (Kg - k_in_group) : KT;

    acc_t acc[KT];
    int64_t w_off[KT];
#pragma unroll
    for (int j = 0; j < KT; ++j) {
      const int64_t kj = j < nk ? j : nk - 1;
      w_off[j] = kj * w_st.n;
      acc[j] = bias != nullptr ? static_cast<acc_t>(bias[k0 + kj]) : acc_t(0);
    }

    const scalar_t* in_n = input + n * in_st.n + g * Cg * in_st.c;
    const scalar_t* w_k = weight + k0 * w_st.n;
    for (int64_t r = 0; r < cs.R; ++r) {
      const int64_t h = conv_input_coord(p, r, cs.stride_h, cs.pad_h, cs.dilation_h);
      if (h < 0 || h >= cs.H) continue;
      for (int64_t tap_s = 0; tap_s < cs.S; ++tap_s) {
        const int64_t w = conv_input_coord(q, tap_s, cs.stride_w, cs.pad_w, cs.dilation_w);
        if (w < 0 || w >= cs.W) continue;
        const scalar_t* ip = in_n + h * in_st.h + w * in_st.w;
        const scalar_t* wp = w_k + r * w_st.h + tap_s * w_st.w;
        for (int64_t c = 0; c < Cg; ++c) {
          const acc_t x = static_cast<acc_t>(*ip);
#pragma unroll
          for (int j = 0; j < KT; ++j) acc[j] += x * static_cast<acc_t>(wp[w_off[j]]);
          ip += in_st.c;
          wp += w_st.c;
        }
      }
    }

    scalar_t* op = output + n * out_st.n + k0 * out_st.c + p * out_st.h + q * out_st.w;
#pragma unroll
    for (int j = 0; j < KT; ++j) {
      if (j < nk) op[j * out_st.c] = static_cast<scalar_t>(acc[j]);
    }
  }
}

// ===================================================================================
// direct: grad input (gather)
// ===================================================================================

// One thread per (n, tile of CT input channels of one group, h, w); it gathers
// sum over (oc in group, r, s) of grad_out[n, oc, p, q] * weight[oc, c, r, s] for the (p, q) that
// read (h, w) through (r, s) (conv_output_coord_for_input). Each element is owned by one thread:
// deterministic, no atomics, no zero-fill pass.
// Tiling: the CT input channels share every grad_output load (one load, CT FMAs); weight loads
// are warp-uniform. With stride > 1 most taps miss (the divisibility test), so the tap test sits
// outside the output-channel loop. Thread order follows the grad_input layout as in the forward.
template <typename scalar_t, typename acc_t, int CT>
__global__ void __launch_bounds__(kThreads)
    conv2d_direct_grad_input_kernel(const scalar_t* __restrict__ grad_out,
                                    const scalar_t* __restrict__ weight,
                                    scalar_t* __restrict__ grad_input, Conv2dShape cs,
                                    Strides4 go_st, Strides4 w_st, Strides4 gi_st,
                                    bool channels_last, int64_t total) {
  const int64_t Cg = cs.channels_per_group();
  const int64_t Kg = cs.outputs_per_group();
  const int64_t tiles_per_group = (Cg + CT - 1) / CT;
  const int64_t ctiles = cs.groups * tiles_per_group;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    int64_t n, ct, h, w;
    split_thread_index(idx, ctiles, cs.H, cs.W, channels_last, n, ct, h, w);
    const int64_t g = ct / tiles_per_group;
    const int64_t c_in_group = (ct - g * tiles_per_group) * CT;
    const int64_t nc = (Cg - c_in_group) < CT ? (Cg - c_in_group) : CT;

    acc_t acc[CT];
    int64_t w_off[CT];
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      w_off[j] = (j < nc ? j : nc - 1) * w_st.c;
      acc[j] = acc_t(0);
    }

    const scalar_t* go_n = grad_out + n * go_st.n + g * Kg * go_st.c;
    const scalar_t* w_base = weight + g * Kg * w_st.n + c_in_group * w_st.c;
    for (int64_t r = 0; r < cs.R; ++r) {
      const int64_t p =
          conv_output_coord_for_input(h, r, cs.stride_h, cs.pad_h, cs.dilation_h, cs.P);
      if (p < 0) continue;
      for (int64_t tap_s = 0; tap_s < cs.S; ++tap_s) {
        const int64_t q =
            conv_output_coord_for_input(w, tap_s, cs.stride_w, cs.pad_w, cs.dilation_w, cs.Q);
        if (q < 0) continue;
        const scalar_t* gp = go_n + p * go_st.h + q * go_st.w;
        const scalar_t* wp = w_base + r * w_st.h + tap_s * w_st.w;
        for (int64_t oc = 0; oc < Kg; ++oc) {
          const acc_t y = static_cast<acc_t>(*gp);
#pragma unroll
          for (int j = 0; j < CT; ++j) acc[j] += y * static_cast<acc_t>(wp[w_off[j]]);
          gp += go_st.c;
          wp += w_st.n;
        }
      }
    }

    scalar_t* gip =
        grad_input + n * gi_st.n + (g * Cg + c_in_group) * gi_st.c + h * gi_st.h + w * gi_st.w;
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      if (j < nc) gip[j * gi_st.c] = static_cast<scalar_t>(acc[j]);
    }
  }
}

// ===================================================================================
// direct: grad weight (one block or one warp per weight element)
// ===================================================================================

// Each weight element (k, c, r, s) is a dot product of grad_out[:, k] with the input plane
// window it slides over, reduced over N*P*Q. A group of kLanes threads (the block, or a warp when
// N*P*Q is small) owns one element: conv_first/last_valid_output trim (p, q) to the box whose
// reads stay inside the input, so the loop has no bounds checks, and the lanes walk that box
// q-fastest (coalesced grad_out rows, input rows at the conv stride) with a BoxCursor instead of
// per-iteration divisions. Partial sums are reduced in acc_t in a fixed order (deterministic) and
// written once; grad_weight is contiguous.
template <typename scalar_t, typename acc_t, int kLanes>
__global__ void __launch_bounds__(kThreads)
    conv2d_direct_grad_weight_kernel(const scalar_t* __restrict__ grad_out,
                                     const scalar_t* __restrict__ input,
                                     scalar_t* __restrict__ grad_weight, Conv2dShape cs,
                                     Strides4 go_st, Strides4 in_st, int64_t numel) {
  constexpr int kGroupsPerBlock = kThreads / kLanes;
  __shared__ acc_t smem[kThreads / 32];
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const int64_t Cg = cs.channels_per_group();
  const int64_t Kg = cs.outputs_per_group();
  // Uniform across the block, so every thread reaches group_sum's barriers equally often.
  for (int64_t base = int64_t(blockIdx.x) * kGroupsPerBlock; base < numel;
       base += int64_t(gridDim.x) * kGroupsPerBlock) {
    const int64_t e = base + group;
    acc_t acc = acc_t(0);
    if (e < numel) {
      int64_t t = e;
      const int64_t tap_s = t % cs.S;
      t /= cs.S;
      const int64_t r = t % cs.R;
      t /= cs.R;
      const int64_t c = t % Cg;
      const int64_t k = t / Cg;
      const int64_t g = k / Kg;
      const int64_t p_lo = conv_first_valid_output(r, cs.stride_h, cs.pad_h, cs.dilation_h);
      const int64_t p_hi =
          conv_last_valid_output(r, cs.H, cs.P, cs.stride_h, cs.pad_h, cs.dilation_h);
      const int64_t q_lo = conv_first_valid_output(tap_s, cs.stride_w, cs.pad_w, cs.dilation_w);
      const int64_t q_hi =
          conv_last_valid_output(tap_s, cs.W, cs.Q, cs.stride_w, cs.pad_w, cs.dilation_w);
      if (p_hi > p_lo && q_hi > q_lo) {
        const scalar_t* go_k = grad_out + k * go_st.c;
        const scalar_t* in_c = input + (g * Cg + c) * in_st.c;
        for (BoxCursor cur(lane, kLanes, p_hi - p_lo, q_hi - q_lo); cur.n < cs.N; cur.advance()) {
          const int64_t p = p_lo + cur.p;
          const int64_t q = q_lo + cur.q;
          const int64_t h = conv_input_coord(p, r, cs.stride_h, cs.pad_h, cs.dilation_h);
          const int64_t w = conv_input_coord(q, tap_s, cs.stride_w, cs.pad_w, cs.dilation_w);
          acc += static_cast<acc_t>(go_k[cur.n * go_st.n + p * go_st.h + q * go_st.w]) *
                 static_cast<acc_t>(in_c[cur.n * in_st.n + h * in_st.h + w * in_st.w]);
        }
      }
    }
    acc = group_sum<kLanes>(acc, smem);
    if (lane == 0 && e < numel) grad_weight[e] = static_cast<scalar_t>(acc);
  }
}

// ===================================================================================
// grad bias (both algorithms)
// ===================================================================================

// grad_bias[k] = sum over (n, p, q) of grad_out[n, k, p, q]. Same shape of work as the
// grad-weight reduction: one block (or warp, for small N*P*Q) per channel, lanes walking the
// N x P x Q box q-fastest (coalesced for NCHW grad_out; for channels_last the per-lane reads are
// K apart, but neighbouring channels' blocks share the same cache lines in L2), acc_t partials
// reduced in a fixed order.
template <typename scalar_t, typename acc_t, int kLanes>
__global__ void __launch_bounds__(kThreads)
    conv2d_grad_bias_kernel(const scalar_t* __restrict__ grad_out,
                            scalar_t* __restrict__ grad_bias, Conv2dShape cs, Strides4 go_st) {
  constexpr int kGroupsPerBlock = kThreads / kLanes;
  __shared__ acc_t smem[kThreads / 32];
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  for (int64_t base = int64_t(blockIdx.x) * kGroupsPerBlock; base < cs.K;
       base += int64_t(gridDim.x) * kGroupsPerBlock) {
    const int64_t k = base + group;
    acc_t acc = acc_t(0);
    if (k < cs.K) {
      const scalar_t* go_k = grad_out + k * go_st.c;
      for (BoxCursor cur(lane, kLanes, cs.P, cs.Q); cur.n < cs.N; cur.advance()) {
        acc += static_cast<acc_t>(go_k[cur.n * go_st.n + cur.p * go_st.h + cur.q * go_st.w]);
      }
    }
    acc = group_sum<kLanes>(acc, smem);
    if (lane == 0 && k < cs.K) grad_bias[k] = static_cast<scalar_t>(acc);
  }
}

// ===================================================================================
// im2col: column matrix, GEMM epilogue, col2im
// ===================================================================================
// Column matrix of a chunk of `nb` samples: shape (C*R*S, nb*P*Q), row (c, r, s), column
// (n, p, q), both row-major. Since C = groups * C/groups, it is also (groups, Cg*R*S, nb*P*Q):
// one GEMM operand per group, batched by at::bmm with the weight viewed as (groups, Kg, Cg*R*S).

// One thread per column-matrix entry, in the matrix's own order, so the (dominant) writes are
// fully coalesced; along a row the reads walk an input row at the conv stride. Padding taps
// write zeros, so the GEMM needs no masking. `input` points at the chunk's first sample.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv2d_im2col_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ col,
                         Conv2dShape cs, Strides4 in_st, int64_t nb, int64_t total) {
  const index_t Q = static_cast<index_t>(cs.Q), P = static_cast<index_t>(cs.P);
  const index_t R = static_cast<index_t>(cs.R), S = static_cast<index_t>(cs.S);
  const index_t NB = static_cast<index_t>(nb);
  const index_t sn = static_cast<index_t>(in_st.n), sc = static_cast<index_t>(in_st.c);
  const index_t sh = static_cast<index_t>(in_st.h), sw = static_cast<index_t>(in_st.w);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    index_t t = static_cast<index_t>(idx);
    const index_t q = t % Q;
    t /= Q;
    const index_t p = t % P;
    t /= P;
    const index_t n = t % NB;
    t /= NB;
    const index_t tap_s = t % S;
    t /= S;
    const index_t r = t % R;
    const index_t c = t / R;
    const int64_t h = conv_input_coord(p, r, cs.stride_h, cs.pad_h, cs.dilation_h);
    const int64_t w = conv_input_coord(q, tap_s, cs.stride_w, cs.pad_w, cs.dilation_w);
    scalar_t v = static_cast<scalar_t>(0.0f);
    if (h >= 0 && h < cs.H && w >= 0 && w < cs.W) {
      v = input[n * sn + c * sc + static_cast<index_t>(h) * sh + static_cast<index_t>(w) * sw];
    }
    col[idx] = v;
  }
}

// Scatters the GEMM result (K, nb, P, Q) of a chunk into the output (any layout) and adds the
// bias in acc_t. Threads follow the output layout so the writes are coalesced; for NCHW the
// reads are too, for channels_last they are P*Q*nb apart (absorbed by L2: a warp's 32 channels
// are read again by the neighbouring (p, q) warps). `output` points at the chunk's first sample.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv2d_gemm_to_output_kernel(const scalar_t* __restrict__ result,
                                 const scalar_t* __restrict__ bias,  // contiguous, or nullptr
                                 scalar_t* __restrict__ output, Conv2dShape cs, Strides4 out_st,
                                 int64_t nb, bool channels_last, int64_t total) {
  const index_t Q = static_cast<index_t>(cs.Q), P = static_cast<index_t>(cs.P);
  const index_t K = static_cast<index_t>(cs.K), NB = static_cast<index_t>(nb);
  const index_t sn = static_cast<index_t>(out_st.n), sc = static_cast<index_t>(out_st.c);
  const index_t sh = static_cast<index_t>(out_st.h), sw = static_cast<index_t>(out_st.w);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    index_t t = static_cast<index_t>(idx);
    index_t n, k, p, q;
    if (channels_last) {
      k = t % K;
      t /= K;
      q = t % Q;
      t /= Q;
      p = t % P;
      n = t / P;
    } else {
      q = t % Q;
      t /= Q;
      p = t % P;
      t /= P;
      k = t % K;
      n = t / K;
    }
    acc_t v = static_cast<acc_t>(result[((k * NB + n) * P + p) * Q + q]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[k]);
    output[n * sn + k * sc + p * sh + q * sw] = static_cast<scalar_t>(v);
  }
}

// col2im as a gather: one thread per input element of the chunk sums the column-matrix entries
// (one per tap (r, s) whose output coordinate exists) that were produced from it, so each
// grad_input element has a single writer (deterministic, no atomics, no zero-fill). Threads run
// w-fastest, which keeps the column reads (consecutive q along a column-matrix row) coalesced;
// those are R*S times more numerous than the writes, so they pick the order. `grad_input` points
// at the chunk's first sample.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv2d_col2im_kernel(const scalar_t* __restrict__ col, scalar_t* __restrict__ grad_input,
                         Conv2dShape cs, Strides4 gi_st, int64_t nb, int64_t total) {
  const index_t W = static_cast<index_t>(cs.W), H = static_cast<index_t>(cs.H);
  const index_t C = static_cast<index_t>(cs.C);
  const index_t P = static_cast<index_t>(cs.P), Q = static_cast<index_t>(cs.Q);
  const index_t R = static_cast<index_t>(cs.R), S = static_cast<index_t>(cs.S);
  const index_t NBPQ = static_cast<index_t>(nb * cs.P * cs.Q);
  const index_t sn = static_cast<index_t>(gi_st.n), sc = static_cast<index_t>(gi_st.c);
  const index_t sh = static_cast<index_t>(gi_st.h), sw = static_cast<index_t>(gi_st.w);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    index_t t = static_cast<index_t>(idx);
    const index_t w = t % W;
    t /= W;
    const index_t h = t % H;
    t /= H;
    const index_t c = t % C;
    const index_t n = t / C;
    acc_t acc = acc_t(0);
    // Not unrolled: each tap test may call the 64-bit division routine, and unrolled copies keep
    // more values live across those calls than the calling convention preserves (spills).
#pragma unroll 1
    for (index_t r = 0; r < R; ++r) {
      const int64_t p =
          conv_output_coord_for_input(h, r, cs.stride_h, cs.pad_h, cs.dilation_h, cs.P);
      if (p < 0) continue;
      const index_t row_base = (n * P + static_cast<index_t>(p)) * Q;
#pragma unroll 1
      for (index_t tap_s = 0; tap_s < S; ++tap_s) {
        const int64_t q =
            conv_output_coord_for_input(w, tap_s, cs.stride_w, cs.pad_w, cs.dilation_w, cs.Q);
        if (q < 0) continue;
        acc += static_cast<acc_t>(
            col[((c * R + r) * S + tap_s) * NBPQ + row_base + static_cast<index_t>(q)]);
      }
    }
    grad_input[n * sn + c * sc + h * sh + w * sw] = static_cast<scalar_t>(acc);
  }
}

// ===================================================================================
// depthwise: shared-memory tiles
// ===================================================================================
// A depthwise layer (groups == C, m = K / C filters per input channel) does R*S multiply-adds per
// output: far too few per loaded value to be compute bound, so these kernels are about reading
// each input value from global memory once. The direct kernel reads every input value R*S times
// through L1; here a block stages its tile's input once, halo included, into shared memory
// (converted to acc_t, zeros for padding, so the inner loops have no bounds checks and no
// conversions) and every thread computes kDwCols adjacent outputs of one row from it, keeping the
// input values its outputs share in registers.
//
// Tile: a block covers `channels` channels x `rows` rows x `groups` runs of kDwCols columns of one
// sample, one thread per (channel, row, run). Thread order follows the tensor layout:
//   NCHW: the run is fastest. Planes are staged row by row (coalesced), a row padded to an odd
//         pitch so that the threads of neighbouring rows start in different banks; one tile row
//         holds up to 32 outputs. Small planes put several channels in a block.
//   channels_last: the channel is fastest (32 channels per tile, a warp's lanes): staging reads a
//         pixel's channels side by side (coalesced), the shared tile is [row][column][channel]
//         (lane-consecutive, conflict-free), and each output pixel's channels are written together.
// The planner (plan_depthwise_tile) balances the tiles over the plane, shrinks them until the grid
// fills the GPU, and until they fit in kDwSmemBytes; a kernel too dilated for even one run of one
// row to fit (a dilated kernel extent past about 80 pixels) runs the direct kernels instead.
// Each block stages its channels' weights for one filter of the multiplier at a time and loops
// over the m filters, reusing the staged input.
// Sizes (MobileNetV2's 3x3 layers on 132 SMs, fp32): NCHW 112 x 112 planes get 28 x 28 outputs
// per block (224 threads, 30 x 30 staged at pitch 31, 3.7 KB); NCHW 7 x 7 at batch 1, 3 planes
// of 7 x 8 (64 threads); channels_last 56 x 56, 8 x 4 outputs x 32 channels (256 threads,
// 10 x 6 x 32 staged, 8.6 KB).

// Adjacent outputs per thread (grad input: adjacent input pixels). 4 keeps a stride-2 3x3 window
// (9 values) and the accumulators of double precision in registers.
constexpr int kDwCols = 4;
// Staged tile plus weights per block: the shared memory a block gets without opting in.
constexpr int64_t kDwSmemBytes = 48 * 1024;
constexpr int64_t kDwLaneChannels = 32;  // channels per channels_last tile
constexpr int64_t kDwMaxGroups = 8;      // NCHW: kDwMaxGroups * kDwCols outputs per tile row

struct DepthwiseTile {
  int channels, rows, groups;  // per block; one thread per (channel, row, run of kDwCols)
  bool channels_last;          // thread and shared-memory order
  int src_rows, src_cols;      // the staged window of one channel (halo included), at most
  int sm_c, sm_h, sm_w;        // its shared-memory strides, in elements
  int tile_elems;              // staged elements of all the block's channels
  // Tiles per sample along each dimension. The grid is (tiles of a sample, samples): blocks
  // loop over samples past the grid's height, so a block's tile geometry is computed once.
  int channel_tiles, row_tiles, col_tiles, sample_tiles;
  int threads;
  size_t smem_bytes;
};

// This thread's place in the tile; `active` is false for the threads that round the block up to
// whole warps (they still help to stage).
struct DepthwiseThread {
  int channel, row, group;
  bool active;
};

__device__ __forceinline__ DepthwiseThread depthwise_thread(const DepthwiseTile& t) {
  int i = threadIdx.x;
  DepthwiseThread th;
  if (t.channels_last) {
    th.channel = i % t.channels;
    i /= t.channels;
    th.group = i % t.groups;
    th.row = i / t.groups;
  } else {
    th.group = i % t.groups;
    i /= t.groups;
    th.row = i % t.rows;
    th.channel = i / t.rows;
  }
  th.active = th.row < t.rows && th.channel < t.channels;
  return th;
}

// The first channel, row and column of this block's tile, and how many of its channels the
// layer has (the last channel tile may hold fewer); neighbouring blocks take neighbouring column
// tiles.
struct DepthwiseTileOrigin {
  int c0, row0, col0;
  int channels;
};

__device__ __forceinline__ DepthwiseTileOrigin depthwise_tile_origin(const DepthwiseTile& t,
                                                                     int64_t layer_channels) {
  int tile = static_cast<int>(blockIdx.x);
  const int col = tile % t.col_tiles;
  tile /= t.col_tiles;
  const int row = tile % t.row_tiles;
  const int c0 = tile / t.row_tiles * t.channels;
  const int channels = static_cast<int>(
      layer_channels - c0 < t.channels ? layer_channels - c0 : t.channels);
  return {c0, row * t.rows, col * t.groups * kDwCols, channels};
}

// Stages rows [row0, row0 + rows) x columns [col0, col0 + cols) (rows <= t.src_rows, cols <=
// t.src_cols) of the block's channels of `src` into `tile`, as acc_t, with zeros outside the
// tensor's [0, height) x [0, width) and for the channels from valid_channels on (past the
// layer's last). `src` points at the block's sample and first channel; st.c is the step between
// the block's channels. The walk follows the tensor layout (see depthwise_thread), so
// consecutive threads read consecutive addresses.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ void depthwise_stage(acc_t* __restrict__ tile,
                                                const scalar_t* __restrict__ src, Strides4 st,
                                                int valid_channels, int64_t row0, int64_t col0,
                                                int rows, int cols, int64_t height,
                                                int64_t width, const DepthwiseTile& t) {
  if (rows <= 0 || cols <= 0) return;  // a window no output reads (stride > dilated kernel)
  const int outer = t.channels_last ? rows : t.channels;
  const int middle = t.channels_last ? cols : rows;
  const int inner = t.channels_last ? t.channels : cols;
  for (BoxCursor<int> cur(threadIdx.x, blockDim.x, middle, inner); cur.n < outer; cur.advance()) {
    const int c = t.channels_last ? cur.q : cur.n;
    const int y = t.channels_last ? cur.n : cur.p;
    const int x = t.channels_last ? cur.p : cur.q;
    const int64_t h = row0 + y;
    const int64_t w = col0 + x;
    acc_t v = acc_t(0);
    if (c < valid_channels && h >= 0 && h < height && w >= 0 && w < width) {
      v = static_cast<acc_t>(src[static_cast<index_t>(c) * static_cast<index_t>(st.c) +
                                 static_cast<index_t>(h) * static_cast<index_t>(st.h) +
                                 static_cast<index_t>(w) * static_cast<index_t>(st.w)]);
    }
    tile[c * t.sm_c + y * t.sm_h + x * t.sm_w] = v;
  }
}

// w_tile[tap * t.channels + c] = tap `tap` of filter j of the block's input channel c (output
// channel (c0 + c) * m + j), as acc_t; weight is contiguous (K, 1, R, S).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void depthwise_stage_weights(acc_t* __restrict__ w_tile,
                                                        const scalar_t* __restrict__ weight,
                                                        int64_t c0, int64_t j, int64_t m,
                                                        int valid_channels, int taps,
                                                        const DepthwiseTile& t) {
  for (int i = threadIdx.x; i < taps * t.channels; i += blockDim.x) {
    const int tap = i / t.channels;
    const int c = i - tap * t.channels;
    w_tile[i] = c < valid_channels
                    ? static_cast<acc_t>(weight[((c0 + c) * m + j) * taps + tap])
                    : acc_t(0);
  }
}

// Writes a thread's run: acc[i] to element (channel, row, col + i) of a sample of `dst`, for the
// columns before `cols`.
template <typename index_t, typename acc_t, typename scalar_t>
__device__ __forceinline__ void depthwise_store_run(const acc_t (&acc)[kDwCols],
                                                    scalar_t* __restrict__ dst, Strides4 st,
                                                    int channel, int row, int col, int64_t cols) {
#pragma unroll
  for (int i = 0; i < kDwCols; ++i) {
    if (col + i < cols) {
      const index_t offset = static_cast<index_t>(channel) * static_cast<index_t>(st.c) +
                             static_cast<index_t>(row) * static_cast<index_t>(st.h) +
                             static_cast<index_t>(col + i) * static_cast<index_t>(st.w);
      dst[offset] = static_cast<scalar_t>(acc[i]);
    }
  }
}

// Adds to acc[i] output (row, col + i)'s taps; `src` is the staged input read by tap (0, 0) of
// output (row, col), `w` the first tap of the thread's filter (taps t.channels apart). kS > 0:
// a kS-wide kernel at column stride kSW and dilation 1, whose row window (kSpan values) is loaded
// into registers once for all its taps; kS == 0: any width, stride and dilation.
template <int kS, int kSW, typename acc_t>
__device__ __forceinline__ void depthwise_forward_taps(acc_t (&acc)[kDwCols],
                                                       const acc_t* __restrict__ src,
                                                       const acc_t* __restrict__ w,
                                                       const Conv2dShape& cs,
                                                       const DepthwiseTile& t) {
  const int row_step = static_cast<int>(cs.dilation_h) * t.sm_h;
  for (int r = 0; r < cs.R; ++r, src += row_step, w += cs.S * t.channels) {
    if constexpr (kS > 0) {
      constexpr int kSpan = (kDwCols - 1) * kSW + kS;
      acc_t x[kSpan];
#pragma unroll
      for (int i = 0; i < kSpan; ++i) x[i] = src[i * t.sm_w];
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        const acc_t wv = w[s * t.channels];
#pragma unroll
        for (int i = 0; i < kDwCols; ++i) acc[i] += x[i * kSW + s] * wv;
      }
    } else {
      const int tap_step = static_cast<int>(cs.dilation_w) * t.sm_w;
      const int out_step = static_cast<int>(cs.stride_w) * t.sm_w;
      for (int s = 0; s < cs.S; ++s) {
        const acc_t wv = w[s * t.channels];
        const acc_t* xs = src + s * tap_step;
#pragma unroll
        for (int i = 0; i < kDwCols; ++i) acc[i] += xs[i * out_step] * wv;
      }
    }
  }
}

// One block per tile of output pixels (see the section comment); the staged input tile is the
// halo of the tile's outputs: conv_input_extent of its rows and columns.
// No __launch_bounds__ on the two tile kernels: with it, ptxas (CUDA 13.0, sm_90) chose fewer
// registers than they need and spilled a few values (the write predicate, stage bounds) to local
// memory; without it, it keeps to 64 registers (a 1024-thread budget) and spills nothing.
template <typename scalar_t, typename acc_t, typename index_t, int kS, int kSW>
__global__ void conv2d_depthwise_forward_kernel(const scalar_t* __restrict__ input,
                                                const scalar_t* __restrict__ weight,  // contiguous
                                                const scalar_t* __restrict__ bias,  // or nullptr
                                                scalar_t* __restrict__ output, Conv2dShape cs,
                                                Strides4 in_st, Strides4 out_st, DepthwiseTile t) {
  extern __shared__ __align__(sizeof(double)) unsigned char depthwise_smem[];
  acc_t* in_tile = reinterpret_cast<acc_t*>(depthwise_smem);
  acc_t* w_tile = in_tile + t.tile_elems;
  const int m = static_cast<int>(cs.K) / static_cast<int>(cs.C);  // 32-bit: see the grad input
  const int taps = static_cast<int>(cs.R * cs.S);
  const DepthwiseThread th = depthwise_thread(t);
  const DepthwiseTileOrigin o = depthwise_tile_origin(t, cs.C);
  const int c = o.c0 + th.channel;
  const int p = o.row0 + th.row;
  const int q = o.col0 + th.group * kDwCols;  // the first of the thread's outputs
  const bool writes = th.active && c < cs.C && p < cs.P;
  // Where the thread's first output reads through tap (0, 0), in the staged tile.
  const acc_t* src = in_tile + th.channel * t.sm_c +
                     th.row * static_cast<int>(cs.stride_h) * t.sm_h +
                     th.group * kDwCols * static_cast<int>(cs.stride_w) * t.sm_w;
  for (int64_t n = blockIdx.y; n < cs.N; n += gridDim.y) {
    __syncthreads();  // the previous sample's readers are done with the shared tiles
    depthwise_stage<scalar_t, acc_t, index_t>(
        in_tile, input + n * in_st.n + o.c0 * in_st.c, in_st, o.channels,
        conv_input_coord(o.row0, 0, cs.stride_h, cs.pad_h, cs.dilation_h),
        conv_input_coord(o.col0, 0, cs.stride_w, cs.pad_w, cs.dilation_w), t.src_rows,
        t.src_cols, cs.H, cs.W, t);
    scalar_t* out_n = output + n * out_st.n;
    for (int j = 0; j < m; ++j) {
      if (j > 0) __syncthreads();  // the previous filter's weights are read
      depthwise_stage_weights(w_tile, weight, o.c0, j, m, o.channels, taps, t);
      __syncthreads();
      if (!writes) continue;
      const int k = c * m + j;
      const acc_t init = bias != nullptr ? static_cast<acc_t>(bias[k]) : acc_t(0);
      acc_t acc[kDwCols];
#pragma unroll
      for (int i = 0; i < kDwCols; ++i) acc[i] = init;
      depthwise_forward_taps<kS, kSW>(acc, src, w_tile + th.channel, cs, t);
      depthwise_store_run<index_t>(acc, out_n, out_st, k, p, q, cs.Q);
    }
  }
}

// Grad input as a gather, tiled like the forward pass over input pixels: input pixel (h, w) sums
// grad_out[k, p, q] * weight[k, r, s] over the m filters k of its channel and the taps (r, s)
// whose output (p, q) reads it. The block stages, per filter, the window of grad_out rows and
// columns that its tile's pixels gather from (conv_outputs_reading_begin/end), zeros outside the
// output; a thread owns kDwCols adjacent pixels of a row and keeps their sums in registers across
// the filters. Each element has one writer: deterministic, no atomics, no zero-fill pass.
// kSW: the column stride when it is 1 or 2 (a tap's divisibility test is then free), 0 for any.
template <typename scalar_t, typename acc_t, typename index_t, int kSW>
__global__ void conv2d_depthwise_grad_input_kernel(const scalar_t* __restrict__ grad_out,
                                                   const scalar_t* __restrict__ weight,
                                                   scalar_t* __restrict__ grad_input,
                                                   Conv2dShape cs, Strides4 go_st, Strides4 gi_st,
                                                   DepthwiseTile t) {
  extern __shared__ __align__(sizeof(double)) unsigned char depthwise_smem[];
  acc_t* go_tile = reinterpret_cast<acc_t*>(depthwise_smem);
  acc_t* w_tile = go_tile + t.tile_elems;
  // Coordinates within a sample are int (plan_depthwise_tile checks the sizes): 64-bit division
  // is a call on the GPU, and the registers it saves made this kernel spill.
  const int m = static_cast<int>(cs.K) / static_cast<int>(cs.C);
  const int taps = static_cast<int>(cs.R * cs.S);
  const int sh = static_cast<int>(cs.stride_h), sw = kSW > 0 ? kSW : static_cast<int>(cs.stride_w);
  const int ph = static_cast<int>(cs.pad_h), pw = static_cast<int>(cs.pad_w);
  const int dh = static_cast<int>(cs.dilation_h), dw = static_cast<int>(cs.dilation_w);
  const int R = static_cast<int>(cs.R), S = static_cast<int>(cs.S);
  const DepthwiseThread th = depthwise_thread(t);
  const DepthwiseTileOrigin o = depthwise_tile_origin(t, cs.C);
  const int c = o.c0 + th.channel;
  const int h = o.row0 + th.row;
  const int w = o.col0 + th.group * kDwCols;  // the first of the thread's pixels
  // The grad output window: the outputs that read the tile's pixels through some tap.
  const int p0 = conv_outputs_reading_begin<int>(o.row0, R - 1, sh, ph, dh);
  const int q0 = conv_outputs_reading_begin<int>(o.col0, S - 1, sw, pw, dw);
  const int window_rows = conv_outputs_reading_end<int>(o.row0 + t.rows, 0, sh, ph, dh) - p0;
  const int window_cols =
      conv_outputs_reading_end<int>(o.col0 + t.groups * kDwCols, 0, sw, pw, dw) - q0;
  // Window output (p, q) reads pixel (h, w + i) through tap (r, s) iff
  //   p * stride_h == h_off - r * dilation_h  and  q * stride_w == w_off + i - s * dilation_w.
  // Wherever that holds both sides are >= 0: the window starts at the first output any tap reads.
  const int h_off = h + ph - p0 * sh;
  const int w_off = w + pw - q0 * sw;
  const acc_t* go_c = go_tile + th.channel * t.sm_c;
  const acc_t* w_c = w_tile + th.channel;
  // Filter j of the block's channels is output channel c0 * m + j onwards, m channels apart.
  Strides4 go_filter_st = go_st;
  go_filter_st.c = m * go_st.c;
  for (int64_t n = blockIdx.y; n < cs.N; n += gridDim.y) {
    acc_t acc[kDwCols];
#pragma unroll
    for (int i = 0; i < kDwCols; ++i) acc[i] = acc_t(0);
    for (int j = 0; j < m; ++j) {
      __syncthreads();  // the previous filter's (or sample's) readers are done
      depthwise_stage<scalar_t, acc_t, index_t>(
          go_tile, grad_out + n * go_st.n + int64_t(o.c0 * m + j) * go_st.c, go_filter_st,
          o.channels, p0, q0, window_rows, window_cols, cs.P, cs.Q, t);
      depthwise_stage_weights(w_tile, weight, o.c0, j, m, o.channels, taps, t);
      __syncthreads();
      if (!th.active) continue;
      for (int r = 0; r < R; ++r) {
        const int dp = h_off - r * dh;
        if (dp < 0 || dp % sh != 0) continue;
        const acc_t* go_row = go_c + (dp / sh) * t.sm_h;
        for (int s = 0; s < S; ++s) {
          const acc_t wv = w_c[(r * S + s) * t.channels];
          const int dq0 = w_off - s * dw;
#pragma unroll
          for (int i = 0; i < kDwCols; ++i) {
            const int dq = dq0 + i;
            if constexpr (kSW == 1) {
              acc[i] += go_row[dq * t.sm_w] * wv;
            } else if constexpr (kSW == 2) {
              if ((dq & 1) == 0) acc[i] += go_row[(dq >> 1) * t.sm_w] * wv;
            } else {
              if (dq >= 0 && dq % sw == 0) acc[i] += go_row[(dq / sw) * t.sm_w] * wv;
            }
          }
        }
      }
    }
    if (th.active && c < cs.C && h < cs.H) {
      depthwise_store_run<index_t>(acc, grad_input + n * gi_st.n, gi_st, c, h, w, cs.W);
    }
  }
}

// Taps per thread of the grad-weight reduction: a 3x3 or 5x5 kernel row in one pass.
constexpr int kDwWeightTaps = 5;

struct DepthwiseWeightPlan {
  int channels;        // filters per block: 1 or 8 (NCHW), 32 (channels_last, channel-fastest)
  bool channels_last;  // thread order
  int64_t channel_tiles, tap_chunks, splits, count;
};

// Grad weight: weight[k, r, s] sums grad_out[n, k, p, q] * input[n, k / m, p, q read through
// (r, s)] over the N x P x Q outputs. A block owns `channels` filters, one kernel row r and
// kDwWeightTaps of its taps (each thread keeps those sums in registers, so a grad_out value is
// loaded once per kernel row rather than once per tap, and the taps' input reads are neighbours
// in L1), and one of `splits` slices of the outputs whose row reads inside the input through r
// (conv_first/last_valid_output, so rows need no bounds checks). Threads walk the slice with a
// BoxCursor in the layout's order: q-fastest for NCHW (coalesced rows), channel-fastest for
// channels_last (coalesced pixels). The block reduces each filter's partial sums with a fixed
// tree in shared memory and writes them to partial[split]; conv2d_depthwise_grad_weight_sum_kernel
// adds the splits in order. Deterministic, no atomics.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv2d_depthwise_grad_weight_kernel(const scalar_t* __restrict__ grad_out,
                                        const scalar_t* __restrict__ input,
                                        acc_t* __restrict__ partial, Conv2dShape cs,
                                        Strides4 go_st, Strides4 in_st, DepthwiseWeightPlan g) {
  __shared__ acc_t sums[kDwWeightTaps][kThreads];
  const int64_t m = cs.K / cs.C;
  const int pixel_threads = blockDim.x / g.channels;  // a power of two
  const int channel = g.channels_last ? threadIdx.x % g.channels : threadIdx.x / pixel_threads;
  const int pixel = g.channels_last ? threadIdx.x / g.channels : threadIdx.x % pixel_threads;
  const int pixel_step = g.channels_last ? g.channels : 1;  // between threads of one filter
  const int64_t weight_numel = cs.K * cs.R * cs.S;
  for (int64_t block = blockIdx.x; block < g.count; block += gridDim.x) {
    int64_t b = block;
    const int64_t split = b % g.splits;
    b /= g.splits;
    const int64_t s0 = (b % g.tap_chunks) * kDwWeightTaps;
    b /= g.tap_chunks;
    const int64_t r = b % cs.R;
    const int64_t k = (b / cs.R) * g.channels + channel;
    const int64_t p_lo = conv_first_valid_output(r, cs.stride_h, cs.pad_h, cs.dilation_h);
    const int64_t p_hi =
        conv_last_valid_output(r, cs.H, cs.P, cs.stride_h, cs.pad_h, cs.dilation_h);
    const int64_t rows = p_hi > p_lo ? p_hi - p_lo : 0;
    const int64_t total = cs.N * rows * cs.Q;
    const int64_t per_split = (total + g.splits - 1) / g.splits;
    const int64_t begin = split * per_split;
    const int64_t end = begin + per_split < total ? begin + per_split : total;
    acc_t acc[kDwWeightTaps];
#pragma unroll
    for (int i = 0; i < kDwWeightTaps; ++i) acc[i] = acc_t(0);
    if (k < cs.K && begin + pixel < end) {
      const scalar_t* go_k = grad_out + k * go_st.c;
      const scalar_t* in_c = input + (k / m) * in_st.c;
      int64_t flat = begin + pixel;
      for (BoxCursor cur(flat, pixel_threads, rows, cs.Q); flat < end;
           flat += pixel_threads, cur.advance()) {
        const int64_t p = p_lo + cur.p;
        const acc_t y = static_cast<acc_t>(
            go_k[static_cast<index_t>(cur.n) * static_cast<index_t>(go_st.n) +
                 static_cast<index_t>(p) * static_cast<index_t>(go_st.h) +
                 static_cast<index_t>(cur.q) * static_cast<index_t>(go_st.w)]);
        const int64_t in_h = conv_input_coord(p, r, cs.stride_h, cs.pad_h, cs.dilation_h);
        const int64_t in_w0 = conv_input_coord(cur.q, s0, cs.stride_w, cs.pad_w, cs.dilation_w);
        const scalar_t* in_row = in_c +
                                 static_cast<index_t>(cur.n) * static_cast<index_t>(in_st.n) +
                                 static_cast<index_t>(in_h) * static_cast<index_t>(in_st.h);
#pragma unroll
        for (int i = 0; i < kDwWeightTaps; ++i) {
          const int64_t in_w = in_w0 + i * cs.dilation_w;
          if (s0 + i < cs.S && in_w >= 0 && in_w < cs.W) {
            acc[i] += y * static_cast<acc_t>(
                              in_row[static_cast<index_t>(in_w) * static_cast<index_t>(in_st.w)]);
          }
        }
      }
    }
    __syncthreads();  // the previous block's readers are done with `sums`
#pragma unroll
    for (int i = 0; i < kDwWeightTaps; ++i) sums[i][threadIdx.x] = acc[i];
    for (int stride = pixel_threads / 2; stride > 0; stride /= 2) {
      __syncthreads();
      if (pixel < stride) {
#pragma unroll
        for (int i = 0; i < kDwWeightTaps; ++i) {
          sums[i][threadIdx.x] += sums[i][threadIdx.x + stride * pixel_step];
        }
      }
    }
    if (pixel == 0 && k < cs.K) {
      acc_t* out = partial + split * weight_numel + (k * cs.R + r) * cs.S;
#pragma unroll
      for (int i = 0; i < kDwWeightTaps; ++i) {
        if (s0 + i < cs.S) out[s0 + i] = sums[i][threadIdx.x];
      }
    }
  }
}

// grad_weight[e] = sum over splits, in order, of partial[split][e].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    conv2d_depthwise_grad_weight_sum_kernel(const acc_t* __restrict__ partial,
                                            scalar_t* __restrict__ grad_weight, int64_t numel,
                                            int64_t splits) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < numel;
       e += int64_t(blockDim.x) * gridDim.x) {
    acc_t sum = acc_t(0);
    for (int64_t i = 0; i < splits; ++i) sum += partial[i * numel + e];
    grad_weight[e] = static_cast<scalar_t>(sum);
  }
}

// ===================================================================================
// Host side
// ===================================================================================

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.is_cuda(), "conv2d (cuda): ", name, " must be a CUDA tensor, got one on ",
              t.device());
  TORCH_CHECK(t.device() == input.device(), "conv2d (cuda): ", name,
              " must be on the same device as input (", input.device(), "), got ", t.device());
}

template <typename scalar_t>
void direct_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& output, const Conv2dShape& cs, bool channels_last,
                    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Kg = cs.outputs_per_group();
  const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  auto launch = [&](auto kt_tag) {
    constexpr int KT = decltype(kt_tag)::value;
    const int64_t total = cs.N * cs.groups * ceil_div(Kg, KT) * cs.P * cs.Q;
    conv2d_direct_forward_kernel<scalar_t, acc_t, KT>
        <<<grid_size(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias_ptr,
            output.mutable_data_ptr<scalar_t>(), cs, strides_of(input), strides_of(weight),
            strides_of(output), channels_last, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // A 4-channel tile only pays off when the group has 4 channels to share the input loads with;
  // depthwise (Kg == 1) and tiny groups use one channel per thread.
  if (Kg >= 4) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename scalar_t>
void direct_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Conv2dShape& cs, bool channels_last,
                       cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = cs.channels_per_group();
  auto launch = [&](auto ct_tag) {
    constexpr int CT = decltype(ct_tag)::value;
    const int64_t total = cs.N * cs.groups * ceil_div(Cg, CT) * cs.H * cs.W;
    conv2d_direct_grad_input_kernel<scalar_t, acc_t, CT>
        <<<grid_size(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), cs, strides_of(grad_output),
            strides_of(weight), strides_of(grad_input), channels_last, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (Cg >= 4) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename scalar_t>
void direct_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Conv2dShape& cs, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = grad_weight.numel();
  auto launch = [&](auto lanes_tag) {
    constexpr int kLanes = decltype(lanes_tag)::value;
    conv2d_direct_grad_weight_kernel<scalar_t, acc_t, kLanes>
        <<<grid_size(ceil_div(numel, kThreads / kLanes)), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
            grad_weight.mutable_data_ptr<scalar_t>(), cs, strides_of(grad_output),
            strides_of(input), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (cs.N * cs.P * cs.Q >= kBlockReduceMinCount) {
    launch(std::integral_constant<int, kThreads>{});
  } else {
    launch(std::integral_constant<int, 32>{});
  }
}

template <typename scalar_t>
void grad_bias(const at::Tensor& grad_output, at::Tensor& grad_bias_out, const Conv2dShape& cs,
               cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  auto launch = [&](auto lanes_tag) {
    constexpr int kLanes = decltype(lanes_tag)::value;
    conv2d_grad_bias_kernel<scalar_t, acc_t, kLanes>
        <<<grid_size(ceil_div(cs.K, kThreads / kLanes)), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), grad_bias_out.mutable_data_ptr<scalar_t>(),
            cs, strides_of(grad_output));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (cs.N * cs.P * cs.Q >= kBlockReduceMinCount) {
    launch(std::integral_constant<int, kThreads>{});
  } else {
    launch(std::integral_constant<int, 32>{});
  }
}

int multiprocessor_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

// Splits `extent` into the fewest tiles of at most `max_size`, evened out; returns the tile size.
int64_t balanced_tile(int64_t extent, int64_t max_size) {
  return ceil_div(extent, ceil_div(extent, std::max<int64_t>(1, max_size)));
}

// The grad output rows (or columns) that a run of `inputs` input coordinates gathers from, at
// most: outputs whose read lands in the run through some tap, i.e. in an interval of
// inputs + (kernel - 1) * dilation coordinates, one per `stride`.
int64_t depthwise_gather_extent(int64_t inputs, int64_t kernel, int64_t stride, int64_t dilation) {
  return (inputs + (kernel - 1) * dilation - 1) / stride + 1;
}

// The staged extent along one dimension for a run of positions: conv_input_extent for the
// forward pass, depthwise_gather_extent for grad input.
using DepthwiseExtent = int64_t (*)(int64_t positions, int64_t kernel, int64_t stride,
                                    int64_t dilation);

// Plans the tiles of a depthwise pass over `rows` x `cols` positions of each of the C channels
// of a sample (forward: output pixels; grad input: input pixels). Returns false when not even one
// run of kDwCols positions of one channel fits in kDwSmemBytes, or when the sizes do not fit the
// kernels' 32-bit coordinates (a sample's tiles index the grid's x dimension).
bool plan_depthwise_tile(DepthwiseTile& t, const Conv2dShape& cs, int64_t rows, int64_t cols,
                         bool channels_last, int64_t acc_bytes, int sm_count,
                         DepthwiseExtent extent) {
  auto src_extent = [&](int64_t positions, int dim) {
    return dim == 0 ? extent(positions, cs.R, cs.stride_h, cs.dilation_h)
                    : extent(positions, cs.S, cs.stride_w, cs.dilation_w);
  };
  const int64_t channels = cs.C;
  const int64_t runs = ceil_div(cols, kDwCols);
  if (std::max({cs.K, cs.H, cs.W, cs.P, cs.Q}) + kThreads > kInt32Max) return false;
  const int64_t taps = cs.R * cs.S;
  int64_t tc = 1, tr = 1, tg = 1;  // channels, rows and runs per tile
  if (channels_last) {
    tc = std::min<int64_t>(channels, kDwLaneChannels);
    // The (rows x runs) shape of the other threads that stages least per output.
    const int64_t slots = kThreads / tc;
    double best = 0;
    for (int64_t g = 1; g <= std::min(runs, slots); ++g) {
      const int64_t r = balanced_tile(rows, slots / g);
      const double staged = double(src_extent(r, 0) * src_extent(g * kDwCols, 1)) / (r * g);
      if (g == 1 || staged < best) {
        best = staged;
        tr = r;
        tg = g;
      }
    }
  } else {
    tg = balanced_tile(runs, kDwMaxGroups);
    tr = balanced_tile(rows, kThreads / tg);
    tc = std::min<int64_t>(channels, kThreads / (tr * tg));
  }
  auto sample_tiles = [&] {
    return ceil_div(channels, tc) * ceil_div(rows, tr) * ceil_div(runs, tg);
  };
  auto smem_bytes = [&] {
    const int64_t cols = src_extent(tg * kDwCols, 1);
    const int64_t pitch = channels_last ? cols : cols | 1;  // NCHW rows at an odd pitch
    return (tc * src_extent(tr, 0) * pitch + taps * tc) * acc_bytes;
  };
  // Fewer positions per block until every SM has two blocks: a small layer (7 x 7 planes, batch
  // 1) otherwise runs on a fraction of the GPU. NCHW gives up planes first, channels_last rows.
  while (cs.N * sample_tiles() < 2 * int64_t(sm_count)) {
    if (!channels_last && tc > 1) {
      tc = ceil_div(tc, 2);
    } else if (tr > 1) {
      tr = balanced_tile(rows, tr / 2);
    } else if (tg > 1) {
      tg = balanced_tile(runs, tg / 2);
    } else {
      break;
    }
  }
  while (smem_bytes() > kDwSmemBytes) {
    if (!channels_last && tc > 1) {
      tc = ceil_div(tc, 2);
    } else if (tr > 1) {
      tr = balanced_tile(rows, tr / 2);
    } else if (tg > 1) {
      tg = balanced_tile(runs, tg / 2);
    } else if (tc > 1) {
      tc = ceil_div(tc, 2);
    } else {
      return false;
    }
  }
  if (sample_tiles() > kInt32Max) return false;
  t.channels = static_cast<int>(tc);
  t.rows = static_cast<int>(tr);
  t.groups = static_cast<int>(tg);
  t.channels_last = channels_last;
  t.src_rows = static_cast<int>(src_extent(tr, 0));
  t.src_cols = static_cast<int>(src_extent(tg * kDwCols, 1));
  if (channels_last) {
    t.sm_c = 1;
    t.sm_w = t.channels;
    t.sm_h = t.src_cols * t.channels;
  } else {
    t.sm_w = 1;
    t.sm_h = t.src_cols | 1;
    t.sm_c = t.src_rows * t.sm_h;
  }
  t.tile_elems = channels_last ? t.src_rows * t.sm_h : t.channels * t.sm_c;
  t.channel_tiles = static_cast<int>(ceil_div(channels, tc));
  t.row_tiles = static_cast<int>(ceil_div(rows, tr));
  t.col_tiles = static_cast<int>(ceil_div(runs, tg));
  t.sample_tiles = t.channel_tiles * t.row_tiles * t.col_tiles;
  t.threads = static_cast<int>(ceil_div(tc * tr * tg, 32) * 32);
  t.smem_bytes = static_cast<size_t>(smem_bytes());
  return true;
}

// A block per tile of a sample, and as many samples side by side as the grid's y dimension takes.
dim3 depthwise_grid(const DepthwiseTile& t, const Conv2dShape& cs) {
  constexpr int64_t kMaxGridY = 65535;
  return dim3(static_cast<unsigned int>(t.sample_tiles),
              static_cast<unsigned int>(std::min(cs.N, kMaxGridY)));
}

// Plans the tiles of a depthwise pass over rows x cols positions that reads `src` and writes
// `dst` (plan_depthwise_tile), then calls launch(tile, index_tag) with the index type their
// offsets need. Returns false, launching nothing, when no tile fits in shared memory.
template <typename acc_t, typename Launch>
bool launch_depthwise_tiles(const Conv2dShape& cs, int64_t rows, int64_t cols, bool channels_last,
                            const at::Tensor& src, const at::Tensor& dst, DepthwiseExtent extent,
                            const Launch& launch) {
  DepthwiseTile t;
  if (!plan_depthwise_tile(t, cs, rows, cols, channels_last, sizeof(acc_t),
                           multiprocessor_count(src), extent)) {
    return false;
  }
  const bool fits_int32 =
      max_offset(src, cs.N) <= kInt32Max && max_offset(dst, cs.N) <= kInt32Max;
  with_index_type(fits_int32, [&](auto index_tag) { launch(t, index_tag); });
  return true;
}

template <typename scalar_t>
void depthwise_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       at::Tensor& output, const Conv2dShape& cs, bool channels_last,
                       cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor weight_c = weight.contiguous();
  const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  auto run = [&](const DepthwiseTile& t, auto index_tag) {
    using index_t = decltype(index_tag);
    auto launch = [&](auto kernel) {
      kernel<<<depthwise_grid(t, cs), t.threads, t.smem_bytes, stream>>>(
          input.const_data_ptr<scalar_t>(), weight_c.const_data_ptr<scalar_t>(), bias_ptr,
          output.mutable_data_ptr<scalar_t>(), cs, strides_of(input), strides_of(output), t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // Register windows for the common undilated 3x3 and 5x5 kernels at stride 1 and 2.
    const bool window = cs.dilation_w == 1 && (cs.S == 3 || cs.S == 5) && cs.stride_w <= 2;
    if (window && cs.S == 3 && cs.stride_w == 1) {
      launch(conv2d_depthwise_forward_kernel<scalar_t, acc_t, index_t, 3, 1>);
    } else if (window && cs.S == 3) {
      launch(conv2d_depthwise_forward_kernel<scalar_t, acc_t, index_t, 3, 2>);
    } else if (window && cs.stride_w == 1) {
      launch(conv2d_depthwise_forward_kernel<scalar_t, acc_t, index_t, 5, 1>);
    } else if (window) {
      launch(conv2d_depthwise_forward_kernel<scalar_t, acc_t, index_t, 5, 2>);
    } else {
      launch(conv2d_depthwise_forward_kernel<scalar_t, acc_t, index_t, 0, 0>);
    }
  };
  // The staged tile: the input its outputs read, halo included.
  if (!launch_depthwise_tiles<acc_t>(cs, cs.P, cs.Q, channels_last, input, output,
                                     conv_input_extent, run)) {
    // A kernel dilated beyond the shared memory's reach: read the input through L1 instead.
    direct_forward<scalar_t>(input, weight, bias, output, cs, channels_last, stream);
  }
}

template <typename scalar_t>
void depthwise_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                          at::Tensor& grad_input, const Conv2dShape& cs, bool channels_last,
                          cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor weight_c = weight.contiguous();
  auto run = [&](const DepthwiseTile& t, auto index_tag) {
    using index_t = decltype(index_tag);
    auto launch = [&](auto kernel) {
      kernel<<<depthwise_grid(t, cs), t.threads, t.smem_bytes, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), weight_c.const_data_ptr<scalar_t>(),
          grad_input.mutable_data_ptr<scalar_t>(), cs, strides_of(grad_output),
          strides_of(grad_input), t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cs.stride_w == 1) {
      launch(conv2d_depthwise_grad_input_kernel<scalar_t, acc_t, index_t, 1>);
    } else if (cs.stride_w == 2) {
      launch(conv2d_depthwise_grad_input_kernel<scalar_t, acc_t, index_t, 2>);
    } else {
      launch(conv2d_depthwise_grad_input_kernel<scalar_t, acc_t, index_t, 0>);
    }
  };
  // The staged tile: the grad output window that its input pixels gather from.
  if (!launch_depthwise_tiles<acc_t>(cs, cs.H, cs.W, channels_last, grad_output, grad_input,
                                     depthwise_gather_extent, run)) {
    direct_grad_input<scalar_t>(grad_output, weight, grad_input, cs, channels_last, stream);
  }
}

template <typename scalar_t>
void depthwise_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                           at::Tensor& grad_weight, const Conv2dShape& cs, bool channels_last,
                           cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels = cs.N * cs.P * cs.Q;
  DepthwiseWeightPlan g;
  g.channels_last = channels_last;
  // NCHW: a block per filter, or a warp's worth of threads per filter when there are few outputs
  // to share out (as the direct grad weight does).
  g.channels = channels_last ? kDwLaneChannels : pixels >= kBlockReduceMinCount ? 1 : 8;
  g.channel_tiles = ceil_div(cs.K, g.channels);
  g.tap_chunks = ceil_div(cs.S, kDwWeightTaps);
  // Split the outputs until there are blocks for 4 per SM, keeping 8 outputs or more per thread.
  const int64_t blocks = g.channel_tiles * cs.R * g.tap_chunks;
  const int64_t pixel_threads = kThreads / g.channels;
  g.splits = std::max<int64_t>(1, std::min(ceil_div(4 * multiprocessor_count(input), blocks),
                                           pixels / (8 * pixel_threads)));
  g.count = blocks * g.splits;
  const int64_t numel = grad_weight.numel();
  at::Tensor partial = at::empty({g.splits * numel},
                                 input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const bool fits_int32 =
      max_offset(grad_output, cs.N) <= kInt32Max && max_offset(input, cs.N) <= kInt32Max;
  with_index_type(fits_int32, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    conv2d_depthwise_grad_weight_kernel<scalar_t, acc_t, index_t>
        <<<grid_size(g.count), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
            partial.mutable_data_ptr<acc_t>(), cs, strides_of(grad_output), strides_of(input), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  conv2d_depthwise_grad_weight_sum_kernel<scalar_t, acc_t>
      <<<grid_size(ceil_div(numel, kThreads)), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(), numel,
          g.splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Samples per im2col chunk: as many as fit the scratch budget, at least one.
int64_t im2col_chunk(const Conv2dShape& cs, int64_t elem_size) {
  const int64_t per_sample = (cs.C * cs.R * cs.S + cs.K) * cs.P * cs.Q * elem_size;
  return std::max<int64_t>(1, std::min<int64_t>(cs.N, kIm2colBudgetBytes / per_sample));
}

// Fills col (C*R*S, nb*P*Q) from samples [n0, n0 + nb) of input.
template <typename scalar_t>
void launch_im2col(const at::Tensor& input, at::Tensor& col, const Conv2dShape& cs, int64_t n0,
                   int64_t nb, cudaStream_t stream) {
  const int64_t total = col.numel();
  const scalar_t* in_chunk = input.const_data_ptr<scalar_t>() + n0 * input.stride(0);
  with_index_type(total <= kInt32Max && max_offset(input, nb) <= kInt32Max, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    conv2d_im2col_kernel<scalar_t, index_t>
        <<<grid_size(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
            in_chunk, col.mutable_data_ptr<scalar_t>(), cs, strides_of(input), nb, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void im2col_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& output, const Conv2dShape& cs, bool channels_last,
                    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = cs.groups, Kg = cs.outputs_per_group(), CgRS = cs.reduction_size();
  const int64_t CRS = cs.C * cs.R * cs.S, PQ = cs.P * cs.Q;
  const int64_t nb_max = im2col_chunk(cs, sizeof(scalar_t));
  // Converted (if at all) once per call, not per chunk or group.
  const at::Tensor w3 = weight.contiguous().view({G, Kg, CgRS});
  at::Tensor col_buf = at::empty({CRS * nb_max * PQ}, input.options());
  at::Tensor res_buf = at::empty({cs.K * nb_max * PQ}, input.options());
  const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  for (int64_t n0 = 0; n0 < cs.N; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, cs.N - n0);
    at::Tensor col = col_buf.narrow(0, 0, CRS * nb * PQ).view({G, CgRS, nb * PQ});
    launch_im2col<scalar_t>(input, col, cs, n0, nb, stream);
    at::Tensor res = res_buf.narrow(0, 0, cs.K * nb * PQ).view({G, Kg, nb * PQ});
    at::bmm_out(res, w3, col);  // (G, Kg, nb*P*Q) == (K, nb, P, Q)

    const int64_t total = res.numel();
    scalar_t* out_chunk = output.mutable_data_ptr<scalar_t>() + n0 * output.stride(0);
    with_index_type(total <= kInt32Max && max_offset(output, nb) <= kInt32Max, [&](auto tag) {
      using index_t = decltype(tag);
      conv2d_gemm_to_output_kernel<scalar_t, acc_t, index_t>
          <<<grid_size(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
              res.const_data_ptr<scalar_t>(), bias_ptr, out_chunk, cs, strides_of(output), nb,
              channels_last, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

// Returns grad weight (contiguous, weight's shape) if need_grad_weight, and fills grad_input if
// it is defined; input is read only for grad weight.
template <typename scalar_t>
at::Tensor im2col_backward(const at::Tensor& grad_output, const at::Tensor& input,
                           const at::Tensor& weight, at::Tensor& grad_input, bool need_grad_weight,
                           const Conv2dShape& cs, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = cs.groups, Kg = cs.outputs_per_group(), CgRS = cs.reduction_size();
  const int64_t CRS = cs.C * cs.R * cs.S, PQ = cs.P * cs.Q;
  const int64_t nb_max = im2col_chunk(cs, sizeof(scalar_t));
  // Half/bfloat16 grad weight is summed across chunks in float: each chunk's GEMM already
  // accumulates in float inside cuBLAS, and rounding the running sum to 8 or 11 mantissa bits
  // after every chunk would make the error grow with the number of chunks.
  constexpr bool kLowPrecision = !std::is_same<scalar_t, acc_t>::value;
  const at::Tensor w3t = weight.contiguous().view({G, Kg, CgRS}).transpose(1, 2);
  at::Tensor col_buf = at::empty({CRS * nb_max * PQ}, weight.options());
  at::Tensor gw_acc;
  for (int64_t n0 = 0; n0 < cs.N; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, cs.N - n0);
    // grad_output chunk as (G, Kg, nb*P*Q): a view for one NCHW sample, else one copy.
    const at::Tensor go = grad_output.narrow(0, n0, nb)
                              .reshape({nb, G, Kg, PQ})
                              .permute({1, 2, 0, 3})
                              .reshape({G, Kg, nb * PQ});
    at::Tensor col = col_buf.narrow(0, 0, CRS * nb * PQ).view({G, CgRS, nb * PQ});
    if (need_grad_weight) {
      launch_im2col<scalar_t>(input, col, cs, n0, nb, stream);
      const at::Tensor colT = col.transpose(1, 2);  // (G, nb*P*Q, CgRS), no copy
      if (!gw_acc.defined()) {
        gw_acc = at::bmm(go, colT);
        if (kLowPrecision && nb < cs.N) gw_acc = gw_acc.to(at::kFloat);
      } else if (!kLowPrecision) {
        gw_acc.baddbmm_(go, colT);  // beta = 1: accumulate in place, nothing is lost
      } else {
        gw_acc.add_(at::bmm(go, colT));
      }
    }
    if (grad_input.defined()) {
      // The column matrix has been consumed by the grad-weight GEMM (stream order), so its
      // buffer takes the column gradient.
      at::bmm_out(col, w3t, go);  // (G, CgRS, nb*P*Q)
      const int64_t total = nb * cs.C * cs.H * cs.W;
      scalar_t* gi_chunk = grad_input.mutable_data_ptr<scalar_t>() + n0 * grad_input.stride(0);
      with_index_type(col.numel() <= kInt32Max && total <= kInt32Max &&
                          max_offset(grad_input, nb) <= kInt32Max,
                      [&](auto tag) {
                        using index_t = decltype(tag);
                        conv2d_col2im_kernel<scalar_t, acc_t, index_t>
                            <<<grid_size(ceil_div(total, kThreads)), kThreads, 0, stream>>>(
                                col.const_data_ptr<scalar_t>(), gi_chunk, cs,
                                strides_of(grad_input), nb, total);
                        C10_CUDA_KERNEL_LAUNCH_CHECK();
                      });
    }
  }
  if (!need_grad_weight) return at::Tensor();
  return gw_acc.to(weight.scalar_type()).view(weight.sizes());
}

// Masked-out gradients are returned as distinct empty tensors: outputs of one op must not alias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_backward(const at::Tensor& grad_input,
                                                               const at::Tensor& grad_weight,
                                                               const at::Tensor& grad_bias,
                                                               const at::Tensor& input,
                                                               std::array<bool, 3> output_mask) {
  auto or_empty = [&](const at::Tensor& t, bool wanted) {
    return wanted ? t : at::empty({0}, input.options());
  };
  return {or_empty(grad_input, output_mask[0]), or_empty(grad_weight, output_mask[1]),
          or_empty(grad_bias, output_mask[2])};
}

enum class CudaAlgo { direct, im2col, depthwise };

// Checks `algo` for this layer and resolves "auto": depthwise layers run the depthwise kernels,
// the rest im2col, whose GEMMs go to cuBLAS. (To be tuned in the GPU lane.)
CudaAlgo resolve_cuda_algo(c10::string_view algo, const Conv2dShape& cs) {
  check_conv2d_algo(algo, {"auto", "direct", "im2col", "depthwise"}, "cuda");
  check_conv2d_depthwise_algo(algo, cs);
  if (algo == "direct") return CudaAlgo::direct;
  if (algo == "im2col") return CudaAlgo::im2col;
  return algo == "depthwise" || is_depthwise(cs) ? CudaAlgo::depthwise : CudaAlgo::im2col;
}

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       c10::string_view algo) {
  const Conv2dShape cs = conv2d_shape(input, weight, stride, padding, dilation, groups);
  check_conv2d_bias(bias, input, cs);
  const CudaAlgo resolved = resolve_cuda_algo(algo, cs);
  check_cuda_tensor(input, "input", input);
  check_cuda_tensor(weight, "weight", input);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_cuda_tensor(*bias, "bias", input);

  c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = conv2d_memory_format(input);
  at::Tensor output =
      at::empty({cs.N, cs.K, cs.P, cs.Q}, input.options().memory_format(fmt));
  if (cs.N == 0) return output;  // a zero-size grid is a launch error

  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_conv2d_cuda", [&] {
        switch (resolved) {
          case CudaAlgo::im2col:
            im2col_forward<scalar_t>(input, weight, bias_c, output, cs, channels_last, stream);
            break;
          case CudaAlgo::depthwise:
            depthwise_forward<scalar_t>(input, weight, bias_c, output, cs, channels_last, stream);
            break;
          case CudaAlgo::direct:
            direct_forward<scalar_t>(input, weight, bias_c, output, cs, channels_last, stream);
            break;
        }
      });
  return output;
}

// conv2d's grad input into grad_input ((N, C, H, W), every element written), from the grad
// output (N, K, P, Q) and the weight: the geometry comes from `cs`, not from an input tensor, so
// that conv_transpose2d (whose output this is) needs none.
template <typename scalar_t>
void conv2d_grad_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                            at::Tensor& grad_input, const Conv2dShape& cs, CudaAlgo algo,
                            bool channels_last, cudaStream_t stream) {
  switch (algo) {
    case CudaAlgo::im2col:
      im2col_backward<scalar_t>(grad_output, at::Tensor(), weight, grad_input, false, cs, stream);
      break;
    case CudaAlgo::depthwise:
      depthwise_grad_input<scalar_t>(grad_output, weight, grad_input, cs, channels_last, stream);
      break;
    case CudaAlgo::direct:
      direct_grad_input<scalar_t>(grad_output, weight, grad_input, cs, channels_last, stream);
      break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo, std::array<bool, 3> output_mask) {
  const Conv2dShape cs = conv2d_shape(input, weight, stride, padding, dilation, groups);
  check_conv2d_grad_output(grad_output, input, cs);
  const CudaAlgo resolved = resolve_cuda_algo(algo, cs);
  check_cuda_tensor(input, "input", input);
  check_cuda_tensor(weight, "weight", input);
  check_cuda_tensor(grad_output, "grad_output", input);

  c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = conv2d_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor grad_input =
      output_mask[0] ? at::empty(input.sizes(), input.options().memory_format(fmt)) : at::Tensor();
  at::Tensor grad_weight;
  at::Tensor grad_bias_t;
  if (cs.N == 0) {
    // No samples: nothing to launch; weight and bias gradients are sums over nothing.
    if (output_mask[1]) grad_weight = at::zeros(weight.sizes(), weight.options());
    if (output_mask[2]) grad_bias_t = at::zeros({cs.K}, input.options());
    return finish_backward(grad_input, grad_weight, grad_bias_t, input, output_mask);
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_conv2d_backward_cuda", [&] {
        if (output_mask[2]) {
          grad_bias_t = at::empty({cs.K}, input.options());
          grad_bias<scalar_t>(grad_output, grad_bias_t, cs, stream);
        }
        if (resolved == CudaAlgo::im2col && output_mask[1]) {
          // One pass for both gradients (grad_input may be undefined): each chunk's grad output
          // copy and column buffer serve the two GEMMs.
          grad_weight = im2col_backward<scalar_t>(grad_output, input, weight, grad_input, true,
                                                  cs, stream);
          return;
        }
        if (output_mask[0]) {
          conv2d_grad_input_cuda<scalar_t>(grad_output, weight, grad_input, cs, resolved,
                                           channels_last, stream);
        }
        if (output_mask[1]) {
          grad_weight = at::empty(weight.sizes(), weight.options());
          if (resolved == CudaAlgo::depthwise) {
            depthwise_grad_weight<scalar_t>(grad_output, input, grad_weight, cs, channels_last,
                                            stream);
          } else {
            direct_grad_weight<scalar_t>(grad_output, input, grad_weight, cs, stream);
          }
        }
      });
  return finish_backward(grad_input, grad_weight, grad_bias_t, input, output_mask);
}

// conv_transpose2d is conv2d's grad input (csrc/ops/conv2d.cpp): `input` is the grad output of
// the conv2d whose input has the transposed output's shape.
at::Tensor conv_transpose2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef output_padding,
                                 at::IntArrayRef dilation, int64_t groups,
                                 c10::string_view algo) {
  const Conv2dShape cs =
      conv_transpose2d_shape(input, weight, stride, padding, output_padding, dilation, groups);
  check_conv_transpose2d_bias(bias, input, cs);
  const CudaAlgo resolved = resolve_cuda_algo(algo, cs);
  check_cuda_tensor(input, "input", input);
  check_cuda_tensor(weight, "weight", input);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_cuda_tensor(*bias, "bias", input);

  c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = conv2d_memory_format(input);
  at::Tensor output = at::empty({cs.N, cs.C, cs.H, cs.W}, input.options().memory_format(fmt));
  if (cs.N == 0) return output;  // a zero-size grid is a launch error

  const at::Tensor grad_output = conv_transpose2d_padded_input(input, cs);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "cnnops_conv_transpose2d_cuda", [&] {
        conv2d_grad_input_cuda<scalar_t>(grad_output, weight, output, cs, resolved,
                                         fmt == at::MemoryFormat::ChannelsLast, stream);
      });
  if (has_bias) output.add_(bias->view({1, -1, 1, 1}));
  return output;
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("conv2d", TORCH_FN(cnnops::conv2d_cuda));
  m.impl("_conv2d_backward", TORCH_FN(cnnops::conv2d_backward_cuda));
  m.impl("conv_transpose2d", TORCH_FN(cnnops::conv_transpose2d_cuda));
}
