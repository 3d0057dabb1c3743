//! Message id → record slot, in 4.6 to 9 bytes per message.
//!
//! Ids are kept as 12-byte [`Key`]s: sendguard's own ids (20 lowercase hex
//! digits) are packed as nibbles with their length, any other id gets a
//! number from [`OtherIds`]. [`IdTable`] is an open-addressing table of
//! `u32` entries (linear probing, backward-shift deletion, up to 7/8
//! full): a record slot and 5 bits of hash. The key is read from the
//! record the slot names, so the table stores no key of its own.
//!
//! Trust boundary: ids looked up may come from API requests; a lookup
//! never inserts. Inserted ids come from our own events. The hash is
//! seeded per process.

use std::collections::HashMap;

/// A packed message id: `[len << 24 | nibbles, nibbles, nibbles]` for hex
/// ids of up to [`MAX_HEX`] digits, `[OTHER, n, 0]` for any other id.
pub type Key = [u32; 3];

/// Longest hex id packed into a key (88 bits of nibbles).
pub const MAX_HEX: usize = 22;

const OTHER: u32 = 0xff00_0000;
const EMPTY: u32 = u32::MAX;

/// The key of a lowercase hex id of 1 to [`MAX_HEX`] digits.
pub fn pack_hex(id: &str) -> Option<Key> {
    let b = id.as_bytes();
    if b.is_empty() || b.len() > MAX_HEX {
        return None;
    }
    let mut v: u128 = 0;
    for &c in b {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(d);
    }
    let v = ((b.len() as u128) << 88) | v;
    Some([(v >> 64) as u32, (v >> 32) as u32, v as u32])
}

/// The key of the `n`th other id.
pub fn other_key(n: u32) -> Key {
    [OTHER, n, 0]
}

/// The number of an other id's key.
pub fn other_number(k: &Key) -> Option<u32> {
    (k[0] == OTHER).then_some(k[1])
}

/// The hex id a key was packed from.
pub fn unpack_hex(k: &Key) -> Option<String> {
    let len = (k[0] >> 24) as usize;
    if len == 0 || len > MAX_HEX {
        return None;
    }
    let v = (u128::from(k[0]) << 64) | (u128::from(k[1]) << 32) | u128::from(k[2]);
    let v = v & ((1u128 << 88) - 1);
    Some(format!("{v:0len$x}"))
}

/// Ids that are not short lowercase hex, numbered (numbers are reused).
#[derive(Default)]
pub struct OtherIds {
    map: HashMap<Box<str>, u32>,
    names: Vec<Option<Box<str>>>,
    free: Vec<u32>,
}

impl OtherIds {
    pub fn get(&self, id: &str) -> Option<u32> {
        self.map.get(id).copied()
    }

    pub fn insert(&mut self, id: &str) -> u32 {
        if let Some(n) = self.get(id) {
            return n;
        }
        let n = match self.free.pop() {
            Some(n) => {
                self.names[n as usize] = Some(id.into());
                n
            }
            None => {
                self.names.push(Some(id.into()));
                (self.names.len() - 1) as u32
            }
        };
        self.map.insert(id.into(), n);
        n
    }

    pub fn name(&self, n: u32) -> Option<&str> {
        self.names.get(n as usize)?.as_deref()
    }

    pub fn remove(&mut self, n: u32) {
        if let Some(name) = self.names.get_mut(n as usize).and_then(Option::take) {
            self.map.remove(&name);
            self.free.push(n);
        }
    }

    pub fn heap_bytes(&self) -> usize {
        let strings: usize = self.map.keys().map(|k| 2 * k.len()).sum();
        self.map.capacity() * (16 + 4 + 1) + self.names.capacity() * 16 + self.free.capacity() * 4 + strings
    }
}

/// Open-addressing table of record slots keyed by the records' ids. An
/// entry is `tag << 27 | slot`: 5 bits of the id's hash spare most
/// probes a look at the record.
pub struct IdTable {
    entries: Vec<u32>,
    len: usize,
    seed: u64,
}

/// Slots the table can name (27 bits; the all-ones entry means empty).
pub const MAX_SLOTS: u32 = (1 << SLOT_BITS) - 1;
const SLOT_BITS: u32 = 27;

impl IdTable {
    pub fn new(seed: u64) -> Self {
        IdTable {
            entries: vec![EMPTY; 16],
            len: 0,
            seed,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * 4
    }

    fn hash(&self, k: &Key) -> u64 {
        const M: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut h = self.seed ^ ((u64::from(k[0]) << 32) | u64::from(k[1]));
        h = h.wrapping_mul(M);
        h ^= u64::from(k[2]) ^ (h >> 32);
        h = h.wrapping_mul(M);
        h ^ (h >> 29)
    }

    /// Home position and tagged entry bits of a key.
    fn place_of(&self, k: &Key) -> (usize, u32) {
        let h = self.hash(k);
        (h as usize & (self.entries.len() - 1), ((h >> 59) as u32) << SLOT_BITS)
    }

    /// The slot holding `k`; `key_of` reads a slot's key from its record.
    pub fn find(&self, k: &Key, key_of: impl Fn(u32) -> Key) -> Option<u32> {
        self.position(k, &key_of).map(|i| self.entries[i] & MAX_SLOTS)
    }

    fn position(&self, k: &Key, key_of: &impl Fn(u32) -> Key) -> Option<usize> {
        let mask = self.entries.len() - 1;
        let (mut i, tag) = self.place_of(k);
        loop {
            let e = self.entries[i];
            if e == EMPTY {
                return None;
            }
            if e & !MAX_SLOTS == tag && key_of(e & MAX_SLOTS) == *k {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Add `slot` (below [`MAX_SLOTS`]) under `k`, which is not present
    /// (the caller looked first).
    pub fn insert(&mut self, k: &Key, slot: u32, key_of: impl Fn(u32) -> Key) {
        debug_assert!(slot < MAX_SLOTS);
        // Grow past 7/8 full: probes mostly compare tags, not records.
        if (self.len + 1) * 8 > self.entries.len() * 7 {
            self.resize(self.entries.len() * 2, &key_of);
        }
        self.put(k, slot);
        self.len += 1;
    }

    fn put(&mut self, k: &Key, slot: u32) {
        let mask = self.entries.len() - 1;
        let (mut i, tag) = self.place_of(k);
        while self.entries[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = tag | slot;
    }

    /// Remove `k`; whether it was there.
    pub fn remove(&mut self, k: &Key, key_of: impl Fn(u32) -> Key) -> bool {
        let Some(mut i) = self.position(k, &key_of) else {
            return false;
        };
        let mask = self.entries.len() - 1;
        // Backward-shift deletion: pull later members of the probe run
        // into the hole unless their home lies cyclically in (hole, j].
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e == EMPTY {
                break;
            }
            let h = self.place_of(&key_of(e & MAX_SLOTS)).0;
            let stays = if i <= j { i < h && h <= j } else { i < h || h <= j };
            if !stays {
                self.entries[i] = e;
                i = j;
            }
        }
        self.entries[i] = EMPTY;
        self.len -= 1;
        if self.entries.len() > 1024 && self.len * 8 < self.entries.len() {
            self.resize(self.entries.len() / 2, &key_of);
        }
        true
    }

    fn resize(&mut self, size: usize, key_of: &impl Fn(u32) -> Key) {
        let old = std::mem::replace(&mut self.entries, vec![EMPTY; size.max(16)]);
        for e in old {
            if e != EMPTY {
                self.put(&key_of(e & MAX_SLOTS), e & MAX_SLOTS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids_pack_and_unpack() {
        for id in ["0", "00ab", "19b0d5a0f3c8d1e2f0a01", "0123456789abcdef012345", "f"] {
            let k = pack_hex(id).unwrap();
            assert_eq!(unpack_hex(&k).as_deref(), Some(id));
            assert_eq!(other_number(&k), None);
        }
        assert_ne!(pack_hex("0ab"), pack_hex("ab"));
        for id in ["", "ABC", "0123456789abcdef0123456", "m-1", "g"] {
            assert_eq!(pack_hex(id), None, "{id}");
        }
        assert_eq!(other_number(&other_key(7)), Some(7));
        assert_eq!(unpack_hex(&other_key(7)), None);
    }

    #[test]
    fn other_ids_reuse_numbers() {
        let mut o = OtherIds::default();
        let a = o.insert("m-a");
        let b = o.insert("m-b");
        assert_eq!(o.insert("m-a"), a);
        assert_eq!(o.name(b), Some("m-b"));
        o.remove(a);
        assert_eq!(o.get("m-a"), None);
        assert_eq!(o.insert("m-c"), a);
        assert_eq!(o.name(a), Some("m-c"));
    }

    #[test]
    fn table_against_a_model() {
        // Records: slot n has key keys[n]; a small table forces collisions.
        let keys: Vec<Key> = (0..5000u32)
            .map(|n| [n % 7, n.wrapping_mul(2_654_435_761), n])
            .collect();
        let key_of = |s: u32| keys[s as usize];
        let mut t = IdTable::new(42);
        let mut model = std::collections::HashSet::new();
        let mut x = 1u64;
        for _ in 0..40_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let s = (x % 5000) as u32;
            if model.contains(&s) {
                if x.is_multiple_of(3) {
                    assert!(t.remove(&keys[s as usize], key_of));
                    model.remove(&s);
                }
            } else {
                assert_eq!(t.find(&keys[s as usize], key_of), None);
                t.insert(&keys[s as usize], s, key_of);
                model.insert(s);
            }
            assert_eq!(t.len(), model.len());
        }
        for s in 0..5000u32 {
            let want = model.contains(&s).then_some(s);
            assert_eq!(t.find(&keys[s as usize], key_of), want);
        }
        for s in model.clone() {
            assert!(t.remove(&keys[s as usize], key_of));
        }
        assert_eq!(t.len(), 0);
        assert!(t.entries.len() <= 1024);
        assert!(!t.remove(&keys[0], key_of));
    }
}
