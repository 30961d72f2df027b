//! `cargo xtask demo`: lhb at work on a throwaway topology, each step explained.
//!
//! Everything is made by lhb_tests' guards, so it is torn down at the end, also when a
//! step fails.

use std::{net::SocketAddr, process::Command, thread, time::Duration};

use anyhow::{Context as _, bail};
use lhb_tests::{Lab, Lhb, PeerEcho, lhb_bin};

fn say(text: &str) {
    println!("\n==> {text}");
}

fn show(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let printable: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("    $ {}", printable.join(" "));
    let out = cmd.output().context("running the command")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines() {
        println!("      {line}");
    }
    Ok((out.status.success(), text))
}

pub fn run() -> anyhow::Result<()> {
    say("Building a throwaway topology (real namespaces and a real bridge):");
    let lab = Lab::new(200)?;
    println!(
        "    bridge {br} with gateway {gw}; a \"container\" namespace {c} at {cip} on it;\n    \
         an \"outside\" namespace {o} routed to the host through its own veth, not on the bridge.",
        br = lab.bridge_name(),
        gw = lab.gateway(),
        c = lab.container.name,
        cip = lab.container_ip(),
        o = lab.outside.name,
    );

    say("A host service that listens on 127.0.0.1 only (it answers with the address it sees):");
    let svc = PeerEcho::start("127.0.0.1:0")?;
    let port = svc.port();
    println!("    listening on {}", svc.addr);
    let url = format!("http://{}:{port}/", lab.gateway());
    let curl = |ns: &lhb_tests::Netns| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name, "curl", "-sS", "-m", "3", &url]);
        c
    };

    say("Without lhb, the container cannot reach it through its gateway:");
    let (ok, _) = show(&mut curl(&lab.container))?;
    if ok {
        bail!("the container reached the service without lhb: the topology is wrong");
    }

    let spec = format!("{}:{port}", lab.bridge_name());
    say(&format!(
        "Starting `{} run --expose-iface {spec}`: a TC program on the bridge finds the\n    \
         loopback listener for each new connection, and a socket-lookup program hands it\n    \
         the connection in-kernel. Nothing is bound to any address.",
        lhb_bin().display()
    ));
    let mut lhb = Lhb::start(&["--expose-iface", &spec])?;
    for line in lhb.log().lines() {
        println!("      {line}");
    }

    say("The container now gets the page, and the service sees the container's own address:");
    let (ok, body) = show(&mut curl(&lab.container))?;
    let want = format!("peer={}:", lab.container_ip());
    if !ok || !body.contains(&want) {
        bail!("the container was not served as expected: {body}");
    }

    say("The outside namespace, routed to the host but not on the bridge, is refused:");
    let (ok, _) = show(&mut curl(&lab.outside))?;
    if ok {
        bail!("the outside namespace reached the service: that must never happen");
    }
    let direct = SocketAddr::new(lab.host_outside_ip(), port);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.outside.name, "curl", "-sS", "-m", "3"])
        .arg(format!("http://{direct}/"));
    let (ok, _) = show(&mut c)?;
    if ok {
        bail!("the outside namespace reached the service on the host's own address");
    }

    say("`lhb status` asks the running daemon over its control socket:");
    let ctl = lhb.control();
    let (ok, _) = show(Command::new(lhb_bin()).args(["status", "--control", &ctl]))?;
    if !ok {
        bail!("lhb status failed");
    }

    say(
        "`lhb verify` proves it with throwaway namespaces: served from the bridge, refused\n    \
         from outside on every host address, nothing listening on a wildcard address:",
    );
    let (ok, _) =
        show(Command::new(lhb_bin()).args(["verify", "--config", "/dev/null", "--iface", &spec]))?;
    if !ok {
        bail!("lhb verify failed");
    }

    say("Stopping lhb (SIGTERM): it detaches from the bridge and the service is private again:");
    let status = lhb.stop()?;
    println!("    lhb exited: {status}");
    thread::sleep(Duration::from_millis(100));
    let (ok, _) = show(&mut curl(&lab.container))?;
    if ok {
        bail!("still served after lhb stopped");
    }

    say("Tearing the topology down. Demo complete.");
    drop(svc);
    drop(lab);
    Ok(())
}
