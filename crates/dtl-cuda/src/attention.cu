// ---- fused attention ----------------------------------------------------------------------
//
// Multi-head self-attention on the fused qkv rows (b * n, 3 h hd) without the (n x n) scores in
// device memory: a block holds a few query rows (or keys) of one (sample, head) and walks the
// other side in tiles of 32 keys (queries) staged in shared memory, one per lane of a warp.
//
// - dtl_attn_fused: out (b * n, h hd) and the log-sum-exp of every score row, lse (b h, n), with
//   an online softmax (running max and sum in f32).
// - dtl_attn_fused_dq: D_i = dO_i . O_i (written to dd (b h, n)) and dQ = scale dS K, written into
//   the q columns of dqkv; P is recomputed from lse.
// - dtl_attn_fused_dkv: dV = P^T dO and dK = scale dS^T Q, written into the k and v columns of
//   dqkv; one block owns its keys and walks every query, so nothing is accumulated across blocks
//   and no atomics are used: the sums run in a fixed order.
//
// Scores are s_ij = scale q_i . k_j + bias_ij, where the optional bias (null for none) holds
// (groups, h, n, n) values and the (sample, head) pair bh = sample * h + head reads the matrix
// bh % bias_heads (bias_heads = groups * h), so sample b uses group b % groups.
// Grids: x = b * h, y = tiles of rows (keys). Blocks of DTL_ATTN_THREADS threads. Head dims up to
// DTL_ATTN_MAX_HD; the host checks the shape and every size before a launch.
//
// Storage as in kernels.cu (whose helpers this file uses; it is compiled after it): qkv, the bias,
// out, o, dout and dqkv hold f32 or bf16 values (bit j of `st` for parameter j), read and written
// through dtl_ref; lse and dd are always f32. All arithmetic is f32.

#define DTL_ATTN_WARPS 4
#define DTL_ATTN_THREADS (32 * DTL_ATTN_WARPS)
#define DTL_ATTN_TILE 32
#define DTL_ATTN_MAX_HD 128
#define DTL_ATTN_CHUNKS (DTL_ATTN_MAX_HD / 32)
// rows (keys) per warp of each kernel
#define DTL_ATTN_FWD_ROWS 4
#define DTL_ATTN_DQ_ROWS 2
#define DTL_ATTN_DKV_KEYS 2
#define DTL_ATTN_NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float dtl_attn_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float dtl_attn_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Stages hd values of `rows` tokens t0, t0 + 1, ... (src + base + t * stride, zero past n) into
// the rows of sh (row stride ld), with every thread of the block.
__device__ __forceinline__ void dtl_attn_stage(float* sh, int ld, const dtl_ref src, long long base,
                                               int stride, int t0, int rows, int n, int hd) {
    for (int idx = threadIdx.x; idx < rows * hd; idx += DTL_ATTN_THREADS) {
        const int r = idx / hd, e = idx - r * hd;
        const int t = t0 + r;
        sh[r * ld + e] = t < n ? src.ld(base + (long long)t * stride + e) : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(DTL_ATTN_THREADS)
    dtl_attn_fused(const float* qkv, const float* bias, float* out, float* lse, int b, int n, int h, int hd,
                   int bias_heads, float scale, int st) {
    const dtl_ref QKV = REF(qkv, 0), OUT = REF(out, 2);
    constexpr int R = DTL_ATTN_FWD_ROWS, C = DTL_ATTN_CHUNKS;
    constexpr int ROWS = DTL_ATTN_WARPS * R;
    __shared__ float qs[ROWS * DTL_ATTN_MAX_HD];
    __shared__ float ks[DTL_ATTN_TILE * (DTL_ATTN_MAX_HD + 1)];
    __shared__ float vs[DTL_ATTN_TILE * DTL_ATTN_MAX_HD];
    const int bh = blockIdx.x, s = bh / h, head = bh % h;
    const int width = h * hd, stride = 3 * width, kld = hd + 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.y * ROWS;
    const long long base = (long long)s * n * stride + head * hd;
    const bool has_bias = bias != nullptr;
    const dtl_ref bm = has_bias ? REF(bias, 1) + (long long)(bh % bias_heads) * n * n : REF(bias, 1);
    dtl_attn_stage(qs, hd, QKV, base, stride, row0, ROWS, n, hd);
    float m[R], l[R], o[R][C];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = DTL_ATTN_NEG_INF;
        l[r] = 0.0f;
        #pragma unroll
        for (int c = 0; c < C; ++c) o[r][c] = 0.0f;
    }
    for (int k0 = 0; k0 < n; k0 += DTL_ATTN_TILE) {
        __syncthreads();  // the previous tile is consumed (and the queries staged)
        dtl_attn_stage(ks, kld, QKV, base + width, stride, k0, DTL_ATTN_TILE, n, hd);
        dtl_attn_stage(vs, hd, QKV, base + 2 * width, stride, k0, DTL_ATTN_TILE, n, hd);
        __syncthreads();
        const int j = k0 + lane;
        const int kn = n - k0 < DTL_ATTN_TILE ? n - k0 : DTL_ATTN_TILE;
        float sc[R];
        #pragma unroll
        for (int r = 0; r < R; ++r) sc[r] = 0.0f;
        for (int e = 0; e < hd; ++e) {
            const float kv = ks[lane * kld + e];
            #pragma unroll
            for (int r = 0; r < R; ++r) sc[r] += qs[(warp * R + r) * hd + e] * kv;
        }
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const int i = row0 + warp * R + r;
            float x = DTL_ATTN_NEG_INF;
            if (j < n) {
                x = scale * sc[r];
                if (has_bias && i < n) x += bm.ld((long long)i * n + j);
            }
            const float mn = fmaxf(m[r], dtl_attn_max(x));
            const float ms = mn == DTL_ATTN_NEG_INF ? 0.0f : mn;
            const float corr = expf(m[r] - ms);
            const float p = expf(x - ms);
            l[r] = l[r] * corr + dtl_attn_sum(p);
            m[r] = mn;
            #pragma unroll
            for (int c = 0; c < C; ++c) o[r][c] *= corr;
            for (int jj = 0; jj < kn; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                #pragma unroll
                for (int c = 0; c < C; ++c) {
                    const int e = lane + 32 * c;
                    if (e < hd) o[r][c] += pj * vs[jj * hd + e];
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = row0 + warp * R + r;
        if (i >= n) continue;
        const float inv = 1.0f / l[r];
        const long long at = ((long long)s * n + i) * width + head * hd;
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            const int e = lane + 32 * c;
            if (e < hd) OUT.st(at + e, o[r][c] * inv);
        }
        if (lane == 0) lse[(long long)bh * n + i] = m[r] + logf(l[r]);
    }
}

// o: the output of dtl_attn_fused (b * n, h hd) and lse its statistics; dout like o.
extern "C" __global__ void __launch_bounds__(DTL_ATTN_THREADS)
    dtl_attn_fused_dq(const float* qkv, const float* bias, const float* o, const float* dout, const float* lse,
                      float* dd, float* dqkv, int b, int n, int h, int hd, int bias_heads, float scale, int st) {
    const dtl_ref QKV = REF(qkv, 0), O = REF(o, 2), DOUT = REF(dout, 3), DQKV = REF(dqkv, 6);
    constexpr int R = DTL_ATTN_DQ_ROWS, C = DTL_ATTN_CHUNKS;
    constexpr int ROWS = DTL_ATTN_WARPS * R;
    __shared__ float qs[ROWS * DTL_ATTN_MAX_HD];
    __shared__ float gs[ROWS * DTL_ATTN_MAX_HD];
    __shared__ float ks[DTL_ATTN_TILE * (DTL_ATTN_MAX_HD + 1)];
    __shared__ float vs[DTL_ATTN_TILE * (DTL_ATTN_MAX_HD + 1)];
    const int bh = blockIdx.x, s = bh / h, head = bh % h;
    const int width = h * hd, stride = 3 * width, kld = hd + 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.y * ROWS;
    const long long base = (long long)s * n * stride + head * hd;
    const long long obase = (long long)s * n * width + head * hd;
    const bool has_bias = bias != nullptr;
    const dtl_ref bm = has_bias ? REF(bias, 1) + (long long)(bh % bias_heads) * n * n : REF(bias, 1);
    dtl_attn_stage(qs, hd, QKV, base, stride, row0, ROWS, n, hd);
    dtl_attn_stage(gs, hd, DOUT, obase, width, row0, ROWS, n, hd);
    __syncthreads();
    float dr[R], lr[R], acc[R][C];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = row0 + warp * R + r;
        float t = 0.0f;
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            const int e = lane + 32 * c;
            acc[r][c] = 0.0f;
            if (e < hd && i < n) t += gs[(warp * R + r) * hd + e] * O.ld(obase + (long long)i * width + e);
        }
        dr[r] = dtl_attn_sum(t);
        lr[r] = i < n ? lse[(long long)bh * n + i] : 0.0f;
        if (lane == 0 && i < n) dd[(long long)bh * n + i] = dr[r];
    }
    for (int k0 = 0; k0 < n; k0 += DTL_ATTN_TILE) {
        __syncthreads();
        dtl_attn_stage(ks, kld, QKV, base + width, stride, k0, DTL_ATTN_TILE, n, hd);
        dtl_attn_stage(vs, kld, QKV, base + 2 * width, stride, k0, DTL_ATTN_TILE, n, hd);
        __syncthreads();
        const int j = k0 + lane;
        const int kn = n - k0 < DTL_ATTN_TILE ? n - k0 : DTL_ATTN_TILE;
        float sc[R], dp[R];
        #pragma unroll
        for (int r = 0; r < R; ++r) sc[r] = dp[r] = 0.0f;
        for (int e = 0; e < hd; ++e) {
            const float kv = ks[lane * kld + e], vv = vs[lane * kld + e];
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                sc[r] += qs[(warp * R + r) * hd + e] * kv;
                dp[r] += gs[(warp * R + r) * hd + e] * vv;
            }
        }
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const int i = row0 + warp * R + r;
            float ds = 0.0f;
            if (j < n && i < n) {
                float x = scale * sc[r];
                if (has_bias) x += bm.ld((long long)i * n + j);
                const float p = expf(x - lr[r]);
                ds = p * (dp[r] - dr[r]);
            }
            for (int jj = 0; jj < kn; ++jj) {
                const float dsj = __shfl_sync(0xffffffffu, ds, jj);
                #pragma unroll
                for (int c = 0; c < C; ++c) {
                    const int e = lane + 32 * c;
                    if (e < hd) acc[r][c] += dsj * ks[jj * kld + e];
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = row0 + warp * R + r;
        if (i >= n) continue;
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            const int e = lane + 32 * c;
            if (e < hd) DQKV.st(base + (long long)i * stride + e, scale * acc[r][c]);
        }
    }
}

// lse and dd: the statistics of dtl_attn_fused and dtl_attn_fused_dq (b h, n).
extern "C" __global__ void __launch_bounds__(DTL_ATTN_THREADS)
    dtl_attn_fused_dkv(const float* qkv, const float* bias, const float* dout, const float* lse, const float* dd,
                       float* dqkv, int b, int n, int h, int hd, int bias_heads, float scale, int st) {
    const dtl_ref QKV = REF(qkv, 0), DOUT = REF(dout, 2), DQKV = REF(dqkv, 5);
    constexpr int R = DTL_ATTN_DKV_KEYS, C = DTL_ATTN_CHUNKS;
    constexpr int KEYS = DTL_ATTN_WARPS * R;
    __shared__ float kk[KEYS * DTL_ATTN_MAX_HD];
    __shared__ float vk[KEYS * DTL_ATTN_MAX_HD];
    __shared__ float qs[DTL_ATTN_TILE * (DTL_ATTN_MAX_HD + 1)];
    __shared__ float gs[DTL_ATTN_TILE * (DTL_ATTN_MAX_HD + 1)];
    __shared__ float ls[DTL_ATTN_TILE];
    __shared__ float ds_[DTL_ATTN_TILE];
    const int bh = blockIdx.x, s = bh / h, head = bh % h;
    const int width = h * hd, stride = 3 * width, qld = hd + 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int key0 = blockIdx.y * KEYS;
    const long long base = (long long)s * n * stride + head * hd;
    const long long obase = (long long)s * n * width + head * hd;
    const bool has_bias = bias != nullptr;
    const dtl_ref bm = has_bias ? REF(bias, 1) + (long long)(bh % bias_heads) * n * n : REF(bias, 1);
    dtl_attn_stage(kk, hd, QKV, base + width, stride, key0, KEYS, n, hd);
    dtl_attn_stage(vk, hd, QKV, base + 2 * width, stride, key0, KEYS, n, hd);
    float dk[R][C], dv[R][C];
    #pragma unroll
    for (int r = 0; r < R; ++r)
        #pragma unroll
        for (int c = 0; c < C; ++c) dk[r][c] = dv[r][c] = 0.0f;
    for (int i0 = 0; i0 < n; i0 += DTL_ATTN_TILE) {
        __syncthreads();  // the previous tile is consumed (and the keys staged)
        dtl_attn_stage(qs, qld, QKV, base, stride, i0, DTL_ATTN_TILE, n, hd);
        dtl_attn_stage(gs, qld, DOUT, obase, width, i0, DTL_ATTN_TILE, n, hd);
        if (threadIdx.x < DTL_ATTN_TILE) {
            const int i = i0 + threadIdx.x;
            ls[threadIdx.x] = i < n ? lse[(long long)bh * n + i] : 0.0f;
            ds_[threadIdx.x] = i < n ? dd[(long long)bh * n + i] : 0.0f;
        }
        __syncthreads();
        const int i = i0 + lane;
        const int qn = n - i0 < DTL_ATTN_TILE ? n - i0 : DTL_ATTN_TILE;
        float sc[R], dp[R];
        #pragma unroll
        for (int r = 0; r < R; ++r) sc[r] = dp[r] = 0.0f;
        for (int e = 0; e < hd; ++e) {
            const float qv = qs[lane * qld + e], gv = gs[lane * qld + e];
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                sc[r] += qv * kk[(warp * R + r) * hd + e];
                dp[r] += gv * vk[(warp * R + r) * hd + e];
            }
        }
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const int j = key0 + warp * R + r;
            float p = 0.0f, ds = 0.0f;
            if (i < n && j < n) {
                float x = scale * sc[r];
                if (has_bias) x += bm.ld((long long)i * n + j);
                p = expf(x - ls[lane]);
                ds = p * (dp[r] - ds_[lane]);
            }
            for (int ii = 0; ii < qn; ++ii) {
                const float pi = __shfl_sync(0xffffffffu, p, ii);
                const float dsi = __shfl_sync(0xffffffffu, ds, ii);
                #pragma unroll
                for (int c = 0; c < C; ++c) {
                    const int e = lane + 32 * c;
                    if (e < hd) {
                        dv[r][c] += pi * gs[ii * qld + e];
                        dk[r][c] += dsi * qs[ii * qld + e];
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        const int j = key0 + warp * R + r;
        if (j >= n) continue;
        const long long at = base + (long long)j * stride;
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            const int e = lane + 32 * c;
            if (e < hd) {
                DQKV.st(at + width + e, scale * dk[r][c]);
                DQKV.st(at + 2 * width + e, dv[r][c]);
            }
        }
    }
}
