//! Which device a run gets: `backend.device` (syntax: `kiln_recipe::DeviceSpec`) resolved on this
//! build and this machine. CUDA needs a build with the `cuda` feature *and* a device the driver
//! reports; a wgpu adapter needs a build with the `wgpu` feature and an adapter the graphics API
//! lists ([`crate::wgpu_device`]). `auto` takes CUDA device 0, else a GPU adapter through wgpu
//! (never a CPU adapter such as lavapipe: Flex is faster on the CPU), else the CPU, saying what it
//! found. The CUDA driver is asked directly (`dlopen("libcuda.so.1")`, `cuInit`,
//! `cuDeviceGetCount`) and wgpu's adapters are listed before any is opened, so that a machine
//! without a GPU gets a sentence, not a panic from deep inside a runtime.
use anyhow::{bail, Result};
pub use kiln_recipe::WgpuAdapter;
use kiln_recipe::DeviceSpec;

/// Keeps CubeCL's autotune choices (which kernel runs each operation, measured on first use) in
/// `dir`, a run directory, for the rest of the process; to be called before the device is first
/// used. CubeCL 0.10 keeps them in one cache per checkout or user (`target/autotune`, else
/// `~/.cache/cubecl`), keyed on buckets of shapes, and replays a choice on any shape of its
/// bucket without checking it launches there: a kernel tuned on one model reached another's
/// shapes and panicked on its device thread (a vector–matrix kernel needing `n` a multiple of 8,
/// tuned at vocabulary 400, replayed at 300; in CI, two models trained at once). Choices kept
/// with the run belong to one model, and a resumed run or `kiln translate` replays the kernels its
/// training chose. `false`: CubeCL had read its configuration already in this process (a second
/// run in one process, a library user's device), which is kept. A `cubecl.toml`'s other settings
/// and the `CUBECL_*` variables still apply.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn keep_kernel_choices_in(dir: &std::path::Path) -> bool {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let mut config = CubeClRuntimeConfig::storage().lock();
    if config.is_some() {
        return false;
    }
    let mut chosen = CubeClRuntimeConfig::from_current_dir().override_from_env();
    chosen.autotune.cache = CacheConfig::File(dir.to_path_buf());
    *config = Some(std::sync::Arc::new(chosen));
    true
}

/// Where the recipe's `backend.device` resolves to in this build on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    Wgpu(WgpuAdapter),
}

/// The choice, and for `auto` a line saying what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub choice: DeviceChoice,
    pub note: Option<String>,
}

/// The kind of a wgpu adapter, as wgpu reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    Discrete,
    Integrated,
    Virtual,
    Cpu,
    Other,
}

/// One adapter the graphics API lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: String,
    pub kind: AdapterKind,
    /// The graphics API ("Vulkan", "Metal", "Dx12").
    pub api: String,
    /// The driver and its version, as the adapter reports them (may be empty).
    pub driver: String,
    /// Whether shaders may use f16 (`train.precision = "f16"`).
    pub shader_f16: bool,
}

impl AdapterInfo {
    /// `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, cpu; Mesa 22.3.6)`: for headers and messages.
    pub fn describe(&self) -> String {
        let kind = format!("{:?}", self.kind).to_lowercase();
        if self.driver.is_empty() { format!("{} ({}, {kind})", self.name, self.api) } else { format!("{} ({}, {kind}; {})", self.name, self.api, self.driver) }
    }
}

/// The index among adapters of the named kind, in the order the API lists them: the adapter an
/// explicit `wgpu:…` name opens. `Default` takes the best kind present (discrete, integrated,
/// virtual, other, then CPU), as wgpu's high-performance preference does.
pub fn pick_adapter(adapters: &[AdapterInfo], want: WgpuAdapter) -> Option<usize> {
    let nth = |kind: AdapterKind, n: usize| adapters.iter().enumerate().filter(|(_, a)| a.kind == kind).nth(n).map(|(i, _)| i);
    match want {
        WgpuAdapter::Default => [AdapterKind::Discrete, AdapterKind::Integrated, AdapterKind::Virtual, AdapterKind::Other, AdapterKind::Cpu].into_iter().find_map(|k| nth(k, 0)),
        WgpuAdapter::Cpu => nth(AdapterKind::Cpu, 0),
        WgpuAdapter::Discrete(n) => nth(AdapterKind::Discrete, n),
        WgpuAdapter::Integrated(n) => nth(AdapterKind::Integrated, n),
        WgpuAdapter::Virtual(n) => nth(AdapterKind::Virtual, n),
    }
}

/// What this build can reach on this machine: `None` where a backend is not built in, else the
/// probe that asks the driver (tests give their own).
pub struct Machine<'a> {
    pub cuda: Option<&'a dyn Fn() -> Result<usize, String>>,
    pub wgpu: Option<&'a dyn Fn() -> Result<Vec<AdapterInfo>, String>>,
}

/// CUDA devices the driver reports.
#[cfg(target_os = "linux")]
pub fn cuda_device_count() -> Result<usize, String> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols are called with the signatures
    // of the CUDA driver API (CUresult cuInit(unsigned), CUresult cuDeviceGetCount(int*)). The
    // library stays loaded: the CUDA backend loads it again anyway.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return Err("no CUDA driver (libcuda.so.1 not found)".into());
        }
        let init = libc::dlsym(lib, c"cuInit".as_ptr());
        let count = libc::dlsym(lib, c"cuDeviceGetCount".as_ptr());
        if init.is_null() || count.is_null() {
            return Err("libcuda.so.1 lacks cuInit or cuDeviceGetCount".into());
        }
        let init: CuInit = std::mem::transmute::<*mut libc::c_void, CuInit>(init);
        let count: CuDeviceGetCount = std::mem::transmute::<*mut libc::c_void, CuDeviceGetCount>(count);
        match init(0) {
            0 => {}
            100 => return Err("the CUDA driver sees no device".into()),
            rc => return Err(format!("the CUDA driver failed to start (cuInit: CUresult {rc})")),
        }
        let mut n = 0i32;
        match count(&mut n) {
            0 => Ok(n.max(0) as usize),
            rc => Err(format!("the CUDA driver cannot count devices (CUresult {rc})")),
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn cuda_device_count() -> Result<usize, String> {
    Err("kiln probes CUDA devices on Linux only".into())
}

/// The wgpu adapters of this machine; an error where the build has no wgpu.
pub fn wgpu_adapters() -> Result<Vec<AdapterInfo>, String> {
    #[cfg(feature = "wgpu")]
    {
        crate::wgpu_device::adapters()
    }
    #[cfg(not(feature = "wgpu"))]
    {
        Err("this kiln was built without wgpu".into())
    }
}

/// Resolves `spec` for this build on this machine.
pub fn resolve_device(spec: &str) -> Result<Resolved> {
    let cuda = cuda_device_count;
    let wgpu = wgpu_adapters;
    let machine = Machine { cuda: cfg!(feature = "cuda").then_some(&cuda as _), wgpu: cfg!(feature = "wgpu").then_some(&wgpu as _) };
    resolve_on(spec, &machine)
}

/// [`resolve_on`] for a build without wgpu (the CUDA build and driver as arguments).
pub fn resolve_with(spec: &str, built_with_cuda: bool, probe: impl Fn() -> Result<usize, String>) -> Result<Resolved> {
    resolve_on(spec, &Machine { cuda: built_with_cuda.then_some(&probe as _), wgpu: None })
}

/// How to get a wgpu adapter, for messages.
pub const WGPU_INSTALL: &str = "install the GPU's Vulkan driver, or Mesa's lavapipe for a Vulkan device on the CPU (Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1)";

/// [`resolve_device`] with the machine as an argument.
pub fn resolve_on(spec: &str, machine: &Machine) -> Result<Resolved> {
    let parsed = DeviceSpec::parse(spec).map_err(|m| anyhow::anyhow!("backend.device: {m}"))?;
    let cpu = |note: String| Ok(Resolved { choice: DeviceChoice::Cpu, note: Some(note) });
    match parsed {
        DeviceSpec::Cpu => Ok(Resolved { choice: DeviceChoice::Cpu, note: None }),
        DeviceSpec::Auto => {
            let mut found = Vec::new();
            match machine.cuda {
                None => found.push("this kiln was built without CUDA (cargo xtask train --cuda)".to_string()),
                Some(probe) => match probe() {
                    Ok(n) if n > 0 => return Ok(Resolved { choice: DeviceChoice::Cuda(0), note: Some(format!("backend.device = \"auto\": CUDA device 0 of {n}")) }),
                    Ok(_) => found.push("no CUDA device found".into()),
                    Err(why) => found.push(why),
                },
            }
            if let Some(probe) = machine.wgpu {
                match probe() {
                    Ok(adapters) => {
                        for (kind, want) in [(AdapterKind::Discrete, WgpuAdapter::Discrete(0)), (AdapterKind::Integrated, WgpuAdapter::Integrated(0)), (AdapterKind::Virtual, WgpuAdapter::Virtual(0))] {
                            if let Some(a) = adapters.iter().find(|a| a.kind == kind) {
                                return Ok(Resolved { choice: DeviceChoice::Wgpu(want), note: Some(format!("backend.device = \"auto\": {} ({want}) through wgpu; {}", a.describe(), found.join("; "))) });
                            }
                        }
                        match adapters.iter().find(|a| a.kind == AdapterKind::Cpu) {
                            Some(a) => found.push(format!("wgpu lists only a CPU adapter, {}, slower than Flex (name \"wgpu:cpu\" to use it)", a.name)),
                            None if adapters.is_empty() => found.push("wgpu lists no adapter".into()),
                            None => found.push("wgpu lists no GPU adapter".into()),
                        }
                    }
                    Err(why) => found.push(why),
                }
            }
            cpu(format!("backend.device = \"auto\": {}; training on the CPU", found.join("; ")))
        }
        DeviceSpec::Cuda(i) => match machine.cuda {
            None => bail!("backend.device = {spec:?}: this kiln was built without CUDA; build with the `cuda` feature (`cargo xtask train --cuda ...`) or use \"cpu\""),
            Some(probe) => match probe() {
                Ok(n) if i < n => Ok(Resolved { choice: DeviceChoice::Cuda(i), note: None }),
                Ok(n) => bail!("backend.device = {spec:?}: the CUDA driver reports {n} device(s)"),
                Err(why) => bail!("backend.device = {spec:?}: {why}; use \"cpu\" or \"auto\""),
            },
        },
        DeviceSpec::Wgpu(want) => match machine.wgpu {
            None => bail!("backend.device = {spec:?}: this kiln was built without wgpu; build with the `wgpu` feature (`cargo xtask train --wgpu ...`) or use \"cpu\""),
            Some(probe) => {
                let adapters = probe().map_err(|why| anyhow::anyhow!("backend.device = {spec:?}: {why}; {WGPU_INSTALL}"))?;
                if adapters.is_empty() {
                    bail!("backend.device = {spec:?}: wgpu lists no adapter; {WGPU_INSTALL}");
                }
                if pick_adapter(&adapters, want).is_none() {
                    let listed: Vec<String> = adapters.iter().map(AdapterInfo::describe).collect();
                    bail!("backend.device = {spec:?}: no such adapter; wgpu lists {}", listed.join(", "));
                }
                Ok(Resolved { choice: DeviceChoice::Wgpu(want), note: None })
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_recipe::DEVICE_FORMS;

    fn none() -> Result<usize, String> {
        Err("no CUDA driver (libcuda.so.1 not found)".into())
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_says_why() {
        let r = resolve_with("auto", false, || Ok(8)).unwrap();
        assert_eq!(r.choice, DeviceChoice::Cpu);
        assert!(r.note.unwrap().contains("built without CUDA"));
        let r = resolve_with("auto", true, none).unwrap();
        assert_eq!(r.choice, DeviceChoice::Cpu);
        assert!(r.note.unwrap().contains("libcuda.so.1 not found"));
        let r = resolve_with("auto", true, || Ok(0)).unwrap();
        assert_eq!((r.choice, r.note.unwrap().contains("no CUDA device")), (DeviceChoice::Cpu, true));
        let r = resolve_with("auto", true, || Ok(2)).unwrap();
        assert_eq!(r.choice, DeviceChoice::Cuda(0));
        assert_eq!(resolve_with("cpu", true, || panic!("cpu never probes")).unwrap().choice, DeviceChoice::Cpu);
    }

    #[test]
    fn a_cuda_request_without_a_gpu_is_one_line() {
        for (spec, built, probe) in [("cuda", false, Ok(1)), ("cuda:0", true, Err("no CUDA driver (libcuda.so.1 not found)".to_string())), ("cuda:2", true, Ok(2))] {
            let err = resolve_with(spec, built, || probe.clone()).unwrap_err().to_string();
            assert!(err.starts_with(&format!("backend.device = {spec:?}")) && !err.contains('\n'), "{err}");
        }
        assert_eq!(resolve_with("cuda:1", true, || Ok(2)).unwrap().choice, DeviceChoice::Cuda(1));
        let err = resolve_with("tpu", true, || Ok(2)).unwrap_err().to_string();
        assert!(err.starts_with("backend.device: expected") && err.contains(DEVICE_FORMS), "{err}");
    }

    fn adapter(name: &str, kind: AdapterKind) -> AdapterInfo {
        AdapterInfo { name: name.into(), kind, api: "Vulkan".into(), driver: String::new(), shader_f16: false }
    }

    fn on(spec: &str, cuda: Option<Result<usize, String>>, wgpu: Option<Result<Vec<AdapterInfo>, String>>) -> Result<Resolved> {
        let c = cuda.clone().map(|r| move || r.clone());
        let w = wgpu.clone().map(|r| move || r.clone());
        let machine = Machine { cuda: c.as_ref().map(|f| f as _), wgpu: w.as_ref().map(|f| f as _) };
        resolve_on(spec, &machine)
    }

    #[test]
    fn auto_prefers_cuda_then_a_gpu_adapter_and_never_a_cpu_adapter() {
        let lavapipe = adapter("llvmpipe (LLVM 15.0.6, 256 bits)", AdapterKind::Cpu);
        let radeon = adapter("AMD Radeon RX 7600", AdapterKind::Discrete);
        let intel = adapter("Intel(R) UHD Graphics 620", AdapterKind::Integrated);
        // CUDA first.
        let r = on("auto", Some(Ok(1)), Some(Ok(vec![radeon.clone()]))).unwrap();
        assert_eq!(r.choice, DeviceChoice::Cuda(0));
        // Then a discrete adapter before an integrated one, whatever the order listed.
        let r = on("auto", Some(Ok(0)), Some(Ok(vec![lavapipe.clone(), intel.clone(), radeon.clone()]))).unwrap();
        assert_eq!(r.choice, DeviceChoice::Wgpu(WgpuAdapter::Discrete(0)));
        let note = r.note.unwrap();
        assert!(note.contains("AMD Radeon RX 7600") && note.contains("no CUDA device"), "{note}");
        let r = on("auto", None, Some(Ok(vec![lavapipe.clone(), intel.clone()]))).unwrap();
        assert_eq!(r.choice, DeviceChoice::Wgpu(WgpuAdapter::Integrated(0)));
        // A CPU adapter alone: Flex, and the note says why and how to ask for it.
        let r = on("auto", None, Some(Ok(vec![lavapipe.clone()]))).unwrap();
        assert_eq!(r.choice, DeviceChoice::Cpu);
        let note = r.note.unwrap();
        assert!(note.contains("only a CPU adapter, llvmpipe") && note.contains("\"wgpu:cpu\"") && note.ends_with("training on the CPU"), "{note}");
        let r = on("auto", None, Some(Err("no Vulkan loader (libvulkan.so.1 not found)".into()))).unwrap();
        assert!(r.choice == DeviceChoice::Cpu && r.note.unwrap().contains("libvulkan.so.1"));
    }

    #[test]
    fn a_named_adapter_is_found_or_refused_in_one_line() {
        let listed = vec![adapter("llvmpipe", AdapterKind::Cpu), adapter("GPU A", AdapterKind::Discrete), adapter("GPU B", AdapterKind::Discrete)];
        for (spec, choice) in [("wgpu", WgpuAdapter::Default), ("wgpu:cpu", WgpuAdapter::Cpu), ("wgpu:discrete:1", WgpuAdapter::Discrete(1))] {
            assert_eq!(on(spec, None, Some(Ok(listed.clone()))).unwrap().choice, DeviceChoice::Wgpu(choice));
        }
        assert_eq!(pick_adapter(&listed, WgpuAdapter::Default), Some(1), "a discrete GPU before the CPU adapter");
        assert_eq!(pick_adapter(&listed, WgpuAdapter::Discrete(1)), Some(2));
        assert_eq!(pick_adapter(&listed[..1], WgpuAdapter::Default), Some(0), "the CPU adapter when it is all there is");
        for (spec, wgpu, needle) in [
            ("wgpu", None, "built without wgpu"),
            ("wgpu:discrete:2", Some(Ok(listed.clone())), "no such adapter; wgpu lists llvmpipe (Vulkan, cpu), GPU A"),
            ("wgpu:integrated", Some(Ok(listed.clone())), "no such adapter"),
            ("wgpu", Some(Ok(Vec::new())), "apt-get install mesa-vulkan-drivers libvulkan1"),
            ("wgpu:cpu", Some(Err("no Vulkan loader (libvulkan.so.1 not found)".into())), "libvulkan.so.1 not found); install"),
        ] {
            let err = on(spec, None, wgpu).unwrap_err().to_string();
            assert!(err.starts_with(&format!("backend.device = {spec:?}: ")) && err.contains(needle) && !err.contains('\n'), "{spec}: {err}");
        }
    }

    /// On a machine without a GPU driver (like CI) the real probe says so instead of failing hard.
    #[test]
    fn the_real_probe_answers() {
        match cuda_device_count() {
            Ok(n) => eprintln!("{n} CUDA device(s)"),
            Err(why) => assert!(!why.is_empty() && !why.contains('\n')),
        }
        if !std::path::Path::new("/dev/nvidiactl").exists() {
            assert!(cuda_device_count().is_err() || cuda_device_count() == Ok(0));
        }
    }
}
