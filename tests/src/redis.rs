//! A real redis-server for the tests ([`Redis`]), and Redis's own test suite run
//! against one ([`Suite`]): the Tcl suite of Debian's source package of the installed
//! redis-server, which `cargo xtask setup` unpacks into the cache
//! ([`suite_dir`]). The suite is a client that knows its server's semantics in detail
//! (pipelining, blocking commands, MULTI/EXEC across connections, large replies, server
//! side closes), so a data path that differs from a direct connection in any of them
//! fails tests a direct connection passes.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::*;

/// A redis-server of the test's own, killed on drop, with a working directory of its
/// own (removed with it) for whatever it writes.
pub struct Redis {
    _child: KillOnDrop,
    pub bind: IpAddr,
    pub port: u16,
    _dir: TempDir,
}

impl Redis {
    /// Listens on `bind`:`port`; `extra` are more `--name value` arguments.
    pub fn start(bind: IpAddr, port: u16, extra: &[&str]) -> anyhow::Result<Redis> {
        let dir = TempDir::new(&format!("redis-{port}"))?;
        let child = Command::new("redis-server")
            .args(["--bind", &bind.to_string(), "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&*dir)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (installed by `cargo xtask setup`)")?;
        let r = Redis {
            _child: KillOnDrop(child),
            bind,
            port,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect((bind, port)).is_ok()
        });
        if up.is_none() {
            bail!("redis-server did not listen on {bind}:{port} within 10 s");
        }
        Ok(r)
    }

    /// On 127.0.0.1, a free port.
    pub fn loopback(extra: &[&str]) -> anyhow::Result<Redis> {
        let port = free_port("127.0.0.1")?;
        Redis::start([127, 0, 0, 1].into(), port, extra)
    }
}

/// The server settings the suite needs from a server it did not start: the DEBUG,
/// MODULE and protected CONFIG commands from a non-local client (the suite's client is
/// in a container), and no protected mode (the kernel path's clients are not local).
///
/// And the AOF on from the start: the suite's stream tests turn it on with CONFIG SET
/// (their `appendonly yes` override, meant for a server they start) and at once reload
/// the AOF with DEBUG LOADAOF, racing the rewrite that CONFIG SET starts in the
/// background; a direct connection failed one or another of them at random. With the
/// AOF already on, CONFIG SET starts nothing.
pub const SUITE_SERVER_ARGS: &[&str] = &[
    "--appendonly",
    "yes",
    "--protected-mode",
    "no",
    "--enable-debug-command",
    "yes",
    "--enable-module-command",
    "yes",
    "--enable-protected-configs",
    "yes",
];

/// Tests of the suite that assume the client and the server share a host, so no
/// external server passes them, direct or not: one reads the server's pid, one binds a
/// port on the client's host and expects the server to find it taken (the server then
/// moves to that port and every later test fails to connect).
pub const SUITE_SKIPS: &[&str] = &[
    "SRANDMEMBER with a dict containing long chain",
    "CONFIG SET rollback on apply error",
];

/// The installed redis-server's source version (`5:7.0.15-1~deb12u10`).
pub fn installed_redis_version() -> anyhow::Result<String> {
    let v = run(
        "dpkg-query",
        &["-W", "-f=${source:Version}", "redis-server"],
    )
    .context("redis-server is not installed (`cargo xtask setup`)")?;
    Ok(v.trim().to_string())
}

/// Where setup unpacks the suite of the installed redis-server: its source tree, with
/// `runtest` at the top.
pub fn suite_dir() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("LHB_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/lhb")
        });
    let version = installed_redis_version()?.replace([':', '~'], "_");
    Ok(cache.join("redis-suite").join(version))
}

/// What one test of the suite did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Err,
    /// The test client raised an error outside an assertion (`--durable` goes on).
    Exception,
}

/// A finished run of the suite.
#[derive(Debug)]
pub struct SuiteRun {
    /// "FILE: TEST NAME" -> what it did; a name run twice in one file keeps the worst.
    pub tests: BTreeMap<String, Verdict>,
    /// Files the run finished, out of how many.
    pub files_done: usize,
    pub files_total: usize,
    pub exit_ok: bool,
    pub log: String,
}

impl SuiteRun {
    pub fn failed(&self) -> Vec<&str> {
        self.tests
            .iter()
            .filter(|(_, v)| **v != Verdict::Ok)
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// Runs the whole suite from namespace `ns` against `host`:`port` with one client
/// (external servers get one), `--durable` (a failed test does not stop the run) and
/// [`SUITE_SKIPS`]. `work` must be a directory of the run's own: the suite writes into
/// its tree, so each run gets a copy. `baseport` keeps parallel runs' helper ports
/// apart.
pub fn run_suite(
    ns: &Netns,
    host: IpAddr,
    port: u16,
    work: &Path,
    baseport: u16,
) -> anyhow::Result<SuiteRun> {
    let src = suite_dir()?;
    if !src.join("runtest").exists() {
        bail!(
            "Redis's test suite is not in {} (`cargo xtask setup` unpacks it)",
            src.display()
        );
    }
    let tree = work.join("redis");
    run(
        "cp",
        &["-a", &src.to_string_lossy(), &tree.to_string_lossy()],
    )?;
    let skipfile = work.join("skip.txt");
    std::fs::write(&skipfile, SUITE_SKIPS.join("\n") + "\n")?;
    let out = ns
        .command("./runtest")
        .current_dir(&tree)
        .args(["--host", &host.to_string(), "--port", &port.to_string()])
        .args([
            "--clients",
            "1",
            "--durable",
            "--baseport",
            &baseport.to_string(),
        ])
        .arg("--skipfile")
        .arg(&skipfile)
        // The suite's own bound on a stuck test: a hang fails the run instead of CI.
        .args(["--timeout", "600"])
        .stdin(Stdio::null())
        .output()
        .context("running Redis's runtest (tclsh from `cargo xtask setup`)")?;
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(parse(&log, out.status.success()))
}

/// Reads the suite's output: `[ok]: NAME (N ms)`, `[err]: NAME in FILE`,
/// `[exception]: ...`, `[N/M done]: FILE (...)`, in colour.
pub fn parse(raw: &str, exit_ok: bool) -> SuiteRun {
    let log = strip_colour(raw);
    let mut tests = BTreeMap::new();
    let (mut file, mut files_done, mut files_total) = (String::new(), 0, 0);
    for line in log.lines() {
        if let Some(f) = line.strip_prefix("Testing ") {
            file = f.trim().to_string();
            continue;
        }
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((tag, what)) = rest.split_once("]: ") else {
            continue;
        };
        let (verdict, name) = match tag {
            "ok" => (
                Verdict::Ok,
                what.rsplit_once(" (").map_or(what, |(n, _)| n).to_string(),
            ),
            "err" => (
                Verdict::Err,
                what.rsplit_once(" in ")
                    .map_or(what, |(n, _)| n)
                    .to_string(),
            ),
            "exception" => (Verdict::Exception, format!("exception: {what}")),
            _ => {
                if let Some((done, total)) = tag.split_once('/')
                    && total.ends_with(" done")
                {
                    files_done = files_done.max(done.parse().unwrap_or(0));
                    files_total = total.trim_end_matches(" done").parse().unwrap_or(0);
                }
                continue;
            }
        };
        let key = format!("{file}: {name}");
        let worst = tests
            .get(&key)
            .map_or(verdict, |v: &Verdict| (*v).max(verdict));
        tests.insert(key, worst);
    }
    SuiteRun {
        tests,
        files_done,
        files_total,
        exit_ok,
        log,
    }
}

fn strip_colour(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suites_lines_are_read_with_their_file() {
        let log = "\u{1b}[1;37;49mTesting unit/type/list\u{1b}[0m\n\
            [\u{1b}[0;32;49mok\u{1b}[0m]: LPOS basic usage (3 ms)\n\
            [\u{1b}[0;31;49merr\u{1b}[0m]: BRPOPLPUSH does not affect WATCH while still blocked in tests/unit/type/list.tcl\n\
            Expected 'somevalue' to equal or match ''\n\
            [11/84 \u{1b}[0;33;49mdone\u{1b}[0m]: unit/type/list (22 seconds)\n\
            [\u{1b}[0;31;49mexception\u{1b}[0m]: Executing test client: I/O error reading reply.\n";
        let r = parse(log, false);
        assert_eq!(r.tests["unit/type/list: LPOS basic usage"], Verdict::Ok);
        assert_eq!(
            r.tests["unit/type/list: BRPOPLPUSH does not affect WATCH while still blocked"],
            Verdict::Err
        );
        assert_eq!(
            r.tests["unit/type/list: exception: Executing test client: I/O error reading reply."],
            Verdict::Exception
        );
        assert_eq!((r.files_done, r.files_total), (11, 84));
        assert_eq!(r.failed().len(), 2);
    }
}
