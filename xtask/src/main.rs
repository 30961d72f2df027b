//! `cargo xtask <verb>`: the project's multi-step jobs, so that no shell script holds
//! project logic and a fresh machine needs nothing done by hand.
//!
//! - `setup`: installs what building and testing need (idempotent, quiet when done);
//! - `build`: setup, then the `lhb` binary with its embedded eBPF object;
//! - `test`: setup, fmt, clippy, build, every unit and end-to-end test, leftover check;
//! - `demo`: a real end-to-end run on a throwaway topology, explained step by step;
//! - `bench`: direct, kernel, proxy and socat side by side, interleaved: table, JSON, charts;
//! - `soak`: lhb under random (seeded) faults for N minutes while clients connect;
//! - `fuzz`: the cargo-fuzz targets (parsers, control requests) for N runs each;
//! - `dist`: the Debian package (and a static musl tarball), lintian-checked;
//! - `test-systemd`: the unit under a real systemd (runc container), `test-vm`: the
//!   end-to-end tests on other kernels.

mod bench;
mod demo;
mod dist;
mod fuzz;
mod image;
mod setup;
mod soak;
mod systemd;
mod vm;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, demo and benchmark lhb")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the nightly rust-src, bpf-linker and the Debian packages the tests use.
    Setup,
    /// Build the lhb binary (debug) with its eBPF programs.
    Build,
    /// Run fmt, clippy, every test and a two-minute soak (needs root: real namespaces,
    /// bridges and BPF).
    Test,
    /// Show lhb at work on a throwaway topology, step by step.
    Demo,
    /// Benchmark the kernel path against the direct path (a server on the gateway).
    Bench {
        /// Shorter runs.
        #[arg(long)]
        quick: bool,
        /// Only these paths (comma-separated: direct,kernel,proxy,socat,tokio).
        #[arg(long, value_delimiter = ',')]
        paths: Vec<String>,
        /// lhb's rules admit only the bench's client (an allow list of its address):
        /// what the allow check costs (the kernel path's trie lookup per SYN, the
        /// proxy's check per connection), against a run without it.
        #[arg(long)]
        scoped: bool,
    },
    /// Inject faults at random (seeded) intervals for N minutes while clients on several
    /// bridges connect over both data paths: bridges and Docker networks re-created,
    /// firewall reloads, service restarts, SIGHUP (good and bad), kill -9 of lhb. Fails
    /// on any connection failure outside a fault's own outage, or on any leak.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Replays the fault sequence of an earlier run (printed at its start).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Fuzz the config parser, the rule spec parser and the control and metrics
    /// requests (cargo-fuzz, libFuzzer) from the committed corpus.
    Fuzz {
        /// Iterations per target.
        #[arg(long, default_value_t = 1_000_000)]
        runs: u64,
    },
    /// Build what a user installs: the Debian package (target/dist/lhb_*.deb, checked
    /// with lintian) and, with --musl, a static binary tarball.
    Dist {
        /// Also the static x86_64-unknown-linux-musl tarball.
        #[arg(long)]
        musl: bool,
    },
    /// Build lhb's OCI image (the static lhb, nft, iptables in both variants, ip/ss/tc
    /// from Debian 12's packages) and load it into the local engine as lhb:VERSION and
    /// lhb:latest.
    Image,
    /// Build the image, then run it end to end with the real engine: as the README's
    /// compose service, restarted, stopped, killed (tests/tests/image.rs).
    TestImage,
    /// Run lhb's generated unit under a real systemd 252 booted as PID 1 in a runc
    /// container (readiness, hardening, firewall healing, --persist, kill -9, stops).
    TestSystemd,
    /// Run the netns-level end-to-end tests (kernel and proxy paths) on another kernel,
    /// booted under QEMU software emulation with virtme-ng; prints the kernel and what
    /// `--mode auto` chose there.
    TestVm {
        /// `6.1` or `6.12` (Debian's newest package of that series), or a vmlinuz path.
        #[arg(long, default_value = "6.1")]
        kernel: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build => setup::run().and_then(|()| build()),
        Cmd::Test => setup::run().and_then(|()| test()),
        Cmd::Demo => setup::run()
            .and_then(|()| require_root("the demo"))
            .and_then(|()| build())
            .and_then(|()| demo::run()),
        Cmd::Bench {
            quick,
            paths,
            scoped,
        } => setup::run()
            .and_then(|()| require_root("the benchmark"))
            .and_then(|()| build_release())
            .and_then(|()| bench::run(quick, &paths, scoped)),
        Cmd::Soak { minutes, seed } => setup::run()
            .and_then(|()| require_root("the soak"))
            .and_then(|()| build())
            .and_then(|()| soak::run(minutes, seed))
            .and_then(|()| leftovers()),
        Cmd::Fuzz { runs } => setup::run().and_then(|()| fuzz::run(runs)),
        Cmd::Dist { musl } => setup::run().and_then(|()| dist::run(musl)).map(drop),
        Cmd::Image => setup::run()
            .and_then(|()| require_root("the image build (chroot into the Debian root)"))
            .and_then(|()| image::run()),
        Cmd::TestImage => setup::run()
            .and_then(|()| require_root("the image tests"))
            .and_then(|()| image::run())
            .and_then(|()| build())
            .and_then(|()| {
                let mut c = cargo();
                c.args([
                    "test",
                    "-p",
                    "lhb-tests",
                    "--test",
                    "image",
                    "--",
                    "--ignored",
                ]);
                c.env("LHB_BIN", workspace_root().join("target/debug/lhb"));
                c.env("LHB_IMAGE", image::tag());
                status(c, "the image tests")
            })
            .and_then(|()| leftovers()),
        Cmd::TestSystemd => setup::run()
            .and_then(|()| require_root("the systemd run"))
            .and_then(|()| systemd::run()),
        Cmd::TestVm { kernel } => setup::run()
            .and_then(|()| require_root("the VM run"))
            .and_then(|()| vm::run(&kernel)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// `cargo` with the bpf-linker from setup on PATH.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c.env("PATH", setup::path_with_linker());
    c
}

fn status(mut c: Command, what: &str) -> anyhow::Result<()> {
    let s = c.status().with_context(|| format!("running {what}"))?;
    if !s.success() {
        bail!("{what} failed ({s})");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["build", "--package", "lhb-daemon"]);
    status(c, "cargo build")
}

fn build_release() -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["build", "--release", "--package", "lhb-daemon"]);
    status(c, "cargo build --release")
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} creates network namespaces, bridges and loads BPF programs: run it as root");
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    require_root("the end-to-end tests")?;
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    status(c, "cargo fmt --check")?;
    let mut c = cargo();
    c.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    status(c, "cargo clippy")?;
    build()?;
    let mut c = cargo();
    // Default members: lhb-ebpf only builds for the bpf target (through build.rs).
    c.args(["test"]);
    c.env("LHB_BIN", workspace_root().join("target/debug/lhb"));
    status(c, "cargo test")?;
    leftovers()?;
    // CI's share of the soak: two minutes (LHB_SOAK_MINUTES changes it).
    let minutes = std::env::var("LHB_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(2.0);
    soak::run(minutes, None)?;
    leftovers()?;
    // CI's share of the fuzzing: a short pass over each target (LHB_FUZZ_RUNS changes it).
    let runs = std::env::var("LHB_FUZZ_RUNS")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(50_000);
    fuzz::run(runs)
}

/// Fails if a test left a namespace, a link, a Docker network or container behind (names start
/// with lhbt), a daemon's guard table (lhb_*), or `lhb verify` / `lhb doctor` left a
/// probe (lhb-probe-*, lhbp*).
fn leftovers() -> anyhow::Result<()> {
    let netns = lhb_tests::run("ip", &["netns", "list"])?;
    let links = lhb_tests::run("ip", &["-br", "link", "show"])?;
    // Where no engine answers there are no Docker networks to leave behind.
    let networks =
        lhb_tests::run("docker", &["network", "ls", "--format", "{{.Name}}"]).unwrap_or_default();
    let containers =
        lhb_tests::run("docker", &["ps", "-a", "--format", "{{.Names}}"]).unwrap_or_default();
    let pins: String = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| format!("/sys/fs/bpf/{}\n", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    // Programs a test started on a temporary directory of its own (firewalld, its bus,
    // podman's service, lhb daemons) that outlived it.
    let tmp = std::env::temp_dir().join(lhb_tests::PREFIX);
    let processes =
        lhb_tests::run("pgrep", &["-af", &tmp.display().to_string()]).unwrap_or_default();
    let mut left: Vec<&str> = netns
        .lines()
        .chain(links.lines())
        .chain(networks.lines())
        .chain(containers.lines())
        .chain(pins.lines().map(|l| l.trim_start_matches("/sys/fs/bpf/")))
        .filter(|l| {
            l.starts_with(lhb_tests::PREFIX) || l.starts_with("lhb-probe-") || l.starts_with("lhbp")
        })
        .collect();
    left.extend(processes.lines().filter(|l| !l.contains("pgrep")));
    // The guard tables of test daemons (named lhb_HASH after their control sockets; the
    // default socket's `lhb` is never a test's).
    let tables = lhb_tests::run("nft", &["list", "tables", "bridge"]).unwrap_or_default();
    left.extend(
        tables
            .lines()
            .filter(|l| l.trim_start_matches("table bridge ").starts_with("lhb_")),
    );
    if !left.is_empty() {
        bail!(
            "tests left network state behind (a guard did not clean up):\n{}",
            left.join("\n")
        );
    }
    println!(
        "no test namespace, link, Docker network or container, guard table or process left behind"
    );
    Ok(())
}
