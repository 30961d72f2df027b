//! `lhb`: lets containers reach host services bound only to 127.0.0.1 / ::1 through
//! their bridge's gateway address, for an explicit allow-list of (bridge, port) pairs.
//!
//! This file parses the command line, sets up logging and hands over to the daemon.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use lhb_daemon::{
    api::control, daemon, diagnose::check, diagnose::doctor, diagnose::plan, diagnose::verify,
    firewall, host::unit, model::labels, model::rule, reconcile, startup,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "lhb",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("LHB_GIT_REVISION"), ")"),
    about = "localhost bridge: containers reach 127.0.0.1-only host services through their bridge gateway",
    long_about = "lhb lets containers on a Linux bridge reach host services that listen only on \
127.0.0.1 or ::1, through the bridge's gateway address, for an explicit allow-list of \
(network, port) pairs. Rules name a Docker network (--expose; its bridge is found \
through the engine and followed as Docker re-creates it) or any Linux bridge \
(--expose-iface). Programs on each bridge hand the container's connection to the \
loopback listener in-kernel; nothing is bound to any address, and the service stays \
unreachable from every other interface. Where the kernel path cannot load (or for a \
target of the other address family), a splice(2) proxy bound to the gateway address and \
to the bridge device serves instead (--mode).\n\nLogs go to stderr; RUST_LOG sets the level \
(default info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: serve the rules until SIGINT/SIGTERM, following their bridges.
    /// SIGHUP reloads the config file; a bad file keeps the running rules.
    Run {
        #[command(flatten)]
        serve: Serve,
        /// Most connections the proxy carries at once, over all rules; more are refused
        /// and logged. Each rule may hold an equal share (or its config's
        /// `max_connections`). Default: what the open-file limit allows, (limit - 384 -
        /// the UDP flows' fds) / 6 (lhb raises its soft limit to the hard one at start).
        #[arg(long, value_name = "N")]
        max_connections: Option<usize>,
        /// Most UDP flows (one per container address and port) the forwarder keeps at
        /// once, over all UDP rules, each rule an equal share; a datagram that would open
        /// one more is dropped, counted and logged. Each flow holds one fd. Default: 1024,
        /// at most a quarter of what the open-file limit leaves after lhb's reserve.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        udp_max_flows: Option<u64>,
        /// Seconds after which a UDP flow that passed no datagram either way is closed.
        #[arg(long, value_name = "SECONDS", default_value_t = lhb_daemon::datapath::udp::DEFAULT_IDLE.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
        udp_idle_timeout: u64,
        /// On SIGTERM/SIGINT leave the kernel path and the firewall rules serving; the
        /// next start takes them over. Without it a clean exit removes everything.
        #[arg(long)]
        keep_on_exit: bool,
    },
    /// Print every change `lhb run` would make on this host with the same config and
    /// flags, changing nothing: program attachments, how each gateway would be served
    /// and why, proxy listeners, the exact firewall rules per backend, pins taken over,
    /// and what would wait and why. Exit status 1 if `run` would fail to start.
    Plan {
        #[command(flatten)]
        serve: Serve,
        /// The plan as JSON (the rules as `lhb status --json` shows them).
        #[arg(long)]
        json: bool,
    },
    /// Show the running daemon's rules: source, bridge, gateways, target, data path and
    /// why, firewall rules, counters, last error.
    Status {
        /// The full state as JSON (schema in the README; it always has the clients).
        #[arg(long)]
        json: bool,
        /// Under each rule, who connected through it: container (or address),
        /// connections, refusals, last seen, on every data path.
        #[arg(long)]
        clients: bool,
        /// Exit 0 only if the daemon answers and serves every rule, else say which rule
        /// waits and why and exit 1 (a container's or a monitor's health check).
        #[arg(long, conflicts_with_all = ["json", "clients"])]
        health: bool,
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Expose a port on a network's (or, with --iface, a bridge's) gateway at runtime.
    Expose {
        /// PORT may be followed by /udp or /both (TCP by default), e.g. `app:53/both`;
        /// with --iface, `@ALLOW,...` admits only those addresses or prefixes.
        #[arg(value_name = "NETWORK:PORT[/PROTOCOL][=TARGET][@ALLOW,...]")]
        rule: String,
        /// Label for logs, status and metrics (default port-<PORT>).
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// NETWORK is a bridge interface name, not a Docker network.
        #[arg(long)]
        iface: bool,
        /// Also add it to the daemon's config file (comments and layout kept), so it
        /// survives restarts.
        #[arg(long)]
        persist: bool,
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Stop exposing a port at runtime.
    Unexpose {
        #[arg(value_name = "NETWORK:PORT")]
        rule: String,
        #[arg(long)]
        iface: bool,
        /// Also remove it from the daemon's config file.
        #[arg(long)]
        persist: bool,
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Print a shell completion script: `lhb completions bash >
    /// /etc/bash_completion.d/lhb`, `lhb completions zsh > ~/.zfunc/_lhb`, `lhb completions
    /// fish > ~/.config/fish/completions/lhb.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages, lhb(8) and lhb-SUBCOMMAND(8), into DIR (used to build the
    /// package).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Make the running daemon re-read its config file (as SIGHUP does) and wait for the
    /// answer: fails, with the reason, if the file does not load (the running rules
    /// stay). The unit's ExecReload, so `systemctl reload lhb` fails on a bad file.
    Reload {
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// The systemd unit: `print` writes it to stdout, `install` to
    /// /etc/systemd/system/lhb.service (then `systemctl daemon-reload && systemctl
    /// enable --now lhb`).
    Unit {
        #[arg(value_enum)]
        action: UnitAction,
        /// Config file the service runs with.
        #[arg(long, value_name = "FILE", default_value = "/etc/lhb/lhb.toml")]
        config: PathBuf,
        /// Where `install` writes lhb.service.
        #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
        dir: PathBuf,
        /// Let `lhb expose --persist` edit the config: its directory (not a system
        /// directory such as /etc itself) becomes writable for the service.
        #[arg(long)]
        persist: bool,
        /// The lhb binary the unit runs (default: this one). `install` refuses a path
        /// the unit's sandbox hides (/home, /root, /tmp...).
        #[arg(long, value_name = "PATH")]
        exe: Option<PathBuf>,
    },
    /// Check that each rule is served from its bridge and from nowhere else: a probe
    /// namespace on the bridge must connect to every gateway; a namespace outside it,
    /// routed to the host, must be refused on every host address; nothing may listen on
    /// the port on a wildcard or non-bridge address. One PASS/FAIL line per check; exit
    /// status 1 on any FAIL. Needs root (it creates throwaway namespaces).
    Verify(CheckArgs),
    /// Walk the chain a container's connection takes (Docker engine, network, bridge,
    /// gateway, target service, data path, firewall, a live probe from the bridge) and
    /// say for each failing step what is wrong and the fix. Works with or without a
    /// running daemon; exit status 1 if a step failed. Needs root.
    Doctor(CheckArgs),
}

/// The rules and how to serve them: the same for `run` and `plan`.
#[derive(clap::Args)]
struct Serve {
    /// Config file ([[expose]] entries); a missing file holds no rules.
    #[arg(long, value_name = "FILE", default_value = "/etc/lhb/lhb.toml")]
    config: PathBuf,
    /// Expose PORT on Docker network NETWORK's gateway, forwarded to TARGET (PORT,
    /// 127.0.0.1:PORT or [::1]:PORT; default 127.0.0.1:<PORT>). TCP unless PORT is
    /// followed by /udp or /both (e.g. `bridge:53/both=127.0.0.53:53` for the host's
    /// resolver). `@ALLOW,...` admits only those containers: names, compose services
    /// (project/service) or label:KEY=VALUE (e.g. `app:11434@n8n,label:role=agent`),
    /// each only through its own veth (Docker). Repeatable.
    #[arg(long = "expose", value_name = "NETWORK:PORT[/PROTOCOL][=TARGET][@ALLOW,...]", value_parser = parse_network_rule)]
    expose: Vec<rule::Rule>,
    /// Expose PORT on bridge IFACE's gateway address(es) (any Linux bridge, no Docker
    /// needed), forwarded to TARGET as above. `@ALLOW,...` admits only those clients
    /// (addresses or prefixes, e.g. `virbr0:5432@192.168.122.10,192.168.122.64/26`);
    /// any other gets a RST (UDP: ICMP port unreachable). Repeatable.
    #[arg(long = "expose-iface", value_name = "IFACE:PORT[/PROTOCOL][=TARGET][@ALLOW,...]", value_parser = parse_iface_rule)]
    expose_iface: Vec<rule::Rule>,
    /// Serve the --expose/--expose-iface rules of NAME (a network or bridge as given
    /// there) even though the bridge has ports that lead off this host (a network
    /// card, bond, VLAN, tunnel): the service is then reachable from that whole
    /// network. Without it such a rule waits. Repeatable.
    #[arg(long = "allow-uplinks", value_name = "NAME")]
    allow_uplinks: Vec<String>,
    /// Allow a Docker network's `lhb.expose` label (compose: `networks: NAME: labels:
    /// lhb.expose: "11434,5432,53/udp"`) to ask for PORT[/PROTOCOL][=TARGET]: a label
    /// entry is served only if it equals an allowed entry, port, protocol and target.
    /// Repeatable; added to the config's `label_allow`. Without any, labels are ignored.
    #[arg(long = "label-allow", value_name = "PORT[/PROTOCOL][=TARGET]", value_parser = parse_label_allow)]
    label_allow: Vec<labels::Entry>,
    /// An engine API socket to read networks from, `unix:///PATH`: Docker's, or
    /// Podman's (it answers libpod's ping). Repeatable; added to the config's `engine`.
    /// Without any: Docker's standard socket (or DOCKER_HOST) and Podman's
    /// /run/podman/podman.sock if it exists. A name on both engines is written
    /// docker:NAME or podman:NAME in rules.
    #[arg(long = "engine", value_name = "unix:///PATH")]
    engines: Vec<String>,
    /// Do not talk to the Docker or Podman engine (only interface rules can be served).
    #[arg(long)]
    no_docker: bool,
    /// Data path: `kernel` (eBPF; fails if it cannot load), `proxy` (splice proxy
    /// bound to the gateway and the bridge), `auto` (kernel where it can serve,
    /// proxy elsewhere, and the log says why). Default: the config's `mode`, else auto.
    #[arg(long, value_enum, value_name = "auto|kernel|proxy")]
    mode: Option<reconcile::Mode>,
    /// Firewall integration: where input filtering would drop the served traffic,
    /// add an accept scoped to the bridge, gateway, TCP and port (tagged `lhb ...`,
    /// removed on exit). `auto`: firewalld when it runs (a runtime rich rule in the
    /// bridge's zone, over D-Bus, put back after each reload), the iptables variants in
    /// use and native nftables input chains. Default: the config's `firewall`, else
    /// auto.
    #[arg(long, value_enum, value_name = "auto|firewalld|nftables|iptables|none")]
    firewall: Option<firewall::FirewallMode>,
    /// Control socket for `lhb status`, `lhb expose` and `lhb unexpose` (mode 0600).
    /// The metrics socket defaults to metrics.sock beside it (NAME-metrics.sock beside a
    /// control socket NAME.sock).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_CONTROL)]
    control: PathBuf,
    /// bpffs directory where the kernel path's links are pinned, so that they keep
    /// serving while lhb is down (a crash, a restart); one per lhb.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lhb")]
    pin_dir: PathBuf,
}

impl Serve {
    fn options(self) -> anyhow::Result<startup::ServeOptions> {
        Ok(startup::ServeOptions {
            cli_rules: self.cli_rules()?,
            label_allow: self.label_allow,
            engines: self.engines,
            config: self.config,
            no_docker: self.no_docker,
            mode: self.mode,
            firewall: self.firewall,
            control: self.control,
            pin_dir: self.pin_dir,
        })
    }

    /// The command-line rules, with `--allow-uplinks` applied.
    fn cli_rules(&self) -> anyhow::Result<Vec<rule::Rule>> {
        let mut cli_rules = self.expose.clone();
        cli_rules.extend(self.expose_iface.iter().cloned());
        for name in &self.allow_uplinks {
            let mut found = false;
            for r in cli_rules.iter_mut().filter(|r| r.source.name() == name) {
                r.allow_uplinks = true;
                found = true;
            }
            if !found {
                anyhow::bail!(
                    "--allow-uplinks {name}: no --expose or --expose-iface rule names {name} (for config rules, set `allow_uplinks = true` on the [[expose]] entry)"
                );
            }
        }
        Ok(cli_rules)
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum UnitAction {
    Print,
    Install,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The rule to check; without it, every rule in the config file. A rule of the file
    /// with this source and port keeps its target; otherwise the target is TARGET, or
    /// 127.0.0.1:PORT.
    #[arg(value_name = "NETWORK:PORT[=TARGET]")]
    rule: Option<String>,
    /// NETWORK is a bridge interface name (as in --expose-iface), not a Docker network.
    #[arg(long)]
    iface: bool,
    /// Config file the rules come from.
    #[arg(long, value_name = "FILE", default_value = "/etc/lhb/lhb.toml")]
    config: PathBuf,
    /// Do not ask the Docker engine (interface rules only).
    #[arg(long)]
    no_docker: bool,
    /// As `lhb run --label-allow`: label entries to check besides the config's
    /// `label_allow`. Repeatable.
    #[arg(long = "label-allow", value_name = "PORT[=TARGET]", value_parser = parse_label_allow)]
    label_allow: Vec<labels::Entry>,
}

impl From<CheckArgs> for check::Target {
    fn from(a: CheckArgs) -> Self {
        check::Target {
            config: a.config,
            spec: a.rule,
            iface: a.iface,
            no_docker: a.no_docker,
            label_allow: a.label_allow,
        }
    }
}

/// A daemon's refusal is this command's error.
fn answer(r: control::Response) -> anyhow::Result<control::Response> {
    if r.ok {
        Ok(r)
    } else {
        anyhow::bail!("{}", r.error.unwrap_or_else(|| "refused".into()))
    }
}

/// Sends a change to the daemon and prints what it did.
fn change(control: &std::path::Path, req: control::Request) -> anyhow::Result<bool> {
    let r = answer(control::call(control, &req)?)?;
    println!("{}", r.message.unwrap_or_default());
    Ok(true)
}

fn unit_command(
    action: UnitAction,
    config: &std::path::Path,
    dir: &std::path::Path,
    persist: bool,
    exe: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let exe = match exe {
        Some(e) => e,
        None => std::env::current_exe().context("finding this executable's path")?,
    };
    anyhow::ensure!(
        exe.is_absolute(),
        "--exe {}: give an absolute path",
        exe.display()
    );
    let config = if config.is_absolute() {
        config.to_path_buf()
    } else {
        std::env::current_dir()?.join(config)
    };
    match action {
        UnitAction::Print => {
            if let Some((directive, hidden)) = unit::hidden_by_sandbox(&exe) {
                eprintln!(
                    "lhb: warning: {} is under {hidden}, which the unit's {directive} hides: install the binary elsewhere (e.g. /usr/local/sbin) before using this unit",
                    exe.display()
                );
            }
            print!("{}", unit::text(&exe, &config, persist)?)
        }
        UnitAction::Install => {
            let path = unit::install(dir, &exe, &config, persist)?;
            println!(
                "wrote {}; now: systemctl daemon-reload && systemctl enable --now lhb",
                path.display()
            );
        }
    }
    Ok(true)
}

/// The pages come from the same definitions as `--help`, so they cannot drift from it.
/// Section 8: a system administration command.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<bool> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = Cli::command();
    let version = root.get_version().unwrap_or_default().to_string();
    let mut pages = vec![root.clone()];
    for sub in root.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("lhb-{}", sub.get_name());
        pages.push(
            sub.clone()
                .name(name.clone())
                .bin_name(format!("lhb {}", sub.get_name()))
                .version(version.clone()),
        );
    }
    for page in pages {
        let path = dir.join(format!("{}.8", page.get_name()));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .section("8")
            .manual("lhb manual")
            .source(format!("lhb {version}"))
            .render(&mut out)
            .context("rendering a man page")?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(true)
}

fn parse_iface_rule(s: &str) -> Result<rule::Rule, String> {
    let mut r = rule::parse_iface_spec(s).map_err(|e| e.to_string())?;
    r.given = format!("--expose-iface {s}");
    Ok(r)
}

fn parse_label_allow(s: &str) -> Result<labels::Entry, String> {
    labels::Entry::parse(s).map_err(|e| e.to_string())
}

fn parse_network_rule(s: &str) -> Result<rule::Rule, String> {
    let mut r = rule::parse_network_spec(s).map_err(|e| e.to_string())?;
    r.given = format!("--expose {s}");
    Ok(r)
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        // A log line that cannot be written is lost, not a reason to stop serving: by
        // default tracing-subscriber reports it with eprintln!, which panics when
        // stderr is a closed pipe (a log reader gone, journald restarted), and the
        // daemon died with its work half done.
        .log_internal_errors(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A one-shot command piped into `head` ends quietly when the reader goes, as
        // other command-line tools do, instead of panicking on EPIPE.
        // Through libc: neither std nor rustix sets a signal disposition.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lhb: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lhb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; `Ok(false)` is a failure already reported (verify, doctor).
async fn dispatch(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Run {
            serve,
            max_connections,
            udp_max_flows,
            udp_idle_timeout,
            keep_on_exit,
        } => daemon::run(daemon::RunOptions {
            serve: serve.options()?,
            max_connections,
            udp_max_flows: udp_max_flows.map(|n| n as usize),
            udp_idle: std::time::Duration::from_secs(udp_idle_timeout),
            keep_on_exit,
        })
        .await
        .map(|()| true),
        Command::Plan { serve, json } => plan::run(serve.options()?, json).await,
        Command::Verify(a) => verify::run(a.into()).await,
        Command::Status {
            json,
            clients,
            health,
            control,
        } => control::call(&control, &control::Request::Status).and_then(|r| {
            let st = answer(r)?.status.context("the daemon sent no status")?;
            if health {
                let waiting: Vec<String> = st
                    .rules
                    .iter()
                    .filter(|r| r.state != lhb_daemon::api::status::State::Serving)
                    .map(|r| {
                        format!(
                            "{}: waiting: {}",
                            r.name(),
                            r.reason.as_deref().unwrap_or("?")
                        )
                    })
                    .collect();
                if waiting.is_empty() {
                    println!("serving {} rule(s)", st.rules.len());
                } else {
                    println!("{}", waiting.join("\n"));
                }
                return Ok(waiting.is_empty());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", st.table(clients));
            }
            Ok(true)
        }),
        Command::Expose {
            rule,
            service,
            iface,
            persist,
            control,
        } => change(
            &control,
            control::Request::Expose {
                spec: rule,
                iface,
                service,
                persist,
            },
        ),
        Command::Unexpose {
            rule,
            iface,
            persist,
            control,
        } => change(
            &control,
            control::Request::Unexpose {
                spec: rule,
                iface,
                persist,
            },
        ),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "lhb", &mut std::io::stdout());
            Ok(true)
        }
        Command::Man { dir } => man_pages(&dir),
        Command::Reload { control } => change(&control, control::Request::Reload),
        Command::Unit {
            action,
            config,
            dir,
            persist,
            exe,
        } => unit_command(action, &config, &dir, persist, exe),
        Command::Doctor(a) => doctor::run(a.into()).await,
    }
}
