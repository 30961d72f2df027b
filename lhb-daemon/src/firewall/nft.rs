//! The native nftables backend: every base chain on the input hook (ip, ip6, inet) that
//! could drop gets lhb's accept inserted at its top. In auto mode the chains iptables-nft
//! manages (filter/mangle/raw/security/nat tables with upper-case chain names, as UFW and
//! Docker make them) are left to the iptables backend.

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use serde_json::Value;

use super::{Backend, Exec, Insert, Opening, run};

pub struct Nft {
    skip_xtables: bool,
}

struct Chain {
    family: String,
    table: String,
    name: String,
    /// A drop policy or a rule that drops, rejects or jumps elsewhere.
    may_drop: bool,
}

struct Rule {
    family: String,
    table: String,
    chain: String,
    handle: u64,
    comment: Option<String>,
}

impl Nft {
    pub fn detect(skip_xtables: bool) -> Option<Nft> {
        run("nft", &["-j", "list", "tables"]).ok()?;
        Some(Nft { skip_xtables })
    }

    fn ruleset(&self) -> anyhow::Result<(Vec<Chain>, Vec<Rule>)> {
        let v: Value = serde_json::from_str(&run("nft", &["-j", "-a", "list", "ruleset"])?)
            .context("nft -j output")?;
        let items = v["nftables"].as_array().cloned().unwrap_or_default();
        let mut chains = Vec::new();
        let mut rules = Vec::new();
        for item in &items {
            if let Some(c) = item.get("chain") {
                let family = c["family"].as_str().unwrap_or_default().to_string();
                let table = c["table"].as_str().unwrap_or_default().to_string();
                let name = c["name"].as_str().unwrap_or_default().to_string();
                if c["hook"].as_str() != Some("input")
                    || !matches!(family.as_str(), "ip" | "ip6" | "inet")
                    || !plain_name(&table)
                    || !plain_name(&name)
                    || (self.skip_xtables && xtables_managed(&family, &table, &name))
                {
                    continue;
                }
                chains.push(Chain {
                    may_drop: c["policy"].as_str() == Some("drop"),
                    family,
                    table,
                    name,
                });
            } else if let Some(r) = item.get("rule") {
                rules.push((
                    Rule {
                        family: r["family"].as_str().unwrap_or_default().to_string(),
                        table: r["table"].as_str().unwrap_or_default().to_string(),
                        chain: r["chain"].as_str().unwrap_or_default().to_string(),
                        handle: r["handle"].as_u64().unwrap_or_default(),
                        comment: r["comment"].as_str().map(String::from),
                    },
                    may_leave(&r["expr"]),
                ));
            }
        }
        for (r, verdict) in &rules {
            if *verdict
                && r.comment.as_deref().and_then(Opening::from_tag).is_none()
                && let Some(c) = chains
                    .iter_mut()
                    .find(|c| c.family == r.family && c.table == r.table && c.name == r.chain)
            {
                c.may_drop = true;
            }
        }
        Ok((chains, rules.into_iter().map(|(r, _)| r).collect()))
    }
}

/// Whether a rule's expressions hold a verdict that can end the packet's way through
/// the chain other than by accepting it: drop, reject, or a jump/goto (the target chain
/// may drop), anywhere, verdict maps included: a walk over the JSON as `nft -j` prints
/// it. Moving this backend to the `nftables` crate's typed schema (it parses rulesets
/// with iptables-nft's `xt` matches too, measured with 0.6.3) is still open.
fn may_leave(expr: &Value) -> bool {
    match expr {
        Value::Object(m) => m.iter().any(|(k, v)| {
            matches!(k.as_str(), "drop" | "reject" | "jump" | "goto") || may_leave(v)
        }),
        Value::Array(a) => a.iter().any(may_leave),
        _ => false,
    }
}

/// A table or chain name lhb writes into a script unquoted: nft identifier characters
/// only. Others (possible with quoting) are left alone, never guessed at.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'/'))
}

/// Whether `r` sits in one of `chains` (lhb's input base chains).
fn in_chains(chains: &[Chain], r: &Rule) -> bool {
    chains
        .iter()
        .any(|c| c.family == r.family && c.table == r.table && c.name == r.chain)
}

/// Whether chain `c` holds a rule tagged `tag`.
fn has_tag(rules: &[Rule], c: &Chain, tag: &str) -> bool {
    rules.iter().any(|r| {
        r.family == c.family
            && r.table == c.table
            && r.chain == c.name
            && r.comment.as_deref() == Some(tag)
    })
}

/// Whether chain `c` sees `o`'s address family.
fn fits(c: &Chain, o: &Opening) -> bool {
    match c.family.as_str() {
        "ip" => o.gateway.is_ipv4(),
        "ip6" => o.gateway.is_ipv6(),
        _ => true,
    }
}

/// Tables and chains as iptables-nft makes them.
fn xtables_managed(family: &str, table: &str, chain: &str) -> bool {
    matches!(family, "ip" | "ip6")
        && matches!(table, "filter" | "mangle" | "raw" | "security" | "nat")
        && chain
            .chars()
            .all(|c| c.is_ascii_uppercase() || c == '_' || c == '-')
}

pub(super) fn nft_script(script: &str) -> anyhow::Result<()> {
    let mut child = tokio::task::block_in_place(|| {
        Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    })
    .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = tokio::task::block_in_place(|| child.wait_with_output())?;
    if !out.status.success() {
        anyhow::bail!(
            "nft: {}: {}",
            script.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Backend for Nft {
    fn name(&self) -> String {
        "nftables".into()
    }

    fn planned(&mut self, o: &Opening) -> anyhow::Result<Vec<Insert>> {
        let (chains, rules) = self.ruleset()?;
        let tag = o.tag();
        let proto = if o.gateway.is_ipv6() { "ip6" } else { "ip" };
        Ok(chains
            .iter()
            .filter(|c| c.may_drop && fits(c, o))
            .map(|c| {
                let rule = format!(
                    "insert rule {} {} {} iifname \"{}\" {proto} daddr {} tcp dport {} accept comment \"{tag}\"",
                    c.family, c.table, c.name, o.iface, o.gateway, o.port
                );
                Insert {
                    chain: format!("nft {} {} {}", c.family, c.table, c.name),
                    present: has_tag(&rules, c, &tag),
                    exec: Exec::Nft(format!("{rule}\n")),
                    rule: format!("nft {rule}"),
                }
            })
            .collect())
    }

    fn close(&mut self, o: &Opening) -> anyhow::Result<()> {
        let (chains, rules) = self.ruleset()?;
        let tag = o.tag();
        // Only where lhb inserts: a rule someone else tagged alike in another chain
        // (a forward chain, an output chain) is theirs.
        for r in rules
            .iter()
            .filter(|r| r.comment.as_deref() == Some(tag.as_str()) && in_chains(&chains, r))
        {
            nft_script(&format!(
                "delete rule {} {} {} handle {}\n",
                r.family, r.table, r.chain, r.handle
            ))?;
        }
        Ok(())
    }

    fn blockers(&mut self, o: &Opening) -> anyhow::Result<Vec<String>> {
        let (chains, rules) = self.ruleset()?;
        let tag = o.tag();
        Ok(chains
            .iter()
            .filter(|c| c.may_drop && fits(c, o))
            .filter(|c| !has_tag(&rules, c, &tag))
            .map(|c| format!("nft {} {} {} (input hook)", c.family, c.table, c.name))
            .collect())
    }

    fn missing(&mut self, held: &BTreeSet<Opening>) -> anyhow::Result<BTreeSet<Opening>> {
        if held.is_empty() {
            return Ok(BTreeSet::new());
        }
        let (chains, rules) = self.ruleset()?;
        Ok(held
            .iter()
            .filter(|o| {
                let tag = o.tag();
                chains
                    .iter()
                    .filter(|c| c.may_drop && fits(c, o))
                    .any(|c| !has_tag(&rules, c, &tag))
            })
            .cloned()
            .collect())
    }

    fn notified(&self) -> bool {
        true
    }

    fn leftovers(&mut self) -> anyhow::Result<BTreeSet<Opening>> {
        let (chains, rules) = self.ruleset()?;
        Ok(rules
            .iter()
            .filter(|r| in_chains(&chains, r))
            .filter_map(|r| r.comment.as_deref().and_then(Opening::from_tag))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::{may_leave, plain_name, xtables_managed};

    #[test]
    fn only_plain_chain_names_are_written_into_scripts() {
        assert!(plain_name("input"));
        assert!(plain_name("LIBVIRT_INP"));
        assert!(!plain_name("in put"));
        assert!(!plain_name("x\"; flush ruleset; \""));
        assert!(!plain_name(""));
    }

    #[test]
    fn verdicts_that_may_drop_are_found_anywhere_in_a_rule() {
        let rule = |j: &str| may_leave(&serde_json::from_str(j).unwrap());
        assert!(rule(
            r#"[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"br0"}},{"drop":null}]"#
        ));
        assert!(rule(
            r#"[{"reject":{"type":"icmpx","expr":"admin-prohibited"}}]"#
        ));
        assert!(rule(r#"[{"jump":{"target":"ufw-before-input"}}]"#));
        assert!(rule(
            r#"[{"vmap":{"key":{"meta":{"key":"iifname"}},"data":{"set":[["br0",{"goto":{"target":"x"}}]]}}}]"#
        ));
        assert!(!rule(
            r#"[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":22}},{"accept":null}]"#
        ));
        assert!(!rule(r#"[{"counter":{"packets":0,"bytes":0}}]"#));
        // A word "drop" in data is not a verdict.
        assert!(!rule(
            r#"[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"drop"}},{"accept":null}]"#
        ));
    }

    #[test]
    fn iptables_nft_chains_are_recognised() {
        assert!(xtables_managed("ip", "filter", "INPUT"));
        assert!(xtables_managed("ip6", "filter", "INPUT"));
        assert!(!xtables_managed("inet", "filter", "input"));
        assert!(!xtables_managed("ip", "myfw", "INPUT"));
        assert!(!xtables_managed("ip", "filter", "input"));
    }
}
