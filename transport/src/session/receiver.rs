//! The destination's half of a session: delivery, duplicate suppression, acks. See
//! [`super`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{self as channel, Receiver, RecvTimeoutError, Sender};

use super::{check_lane_set, lock, Counters, Incoming, LanePhase, LaneStats, SessionConfig};
use crate::error::{chain, Error, Result};
use crate::handshake::LaneInfo;
use crate::key::Key;
use crate::lane::{Lane, Listener, Stream};
use crate::wire::{self, Abort, AbortReason, Kind, HEADER_LEN, MAX_PAYLOAD};

/// Lifecycle of a [`SessionReceiver`].
///
/// ```mermaid
/// stateDiagram-v2
///     [*] --> Open
///     Open --> Aborted: abort()
///     Open --> PeerAborted: Abort frame from the sender
///     Open --> Failed: the last live lane failed
///     Open --> Closed: drop
/// ```
///
/// In `Failed`, messages already queued are still returned by `recv` before the error.
#[derive(Debug)]
enum Phase {
    Open,
    Aborted(String),
    PeerAborted(String),
    Failed(Arc<Error>),
    Closed,
}

/// What the receiver knows about a seq at or above `floor`.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// The lane its latest copy arrived on: where its ack goes.
    slot: usize,
    /// The application has acknowledged it.
    acked: bool,
}

/// What to do with an arriving Data frame.
enum Admit {
    /// First copy: deliver it.
    New,
    /// Delivered, not yet acked: drop it (the ack will follow on this lane).
    Duplicate,
    /// Already acked: drop it and acknowledge again on this lane (the first ack may have
    /// been lost with its lane).
    ReAck,
}

struct State {
    phase: Phase,
    lanes: Vec<LanePhase>,
    /// Every seq below `floor` has been delivered and acked.
    floor: u64,
    /// Seqs at or above `floor` that have been delivered.
    seen: BTreeMap<u64, Seen>,
}

struct Shared {
    state: Mutex<State>,
    /// Write half per lane (acks, replies, aborts), one writer at a time.
    writers: Vec<Mutex<Box<dyn Stream>>>,
    /// A handle per lane to shut its socket down without taking the writer lock.
    ctl: Vec<Box<dyn Stream>>,
    counters: Vec<Counters>,
    indices: Vec<u16>,
    dedup_limit: usize,
    reply_cursor: AtomicUsize,
    reply_seq: AtomicU64,
}

/// Receives the messages of one session, delivers each once, and sends the application's
/// acks. See the [module docs](super).
pub struct SessionReceiver {
    shared: Arc<Shared>,
    /// `None` only while dropping (dropping it unblocks readers on a full queue).
    incoming: Option<Receiver<Incoming>>,
    threads: Vec<JoinHandle<()>>,
    session: u64,
    close_timeout: Duration,
}

impl std::fmt::Debug for SessionReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReceiver")
            .field("session", &format_args!("{:#x}", self.session))
            .field("lanes", &self.shared.ctl.len())
            .finish_non_exhaustive()
    }
}

impl SessionReceiver {
    /// Accepts the lanes of one session on `listener`: waits up to `wait` (forever if
    /// `None`) for the first, then for as many more as its Hello announced, each within
    /// the connect plus handshake timeouts of `config.lane`.
    pub fn accept(
        listener: &Listener,
        key: &Key,
        config: SessionConfig,
        wait: Option<Duration>,
    ) -> Result<SessionReceiver> {
        config.check()?;
        let first = match wait {
            Some(t) => listener.accept_timeout(key, t)?,
            None => listener.accept(key)?,
        };
        let want = usize::from(first.info().lanes);
        let mut lanes = vec![first];
        let next = config.lane.connect_timeout + config.lane.handshake_timeout;
        while lanes.len() < want {
            lanes.push(listener.accept_timeout(key, next)?);
        }
        Self::new(lanes, config)
    }

    /// Starts receiving on accepted lanes (at least one, all of the same session,
    /// distinct indices).
    pub fn new<S: Stream>(lanes: Vec<Lane<S>>, config: SessionConfig) -> Result<SessionReceiver> {
        config.check()?;
        let infos: Vec<LaneInfo> = lanes.iter().map(Lane::info).collect();
        let session = check_lane_set(&infos)?;
        let mut writers = Vec::new();
        let mut ctl: Vec<Box<dyn Stream>> = Vec::new();
        let mut readers = Vec::new();
        for lane in lanes {
            let (stream, info) = lane.into_parts();
            let clone = || {
                stream.clone_stream().map_err(|source| Error::Socket {
                    op: "cloning the stream",
                    peer: stream.peer_name(),
                    source,
                })
            };
            writers.push(Mutex::new(Box::new(clone()?) as Box<dyn Stream>));
            ctl.push(Box::new(clone()?));
            readers.push((info.lane, stream));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase: Phase::Open,
                lanes: vec![LanePhase::Live; readers.len()],
                floor: 1,
                seen: BTreeMap::new(),
            }),
            counters: readers.iter().map(|_| Counters::default()).collect(),
            indices: infos.iter().map(|i| i.lane).collect(),
            writers,
            ctl,
            dedup_limit: config.dedup_limit,
            reply_cursor: AtomicUsize::new(0),
            reply_seq: AtomicU64::new(0),
        });
        let (tx, rx) = channel::bounded(config.receive_queue);
        let mut this = SessionReceiver {
            shared,
            incoming: Some(rx),
            threads: Vec::new(),
            session,
            close_timeout: config.close_timeout,
        };
        // On a spawn error `this` is dropped, which stops the threads already started.
        for (slot, (index, stream)) in readers.into_iter().enumerate() {
            let sh = this.shared.clone();
            let tx = tx.clone();
            let t = thread::Builder::new()
                .name(format!("ferry-rx{index}"))
                .spawn(move || reader_loop(&sh, slot, index, stream, &tx))
                .map_err(|source| Error::Thread {
                    what: "reader",
                    lane: index,
                    source,
                })?;
            this.threads.push(t);
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

    /// Number of lanes still open.
    pub fn live_lanes(&self) -> usize {
        lock(&self.shared.state)
            .lanes
            .iter()
            .filter(|l| l.is_live())
            .count()
    }

    /// Next message, waiting up to `timeout` ([`Error::Timeout`] then; the session stays
    /// usable). Each seq is delivered once, even if the sender resent it after a lane
    /// failure. Fails with [`Error::PeerAborted`] as soon as the sender aborts, and with
    /// [`Error::AllLanesFailed`] once every lane has failed and the queue is drained.
    pub fn recv(&self, timeout: Duration) -> Result<Incoming> {
        let sh = &*self.shared;
        let Some(rx) = &self.incoming else {
            return Err(closed());
        };
        if let Some(e) = sh.ended(&lock(&sh.state)) {
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok(m) => match sh.ended(&lock(&sh.state)) {
                Some(e) => Err(e),
                None => Ok(m),
            },
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                op: "recv",
                after: timeout,
            }),
            // Every reader has exited: every lane has failed.
            Err(RecvTimeoutError::Disconnected) => {
                Err(sh.fatal(&lock(&sh.state)).unwrap_or_else(closed))
            }
        }
    }

    /// Tells the sender that `msg` has been applied. Call it after applying, not on
    /// receipt: the sender's [`barrier`](crate::SessionSender::barrier) waits for these.
    ///
    /// The ack goes on the lane the message's latest copy arrived on, or on another live
    /// lane if that one has failed. Acking twice is harmless.
    pub fn ack(&self, msg: &Incoming) -> Result<()> {
        let sh = &*self.shared;
        let slot = {
            let mut guard = lock(&sh.state);
            if let Some(e) = sh.ended(&guard) {
                return Err(e);
            }
            let st = &mut *guard;
            if msg.seq < st.floor {
                return Ok(()); // already acked
            }
            let Some(seen) = st.seen.get_mut(&msg.seq) else {
                return Err(Error::NotDelivered { seq: msg.seq });
            };
            seen.acked = true;
            let slot = seen.slot;
            while let Some(first) = st.seen.first_entry() {
                if *first.key() != st.floor || !first.get().acked {
                    break;
                }
                first.remove();
                st.floor += 1;
            }
            slot
        };
        sh.send_any(slot, Kind::Ack, 0, msg.seq, &[])
    }

    /// Sends a message back to the sender (read there with
    /// [`recv_reply`](crate::SessionSender::recv_reply)) on some live lane. Replies are
    /// not acknowledged: one in flight on a lane that fails is lost.
    pub fn reply(&self, tag: u16, payload: &[u8]) -> Result<()> {
        let start = self.shared.reply_cursor.fetch_add(1, Ordering::Relaxed);
        self.send_reply(start % self.shared.writers.len(), tag, payload)
    }

    /// Like [`reply`](Self::reply), but on the lane `msg` arrived on while that lane is
    /// live: the sender just used it, so it is the lane most likely to carry the reply
    /// (a lane the sender has given up on may still look live from this side).
    pub fn reply_to(&self, msg: &Incoming, tag: u16, payload: &[u8]) -> Result<()> {
        let start = self.shared.indices.iter().position(|&i| i == msg.lane);
        self.send_reply(start.unwrap_or(0), tag, payload)
    }

    /// Sends a reply on the first live lane from slot `start` on.
    fn send_reply(&self, start: usize, tag: u16, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(Error::TooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let sh = &*self.shared;
        if let Some(e) = sh.fatal(&lock(&sh.state)) {
            return Err(e);
        }
        let seq = sh.reply_seq.fetch_add(1, Ordering::Relaxed) + 1;
        sh.send_any(start, Kind::Data, tag, seq, payload)
    }

    /// Per-lane counters (`acked` = acks written, `duplicates` = resent copies dropped).
    pub fn stats(&self) -> Vec<LaneStats> {
        let st = lock(&self.shared.state);
        st.lanes
            .iter()
            .zip(&self.shared.counters)
            .zip(&self.shared.indices)
            .map(|((phase, c), &index)| LaneStats {
                failed: phase.failure(),
                ..c.snapshot(index)
            })
            .collect()
    }

    /// Abandons the session: sends an Abort frame with `message` on every live lane
    /// (each write bounded by [`SessionConfig::close_timeout`]), then closes the lanes.
    /// Later calls fail with [`Error::Aborted`]. Does nothing if the session has ended.
    pub fn abort(&self, message: &str) {
        let sh = &*self.shared;
        let live: Vec<usize> = {
            let mut st = lock(&sh.state);
            if !matches!(st.phase, Phase::Open) {
                return;
            }
            st.phase = Phase::Aborted(message.to_string());
            (0..st.lanes.len())
                .filter(|&i| st.lanes[i].is_live())
                .collect()
        };
        let payload = Abort::new(AbortReason::Other, message).encode();
        for slot in live {
            // Best effort: the session is being abandoned whether or not this arrives.
            let _ = sh.ctl[slot].set_io_timeouts(None, Some(self.close_timeout));
            let _ = sh.write(slot, Kind::Abort, 0, 0, &payload);
        }
        for c in &sh.ctl {
            // An error means it is already shut down.
            let _ = c.shutdown_both();
        }
    }
}

impl Drop for SessionReceiver {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            if matches!(st.phase, Phase::Open) {
                st.phase = Phase::Closed;
            }
        }
        for c in &self.shared.ctl {
            // Wakes blocked readers; an error means it is already shut down.
            let _ = c.shutdown_both();
        }
        // Readers blocked on a full queue see it disconnected.
        self.incoming = None;
        for t in self.threads.drain(..) {
            // A panicked lane thread has nothing left to clean up.
            let _ = t.join();
        }
    }
}

fn closed() -> Error {
    Error::Aborted("session closed".into())
}

impl Shared {
    /// The error for any call once the session is over.
    fn fatal(&self, st: &State) -> Option<Error> {
        match &st.phase {
            Phase::Failed(last) => Some(Error::AllLanesFailed {
                lanes: st.lanes.len(),
                last: last.clone(),
            }),
            _ => self.ended(st),
        }
    }

    /// Like [`fatal`](Self::fatal), but `None` in `Failed`, where queued messages are
    /// still delivered and acks fail lane by lane.
    fn ended(&self, st: &State) -> Option<Error> {
        match &st.phase {
            Phase::Open | Phase::Failed(_) => None,
            Phase::Aborted(m) => Some(Error::Aborted(m.clone())),
            Phase::PeerAborted(m) => Some(Error::PeerAborted(m.clone())),
            Phase::Closed => Some(closed()),
        }
    }

    /// Decides what to do with a Data frame for `seq` arriving on `slot`.
    fn admit(&self, slot: usize, seq: u64) -> Result<Admit> {
        let lane = self.indices[slot];
        let mut st = lock(&self.state);
        if seq == 0 {
            return Err(Error::Protocol {
                lane,
                what: "Data frame with seq 0".into(),
            });
        }
        if seq < st.floor {
            return Ok(Admit::ReAck);
        }
        if let Some(seen) = st.seen.get_mut(&seq) {
            if seen.acked {
                return Ok(Admit::ReAck);
            }
            seen.slot = slot;
            return Ok(Admit::Duplicate);
        }
        if st.seen.len() >= self.dedup_limit {
            return Err(Error::Protocol {
                lane,
                what: format!(
                    "seq {seq} arrived with {} messages remembered since seq {} was delivered \
                     unacknowledged (dedup limit)",
                    st.seen.len(),
                    st.floor
                ),
            });
        }
        st.seen.insert(seq, Seen { slot, acked: false });
        Ok(Admit::New)
    }

    fn write(&self, slot: usize, kind: Kind, tag: u16, seq: u64, payload: &[u8]) -> Result<()> {
        let mut w = lock(&self.writers[slot]);
        wire::write_frame(&mut **w, kind, tag, seq, payload).map_err(|source| Error::Send {
            lane: self.indices[slot],
            source,
        })
    }

    /// Writes a frame on `first` if live, else on the next live lane; lanes whose write
    /// fails are closed.
    fn send_any(&self, first: usize, kind: Kind, tag: u16, seq: u64, payload: &[u8]) -> Result<()> {
        let n = self.writers.len();
        for slot in (0..n).map(|i| (first + i) % n) {
            if !lock(&self.state).lanes[slot].is_live() {
                continue;
            }
            match self.write(slot, kind, tag, seq, payload) {
                Ok(()) => {
                    if kind == Kind::Ack {
                        Counters::add(&self.counters[slot].acked, 1);
                    }
                    return Ok(());
                }
                Err(e) => self.lane_failed(slot, e),
            }
        }
        let st = lock(&self.state);
        Err(self.fatal(&st).unwrap_or_else(|| Error::AllLanesFailed {
            lanes: n,
            last: Arc::new(closed()),
        }))
    }

    fn lane_failed(&self, slot: usize, err: Error) {
        let mut st = lock(&self.state);
        if !st.lanes[slot].is_live() {
            return;
        }
        let err = Arc::new(err);
        st.lanes[slot] = LanePhase::Failed(err.clone());
        // An error means it is already shut down.
        let _ = self.ctl[slot].shutdown_both();
        if matches!(st.phase, Phase::Open) {
            if st.lanes.iter().any(LanePhase::is_live) {
                log::warn!("lane {} closed: {}", self.indices[slot], chain(&*err));
            } else {
                // Reported to the application as AllLanesFailed, not logged here.
                st.phase = Phase::Failed(err);
            }
        }
    }

    fn peer_aborted(&self, message: String) {
        let mut st = lock(&self.state);
        if matches!(st.phase, Phase::Open | Phase::Failed(_)) {
            st.phase = Phase::PeerAborted(message.clone());
        }
        let err = Arc::new(Error::PeerAborted(message));
        for (phase, c) in st.lanes.iter_mut().zip(&self.ctl) {
            if phase.is_live() {
                *phase = LanePhase::Failed(err.clone());
            }
            // An error means it is already shut down.
            let _ = c.shutdown_both();
        }
    }
}

fn reader_loop<S: Stream>(
    sh: &Shared,
    slot: usize,
    lane: u16,
    mut stream: S,
    tx: &Sender<Incoming>,
) {
    let counters = &sh.counters[slot];
    loop {
        let frame = match wire::read_frame(&mut stream) {
            Ok(f) => f,
            Err(source) => {
                sh.lane_failed(slot, Error::Recv { lane, source });
                return;
            }
        };
        Counters::add(&counters.bytes, (HEADER_LEN + frame.payload.len()) as u64);
        let outcome = match frame.kind {
            Kind::Data => match sh.admit(slot, frame.seq) {
                Ok(Admit::New) => {
                    Counters::add(&counters.messages, 1);
                    let msg = Incoming {
                        lane,
                        seq: frame.seq,
                        tag: frame.tag,
                        payload: frame.payload,
                    };
                    if tx.send(msg).is_err() {
                        return; // the session is being dropped
                    }
                    Ok(())
                }
                Ok(Admit::Duplicate) => {
                    Counters::add(&counters.duplicates, 1);
                    Ok(())
                }
                Ok(Admit::ReAck) => {
                    Counters::add(&counters.duplicates, 1);
                    let r = sh.write(slot, Kind::Ack, 0, frame.seq, &[]);
                    if r.is_ok() {
                        Counters::add(&counters.acked, 1);
                    }
                    r
                }
                Err(e) => Err(e),
            },
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
                what: format!("a {kind} frame is not valid from the sender"),
            }),
        };
        if let Err(e) = outcome {
            sh.lane_failed(slot, e);
            return;
        }
    }
}
