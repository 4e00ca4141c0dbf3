//! A fixed-capacity, allocation-free queue of received chunks waiting to be sent.

/// Bytes received into one buffer and not yet fully sent: `buf[offset..offset + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<B> {
    pub buf: B,
    pub offset: u32,
    pub len: u32,
}

/// How many chunks a direction may hold: one being sent plus one received ahead. This bounds
/// the memory of a connection to `2 x QUEUE_CAPACITY` buffers whatever its peers do.
pub const QUEUE_CAPACITY: usize = 2;

#[derive(Debug)]
pub(crate) struct ChunkQueue<B> {
    slots: [Option<Chunk<B>>; QUEUE_CAPACITY],
    head: usize,
    len: usize,
}

impl<B: Copy> ChunkQueue<B> {
    pub(crate) fn new() -> Self {
        ChunkQueue {
            slots: [None; QUEUE_CAPACITY],
            head: 0,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len == QUEUE_CAPACITY
    }

    /// Appends a chunk; returns it back when the queue is full (the caller's invariant broke).
    pub(crate) fn push(&mut self, chunk: Chunk<B>) -> Result<(), Chunk<B>> {
        if self.is_full() {
            return Err(chunk);
        }
        self.slots[(self.head + self.len) % QUEUE_CAPACITY] = Some(chunk);
        self.len += 1;
        Ok(())
    }

    pub(crate) fn front(&self) -> Option<Chunk<B>> {
        if self.is_empty() {
            None
        } else {
            self.slots[self.head]
        }
    }

    pub(crate) fn front_mut(&mut self) -> Option<&mut Chunk<B>> {
        if self.is_empty() {
            None
        } else {
            self.slots[self.head].as_mut()
        }
    }

    /// Every chunk, front first.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Chunk<B>> {
        let (wrapped, from_head) = self.slots.split_at_mut(self.head);
        from_head
            .iter_mut()
            .chain(wrapped.iter_mut())
            .take(self.len)
            .flatten()
    }

    pub(crate) fn pop(&mut self) -> Option<Chunk<B>> {
        if self.is_empty() {
            return None;
        }
        let chunk = self.slots[self.head].take();
        self.head = (self.head + 1) % QUEUE_CAPACITY;
        self.len -= 1;
        chunk
    }
}
