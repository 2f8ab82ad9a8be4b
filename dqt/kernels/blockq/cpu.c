/* Fused CPU kernels of dqt.kernels.blockq: one pass per block for encode (gather, error
 * feedback, block statistic, quantize, pack, residual update) and decode (unpack, dequantize,
 * reduce over peers, write). The maths and its order of IEEE operations are those of the
 * pure-torch reference (reference.py); the formats are described in format.py. Compiled with
 * -ffp-contract=off (no fused multiply-add) so every product and sum rounds like the reference.
 * Blocks run in parallel (OpenMP); a block is independent of every other block. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The table columns, the kind, scale and mode codes and the scale bit patterns come from
 * format.py's KERNEL_CONSTANTS, passed by cpu.py as -DDQT_<NAME>=<value> flags. */
#ifndef DQT_KIND_QSGD
#error "build through dqt.kernels.blockq.cpu: the constants of format.py come as -D flags"
#endif
enum {
    DATA = DQT_DATA, RES = DQT_RES, LEN = DQT_LEN, MSG = DQT_MSG, SCALE = DQT_SCALE,
    CODE = DQT_CODE, CTR = DQT_CTR, COLUMNS = DQT_COLUMNS
};
enum {
    KIND_SIGN_MEAN = DQT_KIND_SIGN_MEAN, KIND_SIGN = DQT_KIND_SIGN,
    KIND_TERNARY = DQT_KIND_TERNARY, KIND_QSGD = DQT_KIND_QSGD, KIND_SIGN_TWO = DQT_KIND_SIGN_TWO,
    KIND_FP8_E4M3 = DQT_KIND_FP8_E4M3, KIND_FP8_E5M2 = DQT_KIND_FP8_E5M2
};
enum {
    SCALE_NONE = DQT_SCALE_NONE, SCALE_FP32 = DQT_SCALE_FP32, SCALE_BF16 = DQT_SCALE_BF16,
    SCALE_E8M0 = DQT_SCALE_E8M0
};
enum { MODE_COPY = DQT_MODE_COPY, MODE_MEAN = DQT_MODE_MEAN, MODE_VOTE = DQT_MODE_VOTE };
enum {
    E8M0_ROUND_UP = DQT_E8M0_ROUND_UP, E8M0_MAX = DQT_E8M0_MAX, E8M0_NAN = DQT_E8M0_NAN,
    BF16_NAN = DQT_BF16_NAN, FP32_NAN = DQT_FP32_NAN
};

typedef struct {
    int32_t kind, block, code_bits, scale_fmt, levels, pad;
    double clip;
} spec_t;

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* e8m0: nearest power of two in the log domain (mantissa >= sqrt 2 rounds up), 0 = zero,
 * E8M0_NAN = NaN; see format.py */
static inline uint32_t e8m0_code(float s) {
    if (!isfinite(s)) return (uint32_t)E8M0_NAN;
    const uint32_t b = f2u(s), e = (b >> 23) & 0xFFu, m = b & 0x7FFFFFu;
    if (e == 0) return 0u;
    const uint32_t r = e + (m >= (uint32_t)E8M0_ROUND_UP ? 1u : 0u);
    return r > (uint32_t)E8M0_MAX ? (uint32_t)E8M0_MAX : r;
}

static inline float e8m0_value(uint32_t e) {
    return e == 0 ? 0.0f : (e == (uint32_t)E8M0_NAN ? NAN : u2f(e << 23));
}

static inline uint32_t bf16_bits(float s) {
    if (isnan(s)) return (uint32_t)BF16_NAN;
    uint32_t b = f2u(s);
    return ((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16) & 0xFFFFu;
}

/* bytes of one scale of the block's scale format */
static inline int scale_bytes(const spec_t* sp) {
    return sp->scale_fmt == SCALE_FP32 ? 4 : (sp->scale_fmt == SCALE_BF16 ? 2 :
                                              (sp->scale_fmt == SCALE_E8M0 ? 1 : 0));
}

/* a statistic as transmitted: rounded to the scale format */
static inline float sent_scale(const spec_t* sp, float raw) {
    if (sp->scale_fmt == SCALE_BF16) return u2f(bf16_bits(raw) << 16);
    if (sp->scale_fmt == SCALE_E8M0) return e8m0_value(e8m0_code(raw));
    return raw;
}

/* the little-endian bytes of one scale at p (NaN for a non-finite block) */
static void put_scale(const spec_t* sp, uint8_t* p, float raw, int bad) {
    uint32_t bits;
    switch (sp->scale_fmt) {
    case SCALE_BF16: bits = bad ? (uint32_t)BF16_NAN : bf16_bits(raw); break;
    case SCALE_E8M0: bits = bad ? (uint32_t)E8M0_NAN : e8m0_code(raw); break;
    default: bits = bad ? (uint32_t)FP32_NAN : f2u(raw);
    }
    for (int t = 0; t < scale_bytes(sp); t++) p[t] = (uint8_t)(bits >> (8 * t));
}

/* one scale from its little-endian bytes at p (none: 1) */
static float get_scale(const spec_t* sp, const uint8_t* p) {
    if (sp->scale_fmt == SCALE_FP32) {
        uint32_t b = 0;
        for (int t = 0; t < 4; t++) b |= (uint32_t)p[t] << (8 * t);
        return u2f(b);
    }
    if (sp->scale_fmt == SCALE_BF16) return u2f(((uint32_t)p[0] | ((uint32_t)p[1] << 8)) << 16);
    if (sp->scale_fmt == SCALE_E8M0) return e8m0_value(p[0]);
    return 1.0f;
}

/* The high word of a 32x32-bit product: gcc vectorizes the 64-bit product of zero-extended
 * lanes (AVX2: vpmuludq), measured a little faster than composing it from 16-bit halves. */
static inline uint32_t mulhi32(uint32_t a, uint32_t b) {
    return (uint32_t)(((uint64_t)a * b) >> 32);
}

/* The 16-bit random numbers of up to CHUNK values of a block, from value 8·q0 on (see
 * philox.py): r[8l + 4h + t] = (philox(key, (q0 + l, ctr, 0, 0))[t] >> 16h) & 0xFFFF for
 * l < nq (at least), one Philox4x32-10 call (as Triton's tl.philox) per 8 values, up to PLANES
 * counters at a time so the rounds run as vector instructions (64 lanes: enough independent
 * multiplies to hide their latency; 16 when a short block needs no more). */
#define PLANES 64
#define CHUNK (8 * PLANES)
#if defined(__AVX512F__)
#include <immintrin.h>
/* the same with the state in registers: 4 x 16 lanes; a 32x32-bit product's high and low
 * words from vpmuludq of the even and of the odd lanes */
static inline void mulhilo16(__m512i a, __m512i c, __m512i* hi, __m512i* lo) {
    const __m512i pe = _mm512_mul_epu32(a, c), po = _mm512_mul_epu32(a, _mm512_srli_epi64(c, 32));
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
    *lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

static inline __attribute__((always_inline)) void philox16_avx512(
    uint16_t* r, uint64_t key, uint32_t ctr, uint32_t q0, const int G) {
    const __m512i A = _mm512_set1_epi32((int)0xD2511F53u), B = _mm512_set1_epi32((int)0xCD9E8D57u);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lo16 = _mm512_set1_epi32(0xFFFF), hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512i c0[PLANES / 16], c1[PLANES / 16], c2[PLANES / 16], c3[PLANES / 16];
    for (int g = 0; g < G; g++) {
        c0[g] = _mm512_add_epi32(_mm512_set1_epi32((int)(q0 + 16u * (uint32_t)g)), iota);
        c1[g] = _mm512_set1_epi32((int)ctr);
        c2[g] = _mm512_setzero_si512();
        c3[g] = _mm512_setzero_si512();
    }
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int k = 0; k < 10; k++) {
        const __m512i K0 = _mm512_set1_epi32((int)k0), K1 = _mm512_set1_epi32((int)k1);
        for (int g = 0; g < G; g++) {
            __m512i hb, lb, ha, la;
            mulhilo16(B, c2[g], &hb, &lb);
            mulhilo16(A, c0[g], &ha, &la);
            c0[g] = _mm512_xor_si512(_mm512_xor_si512(hb, c1[g]), K0);
            c2[g] = _mm512_xor_si512(_mm512_xor_si512(ha, c3[g]), K1);
            c1[g] = lb;
            c3[g] = la;
        }
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    /* the halves as 32-bit pairs (little-endian): word 4l + m of r is P_m[l] */
    uint32_t p[4][PLANES];
    for (int g = 0; g < G; g++) {
        _mm512_storeu_si512(p[0] + 16 * g, _mm512_or_si512(_mm512_and_si512(c0[g], lo16),
                                                           _mm512_slli_epi32(c1[g], 16)));
        _mm512_storeu_si512(p[1] + 16 * g, _mm512_or_si512(_mm512_and_si512(c2[g], lo16),
                                                           _mm512_slli_epi32(c3[g], 16)));
        _mm512_storeu_si512(p[2] + 16 * g, _mm512_or_si512(_mm512_srli_epi32(c0[g], 16),
                                                           _mm512_and_si512(c1[g], hi16)));
        _mm512_storeu_si512(p[3] + 16 * g, _mm512_or_si512(_mm512_srli_epi32(c2[g], 16),
                                                           _mm512_and_si512(c3[g], hi16)));
    }
    uint32_t w[4 * PLANES];
    for (int l = 0; l < 16 * G; l++)
        for (int m = 0; m < 4; m++) w[4 * l + m] = p[m][l];
    memcpy(r, w, 64 * (size_t)G * sizeof *w);
}
#endif

static void philox16(uint16_t* r, uint64_t key, uint32_t ctr, uint32_t q0, int nq) {
#if defined(__AVX512F__)
    if (nq <= 16) philox16_avx512(r, key, ctr, q0, 1);
    else philox16_avx512(r, key, ctr, q0, PLANES / 16);
#else
    const int nl = nq < PLANES ? nq : PLANES;
    uint32_t c0[PLANES], c1[PLANES], c2[PLANES], c3[PLANES];
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int l = 0; l < nl; l++) {
        c0[l] = q0 + (uint32_t)l; c1[l] = ctr; c2[l] = 0; c3[l] = 0;
    }
    for (int k = 0; k < 10; k++) {
        for (int l = 0; l < nl; l++) {
            const uint32_t hb = mulhi32(0xCD9E8D57u, c2[l]), lb = 0xCD9E8D57u * c2[l];
            const uint32_t ha = mulhi32(0xD2511F53u, c0[l]), la = 0xD2511F53u * c0[l];
            const uint32_t n0 = hb ^ c1[l] ^ k0, n2 = ha ^ c3[l] ^ k1;
            c0[l] = n0; c1[l] = lb; c2[l] = n2; c3[l] = la;
        }
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    for (int l = 0; l < nl; l++) {
        uint16_t* o = r + 8 * l;
        o[0] = (uint16_t)c0[l]; o[1] = (uint16_t)c1[l];
        o[2] = (uint16_t)c2[l]; o[3] = (uint16_t)c3[l];
        o[4] = (uint16_t)(c0[l] >> 16); o[5] = (uint16_t)(c1[l] >> 16);
        o[6] = (uint16_t)(c2[l] >> 16); o[7] = (uint16_t)(c3[l] >> 16);
    }
#endif
}

/* the uniform of a 16-bit random number: (2·r + 1)·2^-17, exact in fp32 */
static inline float uniform16(uint16_t r) {
    return (float)(2u * (uint32_t)r + 1u) * 7.62939453125e-06f;
}

/* fp8 (OCP e4m3fn: 3 mantissa bits, bias 7, max 448; e5m2: 2, 15, 57344) with integer bit
 * operations and one fp32 add, the conversion of c10 (torch's cast): round to nearest even.
 * q is finite and |q| <= the format's max (clamped), so no overflow case. */
static inline uint32_t fp8_bits(float q, const uint32_t mbits, const uint32_t bias) {
    const uint32_t b = f2u(q), sign = (b >> 24) & 0x80u, a = b & 0x7FFFFFFFu;
    /* below the smallest normal: add 2^(emin - mbits + 23) so the fp32 ulp is the fp8 step */
    const uint32_t magic = (151u - mbits - bias) << 23;
    const uint32_t sub = f2u(u2f(a) + u2f(magic)) - magic;
    const uint32_t sh = 23u - mbits;
    const uint32_t nrm =
        (a + ((bias - 127u) << 23) + ((1u << (sh - 1u)) - 1u) + ((a >> sh) & 1u)) >> sh;
    const uint32_t is_sub = 0u - (uint32_t)(a < ((128u - bias) << 23));  /* all ones or 0 */
    return (sub & is_sub) | (nrm & ~is_sub) | sign;  /* masks, not a branch: vectorizes */
}

/* fp8 byte -> fp32 (exact; e4m3fn 0x7F/0xFF and e5m2's top exponent decode to NaN/inf). A
 * subnormal m·2^(1-bias-mbits) is (1 + m/2^mbits)·2^(1-bias) − 2^(1-bias) (exact), so every
 * code takes the same fp32 subtract (of 0 for normal codes) and the loop has no branch. */
static inline float fp8_value(uint32_t c, const uint32_t mbits, const uint32_t bias) {
    const uint32_t a = c & 0x7Fu, sign = (c & 0x80u) << 24;
    const uint32_t is_sub = 0u - (uint32_t)(a < (1u << mbits));  /* all ones or 0 */
    const uint32_t bits = (a << (23u - mbits)) + ((127u - bias + (is_sub & 1u)) << 23);
    uint32_t m = f2u(u2f(bits) - u2f(((128u - bias) << 23) & is_sub));
    if (mbits == 3u) m = a == 0x7Fu ? 0x7FC00000u : m;
    else m = a >= 0x7Cu ? (0x7F800000u | ((a & 3u) << 21)) : m;
    return u2f(m | sign);
}

static inline int64_t code_nbytes(const spec_t* sp, int64_t n) {
    return sp->code_bits == 0 ? (n + 4) / 5 : (n * sp->code_bits + 7) / 8;
}

static void pack_codes(const spec_t* sp, const uint8_t* code, int64_t n, uint8_t* out) {
    const int64_t nb = code_nbytes(sp, n);
    if (sp->code_bits == 0) {  /* Horner: t0 + 3(t1 + 3(t2 + 3(t3 + 3 t4))); code[] zero-padded */
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* t = code + 5 * b;
            out[b] = (uint8_t)(t[0] + 3u * (t[1] + 3u * (t[2] + 3u * (t[3] + 3u * t[4]))));
        }
        return;
    }
    /* 2- and 4-bit codes (ternary, qsgd): whole bytes of 4 or 2 codes, from the zero-padded
     * code[] (its 40-value padding covers the last byte) */
    if (sp->code_bits == 2) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* t = code + 4 * b;
            out[b] = (uint8_t)(t[0] | (t[1] << 2) | (t[2] << 4) | (t[3] << 6));
        }
        return;
    }
    if (sp->code_bits == 4) {
        for (int64_t b = 0; b < nb; b++) out[b] = (uint8_t)(code[2 * b] | (code[2 * b + 1] << 4));
        return;
    }
    /* eight values → k bytes: their k-bit codes as one little-endian 64-bit word */
    const int k = sp->code_bits;
    for (int64_t g = 0; 8 * g < n; g++) {
        uint64_t word = 0;
        for (int t = 0; t < 8; t++) word |= (uint64_t)code[8 * g + t] << (k * t);
        for (int t = 0; t < k && g * k + t < nb; t++) out[g * k + t] = (uint8_t)(word >> (8 * t));
    }
}

/* codes of one message block → code[0..n) (k-bit stream or base-3); reads stay inside it */
static void unpack_codes(const spec_t* sp, const uint8_t* c, int64_t n, uint8_t* code) {
    const int64_t nb = code_nbytes(sp, n);
    if (sp->code_bits == 0) {
        for (int64_t b = 0; b < nb; b++) {
            uint32_t x = c[b];
            for (int m = 0; m < 5; m++) { code[5 * b + m] = (uint8_t)(x % 3u); x /= 3u; }
        }
        return;
    }
    if (sp->code_bits == 8) { memcpy(code, c, (size_t)n); return; }  /* a byte per code */
    const int k = sp->code_bits;
    const uint64_t mask = (1u << k) - 1u;
    for (int64_t g = 0; 8 * g < n; g++) {
        uint64_t word = 0;
        for (int t = 0; t < k && g * k + t < nb; t++) word |= (uint64_t)c[g * k + t] << (8 * t);
        for (int t = 0; t < 8; t++) code[8 * g + t] = (uint8_t)((word >> (k * t)) & mask);
    }
}

/* e' = (v - d)/S for values [i0, i0 + m) of a block (none without error feedback); the
 * stochastic kinds call it per chunk, while the values are in L1 */
static void residual_update(float* rs, const float* v, const float* d, int64_t i0, int64_t m,
                            float S, float invS) {
    if (!rs) return;
    if (S == 1.0f) for (int64_t i = i0; i < i0 + m; i++) rs[i] = v[i] - d[i];
    else for (int64_t i = i0; i < i0 + m; i++) rs[i] = (v[i] - d[i]) * invS;
}

/* fp8's raw scale: the smallest power of two 2^P, P >= -126, with amax <= FMAX·2^P, FMAX =
 * 1.75·2^F (F = 8 for e4m3, 15 for e5m2): integer operations on amax's bits; 0 for amax = 0 */
static inline float fp8_scale(float amax, int F) {
    if (!(amax > 0.0f) || !isfinite(amax)) return amax;
    const uint32_t b = f2u(amax), e = b >> 23, m = b & 0x7FFFFFu;
    int P = e == 0 ? -126 : (int)e - 127 - F + (m > 0x600000u ? 1 : 0);
    P = P < -126 ? -126 : P;
    return u2f((uint32_t)(P + 127) << 23);
}

/* fp8 codes of a finite block with scale s: out[i] = fp8(clamp(v[i] / s, ±max)) (0 when
 * s = 0), d[i] = its decode fp8·s when d is given; one loop per format so the constants fold.
 * s is a power of two of at least 2^-126, so 1/s is exact and v·(1/s) is v / s bit for bit */
static void fp8_block(int e4m3, const float* v, int64_t n, float s, float* d, uint8_t* out) {
    if (!(s > 0.0f)) {
        for (int64_t i = 0; i < n; i++) out[i] = 0;
        if (d) for (int64_t i = 0; i < n; i++) d[i] = 0.0f * s;
        return;
    }
    const float r = 1.0f / s;
#define FP8_LOOP(FMAX, MB, BIAS)                                                   \
    for (int64_t i = 0; i < n; i++) {                                              \
        const float t = v[i] * r;                                                  \
        const float q = t < -(FMAX) ? -(FMAX) : (t > (FMAX) ? (FMAX) : t);          \
        out[i] = (uint8_t)fp8_bits(q, MB, BIAS);                                   \
    }                                                                              \
    if (d) for (int64_t i = 0; i < n; i++) d[i] = fp8_value(out[i], MB, BIAS) * s;
    if (e4m3) { FP8_LOOP(448.0f, 3u, 7u) } else { FP8_LOOP(57344.0f, 2u, 15u) }
#undef FP8_LOOP
}

static void encode_block(const spec_t* sp, const float* x, const int64_t* row, uint8_t* msg,
                         float* res, float S, float invS, uint64_t key, int32_t* bad_out, float* v,
                         float* w, float* u, uint8_t* code) {
    const int64_t n = row[LEN];
    const float* xs = x + row[DATA];
    float* rs = res ? res + row[RES] : NULL;
    if (!rs) for (int64_t i = 0; i < n; i++) v[i] = xs[i];
    else if (S == 1.0f) for (int64_t i = 0; i < n; i++) v[i] = xs[i] + rs[i];
    else for (int64_t i = 0; i < n; i++) v[i] = xs[i] + rs[i] * S;
    /* v·0 is NaN exactly for inf/NaN values; eight lanes so the loops vectorize (the order of
     * a NaN-propagating sum does not matter, and an fp64 sum of fp32 values rounds back to the
     * same fp32 statistic in any order except with probability ~2^-29) */
    float nz[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    double lane0[8] = {0, 0, 0, 0, 0, 0, 0, 0};  /* sign_two: Σ|v| of the values < 0 */
    float fp8_amax = 0.0f;  /* fp8: max|v| */
    int64_t cnt0 = 0, cnt1 = 0;  /* sign_two: how many values are < 0, >= 0 (NaN: neither) */
    float mx[8] = {0, 0, 0, 0, 0, 0, 0, 0};  /* ternary: max|v| (after clipping) per lane */
    const int64_t n8 = n & ~(int64_t)7;
    if (sp->kind == KIND_SIGN_TWO) {  /* lane: the values >= 0, lane0: those < 0 */
        for (int64_t i = 0; i < n8; i += 8)
            for (int l = 0; l < 8; l++) {
                const float vi = v[i + l];
                const double a = fabs((double)vi);
                nz[l] += vi * 0.0f;
                lane[l] += vi >= 0.0f ? a : 0.0;
                lane0[l] += vi < 0.0f ? a : 0.0;
                cnt0 += vi < 0.0f;
                cnt1 += vi >= 0.0f;
            }
        for (int64_t i = n8; i < n; i++) {
            const float vi = v[i];
            const double a = fabs((double)vi);
            nz[0] += vi * 0.0f;
            lane[0] += vi >= 0.0f ? a : 0.0;
            lane0[0] += vi < 0.0f ? a : 0.0;
            cnt0 += vi < 0.0f;
            cnt1 += vi >= 0.0f;
        }
    } else if (sp->kind == KIND_SIGN_MEAN) {
        for (int64_t i = 0; i < n8; i += 8)
            for (int l = 0; l < 8; l++) {
                nz[l] += v[i + l] * 0.0f;
                lane[l] += fabs((double)v[i + l]);
            }
        for (int64_t i = n8; i < n; i++) { nz[0] += v[i] * 0.0f; lane[0] += fabs((double)v[i]); }
    } else if (sp->kind == KIND_QSGD) {
        for (int64_t i = 0; i < n8; i += 8)
            for (int l = 0; l < 8; l++) {
                const double d = (double)v[i + l];
                nz[l] += v[i + l] * 0.0f;
                lane[l] += d * d;
            }
        for (int64_t i = n8; i < n; i++) {
            const double d = (double)v[i];
            nz[0] += v[i] * 0.0f;
            lane[0] += d * d;
        }
    } else if ((sp->kind == KIND_TERNARY && !(sp->clip > 0)) || sp->kind == KIND_FP8_E4M3 ||
               sp->kind == KIND_FP8_E5M2) {  /* nz and max|v| in one pass */
        for (int64_t i = 0; i < n8; i += 8)
            for (int l = 0; l < 8; l++) {
                const float a = fabsf(v[i + l]);
                nz[l] += v[i + l] * 0.0f;
                mx[l] = a > mx[l] ? a : mx[l];
            }
        for (int64_t i = n8; i < n; i++) {
            const float a = fabsf(v[i]);
            nz[0] += v[i] * 0.0f;
            mx[0] = a > mx[0] ? a : mx[0];
        }
        for (int l = 0; l < 8; l++) fp8_amax = mx[l] > fp8_amax ? mx[l] : fp8_amax;
    } else {
        for (int64_t i = 0; i < n8; i += 8)
            for (int l = 0; l < 8; l++) nz[l] += v[i + l] * 0.0f;
        for (int64_t i = n8; i < n; i++) nz[0] += v[i] * 0.0f;
    }
    const int finite =
        (((nz[0] + nz[1]) + (nz[2] + nz[3])) + ((nz[4] + nz[5]) + (nz[6] + nz[7]))) == 0.0f;
    const double acc = ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                       ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    float raw = 1.0f, raw0 = 0.0f;  /* raw0: sign_two's m0 (raw is its m1) */
    const float* wv = v;
    if (sp->kind == KIND_SIGN_MEAN) {
        raw = (float)(acc / (double)n);
    } else if (sp->kind == KIND_SIGN_TWO) {
        const double acc0 = ((lane0[0] + lane0[1]) + (lane0[2] + lane0[3])) +
                            ((lane0[4] + lane0[5]) + (lane0[6] + lane0[7]));
        raw = cnt1 > 0 ? (float)(acc / (double)cnt1) : 0.0f;
        raw0 = cnt0 > 0 ? (float)(acc0 / (double)cnt0) : 0.0f;
    } else if (sp->kind == KIND_QSGD) {
        raw = (float)sqrt(acc);
    } else if (sp->kind == KIND_FP8_E4M3) {
        raw = fp8_scale(fp8_amax, 8);
    } else if (sp->kind == KIND_FP8_E5M2) {
        raw = fp8_scale(fp8_amax, 15);
    } else if (sp->kind == KIND_TERNARY) {
        if (sp->clip > 0 && finite) {
            double sm = 0;
            for (int64_t i = 0; i < n; i++) sm += (double)v[i];
            const float mean = (float)(sm / (double)n);
            double var = 0;
            for (int64_t i = 0; i < n; i++) {
                const double d = (double)(v[i] - mean);
                var += d * d;
            }
            const float bound = (float)(sp->clip * sqrt(var / (double)n));
            for (int64_t i = 0; i < n; i++) w[i] = fminf(fmaxf(v[i], -bound), bound);
            wv = w;
        }
        if (sp->clip > 0) {  /* without clipping mx came with nz */
            for (int64_t i = 0; i < n8; i += 8)
                for (int l = 0; l < 8; l++) {
                    const float a = fabsf(wv[i + l]);
                    mx[l] = a > mx[l] ? a : mx[l];
                }
            for (int64_t i = n8; i < n; i++) {
                const float a = fabsf(wv[i]);
                mx[0] = a > mx[0] ? a : mx[0];
            }
        }
        raw = 0.0f;
        for (int l = 0; l < 8; l++) raw = mx[l] > raw ? mx[l] : raw;
    }
    const float s = sent_scale(sp, raw);
    const float s0 = sent_scale(sp, raw0);  /* sign_two: m0 as sent */
    const int bad = !finite || !isfinite(s) || (sp->kind == KIND_SIGN_TWO && !isfinite(s0));
    if (bad_out) *bad_out = bad;
    uint8_t* mp = msg + row[MSG];
    const int64_t nb = code_nbytes(sp, n);
    if (sp->kind == KIND_SIGN_TWO) {  /* the scale field: m0, then m1 */
        put_scale(sp, mp + row[SCALE], raw0, bad);
        put_scale(sp, mp + row[SCALE] + scale_bytes(sp), raw, bad);
    } else if (sp->scale_fmt != SCALE_NONE) {
        put_scale(sp, mp + row[SCALE], raw, bad);
    }
    if (bad) {  /* NaN scale, zero codes, residual untouched */
        memset(mp + row[CODE], 0, (size_t)nb);
        return;
    }
    if (sp->kind == KIND_FP8_E4M3 || sp->kind == KIND_FP8_E5M2) {  /* codes are the bytes */
        fp8_block(sp->kind == KIND_FP8_E4M3, v, n, s, rs ? u : NULL, mp + row[CODE]);
        if (rs) {
            if (S == 1.0f) for (int64_t i = 0; i < n; i++) rs[i] = v[i] - u[i];
            else for (int64_t i = 0; i < n; i++) rs[i] = (v[i] - u[i]) * invS;
        }
        return;
    }
    const int64_t npad = (n + 39) / 40 * 40;  /* codes zero-padded to whole bytes */
    for (int64_t i = n; i < npad; i++) code[i] = 0;
    float* d = u;  /* the decoded values (the third scratch row) */
    switch (sp->kind) {
    case KIND_SIGN_MEAN:
        for (int64_t i = 0; i < n; i++) {
            code[i] = v[i] >= 0.0f;
            d[i] = v[i] >= 0.0f ? s : -s;
        }
        break;
    case KIND_SIGN_TWO:
        for (int64_t i = 0; i < n; i++) {
            code[i] = v[i] >= 0.0f;
            d[i] = v[i] >= 0.0f ? s : -s0;
        }
        break;
    case KIND_SIGN:
        for (int64_t i = 0; i < n; i++) {
            code[i] = v[i] >= 0.0f;
            d[i] = v[i] >= 0.0f ? 1.0f : -1.0f;
        }
        break;
    case KIND_TERNARY:
        for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
            uint16_t rnd[CHUNK];
            const int64_t m = n - i0 < CHUNK ? n - i0 : CHUNK;
            philox16(rnd, key, (uint32_t)row[CTR], (uint32_t)(i0 / 8), (int)((m + 7) / 8));
            for (int64_t j = 0; j < m; j++) {
                const int64_t i = i0 + j;
                const float wi = wv[i];
                const int keep = (uniform16(rnd[j]) * s) < fabsf(wi);
                const uint8_t c = keep ? (wi > 0.0f ? 2 : 0) : 1;
                code[i] = c;
                d[i] = c == 2 ? s : (c == 0 ? -s : 0.0f);
            }
            residual_update(rs, v, d, i0, m, S, invS);
        }
        rs = NULL;  /* the residual is written */
        break;
    default: { /* KIND_QSGD */
        const float L = (float)sp->levels;
        float r = s > 0.0f ? 1.0f / s : 0.0f;  /* one reciprocal and one step per block */
        r = isfinite(r) ? r : 0.0f;
        const float step = s / L;
        for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
            uint16_t rnd[CHUNK];
            const int64_t m = n - i0 < CHUNK ? n - i0 : CHUNK;
            philox16(rnd, key, (uint32_t)row[CTR], (uint32_t)(i0 / 8), (int)((m + 7) / 8));
            for (int64_t j = 0; j < m; j++) {
                const int64_t i = i0 + j;
                const float ell = (fabsf(v[i]) * r) * L;
                const float lo = (float)(int32_t)ell;  /* = floor: 0 <= ell <= L(1 + 2^-22) */
                float level = lo + ((uniform16(rnd[j]) < ell - lo) ? 1.0f : 0.0f);
                level = level >= 0.0f ? level : 0.0f;
                level = level > L ? L : level;
                code[i] = (uint8_t)(2 * (int32_t)level + (v[i] < 0.0f));
                const float mag = level * step;
                d[i] = v[i] < 0.0f ? -mag : mag;
            }
            residual_update(rs, v, d, i0, m, S, invS);
        }
        rs = NULL;  /* the residual is written */
    }
    }
    if (rs) {
        if (S == 1.0f) for (int64_t i = 0; i < n; i++) rs[i] = v[i] - d[i];
        else for (int64_t i = 0; i < n; i++) rs[i] = (v[i] - d[i]) * invS;
    }
    pack_codes(sp, code, n, mp + row[CODE]);
}

void dqt_encode(const spec_t* sp, const float* x, const int64_t* table, int64_t nblocks,
                uint8_t* msg, float* res, float S, float invS, uint64_t key, int32_t* bad,
                int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float* v = (float*)malloc(sizeof(float) * 3 * (size_t)sp->block);
        uint8_t* code = (uint8_t*)malloc((size_t)sp->block + 40);
#pragma omp for schedule(dynamic, 8)
        for (int64_t k = 0; k < nblocks; k++)
            encode_block(sp, x, table + COLUMNS * k, msg, res, S, invS, key,
                         bad ? bad + k : NULL, v, v + sp->block, v + 2 * sp->block, code);
        free(v);
        free(code);
    }
}

static void decode_block(const spec_t* sp, const uint8_t* msg, const int64_t* row,
                         int64_t npeers, int64_t stride, int64_t flag_off, int mode, float* out,
                         float* acc, uint8_t* code) {
    const int64_t n = row[LEN];
    const float L = (float)sp->levels;
    float* a = acc + sp->block;  /* peer p > 0 decodes here, then acc += a (peer order) */
    for (int64_t p = 0; p < npeers; p++) {
        const uint8_t* mp = msg + row[MSG] + p * stride;
        const int flagged = flag_off >= 0 && mp[flag_off] != 0;
        const float s = get_scale(sp, mp + row[SCALE]);  /* sign_two: m0 */
        const float s1 = sp->kind == KIND_SIGN_TWO ?
                         get_scale(sp, mp + row[SCALE] + scale_bytes(sp)) : s;
        unpack_codes(sp, mp + row[CODE], n, code);
        float* dst = p == 0 ? acc : a;
        switch (sp->kind) {
        case KIND_SIGN_MEAN: case KIND_SIGN:
            for (int64_t i = 0; i < n; i++) dst[i] = code[i] == 1 ? s : -s;
            break;
        case KIND_SIGN_TWO:
            for (int64_t i = 0; i < n; i++) dst[i] = code[i] == 1 ? s1 : -s;
            break;
        case KIND_TERNARY:
            for (int64_t i = 0; i < n; i++) dst[i] = code[i] == 2 ? s : (code[i] == 0 ? -s : 0.0f);
            break;
        case KIND_FP8_E4M3:
            for (int64_t i = 0; i < n; i++) dst[i] = fp8_value(code[i], 3u, 7u) * s;
            break;
        case KIND_FP8_E5M2:
            for (int64_t i = 0; i < n; i++) dst[i] = fp8_value(code[i], 2u, 15u) * s;
            break;
        default: {
            const float step = s / L;
            for (int64_t i = 0; i < n; i++) {
                const float mag = (float)(code[i] >> 1) * step;
                dst[i] = (code[i] & 1u) ? -mag : mag;
            }
        }
        }
        if (flagged) for (int64_t i = 0; i < n; i++) dst[i] = NAN;
        if (p > 0) for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + a[i];
    }
    float* o = out + row[DATA];
    if (mode == MODE_MEAN) {
        const float inv = 1.0f / (float)npeers;
        for (int64_t i = 0; i < n; i++) o[i] = acc[i] * inv;
    } else if (mode == MODE_VOTE) {
        for (int64_t i = 0; i < n; i++)
            o[i] = isnan(acc[i]) ? acc[i] : (acc[i] >= 0.0f ? 1.0f : -1.0f);
    } else {
        for (int64_t i = 0; i < n; i++) o[i] = acc[i];
    }
}

void dqt_decode(const spec_t* sp, const uint8_t* msg, const int64_t* table, int64_t nblocks,
                int64_t npeers, int64_t stride, int64_t flag_off, int mode, float* out,
                int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float* acc = (float*)malloc(sizeof(float) * 2 * (size_t)sp->block);
        uint8_t* code = (uint8_t*)malloc((size_t)sp->block + 40);
#pragma omp for schedule(dynamic, 8)
        for (int64_t k = 0; k < nblocks; k++)
            decode_block(sp, msg, table + COLUMNS * k, npeers, stride, flag_off, mode, out, acc,
                         code);
        free(acc);
        free(code);
    }
}
