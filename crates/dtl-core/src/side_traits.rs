//! What a side network says of itself besides its constructors ([`SideTraits`]): its default
//! conv kernel, whether it taps blocks, whether it reads `side.options`, its method label.
//! The schema asks it for defaults, so it depends on nothing else of the crate; it is
//! re-exported from [`crate::registry`].

/// What a side network knows about itself besides its constructors, registered next to its
/// [`SideEntry`](crate::registry::SideEntry) under the same name. A side network without one gets
/// [`SideTraits::PLUGIN`]: it taps blocks, reads `side.options` and has no conv.
///
/// ```
/// use dtl_core::registry::SideTraits;
/// dtl_core::inventory::submit! {
///     SideTraits { default_kernel: 5, ..SideTraits::plugin("conv_side_doc") }
/// }
/// let reg = dtl_core::registry::registry().unwrap();
/// assert_eq!(reg.side_traits("conv_side_doc").default_kernel, 5);
/// assert!(reg.side_traits("not_registered_anywhere").taps);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideTraits {
    /// The side network's `side.kind`.
    pub name: &'static str,
    /// `side.kernel` when the pipeline leaves it out (0: no conv).
    pub default_kernel: usize,
    /// Whether it taps backbone blocks (false for a linear probe: `side.rank`, `side.taps`
    /// and the others are not read, and the backbone runs without a tape).
    pub taps: bool,
    /// Whether it reads `side.options` (the built-in side networks read none).
    pub reads_options: bool,
    /// Its method name in reports (`DTL`); `None`: its `side.kind`.
    pub label: Option<&'static str>,
    /// Whether it shows the conv kernel in its method label (`DTL+ (k=3)`).
    pub label_kernel: bool,
}

impl SideTraits {
    /// What is assumed of a side network that registers no traits.
    pub const PLUGIN: SideTraits = SideTraits::plugin("");

    /// The traits of a plugin side network called `name`: taps blocks, reads options, no conv.
    ///
    /// ```
    /// let t = dtl_core::registry::SideTraits::plugin("mine");
    /// assert!(t.taps && t.reads_options && t.default_kernel == 0);
    /// ```
    pub const fn plugin(name: &'static str) -> SideTraits {
        SideTraits {
            name,
            default_kernel: 0,
            taps: true,
            reads_options: true,
            label: None,
            label_kernel: false,
        }
    }

    /// The method label of a run of side network `kind` with conv kernel `kernel` (as
    /// recorded; `None` or 0 means the default): `DTL`, `DTL+ (k=3)`, or `kind` itself.
    ///
    /// ```
    /// let mut t = dtl_core::registry::SideTraits::plugin("mine");
    /// assert_eq!(t.method_label("mine", None), "mine");
    /// t.label = Some("Mine");
    /// t.label_kernel = true;
    /// t.default_kernel = 3;
    /// assert_eq!(t.method_label("mine", Some(5)), "Mine (k=5)");
    /// assert_eq!(t.method_label("mine", Some(0)), "Mine (k=3)");
    /// ```
    pub fn method_label(&self, kind: &str, kernel: Option<usize>) -> String {
        let base = self.label.unwrap_or(kind);
        if self.label_kernel {
            let k = kernel.filter(|&k| k > 0).unwrap_or(self.default_kernel);
            format!("{base} (k={k})")
        } else {
            base.to_string()
        }
    }
}

/// The [`SideTraits`] registered for side network `name`, or [`SideTraits::plugin`] for one
/// that registered none (every registration is linked in, so no registry needs gathering).
///
/// ```
/// assert_eq!(dtl_core::registry::side_traits("no_such_side").default_kernel, 0);
/// ```
pub fn side_traits(name: &str) -> SideTraits {
    inventory::iter::<SideTraits>
        .into_iter()
        .find(|t| t.name == name)
        .copied()
        .unwrap_or(SideTraits::PLUGIN)
}

inventory::collect!(SideTraits);
