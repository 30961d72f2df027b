//! The rules the engines' network labels ask for (`lhb.expose`), as far as `label_allow`
//! lets them: the engines' view in, rules and refusals out.

use crate::{
    engines::{Engine, EngineView},
    model::labels::{Entry, LABEL, Refusal, network_rules},
    model::rule::Rule,
};

/// What the labels of the engines' networks ask for: the rules to serve (Docker's
/// networks, then Podman's, each in name order) and the entries refused. `allowed`
/// empty: labels are not read at all. A name on both engines is written
/// `docker:NAME` / `podman:NAME` in the rules it gives, so each serves its own network.
pub fn rules(view: &EngineView, allowed: &[Entry]) -> (Vec<Rule>, Vec<Refusal>) {
    let mut rules = Vec::new();
    let mut refused = Vec::new();
    if allowed.is_empty() {
        return (rules, refused);
    }
    for (engine, network, net) in view.networks() {
        let Some(value) = net.labels.get(LABEL) else {
            continue;
        };
        let elsewhere = Engine::ALL
            .into_iter()
            .filter(|&e| e != engine)
            .filter_map(|e| view.engine(e))
            .any(|s| s.networks.contains_key(network));
        let name = if elsewhere {
            format!("{}:{network}", engine.prefix())
        } else {
            network.to_string()
        };
        let (r, f) = network_rules(&name, value, allowed);
        rules.extend(r);
        refused.extend(f);
    }
    (rules, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::{EngineState, Network};

    fn allowed(list: &[&str]) -> Vec<Entry> {
        list.iter().map(|e| Entry::parse(e).unwrap()).collect()
    }

    fn view(nets: &[(&str, Option<&str>)]) -> EngineView {
        let mut v = EngineState {
            available: true,
            ..Default::default()
        };
        for (name, label) in nets {
            let mut n = Network {
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
        EngineView {
            docker: Some(v),
            podman: None,
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
        let mut p = EngineState {
            available: true,
            ..Default::default()
        };
        for (name, label) in [("web", "80"), ("pod", "80")] {
            let mut n = v.docker.as_ref().unwrap().networks["web"].clone();
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
    fn without_allowed_entries_labels_are_not_read() {
        let v = view(&[("p", Some("11434"))]);
        assert_eq!(rules(&v, &[]), (vec![], vec![]));
    }
}
