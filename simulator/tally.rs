//! A crash-proof tally: the counters that must survive `kill -9` live in a small shared memory
//! mapping of a file. Every increment lands in the page cache at once, so when a simulator is
//! killed its agent reads the exact totals from the file instead of losing the last second
//! between two metric lines.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Slots of the file, each a native-endian u64; the agent reads the same layout, and which
/// counter has which slot is in the counter table (`vtox::counters`).
use vtox::metrics::TALLY_SLOTS;

pub struct Tally {
    cells: &'static [AtomicU64],
}

impl Tally {
    /// Maps `path` (created or truncated) as the tally; None where that is not possible, in
    /// which case the run goes on without it.
    pub fn create(path: &Path) -> Option<Tally> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .ok()?;
        let len = TALLY_SLOTS * 8;
        file.set_len(len as u64).ok()?;
        // SAFETY: a fresh shared mapping of a file we just sized; the pointer is page aligned
        // (so aligned for AtomicU64), stays valid for the life of the process (never unmapped,
        // hence 'static), and is only accessed through atomics.
        let cells = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            std::slice::from_raw_parts(p as *const AtomicU64, TALLY_SLOTS)
        };
        Some(Tally { cells })
    }
}

impl vtox::counters::TallySink for Tally {
    fn add(&self, slot: usize, n: u64) {
        if let Some(c) = self.cells.get(slot) {
            c.fetch_add(n, Relaxed);
        }
    }
}
