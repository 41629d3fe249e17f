//! Matrix products on strided views of slices: the one place the CPU kernels call the
//! `gemm` crate, whose API takes raw pointers.
//!
//! A [`Mat`] or [`MatMut`] names a matrix inside a slice by an offset and a row and column
//! stride; building one checks that every element it addresses lies inside the slice, so
//! [`matmul`] is safe to call with any views that could be built.
//!
//! ```
//! use dtl_kernels::cpu::strided::{matmul, Mat, MatMut};
//! // [1 2; 3 4] * [1 0; 0 1] read as the transpose of the identity
//! let a = [1.0, 2.0, 3.0, 4.0];
//! let eye = [1.0, 0.0, 0.0, 1.0];
//! let mut out = [0.0f32; 4];
//! matmul(
//!     MatMut::new(&mut out, 0, 2, 2, 2, 1),
//!     Mat::new(&a, 0, 2, 2, 2, 1),
//!     Mat::new(&eye, 0, 2, 2, 2, 1).t(),
//!     1.0,
//!     false,
//! );
//! assert_eq!(out, a);
//! ```

use gemm::Parallelism;

/// Where a matrix's elements lie in its slice: element `(i, j)` at `offset + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
struct Layout {
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Layout {
    /// The layout, checked to address only elements below `len`.
    ///
    /// # Panics
    /// When an element would lie at or past `len`.
    fn checked(len: usize, offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let fits = rows == 0
            || cols == 0
            || (rows - 1)
                .checked_mul(rs)
                .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
                .and_then(|rc| rc.checked_add(offset))
                .is_some_and(|last| last < len);
        assert!(
            fits,
            "strided view of {rows}x{cols} at offset {offset} (strides {rs}, {cs}) overruns a \
             slice of {len}"
        );
        // gemm takes strides as isize
        assert!(rs <= isize::MAX as usize && cs <= isize::MAX as usize);
        Self {
            offset,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

/// A read-only `rows x cols` matrix inside a slice: element `(i, j)` is
/// `data[offset + i * rs + j * cs]`.
///
/// ```
/// use dtl_kernels::cpu::strided::Mat;
/// let data = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
/// // the second and third columns of a 2 x 3 row-major matrix
/// let m = Mat::new(&data, 1, 2, 2, 3, 1);
/// assert_eq!((m.rows(), m.cols()), (2, 2));
/// assert_eq!(m.t().rows(), 2);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    at: Layout,
}

impl<'a> Mat<'a> {
    /// A view of `data`.
    ///
    /// # Panics
    /// When an element of the view would lie outside `data`.
    ///
    /// ```
    /// // every other value of 6: a 1 x 3 row with column stride 2
    /// let m = dtl_kernels::cpu::strided::Mat::new(&[0.0; 6], 0, 1, 3, 6, 2);
    /// assert_eq!(m.cols(), 3);
    /// ```
    pub fn new(
        data: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Self {
        let at = Layout::checked(data.len(), offset, rows, cols, rs, cs);
        Self { data, at }
    }

    /// A dense row-major `rows x cols` matrix at the start of `data`.
    ///
    /// ```
    /// let m = dtl_kernels::cpu::strided::Mat::rows_of(&[0.0; 6], 2, 3);
    /// assert_eq!((m.rows(), m.cols()), (2, 3));
    /// ```
    pub fn rows_of(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, 0, rows, cols, cols, 1)
    }

    /// The transpose, reading the same elements.
    ///
    /// ```
    /// let m = dtl_kernels::cpu::strided::Mat::rows_of(&[0.0; 6], 2, 3).t();
    /// assert_eq!((m.rows(), m.cols()), (3, 2));
    /// ```
    pub fn t(self) -> Self {
        let at = Layout {
            rows: self.at.cols,
            cols: self.at.rows,
            rs: self.at.cs,
            cs: self.at.rs,
            ..self.at
        };
        Self { at, ..self }
    }

    /// Rows.
    ///
    /// ```
    /// assert_eq!(dtl_kernels::cpu::strided::Mat::rows_of(&[0.0; 6], 3, 2).rows(), 3);
    /// ```
    pub fn rows(&self) -> usize {
        self.at.rows
    }

    /// Columns.
    ///
    /// ```
    /// assert_eq!(dtl_kernels::cpu::strided::Mat::rows_of(&[0.0; 6], 3, 2).cols(), 2);
    /// ```
    pub fn cols(&self) -> usize {
        self.at.cols
    }
}

/// A writable `rows x cols` matrix inside a slice, laid out as for [`Mat`].
///
/// ```
/// use dtl_kernels::cpu::strided::MatMut;
/// let mut data = [0.0f32; 6];
/// let m = MatMut::new(&mut data, 0, 3, 2, 2, 1);
/// assert_eq!((m.rows(), m.cols()), (3, 2));
/// ```
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    at: Layout,
}

impl<'a> MatMut<'a> {
    /// A view of `data`.
    ///
    /// # Panics
    /// When an element of the view would lie outside `data`.
    ///
    /// ```
    /// let mut d = [0.0f32; 6];
    /// // the first column of a 3 x 2 row-major matrix
    /// let m = dtl_kernels::cpu::strided::MatMut::new(&mut d, 0, 3, 1, 2, 1);
    /// assert_eq!(m.rows(), 3);
    /// ```
    pub fn new(
        data: &'a mut [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Self {
        let at = Layout::checked(data.len(), offset, rows, cols, rs, cs);
        Self { data, at }
    }

    /// A dense row-major `rows x cols` matrix at the start of `data`.
    ///
    /// ```
    /// let mut d = [0.0f32; 6];
    /// assert_eq!(dtl_kernels::cpu::strided::MatMut::rows_of(&mut d, 2, 3).cols(), 3);
    /// ```
    pub fn rows_of(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, 0, rows, cols, cols, 1)
    }

    /// Rows.
    ///
    /// ```
    /// let mut d = [0.0f32; 6];
    /// assert_eq!(dtl_kernels::cpu::strided::MatMut::rows_of(&mut d, 3, 2).rows(), 3);
    /// ```
    pub fn rows(&self) -> usize {
        self.at.rows
    }

    /// Columns.
    ///
    /// ```
    /// let mut d = [0.0f32; 6];
    /// assert_eq!(dtl_kernels::cpu::strided::MatMut::rows_of(&mut d, 3, 2).cols(), 2);
    /// ```
    pub fn cols(&self) -> usize {
        self.at.cols
    }
}

/// `dst = [dst +] scale * a * b`, single-threaded (callers split work across threads).
///
/// With `accumulate` false, `dst` is overwritten; its old values are never read.
///
/// # Panics
/// When the shapes do not chain: `a` must be `dst.rows x k` and `b` `k x dst.cols`.
///
/// ```
/// use dtl_kernels::cpu::strided::{matmul, Mat, MatMut};
/// let mut out = [1.0f32];
/// // [1 2] . [3 4], times 2, added to 1
/// matmul(MatMut::rows_of(&mut out, 1, 1), Mat::rows_of(&[1.0, 2.0], 1, 2),
///        Mat::rows_of(&[3.0, 4.0], 2, 1), 2.0, true);
/// assert_eq!(out, [23.0]);
/// ```
pub fn matmul(dst: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, scale: f32, accumulate: bool) {
    let (d, x, y) = (dst.at, a.at, b.at);
    let (m, n, k) = (d.rows, d.cols, x.cols);
    assert!(
        x.rows == m && y.rows == k && y.cols == n,
        "matmul of {}x{} by {}x{} into {m}x{n}",
        x.rows,
        x.cols,
        y.rows,
        y.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.data[d.offset + i * d.rs + j * d.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: `Layout::checked` proved that every element of the three views lies inside its
    // slice; `dst` borrows its slice mutably, so it aliases neither input; the call runs on
    // this thread only (Parallelism::None), so a view that repeats an element is still fine.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr().add(d.offset),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            a.data.as_ptr().add(x.offset),
            x.cs as isize,
            x.rs as isize,
            b.data.as_ptr().add(y.offset),
            y.cs as isize,
            y.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let at = |m: &Mat, i: usize, j: usize| m.data[m.at.offset + i * m.at.rs + j * m.at.cs];
        let mut out = vec![0.0; a.rows() * b.cols()];
        for i in 0..a.rows() {
            for j in 0..b.cols() {
                out[i * b.cols() + j] = (0..a.cols()).map(|l| at(&a, i, l) * at(&b, l, j)).sum();
            }
        }
        out
    }

    fn ramp(n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * a).sin()).collect()
    }

    #[test]
    fn strided_and_transposed_views_match_a_naive_product() {
        // a: 5x7 inside a 6x9 buffer at (1, 2); b: the transpose of a 4x7 dense matrix
        let abuf = ramp(6 * 9, 0.31);
        let a = Mat::new(&abuf, 9 + 2, 5, 7, 9, 1);
        let bbuf = ramp(4 * 7, 0.77);
        let b = Mat::rows_of(&bbuf, 4, 7).t();
        let want = naive(a, b);
        // dst: every other column of a 5x8 buffer, accumulated onto ones
        let mut dbuf = vec![1.0f32; 5 * 8];
        matmul(MatMut::new(&mut dbuf, 1, 5, 4, 8, 2), a, b, 0.5, true);
        for i in 0..5 {
            for j in 0..4 {
                let got = dbuf[1 + i * 8 + j * 2];
                let w = 1.0 + 0.5 * want[i * 4 + j];
                assert!((got - w).abs() < 1e-5, "({i}, {j}): {got} vs {w}");
            }
            // the columns in between are untouched
            assert_eq!(dbuf[i * 8], 1.0);
        }
    }

    #[test]
    fn an_empty_inner_dimension_writes_zeros_unless_accumulating() {
        let mut d = vec![3.0f32; 4];
        matmul(
            MatMut::rows_of(&mut d, 2, 2),
            Mat::rows_of(&[], 2, 0),
            Mat::rows_of(&[], 0, 2),
            1.0,
            true,
        );
        assert_eq!(d, [3.0; 4]);
        matmul(
            MatMut::rows_of(&mut d, 2, 2),
            Mat::rows_of(&[], 2, 0),
            Mat::rows_of(&[], 0, 2),
            1.0,
            false,
        );
        assert_eq!(d, [0.0; 4]);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn a_view_past_the_end_is_refused() {
        let buf = [0.0f32; 12];
        Mat::new(&buf, 1, 3, 4, 4, 1);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn an_overflowing_stride_is_refused() {
        let buf = [0.0f32; 12];
        Mat::new(&buf, 0, 2, 2, usize::MAX, 1);
    }

    #[test]
    #[should_panic(expected = "matmul of 2x3 by 2x2")]
    fn shapes_that_do_not_chain_are_refused() {
        let buf = [0.0f32; 6];
        let mut d = [0.0f32; 4];
        matmul(
            MatMut::rows_of(&mut d, 2, 2),
            Mat::rows_of(&buf, 2, 3),
            Mat::rows_of(&buf, 2, 2),
            1.0,
            false,
        );
    }
}
