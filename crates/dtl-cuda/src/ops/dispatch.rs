//! [`kernel_ops!`], the methods of [`dtl_kernels::Kernels`] that every [`super::Exec`] device
//! shares.

/// The methods of [`dtl_kernels::Kernels`] that are the same on every [`super::Exec`] device,
/// for use inside its `impl Kernels`: each checks and runs the operation of the same name in
/// `ops`. The device writes the rest (`describe`, `alloc`, `len`, `upload`, `download`,
/// `synchronize`, `memory`, `reset_peak`).
macro_rules! kernel_ops {
    () => {
        fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf, len: usize) -> Result<()> {
            $crate::ops::copy(self, src, dst, len)
        }

        fn fill(&self, dst: &mut Self::Buf, len: usize, value: f32) -> Result<()> {
            $crate::ops::fill(self, dst, len, value)
        }

        fn add(&self, y: &mut Self::Buf, x: &Self::Buf, len: usize) -> Result<()> {
            $crate::ops::add(self, y, x, len)
        }

        fn linear(
            &self,
            x: &Self::Buf,
            w: &Self::Buf,
            bias: Option<&Self::Buf>,
            m: usize,
            k: usize,
            n: usize,
            y: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::linear(self, x, w, bias, m, k, n, y, accumulate)
        }

        fn linear_vjp(
            &self,
            dy: &Self::Buf,
            w: &Self::Buf,
            m: usize,
            k: usize,
            n: usize,
            dx: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::linear_vjp(self, dy, w, m, k, n, dx, accumulate)
        }

        fn linear_wgrad(
            &self,
            dy: &Self::Buf,
            x: &Self::Buf,
            m: usize,
            k: usize,
            n: usize,
            dw: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::linear_wgrad(self, dy, x, m, k, n, dw, accumulate)
        }

        fn sum_rows(
            &self,
            dy: &Self::Buf,
            m: usize,
            n: usize,
            db: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::sum_rows(self, dy, m, n, db, accumulate)
        }

        fn layer_norm(
            &self,
            x: &Self::Buf,
            gamma: &Self::Buf,
            beta: &Self::Buf,
            rows: usize,
            d: usize,
            eps: f32,
            y: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::layer_norm(self, x, gamma, beta, rows, d, eps, y)
        }

        fn layer_norm_vjp(
            &self,
            x: &Self::Buf,
            gamma: &Self::Buf,
            dy: &Self::Buf,
            rows: usize,
            d: usize,
            eps: f32,
            dx: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::layer_norm_vjp(self, x, gamma, dy, rows, d, eps, dx, accumulate)
        }

        fn gelu(&self, x: &Self::Buf, len: usize, y: &mut Self::Buf) -> Result<()> {
            $crate::ops::gelu(self, x, len, y)
        }

        fn gelu_vjp(&self, u: &Self::Buf, len: usize, g: &mut Self::Buf) -> Result<()> {
            $crate::ops::gelu_vjp(self, u, len, g)
        }

        fn attention(
            &self,
            qkv: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            out: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention(self, qkv, shape, out, scratch)
        }

        fn attention_vjp(
            &self,
            qkv: &Self::Buf,
            dout: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            dqkv: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention_vjp(self, qkv, dout, shape, dqkv, scratch)
        }

        fn attention_bias(
            &self,
            qkv: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            bias: &Self::Buf,
            groups: usize,
            out: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention_bias(self, qkv, shape, bias, groups, out, scratch)
        }

        fn attention_bias_vjp(
            &self,
            qkv: &Self::Buf,
            dout: &Self::Buf,
            shape: dtl_kernels::AttnShape,
            bias: &Self::Buf,
            groups: usize,
            dqkv: &mut Self::Buf,
            scratch: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::attention_bias_vjp(self, qkv, dout, shape, bias, groups, dqkv, scratch)
        }

        fn window_partition(
            &self,
            x: &Self::Buf,
            shape: dtl_kernels::WindowShape,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::window_partition(self, x, shape, out)
        }

        fn window_merge(
            &self,
            x: &Self::Buf,
            shape: dtl_kernels::WindowShape,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::window_merge(self, x, shape, out)
        }

        fn patch_merge(
            &self,
            x: &Self::Buf,
            shape: dtl_kernels::MergeShape,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::patch_merge(self, x, shape, out)
        }

        fn patch_merge_vjp(
            &self,
            dy: &Self::Buf,
            shape: dtl_kernels::MergeShape,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::patch_merge_vjp(self, dy, shape, dx)
        }

        fn attention_scratch(&self, shape: dtl_kernels::AttnShape) -> usize {
            $crate::ops::attention_scratch_on(self, shape)
        }

        fn add_scaled(
            &self,
            x: &mut Self::Buf,
            branch: &Self::Buf,
            batch: usize,
            per_sample: usize,
            scales: Option<&Self::Buf>,
        ) -> Result<()> {
            $crate::ops::add_scaled(self, x, branch, batch, per_sample, scales)
        }

        fn scaled(
            &self,
            g: &Self::Buf,
            batch: usize,
            per_sample: usize,
            scales: Option<&Self::Buf>,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::scaled(self, g, batch, per_sample, scales, out)
        }

        fn patchify(
            &self,
            images: &Self::Buf,
            batch: usize,
            channels: usize,
            size: usize,
            patch: usize,
            cols: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::patchify(self, images, batch, channels, size, patch, cols)
        }

        fn assemble_tokens(
            &self,
            patches: &Self::Buf,
            prefix_tokens: &Self::Buf,
            pos: &Self::Buf,
            batch: usize,
            prefix: usize,
            patches_per_sample: usize,
            d: usize,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::assemble_tokens(
                self,
                patches,
                prefix_tokens,
                pos,
                batch,
                prefix,
                patches_per_sample,
                d,
                out,
            )
        }

        fn swish(&self, z: &Self::Buf, len: usize, beta: f32, y: &mut Self::Buf) -> Result<()> {
            $crate::ops::swish(self, z, len, beta, y)
        }

        fn swish_vjp(
            &self,
            z: &Self::Buf,
            dy: &Self::Buf,
            len: usize,
            beta: f32,
            dz: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            $crate::ops::swish_vjp(self, z, dy, len, beta, dz, accumulate)
        }

        fn depthwise_conv(
            &self,
            x: &Self::Buf,
            w: &Self::Buf,
            shape: dtl_kernels::ConvShape,
            y: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::depthwise_conv(self, x, w, shape, y)
        }

        fn depthwise_conv_vjp(
            &self,
            x: &Self::Buf,
            w: &Self::Buf,
            dy: &Self::Buf,
            shape: dtl_kernels::ConvShape,
            dx: &mut Self::Buf,
            dw: &mut Self::Buf,
            accumulate_dw: bool,
        ) -> Result<()> {
            $crate::ops::depthwise_conv_vjp(self, x, w, dy, shape, dx, dw, accumulate_dw)
        }

        fn mean_tokens(
            &self,
            x: &Self::Buf,
            batch: usize,
            tokens: usize,
            d: usize,
            from: usize,
            to: usize,
            out: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::mean_tokens(self, x, batch, tokens, d, from, to, out)
        }

        fn mean_tokens_vjp(
            &self,
            g: &Self::Buf,
            batch: usize,
            tokens: usize,
            d: usize,
            from: usize,
            to: usize,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::mean_tokens_vjp(self, g, batch, tokens, d, from, to, dx)
        }

        fn soft_cross_entropy(
            &self,
            logits: &Self::Buf,
            targets: &Self::Buf,
            batch: usize,
            classes: usize,
            loss: &mut Self::Buf,
            grad: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::soft_cross_entropy(self, logits, targets, batch, classes, loss, grad)
        }

        fn eval_stats(
            &self,
            logits: &Self::Buf,
            labels: &Self::Buf,
            batch: usize,
            classes: usize,
            stats: &mut Self::Buf,
        ) -> Result<()> {
            $crate::ops::eval_stats(self, logits, labels, batch, classes, stats)
        }

        fn sum_squares(&self, x: &Self::Buf, len: usize, acc: &mut Self::Buf) -> Result<()> {
            $crate::ops::sum_squares(self, x, len, acc)
        }

        fn adamw(
            &self,
            param: &mut Self::Buf,
            grad: &Self::Buf,
            m: &mut Self::Buf,
            v: &mut Self::Buf,
            len: usize,
            step: &dtl_kernels::AdamwStep,
            clip: Option<(&Self::Buf, f32)>,
        ) -> Result<()> {
            $crate::ops::adamw(self, param, grad, m, v, len, step, clip)
        }

        fn adamw_from(
            &self,
            param: &mut Self::Buf,
            grad: &Self::Buf,
            m: &mut Self::Buf,
            v: &mut Self::Buf,
            len: usize,
            scalars: &Self::Buf,
            index: usize,
            clip: Option<(&Self::Buf, f32)>,
        ) -> Result<()> {
            $crate::ops::adamw_from(self, param, grad, m, v, len, scalars, index, clip)
        }
    };
}
pub(crate) use kernel_ops;
