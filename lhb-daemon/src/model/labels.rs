//! Rules a Docker network asks for with its `lhb.expose` label (compose:
//! `networks: NAME: labels: lhb.expose: "11434,5432"`), served only where the host's
//! administrator allowed exactly that entry (`label_allow`, `--label-allow`).
//!
//! Anyone who may create a Docker network may set its labels, so a label only ever
//! selects among entries the administrator wrote: the port and the target must both
//! equal an allowed entry. A label never widens what lhb serves beyond that list, and a
//! rule the administrator wrote for the same network and port always wins.

use std::{fmt, net::SocketAddr};

use std::collections::BTreeSet;

use crate::model::rule::{self, Rule, RuleError, RuleKey};

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

/// The label rules to serve beside the administrator's `rules`: those whose network
/// and port no rule of the administrator's names (that rule wins), as far as the rule
/// table has room; and the keys of those left out for room.
pub fn label_rules(rules: &[Rule], labels: &[Rule]) -> (Vec<Rule>, Vec<RuleKey>) {
    let taken: BTreeSet<RuleKey> = rules.iter().map(Rule::key).collect();
    let room = (lhb_common::MAX_RULES as usize).saturating_sub(rules.len());
    let mut take = Vec::new();
    let mut over = Vec::new();
    for r in labels.iter().filter(|r| !taken.contains(&r.key())) {
        if take.len() < room {
            take.push(r.clone());
        } else {
            over.push(r.key());
        }
    }
    (take, over)
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

    fn spec(s: &str) -> Rule {
        rule::parse_network_spec(s).unwrap()
    }

    fn allowed(list: &[&str]) -> Vec<Entry> {
        list.iter().map(|e| Entry::parse(e).unwrap()).collect()
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

    #[test]
    fn label_rules_beyond_the_rule_table_are_left_out_not_an_error() {
        let max = lhb_common::MAX_RULES as usize;
        let mine: Vec<Rule> = (1..max).map(|p| spec(&format!("a:{p}"))).collect();
        let labels = vec![spec("b:1"), spec("b:2"), spec("a:1")];
        let (take, over) = label_rules(&mine, &labels);
        assert_eq!(take, vec![spec("b:1")]);
        assert_eq!(over, vec![spec("b:2").key()]);
    }
}
