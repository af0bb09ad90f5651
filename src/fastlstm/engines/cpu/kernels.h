// fastlstm CPU engine: the math of one LSTM direction, forward and backward, as phases.
//
// Included by kernels.cpp once per instruction set (generic; AVX2+FMA and AVX-512 on x86-64),
// inside a namespace; so this file includes nothing and defines nothing outside templates and
// inline functions. `Plan` (the description of a direction) is defined in kernels.cpp.
//
// Every elementwise loop is a separate pass over one contiguous slice, with its options decided
// outside the loop, so that the compiler vectorises it; the float transcendental functions are
// branch-free for the same reason. Row statistics and parameter-gradient sums accumulate in double.

constexpr double kLayerNormEps = 1e-5;

// -- transcendental functions -----------------------------------------------------------------

template <typename T> inline T exp_(T x) { return std::exp(x); }
template <typename T> inline T tanh_(T x) { return std::tanh(x); }

// Cephes' expf: Cody-Waite range reduction, a degree-7 polynomial, and the exponent set by bit
// arithmetic; about 1 ulp on [-87, 88], branch-free. Rounding by the 1.5 * 2^23 trick.
template <> inline float exp_<float>(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Cephes' tanhf: an odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above; both are computed
// and one is selected, so the loop stays branch-free.
template <> inline float tanh_<float>(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = x * x;
  float small = -5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * a + a;
  const float large = 1.0f - 2.0f / (exp_<float>(2.0f * a) + 1.0f);
  const float r = a < 0.625f ? small : large;
  return x < 0.0f ? -r : r;
}

// -- half precision in storage: bfloat16 and float16 bits to and from float --------------------
//
// A half-precision call computes in float32; its outputs, output gradients and saved gate
// activations are stored in the half precision (Plan::half). The conversions round to nearest
// even, as torch's do (so an output narrowed here equals one narrowed by torch), and are written
// with selects instead of branches so that the row loops vectorise.

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bfloat16_to_float(uint16_t v) { return bits_float(uint32_t(v) << 16); }

inline uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // NaN: torch's quiet NaN
}

inline float float16_to_float(uint16_t v) {
  const uint32_t sign = uint32_t(v & 0x8000u) << 16, rest = v & 0x7fffu;
  uint32_t normal = (rest << 13) + 0x38000000u;           // exponent rebiased from 15 to 127
  normal = rest >= 0x7c00u ? normal + 0x38000000u : normal;  // inf and NaN: exponent 255
  const uint32_t subnormal = float_bits(float(rest) * 5.9604644775390625e-8f);  // rest * 2^-24
  return bits_float(sign | (rest < 0x400u ? subnormal : normal));
}

inline uint16_t float_to_float16(float f) {
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  uint32_t normal = a - 0x38000000u;
  normal = (normal + 0xfffu + ((normal >> 13) & 1u)) >> 13;
  // below 2^-14: adding 0.5 leaves a * 2^24, rounded to even, in the low mantissa bits
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? subnormal : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;  // 65520 and above round to infinity
  r = a > 0x7f800000u ? 0x7e00u : r;   // NaN
  return uint16_t(sign | r);
}

// n values of the half precision `half` (1 bfloat16, 2 float16) from and to T (float).
template <typename T>
inline void widen_row(int64_t half, const uint16_t* __restrict__ src, T* __restrict__ dst, int64_t n) {
  if (half == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = T(bfloat16_to_float(src[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = T(float16_to_float(src[j]));
  }
}

template <typename T>
inline void narrow_row(int64_t half, const T* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  if (half == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bfloat16(float(src[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = float_to_float16(float(src[j]));
  }
}

// -- activations ----------------------------------------------------------------------------

template <typename T>
inline void activate(int64_t code, T* __restrict__ v, int64_t n) {
  switch (code) {
    case 0: for (int64_t j = 0; j < n; ++j) v[j] = T(1) / (T(1) + exp_<T>(-v[j])); break;
    case 1:
      for (int64_t j = 0; j < n; ++j) {
        const T u = T(0.2) * v[j] + T(0.5);
        v[j] = u < T(0) ? T(0) : (u > T(1) ? T(1) : u);
      }
      break;
    case 2: for (int64_t j = 0; j < n; ++j) v[j] = tanh_<T>(v[j]); break;
    case 3: for (int64_t j = 0; j < n; ++j) v[j] = v[j] / (T(1) + (v[j] < T(0) ? -v[j] : v[j])); break;
    case 4: for (int64_t j = 0; j < n; ++j) v[j] = v[j] > T(0) ? v[j] : T(0); break;
    default:  // relu6(x + 3) / 6, in torch's order of operations (torch.nn.functional.hardsigmoid)
      for (int64_t j = 0; j < n; ++j) {
        const T u = v[j] + T(3);
        v[j] = (u < T(0) ? T(0) : (u > T(6) ? T(6) : u)) / T(6);
      }
      break;
  }
}

// d[j] *= activation'(a[j]), the derivative written with the activation's output y.
template <typename T>
inline void times_activation_grad(int64_t code, const T* __restrict__ y, T* __restrict__ d, int64_t n) {
  switch (code) {
    case 0: for (int64_t j = 0; j < n; ++j) d[j] *= y[j] * (T(1) - y[j]); break;
    case 1: for (int64_t j = 0; j < n; ++j) d[j] *= (y[j] > T(0) && y[j] < T(1)) ? T(0.2) : T(0); break;
    case 2: for (int64_t j = 0; j < n; ++j) d[j] *= T(1) - y[j] * y[j]; break;
    case 3:
      for (int64_t j = 0; j < n; ++j) {
        const T s = T(1) - (y[j] < T(0) ? -y[j] : y[j]);
        d[j] *= s * s;
      }
      break;
    case 4: for (int64_t j = 0; j < n; ++j) d[j] *= y[j] > T(0) ? T(1) : T(0); break;
    default: for (int64_t j = 0; j < n; ++j) d[j] *= (y[j] > T(0) && y[j] < T(1)) ? T(1) / T(6) : T(0); break;
  }
}

// Clip v to [-bound, bound]; inside[j] = 1 where the gradient passes (torch's clamp passes at the bounds).
template <typename T>
inline void clip_pass(T* __restrict__ v, int64_t n, double bound, uint8_t* __restrict__ inside) {
  const T b = T(bound);
  for (int64_t j = 0; j < n; ++j) {
    const T x = v[j];
    inside[j] = (x >= -b) & (x <= b);
    v[j] = x < -b ? -b : (x > b ? b : x);
  }
}

template <typename T>
inline void mask_pass(T* __restrict__ d, const uint8_t* __restrict__ inside, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = inside[j] ? d[j] : T(0);
}

// -- layer norm -----------------------------------------------------------------------------

// The sum over j in [0, n) of term(j), in double, as 8 interleaved partial sums: one running sum
// waits on every add's latency (the row statistics took 4 us per row of 1,280 at H = 256); 8
// independent ones fill the vector lanes.
template <typename Term>
inline double row_sum(int64_t n, Term term) {
  double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) part[k] += term(j + k);
  }
  for (int k = 0; j < n; ++j, ++k) part[k] += term(j);
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// out = v_hat * gain (+ shift) over v[0:n]; saves v_hat and 1/std. out may alias v.
template <typename T>
inline void layer_norm_row(const T* v, int64_t n, const T* gain, const T* shift, T* v_hat, T* rstd_out, T* out) {
  const double mean = row_sum(n, [v](int64_t j) { return double(v[j]); }) / double(n);
  const double var = row_sum(n, [v, mean](int64_t j) {
    const double d = double(v[j]) - mean;
    return d * d;
  }) / double(n);
  const T rstd = T(1.0 / std::sqrt(var + kLayerNormEps));
  const T m = T(mean);
  *rstd_out = rstd;
  for (int64_t j = 0; j < n; ++j) v_hat[j] = (v[j] - m) * rstd;
  if (shift) {
    for (int64_t j = 0; j < n; ++j) out[j] = v_hat[j] * gain[j] + shift[j];
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = v_hat[j] * gain[j];
  }
}

// dv from dout; accumulates the gain (and shift) gradients. dv may alias dout.
// dv = rstd (e - mean(e) - v_hat mean(e v_hat)), e = dout * gain. e is stored first and the means
// are taken of the stored values: with e formed again inside the last line, the compiler fuses
// that product into the subtraction (an FMA), which subtracts a rounded product from an exact one;
// over one value (a one-element layer norm, whose output is its shift and whose gradient is exactly
// 0) that left the product's rounding error times rstd (about 316 there).
template <typename T>
inline void layer_norm_row_backward(const T* dout, int64_t n, const T* v_hat, T rstd, const T* gain, T* dgain,
                                    T* dshift, T* dv) {
  for (int64_t j = 0; j < n; ++j) dgain[j] += dout[j] * v_hat[j];
  if (dshift) for (int64_t j = 0; j < n; ++j) dshift[j] += dout[j];
  T* e = dv;  // (dout is read for the last time above, and e_j only where dout_j was)
  for (int64_t j = 0; j < n; ++j) e[j] = dout[j] * gain[j];
  const double mean_e = row_sum(n, [e](int64_t j) { return double(e[j]); });
  const double mean_e_vh = row_sum(n, [e, v_hat](int64_t j) { return double(e[j]) * v_hat[j]; });
  const T a = T(mean_e / double(n)), b = T(mean_e_vh / double(n));
  for (int64_t j = 0; j < n; ++j) dv[j] = rstd * (e[j] - a - v_hat[j] * b);
}

// -- zoneout ----------------------------------------------------------------------------------

// fresh <- keep * previous + (1 - keep) * fresh, keep a mask row or a probability.
template <typename T>
inline void zoneout_pass(const T* __restrict__ previous, T* __restrict__ fresh, const T* keep_row, T keep_p, int64_t n) {
  if (keep_row) {
    for (int64_t j = 0; j < n; ++j) fresh[j] = keep_row[j] * previous[j] + (T(1) - keep_row[j]) * fresh[j];
  } else {
    for (int64_t j = 0; j < n; ++j) fresh[j] = keep_p * previous[j] + (T(1) - keep_p) * fresh[j];
  }
}

template <typename T> inline const T* zh_row(const Plan& p, int64_t row) {
  return p.zoneout_mode == 1 && p.zh_mask ? static_cast<const T*>(p.zh_mask) + row * p.h_out : nullptr;
}
template <typename T> inline const T* zc_row(const Plan& p, int64_t row) {
  return p.zoneout_mode == 1 && p.zc_mask ? static_cast<const T*>(p.zc_mask) + row * p.hidden : nullptr;
}
inline bool has_zoneout_h(const Plan& p) {
  return (p.zoneout_mode == 1 && p.zh_mask) || (p.zoneout_mode == 2 && p.z_h > 0);
}
inline bool has_zoneout_c(const Plan& p) {
  return (p.zoneout_mode == 1 && p.zc_mask) || (p.zoneout_mode == 2 && p.z_c > 0);
}

// The batch rows this plan owns at step t: [row_begin, end), end clipped to the active prefix n_t.
// Several plans with disjoint row ranges run concurrently, one per thread (rows are independent).
// (Or of [row_begin, end) with end <= row_end: a column team member's share, see forward_loop.)
inline int64_t rows_end(const Plan& p, int64_t t, int64_t end) {
  const int64_t n = p.n_rows[t];
  return n < end ? n : end;
}
inline int64_t rows_end(const Plan& p, int64_t t) { return rows_end(p, t, p.row_end); }

// Row of the buffers kept for backward: the packed row when saving, else the batch row (inference
// reuses one step's worth of rows, so no memory grows with T).
inline int64_t saved_row(const Plan& p, int64_t row, int64_t r) { return p.save ? row : r; }

// Whether the saved gate activations are in half precision (a half-precision call that saves).
inline bool half_gates(const Plan& p) { return p.half && p.save; }

// -- forward phases -------------------------------------------------------------------------

// The forward's elementwise phases run on batch rows [lo, hi) of the plan's (a column team's
// members each take a fixed share: see forward_loop), clipped to the rows active at step t.

template <typename T>
void fwd_prepare(const Plan& p, int64_t t, int64_t lo, int64_t hi) {  // h_in = h (* recurrent dropout mask)
  const int64_t rows = rows_end(p, t, hi) - lo, count = rows * p.h_out;
  if (count <= 0) return;
  const T* h = static_cast<const T*>(p.h_state) + lo * p.h_out;
  T* h_in = static_cast<T*>(p.h_in) + (saved_row(p, p.offsets[t], 0) + lo) * p.h_out;
  if (p.rec_mask) {
    const T* rm = static_cast<const T*>(p.rec_mask) + lo * p.h_out;
    for (int64_t k = 0; k < count; ++k) h_in[k] = h[k] * rm[k];
  } else {
    std::memcpy(h_in, h, sizeof(T) * count);
  }
  if (p.operand_bf16) {  // the bfloat16 product's operand; h_in keeps the rounded values (dW_hh reads them)
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* narrow = static_cast<uint16_t*>(p.operand_bf16) + (lo + r) * p.ld_operand_bf16;
      T* wide = h_in + r * p.h_out;
      narrow_row<T>(1, wide, narrow, p.h_out);
      widen_row<T>(1, narrow, wide, p.h_out);
    }
  }
}

// h~ is final: zoneout with the previous h, then the output and the state.
template <typename T>
inline void finish_row(const Plan& p, int64_t r, int64_t row, T* h_tilde) {
  T* h_state = static_cast<T*>(p.h_state) + r * p.h_out;
  if (has_zoneout_h(p)) zoneout_pass<T>(h_state, h_tilde, zh_row<T>(p, row), T(p.z_h), p.h_out);
  if (p.half) {
    narrow_row<T>(p.half, h_tilde, static_cast<uint16_t*>(p.y) + row * p.ld_y, p.h_out);
  } else {
    std::memcpy(static_cast<T*>(p.y) + row * p.ld_y, h_tilde, sizeof(T) * p.h_out);
  }
  std::memcpy(h_state, h_tilde, sizeof(T) * p.h_out);
}

// a = xg + hw (+ b) over a row's 4H pre-activations, xg read in its own dtype (p.xg_half; a
// half-precision one widened here, with no float copy of the input gates). a may alias hw.
template <typename T, typename Input>
inline void sum_row(Input xg, const T* hw, const T* b, T* a, int64_t n) {
  if (b) {
    for (int64_t j = 0; j < n; ++j) a[j] = xg(j) + hw[j] + b[j];
  } else {
    for (int64_t j = 0; j < n; ++j) a[j] = xg(j) + hw[j];
  }
}

template <typename T>
inline void sum_gate_inputs(const Plan& p, int64_t row, const T* hw, T* a) {
  const T* b = static_cast<const T*>(p.bias);
  const int64_t G = 4 * p.hidden;
  if (p.xg_half) {
    const uint16_t* x = static_cast<const uint16_t*>(p.xg) + row * p.ld_xg;
    if (p.xg_half == 1) {
      sum_row<T>([x](int64_t j) { return T(bfloat16_to_float(x[j])); }, hw, b, a, G);
    } else {
      sum_row<T>([x](int64_t j) { return T(float16_to_float(x[j])); }, hw, b, a, G);
    }
  } else {
    const T* x = static_cast<const T*>(p.xg) + row * p.ld_xg;
    sum_row<T>([x](int64_t j) { return x[j]; }, hw, b, a, G);
  }
}

template <typename T>
void fwd_cell(const Plan& p, int64_t t, int64_t lo, int64_t hi) {
  const int64_t n = rows_end(p, t, hi), row0 = p.offsets[t], H = p.hidden, G = 4 * H;
  const T* peep = static_cast<const T*>(p.peep);
  const bool zc = has_zoneout_c(p), half = half_gates(p);
  for (int64_t r = lo; r < n; ++r) {
    const int64_t row = row0 + r, sr = saved_row(p, row, r);
    T* hw = static_cast<T*>(p.hw) + r * p.ld_hw;  // the step's recurrent product, then this row's scratch
    // pre-activations, then activations, i f g o: in the saved row, or where that row is in half
    // precision in the product's row (its entries are each read once, here), stored when final
    T* a = half ? hw : static_cast<T*>(p.gates) + sr * G;
    T* c_state = static_cast<T*>(p.c_state) + r * H;
    T* c = static_cast<T*>(p.c_fresh) + sr * H;
    uint8_t* clip_mask = p.clip_mask ? static_cast<uint8_t*>(p.clip_mask) + sr * G : nullptr;

    if (p.layer_norm) {
      layer_norm_row<T>(hw, G, static_cast<const T*>(p.ln_hh), nullptr, static_cast<T*>(p.hw_hat) + sr * G,
                        static_cast<T*>(p.hw_rstd) + sr, hw);
    }
    sum_gate_inputs<T>(p, row, hw, a);
    if (p.peephole) {
      for (int64_t j = 0; j < H; ++j) a[j] += peep[j] * c_state[j];
      for (int64_t j = 0; j < H; ++j) a[H + j] += peep[H + j] * c_state[j];
    }
    if (clip_mask) clip_pass<T>(a, 3 * H, p.clip, clip_mask);
    activate<T>(p.act_gate, a, H);
    if (p.coupled) {
      for (int64_t j = 0; j < H; ++j) a[H + j] = T(1) - a[j];
    } else {
      activate<T>(p.act_gate, a + H, H);
    }
    activate<T>(p.act_in, a + 2 * H, H);
    for (int64_t j = 0; j < H; ++j) c[j] = a[H + j] * c_state[j] + a[j] * a[2 * H + j];
    if (p.cclip_mask) clip_pass<T>(c, H, p.cell_clip, static_cast<uint8_t*>(p.cclip_mask) + sr * H);

    // output gate, after the fresh cell (its peephole reads c_t)
    T* o = a + 3 * H;
    if (p.peephole) for (int64_t j = 0; j < H; ++j) o[j] += peep[2 * H + j] * c[j];
    if (clip_mask) clip_pass<T>(o, H, p.clip, clip_mask + 3 * H);
    activate<T>(p.act_gate, o, H);
    if (half) narrow_row<T>(p.half, a, static_cast<uint16_t*>(p.gates) + sr * G, G);

    // m = o * act(LN(c)), built in hw's first H entries (past i, f, g: o stays in a + 3H)
    T* shown = hw;
    if (p.layer_norm) {
      layer_norm_row<T>(c, H, static_cast<const T*>(p.ln_c_w), static_cast<const T*>(p.ln_c_b),
                        static_cast<T*>(p.c_hat) + sr * H, static_cast<T*>(p.c_rstd) + sr, shown);
    } else {
      std::memcpy(shown, c, sizeof(T) * H);
    }
    activate<T>(p.act_out, shown, H);
    T* m = p.proj ? static_cast<T*>(p.m) + sr * H : hw + H;
    for (int64_t j = 0; j < H; ++j) m[j] = o[j] * shown[j];

    // the carried cell: zoneout with the previous one
    if (zc) {
      T* carried = hw + 2 * H;
      std::memcpy(carried, c, sizeof(T) * H);
      zoneout_pass<T>(c_state, carried, zc_row<T>(p, row), T(p.z_c), H);
      std::memcpy(c_state, carried, sizeof(T) * H);
      if (p.save) std::memcpy(static_cast<T*>(p.c_carried) + row * H, carried, sizeof(T) * H);
    } else {
      std::memcpy(c_state, c, sizeof(T) * H);
    }
    if (!p.proj) finish_row<T>(p, r, row, m);
  }
}

template <typename T>
void fwd_finish(const Plan& p, int64_t t, int64_t lo, int64_t hi) {  // projection only: proj clip, zoneout, outputs
  const int64_t n = rows_end(p, t, hi), row0 = p.offsets[t], P = p.proj;
  for (int64_t r = lo; r < n; ++r) {
    const int64_t row = row0 + r;
    T* ht = static_cast<T*>(p.htilde) + r * P;
    if (p.pclip_mask) clip_pass<T>(ht, P, p.proj_clip, static_cast<uint8_t*>(p.pclip_mask) + saved_row(p, row, r) * P);
    finish_row<T>(p, r, row, ht);
  }
}

// -- backward phases ------------------------------------------------------------------------

template <typename T>
void bwd_begin(const Plan& p, int64_t t) {  // dh through zoneout (and the projection's clip)
  const int64_t n = rows_end(p, t), row0 = p.offsets[t], ho = p.h_out;
  const bool zh = has_zoneout_h(p);
  for (int64_t r = p.row_begin; r < n; ++r) {
    const int64_t row = row0 + r;
    T* dh_state = static_cast<T*>(p.dh_state) + r * ho;
    T* dh_tilde = p.proj ? static_cast<T*>(p.dproj) + row * ho : static_cast<T*>(p.dm) + r * ho;
    if (p.half) {
      widen_row<T>(p.half, static_cast<const uint16_t*>(p.dy) + row * p.ld_dy, dh_tilde, ho);
      for (int64_t j = 0; j < ho; ++j) dh_tilde[j] += dh_state[j];
    } else {
      const T* dy = static_cast<const T*>(p.dy) + row * p.ld_dy;
      for (int64_t j = 0; j < ho; ++j) dh_tilde[j] = dh_state[j] + dy[j];
    }
    if (zh) {
      // dh_state keeps the part that flows straight to h_{t-1}; bwd_end adds the GEMM's part
      const T* keep = zh_row<T>(p, row);
      if (keep) {
        for (int64_t j = 0; j < ho; ++j) dh_state[j] = keep[j] * dh_tilde[j];
        for (int64_t j = 0; j < ho; ++j) dh_tilde[j] *= T(1) - keep[j];
      } else {
        const T k = T(p.z_h);
        for (int64_t j = 0; j < ho; ++j) dh_state[j] = k * dh_tilde[j];
        for (int64_t j = 0; j < ho; ++j) dh_tilde[j] *= T(1) - k;
      }
    } else {
      std::memset(dh_state, 0, sizeof(T) * ho);
    }
    if (p.pclip_mask) mask_pass<T>(dh_tilde, static_cast<const uint8_t*>(p.pclip_mask) + row * ho, ho);
  }
}

template <typename T>
inline const T* cell_prev(const Plan& p, int64_t t, int64_t r) {
  // The cell that entered step t for batch row r (see the layout notes in fastlstm/packing.py).
  const int64_t H = p.hidden;
  const T* carried = static_cast<const T*>(has_zoneout_c(p) ? p.c_carried : p.c_fresh);
  if (!p.reverse) {
    if (t == 0) return static_cast<const T*>(p.c0) + r * H;
    return carried + (p.offsets[t - 1] + r) * H;
  }
  if (t == p.steps - 1 || r >= p.n_rows[t + 1]) return static_cast<const T*>(p.c0) + r * H;
  return carried + (p.offsets[t + 1] + r) * H;
}

template <typename T>
void bwd_cell(const Plan& p, int64_t t) {
  const int64_t n = rows_end(p, t), row0 = p.offsets[t], H = p.hidden, G = 4 * H;
  const T* peep = static_cast<const T*>(p.peep);
  T* dpeep = static_cast<T*>(p.dpeep);
  const bool zc = has_zoneout_c(p);
  T* work = static_cast<T*>(p.work);  // [2H], this plan's own: act(shown) | d(shown) (| the row's gates)
  for (int64_t r = p.row_begin; r < n; ++r) {
    const int64_t row = row0 + r;
    const T* i = static_cast<const T*>(p.gates) + row * G;
    if (half_gates(p)) {
      widen_row<T>(p.half, static_cast<const uint16_t*>(p.gates) + row * G, work + 2 * H, G);
      i = work + 2 * H;
    }
    const T* f = i + H;
    const T* g = i + 2 * H;
    const T* o = i + 3 * H;
    const T* c = static_cast<const T*>(p.c_fresh) + row * H;
    const T* c_prev = cell_prev<T>(p, t, r);
    const uint8_t* clip_mask = p.clip_mask ? static_cast<const uint8_t*>(p.clip_mask) + row * G : nullptr;
    T* dc_state = static_cast<T*>(p.dc_state) + r * H;  // in: d c_t (carried); out: d c_{t-1}
    const T* dm = static_cast<const T*>(p.dm) + r * H;
    T* da = static_cast<T*>(p.dgates) + row * p.ld_dgates;  // out: d pre-activations i f g o
    T* da_i = da;
    T* da_f = da + H;
    T* da_g = da + 2 * H;
    T* da_o = da + 3 * H;
    T* act = work;
    T* d_shown = work + H;

    // m = o * act(shown): recompute act(shown), then do and d(shown)
    if (p.layer_norm) {
      const T* c_hat = static_cast<const T*>(p.c_hat) + row * H;
      const T* w = static_cast<const T*>(p.ln_c_w);
      const T* b = static_cast<const T*>(p.ln_c_b);
      for (int64_t j = 0; j < H; ++j) act[j] = c_hat[j] * w[j] + b[j];
    } else {
      std::memcpy(act, c, sizeof(T) * H);
    }
    activate<T>(p.act_out, act, H);
    for (int64_t j = 0; j < H; ++j) da_o[j] = dm[j] * act[j];  // do, the gradient of o
    for (int64_t j = 0; j < H; ++j) d_shown[j] = dm[j] * o[j];
    times_activation_grad<T>(p.act_out, act, d_shown, H);

    // d c~ (held in the i slot): from the output path, the carried cell and the o peephole
    T* dc = da_i;
    if (p.layer_norm) {
      layer_norm_row_backward<T>(d_shown, H, static_cast<const T*>(p.c_hat) + row * H,
                                 static_cast<const T*>(p.c_rstd)[row], static_cast<const T*>(p.ln_c_w),
                                 static_cast<T*>(p.dln_c_w), static_cast<T*>(p.dln_c_b), dc);
    } else {
      std::memcpy(dc, d_shown, sizeof(T) * H);
    }
    times_activation_grad<T>(p.act_gate, o, da_o, H);
    if (clip_mask) mask_pass<T>(da_o, clip_mask + 3 * H, H);
    if (p.peephole) {
      for (int64_t j = 0; j < H; ++j) dc[j] += da_o[j] * peep[2 * H + j];
      for (int64_t j = 0; j < H; ++j) dpeep[2 * H + j] += da_o[j] * c[j];
    }
    const T* keep = zc ? zc_row<T>(p, row) : nullptr;
    const T keep_p = zc && !keep ? T(p.z_c) : T(0);
    if (keep) {
      for (int64_t j = 0; j < H; ++j) dc[j] += (T(1) - keep[j]) * dc_state[j];
    } else {
      for (int64_t j = 0; j < H; ++j) dc[j] += (T(1) - keep_p) * dc_state[j];
    }
    if (p.cclip_mask) mask_pass<T>(dc, static_cast<const uint8_t*>(p.cclip_mask) + row * H, H);

    // c~ = f c_{t-1} + i g
    if (keep) {
      for (int64_t j = 0; j < H; ++j) dc_state[j] = dc[j] * f[j] + keep[j] * dc_state[j];
    } else {
      for (int64_t j = 0; j < H; ++j) dc_state[j] = dc[j] * f[j] + keep_p * dc_state[j];
    }
    for (int64_t j = 0; j < H; ++j) da_g[j] = dc[j] * i[j];
    if (p.coupled) {
      for (int64_t j = 0; j < H; ++j) da_f[j] = T(0);
      for (int64_t j = 0; j < H; ++j) da_i[j] = dc[j] * (g[j] - c_prev[j]);  // f = 1 - i
    } else {
      for (int64_t j = 0; j < H; ++j) da_f[j] = dc[j] * c_prev[j];
      for (int64_t j = 0; j < H; ++j) da_i[j] = dc[j] * g[j];
      times_activation_grad<T>(p.act_gate, f, da_f, H);
    }
    times_activation_grad<T>(p.act_gate, i, da_i, H);
    times_activation_grad<T>(p.act_in, g, da_g, H);
    if (clip_mask) mask_pass<T>(da, clip_mask, 3 * H);
    if (p.peephole) {
      for (int64_t j = 0; j < H; ++j) dc_state[j] += da_i[j] * peep[j] + da_f[j] * peep[H + j];
      for (int64_t j = 0; j < H; ++j) dpeep[j] += da_i[j] * c_prev[j];
      for (int64_t j = 0; j < H; ++j) dpeep[H + j] += da_f[j] * c_prev[j];
    }
    if (p.layer_norm) {
      layer_norm_row_backward<T>(da, G, static_cast<const T*>(p.hw_hat) + row * G, static_cast<const T*>(p.hw_rstd)[row],
                                 static_cast<const T*>(p.ln_hh), static_cast<T*>(p.dln_hh), nullptr,
                                 static_cast<T*>(p.dhw) + row * p.ld_dhw);
    }
  }
}

template <typename T>
void bwd_end(const Plan& p, int64_t t) {  // dh_{t-1} += (dhw W_hh) * recurrent dropout mask
  const int64_t rb = p.row_begin, count = (rows_end(p, t) - rb) * p.h_out;
  T* dh_state = static_cast<T*>(p.dh_state) + rb * p.h_out;
  const T* dh_in = static_cast<const T*>(p.dh_in) + rb * p.h_out;
  if (p.rec_mask) {
    const T* rm = static_cast<const T*>(p.rec_mask) + rb * p.h_out;
    for (int64_t k = 0; k < count; ++k) dh_state[k] += dh_in[k] * rm[k];
  } else {
    for (int64_t k = 0; k < count; ++k) dh_state[k] += dh_in[k];
  }
}

// -- GEMM: C[M, N] = A[M, K] @ B, with B packed once per call into panels ---------------------
//
// The recurrent weights are reused by every step, so they are packed once per call into column
// panels of 64 bytes (packed[panel][k][NR], NR = 16 floats or 8 doubles, zero-padded past N; built
// by pack_panels below, which layer.py calls) that each step streams. A panel row is VP = two
// vectors under AVX2 and one under AVX-512 (kernels.cpp sets FASTLSTM_VECTOR_BYTES per instruction
// set), so the layout does not depend on the instruction set. Register blocks (gemm_packed): AVX2
// 4 rows x 1 panel, 8 accumulators (about 80% of an AVX2 core's FMA peak at B = 8, H = 256 on the
// development machine); AVX-512 8 rows x 2 panels, 16 accumulators and half the broadcasts per FMA
// of one panel.

#ifndef FASTLSTM_VECTOR_BYTES
#error "kernels.cpp defines FASTLSTM_VECTOR_BYTES (32 or 64) before each inclusion"
#endif

template <typename T> struct Lanes {
  typedef T V __attribute__((vector_size(FASTLSTM_VECTOR_BYTES)));
  static constexpr int n = FASTLSTM_VECTOR_BYTES / sizeof(T);
};

constexpr int64_t kPanelBytes = 64;
template <typename T> constexpr int64_t panel_width() { return kPanelBytes / sizeof(T); }           // NR
template <typename T> constexpr int panel_vectors() { return kPanelBytes / FASTLSTM_VECTOR_BYTES; }  // VP
// Vectors a block keeps per row of A (two FMA pipes, each 4 cycles deep, need 8 chains in flight):
// the rows of a register block are kChains / VP, and a lone row takes kChains / VP panels at once.
constexpr int kChains = 8;

// The first ncols (at most NR) of one panel row's accumulators into c. (A whole row is a copy of
// fixed size, which the compiler stores as vectors; a copy of ncols would call memmove per block.)
template <typename T>
inline void store_panel_row(const typename Lanes<T>::V* acc, T* c, int64_t ncols) {
  constexpr int64_t NR = panel_width<T>();
  if (ncols >= NR) {
    std::memcpy(c, acc, sizeof(T) * NR);
    return;
  }
  T out[NR];
  std::memcpy(out, acc, sizeof out);
  for (int64_t j = 0; j < ncols; ++j) c[j] = out[j];
}

// MR rows x NP panels: acc[m][q][v] += a[m][k] * panel_q[k][v]. ncols: the columns left from the
// first panel's first (the last panel may be partial; every panel of the block has one or more).
template <typename T, int MR, int NP>
inline void gemm_block(int64_t K, const T* a, int64_t lda, const T* panels, int64_t panel_stride, T* c, int64_t ldc,
                       int64_t ncols) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n, VP = panel_vectors<T>(), NR = panel_width<T>();
  V acc[MR][NP][VP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < VP; ++v) acc[m][q][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NP][VP];
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < VP; ++v) std::memcpy(&b[q][v], panels + q * panel_stride + k * NR + v * L, sizeof(V));
    for (int m = 0; m < MR; ++m) {
      const T av = a[m * lda + k];  // scalar operand: broadcast by the vector extension
      for (int q = 0; q < NP; ++q)
        for (int v = 0; v < VP; ++v) acc[m][q][v] += b[q][v] * av;
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int q = 0; q < NP; ++q) {
      const int64_t left = ncols - q * NR;
      store_panel_row<T>(acc[m][q], c + m * ldc + q * NR, left < NR ? left : NR);
    }
  }
}

// One row against P panels at once: with a single panel's accumulators every k would wait for
// the previous FMA's result (a B = 1 step ran at a quarter of the FMA units' rate); P panels give
// P * VP independent chains. Each output is still summed over k in order, as gemm_block sums it, so
// a row's result does not depend on where it sits in the batch.
template <typename T, int P>
inline void gemm_row(int64_t K, const T* a, const T* panels, int64_t panel_stride, T* c, int64_t ncols) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n, VP = panel_vectors<T>(), NR = panel_width<T>();
  V acc[P][VP];
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < VP; ++v) acc[q][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const T av = a[k];
    for (int q = 0; q < P; ++q) {
      for (int v = 0; v < VP; ++v) {
        V b;
        std::memcpy(&b, panels + q * panel_stride + k * NR + v * L, sizeof(V));
        acc[q][v] += b * av;
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    const int64_t left = ncols - q * NR;
    store_panel_row<T>(acc[q], c + q * NR, left < NR ? left : NR);
  }
}

// Rows [m, blocked) of A in blocks of MR rows, then [blocked, half_blocked) as one block of MR / 2
// (if not empty), against NP panels from `panels`; ncols as for gemm_block.
template <typename T, int MR, int NP>
inline void gemm_blocks(int64_t K, const T* a, int64_t lda, int64_t m, int64_t blocked, int64_t half_blocked,
                        const T* panels, int64_t panel_stride, T* c, int64_t ldc, int64_t ncols) {
  for (; m < blocked; m += MR)
    gemm_block<T, MR, NP>(K, a + m * lda, lda, panels, panel_stride, c + m * ldc, ldc, ncols);
  if (m < half_blocked) gemm_block<T, MR / 2, NP>(K, a + m * lda, lda, panels, panel_stride, c + m * ldc, ldc, ncols);
}

// C[M, N] = A[M, K] @ B. Rows are taken in chunks that stay in cache while the panels stream past.
template <typename T>
void gemm_packed(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* packed, T* c, int64_t ldc) {
  constexpr int64_t NR = panel_width<T>();
  constexpr int VP = panel_vectors<T>(), MR = kChains / VP, NP = VP == 1 ? 2 : 1;
  const int64_t panels = (N + NR - 1) / NR, stride = K * NR;
  const int64_t chunk = 64;
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t m1 = m0 + chunk < M ? m0 + chunk : M;
    const int64_t blocked = m0 + (m1 - m0) / MR * MR;  // then a half block where MR / 2 >= 4 rows are left
    const int64_t half_blocked = blocked + (MR > 4 && m1 - blocked >= MR / 2 ? MR / 2 : 0);
    for (int64_t q = 0; q < panels; q += NP) {  // the panels stay in L1 while every row block uses them
      const T* panel = packed + q * stride;
      T* cq = c + q * NR;
      if (q + NP <= panels) {
        gemm_blocks<T, MR, NP>(K, a, lda, m0, blocked, half_blocked, panel, stride, cq, ldc, N - q * NR);
      } else {  // one panel left over (NP = 2)
        gemm_blocks<T, MR, 1>(K, a, lda, m0, blocked, half_blocked, panel, stride, cq, ldc, N - q * NR);
      }
    }
    for (int64_t m = half_blocked; m < m1; ++m) {  // the rows past the last block
      constexpr int P = kChains / VP;
      int64_t q = 0;
      for (; q + P <= panels; q += P)
        gemm_row<T, P>(K, a + m * lda, packed + q * stride, stride, c + m * ldc + q * NR, N - q * NR);
      for (; q < panels; ++q)
        gemm_row<T, 1>(K, a + m * lda, packed + q * stride, stride, c + m * ldc + q * NR, N - q * NR);
    }
  }
}

// B [K, N] (element (k, n) at src[k * stride_k + n * stride_n]) into the panels gemm_packed streams:
// dst[panel][k][NR], zero past N. A weight's panels are built once per call, before the loop; in
// torch (pad, permute, copy) they took 30-430 us at H = 128-512, as much as a short call's steps.
// Each case reads B along its contiguous dimension: a column at a time where that is k (B = W^T of
// a row-major W, the forward's), a row of the panel at a time where it is n (the backward's).
template <typename T>
void pack_panels(int64_t K, int64_t N, const T* src, int64_t stride_k, int64_t stride_n, T* dst) {
  constexpr int64_t NR = panel_width<T>();
  const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) if (panels * K * NR > (1 << 15))
  for (int64_t q = 0; q < panels; ++q) {
    T* panel = dst + q * K * NR;
    const int64_t width = N - q * NR < NR ? N - q * NR : NR;
    if (width < NR) std::fill(panel, panel + K * NR, T(0));
    if (stride_k == 1) {
      for (int64_t c = 0; c < width; ++c) {
        const T* column = src + (q * NR + c) * stride_n;
        for (int64_t k = 0; k < K; ++k) panel[k * NR + c] = column[k];
      }
    } else if (stride_n == 1 && width == NR) {  // (a fixed size: the compiler copies with vector moves)
      for (int64_t k = 0; k < K; ++k) std::memcpy(panel + k * NR, src + k * stride_k + q * NR, sizeof(T) * NR);
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < width; ++c) panel[k * NR + c] = src[k * stride_k + (q * NR + c) * stride_n];
    }
  }
}

// A row-major B [K, N] of bfloat16 bits (row stride ld) into the bfloat16 pair panels of
// gemm_bf16_pairs (kernels.cpp): dst[panel][K2][16][2], rows 2j and 2j + 1 of a column side by side
// in one 32-bit word, zero past K (to even) and N. (Where B = W^T of a row-major W, a column's pairs
// are already adjacent in W's rows, and layer.py packs those words with pack_panels instead.)
inline void pack_bf16_pairs(int64_t K, int64_t N, const uint16_t* src, int64_t ld, uint32_t* dst) {
  const int64_t panels = (N + 15) / 16, K2 = (K + 1) / 2;
#pragma omp parallel for schedule(static) if (panels * K * 16 > (1 << 15))
  for (int64_t q = 0; q < panels; ++q) {
    uint32_t* panel = dst + q * K2 * 16;
    const int64_t width = N - q * 16 < 16 ? N - q * 16 : 16;
    if (width < 16) std::fill(panel, panel + K2 * 16, uint32_t(0));  // (an odd K's last pair is written below)
    for (int64_t j = 0; j < K2; ++j) {
      const uint16_t* low = src + 2 * j * ld + q * 16;
      const uint16_t* high = 2 * j + 1 < K ? low + ld : nullptr;
      uint32_t* out = panel + j * 16;
      if (high) {
        for (int64_t c = 0; c < width; ++c) out[c] = uint32_t(low[c]) | uint32_t(high[c]) << 16;
      } else {
        for (int64_t c = 0; c < width; ++c) out[c] = low[c];
      }
    }
  }
}

// The same products straight from the weights' natural row-major layout, for calls too short to
// amortise packing (a single step, or a batch of 1-3 rows, where the GEMM is a few dot products).

// Their dot products use 32-byte vectors in every build: each output ends in a sum across the lanes,
// which 64-byte vectors would double (a B = 1, H = 128 step took 18% longer with them on a Zen 4).
template <typename T> struct DotLanes {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int n = 32 / sizeof(T);
};

template <typename T>
inline T lane_sum(typename DotLanes<T>::V v) {
  T lanes[DotLanes<T>::n];
  std::memcpy(lanes, &v, sizeof v);
  T s = T(0);
  for (int j = 0; j < DotLanes<T>::n; ++j) s += lanes[j];
  return s;
}

// C[M, N] = A[M, K] @ W^T, W [N, K] row-major: dot products vectorised over k.
template <typename T>
void gemm_nt_natural(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* w, T* c, int64_t ldc) {
  using V = typename DotLanes<T>::V;
  constexpr int64_t L = DotLanes<T>::n;
  const int64_t k_vec = K / L * L;
  for (int64_t m = 0; m < M; ++m) {
    const T* am = a + m * lda;
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {  // four outputs at once, for independent accumulators
      V acc[4] = {V{}, V{}, V{}, V{}};
      for (int64_t k = 0; k < k_vec; k += L) {
        V av;
        std::memcpy(&av, am + k, sizeof(V));
        for (int j = 0; j < 4; ++j) {
          V wv;
          std::memcpy(&wv, w + (n + j) * K + k, sizeof(V));
          acc[j] += av * wv;
        }
      }
      for (int j = 0; j < 4; ++j) {
        T sum = lane_sum<T>(acc[j]);
        for (int64_t k = k_vec; k < K; ++k) sum += am[k] * w[(n + j) * K + k];
        c[m * ldc + n + j] = sum;
      }
    }
    for (; n < N; ++n) {
      T sum = T(0);
      for (int64_t k = 0; k < K; ++k) sum += am[k] * w[n * K + k];
      c[m * ldc + n] = sum;
    }
  }
}

// C[M, N] = A[M, K] @ W, W [K, N] row-major (row stride ldw): row updates vectorised over n, four
// rows of W per pass over the output row (one row per pass loaded and stored the output row once
// per row of W: at B = 1, H = 1024 that traffic, not W's, set the backward step's time).
template <typename T>
void gemm_nn_natural(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* w, int64_t ldw, T* c,
                     int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict__ cm = c + m * ldc;
    const T* am = a + m * lda;
    for (int64_t n = 0; n < N; ++n) cm[n] = T(0);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const T a0 = am[k], a1 = am[k + 1], a2 = am[k + 2], a3 = am[k + 3];
      const T* __restrict__ w0 = w + k * ldw;
      const T* __restrict__ w1 = w0 + ldw;
      const T* __restrict__ w2 = w1 + ldw;
      const T* __restrict__ w3 = w2 + ldw;
      for (int64_t n = 0; n < N; ++n) cm[n] += (a0 * w0[n] + a1 * w1[n]) + (a2 * w2[n] + a3 * w3[n]);
    }
    for (; k < K; ++k) {
      const T ak = am[k];
      const T* __restrict__ wk = w + k * ldw;
      for (int64_t n = 0; n < N; ++n) cm[n] += ak * wk[n];
    }
  }
}

// -- a step's products, split by output columns -------------------------------------------------
//
// A plan runs on one thread, or, with `column_threads` > 1, on a team that shares all its rows:
// every member computes one slice of each GEMM's output columns (so each streams only its share
// of the weights, which is what a batch too small to split by rows needs), and member 0 runs the
// elementwise phases in between. A barrier separates the two.

// C[:, cols] = A @ op(W)[:, cols], from W's packed panels when there are any, else from W itself:
// op(W) = W^T for W [N, K] (TRANSPOSED, the forward products), op(W) = W for W [K, N] (backward).
template <typename T, bool TRANSPOSED>
inline void step_product(const Columns& cols, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda,
                         const void* packed, const void* w, T* c, int64_t ldc) {
  int64_t n0, n1;
  cols.range(N, &n0, &n1);
  if (n1 <= n0) return;
  if (packed) {
    constexpr int64_t NR = panel_width<T>();
    gemm_packed<T>(M, n1 - n0, K, a, lda, static_cast<const T*>(packed) + n0 / NR * K * NR, c + n0, ldc);
  } else if (TRANSPOSED) {
    gemm_nt_natural<T>(M, n1 - n0, K, a, lda, static_cast<const T*>(w) + n0 * K, c + n0, ldc);
  } else {
    gemm_nn_natural<T>(M, n1 - n0, K, a, lda, static_cast<const T*>(w) + n0, N, c + n0, ldc);
  }
}

// A recurrent product from bfloat16 operands (kernels.cpp, gemm_bf16_pairs): the plan's rows of
// operand_bf16 (K wide, zero-padded to even) against `panels` (bfloat16 pair panels of the N
// columns), this member's columns, into c (float32, ldc). Float plans only.
template <typename T>
inline void step_product_bf16(const Columns& cols, int64_t M, int64_t N, int64_t K, const Plan& p,
                              const void* panels, T* c, int64_t ldc) {
  if constexpr (std::is_same<T, float>::value) {
    int64_t n0, n1;
    cols.range(N, &n0, &n1);
    if (n1 <= n0) return;
    const int64_t pairs = (K + 1) / 2;
    gemm_bf16_pairs(M, n1 - n0, pairs, static_cast<const uint16_t*>(p.operand_bf16) + p.row_begin * p.ld_operand_bf16,
                    p.ld_operand_bf16, static_cast<const uint16_t*>(panels) + n0 / kBf16PanelColumns * pairs * 32,
                    c + n0, ldc);
  }
}

// -- drivers: the whole loop of one plan (for one member of its column team) --------------------

template <typename T>
void forward_loop(const Plan& p, const Columns& cols) {
  const int64_t H = p.hidden, ho = p.h_out, rb = p.row_begin;
  // This member's rows for the elementwise phases: a fixed share of the plan's, so that the state
  // rows a member writes at step t are the ones it reads at t + 1 (no barrier between the two).
  const int64_t share = (p.row_end - rb + cols.count - 1) / cols.count;
  const int64_t lo = rb + cols.index * share < p.row_end ? rb + cols.index * share : p.row_end;
  const int64_t hi = lo + share < p.row_end ? lo + share : p.row_end;
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t count = rows_end(p, t) - rb, base = saved_row(p, p.offsets[t], 0) + rb;
    if (count <= 0) continue;
    fwd_prepare<T>(p, t, lo, hi);
    cols.sync();
    if (p.w_hh_bf16) {
      step_product_bf16<T>(cols, count, 4 * H, ho, p, p.w_hh_bf16, static_cast<T*>(p.hw) + rb * p.ld_hw, p.ld_hw);
    } else {
      step_product<T, true>(cols, count, 4 * H, ho, static_cast<const T*>(p.h_in) + base * ho, ho, p.w_hh_packed,
                            p.w_hh, static_cast<T*>(p.hw) + rb * p.ld_hw, p.ld_hw);
    }
    cols.sync();
    fwd_cell<T>(p, t, lo, hi);
    if (p.proj) {
      cols.sync();
      step_product<T, true>(cols, count, p.proj, H, static_cast<const T*>(p.m) + base * H, H, p.w_hr_packed, p.w_hr,
                 static_cast<T*>(p.htilde) + rb * p.proj, p.proj);
      cols.sync();
      fwd_finish<T>(p, t, lo, hi);
    }
  }
}

template <typename T>
void backward_loop(const Plan& p, const Columns& cols) {
  const int64_t H = p.hidden, ho = p.h_out, rb = p.row_begin;
  for (int64_t s = p.steps - 1; s >= 0; --s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t count = rows_end(p, t) - rb, row0 = p.offsets[t] + rb;
    if (count <= 0) continue;
    if (cols.lead()) bwd_begin<T>(p, t);
    if (p.proj) {
      cols.sync();
      step_product<T, false>(cols, count, H, p.proj, static_cast<const T*>(p.dproj) + row0 * ho, ho, p.w_hr_packed_t, p.w_hr,
                 static_cast<T*>(p.dm) + rb * H, H);
      cols.sync();
    }
    if (cols.lead()) {
      bwd_cell<T>(p, t);
      if (p.w_hh_bf16_t) {  // the product's operand rounded to bfloat16 (dgates themselves stay float32)
        for (int64_t r = 0; r < count; ++r)
          narrow_row<T>(1, static_cast<const T*>(p.dhw) + (row0 + r) * p.ld_dhw,
                        static_cast<uint16_t*>(p.operand_bf16) + (rb + r) * p.ld_operand_bf16, 4 * H);
      }
    }
    cols.sync();
    if (p.w_hh_bf16_t) {
      step_product_bf16<T>(cols, count, ho, 4 * H, p, p.w_hh_bf16_t, static_cast<T*>(p.dh_in) + rb * ho, ho);
    } else {
      step_product<T, false>(cols, count, ho, 4 * H, static_cast<const T*>(p.dhw) + row0 * p.ld_dhw, p.ld_dhw,
                             p.w_hh_packed_t, p.w_hh, static_cast<T*>(p.dh_in) + rb * ho, ho);
    }
    cols.sync();
    if (cols.lead()) bwd_end<T>(p, t);
  }
}

template <typename T>
void forward_all(const Plan& p) {
  forward_loop<T>(p, Columns{});
}

// The backward of one step (LSTMCell and streaming calls with autograd), on the plan its forward
// saved into: BPTT's one step, then its weight-gradient products, for the B rows of a step:
// dx = da W_ih [B, I] (if dx), dW_ih = da^T x [4H, I], dW_hh = da^T h_in [4H, H], db = sum_r da
// (if db), da [B, 4H] the pre-activations' gradient (the plan's dgates). For a step's few rows
// these outer-product updates cost less than a GEMM library's dispatch.
template <typename T>
void step_backward(const Plan& p, const T* x, int64_t input_size, const T* w_ih, T* dx, T* dw_ih, T* dw_hh,
                   T* db) {
  backward_loop<T>(p, Columns{});
  const int64_t B = p.batch, G = 4 * p.hidden, I = input_size, H = p.h_out;
  const T* da = static_cast<const T*>(p.dgates);
  const T* h_in = static_cast<const T*>(p.h_in);
  if (dx) gemm_nn_natural<T>(B, I, G, da, p.ld_dgates, w_ih, I, dx, I);
  for (int64_t j = 0; j < G; ++j) {
    T* __restrict__ wi = dw_ih + j * I;
    T* __restrict__ wh = dw_hh + j * H;
    const T a0 = da[j];
    for (int64_t k = 0; k < I; ++k) wi[k] = a0 * x[k];
    for (int64_t k = 0; k < H; ++k) wh[k] = a0 * h_in[k];
    for (int64_t r = 1; r < B; ++r) {
      const T a = da[r * p.ld_dgates + j];
      const T* __restrict__ xr = x + r * I;
      const T* __restrict__ hr = h_in + r * H;
      for (int64_t k = 0; k < I; ++k) wi[k] += a * xr[k];
      for (int64_t k = 0; k < H; ++k) wh[k] += a * hr[k];
    }
  }
  if (db) {
    for (int64_t j = 0; j < G; ++j) db[j] = da[j];
    for (int64_t r = 1; r < B; ++r)
      for (int64_t j = 0; j < G; ++j) db[j] += da[r * p.ld_dgates + j];
  }
}

// One step of one direction with nothing saved (LSTMCell and streaming calls): xg = x W_ih^T +
// b_ih + b_hh into the plan's xg buffer, the states from h0 and c0, then the step. Reading every
// weight in its natural layout, it spends nothing on packing, and nothing in Python between.
template <typename T>
void single_step(const Plan& p, const T* x, int64_t input_size, const T* w_ih, const T* b_ih, const T* b_hh,
                 const T* h0, const T* c0) {
  const int64_t B = p.batch, G = 4 * p.hidden;
  T* xg = static_cast<T*>(const_cast<void*>(p.xg));
  gemm_nt_natural<T>(B, G, input_size, x, input_size, w_ih, xg, p.ld_xg);
  if (b_ih) {
    for (int64_t r = 0; r < B; ++r) {
      T* row = xg + r * p.ld_xg;
      for (int64_t j = 0; j < G; ++j) row[j] += b_ih[j] + b_hh[j];
    }
  }
  std::memcpy(p.h_state, h0, sizeof(T) * B * p.h_out);
  std::memcpy(p.c_state, c0, sizeof(T) * B * p.hidden);
  forward_all<T>(p);
}

// A chunk of a stream through every layer (LSTM.step without autograd), one C++ call: x [T, B, I]
// time-major; the states h0 [L, B, Hout], c0 [L, B, H] in, h_n, c_n out; y [T, B, Hout] the last
// layer's outputs. Row l of `table` describes layer l: its step plan (scratch, activations, b_ih +
// b_hh as the plan's bias, and a [B, Hout] output buffer that the next layer reads), W_ih^T in column
// panels, and its input size. Each step's input product runs over the panels (a dot product per gate
// would spend more on horizontal sums than on the products at B = 1), then the plan's step. With
// `lengths` ([B], or null), a row at or past its length keeps its state bit for bit (it is computed
// and then put back) and outputs zeros. This call runs batch rows [row_begin, row_end) only: rows are
// independent through every layer and step, so threads that take disjoint ranges never meet (every
// buffer the plans point at is indexed by batch row).
template <typename T>
void stream_forward(const int64_t* table, int64_t layers, int64_t steps, const T* x, T* y, const T* h0, const T* c0,
                    T* h_n, T* c_n, const int64_t* lengths, int64_t row_begin, int64_t row_end) {
  const int64_t B = reinterpret_cast<const Plan*>(table[0])->batch, rows = row_end - row_begin;
  int64_t widest = 0;
  for (int64_t l = 0, h_at = 0, c_at = 0; l < layers; ++l) {  // this range's rows of every layer's states
    const Plan& p = *reinterpret_cast<const Plan*>(table[3 * l]);
    std::memcpy(h_n + h_at + row_begin * p.h_out, h0 + h_at + row_begin * p.h_out, sizeof(T) * rows * p.h_out);
    std::memcpy(c_n + c_at + row_begin * p.hidden, c0 + c_at + row_begin * p.hidden, sizeof(T) * rows * p.hidden);
    h_at += B * p.h_out;
    c_at += B * p.hidden;
    widest = widest > p.h_out + p.hidden ? widest : p.h_out + p.hidden;
  }
  std::vector<T> kept(lengths ? rows * widest : 0);  // the states of this range's rows past their length
  for (int64_t t = 0; t < steps; ++t) {
    const T* in = x + t * B * table[2];
    T* h = h_n;
    T* c = c_n;
    for (int64_t l = 0; l < layers; ++l) {
      Plan q = *reinterpret_cast<const Plan*>(table[3 * l]);
      const int64_t I = table[3 * l + 2], ho = q.h_out, H = q.hidden;
      q.h_state = h;
      q.c_state = c;
      q.row_begin = row_begin;
      q.row_end = row_end;
      if (l == layers - 1) q.y = y + t * B * ho;
      if (lengths) {
        for (int64_t r = row_begin; r < row_end; ++r) {
          if (t < lengths[r]) continue;
          std::memcpy(kept.data() + (r - row_begin) * widest, h + r * ho, sizeof(T) * ho);
          std::memcpy(kept.data() + (r - row_begin) * widest + ho, c + r * H, sizeof(T) * H);
        }
      }
      T* xg = static_cast<T*>(const_cast<void*>(q.xg));
      gemm_packed<T>(rows, 4 * H, I, in + row_begin * I, I, reinterpret_cast<const T*>(table[3 * l + 1]),
                     xg + row_begin * q.ld_xg, q.ld_xg);
      forward_all<T>(q);
      if (lengths) {
        for (int64_t r = row_begin; r < row_end; ++r) {
          if (t < lengths[r]) continue;
          std::memcpy(h + r * ho, kept.data() + (r - row_begin) * widest, sizeof(T) * ho);
          std::memcpy(c + r * H, kept.data() + (r - row_begin) * widest + ho, sizeof(T) * H);
          if (l == layers - 1) std::memset(static_cast<T*>(q.y) + r * ho, 0, sizeof(T) * ho);
        }
      }
      in = static_cast<const T*>(q.y);
      h += B * ho;
      c += B * H;
    }
  }
}
