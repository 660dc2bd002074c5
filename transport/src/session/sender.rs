//! The source's half of a session: windows, resends, backpressure. See [`super`].

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{self as channel, Receiver, RecvTimeoutError, Sender};

use super::{
    check_lane_set, lock, random_session_id, Counters, LanePhase, LaneStats, SessionConfig,
};
use crate::error::{chain, Error, Result};
use crate::handshake::LaneInfo;
use crate::key::Key;
use crate::lane::{self, Lane, Stream};
use crate::wire::{self, Abort, AbortReason, Kind, HEADER_LEN, MAX_PAYLOAD};

/// Lifecycle of a [`SessionSender`].
///
/// ```mermaid
/// stateDiagram-v2
///     [*] --> Open
///     Open --> Aborted: abort()
///     Open --> PeerAborted: Abort frame from the receiver
///     Open --> Failed: the last live lane failed
///     Open --> Closed: drop
/// ```
///
/// Every state but `Open` is final; in them `send` fails with the state's error.
#[derive(Debug)]
enum Phase {
    Open,
    Aborted(String),
    PeerAborted(String),
    Failed(Arc<Error>),
    Closed,
}

/// Work for a lane's writer thread.
enum WriteCmd {
    Data {
        seq: u64,
        tag: u16,
        payload: Arc<Vec<u8>>,
    },
    Abort {
        message: String,
        done: Sender<()>,
    },
}

/// A message sent and not yet acknowledged.
struct Pending {
    /// The lane it is assigned to; `None` while waiting to be resent (in `orphans`).
    slot: Option<usize>,
    tag: u16,
    payload: Arc<Vec<u8>>,
}

struct Slot {
    index: u16,
    phase: LanePhase,
    /// Messages assigned to this lane and not yet acknowledged (≤ window).
    in_flight: usize,
    /// To the writer thread; dropped when the lane fails or the session closes.
    tx: Option<Sender<WriteCmd>>,
}

struct State {
    phase: Phase,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    /// Pending seqs whose lane failed, to be resent (lowest first) before new messages.
    orphans: BTreeSet<u64>,
    slots: Vec<Slot>,
    /// Round-robin position.
    cursor: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every ack, lane failure and phase change.
    cond: Condvar,
    window: usize,
    /// Writers skip queued Data once the session is aborted or closing.
    aborting: AtomicBool,
    counters: Vec<Counters>,
    /// A handle per lane to shut its socket down.
    ctl: Vec<Box<dyn Stream>>,
}

/// Sends messages over the lanes of one session and collects their acks.
///
/// All methods take `&self`; several threads may send concurrently. See the
/// [module docs](super) for the protocol.
pub struct SessionSender {
    shared: Arc<Shared>,
    replies: Receiver<(u16, Vec<u8>)>,
    threads: Vec<JoinHandle<()>>,
    session: u64,
    close_timeout: Duration,
}

impl std::fmt::Debug for SessionSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSender")
            .field("session", &format_args!("{:#x}", self.session))
            .field("lanes", &self.shared.ctl.len())
            .finish_non_exhaustive()
    }
}

impl SessionSender {
    /// Opens one lane per entry of `locals` to `remote` (each bound to that local address
    /// if given) under a fresh random session id, and starts a session over them.
    pub fn connect(
        remote: SocketAddr,
        locals: &[Option<SocketAddr>],
        key: &Key,
        config: SessionConfig,
    ) -> Result<SessionSender> {
        let routes: Vec<_> = locals.iter().map(|&l| (l, remote)).collect();
        Self::connect_routes(&routes, key, config)
    }

    /// Opens one lane per `(local, remote)` pair, lane `i` from the `i`-th pair: bound to
    /// `local` if given, connected to its own `remote` (one pair per NIC pair, each with
    /// its own addresses; the receiver's listener must accept on all of them, e.g. on
    /// `0.0.0.0`). Lanes are opened under a fresh random session id, in order.
    pub fn connect_routes(
        routes: &[(Option<SocketAddr>, SocketAddr)],
        key: &Key,
        config: SessionConfig,
    ) -> Result<SessionSender> {
        let lanes = u16::try_from(routes.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::Config(format!("cannot open {} lanes", routes.len())))?;
        let session = random_session_id();
        let mut opened = Vec::with_capacity(routes.len());
        for (lane, &(local, remote)) in (0..lanes).zip(routes) {
            let info = LaneInfo {
                session,
                lane,
                lanes,
            };
            opened.push(lane::connect(local, remote, key, info, &config.lane)?);
        }
        Self::new(opened, config)
    }

    /// Starts a session over connected, authenticated lanes (at least one, all of the same
    /// session, distinct indices).
    pub fn new<S: Stream>(lanes: Vec<Lane<S>>, config: SessionConfig) -> Result<SessionSender> {
        config.check()?;
        let infos: Vec<LaneInfo> = lanes.iter().map(Lane::info).collect();
        let session = check_lane_set(&infos)?;
        let mut slots = Vec::new();
        let mut ctl: Vec<Box<dyn Stream>> = Vec::new();
        let mut workers = Vec::new();
        for lane in lanes {
            let (stream, info) = lane.into_parts();
            let clone = || {
                stream.clone_stream().map_err(|source| Error::Socket {
                    op: "cloning the stream",
                    peer: stream.peer_name(),
                    source,
                })
            };
            let reader = clone()?;
            ctl.push(Box::new(clone()?));
            let (tx, rx) = channel::unbounded();
            slots.push(Slot {
                index: info.lane,
                phase: LanePhase::Live,
                in_flight: 0,
                tx: Some(tx),
            });
            workers.push((info.lane, stream, reader, rx));
        }
        let shared = Arc::new(Shared {
            counters: slots.iter().map(|_| Counters::default()).collect(),
            state: Mutex::new(State {
                phase: Phase::Open,
                next_seq: 1,
                pending: BTreeMap::new(),
                orphans: BTreeSet::new(),
                slots,
                cursor: 0,
            }),
            cond: Condvar::new(),
            window: config.window,
            aborting: AtomicBool::new(false),
            ctl,
        });
        let (reply_tx, replies) = channel::unbounded();
        let mut this = SessionSender {
            shared,
            replies,
            threads: Vec::new(),
            session,
            close_timeout: config.close_timeout,
        };
        // On a spawn error `this` is dropped, which stops the threads already started.
        for (slot, (index, writer, reader, rx)) in workers.into_iter().enumerate() {
            let sh = this.shared.clone();
            let w = thread::Builder::new()
                .name(format!("ferry-tx{index}-w"))
                .spawn(move || writer_loop(&sh, slot, index, writer, rx))
                .map_err(|source| Error::Thread {
                    what: "writer",
                    lane: index,
                    source,
                })?;
            this.threads.push(w);
            let sh = this.shared.clone();
            let replies = reply_tx.clone();
            let r = thread::Builder::new()
                .name(format!("ferry-tx{index}-r"))
                .spawn(move || reader_loop(&sh, slot, index, reader, &replies))
                .map_err(|source| Error::Thread {
                    what: "ack reader",
                    lane: index,
                    source,
                })?;
            this.threads.push(r);
        }
        Ok(this)
    }

    /// The session id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Number of lanes the session started with.
    pub fn lanes(&self) -> usize {
        self.shared.ctl.len()
    }

    /// Number of lanes still carrying messages.
    pub fn live_lanes(&self) -> usize {
        let st = lock(&self.shared.state);
        st.slots.iter().filter(|s| s.phase.is_live()).count()
    }

    /// Payload bytes sent and not acknowledged yet (in the lanes' windows or waiting to be
    /// resent).
    pub fn unacked_bytes(&self) -> u64 {
        let st = lock(&self.shared.state);
        st.pending.values().map(|p| p.payload.len() as u64).sum()
    }

    /// Sends one message; returns its seq. Blocks while every lane's window is full (and
    /// while messages of a failed lane are waiting to be resent).
    pub fn send(&self, tag: u16, payload: Vec<u8>) -> Result<u64> {
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(Error::TooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let payload = Arc::new(payload);
        let sh = &*self.shared;
        let mut st = lock(&sh.state);
        loop {
            if let Some(e) = sh.fatal(&st) {
                return Err(e);
            }
            if st.orphans.is_empty() {
                if let Some(slot) = sh.pick(&mut st) {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let p = Pending {
                        slot: Some(slot),
                        tag,
                        payload: payload.clone(),
                    };
                    st.pending.insert(seq, p);
                    sh.dispatch(&mut st, slot, WriteCmd::Data { seq, tag, payload });
                    return Ok(seq);
                }
            }
            st = wait(&sh.cond, st);
        }
    }

    /// Blocks until every message sent so far has been acknowledged (applied by the
    /// receiving application).
    pub fn barrier(&self) -> Result<()> {
        self.barrier_until(None)
    }

    /// Like [`barrier`](Self::barrier), giving up with [`Error::Timeout`] after
    /// `timeout` (the session stays usable).
    pub fn barrier_timeout(&self, timeout: Duration) -> Result<()> {
        self.barrier_until(Some((Instant::now() + timeout, timeout)))
    }

    fn barrier_until(&self, deadline: Option<(Instant, Duration)>) -> Result<()> {
        let sh = &*self.shared;
        let mut st = lock(&sh.state);
        loop {
            if st.pending.is_empty() {
                return Ok(());
            }
            if let Some(e) = sh.fatal(&st) {
                return Err(e);
            }
            st = match deadline {
                None => wait(&sh.cond, st),
                Some((at, after)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout {
                            op: "barrier",
                            after,
                        });
                    }
                    sh.cond
                        .wait_timeout(st, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Receives the next message the receiver sent back with
    /// [`SessionReceiver::reply`](crate::SessionReceiver::reply), as `(tag, payload)`.
    pub fn recv_reply(&self, timeout: Duration) -> Result<(u16, Vec<u8>)> {
        {
            let st = lock(&self.shared.state);
            if !matches!(st.phase, Phase::Open | Phase::Failed(_)) {
                return Err(self.shared.fatal(&st).unwrap_or_else(closed));
            }
        }
        match self.replies.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                op: "recv_reply",
                after: timeout,
            }),
            // Every lane's reader has exited: every lane has failed.
            Err(RecvTimeoutError::Disconnected) => Err(self
                .shared
                .fatal(&lock(&self.shared.state))
                .unwrap_or_else(closed)),
        }
    }

    /// Per-lane counters.
    pub fn stats(&self) -> Vec<LaneStats> {
        let st = lock(&self.shared.state);
        st.slots
            .iter()
            .zip(&self.shared.counters)
            .map(|(s, c)| LaneStats {
                in_flight: s.in_flight,
                failed: s.phase.failure(),
                ..c.snapshot(s.index)
            })
            .collect()
    }

    /// Abandons the session: sends an Abort frame with `message` on every live lane
    /// (waiting up to [`SessionConfig::close_timeout`] for them to be written) and makes
    /// every later call fail with [`Error::Aborted`]. Messages not yet written are
    /// dropped. Does nothing if the session has already ended.
    pub fn abort(&self, message: &str) {
        let mut waits = Vec::new();
        {
            let mut st = lock(&self.shared.state);
            if !matches!(st.phase, Phase::Open) {
                return;
            }
            st.phase = Phase::Aborted(message.to_string());
            self.shared.aborting.store(true, Ordering::Release);
            for tx in st.slots.iter().filter_map(|s| s.tx.as_ref()) {
                let (done, wait) = channel::bounded(1);
                let cmd = WriteCmd::Abort {
                    message: message.to_string(),
                    done,
                };
                if tx.send(cmd).is_ok() {
                    waits.push(wait);
                }
            }
            self.shared.cond.notify_all();
        }
        let deadline = Instant::now() + self.close_timeout;
        for w in waits {
            // A writer that cannot write in time is shut down by drop.
            let _ = w.recv_deadline(deadline);
        }
    }
}

impl Drop for SessionSender {
    fn drop(&mut self) {
        let sh = &*self.shared;
        {
            let mut st = lock(&sh.state);
            if matches!(st.phase, Phase::Open) {
                st.phase = Phase::Closed;
            }
            sh.aborting.store(true, Ordering::Release);
            for s in &mut st.slots {
                s.tx = None;
            }
            for c in &sh.ctl {
                // Wakes blocked readers and writers; an error means it is already closed.
                let _ = c.shutdown_both();
            }
            sh.cond.notify_all();
        }
        for t in self.threads.drain(..) {
            // A panicked lane thread has nothing left to clean up.
            let _ = t.join();
        }
    }
}

fn closed() -> Error {
    Error::Aborted("session closed".into())
}

fn wait<'a>(cond: &Condvar, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    cond.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The error every call returns once the session is over, `None` while it is open.
    fn fatal(&self, st: &State) -> Option<Error> {
        match &st.phase {
            Phase::Open => None,
            Phase::Aborted(m) => Some(Error::Aborted(m.clone())),
            Phase::PeerAborted(m) => Some(Error::PeerAborted(m.clone())),
            Phase::Failed(last) => Some(Error::AllLanesFailed {
                lanes: st.slots.len(),
                last: last.clone(),
            }),
            Phase::Closed => Some(closed()),
        }
    }

    /// Next live lane with room in its window, round-robin.
    fn pick(&self, st: &mut State) -> Option<usize> {
        let n = st.slots.len();
        let found = (0..n)
            .map(|i| (st.cursor + i) % n)
            .find(|&s| st.slots[s].phase.is_live() && st.slots[s].in_flight < self.window)?;
        st.cursor = (found + 1) % n;
        Some(found)
    }

    /// Hands a message (already in `pending`, assigned to `slot`) to the lane's writer.
    fn dispatch(&self, st: &mut State, slot: usize, cmd: WriteCmd) {
        let s = &mut st.slots[slot];
        s.in_flight += 1;
        let delivered = s.tx.as_ref().is_some_and(|tx| tx.send(cmd).is_ok());
        if !delivered {
            // The writer is gone without having reported why; treat it as a failure so
            // that the message moves on.
            let source = io::Error::other("lane writer thread exited");
            let lane = s.index;
            self.fail_locked(st, slot, Error::Send { lane, source });
        }
    }

    /// Resends orphaned messages on lanes with room, lowest seq first.
    fn pump(&self, st: &mut State) {
        if !matches!(st.phase, Phase::Open) {
            return;
        }
        while let Some(&seq) = st.orphans.first() {
            let Some(slot) = self.pick(st) else { break };
            st.orphans.remove(&seq);
            let Some(p) = st.pending.get_mut(&seq) else {
                continue;
            };
            p.slot = Some(slot);
            let cmd = WriteCmd::Data {
                seq,
                tag: p.tag,
                payload: p.payload.clone(),
            };
            Counters::add(&self.counters[slot].resent, 1);
            self.dispatch(st, slot, cmd);
        }
    }

    fn lane_failed(&self, slot: usize, err: Error) {
        let mut st = lock(&self.state);
        self.fail_locked(&mut st, slot, err);
    }

    /// Closes a lane and moves its unacknowledged messages to the others.
    fn fail_locked(&self, st: &mut State, slot: usize, err: Error) {
        if !st.slots[slot].phase.is_live() {
            return;
        }
        let err = Arc::new(err);
        let s = &mut st.slots[slot];
        s.phase = LanePhase::Failed(err.clone());
        s.tx = None;
        s.in_flight = 0;
        let index = s.index;
        // An error means the socket is already shut down.
        let _ = self.ctl[slot].shutdown_both();
        let mut moved = 0;
        for (&seq, p) in st.pending.iter_mut() {
            if p.slot == Some(slot) {
                p.slot = None;
                st.orphans.insert(seq);
                moved += 1;
            }
        }
        if matches!(st.phase, Phase::Open) {
            if st.slots.iter().any(|s| s.phase.is_live()) {
                log::warn!(
                    "lane {index} failed, resending its {moved} unacknowledged messages on \
                     the other lanes: {}",
                    chain(&*err)
                );
            } else {
                // Reported to the caller as AllLanesFailed, not logged here.
                st.phase = Phase::Failed(err);
            }
        }
        self.pump(st);
        self.cond.notify_all();
    }

    fn on_ack(&self, arrival: usize, lane: u16, seq: u64) -> Result<()> {
        let mut st = lock(&self.state);
        if seq == 0 || seq >= st.next_seq {
            return Err(Error::Protocol {
                lane,
                what: format!("Ack for seq {seq}, which was never sent"),
            });
        }
        // An ack for a seq no longer pending is a duplicate (after a resend): ignore it.
        if let Some(p) = st.pending.remove(&seq) {
            match p.slot {
                Some(s) => {
                    st.slots[s].in_flight -= 1;
                    Counters::add(&self.counters[s].acked, 1);
                }
                None => {
                    st.orphans.remove(&seq);
                    Counters::add(&self.counters[arrival].acked, 1);
                }
            }
            self.pump(&mut st);
            self.cond.notify_all();
        }
        Ok(())
    }

    fn peer_aborted(&self, message: String) {
        let mut st = lock(&self.state);
        if matches!(st.phase, Phase::Open) {
            st.phase = Phase::PeerAborted(message.clone());
        }
        self.aborting.store(true, Ordering::Release);
        let err = Arc::new(Error::PeerAborted(message));
        for (s, c) in st.slots.iter_mut().zip(&self.ctl) {
            if s.phase.is_live() {
                s.phase = LanePhase::Failed(err.clone());
            }
            s.tx = None;
            // An error means it is already shut down.
            let _ = c.shutdown_both();
        }
        self.cond.notify_all();
    }
}

fn writer_loop<S: Stream>(
    sh: &Shared,
    slot: usize,
    lane: u16,
    mut stream: S,
    rx: Receiver<WriteCmd>,
) {
    let counters = &sh.counters[slot];
    for cmd in rx.iter() {
        match cmd {
            WriteCmd::Data { seq, tag, payload } => {
                if sh.aborting.load(Ordering::Acquire) {
                    continue;
                }
                match wire::write_frame(&mut stream, Kind::Data, tag, seq, &payload) {
                    Ok(()) => {
                        Counters::add(&counters.bytes, (HEADER_LEN + payload.len()) as u64);
                        Counters::add(&counters.messages, 1);
                    }
                    Err(source) => {
                        sh.lane_failed(slot, Error::Send { lane, source });
                        return;
                    }
                }
            }
            WriteCmd::Abort { message, done } => {
                let payload = Abort::new(AbortReason::Other, message).encode();
                // Best effort: the session is being abandoned whether or not this arrives.
                let _ = wire::write_frame(&mut stream, Kind::Abort, 0, 0, &payload);
                let _ = done.send(());
            }
        }
    }
}

fn reader_loop<S: Stream>(
    sh: &Shared,
    slot: usize,
    lane: u16,
    mut stream: S,
    replies: &Sender<(u16, Vec<u8>)>,
) {
    loop {
        let frame = match wire::read_frame(&mut stream) {
            Ok(f) => f,
            Err(source) => {
                sh.lane_failed(slot, Error::Recv { lane, source });
                return;
            }
        };
        let outcome = match frame.kind {
            Kind::Ack if frame.payload.is_empty() => sh.on_ack(slot, lane, frame.seq),
            Kind::Ack => Err(Error::Protocol {
                lane,
                what: format!("Ack frame with a {}-byte payload", frame.payload.len()),
            }),
            Kind::Data => {
                if replies.send((frame.tag, frame.payload)).is_err() {
                    return; // the session is being dropped
                }
                Ok(())
            }
            Kind::Abort => {
                let message = match Abort::decode(&frame.payload) {
                    Ok(a) => a.message,
                    Err(e) => format!("(malformed Abort payload: {e})"),
                };
                sh.peer_aborted(message);
                return;
            }
            kind => Err(Error::Protocol {
                lane,
                what: format!("a {kind} frame is not valid on an established lane"),
            }),
        };
        if let Err(e) = outcome {
            sh.lane_failed(slot, e);
            return;
        }
    }
}
