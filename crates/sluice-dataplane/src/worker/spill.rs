//! Bytes of stalled directions, moved out of the worker's buffer pool.
//!
//! A send toward a peer that does not read stays in flight until the peer takes every byte, and
//! the chunks of its direction hold their pool buffers all that time: a few thousand such
//! directions held a worker's whole pool, and every other connection of the worker waited for a
//! buffer (`tests/fault_stalled_readers.rs`). When the pool runs low the worker stops those
//! sends and copies the unsent bytes of their chunks here (`Conn::rehome`); the pool buffers go
//! back. A spilled chunk is written with a non-blocking `send(2)` when its socket is writable
//! (as a pipe is spliced) and freed once sent; the direction's next chunks take pool buffers
//! again.
//!
//! A connection queues at most two chunks per direction, each at most one pool buffer, so its
//! spill holds at most four chunks of at most 16 KiB: memory per connection stays bounded, on
//! the heap rather than in the pool every connection of the worker draws on.

/// Identifies a spilled chunk within its connection's [`Spill`].
pub(crate) type SpillId = u8;

/// Two chunks per direction (the `Conn`'s queue bound), both directions.
const CHUNKS_MAX: usize = 4;

/// A connection's spilled chunks.
#[derive(Debug, Default)]
pub(crate) struct Spill {
    chunks: [Option<Box<[u8]>>; CHUNKS_MAX],
}

impl Spill {
    /// Keeps a copy of `bytes` as a new chunk; `None` when the connection already has
    /// `CHUNKS_MAX` (the caller's invariant broke: the bytes then stay where they are).
    pub(crate) fn store(&mut self, bytes: &[u8]) -> Option<SpillId> {
        let (id, free) = self
            .chunks
            .iter_mut()
            .enumerate()
            .find(|(_, chunk)| chunk.is_none())?;
        *free = Some(bytes.into());
        Some(id as SpillId)
    }

    /// The bytes of chunk `id` (empty for an id not in use).
    pub(crate) fn bytes(&self, id: SpillId) -> &[u8] {
        self.chunks
            .get(usize::from(id))
            .and_then(Option::as_deref)
            .unwrap_or(&[])
    }

    /// Frees chunk `id`: every byte of it was sent, or it will never be.
    pub(crate) fn release(&mut self, id: SpillId) {
        if let Some(chunk) = self.chunks.get_mut(usize::from(id)) {
            *chunk = None;
        }
    }

    /// Chunks held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.chunks.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_copies_and_their_places_are_reused() {
        let mut spill = Spill::default();
        let ids: Vec<SpillId> = (0..4u8)
            .map(|i| spill.store(&[i; 3]).expect("room for four"))
            .collect();
        assert_eq!(spill.store(b"fifth"), None);
        assert_eq!(spill.bytes(ids[2]), &[2, 2, 2]);
        spill.release(ids[1]);
        assert_eq!(spill.bytes(ids[1]), b"");
        assert_eq!(spill.store(b"again"), Some(ids[1]));
        assert_eq!(spill.bytes(ids[1]), b"again");
        assert_eq!(spill.held(), 4);
        spill.release(200);
        assert_eq!(spill.bytes(200), b"");
    }
}
