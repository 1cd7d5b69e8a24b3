// Building blocks of the CPU paged-attention kernel (paged_attention.cpp): its constants,
// element loads and stores for float32 / bfloat16 / float16, a vectorisable exp, and the
// register-blocked micro-kernels for a group of query vectors against a chunk of keys.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace batchrun_cpu {

constexpr int kTileRows = 16;    // query rows per work unit (x G heads each)
constexpr int kKeyChunk = 32;    // keys converted and scored at a time
constexpr int kTransposeMinVectors = 8;
constexpr int kMaxHeadDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query vectors handled together: their score rows and output accumulators stay in registers
// while a chunk's keys and values stream past them once.
constexpr int kGroup = 4;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load(const _Float16* p, int64_t i) { return float(p[i]); }

// e^x for x <= 0, vectorizable (the compiler turns loops of it into SIMD code, which it
// cannot do with std::exp): e^x = 2^n * 2^f with n = x log2 e rounded to nearest, and 2^f
// for |f| <= 1/2 by its degree-6 Taylor polynomial (relative error about 1e-7, float32's own
// rounding). Inputs under -87 give about 1e-38 instead of less, which no softmax sum notices.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = t - n;
  float p = 1.5403530393381609e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline void store(float* p, int64_t i, float f) { p[i] = f; }
inline void store(uint16_t* p, int64_t i, float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    p[i] = 0x7fc0;  // NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p[i] = uint16_t(bits >> 16);
}
inline void store(_Float16* p, int64_t i, float f) { p[i] = _Float16(f); }

// 16 floats, unaligned: GCC's vector extension lowers it to whatever the target has (one
// AVX-512 register, two AVX2 ones, ...), so the micro-kernels below stay portable C++.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
inline v16 vload(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void vstore(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }

// s[i][j] = q_i . k_j for the group's 4 query vectors (rows of q, stride kD) and the chunk's
// 32 keys (kt: transposed, (kD, 32)); 8 accumulator registers, each key row loaded once.
template <int kD>
inline void group_scores(const float* __restrict__ q, const float* __restrict__ kt, float (*s)[kKeyChunk]) {
  static_assert(kKeyChunk == 32, "two vectors of keys per row");
  v16 a0 = {}, a1 = {}, b0 = {}, b1 = {}, c0 = {}, c1 = {}, e0 = {}, e1 = {};
  for (int d = 0; d < kD; ++d) {
    const v16 k0 = vload(kt + d * kKeyChunk), k1 = vload(kt + d * kKeyChunk + 16);
    const float q0 = q[d], q1 = q[kD + d], q2 = q[2 * kD + d], q3 = q[3 * kD + d];
    a0 += q0 * k0, a1 += q0 * k1, b0 += q1 * k0, b1 += q1 * k1;
    c0 += q2 * k0, c1 += q2 * k1, e0 += q3 * k0, e1 += q3 * k1;
  }
  vstore(s[0], a0), vstore(s[0] + 16, a1), vstore(s[1], b0), vstore(s[1] + 16, b1);
  vstore(s[2], c0), vstore(s[2] + 16, c1), vstore(s[3], e0), vstore(s[3] + 16, e1);
}

// acc_i = alpha_i acc_i + sum_j p[i][j] v_j for the group's 4 vectors (acc rows of stride kD),
// keys first..last-1 of the chunk (vf: (32, kD)); up to 64 columns at a time, in up to 16
// registers (kD = 32: 32 columns in 8).
template <int kD>
inline void group_accumulate(
    float* __restrict__ acc, const float* __restrict__ vf, const float (*p)[kKeyChunk], const float* alpha,
    int first, int last) {
  constexpr int kCols = kD < 64 ? kD : 64, kVecs = kCols / 16;
  static_assert(kCols % 16 == 0 && kD % kCols == 0, "whole column blocks");
  for (int c = 0; c < kD; c += kCols) {
    v16 o[kGroup][kVecs];
#pragma GCC unroll 4
    for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
      for (int b = 0; b < kVecs; ++b) o[i][b] = vload(acc + i * kD + c + 16 * b) * alpha[i];
    for (int j = first; j < last; ++j) {
      const float* vj = vf + j * kD + c;
      v16 w[kVecs];
#pragma GCC unroll 4
      for (int b = 0; b < kVecs; ++b) w[b] = vload(vj + 16 * b);
#pragma GCC unroll 4
      for (int i = 0; i < kGroup; ++i) {
        const float pij = p[i][j];
#pragma GCC unroll 4
        for (int b = 0; b < kVecs; ++b) o[i][b] += pij * w[b];
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
      for (int b = 0; b < kVecs; ++b) vstore(acc + i * kD + c + 16 * b, o[i][b]);
  }
}

}  // namespace batchrun_cpu
