//! The rule set a daemon serves (and `lhb plan` shows): command-line rules, the config
//! file's, those `lhb expose` added at runtime, less those `lhb unexpose` removed, and
//! those network labels ask for; each active rule with its counter slot and its origin,
//! by key.

use std::collections::{BTreeSet, HashMap};

use crate::{
    engines::EngineView,
    model::{
        labels::{Entry, Refusal},
        rule::{self, Origin, Rule, RuleKey},
    },
};

/// Counter slots: a rule keeps its slot (and counters) across reloads.
#[derive(Default)]
pub struct Slots {
    by_rule: HashMap<RuleKey, u32>,
    free: Vec<u32>,
    next: u32,
}

impl Slots {
    /// Slots for `rules`, in order, and the ones that are new (to be zeroed).
    pub fn assign(&mut self, rules: &[Rule]) -> (Vec<u32>, Vec<u32>) {
        let keys: BTreeSet<RuleKey> = rules.iter().map(Rule::key).collect();
        self.by_rule.retain(|k, s| {
            let keep = keys.contains(k);
            if !keep {
                self.free.push(*s);
            }
            keep
        });
        let mut fresh = Vec::new();
        let slots = rules
            .iter()
            .map(|r| {
                *self.by_rule.entry(r.key()).or_insert_with(|| {
                    let s = self.free.pop().unwrap_or_else(|| {
                        self.next += 1;
                        self.next - 1
                    });
                    fresh.push(s);
                    s
                })
            })
            .collect();
        (slots, fresh)
    }
}

/// A rule being served (or waiting), with what the daemon keeps for it.
#[derive(Clone, Debug)]
pub struct ActiveRule {
    pub rule: Rule,
    pub slot: u32,
    pub origin: Origin,
}

/// What taking the labels' rules did.
pub struct Labelled {
    /// None: the labels ask for what they asked before; else the recombination's new
    /// slots, or its error.
    pub fresh: Option<anyhow::Result<Vec<u32>>>,
    /// Label entries not taken, and why.
    pub refused: Vec<Refusal>,
}

#[derive(Default)]
pub struct RuleSet {
    /// In order: command line, file, runtime. Where two rules claim one bridge and port
    /// the earlier is served, so the order is kept.
    active: Vec<ActiveRule>,
    cli: Vec<Rule>,
    file: Vec<Rule>,
    /// `lhb expose` without --persist: until the next start.
    runtime: Vec<Rule>,
    /// `lhb unexpose` without --persist of a command-line or file rule.
    removed: BTreeSet<RuleKey>,
    /// What Docker networks' labels ask for and `label_allow` allows, in network order.
    labels: Vec<Rule>,
    /// Label rules left out because the rule table was full.
    labels_over_limit: Vec<RuleKey>,
    slots: Slots,
}

/// What a change saved, to put back if it cannot be completed.
pub struct Saved {
    file: Vec<Rule>,
    runtime: Vec<Rule>,
    removed: BTreeSet<RuleKey>,
}

impl RuleSet {
    /// The rules given at start; the slots that are new (all of them).
    pub fn new(cli: Vec<Rule>, file: Vec<Rule>) -> anyhow::Result<(RuleSet, Vec<u32>)> {
        let mut set = RuleSet {
            cli,
            file,
            ..Default::default()
        };
        let fresh = set.recombine()?;
        Ok((set, fresh))
    }

    pub fn iter(&self) -> impl Iterator<Item = &ActiveRule> {
        self.active.iter()
    }

    /// Each rule with its slot, in order, as `reconcile::plan` takes them.
    pub fn planned(&self) -> impl Iterator<Item = (&Rule, u32)> {
        self.active.iter().map(|a| (&a.rule, a.slot))
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    pub fn get(&self, key: &RuleKey) -> Option<&ActiveRule> {
        self.active.iter().find(|a| a.rule.key() == *key)
    }

    pub fn in_file(&self, key: &RuleKey) -> bool {
        self.file.iter().any(|r| r.key() == *key)
    }

    pub fn save(&self) -> Saved {
        Saved {
            file: self.file.clone(),
            runtime: self.runtime.clone(),
            removed: self.removed.clone(),
        }
    }

    pub fn restore(&mut self, s: Saved) {
        (self.file, self.runtime, self.removed) = (s.file, s.runtime, s.removed);
    }

    pub fn set_file(&mut self, file: Vec<Rule>) {
        self.file = file;
    }

    /// The rules labels ask for now; whether they differ from the last ones.
    pub fn set_labels(&mut self, labels: Vec<Rule>) -> bool {
        if self.labels == labels {
            return false;
        }
        self.labels = labels;
        true
    }

    /// Takes the rules the engines' network labels ask for now (`view` None: no engine
    /// is read) and that `allow` allows, recombining if they changed.
    pub fn follow_labels(&mut self, view: Option<&EngineView>, allow: &[Entry]) -> Labelled {
        let (asked, mut refused) = super::asked_by_labels(view, allow);
        let fresh = if self.set_labels(asked) {
            // Label rules never fail to combine (see `recombine`); an error here is one
            // of the administrator's rules, which the last change already passed.
            Some(self.recombine())
        } else {
            None
        };
        refused.extend(self.labels_over_limit.iter().map(|key| Refusal {
            network: key.source.name().to_string(),
            entry: key.port.to_string(),
            reason: format!("the rule table is full ({} rules)", lhb_common::MAX_RULES),
        }));
        Labelled { fresh, refused }
    }

    /// Label rules left out at the last recombination because the rule table was full.
    pub fn labels_over_limit(&self) -> &[RuleKey] {
        &self.labels_over_limit
    }

    /// `lhb expose` without --persist.
    pub fn add_runtime(&mut self, rule: Rule) {
        self.removed.remove(&rule.key());
        self.runtime.push(rule);
    }

    /// `lhb expose --persist`: the file has it now; an earlier unexpose is undone.
    pub fn unremove(&mut self, key: &RuleKey) {
        self.removed.remove(key);
    }

    /// `lhb unexpose`: a runtime rule goes; a command-line or file rule is left out
    /// until the next start.
    pub fn remove(&mut self, key: &RuleKey) {
        self.runtime.retain(|r| r.key() != *key);
        if self.cli.iter().chain(&self.file).any(|r| r.key() == *key) {
            self.removed.insert(key.clone());
        }
    }

    /// The active rules from the parts again; the slots that are new (to be zeroed).
    /// An error (a duplicate, too many rules) leaves the active rules as they were.
    /// Label rules come last and never cause an error: one for a network and port an
    /// administrator's rule already names is left out (that rule wins), and so is one
    /// that would not fit in the rule table.
    pub fn recombine(&mut self) -> anyhow::Result<Vec<u32>> {
        let mut tagged: Vec<(Rule, Origin)> = self
            .cli
            .iter()
            .map(|r| (r, Origin::CommandLine))
            .chain(self.file.iter().map(|r| (r, Origin::Config)))
            .chain(self.runtime.iter().map(|r| (r, Origin::Runtime)))
            .filter(|(r, _)| !self.removed.contains(&r.key()))
            .map(|(r, o)| (r.clone(), o))
            .collect();
        let mut rules: Vec<Rule> = tagged.iter().map(|(r, _)| r.clone()).collect();
        rule::check_unique(&rules)?;
        let (labels, over) = crate::model::labels::label_rules(&rules, &self.labels);
        rules.extend(labels.iter().cloned());
        tagged.extend(labels.into_iter().map(|r| (r, Origin::Label)));
        self.labels_over_limit = over;
        let (slots, fresh) = self.slots.assign(&rules);
        self.active = tagged
            .into_iter()
            .zip(slots)
            .map(|((rule, origin), slot)| ActiveRule { rule, slot, origin })
            .collect();
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(spec: &str) -> Rule {
        rule::parse_network_spec(spec).unwrap()
    }

    #[test]
    fn an_administrators_rule_wins_over_a_label_and_labels_come_and_go() {
        let (mut set, _) = RuleSet::new(vec![rule("web:80=81")], vec![]).unwrap();
        assert!(set.set_labels(vec![rule("web:80"), rule("web:443")]));
        set.recombine().unwrap();
        let shown: Vec<(String, Origin)> =
            set.iter().map(|a| (a.rule.to_string(), a.origin)).collect();
        assert_eq!(
            shown,
            [
                ("web:80 -> 127.0.0.1:81".to_string(), Origin::CommandLine),
                ("web:443 -> 127.0.0.1:443".to_string(), Origin::Label),
            ]
        );
        let slot = set.get(&rule("web:443").key()).unwrap().slot;
        // The same labels again: nothing to do; the label rule keeps its slot.
        assert!(!set.set_labels(vec![rule("web:80"), rule("web:443")]));
        set.add_runtime(rule("db:5432"));
        set.recombine().unwrap();
        assert_eq!(set.get(&rule("web:443").key()).unwrap().slot, slot);
        // The network loses its label: its rule goes, the others stay.
        assert!(set.set_labels(vec![]));
        set.recombine().unwrap();
        assert!(set.get(&rule("web:443").key()).is_none());
        assert_eq!(set.len(), 2);
    }
}
