//! `cargo xtask test-vm [--kernel 5.10|6.1|6.12|PATH]`: the netns-level end-to-end tests on
//! another kernel, booted under QEMU software emulation (TCG: this machine's KVM cannot
//! run distribution kernels, ../shared/docs/VM.md) with virtme-ng over a read-only view
//! of this machine.
//!
//! Everything is built on the host; only the test binary runs in the VM. Debian's kernel
//! packages are downloaded and unpacked once into ~/.cache/lhb/kernels. The tests that
//! run are the data-path ones for both paths (kernel and proxy), the auto fallback, the
//! clsact attachment and the connection limit; the load tests (a thousand connections of
//! a MiB each, ten thousand connections, redis-benchmark) stay on the host: under
//! emulation they measure QEMU, not lhb (redis-benchmark alone took 4 minutes there). Before the tests, the VM run shows which data path `--mode auto` picks
//! on that kernel and how it attaches.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

const VNG_VERSION: &str = "1.42";
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "udev",
    "busybox-static",
    "python3-venv",
];

fn cache() -> PathBuf {
    std::env::var_os("LHB_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/lhb")
        })
}

/// virtme-ng in a venv of its own; the `vng` path.
fn ensure_vng() -> anyhow::Result<PathBuf> {
    let venv = cache().join("vng");
    let vng = venv.join("bin/vng");
    let version_ok = Command::new(&vng)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(VNG_VERSION))
        .unwrap_or(false);
    if version_ok {
        return Ok(vng);
    }
    println!(
        "test-vm: installing virtme-ng {VNG_VERSION} into {}",
        venv.display()
    );
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("python3 -m venv")?
        .success();
    if !ok {
        bail!("creating the virtme-ng venv failed");
    }
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", &format!("virtme-ng=={VNG_VERSION}")])
        .status()
        .context("pip install virtme-ng")?
        .success();
    if !ok {
        bail!("pip install virtme-ng=={VNG_VERSION} failed");
    }
    Ok(vng)
}

/// apt options that read Debian 11's (bullseye's) package lists from a sources list and
/// lists directory of their own, from the Debian mirror this machine uses: the
/// machine's own apt configuration never sees that suite.
fn bullseye_apt() -> anyhow::Result<Vec<String>> {
    let dir = cache().join("apt-bullseye");
    let list = dir.join("sources.list");
    let lists = dir.join("lists");
    let opts = vec![
        format!("-oDir::Etc::sourcelist={}", list.display()),
        "-oDir::Etc::sourceparts=/nonexistent".to_string(),
        format!("-oDir::State::Lists={}", lists.display()),
        // The cache is root's: apt's sandbox user could not write there.
        "-oAPT::Sandbox::User=root".to_string(),
    ];
    if lists.join("lock").exists() {
        return Ok(opts);
    }
    let uri = crate::setup::debian_sources()?
        .into_iter()
        .map(|(uri, _, _)| uri)
        .find(|u| !u.contains("security"))
        .context("no Debian mirror in this machine's apt sources")?;
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::write(&list, format!("deb {uri} bullseye main\n"))?;
    let ok = Command::new("apt-get")
        .args(&opts)
        .args(["-qq", "update"])
        .status()
        .context("apt-get update (bullseye)")?
        .success();
    if !ok {
        let _ = std::fs::remove_dir_all(&lists);
        bail!("apt-get update of Debian 11's lists from {uri} failed");
    }
    Ok(opts)
}

/// The newest Debian package for `series` (5.10 from Debian 11, 6.1, 6.12), unpacked;
/// its vmlinuz.
fn ensure_kernel(series: &str) -> anyhow::Result<PathBuf> {
    let (pattern, apt) = match series {
        "5.10" => (
            regex_like("linux-image-5.10.0-", "-amd64-unsigned"),
            bullseye_apt()?,
        ),
        "6.1" => (regex_like("linux-image-6.1.0-", "-amd64-unsigned"), vec![]),
        "6.12" => (
            regex_like("linux-image-6.12.", "+deb12-amd64-unsigned"),
            vec![],
        ),
        other => {
            let p = PathBuf::from(other);
            if p.is_file() {
                return Ok(p);
            }
            bail!(
                "--kernel {other}: not 5.10, 6.1, 6.12 or a vmlinuz file (with lib/modules/VERSION beside its boot/ directory)"
            );
        }
    };
    let mut search_args: Vec<&str> = apt.iter().map(String::as_str).collect();
    search_args.extend(["search", "--names-only", "^linux-image-"]);
    let search = lhb_tests::run("apt-cache", &search_args)?;
    let mut names: Vec<String> = search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| pattern(n))
        .map(String::from)
        .collect();
    names.sort_by_key(|n| version_key(n));
    let Some(pkg) = names.last().cloned() else {
        bail!(
            "no Debian package for Linux {series} (apt-cache search found none; run apt-get update?)"
        );
    };
    let dir = cache().join("kernels").join(&pkg);
    let boot = dir.join("boot");
    if let Some(v) = vmlinuz_in(&boot) {
        return Ok(v);
    }
    println!(
        "test-vm: downloading and unpacking {pkg} into {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir)?;
    let ok = Command::new("apt-get")
        .args(&apt)
        // The cache is root's: apt's sandbox user could not write there.
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", &pkg])
        .current_dir(&dir)
        .status()
        .context("apt-get download")?
        .success();
    if !ok {
        bail!("apt-get download {pkg} failed");
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("the downloaded .deb")?;
    let ok = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&dir)
        .status()
        .context("dpkg -x")?
        .success();
    if !ok {
        bail!("dpkg -x {} failed", deb.display());
    }
    let _ = std::fs::remove_file(&deb);
    vmlinuz_in(&boot).context("no boot/vmlinuz-* in the package")
}

fn regex_like(prefix: &'static str, suffix: &'static str) -> Box<dyn Fn(&str) -> bool> {
    Box::new(move |n: &str| {
        n.starts_with(prefix)
            && n.ends_with(suffix)
            && !n.contains("cloud")
            && !n.contains("-rt-")
            && n[prefix.len()..n.len() - suffix.len()]
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.')
    })
}

/// Numeric parts of a package name, for ordering versions.
fn version_key(n: &str) -> Vec<u64> {
    n.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn vmlinuz_in(boot: &Path) -> Option<PathBuf> {
    std::fs::read_dir(boot)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// Builds the test binary on the host; its path.
fn build_tests() -> anyhow::Result<PathBuf> {
    let out = Command::new(env!("CARGO"))
        .args([
            "test",
            "-p",
            "lhb-tests",
            "--test",
            "data_path",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(crate::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "data_path")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("no data_path test executable in cargo's output")
}

pub fn run(kernel: &str) -> anyhow::Result<()> {
    crate::setup::ensure_packages(PACKAGES)?;
    let vng = ensure_vng()?;
    let vmlinuz = ensure_kernel(kernel)?;
    crate::build()?;
    let tests = build_tests()?;
    let root = crate::workspace_root();
    let lhb = root.join("target/debug/lhb");
    let out_dir = root.join("target/vm");
    std::fs::create_dir_all(&out_dir)?;
    let script = out_dir.join("run.sh");
    std::fs::write(&script, guest_script(&lhb, &tests, kernel == "5.10"))?;
    println!(
        "test-vm: booting {} under QEMU (TCG, no KVM) with virtme-ng; the tests run inside",
        vmlinuz.display()
    );
    let started = Instant::now();
    // vng runs its helpers (virtme-run, ...) from its venv by name.
    let path = format!(
        "{}:{}",
        vng.parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(&vng)
        .env("PATH", path)
        .arg("-r")
        .arg(&vmlinuz)
        .args([
            "--disable-kvm",
            "--force-9p",
            "--memory",
            "2G",
            "--cpus",
            "2",
        ])
        .arg(format!("--rwdir={}", out_dir.display()))
        .args(["--exec", &format!("sh {}", script.display())])
        .stdin(Stdio::null())
        // Pipes, copied on: given a file as stdout, virtme reopens it from the start and
        // overwrites what came before it (CI's log of the host suite).
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running vng")?;
    let mut out = child.stdout.take().context("vng stdout")?;
    let mut err = child.stderr.take().context("vng stderr")?;
    let copy_err = std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
    std::io::copy(&mut out, &mut std::io::stdout()).context("copying the VM's output")?;
    let _ = copy_err.join();
    let status = child.wait().context("waiting for vng")?;
    let took = started.elapsed().as_secs_f64();
    let ran = std::fs::read_to_string(out_dir.join("kernel")).unwrap_or_default();
    println!(
        "\ntest-vm: kernel {} ({}): {} in {took:.0}s",
        ran.trim(),
        vmlinuz.display(),
        if status.success() { "PASSED" } else { "FAILED" }
    );
    if !status.success() {
        bail!("the end-to-end tests failed on {} ({status})", ran.trim());
    }
    Ok(())
}

/// What runs inside the VM: bpffs, the kernel's own answer to "which data path does
/// auto mode take here", then the tests.
/// `kernel_only`: the kernel path's tests alone, one at a time (Debian 11's 5.10 starts
/// processes about three times slower than 6.1 under this emulation, measured: 0.7 s
/// per `ip` call against 0.23 s, lhb ready in 10 s against 7 s; two tests at once
/// there made daemons miss the tests' 20 s readiness bound, and the whole set took over
/// 20 minutes). The proxy does not depend on the kernel's version the way the kernel
/// path does; the 6.1 and 6.12 runs cover it.
fn guest_script(lhb: &Path, tests: &Path, kernel_only: bool) -> String {
    let selection = if kernel_only {
        "--test-threads 1 --skip redis_benchmark light::kernel:: the_clsact another_tools_program"
    } else {
        "--test-threads 2 --skip redis_benchmark --skip ::ticket:: light:: auto_mode the_clsact proxy_connection_limit another_tools_program"
    };
    let lhb = lhb.display();
    let tests = tests.display();
    let out = crate::workspace_root().join("target/vm");
    let out = out.display();
    format!(
        r#"set -u
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mkdir -p /run/netns
uname -r > {out}/kernel
echo "== kernel $(uname -r)"
ip link add lhbvm0 type bridge && ip addr add 10.209.250.1/24 dev lhbvm0 && ip link set lhbvm0 up
{lhb} run --config /dev/null --no-docker --firewall none --control /tmp/lhbvm.sock --pin-dir /sys/fs/bpf/lhbvm --mode auto --expose-iface lhbvm0:8080 > /tmp/auto.log 2>&1 &
pid=$!
for i in $(seq 1 100); do grep -q 'ready:' /tmp/auto.log && break; sleep 0.2; done
{lhb} status --json --control /tmp/lhbvm.sock > {out}/status.json
kill -TERM $pid; wait $pid
echo "== --mode auto on this kernel:"
grep -E 'kernel data path|kernel path unavailable|attached|data path:' /tmp/auto.log | sed 's/^[^ ]* *//'
ip link del lhbvm0
# Asserted, not assumed: every IPv4 gateway of the rule is served in-kernel.
python3 -c '
import json, sys
st = json.load(open(sys.argv[1]))
gws = [g for r in st["rules"] for g in r["gateways"] if ":" not in g["address"]]
v = st.get("kernel_variant") or {{}}
print("== kernel path variant:", v.get("name"), "-", v.get("why"))
bad = [g for g in gws if g["path"] != "kernel"]
if not gws or bad:
    print("== FAIL: --mode auto did not serve every IPv4 gateway in-kernel:", json.dumps(st["rules"]))
    sys.exit(1)
' {out}/status.json || exit 1
echo "== end-to-end tests (kernel and proxy paths)"
LHB_BIN={lhb} {tests} {selection}
"#
    )
}
