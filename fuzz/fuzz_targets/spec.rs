//! The rule spec parser (`--expose`, `--expose-iface`, `lhb expose`): never a panic,
//! and what it accepts is a loopback target, a real port, a name lhb may put into a
//! firewall rule, and prints back to a spec that parses to the same rule (protocol and
//! allow list included); an interface rule's allow list holds only addresses and
//! prefixes without host bits.
#![no_main]

use lhb_daemon::model::rule;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|spec: &str| {
    for iface in [true, false] {
        let Ok(r) = rule::parse_spec_for(spec, iface) else {
            continue;
        };
        assert!(r.port != 0 && r.target.port() != 0, "{spec:?}");
        assert!(r.target.ip().is_loopback(), "{spec:?}");
        let name = match &r.source {
            rule::Source::Interface(n) => {
                assert!(rule::valid_ifname(n), "{spec:?}");
                n
            }
            rule::Source::Network(n) => n,
        };
        let bare = name
            .strip_prefix("docker:")
            .or_else(|| name.strip_prefix("podman:"))
            .unwrap_or(name);
        assert!(!bare.contains([':', '=', ' ', '"', '*', '+']), "{spec:?}");
        for c in &r.allow {
            match c {
                rule::Client::Net(n) => {
                    assert!(iface, "{spec:?}: an address on a network rule");
                    assert_eq!(n.trunc(), *n, "{spec:?}");
                }
                _ => assert!(!iface, "{spec:?}: an engine client on an interface rule"),
            }
        }
        let mut again = format!("{}:{}{}={}", name, r.port, r.protocol.suffix(), r.target);
        if !r.allow.is_empty() {
            again = format!("{again}@{}", rule::allow_text(&r.allow));
        }
        let r2 = rule::parse_spec_for(&again, iface).expect("a rule's own spec parses");
        assert_eq!(
            (r2.source, r2.port, r2.protocol, r2.target, r2.allow),
            (r.source, r.port, r.protocol, r.target, r.allow)
        );
    }
});
