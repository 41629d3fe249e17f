//! The fused attention kernels (`attention.cu`) on the emulator, against the CPU reference
//! (`dtl_kernels::CpuKernels`) and against the unfused device path: forward and input-only VJP,
//! with and without a score bias (several groups, Swin's `-100` mask entries), token counts that
//! are not multiples of the kernels' tiles (16 query rows, 32 keys, 8 keys), head dimensions 4 to
//! 64, and the fallback to the unfused kernels for a head dimension the fused ones do not take.
//!
//! f32 storage: every value within 1e-5 of the largest reference value (the sums run in another
//! order than the CPU's, and the softmax is computed online).
#![cfg(feature = "cuda")]

use dtl_cuda::{AttentionKernels, DeviceSettings, EmuBuf, Emulator};
use dtl_kernels::{AttnShape, CpuKernels, Kernels};

const TOL: f64 = 1e-5;

/// The emulator with the fused kernels selected, or `None` (saying why) without a C++ compiler.
fn fused() -> Option<Emulator> {
    match Emulator::new() {
        Ok(mut e) => {
            e.set_attention(AttentionKernels::Fused);
            Some(e)
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

/// Values in [-scale, scale), from a fixed seed.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let top = want
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (*g as f64 - *w as f64).abs();
        assert!(
            d <= TOL * top && g.is_finite(),
            "{what}: value {i}: {g} vs {w} (difference {d:e}, bound {:e})",
            TOL * top
        );
    }
}

/// Output and dqkv of one attention (with `bias` of `groups` groups when given) on `k`.
fn run<K: Kernels>(
    k: &K,
    s: AttnShape,
    qkv: &[f32],
    dout: &[f32],
    bias: Option<(&[f32], usize)>,
) -> (Vec<f32>, Vec<f32>) {
    let rows = s.batch * s.tokens;
    let w = s.width();
    let q = k.upload_new(qkv).unwrap();
    let d = k.upload_new(dout).unwrap();
    // garbage in the outputs and the scratch: every value must be written
    let mut out = k.upload_new(&values(rows * w, 7, 9.0)).unwrap();
    let mut dqkv = k.upload_new(&values(rows * 3 * w, 8, 9.0)).unwrap();
    let mut scratch = k
        .upload_new(&values(k.attention_scratch(s), 9, 9.0))
        .unwrap();
    match bias {
        None => {
            k.attention(&q, s, &mut out, &mut scratch).unwrap();
            k.attention_vjp(&q, &d, s, &mut dqkv, &mut scratch).unwrap();
        }
        Some((b, groups)) => {
            let b = k.upload_new(b).unwrap();
            k.attention_bias(&q, s, &b, groups, &mut out, &mut scratch)
                .unwrap();
            k.attention_bias_vjp(&q, &d, s, &b, groups, &mut dqkv, &mut scratch)
                .unwrap();
        }
    }
    (
        k.download(&out, rows * w).unwrap(),
        k.download(&dqkv, rows * 3 * w).unwrap(),
    )
}

/// The fused path against the CPU and the unfused path, on random inputs.
fn case(emu: &Emulator, s: AttnShape, groups: Option<usize>, seed: u64) {
    let rows = s.batch * s.tokens;
    let w = s.width();
    let qkv = values(rows * 3 * w, seed, 2.0);
    let dout = values(rows * w, seed + 1, 1.0);
    let bias = groups.map(|g| {
        let mut b = values(g * s.heads * s.tokens * s.tokens, seed + 2, 3.0);
        // a shifted-window mask: some entries of every other group far below the rest
        for (i, v) in b.iter_mut().enumerate() {
            if (i / (s.heads * s.tokens * s.tokens)) % 2 == 1 && i % 3 == 0 {
                *v -= 100.0;
            }
        }
        b
    });
    let bias = bias.as_deref().zip(groups);
    let cpu = run(&CpuKernels::new(), s, &qkv, &dout, bias);
    let got = run(emu, s, &qkv, &dout, bias);
    let mut unfused = emu.clone();
    unfused.set_attention(AttentionKernels::Unfused);
    let plain = run(&unfused, s, &qkv, &dout, bias);
    let tag = format!("{s:?} groups {groups:?}");
    check(&format!("attention {tag} vs cpu"), &got.0, &cpu.0);
    check(&format!("attention_vjp {tag} vs cpu"), &got.1, &cpu.1);
    check(&format!("attention {tag} vs unfused"), &got.0, &plain.0);
    check(&format!("attention_vjp {tag} vs unfused"), &got.1, &plain.1);
}

fn shape(batch: usize, tokens: usize, heads: usize, head_dim: usize) -> AttnShape {
    AttnShape {
        batch,
        tokens,
        heads,
        head_dim,
    }
}

#[test]
fn fused_matches_cpu_on_small_shapes() {
    let Some(emu) = fused() else { return };
    case(&emu, shape(2, 5, 2, 4), None, 1);
    case(&emu, shape(1, 17, 3, 8), None, 2);
    case(&emu, shape(3, 1, 2, 4), None, 3);
    case(&emu, shape(2, 6, 1, 7), None, 4);
}

#[test]
fn fused_matches_cpu_past_the_tiles() {
    let Some(emu) = fused() else { return };
    // 33 tokens: two key tiles of 32, three query tiles of 16, five key blocks of 8
    case(&emu, shape(1, 33, 2, 32), None, 10);
    case(&emu, shape(1, 21, 1, 64), None, 11);
}

#[test]
fn fused_matches_cpu_with_a_bias_of_several_groups() {
    let Some(emu) = fused() else { return };
    case(&emu, shape(4, 7, 2, 8), Some(2), 20);
    case(&emu, shape(3, 5, 1, 4), Some(3), 21);
    // a Swin window: 49 tokens, head dimension 32, the masked group second
    case(&emu, shape(2, 49, 1, 32), Some(2), 22);
}

#[test]
fn head_dims_above_the_limit_run_unfused() {
    let Some(emu) = fused() else { return };
    let big = shape(1, 3, 1, 130);
    let mut plain = emu.clone();
    plain.set_attention(AttentionKernels::Unfused);
    assert_eq!(emu.attention_scratch(big), plain.attention_scratch(big));
    case(&emu, big, None, 30);
}

#[test]
fn the_fused_scratch_has_no_token_by_token_block() {
    let Some(emu) = fused() else { return };
    let mut plain = emu.clone();
    plain.set_attention(AttentionKernels::Unfused);
    let s = shape(2, 197, 12, 64);
    let rows = 2 * 12 * 197;
    assert_eq!(emu.attention_scratch(s), rows * 64 + 4 * rows);
    assert_eq!(plain.attention_scratch(s), 4 * rows * 64 + 2 * rows * 197);
}

#[test]
fn fused_results_repeat_bit_for_bit() {
    let Some(emu) = fused() else { return };
    let s = shape(2, 19, 2, 8);
    let qkv = values(2 * 19 * 3 * 16, 40, 2.0);
    let dout = values(2 * 19 * 16, 41, 1.0);
    let a = run(&emu, s, &qkv, &dout, None);
    let b = run(&emu, s, &qkv, &dout, None);
    assert_eq!(a, b);
}

#[test]
fn fused_checks_its_buffers_and_bias() {
    let Some(emu) = fused() else { return };
    let s = shape(1, 4, 2, 4);
    let qkv = emu.upload_new(&values(4 * 24, 50, 1.0)).unwrap();
    let mut out = emu.alloc(4 * 8).unwrap();
    let mut small: EmuBuf = emu.alloc(emu.attention_scratch(s) - 1).unwrap();
    let e = emu
        .attention(&qkv, s, &mut out, &mut small)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention") && e.contains("`scratch`"), "{e}");
    let mut scratch = emu.alloc(emu.attention_scratch(s)).unwrap();
    let bias = emu.alloc(2 * 16).unwrap(); // one group needs 2 heads x 4 x 4
    let e = emu
        .attention_bias(&qkv, s, &bias, 0, &mut out, &mut scratch)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0 groups"), "{e}");
    let e = emu
        .attention_bias(&qkv, s, &bias, 2, &mut out, &mut scratch)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_bias") && e.contains("`bias`"), "{e}");
}

#[test]
fn the_fused_kernels_compile_for_hopper_without_local_memory() {
    if let Err(e) = dtl_cuda::libs::nvrtc() {
        assert!(
            std::env::var("DTL_REQUIRE_NVRTC").map_or(true, |v| v != "1"),
            "DTL_REQUIRE_NVRTC=1 but {e}"
        );
        eprintln!("skipping: {e}");
        return;
    }
    let ptx = dtl_cuda::compile_kernels(90).unwrap();
    for name in ["dtl_attn_fused", "dtl_attn_fused_dq", "dtl_attn_fused_dkv"] {
        let at = ptx
            .find(&format!(".entry {name}("))
            .unwrap_or_else(|| panic!("no entry point {name}"));
        let body = &ptx[at + 1..];
        let body = &body[..body.find(".entry ").unwrap_or(body.len())];
        // the per-row state stays in registers: no local-memory arrays
        assert!(
            !body.contains(".local"),
            "{name} keeps an array in local memory"
        );
    }
}

/// bf16 storage: the inputs rounded to bf16 on upload, then the output and dqkv rounded once
/// more on store (up to 2^-8 of each value: bf16 keeps 8 significant bits), and `D = dO . O`
/// formed from the recomputed output held in bf16 in the scratch; scores, probabilities and
/// every sum stay f32. Against the CPU on the same rounded inputs that stays within 1e-2 of the
/// largest value (the gradient's `dP - D` cancels, so its error is relative to the largest
/// value, not to each), and the fused path may not be worse than the unfused one by more than
/// 1e-3 of the largest value.
const BF16_TOL: f64 = 1e-2;

/// The largest difference of the bf16 device's attention (forward, VJP) from the CPU's on the
/// rounded inputs, relative to the largest reference value.
fn bf16_errors(emu: &Emulator, s: AttnShape, groups: Option<usize>, seed: u64) -> [f64; 2] {
    let rows = s.batch * s.tokens;
    let w = s.width();
    let act = |v: &[f32]| {
        let mut b = emu.alloc_act(v.len()).unwrap();
        emu.upload(v, &mut b).unwrap();
        b
    };
    let qkv = act(&values(rows * 3 * w, seed, 2.0));
    let dout = act(&values(rows * w, seed + 1, 1.0));
    let bias = groups.map(|g| {
        let b = values(g * s.heads * s.tokens * s.tokens, seed + 2, 3.0);
        emu.upload_frozen(&b).unwrap()
    });
    let mut out = act(&values(rows * w, 7, 9.0));
    let mut dqkv = act(&values(rows * 3 * w, 8, 9.0));
    let mut scratch = emu.alloc_act(emu.attention_scratch(s)).unwrap();
    match (&bias, groups) {
        (Some(b), Some(g)) => {
            emu.attention_bias(&qkv, s, b, g, &mut out, &mut scratch)
                .unwrap();
            emu.attention_bias_vjp(&qkv, &dout, s, b, g, &mut dqkv, &mut scratch)
                .unwrap();
        }
        _ => {
            emu.attention(&qkv, s, &mut out, &mut scratch).unwrap();
            emu.attention_vjp(&qkv, &dout, s, &mut dqkv, &mut scratch)
                .unwrap();
        }
    }
    // the reference on the values the device holds
    let host = |b: &EmuBuf, n: usize| emu.download(b, n).unwrap();
    let bias_host = bias.as_ref().map(|b| host(b, emu.len(b)));
    let want = run(
        &CpuKernels::new(),
        s,
        &host(&qkv, rows * 3 * w),
        &host(&dout, rows * w),
        bias_host.as_deref().zip(groups),
    );
    let got = (host(&out, rows * w), host(&dqkv, rows * 3 * w));
    let err = |g: &[f32], w: &[f32]| {
        let top = w.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .fold(0f64, f64::max);
        worst / top
    };
    [err(&got.0, &want.0), err(&got.1, &want.1)]
}

#[test]
fn fused_in_bf16_storage_matches_cpu_on_the_rounded_inputs() {
    let mut emu = match Emulator::with_precision(dtl_core::choice::Precision::Bf16) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    for (s, groups, seed) in [
        (shape(2, 17, 2, 8), None, 60),
        (shape(2, 49, 1, 32), Some(2), 61),
    ] {
        emu.set_attention(AttentionKernels::Fused);
        let fused = bf16_errors(&emu, s, groups, seed);
        emu.set_attention(AttentionKernels::Unfused);
        let unfused = bf16_errors(&emu, s, groups, seed);
        for (i, what) in ["attention", "attention_vjp"].into_iter().enumerate() {
            eprintln!(
                "{what} {s:?} bf16: largest difference {:.2e} fused, {:.2e} unfused, of the largest value",
                fused[i], unfused[i]
            );
            assert!(
                fused[i] <= BF16_TOL && fused[i] <= unfused[i] + 1e-3,
                "{what} {s:?} bf16: the fused path is off by {:.2e}, the unfused one by {:.2e}",
                fused[i],
                unfused[i]
            );
        }
    }
}
