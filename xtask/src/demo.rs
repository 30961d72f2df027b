//! `cargo xtask demo`: lhb at work on a throwaway topology, each step explained.
//!
//! Everything is made by lhb_tests' guards, so it is torn down at the end, also when a
//! step fails.

use std::{net::SocketAddr, process::Command, thread, time::Duration};

use anyhow::{Context as _, bail};
use lhb_tests::{Lab, Lhb, PeerEcho, docker, lhb_bin};

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

    dns_flow(&lab)?;

    say("Tearing the topology down.");
    drop(svc);
    drop(lab);

    compose_flow()?;
    say("Demo complete.");
    Ok(())
}

/// UDP: a resolver on loopback (dnsmasq; on 127.0.0.153:15353 here, clear of whatever
/// this machine runs on port 53) served at the gateway's port 53, asked with dig.
fn dns_flow(lab: &Lab) -> anyhow::Result<()> {
    say(
        "UDP: the host's resolver for containers. A dnsmasq on 127.0.0.153:15353 answers
             x.example; the rule `BRIDGE:53/both=127.0.0.153:15353` serves it at the gateway's
             port 53, over UDP (a forwarder bound to the gateway and the bridge) and TCP:",
    );
    let _dnsmasq = lhb_tests::Dnsmasq::start("127.0.0.153:15353".parse()?)?;
    let spec = format!("{}:53/both=127.0.0.153:15353", lab.bridge_name());
    let lhb = Lhb::start(&["--expose-iface", &spec])?;
    let gw = lab.gateway().to_string();
    let dig = |extra: &[&str]| {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &lab.container.name,
            "dig",
            &format!("@{gw}"),
        ])
        .args(["x.example", "+short", "+time=2", "+tries=1"])
        .args(extra);
        c
    };
    for extra in [&[][..], &["+tcp"][..]] {
        let (ok, out) = show(&mut dig(extra))?;
        if !ok || out.trim() != "10.1.2.3" {
            bail!("the container's query was not answered: {out}");
        }
    }
    say("From the outside namespace the same query gets no answer:");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.outside.name, "dig", &format!("@{gw}")])
        .args(["x.example", "+short", "+time=1", "+tries=1"]);
    let (_, out) = show(&mut c)?;
    if out.contains("10.1.2.3") {
        bail!("the outside namespace was answered");
    }
    say("`lhb verify` probes the UDP side with a DNS query from each side:");
    let (ok, _) =
        show(Command::new(lhb_bin()).args(["verify", "--config", "/dev/null", "--iface", &spec]))?;
    if !ok {
        bail!("lhb verify failed");
    }
    drop(lhb);
    Ok(())
}

/// A compose project asks for host ports with its network's `lhb.expose` label; lhb
/// serves what `--label-allow` allows and says why it refuses the rest. Shown when
/// docker-compose, a Docker engine and the test image are here; said so otherwise.
fn compose_flow() -> anyhow::Result<()> {
    let compose_here = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !compose_here || !docker::engine_answers() || !docker::image_present() {
        say(
            "Skipping the compose label flow: it needs docker-compose, a Docker engine and the
                 image `cargo xtask setup` imports.",
        );
        return Ok(());
    }
    say("Docker Compose: a project asks for host ports with a label on its network.");
    let svc = PeerEcho::start("127.0.0.1:0")?;
    let other = PeerEcho::start("127.0.0.1:0")?;
    let (p, q) = (svc.port(), other.port());
    let yaml = format!(
        r#"version: "3.8"
services:
  app:
    image: {image}
    command: ["sleep", "3600"]
    extra_hosts: ["host.docker.internal:host-gateway"]
networks:
  default:
    ipam:
      config: [{{subnet: 10.230.70.0/24}}]
    labels:
      lhb.expose: "{p},{q}"
"#,
        image = docker::IMAGE
    );
    for line in yaml.lines() {
        println!("      {line}");
    }
    println!("    Both ports have a service on 127.0.0.1; the host allows only {p}.");
    let project = docker::Compose::new("lhbt-demo", &yaml)?;
    say(&format!(
        "Starting `lhb run --label-allow {p}`: the administrator's list of what labels may ask for."
    ));
    let lhb = Lhb::start(&["--label-allow", &p.to_string()])?;
    let up = |what: &str| -> anyhow::Result<()> {
        say(what);
        let (ok, _) = show(&mut project.command(&["up", "-d"]))?;
        if !ok {
            bail!("docker-compose up failed");
        }
        Ok(())
    };
    let url = format!("http://host.docker.internal:{p}/");
    let fetch = |url: &str| project.command(&["exec", "-T", "app", "wget", "-q", "-O", "-", url]);
    let served = |what: &str| -> anyhow::Result<()> {
        lhb_tests::wait_until(Duration::from_secs(5), || {
            project
                .run(&["exec", "-T", "app", "wget", "-q", "-O", "-", &url])
                .is_ok()
        });
        say(what);
        let (ok, body) = show(&mut fetch(&url))?;
        if !ok || !body.contains("peer=10.230.70.") {
            bail!(
                "the compose container was not served: {body}\n{}",
                lhb.log()
            );
        }
        Ok(())
    };
    up("`docker-compose up -d` creates the network with its label:")?;
    served("The container reaches the allowed port through host.docker.internal:")?;
    say(&format!("Port {q} was asked for but not allowed: refused."));
    let gw = docker::gateway_of("lhbt-demo_default")?;
    let (ok, _) = show(&mut fetch(&format!("http://{gw}:{q}/")))?;
    if ok {
        bail!("a port the host did not allow was served");
    }
    say("`lhb status`: the rule's origin is the label; the refused entry and why:");
    let ctl = lhb.control();
    show(Command::new(lhb_bin()).args(["status", "--control", &ctl]))?;
    say("`docker-compose down` removes the network, and lhb its rule:");
    show(&mut project.command(&["down", "-t", "0"]))?;
    lhb_tests::wait_until(Duration::from_secs(5), || {
        lhb.status()
            .is_ok_and(|s| s["rules"].as_array().is_some_and(|r| r.is_empty()))
    })
    .context("the rule stayed after the network was removed")?;
    show(Command::new(lhb_bin()).args(["status", "--control", &ctl]))?;
    up("`docker-compose up -d` again: a new network, a new bridge:")?;
    served("lhb followed: served again.")?;
    say("Tearing the compose project down.");
    drop(project);
    drop(lhb);
    Ok(())
}
