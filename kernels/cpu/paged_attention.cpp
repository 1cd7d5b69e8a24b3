// Paged attention on the CPU that reads the KV cache in place (no gather into a dense copy).
//
// One call attends a list of *items*. An item is a set of query rows that read the same keys
// through one block table: a sequence's own rows (causal), or every row of a prefix group
// against the group's shared prefix (not causal: all prefix keys precede every query). The
// work is split into (item, kv head, tile of query rows) units run in parallel with OpenMP;
// inside a unit the tile's query heads of that kv head (GQA packed: G heads per row) walk the
// keys a chunk at a time, so each key and value is loaded and converted once per tile. In
// bf16, on CPUs with AVX-512 BF16 (or AMX tiles), queries, keys and values stay bf16 and go
// through the dot-product micro-kernels (microkernels.h): a chunk's keys transposed in
// registers into pairs of dims per word, its values interleaved into pairs of keys.
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
#include <type_traits>
#include <vector>

#include "microkernels.h"

using namespace batchrun_cpu;  // NOLINT: one translation unit

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
  int32_t use_amx;          // bf16: tile instructions where the CPU and the OS allow them
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

template <typename T, typename OutT, int kD, bool kAmx>
void attend_unit(const PagedAttentionArgs& a, const Unit& u, std::vector<float>& scratch) {
  // the register-blocked micro-kernels: head dims 32, 64 and multiples of 64
  constexpr bool kBlocked = kD == 32 || (kD > 0 && kD % 64 == 0);
  // bf16 scores by dot-product instructions where the CPU has them (microkernels.h)
  constexpr bool kBf16Dot = kBlocked && kHaveBf16Dot && std::is_same_v<T, uint16_t>;
  // ... or tiles of 16 vectors on AMX (the caller checks the CPU, the OS and the head dim)
  static_assert(!kAmx || (kHaveAmx && std::is_same_v<T, uint16_t> && kD % 32 == 0));
  constexpr int kVecGroup = kAmx ? kAmxGroup : kGroup;  // vectors scored together
  constexpr int kChunk = kAmx ? kAmxChunk : kBf16Dot ? kBf16KeyChunk : kKeyChunk;  // keys per chunk
  const int D = kD ? kD : a.head_dim, G = a.num_q_heads / a.num_kv_heads, B = a.block_size;
  const int nvec = u.count * G;                            // query vectors in the tile
  const int padded = (nvec + kVecGroup - 1) / kVecGroup * kVecGroup;  // ... in whole groups
  const int32_t begin = a.cu_rows[u.item], n = a.cu_rows[u.item + 1] - begin;
  const int32_t* table = a.tables + int64_t(u.item) * a.table_stride;
  const T* q = static_cast<const T*>(a.q);
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int64_t q_row = int64_t(a.num_q_heads) * D, kv_token = int64_t(a.num_kv_heads) * D;

  scratch.resize(size_t(padded) * D * 2 + size_t(kChunk) * D * 2 + size_t(padded) * 4);
  float* __restrict__ qf = scratch.data();                    // (padded, D)
  float* __restrict__ acc = qf + size_t(padded) * D;          // (padded, D)
  float* __restrict__ kt = acc + size_t(padded) * D;          // (D, chunk) or (chunk, D)
  float* __restrict__ vf = kt + size_t(kChunk) * D;        // (chunk, D)
  float* __restrict__ m = vf + size_t(kChunk) * D;         // running max per vector
  float* __restrict__ l = m + padded;                         // running sum per vector
  int32_t* lo = reinterpret_cast<int32_t*>(l + padded);       // visible keys [lo, hi)
  int32_t* hi = lo + padded;

  // With bf16 dot products (AVX-512 BF16 or AMX), queries and keys stay bf16, as pairs of
  // dims per word -- qp (padded, D / 2) over qf's memory, kp (D / 2, chunk) over kt's -- and
  // a chunk's keys are transposed into kp in registers, cheap even for a decode's G vectors.
  constexpr bool kPairs = kAmx || kBf16Dot;
  // In float32, many query vectors amortise transposing each key chunk (prefill tiles); few
  // (a decode's G heads) do not, and take dot products key by key.
  const bool transposed = !kPairs && nvec >= kTransposeMinVectors;
  uint32_t* qp = reinterpret_cast<uint32_t*>(qf);
  uint32_t* kp = reinterpret_cast<uint32_t*>(kt);
  uint32_t* vp = reinterpret_cast<uint32_t*>(vf);  // (chunk / 2, D): values, pairs of keys
  int32_t tile_lo = INT32_MAX, tile_hi = 0;
  for (int v = nvec; v < padded; ++v) {  // padding vectors see no key and are never written
    lo[v] = hi[v] = 0;
    m[v] = kNegInf;
    l[v] = 0.f;
    for (int d = 0; d < D; ++d) acc[size_t(v) * D + d] = 0.f;
    if (kPairs)
      for (int d = 0; d < D / 2; ++d) qp[size_t(v) * (D / 2) + d] = 0u;
    else
      for (int d = 0; d < D; ++d) qf[size_t(v) * D + d] = 0.f;
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
      if (kPairs)
        std::memcpy(qp + size_t(v) * (D / 2), q + at, sizeof(uint32_t) * (D / 2));
      else
        for (int d = 0; d < D; ++d) qf[size_t(v) * D + d] = load(q, at + d);
      const float prior = a.prior_lse ? a.prior_lse[int64_t(row) * a.num_q_heads + head] : kNegInf;
      m[v] = prior;
      l[v] = prior == kNegInf ? 0.f : 1.f;
      for (int d = 0; d < D; ++d) acc[size_t(v) * D + d] = prior == kNegInf ? 0.f : a.prior_out[at + d];
    }
  }

  alignas(64) float s[kVecGroup][kChunk];
  if constexpr (kAmx) amx_configure();
  alignas(64) float o[kGroup][kD ? kD : kMaxHeadDim];
  for (int32_t k0 = tile_lo; k0 < tile_hi; k0 += kChunk) {
    const int kn = std::min<int32_t>(kChunk, tile_hi - k0);
    // key k0 + j lives at offset `off` of block table[blk]; the next chunk's key j at
    // (ahead_blk, ahead_off) -- stepped, not divided, per key
    int32_t blk = k0 / B, off = k0 % B, ahead_blk = (k0 + kChunk) / B, ahead_off = (k0 + kChunk) % B;
    const T* krow[kChunk];  // the chunk's key and value head rows, read in place
    const T* vrow[kChunk];
    for (int j = 0; j < kn; ++j) {
      const int64_t at = (int64_t(table[blk]) * B + off) * kv_token + int64_t(u.kv_head) * D;
      krow[j] = kc + at;
      vrow[j] = vc + at;
      if (k0 + kChunk + j < tile_hi) {
        const int64_t next = (int64_t(table[ahead_blk]) * B + ahead_off) * kv_token + int64_t(u.kv_head) * D;
        for (int64_t byte = 0; byte < int64_t(D) * int64_t(sizeof(T)); byte += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(kc + next) + byte);
          __builtin_prefetch(reinterpret_cast<const char*>(vc + next) + byte);
        }
      }
      if (++off == B) off = 0, ++blk;
      if (++ahead_off == B) ahead_off = 0, ++ahead_blk;
    }
    if constexpr (kPairs) {  // keys past the chunk's end score 0 and add nothing (finite zeros)
      repack_key_pairs<kD, kChunk>(reinterpret_cast<const uint16_t* const*>(krow), kn, kp);
      repack_value_pairs<kD, kChunk>(reinterpret_cast<const uint16_t* const*>(vrow), kn, vp);
    } else {
      for (int j = 0; j < kn; ++j) {
        if (transposed)
          for (int d = 0; d < D; ++d) kt[size_t(d) * kChunk + j] = load(krow[j], d);
        else
          for (int d = 0; d < D; ++d) kt[size_t(j) * D + d] = load(krow[j], d);
        for (int d = 0; d < D; ++d) vf[size_t(j) * D + d] = load(vrow[j], d);
      }
      if (transposed)
        for (int d = 0; d < D; ++d)
          for (int j = kn; j < kChunk; ++j) kt[size_t(d) * kChunk + j] = 0.f;
    }

    for (int v0 = 0; v0 < padded; v0 += kVecGroup) {
      int j0[kVecGroup], j1[kVecGroup], first = kChunk, last = 0;
      for (int i = 0; i < kVecGroup; ++i) {
        j0[i] = std::max(lo[v0 + i] - k0, 0);
        j1[i] = std::min(hi[v0 + i] - k0, kn);
        if (j0[i] < j1[i]) first = std::min(first, j0[i]), last = std::max(last, j1[i]);
      }
      if (first >= last) continue;  // no vector of the group sees this chunk

      // scores s[i][j] = q_i . k_j
      if constexpr (kAmx) {
        amx_scores<kAmx ? kD : 32>(qp + size_t(v0) * (D / 2), kp, s);
      } else if constexpr (kPairs) {
        group_scores_bf16<kBf16Dot ? kD : 64, kChunk>(qp + size_t(v0) * (D / 2), kp, s);
      } else if (kBlocked && transposed) {
        group_scores<kBlocked ? kD : 64>(qf + size_t(v0) * D, kt, s);
      } else if (transposed) {  // lanes over keys; each key row loaded once for the group
        for (int i = 0; i < kGroup; ++i)
          for (int j = 0; j < kChunk; ++j) s[i][j] = 0.f;
        for (int d = 0; d < D; ++d) {
          const float* kd = kt + size_t(d) * kChunk;
          for (int i = 0; i < kGroup; ++i) {
            const float qd = qf[size_t(v0 + i) * D + d];
            for (int j = 0; j < kChunk; ++j) s[i][j] += qd * kd[j];
          }
        }
      } else {  // lanes over the head dim, key by key
        for (int i = 0; i < kGroup; ++i) {
          const float* qv = qf + size_t(v0 + i) * D;
          for (int j = 0; j < kChunk; ++j) {
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
      float alpha[kVecGroup];
      for (int i = 0; i < kVecGroup; ++i) {
        const int v = v0 + i;
        alpha[i] = 1.f;
        if (j0[i] >= j1[i]) {
          for (int j = 0; j < kChunk; ++j) s[i][j] = 0.f;
          continue;
        }
        float scale = a.scale;  // soft-capping: capped scaled scores, then a scale of 1
        if (a.softcap > 0.f) {
          for (int j = j0[i]; j < j1[i]; ++j) s[i][j] = std::tanh(s[i][j] * a.scale / a.softcap) * a.softcap;
          scale = 1.f;
        }
        float m_new, sum;  // m_new is finite: the vector sees a key here
        chunk_probabilities<kChunk>(s[i], j0[i], j1[i], scale, m[v], m_new, sum);
        alpha[i] = m_new == m[v] ? 1.f : m[v] == kNegInf ? 0.f : exp_nonpositive(m[v] - m_new);
        l[v] = l[v] * alpha[i] + sum;
        m[v] = m_new;
      }

      // acc += p . V, with the group's accumulators held in o across the chunk's keys
      if constexpr (kAmx) {
        amx_accumulate<kAmx ? kD : 32>(acc + size_t(v0) * D, vp, s, alpha);
      } else if constexpr (kPairs) {
        group_accumulate_bf16<kBf16Dot ? kD : 64, kChunk>(acc + size_t(v0) * D, vp, s, alpha, first, last);
      } else if (kBlocked) {
        group_accumulate<kBlocked ? kD : 64>(acc + size_t(v0) * D, vf, s, alpha, first, last);
      } else {
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
  }

  if constexpr (kAmx) _tile_release();

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
void attend(const PagedAttentionArgs& a, const Unit& u, std::vector<float>& scratch, bool amx) {
  if constexpr (kHaveAmx && std::is_same_v<T, uint16_t>) {
    // run() checked the head dim; a tile of fewer vectors (a decode's G heads) is cheaper
    // key by key than padded to a 16-row tile
    if (amx && u.count * (a.num_q_heads / a.num_kv_heads) >= kAmxMinVectors) {
      switch (a.head_dim) {
        case 32: attend_unit<T, OutT, 32, true>(a, u, scratch); return;
        case 64: attend_unit<T, OutT, 64, true>(a, u, scratch); return;
        default: attend_unit<T, OutT, 128, true>(a, u, scratch); return;
      }
    }
  }
  switch (a.head_dim) {  // the common head dims get loops of compile-time length
    case 32: attend_unit<T, OutT, 32, false>(a, u, scratch); break;
    case 64: attend_unit<T, OutT, 64, false>(a, u, scratch); break;
    case 128: attend_unit<T, OutT, 128, false>(a, u, scratch); break;
    default: attend_unit<T, OutT, 0, false>(a, u, scratch); break;
  }
}

template <typename T>
void run(const PagedAttentionArgs& a) {
  const bool amx = a.use_amx && std::is_same_v<T, uint16_t> && kHaveAmx && amx_permitted() &&
                   (a.head_dim == 32 || a.head_dim == 64 || a.head_dim == 128);
  // AMX tiles finish a chunk's products so fast that repacking its keys and values would
  // dominate; taller work units repack each chunk once for more query rows.
  const int32_t tile_rows = amx ? kAmxTileRows : kTileRows;
  std::vector<Unit> units;
  for (int32_t i = 0; i < a.num_items; ++i) {
    const int32_t n = a.cu_rows[i + 1] - a.cu_rows[i];
    for (int32_t first = 0; first < n; first += tile_rows)
      for (int32_t h = 0; h < a.num_kv_heads; ++h)
        units.push_back({i, first, std::min(tile_rows, n - first), h});
  }
  // Largest units first: dynamic scheduling then ends with small ones, and no thread waits
  // long at the end for another's last prefill tile. Work ~ keys x (rows + 1): a unit's
  // chunks are repacked once and scored for every row.
  const auto work = [&](const Unit& u) {
    return int64_t(a.key_end[u.item] - a.key_begin[u.item]) * (u.count + 1);
  };
  std::stable_sort(units.begin(), units.end(), [&](const Unit& x, const Unit& y) { return work(x) > work(y); });
  const int64_t num_units = int64_t(units.size());
#pragma omp parallel
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_units; ++i) {
      if (a.out_f32)
        attend<T, float>(a, units[i], scratch, amx);
      else
        attend<T, T>(a, units[i], scratch, amx);
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

// 1 where bf16 attention can run on AMX tiles (the library was built for a CPU with them and
// the OS granted this process their state), else 0.
extern "C" int batchrun_amx_available() { return kHaveAmx && amx_permitted(); }

// Lets the loader check that the library and its ctypes mirror agree on the layout.
extern "C" int64_t batchrun_paged_attention_args_size() { return sizeof(PagedAttentionArgs); }
