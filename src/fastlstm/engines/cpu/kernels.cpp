// fastlstm CPU engine: the per-step work of one LSTM direction, forward and backward.
//
// Shape legend: T steps, B batch (sorted by length, longest first), H hidden, P projection,
// Hout = P or H, N = total real tokens. Rows of one step are a prefix [0, n_t) of the batch
// (packed order), and per-step tensors are stored packed: step t's rows start at offsets[t].
//
// Everything a direction needs is described by one `Plan` (built by engines/cpu/layer.py and step.py); several plans
// owning disjoint batch rows of a direction run their loops on separate threads. Each step is a
// sequence of phases around a GEMM over weights packed once per call (kernels.h):
//
//   forward step t:   prepare (h_in = h * r) -> GEMM hw = h_in W_hh^T -> cell ->
//                     [GEMM htilde = m W_hr^T -> finish]              (projection only)
//   backward step t:  begin -> [GEMM dm = dproj W_hr] -> cell -> GEMM dh_in = dhw W_hh -> end
//
// Equations: docs/equations.md. Gate order i, f, g, o. The math is in kernels.h, compiled
// here once per instruction set (generic; on x86-64 also AVX2+FMA and AVX-512), the best the
// machine runs chosen at load (lowered by FASTLSTM_CPU_ISA or set_instruction_set).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// Compilers that know AVX512-BF16 (GCC 10, clang 9): the kernels offer it where the CPU has it.
#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10
#define FASTLSTM_BF16_PRODUCTS 1
#endif
#endif

namespace {

// Everything one direction's loop reads and writes. The fields are declared once, here: the struct
// below and the table that `plan_fields` hands to Python (engines/cpu/kernels.py builds its ctypes
// mirror from it) both expand this list. Every field is 8 bytes wide (int64, double or a pointer).
#define FASTLSTM_PLAN_FIELDS(FIELD)                                                                    \
  FIELD(int64_t, dtype)           /* 0 = float32, 1 = float64 */                                       \
  FIELD(int64_t, half)            /* 1 bfloat16, 2 float16: y, dy and the saved gates are (else 0) */  \
  FIELD(int64_t, steps)                                                                                \
  FIELD(int64_t, batch)                                                                                \
  FIELD(int64_t, hidden)                                                                               \
  FIELD(int64_t, proj)                                                                                 \
  FIELD(int64_t, h_out)                                                                                \
  FIELD(int64_t, reverse)                                                                              \
  FIELD(int64_t, act_gate)        /* 0 sigmoid, 1 hard_sigmoid, 2 tanh, 3 softsign, 4 relu, 5 hardsigmoid */ \
  FIELD(int64_t, act_in)                                                                               \
  FIELD(int64_t, act_out)                                                                              \
  FIELD(int64_t, peephole)                                                                             \
  FIELD(int64_t, coupled)                                                                              \
  FIELD(int64_t, layer_norm)                                                                           \
  FIELD(double, clip)             /* <= 0: off */                                                      \
  FIELD(double, cell_clip)                                                                             \
  FIELD(double, proj_clip)                                                                             \
  FIELD(int64_t, zoneout_mode)    /* 0 off, 1 masks, 2 expectation (eval) */                           \
  FIELD(double, z_h)              /* expectation mode probabilities */                                 \
  FIELD(double, z_c)                                                                                   \
  FIELD(const int64_t*, n_rows)   /* [T] */                                                            \
  FIELD(const int64_t*, offsets)  /* [T] */                                                            \
  FIELD(const void*, w_hh)        /* [4H, Hout] (already DropConnect-masked) */                        \
  FIELD(const void*, w_hr)        /* [P, H] */                                                         \
  FIELD(const void*, peep)        /* [3H] */                                                           \
  FIELD(const void*, ln_hh)       /* [4H] */                                                           \
  FIELD(const void*, ln_c_w)      /* [H] */                                                            \
  FIELD(const void*, ln_c_b)      /* [H] */                                                            \
  FIELD(const void*, rec_mask)    /* [B, Hout] */                                                      \
  FIELD(const void*, zh_mask)     /* [N, Hout] */                                                      \
  FIELD(const void*, zc_mask)     /* [N, H] */                                                         \
  FIELD(const void*, xg)          /* [N, ld_xg]: x W_ih^T, layer-normed under layer norm */            \
  FIELD(int64_t, xg_half)         /* xg's dtype: 0 the plan's, 1 bfloat16, 2 float16 (widened per row) */ \
  FIELD(int64_t, ld_xg)                                                                                \
  FIELD(const void*, bias)        /* [4H] b_ih + b_hh, or null (the single step adds its own) */       \
  FIELD(const void*, c0)          /* [B, H] */                                                         \
  FIELD(void*, h_state)           /* [B, Hout] */                                                      \
  FIELD(void*, c_state)           /* [B, H] */                                                         \
  FIELD(void*, y)                 /* [N, ld_y] */                                                      \
  FIELD(int64_t, ld_y)                                                                                 \
  FIELD(void*, gates)             /* [N, 4H] activations i, f, g, o (in `half` when saving) */         \
  FIELD(void*, clip_mask)         /* uint8 [N, 4H], 1 where the gradient passes the clip */            \
  FIELD(void*, c_fresh)           /* [N, H] the cell after update and cell clip */                     \
  FIELD(void*, cclip_mask)        /* uint8 [N, H] */                                                   \
  FIELD(void*, c_carried)         /* [N, H] the cell after zoneout (zoneout on c only) */              \
  FIELD(void*, h_in)              /* [N, Hout] input of the recurrent GEMM */                          \
  FIELD(void*, m)                 /* [N, H] cell output before the projection */                      \
  FIELD(void*, pclip_mask)        /* uint8 [N, P] */                                                   \
  FIELD(void*, hw_hat)            /* [N, 4H] normalised recurrent product (layer norm) */              \
  FIELD(void*, hw_rstd)           /* [N] */                                                            \
  FIELD(void*, c_hat)             /* [N, H] normalised cell (layer norm) */                            \
  FIELD(void*, c_rstd)            /* [N] */                                                            \
  FIELD(void*, hw)                /* [B, ld_hw] scratch: this step's recurrent product */              \
  FIELD(int64_t, ld_hw)                                                                                \
  FIELD(void*, htilde)            /* [B, P] scratch: this step's projection */                         \
  FIELD(const void*, dy)          /* [N, ld_dy] */                                                     \
  FIELD(int64_t, ld_dy)                                                                                \
  FIELD(void*, dh_state)          /* [B, Hout] */                                                      \
  FIELD(void*, dc_state)          /* [B, H] */                                                         \
  FIELD(void*, dgates)            /* [N, ld_dgates] gradient of the gate pre-activations */            \
  FIELD(int64_t, ld_dgates)                                                                            \
  FIELD(void*, dhw)               /* [N, ld_dhw] gradient of the recurrent product */                  \
  FIELD(int64_t, ld_dhw)                                                                               \
  FIELD(void*, dproj)             /* [N, P] gradient of the projection output */                       \
  FIELD(void*, dm)                /* [B, H] scratch: gradient of the cell output */                    \
  FIELD(void*, dh_in)             /* [B, Hout] scratch: gradient of the recurrent GEMM input */        \
  FIELD(void*, dpeep)             /* [3H] accumulated */                                               \
  FIELD(void*, dln_hh)            /* [4H] accumulated */                                               \
  FIELD(void*, dln_c_w)           /* [H] accumulated */                                                \
  FIELD(void*, dln_c_b)           /* [H] accumulated */                                                \
  FIELD(const void*, w_hh_packed)   /* W_hh^T [Hout, 4H] in column panels (forward GEMM) */            \
  FIELD(const void*, w_hh_packed_t) /* W_hh [4H, Hout] in column panels (backward GEMM) */             \
  FIELD(int64_t, save)            /* 1: keep every step for backward; 0: inference, [B] rows reused */ \
  FIELD(void*, work)              /* [2H] (6H with half) this plan's scratch for the backward cell */  \
  FIELD(int64_t, row_begin)       /* the batch rows this plan owns (one plan per thread) */            \
  FIELD(int64_t, row_end)                                                                              \
  FIELD(const void*, w_hr_packed)   /* W_hr^T [H, P] in column panels */                               \
  FIELD(const void*, w_hr_packed_t) /* W_hr [P, H] in column panels */                                 \
  FIELD(int64_t, column_threads)  /* > 1: this plan's GEMMs are split by columns across threads */ \
  FIELD(const void*, w_hh_bf16)   /* W_hh^T in bfloat16 pair panels (forward GEMM on AVX512-BF16), or null */ \
  FIELD(const void*, w_hh_bf16_t) /* W_hh in bfloat16 pair panels (backward GEMM on AVX512-BF16), or null */ \
  FIELD(void*, operand_bf16)      /* [B, ld_operand_bf16] scratch: a bfloat16 GEMM's A rows (h_in; dhw) */ \
  FIELD(int64_t, ld_operand_bf16) /* (h_in's rows zero-padded to even) */

struct Plan {
#define FASTLSTM_DECLARE(type, name) type name;
  FASTLSTM_PLAN_FIELDS(FASTLSTM_DECLARE)
#undef FASTLSTM_DECLARE
};

// The kind of a field as Python's ctypes mirror stores it: 'i' int64, 'd' double, 'p' pointer.
template <typename T> constexpr char field_kind() { return 'p'; }
template <> constexpr char field_kind<int64_t>() { return 'i'; }
template <> constexpr char field_kind<double>() { return 'd'; }


// A reusable spin barrier for a column team: the members meet a few times per step, far too
// often to sleep in between; after a while a waiter yields so an oversubscribed machine progresses.
class Barrier {
 public:
  explicit Barrier(int64_t parties) : parties_(parties) {}
  void wait() {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == parties_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins > 1000) std::this_thread::yield();
    }
  }

 private:
  const int64_t parties_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

// One thread's place in a plan's column team (see kernels.h, "a step's products").
struct Columns {
  int64_t index = 0, count = 1;
  Barrier* barrier = nullptr;  // threads of our own; with OpenMP the team's own barrier
  bool lead() const { return index == 0; }
  void sync() const {
    if (count <= 1) return;
#ifdef _OPENMP
#pragma omp barrier
#else
    barrier->wait();
#endif
  }
  // This member's output columns [begin, end) of N, in whole packed panels (16 floats).
  void range(int64_t N, int64_t* begin, int64_t* end) const {
    const int64_t chunk = ((N + count - 1) / count + 15) / 16 * 16;
    *begin = index * chunk < N ? index * chunk : N;
    *end = *begin + chunk < N ? *begin + chunk : N;
  }
};

// -- bfloat16 products on AVX512-BF16 -----------------------------------------------------------
//
// A bfloat16 call's recurrent products, forward hw = h_in W_hh^T with h_in rounded to bfloat16 (as
// torch's bfloat16 LSTM holds h) and backward dh_in = dhw W_hh with dhw rounded for the product,
// from W_hh's bfloat16 values, accumulated in float32 by VDPBF16PS: each
// instruction adds 16 dot products of bfloat16 pairs, twice the float32 FMA's products. Operands:
// A rows of K2 pairs (a[m][2k], a[m][2k+1]; K zero-padded to even), B in column panels of 16,
// [panel][K2][16][2] (packed for layer.py by kernels.h's pack_bf16_pairs or pack_panels). Used only
// where the CPU has the instruction (the kernels' instruction set avx512_bf16); other builds sum the
// same product in scalar code so that none lacks the function (never called there: they never
// offer the set, so layer.py packs no bfloat16 panels). Blocks: 8 rows x 2 panels, then 4 rows x 4
// panels for 4-7 rows left, then single rows against 8 panels.
constexpr int64_t kBf16PanelColumns = 16;

#ifdef FASTLSTM_BF16_PRODUCTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

inline __m512 bf16_pair(const uint16_t* a) {  // a[0], a[1] broadcast to every pair of a vector
  int32_t pair;
  std::memcpy(&pair, a, sizeof pair);
  return _mm512_castsi512_ps(_mm512_set1_epi32(pair));
}

inline void store_columns(float* c, __m512 acc, int64_t ncols) {
  const __mmask16 mask = ncols >= 16 ? __mmask16(0xffff) : ncols <= 0 ? __mmask16(0)
                                                                       : __mmask16((1u << ncols) - 1);
  _mm512_mask_storeu_ps(c, mask, acc);
}

// MR rows x NP panels (8 x 2: 16 independent accumulator chains, as many as a dot product's
// latency times its throughput needs).
template <int MR, int NP>
inline void bf16_block(int64_t K2, const uint16_t* a, int64_t lda, const uint16_t* panels, int64_t panel_stride,
                       float* c, int64_t ldc, int64_t ncols) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[NP];
    for (int q = 0; q < NP; ++q) b[q] = (__m512bh)_mm512_loadu_ps(panels + q * panel_stride + k * 32);
    for (int m = 0; m < MR; ++m) {
      const __m512bh av = (__m512bh)bf16_pair(a + m * lda + 2 * k);
      for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], av, b[q]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) store_columns(c + m * ldc + q * 16, acc[m][q], ncols - q * 16);
}

// One row x P panels (as gemm_row: P chains, each output summed over k in order).
template <int P>
inline void bf16_row(int64_t K2, const uint16_t* a, const uint16_t* panels, int64_t panel_stride, float* c,
                     int64_t ncols) {
  __m512 acc[P];
  for (int q = 0; q < P; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    const __m512bh av = (__m512bh)bf16_pair(a + 2 * k);
    for (int q = 0; q < P; ++q)
      acc[q] = _mm512_dpbf16_ps(acc[q], av, (__m512bh)_mm512_loadu_ps(panels + q * panel_stride + k * 32));
  }
  for (int q = 0; q < P; ++q) store_columns(c + q * 16, acc[q], ncols - q * 16);
}

void gemm_bf16_pairs(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t lda, const uint16_t* packed,
                     float* c, int64_t ldc) {
  const int64_t panels = (N + 15) / 16, stride = K2 * 32, chunk = 64;
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t m1 = m0 + chunk < M ? m0 + chunk : M, blocked = m0 + (m1 - m0) / 8 * 8;
    // then 4 rows x 4 panels where 4 or more are left (as many chains; each panel read once for the 4)
    const int64_t half_blocked = blocked + (m1 - blocked >= 4 ? 4 : 0);
    int64_t q = 0;
    for (; q + 2 <= panels; q += 2) {
      for (int64_t m = m0; m < blocked; m += 8)
        bf16_block<8, 2>(K2, a + m * lda, lda, packed + q * stride, stride, c + m * ldc + q * 16, ldc, N - q * 16);
    }
    for (; q < panels; ++q) {
      for (int64_t m = m0; m < blocked; m += 8)
        bf16_block<8, 1>(K2, a + m * lda, lda, packed + q * stride, stride, c + m * ldc + q * 16, ldc, N - q * 16);
    }
    if (half_blocked > blocked) {
      const uint16_t* am = a + blocked * lda;
      float* cm = c + blocked * ldc;
      int64_t q = 0;
      for (; q + 4 <= panels; q += 4)
        bf16_block<4, 4>(K2, am, lda, packed + q * stride, stride, cm + q * 16, ldc, N - q * 16);
      for (; q < panels; ++q) bf16_block<4, 1>(K2, am, lda, packed + q * stride, stride, cm + q * 16, ldc, N - q * 16);
    }
    for (int64_t m = half_blocked; m < m1; ++m) {  // the rows past the last block
      int64_t q = 0;
      for (; q + 8 <= panels; q += 8)
        bf16_row<8>(K2, a + m * lda, packed + q * stride, stride, c + m * ldc + q * 16, N - q * 16);
      for (; q < panels; ++q)
        bf16_row<1>(K2, a + m * lda, packed + q * stride, stride, c + m * ldc + q * 16, N - q * 16);
    }
  }
}
#pragma GCC pop_options
#else
void gemm_bf16_pairs(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t lda, const uint16_t* packed,
                     float* c, int64_t ldc) {
  auto wide = [](uint16_t v) {
    const uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  };
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const uint16_t* b = packed + (n / 16) * K2 * 32 + (n % 16) * 2;
      float sum = 0.0f;
      for (int64_t k = 0; k < K2; ++k) {
        sum += wide(a[m * lda + 2 * k]) * wide(b[k * 32]) + wide(a[m * lda + 2 * k + 1]) * wide(b[k * 32 + 1]);
      }
      c[m * ldc + n] = sum;
    }
  }
}
#endif

// The GEMMs' vector width in bytes (kernels.h, "GEMM"): 32 for the generic and AVX2 builds (the
// compiler splits a 32-byte vector into two where it has only 16-byte registers), 64 for AVX-512.
#define FASTLSTM_VECTOR_BYTES 32
namespace generic {
#include "kernels.h"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTLSTM_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kernels.h"
}  // namespace avx2
#undef FASTLSTM_VECTOR_BYTES
#pragma GCC pop_options
// AVX-512 (f, bw, vl): the same code, which the compiler vectorises with 512-bit registers and masks.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#define FASTLSTM_VECTOR_BYTES 64
namespace avx512 {
#include "kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif
#undef FASTLSTM_VECTOR_BYTES

// ---------------------------------------------------------------------------------------------
// Python bindings: every function takes the plan's address (and a step where it applies).

// Instruction sets, lowest first; kernels.h is compiled once per set (one set on other machines).
// avx512_bf16 runs the avx512 build and adds the bfloat16 products above (gemm_bf16_pairs).
enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512", "avx512_bf16"};

int supported_isa() {
#ifdef FASTLSTM_X86
#ifdef FASTLSTM_BF16_PRODUCTS
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
#else
  static const bool bf16 = false;  // (a compiler without AVX512-BF16 builds no such products)
#endif
  static const int level =
      (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
          ? (bf16 ? kAvx512Bf16 : kAvx512)
          : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2 : kGeneric;
  return level;
#else
  return kGeneric;
#endif
}

// The set in use: the best supported, unless lowered by set_instruction_set (FASTLSTM_CPU_ISA, the tests).
std::atomic<int> g_isa{-1};
int isa() {
  const int chosen = g_isa.load(std::memory_order_relaxed);
  return chosen < 0 ? supported_isa() : chosen;
}

// The compiled build that set runs (avx512_bf16 runs avx512's).
int build() { return isa() < kAvx512 ? isa() : kAvx512; }

using LoopFn = void (*)(const Plan&, const Columns&);

// A driver's instantiations: [instruction set][dtype code: float, double].
struct Loop {
  LoopFn fns[3][2];
  LoopFn pick(const Plan& p) const { return fns[build()][p.dtype == 0 ? 0 : 1]; }
};

#ifdef FASTLSTM_X86
#define FASTLSTM_VARIANTS(name)                                                                  \
  {{{generic::name<float>, generic::name<double>}, {avx2::name<float>, avx2::name<double>},     \
    {avx512::name<float>, avx512::name<double>}}}
#define FASTLSTM_PICK(name, T) \
  (build() == kAvx512 ? avx512::name<T> : build() == kAvx2 ? avx2::name<T> : generic::name<T>)
#else
#define FASTLSTM_VARIANTS(name)                                                                   \
  {{{generic::name<float>, generic::name<double>}, {generic::name<float>, generic::name<double>}, \
    {generic::name<float>, generic::name<double>}}}
#define FASTLSTM_PICK(name, T) generic::name<T>
#endif

const Loop kForward = FASTLSTM_VARIANTS(forward_loop);
const Loop kBackward = FASTLSTM_VARIANTS(backward_loop);

// One unit of work for one thread: a plan, and this thread's place in the plan's column team.
struct Member {
  const Plan* plan;
  Columns columns;
};

#ifdef _OPENMP
// The members run as one OpenMP team: torch's own thread pool (the process has one libgomp), so
// no second set of threads competes with the one torch's GEMMs just used and left spinning.
template <const Loop* L>
void run(const std::vector<const Plan*>& plans) {
  const Plan& first = *plans[0];
  if (plans.size() == 1 && first.column_threads > 1) {
#pragma omp parallel num_threads(int(first.column_threads))
    {
      const Columns columns{omp_get_thread_num(), omp_get_num_threads(), nullptr};
      L->pick(first)(first, columns);
    }
    return;
  }
  const int64_t count = int64_t(plans.size());
#pragma omp parallel for schedule(static, 1) num_threads(int(count))
  for (int64_t k = 0; k < count; ++k) L->pick(*plans[k])(*plans[k], Columns{});
}
#else
// Without OpenMP: every member on a thread of its own except the first, which runs on the
// caller's. Threads wait for every member to have one before any starts: a column team whose
// members could not all start would never meet at its barriers; then the plans run whole, alone.
template <const Loop* L>
void run(const std::vector<const Plan*>& plans) {
  std::vector<std::unique_ptr<Barrier>> barriers;
  std::vector<Member> members;
  for (const Plan* plan : plans) {
    const int64_t team = plan->column_threads > 1 ? plan->column_threads : 1;
    Barrier* barrier = nullptr;
    if (team > 1) {
      barriers.push_back(std::make_unique<Barrier>(team));
      barrier = barriers.back().get();
    }
    for (int64_t k = 0; k < team; ++k) members.push_back({plan, Columns{k, team, barrier}});
  }
  std::atomic<int> state{0};  // 0 wait, 1 go, 2 abandon
  auto member = [&state](const Member& m) {
    while (state.load(std::memory_order_acquire) == 0) std::this_thread::yield();
    if (state.load(std::memory_order_acquire) == 1) L->pick(*m.plan)(*m.plan, m.columns);
  };
  std::vector<std::thread> threads;
  try {
    for (size_t k = 1; k < members.size(); ++k) threads.emplace_back(member, std::cref(members[k]));
    state.store(1, std::memory_order_release);
    L->pick(*members[0].plan)(*members[0].plan, members[0].columns);
  } catch (const std::system_error&) {
    state.store(2, std::memory_order_release);
    for (const Plan* plan : plans) L->pick(*plan)(*plan, Columns{});
  }
  for (auto& thread : threads) thread.join();
}
#endif

// Runs the loops of the given plans: a tuple of plan addresses, disjoint rows of one direction,
// each on its `column_threads` threads.
template <const Loop* L>
PyObject* driver(PyObject*, PyObject* args) {
  PyObject* addresses;
  if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &addresses)) return nullptr;
  std::vector<const Plan*> plans;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(addresses); ++k) {
    const unsigned long long address = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(addresses, k));
    if (PyErr_Occurred()) return nullptr;
    plans.push_back(reinterpret_cast<const Plan*>(address));
  }
  if (plans.empty()) Py_RETURN_NONE;
  Py_BEGIN_ALLOW_THREADS
  run<L>(plans);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

template <typename T>
void run_single_step(const Plan& p, unsigned long long x, int64_t input_size, unsigned long long w_ih,
                     unsigned long long b_ih, unsigned long long b_hh, unsigned long long h0, unsigned long long c0) {
  auto fn = FASTLSTM_PICK(single_step, T);
  fn(p, reinterpret_cast<const T*>(x), input_size, reinterpret_cast<const T*>(w_ih), reinterpret_cast<const T*>(b_ih),
     reinterpret_cast<const T*>(b_hh), reinterpret_cast<const T*>(h0), reinterpret_cast<const T*>(c0));
}

// single_step(plan, x, input_size, w_ih, b_ih, b_hh, h0, c0): see single_step in kernels.h.
PyObject* single_step(PyObject*, PyObject* args) {
  unsigned long long plan_address, x, w_ih, b_ih, b_hh, h0, c0;
  long long input_size;
  if (!PyArg_ParseTuple(args, "KKLKKKKK", &plan_address, &x, &input_size, &w_ih, &b_ih, &b_hh, &h0, &c0)) {
    return nullptr;
  }
  const Plan& p = *reinterpret_cast<const Plan*>(plan_address);
  Py_BEGIN_ALLOW_THREADS
  if (p.dtype == 0) {
    run_single_step<float>(p, x, input_size, w_ih, b_ih, b_hh, h0, c0);
  } else {
    run_single_step<double>(p, x, input_size, w_ih, b_ih, b_hh, h0, c0);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// Runs job(k) for k in [0, parts) on parts threads (OpenMP's team where the kernels have it, else
// threads of their own; a part whose thread could not start runs on the caller's). The parts must
// not wait for one another.
template <typename Job>
void run_parts(int64_t parts, const Job& job) {
  if (parts <= 1) {
    job(0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(int(parts))
  for (int64_t k = 0; k < parts; ++k) job(k);
#else
  std::vector<std::thread> threads;
  int64_t started = 1;
  try {
    for (; started < parts; ++started) threads.emplace_back(job, started);
  } catch (const std::system_error&) {
  }
  job(0);
  for (int64_t k = started; k < parts; ++k) job(k);
  for (auto& thread : threads) thread.join();
#endif
}

template <typename T>
void run_stream_forward(const int64_t* table, int64_t layers, int64_t steps, unsigned long long x, unsigned long long y,
                        unsigned long long h0, unsigned long long c0, unsigned long long h_n, unsigned long long c_n,
                        const int64_t* lengths, int64_t parts) {
  const int64_t B = reinterpret_cast<const Plan*>(table[0])->batch;
  auto fn = FASTLSTM_PICK(stream_forward, T);
  run_parts(parts, [&](int64_t k) {  // part k: rows [B k / parts, B (k + 1) / parts)
    fn(table, layers, steps, reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), reinterpret_cast<const T*>(h0),
       reinterpret_cast<const T*>(c0), reinterpret_cast<T*>(h_n), reinterpret_cast<T*>(c_n), lengths,
       B * k / parts, B * (k + 1) / parts);
  });
}

// stream_forward(table, layers, steps, x, y, h0, c0, h_n, c_n, lengths, threads): see stream_forward
// in kernels.h (lengths 0: every row runs every step); `threads` split the batch rows.
PyObject* stream_forward(PyObject*, PyObject* args) {
  unsigned long long table, x, y, h0, c0, h_n, c_n, lengths;
  long long layers, steps, threads;
  if (!PyArg_ParseTuple(args, "KLLKKKKKKKL", &table, &layers, &steps, &x, &y, &h0, &c0, &h_n, &c_n, &lengths,
                        &threads)) {
    return nullptr;
  }
  const int64_t* rows = reinterpret_cast<const int64_t*>(table);
  const int64_t* row_lengths = reinterpret_cast<const int64_t*>(lengths);
  const bool single = reinterpret_cast<const Plan*>(rows[0])->dtype == 0;
  Py_BEGIN_ALLOW_THREADS
  if (single) {
    run_stream_forward<float>(rows, layers, steps, x, y, h0, c0, h_n, c_n, row_lengths, threads);
  } else {
    run_stream_forward<double>(rows, layers, steps, x, y, h0, c0, h_n, c_n, row_lengths, threads);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

template <typename T>
void run_step_backward(const Plan& p, unsigned long long x, int64_t input_size, unsigned long long w_ih,
                       unsigned long long dx, unsigned long long dw_ih, unsigned long long dw_hh, unsigned long long db) {
  auto fn = FASTLSTM_PICK(step_backward, T);
  fn(p, reinterpret_cast<const T*>(x), input_size, reinterpret_cast<const T*>(w_ih), reinterpret_cast<T*>(dx),
     reinterpret_cast<T*>(dw_ih), reinterpret_cast<T*>(dw_hh), reinterpret_cast<T*>(db));
}

// step_backward(plan, x, input_size, w_ih, dx, dw_ih, dw_hh, db): see step_backward in kernels.h
// (dx and db may be 0: not wanted).
PyObject* step_backward(PyObject*, PyObject* args) {
  unsigned long long plan_address, x, w_ih, dx, dw_ih, dw_hh, db;
  long long input_size;
  if (!PyArg_ParseTuple(args, "KKLKKKKK", &plan_address, &x, &input_size, &w_ih, &dx, &dw_ih, &dw_hh, &db)) {
    return nullptr;
  }
  const Plan& p = *reinterpret_cast<const Plan*>(plan_address);
  Py_BEGIN_ALLOW_THREADS
  if (p.dtype == 0) {
    run_step_backward<float>(p, x, input_size, w_ih, dx, dw_ih, dw_hh, db);
  } else {
    run_step_backward<double>(p, x, input_size, w_ih, dx, dw_ih, dw_hh, db);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// convert(half, to_half, src, dst, n): n values between float32 and half precision `half` (1 bfloat16,
// 2 float16) with the rows' conversions of the instruction set in use (tested against torch's).
PyObject* convert(PyObject*, PyObject* args) {
  long long half, n;
  int to_half;
  unsigned long long src, dst;
  if (!PyArg_ParseTuple(args, "LpKKL", &half, &to_half, &src, &dst, &n)) return nullptr;
  if (half != 1 && half != 2) {
    PyErr_SetString(PyExc_ValueError, "half: 1 (bfloat16) or 2 (float16)");
    return nullptr;
  }
  if (to_half) {
    FASTLSTM_PICK(narrow_row, float)(half, reinterpret_cast<const float*>(src), reinterpret_cast<uint16_t*>(dst), n);
  } else {
    FASTLSTM_PICK(widen_row, float)(half, reinterpret_cast<const uint16_t*>(src), reinterpret_cast<float*>(dst), n);
  }
  Py_RETURN_NONE;
}

// pack_panels(kind, K, N, src, stride_k, stride_n, dst): B [K, N] of float32 (kind 0), float64 (1)
// or 32-bit words (2: bfloat16 pairs) into the GEMM's panels; pack_bfloat16_pairs(K, N, src, ld,
// dst): a row-major bfloat16 B into bfloat16 pair panels (kernels.h, pack_panels, pack_bf16_pairs).
PyObject* pack_panels(PyObject*, PyObject* args) {
  long long kind, K, N, stride_k, stride_n;
  unsigned long long src, dst;
  if (!PyArg_ParseTuple(args, "LLLKLLK", &kind, &K, &N, &src, &stride_k, &stride_n, &dst)) return nullptr;
  if (kind == 0) {
    FASTLSTM_PICK(pack_panels, float)(K, N, reinterpret_cast<const float*>(src), stride_k, stride_n,
                                      reinterpret_cast<float*>(dst));
  } else if (kind == 1) {
    FASTLSTM_PICK(pack_panels, double)(K, N, reinterpret_cast<const double*>(src), stride_k, stride_n,
                                       reinterpret_cast<double*>(dst));
  } else {
    FASTLSTM_PICK(pack_panels, uint32_t)(K, N, reinterpret_cast<const uint32_t*>(src), stride_k, stride_n,
                                         reinterpret_cast<uint32_t*>(dst));
  }
  Py_RETURN_NONE;
}

PyObject* pack_bfloat16_pairs(PyObject*, PyObject* args) {
  long long K, N, ld;
  unsigned long long src, dst;
  if (!PyArg_ParseTuple(args, "LLKLK", &K, &N, &src, &ld, &dst)) return nullptr;
#ifdef FASTLSTM_X86
  if (build() == kAvx512) {
    avx512::pack_bf16_pairs(K, N, reinterpret_cast<const uint16_t*>(src), ld, reinterpret_cast<uint32_t*>(dst));
    Py_RETURN_NONE;
  }
#endif
  generic::pack_bf16_pairs(K, N, reinterpret_cast<const uint16_t*>(src), ld, reinterpret_cast<uint32_t*>(dst));
  Py_RETURN_NONE;
}

PyObject* instruction_set(PyObject*, PyObject*) { return PyUnicode_FromString(kIsaNames[isa()]); }

PyObject* bfloat16_products(PyObject*, PyObject*) { return PyBool_FromLong(isa() >= kAvx512Bf16); }

// The instruction sets this machine runs, lowest first.
PyObject* instruction_sets(PyObject*, PyObject*) {
  PyObject* names = PyTuple_New(supported_isa() + 1);
  if (!names) return nullptr;
  for (int k = 0; k <= supported_isa(); ++k) PyTuple_SET_ITEM(names, k, PyUnicode_FromString(kIsaNames[k]));
  return names;
}

// set_instruction_set(name): run the kernels with a supported set; returns the previous one's name.
PyObject* set_instruction_set(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (int k = 0; k <= supported_isa(); ++k) {
    if (std::strcmp(name, kIsaNames[k]) == 0) {
      const int previous = isa();
      g_isa.store(k, std::memory_order_relaxed);
      return PyUnicode_FromString(kIsaNames[previous]);
    }
  }
  PyErr_Format(PyExc_ValueError, "instruction set '%s' is not one this machine runs (it runs up to '%s')", name,
               kIsaNames[supported_isa()]);
  return nullptr;
}

PyObject* threading(PyObject*, PyObject*) {
#ifdef _OPENMP
  return PyUnicode_FromString("openmp");
#else
  return PyUnicode_FromString("threads");
#endif
}

PyObject* plan_size(PyObject*, PyObject*) { return PyLong_FromSize_t(sizeof(Plan)); }

// ((name, kind, byte offset), ...) of every Plan field, in declaration order.
PyObject* plan_fields(PyObject*, PyObject*) {
  PyObject* fields = PyList_New(0);
  if (!fields) return nullptr;
#define FASTLSTM_DESCRIBE(type, name)                                                                  \
  {                                                                                                    \
    PyObject* field = Py_BuildValue("(sCn)", #name, int(field_kind<type>()), Py_ssize_t(offsetof(Plan, name))); \
    if (!field || PyList_Append(fields, field) < 0) {                                                  \
      Py_XDECREF(field);                                                                               \
      Py_DECREF(fields);                                                                               \
      return nullptr;                                                                                  \
    }                                                                                                  \
    Py_DECREF(field);                                                                                  \
  }
  FASTLSTM_PLAN_FIELDS(FASTLSTM_DESCRIBE)
#undef FASTLSTM_DESCRIBE
  return fields;
}

PyMethodDef methods[] = {
    {"plan_size", plan_size, METH_NOARGS, "sizeof(Plan) in bytes."},
    {"plan_fields", plan_fields, METH_NOARGS, "(name, kind, offset) of every Plan field, in order."},
    {"instruction_set", instruction_set, METH_NOARGS, "The instruction set the kernels run with."},
    {"bfloat16_products", bfloat16_products, METH_NOARGS,
     "Whether the instruction set in use multiplies bfloat16 pairs (a bfloat16 layer's panels in w_hh_bf16)."},
    {"instruction_sets", instruction_sets, METH_NOARGS, "The instruction sets this machine runs, lowest first."},
    {"set_instruction_set", set_instruction_set, METH_VARARGS, "Run with a supported set; returns the previous."},
    {"threading", threading, METH_NOARGS, "How the kernels run threads: openmp or threads."},
    {"convert", convert, METH_VARARGS, "Values between float32 and a half precision, as the kernels convert."},
    {"pack_panels", pack_panels, METH_VARARGS, "A weight into the GEMM's column panels."},
    {"pack_bfloat16_pairs", pack_bfloat16_pairs, METH_VARARGS, "A weight into bfloat16 pair panels."},
    {"single_step", single_step, METH_VARARGS, "One step of one direction, nothing saved."},
    {"step_backward", step_backward, METH_VARARGS, "One step's backward and its weight gradients."},
    {"stream_forward", stream_forward, METH_VARARGS, "A stream's chunk through every layer, nothing saved."},
    {"forward_all", driver<&kForward>, METH_VARARGS, "Run the forward loops of a tuple of plans."},
    {"backward_all", driver<&kBackward>, METH_VARARGS, "Run the backward loops of a tuple of plans."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "fastlstm CPU engine kernels.", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
