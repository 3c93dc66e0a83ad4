// Native-weight kernels for the engine: matrix products on GGUF quantised blocks and the two fused
// sub-layers of a decoder layer (attention, MLP), so a pass pays neither fp32 weight traffic nor Python's
// per-op dispatch. Built at install by engine/ext.py with the machine's gcc (avx2: -mavx2 -mfma -mf16c;
// avx512: the same 8-lane code with AVX-512 VNNI's one-instruction int8 dot product; and a portable scalar
// build); chosen at load by the CPU's capability. All three give the same bits (tested).
//
// Batch invariance is the contract: every output element is computed by one thread with one fixed
// sequence of floating-point operations that does not depend on how many rows share the call, which other
// rows they are, or how the work is split between threads. Hence -ffp-contract=off (no fused multiply-add
// the code does not ask for) and no -ffast-math. The scalar build (KNNSSD_SCALAR) emulates the AVX2 build's
// 8-lane order exactly, so both give bit-identical results (tested).
//
// Weight formats (QW), given in the row layout (row-major over output rows n and input columns k, groups
// along k; engine/pack.py) and kept in tiles of 8 output rows (see "tiles" below):
//   FMT_Q4:  4-bit codes, group 32, byte j of a group holds element j (low nibble) and j+16 (high):
//            w = scale[n,g] * q + min[n,g]  (GGUF Q4_1 as is; Q4_K's sub-blocks repacked)
//   FMT_Q8:  int8 codes, group 16 or 32: w = scale[n,g] * q (+ min[n,g])  (Q8_0, Q5_1, Q6_K)
//   FMT_F32: fp32 weights (F32 / F16 tensors), row-major as given
//   FMT_Q5:  5-bit codes, group 32, 20 bytes a block: 16 bytes of nibbles as FMT_Q4, then 32 high bits
//            (little-endian, bit j for element j): w = scale[n,g] * (q - 16)  (GGUF Q5_0; 0.75 bytes a
//            weight against int8's 1.125, which is what Qwen2.5's Q4_K_M mostly stores)
// Activations: ACT_Q8 first quantises each row's activations per block of 32 to int8 (scale = max|x| /
// 127, as llama.cpp's Q8 blocks) and multiplies integers, 8 output columns a register (llama.cpp's scheme
// and its repacked layout); ACT_F32 multiplies fp32 activations by the codes, one column at a time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(KNNSSD_SCALAR)
#include <immintrin.h>
#endif

namespace {

constexpr int FMT_Q4 = 0, FMT_Q8 = 1, FMT_F32 = 2, FMT_Q5 = 3;
constexpr int ACT_F32 = 0, ACT_Q8 = 1;

// ---------------------------------------------------------------------------------------------------
// 8-lane vector: AVX2 or a scalar emulation with the same per-lane operations and reduction order.
#if defined(KNNSSD_SCALAR)
struct V8 { float v[8]; };
static inline V8 vzero() { V8 r; for (int i = 0; i < 8; ++i) r.v[i] = 0.f; return r; }
static inline V8 vload(const float* p) { V8 r; std::memcpy(r.v, p, 32); return r; }
static inline void vstore(float* p, V8 a) { std::memcpy(p, a.v, 32); }
static inline V8 vset1(float x) { V8 r; for (int i = 0; i < 8; ++i) r.v[i] = x; return r; }
static inline V8 vadd(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] + b.v[i]; return a; }
static inline V8 vsub(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] - b.v[i]; return a; }
static inline V8 vmul(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] * b.v[i]; return a; }
static inline V8 vdiv(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] / b.v[i]; return a; }
static inline V8 vmax(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
static inline V8 vmin(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i]; return a; }
static inline V8 vfma(V8 a, V8 b, V8 c) { for (int i = 0; i < 8; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return c; }
static inline V8 vfloor(V8 a) { for (int i = 0; i < 8; ++i) a.v[i] = std::floor(a.v[i]); return a; }
static inline V8 vldexp_int(V8 n) {  // 2^n for integral n in float range
  V8 r; for (int i = 0; i < 8; ++i) { int32_t e = (int32_t)n.v[i] + 127; uint32_t b = (uint32_t)e << 23; std::memcpy(&r.v[i], &b, 4); } return r; }
static inline float hsum(V8 a) {
  float s0 = a.v[0] + a.v[4], s1 = a.v[1] + a.v[5], s2 = a.v[2] + a.v[6], s3 = a.v[3] + a.v[7];
  float t0 = s0 + s2, t1 = s1 + s3;
  return t0 + t1;
}
static inline float hmax(V8 a) {
  float s0 = std::max(a.v[0], a.v[4]), s1 = std::max(a.v[1], a.v[5]), s2 = std::max(a.v[2], a.v[6]), s3 = std::max(a.v[3], a.v[7]);
  return std::max(std::max(s0, s2), std::max(s1, s3));
}
#else
using V8 = __m256;
static inline V8 vzero() { return _mm256_setzero_ps(); }
static inline V8 vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, V8 a) { _mm256_storeu_ps(p, a); }
static inline V8 vset1(float x) { return _mm256_set1_ps(x); }
static inline V8 vadd(V8 a, V8 b) { return _mm256_add_ps(a, b); }
static inline V8 vsub(V8 a, V8 b) { return _mm256_sub_ps(a, b); }
static inline V8 vmul(V8 a, V8 b) { return _mm256_mul_ps(a, b); }
static inline V8 vdiv(V8 a, V8 b) { return _mm256_div_ps(a, b); }
static inline V8 vmax(V8 a, V8 b) { return _mm256_max_ps(a, b); }  // a > b ? a : b, as the scalar build
static inline V8 vmin(V8 a, V8 b) { return _mm256_min_ps(a, b); }  // a < b ? a : b
static inline V8 vfma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }
static inline V8 vfloor(V8 a) { return _mm256_floor_ps(a); }
static inline V8 vldexp_int(V8 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline float hsum(V8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));  // (0+4)(1+5)(2+6)(3+7)
  __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                                   // (s0+s2)(s1+s3)
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
static inline float hmax(V8 a) {
  __m128 s = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
  __m128 t = _mm_max_ps(_mm_movehl_ps(s, s), s);
  return _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(t), t));
}
#endif

// exp(x) lane-wise, Cephes-style: 2^n * p(r); the same operations in both builds, so bit-identical.
static inline V8 vexp(V8 x) {
  x = vmin(vmax(x, vset1(-87.3f)), vset1(88.3f));
  V8 n = vfloor(vfma(x, vset1(1.44269504088896341f), vset1(0.5f)));
  V8 r = vsub(x, vmul(n, vset1(0.693359375f)));
  r = vsub(r, vmul(n, vset1(-2.12194440e-4f)));
  V8 p = vset1(1.9875691500E-4f);
  p = vfma(p, r, vset1(1.3981999507E-3f));
  p = vfma(p, r, vset1(8.3334519073E-3f));
  p = vfma(p, r, vset1(4.1665795894E-2f));
  p = vfma(p, r, vset1(1.6666665459E-1f));
  p = vfma(p, r, vset1(5.0000001201E-1f));
  V8 r2 = vmul(r, r);
  p = vfma(p, r2, vadd(r, vset1(1.f)));
  return vmul(p, vldexp_int(n));
}

// Apply f to n floats in place, 8 at a time; a tail goes through a padded copy (same per-lane ops).
template <typename F>
static inline void map8(float* x, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(x + i, f(vload(x + i)));
  if (i < n) {
    float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, x + i, (n - i) * 4);
    vstore(buf, f(vload(buf)));
    std::memcpy(x + i, buf, (n - i) * 4);
  }
}

// sum over n floats (n % 8 == 0 or padded with zeros), 8 lanes then hsum
static inline float sum8(const float* x, int64_t n) {
  V8 a = vzero();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) a = vadd(a, vload(x + i));
  float t = hsum(a);
  for (; i < n; ++i) t += x[i];
  return t;
}

static inline float dot8(const float* a, const float* b, int64_t n) {
  V8 acc = vzero();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = vfma(vload(a + i), vload(b + i), acc);
  float t = hsum(acc);
  for (; i < n; ++i) t = std::fma(a[i], b[i], t);
  return t;
}

// ---------------------------------------------------------------------------------------------------
// Quantised weights.

// One Q5 block (20 bytes in the row layout: 16 bytes of nibbles, then 32 high bits) -> its 32 signed codes
// q - 16 in element order. Integers only, so every build gives the same bytes.
static inline void unpack_q5(const uint8_t* cb, int8_t* out) {
  uint32_t qh;
  std::memcpy(&qh, cb + 16, 4);
  for (int j = 0; j < 16; ++j) {
    out[j] = (int8_t)(((cb[j] & 15) | (((qh >> j) & 1) << 4)) - 16);
    out[j + 16] = (int8_t)(((cb[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
  }
}

// Quantised weights are kept in tiles of TR = 8 output rows (as llama.cpp's repacked "8x8" layouts): for
// each tile and block of 32 inputs, element group g (elements 4g..4g+3) of the 8 rows is 32 contiguous
// bytes, row r's four codes at bytes 4r..4r+3. One 32-byte register then holds four codes of 8 rows, and
// one unsigned-by-signed dot product against the activation's four bytes broadcast gives the 8 rows'
// partial sums in 8 lanes: the unpacking is shared by 8 rows and no output needs a horizontal sum.
//   Q4: 128 bytes a (tile, block). Chunk c (c = 0..3) holds each row's row-layout bytes 4c..4c+3, so its
//       low nibbles are group c and its high nibbles group c + 4 (row-layout byte j holds elements j and
//       j + 16).
//   Q5: the Q4 nibbles, then 8 masks of 32 bits: bit 4r + j of mask g is the high bit of element 4g + j of
//       row r (a mask expands to its group register's bytes in order).
//   Q8: 256 bytes, group g at bytes 32g..32g+31.
// Scales [tile, block, 32/group, 8] and mins [tile, block, 8]: one 8-lane load per (tile, block). Rows past
// n in the last tile are zeros (codes, scales, mins) and never stored.
constexpr int TR = 8;
static inline int64_t tile_bytes(int64_t fmt) { return fmt == FMT_Q4 ? 128 : fmt == FMT_Q5 ? 160 : 256; }
static inline int64_t row_block_bytes(int64_t fmt) { return fmt == FMT_Q4 ? 16 : fmt == FMT_Q5 ? 20 : 32; }

struct QW {
  at::Tensor codes, scales, mins;  // quantised: the tiles above; F32: [n, k] fp32. mins empty when none
  int64_t fmt = FMT_F32, group = 32, n = 0, k = 0, tiles = 0;
  // c, s, m in the row layout (engine/pack.py's Packed): row-major codes, scales [n, k/group], mins [n, k/32]
  QW(at::Tensor c, at::Tensor s, at::Tensor m, int64_t f, int64_t g) : fmt(f), group(g) {
    TORCH_CHECK(c.is_contiguous() && c.dim() == 2, "codes must be a contiguous 2-D tensor");
    n = c.size(0);
    k = f == FMT_Q4 ? c.size(1) * 2 : f == FMT_Q5 ? c.size(1) / 20 * 32 : c.size(1);
    TORCH_CHECK(f != FMT_Q5 || c.size(1) % 20 == 0, "Q5 codes: 20 bytes a block of 32");
    if (f == FMT_F32) {
      TORCH_CHECK(c.scalar_type() == at::kFloat, "F32 weights must be float32");
      codes = c; scales = s; mins = m;
      return;
    }
    TORCH_CHECK(f == FMT_Q4 || f == FMT_Q5 || f == FMT_Q8, "unknown weight format ", f);
    TORCH_CHECK(c.element_size() == 1, "quantised codes are bytes");
    TORCH_CHECK(k % 32 == 0, "quantised rows must be a multiple of 32 long");
    TORCH_CHECK(g == 32 || (g == 16 && f == FMT_Q8), "group must be 32 (or 16 for int8 codes)");
    TORCH_CHECK(f != FMT_Q5 || !m.defined() || m.numel() == 0, "Q5 codes carry no mins");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == n * (k / g), "scales: float32 [n, k/group]");
    TORCH_CHECK(!m.defined() || m.numel() == 0 || (g == 32 && m.scalar_type() == at::kFloat && m.is_contiguous() && m.numel() == n * (k / 32)),
                "mins: float32 [n, k/32]");
    tile_from_rows(c, s, m);
  }
  bool has_mins() const { return mins.defined() && mins.numel() > 0; }
  int64_t nbytes() const {
    return codes.numel() * codes.element_size() + (fmt == FMT_F32 ? 0 : scales.numel() * 4 + (has_mins() ? mins.numel() * 4 : 0));
  }
  // w[rows] in fp32: exactly scale * q + min, the GGUF dequantised values
  at::Tensor dequant_rows(const at::Tensor& ids) const;

 private:
  void tile_from_rows(const at::Tensor& c, const at::Tensor& s, const at::Tensor& m) {
    const int64_t B = k / 32, TB = tile_bytes(fmt), RB = row_block_bytes(fmt), S = 32 / group;
    tiles = (n + TR - 1) / TR;
    codes = at::zeros({tiles, B * TB}, at::kByte);
    scales = at::zeros({tiles, B * S * TR}, at::kFloat);
    const bool hm = m.defined() && m.numel() > 0;
    mins = hm ? at::zeros({tiles, B * TR}, at::kFloat) : at::empty({0}, at::kFloat);
    const uint8_t* src = static_cast<const uint8_t*>(c.data_ptr());
    const float* sp = s.data_ptr<float>();
    const float* mp = hm ? m.data_ptr<float>() : nullptr;
    uint8_t* dst = codes.data_ptr<uint8_t>();
    float* sd = scales.data_ptr<float>();
    float* md = hm ? mins.data_ptr<float>() : nullptr;
    at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t r = 0; r < TR && t * TR + r < n; ++r) {
          const int64_t row = t * TR + r;
          for (int64_t b = 0; b < B; ++b) {
            const uint8_t* rb = src + (row * B + b) * RB;
            uint8_t* tb = dst + (t * B + b) * TB;
            if (fmt == FMT_Q8) {
              for (int g = 0; g < 8; ++g) std::memcpy(tb + 32 * g + 4 * r, rb + 4 * g, 4);
            } else {
              for (int ch = 0; ch < 4; ++ch) std::memcpy(tb + 32 * ch + 4 * r, rb + 4 * ch, 4);
              if (fmt == FMT_Q5) {
                uint32_t qh;
                std::memcpy(&qh, rb + 16, 4);
                for (int g = 0; g < 8; ++g) {
                  uint32_t mk;
                  std::memcpy(&mk, tb + 128 + 4 * g, 4);
                  for (int j = 0; j < 4; ++j) mk |= ((qh >> (4 * g + j)) & 1u) << (4 * r + j);
                  std::memcpy(tb + 128 + 4 * g, &mk, 4);
                }
              }
            }
            for (int64_t h = 0; h < S; ++h) sd[((t * B + b) * S + h) * TR + r] = sp[(row * B + b) * S + h];
            if (md) md[(t * B + b) * TR + r] = mp[row * B + b];
          }
        }
    });
  }
};

// Raw pointers of one weight, taken once per product (data_ptr checks cost as much as a block's work).
struct QP {
  const uint8_t* tc = nullptr; const float* f = nullptr;
  const float* sc = nullptr; const float* mn = nullptr;
  int64_t fmt = 0, group = 32, n = 0, k = 0, tiles = 0, B = 0, S = 1, TB = 0;
  explicit QP(const QW& w) : fmt(w.fmt), group(w.group), n(w.n), k(w.k), tiles(w.tiles), B(w.k / 32), S(32 / w.group) {
    if (fmt == FMT_F32) { f = w.codes.data_ptr<float>(); return; }
    tc = w.codes.data_ptr<uint8_t>();
    TB = tile_bytes(fmt);
    sc = w.scales.data_ptr<float>();
    if (w.has_mins()) mn = w.mins.data_ptr<float>();
  }
  const uint8_t* tile_block(int64_t t, int64_t b) const { return tc + (t * B + b) * TB; }
  float scale(int64_t row, int64_t b, int64_t h) const { return sc[((row / TR * B + b) * S + h) * TR + row % TR]; }
  float min(int64_t row, int64_t b) const { return mn[(row / TR * B + b) * TR + row % TR]; }
  // Block b of one row in the row layout (row_block_bytes: GGUF's byte order), rebuilt from its tile.
  void row_block(int64_t row, int64_t b, uint8_t* out) const {
    const int64_t r = row % TR;
    const uint8_t* tb = tile_block(row / TR, b);
    if (fmt == FMT_Q8) {
      for (int g = 0; g < 8; ++g) std::memcpy(out + 4 * g, tb + 32 * g + 4 * r, 4);
      return;
    }
    for (int ch = 0; ch < 4; ++ch) std::memcpy(out + 4 * ch, tb + 32 * ch + 4 * r, 4);
    if (fmt == FMT_Q5) {
      uint32_t qh = 0;
      for (int g = 0; g < 8; ++g) {
        uint32_t mk;
        std::memcpy(&mk, tb + 128 + 4 * g, 4);
        for (int j = 0; j < 4; ++j) qh |= ((mk >> (4 * r + j)) & 1u) << (4 * g + j);
      }
      std::memcpy(out + 16, &qh, 4);
    }
  }
  // Block b of one row as 32 float codes in element order (Q5: q - 16); exact small integers.
  void codes_f32(int64_t row, int64_t b, float* q) const {
    uint8_t rb[32];
    row_block(row, b, rb);
    if (fmt == FMT_Q4) {
      for (int j = 0; j < 16; ++j) { q[j] = (float)(rb[j] & 15); q[j + 16] = (float)(rb[j] >> 4); }
    } else if (fmt == FMT_Q5) {
      int8_t s[32];
      unpack_q5(rb, s);
      for (int j = 0; j < 32; ++j) q[j] = (float)s[j];
    } else {
      for (int j = 0; j < 32; ++j) q[j] = (float)(int8_t)rb[j];
    }
  }
};

at::Tensor QW::dequant_rows(const at::Tensor& ids_in) const {
  auto ids = ids_in.to(at::kLong).contiguous();
  const int64_t R = ids.numel();
  auto out = at::empty({R, k}, at::kFloat);
  const int64_t* ip = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const QP w(*this);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = ip[r];
    TORCH_CHECK(i >= 0 && i < n, "row id out of range");
    float* orow = o + r * k;
    if (fmt == FMT_F32) { std::memcpy(orow, w.f + i * k, k * 4); continue; }
    for (int64_t b = 0; b < k / 32; ++b) {
      float q[32];
      w.codes_f32(i, b, q);
      for (int j = 0; j < 32; ++j) {
        const float v = w.scale(i, b, j / group) * q[j];  // Q4 codes are 0..15, Q5 are q - 16 (GGUF's own forms)
        orow[b * 32 + j] = has_mins() ? v + w.min(i, b) : v;
      }
    }
  }
  return out;
}

// Activations prepared once per product: fp32 rows, per-32 sums (for mins), and for ACT_Q8 int8 codes
// with a scale per block of 32 and the codes' exact sum per block.
struct Act {
  const float* x = nullptr;
  int64_t m = 0, k = 0;
  std::vector<float> sums;   // [m, k/32]
  std::vector<int8_t> q;     // [m, k]
  std::vector<float> d;      // [m, k/32]
  std::vector<int32_t> qs;   // [m, k/32]
};

static void prepare_act(Act& a, const float* x, int64_t m, int64_t k, int act, bool need_sums) {
  a.x = x; a.m = m; a.k = k;
  const int64_t B = k / 32;
  if (need_sums || act == ACT_Q8) {
    a.sums.resize(m * B);
    for (int64_t i = 0; i < m * B; ++i) a.sums[i] = sum8(x + i * 32, 32);
  }
  if (act != ACT_Q8) return;
  a.q.resize(m * k);
  a.d.resize(m * B);
  a.qs.resize(m * B);
  for (int64_t i = 0; i < m * B; ++i) {
    const float* xb = x + i * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    a.d[i] = dd;
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += a.q[i * 32 + j] = (int8_t)std::nearbyint(xb[j] * id);
    a.qs[i] = s;
  }
}

// Raw pointers of prepared activations (the kernels must not reload vector internals per block).
struct AP {
  const float* x; const int8_t* q; const float* d; const float* s; const int32_t* qs; int64_t k;
  explicit AP(const Act& a) : x(a.x), q(a.q.empty() ? nullptr : a.q.data()), d(a.d.empty() ? nullptr : a.d.data()),
                              s(a.sums.empty() ? nullptr : a.sums.data()), qs(a.qs.empty() ? nullptr : a.qs.data()), k(a.k) {}
};

// Output column n for rows r0..r0+R-1 (the kern_* below). Two accumulators per row (even and odd blocks)
// so consecutive blocks do not wait on each other's fused multiply-add; summed in one fixed order at the
// end. `blk(b, acc)` adds block b of every row into acc[R].
template <int R, typename Block>
static inline void accumulate_blocks(int64_t B, V8* acc0, V8* acc1, Block blk) {
  for (int r = 0; r < R; ++r) { acc0[r] = vzero(); acc1[r] = vzero(); }
  int64_t b = 0;
  for (; b + 2 <= B; b += 2) {
    blk(b, acc0);
    blk(b + 1, acc1);
  }
  if (b < B) blk(b, acc0);
}

// ---- fp32 activations (native-f32): one output column n for R rows, on the row's blocks rebuilt from the
// tiles; per row the same operations whatever R is ----

// One block of 32 float codes for R rows, into acc[R]: scale sa (group 32), or sa for elements 0..15 and
// sb for 16..31 (group 16).
template <int R>
static inline void f32_block(const float* q, float sa, float sb, int64_t G, const AP& a, int64_t r0, int64_t b, V8* acc) {
  const int64_t K = a.k;
  const V8 q0 = vload(q), q1 = vload(q + 8), q2 = vload(q + 16), q3 = vload(q + 24);
  for (int r = 0; r < R; ++r) {
    const float* xr = a.x + (r0 + r) * K + b * 32;
    V8 p = vmul(q0, vload(xr)), p2 = vmul(q2, vload(xr + 16));
    p = vfma(q1, vload(xr + 8), p);
    p2 = vfma(q3, vload(xr + 24), p2);
    if (G == 32) acc[r] = vfma(vadd(p, p2), vset1(sa), acc[r]);
    else { acc[r] = vfma(p, vset1(sa), acc[r]); acc[r] = vfma(p2, vset1(sb), acc[r]); }
  }
}

template <int R>
static inline void kern_rows_f32(const QP& w, const AP& a, int64_t n, int64_t r0, float* y, int64_t ys) {
  const int64_t B = w.B;
  V8 acc0[R], acc1[R];
  accumulate_blocks<R>(B, acc0, acc1, [&](int64_t b, V8* acc) {
    alignas(32) float q[32];
    w.codes_f32(n, b, q);
    const float sa = w.scale(n, b, 0), sb = w.group == 16 ? w.scale(n, b, 1) : sa;
    f32_block<R>(q, sa, sb, w.group, a, r0, b, acc);
  });
  std::vector<float> mrow;
  if (w.mn) { mrow.resize(B); for (int64_t b = 0; b < B; ++b) mrow[b] = w.min(n, b); }
  for (int r = 0; r < R; ++r) {
    float t = hsum(vadd(acc0[r], acc1[r]));
    if (w.mn) t += dot8(mrow.data(), a.s + (r0 + r) * B, B);
    y[(r0 + r) * ys + n] = t;
  }
}

static inline void kern_f32(const QP& w, const AP& a, int64_t n, int64_t r, float* y, int64_t ys) {
  y[r * ys + n] = dot8(w.f + n * a.k, a.x + r * a.k, a.k);
}

// ---- int8 activations: one tile (8 output columns in 8 lanes) for R rows ----
//
// Integer part: per (tile, block, row) two int32 lanes per column, ia over elements 0..15 and ib over
// 16..31 (Q6_K's two scales), exact. AVX2's maddubs + madd and AVX-512 VNNI's dpbusd give the same
// integers: the unsigned operand is at most 128 and the signed one at most 127 in size, so the 16-bit pair
// sums of maddubs never saturate (2 * 128 * 127 < 32767). Signed int8 codes (Q8) multiply as |w| by
// sign(w) * x. Float part (kern_tile): the same lane operations in every build.
#if defined(KNNSSD_SCALAR)
struct I8 { int32_t v[8]; };
static inline V8 itof(const I8& a) { V8 r; for (int i = 0; i < 8; ++i) r.v[i] = (float)a.v[i]; return r; }
static inline I8 iadd(I8 a, const I8& b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
static inline I8 isub1(I8 a, int32_t x) { for (int i = 0; i < 8; ++i) a.v[i] -= x; return a; }

template <int FMT, int R>
static inline void tile_ints(const uint8_t* tb, const int8_t* const* xb, I8* ia, I8* ib) {
  for (int r = 0; r < R; ++r) for (int l = 0; l < 8; ++l) { ia[r].v[l] = 0; ib[r].v[l] = 0; }
  for (int l = 0; l < 8; ++l)
    for (int g = 0; g < 8; ++g) {
      uint32_t mk = 0;
      if (FMT == FMT_Q5) std::memcpy(&mk, tb + 128 + 4 * g, 4);
      for (int j = 0; j < 4; ++j) {
        int32_t q;
        if (FMT == FMT_Q8) {
          q = (int8_t)tb[32 * g + 4 * l + j];
        } else {
          const uint8_t byte = tb[32 * (g & 3) + 4 * l + j];
          q = g < 4 ? byte & 15 : byte >> 4;
          if (FMT == FMT_Q5) q |= (int32_t)((mk >> (4 * l + j)) & 1u) << 4;
        }
        for (int r = 0; r < R; ++r) (g < 4 ? ia[r] : ib[r]).v[l] += q * (int32_t)xb[r][4 * g + j];
      }
    }
}
#else
using I8 = __m256i;
static inline V8 itof(I8 a) { return _mm256_cvtepi32_ps(a); }
static inline I8 iadd(I8 a, I8 b) { return _mm256_add_epi32(a, b); }
static inline I8 isub1(I8 a, int32_t x) { return _mm256_sub_epi32(a, _mm256_set1_epi32(x)); }

// acc + lane i: the four products u[4i..4i+3] * s[4i..4i+3] (u unsigned, s signed bytes)
static inline I8 dot_add(I8 acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline __m256i bcast4(const int8_t* p) {  // four activation bytes in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 0x10 in byte i where bit i of the 32-bit mask at p is set: a Q5 group's high bits
static inline __m256i high_bits(const uint8_t* p) {
  uint32_t mk;
  std::memcpy(&mk, p, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_maskz_mov_epi8((__mmask32)mk, _mm256_set1_epi8(0x10));
#else
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000);
  __m256i bits = _mm256_shuffle_epi8(_mm256_set1_epi32((int)mk), shuf);  // byte i <- mask byte i / 8
  bits = _mm256_cmpeq_epi8(_mm256_or_si256(bits, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
  return _mm256_and_si256(bits, _mm256_set1_epi8(0x10));
#endif
}

template <int FMT, int R>
static inline void tile_ints(const uint8_t* tb, const int8_t* const* xb, I8* ia, I8* ib) {
  for (int r = 0; r < R; ++r) { ia[r] = _mm256_setzero_si256(); ib[r] = _mm256_setzero_si256(); }
  if constexpr (FMT == FMT_Q8) {
    for (int g = 0; g < 8; ++g) {
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 32 * g));
      const __m256i wa = _mm256_sign_epi8(wq, wq);
      for (int r = 0; r < R; ++r) {
        I8& acc = g < 4 ? ia[r] : ib[r];
        acc = dot_add(acc, wa, _mm256_sign_epi8(bcast4(xb[r] + 4 * g), wq));
      }
    }
  } else {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 32 * c));
      __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      if constexpr (FMT == FMT_Q5) {
        lo = _mm256_or_si256(lo, high_bits(tb + 128 + 4 * c));
        hi = _mm256_or_si256(hi, high_bits(tb + 128 + 4 * (c + 4)));
      }
      for (int r = 0; r < R; ++r) {
        ia[r] = dot_add(ia[r], lo, bcast4(xb[r] + 4 * c));
        ib[r] = dot_add(ib[r], hi, bcast4(xb[r] + 16 + 4 * c));
      }
    }
  }
}
#endif

// Tile t (output columns 8t..8t+7) for rows r0..r0+R-1. Per block and row: the integer dot products of the
// 8 columns, then acc = fma(float(isum), scale * d, acc) per lane, even and odd blocks in two accumulators;
// mins add min * sum(x) per block in a third. Q5's codes are unsigned (0..31): the -16 comes back exactly
// as -16 * (sum of the block's int8 activations), in integers. A column's operations are the same whatever
// R is and whichever rows share the call (batch invariance).
template <int FMT, int R>
static inline void kern_tile(const QP& w, const AP& a, int64_t t, int64_t r0, float* y, int64_t ys) {
  const int64_t K = a.k, B = w.B;
  V8 accE[R], accO[R], accM[R];
  for (int r = 0; r < R; ++r) { accE[r] = vzero(); accO[r] = vzero(); accM[r] = vzero(); }
  const int8_t* xb[R];
  for (int64_t b = 0; b < B; ++b) {
    for (int r = 0; r < R; ++r) xb[r] = a.q + (r0 + r) * K + b * 32;
    I8 ia[R], ib[R];
    tile_ints<FMT, R>(w.tile_block(t, b), xb, ia, ib);
    const float* st = w.sc + (t * B + b) * w.S * TR;
    for (int r = 0; r < R; ++r) {
      const V8 d = vset1(a.d[(r0 + r) * B + b]);
      V8& acc = (b & 1) ? accO[r] : accE[r];
      if (FMT == FMT_Q8 && w.S == 2) {
        acc = vfma(itof(ia[r]), vmul(vload(st), d), acc);
        acc = vfma(itof(ib[r]), vmul(vload(st + TR), d), acc);
      } else {
        I8 s = iadd(ia[r], ib[r]);
        if (FMT == FMT_Q5) s = isub1(s, 16 * a.qs[(r0 + r) * B + b]);
        acc = vfma(itof(s), vmul(vload(st), d), acc);
      }
      if (w.mn) accM[r] = vfma(vload(w.mn + (t * B + b) * TR), vset1(a.s[(r0 + r) * B + b]), accM[r]);
    }
  }
  const int64_t lanes = std::min<int64_t>(TR, w.n - t * TR);
  for (int r = 0; r < R; ++r) {
    V8 o = vadd(accE[r], accO[r]);
    if (w.mn) o = vadd(o, accM[r]);
    alignas(32) float buf[8];
    vstore(buf, o);
    std::memcpy(y + (r0 + r) * ys + t * TR, buf, lanes * 4);
  }
}

// Rows per kern_tile call: as many as the vector registers hold (AVX-512 has 32, AVX2 16).
#if defined(__AVX512VL__) || defined(KNNSSD_SCALAR)
constexpr int RT = 4;
#else
constexpr int RT = 2;
#endif

template <int FMT>
static inline void tile_rows(const QP& w, const AP& a, int64_t t, int64_t M, float* y, int64_t ys) {
  int64_t r = 0;
  for (; r + RT <= M; r += RT) kern_tile<FMT, RT>(w, a, t, r, y, ys);
  for (; r < M; ++r) kern_tile<FMT, 1>(w, a, t, r, y, ys);
}

// y[:, off:off+w.n] = x @ w.T (+ bias), y row stride ys. Threads split the output columns (whole tiles
// with int8 activations).
static void matmul_into(const QW& qw, const Act& act_in, int act, float* y, int64_t ys, const float* bias) {
  TORCH_CHECK(qw.k == act_in.k, "weight has ", qw.k, " inputs, activations ", act_in.k);
  const QP w(qw);
  const AP a(act_in);
  const int64_t M = act_in.m;
  if (w.fmt != FMT_F32 && act == ACT_Q8) {
    const int64_t grain = std::max<int64_t>(1, 512 / std::max<int64_t>(1, M * (w.k / 64)));
    at::parallel_for(0, w.tiles, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (w.fmt == FMT_Q4) tile_rows<FMT_Q4>(w, a, t, M, y, ys);
        else if (w.fmt == FMT_Q5) tile_rows<FMT_Q5>(w, a, t, M, y, ys);
        else tile_rows<FMT_Q8>(w, a, t, M, y, ys);
        if (bias)
          for (int64_t r = 0; r < M; ++r)
            for (int64_t n = t * TR; n < std::min<int64_t>(w.n, t * TR + TR); ++n) y[r * ys + n] += bias[n];
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(8, 4096 / std::max<int64_t>(1, M * (w.k / 64)));
  at::parallel_for(0, w.n, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (w.fmt == FMT_F32) {
        for (int64_t r = 0; r < M; ++r) kern_f32(w, a, n, r, y, ys);
      } else {  // row tiles of 3, then one of the 1-2 left; a row's arithmetic is the same in every tile
        int64_t r = 0;
        for (; r + 3 <= M; r += 3) kern_rows_f32<3>(w, a, n, r, y, ys);
        if (M - r == 2) kern_rows_f32<2>(w, a, n, r, y, ys);
        else if (M - r == 1) kern_rows_f32<1>(w, a, n, r, y, ys);
      }
      if (bias) for (int64_t r = 0; r < M; ++r) y[r * ys + n] += bias[n];
    }
  });
}

// Several weights over the same activations, outputs side by side: the fused QKV and gate/up products.
static at::Tensor linear_multi(const float* x, int64_t m, int64_t k, const std::vector<const QW*>& ws,
                               const std::vector<const float*>& biases, int act) {
  int64_t total = 0;
  bool sums = false;
  for (auto* w : ws) { total += w->n; sums |= w->has_mins(); }
  Act a;
  bool quant = false;
  for (auto* w : ws) quant |= w->fmt != FMT_F32;
  prepare_act(a, x, m, k, quant ? act : ACT_F32, sums);
  auto y = at::empty({m, total}, at::kFloat);
  int64_t off = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    matmul_into(*ws[i], a, act, y.data_ptr<float>() + off, total, biases.empty() ? nullptr : biases[i]);
    off += ws[i]->n;
  }
  return y;
}


// Attention scores q.k_j * scale for n keys (rows of hd floats): each a dot8, four keys in flight.
static inline void scores(const float* q, const float* k, int64_t n, int64_t hd, float scale, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    V8 a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (int64_t i = 0; i < hd; i += 8) {
      const V8 qv = vload(q + i);
      a0 = vfma(qv, vload(k + j * hd + i), a0);
      a1 = vfma(qv, vload(k + (j + 1) * hd + i), a1);
      a2 = vfma(qv, vload(k + (j + 2) * hd + i), a2);
      a3 = vfma(qv, vload(k + (j + 3) * hd + i), a3);
    }
    out[j] = hsum(a0) * scale; out[j + 1] = hsum(a1) * scale; out[j + 2] = hsum(a2) * scale; out[j + 3] = hsum(a3) * scale;
  }
  for (; j < n; ++j) {
    V8 a0 = vzero();
    for (int64_t i = 0; i < hd; i += 8) a0 = vfma(vload(q + i), vload(k + j * hd + i), a0);
    out[j] = hsum(a0) * scale;
  }
}

// out = (sum_j w_j v_j) * inv over n value rows of hd floats (hd <= 256, a multiple of 8), in j order.
static inline void weighted_sum(const float* w, const float* v, int64_t n, int64_t hd, float inv, float* out) {
  V8 acc[32];
  const int64_t c = hd / 8;
  for (int64_t i = 0; i < c; ++i) acc[i] = vzero();
  for (int64_t j = 0; j < n; ++j) {
    const V8 wj = vset1(w[j]);
    for (int64_t i = 0; i < c; ++i) acc[i] = vfma(wj, vload(v + j * hd + i * 8), acc[i]);
  }
  for (int64_t i = 0; i < c; ++i) vstore(out + i * 8, vmul(acc[i], vset1(inv)));
}

// ---------------------------------------------------------------------------------------------------
// Norms and activations (row-wise, fixed order).

static void rms_rows(const float* x, float* out, int64_t m, int64_t n, const float* w, float eps) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * n;
    const float ms = dot8(xr, xr, n) / (float)n;
    const float inv = 1.f / std::sqrt(ms + eps);
    float* o = out + r * n;
    for (int64_t j = 0; j < n; ++j) o[j] = (xr[j] * inv) * w[j];
  }
}

static inline V8 vsilu(V8 g) { return vdiv(g, vadd(vset1(1.f), vexp(vsub(vzero(), g)))); }
static inline V8 vgelu_tanh(V8 g) {
  // 0.5 g (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1)
  V8 u = vmul(vset1(0.7978845608028654f), vfma(vmul(vset1(0.044715f), vmul(g, g)), g, g));
  V8 t = vsub(vset1(1.f), vdiv(vset1(2.f), vadd(vexp(vmul(vset1(2.f), u)), vset1(1.f))));
  return vmul(vmul(vset1(0.5f), g), vadd(vset1(1.f), t));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Public ops.

at::Tensor linear(const at::Tensor& x, const std::vector<QW>& ws, const std::vector<at::Tensor>& biases, int64_t act) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [M, K]");
  auto xc = x.contiguous();
  std::vector<const QW*> wp;
  for (auto& w : ws) wp.push_back(&w);
  std::vector<const float*> bp;
  for (auto& b : biases) bp.push_back(b.defined() && b.numel() ? b.data_ptr<float>() : nullptr);
  if (!bp.empty()) TORCH_CHECK(bp.size() == ws.size(), "one bias (or an empty tensor) per weight");
  return linear_multi(xc.data_ptr<float>(), xc.size(0), xc.size(1), wp, bp, (int)act);
}

// Attention sub-layer of one decoder layer, in place on x [T, D]. Segments: seg [S, 3] int64 rows
// (row offset, start position, rows); caches[s] is that segment's [L, 2, Hkv, cap, hd] KV cache.
// q/k rows are in interleaved-pair order; rope [maxlen, hd/2, 2] holds (cos, sin).
void attn_block(at::Tensor& x, const at::Tensor& norm, const std::vector<QW>& qkv, const std::vector<at::Tensor>& qkv_bias,
                const at::Tensor& q_norm, const at::Tensor& k_norm, const QW& o, const at::Tensor& post_norm,
                const at::Tensor& rope, const at::Tensor& seg, const std::vector<at::Tensor>& caches, int64_t layer,
                int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t window, double scale, double eps, int64_t act) {
  const int64_t T = x.size(0), D = x.size(1), H = n_heads, Hk = n_kv, hd = head_dim;
  TORCH_CHECK(hd % 8 == 0 && hd <= 256, "head_dim must be a multiple of 8, at most 256");
  float* xp = x.data_ptr<float>();
  std::vector<float> h(T * D);
  rms_rows(xp, h.data(), T, D, norm.data_ptr<float>(), (float)eps);
  std::vector<const QW*> wp;
  for (auto& w : qkv) wp.push_back(&w);
  std::vector<const float*> bp;
  for (auto& b : qkv_bias) bp.push_back(b.defined() && b.numel() ? b.data_ptr<float>() : nullptr);
  at::Tensor y = linear_multi(h.data(), T, D, wp, bp, (int)act);  // [T, (H + 2Hk) * hd]
  const int64_t W = (H + 2 * Hk) * hd;
  float* yp = y.data_ptr<float>();
  const int64_t S = seg.size(0);
  const int64_t* sp = seg.data_ptr<int64_t>();
  // per-row position
  std::vector<int64_t> pos(T), segof(T);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < sp[3 * s + 2]; ++j) { pos[sp[3 * s] + j] = sp[3 * s + 1] + j; segof[sp[3 * s] + j] = s; }
  const float* rp = rope.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* row = yp + t * W;
    if (q_norm.defined() && q_norm.numel()) {
      for (int64_t hh = 0; hh < H; ++hh) rms_rows(row + hh * hd, row + hh * hd, 1, hd, q_norm.data_ptr<float>(), (float)eps);
      for (int64_t hh = 0; hh < Hk; ++hh) rms_rows(row + (H + hh) * hd, row + (H + hh) * hd, 1, hd, k_norm.data_ptr<float>(), (float)eps);
    }
    const float* cs = rp + pos[t] * hd;  // [hd/2, 2]
    for (int64_t hh = 0; hh < H + Hk; ++hh) {
      float* v = row + hh * hd;
      for (int64_t i = 0; i < hd / 2; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
      }
    }
    // K/V into the cache
    auto& cache = caches[segof[t]];
    const int64_t cap = cache.size(3);
    float* kv = cache.data_ptr<float>() + layer * 2 * Hk * cap * hd;
    for (int64_t g = 0; g < Hk; ++g) {
      std::memcpy(kv + (g * cap + pos[t]) * hd, row + (H + g) * hd, hd * 4);
      std::memcpy(kv + ((Hk + g) * cap + pos[t]) * hd, row + (H + Hk + g) * hd, hd * 4);
    }
  }
  // attention: each (row, kv head) on its own, positions lo..pos in order
  std::vector<float> att(T * H * hd);
  const int64_t rep = H / Hk;
  at::parallel_for(0, T * Hk, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / Hk, g = i % Hk, p = pos[t];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p + 1 - window) : 0;
      const int64_t n = p + 1 - lo;
      auto& cache = caches[segof[t]];
      const int64_t cap = cache.size(3);
      const float* kc = cache.data_ptr<float>() + layer * 2 * Hk * cap * hd + g * cap * hd;
      const float* vc = kc + Hk * cap * hd;
      sc.resize(n);
      for (int64_t qh = g * rep; qh < (g + 1) * rep; ++qh) {
        const float* q = yp + t * W + qh * hd;
        scores(q, kc + lo * hd, n, hd, (float)scale, sc.data());
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
        const V8 vm = vset1(mx);
        map8(sc.data(), n, [&](V8 s) { return vexp(vsub(s, vm)); });
        const float inv = 1.f / sum8(sc.data(), n);
        float* out = att.data() + (t * H + qh) * hd;
        weighted_sum(sc.data(), vc + lo * hd, n, hd, inv, out);
      }
    }
  });
  at::Tensor z = linear_multi(att.data(), T, H * hd, {&o}, {}, (int)act);  // [T, D]
  float* zp = z.data_ptr<float>();
  if (post_norm.defined() && post_norm.numel()) rms_rows(zp, zp, T, D, post_norm.data_ptr<float>(), (float)eps);
  for (int64_t i = 0; i < T * D; ++i) xp[i] += zp[i];
}

// MLP sub-layer in place on x [T, D]: x += down(act(gate(h)) * up(h)), h = rms(x). act: 0 silu, 1 gelu_tanh.
void mlp_block(at::Tensor& x, const at::Tensor& norm, const std::vector<QW>& gate_up, const QW& down,
               const at::Tensor& post_norm, int64_t act_fn, double eps, int64_t act) {
  const int64_t T = x.size(0), D = x.size(1);
  float* xp = x.data_ptr<float>();
  std::vector<float> h(T * D);
  rms_rows(xp, h.data(), T, D, norm.data_ptr<float>(), (float)eps);
  std::vector<const QW*> wp;
  for (auto& w : gate_up) wp.push_back(&w);
  at::Tensor y = linear_multi(h.data(), T, D, wp, {}, (int)act);  // [T, 2I]
  const int64_t I = y.size(1) / 2;
  float* yp = y.data_ptr<float>();
  std::vector<float> a(T * I);
  for (int64_t t = 0; t < T; ++t) {
    float* g = yp + t * 2 * I;
    if (act_fn == 0) map8(g, I, [](V8 v) { return vsilu(v); });
    else map8(g, I, [](V8 v) { return vgelu_tanh(v); });
    for (int64_t j = 0; j < I; ++j) a[t * I + j] = g[j] * g[I + j];
  }
  at::Tensor z = linear_multi(a.data(), T, I, {&down}, {}, (int)act);
  float* zp = z.data_ptr<float>();
  if (post_norm.defined() && post_norm.numel()) rms_rows(zp, zp, T, D, post_norm.data_ptr<float>(), (float)eps);
  for (int64_t i = 0; i < T * D; ++i) xp[i] += zp[i];
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  rms_rows(xc.data_ptr<float>(), out.data_ptr<float>(), xc.size(0), xc.size(1), w.data_ptr<float>(), (float)eps);
  return out;
}

std::string build_kind() {
#if defined(KNNSSD_SCALAR)
  return "scalar";
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512";
#else
  return "avx2";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<QW>(m, "QW")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t>())
      .def_readonly("codes", &QW::codes)
      .def_readonly("scales", &QW::scales)
      .def_readonly("mins", &QW::mins)
      .def_readonly("fmt", &QW::fmt)
      .def_readonly("group", &QW::group)
      .def_readonly("n", &QW::n)
      .def_readonly("k", &QW::k)
      .def_readonly("tiles", &QW::tiles)
      .def("nbytes", &QW::nbytes)
      .def("dequant_rows", &QW::dequant_rows);
  m.def("linear", &linear);
  m.def("attn_block", &attn_block);
  m.def("mlp_block", &mlp_block);
  m.def("rms_norm", &rms_norm);
  m.def("build_kind", &build_kind);
  m.attr("FMT_Q4") = FMT_Q4;
  m.attr("FMT_Q8") = FMT_Q8;
  m.attr("FMT_F32") = FMT_F32;
  m.attr("FMT_Q5") = FMT_Q5;
  m.attr("ACT_F32") = ACT_F32;
  m.attr("ACT_Q8") = ACT_Q8;
}
