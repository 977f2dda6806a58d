//! The C heap under libtorch's CPU tensors.
//!
//! libtorch allocates every CPU tensor with the C library's `posix_memalign` and frees it
//! when the tensor drops, so one forward pass allocates and frees each activation once.
//! glibc serves a block above its mmap threshold (128 KiB at start) with a fresh `mmap` and
//! gives it back on free, and it trims the heap's free top back to the kernel; either way the
//! next pass faults the same pages in again, zeroed, a few hundred megabytes per ResNet-50
//! pass. Raising the threshold to glibc's largest (32 MiB) and the trim threshold far above a
//! pass's peak keeps freed activations in the heap for the next pass: ResNet-50 FPN ran
//! faster with it on the README's bench machine, the compact model not measurably (README,
//! "The detector core", bench). The cost is that the process keeps its peak heap instead of
//! returning it between passes.
//!
//! A user's own `GLIBC_TUNABLES` with malloc settings wins: then nothing is changed.

/// glibc's largest mmap threshold on 64-bit targets (`HEAP_MAX_SIZE / 2`); `mallopt` refuses
/// more.
pub const MMAP_THRESHOLD_BYTES: usize = 32 << 20;
/// Free memory at the heap's top is returned to the kernel only above this: far above the
/// peak of one pass of the largest model here, so a pass never gives back what the next one
/// needs.
pub const TRIM_THRESHOLD_BYTES: usize = 4 << 30;

/// What [`keep_freed_buffers`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeapTuning {
    /// Both thresholds set.
    Applied,
    /// `GLIBC_TUNABLES` already sets malloc parameters; they were left as given.
    LeftToUser(String),
    /// Not glibc: nothing to set.
    Unsupported,
    /// glibc refused a setting (the name of the one refused).
    Refused(&'static str),
}

impl std::fmt::Display for HeapTuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeapTuning::Applied => write!(
                f,
                "freed tensor memory kept in the heap (mmap threshold {} MiB, trim threshold {} MiB)",
                MMAP_THRESHOLD_BYTES >> 20,
                TRIM_THRESHOLD_BYTES >> 20
            ),
            HeapTuning::LeftToUser(t) => write!(f, "heap left to GLIBC_TUNABLES={t}"),
            HeapTuning::Unsupported => write!(f, "heap not tuned (not glibc)"),
            HeapTuning::Refused(what) => write!(f, "heap not tuned: glibc refused {what}"),
        }
    }
}

/// Whether a `GLIBC_TUNABLES` value sets any malloc parameter (then
/// [`keep_freed_buffers`] leaves the heap to it).
pub fn sets_malloc(tunables: &str) -> bool {
    tunables
        .split(':')
        .any(|t| t.trim_start().starts_with("glibc.malloc."))
}

/// Keeps freed tensor memory in the process's heap for the next pass (see the module's
/// text); call at start, before the first model runs. The first call decides; later calls
/// return what it did (for a report such as the bench's header).
pub fn keep_freed_buffers() -> HeapTuning {
    static DONE: std::sync::OnceLock<HeapTuning> = std::sync::OnceLock::new();
    DONE.get_or_init(|| match std::env::var("GLIBC_TUNABLES") {
        Ok(t) if sets_malloc(&t) => HeapTuning::LeftToUser(t),
        _ => set_thresholds(),
    })
    .clone()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> HeapTuning {
    // Safety: mallopt only changes the allocator's parameters; it is thread-safe in glibc
    // (it takes each arena's lock) and returns 0 on a value it does not take.
    let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as i32) };
    if mmap == 0 {
        return HeapTuning::Refused("M_MMAP_THRESHOLD");
    }
    let trim = i32::try_from(TRIM_THRESHOLD_BYTES).unwrap_or(i32::MAX);
    // Safety: as above.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, trim) } == 0 {
        return HeapTuning::Refused("M_TRIM_THRESHOLD");
    }
    HeapTuning::Applied
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> HeapTuning {
    HeapTuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_malloc_tunables_count_as_the_users_choice() {
        assert!(sets_malloc("glibc.malloc.mmap_threshold=1048576"));
        assert!(sets_malloc(
            "glibc.cpu.hwcaps=-AVX512F:glibc.malloc.trim_threshold=0"
        ));
        assert!(!sets_malloc("glibc.cpu.hwcaps=-AVX512F"));
        assert!(!sets_malloc(""));
    }
}
