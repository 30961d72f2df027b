//! Every measurement the bench makes: its name in the table, its unit, which way is
//! better, its chart and how many decimals it is shown with, in one place.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    ConnSerial,
    Conn8,
    Conn64,
    Iperf1,
    Iperf4,
    RedisP50C1,
    RedisP99C1,
    RedisP50C50,
    RedisP99C50,
    Pgbench,
    Dns1,
    Dns50,
    OneWay512,
    RssIdle,
    RssLoad,
    CpuLoad,
    Recreate,
    BpfIngress,
    BpfPass,
    BpfIngressRatio,
    BpfSkLookup,
    Ready1000,
    Reload1000,
    Rss1000,
}

impl Workload {
    /// Table order.
    pub const ALL: &[Workload] = &[
        Workload::ConnSerial,
        Workload::Conn8,
        Workload::Conn64,
        Workload::Iperf1,
        Workload::Iperf4,
        Workload::RedisP50C1,
        Workload::RedisP99C1,
        Workload::RedisP50C50,
        Workload::RedisP99C50,
        Workload::Pgbench,
        Workload::Dns1,
        Workload::Dns50,
        Workload::OneWay512,
        Workload::RssIdle,
        Workload::RssLoad,
        Workload::CpuLoad,
        Workload::Recreate,
        Workload::BpfIngress,
        Workload::BpfPass,
        Workload::BpfIngressRatio,
        Workload::BpfSkLookup,
        Workload::Ready1000,
        Workload::Reload1000,
        Workload::Rss1000,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::ConnSerial => "conn/s serial",
            Workload::Conn8 => "conn/s 8 concurrent",
            Workload::Conn64 => "conn/s 64 concurrent",
            Workload::Iperf1 => "iperf3 1 stream",
            Workload::Iperf4 => "iperf3 4 streams",
            Workload::RedisP50C1 => "redis GET p50 -c 1",
            Workload::RedisP99C1 => "redis GET p99 -c 1",
            Workload::RedisP50C50 => "redis GET p50 -c 50",
            Workload::RedisP99C50 => "redis GET p99 -c 50",
            Workload::Pgbench => "pgbench select-only -c 8",
            Workload::Dns1 => "DNS dnsperf 1 client",
            Workload::Dns50 => "DNS dnsperf 50 clients",
            Workload::OneWay512 => "UDP 512 B one-way, no loss",
            Workload::RssIdle => "daemon RSS idle",
            Workload::RssLoad => "daemon RSS under load",
            Workload::CpuLoad => "daemon CPU under load",
            Workload::Recreate => "bridge re-created -> served",
            Workload::BpfIngress => "lhb_ingress per packet, bulk",
            Workload::BpfPass => "empty TC program per packet, bulk",
            Workload::BpfIngressRatio => "lhb_ingress / empty TC program",
            Workload::BpfSkLookup => "lhb_sk_lookup per run",
            Workload::Ready1000 => "1,000 rules: start -> ready",
            Workload::Reload1000 => "1,000 rules: reload changing one",
            Workload::Rss1000 => "daemon RSS, 1,000 rules",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::ConnSerial | Workload::Conn8 | Workload::Conn64 => "conn/s",
            Workload::Iperf1 | Workload::Iperf4 => "Gbit/s",
            Workload::RedisP50C1
            | Workload::RedisP99C1
            | Workload::RedisP50C50
            | Workload::RedisP99C50
            | Workload::Recreate
            | Workload::Ready1000
            | Workload::Reload1000 => "ms",
            Workload::Pgbench => "tps",
            Workload::Dns1 | Workload::Dns50 => "queries/s",
            Workload::OneWay512 => "datagrams/s",
            Workload::RssIdle | Workload::RssLoad | Workload::Rss1000 => "MiB",
            Workload::CpuLoad => "% of a core",
            Workload::BpfIngress | Workload::BpfPass | Workload::BpfSkLookup => "ns",
            Workload::BpfIngressRatio => "x",
        }
    }

    pub fn lower_is_better(self) -> bool {
        !matches!(
            self,
            Workload::ConnSerial
                | Workload::Conn8
                | Workload::Conn64
                | Workload::Iperf1
                | Workload::Iperf4
                | Workload::Pgbench
                | Workload::Dns1
                | Workload::Dns50
                | Workload::OneWay512
        )
    }

    /// The chart it is drawn in.
    pub fn chart(self) -> &'static str {
        match self {
            Workload::ConnSerial | Workload::Conn8 | Workload::Conn64 => "connection-rate",
            Workload::Iperf1 | Workload::Iperf4 => "throughput",
            Workload::RedisP50C1
            | Workload::RedisP99C1
            | Workload::RedisP50C50
            | Workload::RedisP99C50 => "redis-latency",
            Workload::Pgbench => "pgbench",
            Workload::Dns1 | Workload::Dns50 | Workload::OneWay512 => "udp",
            Workload::RssIdle | Workload::RssLoad | Workload::Rss1000 => "memory",
            Workload::CpuLoad => "cpu",
            Workload::Recreate => "recreate",
            Workload::Ready1000 | Workload::Reload1000 => "scale",
            Workload::BpfIngress
            | Workload::BpfPass
            | Workload::BpfIngressRatio
            | Workload::BpfSkLookup => "bpf",
        }
    }

    /// Counts (connections, transactions) are whole; times, rates and sizes are not.
    pub fn decimals(self) -> usize {
        match self {
            Workload::ConnSerial
            | Workload::Conn8
            | Workload::Conn64
            | Workload::Pgbench
            | Workload::Dns1
            | Workload::Dns50
            | Workload::OneWay512
            | Workload::BpfIngress
            | Workload::BpfPass
            | Workload::BpfSkLookup => 0,
            _ => 2,
        }
    }
}
