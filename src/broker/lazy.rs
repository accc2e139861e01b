//! Collections sized for what 10,000 sessions each hold: nothing, or one thing (issue 17
//! item 1).
//!
//! A gateway keeps ~10,000 sessions, and nearly all of them are offline or idle: their
//! in-flight window, in-memory queue, held output and gated publishers are empty. Inline,
//! an empty `VecDeque` is 32 bytes and an empty `Vec` 24, in every session. [`Lazy`] keeps
//! the collection behind an `Option<Box<_>>`: 8 bytes while it is `None`.
//!
//! Most sessions also hold exactly one subscription, and most topics of the tree exactly
//! one subscriber. [`Few`] keeps a single element inline and only a second one moves them
//! all to a `Vec`: no allocation (and no allocator header) for the one.
//!
//! Invariants of [`Few`]: it is `One` exactly when it holds one element and `Many` only
//! with two or more; [`Few::as_slice`] shows the elements in insertion-position order
//! whatever the variant.
//!
//! Invariants of [`Lazy`]:
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

/// A short sequence that keeps one element inline (see the module doc). `Many` is boxed:
/// so the enum is no larger than `T` when `T` has a niche (a `Box<str>` key; a `Vec`
/// inline would make it 8 bytes larger).
#[allow(
    clippy::box_collection,
    reason = "boxed so that the enum is as large as one element, not larger"
)]
#[derive(Debug, Clone, Default)]
pub enum Few<T> {
    #[default]
    None,
    One(T),
    Many(Box<Vec<T>>),
}

impl<T> Few<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            Few::None => &[],
            Few::One(x) => std::slice::from_ref(x),
            Few::Many(v) => v.as_slice(),
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        match self {
            Few::None => &mut [],
            Few::One(x) => std::slice::from_mut(x),
            Few::Many(v) => v.as_mut_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Few::None)
    }

    /// Inserts at position `i` (`i <= len`). A `Vec` grows by half, not to 4 at once:
    /// sets of a few stay close to their size.
    pub fn insert(&mut self, i: usize, x: T) {
        match std::mem::take(self) {
            Few::None => *self = Few::One(x),
            Few::One(y) => {
                let mut v = Vec::with_capacity(2);
                v.push(y);
                v.insert(i.min(1), x);
                *self = Few::Many(Box::new(v));
            }
            Few::Many(mut v) => {
                if v.len() == v.capacity() {
                    v.reserve_exact(v.len() / 2 + 1);
                }
                v.insert(i.min(v.len()), x);
                *self = Few::Many(v);
            }
        }
    }

    /// Appends at the end.
    pub fn push(&mut self, x: T) {
        self.insert(self.len(), x);
    }

    /// Removes and returns the element at `i`, `None` past the end. The last one left goes
    /// back inline; a `Vec` a quarter full gives its spare room back.
    pub fn remove(&mut self, i: usize) -> Option<T> {
        if i >= self.len() {
            return None;
        }
        match std::mem::take(self) {
            Few::None => None,
            Few::One(x) => Some(x),
            Few::Many(mut v) => {
                let x = v.remove(i);
                if v.len() == 1 {
                    let mut v = *v;
                    *self = v.pop().map_or(Few::None, Few::One);
                } else {
                    if v.len() < v.capacity() / 4 {
                        v.shrink_to_fit();
                    }
                    *self = Few::Many(v);
                }
                Some(x)
            }
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.as_slice().iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.as_mut_slice().iter_mut()
    }
}

impl<'a, T> IntoIterator for &'a Few<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
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

    #[test]
    fn few_keeps_one_element_inline_and_orders_like_a_vec() {
        let mut f: Few<(Box<str>, u32)> = Few::default();
        assert_eq!(std::mem::size_of_val(&f), 32, "no larger than one element");
        assert!(f.is_empty() && f.as_slice().is_empty() && f.remove(0).is_none());
        f.insert(0, ("b".into(), 2));
        assert!(matches!(f, Few::One(_)), "one element is kept inline");
        f.insert(0, ("a".into(), 1));
        f.push(("d".into(), 4));
        f.insert(2, ("c".into(), 3));
        let keys =
            |f: &Few<(Box<str>, u32)>| f.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>();
        assert_eq!(keys(&f), ["a", "b", "c", "d"]);
        f.as_mut_slice()[3].1 = 40;
        assert_eq!((f.len(), f.as_slice()[3].1), (4, 40));
        assert_eq!(f.remove(9), None);
        assert_eq!(f.remove(0).map(|x| x.1), Some(1));
        assert_eq!(f.remove(1).map(|x| x.1), Some(3));
        assert_eq!(keys(&f), ["b", "d"]);
        assert_eq!(f.remove(0).map(|x| x.1), Some(2));
        assert!(matches!(f, Few::One(_)), "the last one goes back inline");
        assert_eq!(f.remove(0).map(|x| x.1), Some(40));
        assert!(f.is_empty() && matches!(f, Few::None));
    }
}
