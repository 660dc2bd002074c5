//! Session tests over loopback TCP and in-memory lanes. Timeouts here are generous upper
//! bounds that turn a hang into a failure; no assertion depends on something happening
//! quickly.

use std::collections::HashSet;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::error::chain;
use crate::lane::{mem_pair, Lane, Listener, MemStream, Stream};
use crate::wire::{self, Frame, Kind};
use crate::Key;

/// Upper bound for anything that should happen; only reached when something is broken.
const LONG: Duration = Duration::from_secs(120);
const N: u64 = 10_000;

fn key() -> Key {
    Key::from_bytes(&[0x42; 32]).unwrap()
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config(window: usize) -> SessionConfig {
    SessionConfig {
        window,
        ..SessionConfig::default()
    }
}

/// `n` connected TCP lanes of one session: (source side, destination side).
fn tcp_lanes(n: u16) -> (Vec<Lane<TcpStream>>, Vec<Lane<TcpStream>>) {
    let listener = Listener::bind(loopback()).unwrap();
    let addr = listener.local_addr();
    let srv = thread::spawn(move || {
        let mut lanes: Vec<_> = (0..n).map(|_| listener.accept(&key()).unwrap()).collect();
        lanes.sort_by_key(Lane::index);
        lanes
    });
    let session = random_session_id();
    let client = (0..n)
        .map(|lane| {
            let info = LaneInfo {
                session,
                lane,
                lanes: n,
            };
            crate::lane::connect(None, addr, &key(), info, &LaneConfig::default()).unwrap()
        })
        .collect();
    (client, srv.join().unwrap())
}

/// `n` connected in-memory lanes of one session: (source side, destination side).
fn mem_lanes(n: u16) -> (Vec<Lane<MemStream>>, Vec<Lane<MemStream>>) {
    let mut client = Vec::new();
    let mut server = Vec::new();
    for lane in 0..n {
        let (a, b) = mem_pair().unwrap();
        let srv = thread::spawn(move || Lane::server(b, &key(), LONG).unwrap());
        let info = LaneInfo {
            session: 7,
            lane,
            lanes: n,
        };
        client.push(Lane::client(a, &key(), info, LONG).unwrap());
        server.push(srv.join().unwrap());
    }
    (client, server)
}

/// The test's end of raw lanes: reads give up after [`LONG`] so that a missing frame
/// fails the test instead of hanging it.
fn bounded_reads(lanes: Vec<Lane<MemStream>>) -> Vec<Lane<MemStream>> {
    for l in &lanes {
        l.stream().set_io_timeouts(Some(LONG), None).unwrap();
    }
    lanes
}

/// Message `i`: a tag and a payload of varying length that encodes `i`.
fn message(i: u64) -> (u16, Vec<u8>) {
    let len = 8 + (i * 37 % 3000) as usize;
    let mut p: Vec<u8> = (0..len)
        .map(|j| (i as u8).wrapping_mul(31).wrapping_add(j as u8))
        .collect();
    p[..8].copy_from_slice(&i.to_le_bytes());
    (i as u16 ^ 0x5a5a, p)
}

/// Checks a delivered message against [`message`]; returns its `i`.
fn check(m: &Incoming) -> u64 {
    let i = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
    assert_eq!(
        (m.tag, &m.payload),
        (message(i).0, &message(i).1),
        "message {i} corrupted"
    );
    i
}

/// Receiving application: receives until `n` distinct messages arrived, acking each.
/// Returns the receiver and the set of message numbers.
fn apply_all(rx: SessionReceiver, n: u64) -> thread::JoinHandle<(SessionReceiver, HashSet<u64>)> {
    thread::spawn(move || {
        let mut got = HashSet::new();
        while (got.len() as u64) < n {
            let m = rx.recv(LONG).unwrap();
            let i = check(&m);
            assert!(got.insert(i), "message {i} (seq {}) delivered twice", m.seq);
            rx.ack(&m).unwrap();
        }
        (rx, got)
    })
}

fn sum(stats: &[LaneStats], f: impl Fn(&LaneStats) -> u64) -> u64 {
    stats.iter().map(f).sum()
}

#[test]
fn ten_thousand_messages_over_one_and_three_tcp_lanes() {
    for lanes in [1u16, 3] {
        let (c, s) = tcp_lanes(lanes);
        let tx = SessionSender::new(c, config(16)).unwrap();
        let rx = SessionReceiver::new(s, config(16)).unwrap();
        assert_eq!(tx.session(), rx.session());
        let app = apply_all(rx, N);
        for i in 0..N {
            let (tag, p) = message(i);
            assert_eq!(tx.send(tag, p).unwrap(), i + 1, "seqs are 1, 2, 3, ...");
        }
        tx.barrier_timeout(LONG).unwrap();
        let (rx, got) = app.join().unwrap();
        assert_eq!(got, (0..N).collect::<HashSet<_>>());

        rx.reply(9, b"all applied").unwrap();
        assert_eq!(tx.recv_reply(LONG).unwrap(), (9, b"all applied".to_vec()));

        let st = tx.stats();
        assert_eq!(st.len(), usize::from(lanes));
        assert_eq!(sum(&st, |l| l.messages), N);
        assert_eq!(sum(&st, |l| l.acked), N);
        assert!(
            st.iter().all(|l| l.in_flight == 0 && l.failed.is_none()),
            "{st:?}"
        );
        assert!(
            st.iter().all(|l| l.messages > 0),
            "every lane is used: {st:?}"
        );
        let rs = rx.stats();
        assert_eq!(sum(&rs, |l| l.messages), N);
        assert_eq!(sum(&rs, |l| l.duplicates), 0);
        assert_eq!(sum(&rs, |l| l.acked), N);
    }
}

/// Kills lane 1 (from the sender's or the receiver's side) after `kill_at` messages.
fn survive_lane_kill(kill_on_sender_side: bool) {
    let (c, s) = tcp_lanes(3);
    let victim = if kill_on_sender_side {
        c[1].stream().try_clone().unwrap()
    } else {
        s[1].stream().try_clone().unwrap()
    };
    let tx = SessionSender::new(c, config(16)).unwrap();
    let rx = SessionReceiver::new(s, config(16)).unwrap();
    let app = apply_all(rx, N);
    for i in 0..N {
        if i == 3_000 {
            victim.shutdown(Shutdown::Both).unwrap();
        }
        let (tag, p) = message(i);
        tx.send(tag, p).unwrap();
    }
    tx.barrier_timeout(LONG).unwrap();
    let (rx, got) = app.join().unwrap();
    assert_eq!(
        got,
        (0..N).collect::<HashSet<_>>(),
        "every message delivered"
    );

    let st = tx.stats();
    let failed = st[1].failed.as_deref().expect("lane 1 is marked failed");
    assert!(failed.contains("lane 1"), "{failed}");
    assert!(st[0].failed.is_none() && st[2].failed.is_none(), "{st:?}");
    assert_eq!(tx.live_lanes(), 2);
    assert_eq!(sum(&st, |l| l.acked), N);
    assert!(st[0].messages + st[2].messages > 0);
    // The session carries on over the surviving lanes.
    let (tag, p) = message(N);
    tx.send(tag, p).unwrap();
    let m = rx.recv(LONG).unwrap();
    assert_eq!(check(&m), N);
    assert_ne!(m.lane, 1);
    rx.ack(&m).unwrap();
    tx.barrier_timeout(LONG).unwrap();
}

#[test]
fn lane_killed_on_sender_side_mid_stream_everything_still_delivered() {
    survive_lane_kill(true);
}

#[test]
fn lane_killed_on_receiver_side_mid_stream_everything_still_delivered() {
    survive_lane_kill(false);
}

#[test]
fn all_lanes_killed_gives_all_lanes_failed_everywhere() {
    let (c, s) = tcp_lanes(3);
    let victims: Vec<TcpStream> = c.iter().map(|l| l.stream().try_clone().unwrap()).collect();
    let tx = SessionSender::new(c, config(16)).unwrap();
    let rx = SessionReceiver::new(s, config(16)).unwrap();
    // Fill every window exactly (does not block); the receiver never acks.
    for i in 0..48 {
        let (tag, p) = message(i);
        tx.send(tag, p).unwrap();
    }
    for v in &victims {
        v.shutdown(Shutdown::Both).unwrap();
    }
    let is_all_failed = |e: &Error| matches!(e, Error::AllLanesFailed { lanes: 3, .. });
    let e = tx.barrier_timeout(LONG).unwrap_err();
    assert!(is_all_failed(&e), "barrier: {e}");
    assert!(
        chain(&e).contains("lane"),
        "names the last failed lane: {}",
        chain(&e)
    );
    let e = tx.send(1, vec![1]).unwrap_err();
    assert!(is_all_failed(&e), "send: {e}");
    let e = tx.recv_reply(LONG).unwrap_err();
    assert!(is_all_failed(&e), "recv_reply: {e}");
    assert_eq!(tx.live_lanes(), 0);
    assert!(tx.stats().iter().all(|l| l.failed.is_some()));

    let mut delivered = 0;
    let e = loop {
        match rx.recv(LONG) {
            Ok(_) => delivered += 1,
            Err(e) => break e,
        }
    };
    assert!(is_all_failed(&e), "recv: {e}");
    assert!(delivered <= 48);
}

#[test]
fn failed_lane_messages_are_resent_lowest_seq_first_within_windows() {
    let (c, raw) = mem_lanes(2);
    let mut raw = bounded_reads(raw);
    let tx = SessionSender::new(c, config(2)).unwrap();
    for i in 0..4 {
        let (tag, p) = message(i);
        assert_eq!(tx.send(tag, p).unwrap(), i + 1);
    }
    let seqs = |lane: &mut Lane<MemStream>| [lane.recv().unwrap().seq, lane.recv().unwrap().seq];
    assert_eq!(seqs(&mut raw[0]), [1, 3], "round-robin");
    assert_eq!(seqs(&mut raw[1]), [2, 4]);
    assert!(tx.stats().iter().all(|l| l.in_flight == 2));

    raw[0].shutdown().unwrap();
    // Lane 1's window is full: each ack makes room for one resend.
    raw[1].send(Kind::Ack, 0, 2, &[]).unwrap();
    let f: Frame = raw[1].recv().unwrap();
    assert_eq!(
        (f.kind, f.seq, f.tag, &f.payload),
        (Kind::Data, 1, message(0).0, &message(0).1)
    );
    raw[1].send(Kind::Ack, 0, 4, &[]).unwrap();
    assert_eq!(raw[1].recv().unwrap().seq, 3);
    raw[1].send(Kind::Ack, 0, 1, &[]).unwrap();
    raw[1].send(Kind::Ack, 0, 3, &[]).unwrap();
    tx.barrier_timeout(LONG).unwrap();
    let st = tx.stats();
    assert!(st[0].failed.is_some());
    assert_eq!(st[1].resent, 2);
    assert_eq!(st[1].acked + st[0].acked, 4);
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < LONG, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn receiver_drops_duplicates_reacks_and_closes_lanes_with_bad_frames() {
    let (raw, s) = mem_lanes(2);
    let mut raw = bounded_reads(raw);
    let rx = SessionReceiver::new(s, config(16)).unwrap();

    // First copy delivered and acked on its lane.
    raw[0].send(Kind::Data, 1, 1, b"one").unwrap();
    let m1 = rx.recv(LONG).unwrap();
    assert_eq!(
        (m1.lane, m1.seq, m1.tag, &m1.payload[..]),
        (0, 1, 1, &b"one"[..])
    );
    rx.ack(&m1).unwrap();
    assert_eq!((raw[0].recv().unwrap().kind, m1.seq), (Kind::Ack, 1));

    // A resend of an acked seq is not delivered again but acked again on its lane.
    raw[1].send(Kind::Data, 1, 1, b"one").unwrap();
    let f = raw[1].recv().unwrap();
    assert_eq!((f.kind, f.seq), (Kind::Ack, 1));
    assert!(rx.recv(Duration::from_millis(50)).unwrap_err().is_timeout());

    // A resend of a delivered, unacked seq moves its ack to the lane of the resend.
    raw[0].send(Kind::Data, 2, 2, b"two").unwrap();
    let m2 = rx.recv(LONG).unwrap();
    raw[1].send(Kind::Data, 2, 2, b"two").unwrap();
    eventually("the duplicate", || rx.stats()[1].duplicates == 2);
    rx.ack(&m2).unwrap();
    let f = raw[1].recv().unwrap();
    assert_eq!((f.kind, f.seq), (Kind::Ack, 2));
    rx.ack(&m2).unwrap(); // idempotent

    let bogus = Incoming {
        lane: 0,
        seq: 99,
        tag: 0,
        payload: vec![],
    };
    assert!(matches!(
        rx.ack(&bogus),
        Err(Error::NotDelivered { seq: 99 })
    ));

    // A corrupted frame closes its lane with an error naming it; the other lane goes on.
    let mut bad = wire::encode_frame(Kind::Data, 0, 3, b"three").unwrap();
    *bad.last_mut().unwrap() ^= 1;
    raw[0]
        .stream()
        .clone_stream()
        .unwrap()
        .write_all(&bad)
        .unwrap();
    eventually("lane 0 to fail", || rx.stats()[0].failed.is_some());
    let why = rx.stats()[0].failed.clone().unwrap();
    assert!(why.contains("lane 0") && why.contains("crc"), "{why}");
    assert_eq!(rx.live_lanes(), 1);
    assert!(
        matches!(raw[0].recv(), Err(Error::Recv { .. })),
        "lane 0 is closed"
    );
    raw[1].send(Kind::Data, 3, 3, b"three").unwrap();
    assert_eq!(rx.recv(LONG).unwrap().payload, b"three");

    // A peer Abort surfaces with its message.
    let abort = wire::Abort::new(wire::AbortReason::Other, "operator cancelled").encode();
    raw[1].send(Kind::Abort, 0, 0, &abort).unwrap();
    let e = rx.recv(LONG).unwrap_err();
    assert!(
        matches!(&e, Error::PeerAborted(m) if m == "operator cancelled"),
        "{e}"
    );
}

#[test]
fn send_blocks_when_every_window_is_full_until_an_ack() {
    let (c, raw) = mem_lanes(1);
    let mut raw = bounded_reads(raw);
    let tx = std::sync::Arc::new(SessionSender::new(c, config(2)).unwrap());
    tx.send(1, vec![1]).unwrap();
    tx.send(1, vec![2]).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let t = {
        let tx = tx.clone();
        thread::spawn(move || done_tx.send(tx.send(1, vec![3]).unwrap()).unwrap())
    };
    assert_eq!(raw[0].recv().unwrap().seq, 1);
    assert_eq!(raw[0].recv().unwrap().seq, 2);
    assert!(
        done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "third send must block"
    );
    raw[0].send(Kind::Ack, 0, 1, &[]).unwrap();
    assert_eq!(done_rx.recv_timeout(LONG).unwrap(), 3);
    t.join().unwrap();
    assert_eq!(raw[0].recv().unwrap().seq, 3);
    // barrier_timeout gives up without ending the session.
    assert!(tx
        .barrier_timeout(Duration::from_millis(50))
        .unwrap_err()
        .is_timeout());
    raw[0].send(Kind::Ack, 0, 2, &[]).unwrap();
    raw[0].send(Kind::Ack, 0, 3, &[]).unwrap();
    tx.barrier_timeout(LONG).unwrap();
}

#[test]
fn acks_for_unsent_seqs_close_the_lane() {
    let (c, raw) = mem_lanes(2);
    let mut raw = bounded_reads(raw);
    let tx = SessionSender::new(c, config(4)).unwrap();
    raw[0].send(Kind::Ack, 0, 77, &[]).unwrap();
    eventually("lane 0 to fail", || tx.live_lanes() == 1);
    let why = tx.stats()[0].failed.clone().unwrap();
    assert!(why.contains("seq 77") && why.contains("lane 0"), "{why}");
    // Still usable on lane 1.
    assert_eq!(tx.send(5, vec![5]).unwrap(), 1);
    assert_eq!(raw[1].recv().unwrap().seq, 1);
}

#[test]
fn receiver_abort_fails_the_sender_with_its_message() {
    let (c, s) = mem_lanes(2);
    let tx = SessionSender::new(c, config(4)).unwrap();
    let rx = SessionReceiver::new(s, config(4)).unwrap();
    tx.send(1, vec![1]).unwrap();
    assert_eq!(rx.recv(LONG).unwrap().seq, 1);
    rx.abort("destination disk full");
    let peer = |e: &Error| matches!(e, Error::PeerAborted(m) if m == "destination disk full");
    let e = tx.barrier_timeout(LONG).unwrap_err();
    assert!(peer(&e), "{e}");
    assert!(peer(&tx.send(1, vec![2]).unwrap_err()));
    assert!(matches!(rx.recv(LONG), Err(Error::Aborted(_))));
}

#[test]
fn sender_abort_fails_the_receiver_with_its_message() {
    let (c, s) = mem_lanes(3);
    let tx = SessionSender::new(c, config(4)).unwrap();
    let rx = SessionReceiver::new(s, config(4)).unwrap();
    tx.abort("operator pressed ^C");
    let e = rx.recv(LONG).unwrap_err();
    assert!(
        matches!(&e, Error::PeerAborted(m) if m == "operator pressed ^C"),
        "{e}"
    );
    assert!(matches!(tx.send(1, vec![]), Err(Error::Aborted(_))));
}

#[test]
fn drop_does_not_hang_when_the_peer_stops_reading() {
    let (c, _raw) = mem_lanes(2);
    let tx = SessionSender::new(c, config(2)).unwrap();
    // Four 4 MiB messages: far more than the socket buffers hold, so writers block.
    for _ in 0..4 {
        tx.send(1, vec![0xab; 4 << 20]).unwrap();
    }
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        drop(tx);
        done_tx.send(()).unwrap();
    });
    done_rx.recv_timeout(LONG).expect("drop returned");
}

#[test]
fn invalid_configurations_and_lane_sets_are_rejected() {
    let (c, _s) = mem_lanes(1);
    let e = SessionSender::new(c, config(0)).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let e = SessionSender::new(Vec::<Lane<MemStream>>::new(), config(1)).unwrap_err();
    assert!(matches!(e, Error::LaneSet(_)), "{e}");
    // Lanes of two different sessions.
    let (mut a, _a) = tcp_lanes(1);
    let (mut b, _b) = tcp_lanes(1);
    let two_sessions = vec![a.remove(0), b.remove(0)];
    let e = SessionSender::new(two_sessions, config(1)).unwrap_err();
    assert!(
        matches!(&e, Error::LaneSet(m) if m.contains("session")),
        "{e}"
    );
    let (c, _s) = mem_lanes(1);
    let tx = SessionSender::new(c, config(1)).unwrap();
    let e = tx
        .send(1, vec![0; wire::MAX_PAYLOAD as usize + 1])
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

#[test]
fn connect_and_accept_build_a_whole_session() {
    let listener = Listener::bind(loopback()).unwrap();
    let addr = listener.local_addr();
    let dest = thread::spawn(move || {
        let rx = SessionReceiver::accept(&listener, &key(), SessionConfig::default(), Some(LONG))
            .unwrap();
        assert_eq!(rx.lanes(), 3);
        for _ in 0..30 {
            let m = rx.recv(LONG).unwrap();
            check(&m);
            rx.ack(&m).unwrap();
        }
        rx.reply(2, b"bye").unwrap();
        rx
    });
    let local = Some("127.0.0.1:0".parse().unwrap());
    let tx = SessionSender::connect(
        addr,
        &[local, None, local],
        &key(),
        SessionConfig::default(),
    )
    .unwrap();
    assert_eq!(tx.lanes(), 3);
    for i in 0..30 {
        let (tag, p) = message(i);
        tx.send(tag, p).unwrap();
    }
    tx.barrier_timeout(LONG).unwrap();
    assert_eq!(tx.recv_reply(LONG).unwrap(), (2, b"bye".to_vec()));
    let rx = dest.join().unwrap();
    assert_eq!(rx.session(), tx.session());
}

#[test]
fn connect_routes_sends_each_lane_to_its_own_remote_from_its_own_local() {
    // One listener on every address; lanes aimed at two different loopback addresses.
    let listener = Listener::bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().port();
    let dest = thread::spawn(move || {
        let mut lanes: Vec<_> = (0..2).map(|_| listener.accept(&key()).unwrap()).collect();
        lanes.sort_by_key(Lane::index);
        let ends: Vec<_> = lanes
            .iter()
            .map(|l| {
                let s = l.stream();
                (s.local_addr().unwrap().ip(), s.peer_addr().unwrap().ip())
            })
            .collect();
        let rx = SessionReceiver::new(lanes, SessionConfig::default()).unwrap();
        for _ in 0..20 {
            let m = rx.recv(LONG).unwrap();
            check(&m);
            rx.ack(&m).unwrap();
        }
        (rx, ends)
    });
    let a: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let b: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let routes = [
        (Some(SocketAddr::new(a, 0)), SocketAddr::new(b, port)),
        (Some(SocketAddr::new(b, 0)), SocketAddr::new(a, port)),
    ];
    let tx = SessionSender::connect_routes(&routes, &key(), SessionConfig::default()).unwrap();
    assert_eq!(tx.lanes(), 2);
    for i in 0..20 {
        let (tag, p) = message(i);
        tx.send(tag, p).unwrap();
    }
    tx.barrier_timeout(LONG).unwrap();
    let (rx, ends) = dest.join().unwrap();
    assert_eq!(rx.session(), tx.session());
    // (destination address, source address) of lanes 0 and 1.
    assert_eq!(ends, vec![(b, a), (a, b)]);
    assert!(tx.stats().iter().all(|l| l.messages > 0), "both lanes used");

    let err = SessionSender::connect_routes(&[], &key(), SessionConfig::default()).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[test]
fn reply_to_answers_every_message_whichever_lane_it_came_on() {
    let (c, s) = mem_lanes(3);
    let tx = SessionSender::new(c, config(4)).unwrap();
    let rx = SessionReceiver::new(s, config(4)).unwrap();
    let mut lanes = HashSet::new();
    for i in 0..9 {
        let (tag, p) = message(i);
        tx.send(tag, p).unwrap();
        let m = rx.recv(LONG).unwrap();
        rx.ack(&m).unwrap();
        rx.reply_to(&m, 9, &m.seq.to_le_bytes()).unwrap();
        let (tag, payload) = tx.recv_reply(LONG).unwrap();
        assert_eq!((tag, payload), (9, m.seq.to_le_bytes().to_vec()));
        lanes.insert(m.lane);
    }
    assert!(lanes.len() > 1, "messages all went on one lane: {lanes:?}");
}
