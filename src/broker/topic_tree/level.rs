//! A topic level as a key of the topic tree (issue 17 item 1): up to [`INLINE`] bytes kept
//! in place, longer ones boxed.
//!
//! Sensor topics are made of short levels ("site-3", "temperature", a device number). As a
//! `Box<str>` every key was one more allocation per node of the tree: a 32-byte malloc
//! chunk each, 0.3 MiB at 10,000 topics, for 8 bytes saved in the entry.
//!
//! Keys are compared and hashed as bytes (they are only ever built from a `&str`).

/// Bytes kept in place: the entry is 24 bytes either way (a tag, a length and 22 bytes, or
/// a tag and a boxed slice).
pub(super) const INLINE: usize = 22;

#[derive(Debug)]
pub(super) enum Level {
    Inline { len: u8, bytes: [u8; INLINE] },
    Boxed(Box<[u8]>),
}

impl Level {
    pub(super) fn new(level: &str) -> Level {
        let b = level.as_bytes();
        match u8::try_from(b.len()) {
            Ok(len) if b.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..b.len()].copy_from_slice(b);
                Level::Inline { len, bytes }
            }
            _ => Level::Boxed(b.into()),
        }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            Level::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Level::Boxed(b) => b,
        }
    }

    /// What the key holds on the heap, as glibc's malloc counts it (0 when in place).
    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Level::Inline { .. } => 0,
            Level::Boxed(b) if b.is_empty() => 0,
            Level::Boxed(b) => (b.len() + 8).next_multiple_of(16).max(32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_levels_stay_in_place_and_long_ones_are_boxed() {
        assert_eq!(std::mem::size_of::<Level>(), 24);
        for s in ["", "a", "temperature", "0123456789abcdefghijkl"] {
            let l = Level::new(s);
            assert!(matches!(l, Level::Inline { .. }), "{s:?}");
            assert_eq!(l.as_bytes(), s.as_bytes());
        }
        let long = "0123456789abcdefghijklm";
        let l = Level::new(long);
        assert!(matches!(l, Level::Boxed(_)));
        assert_eq!(l.as_bytes(), long.as_bytes());
        assert_eq!(Level::new("ä€").as_bytes(), "ä€".as_bytes());
    }
}
