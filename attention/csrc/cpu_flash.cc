// FlashAttention for the CPU, as XLA FFI custom calls (attention/cpu_flash.py).
//
// XLA:CPU runs attention as separate ops: a [q, k] logits matmul, a softmax
// that reads and writes the whole [batch, heads, q, k] array a few times, then
// the next matmul. On a CPU the memory traffic of those arrays, not the
// matmuls, is most of the time. These kernels keep every [block_q, block_kv]
// tile in cache: the forward pass is an online softmax over key blocks
// (Dao et al. 2022), the backward pass recomputes P per tile from the saved
// log-sum-exp. Tiles that the causal rule or the mask rule out entirely are
// skipped. Work items run on XLA's own intra-op thread pool.
//
// Layouts (float32, row-major; B stands for any number of leading batch dims,
// the same in every operand), the scale already folded into q:
//   q [B, Tq, H, D]   k [B, Tk, Hkv, D]   v [B, Tk, Hkv, Dv]   o, do [B, Tq, H, Dv]
//   lse, delta [B, H, Tq] (delta = rowsum(do * o))
//   mask: bool [B, H, Tq, Tk], any dim 1 to broadcast (True = attend).
//   keep: attention dropout's pattern, bool and broadcast like the mask (True =
//     keep, scaled by keep_scale); the softmax is taken before dropout, so
//     lse is that of the undropped weights.
// Head h reads kv head h / (H / Hkv) (grouped-query attention).
// A query row with no key to attend gets o = 0 and lse = +inf, so its P and
// all its gradients are 0.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kW = 16;  // float lanes per vector register
#else
constexpr int kW = 8;   // AVX2; elsewhere GCC splits it into native vectors
#endif
typedef float vf __attribute__((vector_size(kW * 4)));
typedef float vf_u __attribute__((vector_size(kW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
#if defined(__AVX512F__)
inline vf splat(float x) { return reinterpret_cast<vf>(_mm512_set1_ps(x)); }
#elif defined(__AVX__)
inline vf splat(float x) { return reinterpret_cast<vf>(_mm256_set1_ps(x)); }
#else
inline vf splat(float x) { return x - vf{}; }  // x - 0.0 folds to x; x + 0.0 does not (-0.0)
#endif

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kMR = 6;  // rows of the register tile

// exp(x) in float32 to about 2 ulp; exactly 0 below -87.3 (so exp(-inf) = 0).
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654f), hi = splat(88.37626f);
  vi zero_out = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // x = n ln2 + r, |r| <= ln2/2; n by the 1.5 * 2^23 rounding trick.
  const vf magic = splat(12582912.0f);
  vf t = x * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vf y = p * scale;
  return zero_out ? splat(0.0f) : y;
}

constexpr int kNR = 2 * kW;  // columns of the register tile

// Size in floats of B [K x N] packed by pack_b.
size_t packed_size(int K, int N) {
  return static_cast<size_t>((N + kNR - 1) / kNR) * K * kNR;
}

// Packs B [K x N] (row p at b + p * ldb) into panels of kNR columns, each K
// contiguous rows, the last one zero-padded. The micro-kernel then reads B
// sequentially: unpacked, B's rows are often a power of two apart (k is
// [Tk, Hkv, D]), and a 64-row panel would map to one L1 set and thrash it.
void pack_b(int K, int N, const float* b, int64_t ldb, float* out) {
  for (int c0 = 0; c0 < N; c0 += kNR) {
    const int n = std::min(kNR, N - c0);
    float* panel = out + static_cast<int64_t>(c0 / kNR) * K * kNR;
    for (int p = 0; p < K; ++p) {
      const float* src = b + p * ldb + c0;
      float* dst = panel + p * kNR;
      if (n == kNR) {
        store(dst, load(src));
        store(dst + kW, load(src + kW));
      } else {
        for (int c = 0; c < kNR; ++c) dst[c] = c < n ? src[c] : 0.0f;
      }
    }
  }
}

// pack_b of B = X^T, X [N x K] with row n at x + n * ldx: the panels of k^T
// and v^T come straight from k and v.
void pack_bt(int K, int N, const float* x, int64_t ldx, float* out) {
  for (int c0 = 0; c0 < N; c0 += kNR) {
    const int n = std::min(kNR, N - c0);
    float* panel = out + static_cast<int64_t>(c0 / kNR) * K * kNR;
    for (int c = 0; c < kNR; ++c) {
      const float* row = x + (c0 + c) * ldx;
      for (int p = 0; p < K; ++p) panel[p * kNR + c] = c < n ? row[p] : 0.0f;
    }
  }
}

// C[i, 0:n] (+)= sum_p A(i, p) * panel[p, 0:n] for one MR x kNR tile, n <= kNR.
// A(i, p) = a[i * a_rs + p * a_cs].
template <int MR>
inline void micro(int K, const float* a, int64_t a_rs, int64_t a_cs,
                  const float* panel, float* c, int64_t ldc, int n, bool acc) {
  alignas(64) float tail[MR][kNR];  // the columns past n go nowhere
  float* out = c;
  int64_t ldo = ldc;
  if (n < kNR) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j) tail[i][j] = acc && j < n ? c[i * ldc + j] : 0.0f;
    out = &tail[0][0];
    ldo = kNR;
  }
  vf r[MR][2];
  for (int i = 0; i < MR; ++i) {
    r[i][0] = acc ? load(out + i * ldo) : splat(0.0f);
    r[i][1] = acc ? load(out + i * ldo + kW) : splat(0.0f);
  }
  for (int p = 0; p < K; ++p) {
    const vf b0 = load(panel + p * kNR), b1 = load(panel + p * kNR + kW);
    const float* ap = a + p * a_cs;
    for (int i = 0; i < MR; ++i) {
      const vf ai = splat(ap[i * a_rs]);
      r[i][0] += ai * b0;
      r[i][1] += ai * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    store(out + i * ldo, r[i][0]);
    store(out + i * ldo + kW, r[i][1]);
  }
  if (n < kNR)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < n; ++j) c[i * ldc + j] = tail[i][j];
}

// C[M x N] (+)= A[M x K] B[K x N]: A strided, B packed by pack_b, C row-major.
void gemm(int M, int N, int K, const float* a, int64_t a_rs, int64_t a_cs,
          const float* packed, float* c, int64_t ldc, bool acc) {
  for (int c0 = 0; c0 < N; c0 += kNR) {
    const int n = std::min(kNR, N - c0);
    const float* panel = packed + static_cast<int64_t>(c0 / kNR) * K * kNR;
    float* cc = c + c0;
    int i = 0;
    for (; i + kMR <= M; i += kMR)
      micro<kMR>(K, a + i * a_rs, a_rs, a_cs, panel, cc + i * ldc, ldc, n, acc);
    const float* ai = a + i * a_rs;
    float* ci = cc + i * ldc;
    switch (M - i) {
      case 5: micro<5>(K, ai, a_rs, a_cs, panel, ci, ldc, n, acc); break;
      case 4: micro<4>(K, ai, a_rs, a_cs, panel, ci, ldc, n, acc); break;
      case 3: micro<3>(K, ai, a_rs, a_cs, panel, ci, ldc, n, acc); break;
      case 2: micro<2>(K, ai, a_rs, a_cs, panel, ci, ldc, n, acc); break;
      case 1: micro<1>(K, ai, a_rs, a_cs, panel, ci, ldc, n, acc); break;
      default: break;
    }
  }
}

float row_max(const float* s, int n) {  // n a multiple of kW
  vf m = splat(-kInf);
  for (int c = 0; c < n; c += kW) {
    vf x = load(s + c);
    m = x > m ? x : m;
  }
  float out = -kInf;
  for (int l = 0; l < kW; ++l) out = std::max(out, m[l]);
  return out;
}

// s[c] = -inf where m[c] is 0. A plain loop over bytes, which GCC vectorises
// (vpcmpeqb, vblendvps); __builtin_convertvector of a byte vector compiled to
// scalar inserts, and this mask pass cost as much as a matmul of the tile.
void mask_row(float* __restrict s, const uint8_t* __restrict m, int n) {
  for (int c = 0; c < n; ++c) s[c] = m[c] ? s[c] : -kInf;
}

// d[c] = k[c] ? p[c] * scale : 0, vectorised the same way (dropout's pattern);
// drop_row is the in-place form without the scale.
void keep_row(float* __restrict d, const float* __restrict p, const uint8_t* __restrict k,
              float scale, int n) {
  for (int c = 0; c < n; ++c) d[c] = k[c] ? p[c] * scale : 0.0f;
}
void drop_row(float* __restrict s, const uint8_t* __restrict k, int n) {
  for (int c = 0; c < n; ++c) s[c] = k[c] ? s[c] : 0.0f;
}

struct Mask {
  const bool* data = nullptr;  // null: no mask array
  std::vector<int64_t> batch_offset;  // of each flattened batch index
  int64_t sh = 0, sq = 0, sk = 0;
  bool causal = false;

  const bool* at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return data + batch_offset[b] + h * sh + i * sq + j * sk;
  }
  // Does any (i, j) of rows [i0, i1) x keys [j0, j1) attend?
  bool any(int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (causal && j0 > i1 - 1) return false;
    if (!data) return true;
    // Rows that share one mask row (sq == 0): the last one sees the most keys.
    for (int64_t i = sq ? i0 : i1 - 1; i < i1; ++i) {
      const int64_t end = causal ? std::min(j1, i + 1) : j1;
      if (end <= j0) continue;
      const bool* m = at(b, h, i, j0);
      if (std::memchr(m, 1, sk ? end - j0 : 1)) return true;
    }
    return false;
  }
  // Sets s[r, c] = -inf where (i0 + r, j0 + c) may not attend; s has row stride lds.
  void apply(float* s, int64_t lds, int64_t b, int64_t h, int64_t i0, int nq,
             int64_t j0, int nk) const {
    for (int r = 0; r < nq; ++r) {
      float* sr = s + r * lds;
      const int64_t i = i0 + r;
      if (data) {
        const bool* m = at(b, h, i, j0);
        if (sk == 0) {
          if (!m[0]) std::fill(sr, sr + nk, -kInf);
        } else {
          mask_row(sr, reinterpret_cast<const uint8_t*>(m), nk);
        }
      }
      if (causal) {
        const int64_t first = std::max<int64_t>(0, i - j0 + 1);
        for (int64_t c = first; c < nk; ++c) sr[c] = -kInf;
      }
    }
  }
  // Row r of d (stride ldd) = row r of p (stride ldp) times scale where the
  // pattern keeps (i0 + r, j0 + c), else 0; nk columns (data must be set).
  void keep(float* d, int64_t ldd, const float* p, int64_t ldp, float scale, int64_t b,
            int64_t h, int64_t i0, int nq, int64_t j0, int nk) const {
    for (int r = 0; r < nq; ++r) {
      const bool* m = at(b, h, i0 + r, j0);
      float* dr = d + r * ldd;
      const float* pr = p + r * ldp;
      if (sk == 0) {
        for (int c = 0; c < nk; ++c) dr[c] = m[0] ? pr[c] * scale : 0.0f;
      } else {
        keep_row(dr, pr, reinterpret_cast<const uint8_t*>(m), scale, nk);
      }
    }
  }
  // s[r, c] = 0 where the pattern drops (i0 + r, j0 + c), in place.
  void drop(float* s, int64_t lds, int64_t b, int64_t h, int64_t i0, int nq, int64_t j0,
            int nk) const {
    for (int r = 0; r < nq; ++r) {
      const bool* m = at(b, h, i0 + r, j0);
      float* sr = s + r * lds;
      if (sk == 0) {
        if (!m[0]) std::fill(sr, sr + nk, 0.0f);
      } else {
        drop_row(sr, reinterpret_cast<const uint8_t*>(m), nk);
      }
    }
  }
};

using Dims = ffi::Span<const int64_t>;

// The product of the leading (batch) dims: all but the last `inner`.
int64_t batch_size(Dims d, size_t inner) {
  int64_t n = 1;
  for (size_t i = 0; i + inner < d.size(); ++i) n *= d[i];
  return n;
}

bool same_batch(Dims a, Dims b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i + 3 < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// The mask's broadcast strides against [batch..., H, Tq, Tk] (q's batch dims).
ffi::Error make_mask(const ffi::Buffer<ffi::PRED>& mask, bool has_mask, bool causal,
                     Dims qd, int64_t H, int64_t Tq, int64_t Tk, Mask* m) {
  m->causal = causal;
  if (!has_mask) return ffi::Error::Success();
  Dims md = mask.dimensions();
  const size_t r = qd.size();
  if (md.size() != r) return ffi::Error::InvalidArgument("cpu_flash: mask/keep rank != q rank");
  std::vector<int64_t> target(qd.begin(), qd.end() - 3), stride(r, 0);
  target.insert(target.end(), {H, Tq, Tk});
  int64_t st = 1;
  for (size_t i = r; i-- > 0;) {
    if (md[i] != 1 && md[i] != target[i])
      return ffi::Error::InvalidArgument("cpu_flash: mask/keep does not broadcast");
    stride[i] = md[i] == 1 ? 0 : st;
    st *= md[i];
  }
  m->data = mask.typed_data();
  m->sh = stride[r - 3];
  m->sq = stride[r - 2];
  m->sk = stride[r - 1];
  const int64_t n = batch_size(qd, 3);
  m->batch_offset.resize(n);
  for (int64_t b = 0; b < n; ++b) {
    int64_t rest = b, off = 0;
    for (size_t i = r - 3; i-- > 0;) {
      off += (rest % target[i]) * stride[i];
      rest /= target[i];
    }
    m->batch_offset[b] = off;
  }
  return ffi::Error::Success();
}

// Runs f(0) .. f(n-1) on XLA's intra-op pool; the calling thread works too,
// so this finishes even when no pool thread is free.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const F* fp = &f;
  auto work = [state, n, fp]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*fp)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < workers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Tile: 72 query rows x 144 keys (128 with AVX-512). Both are multiples of kMR
// (the row counts of every product) and of kNR (the column count of the
// logits): 144 is 4.5 AVX-512 panels, and the half panel's copy-out made
// fwd+bwd at T=256 and padded T=1024 1.1-1.2x slower on a Zen 4 (no mask at
// T=1024: 191 ms either way; 160 keys: no better than 128). AVX2, fwd+bwd at
// B=4 H=8 D=64, T=256 and 1024, over 64 x 128 tiles: 1.0-1.12x on a Zen 3;
// 60x96, 48x144, 96x144, 72x96, 72x192 and 84x144 were no better.
constexpr int kBq = 72;
constexpr int kBk = kNR == 32 ? 128 : 144;
static_assert(kBq % kMR == 0 && kBk % kNR == 0, "tiles must hold whole register tiles");

struct Shapes {
  int64_t B, Tq, Tk, H, Hkv, D, Dv;
  int64_t groups() const { return H / Hkv; }
  int64_t key_tiles() const { return (Tk + kBk - 1) / kBk; }
};

// Checks q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv].
ffi::Error shapes_of(Dims qd, Dims kd, Dims vd, Shapes* s) {
  const size_t r = qd.size();
  if (r < 4 || !same_batch(qd, kd) || !same_batch(qd, vd))
    return ffi::Error::InvalidArgument("cpu_flash: q, k, v need the same batch dims");
  *s = {batch_size(qd, 3), qd[r - 3], kd[r - 3], qd[r - 2], kd[r - 2], qd[r - 1], vd[r - 1]};
  if (kd[r - 1] != s->D || vd[r - 3] != s->Tk || vd[r - 2] != s->Hkv || s->Hkv < 1 ||
      s->H % s->Hkv)
    return ffi::Error::InvalidArgument("cpu_flash: inconsistent shapes");
  return ffi::Error::Success();
}

// The shapes of q, k, v and the strides of the mask and the dropout pattern.
ffi::Error prepare(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                   const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::PRED>& mask,
                   const ffi::Buffer<ffi::PRED>& keep, bool causal, bool has_mask,
                   bool has_keep, Shapes* sh, Mask* m, Mask* kp) {
  if (ffi::Error e = shapes_of(q.dimensions(), k.dimensions(), v.dimensions(), sh); e.failure())
    return e;
  if (ffi::Error e = make_mask(mask, has_mask, causal, q.dimensions(), sh->H, sh->Tq, sh->Tk, m);
      e.failure())
    return e;
  return make_mask(keep, has_keep, false, q.dimensions(), sh->H, sh->Tq, sh->Tk, kp);
}

// The packed key tiles of one (batch, kv head): tile t of each operand at
// t * stride. B operands of the products: k^T [D x keys] for q k^T, v [keys x Dv]
// for P v, v^T [Dv x keys] for dO v^T, k [keys x D] for dS k.
struct KeyPanels {
  int64_t stride = 0;
  std::vector<float> data;
  const float* tile(int64_t t) const { return data.data() + t * stride; }
};

enum class Form { kT, kRows };  // k^T-like (transposed) or row panels

KeyPanels pack_keys(const float* x, int64_t ldx, int64_t Tk, int dim, Form form) {
  KeyPanels out;
  out.stride = static_cast<int64_t>(form == Form::kT ? packed_size(dim, kBk) : packed_size(kBk, dim));
  const int64_t tiles = (Tk + kBk - 1) / kBk;
  out.data.resize(static_cast<size_t>(tiles * out.stride));
  for (int64_t t = 0; t < tiles; ++t) {
    const int nk = static_cast<int>(std::min<int64_t>(kBk, Tk - t * kBk));
    const float* rows = x + t * kBk * ldx;
    float* dst = out.data.data() + t * out.stride;
    if (form == Form::kT) pack_bt(dim, nk, rows, ldx, dst);
    else pack_b(nk, dim, rows, ldx, dst);
  }
  return out;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::PRED> keep,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                   bool causal, bool has_mask, bool has_keep, float keep_scale) {
  Shapes sh;
  Mask m, kp;
  if (ffi::Error e = prepare(q, k, v, mask, keep, causal, has_mask, has_keep, &sh, &m, &kp);
      e.failure())
    return e;
  // Named copies, not structured bindings: lambdas may not capture those in C++17.
  const int64_t B = sh.B, Tq = sh.Tq, Tk = sh.Tk, H = sh.H, Hkv = sh.Hkv, D = sh.D, Dv = sh.Dv;
  const float* Q = q.typed_data();
  const float* K = k.typed_data();
  const float* V = v.typed_data();
  float* O = o->typed_data();
  float* L = lse->typed_data();
  const int d = static_cast<int>(D), dv = static_cast<int>(Dv);

  // Every query block of a kv head reads the same key tiles: pack them once.
  std::vector<KeyPanels> kt(B * Hkv), vp(B * Hkv);
  parallel_for(pool, B * Hkv, [&](int64_t item) {
    const int64_t kvh = item % Hkv, b = item / Hkv;
    kt[item] = pack_keys(K + (b * Tk * Hkv + kvh) * D, Hkv * D, Tk, d, Form::kT);
    vp[item] = pack_keys(V + (b * Tk * Hkv + kvh) * Dv, Hkv * Dv, Tk, dv, Form::kRows);
  });

  const int64_t q_blocks = (Tq + kBq - 1) / kBq;
  parallel_for(pool, B * H * q_blocks, [&](int64_t item) {
    const int64_t qb = item % q_blocks, h = (item / q_blocks) % H, b = item / (q_blocks * H);
    const int64_t kv_item = b * Hkv + h / sh.groups();
    const int64_t i0 = qb * kBq;
    const int nq = static_cast<int>(std::min<int64_t>(kBq, Tq - i0));
    std::vector<float> tile(static_cast<size_t>(kBq) * kBk);
    float* s = tile.data();
    std::vector<float> acc(static_cast<size_t>(kBq) * Dv, 0.0f);
    float mx[kBq], l[kBq];
    std::fill(mx, mx + kBq, -kInf);
    std::fill(l, l + kBq, 0.0f);
    const float* qi = Q + ((b * Tq + i0) * H + h) * D;
    for (int64_t t = 0; t < sh.key_tiles(); ++t) {
      const int64_t j0 = t * kBk;
      const int nk = static_cast<int>(std::min<int64_t>(kBk, Tk - j0));
      if (causal && j0 > i0 + nq - 1) break;
      if (!m.any(b, h, i0, i0 + nq, j0, j0 + nk)) continue;
      const int nkp = (nk + kW - 1) / kW * kW;
      gemm(nq, nk, d, qi, H * D, 1, kt[kv_item].tile(t), s, kBk, false);
      m.apply(s, kBk, b, h, i0, nq, j0, nk);
      for (int r = 0; r < nq; ++r) {
        float* sr = s + r * kBk;
        for (int c = nk; c < nkp; ++c) sr[c] = -kInf;
        const float m_new = std::max(mx[r], row_max(sr, nkp));
        if (m_new == -kInf) {  // nothing attended in this row yet
          std::fill(sr, sr + nkp, 0.0f);
          continue;
        }
        const float alpha = std::exp(mx[r] - m_new);
        vf sum = splat(0.0f);
        const vf mn = splat(m_new);
        for (int c = 0; c < nkp; c += kW) {
          vf e = vexp(load(sr + c) - mn);
          store(sr + c, e);
          sum += e;
        }
        float total = 0.0f;
        for (int u = 0; u < kW; ++u) total += sum[u];
        l[r] = l[r] * alpha + total;
        mx[r] = m_new;
        if (alpha != 1.0f) {
          float* ar = acc.data() + r * Dv;
          for (int64_t c = 0; c < Dv; ++c) ar[c] *= alpha;
        }
      }
      // Dropout acts on the normalised weights; 1/l and keep_scale come at the end.
      if (has_keep) kp.drop(s, kBk, b, h, i0, nq, j0, nk);
      gemm(nq, dv, nk, s, kBk, 1, vp[kv_item].tile(t), acc.data(), Dv, true);
    }
    for (int r = 0; r < nq; ++r) {
      float* orow = O + ((b * Tq + i0 + r) * H + h) * Dv;
      const float* ar = acc.data() + r * Dv;
      if (l[r] > 0.0f) {
        const float inv = (has_keep ? keep_scale : 1.0f) / l[r];
        for (int64_t c = 0; c < Dv; ++c) orow[c] = ar[c] * inv;
        L[(b * H + h) * Tq + i0 + r] = mx[r] + std::log(l[r]);
      } else {
        std::fill(orow, orow + Dv, 0.0f);
        L[(b * H + h) * Tq + i0 + r] = kInf;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::PRED> mask,
                    ffi::Buffer<ffi::PRED> keep, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    bool causal, bool has_mask, bool has_keep, float keep_scale) {
  Shapes sh;
  Mask m, kp;
  if (ffi::Error e = prepare(q, k, v, mask, keep, causal, has_mask, has_keep, &sh, &m, &kp);
      e.failure())
    return e;
  // Named copies, not structured bindings: lambdas may not capture those in C++17.
  const int64_t B = sh.B, Tq = sh.Tq, Tk = sh.Tk, H = sh.H, Hkv = sh.Hkv, D = sh.D, Dv = sh.Dv;
  const float* Q = q.typed_data();
  const float* K = k.typed_data();
  const float* V = v.typed_data();
  const float* DO = dout.typed_data();
  const float* L = lse.typed_data();
  const float* DL = delta.typed_data();
  float* DQ = dq->typed_data();
  float* DK = dk->typed_data();
  float* DV = dv->typed_data();
  const int d = static_cast<int>(D), dvi = static_cast<int>(Dv);

  // One item per (batch, kv head): it owns the dk/dv of that kv head and the
  // dq of its query heads, so no two items write the same element. Query
  // blocks outside, key tiles inside: each query block's q and dO are packed
  // once and its dq stays in cache; the key tiles are packed once per item.
  parallel_for(pool, B * Hkv, [&](int64_t item) {
    const int64_t kvh = item % Hkv, b = item / Hkv;
    const float* kb = K + (b * Tk * Hkv + kvh) * D;
    const float* vb = V + (b * Tk * Hkv + kvh) * Dv;
    const KeyPanels kt = pack_keys(kb, Hkv * D, Tk, d, Form::kT);
    const KeyPanels vt = pack_keys(vb, Hkv * Dv, Tk, dvi, Form::kT);
    const KeyPanels kr = pack_keys(kb, Hkv * D, Tk, d, Form::kRows);
    std::vector<float> dk_acc(static_cast<size_t>(Tk) * D, 0.0f);
    std::vector<float> dv_acc(static_cast<size_t>(Tk) * Dv, 0.0f);
    std::vector<float> tiles((has_keep ? 3 : 2) * static_cast<size_t>(kBq) * kBk);
    float* p = tiles.data();
    float* ds = p + kBq * kBk;
    float* pd = has_keep ? ds + kBq * kBk : p;  // P after dropout
    std::vector<float> qp(packed_size(kBq, d)), dop(packed_size(kBq, dvi));
    std::vector<float> dq_acc(static_cast<size_t>(kBq) * D);
    for (int64_t g = 0; g < sh.groups(); ++g) {
      const int64_t h = kvh * sh.groups() + g;
      for (int64_t i0 = 0; i0 < Tq; i0 += kBq) {
        const int nq = static_cast<int>(std::min<int64_t>(kBq, Tq - i0));
        const float* qi = Q + ((b * Tq + i0) * H + h) * D;
        const float* doi = DO + ((b * Tq + i0) * H + h) * Dv;
        const float* li = L + (b * H + h) * Tq + i0;
        const float* di = DL + (b * H + h) * Tq + i0;
        pack_b(nq, d, qi, H * D, qp.data());
        pack_b(nq, dvi, doi, H * Dv, dop.data());
        std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
        for (int64_t t = 0; t < sh.key_tiles(); ++t) {
          const int64_t j0 = t * kBk;
          const int nk = static_cast<int>(std::min<int64_t>(kBk, Tk - j0));
          if (causal && j0 > i0 + nq - 1) break;
          if (!m.any(b, h, i0, i0 + nq, j0, j0 + nk)) continue;
          const int nkp = (nk + kW - 1) / kW * kW;
          gemm(nq, nk, d, qi, H * D, 1, kt.tile(t), p, kBk, false);
          m.apply(p, kBk, b, h, i0, nq, j0, nk);
          for (int r = 0; r < nq; ++r) {
            float* pr = p + r * kBk;
            for (int c = nk; c < nkp; ++c) pr[c] = -kInf;
            const vf lr = splat(li[r]);
            for (int c = 0; c < nkp; c += kW) store(pr + c, vexp(load(pr + c) - lr));
          }
          // With dropout Z (scaled): Pd = P * Z, O = Pd v. The columns past nk stay 0.
          if (has_keep) {
            kp.keep(pd, kBk, p, kBk, keep_scale, b, h, i0, nq, j0, nk);
            for (int r = 0; r < nq; ++r) std::fill(pd + r * kBk + nk, pd + r * kBk + nkp, 0.0f);
          }
          // dV += Pd^T dO
          gemm(nk, dvi, nq, pd, 1, kBk, dop.data(), dv_acc.data() + j0 * Dv, Dv, true);
          // dPd = dO v^T, then dS = P * (dPd * Z - delta) = Pd * dPd - P * delta
          gemm(nq, nk, dvi, doi, H * Dv, 1, vt.tile(t), ds, kBk, false);
          for (int r = 0; r < nq; ++r) {
            float* dr = ds + r * kBk;
            const float* pr = p + r * kBk;
            const vf dlt = splat(di[r]);
            if (has_keep) {
              const float* qr = pd + r * kBk;
              for (int c = 0; c < nkp; c += kW)
                store(dr + c, load(qr + c) * load(dr + c) - load(pr + c) * dlt);
            } else {
              for (int c = 0; c < nkp; c += kW)
                store(dr + c, load(pr + c) * (load(dr + c) - dlt));
            }
          }
          // dQ += dS k, dK += dS^T q
          gemm(nq, d, nk, ds, kBk, 1, kr.tile(t), dq_acc.data(), D, true);
          gemm(nk, d, nq, ds, 1, kBk, qp.data(), dk_acc.data() + j0 * D, D, true);
        }
        for (int r = 0; r < nq; ++r)
          std::copy_n(dq_acc.data() + r * D, D, DQ + ((b * Tq + i0 + r) * H + h) * D);
      }
    }
    for (int64_t j = 0; j < Tk; ++j) {
      std::copy_n(dk_acc.data() + j * D, D, DK + ((b * Tk + j) * Hkv + kvh) * D);
      std::copy_n(dv_acc.data() + j * Dv, Dv, DV + ((b * Tk + j) * Hkv + kvh) * Dv);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttentionCpuFlashForward, Forward,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()   // q
        .Arg<ffi::Buffer<ffi::F32>>()   // k
        .Arg<ffi::Buffer<ffi::F32>>()   // v
        .Arg<ffi::Buffer<ffi::PRED>>()  // mask
        .Arg<ffi::Buffer<ffi::PRED>>()  // keep
        .Ret<ffi::Buffer<ffi::F32>>()   // o
        .Ret<ffi::Buffer<ffi::F32>>()   // lse
        .Attr<bool>("causal")
        .Attr<bool>("has_mask")
        .Attr<bool>("has_keep")
        .Attr<float>("keep_scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttentionCpuFlashBackward, Backward,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()   // q
        .Arg<ffi::Buffer<ffi::F32>>()   // k
        .Arg<ffi::Buffer<ffi::F32>>()   // v
        .Arg<ffi::Buffer<ffi::F32>>()   // do
        .Arg<ffi::Buffer<ffi::F32>>()   // lse
        .Arg<ffi::Buffer<ffi::F32>>()   // delta
        .Arg<ffi::Buffer<ffi::PRED>>()  // mask
        .Arg<ffi::Buffer<ffi::PRED>>()  // keep
        .Ret<ffi::Buffer<ffi::F32>>()   // dq
        .Ret<ffi::Buffer<ffi::F32>>()   // dk
        .Ret<ffi::Buffer<ffi::F32>>()   // dv
        .Attr<bool>("causal")
        .Attr<bool>("has_mask")
        .Attr<bool>("has_keep")
        .Attr<float>("keep_scale"));
