//! What the loadgen asks of the host: the open-files limit, the ephemeral port range,
//! CPU pinning, a monotonic clock shared by all threads, bind-before-connect sockets,
//! and the facts a published number must carry (CPU, kernel, rustc, server RSS/flags).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

/// Open files the loadgen needs besides its sockets (io_uring rings, stdio, files).
pub const FD_HEADROOM: u64 = 256;

/// Nanoseconds on CLOCK_MONOTONIC: one clock for every thread, so a timestamp written
/// into a message by one thread can be compared by another.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Unix milliseconds (for run ids).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub use imshard::server::{raise_open_files, FileLimit};

/// `net.ipv4.ip_local_port_range` as (low, high); the Linux default when unreadable.
pub fn local_port_range() -> (u32, u32) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .filter_map(|s| s.parse::<u32>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
        _ => (32768, 60999),
    }
}

/// The CPUs this process may run on (respects `taskset`), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; sched_setaffinity reads the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The i-th source address of `count`: 127.0.0.2, 127.0.0.3, ... (wrapping into
/// 127.0.1.x and on past 254). `None` when `count` is 0 (let the kernel choose).
pub fn source_addr(i: usize, count: usize) -> Option<IpAddr> {
    if count == 0 {
        return None;
    }
    let n = (i % count) as u32 + 2;
    Some(IpAddr::V4(Ipv4Addr::from(0x7F00_0000 | n)))
}

/// Starts a non-blocking TCP connect to `target` from `source` (port chosen at connect
/// time, IP_BIND_ADDRESS_NO_PORT, so ports are shared across destinations). Returns the
/// socket while the handshake may still be in flight; wait for it to be writable and
/// then check [`take_socket_error`].
pub fn start_connect(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from the pointer we give.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: the fd is a connected-or-connecting TCP socket we own; ownership moves.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) })
}

/// SO_ERROR of a socket: the outcome of a non-blocking connect.
pub fn take_socket_error(fd: i32) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int and its length into our locals.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

/// Shuts a socket down both ways so a pending read returns 0 (used at the end of a run).
pub fn shutdown(fd: i32) {
    // SAFETY: shutdown on an fd we own; errors (already closed) are irrelevant here.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// VmRSS of a process in bytes, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// How many WebSocket connections the server at `addr` has accepted since it started
/// (the sum of `imshard_connections_total` over its shards, from `/metrics`). `None`
/// when `/metrics` is not served there (e.g. it moved to `--admin-listen`).
pub fn connections_served(addr: std::net::SocketAddr) -> Option<u64> {
    parse_connections_total(&metrics_text(addr)?)
}

/// The `/metrics` text of the server at `addr`; `None` when it is not served there
/// (e.g. it moved to `--admin-listen`) or the server does not answer in 2 s.
pub fn metrics_text(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: loadgen\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.starts_with("HTTP/1.1 200").then_some(text)
}

/// Sums the `imshard_connections_total{shard="i"} N` series of a `/metrics` text.
fn parse_connections_total(text: &str) -> Option<u64> {
    metric_sum(text, "imshard_connections_total")
}

/// Sums the series of metric `name` (`name{shard="i"} N` or `name N`) of a `/metrics`
/// text over its shards; `None` when there is none.
pub fn metric_sum(text: &str, name: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value: u64 = rest.rsplit(' ').next()?.trim().parse().ok()?;
        *total.get_or_insert(0) += value;
    }
    total
}

/// A cluster node's counters, summed over its shards (from its `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// `imshard_cluster_nodes`: live nodes in the slot map, summed over shards (0 on a
    /// single node without `--node-id`).
    pub cluster_nodes: u64,
    /// `imshard_publishes_total`: pushes and notices this node published.
    pub publishes: u64,
    /// `imshard_channel_messages_total`: pushes and notices its shards received.
    pub channel_messages: u64,
    pub forwarded: u64,
    pub served: u64,
    /// `imshard_messages_stored_total`.
    pub messages_stored: u64,
    /// `imshard_pushes_total`: MSG_PUSH frames queued to devices.
    pub pushes: u64,
}

impl NodeCounters {
    pub fn parse(text: &str) -> NodeCounters {
        let m = |name| metric_sum(text, name).unwrap_or(0);
        NodeCounters {
            cluster_nodes: m("imshard_cluster_nodes"),
            publishes: m("imshard_publishes_total"),
            channel_messages: m("imshard_channel_messages_total"),
            forwarded: m("imshard_node_requests_forwarded_total"),
            served: m("imshard_node_requests_served_total"),
            messages_stored: m("imshard_messages_stored_total"),
            pushes: m("imshard_pushes_total"),
        }
    }

    /// Reads the node at `addr`; `None` when its `/metrics` is not served there.
    pub fn read(addr: std::net::SocketAddr) -> Option<NodeCounters> {
        metrics_text(addr).map(|t| NodeCounters::parse(&t))
    }

    /// What the counters grew by from `before` (`cluster_nodes` is `self`'s).
    pub fn since(&self, before: &NodeCounters) -> NodeCounters {
        NodeCounters {
            cluster_nodes: self.cluster_nodes,
            publishes: self.publishes.saturating_sub(before.publishes),
            channel_messages: self
                .channel_messages
                .saturating_sub(before.channel_messages),
            forwarded: self.forwarded.saturating_sub(before.forwarded),
            served: self.served.saturating_sub(before.served),
            messages_stored: self.messages_stored.saturating_sub(before.messages_stored),
            pushes: self.pushes.saturating_sub(before.pushes),
        }
    }
}

/// CPU time a process (all its threads) has used, user + system, in nanoseconds:
/// fields 14 and 15 of /proc/PID/stat, in clock ticks.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&text).map(|ticks| ticks * 1_000_000_000 / clock_ticks_per_sec())
}

/// utime + stime of a /proc/PID/stat line (the command name in parentheses may hold
/// spaces, so fields are counted after its closing parenthesis).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Host-wide network counters that explain latency tails: packets the kernel dropped
/// from its per-CPU input queue (netdev_max_backlog full) and TCP retransmits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Sum of the 2nd column of /proc/net/softnet_stat over the CPUs.
    pub softnet_dropped: u64,
    /// `Tcp: RetransSegs` of /proc/net/snmp.
    pub tcp_retrans_segs: u64,
}

impl NetCounters {
    /// What grew from `before` to `self`.
    pub fn since(&self, before: &NetCounters) -> NetCounters {
        NetCounters {
            softnet_dropped: self.softnet_dropped.saturating_sub(before.softnet_dropped),
            tcp_retrans_segs: self
                .tcp_retrans_segs
                .saturating_sub(before.tcp_retrans_segs),
        }
    }
}

pub fn net_counters() -> NetCounters {
    let softnet = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    NetCounters {
        softnet_dropped: parse_softnet_dropped(&softnet),
        tcp_retrans_segs: parse_snmp(&snmp, "Tcp:", "RetransSegs").unwrap_or(0),
    }
}

fn parse_softnet_dropped(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .sum()
}

/// A value of /proc/net/snmp: a header line and a value line share a prefix.
fn parse_snmp(text: &str, prefix: &str, key: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == key)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// `net.core.netdev_max_backlog`: the per-CPU input queue whose overflow drops packets
/// in fan-out bursts, loopback included (tuning/ recommends 16384).
pub fn netdev_max_backlog() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/core/netdev_max_backlog")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A process's command line, from /proc/PID/cmdline, with secrets redacted.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let parts: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    (!parts.is_empty()).then(|| redact_secrets(&parts).join(" "))
}

/// Flags whose value must not end up in a published report.
const SECRET_FLAGS: [&str; 1] = ["--jwt-secret"];

/// Replaces the values of the secret flags (`--flag value` and `--flag=value`) with `***`.
pub fn redact_secrets(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for a in args {
        if hide_next {
            out.push("***".to_string());
            hide_next = false;
        } else if let Some(flag) = SECRET_FLAGS
            .iter()
            .find(|f| a.starts_with(&format!("{f}=")))
        {
            out.push(format!("{flag}=***"));
        } else {
            hide_next = SECRET_FLAGS.contains(&a.as_str());
            out.push(a.clone());
        }
    }
    out
}

/// Facts about the host that go with every published number.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub rustc: Option<String>,
    /// `net.core.netdev_max_backlog` during the run.
    pub netdev_max_backlog: Option<u64>,
}

pub fn host_facts() -> HostFacts {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rustc = std::process::Command::new("rustc")
        .arg("-V")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    HostFacts {
        cpu_model,
        cores,
        kernel: kernel(),
        rustc,
        netdev_max_backlog: netdev_max_backlog(),
    }
}

fn kernel() -> String {
    // SAFETY: uname fills the utsname we own; its fields are NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".into();
        }
        let field = |f: &[libc::c_char]| {
            std::ffi::CStr::from_ptr(f.as_ptr())
                .to_string_lossy()
                .into_owned()
        };
        format!(
            "{} {} {}",
            field(&u.sysname),
            field(&u.release),
            field(&u.machine)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_total_is_summed_over_shards() {
        let text = "# HELP imshard_connections_total x\n# TYPE imshard_connections_total counter\n\
                    imshard_connections_total{shard=\"0\"} 3\nimshard_connections_total{shard=\"1\"} 4\n\
                    imshard_connections{shard=\"0\"} 9\n";
        assert_eq!(parse_connections_total(text), Some(7));
        assert_eq!(parse_connections_total("imshard_connections 1\n"), None);
    }

    #[test]
    fn node_counters_parse_and_subtract() {
        let text = "imshard_cluster_nodes{shard=\"0\"} 3\nimshard_cluster_nodes{shard=\"1\"} 3\n\
                    imshard_publishes_total{shard=\"0\"} 10\nimshard_publishes_total{shard=\"1\"} 5\n\
                    imshard_channel_messages_total{shard=\"0\"} 7\n\
                    imshard_pushes_total{shard=\"0\"} 99\n";
        let c = NodeCounters::parse(text);
        assert_eq!(c.cluster_nodes, 6);
        assert_eq!(c.publishes, 15);
        assert_eq!(c.channel_messages, 7);
        assert_eq!(c.pushes, 99);
        assert_eq!(c.forwarded, 0);
        let before = NodeCounters {
            publishes: 5,
            ..NodeCounters::default()
        };
        assert_eq!(c.since(&before).publishes, 10);
        assert_eq!(c.since(&before).cluster_nodes, 6);
    }

    #[test]
    fn source_addrs_start_at_127_0_0_2() {
        assert_eq!(source_addr(0, 0), None);
        assert_eq!(source_addr(0, 3), Some("127.0.0.2".parse().expect("ip")));
        assert_eq!(source_addr(4, 3), Some("127.0.0.3".parse().expect("ip")));
        assert_eq!(
            source_addr(254, 300),
            Some("127.0.1.0".parse().expect("ip"))
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let args: Vec<String> = [
            "imshard",
            "serve",
            "--jwt-secret",
            "s3",
            "--jwt-secret=s4",
            "--shards",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            redact_secrets(&args).join(" "),
            "imshard serve --jwt-secret *** --jwt-secret=*** --shards 2"
        );
    }

    #[test]
    fn proc_texts_parse() {
        let stat = "4242 (imshard shard-0) S 1 4242 4242 0 -1 4194560 9 0 0 0 250 70 0 0 20 0 5 0";
        assert_eq!(parse_cpu_ticks(stat), Some(320));
        let softnet = "0000a000 000003e8 00000000\n0000b000 00000010 00000000\n";
        assert_eq!(parse_softnet_dropped(softnet), 1000 + 16);
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin RetransSegs\nTcp: 1 200 77\n";
        assert_eq!(parse_snmp(snmp, "Tcp:", "RetransSegs"), Some(77));
        assert!(cpu_ns(std::process::id()).is_some());
    }

    #[test]
    fn clock_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }
}
