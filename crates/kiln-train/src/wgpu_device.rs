//! A wgpu adapter opened as a Burn device (`backend.device = "wgpu…"`). kiln lists the adapters and
//! opens the chosen one itself, then hands the opened device to CubeCL (`init_device`), instead of
//! letting CubeCL pick on first use: CubeCL 0.10's picker panics when no adapter matches
//! (`select_from_adapter_list`, `request_adapter_with_preference`) and when the driver refuses a
//! device (`request_device(..).unwrap()`), where kiln owes the user one line and exit code 2.
//! The device is requested as CubeCL's WGSL path requests it (cubecl-wgpu 0.10
//! `backend/wgsl.rs::request_device`: every adapter feature but mappable primary buffers, the
//! adapter's limits, memory hints for usage). Each (adapter, replica) is opened once per process:
//! training, validation and a later `translate` in the same process share it. (Replicas would get
//! a device each, but CubeCL 0.10's wgpu runtime has no collective operations: the recipe check
//! refuses `backend.devices` of wgpu devices.)

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
use burn::backend::wgpu::{init_device, RuntimeOptions, WgpuDevice, WgpuSetup};

use crate::device::{pick_adapter, AdapterInfo, AdapterKind, WgpuAdapter, WGPU_INSTALL};

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor { backends: AutoGraphicsApi::backend().into(), ..wgpu::InstanceDescriptor::new_without_display_handle() })
}

fn info_of(adapter: &wgpu::Adapter) -> AdapterInfo {
    let i = adapter.get_info();
    let kind = match i.device_type {
        wgpu::DeviceType::DiscreteGpu => AdapterKind::Discrete,
        wgpu::DeviceType::IntegratedGpu => AdapterKind::Integrated,
        wgpu::DeviceType::VirtualGpu => AdapterKind::Virtual,
        wgpu::DeviceType::Cpu => AdapterKind::Cpu,
        wgpu::DeviceType::Other => AdapterKind::Other,
    };
    let driver = [i.driver.trim(), i.driver_info.trim()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(" ");
    AdapterInfo { name: i.name.clone(), kind, api: format!("{:?}", i.backend), driver, shader_f16: adapter.features().contains(wgpu::Features::SHADER_F16) }
}

/// Whether the graphics API's loader library is there at all (a clearer line than "no adapter").
fn loader_missing() -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: dlopen with a NUL-terminated name; the handle is closed at once.
        unsafe {
            let lib = libc::dlopen(c"libvulkan.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if lib.is_null() {
                return Some("no Vulkan loader (libvulkan.so.1 not found)".into());
            }
            libc::dlclose(lib);
        }
    }
    None
}

fn listed() -> Vec<wgpu::Adapter> {
    cubecl::future::block_on(instance().enumerate_adapters(AutoGraphicsApi::backend().into()))
}

/// The adapters the graphics API lists, in its order.
pub fn adapters() -> Result<Vec<AdapterInfo>, String> {
    if let Some(why) = loader_missing() {
        return Err(why);
    }
    Ok(quietly(|| listed().iter().map(info_of).collect()).unwrap_or_default())
}

/// Runs `f` with panics silenced and caught: what a driver or runtime panics with becomes a value.
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    out.map_err(|p| {
        let text = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "a panic".into());
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    })
}

/// An opened adapter: the Burn device and what the adapter is.
#[derive(Debug, Clone)]
pub struct Opened {
    pub device: WgpuDevice,
    pub info: AdapterInfo,
}

fn opened() -> &'static Mutex<HashMap<(WgpuAdapter, usize), Opened>> {
    static OPENED: OnceLock<Mutex<HashMap<(WgpuAdapter, usize), Opened>>> = OnceLock::new();
    OPENED.get_or_init(Default::default)
}

/// Opens `want` for replica `replica` (0 for a single device), or gives the one already open.
/// `spec` names the recipe's device in messages.
pub fn open(want: WgpuAdapter, replica: usize, spec: &str) -> Result<Opened, String> {
    let mut map = opened().lock().map_err(|_| "wgpu: the device table was poisoned by an earlier failure".to_string())?;
    if let Some(o) = map.get(&(want, replica)) {
        return Ok(o.clone());
    }
    if let Some(why) = loader_missing() {
        return Err(format!("backend.device = {spec:?}: {why}; {WGPU_INSTALL}"));
    }
    let mut adapters = quietly(listed).map_err(|why| format!("backend.device = {spec:?}: the graphics driver failed while listing adapters ({why}); {WGPU_INSTALL}"))?;
    let infos: Vec<AdapterInfo> = adapters.iter().map(info_of).collect();
    if infos.is_empty() {
        return Err(format!("backend.device = {spec:?}: wgpu lists no adapter; {WGPU_INSTALL}"));
    }
    let index = pick_adapter(&infos, want).ok_or_else(|| format!("backend.device = {spec:?}: no such adapter; wgpu lists {}", infos.iter().map(AdapterInfo::describe).collect::<Vec<_>>().join(", ")))?;
    let adapter = adapters.swap_remove(index);
    let info = infos[index].clone();
    let requested = quietly(|| {
        cubecl::future::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: adapter.features().difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits: adapter.limits(),
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
            // SAFETY: what CubeCL 0.10 asks for on this path (passthrough shaders), so that the
            // device is the one its compiler expects.
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
        }))
    });
    let (device, queue) = match requested {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(format!("backend.device = {spec:?}: {} refused to open a device: {}", info.describe(), one_line(&e.to_string()))),
        Err(why) => return Err(format!("backend.device = {spec:?}: the driver of {} failed to start: {why}", info.describe())),
    };
    let setup = WgpuSetup { instance: instance(), adapter, device, queue, backend: AutoGraphicsApi::backend() };
    let device = quietly(|| init_device(setup, RuntimeOptions::default())).map_err(|why| format!("backend.device = {spec:?}: CubeCL could not start on {}: {why}", info.describe()))?;
    let o = Opened { device, info };
    map.insert((want, replica), o.clone());
    Ok(o)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// CubeCL's memory on an opened device: bytes in use by tensors and reserved by its pools.
pub fn memory_use(device: &WgpuDevice) -> Option<(u64, u64)> {
    use cubecl::Runtime;
    let usage = cubecl::wgpu::WgpuRuntime::client(device).memory_usage().ok()?;
    Some((usage.bytes_in_use, usage.bytes_reserved))
}

/// The memory meter of `loader.max_tokens = "auto"` on a wgpu device: CubeCL's reserved bytes
/// after a step (as on CUDA), against the adapter's memory. wgpu reports no memory size, so the
/// size is the machine's memory for a CPU adapter (lavapipe allocates there) and `nvidia-smi`'s for
/// an NVIDIA adapter; elsewhere the probe is refused in one line.
pub struct WgpuMemory {
    device: WgpuDevice,
    capacity: u64,
}

impl WgpuMemory {
    pub fn new(opened: &Opened) -> Result<Self, String> {
        let capacity = match opened.info.kind {
            AdapterKind::Cpu => crate::autobatch::HostMemory::new().map(|m| crate::autobatch::MemoryMeter::capacity(&m)),
            _ if opened.info.name.to_ascii_lowercase().contains("nvidia") => crate::autobatch::nvidia_smi_memory(0).ok(),
            _ => None,
        };
        let capacity = capacity.ok_or_else(|| format!("loader.max_tokens = \"auto\": wgpu reports no memory size for {}; give loader.max_tokens a number", opened.info.describe()))?;
        Ok(Self { device: opened.device.clone(), capacity })
    }
}

impl crate::autobatch::MemoryMeter for WgpuMemory {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn reset(&mut self) {
        use cubecl::Runtime;
        cubecl::wgpu::WgpuRuntime::client(&self.device).memory_cleanup();
    }

    fn peak(&mut self) -> u64 {
        memory_use(&self.device).map(|(_, reserved)| reserved).unwrap_or(u64::MAX / 2)
    }
}
