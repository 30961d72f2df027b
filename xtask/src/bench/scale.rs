//! 1,000 rules on one bridge, in a namespace that plays a host whose firewall drops
//! what it does not allow (UFW's default), so every rule also costs an accept: the
//! time from start to ready, the RSS then, and a reload that changes one rule.

use std::time::Instant;

use lhb_tests::{HostLab, Lhb, TempDir};

use super::*;

const RULES: u16 = 1000;
const FIRST_PORT: u16 = 20001;

fn config(changed: bool) -> String {
    (0..RULES)
        .map(|i| {
            let port = if changed && i == 0 {
                FIRST_PORT + 10_000
            } else {
                FIRST_PORT + i
            };
            format!("[[expose]]\ninterface = \"br0\"\nport = {port}\n")
        })
        .collect()
}

/// Whether every rule is served and the changed one is among them.
fn all_served(lhb: &Lhb, changed: bool) -> Option<String> {
    let st = match lhb.status() {
        Ok(st) => st,
        Err(e) => return Some(format!("lhb status: {e:#}")),
    };
    let rules = st["rules"].as_array().cloned().unwrap_or_default();
    let serving = rules.iter().filter(|r| r["state"] == "serving").count();
    let want = if changed {
        FIRST_PORT + 10_000
    } else {
        FIRST_PORT
    };
    let has = rules.iter().any(|r| r["port"] == want);
    (serving != usize::from(RULES) || !has)
        .then(|| format!("{serving} of {RULES} rules serving, port {want} among them: {has}"))
}

pub(super) fn measure(rep: usize, out: &mut Results) -> anyhow::Result<()> {
    let lab = HostLab::new(210)?;
    lab.sh(&["iptables", "-w", "-P", "INPUT", "DROP"])?;
    let dir = TempDir::new("bench-scale")?;
    let cfg = dir.join("lhb.toml");
    std::fs::write(&cfg, config(false))?;
    let cfg_arg = cfg.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let mut lhb = Lhb::start_wrapped(
        &["ip", "netns", "exec", &lab.host.name],
        &rig::release()?,
        &["--mode", "kernel", "--no-docker", "--config", &cfg_arg],
    )?;
    let ready = t0.elapsed().as_secs_f64() * 1000.0;
    let accepts = lab
        .sh(&["iptables", "-w", "-S", "INPUT"])?
        .lines()
        .filter(|l| l.contains("lhb "))
        .count();
    let invalid = all_served(&lhb, false).or_else(|| {
        (accepts != usize::from(RULES))
            .then(|| format!("{accepts} of {RULES} firewall accepts in place at ready"))
    });
    out.record(
        Path::Kernel,
        Workload::Ready1000,
        Measured::unless(ready, invalid),
        rep,
    );
    // The daemon alone: usage() adds children, and the firewall's periodic check of
    // legacy iptables runs one now and then.
    let status = std::fs::read_to_string(format!("/proc/{}/status", lhb.pid()))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    out.value(Path::Kernel, Workload::Rss1000, rss_kib / 1024.0, rep);
    std::fs::write(&cfg, config(true))?;
    let t0 = Instant::now();
    let reload = std::process::Command::new(rig::release()?)
        .args(["reload", "--control", &lhb.control()])
        .output()?;
    let took = t0.elapsed().as_secs_f64() * 1000.0;
    let invalid = if reload.status.success() {
        all_served(&lhb, true)
    } else {
        Some(format!(
            "lhb reload: {}",
            String::from_utf8_lossy(&reload.stderr).trim()
        ))
    };
    out.record(
        Path::Kernel,
        Workload::Reload1000,
        Measured::unless(took, invalid),
        rep,
    );
    lhb.stop()?;
    Ok(())
}
