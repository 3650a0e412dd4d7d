//! A map's entries, stored compactly: fixed-size `key ++ value` records in
//! one buffer, sorted by key bytes.
//!
//! A `BTreeMap<Vec<u8>, Vec<u8>>` costs ~113 bytes per 4-byte entry and
//! scatters two allocations per entry through the heap; this costs the
//! record size. Maps of 100k entries are planned, observed and held by the
//! agent, so that difference is most of its memory and much of its time.
//! Iteration order is the same (by key bytes).

use std::fmt;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Entries {
    key_size: usize,
    value_size: usize,
    /// `len` records of `key_size + value_size` bytes, sorted by key.
    data: Vec<u8>,
}

impl Entries {
    pub fn new() -> Entries {
        Entries::default()
    }

    fn record(&self) -> usize {
        self.key_size + self.value_size
    }

    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.record()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn key_at(&self, i: usize) -> &[u8] {
        let r = self.record();
        &self.data[i * r..i * r + self.key_size]
    }

    fn value_at(&self, i: usize) -> &[u8] {
        let r = self.record();
        &self.data[i * r + self.key_size..(i + 1) * r]
    }

    fn search(&self, key: &[u8]) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key_at(mid).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    fn check_sizes(&mut self, key: &[u8], value: &[u8]) {
        if self.data.is_empty() {
            self.key_size = key.len();
            self.value_size = value.len();
        }
        assert!(
            key.len() == self.key_size && value.len() == self.value_size,
            "entry of {}+{} bytes in a map of {}+{}-byte entries",
            key.len(),
            value.len(),
            self.key_size,
            self.value_size
        );
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if key.len() != self.key_size {
            return None;
        }
        self.search(key).ok().map(|i| self.value_at(i))
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Inserts or replaces; O(n) (a move of the tail), for small edits.
    /// Build big sets with `collect()`.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.check_sizes(key, value);
        let r = self.record();
        match self.search(key) {
            Ok(i) => {
                let old = self.value_at(i).to_vec();
                self.data[i * r + self.key_size..(i + 1) * r].copy_from_slice(value);
                Some(old)
            }
            Err(i) => {
                let at = i * r;
                self.data.splice(at..at, key.iter().chain(value).copied());
                None
            }
        }
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        if key.len() != self.key_size {
            return None;
        }
        let i = self.search(key).ok()?;
        let old = self.value_at(i).to_vec();
        let r = self.record();
        self.data.drain(i * r..(i + 1) * r);
        Some(old)
    }

    pub fn clear(&mut self) {
        self.data.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        (0..self.len()).map(move |i| (self.key_at(i), self.value_at(i)))
    }

    pub fn keys(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.len()).map(move |i| self.key_at(i))
    }

    /// Builds from records in any order (batched kernel reads): `keys` and
    /// `values` are concatenated fixed-size items; `keep` filters records.
    /// A key given twice keeps its last value.
    pub fn from_columns(
        key_size: usize,
        value_size: usize,
        keys: &[u8],
        values: &[u8],
        keep: impl Fn(&[u8]) -> bool,
    ) -> Entries {
        let n = keys.len().checked_div(key_size).unwrap_or(0);
        let mut order: Vec<usize> = (0..n).filter(|i| keep(&values[i * value_size..(i + 1) * value_size])).collect();
        order.sort_by(|a, b| keys[a * key_size..(a + 1) * key_size].cmp(&keys[b * key_size..(b + 1) * key_size]));
        let mut data = Vec::with_capacity(order.len() * (key_size + value_size));
        let mut last: Option<usize> = None;
        for i in order {
            let key = &keys[i * key_size..(i + 1) * key_size];
            if let Some(prev) = last
                && &keys[prev * key_size..(prev + 1) * key_size] == key
            {
                let r = key_size + value_size;
                let at = data.len() - r + key_size;
                data[at..].copy_from_slice(&values[i * value_size..(i + 1) * value_size]);
                continue;
            }
            data.extend_from_slice(key);
            data.extend_from_slice(&values[i * value_size..(i + 1) * value_size]);
            last = Some(i);
        }
        Entries { key_size, value_size, data }
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(K, V)> for Entries {
    /// Sorts once; a key given twice keeps its last value.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        let (mut ks, mut vs) = (None, None);
        for (k, v) in iter {
            let (k, v) = (k.as_ref(), v.as_ref());
            let (kk, vv) = (*ks.get_or_insert(k.len()), *vs.get_or_insert(v.len()));
            assert!(k.len() == kk && v.len() == vv, "entries of different sizes in one map");
            keys.extend_from_slice(k);
            values.extend_from_slice(v);
        }
        Entries::from_columns(ks.unwrap_or(0), vs.unwrap_or(0), &keys, &values, |_| true)
    }
}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter().map(|(k, v)| (crate::codec::hex(k), crate::codec::hex(v)))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut e: Entries = [([3u8, 0], [30u8]), ([1, 0], [10]), ([2, 0], [20]), ([1, 0], [11])].into_iter().collect();
        assert_eq!(e.len(), 3);
        assert_eq!(e.get(&[1, 0]), Some(&[11u8][..]), "the last value wins");
        assert_eq!(e.keys().collect::<Vec<_>>(), vec![&[1u8, 0][..], &[2, 0], &[3, 0]]);
        assert_eq!(e.insert([0u8, 9], [5u8]), None);
        assert_eq!(e.insert([2u8, 0], [21u8]), Some(vec![20]));
        assert_eq!(e.remove(&[3, 0]), Some(vec![30]));
        assert_eq!(e.remove(&[3, 0]), None);
        let all: Vec<(Vec<u8>, Vec<u8>)> = e.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(all, vec![(vec![0, 9], vec![5]), (vec![1, 0], vec![11]), (vec![2, 0], vec![21])]);
        assert_eq!(e.get(&[1]), None, "a key of another size is absent");
    }

    #[test]
    fn builds_from_unsorted_columns_with_a_filter() {
        let keys = [2u8, 1, 3];
        let values = [0u8, 0, 7, 7, 9, 9];
        let e = Entries::from_columns(1, 2, &keys, &values, |v| v != [0, 0]);
        assert_eq!(e.iter().collect::<Vec<_>>(), vec![(&[1u8][..], &[7u8, 7][..]), (&[3], &[9, 9])]);
    }
}
