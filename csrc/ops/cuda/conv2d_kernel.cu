// CUDA kernels for cnnops::conv2d and cnnops::_conv2d_backward.
//
// Two algorithms, selected by the op's `algo` argument ("auto" runs im2col):
//   direct  - every output (or gradient) element is computed by its own loop over the taps that
//             touch it. No scratch memory, deterministic, and the natural choice for depthwise and
//             small problems.
//   im2col  - the input is unfolded into a column matrix and the convolution becomes a batched
//             GEMM per group (at::bmm -> cuBLAS). The batch is processed in chunks so the column
//             buffer stays bounded.
// Both share the grad-bias reduction. Everything is deterministic: gradients that several
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
struct BoxCursor {
  int64_t n, p, q;
  int64_t dn, dp, dq;
  int64_t np, nq;

  __device__ __forceinline__ BoxCursor(int64_t start, int64_t step, int64_t np_, int64_t nq_)
      : np(np_), nq(nq_) {
    q = start % nq;
    int64_t t = start / nq;
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
// it is defined.
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
  at::Tensor col_buf = at::empty({CRS * nb_max * PQ}, input.options());
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

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       c10::string_view algo) {
  const Conv2dShape cs = conv2d_shape(input, weight, stride, padding, dilation, groups);
  check_conv2d_bias(bias, input, cs);
  check_conv2d_algo(algo, {"auto", "direct", "im2col"}, "cuda");
  // algo="auto" runs im2col here: its GEMMs go to cuBLAS. (To be tuned in the GPU lane.)
  const bool use_im2col = algo != "direct";
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
        if (use_im2col) {
          im2col_forward<scalar_t>(input, weight, bias_c, output, cs, channels_last, stream);
        } else {
          direct_forward<scalar_t>(input, weight, bias_c, output, cs, channels_last, stream);
        }
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view algo, std::array<bool, 3> output_mask) {
  const Conv2dShape cs = conv2d_shape(input, weight, stride, padding, dilation, groups);
  check_conv2d_grad_output(grad_output, input, cs);
  check_conv2d_algo(algo, {"auto", "direct", "im2col"}, "cuda");
  // algo="auto" runs im2col here: its GEMMs go to cuBLAS. (To be tuned in the GPU lane.)
  const bool use_im2col = algo != "direct";
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
        if (use_im2col) {
          if (output_mask[0] || output_mask[1]) {
            grad_weight = im2col_backward<scalar_t>(grad_output, input, weight, grad_input,
                                                    output_mask[1], cs, stream);
          }
        } else {
          if (output_mask[0]) {
            direct_grad_input<scalar_t>(grad_output, weight, grad_input, cs, channels_last,
                                        stream);
          }
          if (output_mask[1]) {
            grad_weight = at::empty(weight.sizes(), weight.options());
            direct_grad_weight<scalar_t>(grad_output, input, grad_weight, cs, stream);
          }
        }
      });
  return finish_backward(grad_input, grad_weight, grad_bias_t, input, output_mask);
}

}  // namespace
}  // namespace cnnops

TORCH_LIBRARY_IMPL(cnnops, CUDA, m) {
  m.impl("conv2d", TORCH_FN(cnnops::conv2d_cuda));
  m.impl("_conv2d_backward", TORCH_FN(cnnops::conv2d_backward_cuda));
}
