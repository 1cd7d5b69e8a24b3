// Building blocks of the CPU paged-attention kernel (paged_attention.cpp): its constants,
// element loads and stores for float32 / bfloat16 / float16, a vectorisable exp, and the
// register-blocked micro-kernels for a group of query vectors against a chunk of keys.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace batchrun_cpu {

// Element types at the C entry points; kernels/cpu/build.py's DTYPE_CODES mirrors them.
enum DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int kTileRows = 32;    // query rows per work unit (x G heads each)
constexpr int kKeyChunk = 32;    // keys converted and scored at a time
constexpr int kBf16KeyChunk = 64;  // ... with bf16 dot products (group_scores_bf16)
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

inline void store(float* p, int64_t i, float f) { p[i] = f; }
inline void store(uint16_t* p, int64_t i, float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  p[i] = (bits & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);  // NaN stays NaN
}  // branch-free, so loops of stores vectorise
inline void store(_Float16* p, int64_t i, float f) { p[i] = _Float16(f); }

// x rounded to T and read back (what a torch operator's T output holds), branch-free.
template <typename T>
inline float round_to(float x);
template <>
inline float round_to<float>(float x) { return x; }
template <>
inline float round_to<uint16_t>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof x);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  rounded = (bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded;  // NaN stays NaN
  float y;
  std::memcpy(&y, &rounded, sizeof y);
  return y;
}
template <>
inline float round_to<_Float16>(float x) { return float(_Float16(x)); }

// 16 floats, unaligned: GCC's vector extension lowers it to whatever the target has (one
// AVX-512 register, two AVX2 ones, ...), so the micro-kernels below stay portable C++.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
inline v16 vload(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void vstore(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }

typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t vu16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vh16 __attribute__((vector_size(32), aligned(2)));

// 16 consecutive elements as floats, and 16 floats rounded to T and stored / read back
// (round16: the value a torch operator's T output holds), as whole-vector operations.
inline v16 load16(const float* p) { return vload(p); }
inline v16 load16(const uint16_t* p) {
  const vu16 bits = __builtin_convertvector(*reinterpret_cast<const vh16*>(p), vu16) << 16;
  return reinterpret_cast<const v16&>(bits);
}
inline vu16 bf16_bits(v16 x) {  // round to nearest even in the top 16 bits; NaN stays NaN
  const vu16 bits = reinterpret_cast<const vu16&>(x);
  const vu16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  return (bits & 0x7fffffffu) > 0x7f800000u ? vu16{} + 0x7fc00000u : rounded;
}
inline void store16(float* p, v16 x) { vstore(p, x); }
inline void store16(uint16_t* p, v16 x) {
  *reinterpret_cast<vh16*>(p) = __builtin_convertvector(bf16_bits(x) >> 16, vh16);
}
template <typename T>
inline v16 round16(v16 x) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    const vu16 bits = bf16_bits(x);
    return reinterpret_cast<const v16&>(bits);
  }
  return x;
}

// 2^t on 16 lanes, for t <= 8 (scores against their running max), in vector operations (the
// compiler does not vectorise std::exp): 2^t = 2^n * 2^f with n = t rounded to nearest and
// 2^f for |f| <= 1/2 by its degree-6 Taylor polynomial (relative error about 1e-7, float32's
// own rounding). With AVX-512, rounding and the scaling by 2^n are one instruction each
// (vrndscaleps, vscalefps); elsewhere n is rounded by adding and subtracting 1.5 * 2^23 and
// 2^n built in the exponent bits, with t clamped at -126 (2^-126 is float32's least normal
// number; a softmax sum does not notice the difference from 0).
inline v16 vexp2(v16 t) {
#if defined(__AVX512F__)
  const __m512 x = (__m512)t;
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const v16 f = (v16)_mm512_sub_ps(x, n);
#else
  const v16 lowest = v16{} - 126.0f;
  t = t < lowest ? lowest : t;
  const v16 n = (t + 12582912.0f) - 12582912.0f;
  const v16 f = t - n;
#endif
  v16 p = f * 1.5403530393381609e-4f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
#if defined(__AVX512F__)
  return (v16)_mm512_scalef_ps((__m512)p, n);
#else
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  return p * reinterpret_cast<const v16&>(bits);
#endif
}

constexpr float kLog2e = 1.44269504088896341f;

inline float exp_nonpositive(float x) { return vexp2(v16{} + x * kLog2e)[0]; }

// The max and the sum of a vector's 16 lanes, as trees of 4 steps (a lane-by-lane loop is a
// chain of 15 dependent operations, which the compiler keeps: floating-point order).
inline v16 swap_halves(v16 x, int width) {
  switch (width) {
    case 8: return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    case 2: return __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    default: return __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
}
inline float reduce_max(v16 x) {
  for (int width = 8; width >= 1; width /= 2) {
    const v16 y = swap_halves(x, width);
    x = x > y ? x : y;
  }
  return x[0];
}
inline float reduce_add(v16 x) {
  for (int width = 8; width >= 1; width /= 2) x += swap_halves(x, width);
  return x[0];
}

// How far a chunk's max may exceed the running max before the running max moves (natural
// log; e^5.545 = 256): below it, probabilities up to 256 are accumulated against the old max
// (exact -- the final division by the sum cancels the reference point) and the accumulators
// are not rescaled, which on a causal prefill's chunks is most of the time.
constexpr float kRescaleSlack = 5.545f;

// One query vector's raw scores for a chunk of kChunk keys (row[j] = q . k_j, before the
// softmax scale) become probabilities against the running max, in units of scaled scores:
// row[j] = exp(scale * row[j] - m_new), computed as 2^(row[j] * scale log2 e - m_new log2 e),
// one multiply-add per lane. Keys j0 <= j < j1 are visible (j0 < j1), the rest become 0; a
// chunk seen whole (the common case inside a prefill) skips the masks. Returns the running
// max to use from now on -- m_old, unless the chunk's visible scaled scores exceed it by more
// than kRescaleSlack (or m_old is -inf), then their max -- and the probabilities' sum.
template <int kChunk = kKeyChunk>
inline void chunk_probabilities(float* row, int j0, int j1, float scale, float m_old, float& m_new, float& sum) {
  static_assert(kChunk % 16 == 0, "whole vectors per row");
  constexpr int kVecs = kChunk / 16;
  const bool whole = j0 == 0 && j1 == kChunk;
  const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const v16 none = v16{} + kNegInf, zero = {};
  vi16 seen[kVecs];
  v16 x[kVecs], top = none;
#pragma GCC unroll 8
  for (int b = 0; b < kVecs; ++b) {
    x[b] = vload(row + 16 * b);
    if (!whole) {
      seen[b] = (lane + 16 * b >= j0) & (lane + 16 * b < j1);
      x[b] = seen[b] ? x[b] : none;
    }
    top = top > x[b] ? top : x[b];
  }
  const float chunk_max = reduce_max(top) * scale;  // scale > 0: the max of the scaled scores
  m_new = chunk_max > m_old + kRescaleSlack ? chunk_max : m_old;  // m_old = -inf: chunk_max
  const float c = scale * kLog2e, mc = m_new * kLog2e;
  v16 total = {};
#pragma GCC unroll 8
  for (int b = 0; b < kVecs; ++b) {
    v16 p = vexp2(x[b] * c - mc);
    if (!whole) p = seen[b] ? p : zero;
    vstore(row + 16 * b, p);
    total += p;
  }
  sum = reduce_add(total);
}

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

#if defined(__AVX512BF16__)
constexpr bool kHaveBf16Dot = true;

// The bf16 twin of group_scores, for CPUs with AVX-512 BF16 (what -march=native enables where
// the CPU has it): q (4 vectors, stride kD / 2) and the chunk's keys (kp: (kD / 2, kChunk))
// are bfloat16 *pairs* — dims 2d and 2d+1 in one 32-bit word — and each dot-product
// instruction multiplies a broadcast query pair with 16 keys' pairs, accumulating in float32:
// half the instructions of the float32 path, and keys are repacked, not converted. Products
// of bf16 are exact in float32, so scores match the float32 path's up to summation order.
// The attention kernel runs it over chunks of kBf16KeyChunk = 64 keys (16 accumulators): the
// per-chunk work around the products — the softmax's row reductions, rescaling and storing
// the accumulators — then comes once per 64 keys (measured 5-8% faster prefill attention than
// 32 on an AVX-512 BF16 machine without AMX).
template <int kD, int kChunk = kKeyChunk>
inline void group_scores_bf16(const uint32_t* __restrict__ q, const uint32_t* __restrict__ kp, float (*s)[kChunk]) {
  static_assert(kChunk % 16 == 0 && kChunk <= 64 && kD % 2 == 0, "up to four vectors of keys per pair row");
  constexpr int kPairs = kD / 2, kKeyVecs = kChunk / 16;
  __m512 acc[kGroup][kKeyVecs];  // 16 registers at 64 keys; each key load serves kGroup queries
#pragma GCC unroll 4
  for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
    for (int b = 0; b < kKeyVecs; ++b) acc[i][b] = _mm512_setzero_ps();
  for (int d = 0; d < kPairs; ++d) {
    __m512bh k[kKeyVecs];
#pragma GCC unroll 4
    for (int b = 0; b < kKeyVecs; ++b) k[b] = (__m512bh)_mm512_loadu_si512(kp + d * kChunk + 16 * b);
#pragma GCC unroll 4
    for (int i = 0; i < kGroup; ++i) {
      const __m512bh qi = (__m512bh)_mm512_set1_epi32(int32_t(q[i * kPairs + d]));
#pragma GCC unroll 4
      for (int b = 0; b < kKeyVecs; ++b) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], qi, k[b]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
    for (int b = 0; b < kKeyVecs; ++b) _mm512_storeu_ps(s[i] + 16 * b, acc[i][b]);
}

// The bf16 twin of group_accumulate: acc_i = alpha_i acc_i + sum_j p[i][j] v_j with the
// probabilities rounded to bf16 (as FlashAttention does before its P.V product; the softmax
// sum l stays float32) and the chunk's values as pairs of *keys* per word (vp: (kChunk / 2,
// kD), word (j, d) = keys 2j and 2j+1 at dim d), so one instruction adds two keys' terms to
// 16 dims.
template <int kD, int kChunk = kKeyChunk>
inline void group_accumulate_bf16(
    float* __restrict__ acc, const uint32_t* __restrict__ vp, const float (*p)[kChunk], const float* alpha,
    int first, int last) {
  constexpr int kCols = kD < 64 ? kD : 64, kVecs = kCols / 16;
  static_assert(kCols % 16 == 0 && kD % kCols == 0 && kChunk % 32 == 0, "whole column and key blocks");
  alignas(64) uint32_t pp[kGroup][kChunk / 2];  // each vector's probabilities, key pairs
  for (int i = 0; i < kGroup; ++i)
    for (int c = 0; c < kChunk; c += 32)  // word w of a block: keys c + 2w, c + 2w + 1
      _mm512_storeu_si512(pp[i] + c / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p[i] + c + 16), _mm512_loadu_ps(p[i] + c)));
  const int pair_first = first / 2, pair_last = (last + 1) / 2;
  for (int c = 0; c < kD; c += kCols) {
    __m512 o[kGroup][kVecs];
#pragma GCC unroll 4
    for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
      for (int b = 0; b < kVecs; ++b) o[i][b] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * kD + c + 16 * b), _mm512_set1_ps(alpha[i]));
    for (int j = pair_first; j < pair_last; ++j) {
      __m512bh w[kVecs];
#pragma GCC unroll 4
      for (int b = 0; b < kVecs; ++b) w[b] = (__m512bh)_mm512_loadu_si512(vp + j * kD + c + 16 * b);
#pragma GCC unroll 4
      for (int i = 0; i < kGroup; ++i) {
        const __m512bh pij = (__m512bh)_mm512_set1_epi32(int32_t(pp[i][j]));
#pragma GCC unroll 4
        for (int b = 0; b < kVecs; ++b) o[i][b] = _mm512_dpbf16_ps(o[i][b], pij, w[b]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
      for (int b = 0; b < kVecs; ++b) _mm512_storeu_ps(acc + i * kD + c + 16 * b, o[i][b]);
  }
}

// 16 rows of 16 32-bit words transposed in registers (r[i] word j becomes r[j] word i), in
// three rounds of 16 shuffles: pairs of rows interleaved by words, then by word pairs (each
// 128-bit lane then holds one column's 4 words of a row quartet), then 128-bit lanes
// regrouped across quartets in two steps.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4g + c], lane L: column 4L + c of rows 4g .. 4g + 3
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // lanes (0, 2) and (1, 3) of quartets 0 | 1 and 2 | 3
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);           // columns 0 .. 3
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);       // columns 8 .. 11
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);  // columns 4 .. 7
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd); // columns 12 .. 15
  }
}

// A chunk's bf16 keys (key j's head row at keys[j], kD dims; j < kn) into the pairs layout of
// the dot-product kernels, kp: (kD / 2, kChunk) words, word (d, j) = key j's dims 2d, 2d + 1.
// That is the transpose of the keys' own (kChunk, kD / 2) words, done 16 x 16 in registers;
// keys kn and later are zeros.
template <int kD, int kChunk>
inline void repack_key_pairs(const uint16_t* const* keys, int kn, uint32_t* __restrict__ kp) {
  static_assert(kD % 32 == 0 && kChunk % 16 == 0, "16 x 16 word blocks");
  for (int j = 0; j < kChunk; j += 16) {
    for (int d = 0; d < kD / 2; d += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j + i < kn ? _mm512_loadu_si512(keys[j + i] + 2 * d) : _mm512_setzero_si512();
      if (j < kn) transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kp + (d + i) * kChunk + j, r[i]);
    }
  }
}

// A chunk's bf16 values (key j's head row at values[j]; j < kn) as pairs of *keys*, vp:
// (kChunk / 2, kD) words, word (p, d) = dim d of keys 2p (low half) and 2p + 1; keys kn and
// later are zeros. One two-source permute interleaves 16 dims of the two keys.
template <int kD, int kChunk>
inline void repack_value_pairs(const uint16_t* const* values, int kn, uint32_t* __restrict__ vp) {
  static_assert(kD % 32 == 0 && kChunk % 2 == 0, "32-dim blocks, whole key pairs");
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int p = 0; p < kChunk / 2; ++p) {
    const int j = 2 * p;
    for (int d = 0; d < kD; d += 32) {
      const __m512i a = j < kn ? _mm512_loadu_si512(values[j] + d) : _mm512_setzero_si512();
      const __m512i b = j + 1 < kn ? _mm512_loadu_si512(values[j + 1] + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + p * kD + d, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(vp + p * kD + d + 16, _mm512_permutex2var_epi16(a, high, b));
    }
  }
}
#else
constexpr bool kHaveBf16Dot = false;

template <int kD, int kChunk = kKeyChunk>
inline void group_scores_bf16(const uint32_t*, const uint32_t*, float (*)[kChunk]) {}
template <int kD, int kChunk = kKeyChunk>
inline void group_accumulate_bf16(float*, const uint32_t*, const float (*)[kChunk], const float*, int, int) {}
template <int kD, int kChunk>
inline void repack_key_pairs(const uint16_t* const*, int, uint32_t*) {}
template <int kD, int kChunk>
inline void repack_value_pairs(const uint16_t* const*, int, uint32_t*) {}
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) && defined(__linux__)
// AMX (Intel's tile matrix unit, Sapphire Rapids and later): one TDPBF16PS multiplies a
// 16 x 32 bf16 tile by a 32 x 16 one (the second as 16 rows of dim *pairs*, the same pairs
// layout as the AVX-512 BF16 micro-kernels above) into a 16 x 16 float32 tile: 8x the work of
// a 16-lane dot-product instruction. The tile micro-kernels below take kAmxGroup query
// vectors at a time against a chunk of kAmxChunk keys -- longer than the vector path's, so
// the softmax's per-row reductions and the accumulators' rescaling, which now cost more than
// the products, come once per 128 keys. Every tile is configured as 16 rows x 64 bytes.
constexpr bool kHaveAmx = true;
constexpr int kAmxGroup = 16;
constexpr int kAmxChunk = 128;
constexpr int kAmxMinVectors = 8;
constexpr int kAmxTileRows = 128;  // query rows per work unit

// Linux hands out the tile registers' state per process, on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first tile instruction traps.
inline bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

// The tile configuration (palette 1): every tile 16 rows of 64 bytes. Loaded at the start of
// each work unit and released at its end, as other users of the tiles (oneDNN) configure
// their own.
inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config = {};
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// s[i][j] = q_i . k_j for 16 query vectors (qp: dim pairs, stride kD / 2 words) and the
// chunk's keys (kp: (kD / 2, kAmxChunk) words, key j in column j). 32 keys at a time in
// result tiles 0 and 1; each 32 dims multiply the queries' tile (4) by a 16-pair-row tile of
// each half's keys (5, 6).
template <int kD>
inline void amx_scores(const uint32_t* __restrict__ qp, const uint32_t* __restrict__ kp, float (*s)[kAmxChunk]) {
  static_assert(kD % 32 == 0 && kAmxChunk % 32 == 0, "whole 32-dim steps, pairs of 16-key tiles");
  for (int j = 0; j < kAmxChunk; j += 32) {
    _tile_zero(0);
    _tile_zero(1);
    for (int d = 0; d < kD / 2; d += 16) {
      _tile_loadd(4, qp + d, kD * 2);
      _tile_loadd(5, kp + d * kAmxChunk + j, kAmxChunk * 4);
      _tile_loadd(6, kp + d * kAmxChunk + j + 16, kAmxChunk * 4);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
    }
    _tile_stored(0, s[0] + j, kAmxChunk * 4);
    _tile_stored(1, s[0] + j + 16, kAmxChunk * 4);
  }
}

// acc_i = alpha_i acc_i + sum_j p[i][j] v_j for 16 vectors (acc rows of stride kD), with the
// probabilities rounded to bf16 (as group_accumulate_bf16 does) and the chunk's values as
// pairs of keys (vp: (kAmxChunk / 2, kD) words). 32 columns at a time: the rescaled
// accumulators are loaded into tiles 0 and 1, and every 32 keys add the probabilities'
// tile (4) times the values' two 16-column tiles (5, 6).
template <int kD>
inline void amx_accumulate(float* __restrict__ acc, const uint32_t* __restrict__ vp, const float (*p)[kAmxChunk],
                           const float* alpha) {
  static_assert(kD % 32 == 0 && kAmxChunk % 32 == 0, "16-column result tiles, 16 key pairs");
  alignas(64) uint32_t pp[kAmxGroup][kAmxChunk / 2];  // (vector, key pair) words
  for (int i = 0; i < kAmxGroup; ++i) {
    for (int j = 0; j < kAmxChunk; j += 32)
      _mm512_store_si512(pp[i] + j / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p[i] + j + 16),
                                                                     _mm512_loadu_ps(p[i] + j)));
    if (alpha[i] != 1.f) {
      const __m512 a = _mm512_set1_ps(alpha[i]);
      for (int d = 0; d < kD; d += 16)
        _mm512_storeu_ps(acc + i * kD + d, _mm512_mul_ps(_mm512_loadu_ps(acc + i * kD + d), a));
    }
  }
  for (int c = 0; c < kD; c += 32) {
    _tile_loadd(0, acc + c, kD * 4);
    _tile_loadd(1, acc + c + 16, kD * 4);
    for (int j = 0; j < kAmxChunk / 2; j += 16) {
      _tile_loadd(4, pp[0] + j, kAmxChunk * 2);
      _tile_loadd(5, vp + j * kD + c, kD * 4);
      _tile_loadd(6, vp + j * kD + c + 16, kD * 4);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
    }
    _tile_stored(0, acc + c, kD * 4);
    _tile_stored(1, acc + c + 16, kD * 4);
  }
}
#else
constexpr bool kHaveAmx = false;
constexpr int kAmxGroup = 16;
constexpr int kAmxChunk = 128;
constexpr int kAmxMinVectors = 8;
constexpr int kAmxTileRows = kTileRows;
inline bool amx_permitted() { return false; }
inline void amx_configure() {}
template <int kD>
inline void amx_scores(const uint32_t*, const uint32_t*, float (*)[kAmxChunk]) {}
template <int kD>
inline void amx_accumulate(float*, const uint32_t*, const float (*)[kAmxChunk], const float*) {}
#endif

}  // namespace batchrun_cpu
