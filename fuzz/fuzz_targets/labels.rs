//! A Docker network's `lhb.expose` label: whoever may create a network writes it, so
//! any value gives rules and refusals, never a panic; every rule it gives is an entry
//! the administrator allowed, once, and the refusals account for the rest.
#![no_main]

use lhb_daemon::model::labels::{self, Entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    // The first line is the allow-list (comma-separated), the rest the label's value.
    let (allow, value) = text.split_once('\n').unwrap_or(("80,5432=127.0.0.1:15432", text));
    let allowed: Vec<Entry> = allow
        .split(',')
        .filter_map(|e| Entry::parse(e.trim()).ok())
        .collect();
    let (rules, refused) = labels::network_rules("fuzz_default", value, &allowed);
    assert!(rules.len() <= labels::MAX_ENTRIES);
    let mut ports = std::collections::BTreeSet::new();
    for r in &rules {
        let e = Entry {
            port: r.port,
            protocol: r.protocol,
            target: r.target,
        };
        assert!(allowed.contains(&e), "{r} was not allowed");
        assert!(r.target.ip().is_loopback(), "{r}");
        assert!(ports.insert(r.port), "{r} twice");
    }
    let entries = value.split(',').filter(|e| !e.trim().is_empty()).count();
    if value.len() <= labels::MAX_LEN {
        assert_eq!(rules.len() + refused.len(), entries, "{value:?}");
    } else {
        assert!(rules.is_empty() && refused.len() == 1);
    }
    for f in &refused {
        assert!(!f.reason.is_empty() && f.entry.len() <= value.len().max(43));
    }
});
