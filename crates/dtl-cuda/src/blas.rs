//! cuBLAS matrix products on row-major buffers: f32, or bf16 operands with f32 compute.
//!
//! cuBLAS is column-major: a row-major `r x c` matrix is the column-major `c x r` matrix with
//! leading dimension `c`, i.e. its transpose. [`Gemm`] describes one column-major call; the
//! constructors below turn each row-major product of the kernel set into one, and the tests
//! check every constructor against the row-major definition with a CPU model of the call.

use std::ffi::c_void;

use cudarc::cublas::sys;
use cudarc::driver::CudaStream;
use dtl_core::{DtlError, Result};

use crate::ops::Dp;

/// One (strided-batched) column-major product
/// `C_i = alpha op(A_i) op(B_i) + beta C_i`, `op(A)` `m x k`, `op(B)` `k x n`, `C` `m x n`,
/// operands starting `stride_*` values apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    fn single(
        trans_a: bool,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        (lda, ldb, ldc): (usize, usize, usize),
        beta: f32,
    ) -> Gemm {
        Gemm {
            trans_a,
            trans_b,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            alpha: 1.0,
            beta,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// Row-major `y (m x n) = x (m x k) w^T`, `w` `(n, k)`: operands `(A, B, C) = (w, x, y)`.
    pub fn linear(m: usize, k: usize, n: usize, beta: f32) -> Gemm {
        Gemm::single(true, false, (n, m, k), (k, k, n), beta)
    }

    /// Row-major `dx (m x k) = dy (m x n) w`, `w` `(n, k)`: operands `(w, dy, dx)`.
    pub fn linear_vjp(m: usize, k: usize, n: usize, beta: f32) -> Gemm {
        Gemm::single(false, false, (k, m, n), (k, n, k), beta)
    }

    /// Row-major `dw (n x k) = dy^T (n x m) x (m x k)`: operands `(x, dy, dw)`.
    pub fn linear_wgrad(m: usize, k: usize, n: usize, beta: f32) -> Gemm {
        Gemm::single(false, true, (k, n, m), (k, n, k), beta)
    }

    fn heads(self, batch: usize, strides: (usize, usize, usize), alpha: f32) -> Gemm {
        Gemm {
            alpha,
            batch,
            stride_a: strides.0,
            stride_b: strides.1,
            stride_c: strides.2,
            ..self
        }
    }

    /// Per head `S (n x n) = alpha q (n x d) k^T`, head layouts `(heads, n, d)`:
    /// operands `(k, q, S)`.
    pub fn scores(heads: usize, n: usize, d: usize, alpha: f32) -> Gemm {
        Gemm::single(true, false, (n, n, d), (d, d, n), 0.0).heads(
            heads,
            (n * d, n * d, n * n),
            alpha,
        )
    }

    /// Per head `O (n x d) = P (n x n) v (n x d)`: operands `(v, P, O)`.
    pub fn probs_values(heads: usize, n: usize, d: usize) -> Gemm {
        Gemm::single(false, false, (d, n, n), (d, n, d), 0.0).heads(
            heads,
            (n * d, n * n, n * d),
            1.0,
        )
    }

    /// Per head `dV (n x d) = P^T (n x n) dO (n x d)`: operands `(dO, P, dV)`.
    pub fn probs_t_grad(heads: usize, n: usize, d: usize) -> Gemm {
        Gemm::single(false, true, (d, n, n), (d, n, d), 0.0).heads(
            heads,
            (n * d, n * n, n * d),
            1.0,
        )
    }

    /// Per head `dP (n x n) = dO (n x d) v^T`: operands `(v, dO, dP)`.
    pub fn grad_values_t(heads: usize, n: usize, d: usize) -> Gemm {
        Gemm::single(true, false, (n, n, d), (d, d, n), 0.0).heads(
            heads,
            (n * d, n * d, n * n),
            1.0,
        )
    }

    /// Per head `dQ (n x d) = G (n x n) k (n x d)`: operands `(k, G, dQ)`; the same shape as
    /// [`Gemm::probs_values`].
    pub fn grad_q(heads: usize, n: usize, d: usize) -> Gemm {
        Gemm::probs_values(heads, n, d)
    }

    /// Per head `dK (n x d) = G^T (n x n) q (n x d)`: operands `(q, G, dK)`; the same shape
    /// as [`Gemm::probs_t_grad`].
    pub fn grad_k(heads: usize, n: usize, d: usize) -> Gemm {
        Gemm::probs_t_grad(heads, n, d)
    }

    /// Values of `A`, `B` and `C` the call touches (from the first operand's start).
    pub fn extents(&self) -> (usize, usize, usize) {
        let span = |rows: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (cols - 1) * ld + rows
            }
        };
        let (ar, ac) = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        let batched = |stride: usize, one: usize| {
            if self.batch == 0 || one == 0 {
                0
            } else {
                (self.batch - 1) * stride + one
            }
        };
        (
            batched(self.stride_a, span(ar, ac, self.lda)),
            batched(self.stride_b, span(br, bc, self.ldb)),
            batched(self.stride_c, span(self.m, self.n, self.ldc)),
        )
    }
}

/// A cuBLAS handle on the device's compute stream with a workspace it owns through the
/// caller, default (non-TF32) math, pointer mode host.
pub(crate) struct Blas {
    handle: sys::cublasHandle_t,
}

// SAFETY: a cuBLAS handle may be used from any thread; the device binds its context to the
// calling thread before every call and the handle's stream orders the work.
unsafe impl Send for Blas {}
// SAFETY: see above; no call changes the handle's state after creation.
unsafe impl Sync for Blas {}

fn blas_err(what: &str, e: sys::cublasStatus_t) -> DtlError {
    DtlError::Device(format!("{what}: cuBLAS error {e:?}"))
}

impl Blas {
    /// A handle on `stream` using `workspace_bytes` of device memory at `workspace`.
    ///
    /// # Safety
    /// `workspace` must point to `workspace_bytes` of device memory of `stream`'s context that
    /// outlives the handle, and the context must be bound to the calling thread.
    pub unsafe fn new(stream: &CudaStream, workspace: u64, workspace_bytes: usize) -> Result<Blas> {
        let mut handle: sys::cublasHandle_t = std::ptr::null_mut();
        sys::cublasCreate_v2(&mut handle)
            .result()
            .map_err(|e| blas_err("creating a cuBLAS handle", e.0))?;
        let blas = Blas { handle };
        sys::cublasSetStream_v2(handle, stream.cu_stream() as sys::cudaStream_t)
            .result()
            .map_err(|e| blas_err("setting the cuBLAS stream", e.0))?;
        sys::cublasSetWorkspace_v2(handle, workspace as *mut c_void, workspace_bytes)
            .result()
            .map_err(|e| blas_err("setting the cuBLAS workspace", e.0))?;
        sys::cublasSetMathMode(handle, sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
            .result()
            .map_err(|e| blas_err("setting the cuBLAS math mode", e.0))?;
        Ok(blas)
    }

    /// Runs `g` on the device pointers `a`, `b`, `c`, each in its storage: all f32, or `a`
    /// and `b` bf16 and `c` either; compute f32 (TF32 off) in both cases.
    ///
    /// # Safety
    /// `a`, `b`, `c` must point to device buffers of the handle's context holding at least
    /// [`Gemm::extents`] values each, `c` not overlapping `a` or `b`; every dimension, leading
    /// dimension and the batch must fit `i32` (checked by [`Blas::check`]); the context must be
    /// bound to the calling thread.
    pub unsafe fn run(&self, op: &str, g: &Gemm, a: Dp, b: Dp, c: Dp) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        if a.bf16 != b.bf16 || (c.bf16 && !a.bf16) {
            return Err(DtlError::Device(format!(
                "{op}: internal error: a product of mixed storage reached cuBLAS unconverted"
            )));
        }
        let ty = |p: Dp| {
            if p.bf16 {
                sys::cudaDataType_t::CUDA_R_16BF
            } else {
                sys::cudaDataType_t::CUDA_R_32F
            }
        };
        let (ta, tb, tc) = (ty(a), ty(b), ty(c));
        let (a, b, c) = (a.addr, b.addr, c.addr);
        let t = |x: bool| {
            if x {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let (m, n, k) = (g.m as i32, g.n as i32, g.k as i32);
        let (lda, ldb, ldc) = (
            g.lda.max(1) as i32,
            g.ldb.max(1) as i32,
            g.ldc.max(1) as i32,
        );
        let alpha = &g.alpha as *const f32 as *const c_void;
        let beta = &g.beta as *const f32 as *const c_void;
        let status = if g.batch == 1 {
            sys::cublasGemmEx(
                self.handle,
                t(g.trans_a),
                t(g.trans_b),
                m,
                n,
                k,
                alpha,
                a as *const c_void,
                ta,
                lda,
                b as *const c_void,
                tb,
                ldb,
                beta,
                c as *mut c_void,
                tc,
                ldc,
                compute,
                algo,
            )
        } else {
            sys::cublasGemmStridedBatchedEx(
                self.handle,
                t(g.trans_a),
                t(g.trans_b),
                m,
                n,
                k,
                alpha,
                a as *const c_void,
                ta,
                lda,
                g.stride_a as i64,
                b as *const c_void,
                tb,
                ldb,
                g.stride_b as i64,
                beta,
                c as *mut c_void,
                tc,
                ldc,
                g.stride_c as i64,
                g.batch as i32,
                compute,
                algo,
            )
        };
        status.result().map_err(|e| blas_err(op, e.0))
    }

    /// Checks that every size of `g` fits cuBLAS's 32-bit arguments and that its leading
    /// dimensions are ones cuBLAS accepts.
    pub fn check(op: &str, g: &Gemm) -> Result<()> {
        let rows_a = if g.trans_a { g.k } else { g.m };
        let rows_b = if g.trans_b { g.n } else { g.k };
        if g.lda < rows_a.max(1) || g.ldb < rows_b.max(1) || g.ldc < g.m.max(1) {
            return Err(DtlError::Device(format!(
                "{op}: internal error: leading dimensions {}, {}, {} too small for {g:?}",
                g.lda, g.ldb, g.ldc
            )));
        }
        for (name, v) in [
            ("m", g.m),
            ("n", g.n),
            ("k", g.k),
            ("lda", g.lda),
            ("ldb", g.ldb),
            ("ldc", g.ldc),
            ("batch", g.batch),
        ] {
            if v > i32::MAX as usize {
                return Err(DtlError::invalid(format!(
                    "{op}: the matrix product's {name} = {v} exceeds cuBLAS's 32-bit range"
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once; an error here has no
        // one to report to.
        let _ = unsafe { sys::cublasDestroy_v2(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU model of the column-major call the emulator uses, after checking the extents.
    fn run_cpu(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (ea, eb, ec) = g.extents();
        assert!(
            a.len() >= ea && b.len() >= eb && c.len() >= ec,
            "extents {:?}",
            g.extents()
        );
        crate::emulator::gemm_cpu(g, a, b, c);
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed)) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    /// Row-major `a (r x i) b (i x c)` with optional transposed storage.
    fn matmul(a: &[f32], ta: bool, b: &[f32], tb: bool, r: usize, i: usize, c: usize) -> Vec<f32> {
        let mut out = vec![0.0; r * c];
        for x in 0..r {
            for y in 0..c {
                let mut s = 0.0f64;
                for l in 0..i {
                    let av = if ta { a[l * r + x] } else { a[x * i + l] };
                    let bv = if tb { b[y * i + l] } else { b[l * c + y] };
                    s += av as f64 * bv as f64;
                }
                out[x * c + y] = s as f32;
            }
        }
        out
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
    }

    #[test]
    fn linear_products_match_their_row_major_definitions() {
        let (m, k, n) = (5, 3, 4);
        let x = vals(m * k, 1);
        let w = vals(n * k, 2);
        let dy = vals(m * n, 3);
        // y = x w^T, then accumulated once more
        let mut y = vec![1.0; m * n];
        run_cpu(&Gemm::linear(m, k, n, 1.0), &w, &x, &mut y);
        let want: Vec<f32> = matmul(&x, false, &w, true, m, k, n)
            .iter()
            .map(|v| v + 1.0)
            .collect();
        close(&y, &want);
        // dx = dy w
        let mut dx = vec![9.0; m * k];
        run_cpu(&Gemm::linear_vjp(m, k, n, 0.0), &w, &dy, &mut dx);
        close(&dx, &matmul(&dy, false, &w, false, m, n, k));
        // dw = dy^T x
        let mut dw = vec![0.0; n * k];
        run_cpu(&Gemm::linear_wgrad(m, k, n, 0.0), &x, &dy, &mut dw);
        close(&dw, &matmul(&dy, true, &x, false, n, m, k));
    }

    #[test]
    fn attention_products_match_their_row_major_definitions() {
        let (h, n, d) = (3, 5, 4);
        let q = vals(h * n * d, 4);
        let k = vals(h * n * d, 5);
        let p = vals(h * n * n, 6);
        let mut s = vec![0.0; h * n * n];
        run_cpu(&Gemm::scores(h, n, d, 0.5), &k, &q, &mut s);
        let mut o = vec![0.0; h * n * d];
        run_cpu(&Gemm::probs_values(h, n, d), &k, &p, &mut o);
        let mut dv = vec![0.0; h * n * d];
        run_cpu(&Gemm::probs_t_grad(h, n, d), &q, &p, &mut dv);
        let mut dp = vec![0.0; h * n * n];
        run_cpu(&Gemm::grad_values_t(h, n, d), &k, &q, &mut dp);
        for i in 0..h {
            let (qi, ki) = (&q[i * n * d..][..n * d], &k[i * n * d..][..n * d]);
            let pi = &p[i * n * n..][..n * n];
            let want_s: Vec<f32> = matmul(qi, false, ki, true, n, d, n)
                .iter()
                .map(|v| v * 0.5)
                .collect();
            close(&s[i * n * n..][..n * n], &want_s);
            close(
                &o[i * n * d..][..n * d],
                &matmul(pi, false, ki, false, n, n, d),
            );
            close(
                &dv[i * n * d..][..n * d],
                &matmul(pi, true, qi, false, n, n, d),
            );
            close(
                &dp[i * n * n..][..n * n],
                &matmul(qi, false, ki, true, n, d, n),
            );
        }
        assert_eq!(Gemm::grad_q(h, n, d), Gemm::probs_values(h, n, d));
        assert_eq!(Gemm::grad_k(h, n, d), Gemm::probs_t_grad(h, n, d));
    }

    #[test]
    fn extents_cover_the_last_batch_entry() {
        let g = Gemm::scores(4, 3, 2, 1.0);
        assert_eq!(g.extents(), (3 * 6 + 6, 3 * 6 + 6, 3 * 9 + 9));
        assert_eq!(Gemm::linear(0, 3, 2, 0.0).extents().2, 0);
        assert!(Blas::check("op", &Gemm::linear(1 << 31, 2, 2, 0.0)).is_err());
        assert!(Blas::check("op", &Gemm::linear(4, 2, 2, 0.0)).is_ok());
    }
}
