//! GPU parity of the frozen ViT (`dtl_vit::cuda::GpuVit`) with the CPU model and with the
//! PyTorch reference fixtures, within 1e-3 relative in f32. They need a CUDA GPU: build with
//! `cargo test -p dtl-tests --features cuda --no-run`; scripts/gpu-check.sh runs them.
#![cfg(feature = "cuda")]

use dfdx::prelude::Const;
use dtl_core::{BackboneSpec, DropPath};

mod gpu_common;
mod parity_common;
use dtl_vit::cuda::GpuVit;
use dtl_vit::{Vit, VitWeights};
use gpu_common::{gpu, rand_vec};
use parity_common::{fixtures, read, rel_err};

const TOL: f64 = 1e-3;

fn assert_parity(got: &[f32], cpu: &[f32], what: &str) {
    let want: Vec<f64> = cpu.iter().map(|&v| v as f64).collect();
    let e = rel_err(got, &want);
    assert!(
        e <= TOL,
        "{what}: GPU vs CPU relative error {e:.3e} > {TOL:.0e}"
    );
}

/// timm-style random weights with every LayerNorm and bias perturbed, so that no term of
/// the block is an identity or a zero.
fn weights(spec: &BackboneSpec, seed: u64) -> VitWeights {
    let mut w = VitWeights::random(spec, seed);
    let mut k = seed * 100;
    let mut jitter = |v: &mut Vec<f32>, base: f32, amp: f32| {
        k += 1;
        let r = rand_vec(v.len(), k);
        for (x, r) in v.iter_mut().zip(r) {
            *x = base + amp * r;
        }
    };
    jitter(&mut w.patch_b, 0.0, 0.05);
    jitter(&mut w.norm_w, 1.0, 0.2);
    jitter(&mut w.norm_b, 0.0, 0.1);
    for b in &mut w.blocks {
        jitter(&mut b.norm1_w, 1.0, 0.2);
        jitter(&mut b.norm1_b, 0.0, 0.1);
        jitter(&mut b.qkv_b, 0.0, 0.05);
        jitter(&mut b.proj_b, 0.0, 0.05);
        jitter(&mut b.norm2_w, 1.0, 0.2);
        jitter(&mut b.norm2_b, 0.0, 0.1);
        jitter(&mut b.fc1_b, 0.0, 0.05);
        jitter(&mut b.fc2_b, 0.0, 0.05);
    }
    w
}

/// Checks embed, every block's forward and VJP (with and without drop path), and the final
/// norm and its VJP of one geometry.
fn block_parity<const T: usize, const W: usize>(spec: BackboneSpec, batch: usize, seed: u64) {
    let w = weights(&spec, seed);
    let cpu = Vit::<Const<T>, Const<W>>::new(spec.clone(), w.clone()).unwrap();
    let g = gpu();
    let gv = GpuVit::new(&g, &spec, &w).unwrap();
    let name = spec.name.clone();

    let images = rand_vec(batch * 3 * spec.image_size * spec.image_size, seed + 1);
    let x_cpu = cpu.embed_flat(&images, batch).unwrap();
    assert_parity(
        &gv.embed_host(&images, batch).unwrap(),
        &x_cpu,
        &format!("{name} embed"),
    );

    let drop = DropPath {
        attn: (0..batch)
            .map(|i| if i % 2 == 0 { 1.25 } else { 0.0 })
            .collect(),
        mlp: (0..batch)
            .map(|i| if i % 3 == 1 { 0.0 } else { 1.25 })
            .collect(),
    };
    let gy = rand_vec(x_cpu.len(), seed + 2);
    let mut x = x_cpu;
    for i in 0..spec.depth {
        for d in [None, Some(&drop)] {
            let tag = format!("{name} block {i} drop={}", d.is_some());
            let y_cpu = cpu.block_forward_flat(i, &x, batch, d).unwrap();
            let y_gpu = gv.block_forward_host(i, &x, batch, d).unwrap();
            assert_parity(&y_gpu, &y_cpu, &format!("{tag} forward"));
            let gx_cpu = cpu.block_vjp_flat(i, &x, &gy, batch, d).unwrap();
            let gx_gpu = gv.block_vjp_host(i, &x, &gy, batch, d).unwrap();
            assert_parity(&gx_gpu, &gx_cpu, &format!("{tag} vjp"));
        }
        x = cpu.block_forward_flat(i, &x, batch, None).unwrap();
    }
    let n_cpu = cpu.norm_forward_flat(&x).unwrap();
    assert_parity(
        &gv.norm_forward_host(&x).unwrap(),
        &n_cpu,
        &format!("{name} norm"),
    );
    let gn_cpu = cpu.norm_vjp_flat(&x, &gy).unwrap();
    assert_parity(
        &gv.norm_vjp_host(&x, &gy).unwrap(),
        &gn_cpu,
        &format!("{name} norm vjp"),
    );
}

#[test]
fn test_geometry_matches_the_cpu_model() {
    // image 32, patch 8, width 48, 4 blocks, 3 heads: 17 tokens
    block_parity::<17, 48>(
        BackboneSpec::vit("vit_test_patch8_32", 32, 8, 48, 4, 3),
        3,
        7,
    );
}

#[test]
fn vit_base_block_matches_the_cpu_model() {
    // one ViT-B/16 block: 197 tokens of width 768, 12 heads (rows wider than a thread block)
    block_parity::<197, 768>(
        BackboneSpec::vit("vit_b16_one_block", 224, 16, 768, 1, 12),
        2,
        11,
    );
}

#[test]
fn to_gpu_copies_a_cpu_model() {
    let vit = dtl_vit::random::<dtl_vit::variants::VitMiniPatch4_28>(3).unwrap();
    let gv = vit.to_gpu(&gpu()).unwrap();
    let images = rand_vec(2 * 3 * 28 * 28, 5);
    let want = vit.forward_features_flat(&images, 2).unwrap();
    assert_parity(
        &gv.forward_features_host(&images, 2).unwrap(),
        &want,
        "mini forward_features",
    );
}

#[test]
fn forward_features_match_the_pytorch_fixtures() {
    let g = gpu();
    for name in ["dtl", "dtlplus"] {
        let vit = dtl_vit::load::<dtl_vit::variants::VitTestPatch8_32>(
            &fixtures().join(format!("{name}_vit.safetensors")),
            "auto",
        )
        .unwrap();
        let gv = vit.to_gpu(&g).unwrap();
        let fx = read(&format!("{name}_dtl.safetensors"));
        let (shape, input) = &fx["input"];
        let (_, want) = &fx["backbone_tokens"];
        let images: Vec<f32> = input.iter().map(|&v| v as f32).collect();
        let got = gv.forward_features_host(&images, shape[0]).unwrap();
        let e = rel_err(&got, want);
        assert!(
            e <= TOL,
            "{name}: GPU forward_features vs PyTorch: relative error {e:.3e}"
        );
    }
}

#[test]
fn bad_inputs_are_errors_naming_what_is_wrong() {
    let spec = BackboneSpec::vit("vit_test_patch8_32", 32, 8, 48, 1, 3);
    let w = weights(&spec, 1);
    let g = gpu();
    let gv = GpuVit::new(&g, &spec, &w).unwrap();
    let x = vec![0.0f32; 2 * 17 * 48];
    let e = gv
        .block_forward_host(0, &x[1..], 2, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block input") && e.contains("17 tokens"), "{e}");
    let e = gv
        .block_forward_host(1, &x, 2, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block 1 does not exist"), "{e}");
    let bad = DropPath {
        attn: vec![1.0; 3],
        mlp: vec![1.0; 3],
    };
    let e = gv
        .block_vjp_host(0, &x, &x, 2, Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(e.contains("drop-path") && e.contains("batch has 2"), "{e}");
    let mut broken = w.clone();
    broken.blocks[0].qkv_w.pop();
    let e = GpuVit::new(&g, &spec, &broken).unwrap_err().to_string();
    assert!(e.contains("blocks.0.attn.qkv.weight"), "{e}");
}

#[test]
fn cuda_backbone_matches_the_cpu_backbone_on_dfdx_tensors() {
    use dfdx::prelude::*;
    use dtl_core::Backbone;
    let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(4).unwrap();
    // opens the device first: dfdx's Cuda::default() panics without one
    let cv = dtl_vit::cuda::CudaVit::from_cpu(&vit, &gpu()).unwrap();
    let (cuda, cpu) = (Cuda::default(), Cpu::default());
    let img = rand_vec(2 * 3 * 32 * 32, 9);
    let x_cpu = vit
        .embed(&cpu.tensor_from_vec(img.clone(), (2, Const::<3>, 32, 32)))
        .unwrap();
    let x_gpu = cv
        .embed(&cuda.tensor_from_vec(img, (2, Const::<3>, 32, 32)))
        .unwrap();
    assert_parity(&x_gpu.as_vec(), &x_cpu.as_vec(), "CudaVit embed");
    let gy = rand_vec(2 * 17 * 48, 10);
    let gy_cpu = cpu.tensor_from_vec(gy.clone(), *x_cpu.shape());
    let gy_gpu = cuda.tensor_from_vec(gy, *x_gpu.shape());
    let y_cpu = vit.block_forward(1, &x_cpu, None).unwrap();
    let y_gpu = cv.block_forward(1, &x_gpu, None).unwrap();
    assert_parity(&y_gpu.as_vec(), &y_cpu.as_vec(), "CudaVit block_forward");
    let g_cpu = vit.block_vjp(1, &x_cpu, &gy_cpu, None).unwrap();
    let g_gpu = cv.block_vjp(1, &x_gpu, &gy_gpu, None).unwrap();
    assert_parity(&g_gpu.as_vec(), &g_cpu.as_vec(), "CudaVit block_vjp");
    assert_eq!(Backbone::<Cuda>::spec(&cv).name, "vit_test_patch8_32");
}
