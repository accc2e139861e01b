//! Collections that cost one pointer while they hold nothing (issue 17 item 1).
//!
//! A gateway keeps ~10,000 sessions, and nearly all of them are offline or idle: their
//! in-flight window, in-memory queue, held output and gated publishers are empty. Inline,
//! an empty `VecDeque` is 32 bytes and an empty `Vec` 24, in every session. [`Lazy`] keeps
//! the collection behind an `Option<Box<_>>`: 8 bytes while it is `None`.
//!
//! Invariants:
//! - reading an empty `Lazy` (`Deref`) never allocates: it shows a shared empty collection;
//! - a mutable access through `DerefMut` allocates the box (a few bytes, no elements);
//!   the methods that only take or remove elements (`clear`, `retain`, `pop_front`,
//!   `iter_mut`, `take`, ...) are inherent here and never allocate;
//! - [`Lazy::release_if_empty`] frees the box (and the elements' buffer) of an empty
//!   collection: the session calls it when it goes idle (`Session::shrink_idle`), so a
//!   burst's memory does not stay behind in 10,000 sessions.

use std::collections::{vec_deque, VecDeque};
use std::fmt;
use std::ops::{Deref, DerefMut};

/// A collection with a shared empty value to show while none is allocated.
pub trait EmptyValue: Default + 'static {
    const EMPTY: &'static Self;
    fn is_empty_value(&self) -> bool;
}

impl<T: 'static> EmptyValue for VecDeque<T> {
    const EMPTY: &'static Self = &VecDeque::new();
    fn is_empty_value(&self) -> bool {
        self.is_empty()
    }
}

impl<T: 'static> EmptyValue for Vec<T> {
    const EMPTY: &'static Self = &Vec::new();
    fn is_empty_value(&self) -> bool {
        self.is_empty()
    }
}

/// A collection allocated on its first mutable use (see the module doc).
#[allow(
    clippy::box_collection,
    reason = "boxed for its size inline (8 bytes, not 24-32)"
)]
pub struct Lazy<C>(Option<Box<C>>);

impl<C> Default for Lazy<C> {
    fn default() -> Self {
        Lazy(None)
    }
}

impl<C: EmptyValue> Lazy<C> {
    /// Whether a box is allocated (even an empty one).
    pub fn is_allocated(&self) -> bool {
        self.0.is_some()
    }

    /// Frees the memory of an empty collection.
    pub fn release_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|c| c.is_empty_value()) {
            self.0 = None;
        }
    }

    /// Takes the whole collection out, leaving nothing allocated.
    pub fn take(&mut self) -> C {
        self.0.take().map(|b| *b).unwrap_or_default()
    }

    /// Empties it and frees its memory.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

impl<C: EmptyValue> Deref for Lazy<C> {
    type Target = C;
    fn deref(&self) -> &C {
        self.0.as_deref().unwrap_or(C::EMPTY)
    }
}

impl<C: EmptyValue> DerefMut for Lazy<C> {
    fn deref_mut(&mut self) -> &mut C {
        self.0.get_or_insert_with(Default::default)
    }
}

impl<C: EmptyValue + fmt::Debug> fmt::Debug for Lazy<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<C: EmptyValue + FromIterator<T>, T> FromIterator<T> for Lazy<C> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut l = Lazy(Some(Box::new(iter.into_iter().collect::<C>())));
        l.release_if_empty();
        l
    }
}

/// The removing and mutating methods of a deque that need no allocation when it is empty.
impl<T: 'static> Lazy<VecDeque<T>> {
    pub fn pop_front(&mut self) -> Option<T> {
        self.0.as_mut().and_then(|d| d.pop_front())
    }

    pub fn pop_back(&mut self) -> Option<T> {
        self.0.as_mut().and_then(|d| d.pop_back())
    }

    pub fn remove(&mut self, i: usize) -> Option<T> {
        self.0.as_mut().and_then(|d| d.remove(i))
    }

    pub fn front_mut(&mut self) -> Option<&mut T> {
        self.0.as_mut().and_then(|d| d.front_mut())
    }

    pub fn retain(&mut self, f: impl FnMut(&T) -> bool) {
        if let Some(d) = self.0.as_mut() {
            d.retain(f);
        }
    }

    pub fn retain_mut(&mut self, f: impl FnMut(&mut T) -> bool) {
        if let Some(d) = self.0.as_mut() {
            d.retain_mut(f);
        }
    }

    pub fn iter_mut(&mut self) -> IterMut<'_, T> {
        self.0.iter_mut().flat_map(|d| d.iter_mut())
    }
}

/// Mutable iteration over a [`Lazy`] deque (nothing to allocate when it is empty).
pub type IterMut<'a, T> = std::iter::FlatMap<
    std::option::IterMut<'a, Box<VecDeque<T>>>,
    vec_deque::IterMut<'a, T>,
    fn(&'a mut Box<VecDeque<T>>) -> vec_deque::IterMut<'a, T>,
>;

impl<'a, T: 'static> IntoIterator for &'a Lazy<VecDeque<T>> {
    type Item = &'a T;
    type IntoIter = vec_deque::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        (**self).iter()
    }
}

impl<'a, T: 'static> IntoIterator for &'a mut Lazy<VecDeque<T>> {
    type Item = &'a mut T;
    type IntoIter = IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_one_is_one_pointer_and_reading_it_allocates_nothing() {
        assert_eq!(std::mem::size_of::<Lazy<VecDeque<[u64; 4]>>>(), 8);
        assert_eq!(std::mem::size_of::<Lazy<Vec<u64>>>(), 8);
        let mut d: Lazy<VecDeque<u32>> = Lazy::default();
        assert!(d.is_empty() && d.iter().next().is_none() && d.front().is_none());
        assert_eq!(
            (d.pop_front(), d.remove(0), d.front_mut()),
            (None, None, None)
        );
        d.retain(|_| true);
        assert_eq!(d.iter_mut().count(), 0);
        assert_eq!((&mut d).into_iter().count(), 0);
        d.clear();
        assert!(!d.is_allocated(), "reading or emptying allocated the deque");
        let v: Lazy<Vec<u32>> = Vec::new().into_iter().collect();
        assert!(!v.is_allocated());
    }

    #[test]
    fn it_behaves_like_the_collection_and_gives_its_memory_back_when_empty() {
        let mut d: Lazy<VecDeque<u32>> = (1..=3).collect();
        d.push_back(4);
        for x in &mut d {
            *x *= 10;
        }
        d.retain(|x| *x != 20);
        assert_eq!(d.iter().copied().collect::<Vec<_>>(), [10, 30, 40]);
        assert_eq!((d[1], d.len(), d.pop_front()), (30, 3, Some(10)));
        d.release_if_empty();
        assert!(
            d.is_allocated(),
            "released a deque that still holds elements"
        );
        while d.pop_front().is_some() {}
        assert!(d.is_allocated(), "the box is kept across a burst");
        d.release_if_empty();
        assert!(!d.is_allocated());

        let mut v: Lazy<Vec<u64>> = Lazy::default();
        v.push(7);
        assert!(v.contains(&7));
        assert_eq!(v.take(), vec![7]);
        assert!(!v.is_allocated() && v.is_empty());
    }
}
