//! `heap::keep_freed_buffers` on the real glibc: in a test binary of its own, because the
//! check reads the process's allocator statistics, which tests running beside it would move.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn after_tuning_a_large_buffer_comes_from_the_heap_not_from_mmap() {
    use pcb_vision::heap::{keep_freed_buffers, sets_malloc, HeapTuning};
    if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
        if sets_malloc(&t) {
            // The user's tunables win by design; the call must then leave them alone.
            assert!(matches!(keep_freed_buffers(), HeapTuning::LeftToUser(_)));
            return;
        }
    }
    // Untuned, glibc mmaps a 16 MiB block (above its 128 KiB starting threshold) and
    // counts it in `hblkhd`; tuned, the block comes from the heap, counted in `uordblks`.
    let mmapped = |bytes: usize| {
        // Safety: mallinfo2 only reads the allocator's counters.
        let before = unsafe { libc::mallinfo2() };
        let block = vec![1u8; bytes];
        let during = unsafe { libc::mallinfo2() };
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), bytes);
        (
            during.hblkhd - before.hblkhd,
            during.uordblks as isize - before.uordblks as isize,
        )
    };
    let (untuned_mmap, _) = mmapped(16 << 20);
    assert!(
        untuned_mmap >= 16 << 20,
        "glibc's default should mmap 16 MiB: {untuned_mmap}"
    );
    assert_eq!(keep_freed_buffers(), HeapTuning::Applied);
    let (tuned_mmap, tuned_heap) = mmapped(16 << 20);
    assert_eq!(tuned_mmap, 0, "the tuned allocator still mmapped the block");
    assert!(
        tuned_heap >= 16 << 20,
        "heap in use grew by {tuned_heap} only"
    );
    // Called again, it reports what the first call did.
    assert_eq!(keep_freed_buffers(), HeapTuning::Applied);
}
