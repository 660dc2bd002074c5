//! A plain page bitmap, one bit per guest page.

/// A fixed-size bitmap of pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl Bitmap {
    /// A bitmap of `len` bits, all clear.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    /// A bitmap of `len` bits, all set.
    pub fn full(len: u64) -> Self {
        let mut b = Self {
            words: vec![u64::MAX; len.div_ceil(64) as usize],
            len,
            ones: len,
        };
        b.trim();
        b
    }

    fn trim(&mut self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The words, bit `i` is bit `i % 64` of word `i / 64`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// ORs `words` into the bitmap starting at word `base` (bits past `len` are dropped).
    pub fn or_words(&mut self, base: usize, words: &[u64]) {
        for (w, o) in self.words.iter_mut().skip(base).zip(words) {
            self.ones += u64::from((o & !*w).count_ones());
            *w |= o;
        }
        let before = self.words.last().copied();
        self.trim();
        if let (Some(b), Some(a)) = (before, self.words.last()) {
            self.ones -= u64::from((b & !a).count_ones());
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`.
    pub fn set(&mut self, i: u64) {
        assert!(i < self.len, "bit {i} outside bitmap of {}", self.len);
        let w = &mut self.words[(i / 64) as usize];
        self.ones += u64::from(*w & (1 << (i % 64)) == 0);
        *w |= 1 << (i % 64);
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            let w = &mut self.words[(i / 64) as usize];
            self.ones -= u64::from(*w & (1 << (i % 64)) != 0);
            *w &= !(1 << (i % 64));
        }
    }

    /// Number of set bits (kept up to date, O(1)).
    pub fn count(&self) -> u64 {
        self.ones
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
        self.ones = 0;
    }

    /// `self |= other & mask`, returning how many bits became newly set.
    pub fn or_masked(&mut self, other: &Bitmap, mask: &Bitmap) -> u64 {
        let mut added = 0;
        for ((w, o), m) in self.words.iter_mut().zip(&other.words).zip(&mask.words) {
            let new = o & m & !*w;
            added += u64::from(new.count_ones());
            *w |= new;
        }
        self.ones += added;
        added
    }

    /// Moves the bits of `self` that are also in `mask` into `to`: `to |= self & mask`,
    /// `self &= !mask`. Returns how many moved.
    pub fn move_masked(&mut self, mask: &Bitmap, to: &mut Bitmap) -> u64 {
        let mut moved = 0;
        let words = self.words.iter_mut().zip(&mask.words).zip(&mut to.words);
        for ((w, m), t) in words {
            let bits = *w & m;
            *w &= !bits;
            let newly = bits & !*t;
            *t |= bits;
            moved += u64::from(bits.count_ones());
            to.ones += u64::from(newly.count_ones());
        }
        self.ones -= moved;
        moved
    }

    /// Moves the pages a harvest found `written` into the dirty groups: pages that were
    /// `sent` and are in neither group yet join `hot` if they were `resent` during the epoch
    /// (written again within an epoch of being resent), else `cold`. Returns how many joined.
    pub fn harvest_into(
        written: &Bitmap,
        sent: &Bitmap,
        resent: &Bitmap,
        cold: &mut Bitmap,
        hot: &mut Bitmap,
    ) -> u64 {
        let mut added = 0;
        let words = written
            .words
            .iter()
            .zip(&sent.words)
            .zip(&resent.words)
            .zip(cold.words.iter_mut().zip(hot.words.iter_mut()));
        let (mut to_cold, mut to_hot) = (0u64, 0u64);
        for (((w, s), r), (c, h)) in words {
            let new = newly_dirty(*w, *s, *c, *h);
            let new_hot = new & r;
            let new_cold = new & !r;
            *h |= new_hot;
            *c |= new_cold;
            to_hot += u64::from(new_hot.count_ones());
            to_cold += u64::from(new_cold.count_ones());
            added += u64::from(new.count_ones());
        }
        cold.ones += to_cold;
        hot.ones += to_hot;
        added
    }

    /// How many pages [`Bitmap::harvest_into`] would move into the dirty groups.
    pub fn count_newly_dirty(written: &Bitmap, sent: &Bitmap, cold: &Bitmap, hot: &Bitmap) -> u64 {
        let words = written
            .words
            .iter()
            .zip(&sent.words)
            .zip(cold.words.iter().zip(&hot.words));
        words
            .map(|((w, s), (c, h))| u64::from(newly_dirty(*w, *s, *c, *h).count_ones()))
            .sum()
    }

    /// Finds, clears and returns up to `max` set bits at or after `*cursor`, wrapping around
    /// once; `*cursor` moves past the last bit taken so repeated calls sweep the bitmap.
    pub fn take(&mut self, cursor: &mut u64, max: usize, out: &mut Vec<u64>) -> usize {
        let mut taken = 0;
        if self.ones == 0 || max == 0 {
            return 0;
        }
        let nwords = self.words.len();
        let start_word = ((*cursor % self.len) / 64) as usize;
        for step in 0..=nwords {
            let wi = (start_word + step) % nwords;
            let mut w = self.words[wi];
            if step == 0 {
                // Only bits at or after the cursor on the first word; the rest on wrap.
                w &= u64::MAX << (*cursor % 64);
            }
            while w != 0 && taken < max {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let i = wi as u64 * 64 + bit;
                self.words[wi] &= !(1 << bit);
                self.ones -= 1;
                out.push(i);
                taken += 1;
                *cursor = i + 1;
            }
            if taken == max {
                break;
            }
        }
        taken
    }

    /// Iterates over the set bits in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(wi, &w)| word_ones(wi, w))
    }
}

/// Of a word of pages, those `written` and `sent` that are in neither dirty group.
fn newly_dirty(written: u64, sent: u64, cold: u64, hot: u64) -> u64 {
    written & sent & !cold & !hot
}

/// The indices of the bits set in `w`, word `wi` of a bitmap, in ascending order.
pub fn word_ones(wi: usize, mut w: u64) -> impl Iterator<Item = u64> {
    std::iter::from_fn(move || {
        if w == 0 {
            return None;
        }
        let b = w.trailing_zeros() as u64;
        w &= w - 1;
        Some(wi as u64 * 64 + b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A bitmap of `len` bits with those in `set` set.
    fn bitmap_of(len: u64, set: &std::collections::BTreeSet<u64>) -> Bitmap {
        let mut b = Bitmap::new(len);
        for &i in set {
            b.set(i);
        }
        b
    }

    #[test]
    fn full_is_trimmed() {
        let b = Bitmap::full(70);
        assert_eq!(b.count(), 70);
        assert!(b.get(69));
        assert!(!b.get(70));
    }

    proptest! {
        /// Repeated `take` from any cursor returns every set bit exactly once.
        #[test]
        fn take_covers_every_bit_once(bits in proptest::collection::btree_set(0u64..1000, 0..300),
                                      cursor in 0u64..1000, chunk in 1usize..130) {
            let mut b = Bitmap::new(1000);
            for &i in &bits { b.set(i); }
            prop_assert_eq!(b.count(), bits.len() as u64);
            let mut cur = cursor;
            let mut got = Vec::new();
            while b.take(&mut cur, chunk, &mut got) > 0 {}
            got.sort_unstable();
            prop_assert_eq!(got, bits.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(b.count(), 0);
            prop_assert!(b.words().iter().all(|&w| w == 0));
        }
    }

    proptest! {
        /// `move_masked` moves exactly the bits in both, and both counts stay true.
        #[test]
        fn move_masked_moves_what_the_mask_shows(
            from in proptest::collection::btree_set(0u64..300, 0..200),
            mask in proptest::collection::btree_set(0u64..300, 0..200),
            to in proptest::collection::btree_set(0u64..300, 0..100),
        ) {
            let map = |s| bitmap_of(300, s);
            let (mut f, m, mut t) = (map(&from), map(&mask), map(&to));
            let moved = f.move_masked(&m, &mut t);
            prop_assert_eq!(moved, from.intersection(&mask).count() as u64);
            for i in 0..300 {
                prop_assert_eq!(f.get(i), from.contains(&i) && !mask.contains(&i));
                prop_assert_eq!(t.get(i), to.contains(&i) || from.contains(&i) && mask.contains(&i));
            }
            prop_assert_eq!(f.count(), f.iter_ones().count() as u64);
            prop_assert_eq!(t.count(), t.iter_ones().count() as u64);
        }
    }

    proptest! {
        /// A harvest puts each newly written, sent page in exactly one group (hot iff resent),
        /// leaves pages already in a group where they were, and counts what it added, as many
        /// as a look at the log beforehand counts.
        #[test]
        fn harvest_classifies_every_page_once(
            written in proptest::collection::btree_set(0u64..500, 0..200),
            sent in proptest::collection::btree_set(0u64..500, 0..400),
            resent in proptest::collection::btree_set(0u64..500, 0..100),
            old_cold in proptest::collection::btree_set(0u64..500, 0..50),
            old_hot in proptest::collection::btree_set(0u64..500, 0..50),
        ) {
            let map = |s| bitmap_of(500, s);
            let (w, s, r) = (map(&written), map(&sent), map(&resent));
            let mut cold = map(&old_cold);
            let mut hot = Bitmap::new(500);
            for &i in old_hot.iter().filter(|i| !old_cold.contains(i)) { hot.set(i); }
            let before = (cold.clone(), hot.clone());
            let counted = Bitmap::count_newly_dirty(&w, &s, &cold, &hot);
            let added = Bitmap::harvest_into(&w, &s, &r, &mut cold, &mut hot);
            prop_assert_eq!(counted, added, "a look at the log counts what the harvest adds");
            let mut expect_added = 0;
            for i in 0..500 {
                let was = before.0.get(i) || before.1.get(i);
                prop_assert!(!(cold.get(i) && hot.get(i)), "page {} in both groups", i);
                if was {
                    prop_assert_eq!((cold.get(i), hot.get(i)), (before.0.get(i), before.1.get(i)));
                } else if w.get(i) && s.get(i) {
                    expect_added += 1;
                    prop_assert_eq!(hot.get(i), r.get(i));
                    prop_assert_eq!(cold.get(i), !r.get(i));
                } else {
                    prop_assert!(!cold.get(i) && !hot.get(i));
                }
            }
            prop_assert_eq!(added, expect_added);
            prop_assert_eq!(cold.count(), cold.iter_ones().count() as u64);
            prop_assert_eq!(hot.count(), hot.iter_ones().count() as u64);
        }
    }
}
