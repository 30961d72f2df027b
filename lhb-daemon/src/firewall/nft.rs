//! The native nftables backend: every base chain on the input hook (ip, ip6, inet) that
//! could drop gets lhb's accept inserted at its top. In auto mode the chains iptables-nft
//! manages (filter/mangle/raw/security/nat tables with upper-case chain names, as UFW and
//! Docker make them) are left to the iptables backend.
//!
//! The ruleset is read and written through the `nftables` crate's typed schema (the
//! one netavark uses): `nft -j` listings parsed into statements, and every change for
//! one opening sent as one JSON batch, which nft applies atomically.

use std::{borrow::Cow, collections::BTreeSet};

use nftables::{
    batch::Batch,
    expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem, Verdict},
    helper::{self, NftablesError},
    schema::{NfCmd, NfListObject, NfObject},
    stmt::{Match, Operator, Statement},
    types::{NfFamily, NfHook},
};

use super::{Backend, Exec, Insert, Opening, run};

pub struct Nft {
    skip_xtables: bool,
    /// firewalld's own tables are left to the firewalld backend: firewalld rewrites
    /// them at every reload, and its rejects run whatever another table accepts.
    skip_firewalld: bool,
    /// `Backend::memo`: None when off; on, the ruleset once read.
    memo: Option<Option<(Vec<Chain>, Vec<Rule>)>>,
}

#[derive(Clone)]
struct Chain {
    family: NfFamily,
    table: String,
    name: String,
    /// A drop policy or a rule that drops, rejects or jumps elsewhere.
    may_drop: bool,
}

#[derive(Clone)]
struct Rule {
    family: NfFamily,
    table: String,
    chain: String,
    handle: Option<u32>,
    comment: Option<String>,
}

/// The fields of a listed rule lhb needs even when its statements are beyond the typed
/// schema (the crate does not know every statement nft has, `last` for one).
#[derive(serde::Deserialize)]
struct BareRule {
    family: NfFamily,
    table: String,
    chain: String,
    handle: Option<u32>,
    comment: Option<String>,
}

impl Nft {
    pub fn detect(skip_xtables: bool, skip_firewalld: bool) -> Option<Nft> {
        run("nft", &["-j", "list", "tables"]).ok()?;
        Some(Nft {
            skip_xtables,
            skip_firewalld,
            memo: None,
        })
    }

    /// lhb's input base chains and every rule, each rule with whether it may end a
    /// packet's way other than by accepting it.
    fn ruleset(&mut self) -> anyhow::Result<(Vec<Chain>, Vec<Rule>)> {
        if let Some(Some(read)) = &self.memo {
            return Ok(read.clone());
        }
        let read = self.read_ruleset()?;
        if let Some(memo) = &mut self.memo {
            *memo = Some(read.clone());
        }
        Ok(read)
    }

    fn read_ruleset(&self) -> anyhow::Result<(Vec<Chain>, Vec<Rule>)> {
        let raw = tokio::task::block_in_place(|| {
            helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["-a", "list", "ruleset"])
        })
        .map_err(nft_error)?;
        let listing: Listing = serde_json::from_str(&raw)
            .map_err(|e| anyhow::anyhow!("reading `nft -j list ruleset`: {e}"))?;
        let mut chains = Vec::new();
        let mut rules = Vec::new();
        for item in listing.nftables {
            match serde_json::from_value::<NfObject>(item.clone()) {
                Ok(NfObject::ListObject(NfListObject::Chain(c))) if self.serves(&c) => {
                    chains.push(Chain {
                        may_drop: c.policy == Some(nftables::types::NfChainPolicy::Drop),
                        family: c.family,
                        table: c.table.into_owned(),
                        name: c.name.into_owned(),
                    });
                }
                Ok(NfObject::ListObject(NfListObject::Rule(r))) => {
                    let leaves = r.expr.iter().any(may_leave);
                    rules.push((
                        Rule {
                            family: r.family,
                            table: r.table.into_owned(),
                            chain: r.chain.into_owned(),
                            handle: r.handle,
                            comment: r.comment.map(Cow::into_owned),
                        },
                        leaves,
                    ));
                }
                // A rule the schema cannot type: counted as one that may drop, so the
                // accept goes in; a wrong guess costs one harmless rule, never a block.
                Err(_) if item.get("rule").is_some() => {
                    let r: BareRule = serde_json::from_value(item["rule"].clone())
                        .map_err(|e| anyhow::anyhow!("reading a rule from nft: {e}"))?;
                    let BareRule {
                        family,
                        table,
                        chain,
                        handle,
                        comment,
                    } = r;
                    rules.push((
                        Rule {
                            family,
                            table,
                            chain,
                            handle,
                            comment,
                        },
                        true,
                    ));
                }
                _ => {}
            }
        }
        for (r, leaves) in &rules {
            if *leaves
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

    /// Whether lhb inserts into chain `c`: an input base chain of an IP family, with
    /// plain names, not left to the iptables backend.
    fn serves(&self, c: &nftables::schema::Chain) -> bool {
        c.hook == Some(NfHook::Input)
            && matches!(c.family, NfFamily::IP | NfFamily::IP6 | NfFamily::INet)
            && plain_name(&c.table)
            && plain_name(&c.name)
            && !(self.skip_xtables && xtables_managed(c.family, &c.table, &c.name))
            && !(self.skip_firewalld && c.table == "firewalld")
    }
}

#[derive(serde::Deserialize)]
struct Listing {
    nftables: Vec<serde_json::Value>,
}

/// nft's own words: the crate's error text leaves out its stderr.
fn nft_error(e: NftablesError) -> anyhow::Error {
    match e {
        NftablesError::NftFailed { hint, stderr, .. } => {
            anyhow::anyhow!("nft failed while {hint}: {}", stderr.trim())
        }
        e => anyhow::anyhow!("{e}"),
    }
}

/// Sends `batch` to nft in one transaction.
fn apply(batch: Batch<'_>) -> anyhow::Result<()> {
    let ruleset = batch.to_nftables();
    tokio::task::block_in_place(|| helper::apply_ruleset(&ruleset)).map_err(nft_error)
}

/// Whether a statement can end the packet's way through the chain other than by
/// accepting it: drop, reject, queue (userspace may drop), a jump or goto (the target
/// chain may drop), a verdict map holding one of these, an iptables-nft target.
fn may_leave(s: &Statement) -> bool {
    match s {
        Statement::Drop(_)
        | Statement::Reject(_)
        | Statement::Jump(_)
        | Statement::Goto(_)
        | Statement::Queue(_) => true,
        Statement::VerdictMap(m) => verdicts_may_leave(&m.data),
        Statement::XT(Some(x)) => x.get("type").and_then(|t| t.as_str()) == Some("target"),
        _ => false,
    }
}

fn verdicts_may_leave(e: &Expression) -> bool {
    match e {
        Expression::Verdict(Verdict::Drop | Verdict::Jump(_) | Verdict::Goto(_)) => true,
        Expression::List(l) => l.iter().any(verdicts_may_leave),
        Expression::Named(NamedExpression::Set(items)) => items.iter().any(|i| match i {
            SetItem::Element(e) | SetItem::Mapping(_, e) => verdicts_may_leave(e),
            SetItem::MappingStatement(_, s) => may_leave(s),
        }),
        // A named map (`@name`): its verdicts are not in the rule; assume the worst.
        Expression::String(s) => s.starts_with('@'),
        _ => false,
    }
}

/// The accept lhb inserts for `o` into chain `c`.
fn accept(c: &Chain, o: &Opening, tag: &str) -> nftables::schema::Rule<'static> {
    let eq = |left, right| {
        Statement::Match(Match {
            left,
            right,
            op: Operator::EQ,
        })
    };
    let field = |protocol: &'static str, field: &'static str| {
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: protocol.into(),
                field: field.into(),
            },
        )))
    };
    let ip = if o.gateway.is_ipv6() { "ip6" } else { "ip" };
    nftables::schema::Rule {
        family: c.family,
        table: c.table.clone().into(),
        chain: c.name.clone().into(),
        expr: vec![
            eq(
                Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::Iifname,
                })),
                Expression::String(o.iface.clone().into()),
            ),
            eq(
                field(ip, "daddr"),
                Expression::String(o.gateway.to_string().into()),
            ),
            eq(
                field(o.transport.as_str(), "dport"),
                Expression::Number(o.port.into()),
            ),
            Statement::Accept(None),
        ]
        .into(),
        comment: Some(tag.to_string().into()),
        ..Default::default()
    }
}

fn family_name(f: NfFamily) -> &'static str {
    match f {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

/// A table or chain name lhb shows in `nft` syntax unquoted: nft identifier characters
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
    match c.family {
        NfFamily::IP => o.gateway.is_ipv4(),
        NfFamily::IP6 => o.gateway.is_ipv6(),
        _ => true,
    }
}

/// Tables and chains as iptables-nft makes them.
fn xtables_managed(family: NfFamily, table: &str, chain: &str) -> bool {
    matches!(family, NfFamily::IP | NfFamily::IP6)
        && matches!(table, "filter" | "mangle" | "raw" | "security" | "nat")
        && chain
            .chars()
            .all(|c| c.is_ascii_uppercase() || c == '_' || c == '-')
}

/// Adds to `batch` the inserts of `planned` not there yet; whether there were any.
fn add_inserts(planned: &[Insert], batch: &mut Batch<'static>) -> bool {
    let mut any = false;
    for i in planned {
        if let (false, Exec::Nft(rule)) = (i.present, &i.exec) {
            batch.add_cmd(NfCmd::Insert(NfListObject::Rule((**rule).clone())));
            any = true;
        }
    }
    any
}

/// Inserts `rule` at the top of its chain.
pub(super) fn insert(rule: &nftables::schema::Rule<'static>) -> anyhow::Result<()> {
    let mut batch = Batch::new();
    batch.add_cmd(NfCmd::Insert(NfListObject::Rule(rule.clone())));
    apply(batch)
}

impl Backend for Nft {
    fn name(&self) -> String {
        "nftables".into()
    }

    fn planned(&mut self, o: &Opening) -> anyhow::Result<Vec<Insert>> {
        let (chains, rules) = self.ruleset()?;
        let tag = o.tag();
        let ip = if o.gateway.is_ipv6() { "ip6" } else { "ip" };
        Ok(chains
            .iter()
            .filter(|c| c.may_drop && fits(c, o))
            .map(|c| {
                let chain = format!("{} {} {}", family_name(c.family), c.table, c.name);
                Insert {
                    rule: format!(
                        "nft insert rule {chain} iifname \"{}\" {ip} daddr {} {} dport {} accept comment \"{tag}\"",
                        o.iface,
                        o.gateway,
                        o.transport.as_str(),
                        o.port
                    ),
                    chain: format!("nft {chain}"),
                    present: has_tag(&rules, c, &tag),
                    exec: Exec::Nft(Box::new(accept(c, o, &tag))),
                }
            })
            .collect())
    }

    /// Every missing accept for `o` in one batch: all chains or none.
    fn open(&mut self, o: &Opening) -> anyhow::Result<Vec<String>> {
        let planned = self.planned(o)?;
        let mut batch = Batch::new();
        if add_inserts(&planned, &mut batch) {
            apply(batch)?;
        }
        Ok(planned.into_iter().map(|i| i.chain).collect())
    }

    /// Every opening's missing accepts in one batch; one by one if it fails, so that
    /// each opening gets its own answer.
    fn open_all(&mut self, os: &[Opening]) -> Vec<anyhow::Result<Vec<String>>> {
        let mut batch = Batch::new();
        let mut any = false;
        let mut results = Vec::new();
        for o in os {
            match self.planned(o) {
                Ok(planned) => {
                    any |= add_inserts(&planned, &mut batch);
                    results.push(Ok(planned.into_iter().map(|i| i.chain).collect()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if any && apply(batch).is_err() {
            return os.iter().map(|o| self.open(o)).collect();
        }
        results
    }

    fn close(&mut self, o: &Opening) -> anyhow::Result<()> {
        self.close_all(std::slice::from_ref(o))
    }

    /// Every tagged rule of `os` deleted in one batch.
    fn close_all(&mut self, os: &[Opening]) -> anyhow::Result<()> {
        let (chains, rules) = self.ruleset()?;
        let tags: BTreeSet<String> = os.iter().map(Opening::tag).collect();
        let mut batch = Batch::new();
        let mut any = false;
        // Only where lhb inserts: a rule someone else tagged alike in another chain
        // (a forward chain, an output chain) is theirs.
        for r in rules.iter().filter(|r| {
            r.comment.as_ref().is_some_and(|c| tags.contains(c)) && in_chains(&chains, r)
        }) {
            batch.delete(NfListObject::Rule(nftables::schema::Rule {
                family: r.family,
                table: r.table.clone().into(),
                chain: r.chain.clone().into(),
                handle: r.handle,
                ..Default::default()
            }));
            any = true;
        }
        if any {
            apply(batch)?;
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
            .map(|c| {
                format!(
                    "nft {} {} {} (input hook)",
                    family_name(c.family),
                    c.table,
                    c.name
                )
            })
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

    fn memo(&mut self, on: bool) {
        self.memo = on.then_some(None);
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
    use nftables::{stmt::Statement, types::NfFamily};

    use super::{may_leave, plain_name, xtables_managed};

    #[test]
    fn only_plain_chain_names_are_shown_unquoted() {
        assert!(plain_name("input"));
        assert!(plain_name("LIBVIRT_INP"));
        assert!(!plain_name("in put"));
        assert!(!plain_name("x\"; flush ruleset; \""));
        assert!(!plain_name(""));
    }

    #[test]
    fn verdicts_that_may_drop_are_found_anywhere_in_a_rule() {
        let rule = |j: &str| {
            serde_json::from_str::<Vec<Statement>>(j)
                .unwrap()
                .iter()
                .any(may_leave)
        };
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
        assert!(rule(
            r#"[{"vmap":{"key":{"ct":{"key":"state"}},"data":{"set":[["established",{"accept":null}]]}}},{"vmap":{"key":{"meta":{"key":"iifname"}},"data":"@zones"}}]"#
        ));
        assert!(!rule(
            r#"[{"vmap":{"key":{"ct":{"key":"state"}},"data":{"set":[["established",{"accept":null}],["related",{"accept":null}]]}}}]"#
        ));
        assert!(!rule(
            r#"[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":22}},{"accept":null}]"#
        ));
        assert!(!rule(r#"[{"counter":{"packets":0,"bytes":0}}]"#));
        // A word "drop" in data is not a verdict.
        assert!(!rule(
            r#"[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"drop"}},{"accept":null}]"#
        ));
        // iptables-nft: a match is not a verdict, a target may be.
        assert!(!rule(r#"[{"xt":{"type":"match","name":"conntrack"}}]"#));
        assert!(rule(r#"[{"xt":{"type":"target","name":"REJECT"}}]"#));
    }

    #[test]
    fn iptables_nft_chains_are_recognised() {
        assert!(xtables_managed(NfFamily::IP, "filter", "INPUT"));
        assert!(xtables_managed(NfFamily::IP6, "filter", "INPUT"));
        assert!(!xtables_managed(NfFamily::INet, "filter", "input"));
        assert!(!xtables_managed(NfFamily::IP, "myfw", "INPUT"));
        assert!(!xtables_managed(NfFamily::IP, "filter", "input"));
    }
}
