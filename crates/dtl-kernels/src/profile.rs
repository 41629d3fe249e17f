//! Where a device's time goes: [`KernelProfile`], what [`crate::Kernels::profile_take`]
//! returns.

/// One row of a [`KernelProfile`]: every timed operation under one label.
///
/// ```
/// let p = dtl_kernels::KernelProfile::from_totals("host clock", 2.0, [("dtl_gelu".to_string(), 4, 1.0)]);
/// let r = &p.rows[0];
/// assert_eq!((r.label.as_str(), r.calls, r.total_ms, r.mean_us, r.share), ("dtl_gelu", 4, 1.0, 250.0, 1.0));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    /// What was timed: a kernel's name (`dtl_gelu`), a matrix product with its shape and
    /// storage (`gemm linear 6304x2304x768 bf16`), `copy`, `graph replay` or `other`.
    pub label: String,
    /// How many operations were timed under the label.
    pub calls: u64,
    /// Their summed time in milliseconds.
    pub total_ms: f64,
    /// `total_ms / calls` in microseconds (0 without calls).
    pub mean_us: f64,
    /// `total_ms` over the summed time of every row (0 to 1; the rows' shares sum to 1).
    pub share: f64,
}

/// The time a device spent in each kind of operation over a profiled span
/// ([`crate::Kernels::profile_start`] to [`crate::Kernels::profile_take`]).
///
/// The rows are sorted by time, longest first. On a GPU each operation is bracketed by a
/// pair of CUDA events, so a row's time is the time the stream spent on that work; `wall_ms`
/// is the host's clock over the whole span (the device synchronised at its end), so
/// `total_ms() / wall_ms` is how busy the stream was.
///
/// ```
/// use dtl_kernels::KernelProfile;
/// let p = KernelProfile::from_totals(
///     "cuda events",
///     10.0,
///     [("a".to_string(), 1, 1.0), ("b".to_string(), 2, 6.0), ("c".to_string(), 1, 1.0)],
/// );
/// assert_eq!(p.rows[0].label, "b");
/// assert_eq!(p.total_ms(), 8.0);
/// let top = p.top(1);
/// assert_eq!(top.rows.len(), 2);
/// assert_eq!((top.rows[1].label.as_str(), top.rows[1].calls), ("other", 2));
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub struct KernelProfile {
    /// The rows, longest total first (ties by label).
    pub rows: Vec<ProfileRow>,
    /// Host wall-clock time of the profiled span in milliseconds.
    pub wall_ms: f64,
    /// How the rows were timed: `cuda events` on a GPU, `host clock` on the emulator.
    pub clock: String,
}

/// The label of the row that [`KernelProfile::top`] folds the shorter rows into.
pub const OTHER: &str = "other";

impl KernelProfile {
    /// A profile from `(label, calls, total_ms)` totals (one per label; repeated labels are
    /// merged), timed by `clock`, over `wall_ms` of wall-clock time. Negative or non-finite
    /// times count as 0.
    ///
    /// ```
    /// let p = dtl_kernels::KernelProfile::from_totals(
    ///     "host clock",
    ///     1.0,
    ///     [("x".to_string(), 1, 0.5), ("x".to_string(), 1, 0.25)],
    /// );
    /// assert_eq!((p.rows.len(), p.rows[0].calls, p.rows[0].total_ms), (1, 2, 0.75));
    /// ```
    pub fn from_totals(
        clock: &str,
        wall_ms: f64,
        totals: impl IntoIterator<Item = (String, u64, f64)>,
    ) -> KernelProfile {
        let mut merged: Vec<(String, u64, f64)> = Vec::new();
        let mut at = std::collections::HashMap::new();
        for (label, calls, ms) in totals {
            let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
            match at.get(&label) {
                Some(&i) => {
                    let row: &mut (String, u64, f64) = &mut merged[i];
                    row.1 += calls;
                    row.2 += ms;
                }
                None => {
                    at.insert(label.clone(), merged.len());
                    merged.push((label, calls, ms));
                }
            }
        }
        let sum: f64 = merged.iter().map(|r| r.2).sum();
        let mut rows: Vec<ProfileRow> = merged
            .into_iter()
            .map(|(label, calls, total_ms)| ProfileRow {
                mean_us: if calls == 0 {
                    0.0
                } else {
                    total_ms * 1e3 / calls as f64
                },
                share: if sum > 0.0 { total_ms / sum } else { 0.0 },
                label,
                calls,
                total_ms,
            })
            .collect();
        rows.sort_by(|a, b| {
            b.total_ms
                .total_cmp(&a.total_ms)
                .then_with(|| a.label.cmp(&b.label))
        });
        KernelProfile {
            rows,
            wall_ms: if wall_ms.is_finite() {
                wall_ms.max(0.0)
            } else {
                0.0
            },
            clock: clock.to_string(),
        }
    }

    /// The summed time of every row in milliseconds.
    ///
    /// ```
    /// assert_eq!(dtl_kernels::KernelProfile::default().total_ms(), 0.0);
    /// ```
    pub fn total_ms(&self) -> f64 {
        self.rows.iter().map(|r| r.total_ms).sum()
    }

    /// The number of operations timed.
    ///
    /// ```
    /// let p = dtl_kernels::KernelProfile::from_totals("host clock", 1.0, [("x".to_string(), 3, 0.5)]);
    /// assert_eq!(p.calls(), 3);
    /// ```
    pub fn calls(&self) -> u64 {
        self.rows.iter().map(|r| r.calls).sum()
    }

    /// The `n` longest rows, and one row [`OTHER`] summing the rest when there is a rest.
    ///
    /// ```
    /// let p = dtl_kernels::KernelProfile::from_totals("host clock", 1.0, [("x".to_string(), 1, 0.5)]);
    /// assert_eq!(p.top(25), p);
    /// ```
    pub fn top(&self, n: usize) -> KernelProfile {
        if self.rows.len() <= n {
            return self.clone();
        }
        let (keep, rest) = self.rows.split_at(n);
        let mut rows = keep.to_vec();
        let calls: u64 = rest.iter().map(|r| r.calls).sum();
        let total_ms: f64 = rest.iter().map(|r| r.total_ms).sum();
        rows.push(ProfileRow {
            label: OTHER.to_string(),
            calls,
            total_ms,
            mean_us: if calls == 0 {
                0.0
            } else {
                total_ms * 1e3 / calls as f64
            },
            share: rest.iter().map(|r| r.share).sum(),
        });
        KernelProfile {
            rows,
            wall_ms: self.wall_ms,
            clock: self.clock.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_sum_to_one_and_bad_times_count_as_zero() {
        let p = KernelProfile::from_totals(
            "host clock",
            f64::NAN,
            [
                ("a".to_string(), 2, 3.0),
                ("b".to_string(), 1, -1.0),
                ("c".to_string(), 1, f64::INFINITY),
                ("d".to_string(), 4, 1.0),
            ],
        );
        assert_eq!(p.wall_ms, 0.0);
        let s: f64 = p.rows.iter().map(|r| r.share).sum();
        assert!((s - 1.0).abs() < 1e-12, "{s}");
        assert_eq!(p.rows[0].label, "a");
        assert_eq!(p.rows[0].mean_us, 1500.0);
        let top = p.top(2);
        assert_eq!(top.rows.len(), 3);
        assert_eq!(top.rows[2].label, OTHER);
        assert_eq!(top.calls(), p.calls());
        assert_eq!(top.total_ms(), p.total_ms());
    }

    #[test]
    fn an_empty_profile_has_no_shares() {
        let p = KernelProfile::from_totals("host clock", 1.0, [("a".to_string(), 0, 0.0)]);
        assert_eq!((p.rows[0].share, p.rows[0].mean_us), (0.0, 0.0));
    }
}
