//! The GPU device's code run on the host, for testing without a GPU.
//!
//! [`Emulator`] implements [`Kernels`] with exactly the code [`crate::Gpu`] runs (the same
//! checks, launch shapes, kernel arguments, scratch layouts and matrix-product parameters),
//! but executes it on the CPU: `kernels.cu` is compiled as C++ with the host compiler against a
//! small emulation of the CUDA execution model (each block's threads are real threads;
//! `__syncthreads`, `__shared__` memory and warp shuffles behave as on a GPU; blocks run one
//! after the other), and cuBLAS is replaced by a CPU model of the column-major call. Every
//! launch also checks the arguments against the kernel's parameter list in `kernels.cu`.
//!
//! Buffers hold f32 or bf16 values as on the GPU, and the model of cuBLAS rounds as the bf16
//! products do. Graphs ([`Kernels::capture`]) are recorded: each launch, product and device
//! copy is kept with its checked arguments instead of run, and uploads, downloads and
//! allocations fail while recording, as on a GPU; the recording then runs once, and
//! [`Kernels::replay`] runs it again.
//!
//! What it cannot show: timing, races between blocks, and the driver's and cuBLAS's own
//! behaviour. It is slow; use small shapes.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::LaunchConfig;
use dtl_core::choice::Precision;
use dtl_core::{DtlError, Result};
use dtl_kernels::{check_len, Capture, GraphId, Kernels, MemoryStats};

use crate::blas::Gemm;
use crate::fused::AttentionKernels;
use crate::gpu::Counters;
use crate::lt::{EpilogueCounts, EpilogueStats, GemmEpilogue};
use crate::nvrtc::takes_storage;
use crate::nvrtc::{KERNEL_NAMES, KERNEL_SOURCE};
use crate::ops::{
    bf16_bits, check_storage, f32_from_bf16, invalid, resolve, storage_mask, Arg, Dp, Exec, Keep,
    K, PARTIALS,
};
use crate::profile::{self, Profiler};
use crate::DeviceSettings;

/// The emulation of the CUDA execution model the kernels are compiled against.
const RUNTIME: &str = r#"
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <type_traits>
#include <vector>

namespace emu {
struct Dim3 {
    unsigned x, y, z;
};
inline thread_local Dim3 tid_{0, 0, 0};
inline thread_local Dim3 bid_{0, 0, 0};
inline thread_local int flat_ = 0;
inline Dim3 bdim_{1, 1, 1};
inline Dim3 gdim_{1, 1, 1};
inline std::barrier<>* block_bar_ = nullptr;
inline std::vector<std::barrier<>*> warp_bars_;
alignas(16) inline unsigned char warp_slots_[32][32 * 8];

struct Job {
    int t;
    void (*body)(void*);
    void* ctx;
    const std::atomic<int>* gate;  // 0 wait, 1 run, 2 leave
};

inline void* thread_main(void* p) {
    Job* j = static_cast<Job*>(p);
    j->gate->wait(0);
    if (j->gate->load() != 1) return nullptr;
    const int t = j->t;
    tid_ = {t % bdim_.x, (t / bdim_.x) % bdim_.y, t / (bdim_.x * bdim_.y)};
    flat_ = t;
    for (unsigned z = 0; z < gdim_.z; ++z)
        for (unsigned y = 0; y < gdim_.y; ++y)
            for (unsigned x = 0; x < gdim_.x; ++x) {
                bid_ = {x, y, z};
                j->body(j->ctx);
                block_bar_->arrive_and_wait();  // the next block starts when this one is done
            }
    return nullptr;
}

// Runs the grid: one host thread per thread of a block, blocks one after the other. The
// threads start together once all exist; if one cannot be created, none runs.
template <class F>
int run(Dim3 g, Dim3 b, F&& f) {
    bdim_ = b;
    gdim_ = g;
    const int n = (int)(b.x * b.y * b.z);
    std::barrier<> bar(n);
    block_bar_ = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    warp_bars_.clear();
    for (int w = 0; w * 32 < n; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(n - 32 * w < 32 ? n - 32 * w : 32));
        warp_bars_.push_back(warps.back().get());
    }
    auto body = [](void* c) { (*static_cast<std::remove_reference_t<F>*>(c))(); };
    std::atomic<int> gate{0};
    std::vector<Job> jobs(n);
    std::vector<pthread_t> threads(n);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 18);
    int started = 0;
    for (int t = 0; t < n; ++t) {
        jobs[t] = Job{t, body, &f, &gate};
        if (pthread_create(&threads[t], &attr, thread_main, &jobs[t]) != 0) break;
        ++started;
    }
    pthread_attr_destroy(&attr);
    gate.store(started == n ? 1 : 2);
    gate.notify_all();
    for (int t = 0; t < started; ++t) pthread_join(threads[t], nullptr);
    return started == n ? 0 : -2;
}
}  // namespace emu

#define threadIdx (emu::tid_)
#define blockIdx (emu::bid_)
#define blockDim (emu::bdim_)
#define gridDim (emu::gdim_)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __syncthreads() (emu::block_bar_->arrive_and_wait())

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    const int w = emu::flat_ / 32, lane = emu::flat_ % 32;
    T* slot = reinterpret_cast<T*>(emu::warp_slots_[w]);
    slot[lane] = v;
    emu::warp_bars_[w]->arrive_and_wait();
    const T r = slot[lane ^ lane_mask];
    emu::warp_bars_[w]->arrive_and_wait();
    return r;
}

template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane) {
    const int w = emu::flat_ / 32, lane = emu::flat_ % 32;
    T* slot = reinterpret_cast<T*>(emu::warp_slots_[w]);
    slot[lane] = v;
    emu::warp_bars_[w]->arrive_and_wait();
    const T r = slot[src_lane & 31];
    emu::warp_bars_[w]->arrive_and_wait();
    return r;
}

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}
"#;

/// One kernel's parameters as argument kinds: `P` pointer, `I` int, `F` float.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Signature {
    name: String,
    /// (C++ type, kind) per parameter.
    params: Vec<(String, char)>,
}

/// The `extern "C" __global__` kernels of `source` and their parameters.
fn signatures(source: &str) -> std::result::Result<Vec<Signature>, String> {
    const MARK: &str = "extern \"C\" __global__ void ";
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(MARK) {
        rest = &rest[at + MARK.len()..];
        if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
            let end = after.find(')').ok_or("`__launch_bounds__(` without `)`")?;
            rest = after[end + 1..].trim_start();
        }
        let open = rest.find('(').ok_or("a kernel without a parameter list")?;
        let close = rest
            .find(')')
            .ok_or("a kernel parameter list without `)`")?;
        let name = rest[..open].trim().to_string();
        let mut params = Vec::new();
        for p in rest[open + 1..close].split(',') {
            let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
            let cut = p
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .ok_or_else(|| format!("{name}: cannot read the parameter `{p}`"))?;
            let ty = p[..=cut].trim().to_string();
            let kind = if ty.ends_with('*') {
                'P'
            } else if ty == "int" {
                'I'
            } else if ty == "float" {
                'F'
            } else {
                return Err(format!(
                    "{name}: parameter type `{ty}` is not a pointer, int or float"
                ));
            };
            params.push((ty, kind));
        }
        out.push(Signature { name, params });
        rest = &rest[close..];
    }
    Ok(out)
}

/// The C++ translation unit: the runtime, the kernels and one dispatch entry point.
fn translation_unit(sigs: &[Signature]) -> std::result::Result<String, String> {
    let mut launch = String::new();
    let mut kinds = String::new();
    for (i, name) in KERNEL_NAMES.iter().enumerate() {
        let s = sigs
            .iter()
            .find(|s| s.name == *name)
            .ok_or_else(|| format!("kernels.cu has no kernel {name}"))?;
        let args: Vec<String> = s
            .params
            .iter()
            .enumerate()
            .map(|(j, (ty, _))| format!("*({ty}*)args[{j}]"))
            .collect();
        launch.push_str(&format!(
            "    case {i}: return emu::run(g, b, [&] {{ {name}({}); }});\n",
            args.join(", ")
        ));
        let k: String = s.params.iter().map(|p| p.1).collect();
        kinds.push_str(&format!("    case {i}: return \"{k}\";\n"));
    }
    Ok(format!(
        "{RUNTIME}\n#line 1 \"kernels.cu\"\n{KERNEL_SOURCE}\n\n\
         extern \"C\" const char* dtl_emu_signature(int k) {{\n  switch (k) {{\n{kinds}    default: return nullptr;\n  }}\n}}\n\n\
         extern \"C\" int dtl_emu_launch(int k, const unsigned* grid, const unsigned* block, void* const* args) {{\n\
         \x20 static std::mutex one_at_a_time;\n\
         \x20 std::lock_guard<std::mutex> lock(one_at_a_time);\n\
         \x20 const emu::Dim3 g{{grid[0], grid[1], grid[2]}}, b{{block[0], block[1], block[2]}};\n\
         \x20 switch (k) {{\n{launch}    default: return -1;\n  }}\n}}\n"
    ))
}

type LaunchFn =
    unsafe extern "C" fn(c_int, *const c_uint, *const c_uint, *const *mut c_void) -> c_int;
type SignatureFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// The compiled kernels, loaded.
struct Library {
    launch: LaunchFn,
    kinds: Vec<String>,
}

/// Compiles and loads the kernels once per process.
fn library() -> std::result::Result<&'static Library, String> {
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(build).as_ref().map_err(Clone::clone)
}

fn compilers() -> Vec<String> {
    let mut c: Vec<String> = std::env::var("CXX")
        .ok()
        .filter(|s| !s.is_empty())
        .into_iter()
        .collect();
    c.extend(["c++", "g++", "clang++"].map(String::from));
    c
}

/// A folder of this user's, not writable by others, to build in: the compiled library is
/// loaded from it, so nobody else may be able to put one there.
fn private_dir(dir: &Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let _ = std::fs::DirBuilder::new().mode(0o700).create(dir);
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
}

/// Builds the kernels into `<temp>/dtl-cuda-emulator-<uid>-<hash of the source>` (reused by
/// later processes while the source is unchanged) and loads them.
fn build() -> std::result::Result<Library, String> {
    let sigs = signatures(KERNEL_SOURCE)?;
    let tu = translation_unit(&sigs)?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let hash = fnv(tu.as_bytes());
    let mut dir = std::env::temp_dir().join(format!("dtl-cuda-emulator-{uid}-{hash:016x}"));
    if !private_dir(&dir) {
        dir = std::env::temp_dir().join(format!(
            "dtl-cuda-emulator-{uid}-{hash:016x}-{}",
            std::process::id()
        ));
        if !private_dir(&dir) {
            return Err(format!(
                "emulator: cannot make a private build folder {}",
                dir.display()
            ));
        }
    }
    let lib = dir.join("libdtl_emulated_kernels.so");
    if lib.is_file() {
        if let Ok(l) = load(&lib) {
            return Ok(l);
        }
    }
    // Build under names of this process, then move into place: a concurrent build by another
    // process never leaves a half-written library under the final name.
    let pid = std::process::id();
    let src = dir.join(format!("emulated_kernels.{pid}.cpp"));
    let tmp = dir.join(format!("libdtl_emulated_kernels.{pid}.so"));
    std::fs::write(&src, &tu).map_err(|e| format!("emulator: {}: {e}", src.display()))?;
    let mut tried = Vec::new();
    let mut built = false;
    for cxx in compilers() {
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o"])
            .arg(&tmp)
            .arg(&src)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                built = true;
                break;
            }
            Ok(o) => {
                let log = String::from_utf8_lossy(&o.stderr);
                let first: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("error"))
                    .take(3)
                    .collect();
                let _ = std::fs::remove_file(&src);
                return Err(format!(
                    "emulator: {cxx} could not compile the kernels: {}",
                    first.join(" | ")
                ));
            }
            Err(e) => tried.push(format!("{cxx} ({e})")),
        }
    }
    let _ = std::fs::remove_file(&src);
    if !built {
        return Err(format!(
            "emulator: no C++20 compiler found (tried {}); set CXX",
            tried.join(", ")
        ));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| format!("emulator: {}: {e}", lib.display()))?;
    load(&lib)
}

fn load(path: &Path) -> std::result::Result<Library, String> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: loads the library just built; it has no initialisers beyond C++ statics, and is
    // never closed.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!("emulator: cannot load {}", path.display()));
    }
    let sym = |name: &CStr| {
        // SAFETY: `h` is a live handle and `name` NUL-terminated.
        let p = unsafe { libc::dlsym(h, name.as_ptr()) };
        if p.is_null() {
            Err(format!("emulator: {} lacks {name:?}", path.display()))
        } else {
            Ok(p)
        }
    };
    let launch = sym(c"dtl_emu_launch")?;
    let signature = sym(c"dtl_emu_signature")?;
    // SAFETY: both symbols are the functions defined by `translation_unit`, with these types.
    let (launch, signature) = unsafe {
        (
            std::mem::transmute::<*mut c_void, LaunchFn>(launch),
            std::mem::transmute::<*mut c_void, SignatureFn>(signature),
        )
    };
    let kinds = (0..KERNEL_NAMES.len())
        .map(|i| {
            // SAFETY: returns a static string or null.
            let p = unsafe { signature(i as c_int) };
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: non-null, a NUL-terminated literal of the library.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        })
        .collect();
    Ok(Library { launch, kinds })
}

/// FNV-1a, to name the build folder after the source.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Host memory standing in for device memory, 8-byte aligned, counted in the memory stats
/// until it is freed.
struct EmuMem {
    ptr: *mut u64,
    words: usize,
    bytes: u64,
    counters: Arc<Counters>,
}

// SAFETY: the memory is owned here and only reached through raw pointers by the device's
// operations (see `EmuBuf`).
unsafe impl Send for EmuMem {}

impl EmuMem {
    fn new(bytes: usize, counters: &Arc<Counters>) -> EmuMem {
        let words = bytes.max(1).div_ceil(8);
        let ptr = Box::into_raw(vec![0u64; words].into_boxed_slice()) as *mut u64;
        counters.add(bytes as u64);
        EmuMem {
            ptr,
            words,
            bytes: bytes as u64,
            counters: counters.clone(),
        }
    }
}

impl Drop for EmuMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `words` come from the boxed slice made in `new`.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.words)) });
        self.counters.sub(self.bytes);
    }
}

/// A buffer of the [`Emulator`]: `f32` or `bf16` values in host memory, used only through raw
/// pointers (as device memory is).
///
/// ```
/// use dtl_kernels::Kernels;
/// if let Ok(emu) = dtl_cuda::Emulator::new() {
///     let b = emu.upload_new(&[1.0, 2.0]).unwrap();
///     assert_eq!(b.len(), 2);
/// }
/// ```
pub struct EmuBuf {
    mem: Option<EmuMem>,
    ptr: u64,
    len: usize,
    bf16: bool,
    owner: u64,
    keep: Arc<Keep<EmuMem>>,
}

// SAFETY: the memory is owned by the buffer and only reached through the device's operations,
// which take `&mut` for every buffer they write.
unsafe impl Send for EmuBuf {}
// SAFETY: see above.
unsafe impl Sync for EmuBuf {}

impl EmuBuf {
    /// Number of values.
    ///
    /// ```
    /// use dtl_kernels::Kernels;
    /// if let Ok(emu) = dtl_cuda::Emulator::new() {
    ///     assert_eq!(emu.alloc(3).unwrap().len(), 3);
    /// }
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no value.
    ///
    /// ```
    /// use dtl_kernels::Kernels;
    /// if let Ok(emu) = dtl_cuda::Emulator::new() {
    ///     assert!(emu.alloc(0).unwrap().is_empty());
    /// }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How the values are stored: `F32` or `Bf16`.
    ///
    /// ```
    /// use dtl_core::choice::Precision;
    /// use dtl_kernels::Kernels;
    /// if let Ok(emu) = dtl_cuda::Emulator::with_precision(Precision::Bf16) {
    ///     assert_eq!(emu.alloc_act(3).unwrap().storage(), Precision::Bf16);
    ///     assert_eq!(emu.alloc(3).unwrap().storage(), Precision::F32);
    /// }
    /// ```
    pub fn storage(&self) -> Precision {
        if self.bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            self.keep.drop_or_keep(m);
        }
    }
}

impl std::fmt::Debug for EmuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmuBuf({} {} values)", self.len, self.storage())
    }
}

/// One operation of a recorded graph, with its arguments.
#[derive(Clone, Debug)]
enum Rec {
    /// A kernel launch, its storage mask included.
    Launch(K, LaunchConfig, Vec<Arg>),
    Gemm(Gemm, Dp, Dp, Dp),
    /// A product with the bias epilogue: the product, a, b, c and the bias.
    GemmBias(Gemm, Dp, Dp, Dp, Dp),
    Copy(u64, u64, usize),
}

/// The emulated device's state shared by its clones: memory, graphs, the recording.
struct EmuDev {
    counters: Arc<Counters>,
    keep: Arc<Keep<EmuMem>>,
    /// The bf16 copies of f32 operands of mixed products, and their capacity in bytes.
    scratch: Mutex<Option<(EmuMem, usize)>>,
    /// The operations being recorded, and why the recording broke, if it did.
    recording: Mutex<Option<(Vec<Rec>, Option<String>)>>,
    graphs: Mutex<(HashMap<u64, Vec<Rec>>, u64)>,
    /// Linears that ran with or fell back from the bias epilogue.
    epilogue_counts: EpilogueCounts,
    /// The host time of each operation in milliseconds while profiling.
    profiler: Profiler<f64>,
}

impl Drop for EmuDev {
    fn drop(&mut self) {
        self.graphs
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clear();
        self.keep.clear();
    }
}

struct Partials(Mutex<*mut f64>);
// SAFETY: the pointer is only used under the lock.
unsafe impl Send for Partials {}
// SAFETY: see above.
unsafe impl Sync for Partials {}

/// The GPU device's code on the host: see the module docs. Cheap to clone.
///
/// ```
/// use dtl_kernels::Kernels;
/// match dtl_cuda::Emulator::new() {
///     Ok(emu) => {
///         let x = emu.upload_new(&[0.0, 1.0]).unwrap();
///         let mut y = emu.alloc(2).unwrap();
///         emu.gelu(&x, 2, &mut y).unwrap();
///         assert!((emu.download(&y, 2).unwrap()[1] - 0.841_344_7).abs() < 1e-6);
///     }
///     Err(e) => println!("{e}"), // no C++ compiler here
/// }
/// ```
#[derive(Clone)]
pub struct Emulator {
    id: u64,
    lib: &'static Library,
    partials: Arc<Partials>,
    precision: Precision,
    attention: AttentionKernels,
    epilogue: GemmEpilogue,
    /// The modelled cuBLASLt takes no bias-epilogue product (see `refuse_gemm_epilogue`).
    epilogue_refused: bool,
    dev: Arc<EmuDev>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Emulator")
    }
}

impl Drop for Partials {
    fn drop(&mut self) {
        let p = *self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: made by `Emulator::new` from a boxed slice of PARTIALS values.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, PARTIALS)) });
    }
}

impl Emulator {
    /// Compiles the kernels with the host C++ compiler (`$CXX`, else `c++`, `g++` or
    /// `clang++`; C++20) on first use in the process, into a private folder under the system's
    /// temporary folder that later processes reuse while the source is unchanged, and returns
    /// the emulated device, or says why it cannot.
    ///
    /// ```
    /// if let Err(e) = dtl_cuda::Emulator::new() {
    ///     assert!(e.to_string().contains("emulator"));
    /// }
    /// ```
    pub fn new() -> Result<Emulator> {
        Emulator::with_precision(Precision::F32)
    }

    /// The emulated device as [`Emulator::new`] makes it, storing activations and frozen
    /// weights at `precision` (as [`crate::Gpu::open_with`]; `Auto` is taken as bf16).
    ///
    /// ```
    /// use dtl_core::choice::Precision;
    /// use dtl_kernels::Kernels;
    /// if let Ok(emu) = dtl_cuda::Emulator::with_precision(Precision::Bf16) {
    ///     assert_eq!(emu.precision(), Precision::Bf16);
    /// }
    /// ```
    pub fn with_precision(precision: Precision) -> Result<Emulator> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 62);
        let attention = AttentionKernels::from_env()?;
        let epilogue = GemmEpilogue::from_env()?;
        let lib = library().map_err(DtlError::Unavailable)?;
        let partials = Box::into_raw(vec![0f64; PARTIALS].into_boxed_slice()) as *mut f64;
        Ok(Emulator {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            lib,
            partials: Arc::new(Partials(Mutex::new(partials))),
            precision: resolve(precision),
            attention,
            epilogue,
            epilogue_refused: false,
            dev: Arc::new(EmuDev {
                counters: Arc::new(Counters::default()),
                keep: Arc::new(Keep::new()),
                scratch: Mutex::new(None),
                recording: Mutex::new(None),
                graphs: Mutex::new((HashMap::new(), 0)),
                epilogue_counts: EpilogueCounts::default(),
                profiler: Profiler::new(),
            }),
        })
    }

    /// While a graph is being recorded, `op` is refused (it could not be part of the graph)
    /// and the recording marked as broken.
    fn not_recording(&self, op: &str) -> Result<()> {
        let mut r = self.dev.recording.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, broken)) = r.as_mut() else {
            return Ok(());
        };
        let why = format!("{op} while recording a graph");
        broken.get_or_insert_with(|| why.clone());
        Err(DtlError::Device(format!(
            "cuda emulator: {why} is not possible"
        )))
    }

    /// Runs `work`; while the profiler is on, timed by the host clock under `label` (the
    /// emulator's twin of [`crate::Gpu`]'s events; it times the host's emulation, not a GPU).
    fn timed(
        &self,
        label: impl FnOnce() -> String,
        work: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !self.dev.profiler.is_on() {
            return work();
        }
        let t = std::time::Instant::now();
        work()?;
        self.dev
            .profiler
            .push(&label(), t.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }

    /// Records `rec` when a graph is being recorded (true), else leaves it to run (false).
    fn record(&self, rec: &dyn Fn() -> Rec) -> bool {
        let mut r = self.dev.recording.lock().unwrap_or_else(|p| p.into_inner());
        match r.as_mut() {
            Some((ops, _)) => {
                ops.push(rec());
                true
            }
            None => false,
        }
    }

    fn alloc_buf(&self, len: usize, bf16: bool) -> Result<EmuBuf> {
        self.not_recording("alloc")?;
        let elem = if bf16 { 2 } else { 4 };
        if len > isize::MAX as usize / elem {
            return Err(invalid(
                "alloc",
                format!("{len} values do not fit in memory"),
            ));
        }
        let mem = EmuMem::new(len.max(1) * elem, &self.dev.counters);
        Ok(EmuBuf {
            ptr: mem.ptr as u64,
            mem: Some(mem),
            len,
            bf16,
            owner: self.id,
            keep: self.dev.keep.clone(),
        })
    }

    /// Runs a launch whose arguments (the storage mask included) were checked.
    ///
    /// # Safety
    /// As [`Exec::launch`].
    unsafe fn run_launch(&self, op: &str, k: K, cfg: &LaunchConfig, args: &[Arg]) -> Result<()> {
        let name = KERNEL_NAMES[k as usize];
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        let mut store: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut s = [0u8; 8];
                match a {
                    Arg::P(p) => s.copy_from_slice(&p.addr.to_ne_bytes()),
                    Arg::I(i) => s[..4].copy_from_slice(&i.to_ne_bytes()),
                    Arg::F(f) => s[..4].copy_from_slice(&f.to_ne_bytes()),
                }
                s
            })
            .collect();
        let ptrs: Vec<*mut c_void> = store
            .iter_mut()
            .map(|s| s.as_mut_ptr() as *mut c_void)
            .collect();
        let grid = [g.0, g.1, g.2];
        let block = [b.0, b.1, b.2];
        // SAFETY: the caller's contract (see `Exec::launch`); the arguments match the
        // kernel's parameter kinds (checked by `launch`) and each slot holds its value.
        let rc =
            unsafe { (self.lib.launch)(k as c_int, grid.as_ptr(), block.as_ptr(), ptrs.as_ptr()) };
        if rc != 0 {
            return Err(DtlError::Device(format!(
                "{op}: {name}: the emulator failed ({rc})"
            )));
        }
        Ok(())
    }

    /// Runs recorded operations in order.
    ///
    /// # Safety
    /// Every pointer they hold must still point to live memory of this device (the buffers of
    /// a graph are kept while it exists).
    unsafe fn run_recorded(&self, ops: &[Rec]) -> Result<()> {
        for r in ops {
            // SAFETY: the caller's contract; each was checked when it was recorded.
            unsafe {
                match r {
                    Rec::Launch(k, cfg, args) => self.run_launch("replay", *k, cfg, args)?,
                    Rec::Gemm(g, a, b, c) => gemm_dp(g, *a, *b, *c, None),
                    Rec::GemmBias(g, a, b, c, bias) => gemm_dp(g, *a, *b, *c, Some(*bias)),
                    Rec::Copy(src, dst, bytes) => {
                        std::ptr::copy_nonoverlapping(*src as *const u8, *dst as *mut u8, *bytes)
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the modelled cuBLASLt of this handle refuse (`true`) or take (`false`, the
    /// default) every bias-epilogue product, as a GPU's cuBLASLt refuses a shape it has no
    /// algorithm for: the linears then run the plain path. For testing that fallback.
    ///
    /// ```
    /// use dtl_cuda::{DeviceSettings, GemmEpilogue};
    /// use dtl_kernels::Kernels;
    /// if let Ok(mut emu) = dtl_cuda::Emulator::with_precision(dtl_core::choice::Precision::Bf16) {
    ///     emu.set_gemm_epilogue(GemmEpilogue::Lt);
    ///     emu.refuse_gemm_epilogue(true);
    ///     let x = emu.upload_frozen(&[1.0; 4]).unwrap();
    ///     let w = emu.upload_frozen(&[1.0; 4]).unwrap();
    ///     let b = emu.upload_frozen(&[0.5; 2]).unwrap();
    ///     let mut y = emu.alloc_act(4).unwrap();
    ///     emu.linear(&x, &w, Some(&b), 2, 2, 2, &mut y, false).unwrap();
    ///     assert_eq!(emu.download(&y, 4).unwrap(), vec![2.5; 4]);
    ///     assert_eq!(emu.epilogue_stats().fallback, 1);
    /// }
    /// ```
    pub fn refuse_gemm_epilogue(&mut self, refuse: bool) {
        self.epilogue_refused = refuse;
    }
}

/// The settings of an emulated device; see [`DeviceSettings`].
///
/// ```
/// use dtl_cuda::{DeviceSettings, GemmEpilogue};
/// if let Ok(mut emu) = dtl_cuda::Emulator::new() {
///     emu.set_gemm_epilogue(GemmEpilogue::Lt);
///     assert_eq!(emu.gemm_epilogue(), GemmEpilogue::Lt);
/// }
/// ```
impl DeviceSettings for Emulator {
    fn set_attention(&mut self, kernels: AttentionKernels) {
        self.attention = kernels;
    }

    fn attention_kernels(&self) -> AttentionKernels {
        self.attention
    }

    fn set_gemm_epilogue(&mut self, epilogue: GemmEpilogue) {
        self.epilogue = epilogue;
    }

    fn gemm_epilogue(&self) -> GemmEpilogue {
        self.epilogue
    }

    fn epilogue_stats(&self) -> EpilogueStats {
        self.dev.epilogue_counts.stats()
    }
}

impl Exec for Emulator {
    type Buf = EmuBuf;

    fn ptr(&self, op: &str, name: &str, b: &EmuBuf, need: usize) -> Result<Dp> {
        if b.owner != self.id {
            return Err(invalid(
                op,
                format!("buffer `{name}` belongs to another device"),
            ));
        }
        check_len(op, name, b.len, need)?;
        Ok(Dp {
            addr: b.ptr,
            bf16: b.bf16,
        })
    }

    unsafe fn launch(&self, op: &str, k: K, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let name = KERNEL_NAMES[k as usize];
        let storage = takes_storage()[k as usize];
        check_storage(op, name, storage, args)?;
        let mut args = args.to_vec();
        if storage {
            args.push(storage_mask(&args));
        }
        let given: String = args
            .iter()
            .map(|a| match a {
                Arg::P(_) => 'P',
                Arg::I(_) => 'I',
                Arg::F(_) => 'F',
            })
            .collect();
        let want = &self.lib.kinds[k as usize];
        if &given != want {
            return Err(DtlError::Device(format!(
                "{op}: {name} takes arguments {want} (P pointer, I int, F float) but was given {given}"
            )));
        }
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
        if g.0 == 0
            || g.1 == 0
            || g.2 == 0
            || g.1 > 65_535
            || g.2 > 65_535
            || threads == 0
            || threads > 1024
        {
            return Err(DtlError::Device(format!(
                "{op}: {name}: grid {g:?} of blocks {b:?} is not a valid CUDA launch"
            )));
        }
        if self.record(&|| Rec::Launch(k, cfg, args.clone())) {
            return Ok(());
        }
        self.timed(
            || name.to_string(),
            || {
                // SAFETY: the caller's contract; the arguments were checked above.
                unsafe { self.run_launch(op, k, &cfg, &args) }
            },
        )
    }

    unsafe fn gemm_raw(&self, op: &str, g: &Gemm, a: Dp, b: Dp, c: Dp) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        if a.bf16 != b.bf16 || (c.bf16 && !a.bf16) {
            return Err(DtlError::Device(format!(
                "{op}: internal error: a product of mixed storage reached the product unconverted"
            )));
        }
        if self.record(&|| Rec::Gemm(*g, a, b, c)) {
            return Ok(());
        }
        self.timed(
            || profile::gemm_label(op, g, a.bf16),
            || {
                // SAFETY: the caller's contract: the pointers hold the extents, `c` apart from
                // `a`, `b`.
                unsafe { gemm_dp(g, a, b, c, None) };
                Ok(())
            },
        )
    }

    unsafe fn gemm_bias_raw(
        &self,
        op: &str,
        g: &Gemm,
        a: Dp,
        b: Dp,
        c: Dp,
        bias: Dp,
    ) -> Result<bool> {
        if !(a.bf16 && b.bf16 && c.bf16 && bias.bf16) {
            return Err(DtlError::Device(format!(
                "{op}: internal error: a bias epilogue needs bf16 operands, output and bias"
            )));
        }
        if self.epilogue_refused {
            return Ok(false);
        }
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(true);
        }
        if self.record(&|| Rec::GemmBias(*g, a, b, c, bias)) {
            return Ok(true);
        }
        self.timed(
            || format!("{} +bias", profile::gemm_label(op, g, true)),
            || {
                // SAFETY: the caller's contract: the pointers hold the extents and `bias` g.m
                // values, `c` apart from the others.
                unsafe { gemm_dp(g, a, b, c, Some(bias)) };
                Ok(())
            },
        )?;
        Ok(true)
    }

    unsafe fn copy_raw(&self, _op: &str, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if self.record(&|| Rec::Copy(src, dst, bytes)) {
            return Ok(());
        }
        self.timed(
            || profile::COPY.to_string(),
            || {
                // SAFETY: the caller's contract: both hold `bytes` bytes and do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            },
        )
    }

    fn with_scratch(
        &self,
        op: &str,
        bytes: usize,
        f: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        let mut s = self.dev.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if s.as_ref().map_or(true, |(_, cap)| *cap < bytes) {
            self.not_recording(&format!("{op}: growing the bf16 scratch"))?;
            let cap = bytes.next_power_of_two().max(1 << 20);
            if let Some((old, _)) = s.replace((EmuMem::new(cap, &self.dev.counters), cap)) {
                self.dev.keep.drop_or_keep(old);
            }
        }
        let ptr = s.as_ref().map_or(0, |(m, _)| m.ptr as u64);
        f(ptr)
    }

    fn with_partials(&self, f: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        let p = self.partials.0.lock().unwrap_or_else(|e| e.into_inner());
        f(*p as u64)
    }

    fn epilogue_counts(&self) -> Option<&EpilogueCounts> {
        Some(&self.dev.epilogue_counts)
    }
}

/// The product `g` on raw pointers in their storages: all f32 as [`gemm_cpu`]; with bf16 `a`
/// and `b` (as cuBLAS takes them), the products are exact in f32, summed in f32 in order, and
/// the result rounded to `c`'s storage.
///
/// With a `bias` (cuBLASLt's bias epilogue; bf16 operands only), value `i` of the bias is added
/// to row `i` of `c` in f32 after `alpha s + beta c`, before the one rounding to `c`'s storage.
///
/// # Safety
/// The pointers must hold [`Gemm::extents`] values in their storage (`bias` `g.m` values),
/// `c` apart from `a`, `b` and `bias`.
unsafe fn gemm_dp(g: &Gemm, a: Dp, b: Dp, c: Dp, bias: Option<Dp>) {
    let (ea, eb, ec) = g.extents();
    if !a.bf16 && !b.bf16 && !c.bf16 && bias.is_none() {
        // SAFETY: the caller's contract.
        let (a, b, c) = unsafe {
            (
                std::slice::from_raw_parts(a.addr as *const f32, ea),
                std::slice::from_raw_parts(b.addr as *const f32, eb),
                std::slice::from_raw_parts_mut(c.addr as *mut f32, ec),
            )
        };
        return gemm_cpu(g, a, b, c);
    }
    let widen = |p: Dp, n: usize| -> Vec<f32> {
        // SAFETY: the caller's contract: `p` holds `n` values in its storage.
        unsafe {
            if p.bf16 {
                std::slice::from_raw_parts(p.addr as *const u16, n)
                    .iter()
                    .map(|&h| f32_from_bf16(h))
                    .collect()
            } else {
                std::slice::from_raw_parts(p.addr as *const f32, n).to_vec()
            }
        }
    };
    let (av, bv, cv) = (widen(a, ea), widen(b, eb), widen(c, ec));
    let biasv = bias.map(|p| widen(p, g.m));
    for p in 0..g.batch {
        let (ab, bb, cb) = (p * g.stride_a, p * g.stride_b, p * g.stride_c);
        for j in 0..g.n {
            for i in 0..g.m {
                let mut s = 0.0f32;
                for l in 0..g.k {
                    let x = if g.trans_a {
                        av[ab + l + i * g.lda]
                    } else {
                        av[ab + i + l * g.lda]
                    };
                    let y = if g.trans_b {
                        bv[bb + j + l * g.ldb]
                    } else {
                        bv[bb + l + j * g.ldb]
                    };
                    s += x * y;
                }
                let at = cb + i + j * g.ldc;
                let prev = if g.beta == 0.0 { 0.0 } else { g.beta * cv[at] };
                let mut out = g.alpha * s + prev;
                if let Some(bv) = &biasv {
                    out += bv[i];
                }
                // SAFETY: `at` is below the extent of `c` (the caller's contract).
                unsafe {
                    if c.bf16 {
                        *(c.addr as *mut u16).add(at) = bf16_bits(out);
                    } else {
                        *(c.addr as *mut f32).add(at) = out;
                    }
                }
            }
        }
    }
}

/// The column-major product of [`Gemm`] on the CPU, accumulating in f64.
pub(crate) fn gemm_cpu(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    for p in 0..g.batch {
        let (a, b) = (&a[p * g.stride_a..], &b[p * g.stride_b..]);
        let c = &mut c[p * g.stride_c..];
        for j in 0..g.n {
            for i in 0..g.m {
                let mut s = 0.0f64;
                for l in 0..g.k {
                    let av = if g.trans_a {
                        a[l + i * g.lda]
                    } else {
                        a[i + l * g.lda]
                    };
                    let bv = if g.trans_b {
                        b[j + l * g.ldb]
                    } else {
                        b[l + j * g.ldb]
                    };
                    s += av as f64 * bv as f64;
                }
                let o = &mut c[i + j * g.ldc];
                let prev = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta as f64 * *o as f64
                };
                *o = (g.alpha as f64 * s + prev) as f32;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
impl Kernels for Emulator {
    type Buf = EmuBuf;

    fn describe(&self) -> String {
        "cuda emulator (host)".to_string()
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn alloc(&self, len: usize) -> Result<EmuBuf> {
        self.alloc_buf(len, false)
    }

    fn alloc_act(&self, len: usize) -> Result<EmuBuf> {
        self.alloc_buf(len, self.precision == Precision::Bf16)
    }

    fn upload_frozen(&self, host: &[f32]) -> Result<EmuBuf> {
        let mut b = self.alloc_buf(host.len(), self.precision == Precision::Bf16)?;
        self.upload(host, &mut b)?;
        Ok(b)
    }

    fn len(&self, buf: &EmuBuf) -> usize {
        buf.len
    }

    fn upload(&self, host: &[f32], dst: &mut EmuBuf) -> Result<()> {
        let p = self.dst("upload", "dst", dst, host.len())?;
        self.not_recording("upload")?;
        // SAFETY: `dst` holds at least host.len() values in its storage (checked).
        unsafe {
            if p.bf16 {
                let q = p.addr as *mut u16;
                for (i, v) in host.iter().enumerate() {
                    *q.add(i) = bf16_bits(*v);
                }
            } else {
                std::ptr::copy_nonoverlapping(host.as_ptr(), p.addr as *mut f32, host.len());
            }
        }
        Ok(())
    }

    fn download(&self, src: &EmuBuf, len: usize) -> Result<Vec<f32>> {
        let p = self.src("download", "src", src, len)?;
        self.not_recording("download")?;
        // SAFETY: `src` holds at least `len` values in its storage (checked).
        Ok(unsafe {
            if p.bf16 {
                std::slice::from_raw_parts(p.addr as *const u16, len)
                    .iter()
                    .map(|&h| f32_from_bf16(h))
                    .collect()
            } else {
                std::slice::from_raw_parts(p.addr as *const f32, len).to_vec()
            }
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.not_recording("synchronize")
    }

    fn memory(&self) -> Option<MemoryStats> {
        let c = &self.dev.counters;
        Some(MemoryStats {
            live: c.live.load(Ordering::Relaxed),
            peak: c.peak.load(Ordering::Relaxed),
            driver_used: None,
        })
    }

    fn reset_peak(&self) {
        let c = &self.dev.counters;
        c.peak
            .store(c.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Capture> {
        if self.dev.profiler.is_on() {
            work()?;
            return Ok(Capture::Plain(profile::NO_CAPTURE.to_string()));
        }
        {
            let mut r = self.dev.recording.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_some() {
                return Err(DtlError::Device(
                    "cuda emulator: capture inside a capture".to_string(),
                ));
            }
            *r = Some((Vec::new(), None));
        }
        // buffers dropped from here on are kept: the recording may hold their pointers
        self.dev.keep.hold();
        let ran = work();
        let (ops, broken) = self
            .dev
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let reason = match (broken, ran) {
            (Some(why), _) => Some(why),
            (None, Err(e)) => Some(e.to_string()),
            (None, Ok(())) => None,
        };
        if let Some(reason) = reason {
            self.dev.keep.unhold();
            work()?;
            return Ok(Capture::Plain(reason));
        }
        // during the recording nothing ran: run it once now
        // SAFETY: the recorded pointers are the buffers' of the work, kept while the graph lives.
        if let Err(e) = unsafe { self.run_recorded(&ops) } {
            self.dev.keep.unhold();
            return Err(e);
        }
        let mut g = self.dev.graphs.lock().unwrap_or_else(|p| p.into_inner());
        g.1 += 1;
        let id = g.1;
        g.0.insert(id, ops);
        Ok(Capture::Graph(GraphId(id)))
    }

    fn replay(&self, graph: &GraphId) -> Result<()> {
        let g = self.dev.graphs.lock().unwrap_or_else(|p| p.into_inner());
        let ops = g.0.get(&graph.0).ok_or_else(|| {
            DtlError::Device(format!(
                "cuda emulator: no recorded graph {} (released, or made by another device)",
                graph.0
            ))
        })?;
        self.timed(
            || profile::REPLAY.to_string(),
            || {
                // SAFETY: the graph's buffers are kept while it exists.
                unsafe { self.run_recorded(ops) }
            },
        )
    }

    fn release(&self, graph: GraphId) {
        let removed = self
            .dev
            .graphs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .remove(&graph.0);
        if removed.is_some() {
            self.dev.keep.unhold();
        }
    }

    fn profile_start(&self) -> Result<()> {
        if self
            .dev
            .recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Err(DtlError::Device(format!(
                "cuda emulator: {}",
                profile::NOT_WHILE_RECORDING
            )));
        }
        self.dev.profiler.start();
        Ok(())
    }

    fn profile_take(&self) -> Result<Option<dtl_kernels::KernelProfile>> {
        self.dev.profiler.finish(profile::HOST_CLOCK, |ms| Ok(*ms))
    }

    crate::ops::kernel_ops!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_a_signature_of_pointers_ints_and_floats() {
        let sigs = signatures(KERNEL_SOURCE).unwrap();
        assert_eq!(sigs.len(), KERNEL_NAMES.len());
        let fill = sigs.iter().find(|s| s.name == "dtl_fill").unwrap();
        let kinds: String = fill.params.iter().map(|p| p.1).collect();
        assert_eq!(kinds, "PIFI");
        let adamw = sigs.iter().find(|s| s.name == "dtl_adamw").unwrap();
        assert_eq!(adamw.params[11].0, "const float*");
        assert!(translation_unit(&sigs).unwrap().contains("case 29:"));
        assert!(signatures("extern \"C\" __global__ void k(double x) {}").is_err());
        let bounded =
            signatures("extern \"C\" __global__ void __launch_bounds__(1024) k(int n) {}");
        assert_eq!(bounded.unwrap()[0].name, "k");
    }
}
