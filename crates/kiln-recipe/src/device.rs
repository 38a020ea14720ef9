//! The syntax of `backend.device` and `backend.devices`: which devices a recipe can name. This
//! is the one parser of those strings; what a name resolves to on a machine (a driver, an
//! adapter, a fallback) is `kiln_train::device`'s business.

use std::fmt;

/// Which wgpu adapter a `"wgpu…"` device names. The kinds are wgpu's `DeviceType`s; the index
/// counts adapters of that kind in the order the graphics API lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgpuAdapter {
    /// `"wgpu"`: the adapter wgpu prefers for high performance (a discrete GPU before an
    /// integrated one, a CPU adapter only when nothing else exists).
    Default,
    /// `"wgpu:cpu"`: a software adapter (Mesa's lavapipe, `llvmpipe`).
    Cpu,
    /// `"wgpu:discrete:N"` (N = 0 when left out).
    Discrete(usize),
    /// `"wgpu:integrated:N"`.
    Integrated(usize),
    /// `"wgpu:virtual:N"`.
    Virtual(usize),
}

/// A device as a recipe names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// CUDA if built in and present, then a real GPU through wgpu if built in, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Wgpu(WgpuAdapter),
}

/// What `backend.device` accepts, for messages.
pub const DEVICE_FORMS: &str = "\"auto\", \"cpu\", \"cuda\", \"cuda:N\", \"wgpu\", \"wgpu:cpu\", \"wgpu:discrete:N\", \"wgpu:integrated:N\" or \"wgpu:virtual:N\"";

impl DeviceSpec {
    /// Parses a device name; the error says what was expected.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let index = |n: Option<&str>| -> Option<usize> {
            match n {
                None => Some(0),
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n.parse().ok(),
                Some(_) => None,
            }
        };
        let mut parts = spec.splitn(3, ':');
        let parsed = match (parts.next(), parts.next(), parts.next()) {
            (Some("auto"), None, None) => Some(Self::Auto),
            (Some("cpu"), None, None) => Some(Self::Cpu),
            (Some("cuda"), n, None) => index(n).map(Self::Cuda),
            (Some("wgpu"), None, None) => Some(Self::Wgpu(WgpuAdapter::Default)),
            (Some("wgpu"), Some("cpu"), None) => Some(Self::Wgpu(WgpuAdapter::Cpu)),
            (Some("wgpu"), Some("discrete"), n) => index(n).map(|i| Self::Wgpu(WgpuAdapter::Discrete(i))),
            (Some("wgpu"), Some("integrated"), n) => index(n).map(|i| Self::Wgpu(WgpuAdapter::Integrated(i))),
            (Some("wgpu"), Some("virtual"), n) => index(n).map(|i| Self::Wgpu(WgpuAdapter::Virtual(i))),
            _ => None,
        };
        parsed.ok_or_else(|| format!("expected {DEVICE_FORMS}, got {spec:?}"))
    }

    /// The device family, for "devices of one kind" checks.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda(_) => "cuda",
            Self::Wgpu(_) => "wgpu",
        }
    }
}

impl fmt::Display for WgpuAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => write!(f, "wgpu"),
            Self::Cpu => write!(f, "wgpu:cpu"),
            Self::Discrete(i) => write!(f, "wgpu:discrete:{i}"),
            Self::Integrated(i) => write!(f, "wgpu:integrated:{i}"),
            Self::Virtual(i) => write!(f, "wgpu:virtual:{i}"),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Wgpu(a) => write!(f, "{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("wgpu", DeviceSpec::Wgpu(WgpuAdapter::Default)),
            ("wgpu:cpu", DeviceSpec::Wgpu(WgpuAdapter::Cpu)),
            ("wgpu:discrete", DeviceSpec::Wgpu(WgpuAdapter::Discrete(0))),
            ("wgpu:discrete:1", DeviceSpec::Wgpu(WgpuAdapter::Discrete(1))),
            ("wgpu:integrated:0", DeviceSpec::Wgpu(WgpuAdapter::Integrated(0))),
            ("wgpu:virtual:2", DeviceSpec::Wgpu(WgpuAdapter::Virtual(2))),
        ] {
            assert_eq!(DeviceSpec::parse(text), Ok(spec), "{text}");
            assert_eq!(DeviceSpec::parse(&spec.to_string()), Ok(spec), "{spec}");
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_forms() {
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:+1", "cuda:1:2", "wgpu:", "wgpu:cpu:0", "wgpu:discrete:x", "wgpu:gpu", "WGPU", "cpu:0", "auto:1"] {
            let err = DeviceSpec::parse(bad).unwrap_err();
            assert!(err.contains("\"wgpu:discrete:N\"") && err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
