//! The training process's own resource use, sampled once per sync window for the logs and the
//! dashboard: resident memory and CPU time, from `/proc/self` on Linux (zeros elsewhere); and the
//! peak resident set and the memory available, for the bench and the batch-size probe.

/// A reading of the process's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessSample {
    /// Resident set size, MiB.
    pub rss_mb: f64,
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
}

impl ProcessSample {
    pub fn now() -> Self {
        #[cfg(target_os = "linux")]
        {
            linux().unwrap_or_default()
        }
        #[cfg(not(target_os = "linux"))]
        {
            Self::default()
        }
    }

    /// CPU use between `earlier` and `self` over `wall_s` seconds, percent of one core.
    pub fn cpu_pct_since(&self, earlier: &ProcessSample, wall_s: f64) -> f64 {
        if wall_s <= 0.0 { 0.0 } else { 100.0 * (self.cpu_s - earlier.cpu_s).max(0.0) / wall_s }
    }
}

/// A field of `/proc/self/status` in KiB (`"VmHWM:"`, the peak resident set; `"VmRSS:"`).
pub fn status_kb(key: &str) -> Option<u64> {
    field_kb(&std::fs::read_to_string("/proc/self/status").ok()?, key)
}

/// A field of `/proc/meminfo` in KiB (`"MemAvailable:"`).
pub fn meminfo_kb(key: &str) -> Option<u64> {
    field_kb(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// Resets the process's peak resident set (`VmHWM`) to the current one (Linux ≥ 4.0).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(target_os = "linux")]
fn linux() -> Option<ProcessSample> {
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name (which may hold spaces): utime and stime are
    // the 14th and 15th fields of the line, the 12th and 13th after ")".
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some(ProcessSample { rss_mb: resident * page / (1024.0 * 1024.0), cpu_s: (utime + stime) / ticks.max(1.0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn reads_this_process() {
        let a = ProcessSample::now();
        // Burn a little CPU and hold some memory.
        let v: Vec<u64> = (0..3_000_000u64).map(|i| i.wrapping_mul(i)).collect();
        let mut x = 0u64;
        for _ in 0..30 {
            x = x.wrapping_add(v.iter().fold(0u64, |s, &y| s.wrapping_add(y ^ x)));
        }
        std::hint::black_box(x);
        let b = ProcessSample::now();
        assert!(b.rss_mb > 10.0, "{b:?}");
        assert!(b.cpu_s > a.cpu_s, "{a:?} {b:?}");
    }
}
