/* Block-wise 4-bit dequantisation on the CPU, for lowrank_gpu.quant.nf4 (loaded with ctypes by
 * lowrank_gpu.quant.native; the pure PyTorch path is used where no C compiler is found).
 *
 *     x_j = t[c_j] * a_b,   b = j / blocksize,
 *
 * with the codes packed two per byte, the first in the high nibble (the layout of
 * lowrank_ref.quant.blockwise and of bitsandbytes). The product is the same single float32
 * multiply as the NumPy reference, so the bits are the same: per block, the 16 scaled levels
 * s[c] = t[c] * a_b are computed once (16 products instead of blocksize) and every value of the
 * block is then a lookup s[c_j], which the x86 variants do 16 (AVX-512) or 8 (AVX2) at a time with
 * a register permute. blocksize is even (checked in Python), so a block starts on a byte.
 */
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LR_X86 1
#include <immintrin.h>
#define LR_STREAM_VALUES (1 << 23)  /* 32 MiB of float32 output */
#endif

/* The plain loop (every machine; the tails of the vector variants). */
static void block_scalar(const uint8_t *p, const float *s, float *out, int64_t count)
{
    int64_t j = 0;
    for (; j + 1 < count; j += 2, p++) {
        out[j] = s[*p >> 4];       /* c_{2k} = byte >> 4 */
        out[j + 1] = s[*p & 15];   /* c_{2k+1} = byte & 15 */
    }
    if (j < count)                 /* an odd last value: the high nibble only */
        out[j] = s[*p >> 4];
}

static void scale_table(const float *table, float a, float *s)
{
    for (int c = 0; c < 16; c++)
        s[c] = table[c] * a;       /* s_c = t_c * a_b, one float32 product as in NumPy */
}

static void dequant_scalar(const uint8_t *packed, const float *absmax, const float *table,
                           float *out, int64_t n, int64_t blocksize)
{
    float s[16];
    for (int64_t j0 = 0, b = 0; j0 < n; j0 += blocksize, b++) {
        int64_t count = n - j0 < blocksize ? n - j0 : blocksize;
        scale_table(table, absmax[b], s);
        block_scalar(packed + j0 / 2, s, out + j0, count);
    }
}

#ifdef LR_X86
/* 8 packed bytes -> their 16 codes in value order, one per byte of the result. */
#define LR_CODES16(p) ({                                                            \
    __m128i w_ = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(p)));          \
    _mm_or_si128(_mm_srli_epi16(w_, 4), _mm_slli_epi16(_mm_and_si128(w_, _mm_set1_epi16(15)), 8)); })

__attribute__((target("avx512f")))
static void dequant_avx512(const uint8_t *packed, const float *absmax, const float *table,
                           float *out, int64_t n, int64_t blocksize, int stream)
{
    const __m512 t = _mm512_loadu_ps(table);
    float s16[16];
    for (int64_t j0 = 0, b = 0; j0 < n; j0 += blocksize, b++) {
        int64_t count = n - j0 < blocksize ? n - j0 : blocksize;
        const __m512 s = _mm512_mul_ps(t, _mm512_set1_ps(absmax[b]));  /* s_c = t_c * a_b */
        const uint8_t *p = packed + j0 / 2;
        float *o = out + j0;
        int64_t j = 0;
        if (stream) {
            /* four 64-byte lines computed, then streamed together (the write-combining buffers
             * fill whole neighbouring lines: 1.7-1.9 ms against 2.2-2.6 ms one line at a time) */
            for (; j + 64 <= count; j += 64, p += 32) {
                __m512 v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(LR_CODES16(p)), s);
                __m512 v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(LR_CODES16(p + 8)), s);
                __m512 v2 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(LR_CODES16(p + 16)), s);
                __m512 v3 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(LR_CODES16(p + 24)), s);
                _mm512_stream_ps(o + j, v0);
                _mm512_stream_ps(o + j + 16, v1);
                _mm512_stream_ps(o + j + 32, v2);
                _mm512_stream_ps(o + j + 48, v3);
            }
            for (; j + 16 <= count; j += 16, p += 8)  /* 16 values from 8 bytes */
                _mm512_stream_ps(o + j, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(LR_CODES16(p)), s));
        }
        else
            for (; j + 16 <= count; j += 16, p += 8)
                _mm512_storeu_ps(o + j, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(LR_CODES16(p)), s));
        if (j < count) {
            _mm512_storeu_ps(s16, s);
            block_scalar(p, s16, o + j, count - j);
        }
    }
}

__attribute__((target("avx2")))
static void dequant_avx2(const uint8_t *packed, const float *absmax, const float *table,
                         float *out, int64_t n, int64_t blocksize, int stream)
{
    const __m256 t_lo = _mm256_loadu_ps(table), t_hi = _mm256_loadu_ps(table + 8);
    const __m256i seven = _mm256_set1_epi32(7);
    float s16[16];
    for (int64_t j0 = 0, b = 0; j0 < n; j0 += blocksize, b++) {
        int64_t count = n - j0 < blocksize ? n - j0 : blocksize;
        const __m256 a = _mm256_set1_ps(absmax[b]);
        const __m256 s_lo = _mm256_mul_ps(t_lo, a), s_hi = _mm256_mul_ps(t_hi, a);
        const uint8_t *p = packed + j0 / 2;
        float *o = out + j0;
        int64_t j = 0;
        for (; j + 16 <= count; j += 16, p += 8) {
            __m128i c = LR_CODES16(p);
            for (int h = 0; h < 2; h++, c = _mm_srli_si128(c, 8)) {
                __m256i idx = _mm256_cvtepu8_epi32(c);  /* 8 codes; the permute reads idx mod 8 */
                __m256 lo = _mm256_permutevar8x32_ps(s_lo, idx), hi = _mm256_permutevar8x32_ps(s_hi, idx);
                __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                __m256 v = _mm256_blendv_ps(lo, hi, upper);
                if (stream)
                    _mm256_stream_ps(o + j + 8 * h, v);
                else
                    _mm256_storeu_ps(o + j + 8 * h, v);
            }
        }
        if (j < count) {
            _mm256_storeu_ps(s16, s_lo);
            _mm256_storeu_ps(s16 + 8, s_hi);
            block_scalar(p, s16, o + j, count - j);
        }
    }
}
#endif

/* Which variant runs here: 2 = AVX-512, 1 = AVX2, 0 = the plain loop. force < 0: the best one. */
int lr_dequant4_variant(int force)
{
#ifdef LR_X86
    __builtin_cpu_init();
    int best = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    int best = 0;
#endif
    return force < 0 || force > best ? best : force;
}

/* out[0..n) = t[c_j] * absmax[j / blocksize]; packed holds ceil(n/2) bytes. */
void lr_dequantize_4bit(const uint8_t *packed, const float *absmax, const float *table, float *out,
                        int64_t n, int64_t blocksize, int variant)
{
#ifdef LR_X86
    /* An output far larger than the caches is written with streaming stores (no read of the lines
     * it overwrites first, the lines not kept in cache), where every vector store is aligned. */
    int stream = n >= LR_STREAM_VALUES && ((uintptr_t)out % 64) == 0 && blocksize % 16 == 0;
    if (variant == 2 || variant == 1) {
        if (variant == 2)
            dequant_avx512(packed, absmax, table, out, n, blocksize, stream);
        else
            dequant_avx2(packed, absmax, table, out, n, blocksize, stream);
        if (stream)
            _mm_sfence();  /* the streamed stores are visible before this returns */
        return;
    }
#endif
    (void)variant;
    dequant_scalar(packed, absmax, table, out, n, blocksize);
}
