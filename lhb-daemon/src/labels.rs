//! Rules a Docker network asks for with its `lhb.expose` label (compose:
//! `networks: NAME: labels: lhb.expose: "11434,5432"`), served only where the host's
//! administrator allowed exactly that entry (`label_allow`, `--label-allow`).
//!
//! Anyone who may create a Docker network may set its labels, so a label only ever
//! selects among entries the administrator wrote: the port and the target must both
//! equal an allowed entry. A label never widens what lhb serves beyond that list, and a
//! rule the administrator wrote for the same network and port always wins.

use std::{fmt, net::SocketAddr};

use crate::{
    docker::DockerView,
    rule::{self, Rule, RuleError},
};

/// The Docker network label lhb reads.
pub const LABEL: &str = "lhb.expose";

/// Entries in one label beyond this are refused: a label is typed by a person, and a
/// network asking for more is a mistake or an attack on the rule table.
pub const MAX_ENTRIES: usize = 64;
/// A longer label value is refused whole.
pub const MAX_LEN: usize = 4096;

/// The labels of a network lhb keeps: `lhb.expose`, none other.
pub fn ours<I: IntoIterator<Item = (String, String)>>(
    labels: I,
) -> std::collections::BTreeMap<String, String> {
    labels.into_iter().filter(|(k, _)| k == LABEL).collect()
}

/// `PORT[/PROTOCOL][=TARGET]`: what a label entry may ask for, and what `label_allow`
/// allows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    pub port: u16,
    pub protocol: rule::Protocol,
    pub target: SocketAddr,
}

impl Entry {
    /// Parses `PORT[=TARGET]` with the same checks as a rule's port and target
    /// (loopback targets only).
    pub fn parse(text: &str) -> Result<Entry, RuleError> {
        let (port, target) = match text.split_once('=') {
            Some((p, t)) => (p, Some(t)),
            None => (text, None),
        };
        let (port, protocol) = rule::parse_port_protocol(text, port)?;
        let target = match target {
            Some(t) => rule::parse_target(text, t)?,
            None => rule::default_target(port),
        };
        Ok(Entry {
            port,
            protocol,
            target,
        })
    }
}

impl fmt::Display for Entry {
    /// The shortest form that parses back to the same entry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let suffix = self.protocol.suffix();
        if self.target == rule::default_target(self.port) {
            write!(f, "{}{suffix}", self.port)
        } else {
            write!(f, "{}{suffix}={}", self.port, self.target)
        }
    }
}

/// A label entry not served, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    pub network: String,
    /// The entry as written in the label.
    pub entry: String,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "network {} label {LABEL} entry `{}` refused: {}",
            self.network, self.entry, self.reason
        )
    }
}

/// What the labels of the engines' networks ask for: the rules to serve (Docker's
/// networks, then Podman's, each in name order) and the entries refused. `allowed`
/// empty: labels are not read at all. A name on both engines is written
/// `docker:NAME` / `podman:NAME` in the rules it gives, so each serves its own network.
pub fn rules(view: &DockerView, allowed: &[Entry]) -> (Vec<Rule>, Vec<Refusal>) {
    let mut rules = Vec::new();
    let mut refused = Vec::new();
    if allowed.is_empty() {
        return (rules, refused);
    }
    let empty = Default::default();
    let podman = view.podman.as_ref().map_or(&empty, |p| &p.networks);
    let engines = [
        ("docker:", &view.networks, podman),
        ("podman:", podman, &view.networks),
    ];
    for (prefix, networks, other) in engines {
        for (network, net) in networks {
            let Some(value) = net.labels.get(LABEL) else {
                continue;
            };
            let name = if other.contains_key(network) {
                format!("{prefix}{network}")
            } else {
                network.clone()
            };
            let (r, f) = network_rules(&name, value, allowed);
            rules.extend(r);
            refused.extend(f);
        }
    }
    (rules, refused)
}

/// The rules one network's label value asks for, and its entries refused.
pub fn network_rules(network: &str, value: &str, allowed: &[Entry]) -> (Vec<Rule>, Vec<Refusal>) {
    let mut rules: Vec<Rule> = Vec::new();
    let mut refused = Vec::new();
    let refuse = |entry: &str, reason: String| Refusal {
        network: network.to_string(),
        entry: entry.to_string(),
        reason,
    };
    let source = match rule::source(network, network, true) {
        Ok(s) => s,
        Err(e) => {
            refused.push(refuse(value, e.to_string()));
            return (rules, refused);
        }
    };
    if value.len() > MAX_LEN {
        let shown: String = value.chars().take(40).collect();
        refused.push(refuse(
            &format!("{shown}..."),
            format!("the label is {} bytes long; at most {MAX_LEN}", value.len()),
        ));
        return (rules, refused);
    }
    let entries: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    for (i, text) in entries.iter().enumerate() {
        if i >= MAX_ENTRIES {
            refused.push(refuse(
                text,
                format!(
                    "the label has {} entries; at most {MAX_ENTRIES}",
                    entries.len()
                ),
            ));
            continue;
        }
        let entry = match Entry::parse(text) {
            Ok(e) => e,
            Err(e) => {
                refused.push(refuse(text, e.to_string()));
                continue;
            }
        };
        if !allowed.contains(&entry) {
            let same_port: Vec<String> = allowed
                .iter()
                .filter(|a| a.port == entry.port)
                .map(Entry::to_string)
                .collect();
            let reason = if same_port.is_empty() {
                format!(
                    "port {} is not in label_allow (the administrator adds `{entry}` to label_allow in the config, or --label-allow {entry})",
                    entry.port
                )
            } else {
                let what = if allowed
                    .iter()
                    .any(|a| a.port == entry.port && a.target == entry.target)
                {
                    format!("protocol {}", entry.protocol)
                } else {
                    format!("target {}", entry.target)
                };
                format!(
                    "{what} is not allowed for port {}; label_allow has {} (write the entry exactly so)",
                    entry.port,
                    same_port.join(", ")
                )
            };
            refused.push(refuse(text, reason));
            continue;
        }
        if rules.iter().any(|r| r.port == entry.port) {
            refused.push(refuse(
                text,
                format!("port {} is asked for twice in the label", entry.port),
            ));
            continue;
        }
        let mut r = Rule::new(source.clone(), entry.port, Some(entry.target), None);
        r.protocol = entry.protocol;
        r.given = format!("label {LABEL} of Docker network {network}");
        rules.push(r);
    }
    (rules, refused)
}

/// `label_allow` entries from the command line and the config file, each once.
pub fn merge_allowed(cli: &[Entry], file: &[Entry]) -> Vec<Entry> {
    let mut all: Vec<Entry> = Vec::new();
    for e in cli.iter().chain(file) {
        if !all.contains(e) {
            all.push(e.clone());
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::DockerNetwork;

    fn allowed(list: &[&str]) -> Vec<Entry> {
        list.iter().map(|e| Entry::parse(e).unwrap()).collect()
    }

    fn view(nets: &[(&str, Option<&str>)]) -> DockerView {
        let mut v = DockerView {
            available: true,
            ..Default::default()
        };
        for (name, label) in nets {
            let mut n = DockerNetwork {
                driver: "bridge".into(),
                bridge: format!("br-{name}"),
                gateways: vec![],
                labels: Default::default(),
                members: Vec::new(),
            };
            if let Some(l) = label {
                n.labels.insert(LABEL.to_string(), l.to_string());
            }
            v.networks.insert(name.to_string(), n);
        }
        v
    }

    #[test]
    fn entries_parse_like_rules_and_print_back() {
        let e = Entry::parse("11434").unwrap();
        assert_eq!(e.target, "127.0.0.1:11434".parse().unwrap());
        assert_eq!(e.to_string(), "11434");
        let e = Entry::parse("5432=127.0.0.1:15432").unwrap();
        assert_eq!(e.to_string(), "5432=127.0.0.1:15432");
        assert_eq!(Entry::parse("5432=15432").unwrap(), e);
        assert_eq!(
            Entry::parse("53=[::1]:53").unwrap().to_string(),
            "53=[::1]:53"
        );
        for bad in ["0", "70000", "x", "80=10.0.0.1:80", "80=", "=80", ""] {
            assert!(Entry::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_entries_equal_to_an_allowed_one_are_served() {
        let allow = allowed(&["11434", "5432=127.0.0.1:15432"]);
        let v = view(&[
            ("proj_default", Some("11434, 5432=15432,6379,5432")),
            ("plain", None),
        ]);
        let (rules, refused) = rules(&v, &allow);
        let got: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            got,
            [
                "proj_default:11434 -> 127.0.0.1:11434",
                "proj_default:5432 -> 127.0.0.1:15432"
            ]
        );
        assert!(rules[0].given.contains("label lhb.expose"));
        let why: Vec<(&str, &str)> = refused
            .iter()
            .map(|r| (r.entry.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(why.len(), 2, "{why:?}");
        assert_eq!(why[0].0, "6379");
        assert!(
            why[0].1.contains("port 6379 is not in label_allow"),
            "{why:?}"
        );
        assert_eq!(why[1].0, "5432");
        assert!(
            why[1].1.contains("target 127.0.0.1:5432 is not allowed")
                && why[1].1.contains("5432=127.0.0.1:15432"),
            "{why:?}"
        );
    }

    #[test]
    fn podman_networks_labels_count_too_and_a_shared_name_says_its_engine() {
        let mut v = view(&[("web", Some("80")), ("api", Some("80"))]);
        let mut p = crate::podman::PodmanView {
            available: true,
            ..Default::default()
        };
        for (name, label) in [("web", "80"), ("pod", "80")] {
            let mut n = v.networks["web"].clone();
            n.labels.insert(LABEL.into(), label.into());
            p.networks.insert(name.into(), n);
        }
        v.podman = Some(p);
        let (rules, refused) = rules(&v, &allowed(&["80"]));
        assert!(refused.is_empty());
        let names: Vec<String> = rules.iter().map(|r| r.key().to_string()).collect();
        assert_eq!(
            names,
            ["api:80", "docker:web:80", "pod:80", "podman:web:80"]
        );
    }

    #[test]
    fn the_protocol_is_part_of_what_is_allowed() {
        let allow = allowed(&["53/udp=127.0.0.53:53", "8125/udp"]);
        assert_eq!(allow[1].to_string(), "8125/udp");
        let (rules, refused) = network_rules(
            "n",
            "53/udp=127.0.0.53:53, 53=127.0.0.53:53, 8125/both",
            &allow,
        );
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].protocol, rule::Protocol::Udp);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0].reason.starts_with(
                "protocol tcp is not allowed for port 53; label_allow has 53/udp=127.0.0.53:53"
            ),
            "{}",
            refused[0].reason
        );
        assert!(
            refused[1]
                .reason
                .starts_with("protocol both is not allowed")
        );
    }

    #[test]
    fn without_allowed_entries_labels_are_not_read() {
        let v = view(&[("p", Some("11434"))]);
        assert_eq!(rules(&v, &[]), (vec![], vec![]));
    }

    #[test]
    fn bad_entries_are_refused_one_by_one_and_oversized_labels_whole() {
        let allow = allowed(&["80", "81"]);
        let (r, f) = network_rules("n", "80,zz,80=127.0.0.1:80,,81=10.1.1.1:81", &allow);
        assert_eq!(r.len(), 1);
        let entries: Vec<&str> = f.iter().map(|x| x.entry.as_str()).collect();
        assert_eq!(entries, ["zz", "80=127.0.0.1:80", "81=10.1.1.1:81"]);
        assert!(f[1].reason.contains("twice"));
        assert!(f[2].reason.contains("not a loopback"));

        let long = "80,".repeat(MAX_LEN);
        let (r, f) = network_rules("n", &long, &allow);
        assert!(r.is_empty() && f.len() == 1 && f[0].reason.contains("bytes long"));

        let many: Vec<String> = (1..=100).map(|p| p.to_string()).collect();
        let allow: Vec<Entry> = (1..=100)
            .map(|p| Entry::parse(&p.to_string()).unwrap())
            .collect();
        let (r, f) = network_rules("n", &many.join(","), &allow);
        assert_eq!((r.len(), f.len()), (MAX_ENTRIES, 100 - MAX_ENTRIES));
    }

    #[test]
    fn allowed_entries_merge_once() {
        let m = merge_allowed(
            &allowed(&["80", "81"]),
            &allowed(&["80=127.0.0.1:80", "82"]),
        );
        assert_eq!(m, allowed(&["80", "81", "82"]));
    }
}
