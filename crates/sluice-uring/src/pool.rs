//! The provided-buffer ring: a pool of equal buffers the kernel picks from at receive time, so
//! that an idle connection holds no buffer.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// A registered buffer ring (`IORING_REGISTER_PBUF_RING`) and the memory of its buffers.
///
/// Buffer ids are `0..count`. A buffer is the kernel's while it sits in the ring; it is the
/// caller's from the completion that names it until [`BufferPool::recycle`] gives it back.
///
/// The kernel consumes a buffer ring in FIFO order, so every buffer in the ring gets touched
/// (and counts in RSS) as traffic cycles through it. To keep the working set proportional to
/// the load rather than to the pool, only `ring_initial` buffers start in the ring; the rest
/// wait in `reserve` (never touched) and [`BufferPool::top_up`] moves them into the ring only
/// when it runs low.
pub struct BufferPool {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    memory: NonNull<u8>,
    memory_len: usize,
    buffer_size: u32,
    count: u16,
    tail: u16,
    free: u32,
    group: u16,
    /// Buffer ids never handed to the kernel yet (untouched memory).
    reserve: Vec<u16>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("buffer_size", &self.buffer_size)
            .field("count", &self.count)
            .field("free", &self.free)
            .finish()
    }
}

const PAGE: usize = 4096;

impl BufferPool {
    /// Allocates `count` (a power of two, at most 32768) buffers of `buffer_size` bytes. The
    /// buffers are an anonymous private mapping: the kernel provides zeroed pages on first
    /// touch, so untouched buffers cost no RSS. (The global allocator is not used for them:
    /// a page-aligned `alloc_zeroed` is `posix_memalign` plus `memset`, which touches every
    /// page at start.)
    pub(crate) fn new(count: u16, buffer_size: u32, group: u16) -> Self {
        // Ids come out of the reserve from the top: keep the low ids first in line.
        let reserve = (0..count).rev().collect();
        assert!(
            count.is_power_of_two() && count <= 32768,
            "buffer count must be a power of two"
        );
        let entries_layout =
            Layout::from_size_align(size_of::<BufRingEntry>() * count as usize, PAGE)
                .expect("ring entry layout is valid: small size, page alignment");
        let memory_len = buffer_size as usize * count as usize;
        // SAFETY: the layout has a non-zero size (count >= 1) and a valid alignment.
        let entries = unsafe { alloc_zeroed(entries_layout) } as *mut BufRingEntry;
        let Some(entries) = NonNull::new(entries) else {
            std::alloc::handle_alloc_error(entries_layout);
        };
        // SAFETY: a fresh anonymous private mapping: no address hint, no fd; the length is
        // non-zero (count >= 1, buffer_size >= 1 checked by `Uring::new`).
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                memory_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let memory = if mapped == libc::MAP_FAILED {
            None
        } else {
            NonNull::new(mapped as *mut u8)
        };
        let Some(memory) = memory else {
            // SAFETY: `entries` came from `alloc_zeroed` with this layout and is not used after.
            unsafe { dealloc(entries.as_ptr() as *mut u8, entries_layout) };
            std::alloc::handle_alloc_error(
                Layout::from_size_align(memory_len, PAGE).unwrap_or(entries_layout),
            );
        };
        BufferPool {
            entries,
            entries_layout,
            memory,
            memory_len,
            buffer_size,
            count,
            tail: 0,
            free: 0,
            group,
            reserve,
        }
    }

    /// The address of the ring entries, for registration.
    pub(crate) fn ring_addr(&self) -> u64 {
        self.entries.as_ptr() as u64
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    pub fn buffer_size(&self) -> u32 {
        self.buffer_size
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// Buffers currently in the ring (available to receives).
    pub fn free(&self) -> u32 {
        self.free
    }

    /// Buffers never used yet, kept out of the ring.
    pub fn reserve(&self) -> usize {
        self.reserve.len()
    }

    /// Moves buffers from the reserve into the ring until it holds at least `low` (or the
    /// reserve is empty). Called once after registration and after every completion batch.
    pub fn top_up(&mut self, low: u32) {
        let mut pushed = false;
        while self.free < low {
            let Some(id) = self.reserve.pop() else { break };
            self.push(id);
            pushed = true;
        }
        if pushed {
            self.publish();
        }
    }

    /// Gives buffer `id` back to the kernel. The caller must own it (it came in a completion
    /// and no operation still uses it); giving back a buffer twice corrupts streams.
    pub fn recycle(&mut self, id: u16) {
        debug_assert!(id < self.count);
        self.push(id);
        self.publish();
    }

    /// The address of byte `offset` of buffer `id`.
    pub(crate) fn addr(&self, id: u16, offset: u32) -> *const u8 {
        debug_assert!(id < self.count && offset <= self.buffer_size);
        let at = id as usize * self.buffer_size as usize + offset as usize;
        // SAFETY: `at` is within the allocation: id < count and offset <= buffer_size.
        unsafe { self.memory.as_ptr().add(at.min(self.memory_len)) }
    }

    /// The first `len` bytes of buffer `id` (at most the buffer size). Only for a buffer the
    /// caller owns: a completion named it, so the kernel has finished writing it.
    pub(crate) fn bytes(&self, id: u16, len: u32) -> &[u8] {
        if id >= self.count {
            return &[];
        }
        let len = len.min(self.buffer_size) as usize;
        // SAFETY: the range lies within buffer `id` of the mapping (id < count, len <= size);
        // the mapping is readable and lives as long as `self`; the kernel no longer writes a
        // buffer once a completion has handed it to the caller.
        unsafe { std::slice::from_raw_parts(self.addr(id, 0), len) }
    }

    /// Takes note that the kernel consumed one buffer (a completion named it).
    pub(crate) fn taken(&mut self) {
        self.free = self.free.saturating_sub(1);
    }

    fn push(&mut self, id: u16) {
        let mask = self.count - 1;
        let index = (self.tail & mask) as usize;
        // SAFETY: index < count, so the entry is within the ring allocation; the kernel only
        // reads entries between its head and our published tail, and this one lies beyond the
        // published tail until `publish`.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        entry.set_addr(self.addr(id, 0) as u64);
        entry.set_len(self.buffer_size);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.free += 1;
    }

    fn publish(&self) {
        // SAFETY: `entries` points to the first entry of the ring, which is initialised
        // (zeroed at allocation); the tail field overlays the first entry's `resv` field, and a
        // u16 at that address is 2-aligned, as AtomicU16 requires.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: `entries` came from `alloc_zeroed` with this layout and `memory` from `mmap`
        // with this length. `Uring` drops its ring before its pool, so the kernel no longer
        // references either.
        unsafe {
            dealloc(self.entries.as_ptr() as *mut u8, self.entries_layout);
            libc::munmap(self.memory.as_ptr().cast(), self.memory_len);
        }
    }
}
