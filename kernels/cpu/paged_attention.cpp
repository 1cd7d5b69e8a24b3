// Paged attention on the CPU that reads the KV cache in place (no gather into a dense copy).
//
// One call attends a list of *items*. An item is a set of query rows that read the same keys
// through one block table: a sequence's own rows (causal), or every row of a prefix group
// against the group's shared prefix (not causal: all prefix keys precede every query). The
// work is split into (item, kv head, tile of query rows) units run in parallel with OpenMP;
// inside a unit the tile's query heads of that kv head (GQA packed: G heads per row) walk the
// keys a chunk at a time, so each key and value is loaded and converted once per tile.
//
// Softmax is online, in float32, in natural log. A call can start from a partial result over
// disjoint keys (prior_out, prior_lse): that is how a group's prefix part and each member's
// own part combine, exactly as two halves of one softmax (m = lse, l = 1, acc = o).
//
// Layouts (all contiguous, row-major):
//   q        (T, Hq, D)                   dtype
//   k_cache  (num_blocks + 1, B, Hkv, D)  dtype; key position p of an item lives at
//   v_cache                               block tables[item][p / B], offset p % B
//   out      (T, Hq, D)                   dtype, or float32 when out_f32
//   lse      (T, Hq)                      float32
// Query head h*G + g reads kv head h (transformers' repeat_kv order).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int kTileRows = 16;    // query rows per work unit (x G heads each)
constexpr int kKeyChunk = 32;    // keys converted and scored at a time
constexpr int kTransposeMinVectors = 8;
constexpr int kMaxHeadDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

}  // namespace

extern "C" {

// Mirrored field for field by kernels/cpu/__init__.py (ctypes); keep the two in step.
struct PagedAttentionArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  float* out_lse;           // may be null
  const float* prior_out;   // (T, Hq, D) float32, may be null
  const float* prior_lse;   // (T, Hq); -inf where a row has no prior part; null: none
  const int32_t* rows;      // query rows item by item; null: item i owns rows cu_rows[i]..
  const int32_t* cu_rows;   // (I + 1,)
  const int32_t* tables;    // (I, table_stride)
  const int32_t* key_begin; // (I,) first key position the item reads
  const int32_t* key_end;   // (I,) keys < key_end; causal: the item's last row's bound
  int64_t table_stride;
  int32_t num_items;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t block_size;
  int32_t dtype;
  int32_t out_f32;
  int32_t causal;           // row j of n sees keys < key_end - (n - 1 - j)
  int32_t sliding_window;   // 0: none; else a row at position p sees keys > p - window
  float scale;
  float softcap;            // 0: none
};

}  // extern "C"

namespace {

struct Unit {
  int32_t item;
  int32_t first;  // first row of the tile, as an index into the item's rows
  int32_t count;
  int32_t kv_head;
};

// Query vectors handled together: their score rows and output accumulators stay in registers
// while a chunk's keys and values stream past them once.
constexpr int kGroup = 4;

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
// keys first..last-1 of the chunk (vf: (32, kD)); 64 columns at a time in 16 registers.
template <int kD>
inline void group_accumulate(
    float* __restrict__ acc, const float* __restrict__ vf, const float (*p)[kKeyChunk], const float* alpha,
    int first, int last) {
  static_assert(kD % 64 == 0, "whole column blocks");
  for (int c = 0; c < kD; c += 64) {
    v16 o[kGroup][4];
#pragma GCC unroll 4
    for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) o[i][b] = vload(acc + i * kD + c + 16 * b) * alpha[i];
    for (int j = first; j < last; ++j) {
      const float* vj = vf + j * kD + c;
      const v16 w0 = vload(vj), w1 = vload(vj + 16), w2 = vload(vj + 32), w3 = vload(vj + 48);
#pragma GCC unroll 4
      for (int i = 0; i < kGroup; ++i) {
        const float pij = p[i][j];
        o[i][0] += pij * w0, o[i][1] += pij * w1, o[i][2] += pij * w2, o[i][3] += pij * w3;
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < kGroup; ++i)
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) vstore(acc + i * kD + c + 16 * b, o[i][b]);
  }
}

template <typename T, typename OutT, int kD>
void attend_unit(const PagedAttentionArgs& a, const Unit& u, std::vector<float>& scratch) {
  constexpr bool kBlocked = kD > 0 && kD % 64 == 0;  // the register-blocked micro-kernels
  const int D = kD ? kD : a.head_dim, G = a.num_q_heads / a.num_kv_heads, B = a.block_size;
  const int nvec = u.count * G;                            // query vectors in the tile
  const int padded = (nvec + kGroup - 1) / kGroup * kGroup;  // ... rounded up to whole groups
  const int32_t begin = a.cu_rows[u.item], n = a.cu_rows[u.item + 1] - begin;
  const int32_t* table = a.tables + int64_t(u.item) * a.table_stride;
  const T* q = static_cast<const T*>(a.q);
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int64_t q_row = int64_t(a.num_q_heads) * D, kv_token = int64_t(a.num_kv_heads) * D;

  scratch.resize(size_t(padded) * D * 2 + size_t(kKeyChunk) * D * 2 + size_t(padded) * 4);
  float* __restrict__ qf = scratch.data();                    // (padded, D)
  float* __restrict__ acc = qf + size_t(padded) * D;          // (padded, D)
  float* __restrict__ kt = acc + size_t(padded) * D;          // (D, chunk) or (chunk, D)
  float* __restrict__ vf = kt + size_t(kKeyChunk) * D;        // (chunk, D)
  float* __restrict__ m = vf + size_t(kKeyChunk) * D;         // running max per vector
  float* __restrict__ l = m + padded;                         // running sum per vector
  int32_t* lo = reinterpret_cast<int32_t*>(l + padded);       // visible keys [lo, hi)
  int32_t* hi = lo + padded;

  // Many query vectors amortise transposing each key chunk (prefill tiles); few (a decode's
  // G heads) do not, and take dot products key by key.
  const bool transposed = nvec >= kTransposeMinVectors;
  int32_t tile_lo = INT32_MAX, tile_hi = 0;
  for (int v = nvec; v < padded; ++v) {  // padding vectors see no key and are never written
    lo[v] = hi[v] = 0;
    m[v] = kNegInf;
    l[v] = 0.f;
    for (int d = 0; d < D; ++d) qf[size_t(v) * D + d] = acc[size_t(v) * D + d] = 0.f;
  }
  for (int r = 0; r < u.count; ++r) {
    const int32_t j = u.first + r;
    const int32_t row = a.rows ? a.rows[begin + j] : begin + j;
    int32_t row_hi = a.causal ? a.key_end[u.item] - (n - 1 - j) : a.key_end[u.item];
    int32_t row_lo = a.key_begin[u.item];
    if (a.sliding_window > 0) row_lo = std::max(row_lo, row_hi - a.sliding_window);
    tile_lo = std::min(tile_lo, row_lo);
    tile_hi = std::max(tile_hi, row_hi);
    for (int g = 0; g < G; ++g) {
      const int v = r * G + g, head = u.kv_head * G + g;
      lo[v] = row_lo;
      hi[v] = row_hi;
      const int64_t at = int64_t(row) * q_row + int64_t(head) * D;
      for (int d = 0; d < D; ++d) qf[size_t(v) * D + d] = load(q, at + d);
      const float prior = a.prior_lse ? a.prior_lse[int64_t(row) * a.num_q_heads + head] : kNegInf;
      m[v] = prior;
      l[v] = prior == kNegInf ? 0.f : 1.f;
      for (int d = 0; d < D; ++d) acc[size_t(v) * D + d] = prior == kNegInf ? 0.f : a.prior_out[at + d];
    }
  }

  alignas(64) float s[kGroup][kKeyChunk];
  alignas(64) float o[kGroup][kD ? kD : kMaxHeadDim];
  for (int32_t k0 = tile_lo; k0 < tile_hi; k0 += kKeyChunk) {
    const int kn = std::min<int32_t>(kKeyChunk, tile_hi - k0);
    for (int j = 0; j < kn; ++j) {  // the chunk's keys and values, read in place
      const int32_t p = k0 + j;
      const int64_t at = (int64_t(table[p / B]) * B + p % B) * kv_token + int64_t(u.kv_head) * D;
      if (transposed)
        for (int d = 0; d < D; ++d) kt[size_t(d) * kKeyChunk + j] = load(kc, at + d);
      else
        for (int d = 0; d < D; ++d) kt[size_t(j) * D + d] = load(kc, at + d);
      for (int d = 0; d < D; ++d) vf[size_t(j) * D + d] = load(vc, at + d);
    }
    if (transposed)
      for (int d = 0; d < D; ++d)
        for (int j = kn; j < kKeyChunk; ++j) kt[size_t(d) * kKeyChunk + j] = 0.f;

    for (int v0 = 0; v0 < padded; v0 += kGroup) {
      int j0[kGroup], j1[kGroup], first = kKeyChunk, last = 0;
      for (int i = 0; i < kGroup; ++i) {
        j0[i] = std::max(lo[v0 + i] - k0, 0);
        j1[i] = std::min(hi[v0 + i] - k0, kn);
        if (j0[i] < j1[i]) first = std::min(first, j0[i]), last = std::max(last, j1[i]);
      }
      if (first >= last) continue;  // no vector of the group sees this chunk

      // scores s[i][j] = q_i . k_j
      if (kBlocked && transposed) {
        group_scores<kBlocked ? kD : 64>(qf + size_t(v0) * D, kt, s);
      } else if (transposed) {  // lanes over keys; each key row loaded once for the group
        for (int i = 0; i < kGroup; ++i)
          for (int j = 0; j < kKeyChunk; ++j) s[i][j] = 0.f;
        for (int d = 0; d < D; ++d) {
          const float* kd = kt + size_t(d) * kKeyChunk;
          for (int i = 0; i < kGroup; ++i) {
            const float qd = qf[size_t(v0 + i) * D + d];
            for (int j = 0; j < kKeyChunk; ++j) s[i][j] += qd * kd[j];
          }
        }
      } else {  // lanes over the head dim, key by key
        for (int i = 0; i < kGroup; ++i) {
          const float* qv = qf + size_t(v0 + i) * D;
          for (int j = 0; j < kKeyChunk; ++j) {
            float dot = 0.f;
            if (j >= j0[i] && j < j1[i]) {
              const float* kj = kt + size_t(j) * D;
#pragma omp simd reduction(+ : dot)
              for (int d = 0; d < D; ++d) dot += qv[d] * kj[d];
            }
            s[i][j] = dot;
          }
        }
      }

      // online softmax per vector: s becomes the chunk's probabilities; acc rescaled into o
      float alpha[kGroup];
      for (int i = 0; i < kGroup; ++i) {
        const int v = v0 + i;
        alpha[i] = 1.f;
        if (j0[i] >= j1[i]) {
          for (int j = 0; j < kKeyChunk; ++j) s[i][j] = 0.f;
          continue;
        }
        if (a.softcap > 0.f)
          for (int j = j0[i]; j < j1[i]; ++j) s[i][j] = std::tanh(s[i][j] * a.scale / a.softcap) * a.softcap;
        else
          for (int j = 0; j < kKeyChunk; ++j) s[i][j] *= a.scale;
        float chunk_max = kNegInf;
#pragma omp simd reduction(max : chunk_max)
        for (int j = 0; j < kKeyChunk; ++j)
          chunk_max = std::max(chunk_max, (j >= j0[i] && j < j1[i]) ? s[i][j] : kNegInf);
        const float m_new = std::max(m[v], chunk_max);  // finite: the vector sees a key here
        alpha[i] = m[v] == kNegInf ? 0.f : std::exp(m[v] - m_new);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < kKeyChunk; ++j) {
          const float p = exp_nonpositive(std::min(s[i][j] - m_new, 0.f));
          s[i][j] = (j >= j0[i] && j < j1[i]) ? p : 0.f;
          sum += s[i][j];
        }
        l[v] = l[v] * alpha[i] + sum;
        m[v] = m_new;
      }

      // acc += p . V, with the group's accumulators held in o across the chunk's keys
      if (kBlocked) {
        group_accumulate<kBlocked ? kD : 64>(acc + size_t(v0) * D, vf, s, alpha, first, last);
        continue;
      }
      for (int i = 0; i < kGroup; ++i)
        for (int d = 0; d < D; ++d) o[i][d] = acc[size_t(v0 + i) * D + d] * alpha[i];
      for (int j = first; j < last; ++j) {
        const float* vj = vf + size_t(j) * D;
        for (int i = 0; i < kGroup; ++i) {
          const float p = s[i][j];
          for (int d = 0; d < D; ++d) o[i][d] += p * vj[d];
        }
      }
      for (int i = 0; i < kGroup; ++i)
        for (int d = 0; d < D; ++d) acc[size_t(v0 + i) * D + d] = o[i][d];
    }
  }

  OutT* out = static_cast<OutT*>(a.out);
  for (int r = 0; r < u.count; ++r) {
    const int32_t j = u.first + r;
    const int32_t row = a.rows ? a.rows[begin + j] : begin + j;
    for (int g = 0; g < G; ++g) {
      const int v = r * G + g, head = u.kv_head * G + g;
      const int64_t at = int64_t(row) * q_row + int64_t(head) * D;
      const float inv = l[v] > 0.f ? 1.f / l[v] : 0.f;
      for (int d = 0; d < D; ++d) store(out, at + d, acc[size_t(v) * D + d] * inv);
      if (a.out_lse) a.out_lse[int64_t(row) * a.num_q_heads + head] = m[v] + std::log(l[v]);
    }
  }
}

template <typename T, typename OutT>
void attend(const PagedAttentionArgs& a, const Unit& u, std::vector<float>& scratch) {
  switch (a.head_dim) {  // the common head dims get loops of compile-time length
    case 64: attend_unit<T, OutT, 64>(a, u, scratch); break;
    case 128: attend_unit<T, OutT, 128>(a, u, scratch); break;
    default: attend_unit<T, OutT, 0>(a, u, scratch); break;
  }
}

template <typename T>
void run(const PagedAttentionArgs& a) {
  std::vector<Unit> units;
  for (int32_t i = 0; i < a.num_items; ++i) {
    const int32_t n = a.cu_rows[i + 1] - a.cu_rows[i];
    for (int32_t first = 0; first < n; first += kTileRows)
      for (int32_t h = 0; h < a.num_kv_heads; ++h)
        units.push_back({i, first, std::min(kTileRows, n - first), h});
  }
  const int64_t num_units = int64_t(units.size());
#pragma omp parallel
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_units; ++i) {
      if (a.out_f32)
        attend<T, float>(a, units[i], scratch);
      else
        attend<T, T>(a, units[i], scratch);
    }
  }
}

}  // namespace

extern "C" int batchrun_paged_attention(const PagedAttentionArgs* args) {
  if (args->head_dim < 1 || args->head_dim > kMaxHeadDim) return 2;
  switch (args->dtype) {
    case kF32: run<float>(*args); return 0;
    case kBF16: run<uint16_t>(*args); return 0;
    case kF16: run<_Float16>(*args); return 0;
    default: return 1;
  }
}

// Lets the loader check that the library and its ctypes mirror agree on the layout.
extern "C" int64_t batchrun_paged_attention_args_size() { return sizeof(PagedAttentionArgs); }
