//! Who connected: per rule and client address, connections, refusals and when it was
//! last seen, as the proxy and the UDP forwarder record them. (The kernel path counts
//! the same in its programs, in `LHB_CLIENTS`; `lhb status` merges both.)
//!
//! Bounded: the table holds at most [`MAX_CLIENTS`] (rule, address) pairs and forgets
//! the least recently seen one to make room, in constant time, so a flood of
//! datagrams from ever new addresses costs a fixed amount of memory and no scan.

use std::{net::IpAddr, num::NonZeroUsize, sync::Arc, time::Instant};

use lru::LruCache;
use parking_lot::Mutex;

/// As many as the kernel path's map holds.
pub const MAX_CLIENTS: usize = lhb_common::MAX_CLIENTS as usize;

/// What one client did through one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub connections: u64,
    pub refused: u64,
    pub last: Instant,
}

#[derive(Clone)]
pub struct Clients(Arc<Mutex<LruCache<(u32, IpAddr), Seen>>>);

impl Default for Clients {
    fn default() -> Clients {
        Clients::with_capacity(MAX_CLIENTS)
    }
}

impl Clients {
    pub fn with_capacity(n: usize) -> Clients {
        let n = NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Clients(Arc::new(Mutex::new(LruCache::new(n))))
    }

    /// A connection (or UDP flow) of `ip` served through rule `slot`.
    pub fn connected(&self, slot: u32, ip: IpAddr) {
        self.record(slot, ip, |s| s.connections += 1);
    }

    /// A connection (or datagram) of `ip` the rule's `allow` list refused.
    pub fn refused(&self, slot: u32, ip: IpAddr) {
        self.record(slot, ip, |s| s.refused += 1);
    }

    fn record(&self, slot: u32, ip: IpAddr, f: impl FnOnce(&mut Seen)) {
        let now = Instant::now();
        let mut t = self.0.lock();
        let s = t.get_or_insert_mut((slot, ip.to_canonical()), || Seen {
            connections: 0,
            refused: 0,
            last: now,
        });
        f(s);
        s.last = now;
    }

    /// Forgets rule `slot`'s clients: a new rule takes the slot.
    pub fn forget(&self, slot: u32) {
        let mut t = self.0.lock();
        let gone: Vec<_> = t
            .iter()
            .filter(|((s, _), _)| *s == slot)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            t.pop(&k);
        }
    }

    /// Every (slot, address, what it did), most recently seen first.
    pub fn snapshot(&self) -> Vec<(u32, IpAddr, Seen)> {
        let t = self.0.lock();
        t.iter().map(|(&(slot, ip), &s)| (slot, ip, s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_rule_and_address_and_stays_bounded() {
        let c = Clients::with_capacity(3);
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        c.connected(1, a);
        c.connected(1, mapped);
        c.refused(2, a);
        let s = c.snapshot();
        assert_eq!(s.len(), 2, "{s:?}");
        let one = s.iter().find(|e| e.0 == 1).unwrap();
        assert_eq!((one.1, one.2.connections, one.2.refused), (a, 2, 0));
        let two = s.iter().find(|e| e.0 == 2).unwrap();
        assert_eq!((two.2.connections, two.2.refused), (0, 1));
        // Full: a new client evicts the least recently seen one, never grows the table.
        c.refused(3, a);
        c.connected(1, a);
        c.refused(4, a);
        let s = c.snapshot();
        assert_eq!(s.len(), 3);
        assert!(!s.iter().any(|e| e.0 == 2), "the least recent went: {s:?}");
        c.forget(1);
        assert!(!c.snapshot().iter().any(|e| e.0 == 1));
    }
}
