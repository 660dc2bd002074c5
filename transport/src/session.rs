//! Sessions: reliable, acknowledged messaging over several lanes.
//!
//! The source holds a [`SessionSender`], the destination a [`SessionReceiver`], each
//! built from the N lanes of one session (same session id, distinct indices).
//!
//! * **Messages** are a `u16` tag and up to [`MAX_PAYLOAD`](crate::wire::MAX_PAYLOAD)
//!   bytes, sent as Data frames. The sender numbers them with a session-global `seq`
//!   (1, 2, 3, ...) and gives each to a lane with room in its window: at most
//!   [`SessionConfig::window`] unacknowledged messages per lane, chosen round-robin among
//!   the lanes with room, so a slower lane simply takes fewer. `send` blocks when every
//!   window is full.
//! * **Acks** (Ack frames, `seq` in the header) are sent by the receiving application
//!   with [`SessionReceiver::ack`] once it has *applied* a message, so
//!   [`SessionSender::barrier`] returning means "everything sent so far is applied".
//!   An ack may arrive on any lane.
//! * **Lane failure** (I/O error, EOF, invalid frame) closes that lane; its
//!   unacknowledged messages are resent, in seq order, on the remaining lanes. The
//!   receiver drops a seq it has already delivered (and re-acknowledges it if the
//!   application has acked it), so the application sees every message exactly once as
//!   long as one lane survives. When the last lane fails, every call returns
//!   [`Error::AllLanesFailed`] with the last cause.
//! * **Replies**: the receiver can send Data frames back ([`SessionReceiver::reply`]),
//!   read with [`SessionSender::recv_reply`]. They are not acknowledged or resent: one
//!   in flight on a lane that fails is lost.
//! * **Abort**: either side's `abort(msg)` sends an Abort frame on every lane; the other
//!   side's calls then fail with [`Error::PeerAborted`].
//!
//! Each lane has two threads on the sender (writer, ack reader) and one on the receiver
//! (reader; acks and replies are written by the calling thread). Dropping a session shuts
//! its sockets down and joins its threads.

mod receiver;
mod sender;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::RngCore;

pub use receiver::SessionReceiver;
pub use sender::SessionSender;

use crate::error::{chain, Error, Result};
use crate::handshake::LaneInfo;
use crate::lane::LaneConfig;

/// Session tuning. Defaults are documented per field.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Most unacknowledged messages per lane (sender). Default 16. With N lanes at most
    /// `N * window` messages (and their payloads) are held for resending.
    pub window: usize,
    /// Capacity of the receiver's queue of delivered, not yet `recv`ed messages.
    /// Default 64. When full, lane readers stop reading and TCP pushes back on the sender.
    pub receive_queue: usize,
    /// Most messages the receiver remembers above the oldest unacknowledged one, for
    /// duplicate detection. Default 262 144. A sender that runs further ahead (it cannot
    /// while respecting its window, unless the application leaves a message unacked for
    /// that long) fails the lane with a protocol error.
    pub dedup_limit: usize,
    /// How long `abort` waits for the Abort frames to be written. Default 5 s.
    pub close_timeout: Duration,
    /// Socket options and handshake timeout for lanes opened by
    /// [`SessionSender::connect`] (default: [`LaneConfig::default`], handshake 10 s).
    pub lane: LaneConfig,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            window: 16,
            receive_queue: 64,
            dedup_limit: 1 << 18,
            close_timeout: Duration::from_secs(5),
            lane: LaneConfig::default(),
        }
    }
}

impl SessionConfig {
    /// The handshake timeout (shorthand for `lane.handshake_timeout`).
    pub fn handshake_timeout(&self) -> Duration {
        self.lane.handshake_timeout
    }

    fn check(&self) -> Result<()> {
        if self.window == 0 {
            return Err(Error::Config("session window must be at least 1".into()));
        }
        if self.receive_queue == 0 {
            return Err(Error::Config(
                "receive queue must hold at least 1 message".into(),
            ));
        }
        if self.dedup_limit == 0 {
            return Err(Error::Config("dedup limit must be at least 1".into()));
        }
        Ok(())
    }
}

/// A message delivered to the receiving application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// Index of the lane it arrived on.
    pub lane: u16,
    /// Its session-global sequence number (pass the whole `Incoming` to `ack`).
    pub seq: u64,
    /// Application tag.
    pub tag: u16,
    /// Application bytes.
    pub payload: Vec<u8>,
}

/// Per-lane counters, from [`SessionSender::stats`] or [`SessionReceiver::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Lane index.
    pub lane: u16,
    /// Frame bytes (headers included) written by the sender / read by the receiver.
    pub bytes: u64,
    /// Data frames written by the sender (resends included) / delivered by the receiver.
    pub messages: u64,
    /// Sender: messages acknowledged while assigned to this lane. Receiver: acks written
    /// on this lane.
    pub acked: u64,
    /// Sender: messages moved here from a failed lane. Receiver: always 0.
    pub resent: u64,
    /// Receiver: duplicate copies dropped (resends of messages already delivered).
    /// Sender: always 0.
    pub duplicates: u64,
    /// Sender: messages assigned to this lane and not yet acknowledged.
    pub in_flight: usize,
    /// Why the lane failed (whole error chain), if it did.
    pub failed: Option<String>,
}

/// State of one lane inside a session.
#[derive(Clone, Debug)]
enum LanePhase {
    /// Carrying frames.
    Live,
    /// Closed after this error; never used again.
    Failed(Arc<Error>),
}

impl LanePhase {
    fn is_live(&self) -> bool {
        matches!(self, LanePhase::Live)
    }

    fn failure(&self) -> Option<String> {
        match self {
            LanePhase::Live => None,
            LanePhase::Failed(e) => Some(chain(&**e)),
        }
    }
}

/// Lock-free per-lane counters updated by lane threads.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    messages: AtomicU64,
    acked: AtomicU64,
    resent: AtomicU64,
    duplicates: AtomicU64,
}

impl Counters {
    fn add(field: &AtomicU64, n: u64) {
        field.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self, lane: u16) -> LaneStats {
        LaneStats {
            lane,
            bytes: self.bytes.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            in_flight: 0,
            failed: None,
        }
    }
}

/// A fresh random session id for [`SessionSender::connect`] or hand-built lanes.
pub fn random_session_id() -> u64 {
    rand::rngs::OsRng.next_u64()
}

/// Checks that `infos` are lanes of one session with distinct indices; returns the id.
fn check_lane_set(infos: &[LaneInfo]) -> Result<u64> {
    let first = infos
        .first()
        .ok_or_else(|| Error::LaneSet("a session needs at least one lane".into()))?;
    let mut seen = HashSet::new();
    for i in infos {
        if i.session != first.session {
            return Err(Error::LaneSet(format!(
                "lane {} belongs to session {:#x}, lane {} to session {:#x}",
                first.lane, first.session, i.lane, i.session
            )));
        }
        if i.lanes != first.lanes {
            return Err(Error::LaneSet(format!(
                "lane {} says the session has {} lanes, lane {} says {}",
                first.lane, first.lanes, i.lane, i.lanes
            )));
        }
        if !seen.insert(i.lane) {
            return Err(Error::LaneSet(format!(
                "lane index {} appears twice",
                i.lane
            )));
        }
    }
    Ok(first.session)
}

/// Locks, ignoring poisoning: session state stays consistent between statements, and a
/// panicking lane thread must not take the session down with a second panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
