//! A real client's whole test suite through every data path, against a direct
//! connection: Redis's own Tcl suite (Debian's source of the installed redis-server),
//! run from a container namespace at the same time against three servers:
//! - **direct**: a redis-server bound to the gateway of its bridge (the baseline);
//! - **kernel**: one on 127.0.0.1, reached through `lhb run --mode kernel`;
//! - **proxy**: one on 127.0.0.1, reached through `lhb run --mode proxy`.
//!
//! Each path must run every test the baseline runs, and fail exactly the tests the
//! baseline fails: the suite knows Redis's semantics in detail (pipelining, blocking
//! commands, MULTI/EXEC watched from a second connection, large replies, CLIENT KILL,
//! server-side closes), so a path that changes any of them shows. The three run at once
//! so that a slow moment of the machine meets all three alike.
//!
//! This found the proxy reordering writes across a client's connections (EXEC on one
//! connection overtaken by an LPUSH sent after it on another), which a direct
//! connection never does.

use std::{net::IpAddr, thread};

use lhb_tests::{
    Lab, Lhb, TempDir,
    redis::{Redis, SUITE_SERVER_ARGS, SuiteRun, run_suite},
};

struct Path {
    name: &'static str,
    lab: Lab,
    host: IpAddr,
    port: u16,
    _redis: Redis,
    _lhb: Option<Lhb>,
}

fn through_lhb(name: &'static str, n: u8, mode: &str) -> Path {
    let lab = Lab::new(n).unwrap();
    let redis = Redis::loopback(SUITE_SERVER_ARGS).unwrap();
    let spec = format!("{}:{}", lab.bridge_name(), redis.port);
    let lhb = Lhb::start(&[
        "--no-docker",
        "--firewall",
        "none",
        "--mode",
        mode,
        "--expose-iface",
        &spec,
    ])
    .unwrap();
    let status = lhb.status().unwrap();
    let path = status["rules"][0]["gateways"][0]["path"]
        .as_str()
        .unwrap_or("");
    assert_eq!(
        path, mode,
        "{name}: not served by the {mode} path: {status}"
    );
    Path {
        name,
        host: lab.gateway(),
        port: redis.port,
        lab,
        _redis: redis,
        _lhb: Some(lhb),
    }
}

#[test]
fn redis_s_own_suite_passes_through_every_path_as_through_a_direct_connection() {
    let direct = {
        let lab = Lab::new(40).unwrap();
        let port = lhb_tests::free_port(&lab.gateway().to_string()).unwrap();
        let redis = Redis::start(lab.gateway(), port, SUITE_SERVER_ARGS).unwrap();
        Path {
            name: "direct",
            host: lab.gateway(),
            port,
            lab,
            _redis: redis,
            _lhb: None,
        }
    };
    let kernel = through_lhb("kernel", 41, "kernel");
    let proxy = through_lhb("proxy", 42, "proxy");
    let work = TempDir::new("suite").unwrap();
    let runs: Vec<(&str, SuiteRun)> = thread::scope(|s| {
        let handles: Vec<_> = [&direct, &kernel, &proxy]
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let dir = work.join(p.name);
                std::fs::create_dir_all(&dir).unwrap();
                let baseport = 21000 + 1000 * i as u16;
                s.spawn(move || {
                    let run = run_suite(&p.lab.container, p.host, p.port, &dir, baseport)
                        .unwrap_or_else(|e| panic!("{}: {e:#}", p.name));
                    (p.name, run)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (name, run) in &runs {
        eprintln!(
            "{name}: {} tests, {} failed, {}/{} files; failed: {:?}",
            run.tests.len(),
            run.failed().len(),
            run.files_done,
            run.files_total,
            run.failed()
        );
        // The whole suite ran: every file finished, and it is the size Redis 7's is.
        assert!(
            run.files_total >= 80 && run.files_done == run.files_total,
            "{name}: the suite stopped after {} of {} files:\n{}",
            run.files_done,
            run.files_total,
            tail(&run.log)
        );
        assert!(
            run.tests.len() >= 1500,
            "{name}: only {} tests ran:\n{}",
            run.tests.len(),
            tail(&run.log)
        );
    }
    let (_, base) = &runs[0];
    for (name, run) in &runs[1..] {
        let only_base: Vec<&String> = base
            .tests
            .keys()
            .filter(|t| !run.tests.contains_key(*t))
            .collect();
        let only_path: Vec<&String> = run
            .tests
            .keys()
            .filter(|t| !base.tests.contains_key(*t))
            .collect();
        let differ: Vec<String> = run
            .tests
            .iter()
            .filter_map(|(t, v)| {
                let b = base.tests.get(t)?;
                (b != v).then(|| format!("{t}: direct {b:?}, {name} {v:?}"))
            })
            .collect();
        assert!(
            only_base.is_empty() && only_path.is_empty() && differ.is_empty(),
            "{name} differs from a direct connection:\n  ran only direct: {only_base:?}\n  ran only {name}: {only_path:?}\n  other verdict:\n    {}\n{name}'s failures:\n{}",
            differ.join("\n    "),
            failures(&run.log)
        );
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The lines of the log around each failed test, for the assertion message.
fn failures(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("[err]") || l.starts_with("[exception]") {
            out.extend(lines[i..(i + 4).min(lines.len())].iter().copied());
        }
    }
    out.join("\n")
}
