//! Finding and loading the CUDA libraries at run time.
//!
//! A `--features cuda` build links none of CUDA: cudarc opens the driver, NVRTC and cuBLAS with
//! `dlopen` by bare file name when first used, and panics when that fails. This module runs
//! first. It looks for each library in the usual places, loads it by full path (`RTLD_NOW |
//! RTLD_GLOBAL`, kept loaded for the life of the process; a library already loaded answers a
//! later `dlopen` of its file name), and then asks cudarc whether it can open it. Anything
//! missing is a one-line error naming the library and the folders searched, never a panic.
//!
//! Search order for NVRTC and cuBLAS (the first folder holding the library wins; CUDA 13
//! before CUDA 12 within a folder):
//!
//! 1. the folders in `DTL_CUDA_LIBS` (`:`-separated; each folder, then its `lib64` and `lib`);
//! 2. the toolkit roots `CUDA_HOME`, `CUDA_PATH`, `CUDA_ROOT`, `/usr/local/cuda`,
//!    `/usr/local/cuda-*` (newest first), `/opt/cuda`: their `lib64`, `lib` and
//!    `targets/<arch>-linux/lib`;
//! 3. the `nvidia/*/lib` folders (`nvidia/cu13/lib` first) of Python's package folders:
//!    `$VIRTUAL_ENV`, `$CONDA_PREFIX`, `~/.local`, `/usr/local`, `/usr`, `/opt/conda`,
//!    `~/{miniconda3,anaconda3,miniforge3}` and `~/.pyenv/versions/*`, each
//!    `lib/python3*/{site,dist}-packages`;
//! 4. the system loader's folders (`LD_LIBRARY_PATH`, `/etc/ld.so.conf`, `/usr/lib/<arch>-linux-gnu`,
//!    `/usr/lib64`, `/usr/lib`, ...), then the bare file name through the loader.
//!
//! The driver (`libcuda.so.1`) comes from `DTL_CUDA_LIBS`, then the system loader (which knows
//! where the driver installed it), then the system folders by full path. Toolkit `stubs`
//! folders are never searched: their `libcuda.so` only fails.
//!
//! The headers NVRTC needs for bf16 kernels (a folder with `cuda_bf16.h`) are searched next to
//! the NVRTC that was loaded (`<root>/include`), then in `DTL_CUDA_LIBS` (`../include`), the
//! toolkit roots and the Python `nvidia/cu13/include`, `nvidia/cuda_runtime/include` folders.
//!
//! ```no_run
//! // What this machine offers, one line per library.
//! for line in dtl_cuda::libs::report() {
//!     println!("{line}");
//! }
//! ```

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The environment variable naming extra folders to search first (`:`-separated).
pub const ENV_LIBS: &str = "DTL_CUDA_LIBS";

/// CUDA major versions accepted for NVRTC and cuBLAS, preferred first.
const MAJORS: [u32; 2] = [13, 12];

/// NVRTC as loaded: the library and its builtins, and its major version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvrtcLib {
    /// `libnvrtc.so.<major>`.
    pub path: PathBuf,
    /// `libnvrtc-builtins.so.<major>.<minor>`, loaded before NVRTC (NVRTC has no run path to
    /// find it itself).
    pub builtins: PathBuf,
    /// 13 or 12.
    pub major: u32,
}

/// cuBLAS as loaded: `libcublasLt` (loaded first: cuBLAS needs it) and `libcublas`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CublasLib {
    /// `libcublasLt.so.<major>`.
    pub lt: PathBuf,
    /// `libcublas.so.<major>`.
    pub blas: PathBuf,
    /// 13 or 12.
    pub major: u32,
}

/// Loads the CUDA driver library (once per process) and returns where it is.
///
/// ```no_run
/// match dtl_cuda::libs::driver() {
///     Ok(path) => println!("driver: {}", path.display()),
///     Err(e) => println!("{e}"),
/// }
/// ```
pub fn driver() -> Result<PathBuf, String> {
    static DRIVER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DRIVER.get_or_init(load_driver).clone()
}

/// Loads NVRTC and its builtins (once per process) and returns them.
///
/// ```no_run
/// let nvrtc = dtl_cuda::libs::nvrtc().unwrap();
/// println!("NVRTC {} at {}", nvrtc.major, nvrtc.path.display());
/// ```
pub fn nvrtc() -> Result<NvrtcLib, String> {
    static NVRTC: OnceLock<Result<NvrtcLib, String>> = OnceLock::new();
    NVRTC.get_or_init(load_nvrtc).clone()
}

/// Loads cuBLASLt and cuBLAS (once per process) and returns them.
///
/// ```no_run
/// let blas = dtl_cuda::libs::cublas().unwrap();
/// println!("cuBLAS {} at {}", blas.major, blas.blas.display());
/// ```
pub fn cublas() -> Result<CublasLib, String> {
    static CUBLAS: OnceLock<Result<CublasLib, String>> = OnceLock::new();
    CUBLAS.get_or_init(load_cublas).clone()
}

/// A folder holding `cuda_bf16.h` for NVRTC's include path, if there is one (searched once,
/// after NVRTC was loaded so that headers next to it win).
///
/// ```no_run
/// if let Some(dir) = dtl_cuda::libs::include_dir() {
///     println!("CUDA headers: {}", dir.display());
/// }
/// ```
pub fn include_dir() -> Option<PathBuf> {
    static INCLUDE: OnceLock<Option<PathBuf>> = OnceLock::new();
    INCLUDE
        .get_or_init(|| {
            let near = nvrtc().ok().map(|n| n.path);
            find_include(near.as_deref())
        })
        .clone()
}

/// One line per library: where it was loaded from, or why it was not.
///
/// ```no_run
/// let lines = dtl_cuda::libs::report();
/// assert_eq!(lines.len(), 4);
/// ```
pub fn report() -> Vec<String> {
    let line = |what: &str, r: Result<String, String>| match r {
        Ok(s) => format!("{what}: {s}"),
        Err(e) => format!("{what}: {e}"),
    };
    vec![
        line("driver", driver().map(|p| p.display().to_string())),
        line(
            "NVRTC",
            nvrtc().map(|n| format!("{} (builtins {})", n.path.display(), n.builtins.display())),
        ),
        line(
            "cuBLAS",
            cublas().map(|b| format!("{} and {}", b.blas.display(), b.lt.display())),
        ),
        line(
            "headers",
            include_dir()
                .map(|p| p.display().to_string())
                .ok_or_else(|| {
                    "no folder with cuda_bf16.h found (needed only for bf16 kernels)".to_string()
                }),
        ),
    ]
}

/// The folders searched for NVRTC and cuBLAS on this machine, in order (existing ones only).
///
/// ```
/// for dir in dtl_cuda::libs::toolkit_search_dirs() {
///     assert!(dir.is_dir());
/// }
/// ```
pub fn toolkit_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for d in env_dirs(ENV_LIBS) {
        dirs.extend([d.clone(), d.join("lib64"), d.join("lib")]);
    }
    for root in toolkit_roots() {
        dirs.extend(root_lib_dirs(&root));
    }
    for site in site_packages() {
        dirs.extend(nvidia_subdirs(&site, "lib"));
    }
    dirs.extend(system_lib_dirs());
    existing_unique(dirs)
}

// ---- loading ------------------------------------------------------------------------------

fn load_driver() -> Result<PathBuf, String> {
    const NAME: &str = "libcuda.so.1";
    let mut failures = Vec::new();
    let explicit = existing_unique(env_dirs(ENV_LIBS));
    for dir in &explicit {
        let p = dir.join(NAME);
        if p.is_file() {
            match dlopen_path(&p) {
                Ok(()) => return confirm_driver(p),
                Err(e) => failures.push(format!("{}: {e}", p.display())),
            }
        }
    }
    // The loader's own search (ld.so.cache) is how the driver is normally found.
    if let Ok(handle) = dlopen_name(NAME) {
        let path = loaded_path(handle, "cuInit").unwrap_or_else(|| PathBuf::from(NAME));
        return confirm_driver(path);
    }
    let system = existing_unique(system_lib_dirs());
    for dir in &system {
        let p = dir.join(NAME);
        if p.is_file() {
            match dlopen_path(&p) {
                Ok(()) => return confirm_driver(p),
                Err(e) => failures.push(format!("{}: {e}", p.display())),
            }
        }
    }
    let looked: Vec<PathBuf> = explicit.into_iter().chain(system).collect();
    Err(format!(
        "no usable CUDA driver: {NAME} is not known to the system loader nor in {}{}; a GPU needs the NVIDIA driver, R580 (CUDA 13.0) or newer",
        list_dirs(&looked),
        failures_note(&failures)
    ))
}

fn confirm_driver(path: PathBuf) -> Result<PathBuf, String> {
    // SAFETY: only asks whether cudarc's `dlopen` of the driver's names succeeds.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(path)
    } else {
        Err(format!(
            "loaded the CUDA driver from {} but cudarc could not open it by name",
            path.display()
        ))
    }
}

fn load_nvrtc() -> Result<NvrtcLib, String> {
    let dirs = toolkit_search_dirs();
    let mut failures = Vec::new();
    for dir in &dirs {
        for major in MAJORS {
            let Some(lib) = find_lib(dir, "libnvrtc", major) else {
                continue;
            };
            let Some(builtins) = find_prefixed(dir, &format!("libnvrtc-builtins.so.{major}"))
            else {
                failures.push(format!(
                    "{}: no libnvrtc-builtins.so.{major}* next to it",
                    lib.display()
                ));
                continue;
            };
            if let Err(e) = dlopen_path(&builtins) {
                failures.push(format!("{}: {e}", builtins.display()));
                continue;
            }
            if let Err(e) = dlopen_path(&lib) {
                failures.push(format!("{}: {e}", lib.display()));
                continue;
            }
            return confirm_nvrtc(NvrtcLib {
                path: lib,
                builtins,
                major,
            });
        }
    }
    // Last resort: an NVRTC the system loader knows by name (a distribution package), whose
    // builtins then sit in the loader's folders too.
    for major in MAJORS {
        let name = format!("libnvrtc.so.{major}");
        if let Ok(handle) = dlopen_name(&name) {
            let path = loaded_path(handle, "nvrtcVersion").unwrap_or_else(|| PathBuf::from(&name));
            let builtins = path
                .parent()
                .and_then(|d| find_prefixed(d, &format!("libnvrtc-builtins.so.{major}")))
                .unwrap_or_else(|| PathBuf::from(format!("libnvrtc-builtins.so.{major}")));
            return confirm_nvrtc(NvrtcLib {
                path,
                builtins,
                major,
            });
        }
    }
    Err(format!(
        "NVRTC not found: no libnvrtc.so.13 or libnvrtc.so.12 with its libnvrtc-builtins in {}{}; install the CUDA toolkit or the wheel nvidia-cuda-nvrtc, or name its folder in {ENV_LIBS}",
        list_dirs(&dirs),
        failures_note(&failures)
    ))
}

fn confirm_nvrtc(lib: NvrtcLib) -> Result<NvrtcLib, String> {
    // SAFETY: only asks whether cudarc's `dlopen` of NVRTC's names succeeds.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(lib)
    } else {
        Err(format!(
            "loaded NVRTC from {} but cudarc could not open it by name",
            lib.path.display()
        ))
    }
}

fn load_cublas() -> Result<CublasLib, String> {
    let dirs = toolkit_search_dirs();
    let mut failures = Vec::new();
    for dir in &dirs {
        for major in MAJORS {
            let (Some(lt), Some(blas)) = (
                find_lib(dir, "libcublasLt", major),
                find_lib(dir, "libcublas", major),
            ) else {
                continue;
            };
            if let Err(e) = dlopen_path(&lt).and_then(|()| dlopen_path(&blas)) {
                failures.push(format!("{}: {e}", dir.display()));
                continue;
            }
            return confirm_cublas(CublasLib { lt, blas, major });
        }
    }
    for major in MAJORS {
        let lt_name = format!("libcublasLt.so.{major}");
        let name = format!("libcublas.so.{major}");
        if let (Ok(lt), Ok(blas)) = (dlopen_name(&lt_name), dlopen_name(&name)) {
            return confirm_cublas(CublasLib {
                lt: loaded_path(lt, "cublasLtCreate").unwrap_or_else(|| PathBuf::from(&lt_name)),
                blas: loaded_path(blas, "cublasCreate_v2").unwrap_or_else(|| PathBuf::from(&name)),
                major,
            });
        }
    }
    Err(format!(
        "cuBLAS not found: no libcublas.so.13 with libcublasLt.so.13 (or .12) in {}{}; install the CUDA toolkit or the wheel nvidia-cublas, or name its folder in {ENV_LIBS}",
        list_dirs(&dirs),
        failures_note(&failures)
    ))
}

fn confirm_cublas(lib: CublasLib) -> Result<CublasLib, String> {
    // SAFETY: only asks whether cudarc's `dlopen` of the libraries' names succeeds.
    let ok = unsafe {
        cudarc::cublaslt::sys::is_culib_present() && cudarc::cublas::sys::is_culib_present()
    };
    if ok {
        Ok(lib)
    } else {
        Err(format!(
            "loaded cuBLAS from {} but cudarc could not open cuBLAS and cuBLASLt by name",
            lib.blas.display()
        ))
    }
}

fn find_include(near_nvrtc: Option<&Path>) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(lib_dir) = near_nvrtc.and_then(Path::parent) {
        if let Some(root) = lib_dir.parent() {
            dirs.push(root.join("include"));
        }
    }
    for d in env_dirs(ENV_LIBS) {
        dirs.push(d.join("../include"));
        dirs.push(d.join("include"));
        dirs.push(d);
    }
    for root in toolkit_roots() {
        dirs.push(root.join("include"));
        for t in target_dirs() {
            dirs.push(root.join("targets").join(t).join("include"));
        }
    }
    for site in site_packages() {
        dirs.push(site.join("nvidia/cu13/include"));
        dirs.push(site.join("nvidia/cuda_runtime/include"));
        dirs.extend(nvidia_subdirs(&site, "include"));
    }
    dirs.push(PathBuf::from("/usr/include"));
    dirs.push(PathBuf::from("/usr/local/include"));
    existing_unique(dirs)
        .into_iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
}

// ---- dlopen -------------------------------------------------------------------------------

fn dlerror_text() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by the loader.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown loader error".to_string()
    } else {
        // SAFETY: non-null, NUL-terminated (see above); copied before any other dl* call.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn dlopen_raw(name: &CStr) -> Result<*mut libc::c_void, String> {
    // SAFETY: `name` is NUL-terminated. Loading runs the library's initialisers, which is the
    // point; the handle is never closed, so the library stays loaded for the process.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        Err(dlerror_text())
    } else {
        Ok(h)
    }
}

fn dlopen_path(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    dlopen_raw(&c).map(|_| ())
}

fn dlopen_name(name: &str) -> Result<*mut libc::c_void, String> {
    let c = CString::new(name).map_err(|_| format!("{name} contains a NUL byte"))?;
    dlopen_raw(&c)
}

/// The file a loaded library came from, found through one of its symbols.
fn loaded_path(handle: *mut libc::c_void, symbol: &str) -> Option<PathBuf> {
    let sym = CString::new(symbol).ok()?;
    // SAFETY: `handle` is a live handle from dlopen (never closed) and `sym` NUL-terminated.
    let addr = unsafe { libc::dlsym(handle, sym.as_ptr()) };
    if addr.is_null() {
        return None;
    }
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `addr` is a symbol address inside a loaded object; `info` is a valid out-pointer.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(name.to_string_lossy().into_owned()))
}

// ---- where to look ------------------------------------------------------------------------

fn env_dirs(var: &str) -> Vec<PathBuf> {
    std::env::var_os(var)
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// `<arch>-linux` folder names of a toolkit's `targets`.
fn target_dirs() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "aarch64" => &["sbsa-linux", "aarch64-linux"],
        "x86_64" => &["x86_64-linux"],
        _ => &[],
    }
}

fn gnu_triple() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Some("x86_64-linux-gnu"),
        "aarch64" => Some("aarch64-linux-gnu"),
        _ => None,
    }
}

fn toolkit_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
        .iter()
        .filter_map(|v| std::env::var_os(v).filter(|s| !s.is_empty()))
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = read_dir_names(Path::new("/usr/local"))
        .into_iter()
        .filter_map(|name| {
            let v = name.strip_prefix("cuda-")?;
            let key = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
            Some((key, Path::new("/usr/local").join(&name)))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
    roots.extend(versioned.into_iter().map(|(_, p)| p));
    roots.push(PathBuf::from("/opt/cuda"));
    roots
}

fn root_lib_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![root.join("lib64"), root.join("lib")];
    for t in target_dirs() {
        dirs.push(root.join("targets").join(t).join("lib"));
    }
    dirs
}

/// Python package folders (`site-packages`, `dist-packages`) of the usual prefixes.
fn site_packages() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|v| std::env::var_os(v).filter(|s| !s.is_empty()))
        .map(PathBuf::from)
        .collect();
    if let Some(h) = home() {
        prefixes.push(h.join(".local"));
    }
    prefixes.push(PathBuf::from("/usr/local"));
    prefixes.push(PathBuf::from("/usr"));
    prefixes.push(PathBuf::from("/opt/conda"));
    if let Some(h) = home() {
        for conda in ["miniconda3", "anaconda3", "miniforge3"] {
            prefixes.push(h.join(conda));
        }
        let versions = h.join(".pyenv/versions");
        let mut names = read_dir_names(&versions);
        names.sort();
        names.reverse();
        prefixes.extend(names.into_iter().map(|n| versions.join(n)));
    }
    let mut sites = Vec::new();
    for prefix in prefixes {
        for lib in ["lib", "lib64"] {
            let base = prefix.join(lib);
            let mut pys: Vec<String> = read_dir_names(&base)
                .into_iter()
                .filter(|n| n.starts_with("python3"))
                .collect();
            pys.sort();
            pys.reverse();
            for py in pys {
                sites.push(base.join(&py).join("site-packages"));
                sites.push(base.join(&py).join("dist-packages"));
            }
        }
    }
    sites.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    existing_unique(sites)
}

/// `<site>/nvidia/*/<leaf>`, `cu13` first, then `cu12`, then the others by name.
fn nvidia_subdirs(site: &Path, leaf: &str) -> Vec<PathBuf> {
    let base = site.join("nvidia");
    let mut names = read_dir_names(&base);
    let rank = |n: &str| match n {
        "cu13" => 0,
        "cu12" => 1,
        _ => 2,
    };
    names.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    names.into_iter().map(|n| base.join(n).join(leaf)).collect()
}

/// The system loader's folders: `LD_LIBRARY_PATH`, `/etc/ld.so.conf` (with its includes) and
/// the standard folders.
fn system_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = env_dirs("LD_LIBRARY_PATH");
    dirs.extend(ld_so_conf(Path::new("/etc/ld.so.conf"), 0));
    dirs.push(PathBuf::from("/usr/local/nvidia/lib64"));
    dirs.push(PathBuf::from("/usr/local/nvidia/lib"));
    if let Some(t) = gnu_triple() {
        dirs.push(Path::new("/usr/lib").join(t));
        dirs.push(Path::new("/lib").join(t));
    }
    for d in [
        "/usr/lib64",
        "/lib64",
        "/usr/lib",
        "/lib",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.retain(|d| !d.components().any(|c| c.as_os_str() == "stubs"));
    dirs
}

fn ld_so_conf(file: &Path, depth: usize) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(pattern) = line.strip_prefix("include") {
            if depth < 4 {
                for f in glob_last(pattern.trim()) {
                    dirs.extend(ld_so_conf(&f, depth + 1));
                }
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
    dirs
}

/// Files matching `dir/prefix*suffix` (a `*` in the last component only), sorted.
fn glob_last(pattern: &str) -> Vec<PathBuf> {
    let path = Path::new(pattern);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = match name.split_once('*') {
        None => vec![path.to_path_buf()],
        Some((pre, post)) => read_dir_names(dir)
            .into_iter()
            .filter(|n| {
                n.starts_with(pre) && n.ends_with(post) && n.len() >= pre.len() + post.len()
            })
            .map(|n| dir.join(n))
            .collect(),
    };
    out.sort();
    out
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn existing_unique(dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut seen = std::collections::HashSet::new();
    dirs.into_iter()
        .filter(|d| d.is_dir())
        .filter(|d| seen.insert(std::fs::canonicalize(d).unwrap_or_else(|_| d.clone())))
        .collect()
}

/// `dir/<stem>.so.<major>`, or else the first `dir/<stem>.so.<major>.*` by name.
fn find_lib(dir: &Path, stem: &str, major: u32) -> Option<PathBuf> {
    let exact = dir.join(format!("{stem}.so.{major}"));
    if exact.is_file() {
        return Some(exact);
    }
    find_prefixed(dir, &format!("{stem}.so.{major}."))
}

/// The shortest (then first by name) file in `dir` whose name starts with `prefix`.
fn find_prefixed(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut names: Vec<String> = read_dir_names(dir)
        .into_iter()
        .filter(|n| n.starts_with(prefix) && dir.join(n).is_file())
        .collect();
    names.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    names.into_iter().next().map(|n| dir.join(n))
}

fn list_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        "no existing folder".to_string()
    } else {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn failures_note(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!(" (found but not loadable: {})", failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_versioned_files_and_skips_alternatives() {
        let dir = tempdir();
        for n in [
            "libnvrtc.so.13",
            "libnvrtc.alt.so.13",
            "libnvrtc-builtins.alt.so.13.0",
            "libnvrtc-builtins.so.13.0",
            "libnvrtc-builtins.so.13.0.88",
            "libcublas.so.12.9.1.4",
            "libcublasLt.so.12",
        ] {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        assert_eq!(
            find_lib(&dir, "libnvrtc", 13),
            Some(dir.join("libnvrtc.so.13"))
        );
        assert_eq!(find_lib(&dir, "libnvrtc", 12), None);
        assert_eq!(
            find_prefixed(&dir, "libnvrtc-builtins.so.13"),
            Some(dir.join("libnvrtc-builtins.so.13.0"))
        );
        assert_eq!(
            find_lib(&dir, "libcublas", 12),
            Some(dir.join("libcublas.so.12.9.1.4"))
        );
        assert_eq!(
            find_lib(&dir, "libcublasLt", 12),
            Some(dir.join("libcublasLt.so.12"))
        );
        assert_eq!(find_lib(&dir, "libcublas", 13), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nvidia_folders_put_cu13_first() {
        let site = tempdir();
        for n in ["cublas", "cu12", "cu13", "cuda_nvrtc"] {
            std::fs::create_dir_all(site.join("nvidia").join(n).join("lib")).unwrap();
        }
        let got: Vec<String> = nvidia_subdirs(&site, "lib")
            .iter()
            .map(|p| {
                p.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(got, ["cu13", "cu12", "cublas", "cuda_nvrtc"]);
        std::fs::remove_dir_all(&site).unwrap();
    }

    #[test]
    fn ld_so_conf_follows_includes() {
        let dir = tempdir();
        std::fs::create_dir_all(dir.join("conf.d")).unwrap();
        std::fs::write(
            dir.join("ld.so.conf"),
            format!(
                "# comment\ninclude {}/conf.d/*.conf\n/opt/a\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("conf.d/x.conf"), "/opt/x # driver\n").unwrap();
        std::fs::write(dir.join("conf.d/y.txt"), "/opt/y\n").unwrap();
        assert_eq!(
            ld_so_conf(&dir.join("ld.so.conf"), 0),
            vec![PathBuf::from("/opt/x"), PathBuf::from("/opt/a")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn search_lists_only_existing_folders_without_stubs() {
        for d in toolkit_search_dirs() {
            assert!(d.is_dir(), "{}", d.display());
            assert!(!d.ends_with("stubs"), "{}", d.display());
        }
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "dtl-cuda-libs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
