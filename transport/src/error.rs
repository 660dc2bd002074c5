//! The crate's error type: one enum at the crate boundary ([`Error`]), wrapping the two
//! lower-level ones ([`FrameError`] from the frame decoder, [`KeyError`] from key files).
//!
//! Messages name the operation and its context (lane, address, state) and do not repeat
//! their `#[source]`; print the whole chain (e.g. anyhow's `{:#}`, or [`chain`]) to see
//! the cause.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::key::KeyError;
use crate::wire::{FrameError, Kind, PayloadError};

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or creating the shared key failed.
    #[error(transparent)]
    Key(#[from] KeyError),

    /// A configuration value or argument is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The lanes handed to a session do not form one consistent set.
    #[error("inconsistent lane set: {0}")]
    LaneSet(String),

    /// Binding a listening socket, or the local end of an outgoing lane, failed.
    #[error("binding {addr}")]
    Bind {
        /// The local address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// `accept()` on a listener failed.
    #[error("accepting a lane on {addr}")]
    Accept {
        /// The listener's address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// No peer connected to a listener in time.
    #[error("no lane connected to {addr} within {after:?}")]
    AcceptTimeout {
        /// The listener's address.
        addr: SocketAddr,
        /// How long we waited.
        after: Duration,
    },

    /// The TCP connection to a peer could not be established (refused, unreachable,
    /// timed out).
    #[error("connecting to {remote}{}", local.map(|l| format!(" from {l}")).unwrap_or_default())]
    Connect {
        /// The peer's address.
        remote: SocketAddr,
        /// The local address we bound to, if any.
        local: Option<SocketAddr>,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Creating, configuring or cloning a socket failed.
    #[error("{op} on the socket to {peer}")]
    Socket {
        /// What we were doing (`"setting TCP_NODELAY"`, `"cloning the stream"`, ...).
        op: &'static str,
        /// The peer, as far as known.
        peer: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Spawning a lane thread failed.
    #[error("spawning the {what} thread of lane {lane}")]
    Thread {
        /// `"writer"`, `"reader"`.
        what: &'static str,
        /// Lane index.
        lane: u16,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The handshake did not finish before its deadline.
    #[error("handshake with {peer} timed out after {after:?} (is the peer a ferry endpoint?)")]
    HandshakeTimeout {
        /// The peer.
        peer: String,
        /// The configured handshake timeout.
        after: Duration,
    },

    /// Reading or writing a handshake frame failed.
    #[error("handshake with {peer}: {during}")]
    HandshakeIo {
        /// The peer.
        peer: String,
        /// What we were doing (`"reading Challenge"`, ...).
        during: String,
        /// The cause.
        #[source]
        source: FrameError,
    },

    /// A handshake frame of the right kind carried a malformed payload.
    #[error("handshake with {peer}: malformed payload")]
    BadPayload {
        /// The peer.
        peer: String,
        /// What is wrong with it.
        #[source]
        source: PayloadError,
    },

    /// A handshake frame arrived that is not valid in the current state.
    #[error("handshake with {peer}: a {kind} frame is not valid in state {state}")]
    Unexpected {
        /// The peer.
        peer: String,
        /// The handshake state (see [`ClientState`](crate::handshake::ClientState) and
        /// [`ServerState`](crate::handshake::ServerState)).
        state: &'static str,
        /// The frame kind received.
        kind: Kind,
    },

    /// The peer's Hello was well-formed but unacceptable (e.g. `lane >= lanes`), or its
    /// Welcome did not confirm what we asked for.
    #[error("handshake with {peer} rejected: {reason}")]
    Rejected {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },

    /// The two sides speak different protocol versions.
    #[error(
        "protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}; \
         run the same ferry version on both hosts"
    )]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },

    /// The challenge-response failed: the peers do not hold the same key.
    #[error("authentication with {peer} failed: {detail}")]
    AuthFailed {
        /// The peer.
        peer: String,
        /// Which proof did not verify.
        detail: &'static str,
    },

    /// The peer sent an Abort frame; this is its message.
    #[error("peer aborted: {0}")]
    PeerAborted(String),

    /// This side aborted the session (with this message); it can no longer be used.
    #[error("session aborted by this side: {0}")]
    Aborted(String),

    /// Writing a frame on a lane failed.
    #[error("sending on lane {lane}")]
    Send {
        /// Lane index.
        lane: u16,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Reading a frame on a lane failed: I/O error, EOF, or a frame that fails validation.
    #[error("receiving on lane {lane}")]
    Recv {
        /// Lane index.
        lane: u16,
        /// The cause.
        #[source]
        source: FrameError,
    },

    /// A well-formed frame that the protocol does not allow here.
    #[error("protocol violation on lane {lane}: {what}")]
    Protocol {
        /// Lane index.
        lane: u16,
        /// What happened.
        what: String,
    },

    /// An application message is larger than one frame may carry.
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge {
        /// The message length.
        len: usize,
        /// [`MAX_PAYLOAD`](crate::wire::MAX_PAYLOAD).
        max: u32,
    },

    /// Every lane of the session has failed; `last` is the most recent lane failure.
    #[error("all {lanes} lanes failed")]
    AllLanesFailed {
        /// How many lanes the session had.
        lanes: usize,
        /// The last lane failure.
        #[source]
        last: Arc<Error>,
    },

    /// An operation with a timeout did not complete in time; the session is still usable.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// `"recv"`, `"recv_reply"`, `"barrier"`.
        op: &'static str,
        /// The timeout.
        after: Duration,
    },

    /// [`SessionReceiver::ack`](crate::SessionReceiver::ack) for a seq that was never
    /// delivered.
    #[error("ack for seq {seq}, which was never delivered")]
    NotDelivered {
        /// The seq.
        seq: u64,
    },
}

impl Error {
    /// True for [`Error::Timeout`]: the operation may be retried.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// Formats an error with its whole `source()` chain, `": "`-separated (for logs and
/// [`LaneStats::failed`](crate::LaneStats::failed)).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
