// fastlstm CPU engine: the per-step work of one LSTM direction, forward and backward.
//
// Shape legend: T steps, B batch (sorted by length, longest first), H hidden, P projection,
// Hout = P or H, N = total real tokens. Rows of one step are a prefix [0, n_t) of the batch
// (packed order), and per-step tensors are stored packed: step t's rows start at offsets[t].
//
// Everything a direction needs is described by one `Plan` (built by engines/cpu.py). The time loop
// runs either here (`forward_all` / `backward_all`, with BLAS gemm taken from the running torch)
// or in Python, which then calls the phases below around torch's own GEMMs:
//
//   forward step t:   prepare (h_in = h * r) -> GEMM hw = h_in W_hh^T -> cell ->
//                     [GEMM htilde = m W_hr^T -> finish]              (projection only)
//   backward step t:  begin -> [GEMM dm = dproj W_hr] -> cell -> GEMM dh_in = dhw W_hh -> end
//
// Equations: docs/equations.md. Gate order i, f, g, o. Accumulation of row statistics and of
// parameter-gradient sums is in double.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Every field is 8 bytes wide, so the layout is the same as the ctypes.Structure in cpu.py.
struct Plan {
  int64_t dtype;  // 0 = float32, 1 = float64
  int64_t steps, batch, hidden, proj, h_out, reverse;
  int64_t act_gate, act_in, act_out;  // 0 sigmoid, 1 hard_sigmoid, 2 tanh, 3 softsign, 4 relu
  int64_t peephole, coupled, layer_norm;
  double clip, cell_clip, proj_clip;  // <= 0: off
  int64_t zoneout_mode;               // 0 off, 1 masks, 2 expectation (eval)
  double z_h, z_c;                    // expectation mode probabilities
  const int64_t* n_rows;              // [T]
  const int64_t* offsets;             // [T]
  const void* w_hh;                   // [4H, Hout] (already DropConnect-masked)
  const void* w_hr;                   // [P, H]
  const void* peep;                   // [3H]
  const void* ln_hh;                  // [4H]
  const void* ln_c_w;                 // [H]
  const void* ln_c_b;                 // [H]
  const void* rec_mask;               // [B, Hout]
  const void* zh_mask;                // [N, Hout]
  const void* zc_mask;                // [N, H]
  const void* xg;                     // [N, ld_xg]: x W_ih^T (layer-normed) + biases
  int64_t ld_xg;
  const void* c0;                     // [B, H]
  void* h_state;                      // [B, Hout]
  void* c_state;                      // [B, H]
  void* y;                            // [N, ld_y]
  int64_t ld_y;
  void* gates;                        // [N, 4H] activations i, f, g, o
  void* clip_mask;                    // uint8 [N, 4H], 1 where the gradient passes the clip
  void* c_fresh;                      // [N, H] the cell after update and cell clip
  void* cclip_mask;                   // uint8 [N, H]
  void* c_carried;                    // [N, H] the cell after zoneout (zoneout on c only)
  void* h_in;                         // [N, Hout] input of the recurrent GEMM
  void* m;                            // [N, H] cell output before the projection
  void* pclip_mask;                   // uint8 [N, P]
  void* hw_hat;                       // [N, 4H] normalised recurrent product (layer norm)
  void* hw_rstd;                      // [N]
  void* c_hat;                        // [N, H] normalised cell (layer norm)
  void* c_rstd;                       // [N]
  void* hw;                           // [B, ld_hw] scratch: this step's recurrent product
  int64_t ld_hw;
  void* htilde;                       // [B, P] scratch: this step's projection
  const void* dy;                     // [N, ld_dy]
  int64_t ld_dy;
  void* dh_state;                     // [B, Hout]
  void* dc_state;                     // [B, H]
  void* dgates;                       // [N, ld_dgates] gradient of the gate pre-activations
  int64_t ld_dgates;
  void* dhw;                          // [N, ld_dhw] gradient of the recurrent product
  int64_t ld_dhw;
  void* dproj;                        // [N, P] gradient of the projection output
  void* dm;                           // [B, H] scratch: gradient of the cell output
  void* dh_in;                        // [B, Hout] scratch: gradient of the recurrent GEMM input
  void* dpeep;                        // [3H] accumulated
  void* dln_hh;                       // [4H] accumulated
  void* dln_c_w;                      // [H] accumulated
  void* dln_c_b;                      // [H] accumulated
  void* sgemm;                        // BLAS sgemm_ (Fortran, LP64) or null
  void* dgemm;                        // BLAS dgemm_ or null
  int64_t save;                       // 1: keep every step for backward; 0: inference, [B] rows reused
};

// Row of the buffers kept for backward: the packed row when saving, else the batch row (inference
// reuses one step's worth of rows, so no memory grows with T).
inline int64_t saved_row(const Plan& p, int64_t row, int64_t r) { return p.save ? row : r; }

constexpr double kLayerNormEps = 1e-5;

template <typename T>
inline T activate(int64_t code, T x) {
  switch (code) {
    case 0: return T(1) / (T(1) + std::exp(-x));
    case 1: { T v = T(0.2) * x + T(0.5); return v < T(0) ? T(0) : (v > T(1) ? T(1) : v); }
    case 2: return std::tanh(x);
    case 3: return x / (T(1) + std::fabs(x));
    default: return x > T(0) ? x : T(0);
  }
}

// Derivative expressed through the activation's output y.
template <typename T>
inline T activate_grad(int64_t code, T y) {
  switch (code) {
    case 0: return y * (T(1) - y);
    case 1: return (y > T(0) && y < T(1)) ? T(0.2) : T(0);
    case 2: return T(1) - y * y;
    case 3: { T s = T(1) - std::fabs(y); return s * s; }
    default: return y > T(0) ? T(1) : T(0);
  }
}

// Clip to [-bound, bound]; `inside` records whether the gradient passes (torch's clamp passes at the bounds).
template <typename T>
inline T clip_value(T x, double bound, uint8_t* inside) {
  T b = T(bound);
  if (x > b) { *inside = 0; return b; }
  if (x < -b) { *inside = 0; return -b; }
  *inside = 1;
  return x;
}

// Row layer norm of v[0:n] into out (out = v_hat * gain + shift), saving v_hat and 1/std.
template <typename T>
inline void layer_norm_row(const T* v, int64_t n, const T* gain, const T* shift, T* v_hat, T* rstd_out, T* out) {
  double mean = 0.0;
  for (int64_t j = 0; j < n; ++j) mean += v[j];
  mean /= double(n);
  double var = 0.0;
  for (int64_t j = 0; j < n; ++j) { double d = double(v[j]) - mean; var += d * d; }
  var /= double(n);
  T rstd = T(1.0 / std::sqrt(var + kLayerNormEps));
  *rstd_out = rstd;
  for (int64_t j = 0; j < n; ++j) {
    T vh = T((double(v[j]) - mean)) * rstd;
    v_hat[j] = vh;
    out[j] = vh * gain[j] + (shift ? shift[j] : T(0));
  }
}

// d input of a row layer norm given d output; accumulates the gain (and shift) gradients.
template <typename T>
inline void layer_norm_row_backward(const T* dout, int64_t n, const T* v_hat, T rstd, const T* gain,
                                    T* dgain, T* dshift, T* dv) {
  double mean_dxh = 0.0, mean_dxh_xh = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    double dxh = double(dout[j]) * gain[j];
    mean_dxh += dxh;
    mean_dxh_xh += dxh * v_hat[j];
    dgain[j] += dout[j] * v_hat[j];
    if (dshift) dshift[j] += dout[j];
  }
  mean_dxh /= double(n);
  mean_dxh_xh /= double(n);
  for (int64_t j = 0; j < n; ++j) {
    double dxh = double(dout[j]) * gain[j];
    dv[j] = T(double(rstd) * (dxh - mean_dxh - double(v_hat[j]) * mean_dxh_xh));
  }
}

// Keep probability of zoneout for element j of packed row `row` (0 when off for that state).
template <typename T>
inline T keep_h(const Plan& p, int64_t row, int64_t j) {
  if (p.zoneout_mode == 1) return p.zh_mask ? static_cast<const T*>(p.zh_mask)[row * p.h_out + j] : T(0);
  if (p.zoneout_mode == 2) return T(p.z_h);
  return T(0);
}

template <typename T>
inline T keep_c(const Plan& p, int64_t row, int64_t j) {
  if (p.zoneout_mode == 1) return p.zc_mask ? static_cast<const T*>(p.zc_mask)[row * p.hidden + j] : T(0);
  if (p.zoneout_mode == 2) return T(p.z_c);
  return T(0);
}

inline bool has_zoneout_c(const Plan& p) {
  return (p.zoneout_mode == 1 && p.zc_mask) || (p.zoneout_mode == 2 && p.z_c > 0);
}

inline bool has_zoneout_h(const Plan& p) {
  return (p.zoneout_mode == 1 && p.zh_mask) || (p.zoneout_mode == 2 && p.z_h > 0);
}

// ---------------------------------------------------------------------------------------------
// forward phases

template <typename T>
void fwd_prepare(const Plan& p, int64_t t) {
  const int64_t n = p.n_rows[t], row0 = p.offsets[t], ho = p.h_out;
  const T* h = static_cast<const T*>(p.h_state);
  T* h_in = static_cast<T*>(p.h_in) + saved_row(p, row0, 0) * ho;
  if (p.rec_mask) {
    const T* r = static_cast<const T*>(p.rec_mask);
    for (int64_t k = 0; k < n * ho; ++k) h_in[k] = h[k] * r[k];
  } else {
    std::memcpy(h_in, h, sizeof(T) * n * ho);
  }
}

// h~ is final: zoneout with the previous h, then write the output and the state.
template <typename T>
inline void finish_row(const Plan& p, int64_t r, int64_t row, const T* h_tilde) {
  T* h_state = static_cast<T*>(p.h_state) + r * p.h_out;
  T* y = static_cast<T*>(p.y) + row * p.ld_y;
  const bool zh = has_zoneout_h(p);
  for (int64_t j = 0; j < p.h_out; ++j) {
    T h_new = h_tilde[j];
    if (zh) { T k = keep_h<T>(p, row, j); h_new = k * h_state[j] + (T(1) - k) * h_new; }
    y[j] = h_new;
    h_state[j] = h_new;
  }
}

template <typename T>
void fwd_cell(const Plan& p, int64_t t) {
  const int64_t n = p.n_rows[t], row0 = p.offsets[t], H = p.hidden, G = 4 * H;
  const T* peep = static_cast<const T*>(p.peep);
  const bool zc = has_zoneout_c(p);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = row0 + r;
    const int64_t sr = saved_row(p, row, r);
    const T* xg = static_cast<const T*>(p.xg) + row * p.ld_xg;
    T* hw = static_cast<T*>(p.hw) + r * p.ld_hw;
    T* gates = static_cast<T*>(p.gates) + sr * G;
    T* c_state = static_cast<T*>(p.c_state) + r * H;
    T* c_fresh = static_cast<T*>(p.c_fresh) + sr * H;
    uint8_t* clip_mask = p.clip_mask ? static_cast<uint8_t*>(p.clip_mask) + sr * G : nullptr;
    uint8_t* cclip_mask = p.cclip_mask ? static_cast<uint8_t*>(p.cclip_mask) + sr * H : nullptr;

    // gates = xg + hw, or xg + LN(hw; g_hh) (the x part is normalised outside)
    if (p.layer_norm) {
      T* hw_hat = static_cast<T*>(p.hw_hat) + sr * G;
      layer_norm_row<T>(hw, G, static_cast<const T*>(p.ln_hh), nullptr, hw_hat,
                        static_cast<T*>(p.hw_rstd) + sr, hw);
    }
    for (int64_t j = 0; j < G; ++j) gates[j] = xg[j] + hw[j];  // pre-activations for now

    T* a_i = gates;
    T* a_f = gates + H;
    T* a_g = gates + 2 * H;
    T* a_o = gates + 3 * H;
    for (int64_t j = 0; j < H; ++j) {
      const T c_prev = c_state[j];
      T ai = a_i[j], af = a_f[j], ag = a_g[j];
      if (p.peephole) { ai += peep[j] * c_prev; af += peep[H + j] * c_prev; }
      if (p.clip > 0) {
        ai = clip_value(ai, p.clip, clip_mask + j);
        af = clip_value(af, p.clip, clip_mask + H + j);
        ag = clip_value(ag, p.clip, clip_mask + 2 * H + j);
      }
      const T i = activate(p.act_gate, ai);
      const T f = p.coupled ? T(1) - i : activate(p.act_gate, af);
      const T g = activate(p.act_in, ag);
      T c = f * c_prev + i * g;
      if (p.cell_clip > 0) c = clip_value(c, p.cell_clip, cclip_mask + j);
      a_i[j] = i;
      a_f[j] = f;
      a_g[j] = g;
      c_fresh[j] = c;
    }
    // output gate, after the fresh cell is known (its peephole reads c_t)
    for (int64_t j = 0; j < H; ++j) {
      T ao = a_o[j];
      if (p.peephole) ao += peep[2 * H + j] * c_fresh[j];
      if (p.clip > 0) ao = clip_value(ao, p.clip, clip_mask + 3 * H + j);
      a_o[j] = activate(p.act_gate, ao);
    }
    // m = o * act(LN(c)); reuse hw as the row's scratch (it is no longer needed)
    const T* c_shown = c_fresh;
    if (p.layer_norm) {
      layer_norm_row<T>(c_fresh, H, static_cast<const T*>(p.ln_c_w), static_cast<const T*>(p.ln_c_b),
                        static_cast<T*>(p.c_hat) + sr * H, static_cast<T*>(p.c_rstd) + sr, hw);
      c_shown = hw;
    }
    T* m_out = p.proj ? static_cast<T*>(p.m) + sr * H : hw + (p.layer_norm ? H : 0);
    for (int64_t j = 0; j < H; ++j) m_out[j] = a_o[j] * activate(p.act_out, c_shown[j]);

    // carried cell: zoneout with the previous cell
    for (int64_t j = 0; j < H; ++j) {
      T c = c_fresh[j];
      if (zc) { T k = keep_c<T>(p, row, j); c = k * c_state[j] + (T(1) - k) * c; }
      c_state[j] = c;
    }
    if (zc && p.save) std::memcpy(static_cast<T*>(p.c_carried) + row * H, c_state, sizeof(T) * H);
    if (!p.proj) finish_row<T>(p, r, row, m_out);
  }
}

template <typename T>
void fwd_finish(const Plan& p, int64_t t) {  // projection only: proj clip, zoneout, outputs
  const int64_t n = p.n_rows[t], row0 = p.offsets[t], P = p.proj;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = row0 + r;
    T* ht = static_cast<T*>(p.htilde) + r * P;
    if (p.proj_clip > 0) {
      uint8_t* mask = static_cast<uint8_t*>(p.pclip_mask) + saved_row(p, row, r) * P;
      for (int64_t j = 0; j < P; ++j) ht[j] = clip_value(ht[j], p.proj_clip, mask + j);
    }
    finish_row<T>(p, r, row, ht);
  }
}

// ---------------------------------------------------------------------------------------------
// backward phases

template <typename T>
void bwd_begin(const Plan& p, int64_t t) {
  const int64_t n = p.n_rows[t], row0 = p.offsets[t], ho = p.h_out;
  const bool zh = has_zoneout_h(p);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = row0 + r;
    T* dh_state = static_cast<T*>(p.dh_state) + r * ho;
    const T* dy = static_cast<const T*>(p.dy) + row * p.ld_dy;
    T* dh_tilde = p.proj ? static_cast<T*>(p.dproj) + row * ho : static_cast<T*>(p.dm) + r * ho;
    for (int64_t j = 0; j < ho; ++j) {
      const T dh = dh_state[j] + dy[j];
      T k = zh ? keep_h<T>(p, row, j) : T(0);
      dh_tilde[j] = (T(1) - k) * dh;
      dh_state[j] = k * dh;  // the part that flows straight to h_{t-1}; the GEMM part is added in bwd_end
    }
    if (p.proj && p.proj_clip > 0) {
      const uint8_t* mask = static_cast<const uint8_t*>(p.pclip_mask) + row * ho;
      for (int64_t j = 0; j < ho; ++j) if (!mask[j]) dh_tilde[j] = T(0);
    }
  }
}

template <typename T>
inline const T* cell_prev(const Plan& p, int64_t t, int64_t r) {
  // The cell that entered step t for batch row r (see the packed-layout notes in cpu.py).
  const int64_t H = p.hidden;
  const bool zc = has_zoneout_c(p);
  const T* carried = static_cast<const T*>(zc ? p.c_carried : p.c_fresh);
  if (!p.reverse) {
    if (t == 0) return static_cast<const T*>(p.c0) + r * H;
    return carried + (p.offsets[t - 1] + r) * H;
  }
  if (t == p.steps - 1 || r >= p.n_rows[t + 1]) return static_cast<const T*>(p.c0) + r * H;
  return carried + (p.offsets[t + 1] + r) * H;
}

template <typename T>
void bwd_cell(const Plan& p, int64_t t) {
  const int64_t n = p.n_rows[t], row0 = p.offsets[t], H = p.hidden, G = 4 * H;
  const T* peep = static_cast<const T*>(p.peep);
  T* dpeep = static_cast<T*>(p.dpeep);
  const bool zc = has_zoneout_c(p);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = row0 + r;
    const T* gates = static_cast<const T*>(p.gates) + row * G;
    const T* i = gates;
    const T* f = gates + H;
    const T* g = gates + 2 * H;
    const T* o = gates + 3 * H;
    const T* c_fresh = static_cast<const T*>(p.c_fresh) + row * H;
    const T* c_prev = cell_prev<T>(p, t, r);
    const uint8_t* clip_mask = p.clip_mask ? static_cast<const uint8_t*>(p.clip_mask) + row * G : nullptr;
    const uint8_t* cclip_mask = p.cclip_mask ? static_cast<const uint8_t*>(p.cclip_mask) + row * H : nullptr;
    T* dc_state = static_cast<T*>(p.dc_state) + r * H;
    T* dm = static_cast<T*>(p.dm) + r * H;
    T* dg_row = static_cast<T*>(p.dgates) + row * p.ld_dgates;

    // This row's dgates slots double as scratch so the phase allocates nothing: until the last
    // loop overwrites slot j of each, the g slot holds do, the o slot d(c shown), the i slot d(c~).
    const T* c_hat = p.layer_norm ? static_cast<const T*>(p.c_hat) + row * H : nullptr;
    const T* ln_w = static_cast<const T*>(p.ln_c_w);
    const T* ln_b = static_cast<const T*>(p.ln_c_b);
    T* d_shown = dg_row + 3 * H;
    T* d_c = dg_row;
    for (int64_t j = 0; j < H; ++j) {
      const T shown = p.layer_norm ? c_hat[j] * ln_w[j] + ln_b[j] : c_fresh[j];
      const T a = activate(p.act_out, shown);
      d_shown[j] = dm[j] * o[j] * activate_grad(p.act_out, a);
      dg_row[2 * H + j] = dm[j] * a;  // do, kept in the g slot until da_o is formed
    }
    if (p.layer_norm) {
      T tmp_rstd = static_cast<const T*>(p.c_rstd)[row];
      layer_norm_row_backward<T>(d_shown, H, c_hat, tmp_rstd, ln_w, static_cast<T*>(p.dln_c_w),
                                 static_cast<T*>(p.dln_c_b), d_c);
    } else {
      for (int64_t j = 0; j < H; ++j) d_c[j] = d_shown[j];
    }
    for (int64_t j = 0; j < H; ++j) {
      // output gate
      T da_o = dg_row[2 * H + j] * activate_grad(p.act_gate, o[j]);
      if (clip_mask && !clip_mask[3 * H + j]) da_o = T(0);
      T dc = d_c[j];
      if (p.peephole) { dc += da_o * peep[2 * H + j]; dpeep[2 * H + j] += da_o * c_fresh[j]; }
      // the cell carried to the next step: zoneout splits its gradient
      const T dc_next = dc_state[j];
      const T k = zc ? keep_c<T>(p, row, j) : T(0);
      dc += (T(1) - k) * dc_next;
      if (cclip_mask && !cclip_mask[j]) dc = T(0);
      const T cp = c_prev[j];
      T di = dc * g[j];
      T df = dc * cp;
      const T dg = dc * i[j];
      if (p.coupled) { di -= df; df = T(0); }
      T da_i = di * activate_grad(p.act_gate, i[j]);
      T da_f = p.coupled ? T(0) : df * activate_grad(p.act_gate, f[j]);
      T da_g = dg * activate_grad(p.act_in, g[j]);
      if (clip_mask) {
        if (!clip_mask[j]) da_i = T(0);
        if (!clip_mask[H + j]) da_f = T(0);
        if (!clip_mask[2 * H + j]) da_g = T(0);
      }
      T dc_prev = dc * f[j] + k * dc_next;
      if (p.peephole) {
        dc_prev += da_i * peep[j] + da_f * peep[H + j];
        dpeep[j] += da_i * cp;
        dpeep[H + j] += da_f * cp;
      }
      dc_state[j] = dc_prev;
      dg_row[j] = da_i;
      dg_row[H + j] = da_f;
      dg_row[2 * H + j] = da_g;
      dg_row[3 * H + j] = da_o;
    }
    if (p.layer_norm) {
      layer_norm_row_backward<T>(dg_row, G, static_cast<const T*>(p.hw_hat) + row * G,
                                 static_cast<const T*>(p.hw_rstd)[row], static_cast<const T*>(p.ln_hh),
                                 static_cast<T*>(p.dln_hh), nullptr, static_cast<T*>(p.dhw) + row * p.ld_dhw);
    }
  }
}

template <typename T>
void bwd_end(const Plan& p, int64_t t) {
  const int64_t n = p.n_rows[t], ho = p.h_out;
  T* dh_state = static_cast<T*>(p.dh_state);
  const T* dh_in = static_cast<const T*>(p.dh_in);
  if (p.rec_mask) {
    const T* rm = static_cast<const T*>(p.rec_mask);
    for (int64_t k = 0; k < n * ho; ++k) dh_state[k] += dh_in[k] * rm[k];
  } else {
    for (int64_t k = 0; k < n * ho; ++k) dh_state[k] += dh_in[k];
  }
}

// ---------------------------------------------------------------------------------------------
// BLAS drivers (row-major wrappers around column-major Fortran gemm)

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

// C[M, N] = A[M, K] @ op(B), op(B) = B[N, K]^T (trans_b) or B[K, N]; row-major with leading dims.
template <typename T>
void gemm(const Plan& p, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, T* C, int64_t ldc) {
  if (M == 0) return;
  const char ta = trans_b ? 'T' : 'N', tb = 'N';
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const T alpha = T(1), beta = T(0);
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<sgemm_fn>(p.sgemm)(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    reinterpret_cast<dgemm_fn>(p.dgemm)(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  }
}

template <typename T>
void forward_all(const Plan& p) {
  const int64_t H = p.hidden, ho = p.h_out;
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t n = p.n_rows[t], row0 = p.offsets[t];
    fwd_prepare<T>(p, t);
    gemm<T>(p, true, n, 4 * H, ho, static_cast<const T*>(p.h_in) + saved_row(p, row0, 0) * ho, ho, static_cast<const T*>(p.w_hh), ho,
            static_cast<T*>(p.hw), p.ld_hw);
    fwd_cell<T>(p, t);
    if (p.proj) {
      gemm<T>(p, true, n, p.proj, H, static_cast<const T*>(p.m) + saved_row(p, row0, 0) * H, H, static_cast<const T*>(p.w_hr), H,
              static_cast<T*>(p.htilde), p.proj);
      fwd_finish<T>(p, t);
    }
  }
}

template <typename T>
void backward_all(const Plan& p) {
  const int64_t H = p.hidden, ho = p.h_out;
  for (int64_t s = p.steps - 1; s >= 0; --s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t n = p.n_rows[t], row0 = p.offsets[t];
    bwd_begin<T>(p, t);
    if (p.proj) {
      gemm<T>(p, false, n, H, p.proj, static_cast<const T*>(p.dproj) + row0 * ho, ho, static_cast<const T*>(p.w_hr), H,
              static_cast<T*>(p.dm), H);
    }
    bwd_cell<T>(p, t);
    gemm<T>(p, false, n, ho, 4 * H, static_cast<const T*>(p.dhw) + row0 * p.ld_dhw, p.ld_dhw,
            static_cast<const T*>(p.w_hh), ho, static_cast<T*>(p.dh_in), ho);
    bwd_end<T>(p, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Python bindings: every function takes the plan's address (and a step where it applies).

bool parse_plan(PyObject* args, const Plan** plan, int64_t* t, bool with_step) {
  unsigned long long address = 0;
  long long step = 0;
  if (with_step) {
    if (!PyArg_ParseTuple(args, "KL", &address, &step)) return false;
  } else {
    if (!PyArg_ParseTuple(args, "K", &address)) return false;
  }
  *plan = reinterpret_cast<const Plan*>(address);
  *t = step;
  if (with_step && (step < 0 || step >= (*plan)->steps)) {
    PyErr_Format(PyExc_IndexError, "step %lld out of range [0, %lld)", step, (long long)(*plan)->steps);
    return false;
  }
  return true;
}

template <void (*F32)(const Plan&, int64_t), void (*F64)(const Plan&, int64_t)>
PyObject* phase(PyObject*, PyObject* args) {
  const Plan* plan;
  int64_t t;
  if (!parse_plan(args, &plan, &t, true)) return nullptr;
  if (plan->dtype == 0) F32(*plan, t); else F64(*plan, t);
  Py_RETURN_NONE;
}

template <void (*F32)(const Plan&), void (*F64)(const Plan&)>
PyObject* driver(PyObject*, PyObject* args) {
  const Plan* plan;
  int64_t t;
  if (!parse_plan(args, &plan, &t, false)) return nullptr;
  if ((plan->dtype == 0 && !plan->sgemm) || (plan->dtype == 1 && !plan->dgemm)) {
    PyErr_SetString(PyExc_RuntimeError, "fastlstm CPU engine: no BLAS gemm was found for this dtype");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  if (plan->dtype == 0) F32(*plan); else F64(*plan);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* plan_size(PyObject*, PyObject*) { return PyLong_FromSize_t(sizeof(Plan)); }

PyMethodDef methods[] = {
    {"plan_size", plan_size, METH_NOARGS, "sizeof(Plan) in bytes."},
    {"fwd_prepare", phase<fwd_prepare<float>, fwd_prepare<double>>, METH_VARARGS, "h_in = h * r for step t."},
    {"fwd_cell", phase<fwd_cell<float>, fwd_cell<double>>, METH_VARARGS, "Gates, cell and output of step t."},
    {"fwd_finish", phase<fwd_finish<float>, fwd_finish<double>>, METH_VARARGS, "Projection clip and zoneout of step t."},
    {"bwd_begin", phase<bwd_begin<float>, bwd_begin<double>>, METH_VARARGS, "dh of step t through zoneout and proj clip."},
    {"bwd_cell", phase<bwd_cell<float>, bwd_cell<double>>, METH_VARARGS, "Gate gradients of step t."},
    {"bwd_end", phase<bwd_end<float>, bwd_end<double>>, METH_VARARGS, "dh_{t-1} of step t."},
    {"forward_all", driver<forward_all<float>, forward_all<double>>, METH_VARARGS, "The whole forward loop, BLAS gemm."},
    {"backward_all", driver<backward_all<float>, backward_all<double>>, METH_VARARGS, "The whole backward loop, BLAS gemm."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", "fastlstm CPU engine kernels.", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
