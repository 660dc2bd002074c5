//! Session throughput with 1 MiB messages, each acknowledged by a receiving thread after
//! `recv`: over in-memory lanes (`mem_pair`, a Unix socket pair) and over loopback TCP, with
//! 1 and 2 lanes and the default window (16 messages per lane).
//!
//! ```text
//! cargo bench -p ferry-benches --bench transport
//! cargo run -p ferry-benches --bin criterion_summary
//! ```
//!
//! One iteration is one message; a sample sends its messages and then waits for every ack
//! (`barrier`). Received payloads go back to the sender for reuse, so after warm-up neither
//! side allocates or copies outside the transport itself.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_transport::{
    mem_pair, Key, Lane, LaneInfo, Listener, SessionConfig, SessionReceiver, SessionSender,
};

const MESSAGE: usize = 1 << 20;
/// Upper bound on anything that should happen; only reached when something is broken.
const LONG: Duration = Duration::from_secs(60);

fn key() -> Key {
    Key::from_bytes(&[0x42; 32]).expect("a valid key")
}

/// In-memory lanes of one session: (sender, receiver).
fn mem_session(lanes: u16) -> (SessionSender, SessionReceiver) {
    let mut client = Vec::new();
    let mut server = Vec::new();
    for lane in 0..lanes {
        let (a, b) = mem_pair().expect("a socket pair");
        let srv = thread::spawn(move || Lane::server(b, &key(), LONG).expect("server handshake"));
        let info = LaneInfo {
            session: 7,
            lane,
            lanes,
        };
        client.push(Lane::client(a, &key(), info, LONG).expect("client handshake"));
        server.push(srv.join().expect("handshake thread"));
    }
    let tx = SessionSender::new(client, SessionConfig::default()).expect("sender");
    let rx = SessionReceiver::new(server, SessionConfig::default()).expect("receiver");
    (tx, rx)
}

/// Loopback TCP lanes of one session: (sender, receiver).
fn tcp_session(lanes: usize) -> (SessionSender, SessionReceiver) {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let listener = Listener::bind(loopback).expect("binding loopback");
    let addr = listener.local_addr();
    let srv = thread::spawn(move || {
        SessionReceiver::accept(&listener, &key(), SessionConfig::default(), Some(LONG))
            .expect("accepting the session")
    });
    let tx = SessionSender::connect(addr, &vec![None; lanes], &key(), SessionConfig::default())
        .expect("connecting");
    (tx, srv.join().expect("accept thread"))
}

/// The receiving application: receives and acks until the session ends, handing payloads
/// back to the sender.
fn receive(rx: SessionReceiver, back: mpsc::Sender<Vec<u8>>) -> JoinHandle<u64> {
    thread::spawn(move || {
        let mut n = 0;
        while let Ok(m) = rx.recv(LONG) {
            if rx.ack(&m).is_err() {
                break;
            }
            n += 1;
            // The sender may be gone already.
            let _ = back.send(m.payload);
        }
        n
    })
}

fn bench_session(c: &mut Criterion, name: &str, (tx, rx): (SessionSender, SessionReceiver)) {
    let (back, pool) = mpsc::channel();
    let receiver = receive(rx, back);
    let template: Vec<u8> = (0..MESSAGE).map(|i| (i * 7 + i / 4096) as u8).collect();

    let mut g = c.benchmark_group("transport/1mib_acked");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .throughput(Throughput::Bytes(MESSAGE as u64));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let payload = pool.try_recv().unwrap_or_else(|_| template.clone());
                tx.send(1, payload).expect("sending");
            }
            tx.barrier().expect("every message acked");
            start.elapsed()
        })
    });
    g.finish();
    drop(tx);
    let n = receiver.join().expect("receiver thread");
    eprintln!("transport: {name}: {n} messages received");
}

fn benches(c: &mut Criterion) {
    bench_session(c, "mem_1lane", mem_session(1));
    bench_session(c, "mem_2lanes", mem_session(2));
    bench_session(c, "tcp_1lane", tcp_session(1));
    bench_session(c, "tcp_2lanes", tcp_session(2));
}

criterion_group!(transport, benches);
criterion_main!(transport);
