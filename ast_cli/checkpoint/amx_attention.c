/* Attention for bf16 on Intel AMX tiles: softmax(Q K^T * scale) V, exact (two passes over each row of scores: its
 * maximum, then exp and sum), one window and head at a time. ast_cli/checkpoint/amx.py compiles this file once per
 * machine and calls it through ctypes; see there for why, and for what it replaces. The second half of the file
 * is float32 attention on int16 dot products for CPUs with AVX512-VNNI (int8 models; int16.py), which shares the
 * layouts, the exponential and the buffers; on a CPU without AMX its AMX code is never run.
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
    int16_t *rows;             /* int16 kernel: quantized K and V, row-major (2 x kpad x 64) */
    float *pscale;             /* int16 kernel: each 32 keys' weight scale, per query (32 x kpad / 32) */
    float *scales;             /* int16 kernel: the keys' scales (kpad), the values' (64), the queries' (32) */
    size_t kpad;               /* the keys they have room for */
} buffers;

static void free_buffers(void *arg) {
    buffers *b = arg;
    free(b->kt), free(b->v), free(b->q), free(b->p), free(b->s), free(b->o);
    free(b->rows), free(b->scales), free(b->pscale);
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
    b->rows = aligned_alloc(64, 2 * kpad * HD * 2);
    b->scales = aligned_alloc(64, (kpad + HD + QB) * 4);
    b->pscale = aligned_alloc(64, QB * kpad / 32 * 4);
    b->kpad = kpad;
    if (!b->kt || !b->v || !b->q || !b->p || !b->s || !b->o || !b->rows || !b->scales || !b->pscale ||
        pthread_setspecific(buffers_key, b) != 0) {
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

/* Records `status` as the call's outcome unless an earlier failure was recorded (atomic). */
static void first_failure(int *outcome, int status) {
    int ok = AST_AMX_OK;
    __atomic_compare_exchange_n(outcome, &ok, status, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* This thread's buffers for `tokens` keys, or NULL with AST_AMX_NO_MEMORY recorded in `outcome`. */
static buffers *member_buffers(int tokens, int *outcome) {
    buffers *b = thread_buffers((size_t)(tokens + KB - 1) / KB * KB);
    if (!b)
        first_failure(outcome, AST_AMX_NO_MEMORY);
    return b;
}

/* Takes items until none are left: a team of any size does them all, each item on one thread. The caller's tile
 * configuration (oneDNN's kernels configure tiles on these threads too) is put back afterwards. */
static void team_member(void *arg) {
    call *c = arg;
    buffers *b = member_buffers(c->tokens, &c->status);
    if (!b)
        return;
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

/* Runs member(arg) on `threads` threads: PyTorch's OpenMP team (pool_parallel), else threads of our own. Returns
 * AST_AMX_OK, or AST_AMX_NO_THREAD where no thread of our own started. */
typedef struct {
    void (*member)(void *);
    void *arg;
} team_task;

static void *own_thread(void *task) {
    ((team_task *)task)->member(((team_task *)task)->arg);
    return NULL;
}

static int run_team(void (*member)(void *), void *arg, int threads) {
    if (pool_parallel) {
        pool_parallel(member, arg, (unsigned)threads, 0);
        return AST_AMX_OK;
    }
    team_task task = {member, arg};
    pthread_t ids[MAX_THREADS];
    int started = 0;
    for (int t = 0; t < threads; t++)
        if (pthread_create(&ids[started], NULL, own_thread, &task) == 0)
            started++;
    for (int t = 0; t < started; t++)
        pthread_join(ids[t], NULL);
    return started ? AST_AMX_OK : AST_AMX_NO_THREAD;
}

/* The checks both entry points make of their arguments (bounds the buffers and counters rely on). */
static int bad_shape(int windows, int tokens, int heads, int queries, float scale) {
    return windows < 1 || tokens < 1 || heads < 1 || queries < 1 || queries > tokens || tokens > (1 << 20) ||
           !(scale > 0.0f && scale <= 1.0f) || (long)windows * heads > (1L << 30);
}

static int team_size(int threads, int items) {
    return threads < 1 ? 1 : threads > items ? items : threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* What a call returns once its team is done: the first failure, else AST_AMX_NO_THREAD where items were left. */
static int outcome(int team, int status, int *next, int items) {
    if (team != AST_AMX_OK)
        return team;
    if (status == AST_AMX_OK && __atomic_load_n(next, __ATOMIC_SEQ_CST) < items)
        return AST_AMX_NO_THREAD;
    return status;
}

/* The whole call: (windows x heads) items over `threads` threads. Returns 0, or an AST_AMX_* code with `out`
 * unspecified (some items may not have been done). */
int ast_amx_attention(const uint16_t *qkv, uint16_t *out, int windows, int tokens, int heads, int queries,
                      float scale, int threads) {
    if (bad_shape(windows, tokens, heads, queries, scale))
        return AST_AMX_BAD_ARGS;
    call c = {qkv, out, tokens, heads, queries, windows * heads, scale, 0, AST_AMX_OK};
    const int team = run_team(team_member, &c, team_size(threads, c.items));
    return outcome(team, c.status, &c.next, c.items);
}

/* ---- float32 attention on int16 dot products (AVX512-VNNI's vpdpwssd), for CPUs without AMX ----
 *
 * softmax(Q K^T * scale) V for float32 q, k, v, each (window, tokens or queries, heads * 64) contiguous, out
 * (window, queries, heads * 64) float32. vpdpwssd sums two int16 x int16 products into each int32 lane: 32
 * multiply-adds an instruction against 16 for a float32 FMA, at the same rate on the Sapphire Rapids CPU (two a
 * cycle). Per (window, head), on one thread:
 *   each key and each query is rounded to int16 with a scale of its own, its largest magnitude -> QK_TOP (13
 *   bits: 64 products of 4095 x 4095 stay below 2^31); each of the head's 64 value channels with a scale of its
 *   own over all keys, its largest magnitude -> V_TOP;
 *   S = Q K^T in int32, back to float32 times both scales; each row's max; P = exp(scale * (S - max)), in (0, 1],
 *   rounded to 15 bits in blocks of 32 keys, each block against its own largest weight (-> P_TOP) with a float
 *   scale of its own, and the row sum taken of the rounded P in float32 (so the weights sum to 1 exactly);
 *   O = P V in int32 per block of 32 keys (32 x 32767 x 2047 < 2^31: no overflow, whatever the values), moved
 *   into float32 times the block's scale, then times 1 / the row sum and the channel scales.
 * Inputs the scales cannot carry go to SDPA (status AST_AMX_BAD_ARGS): a value that is not finite, a row or
 * channel so small that its inverse scale overflows, scores past float32's range.
 * Rounding errors: 2^-13 of a row's largest magnitude for q and k, 2^-12 of a channel's for v, 2^-16 of the
 * block's largest weight for P. bf16 keeps 2^-9 of each value. A result depends only on its own window and head.
 * Returns AST_AMX_BAD_ARGS where an input is not finite (the caller runs float32 SDPA, which propagates it). */
#define QK_TOP 4095.0f
#define V_TOP 2047.0f
#define P_TOP 32767.0f
#define PV_FLUSH 32 /* keys summed in int32 before the sum moves into float32 */

/* 64 floats -> 64 int16 of x * inverse (round to nearest even) */
static inline void round_row(const float *x, __m512 inverse0, __m512 inverse1, __m512 inverse2, __m512 inverse3,
                             int16_t *dst) {
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
        _mm512_mul_ps(_mm512_loadu_ps(x), inverse0))));
    _mm256_storeu_si256((__m256i *)(dst + 16), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
        _mm512_mul_ps(_mm512_loadu_ps(x + 16), inverse1))));
    _mm256_storeu_si256((__m256i *)(dst + 32), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
        _mm512_mul_ps(_mm512_loadu_ps(x + 32), inverse2))));
    _mm256_storeu_si256((__m256i *)(dst + 48), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
        _mm512_mul_ps(_mm512_loadu_ps(x + 48), inverse3))));
}

/* The largest magnitude of 64 floats; NaN where one is NaN (max alone may drop a NaN: it returns its second
 * operand when either is one) */
static inline float row_max_abs(const float *x) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16), x2 = _mm512_loadu_ps(x + 32),
                 x3 = _mm512_loadu_ps(x + 48);
    const __m512 any = _mm512_add_ps(_mm512_add_ps(x0, x1), _mm512_add_ps(x2, x3));
    if (_mm512_cmp_ps_mask(any, any, _CMP_UNORD_Q))
        return __builtin_nanf("");
    const __m512 a = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1));
    const __m512 b = _mm512_max_ps(_mm512_abs_ps(x2), _mm512_abs_ps(x3));
    return _mm512_reduce_max_ps(_mm512_max_ps(a, b));
}

/* Rows `n` to `kpad` are zero with scale 0. Returns 0, or -1 where a value is not finite. */
static int round_rows(const float *src, size_t stride, int n, int kpad, float top, int16_t *dst, float *scales) {
    for (int j = 0; j < kpad; j++) {
        const float largest = j < n ? row_max_abs(src + j * stride) : 0.0f;
        if (!(largest <= __FLT_MAX__))
            return -1;
        const float inv = largest > 0.0f ? top / largest : 0.0f;
        if (!(inv <= __FLT_MAX__))
            return -1;
        const __m512 inverse = _mm512_set1_ps(inv);
        scales[j] = largest / top;
        if (j < n)
            round_row(src + j * stride, inverse, inverse, inverse, inverse, dst + (size_t)j * HD);
        else
            memset(dst + (size_t)j * HD, 0, HD * 2);
    }
    return 0;
}

/* Values: one scale per channel over all keys. Returns 0, or -1 where a value is not finite. */
static int round_values(const float *src, size_t stride, int n, int kpad, int16_t *dst, float *scales) {
    __m512 largest[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int j = 0; j < n; j++)
        for (int c = 0; c < 4; c++)
            largest[c] = _mm512_max_ps(largest[c], _mm512_abs_ps(_mm512_loadu_ps(src + j * stride + c * 16)));
    __m512 inverse[4];
    const __m512 top = _mm512_set1_ps(V_TOP);
    for (int c = 0; c < 4; c++) {
        if (!(_mm512_reduce_max_ps(largest[c]) <= __FLT_MAX__))  /* NaN: the max above drops it, the sum keeps it */
            return -1;
        const __mmask16 nonzero = _mm512_cmp_ps_mask(largest[c], _mm512_setzero_ps(), _CMP_GT_OQ);
        inverse[c] = _mm512_maskz_div_ps(nonzero, top, largest[c]);
        if (!(_mm512_reduce_max_ps(inverse[c]) <= __FLT_MAX__))
            return -1;
        _mm512_storeu_ps(scales + c * 16, _mm512_div_ps(largest[c], top));
    }
    for (int j = 0; j < kpad; j++) {
        if (j < n) {
            const __m512 x = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(src + j * stride),
                                                         _mm512_loadu_ps(src + j * stride + 16)),
                                           _mm512_add_ps(_mm512_loadu_ps(src + j * stride + 32),
                                                         _mm512_loadu_ps(src + j * stride + 48)));
            if (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q))  /* a NaN in this row */
                return -1;
            round_row(src + j * stride, inverse[0], inverse[1], inverse[2], inverse[3], dst + (size_t)j * HD);
        } else {
            memset(dst + (size_t)j * HD, 0, HD * 2);
        }
    }
    return 0;
}

/* The two microkernels keep their accumulators in named registers, updated by inline assembly: with arrays of
 * them, or with the _mm512_dpwssd_epi32 intrinsic, gcc 12 kept some in memory or copied them between registers
 * at every step, and the attention ran 1.5x slower. */
#define DPWSSD(acc, a, b) __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

/* one query row's pair of query values times two chunks of 16 keys */
#define S_ROW(r)                                                                                               \
    do {                                                                                                       \
        int32_t qp;                                                                                            \
        memcpy(&qp, qr + r * HD, 4);                                                                           \
        const __m512i qv = _mm512_set1_epi32(qp);                                                              \
        DPWSSD(a##r##0, k0v, qv);                                                       \
        DPWSSD(a##r##1, k1v, qv);                                                       \
    } while (0)
#define S_STORE(r)                                                                                             \
    do {                                                                                                       \
        const __m512 qs = _mm512_set1_ps(qscale[r0 + r]);                                                      \
        float *row = s + (size_t)(r0 + r) * kpad + k0;                                                         \
        _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_cvtepi32_ps(a##r##0), _mm512_mul_ps(ks0, qs)));            \
        _mm512_storeu_ps(row + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(a##r##1), _mm512_mul_ps(ks1, qs)));       \
    } while (0)

/* S rows r0 .. r0 + 7, keys k0 .. k0 + 31 = (Q K^T) * query scale * key scale */
static void scores_int16(const int16_t *q, const int16_t *kt, const float *qscale, const float *kscale, float *s,
                         size_t kpad, int r0, int k0) {
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
            a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00, a60 = a00, a61 = a00, a70 = a00, a71 = a00;
    const int16_t *b0 = kt + (size_t)(k0 / 16) * 2 * 512, *b1 = b0 + 2 * 512;
    const int16_t *qr = q + (size_t)r0 * HD;
    for (int half = 0; half < 2; half++, b0 += 512, b1 += 512) {
#pragma GCC unroll 1
        for (int pair = 0; pair < 16; pair++, qr += 2) {
            const __m512i k0v = _mm512_load_si512(b0 + pair * 32), k1v = _mm512_load_si512(b1 + pair * 32);
            S_ROW(0); S_ROW(1); S_ROW(2); S_ROW(3); S_ROW(4); S_ROW(5); S_ROW(6); S_ROW(7);
        }
    }
    const __m512 ks0 = _mm512_loadu_ps(kscale + k0), ks1 = _mm512_loadu_ps(kscale + k0 + 16);
    S_STORE(0); S_STORE(1); S_STORE(2); S_STORE(3); S_STORE(4); S_STORE(5); S_STORE(6); S_STORE(7);
}

/* one row's pair of weights times the 64 channels of a pair of keys */
#define PV_ROW(r)                                                                                              \
    do {                                                                                                       \
        int32_t pp;                                                                                            \
        memcpy(&pp, pr + (size_t)r * kpad, 4);                                                                 \
        const __m512i pv = _mm512_set1_epi32(pp);                                                              \
        DPWSSD(a##r##0, v0, pv);                                                        \
        DPWSSD(a##r##1, v1, pv);                                                        \
        DPWSSD(a##r##2, v2, pv);                                                        \
        DPWSSD(a##r##3, v3, pv);                                                        \
    } while (0)
#define PV_ADD(r, c)                                                                                           \
    _mm512_store_ps(o + (size_t)(r0 + r) * HD + c * 16,                                                        \
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##r##c), _mm512_set1_ps(ps[(size_t)(r0 + r) * nb]),           \
                                    _mm512_load_ps(o + (size_t)(r0 + r) * HD + c * 16)))
#define PV_ADD_ROW(r) do { PV_ADD(r, 0); PV_ADD(r, 1); PV_ADD(r, 2); PV_ADD(r, 3); } while (0)

/* O rows r0 .. r0 + 3 (all 64 channels, float32, not yet scaled) += P V over keys k0 .. k0 + PV_FLUSH - 1 */
static void values_int16(const int16_t *p, const int16_t *v, float *o, size_t kpad, int r0, size_t k0,
                         const float *pscale) {
    const size_t nb = kpad / 32;
    const float *ps = pscale + k0 / 32;
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
            a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    const int16_t *pr = p + (size_t)r0 * kpad + k0;
#pragma GCC unroll 1
    for (size_t key = k0; key < k0 + PV_FLUSH; key += 2, pr += 2) {
        const int16_t *vv = v + (key / 32) * 4 * 512 + (key % 32 / 2) * 32;
        const __m512i v0 = _mm512_load_si512(vv), v1 = _mm512_load_si512(vv + 512),
                      v2 = _mm512_load_si512(vv + 1024), v3 = _mm512_load_si512(vv + 1536);
        PV_ROW(0); PV_ROW(1); PV_ROW(2); PV_ROW(3);
    }
    PV_ADD_ROW(0); PV_ADD_ROW(1); PV_ADD_ROW(2); PV_ADD_ROW(3);
}

static int attend_head_int16(const float *q, const float *k, const float *v, float *out, int tokens, int heads,
                             int queries, int head, float scale, buffers *b) {
    const size_t width = (size_t)heads * HD;
    const int kpad = (tokens + KB - 1) / KB * KB, full = tokens / 16 * 16;
    const float scale2 = scale * 1.44269504088896341f;
    int16_t *krows = b->rows, *vrows = b->rows + (size_t)kpad * HD;
    float *kscale = b->scales, *vscale = b->scales + kpad, *qscale = b->scales + kpad + HD;
    int16_t *qb = (int16_t *)b->q, *pb = (int16_t *)b->p;
    if (round_rows(k + (size_t)head * HD, width, tokens, kpad, QK_TOP, krows, kscale) ||
        round_values(v + (size_t)head * HD, width, tokens, kpad, vrows, vscale))
        return -1;
    copy_keys_values((const uint16_t *)krows, (const uint16_t *)vrows, HD, tokens, kpad, b);
    const int16_t *kt = (const int16_t *)b->kt, *vp = (const int16_t *)b->v;
    float kmax = 0.0f;
    for (int j = 0; j < tokens; j++)
        kmax = kscale[j] > kmax ? kscale[j] : kmax;
    float inverse[QB];
    for (int q0 = 0; q0 < queries; q0 += QB) {
        const int nq = queries - q0 < QB ? queries - q0 : QB, groups = (nq + 7) / 8;
        if (round_rows(q + (size_t)q0 * width + (size_t)head * HD, width, nq, groups * 8, QK_TOP, qb, qscale))
            return -1;
        for (int i = 0; i < nq; i++) { /* S comes out times scale * log2(e): the exponent's base is 2 */
            qscale[i] *= scale2;
            if (!(qscale[i] * kmax <= __FLT_MAX__ / (64.0f * QK_TOP * QK_TOP)))
                return -1;
        }
        for (int k0 = 0; k0 < kpad; k0 += KB) /* each block of keys from L2 once, then from L1 */
            for (int g = 0; g < groups; g++)
                scores_int16(qb, kt, qscale, kscale, b->s, kpad, g * 8, k0);
        const __mmask16 tail = (__mmask16)((1u << (tokens - full)) - 1);
        for (int i = 0; i < nq; i++) {
            float *si = b->s + (size_t)i * kpad;
            int16_t *pi = pb + (size_t)i * kpad;
            __m512 max0 = _mm512_set1_ps(-__builtin_inff());
            for (int kk = 0; kk < full; kk += 16)
                max0 = _mm512_max_ps(max0, _mm512_loadu_ps(si + kk));
            if (tail)
                max0 = _mm512_mask_max_ps(max0, tail, max0, _mm512_maskz_loadu_ps(tail, si + full));
            /* S - max: exactly 0 at the max, so every weight is at most 1 (S * scale - max * scale, as one FMA, is
             * off by the rounding of max * scale: 2^0.03 at scores of 10^6, 33400 > 32767) */
            const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(max0));
            if (!(_mm512_cvtss_f32(largest) <= __FLT_MAX__))  /* a score past float32's range */
                return -1;
            /* Each 32 keys' weights are rounded against their own largest, with a scale of their own: against the
             * row's largest, a weight under 1/65534 of it became 0, and a row of many small weights behind one
             * large one (a "sink" key) lost most of its mass. The row's sum is of the rounded weights. */
            __m512 total = _mm512_setzero_ps();
            for (int kk = 0; kk < kpad; kk += 32) {
                const __mmask16 m0 = kk + 16 <= tokens ? 0xffff : kk < tokens ? tail : 0;
                const __mmask16 m1 = kk + 32 <= tokens ? 0xffff : kk + 16 < tokens ? tail : 0;
                const __m512 e0 = _mm512_maskz_mov_ps(m0, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(si + kk), largest)));
                const __m512 e1 = _mm512_maskz_mov_ps(m1, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(si + kk + 16),
                                                                               largest)));
                const float block = _mm512_reduce_max_ps(_mm512_max_ps(e0, e1)), step = block / P_TOP;
                const __m512 inv = _mm512_set1_ps(block > 0.0f ? P_TOP / block : 0.0f);
                const __m512i lo = _mm512_cvtps_epi32(_mm512_mul_ps(e0, inv));
                const __m512i hi = _mm512_cvtps_epi32(_mm512_mul_ps(e1, inv));
                _mm256_storeu_si256((__m256i *)(pi + kk), _mm512_cvtsepi32_epi16(lo)); /* saturating */
                _mm256_storeu_si256((__m256i *)(pi + kk + 16), _mm512_cvtsepi32_epi16(hi));
                b->pscale[(size_t)i * (kpad / 32) + kk / 32] = step;
                total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), _mm512_set1_ps(step), total);
            }
            inverse[i] = 1.0f / _mm512_reduce_add_ps(total);
        }
        const int rows = (nq + 3) / 4 * 4; /* rows nq .. rows - 1: zero weights, their outputs unused */
        memset(pb + (size_t)nq * kpad, 0, (size_t)(rows - nq) * kpad * 2);
        memset(b->o, 0, (size_t)rows * HD * 4);
        memset(b->pscale + (size_t)nq * (kpad / 32), 0, (size_t)(rows - nq) * (kpad / 32) * 4);
        for (size_t k0 = 0; k0 < (size_t)kpad; k0 += PV_FLUSH)
            for (int r0 = 0; r0 < rows; r0 += 4)
                values_int16(pb, vp, b->o, kpad, r0, k0, b->pscale);
        for (int i = 0; i < nq; i++) {
            float *dst = out + (size_t)(q0 + i) * width + (size_t)head * HD;
            const __m512 w = _mm512_set1_ps(inverse[i]);
            for (int c = 0; c < 4; c++)
                _mm512_storeu_ps(dst + c * 16, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(b->o + i * HD + c * 16),
                                                                           w), /* 1 / sum first: no overflow */
                                                             _mm512_loadu_ps(vscale + c * 16)));
        }
    }
    return 0;
}

typedef struct {
    const float *q, *k, *v;
    float *out;
    int tokens, heads, queries, items;
    float scale;
    int next, status;
} int16_call;

static void int16_member(void *arg) {
    int16_call *c = arg;
    buffers *b = member_buffers(c->tokens, &c->status);
    if (!b)
        return;
    const size_t width = (size_t)c->heads * HD;
    for (;;) {
        const int item = __atomic_fetch_add(&c->next, 1, __ATOMIC_RELAXED);
        if (item >= c->items)
            break;
        const int window = item / c->heads, head = item % c->heads;
        if (attend_head_int16(c->q + (size_t)window * c->queries * width, c->k + (size_t)window * c->tokens * width,
                              c->v + (size_t)window * c->tokens * width,
                              c->out + (size_t)window * c->queries * width, c->tokens, c->heads, c->queries, head,
                              c->scale, b)) {
            first_failure(&c->status, AST_AMX_BAD_ARGS);
        }
    }
    release_buffers(b);
}

/* q: (windows, queries, heads * 64), k and v: (windows, tokens, heads * 64), out: (windows, queries, heads * 64),
 * all float32 and contiguous. Returns 0, or an AST_AMX_* code with `out` unspecified. */
int ast_int16_attention(const float *q, const float *k, const float *v, float *out, int windows, int tokens,
                        int heads, int queries, float scale, int threads) {
    if (bad_shape(windows, tokens, heads, queries, scale))
        return AST_AMX_BAD_ARGS;
    int16_call c = {q, k, v, out, tokens, heads, queries, windows * heads, scale, 0, AST_AMX_OK};
    const int team = run_team(int16_member, &c, team_size(threads, c.items));
    return outcome(team, c.status, &c.next, c.items);
}
