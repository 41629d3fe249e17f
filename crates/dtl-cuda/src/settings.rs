//! [`DeviceSettings`]: the run-time choices of a CUDA device handle that change which kernels
//! run, not what they compute, shared by [`crate::Gpu`] and [`crate::Emulator`].

use crate::fused::AttentionKernels;
use crate::lt::{EpilogueStats, GemmEpilogue};

/// The settings of a device handle ([`crate::Gpu`], [`crate::Emulator`]): which attention
/// kernels it runs and how it adds the bias of a linear, and how often that bias epilogue ran.
///
/// Each handle starts from the environment when it is opened (`DTL_ATTENTION`,
/// `DTL_GEMM_EPILOGUE`; see [`AttentionKernels`] and [`GemmEpilogue`]); a setting belongs to
/// the handle it is made on, and clones made afterwards inherit it. Code that works with
/// either device takes `impl DeviceSettings`:
///
/// ```
/// use dtl_cuda::{AttentionKernels, DeviceSettings, GemmEpilogue};
///
/// /// The fastest kernels of a bf16 training step.
/// fn fastest(device: &mut impl DeviceSettings) {
///     device.set_attention(AttentionKernels::Fused);
///     device.set_gemm_epilogue(GemmEpilogue::Lt);
/// }
///
/// // The emulator needs a C++20 compiler; without one there is nothing to set.
/// if let Ok(mut emu) = dtl_cuda::Emulator::new() {
///     fastest(&mut emu);
///     assert_eq!(emu.attention_kernels(), AttentionKernels::Fused);
///     assert_eq!(emu.gemm_epilogue(), GemmEpilogue::Lt);
///     assert_eq!(emu.epilogue_stats().fused, 0);
/// }
/// ```
pub trait DeviceSettings {
    /// Selects the attention kernels of this handle (clones made later inherit it); the
    /// initial selection is `DTL_ATTENTION`'s when the device was opened (see
    /// [`AttentionKernels`]). Plan the scratch ([`dtl_kernels::Kernels::attention_scratch`])
    /// after choosing.
    ///
    /// ```
    /// use dtl_cuda::{AttentionKernels, DeviceSettings};
    /// if let Ok(mut emu) = dtl_cuda::Emulator::new() {
    ///     emu.set_attention(AttentionKernels::Fused);
    ///     assert_eq!(emu.attention_kernels(), AttentionKernels::Fused);
    /// }
    /// ```
    fn set_attention(&mut self, kernels: AttentionKernels);

    /// The attention kernels this handle runs (see [`DeviceSettings::set_attention`]).
    ///
    /// ```
    /// use dtl_cuda::DeviceSettings;
    /// if let Ok(emu) = dtl_cuda::Emulator::new() {
    ///     println!("{}", emu.attention_kernels().name());
    /// }
    /// ```
    fn attention_kernels(&self) -> AttentionKernels;

    /// Selects how this handle adds the bias of a linear (clones made later inherit it); the
    /// initial selection is `DTL_GEMM_EPILOGUE`'s when the device was opened (see
    /// [`GemmEpilogue`]). With [`GemmEpilogue::Lt`] the bf16 linears run cuBLASLt's bias
    /// epilogue on a GPU, and its model on the emulator.
    ///
    /// ```
    /// use dtl_cuda::{DeviceSettings, GemmEpilogue};
    /// if let Ok(mut emu) = dtl_cuda::Emulator::new() {
    ///     emu.set_gemm_epilogue(GemmEpilogue::Lt);
    ///     assert_eq!(emu.gemm_epilogue(), GemmEpilogue::Lt);
    /// }
    /// ```
    fn set_gemm_epilogue(&mut self, epilogue: GemmEpilogue);

    /// How this handle adds the bias of a linear (see [`DeviceSettings::set_gemm_epilogue`]).
    ///
    /// ```
    /// use dtl_cuda::DeviceSettings;
    /// if let Ok(emu) = dtl_cuda::Emulator::new() {
    ///     println!("{}", emu.gemm_epilogue().name());
    /// }
    /// ```
    fn gemm_epilogue(&self) -> GemmEpilogue;

    /// How many bf16 linears with a bias ran with the bias epilogue and how many fell back to
    /// the plain path, since the device was opened (over all its clones).
    ///
    /// ```
    /// use dtl_cuda::DeviceSettings;
    /// if let Ok(emu) = dtl_cuda::Emulator::new() {
    ///     assert_eq!(emu.epilogue_stats(), dtl_cuda::EpilogueStats::default());
    /// }
    /// ```
    fn epilogue_stats(&self) -> EpilogueStats;
}
