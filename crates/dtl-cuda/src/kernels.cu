// The kernels of dtl's GPU device, compiled at run time with NVRTC (no CUDA header needed).
//
// Conventions:
// - every buffer a kernel reads or writes holds f32 or bf16 values: bit j of the last parameter
//   `st` is set when parameter j points to bf16 (the host sets it from the buffers). Values are
//   read and written through `dtl_ref` only, which converts; all arithmetic is f32 (f64 where
//   noted), whatever the storage;
// - matrices are row-major; token tensors are (batch, tokens, width) with the width fastest;
// - the host checks every size against the buffers before a launch and that every element
//   count fits a 32-bit int, so `int` indices are exact; loop counters that step by the whole
//   grid are 64-bit so that stepping past the end cannot overflow;
// - elementwise kernels use grid-stride loops, so any grid size is correct;
// - "row" kernels run one warp per row (`WARP_ROWS`) or one block per row (`BLOCK_ROWS`), with
//   a block size that is a multiple of 32 and at most 1024;
// - reductions accumulate in f32 (f64 for sum_squares) in a fixed order: results do not depend on
//   timing;
// - kernels launched with 1024-thread blocks say so (__launch_bounds__), so that the compiler keeps
//   them within the registers such a block may use.

#define DTL_INV_SQRT2 0.70710678118654752440f
#define DTL_INV_SQRT_2PI 0.39894228040143267794f
#define DTL_INF __int_as_float(0x7f800000)

typedef long long i64;

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)gridDim.x * blockDim.x)

// ---- storage ------------------------------------------------------------------------------

// bf16 is the upper half of an f32: widening is a shift, narrowing rounds to nearest even and
// keeps a NaN a (quiet) NaN. Bit operations only, so that no CUDA header is needed.
__device__ __forceinline__ float dtl_bf16_to_f32(unsigned short h) {
    return __int_as_float((int)((unsigned)h << 16));
}

__device__ __forceinline__ unsigned short dtl_f32_to_bf16(float v) {
    const unsigned u = (unsigned)__float_as_int(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// A buffer of f32 or bf16 values: `ld` widens to f32, `st` rounds to the storage, `+` moves by
// values.
struct dtl_ref {
    void* p;
    int bf;
    __device__ __forceinline__ float ld(i64 i) const {
        return bf ? dtl_bf16_to_f32(((const unsigned short*)p)[i]) : ((const float*)p)[i];
    }
    __device__ __forceinline__ void st(i64 i, float v) const {
        if (bf) {
            ((unsigned short*)p)[i] = dtl_f32_to_bf16(v);
        } else {
            ((float*)p)[i] = v;
        }
    }
    __device__ __forceinline__ dtl_ref operator+(i64 i) const {
        return dtl_ref{(void*)((char*)p + i * (bf ? 2 : 4)), bf};
    }
};

// Parameter `ptr` (parameter number `j` of the kernel) with its storage from `st`.
#define REF(ptr, j) (dtl_ref{(void*)(ptr), (st >> (j)) & 1})

// ---- reductions ---------------------------------------------------------------------------

__device__ __forceinline__ float dtl_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float dtl_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int dtl_warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the thread block; every thread gets the result. `scratch` holds 33 floats.
__device__ float dtl_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = dtl_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < warps ? scratch[lane] : 0.0f;
        t = dtl_warp_sum(t);
        if (lane == 0) scratch[32] = t;
    }
    __syncthreads();
    return scratch[32];
}

// ---- elementwise --------------------------------------------------------------------------

// y[..n] = value.
extern "C" __global__ void dtl_fill(float* y, int n, float value, int st) {
    const dtl_ref Y = REF(y, 0);
    GRID_STRIDE(i, n) Y.st(i, value);
}

// y[..n] = x[..n], each in its own storage.
extern "C" __global__ void dtl_convert(const float* x, float* y, int n, int st) {
    const dtl_ref X = REF(x, 0), Y = REF(y, 1);
    GRID_STRIDE(i, n) Y.st(i, X.ld(i));
}

// y[..n] += x[..n].
extern "C" __global__ void dtl_add(float* y, const float* x, int n, int st) {
    const dtl_ref Y = REF(y, 0), X = REF(x, 1);
    GRID_STRIDE(i, n) Y.st(i, Y.ld(i) + X.ld(i));
}

// y (m x n) = bias broadcast over the rows, or y += bias with `accumulate`.
extern "C" __global__ void dtl_bias_rows(float* y, const float* bias, int m, int n, int accumulate, int st) {
    const dtl_ref Y = REF(y, 0), B = REF(bias, 1);
    const i64 total = (i64)m * n;
    GRID_STRIDE(i, total) {
        const float b = B.ld((int)(i % n));
        Y.st(i, accumulate ? Y.ld(i) + b : b);
    }
}

// db (n) (=|+=) column sums of dy (m x n). Block (32, 32): 32 columns, 32 row lanes; grid:
// ceil(n / 32) blocks. Each lane sums every 32nd row, then the lanes are added in order.
extern "C" __global__ void __launch_bounds__(1024)
    dtl_sum_rows(const float* dy, float* db, int m, int n, int accumulate, int st) {
    __shared__ float part[32][33];
    const dtl_ref G = REF(dy, 0), D = REF(db, 1);
    const int col = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (col < n) {
        for (int r = threadIdx.y; r < m; r += blockDim.y) s += G.ld((i64)r * n + col);
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < n) {
        float t = 0.0f;
        for (int j = 0; j < (int)blockDim.y; ++j) t += part[j][threadIdx.x];
        D.st(col, accumulate ? D.ld(col) + t : t);
    }
}

__device__ __forceinline__ float dtl_gelu_f(float x) {
    return 0.5f * x * (1.0f + erff(x * DTL_INV_SQRT2));
}

__device__ __forceinline__ float dtl_gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * DTL_INV_SQRT2)) + x * DTL_INV_SQRT_2PI * expf(-0.5f * x * x);
}

// y = gelu(x), erf form.
extern "C" __global__ void dtl_gelu(const float* x, float* y, int n, int st) {
    const dtl_ref X = REF(x, 0), Y = REF(y, 1);
    GRID_STRIDE(i, n) Y.st(i, dtl_gelu_f(X.ld(i)));
}

// g *= gelu'(u).
extern "C" __global__ void dtl_gelu_vjp(const float* u, float* g, int n, int st) {
    const dtl_ref U = REF(u, 0), G = REF(g, 1);
    GRID_STRIDE(i, n) G.st(i, G.ld(i) * dtl_gelu_grad(U.ld(i)));
}

__device__ __forceinline__ float dtl_sigmoid(float x) {
    return 1.0f / (1.0f + expf(-x));
}

// y = z * sigmoid(beta * z).
extern "C" __global__ void dtl_swish(const float* z, float* y, int n, float beta, int st) {
    const dtl_ref Z = REF(z, 0), Y = REF(y, 1);
    GRID_STRIDE(i, n) {
        const float v = Z.ld(i);
        Y.st(i, v * dtl_sigmoid(beta * v));
    }
}

// dz (=|+=) dy * (s + beta z s (1 - s)), s = sigmoid(beta z).
extern "C" __global__ void dtl_swish_vjp(const float* z, const float* dy, float* dz, int n, float beta,
                                         int accumulate, int st) {
    const dtl_ref Z = REF(z, 0), G = REF(dy, 1), D = REF(dz, 2);
    GRID_STRIDE(i, n) {
        const float v = Z.ld(i);
        const float s = dtl_sigmoid(beta * v);
        const float g = G.ld(i) * (s + beta * v * s * (1.0f - s));
        D.st(i, accumulate ? D.ld(i) + g : g);
    }
}

// x += scales[sample] * branch, each sample spanning `per_sample` values; a sample whose scale
// is 0 (dropped by stochastic depth) is left as it is, whatever its branch holds.
extern "C" __global__ void dtl_add_scaled(float* x, const float* branch, const float* scales, int n,
                                          int per_sample, int st) {
    const dtl_ref X = REF(x, 0), B = REF(branch, 1), S = REF(scales, 2);
    GRID_STRIDE(i, n) {
        const float s = S.ld((int)i / per_sample);
        if (s != 0.0f) X.st(i, X.ld(i) + s * B.ld(i));
    }
}

// out = scales[sample] * g.
extern "C" __global__ void dtl_scaled(const float* g, const float* scales, float* out, int n, int per_sample,
                                      int st) {
    const dtl_ref G = REF(g, 0), S = REF(scales, 1), O = REF(out, 2);
    GRID_STRIDE(i, n) O.st(i, S.ld((int)i / per_sample) * G.ld(i));
}

// ---- LayerNorm (one block per row) --------------------------------------------------------

// Mean and reciprocal standard deviation of one row (biased variance, two passes).
__device__ void dtl_row_moments(dtl_ref r, int d, float eps, float* scratch, float* mean, float* rstd) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += r.ld(i);
    const float m = dtl_block_sum(s, scratch) / (float)d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = r.ld(i) - m;
        v += c * c;
    }
    const float var = dtl_block_sum(v, scratch) / (float)d;
    *mean = m;
    *rstd = rsqrtf(var + eps);
}

// y = (x - mean) * rstd * gamma + beta, row by row. Grid: rows.
extern "C" __global__ void dtl_layer_norm(const float* x, const float* gamma, const float* beta, float* y,
                                          int d, float eps, int st) {
    __shared__ float scratch[33];
    const dtl_ref Ga = REF(gamma, 1), Be = REF(beta, 2);
    const i64 row = blockIdx.x;
    const dtl_ref r = REF(x, 0) + row * d;
    const dtl_ref o = REF(y, 3) + row * d;
    float mean, rstd;
    dtl_row_moments(r, d, eps, scratch, &mean, &rstd);
    for (int i = threadIdx.x; i < d; i += blockDim.x) o.st(i, (r.ld(i) - mean) * rstd * Ga.ld(i) + Be.ld(i));
}

// Input-only VJP: dx (=|+=) rstd * (dy*gamma - mean(dy*gamma) - xhat * mean(dy*gamma*xhat)).
// Grid: rows.
extern "C" __global__ void dtl_layer_norm_vjp(const float* x, const float* gamma, const float* dy, float* dx,
                                              int d, float eps, int accumulate, int st) {
    __shared__ float scratch[33];
    const dtl_ref Ga = REF(gamma, 1);
    const i64 row = blockIdx.x;
    const dtl_ref r = REF(x, 0) + row * d;
    const dtl_ref g = REF(dy, 2) + row * d;
    const dtl_ref o = REF(dx, 3) + row * d;
    float mean, rstd;
    dtl_row_moments(r, d, eps, scratch, &mean, &rstd);
    float a = 0.0f, c = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float gg = g.ld(i) * Ga.ld(i);
        a += gg;
        c += gg * (r.ld(i) - mean) * rstd;
    }
    a = dtl_block_sum(a, scratch) / (float)d;
    c = dtl_block_sum(c, scratch) / (float)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float xhat = (r.ld(i) - mean) * rstd;
        const float v = rstd * (g.ld(i) * Ga.ld(i) - a - xhat * c);
        o.st(i, accumulate ? o.ld(i) + v : v);
    }
}

// ---- attention ----------------------------------------------------------------------------

// q, k, v (b, h, n, hd) <- the fused rows qkv (b * n, 3 h hd), timm's [q | k | v] order.
extern "C" __global__ void dtl_split_qkv(const float* qkv, float* q, float* k, float* v, int b, int n, int h,
                                         int hd, int st) {
    const dtl_ref S = REF(qkv, 0), Q = REF(q, 1), K = REF(k, 2), V = REF(v, 3);
    const int width = h * hd;
    const i64 total = (i64)b * n * width;
    GRID_STRIDE(i, total) {
        const int j = (int)i;
        const int e = j % hd;
        const int t = (j / hd) % n;
        const int head = (j / (hd * n)) % h;
        const int s = j / (hd * n * h);
        const i64 src = ((i64)s * n + t) * 3 * width + head * hd + e;
        Q.st(j, S.ld(src));
        K.st(j, S.ld(src + width));
        V.st(j, S.ld(src + 2 * width));
    }
}

// dst (b, h, n, hd) <- columns offset + head * hd + e of the rows of src (b * n, stride).
extern "C" __global__ void dtl_split_heads(const float* src, float* dst, int b, int n, int h, int hd, int stride,
                                           int offset, int st) {
    const dtl_ref S = REF(src, 0), D = REF(dst, 1);
    const i64 total = (i64)b * h * n * hd;
    GRID_STRIDE(i, total) {
        const int j = (int)i;
        const int e = j % hd;
        const int t = (j / hd) % n;
        const int head = (j / (hd * n)) % h;
        const int s = j / (hd * n * h);
        D.st(j, S.ld(((i64)s * n + t) * stride + offset + head * hd + e));
    }
}

// The inverse of dtl_split_heads: src (b, h, n, hd) -> columns of the rows of dst (b * n, stride).
extern "C" __global__ void dtl_merge_heads(const float* src, float* dst, int b, int n, int h, int hd, int stride,
                                           int offset, int st) {
    const dtl_ref S = REF(src, 0), D = REF(dst, 1);
    const i64 total = (i64)b * h * n * hd;
    GRID_STRIDE(i, total) {
        const int j = (int)i;
        const int e = j % hd;
        const int t = (j / hd) % n;
        const int head = (j / (hd * n)) % h;
        const int s = j / (hd * n * h);
        D.st(((i64)s * n + t) * stride + offset + head * hd + e, S.ld(j));
    }
}

// The inverse of dtl_split_qkv: dqkv (b * n, 3 h hd) <- dq, dk, dv (b, h, n, hd), every value written.
extern "C" __global__ void dtl_merge_qkv(const float* dq, const float* dk, const float* dv, float* dqkv, int b,
                                         int n, int h, int hd, int st) {
    const dtl_ref Q = REF(dq, 0), K = REF(dk, 1), V = REF(dv, 2), D = REF(dqkv, 3);
    const int width = h * hd;
    const i64 total = (i64)b * n * width;
    GRID_STRIDE(i, total) {
        const int j = (int)i;
        const int e = j % hd;
        const int t = (j / hd) % n;
        const int head = (j / (hd * n)) % h;
        const int s = j / (hd * n * h);
        const i64 dst = ((i64)s * n + t) * 3 * width + head * hd + e;
        D.st(dst, Q.ld(j));
        D.st(dst + width, K.ld(j));
        D.st(dst + 2 * width, V.ld(j));
    }
}

// In place, one warp per row of n values: s = softmax(s). Grid: ceil(rows / warps per block).
// With a `bias` (null for none), its row `row % bias_rows` (n values) is first added to the
// row: the attention's scores (b, h, n, n) get the bias (groups, h, n, n) of group b % groups
// when bias_rows = groups * h * n. The row is written once, at the end (one rounding in bf16).
extern "C" __global__ void dtl_softmax_rows(float* s, const float* bias, int rows, int n, int bias_rows, int st) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp leaves together
    const dtl_ref r = REF(s, 0) + row * n;
    const bool has_bias = bias != nullptr;
    const dtl_ref br = has_bias ? REF(bias, 1) + (row % bias_rows) * n : REF(bias, 1);
    float m = -DTL_INF;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, has_bias ? r.ld(j) + br.ld(j) : r.ld(j));
    m = dtl_warp_max(m);
    float z = 0.0f;
    for (int j = lane; j < n; j += 32) z += expf((has_bias ? r.ld(j) + br.ld(j) : r.ld(j)) - m);
    z = dtl_warp_sum(z);
    const float inv = 1.0f / z;
    for (int j = lane; j < n; j += 32) r.st(j, expf((has_bias ? r.ld(j) + br.ld(j) : r.ld(j)) - m) * inv);
}

// In place, one warp per row: g = scale * p * (g - sum(g * p)), the VJP of softmax(scale * s) wrt s.
extern "C" __global__ void dtl_softmax_rows_vjp(const float* p, float* g, int rows, int n, float scale, int st) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const dtl_ref pr = REF(p, 0) + row * n;
    const dtl_ref gr = REF(g, 1) + row * n;
    float dot = 0.0f;
    for (int j = lane; j < n; j += 32) dot += pr.ld(j) * gr.ld(j);
    dot = dtl_warp_sum(dot);
    for (int j = lane; j < n; j += 32) gr.st(j, scale * pr.ld(j) * (gr.ld(j) - dot));
}

// ---- patch embedding ----------------------------------------------------------------------

// cols (b * g * g, c * p * p) <- img (b, c, size, size), g = size / p; one row per patch in row-major
// grid order, columns ordered (channel, row, column) like a flattened conv kernel.
extern "C" __global__ void dtl_patchify(const float* img, float* cols, int b, int c, int size, int p, int st) {
    const dtl_ref I = REF(img, 0), C = REF(cols, 1);
    const int g = size / p;
    const int width = c * p * p;
    const i64 total = (i64)b * g * g * width;
    GRID_STRIDE(i, total) {
        const i64 row = i / width;
        const int col = (int)(i % width);
        const int kx = col % p;
        const int ky = (col / p) % p;
        const int ch = col / (p * p);
        const int gx = (int)(row % g);
        const int gy = (int)((row / g) % g);
        const i64 s = row / ((i64)g * g);
        C.st(i, I.ld(((s * c + ch) * size + (i64)gy * p + ky) * size + (i64)gx * p + kx));
    }
}

// out (b, prefix + patches, d): prefix_tok[t] + pos[t] for t < prefix, else patches[s, t - prefix] + pos[t].
extern "C" __global__ void dtl_assemble_tokens(const float* patches, const float* prefix_tok, const float* pos,
                                               float* out, int b, int prefix, int patches_per_sample, int d,
                                               int st) {
    const dtl_ref P = REF(patches, 0), T = REF(prefix_tok, 1), Pos = REF(pos, 2), O = REF(out, 3);
    const int tokens = prefix + patches_per_sample;
    const i64 total = (i64)b * tokens * d;
    GRID_STRIDE(i, total) {
        const int col = (int)(i % d);
        const int t = (int)((i / d) % tokens);
        const i64 s = i / ((i64)d * tokens);
        const float v = t < prefix ? T.ld((i64)t * d + col)
                                   : P.ld((s * patches_per_sample + (t - prefix)) * d + col);
        O.st(i, v + Pos.ld((i64)t * d + col));
    }
}

// ---- shifted windows and patch merging (Swin) ---------------------------------------------
// Token grids are (b, gh, gw, c), rows row-major. Both kernels are permutations of the values,
// run over the index j of the rearranged tensor: with `inverse` = 0 they gather
// (dst[j] = src[g(j)]), with `inverse` = 1 they scatter back (dst[g(j)] = src[j]). Each
// direction is the VJP of the other, and every output value is written.

// Windows (b * windows, wh * ww, c) of the grid rolled by (-sh, -sw), windows row-major, tokens
// row-major inside a window: window token (tr, tc) of window (wr, wc) is grid token
// ((wr * wh + tr + sh) % gh, (wc * ww + tc + sw) % gw).
extern "C" __global__ void dtl_window_partition(const float* src, float* dst, int b, int gh, int gw, int c, int wh,
                                                int ww, int sh, int sw, int inverse, int st) {
    const dtl_ref S = REF(src, 0), D = REF(dst, 1);
    const int across = gw / ww;
    const int per_window = wh * ww;
    const int windows = (gh / wh) * across;
    const i64 total = (i64)b * gh * gw * c;
    GRID_STRIDE(i, total) {
        const int j = (int)i;
        const int ch = j % c;
        const int t = (j / c) % per_window;
        const int w = (j / (c * per_window)) % windows;
        const int s = j / (c * per_window * windows);
        const int r = ((w / across) * wh + t / ww + sh) % gh;
        const int q = ((w % across) * ww + t % ww + sw) % gw;
        const int g = ((s * gh + r) * gw + q) * c + ch;
        if (inverse) {
            D.st(g, S.ld(j));
        } else {
            D.st(j, S.ld(g));
        }
    }
}

// Patch merging: the (b, gh / 2, gw / 2, 4 c) grid whose token (r, q) is the concatenation of
// grid tokens (2r, 2q), (2r + 1, 2q), (2r, 2q + 1), (2r + 1, 2q + 1) of (b, gh, gw, c).
extern "C" __global__ void dtl_patch_merge(const float* src, float* dst, int b, int gh, int gw, int c,
                                           int inverse, int st) {
    const dtl_ref S = REF(src, 0), D = REF(dst, 1);
    const int oh = gh / 2;
    const int ow = gw / 2;
    const int oc = 4 * c;
    const i64 total = (i64)b * gh * gw * c;
    GRID_STRIDE(i, total) {
        const int j = (int)i;
        const int k = j % oc;
        const int q = (j / oc) % ow;
        const int r = (j / (oc * ow)) % oh;
        const int s = j / (oc * ow * oh);
        const int part = k / c;
        const int row = 2 * r + (part & 1);
        const int col = 2 * q + (part >> 1);
        const int g = ((s * gh + row) * gw + col) * c + k % c;
        if (inverse) {
            D.st(g, S.ld(j));
        } else {
            D.st(j, S.ld(g));
        }
    }
}

// ---- depthwise "same" convolution over the patch grid -------------------------------------
// x, y: (b, prefix + gh * gw, c); w: (c, 1, k, k). PyTorch's padding="same": (k - 1) / 2 before,
// k / 2 after; cross-correlation like conv2d. Prefix tokens pass through.

extern "C" __global__ void dtl_dwconv(const float* x, const float* w, float* y, int b, int prefix, int gh, int gw,
                                      int c, int k, int st) {
    const dtl_ref X = REF(x, 0), W = REF(w, 1), Y = REF(y, 2);
    const int tokens = prefix + gh * gw;
    const int before = (k - 1) / 2;
    const i64 total = (i64)b * tokens * c;
    GRID_STRIDE(i, total) {
        const int ch = (int)(i % c);
        const int t = (int)((i / c) % tokens);
        if (t < prefix) {
            Y.st(i, X.ld(i));
            continue;
        }
        const dtl_ref xs = X + (i / ((i64)c * tokens)) * tokens * c;
        const int p = t - prefix;
        const int row = p / gw;
        const int col = p % gw;
        const dtl_ref wc = W + ch * k * k;
        float acc = 0.0f;
        for (int u = 0; u < k; ++u) {
            const int rr = row + u - before;
            if (rr < 0 || rr >= gh) continue;
            for (int v = 0; v < k; ++v) {
                const int cc = col + v - before;
                if (cc < 0 || cc >= gw) continue;
                acc += wc.ld(u * k + v) * xs.ld((i64)(prefix + rr * gw + cc) * c + ch);
            }
        }
        Y.st(i, acc);
    }
}

// dx (overwritten): prefix tokens get dy; patch (r, q) gets sum_{u,v} w[u, v] dy[r - u + before, q - v + before].
extern "C" __global__ void dtl_dwconv_dx(const float* dy, const float* w, float* dx, int b, int prefix, int gh,
                                         int gw, int c, int k, int st) {
    const dtl_ref G = REF(dy, 0), W = REF(w, 1), D = REF(dx, 2);
    const int tokens = prefix + gh * gw;
    const int before = (k - 1) / 2;
    const i64 total = (i64)b * tokens * c;
    GRID_STRIDE(i, total) {
        const int ch = (int)(i % c);
        const int t = (int)((i / c) % tokens);
        if (t < prefix) {
            D.st(i, G.ld(i));
            continue;
        }
        const dtl_ref gs = G + (i / ((i64)c * tokens)) * tokens * c;
        const int p = t - prefix;
        const int row = p / gw;
        const int col = p % gw;
        const dtl_ref wc = W + ch * k * k;
        float acc = 0.0f;
        for (int u = 0; u < k; ++u) {
            const int rr = row - u + before;
            if (rr < 0 || rr >= gh) continue;
            for (int v = 0; v < k; ++v) {
                const int cc = col - v + before;
                if (cc < 0 || cc >= gw) continue;
                acc += wc.ld(u * k + v) * gs.ld((i64)(prefix + rr * gw + cc) * c + ch);
            }
        }
        D.st(i, acc);
    }
}

// dw[ch, u, v] (=|+=) sum over samples and patches (r, q) of dy[r, q] x[r + u - before, q + v - before].
// Block (32, 16): 32 channels, 16 lanes over the positions; grid (ceil(c / 32), k * k). The lanes'
// partial sums are added in order: no atomics, the same result on every run.
extern "C" __global__ void dtl_dwconv_dw(const float* x, const float* dy, float* dw, int b, int prefix, int gh,
                                         int gw, int c, int k, int accumulate, int st) {
    __shared__ float part[16][33];
    const dtl_ref X = REF(x, 0), G = REF(dy, 1), D = REF(dw, 2);
    const int ch = blockIdx.x * 32 + threadIdx.x;
    const int u = blockIdx.y / k;
    const int v = blockIdx.y % k;
    const int before = (k - 1) / 2;
    const int grid = gh * gw;
    const int tokens = prefix + grid;
    const int positions = b * grid;
    float acc = 0.0f;
    if (ch < c) {
        for (int q = threadIdx.y; q < positions; q += blockDim.y) {
            const int s = q / grid;
            const int p = q % grid;
            const int rr = p / gw + u - before;
            const int cc = p % gw + v - before;
            if (rr < 0 || rr >= gh || cc < 0 || cc >= gw) continue;
            const i64 base = (i64)s * tokens + prefix;
            acc += G.ld((base + p) * c + ch) * X.ld((base + rr * gw + cc) * c + ch);
        }
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
        float t = 0.0f;
        for (int j = 0; j < (int)blockDim.y; ++j) t += part[j][threadIdx.x];
        const i64 o = ((i64)ch * k + u) * k + v;
        D.st(o, accumulate ? D.ld(o) + t : t);
    }
}

// ---- pooling ------------------------------------------------------------------------------

// out (b, d) = mean of tokens from..to of x (b, tokens, d).
extern "C" __global__ void dtl_mean_tokens(const float* x, float* out, int b, int tokens, int d, int from, int to,
                                           int st) {
    const dtl_ref X = REF(x, 0), O = REF(out, 1);
    const i64 total = (i64)b * d;
    const float inv = 1.0f / (float)(to - from);
    GRID_STRIDE(i, total) {
        const int col = (int)(i % d);
        const i64 s = i / d;
        const dtl_ref xs = X + (s * tokens * d + col);
        float acc = 0.0f;
        for (int t = from; t < to; ++t) acc += xs.ld((i64)t * d);
        O.st(i, acc * inv);
    }
}

// dx (b, tokens, d) = g / (to - from) at tokens from..to, zero elsewhere.
extern "C" __global__ void dtl_mean_tokens_vjp(const float* g, float* dx, int b, int tokens, int d, int from,
                                               int to, int st) {
    const dtl_ref G = REF(g, 0), D = REF(dx, 1);
    const i64 total = (i64)b * tokens * d;
    const float inv = 1.0f / (float)(to - from);
    GRID_STRIDE(i, total) {
        const int col = (int)(i % d);
        const int t = (int)((i / d) % tokens);
        const i64 s = i / ((i64)d * tokens);
        D.st(i, (t >= from && t < to) ? G.ld(s * d + col) * inv : 0.0f);
    }
}

// ---- loss and evaluation (one block; one warp per row) -----------------------------------

// Soft-target cross entropy of logits (b, classes) against targets (b, classes):
// loss[0] = sum_rows(lse * sum(t) - sum(t * l)) / b and grad = (softmax(l) * sum(t) - t) / b.
// One block of whole warps, warp w takes rows w, w + warps, ...; the per-warp sums are added in
// order by the first thread, so the loss does not depend on timing. Grid: 1.
extern "C" __global__ void __launch_bounds__(1024)
    dtl_soft_cross_entropy(const float* logits, const float* targets, float* loss, float* grad, int b, int classes,
                           int st) {
    __shared__ float warp_loss[32];
    const dtl_ref L = REF(logits, 0), T = REF(targets, 1), Loss = REF(loss, 2), Gr = REF(grad, 3);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const float inv_b = 1.0f / (float)b;
    float mine = 0.0f;
    for (int row = warp; row < b; row += warps) {
        const dtl_ref l = L + (i64)row * classes;
        const dtl_ref t = T + (i64)row * classes;
        const dtl_ref g = Gr + (i64)row * classes;
        float m = -DTL_INF;
        for (int j = lane; j < classes; j += 32) m = fmaxf(m, l.ld(j));
        m = dtl_warp_max(m);
        float z = 0.0f, ts = 0.0f, tl = 0.0f;
        for (int j = lane; j < classes; j += 32) {
            z += expf(l.ld(j) - m);
            ts += t.ld(j);
            tl += t.ld(j) * l.ld(j);
        }
        z = dtl_warp_sum(z);
        ts = dtl_warp_sum(ts);
        tl = dtl_warp_sum(tl);
        const float lse = m + logf(z);
        for (int j = lane; j < classes; j += 32) g.st(j, (expf(l.ld(j) - lse) * ts - t.ld(j)) * inv_b);
        mine += lse * ts - tl;
    }
    if (lane == 0) warp_loss[warp] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < warps; ++w) total += warp_loss[w];
        Loss.st(0, total * inv_b);
    }
}

// stats[0..4] += (top-1 hits, top-5 hits, sum of the hard-label cross entropy, rows whose logits are not
// all finite). A label is valid when it is a whole number in 0..classes; an invalid label is neither hit
// and its loss is infinite. A row is a top-k hit when fewer than k logits are strictly greater than its
// label's. Grid: 1.
extern "C" __global__ void __launch_bounds__(1024)
    dtl_eval_stats(const float* logits, const float* labels, float* stats, int b, int classes, int st) {
    __shared__ float warp_stats[32][4];
    const dtl_ref L = REF(logits, 0), Y = REF(labels, 1), S = REF(stats, 2);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    float top1 = 0.0f, top5 = 0.0f, ce = 0.0f, bad = 0.0f;
    for (int row = warp; row < b; row += warps) {
        const dtl_ref l = L + (i64)row * classes;
        const float label = Y.ld(row);
        const bool valid = label >= 0.0f && label < (float)classes && label == floorf(label);
        const int y = valid ? (int)label : 0;
        const float ly = valid ? l.ld(y) : 0.0f;
        float m = -DTL_INF;
        int nonfinite = 0;
        int rank = 0;
        for (int j = lane; j < classes; j += 32) {
            const float v = l.ld(j);
            if (!(fabsf(v) < DTL_INF)) nonfinite += 1;
            m = fmaxf(m, v);
            if (v > ly) rank += 1;
        }
        m = dtl_warp_max(m);
        nonfinite = dtl_warp_sum_int(nonfinite);
        rank = dtl_warp_sum_int(rank);
        float z = 0.0f;
        for (int j = lane; j < classes; j += 32) z += expf(l.ld(j) - m);
        z = dtl_warp_sum(z);
        if (valid) {
            top1 += rank < 1 ? 1.0f : 0.0f;
            top5 += rank < 5 ? 1.0f : 0.0f;
            ce += m + logf(z) - ly;
        } else {
            ce += DTL_INF;
        }
        bad += nonfinite > 0 ? 1.0f : 0.0f;
    }
    if (lane == 0) {
        warp_stats[warp][0] = top1;
        warp_stats[warp][1] = top5;
        warp_stats[warp][2] = ce;
        warp_stats[warp][3] = bad;
    }
    __syncthreads();
    if (threadIdx.x < 4) {
        float total = 0.0f;
        for (int w = 0; w < warps; ++w) total += warp_stats[w][threadIdx.x];
        S.st(threadIdx.x, S.ld(threadIdx.x) + total);
    }
}

// ---- optimizer ----------------------------------------------------------------------------

// Sum over the thread block in f64; every thread gets the result. `scratch` holds 33 doubles.
__device__ double dtl_block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < warps ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (lane == 0) scratch[32] = t;
    }
    __syncthreads();
    return scratch[32];
}

// partials[block] = sum of x^2 (in f64) over the block's grid-stride share of x[..n]. Grid: at
// most the number of partials.
extern "C" __global__ void dtl_sum_squares_partial(const float* x, double* partials, int n, int st) {
    __shared__ double scratch[33];
    const dtl_ref X = REF(x, 0);
    double s = 0.0;
    GRID_STRIDE(i, n) {
        const double v = X.ld(i);
        s += v * v;
    }
    s = dtl_block_sum_f64(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// acc[0] += sum of partials[..parts], added in f64 by one block in a fixed order. Grid: 1.
extern "C" __global__ void __launch_bounds__(1024)
    dtl_sum_squares_final(const double* partials, float* acc, int parts, int st) {
    __shared__ double scratch[33];
    const dtl_ref A = REF(acc, 1);
    double s = 0.0;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) s += partials[i];
    s = dtl_block_sum_f64(s, scratch);
    if (threadIdx.x == 0) A.st(0, (float)((double)A.ld(0) + s));
}

// PyTorch's clip_grad_norm_ factor min(1, max_norm / (sqrt(sq) + 1e-6)), in f64 as the host
// computes it; `sq` is the squared norm of all gradients, read on the device.
__device__ __forceinline__ float dtl_clip_factor(float sq, float max_norm) {
    const double coef = (double)max_norm / (sqrt((double)sq) + 1e-6);
    return coef < 1.0 ? (float)coef : 1.0f;
}

// One AdamW step (PyTorch's, amsgrad off) over the grid-stride share of [0, n), term by term as
// the CPU computes it: m = m b1 + g (1 - b1), v = v b2 + g^2 (1 - b2), p = p decay,
// p -= m step_size / (sqrt(v) / bc2_sqrt + eps). With `has_clip` the gradient is first multiplied
// by `factor`. Both AdamW kernels run this, so that their results are the same bit for bit.
__device__ __forceinline__ void dtl_adamw_apply(dtl_ref P, dtl_ref G, dtl_ref M, dtl_ref V, int n, float beta1,
                                                float beta2, float eps, float decay, float step_size,
                                                float bc2_sqrt, float factor, int has_clip) {
    const float one_b1 = 1.0f - beta1;
    const float one_b2 = 1.0f - beta2;
    GRID_STRIDE(i, n) {
        const float g = has_clip ? G.ld(i) * factor : G.ld(i);
        const float mi = M.ld(i) * beta1 + g * one_b1;
        const float vi = V.ld(i) * beta2 + g * g * one_b2;
        M.st(i, mi);
        V.st(i, vi);
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        P.st(i, P.ld(i) * decay - mi * step_size / denom);
    }
}

// One AdamW step with its scalars as arguments, decay = 1 - lr weight_decay computed by the host
// (see dtl_adamw_apply). With `has_clip`, the gradient is first multiplied by dtl_clip_factor of
// sq[0].
extern "C" __global__ void dtl_adamw(float* param, const float* grad, float* m, float* v, int n, float beta1,
                                     float beta2, float eps, float decay, float step_size, float bc2_sqrt,
                                     const float* sq, float max_norm, int has_clip, int st) {
    const dtl_ref P = REF(param, 0), G = REF(grad, 1), M = REF(m, 2), V = REF(v, 3);
    const float factor = has_clip ? dtl_clip_factor(REF(sq, 11).ld(0), max_norm) : 1.0f;
    dtl_adamw_apply(P, G, M, V, n, beta1, beta2, eps, decay, step_size, bc2_sqrt, factor, has_clip);
}

// Values per entry of the step scalars of dtl_adamw_from, in this order: lr, weight_decay,
// step_size, bc2_sqrt, beta1, beta2, eps (dtl_kernels::AdamwStep::scalars).
#define DTL_ADAMW_SCALARS 7

// dtl_adamw with the step's scalars read on the device from entry `index` of `scalars`, so that
// a recorded graph follows what the host writes there before each replay. The decay is computed
// as the host computes it for dtl_adamw: lr and weight_decay are f32, so their product is exact
// in f64 and 1 - lr weight_decay is rounded once, to f64, then to f32, whether or not the
// compiler fuses the two operations.
extern "C" __global__ void dtl_adamw_from(float* param, const float* grad, float* m, float* v, int n,
                                          const float* scalars, int index, const float* sq, float max_norm,
                                          int has_clip, int st) {
    const dtl_ref P = REF(param, 0), G = REF(grad, 1), M = REF(m, 2), V = REF(v, 3);
    const dtl_ref S = REF(scalars, 5) + (i64)index * DTL_ADAMW_SCALARS;
    const float lr = S.ld(0), weight_decay = S.ld(1), step_size = S.ld(2), bc2_sqrt = S.ld(3);
    const float beta1 = S.ld(4), beta2 = S.ld(5), eps = S.ld(6);
    const float decay = weight_decay != 0.0f ? (float)(1.0 - (double)lr * (double)weight_decay) : 1.0f;
    const float factor = has_clip ? dtl_clip_factor(REF(sq, 7).ld(0), max_norm) : 1.0f;
    dtl_adamw_apply(P, G, M, V, n, beta1, beta2, eps, decay, step_size, bc2_sqrt, factor, has_clip);
}
