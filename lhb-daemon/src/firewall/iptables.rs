//! The iptables backend: the INPUT chain of the filter table, through the iptables
//! binaries themselves, so that UFW's and Docker's rules (made with the same tools) stay
//! consistent. Both variants are covered: nf_tables (`iptables`) and legacy
//! (`iptables-legacy`, used only where legacy tables are loaded).

use std::collections::BTreeSet;

use super::{Backend, Exec, Insert, Opening, run, run_with_input};

pub struct Xtables {
    bin: &'static str,
    v6: bool,
    /// `Backend::memo`: None when off; on, the INPUT chain once read.
    memo: Option<Option<Vec<String>>>,
}

/// The iptables variants that exist and hold tables on this host.
pub fn detect() -> Vec<Box<dyn Backend>> {
    let mut found: Vec<Box<dyn Backend>> = Vec::new();
    for (bin, legacy_bin, v6, proc_names) in [
        (
            "iptables",
            "iptables-legacy",
            false,
            "/proc/net/ip_tables_names",
        ),
        (
            "ip6tables",
            "ip6tables-legacy",
            true,
            "/proc/net/ip6_tables_names",
        ),
    ] {
        let Ok(version) = run(bin, &["-V"]) else {
            continue;
        };
        found.push(Box::new(Xtables {
            bin,
            v6,
            memo: None,
        }));
        // The nf_tables variant is the default; legacy tables filter too where loaded.
        let legacy_loaded = std::fs::read_to_string(proc_names)
            .map(|t| t.lines().any(|l| l == "filter"))
            .unwrap_or(false);
        if version.contains("nf_tables") && legacy_loaded && run(legacy_bin, &["-V"]).is_ok() {
            found.push(Box::new(Xtables {
                bin: legacy_bin,
                v6,
                memo: None,
            }));
        }
    }
    found
}

impl Xtables {
    fn input(&mut self) -> anyhow::Result<Vec<String>> {
        if let Some(Some(lines)) = &self.memo {
            return Ok(lines.clone());
        }
        let lines: Vec<String> = run(self.bin, &["-w", "-S", "INPUT"])?
            .lines()
            .map(String::from)
            .collect();
        if let Some(memo) = &mut self.memo {
            *memo = Some(lines.clone());
        }
        Ok(lines)
    }

    /// `lines` (`-I INPUT ...`, `-D INPUT ...`) applied to the filter table in one
    /// transaction, the rest of the table untouched.
    fn restore(&self, lines: &[String]) -> anyhow::Result<()> {
        let script = format!("*filter\n{}\nCOMMIT\n", lines.join("\n"));
        let mut args = vec!["--noflush"];
        // The legacy variant takes the xtables lock as iptables -w does.
        if self.bin.ends_with("-legacy") {
            args.push("--wait");
        }
        run_with_input(&format!("{}-restore", self.bin), &args, &script)
    }

    fn spec(o: &Opening) -> Vec<String> {
        let tag = o.tag();
        [
            "-i",
            &o.iface,
            "-d",
            &o.gateway.to_string(),
            "-p",
            o.transport.as_str(),
            "-m",
            o.transport.as_str(),
            "--dport",
            &o.port.to_string(),
            "-m",
            "comment",
            "--comment",
            &tag,
            "-j",
            "ACCEPT",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// The comment of an `iptables -S` line, if any.
/// Arguments as iptables prints and iptables-restore reads them: quoted where they hold
/// a space (the comment).
fn shown(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn comment(line: &str) -> Option<&str> {
    let rest = line.split("--comment ").nth(1)?;
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split_whitespace().next()
    }
}

/// Why INPUT may drop, if it may: a drop policy, or any rule (UFW's jumps, a
/// DROP/REJECT). An empty chain with an accept policy lets everything in already.
fn may_drop(lines: &[String]) -> Option<String> {
    let policy = lines
        .iter()
        .find_map(|l| l.strip_prefix("-P INPUT "))
        .filter(|p| *p != "ACCEPT");
    let rules = lines.iter().filter(|l| l.starts_with("-A INPUT")).count();
    match (policy, rules) {
        (None, 0) => None,
        (Some(p), 0) => Some(format!("policy {p}")),
        (None, n) => Some(format!("{n} rule(s) that may drop or jump")),
        (Some(p), n) => Some(format!("policy {p}, {n} rule(s)")),
    }
}

impl Backend for Xtables {
    fn name(&self) -> String {
        self.bin.to_string()
    }

    fn planned(&mut self, o: &Opening) -> anyhow::Result<Vec<Insert>> {
        if o.gateway.is_ipv6() != self.v6 {
            return Ok(vec![]);
        }
        let lines = self.input()?;
        let tag = o.tag();
        let present = lines.iter().any(|l| comment(l) == Some(tag.as_str()));
        if !present && may_drop(&lines).is_none() {
            return Ok(vec![]);
        }
        let mut args = vec!["-w".to_string(), "-I".into(), "INPUT".into(), "1".into()];
        args.extend(Self::spec(o));
        Ok(vec![Insert {
            chain: format!("{} INPUT", self.bin),
            rule: format!("{} {}", self.bin, shown(&args)),
            present,
            exec: Exec::Run(self.bin, args),
        }])
    }

    fn close(&mut self, o: &Opening) -> anyhow::Result<()> {
        if o.gateway.is_ipv6() != self.v6 {
            return Ok(());
        }
        let tag = o.tag();
        let count = self
            .input()?
            .iter()
            .filter(|l| comment(l) == Some(tag.as_str()))
            .count();
        for _ in 0..count {
            let mut args = vec!["-w".to_string(), "-D".into(), "INPUT".into()];
            args.extend(Self::spec(o));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(self.bin, &args)?;
        }
        Ok(())
    }

    /// Every missing accept in one iptables-restore transaction; if it fails, one by
    /// one, so that each opening gets its own answer.
    fn open_all(&mut self, os: &[Opening]) -> Vec<anyhow::Result<Vec<String>>> {
        let mut script = Vec::new();
        let mut results = Vec::new();
        for o in os {
            match self.planned(o) {
                Ok(inserts) => {
                    if inserts.iter().any(|i| !i.present) {
                        script.push(format!("-I INPUT 1 {}", shown(&Self::spec(o))));
                    }
                    results.push(Ok(inserts.into_iter().map(|i| i.chain).collect()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if !script.is_empty() && self.restore(&script).is_err() {
            return os.iter().map(|o| self.open(o)).collect();
        }
        results
    }

    /// Every tagged rule of `os` deleted in one iptables-restore transaction; one by
    /// one if that fails.
    fn close_all(&mut self, os: &[Opening]) -> anyhow::Result<()> {
        let mine: Vec<&Opening> = os
            .iter()
            .filter(|o| o.gateway.is_ipv6() == self.v6)
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        let lines = self.input()?;
        let mut script = Vec::new();
        for o in &mine {
            let tag = o.tag();
            for _ in lines.iter().filter(|l| comment(l) == Some(tag.as_str())) {
                script.push(format!("-D INPUT {}", shown(&Self::spec(o))));
            }
        }
        if script.is_empty() || self.restore(&script).is_ok() {
            return Ok(());
        }
        for o in mine {
            self.close(o)?;
        }
        Ok(())
    }

    fn blockers(&mut self, o: &Opening) -> anyhow::Result<Vec<String>> {
        if o.gateway.is_ipv6() != self.v6 {
            return Ok(vec![]);
        }
        let lines = self.input()?;
        let tag = o.tag();
        if lines.iter().any(|l| comment(l) == Some(tag.as_str())) {
            return Ok(vec![]);
        }
        Ok(may_drop(&lines)
            .map(|why| format!("{} INPUT ({why})", self.bin))
            .into_iter()
            .collect())
    }

    fn missing(&mut self, held: &BTreeSet<Opening>) -> anyhow::Result<BTreeSet<Opening>> {
        let mine: Vec<&Opening> = held
            .iter()
            .filter(|o| o.gateway.is_ipv6() == self.v6)
            .collect();
        if mine.is_empty() {
            return Ok(BTreeSet::new());
        }
        let lines = self.input()?;
        if may_drop(&lines).is_none() {
            return Ok(BTreeSet::new());
        }
        Ok(mine
            .into_iter()
            .filter(|o| {
                let tag = o.tag();
                !lines.iter().any(|l| comment(l) == Some(tag.as_str()))
            })
            .cloned()
            .collect())
    }

    fn notified(&self) -> bool {
        // iptables-nft writes nf_tables; the legacy variant writes x_tables, which
        // announce nothing.
        !self.bin.ends_with("-legacy")
    }

    fn memo(&mut self, on: bool) {
        self.memo = on.then_some(None);
    }

    fn leftovers(&mut self) -> anyhow::Result<BTreeSet<Opening>> {
        Ok(self
            .input()?
            .iter()
            .filter_map(|l| comment(l).and_then(Opening::from_tag))
            .filter(|o| o.gateway.is_ipv6() == self.v6)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::comment;

    #[test]
    fn comments_are_read_from_iptables_s_lines() {
        let line = r#"-A INPUT -d 10.0.0.1/32 -i br0 -p tcp -m tcp --dport 80 -m comment --comment "lhb br0 10.0.0.1 80" -j ACCEPT"#;
        assert_eq!(comment(line), Some("lhb br0 10.0.0.1 80"));
        assert_eq!(
            comment("-A INPUT -m comment --comment plain -j DROP"),
            Some("plain")
        );
        assert_eq!(comment("-A INPUT -j ufw-before-input"), None);
    }
}
