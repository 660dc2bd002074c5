//! `ferry bench transport`: lane goodput between two ferry endpoints, like iperf3 or
//! ib_write_bw. The server accepts one session, acks and discards its Data messages, and
//! sends its own counts back when the client finishes; the client sends fixed-size
//! messages over its lanes for a while, waits for every ack, and reports per-lane and
//! aggregate goodput (payload bytes/s, and frame bytes/s with the 24-byte headers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_transport::{
    Error, Key, LaneStats, Listener, SessionConfig, SessionReceiver, SessionSender, MAX_PAYLOAD,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::net;
use crate::opts::{parse_secs, parse_size};
use crate::topo::{parse_lane, LaneSpec, Local};

/// Message tags of the benchmark session.
const TAG_DATA: u16 = 1;
/// Client → server: everything has been sent; reply with your counts.
const TAG_END: u16 = 2;
/// Server → client: the server's [`SideReport`] as JSON.
const TAG_REPORT: u16 = 3;
/// How long the end-of-run exchange (END, its ack, the report, the close) may take.
const END_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Measure lane goodput between two ferry endpoints (run `--server` on the destination
    /// first, then the client with `--to` or `--lane` on the source).
    Transport(TransportArgs),
}

#[derive(Args)]
pub struct TransportArgs {
    /// Be the receiving end: accept one session, ack and discard its messages, exit when
    /// the sender has finished.
    #[arg(long, conflicts_with_all = ["to", "lanes", "nic", "lane_count"])]
    server: bool,
    /// (server) Address and port to accept lanes on; 0.0.0.0 accepts lanes aimed at any
    /// local address, as `--lane` needs when each lane has its own remote address.
    #[arg(long, default_value = "0.0.0.0:7979")]
    listen: String,
    /// Shared key file (see `ferry key new`).
    #[arg(long)]
    key: PathBuf,
    /// (client) Destination ADDR:PORT: the remote of `--nic` lanes and of the
    /// `--lane-count` unbound lanes used when neither `--lane` nor `--nic` is given.
    #[arg(long)]
    to: Option<String>,
    /// (client) One lane from LOCAL (an address or interface of this host, bound) to
    /// REMOTE:PORT, e.g. 198.18.0.1=198.18.0.2:7979; repeat for more lanes.
    #[arg(long = "lane", value_name = "LOCAL=REMOTE:PORT", value_parser = parse_lane)]
    lanes: Vec<LaneSpec>,
    /// (client) One lane bound to this interface's first IPv4 address, to `--to`;
    /// repeatable. The route to `--to` picks the link: use `--lane` where each NIC pair
    /// has its own remote address.
    #[arg(long, value_name = "IFNAME")]
    nic: Vec<String>,
    /// (client) Number of unbound lanes to `--to` when neither `--lane` nor `--nic` is given.
    #[arg(long, default_value_t = 1)]
    lane_count: u16,
    /// (client) Seconds to send for.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    duration: Duration,
    /// (client) Payload bytes per message (e.g. 64K, 1M).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    message_size: u64,
    /// (client) Most unacknowledged messages per lane (default: the transport's).
    #[arg(long)]
    window: Option<usize>,
    /// Machine-readable output: one JSON object (the server prints `{"listening": ADDR}`
    /// first).
    #[arg(long)]
    json: bool,
}

/// One side's counts, per lane and in total.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SideReport {
    /// Seconds: client, first send to last ack; server, first message to the end message.
    duration_s: f64,
    lanes: Vec<LaneReport>,
    aggregate: Rates,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LaneReport {
    lane: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<String>,
    #[serde(flatten)]
    rates: Rates,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Rates {
    messages: u64,
    payload_bytes: u64,
    frame_bytes: u64,
    payload_bytes_per_s: f64,
    frame_bytes_per_s: f64,
    payload_mbit_s: f64,
}

impl Rates {
    fn new(messages: u64, payload_bytes: u64, frame_bytes: u64, secs: f64) -> Rates {
        let per_s = |b: u64| if secs > 0.0 { b as f64 / secs } else { 0.0 };
        Rates {
            messages,
            payload_bytes,
            frame_bytes,
            payload_bytes_per_s: per_s(payload_bytes),
            frame_bytes_per_s: per_s(frame_bytes),
            payload_mbit_s: per_s(payload_bytes) * 8.0 / 1e6,
        }
    }

    fn sum<'a>(all: impl Iterator<Item = &'a Rates>, secs: f64) -> Rates {
        let (m, p, f) = all.fold((0, 0, 0), |(m, p, f), r| {
            (m + r.messages, p + r.payload_bytes, f + r.frame_bytes)
        });
        Rates::new(m, p, f, secs)
    }
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<i32> {
    match cmd {
        BenchCmd::Transport(a) if a.server => server(&a),
        BenchCmd::Transport(a) => client(&a),
    }
}

fn session_config(window: Option<usize>) -> SessionConfig {
    let mut c = SessionConfig::default();
    if let Some(w) = window {
        c.window = w;
    }
    c
}

fn server(a: &TransportArgs) -> anyhow::Result<i32> {
    let key = Key::load(&a.key)?;
    let listener = Listener::bind(net::resolve(&a.listen)?)
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr();
    if a.json {
        println!("{}", json!({ "listening": addr.to_string() }));
    }
    eprintln!("ferry: bench server listening on {addr}");
    let rx = SessionReceiver::accept(&listener, &key, session_config(None), None)
        .context("accepting the benchmark session")?;
    let report = receive(&rx)?;
    let body = serde_json::to_vec(&report)?;
    rx.reply(TAG_REPORT, &body).context("sending the report")?;
    // Wait for the client to read the report and close (EOF on every lane), so that the
    // report is not cut off by our close. Lanes closing is now the expected end, not
    // worth the transport's warnings.
    log::set_max_level(log::LevelFilter::Error);
    let deadline = Instant::now() + END_TIMEOUT;
    while Instant::now() < deadline {
        match rx.recv(Duration::from_millis(200)) {
            Err(Error::Timeout { .. }) => {}
            Err(_) => break,
            Ok(m) => anyhow::bail!("message with tag {} after the end message", m.tag),
        }
    }
    drop(rx);
    if a.json {
        println!("{}", json!({ "role": "receiver", "report": report }));
    } else {
        print_table("receiver", &report, None);
    }
    Ok(0)
}

/// Acks and discards Data until the end message; returns the receiver's counts.
fn receive(rx: &SessionReceiver) -> anyhow::Result<SideReport> {
    let lanes = rx.lanes();
    let mut payload = vec![0u64; lanes];
    let mut messages = vec![0u64; lanes];
    let mut first = None;
    let end = loop {
        let m = match rx.recv(Duration::from_secs(1)) {
            Ok(m) => m,
            Err(Error::Timeout { .. }) => continue,
            Err(e) => return Err(e).context("the sender went away before finishing"),
        };
        rx.ack(&m).context("acknowledging")?;
        let slot = usize::from(m.lane).min(lanes - 1);
        match m.tag {
            TAG_DATA => {
                first.get_or_insert_with(Instant::now);
                payload[slot] += m.payload.len() as u64;
                messages[slot] += 1;
            }
            TAG_END => break Instant::now(),
            t => anyhow::bail!("unexpected message tag {t} from the sender"),
        }
    };
    let secs = first.map_or(0.0, |f| end.duration_since(f).as_secs_f64());
    let stats = rx.stats();
    let lanes: Vec<LaneReport> = stats
        .iter()
        .enumerate()
        .map(|(i, s)| LaneReport {
            lane: s.lane,
            local: None,
            remote: None,
            rates: Rates::new(messages[i], payload[i], s.bytes, secs),
        })
        .collect();
    let aggregate = Rates::sum(lanes.iter().map(|l| &l.rates), secs);
    Ok(SideReport {
        duration_s: secs,
        lanes,
        aggregate,
    })
}

/// The client's lanes, in order: `--lane`s, then `--nic`s, else `--lane-count` to `--to`.
fn routes(a: &TransportArgs) -> anyhow::Result<Vec<net::Route>> {
    let mut specs = a.lanes.clone();
    for nic in &a.nic {
        let to =
            a.to.as_deref()
                .with_context(|| format!("--nic {nic} needs --to for the remote address"))?;
        specs.push(LaneSpec {
            local: Some(Local::Interface(nic.clone())),
            remote: to.to_string(),
        });
    }
    if specs.is_empty() {
        let to =
            a.to.as_deref()
                .context("give the destination with --to ADDR:PORT or --lane")?;
        anyhow::ensure!(a.lane_count > 0, "--lane-count must be at least 1");
        let one = LaneSpec {
            local: None,
            remote: to.to_string(),
        };
        specs = vec![one; usize::from(a.lane_count)];
    }
    net::resolve_lanes(&specs)
}

fn client(a: &TransportArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        (1..=u64::from(MAX_PAYLOAD)).contains(&a.message_size),
        "--message-size must be between 1 byte and {} MiB",
        MAX_PAYLOAD >> 20
    );
    let routes = routes(a)?;
    let key = Key::load(&a.key)?;
    let config = session_config(a.window);
    let window = config.window;
    let tx = SessionSender::connect_routes(&routes, &key, config)
        .context("connecting to the bench server")?;
    let payload: Vec<u8> = (0..a.message_size).map(|i| (i * 7 + 1) as u8).collect();
    let start = Instant::now();
    while start.elapsed() < a.duration {
        tx.send(TAG_DATA, payload.clone()).context("sending")?;
    }
    tx.barrier().context("waiting for the last acks")?;
    let secs = start.elapsed().as_secs_f64();
    let stats = tx.stats();

    tx.send(TAG_END, Vec::new())
        .context("sending the end message")?;
    tx.barrier_timeout(END_TIMEOUT)
        .context("waiting for the end message's ack")?;
    let (tag, body) = tx
        .recv_reply(END_TIMEOUT)
        .context("waiting for the server's report")?;
    anyhow::ensure!(
        tag == TAG_REPORT,
        "unexpected reply tag {tag} from the server"
    );
    let receiver: SideReport =
        serde_json::from_slice(&body).context("decoding the server's report")?;
    drop(tx);

    let report = sender_report(&stats, &routes, a.message_size, secs);
    if a.json {
        println!(
            "{}",
            json!({
                "role": "sender",
                "message_size": a.message_size,
                "window": window,
                "duration_s": report.duration_s,
                "lanes": report.lanes,
                "aggregate": report.aggregate,
                "receiver": receiver,
            })
        );
    } else {
        print_table("sender", &report, Some((a.message_size, window)));
        print_table("receiver", &receiver, None);
    }
    Ok(0)
}

fn sender_report(
    stats: &[LaneStats],
    routes: &[(Option<SocketAddr>, SocketAddr)],
    message_size: u64,
    secs: f64,
) -> SideReport {
    let lanes: Vec<LaneReport> = stats
        .iter()
        .zip(routes)
        .map(|(s, (local, remote))| LaneReport {
            lane: s.lane,
            local: Some(local.map_or_else(|| "any".into(), |l| l.ip().to_string())),
            remote: Some(remote.to_string()),
            // Acked, not just written: goodput counts what the receiver has taken.
            rates: Rates::new(s.acked, s.acked * message_size, s.bytes, secs),
        })
        .collect();
    let aggregate = Rates::sum(lanes.iter().map(|l| &l.rates), secs);
    SideReport {
        duration_s: secs,
        lanes,
        aggregate,
    }
}

fn print_table(role: &str, r: &SideReport, params: Option<(u64, usize)>) {
    match params {
        Some((size, window)) => println!(
            "{role}: {} lanes, {size}-byte messages, window {window}, {:.2} s",
            r.lanes.len(),
            r.duration_s
        ),
        None => println!("{role}: {} lanes, {:.2} s", r.lanes.len(), r.duration_s),
    }
    println!(
        "{:>5}  {:<16} {:<22} {:>9} {:>14} {:>14} {:>12}",
        "lane", "local", "remote", "messages", "payload MB/s", "frame MB/s", "Mbit/s"
    );
    let row = |name: &str, local: &str, remote: &str, x: &Rates| {
        println!(
            "{name:>5}  {local:<16} {remote:<22} {:>9} {:>14.2} {:>14.2} {:>12.1}",
            x.messages,
            x.payload_bytes_per_s / 1e6,
            x.frame_bytes_per_s / 1e6,
            x.payload_mbit_s
        );
    };
    for l in &r.lanes {
        let local = l.local.as_deref().unwrap_or("-");
        let remote = l.remote.as_deref().unwrap_or("-");
        row(&l.lane.to_string(), local, remote, &l.rates);
    }
    row("all", "", "", &r.aggregate);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_sums() {
        let r = Rates::new(4, 4 << 20, (4 << 20) + 96, 2.0);
        assert_eq!(r.payload_bytes_per_s, (2 << 20) as f64);
        assert_eq!(r.frame_bytes_per_s, ((4 << 20) + 96) as f64 / 2.0);
        assert!((r.payload_mbit_s - 16.777216).abs() < 1e-9);
        let s = Rates::sum([&r, &r].into_iter(), 2.0);
        assert_eq!((s.messages, s.payload_bytes), (8, 8 << 20));
        assert_eq!(Rates::new(1, 1, 1, 0.0).payload_bytes_per_s, 0.0);
    }

    #[test]
    fn sender_report_counts_acked_payload_per_lane() {
        let stats = [
            LaneStats {
                lane: 0,
                bytes: 3 * (1024 + 24),
                messages: 3,
                acked: 3,
                ..LaneStats::default()
            },
            LaneStats {
                lane: 1,
                bytes: 1024 + 24,
                messages: 1,
                acked: 1,
                ..LaneStats::default()
            },
        ];
        let routes = [
            (
                Some("198.18.0.1:0".parse().unwrap()),
                "198.18.0.2:7979".parse().unwrap(),
            ),
            (None, "198.18.1.2:7979".parse().unwrap()),
        ];
        let r = sender_report(&stats, &routes, 1024, 1.0);
        assert_eq!(r.lanes[0].rates.payload_bytes, 3 * 1024);
        assert_eq!(r.lanes[0].local.as_deref(), Some("198.18.0.1"));
        assert_eq!(r.lanes[1].local.as_deref(), Some("any"));
        assert_eq!(r.lanes[1].remote.as_deref(), Some("198.18.1.2:7979"));
        assert_eq!(r.aggregate.payload_bytes, 4 * 1024);
        assert_eq!(r.aggregate.frame_bytes, 4 * (1024 + 24));
    }
}
