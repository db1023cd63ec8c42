//! Heap tuning for chunk-sized buffers. Both daemons allocate one buffer per chunk (1 MiB by
//! default) and free it a moment later on another thread. glibc serves such blocks from `mmap`
//! once they pass its dynamic mmap threshold, or trims them back to the kernel once the heap top
//! passes its trim threshold, so every chunk's first touch pays page faults and page clearing:
//! profiled on the sink (QUIC, 1 GiB random), 99 % of its page faults were in the copy into fresh
//! payload buffers, ~150k faults per 2 GiB. Fixing the mmap threshold at 4 MiB and the trim
//! threshold at 8 MiB keeps freed chunk buffers in the process for reuse: 3-21k faults and 7-20 %
//! less sink CPU per 2 GiB, ~20 % less CPU per side over gRPC (figures in `docs/performance.md`),
//! at the price of up to 8 MiB of free heap held per arena. Chunks above 4 MiB (`--chunk-size` up
//! to 16 MiB) still go to `mmap`, as before. An operator who tunes glibc's malloc through its
//! environment variables keeps their settings: we then change nothing.

/// What [`keep_chunk_buffers`] did, for the daemon to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapTuning {
    /// The thresholds were set.
    Applied,
    /// The operator's own malloc settings (named variable) were left alone.
    OperatorSet(&'static str),
    /// This C library has no such knobs (not glibc), or it refused them.
    Unsupported,
}

/// The mmap threshold: blocks below it come from the heap and are reused after `free`.
pub const MMAP_THRESHOLD: usize = 4 << 20;
/// The trim threshold: free memory at the heap top up to this size is kept, not returned.
pub const TRIM_THRESHOLD: usize = 8 << 20;

/// The environment variables through which an operator tunes glibc's malloc.
const OPERATOR_KNOBS: [&str; 3] = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"];

/// Which operator setting, if any, takes precedence over ours. `GLIBC_TUNABLES` counts only when
/// it names a `glibc.malloc.` tunable: other tunables say nothing about the heap.
fn operator_setting(get: impl Fn(&str) -> Option<String>) -> Option<&'static str> {
    OPERATOR_KNOBS.into_iter().find(|name| match get(name) {
        None => false,
        Some(value) if *name == "GLIBC_TUNABLES" => value.contains("glibc.malloc."),
        Some(_) => true,
    })
}

/// Keep chunk-sized buffers in the process between chunks (see the module comment), and log what
/// was done at debug level. The thresholds are process-wide (every arena), so one call at the
/// start of `main`, before the first chunk buffer, is enough.
pub fn keep_chunk_buffers() -> HeapTuning {
    let tuning = match operator_setting(|name| std::env::var(name).ok()) {
        Some(name) => HeapTuning::OperatorSet(name),
        None => set_thresholds(),
    };
    tracing::debug!(?tuning, "heap thresholds for chunk buffers");
    tuning
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> HeapTuning {
    // SAFETY: mallopt only changes allocator parameters; both values are in range for an int.
    let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
    // SAFETY: as above.
    let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) };
    if mmap == 1 && trim == 1 {
        HeapTuning::Applied
    } else {
        HeapTuning::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> HeapTuning {
    HeapTuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn operator_settings_take_precedence() {
        assert_eq!(operator_setting(env(&[])), None);
        assert_eq!(operator_setting(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])), Some("MALLOC_TRIM_THRESHOLD_"));
        assert_eq!(operator_setting(env(&[("MALLOC_MMAP_THRESHOLD_", "1")])), Some("MALLOC_MMAP_THRESHOLD_"));
        assert_eq!(
            operator_setting(env(&[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])),
            Some("GLIBC_TUNABLES")
        );
        // A tunable that is not about malloc leaves the heap to us.
        assert_eq!(operator_setting(env(&[("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")])), None);
    }

    /// glibc accepts both thresholds (a value above its limits would be refused and the
    /// daemons would silently run untuned).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_thresholds() {
        assert_eq!(set_thresholds(), HeapTuning::Applied);
    }
}
