//! Which capabilities this process holds, so a missing one is named before anything is
//! attempted rather than surfacing later as a bare EPERM.

use std::fs;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The effective capability set of this process.
pub fn effective() -> std::io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("no CapEff line in /proc/self/status"))
}

/// Names the capabilities the kernel data path needs and this process lacks.
pub fn missing_for_kernel_path(eff: u64) -> Vec<&'static str> {
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN still stands in for CAP_BPF on every kernel.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // Measured: without it the verifier refuses the socket helpers' pointer handling.
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability() {
        let p = 1u64 << CAP_PERFMON;
        let all = (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN) | p;
        assert!(missing_for_kernel_path(all).is_empty());
        assert!(missing_for_kernel_path((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)).is_empty());
        assert_eq!(
            missing_for_kernel_path((1 << CAP_NET_ADMIN) | p),
            vec!["CAP_BPF"]
        );
        assert_eq!(
            missing_for_kernel_path((1 << CAP_BPF) | p),
            vec!["CAP_NET_ADMIN"]
        );
        assert_eq!(
            missing_for_kernel_path((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)),
            vec!["CAP_PERFMON"]
        );
        assert_eq!(
            missing_for_kernel_path(0),
            vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
    }
}
