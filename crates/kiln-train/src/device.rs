//! Which device a run gets: `backend.device = "auto" | "cpu" | "cuda" | "cuda:N"`. CUDA needs a build
//! with the `cuda` feature *and* a device the driver reports; `auto` takes CUDA device 0 when both
//! hold and the CPU otherwise, saying why. The driver is asked directly (`dlopen("libcuda.so.1")`,
//! `cuInit`, `cuDeviceGetCount`) so that a machine without a GPU gets a sentence, not a panic from
//! deep inside a CUDA runtime.

use anyhow::{bail, Result};

/// Where the recipe's `backend.device` resolves to in this build on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

/// The choice, and for `auto` a line saying what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub choice: DeviceChoice,
    pub note: Option<String>,
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

/// Resolves `spec` for this build (`cfg!(feature = "cuda")`) on this machine.
pub fn resolve_device(spec: &str) -> Result<Resolved> {
    resolve_with(spec, cfg!(feature = "cuda"), cuda_device_count)
}

/// [`resolve_device`] with the build and the driver as arguments (tests give both).
pub fn resolve_with(spec: &str, built_with_cuda: bool, probe: impl Fn() -> Result<usize, String>) -> Result<Resolved> {
    let cpu = |note: String| Ok(Resolved { choice: DeviceChoice::Cpu, note: Some(note) });
    let index = if spec == "cuda" { Some(0) } else { spec.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) };
    match (spec, index) {
        ("cpu", _) => Ok(Resolved { choice: DeviceChoice::Cpu, note: None }),
        ("auto", _) if !built_with_cuda => cpu("backend.device = \"auto\": this kiln was built without CUDA (cargo xtask train --cuda); training on the CPU".into()),
        ("auto", _) => match probe() {
            Ok(n) if n > 0 => Ok(Resolved { choice: DeviceChoice::Cuda(0), note: Some(format!("backend.device = \"auto\": CUDA device 0 of {n}")) }),
            Ok(_) => cpu("backend.device = \"auto\": no CUDA device found; training on the CPU".into()),
            Err(why) => cpu(format!("backend.device = \"auto\": {why}; training on the CPU")),
        },
        (s, Some(_)) if !built_with_cuda => {
            bail!("backend.device = {s:?}: this kiln was built without CUDA; build with the `cuda` feature (`cargo xtask train --cuda ...`) or use \"cpu\"")
        }
        (s, Some(i)) => match probe() {
            Ok(n) if i < n => Ok(Resolved { choice: DeviceChoice::Cuda(i), note: None }),
            Ok(n) => bail!("backend.device = {s:?}: the CUDA driver reports {n} device(s)"),
            Err(why) => bail!("backend.device = {s:?}: {why}; use \"cpu\" or \"auto\""),
        },
        (s, None) => bail!("backend.device = {s:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(resolve_with("tpu", true, || Ok(2)).is_err());
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
