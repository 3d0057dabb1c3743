//! The in-memory index of the trace: one 40-byte [`Record`] per message,
//! pure (no I/O, no clock).
//!
//! A record holds where the message's latest line is (the lines chain
//! back through their `prev` pointers, so no other line is listed), the
//! time it was received and its tenant, and 31-bit hashes of the lowercase
//! sender, the recipients and the header Message-ID: enough to pick
//! candidates for a search without reading a file. The hashes select,
//! the caller confirms against the events read back.
//!
//! Records live in pages of a slab (slots reused), found by id through
//! [`IdTable`]. Each hour of creation is a [`Chunk`] listing its records'
//! slots in creation order, with the range of their received times: a
//! newest-first search walks chunks from the newest and skips those that
//! cannot hold a better match. Retention drops the records whose latest
//! line is in a deleted file; only chunks of those hours can hold them.
//!
//! Trust boundary: the inputs are hashes and our own event fields; search
//! filters come from API requests and are only compared. Tenant names are
//! interned (the config's bounded set; past 65,534 distinct names the
//! rest share one number and are told apart by the caller's check).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use super::clock::HOUR_MS;
use super::ids::{IdTable, Key, MAX_SLOTS, OtherIds, other_key, other_number, pack_hex, unpack_hex};
use super::segment::Loc;

const PAGE: usize = 4096;
/// `rcpt` holds a multi-recipient list number when this bit is set.
const MULTI: u32 = 0x8000_0000;
/// Tenant number shared by every name past the interner's capacity.
pub const TENANT_OVERFLOW: u16 = u16::MAX;
const MAX_RECEIVED_MS: u64 = (1 << 48) - 1;

/// What one event tells the index (hashes are 31-bit, never 0; 0 = absent).
#[derive(Debug, Default)]
pub struct Facts<'a> {
    pub id: &'a str,
    pub ts_ms: Option<u64>,
    pub tenant: Option<&'a str>,
    pub sender: u32,
    pub hmid: u32,
    pub rcpts: Vec<u32>,
}

/// One message. `u32` words keep it at 40 bytes (alignment 4).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Record {
    id: Key,
    /// The message's latest line ([`Loc`] bits, high word first).
    last: [u32; 2],
    /// `received_ms << 16 | tenant`, high word first.
    recv: [u32; 2],
    sender: u32,
    hmid: u32,
    /// A recipient hash, or `MULTI | n` for the list `multi[n]`, or 0.
    rcpt: u32,
}

const FREE: Record = Record {
    id: [0; 3],
    last: [0; 2],
    recv: [0; 2],
    sender: 0,
    hmid: 0,
    rcpt: 0,
};

fn split(v: u64) -> [u32; 2] {
    [(v >> 32) as u32, v as u32]
}
fn join(w: [u32; 2]) -> u64 {
    (u64::from(w[0]) << 32) | u64::from(w[1])
}

impl Record {
    fn last(&self) -> Loc {
        Loc::from_bits(join(self.last))
    }
    fn received_ms(&self) -> u64 {
        join(self.recv) >> 16
    }
    fn tenant(&self) -> u16 {
        join(self.recv) as u16
    }
    fn set_tenant(&mut self, t: u16) {
        self.recv = split((join(self.recv) & !0xffff) | u64::from(t));
    }
}

/// The records created while one hour's file was current.
struct Chunk {
    hour: u32,
    slots: Vec<u32>,
    min_recv: u64,
    max_recv: u64,
}

/// Search filters in index terms (hashes, tenant number, inclusive range).
#[derive(Debug, Clone)]
pub struct Filter {
    pub tenant: Option<u16>,
    pub sender: Option<u32>,
    pub rcpt: Option<u32>,
    pub hmid: Option<u32>,
    pub since: u64,
    pub until: u64,
}

/// A search hit before it is confirmed against its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub received_ms: u64,
    /// Creation order, for ties: `chunk hour << 32 | position`.
    pub order: u64,
    pub id: String,
    pub last: Loc,
}

impl Ord for Candidate {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.received_ms, self.order).cmp(&(o.received_ms, o.order))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// The `k` newest candidates seen.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Candidate>>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::new(),
        }
    }
    fn full(&self) -> bool {
        self.heap.len() >= self.k
    }
    /// The oldest kept, when full: anything not newer is of no use.
    fn floor(&self) -> Option<(u64, u64)> {
        if !self.full() {
            return None;
        }
        self.heap.peek().map(|Reverse(c)| (c.received_ms, c.order))
    }
    fn admits(&self, key: (u64, u64)) -> bool {
        self.k > 0 && self.floor().is_none_or(|f| key > f)
    }
    fn push(&mut self, c: Candidate) {
        self.heap.push(Reverse(c));
        if self.heap.len() > self.k {
            self.heap.pop();
        }
    }
    /// Newest first.
    pub fn into_sorted(self) -> Vec<Candidate> {
        let mut v: Vec<Candidate> = self.heap.into_iter().map(|Reverse(c)| c).collect();
        v.sort_by(|a, b| b.cmp(a));
        v
    }
}

/// Where a search stopped between two lock holds.
#[derive(Debug, Default)]
pub struct Cursor {
    /// The index's generation when the search (re)started.
    generation: u64,
    started: bool,
    /// Chunk being walked (from the front) and how many of its slots are left.
    chunk: usize,
    pos: usize,
    pub done: bool,
}

#[derive(Default)]
struct Interner {
    map: HashMap<Box<str>, u16>,
    names: Vec<Box<str>>,
}

impl Interner {
    fn get(&self, s: &str) -> Option<u16> {
        self.map.get(s).copied()
    }
    fn intern(&mut self, s: &str) -> u16 {
        if let Some(n) = self.get(s) {
            return n;
        }
        if self.names.len() >= usize::from(TENANT_OVERFLOW - 1) {
            return TENANT_OVERFLOW;
        }
        self.names.push(s.into());
        let n = self.names.len() as u16;
        self.map.insert(s.into(), n);
        n
    }
    fn overflowed(&self) -> bool {
        self.names.len() >= usize::from(TENANT_OVERFLOW - 1)
    }
}

pub struct Index {
    pages: Vec<Box<[Record]>>,
    /// Slots handed out so far (the slab's high-water mark).
    high: u32,
    free: Vec<u32>,
    table: IdTable,
    others: OtherIds,
    chunks: VecDeque<Chunk>,
    tenants: Interner,
    multi: Vec<Box<[u32]>>,
    multi_free: Vec<u32>,
    /// Bumped whenever records are dropped (a search then starts over).
    generation: u64,
}

impl Index {
    pub fn new(seed: u64) -> Self {
        Index {
            pages: Vec::new(),
            high: 0,
            free: Vec::new(),
            table: IdTable::new(seed),
            others: OtherIds::default(),
            chunks: VecDeque::new(),
            tenants: Interner::default(),
            multi: Vec::new(),
            multi_free: Vec::new(),
            generation: 0,
        }
    }

    /// Messages indexed.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    fn rec(&self, slot: u32) -> &Record {
        &self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    fn rec_mut(&mut self, slot: u32) -> &mut Record {
        &mut self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    fn key(&self, id: &str) -> Option<Key> {
        match pack_hex(id) {
            Some(k) => Some(k),
            None => Some(other_key(self.others.get(id)?)),
        }
    }

    fn find(&self, id: &str) -> Option<u32> {
        let k = self.key(id)?;
        let pages = &self.pages;
        self.table.find(&k, |s| pages[s as usize / PAGE][s as usize % PAGE].id)
    }

    /// The message's latest line.
    pub fn last(&self, id: &str) -> Option<Loc> {
        self.find(id).map(|s| self.rec(s).last())
    }

    /// The number of a tenant name, if it was ever seen (or the overflow
    /// number when names overflowed).
    pub fn tenant_number(&self, name: &str) -> Option<u16> {
        self.tenants
            .get(name)
            .or_else(|| self.tenants.overflowed().then_some(TENANT_OVERFLOW))
    }

    /// Record that the line at `loc` (in the file current now: locs only
    /// grow) carries an event of `f.id`; returns the message's previous
    /// line, `None` for its first.
    pub fn apply(&mut self, f: &Facts<'_>, loc: Loc) -> Option<Loc> {
        if let Some(slot) = self.find(f.id) {
            let mut r = *self.rec(slot);
            let prev = r.last();
            r.last = split(loc.to_bits());
            self.merge(&mut r, f);
            *self.rec_mut(slot) = r;
            return Some(prev);
        }
        // Past the slab's capacity a message is stored but not indexed.
        let slot = self.alloc()?;
        let key = match pack_hex(f.id) {
            Some(k) => k,
            None => other_key(self.others.insert(f.id)),
        };
        let hour = loc.hour();
        let received = f.ts_ms.unwrap_or(u64::from(hour) * HOUR_MS).min(MAX_RECEIVED_MS);
        let mut r = Record {
            id: key,
            last: split(loc.to_bits()),
            recv: split(received << 16),
            ..FREE
        };
        self.merge(&mut r, f);
        *self.rec_mut(slot) = r;
        let pages = &self.pages;
        self.table
            .insert(&key, slot, |s| pages[s as usize / PAGE][s as usize % PAGE].id);
        if self.chunks.back().is_none_or(|c| c.hour < hour) {
            if let Some(c) = self.chunks.back_mut() {
                c.slots.shrink_to_fit();
            }
            self.chunks.push_back(Chunk {
                hour,
                slots: Vec::new(),
                min_recv: u64::MAX,
                max_recv: 0,
            });
        }
        let c = self.chunks.back_mut().expect("a chunk");
        c.slots.push(slot);
        c.min_recv = c.min_recv.min(received);
        c.max_recv = c.max_recv.max(received);
        None
    }

    fn merge(&mut self, r: &mut Record, f: &Facts<'_>) {
        if r.tenant() == 0
            && let Some(t) = f.tenant
        {
            let n = self.tenants.intern(t);
            r.set_tenant(n);
        }
        if r.sender == 0 {
            r.sender = f.sender;
        }
        if f.hmid != 0 {
            r.hmid = f.hmid;
        }
        self.add_rcpts(r, &f.rcpts);
    }

    /// Add recipient hashes: one inline, more in a sorted boxed list
    /// (rebuilt only when a hash is new: delivery events repeat known ones).
    fn add_rcpts(&mut self, r: &mut Record, hs: &[u32]) {
        let new: Vec<u32> = hs.iter().copied().filter(|&h| h != 0 && !self.has_rcpt(r, h)).collect();
        if new.is_empty() {
            return;
        }
        if r.rcpt == 0 && new.len() == 1 {
            r.rcpt = new[0];
            return;
        }
        let mut list = match r.rcpt {
            0 => Vec::new(),
            h if h & MULTI == 0 => vec![h],
            m => std::mem::take(&mut self.multi[(m & !MULTI) as usize]).into_vec(),
        };
        list.extend(new);
        list.sort_unstable();
        list.dedup();
        if list.len() == 1 {
            r.rcpt = list[0];
            return;
        }
        let list = list.into_boxed_slice();
        if r.rcpt & MULTI != 0 {
            self.multi[(r.rcpt & !MULTI) as usize] = list;
            return;
        }
        let n = match self.multi_free.pop() {
            Some(n) => {
                self.multi[n as usize] = list;
                n
            }
            None => {
                self.multi.push(list);
                (self.multi.len() - 1) as u32
            }
        };
        r.rcpt = MULTI | n;
    }

    fn has_rcpt(&self, r: &Record, h: u32) -> bool {
        if r.rcpt & MULTI == 0 {
            r.rcpt == h
        } else {
            self.multi[(r.rcpt & !MULTI) as usize].binary_search(&h).is_ok()
        }
    }

    /// A free slot; `None` past [`MAX_SLOTS`] records (134 million).
    fn alloc(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        if self.high >= MAX_SLOTS - 1 {
            return None;
        }
        let s = self.high;
        self.high += 1;
        if s as usize / PAGE == self.pages.len() {
            self.pages.push(vec![FREE; PAGE].into_boxed_slice());
        }
        Some(s)
    }

    fn release(&mut self, slot: u32) {
        let r = *self.rec(slot);
        let pages = &self.pages;
        self.table
            .remove(&r.id, |s| pages[s as usize / PAGE][s as usize % PAGE].id);
        if let Some(n) = other_number(&r.id) {
            self.others.remove(n);
        }
        if r.rcpt & MULTI != 0 {
            let n = r.rcpt & !MULTI;
            self.multi[n as usize] = Box::default();
            self.multi_free.push(n);
        }
        *self.rec_mut(slot) = FREE;
        self.free.push(slot);
    }

    fn id_string(&self, k: &Key) -> String {
        match other_number(k) {
            Some(n) => self.others.name(n).unwrap_or_default().to_string(),
            None => unpack_hex(k).unwrap_or_default(),
        }
    }

    fn matches(&self, r: &Record, f: &Filter) -> bool {
        let recv = r.received_ms();
        recv >= f.since
            && recv <= f.until
            && f.tenant.is_none_or(|t| r.tenant() == t)
            && f.sender.is_none_or(|h| r.sender == h)
            && f.hmid.is_none_or(|h| r.hmid == h)
            && f.rcpt.is_none_or(|h| self.has_rcpt(r, h))
    }

    /// Walk at most `budget` records newest first from where `cur` stopped,
    /// keeping the best candidates in `top`. When records were dropped
    /// since the search began, it starts over (`top` cleared).
    pub fn search_step(&self, f: &Filter, cur: &mut Cursor, top: &mut TopK, budget: usize) {
        if cur.done {
            return;
        }
        if !cur.started || cur.generation != self.generation {
            *top = TopK::new(top.k);
            *cur = Cursor {
                generation: self.generation,
                started: true,
                ..Cursor::default()
            };
            if self.chunks.is_empty() {
                cur.done = true;
                return;
            }
            cur.chunk = self.chunks.len() - 1;
            cur.pos = self.chunks[cur.chunk].slots.len();
            self.skip_useless(f, cur, top);
        }
        let mut work = 0;
        while !cur.done && work < budget {
            let c = &self.chunks[cur.chunk];
            while cur.pos > 0 && work < budget {
                cur.pos -= 1;
                work += 1;
                let r = self.rec(c.slots[cur.pos]);
                if !self.matches(r, f) {
                    continue;
                }
                let key = (r.received_ms(), (u64::from(c.hour) << 32) | cur.pos as u64);
                if top.admits(key) {
                    top.push(Candidate {
                        received_ms: key.0,
                        order: key.1,
                        id: self.id_string(&r.id),
                        last: r.last(),
                    });
                }
            }
            if cur.pos == 0 {
                if cur.chunk == 0 {
                    cur.done = true;
                } else {
                    cur.chunk -= 1;
                    cur.pos = self.chunks[cur.chunk].slots.len();
                    self.skip_useless(f, cur, top);
                }
            }
        }
    }

    /// Move past chunks whose received range cannot hold a (better) match.
    fn skip_useless(&self, f: &Filter, cur: &mut Cursor, top: &TopK) {
        loop {
            let c = &self.chunks[cur.chunk];
            let useless = c.slots.is_empty()
                || c.max_recv < f.since
                || c.min_recv > f.until
                || top.floor().is_some_and(|(ms, _)| c.max_recv < ms);
            if !useless {
                return;
            }
            if cur.chunk == 0 {
                cur.done = true;
                return;
            }
            cur.chunk -= 1;
            cur.pos = self.chunks[cur.chunk].slots.len();
        }
    }

    /// Drop, from the oldest chunk of an hour at or before `max_hour` not
    /// yet done (`from` counts chunks already done), the records whose
    /// latest line is in a file at or before `max_hour` (deleted). Returns
    /// the `from` of the next step, `None` when no chunk is left to do.
    /// One chunk per step, so callers can release their lock in between.
    pub fn drop_step(&mut self, max_hour: u32, from: usize) -> Option<usize> {
        let c = self.chunks.get_mut(from).filter(|c| c.hour <= max_hour)?;
        let mut slots = std::mem::take(&mut c.slots);
        let before = slots.len();
        let mut gone = Vec::new();
        slots.retain(|&s| {
            let keep = self.pages[s as usize / PAGE][s as usize % PAGE].last().hour() > max_hour;
            if !keep {
                gone.push(s);
            }
            keep
        });
        for s in gone {
            self.release(s);
        }
        let changed = slots.len() != before || slots.is_empty();
        let next = if slots.is_empty() {
            self.chunks.remove(from);
            from
        } else {
            if changed {
                slots.shrink_to_fit();
            }
            self.chunks[from].slots = slots;
            from + 1
        };
        if changed {
            self.generation += 1;
        }
        self.chunks.get(next).filter(|c| c.hour <= max_hour).map(|_| next)
    }

    /// Heap bytes held, from capacities (allocator overhead not counted).
    pub fn heap_bytes(&self) -> usize {
        let rec = std::mem::size_of::<Record>();
        let chunks: usize = self.chunks.iter().map(|c| c.slots.capacity() * 4).sum();
        let multi: usize = self.multi.iter().map(|l| l.len() * 4).sum();
        let tenants: usize = self.tenants.names.iter().map(|n| 2 * n.len() + 40).sum();
        self.pages.len() * PAGE * rec
            + self.pages.capacity() * 16
            + self.free.capacity() * 4
            + self.table.heap_bytes()
            + self.others.heap_bytes()
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + chunks
            + self.multi.capacity() * 16
            + multi
            + self.multi_free.capacity() * 4
            + tenants
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u32 = 500_000;

    fn loc(hour: u32, off: u64) -> Loc {
        Loc::new(hour, off).unwrap()
    }

    fn facts<'a>(id: &'a str, ts: u64, rcpts: &[u32]) -> Facts<'a> {
        Facts {
            id,
            ts_ms: Some(ts),
            tenant: Some("acme"),
            sender: 11,
            hmid: 0,
            rcpts: rcpts.to_vec(),
        }
    }

    fn all() -> Filter {
        Filter {
            tenant: None,
            sender: None,
            rcpt: None,
            hmid: None,
            since: 0,
            until: u64::MAX,
        }
    }

    fn search(ix: &Index, f: &Filter, k: usize, budget: usize) -> Vec<String> {
        let mut cur = Cursor::default();
        let mut top = TopK::new(k);
        while !cur.done {
            ix.search_step(f, &mut cur, &mut top, budget);
        }
        top.into_sorted().into_iter().map(|c| c.id).collect()
    }

    #[test]
    fn record_is_40_bytes() {
        assert_eq!(std::mem::size_of::<Record>(), 40);
    }

    #[test]
    fn chains_and_fields() {
        let mut ix = Index::new(1);
        let t0 = u64::from(H) * HOUR_MS;
        assert_eq!(ix.apply(&facts("aa01", t0 + 5, &[21]), loc(H, 0)), None);
        assert_eq!(ix.apply(&facts("m-other", t0 + 6, &[22, 23]), loc(H, 100)), None);
        assert_eq!(ix.apply(&facts("aa01", t0 + 9, &[21]), loc(H, 200)), Some(loc(H, 0)));
        assert_eq!(
            ix.apply(&facts("aa01", t0 + 9, &[24]), loc(H + 1, 0)),
            Some(loc(H, 200))
        );
        assert_eq!(ix.last("aa01"), Some(loc(H + 1, 0)));
        assert_eq!(ix.last("m-other"), Some(loc(H, 100)));
        assert_eq!(ix.last("AA01"), None);
        assert_eq!(ix.len(), 2);
        let s = ix.find("aa01").unwrap();
        let r = *ix.rec(s);
        assert_eq!(r.received_ms(), t0 + 5);
        assert_eq!(ix.tenants.names[usize::from(r.tenant()) - 1].as_ref(), "acme");
        assert!(ix.has_rcpt(&r, 21) && ix.has_rcpt(&r, 24) && !ix.has_rcpt(&r, 22));
        assert_eq!(
            search(
                &ix,
                &Filter {
                    rcpt: Some(23),
                    ..all()
                },
                10,
                1
            ),
            vec!["m-other"]
        );
        assert_eq!(
            search(
                &ix,
                &Filter {
                    rcpt: Some(24),
                    ..all()
                },
                10,
                1
            ),
            vec!["aa01"]
        );
        assert_eq!(search(&ix, &all(), 10, 1), vec!["m-other", "aa01"]);
        assert_eq!(
            search(
                &ix,
                &Filter {
                    sender: Some(12),
                    ..all()
                },
                10,
                1
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            search(
                &ix,
                &Filter {
                    tenant: ix.tenant_number("acme"),
                    ..all()
                },
                10,
                1
            )
            .len(),
            2
        );
        assert_eq!(ix.tenant_number("other"), None);
    }

    #[test]
    fn newest_first_across_chunks_with_limit_and_range() {
        let mut ix = Index::new(2);
        let mut n = 0u64;
        for h in 0..5u32 {
            for i in 0..100u64 {
                let ts = u64::from(H + h) * HOUR_MS + i * 1000;
                let id = format!("{n:04x}");
                ix.apply(&facts(&id, ts, &[(n as u32 % 3) + 1]), loc(H + h, i * 10));
                n += 1;
            }
        }
        let got = search(&ix, &all(), 5, 7);
        assert_eq!(got, vec!["01f3", "01f2", "01f1", "01f0", "01ef"]);
        let got = search(&ix, &Filter { rcpt: Some(1), ..all() }, 3, 1000);
        assert_eq!(got, vec!["01f2", "01ef", "01ec"]);
        let since = u64::from(H + 1) * HOUR_MS + 98_000;
        let until = u64::from(H + 2) * HOUR_MS + 1000;
        let got = search(&ix, &Filter { since, until, ..all() }, 100, 3);
        assert_eq!(got, vec!["00c9", "00c8", "00c7", "00c6"]);
        assert!(search(&ix, &all(), 0, 10).is_empty());
    }

    #[test]
    fn retention_drops_by_latest_line() {
        let mut ix = Index::new(3);
        let t = |h: u32| u64::from(h) * HOUR_MS;
        ix.apply(&facts("01", t(H), &[1, 2]), loc(H, 0)); // only in H
        ix.apply(&facts("02", t(H), &[1]), loc(H, 10)); // goes on in H + 2
        ix.apply(&facts("m-x", t(H), &[1]), loc(H, 20)); // only in H
        ix.apply(&facts("03", t(H + 1), &[1]), loc(H + 1, 0));
        ix.apply(&facts("02", t(H + 2), &[1]), loc(H + 2, 0));
        assert_eq!(ix.len(), 4);
        let mut from = Some(0);
        let mut steps = 0;
        while let Some(f) = from {
            from = ix.drop_step(H + 1, f);
            steps += 1;
        }
        assert_eq!(steps, 2);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.last("02"), Some(loc(H + 2, 0)));
        assert_eq!(ix.last("01"), None);
        assert_eq!(ix.last("m-x"), None);
        assert_eq!(ix.chunks.len(), 1);
        // Freed slots and lists are reused.
        ix.apply(&facts("04", t(H + 3), &[5, 6]), loc(H + 3, 0));
        assert_eq!(ix.high, 4);
        assert_eq!(ix.multi.len(), 1);
        assert_eq!(search(&ix, &all(), 10, 1), vec!["04", "02"]);
        assert_eq!(ix.drop_step(H + 1, 0), None);
    }

    #[test]
    fn a_search_starts_over_after_a_drop() {
        let mut ix = Index::new(4);
        let t = |h: u32| u64::from(h) * HOUR_MS;
        for i in 0..10u64 {
            ix.apply(&facts(&format!("a{i}"), t(H) + i, &[1]), loc(H, i));
        }
        for i in 0..10u64 {
            ix.apply(&facts(&format!("b{i}"), t(H + 1) + i, &[1]), loc(H + 1, i));
        }
        let mut cur = Cursor::default();
        let mut top = TopK::new(100);
        ix.search_step(&all(), &mut cur, &mut top, 15);
        assert!(!cur.done);
        ix.drop_step(H, 0);
        while !cur.done {
            ix.search_step(&all(), &mut cur, &mut top, 3);
        }
        assert_eq!(top.into_sorted().len(), 10);
    }
}
