//! `dtl_pth` against checkpoints written by PyTorch's own `torch.save`
//! (`bench/reference/swin_reference.py twins --out crates/dtl-pth/tests/data`), their
//! safetensors twins, hand-written hostile pickles and mutated archives.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use dtl_pth::{DType, Tensor};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The safetensors file as `(name, Tensor)`, in dtl_pth's representation.
fn safetensors(name: &str) -> Vec<(String, Tensor)> {
    let bytes = std::fs::read(data(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Tensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            use safetensors::Dtype as S;
            let dtype = match v.dtype() {
                S::F64 => DType::F64,
                S::F32 => DType::F32,
                S::F16 => DType::F16,
                S::BF16 => DType::BF16,
                S::I64 => DType::I64,
                S::I32 => DType::I32,
                S::I16 => DType::I16,
                S::I8 => DType::I8,
                S::U8 => DType::U8,
                S::BOOL => DType::Bool,
                other => panic!("{other:?}"),
            };
            let t = Tensor {
                dtype,
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (n, t)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// timm 1.0 name -> Microsoft's old layout (patch merging at the end of the previous stage).
fn old_name(timm: &str) -> String {
    if let Some(rest) = timm.strip_prefix("layers.") {
        if let Some((s, tail)) = rest.split_once('.') {
            if tail.starts_with("downsample.") {
                let s: usize = s.parse().unwrap();
                return format!("layers.{}.{tail}", s - 1);
            }
        }
    }
    timm.to_string()
}

#[test]
fn old_layout_pth_equals_its_safetensors_twin() {
    let pth = dtl_pth::read(data("model.pth"), Some("model")).unwrap();
    let st = safetensors("model.safetensors");
    assert_eq!(st.len(), 119);
    for (name, want) in &st {
        let old = old_name(name);
        let got = pth
            .get(&old)
            .unwrap_or_else(|| panic!("{old} (timm {name}) missing"));
        assert_eq!(got, want, "{name}");
    }
    // What the old layout has beyond timm's keys: its buffers and a head, nothing else.
    let extra: Vec<&str> = pth
        .names()
        .filter(|n| !st.iter().any(|(s, _)| old_name(s) == *n))
        .collect();
    assert_eq!(extra.len(), pth.len() - st.len());
    for n in &extra {
        assert!(
            n.ends_with("relative_position_index")
                || n.ends_with("attn_mask")
                || n.starts_with("head."),
            "{n}"
        );
    }
    let idx = pth
        .get("layers.0.blocks.0.attn.relative_position_index")
        .unwrap();
    assert_eq!((idx.dtype, idx.shape.clone()), (DType::I64, vec![16, 16]));
    let v = idx.to_i64().unwrap();
    assert_eq!((v[0], *v.iter().max().unwrap()), (24, 48)); // (2w-1)^2 - 1 = 48 for window 4
                                                            // The old layout: stage 0 has a patch merging, stage 3 none.
    assert!(pth.get("layers.0.downsample.reduction.weight").is_some());
    assert!(pth.get("layers.3.downsample.reduction.weight").is_none());
    // Checkpoint order (Microsoft's: blocks, then the stage's downsample).
    let names: Vec<&str> = pth.names().collect();
    let p = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(p("layers.0.blocks.1.mlp.fc2.bias") < p("layers.0.downsample.norm.weight"));
    assert!(p("layers.0.downsample.reduction.weight") < p("layers.1.blocks.0.norm1.weight"));
}

#[test]
fn read_state_dict_finds_the_model_entry() {
    let a = dtl_pth::read_state_dict(data("model.pth")).unwrap();
    let b = dtl_pth::read(data("model.pth"), Some("model")).unwrap();
    assert_eq!(a.len(), b.len());
    let c = dtl_pth::read_state_dict(data("views.pth")).unwrap();
    assert_eq!(c.len(), 17);
}

#[test]
fn views_dtypes_strides_and_offsets() {
    let pth = dtl_pth::read(data("views.pth"), Some("state_dict")).unwrap();
    let st = safetensors("views.safetensors");
    assert_eq!(pth.len(), st.len());
    for (name, want) in &st {
        let got = pth.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(got, want, "{name}");
    }
    let f = |n: &str| pth.get(n).unwrap().to_f32();
    // `f32.transposed` is `f32.contiguous`.t(): element (i, j) is (j, i).
    let (a, t) = (f("f32.contiguous"), f("f32.transposed"));
    assert_eq!(t[3 * 6 + 2], a[2 * 10 + 3]);
    // base[2:5, 3:9] and base[1:, ::3] and base[4]
    assert_eq!(f("f32.offset_slice")[0], a[23]);
    assert_eq!(f("f32.step_slice")[1], a[13]);
    assert_eq!(f("f32.row"), a[40..50].to_vec());
    let s = pth.get("f32.scalar").unwrap();
    assert_eq!((s.shape.clone(), s.to_f32()), (vec![], vec![3.25]));
    assert_eq!(pth.get("f32.empty").unwrap().shape, vec![0, 4]);
    assert_eq!(pth.get("bool").unwrap().to_i64(), Some(vec![1, 0, 0, 1]));
    assert_eq!(
        pth.get("u8").unwrap().to_f32(),
        vec![250.0, 251.0, 252.0, 253.0, 254.0, 255.0]
    );
    assert_eq!(pth.get("i16").unwrap().to_i64().unwrap()[0], -5);
    let bf = pth.get("bf16.transposed").unwrap();
    assert_eq!((bf.dtype, bf.shape.clone()), (DType::BF16, vec![3, 4]));
    assert_eq!(pth.get("f16").unwrap().dtype, DType::F16);
    assert_eq!(pth.get("f64").unwrap().to_f32().len(), 12);
}

#[test]
fn missing_entry_lists_the_top_level_keys() {
    let e = dtl_pth::read(data("model.pth"), Some("state_dict"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.pth"), "{e}");
    assert!(
        e.contains("no entry `state_dict`")
            && e.contains("model (dict)")
            && e.contains("epoch (int)"),
        "{e}"
    );
    let e = dtl_pth::read(data("model.pth"), Some("model.nope"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("keys of `model`") && e.contains("patch_embed.proj.weight"),
        "{e}"
    );
    // The top level holds `epoch` and `config` besides the state dict.
    let e = dtl_pth::read(data("model.pth"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is a ") && e.contains("not a tensor") && e.contains("model (dict)"),
        "{e}"
    );
    let e = dtl_pth::read(data("model.pth"), Some("epoch"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("entry `epoch` is a int"), "{e}");
}

#[test]
fn legacy_format_is_refused_with_a_conversion_hint() {
    let e = dtl_pth::read(data("legacy.pth"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("legacy.pth") && e.contains("legacy") && e.contains("torch.save(torch.load("),
        "{e}"
    );
}

/// A zip archive laid out as torch.save lays it out, with `pkl` as `archive/data.pkl`.
fn torch_zip(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opt = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opt).unwrap();
        z.write_all(pkl).unwrap();
        z.start_file("archive/version", opt).unwrap();
        z.write_all(b"3\n").unwrap();
        for (k, v) in storages {
            z.start_file(format!("archive/data/{k}"), opt).unwrap();
            z.write_all(v).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

#[test]
fn os_system_and_eval_are_refused_by_name() {
    // {'model': os.system('echo pwned')} at protocol 2, written by hand.
    let pkl = b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01cos\nsystem\nq\x02X\x0a\x00\x00\x00echo pwnedq\x03\x85q\x04Rq\x05s.";
    let e = dtl_pth::read_bytes(&torch_zip(pkl, &[]), "evil.pth", Some("model"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("evil.pth: ") && e.contains("`os.system`") && e.contains("refused"),
        "{e}"
    );
    // The same through STACK_GLOBAL (protocol 4).
    let pkl = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x011\x94\x85\x94R\x94.";
    let e = dtl_pth::read_bytes(&torch_zip(pkl, &[]), "evil.pth", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`builtins.eval`"), "{e}");
    // Python's own pickle of an object whose __reduce__ is os.system (posix.system on Linux),
    // zipped as a checkpoint.
    let pkl = std::fs::read(data("os_system.pkl")).unwrap();
    let e = dtl_pth::read_bytes(&torch_zip(&pkl, &[]), "evil.pth", Some("model"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("system`") && e.contains("refused"), "{e}");
    // And a bare pickle (not a zip) is not taken for a checkpoint at all.
    let e = dtl_pth::read(data("os_system.pkl"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("os_system.pkl") && e.contains("legacy"), "{e}");
}

#[test]
fn a_hand_written_checkpoint_with_a_strided_view() {
    // {'w': Tensor over storage '0' (6 x f32) at offset 1, size (2, 2), stride (1, 2)}:
    // elements [s1, s3; s2, s4].
    let mut pkl = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    pkl.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
    pkl.extend(b"K\x01K\x02K\x02\x86K\x01K\x02\x86\x89ccollections\nOrderedDict\n)RtRs.");
    let storage: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 * 10.0).to_le_bytes())
        .collect();
    let sd = dtl_pth::read_bytes(&torch_zip(&pkl, &[("0", &storage)]), "hand.pth", None).unwrap();
    let w = sd.get("w").unwrap();
    assert_eq!(w.shape, vec![2, 2]);
    assert_eq!(w.to_f32(), vec![10.0, 30.0, 20.0, 40.0]);
    // The same view reaching past the storage's end is an error, not a read out of bounds.
    let at = pkl
        .windows(6)
        .position(|w| w == b"K\x01K\x02K\x02")
        .unwrap();
    let mut bad = pkl.clone();
    bad[at + 1] = 3; // storage offset 3: the last element would be 3 + 1 + 2 = 6

    let e = dtl_pth::read_bytes(&torch_zip(&bad, &[("0", &storage)]), "hand.pth", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`w`") && e.contains("reaches element"), "{e}");
    // A storage record shorter than the pickle says.
    let e = dtl_pth::read_bytes(&torch_zip(&pkl, &[("0", &storage[..20])]), "hand.pth", None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("archive/data/0") && e.contains("needs 6 float32"),
        "{e}"
    );
    // A missing storage record.
    let e = dtl_pth::read_bytes(&torch_zip(&pkl, &[]), "hand.pth", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`archive/data/0` is missing"), "{e}");
    // An unknown opcode.
    let mut unk = pkl.clone();
    unk.insert(2, b'!');
    let e = dtl_pth::read_bytes(&torch_zip(&unk, &[("0", &storage)]), "hand.pth", None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`archive/data.pkl` at byte 2") && e.contains("unsupported pickle opcode 0x21"),
        "{e}"
    );
}

/// `{'a': t, 'b0': t, 'b1': t, ...}` with `n` names `b<i>` for one tensor `t` over all of storage
/// `0` (16,384 f32).
fn one_tensor_named(n: usize) -> Vec<u8> {
    let mut pkl = b"\x80\x02}(X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    pkl.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ\x00\x40\x00\x00tQ");
    pkl.extend(b"K\x00J\x00\x40\x00\x00\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRq\x00");
    for i in 0..n {
        let k = format!("b{i}");
        pkl.push(b'X');
        pkl.extend((k.len() as u32).to_le_bytes());
        pkl.extend(k.as_bytes());
        pkl.extend(b"h\x00");
    }
    pkl.extend(b"u.");
    pkl
}

#[test]
fn a_storage_repeated_without_bound_is_refused() {
    let storage = vec![0u8; 64 << 10];
    // Named 2,000 times: 128 MB of tensors from 64 KiB of data.
    let zip = torch_zip(&one_tensor_named(2000), &[("0", &storage)]);
    let e = dtl_pth::read_bytes(&zip, "many.pth", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refusing to expand"), "{e}");
    // Named twice (tied weights), it reads.
    let zip = torch_zip(&one_tensor_named(1), &[("0", &storage)]);
    let sd = dtl_pth::read_bytes(&zip, "tied.pth", None).unwrap();
    assert_eq!(sd.len(), 2);
    assert_eq!(sd.get("a"), sd.get("b0"));
    assert_eq!(sd.get("a").unwrap().shape, vec![16384]);
}

#[test]
fn truncated_and_foreign_archives_are_clear_errors() {
    let bytes = std::fs::read(data("views.pth")).unwrap();
    for cut in [
        0,
        1,
        2,
        30,
        100,
        bytes.len() / 2,
        bytes.len() - 30,
        bytes.len() - 1,
    ] {
        let e = dtl_pth::read_bytes(&bytes[..cut], "cut.pth", None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cut.pth: "), "{cut}: {e}");
    }
    let e = dtl_pth::read_bytes(&bytes[..bytes.len() / 2], "cut.pth", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    // A zip without data.pkl.
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        z.start_file(
            "weights/readme.txt",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        z.write_all(b"hello").unwrap();
        z.finish().unwrap();
    }
    let e = dtl_pth::read_bytes(buf.get_ref(), "other.zip", None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no `<name>/data.pkl`") && e.contains("weights/readme.txt"),
        "{e}"
    );
    let e = dtl_pth::read_bytes(b"{\"not\": \"a checkpoint\"}", "x.json", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a torch.save checkpoint"), "{e}");
    let e = dtl_pth::read(data("does-not-exist.pth"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does-not-exist.pth"), "{e}");
}

/// Deterministic xorshift, so that a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(bytes.len());
        match rng.below(5) {
            0 => bytes[i] = rng.next() as u8,
            1 => bytes[i] ^= 1 << rng.below(8),
            2 => {
                bytes.remove(i);
            }
            3 => bytes.insert(i, rng.next() as u8),
            _ => bytes[i] = [0x00, 0xff, 0x7f, 0x80, b'(', b'.'][rng.below(6)],
        }
    }
}

/// A few hundred mutations by default; `DTL_PTH_FUZZ_ITERS=N` runs N of each kind.
#[test]
fn mutated_checkpoints_never_panic() {
    let iters: Option<usize> = std::env::var("DTL_PTH_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok());
    let file = std::fs::read(data("views.pth")).unwrap();
    // The records of views.pth, to re-zip around a mutated pickle.
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&file[..])).unwrap();
    let mut pkl = Vec::new();
    z.by_name("views/data.pkl")
        .unwrap()
        .read_to_end(&mut pkl)
        .unwrap();
    let mut storages: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        if let Some(k) = f.name().strip_prefix("views/data/") {
            let k = k.to_string();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            storages.push((k, v));
        }
    }
    let refs: Vec<(&str, &[u8])> = storages
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0, 0);
    // Mutations of the pickle inside a well-formed archive.
    for _ in 0..iters.unwrap_or(400) {
        let mut p = pkl.clone();
        mutate(&mut rng, &mut p);
        match dtl_pth::read_bytes(&torch_zip(&p, &refs), "fuzz.pth", Some("state_dict")) {
            Ok(sd) => {
                ok += 1;
                for (_, t) in sd.iter() {
                    assert_eq!(t.data.len(), t.numel() * t.dtype.size());
                }
            }
            Err(e) => {
                err += 1;
                assert!(e.to_string().starts_with("fuzz.pth: "), "{e}");
            }
        }
    }
    // Mutations of the whole file (zip headers, directory, storages).
    for _ in 0..iters.unwrap_or(300) {
        let mut f = file.clone();
        mutate(&mut rng, &mut f);
        match dtl_pth::read_bytes(&f, "fuzz.pth", Some("state_dict")) {
            Ok(_) => ok += 1,
            Err(e) => {
                err += 1;
                assert!(e.to_string().starts_with("fuzz.pth: "), "{e}");
            }
        }
    }
    assert!(err > 100 && ok > 10, "ok {ok}, err {err}");
}
