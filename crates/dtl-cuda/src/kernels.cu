// f32 kernels of dtl's frozen ViT, compiled at run time with NVRTC.
//
// Conventions: matrices are row-major; a "row" kernel runs one thread block per row with a
// block size that is a multiple of 32 (at most 1024); elementwise kernels use grid-stride
// loops, so any grid size is correct.

#define DTL_INV_SQRT2 0.70710678118654752440f
#define DTL_INV_SQRT_2PI 0.39894228040143267794f
#define DTL_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float dtl_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float dtl_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
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

// Maximum over the thread block; every thread gets the result.
__device__ float dtl_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = dtl_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < warps ? scratch[lane] : -DTL_INF;
        t = dtl_warp_max(t);
        if (lane == 0) scratch[32] = t;
    }
    __syncthreads();
    return scratch[32];
}

__device__ __forceinline__ float dtl_gelu(float x) {
    return 0.5f * x * (1.0f + erff(x * DTL_INV_SQRT2));
}

__device__ __forceinline__ float dtl_gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * DTL_INV_SQRT2)) + x * DTL_INV_SQRT_2PI * expf(-0.5f * x * x);
}

// Mean and reciprocal standard deviation of one row (biased variance, two passes).
__device__ void dtl_row_moments(const float* r, int d, float eps, float* scratch, float* mean, float* rstd) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += r[i];
    const float m = dtl_block_sum(s, scratch) / (float)d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = r[i] - m;
        v += c * c;
    }
    const float var = dtl_block_sum(v, scratch) / (float)d;
    *mean = m;
    *rstd = rsqrtf(var + eps);
}

// y = (x - mean) * rstd * gamma + beta, row by row. Grid: rows.
extern "C" __global__ void dtl_layer_norm(const float* x, const float* gamma, const float* beta,
                                          float* y, int d, float eps) {
    __shared__ float scratch[33];
    const size_t row = blockIdx.x;
    const float* r = x + row * d;
    float* o = y + row * d;
    float mean, rstd;
    dtl_row_moments(r, d, eps, scratch, &mean, &rstd);
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = (r[i] - mean) * rstd * gamma[i] + beta[i];
}

// Input-only VJP of the LayerNorm: gx (=|+=) rstd * (gy*gamma - mean(gy*gamma) - xhat * mean(gy*gamma*xhat)).
// Grid: rows.
extern "C" __global__ void dtl_layer_norm_vjp(const float* x, const float* gamma, const float* gy,
                                              float* gx, int d, float eps, int accumulate) {
    __shared__ float scratch[33];
    const size_t row = blockIdx.x;
    const float* r = x + row * d;
    const float* g = gy + row * d;
    float* o = gx + row * d;
    float mean, rstd;
    dtl_row_moments(r, d, eps, scratch, &mean, &rstd);
    float a = 0.0f, c = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float gg = g[i] * gamma[i];
        a += gg;
        c += gg * (r[i] - mean) * rstd;
    }
    a = dtl_block_sum(a, scratch) / (float)d;
    c = dtl_block_sum(c, scratch) / (float)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float xhat = (r[i] - mean) * rstd;
        const float v = rstd * (g[i] * gamma[i] - a - xhat * c);
        o[i] = accumulate ? o[i] + v : v;
    }
}

// y = gelu(x), erf form.
extern "C" __global__ void dtl_gelu(const float* x, float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = dtl_gelu(x[i]);
}

// u += bias (per column of width d), then y = gelu(u); u keeps the pre-activation for the VJP.
extern "C" __global__ void dtl_bias_gelu(float* u, const float* bias, float* y, size_t n, int d) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = u[i] + bias[i % d];
        u[i] = v;
        y[i] = dtl_gelu(v);
    }
}

// gx = gy * gelu'(u).
extern "C" __global__ void dtl_gelu_vjp(const float* u, const float* gy, float* gx, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        gx[i] = gy[i] * dtl_gelu_grad(u[i]);
}

// y += bias (per column of width d).
extern "C" __global__ void dtl_bias_add(float* y, const float* bias, size_t n, int d) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % d];
}

// In place, row by row: s = softmax(scale * s). Grid: rows.
extern "C" __global__ void dtl_softmax_rows(float* s, int n, float scale) {
    __shared__ float scratch[33];
    float* r = s + (size_t)blockIdx.x * n;
    float m = -DTL_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, scale * r[i]);
    m = dtl_block_max(m, scratch);
    float z = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = expf(scale * r[i] - m);
        r[i] = e;
        z += e;
    }
    z = dtl_block_sum(z, scratch);
    const float inv = 1.0f / z;
    for (int i = threadIdx.x; i < n; i += blockDim.x) r[i] *= inv;
}

// In place, row by row: g = scale * p * (g - sum(g * p)), the VJP of softmax(scale * s) wrt s.
extern "C" __global__ void dtl_softmax_rows_vjp(const float* p, float* g, int n, float scale) {
    __shared__ float scratch[33];
    const float* pr = p + (size_t)blockIdx.x * n;
    float* gr = g + (size_t)blockIdx.x * n;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dot += pr[i] * gr[i];
    dot = dtl_block_sum(dot, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) gr[i] = scale * pr[i] * (gr[i] - dot);
}

// out = x + scales[sample] * branch, where each sample spans `per_sample` values.
extern "C" __global__ void dtl_residual(const float* x, const float* branch, const float* scales,
                                        float* out, size_t n, size_t per_sample) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = x[i] + scales[i / per_sample] * branch[i];
}

// out = scales[sample] * g.
extern "C" __global__ void dtl_scale_samples(const float* g, const float* scales, float* out, size_t n,
                                             size_t per_sample) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = scales[i / per_sample] * g[i];
}

// dst (B, H, N, hd) <- columns [offset + h*hd, offset + (h+1)*hd) of src rows (B*N, stride).
extern "C" __global__ void dtl_split_heads(const float* src, float* dst, int b, int n, int h, int hd,
                                           int stride, int offset) {
    const size_t total = (size_t)b * h * n * hd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i % hd;
        const size_t t = (i / hd) % n;
        const size_t head = (i / ((size_t)hd * n)) % h;
        const size_t s = i / ((size_t)hd * n * h);
        dst[i] = src[(s * n + t) * stride + offset + head * hd + e];
    }
}

// The inverse of dtl_split_heads: src (B, H, N, hd) -> columns of dst rows (B*N, stride).
extern "C" __global__ void dtl_merge_heads(const float* src, float* dst, int b, int n, int h, int hd,
                                           int stride, int offset) {
    const size_t total = (size_t)b * h * n * hd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i % hd;
        const size_t t = (i / hd) % n;
        const size_t head = (i / ((size_t)hd * n)) % h;
        const size_t s = i / ((size_t)hd * n * h);
        dst[(s * n + t) * stride + offset + head * hd + e] = src[i];
    }
}

// Patch rows for the patch-embedding GEMM: img (B, C, H, W) -> out (B * gh * gw, C * p * p),
// columns ordered (channel, row, column) like a flattened conv kernel.
extern "C" __global__ void dtl_patchify(const float* img, float* out, int b, int c, int hgt, int wid, int p) {
    const int gh = hgt / p;
    const int gw = wid / p;
    const size_t cols = (size_t)c * p * p;
    const size_t total = (size_t)b * gh * gw * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t col = i % cols;
        const size_t row = i / cols;
        const int kx = col % p;
        const int ky = (col / p) % p;
        const int ch = col / ((size_t)p * p);
        const int gx = row % gw;
        const int gy = (row / gw) % gh;
        const size_t s = row / ((size_t)gw * gh);
        out[i] = img[((s * c + ch) * hgt + (size_t)gy * p + ky) * wid + (size_t)gx * p + kx];
    }
}

// Tokens (B, prefix + P, D): prefix rows from `prefix_tok`, then patch rows + bias; pos added to all.
extern "C" __global__ void dtl_assemble_tokens(const float* patches, const float* bias, const float* prefix_tok,
                                               const float* pos, float* out, int b, int patches_per_image,
                                               int prefix, int d) {
    const int tokens = prefix + patches_per_image;
    const size_t total = (size_t)b * tokens * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int col = i % d;
        const int t = (i / d) % tokens;
        const size_t s = i / ((size_t)d * tokens);
        float v;
        if (t < prefix) {
            v = prefix_tok[(size_t)t * d + col];
        } else {
            v = patches[(s * patches_per_image + (t - prefix)) * d + col] + bias[col];
        }
        out[i] = v + pos[(size_t)t * d + col];
    }
}
