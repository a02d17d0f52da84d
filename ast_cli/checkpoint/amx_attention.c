/* Attention for bf16 on Intel AMX tiles: softmax(Q K^T * scale) V, exact (two passes over each row of scores: its
 * maximum, then exp and sum), one window and head at a time. ast_cli/checkpoint/amx.py compiles this file once per
 * machine and calls it through ctypes; see there for why, and for what it replaces.
 *
 * Layout: qkv is the fused projection's output, (batch, tokens, 3, heads, 64) bf16, contiguous; out is
 * (batch, queries, heads * 64) bf16, contiguous: the first `queries` tokens attend to all `tokens`.
 *
 * Per (window, head), on one thread:
 *   K^T and V are copied into the pair-interleaved ("VNNI") layout AMX's B operand reads, keys padded to 32;
 *   per block of 32 queries: S = Q K^T (fp32 tiles, 32 x kpad, kept in the thread's buffer: ~155 KB for 1214
 *   tokens, in L2), each row's max, P = exp(scale * (S - max)) rounded to bf16, the row sums of P in fp32
 *   before rounding; O = P V in fp32 tiles; out = O / sum, rounded to bf16.
 * The arithmetic is the one PyTorch's CPU flash attention does for bf16 (bf16 products summed in fp32, P rounded
 * to bf16 before P V, fp32 sums of the unrounded P), with the whole row at once instead of 512-key blocks. A
 * result depends on its own window and head only: never on the batch around it, nor on the number of threads.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define HD 64       /* head size: the kernel handles 64 only (AST: 768 / 12) */
#define QB 32       /* queries per block: two 16-row A tiles */
#define KB 32       /* keys per block */
#define MAX_THREADS 256

enum { AST_AMX_OK = 0, AST_AMX_NO_PERMISSION = 1, AST_AMX_BAD_ARGS = 2, AST_AMX_NO_MEMORY = 3,
       AST_AMX_NO_THREAD = 4 };

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands out AMX's tile state only on request (once per process). Returns 0 when granted. */
int ast_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? AST_AMX_NO_PERMISSION : AST_AMX_OK;
}

/* Eight 16 x 64-byte tiles: 0-3 accumulate (16 x 16 fp32), 4-5 hold A (16 x 32 bf16), 6-7 hold B. */
static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* 2^t for t <= 0: 2^n * p(f), n = round(t), f = t - n in [-1/2, 1/2], p the
 * degree-5 Taylor polynomial of 2^f (relative error < 2.5e-6; P is then rounded to bf16, 2^-9 relative). */
static inline __m512 exp2_ps(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.3333558146e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Transposes 16 rows of 16 32-bit elements in registers. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

typedef struct {
    uint16_t *kt, *v, *q, *p;  /* K^T and V in B layout (kpad x 64 each), one query block, P (32 x kpad) */
    float *s, *o;              /* scores (32 x kpad), O (32 x 64) */
    size_t kpad;               /* the keys they have room for */
} buffers;

static void free_buffers(void *arg) {
    buffers *b = arg;
    free(b->kt), free(b->v), free(b->q), free(b->p), free(b->s), free(b->o);
    free(b);
}

/* A thread's buffers, kept for its next call (~550 KB for 1214 tokens) and freed when the thread ends (a
 * thread-specific value with a destructor: threads come and go, an OpenMP team per calling thread). A call with
 * more than KEEP_KEYS keys gets buffers of its own, freed after it (release_buffers). */
#define KEEP_KEYS 4096
static pthread_key_t buffers_key;
static pthread_once_t buffers_once = PTHREAD_ONCE_INIT;
static int buffers_key_ok;

static void make_buffers_key(void) { buffers_key_ok = pthread_key_create(&buffers_key, free_buffers) == 0; }

static buffers *thread_buffers(size_t kpad) {
    pthread_once(&buffers_once, make_buffers_key);
    if (!buffers_key_ok)
        return NULL;
    buffers *b = pthread_getspecific(buffers_key);
    if (b && b->kpad >= kpad)
        return b;
    if (b) {
        pthread_setspecific(buffers_key, NULL);
        free_buffers(b);
    }
    b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->kt = aligned_alloc(64, kpad * HD * 2);
    b->v = aligned_alloc(64, kpad * HD * 2);
    b->q = aligned_alloc(64, QB * HD * 2);
    b->p = aligned_alloc(64, QB * kpad * 2);
    b->s = aligned_alloc(64, QB * kpad * 4);
    b->o = aligned_alloc(64, QB * HD * 4);
    b->kpad = kpad;
    if (!b->kt || !b->v || !b->q || !b->p || !b->s || !b->o || pthread_setspecific(buffers_key, b) != 0) {
        free_buffers(b);
        return NULL;
    }
    return b;
}

static void release_buffers(buffers *b) {
    if (b->kpad > KEEP_KEYS) {
        pthread_setspecific(buffers_key, NULL);
        free_buffers(b);
    }
}

/* K^T as B tiles: for each 16 keys and each half of the head (32 values = 16 pairs), a 16 x 16 tile of 32-bit
 * pairs: kt[((key / 16) * 2 + half) * 512 + pair * 32 + (key % 16) * 2 + e] = K[key][half * 32 + pair * 2 + e].
 * V as B tiles: for each 32 keys and each quarter of the head (16 values), 16 key pairs x 16 values x 2 keys:
 * v[((key / 32) * 4 + quarter) * 512 + (key % 32 / 2) * 32 + value * 2 + key % 2] = V[key][quarter * 16 + value].
 * Keys from `tokens` to `kpad` are zero. */
static void copy_keys_values(const uint16_t *k, const uint16_t *v, size_t row, int tokens, int kpad, buffers *b) {
    for (int k0 = 0; k0 < kpad; k0 += 16) {
        __m512i lo[16], hi[16];
        for (int j = 0; j < 16; j++) {
            const int key = k0 + j;
            lo[j] = key < tokens ? _mm512_loadu_si512(k + key * row) : _mm512_setzero_si512();
            hi[j] = key < tokens ? _mm512_loadu_si512(k + key * row + 32) : _mm512_setzero_si512();
        }
        transpose16(lo);
        transpose16(hi);
        uint16_t *dst = b->kt + (size_t)(k0 / 16) * 2 * 512;
        for (int pair = 0; pair < 16; pair++) {
            _mm512_storeu_si512(dst + pair * 32, lo[pair]);
            _mm512_storeu_si512(dst + 512 + pair * 32, hi[pair]);
        }
    }
    /* interleave two keys' values: [a0 b0 a1 b1 ... a15 b15] for values quarter * 16 .. quarter * 16 + 15. A
     * register holds 32 values, so quarters 0-1 come from the first register of each key, 2-3 from the second;
     * permutex2var's lanes 0-31 name the first key's register, 32-63 the second's. */
    __m512i index[2];
    for (int quarter = 0; quarter < 2; quarter++) {
        uint16_t idx[32];
        for (int value = 0; value < 16; value++) {
            idx[2 * value] = (uint16_t)(quarter * 16 + value);
            idx[2 * value + 1] = (uint16_t)(32 + quarter * 16 + value);
        }
        index[quarter] = _mm512_loadu_si512(idx);
    }
    for (int key = 0; key < kpad; key += 2) {
        __m512i even[2], odd[2];
        for (int half = 0; half < 2; half++) {
            even[half] = key < tokens ? _mm512_loadu_si512(v + key * row + half * 32) : _mm512_setzero_si512();
            odd[half] = key + 1 < tokens ? _mm512_loadu_si512(v + (key + 1) * row + half * 32)
                                         : _mm512_setzero_si512();
        }
        uint16_t *dst = b->v + (size_t)(key / 32) * 4 * 512 + (key % 32 / 2) * 32;
        for (int quarter = 0; quarter < 4; quarter++)
            _mm512_storeu_si512(dst + quarter * 512,
                                _mm512_permutex2var_epi16(even[quarter / 2], index[quarter % 2], odd[quarter / 2]));
    }
}

static void attend_head(const uint16_t *window, uint16_t *out, int tokens, int heads, int queries, int head,
                        float scale, buffers *b) {
    const size_t row = (size_t)3 * heads * HD;
    const int kpad = (tokens + KB - 1) / KB * KB, full = tokens / 16 * 16;
    const float scale2 = scale * 1.44269504088896341f; /* exp(x) = 2^(x log2 e) */
    copy_keys_values(window + (size_t)(heads + head) * HD, window + (size_t)(2 * heads + head) * HD, row, tokens,
                     kpad, b);
    float inverse[QB];
    for (int q0 = 0; q0 < queries; q0 += QB) {
        const int nq = queries - q0 < QB ? queries - q0 : QB;
        for (int i = 0; i < QB; i++) {
            if (i < nq)
                memcpy(b->q + i * HD, window + (size_t)(q0 + i) * row + (size_t)head * HD, HD * 2);
            else
                memset(b->q + i * HD, 0, HD * 2);
        }
        /* S = Q K^T */
        for (int k0 = 0; k0 < kpad; k0 += KB) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int half = 0; half < 2; half++) {
                _tile_loadd(4, b->q + half * 32, HD * 2);
                _tile_loadd(5, b->q + 16 * HD + half * 32, HD * 2);
                _tile_loadd(6, b->kt + ((k0 / 16) * 2 + half) * 512, 64);
                _tile_loadd(7, b->kt + ((k0 / 16 + 1) * 2 + half) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, b->s + k0, kpad * 4);
            _tile_stored(1, b->s + k0 + 16, kpad * 4);
            _tile_stored(2, b->s + 16 * kpad + k0, kpad * 4);
            _tile_stored(3, b->s + 16 * kpad + k0 + 16, kpad * 4);
        }
        /* P = exp(scale * (S - row max)) in bf16; fp32 row sums */
        const __m512 scaled = _mm512_set1_ps(scale2);
        const __mmask16 tail = (__mmask16)((1u << (tokens - full)) - 1);
        for (int i = 0; i < nq; i++) {
            float *si = b->s + (size_t)i * kpad;
            uint16_t *pi = b->p + (size_t)i * kpad;
            __m512 max0 = _mm512_set1_ps(-__builtin_inff()), max1 = max0;
            int k = 0;
            for (; k + 32 <= full; k += 32) {
                max0 = _mm512_max_ps(max0, _mm512_loadu_ps(si + k));
                max1 = _mm512_max_ps(max1, _mm512_loadu_ps(si + k + 16));
            }
            for (; k < full; k += 16)
                max0 = _mm512_max_ps(max0, _mm512_loadu_ps(si + k));
            if (tail)
                max1 = _mm512_mask_max_ps(max1, tail, max1, _mm512_maskz_loadu_ps(tail, si + full));
            const __m512 offset = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(max0, max1)) * scale2);
            __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
            for (k = 0; k < kpad; k += 32) { /* padded keys (from `tokens` on) get probability 0 */
                const __mmask16 m0 = k + 16 <= tokens ? 0xffff : k < tokens ? tail : 0;
                const __mmask16 m1 = k + 32 <= tokens ? 0xffff : k + 16 < tokens ? tail : 0;
                const __m512 e0 = _mm512_maskz_mov_ps(m0, exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(si + k), scaled,
                                                                                 offset)));
                const __m512 e1 = _mm512_maskz_mov_ps(m1, exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(si + k + 16),
                                                                                 scaled, offset)));
                sum0 = _mm512_add_ps(sum0, e0);
                sum1 = _mm512_add_ps(sum1, e1);
                _mm512_storeu_si512(pi + k, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            inverse[i] = 1.0f / _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
        }
        for (int i = nq; i < QB; i++)
            memset(b->p + (size_t)i * kpad, 0, (size_t)kpad * 2);
        /* O = P V, in two halves of 32 values */
        for (int half = 0; half < 2; half++) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int k0 = 0; k0 < kpad; k0 += KB) {
                _tile_loadd(4, b->p + k0, kpad * 2);
                _tile_loadd(5, b->p + 16 * kpad + k0, kpad * 2);
                _tile_loadd(6, b->v + ((k0 / 32) * 4 + half * 2) * 512, 64);
                _tile_loadd(7, b->v + ((k0 / 32) * 4 + half * 2 + 1) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, b->o + half * 32, HD * 4);
            _tile_stored(1, b->o + half * 32 + 16, HD * 4);
            _tile_stored(2, b->o + 16 * HD + half * 32, HD * 4);
            _tile_stored(3, b->o + 16 * HD + half * 32 + 16, HD * 4);
        }
        for (int i = 0; i < nq; i++) {
            uint16_t *dst = out + (size_t)(q0 + i) * heads * HD + (size_t)head * HD;
            const __m512 w = _mm512_set1_ps(inverse[i]);
            for (int d = 0; d < HD; d += 32) {
                const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(b->o + i * HD + d), w);
                const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(b->o + i * HD + d + 16), w);
                _mm512_storeu_si512(dst + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
    }
}

/* The thread pool to run on: PyTorch's OpenMP runtime, whose GOMP_parallel amx.py looks up in the running process
 * and hands over (ast_amx_use_openmp). On its threads the kernel never competes with them:
 * they spin for a while after each of oneDNN's GEMMs, and threads of our own running then got 2 cores' worth of
 * work done on less (the whole forward was slower than with SDPA). Without it: threads of our own. */
typedef void (*parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static parallel_fn pool_parallel;

void ast_amx_use_openmp(void *parallel) { pool_parallel = (parallel_fn)parallel; }

typedef struct {
    const uint16_t *qkv;
    uint16_t *out;
    int tokens, heads, queries, items; /* items: window * heads + head */
    float scale;
    int next;   /* the next item to take (atomic) */
    int status; /* the first failure (atomic), else 0 */
} call;

/* Takes items until none are left: a team of any size does them all, each item on one thread. The caller's tile
 * configuration (oneDNN's kernels configure tiles on these threads too) is put back afterwards. */
static void team_member(void *arg) {
    call *c = arg;
    const size_t kpad = (size_t)(c->tokens + KB - 1) / KB * KB;
    buffers *b = thread_buffers(kpad);
    if (!b) {
        int ok = AST_AMX_OK;
        __atomic_compare_exchange_n(&c->status, &ok, AST_AMX_NO_MEMORY, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        return;
    }
    tile_config saved;
    _tile_storeconfig(&saved);
    configure_tiles();
    for (;;) {
        const int item = __atomic_fetch_add(&c->next, 1, __ATOMIC_RELAXED);
        if (item >= c->items)
            break;
        const int window = item / c->heads, head = item % c->heads;
        attend_head(c->qkv + (size_t)window * c->tokens * 3 * c->heads * HD,
                    c->out + (size_t)window * c->queries * c->heads * HD, c->tokens, c->heads, c->queries, head,
                    c->scale, b);
    }
    if (saved.palette_id)
        _tile_loadconfig(&saved);
    else
        _tile_release();
    release_buffers(b);
}

static void *own_thread(void *arg) {
    team_member(arg);
    return NULL;
}

/* The whole call: (windows x heads) items over `threads` threads. Returns 0, or an AST_AMX_* code with `out`
 * unspecified (some items may not have been done). */
int ast_amx_attention(const uint16_t *qkv, uint16_t *out, int windows, int tokens, int heads, int queries,
                      float scale, int threads) {
    if (windows < 1 || tokens < 1 || heads < 1 || queries < 1 || queries > tokens || tokens > (1 << 20) ||
        !(scale > 0.0f && scale <= 1.0f) || (long)windows * heads > (1L << 30))
        return AST_AMX_BAD_ARGS;
    call c = {qkv, out, tokens, heads, queries, windows * heads, scale, 0, AST_AMX_OK};
    threads = threads < 1 ? 1 : threads > c.items ? c.items : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (pool_parallel) {
        pool_parallel(team_member, &c, (unsigned)threads, 0);
    } else {
        pthread_t ids[MAX_THREADS];
        int started = 0;
        for (int t = 0; t < threads; t++)
            if (pthread_create(&ids[started], NULL, own_thread, &c) == 0)
                started++;
        for (int t = 0; t < started; t++)
            pthread_join(ids[t], NULL);
        if (!started)
            return AST_AMX_NO_THREAD;
    }
    if (c.status == AST_AMX_OK && __atomic_load_n(&c.next, __ATOMIC_SEQ_CST) < c.items)
        return AST_AMX_NO_THREAD;
    return c.status;
}
