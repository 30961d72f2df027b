//! firewalld (RHEL, Fedora, CentOS Stream, openSUSE): its zones reject what they do not
//! allow (`reject with icmpx admin-prohibited`), and it owns its nftables table: a rule
//! another tool inserts there is wiped by every `firewall-cmd --reload`, and an accept in
//! another table does not stop firewalld's reject. So lhb asks firewalld itself, over
//! D-Bus, for a runtime rich rule in the zone that handles the bridge:
//!
//! `rule priority="-32000" family="ipv4" destination address="GW" port port="P" protocol="tcp" accept`
//! (`protocol="udp"` for a UDP opening)
//!
//! Runtime only: nothing is written to firewalld's permanent configuration, so a crash
//! leaves nothing that survives a reload or a reboot. firewalld creates zones and
//! policies only in its permanent configuration, so the rule goes into the zone the
//! bridge is bound to (or the default zone, for a bridge bound to none): firewalld
//! enters a zone's rules only for packets arriving on that zone's interfaces, and the
//! rule names the gateway address, TCP and the port. A reload forgets runtime rules:
//! lhb follows firewalld's `Reloaded` signal (and its restarts) and puts them back.
//!
//! Rich rules carry no comment, so lhb's are told apart by their exact shape and the
//! priority -32000 (also what puts them ahead of the zone's own rules).

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::Context as _;
use tracing::{debug, info, warn};
use zbus::blocking::Connection;

use super::{Backend, Exec, Insert, Opening, Transport};

const NAME: &str = "org.fedoraproject.FirewallD1";
const PATH: &str = "/org/fedoraproject/FirewallD1";
const ZONE: &str = "org.fedoraproject.FirewallD1.zone";

/// The priority of lhb's rich rules: their mark, and first among a zone's rules.
pub const PRIORITY: i32 = -32000;

/// How long a call to firewalld may take: a reload of a large configuration blocks
/// its D-Bus answers for a while.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Firewalld {
    conn: Connection,
    /// `Backend::memo`: while on, each bridge's zone and each zone's target are asked
    /// once (a heal of many openings asks about the same few zones).
    memo: Option<Memo>,
}

#[derive(Default)]
struct Memo {
    zones: std::collections::HashMap<String, (String, bool)>,
    targets: std::collections::HashMap<String, String>,
}

fn connect() -> zbus::Result<Connection> {
    zbus::blocking::connection::Builder::system()?
        .method_timeout(CALL_TIMEOUT)
        .build()
}

/// firewalld's D-Bus name has an owner on the system bus (`DBUS_SYSTEM_BUS_ADDRESS`,
/// else the standard socket).
fn owned(conn: &Connection) -> bool {
    zbus::blocking::fdo::DBusProxy::new(conn)
        .and_then(|p| Ok(p.name_has_owner(NAME.try_into()?)?))
        .unwrap_or(false)
}

impl Firewalld {
    /// The backend, if firewalld runs.
    pub fn detect() -> Option<Firewalld> {
        let conn = connect().ok()?;
        owned(&conn).then_some(Firewalld { conn, memo: None })
    }

    fn call<B, R>(&self, iface: &str, method: &str, body: &B) -> anyhow::Result<R>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type,
    {
        call(&self.conn, iface, method, body)
    }

    /// The zone firewalld handles the bridge's packets in: the one it is bound to, or
    /// the default zone.
    fn zone_of(&mut self, iface: &str) -> anyhow::Result<(String, bool)> {
        if let Some(z) = self.memo.as_ref().and_then(|m| m.zones.get(iface)) {
            return Ok(z.clone());
        }
        let bound: String = self.call(ZONE, "getZoneOfInterface", &(iface,))?;
        let zone = if bound.is_empty() {
            (self.call(NAME, "getDefaultZone", &())?, false)
        } else {
            (bound, true)
        };
        if let Some(m) = &mut self.memo {
            m.zones.insert(iface.to_string(), zone.clone());
        }
        Ok(zone)
    }

    /// A zone's target (`default`, `ACCEPT`, `DROP`, `%%REJECT%%`).
    fn target(&mut self, zone: &str) -> anyhow::Result<String> {
        if let Some(t) = self.memo.as_ref().and_then(|m| m.targets.get(zone)) {
            return Ok(t.clone());
        }
        let settings: std::collections::HashMap<String, zbus::zvariant::OwnedValue> =
            self.call(ZONE, "getZoneSettings2", &(zone,))?;
        let target = settings
            .get("target")
            .and_then(|v| String::try_from(v.clone()).ok())
            .unwrap_or_else(|| "default".into());
        if let Some(m) = &mut self.memo {
            m.targets.insert(zone.to_string(), target.clone());
        }
        Ok(target)
    }

    /// Whether `zone` lets `o` in without lhb: it accepts everything, or allows the
    /// port.
    fn allows(&mut self, zone: &str, o: &Opening) -> anyhow::Result<Option<String>> {
        let target = self.target(zone)?;
        if target == "ACCEPT" {
            return Ok(Some(format!("zone {zone} accepts everything")));
        }
        let proto = o.transport.as_str();
        let port: bool = self.call(ZONE, "queryPort", &(zone, o.port.to_string(), proto))?;
        Ok(port.then(|| format!("zone {zone} allows port {}/{proto}", o.port)))
    }

    fn zones(&self) -> anyhow::Result<Vec<String>> {
        self.call(ZONE, "getZones", &())
    }
}

fn call<B, R>(conn: &Connection, iface: &str, method: &str, body: &B) -> anyhow::Result<R>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
    R: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type,
{
    let reply = tokio::task::block_in_place(|| {
        zbus::blocking::Proxy::new(conn, NAME, PATH, iface)?.call_method(method, body)
    })
    .with_context(|| format!("firewalld {method}"))?;
    reply
        .body()
        .deserialize()
        .with_context(|| format!("firewalld {method}: unexpected answer"))
}

/// lhb's rich rule for `o`, in the form firewalld prints it back.
pub fn rich_rule(o: &Opening) -> String {
    let family = if o.gateway.is_ipv6() { "ipv6" } else { "ipv4" };
    format!(
        "rule priority=\"{PRIORITY}\" family=\"{family}\" destination address=\"{}\" port port=\"{}\" protocol=\"{}\" accept",
        o.gateway,
        o.port,
        o.transport.as_str()
    )
}

/// The gateway, port and transport of one of lhb's rich rules; None for any other
/// rule.
fn parse_rich_rule(rule: &str) -> Option<(IpAddr, u16, Transport)> {
    let rest = rule.strip_prefix(&format!("rule priority=\"{PRIORITY}\" family=\""))?;
    let (_, rest) = rest.split_once("\" destination address=\"")?;
    let (addr, rest) = rest.split_once("\" port port=\"")?;
    let (port, rest) = rest.split_once('"')?;
    let transport = match rest {
        " protocol=\"tcp\" accept" => Transport::Tcp,
        " protocol=\"udp\" accept" => Transport::Udp,
        _ => return None,
    };
    let (gateway, port): (IpAddr, u16) = (addr.parse().ok()?, port.parse().ok()?);
    let o = Opening {
        iface: String::new(),
        gateway,
        port,
        transport,
    };
    (rich_rule(&o) == rule).then_some((gateway, port, transport))
}

/// The `firewall-cmd` that does by hand what lhb does for `o` in `zone`.
pub fn command(zone: &str, o: &Opening) -> String {
    format!(
        "firewall-cmd --zone={zone} --add-rich-rule='{}'",
        rich_rule(o)
    )
}

/// Adds a runtime rich rule (no timeout).
pub(super) fn add(conn: &Connection, zone: &str, rule: &str) -> anyhow::Result<()> {
    let _: String = call(conn, ZONE, "addRichRule", &(zone, rule, 0i32))?;
    Ok(())
}

impl Backend for Firewalld {
    fn name(&self) -> String {
        "firewalld".into()
    }

    fn planned(&mut self, o: &Opening) -> anyhow::Result<Vec<Insert>> {
        let (zone, _) = self.zone_of(&o.iface)?;
        if self.allows(&zone, o)?.is_some() {
            return Ok(Vec::new());
        }
        let rule = rich_rule(o);
        let present: bool = self.call(ZONE, "queryRichRule", &(zone.as_str(), rule.as_str()))?;
        Ok(vec![Insert {
            chain: format!("firewalld zone {zone}"),
            rule: command(&zone, o),
            present,
            exec: Exec::Firewalld {
                conn: self.conn.clone(),
                zone,
                rule,
            },
        }])
    }

    fn close(&mut self, o: &Opening) -> anyhow::Result<()> {
        let rule = rich_rule(o);
        // Every zone: the bridge may have moved to another since.
        for zone in self.zones()? {
            let has: bool = self.call(ZONE, "queryRichRule", &(zone.as_str(), rule.as_str()))?;
            if has {
                let _: String =
                    self.call(ZONE, "removeRichRule", &(zone.as_str(), rule.as_str()))?;
            }
        }
        Ok(())
    }

    fn leftovers(&mut self) -> anyhow::Result<BTreeSet<Opening>> {
        let mut left = BTreeSet::new();
        for zone in self.zones()? {
            let rules: Vec<String> = self.call(ZONE, "getRichRules", &(zone.as_str(),))?;
            for (gateway, port, transport) in rules.iter().filter_map(|r| parse_rich_rule(r)) {
                // The rule names no interface: the one holding the gateway address now.
                // One that none holds is an opening of a bridge that is gone, removed
                // by the first sync like any opening no longer wanted.
                let iface = iface_with(gateway).unwrap_or_else(|| "-".into());
                left.insert(Opening {
                    iface,
                    gateway,
                    port,
                    transport,
                });
            }
        }
        Ok(left)
    }

    fn blockers(&mut self, o: &Opening) -> anyhow::Result<Vec<String>> {
        let (zone, bound) = self.zone_of(&o.iface)?;
        if self.allows(&zone, o)?.is_some() {
            return Ok(Vec::new());
        }
        let has: bool = self.call(
            ZONE,
            "queryRichRule",
            &(zone.as_str(), rich_rule(o).as_str()),
        )?;
        if has {
            return Ok(Vec::new());
        }
        let target = self.target(&zone)?;
        let why = if bound {
            format!("{} is in it", o.iface)
        } else {
            format!("the default zone: {} is bound to none", o.iface)
        };
        Ok(vec![format!(
            "firewalld zone {zone} ({why}; target {target}: rejects what it does not allow)"
        )])
    }

    fn missing(&mut self, held: &BTreeSet<Opening>) -> anyhow::Result<BTreeSet<Opening>> {
        let mut missing = BTreeSet::new();
        for o in held {
            if self.planned(o)?.iter().any(|i| !i.present) {
                missing.insert(o.clone());
            }
        }
        Ok(missing)
    }

    fn notified(&self) -> bool {
        // Reloads and restarts come as D-Bus signals (`watch`).
        true
    }

    fn memo(&mut self, on: bool) {
        self.memo = on.then(Memo::default);
    }

    fn fix(&mut self, o: &Opening) -> Option<String> {
        let (zone, _) = self.zone_of(&o.iface).ok()?;
        Some(command(&zone, o))
    }

    fn watch(&self, changed: tokio::sync::mpsc::Sender<()>) {
        let spawned = std::thread::Builder::new()
            .name("lhb-firewalld".into())
            .spawn(move || follow_reloads(&changed));
        if let Err(e) = spawned {
            warn!("firewalld: cannot follow its reloads: {e}");
        }
    }
}

/// Says "changed" on every `Reloaded` signal and every time firewalld (re)starts: both
/// forget runtime rules. Reconnects to the bus if it goes away. Ends when the receiver
/// is gone.
fn follow_reloads(changed: &tokio::sync::mpsc::Sender<()>) {
    loop {
        match listen(changed) {
            Ok(()) => return,
            Err(e) => debug!("firewalld signals: {e:#}; listening again in 1 s"),
        }
        if changed.is_closed() {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn listen(changed: &tokio::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    use zbus::{MatchRule, blocking::MessageIterator, message::Type};
    let conn = connect()?;
    let reloaded = MatchRule::builder()
        .msg_type(Type::Signal)
        .interface(NAME)?
        .member("Reloaded")?
        .build();
    let started = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.freedesktop.DBus")?
        .interface("org.freedesktop.DBus")?
        .member("NameOwnerChanged")?
        .add_arg(NAME)?
        .build();
    let mut reloads = MessageIterator::for_match_rule(reloaded, &conn, Some(8))?;
    let starts = MessageIterator::for_match_rule(started, &conn, Some(8))?;
    // One thread, two iterators: the starts are checked after each reload and by a
    // second thread of their own.
    let tx = changed.clone();
    std::thread::Builder::new()
        .name("lhb-firewalld-owner".into())
        .spawn(move || {
            for msg in starts {
                let Ok(msg) = msg else { return };
                let new_owner = msg
                    .body()
                    .deserialize::<(String, String, String)>()
                    .map(|(_, _, new)| !new.is_empty())
                    .unwrap_or(false);
                if new_owner {
                    info!("firewalld started: putting lhb's rules back");
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = tx.try_send(())
                    {
                        return;
                    }
                }
            }
        })?;
    for msg in reloads.by_ref() {
        msg?;
        info!("firewalld reloaded: putting lhb's rules back");
        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = changed.try_send(()) {
            return Ok(());
        }
    }
    anyhow::bail!("the system bus closed the connection")
}

/// The interface holding `addr` now, if any.
fn iface_with(addr: IpAddr) -> Option<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; we only read it.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        let a = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let s = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(s.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let s = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(s.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if a == Some(addr) {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lhbs_rich_rules_parse_back_and_no_other_does() {
        for gw in ["10.204.1.1", "fd00::1"] {
            let o = Opening {
                iface: "br0".into(),
                gateway: gw.parse().unwrap(),
                port: 11434,
                transport: Transport::Tcp,
            };
            let r = rich_rule(&o);
            assert_eq!(
                parse_rich_rule(&r),
                Some((o.gateway, 11434, Transport::Tcp)),
                "{r}"
            );
            let u = Opening {
                transport: Transport::Udp,
                ..o.clone()
            };
            assert!(rich_rule(&u).contains("protocol=\"udp\""));
            assert_eq!(
                parse_rich_rule(&rich_rule(&u)),
                Some((o.gateway, 11434, Transport::Udp))
            );
        }
        assert_eq!(
            rich_rule(&Opening {
                iface: "br0".into(),
                gateway: "10.0.0.1".parse().unwrap(),
                port: 80,
                transport: Transport::Tcp,
            }),
            "rule priority=\"-32000\" family=\"ipv4\" destination address=\"10.0.0.1\" port port=\"80\" protocol=\"tcp\" accept"
        );
        for other in [
            "rule family=\"ipv4\" destination address=\"10.0.0.1\" port port=\"80\" protocol=\"tcp\" accept",
            "rule priority=\"-32000\" family=\"ipv4\" source address=\"10.0.0.0/8\" destination address=\"10.0.0.1\" port port=\"80\" protocol=\"tcp\" accept",
            "rule priority=\"-32000\" family=\"ipv4\" destination address=\"10.0.0.1\" port port=\"80\" protocol=\"tcp\" reject",
            "rule priority=\"-32000\" family=\"ipv6\" destination address=\"10.0.0.1\" port port=\"80\" protocol=\"tcp\" accept",
            "rule priority=\"-32000\" family=\"ipv4\" destination address=\"10.0.0.1\" port port=\"0x50\" protocol=\"tcp\" accept",
        ] {
            assert_eq!(parse_rich_rule(other), None, "{other}");
        }
    }

    #[test]
    fn loopback_is_found_on_lo() {
        assert_eq!(
            iface_with("127.0.0.1".parse().unwrap()).as_deref(),
            Some("lo")
        );
    }
}
