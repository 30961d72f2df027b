//! What lhb's programs cost per run, from the kernel's BPF statistics, on the kernel
//! path's own traffic: `lhb_ingress` against an empty TC program attached to the same
//! bridge and run on the same packets in the same run (the only comparison this VM's
//! noisy statistics allow), and `lhb_sk_lookup` per connection lookup.

use std::time::Duration;

use aya::programs::ProgramInfo;

use super::*;

/// run_time and run_count of the program with `id`.
fn snapshot(id: u32) -> anyhow::Result<(Duration, u64)> {
    let info: ProgramInfo = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .with_context(|| format!("BPF program {id} is gone"))?;
    Ok((info.run_time(), info.run_count()))
}

/// Nanoseconds per run between two snapshots; an error if the program did not run.
fn per_run(name: &str, a: (Duration, u64), b: (Duration, u64)) -> anyhow::Result<f64> {
    let runs = b.1 - a.1;
    if runs < 1000 {
        bail!("{name} ran {runs} times during its measurement: the traffic did not reach it");
    }
    Ok((b.0 - a.0).as_nanos() as f64 / runs as f64)
}

/// The ids of the kernel path daemon's `lhb_ingress` and `lhb_sk_lookup`.
fn lhb_programs(rig: &Rig) -> anyhow::Result<(u32, u32)> {
    let pid = rig.daemon_pids(Path::Kernel)[0];
    let (held, _) = lhb_tests::bpf_ids_held_by(pid)?;
    let mut ingress = None;
    let mut lookup = None;
    for p in aya::programs::loaded_programs().filter_map(Result::ok) {
        if !held.contains(&u64::from(p.id())) {
            continue;
        }
        // Either variant (LHB_KERNEL_VARIANT=ticket measures the one for kernels before
        // 5.17 here).
        match p.name_as_str() {
            Some("lhb_ingress" | "lhb_ingress_tk") => ingress = Some(p.id()),
            Some("lhb_sk_lookup" | "lhb_sklookup_tk") => lookup = Some(p.id()),
            _ => {}
        }
    }
    Ok((
        ingress.context("the kernel path daemon holds no lhb_ingress")?,
        lookup.context("the kernel path daemon holds no lhb_sk_lookup")?,
    ))
}

/// One repetition: iperf3 with 512-byte writes (nearly every packet a non-SYN, where
/// the per-packet cost matters), then 8 concurrent clients connecting (one socket
/// lookup per connection).
pub(super) fn measure(rig: &Rig, k: &Knobs, rep: usize, out: &mut Results) -> anyhow::Result<()> {
    let lab = &rig.lab;
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    let (ingress, lookup) = lhb_programs(rig)?;
    let a = rig.of(Path::Kernel);
    // Twice, the empty program attached after lhb_ingress and then before it: the
    // first program on a packet pays for bringing its data into the cache, so one
    // order alone favours the second program.
    let mut lhb = (Duration::ZERO, 0);
    let mut base = (Duration::ZERO, 0);
    let mut invalid = None;
    for first in [false, true] {
        let empty = lhb_tests::Neighbour::attach_at(&lab.bridge_name(), !tcx, first)?;
        let empty_id = empty.id()?;
        let before = (snapshot(ingress)?, snapshot(empty_id)?);
        let bulk = iperf(
            lab,
            "127.0.0.1",
            rig.lo.iperf.port(),
            a.iperf,
            k.iperf_secs,
            1,
            Some(512),
        )?;
        let after = (snapshot(ingress)?, snapshot(empty_id)?);
        let (lhb_runs, empty_runs) = (after.0.1 - before.0.1, after.1.1 - before.1.1);
        invalid = invalid.or(bulk.invalid).or_else(|| {
            (lhb_runs != empty_runs).then(|| {
                format!("lhb_ingress ran {lhb_runs} times, the empty program {empty_runs}: not the same packets")
            })
        });
        lhb.0 += after.0.0 - before.0.0;
        lhb.1 += lhb_runs;
        base.0 += after.1.0 - before.1.0;
        base.1 += empty_runs;
    }
    let lhb_ns = per_run("lhb_ingress", (Duration::ZERO, 0), lhb)?;
    let empty_ns = per_run("the empty TC program", (Duration::ZERO, 0), base)?;
    let m = |v| Measured::unless(v, invalid.clone());
    out.record(Path::Kernel, Workload::BpfIngress, m(lhb_ns), rep);
    out.record(Path::Kernel, Workload::BpfPass, m(empty_ns), rep);
    out.record(
        Path::Kernel,
        Workload::BpfIngressRatio,
        m(lhb_ns / empty_ns),
        rep,
    );
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let s0 = snapshot(lookup)?;
    let conns = conn_rate(lab, a.conn, 8, k.conn_secs)?;
    let s1 = snapshot(lookup)?;
    let ns = per_run("lhb_sk_lookup", s0, s1)?;
    out.record(
        Path::Kernel,
        Workload::BpfSkLookup,
        Measured::unless(ns, conns.invalid),
        rep,
    );
    Ok(())
}
