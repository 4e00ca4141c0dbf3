//! A network namespace joined to the root namespace by a veth pair, for faults that loopback
//! cannot stage: a peer that vanishes without a FIN or a reset (a host that died, a network that
//! drops everything) is a namespace whose packets nftables drops; a slow link is one whose
//! traffic tc shapes ([`Netns::throttle`]).
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); [`Netns::unavailable`] says why a test
//! cannot run here. Everything made is removed on drop, also while a test panics: the nftables
//! table lives inside the namespace, and deleting the namespace deletes its veth end, which
//! deletes the pair.

use std::fs::File;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::process::run_with_timeout;

/// Every namespace made here is named `PREFIX-TAG-PID-N`, so that one left behind by a killed
/// test process can be recognised (its pid is gone) and removed.
const PREFIX: &str = "sluicens";
/// The nftables table that drops everything, inside the namespace.
const BLACKHOLE_TABLE: &str = "sluice_blackhole";
/// Bound on each `ip`/`nft` command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A network namespace with an address reachable from the root namespace; removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_link: String,
    host_addr: Ipv4Addr,
    addr: Ipv4Addr,
}

impl Netns {
    /// Why namespaces cannot be made here (not root, `ip` or `nft` missing), or `None`.
    pub fn unavailable() -> Option<String> {
        if !is_root() {
            return Some("not root: network namespaces, veth and nftables need root".into());
        }
        for (tool, flag, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
            let found = Command::new(tool)
                .arg(flag)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if !found {
                return Some(format!(
                    "`{tool}` not found: install {package} (scripts/install-deps.sh)"
                ));
            }
        }
        None
    }

    /// Makes a namespace (named after `tag`, this process and a counter) and a veth pair
    /// joining it to the root namespace, each end with an address of its own /30 in
    /// 10.213.0.0/16, up.
    pub fn create(tag: &str) -> io::Result<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_orphans();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // One /30 per (pid, n): 16384 of them in 10.213.0.0/16.
        let index = (pid % 4096) * 4 + n % 4;
        let [_, _, high, low] = (index << 2).to_be_bytes();
        let host_addr = Ipv4Addr::new(10, 213, high, low + 1);
        let addr = Ipv4Addr::new(10, 213, high, low + 2);
        // Interface names have at most 15 bytes.
        let host_link = format!("sl{pid}-{n}h");
        let ns_link = format!("sl{pid}-{n}n");
        let netns = Netns {
            name: format!("{PREFIX}-{tag}-{pid}-{n}"),
            host_link,
            host_addr,
            addr,
        };
        // From here on, a failure drops `netns`, which removes what was made.
        netns.ip(&["netns", "add", &netns.name])?;
        netns.ip(&[
            "link",
            "add",
            &netns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &ns_link,
        ])?;
        netns.ip(&["link", "set", &ns_link, "netns", &netns.name])?;
        let host_cidr = format!("{host_addr}/30");
        netns.ip(&["addr", "add", &host_cidr, "dev", &netns.host_link])?;
        netns.ip(&["link", "set", &netns.host_link, "up"])?;
        let cidr = format!("{addr}/30");
        netns.ip_inside(&["addr", "add", &cidr, "dev", &ns_link])?;
        netns.ip_inside(&["link", "set", &ns_link, "up"])?;
        netns.ip_inside(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The root namespace's address on the veth pair.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// Runs `f` on a thread that has entered the namespace, and returns what it returns.
    /// Sockets keep the namespace they were made in, so a listener bound by `f` serves there
    /// (and threads that `f` spawns start inside too).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let ns = File::open(&path)?;
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the closure panicked in the netns")))
        })
    }

    /// Drops every packet into and out of the namespace, at once (one nftables transaction):
    /// its peers see silence, as from a host that died.
    pub fn blackhole(&self) -> io::Result<()> {
        let ruleset = format!(
            "table inet {BLACKHOLE_TABLE} {{\n\
             \tchain input {{ type filter hook input priority 0; policy drop; }}\n\
             \tchain output {{ type filter hook output priority 0; policy drop; }}\n\
             }}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(ruleset.as_bytes())?;
        let output = child.wait_with_output()?;
        if output.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "nft -f (blackhole {}): {}: {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    /// Lets packets through again.
    pub fn restore(&self) -> io::Result<()> {
        self.ip(&[
            "netns",
            "exec",
            &self.name,
            "nft",
            "delete",
            "table",
            "inet",
            BLACKHOLE_TABLE,
        ])
    }

    /// Shapes what the root namespace sends into the namespace to `rate` (a tc rate such as
    /// `1mbit`; `tc tbf` on the host's veth end, needs `tc` from iproute2), queueing up to 64 MiB
    /// rather than dropping: a sender's socket stays charged for what waits in the queue, so
    /// its sends block once its send buffer is full, as behind a slow link.
    pub fn throttle(&self, rate: &str) -> io::Result<()> {
        run(Command::new("tc").args([
            "qdisc",
            "add",
            "dev",
            &self.host_link,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "16kb",
            "limit",
            "64mb",
        ]))
    }

    /// Removes the shaping of [`Netns::throttle`]; what waited in its queue is dropped.
    pub fn unthrottle(&self) -> io::Result<()> {
        run(Command::new("tc").args(["qdisc", "del", "dev", &self.host_link, "root"]))
    }

    fn ip_inside(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        self.ip(&all)
    }

    fn ip(&self, args: &[&str]) -> io::Result<()> {
        run(Command::new("ip").args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The nftables table and the namespace's veth end go with the namespace; the host end
        // goes with its peer. Deleting the host end too covers a namespace that was never made.
        let _ = self.restore();
        let _ = self.ip(&["netns", "delete", &self.name]);
        let _ = self.ip(&["link", "delete", &self.host_link]);
    }
}

/// Whether this process runs with effective uid 0 (`Uid:` in /proc/self/status: real,
/// effective, saved, filesystem).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// Runs `command` (bounded); an error with its stderr unless it succeeds.
fn run(command: &mut Command) -> io::Result<()> {
    let output = run_with_timeout(command, COMMAND_TIMEOUT)?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{command:?}: {}: {}",
        output.status,
        output.stderr.trim()
    )))
}

/// Removes namespaces made here by processes that no longer exist (a test killed before its
/// drops ran), so that their addresses cannot shadow a new namespace's.
fn remove_orphans() {
    let Ok(listing) = run_with_timeout(Command::new("ip").args(["netns", "list"]), COMMAND_TIMEOUT)
    else {
        return;
    };
    for line in listing.stdout.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let mut parts = name.rsplitn(3, '-');
        let (Some(_n), Some(pid), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let orphan = rest.starts_with(&format!("{PREFIX}-"))
            && pid.parse::<u32>().is_ok_and(|pid| {
                pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            });
        if orphan {
            let _ = run_with_timeout(
                Command::new("ip").args(["netns", "delete", name]),
                COMMAND_TIMEOUT,
            );
        }
    }
}
