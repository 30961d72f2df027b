//! Scoped rules: the addresses a rule's `allow` list lets in, as every data path checks
//! them. The reconciler turns a rule's list into an [`AllowSet`] per counter slot (the
//! plan's `scopes`); the kernel driver writes it to the programs' LPM trie, and the
//! proxy and the UDP forwarder read it from one shared [`Scopes`] table, so the three
//! paths can never disagree about who gets in.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use parking_lot::RwLock;

use crate::model::rule::{Client, Rule};

/// The prefixes one scoped rule admits. Empty admits nobody: a rule whose clients
/// are not known (yet) refuses everyone rather than falling back to everyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowSet {
    nets: Vec<IpNet>,
}

impl AllowSet {
    /// The set a rule's `allow` list stands for, or None for a rule without one (open to
    /// every client on its source).
    pub fn of(rule: &Rule) -> Option<AllowSet> {
        if rule.allow.is_empty() {
            return None;
        }
        let nets = rule
            .allow
            .iter()
            .filter_map(|c| match c {
                Client::Net(n) => Some(*n),
                // Containers: the reconciler adds their addresses (`reconcile::clients`).
                _ => None,
            })
            .collect();
        Some(AllowSet::new(nets))
    }

    pub fn new(mut nets: Vec<IpNet>) -> AllowSet {
        nets.sort();
        nets.dedup();
        AllowSet { nets }
    }

    /// Admits `net` too (a container the engine names, resolved by the reconciler).
    pub fn add(&mut self, net: IpNet) {
        if let Err(at) = self.nets.binary_search(&net) {
            self.nets.insert(at, net);
        }
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether a client at `ip` may connect. An IPv4 client of an IPv6 socket
    /// (`::ffff:a.b.c.d`) is its IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// The allow sets of every scoped rule, by counter slot, shared by the proxy's accept
/// loops and the UDP forwarder. Replaced whole by each apply, before any socket of the
/// new plan is bound, so a listener never serves under an older scope than the plan it
/// was bound for.
#[derive(Clone, Debug, Default)]
pub struct Scopes(Arc<RwLock<Arc<BTreeMap<u32, AllowSet>>>>);

impl Scopes {
    pub fn set(&self, scopes: BTreeMap<u32, AllowSet>) {
        let mut w = self.0.write();
        if **w != scopes {
            *w = Arc::new(scopes);
        }
    }

    /// Whether `ip` may connect through rule `slot`: yes for a rule without scope.
    pub fn allows(&self, slot: u32, ip: IpAddr) -> bool {
        let r = self.0.read();
        r.get(&slot).is_none_or(|set| set.allows(ip))
    }

    /// Whether rule `slot` is scoped.
    pub fn scoped(&self, slot: u32) -> bool {
        let r = self.0.read();
        r.contains_key(&slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rule::parse_iface_spec;

    #[test]
    fn a_set_admits_its_prefixes_and_nothing_else() {
        let r = parse_iface_spec("br0:80@10.0.0.2,10.0.1.0/24,fd00::/64").unwrap();
        let s = AllowSet::of(&r).unwrap();
        for ok in [
            "10.0.0.2",
            "10.0.1.0",
            "10.0.1.255",
            "::ffff:10.0.0.2",
            "fd00::7",
        ] {
            assert!(s.allows(ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "10.0.0.3",
            "10.0.2.1",
            "fd00:0:0:1::7",
            "::ffff:10.0.0.3",
            "0.0.0.0",
        ] {
            assert!(!s.allows(no.parse().unwrap()), "{no}");
        }
        assert_eq!(AllowSet::of(&parse_iface_spec("br0:80").unwrap()), None);
        assert!(!AllowSet::default().allows("10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn the_shared_table_scopes_only_its_slots() {
        let t = Scopes::default();
        let ip = "10.0.0.9".parse().unwrap();
        assert!(t.allows(3, ip) && !t.scoped(3));
        t.set(BTreeMap::from([(
            3,
            AllowSet::new(vec!["10.0.0.2/32".parse().unwrap()]),
        )]));
        assert!(!t.allows(3, ip) && t.scoped(3));
        assert!(t.allows(3, "10.0.0.2".parse().unwrap()));
        assert!(t.allows(4, ip), "another rule is not scoped");
        t.set(BTreeMap::new());
        assert!(t.allows(3, ip));
    }
}
