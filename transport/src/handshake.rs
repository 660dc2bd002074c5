//! Mutual HMAC-SHA256 challenge-response that opens every lane.
//!
//! Both hosts hold the same [`Key`]. The client (the migration source) opens the lane:
//!
//! ```text
//! client                                              server
//!   Hello { version, lane, lanes, session, client_nonce } ──▶
//!        ◀── Challenge { version, server_nonce, server_proof }
//!            server_proof = HMAC(key, "ferry-server" || client_nonce || server_nonce || session_le)
//!   Proof { client_proof } ──▶
//!            client_proof = HMAC(key, "ferry-client" || server_nonce || client_nonce || session_le)
//!        ◀── Welcome { session, lane, lanes }
//! ```
//!
//! Each side proves it holds the key over a nonce the other side chose, so neither proof
//! can be replayed. Proofs are checked in constant time (`hmac`'s `verify_slice`). Any
//! failure is reported to the peer with an [`Abort`] frame whose
//! [`AbortReason`] lets it report the same error: a version mismatch becomes
//! [`Error::VersionMismatch`] on both sides, a failed proof [`Error::AuthFailed`] on both
//! sides, anything else [`Error::PeerAborted`] with the peer's message.
//!
//! The handshake does not encrypt or authenticate the frames that follow: it keeps
//! a stray or misconfigured peer from joining a session, not an active attacker on the
//! path.
//!
//! The logic is two sans-IO state machines ([`ClientHandshake`], [`ServerHandshake`]) fed
//! with frames; [`client`] and [`server`] drive them over a [`Stream`] under one deadline
//! for the whole exchange.
//!
//! ```mermaid
//! stateDiagram-v2
//!     state "client" as C {
//!         [*] --> AwaitChallenge: send Hello
//!         AwaitChallenge --> AwaitWelcome: Challenge, server proof ok / send Proof
//!         AwaitChallenge --> Failed: bad proof or version / send Abort
//!         AwaitWelcome --> Done: Welcome
//!         AwaitChallenge --> Failed: Abort, timeout
//!         AwaitWelcome --> Failed: Abort, timeout
//!     }
//!     state "server" as S {
//!         [*] --> AwaitHello
//!         AwaitHello --> AwaitProof: Hello ok / send Challenge
//!         AwaitHello --> Failed2: other version, bad Hello / send Abort
//!         AwaitProof --> Done2: proof ok / send Welcome
//!         AwaitProof --> Failed2: bad proof / send Abort
//!         AwaitProof --> Failed2: Abort, timeout
//!     }
//! ```

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::key::Key;
use crate::lane::Stream;
use crate::wire::{
    self, Abort, AbortReason, Challenge, Frame, Hello, Kind, Proof, Welcome, NONCE_LEN, PROOF_LEN,
    PROTOCOL_VERSION,
};

/// Default time allowed for a whole handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const SERVER_LABEL: &[u8] = b"ferry-server";
const CLIENT_LABEL: &[u8] = b"ferry-client";

/// What a lane's handshake established: which session, which lane of how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaneInfo {
    /// Session id (chosen by the client, the same for all lanes of a session).
    pub session: u64,
    /// This lane's index, `< lanes`.
    pub lane: u16,
    /// Number of lanes in the session.
    pub lanes: u16,
}

/// A frame a state machine wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Out {
    /// Frame kind.
    pub kind: Kind,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Out {
    fn abort(reason: AbortReason, message: impl Into<String>) -> Out {
        Out {
            kind: Kind::Abort,
            payload: Abort::new(reason, message).encode(),
        }
    }
}

/// What a state machine decided after a frame.
#[derive(Debug)]
pub enum Step {
    /// Send this and wait for the next frame.
    Send(Out),
    /// The handshake succeeded; send `Out` first if present.
    Done(LaneInfo, Option<Out>),
    /// The handshake failed; send `Out` (an Abort) first if present, best effort.
    Fail(Error, Option<Out>),
}

fn proof(key: &Key, label: &[u8], first: &[u8], second: &[u8], session: u64) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label);
    mac.update(first);
    mac.update(second);
    mac.update(&session.to_le_bytes());
    mac
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// The abort message sent when the peer speaks another version.
pub fn version_message(theirs: u16, ours: u16) -> String {
    format!("protocol version {theirs} not supported; this side speaks {ours}")
}

/// Client handshake states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    /// Hello sent.
    AwaitChallenge,
    /// Proof sent.
    AwaitWelcome,
    /// Welcome received.
    Done,
    /// An error was returned; no more frames are accepted.
    Failed,
}

/// Client side of the handshake, without I/O.
pub struct ClientHandshake<'k> {
    key: &'k Key,
    peer: String,
    state: ClientState,
    hello: Hello,
}

impl<'k> ClientHandshake<'k> {
    /// Starts a handshake; returns the machine and the Hello to send.
    pub fn new(key: &'k Key, info: LaneInfo, peer: impl Into<String>) -> (Self, Out) {
        Self::with(key, info, peer.into(), PROTOCOL_VERSION, nonce())
    }

    fn with(
        key: &'k Key,
        info: LaneInfo,
        peer: String,
        version: u16,
        client_nonce: [u8; NONCE_LEN],
    ) -> (Self, Out) {
        let hello = Hello {
            version,
            lane: info.lane,
            lanes: info.lanes,
            session: info.session,
            client_nonce,
        };
        let out = Out {
            kind: Kind::Hello,
            payload: hello.encode().to_vec(),
        };
        let hs = ClientHandshake {
            key,
            peer,
            state: ClientState::AwaitChallenge,
            hello,
        };
        (hs, out)
    }

    /// Current state.
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// Feeds one received frame.
    pub fn on_frame(&mut self, frame: &Frame) -> Step {
        let step = self.step(frame);
        self.state = match &step {
            Step::Send(_) => ClientState::AwaitWelcome,
            Step::Done(..) => ClientState::Done,
            Step::Fail(..) => ClientState::Failed,
        };
        step
    }

    fn step(&self, frame: &Frame) -> Step {
        let peer = || self.peer.clone();
        match (self.state, frame.kind) {
            (ClientState::AwaitChallenge | ClientState::AwaitWelcome, Kind::Abort) => {
                Step::Fail(self.aborted(&frame.payload), None)
            }
            (ClientState::AwaitChallenge, Kind::Challenge) => {
                let ch = match Challenge::decode(&frame.payload) {
                    Ok(ch) => ch,
                    Err(e) => return bad_payload(peer(), e),
                };
                if ch.version != self.hello.version {
                    let msg = version_message(ch.version, self.hello.version);
                    return Step::Fail(
                        Error::VersionMismatch {
                            ours: self.hello.version,
                            theirs: ch.version,
                        },
                        Some(Out::abort(AbortReason::Version, msg)),
                    );
                }
                let h = &self.hello;
                let expect = proof(
                    self.key,
                    SERVER_LABEL,
                    &h.client_nonce,
                    &ch.server_nonce,
                    h.session,
                );
                if expect.verify_slice(&ch.server_proof).is_err() {
                    return Step::Fail(
                        Error::AuthFailed {
                            peer: peer(),
                            detail: "the server's proof does not match our key: \
                                     the peer does not hold the same key",
                        },
                        Some(Out::abort(
                            AbortReason::Auth,
                            "authentication failed: the server's proof does not match the client's key",
                        )),
                    );
                }
                let mine = proof(
                    self.key,
                    CLIENT_LABEL,
                    &ch.server_nonce,
                    &h.client_nonce,
                    h.session,
                );
                let client_proof: [u8; PROOF_LEN] = mine.finalize().into_bytes().into();
                Step::Send(Out {
                    kind: Kind::Proof,
                    payload: Proof { client_proof }.encode().to_vec(),
                })
            }
            (ClientState::AwaitWelcome, Kind::Welcome) => {
                let w = match Welcome::decode(&frame.payload) {
                    Ok(w) => w,
                    Err(e) => return bad_payload(peer(), e),
                };
                let h = &self.hello;
                if (w.session, w.lane, w.lanes) != (h.session, h.lane, h.lanes) {
                    return Step::Fail(
                        Error::Rejected {
                            peer: peer(),
                            reason: format!(
                                "Welcome confirms session {:#x} lane {}/{}, we asked for \
                                 session {:#x} lane {}/{}",
                                w.session, w.lane, w.lanes, h.session, h.lane, h.lanes
                            ),
                        },
                        Some(Out::abort(
                            AbortReason::Protocol,
                            "Welcome does not match Hello",
                        )),
                    );
                }
                Step::Done(
                    LaneInfo {
                        session: w.session,
                        lane: w.lane,
                        lanes: w.lanes,
                    },
                    None,
                )
            }
            (state, kind) => unexpected(peer(), client_state_name(state), kind),
        }
    }

    fn aborted(&self, payload: &[u8]) -> Error {
        match Abort::decode(payload) {
            Ok(a) => match a.reason {
                AbortReason::Version => Error::VersionMismatch {
                    ours: self.hello.version,
                    theirs: a.version,
                },
                AbortReason::Auth => Error::AuthFailed {
                    peer: self.peer.clone(),
                    detail: "the server rejected our proof: the peers do not hold the same key",
                },
                AbortReason::Other | AbortReason::Protocol => Error::PeerAborted(a.message),
            },
            Err(e) => Error::PeerAborted(format!("(malformed Abort payload: {e})")),
        }
    }
}

fn client_state_name(s: ClientState) -> &'static str {
    match s {
        ClientState::AwaitChallenge => "AwaitChallenge",
        ClientState::AwaitWelcome => "AwaitWelcome",
        ClientState::Done => "Done",
        ClientState::Failed => "Failed",
    }
}

fn bad_payload(peer: String, source: wire::PayloadError) -> Step {
    let msg = format!("malformed payload: {source}");
    Step::Fail(
        Error::BadPayload { peer, source },
        Some(Out::abort(AbortReason::Protocol, msg)),
    )
}

fn unexpected(peer: String, state: &'static str, kind: Kind) -> Step {
    let msg = format!("a {kind} frame is not valid in handshake state {state}");
    Step::Fail(
        Error::Unexpected { peer, state, kind },
        Some(Out::abort(AbortReason::Protocol, msg)),
    )
}

/// Server handshake states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerState {
    /// Waiting for the client's Hello.
    AwaitHello,
    /// Challenge sent.
    AwaitProof,
    /// Welcome sent.
    Done,
    /// An error was returned; no more frames are accepted.
    Failed,
}

/// Server side of the handshake, without I/O.
pub struct ServerHandshake<'k> {
    key: &'k Key,
    peer: String,
    state: ServerState,
    server_nonce: [u8; NONCE_LEN],
    hello: Option<Hello>,
}

impl<'k> ServerHandshake<'k> {
    /// Starts a handshake: wait for Hello.
    pub fn new(key: &'k Key, peer: impl Into<String>) -> Self {
        Self::with_nonce(key, peer.into(), nonce())
    }

    fn with_nonce(key: &'k Key, peer: String, server_nonce: [u8; NONCE_LEN]) -> Self {
        ServerHandshake {
            key,
            peer,
            state: ServerState::AwaitHello,
            server_nonce,
            hello: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> ServerState {
        self.state
    }

    /// Feeds one received frame.
    pub fn on_frame(&mut self, frame: &Frame) -> Step {
        let step = self.step(frame);
        self.state = match &step {
            Step::Send(_) => ServerState::AwaitProof,
            Step::Done(..) => ServerState::Done,
            Step::Fail(..) => ServerState::Failed,
        };
        step
    }

    fn step(&mut self, frame: &Frame) -> Step {
        let peer = || self.peer.clone();
        match (self.state, &self.hello, frame.kind) {
            (ServerState::AwaitHello | ServerState::AwaitProof, _, Kind::Abort) => {
                let err = match Abort::decode(&frame.payload) {
                    Ok(a) if a.reason == AbortReason::Auth => Error::AuthFailed {
                        peer: peer(),
                        detail: "the client rejected our proof: the peers do not hold the same key",
                    },
                    Ok(a) if a.reason == AbortReason::Version => Error::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: a.version,
                    },
                    Ok(a) => Error::PeerAborted(a.message),
                    Err(e) => Error::PeerAborted(format!("(malformed Abort payload: {e})")),
                };
                Step::Fail(err, None)
            }
            (ServerState::AwaitHello, _, Kind::Hello) => {
                let theirs = Hello::peek_version(&frame.payload);
                if let Some(theirs) = theirs.filter(|&v| v != PROTOCOL_VERSION) {
                    return Step::Fail(
                        Error::VersionMismatch {
                            ours: PROTOCOL_VERSION,
                            theirs,
                        },
                        Some(Out::abort(
                            AbortReason::Version,
                            version_message(theirs, PROTOCOL_VERSION),
                        )),
                    );
                }
                let hello = match Hello::decode(&frame.payload) {
                    Ok(h) => h,
                    Err(e) => return bad_payload(peer(), e),
                };
                if hello.lanes == 0 || hello.lane >= hello.lanes {
                    let reason =
                        format!("lane {} of {} is not a valid lane", hello.lane, hello.lanes);
                    return Step::Fail(
                        Error::Rejected {
                            peer: peer(),
                            reason: reason.clone(),
                        },
                        Some(Out::abort(AbortReason::Protocol, reason)),
                    );
                }
                let server_proof = proof(
                    self.key,
                    SERVER_LABEL,
                    &hello.client_nonce,
                    &self.server_nonce,
                    hello.session,
                )
                .finalize()
                .into_bytes()
                .into();
                let ch = Challenge {
                    version: PROTOCOL_VERSION,
                    server_nonce: self.server_nonce,
                    server_proof,
                };
                self.hello = Some(hello);
                Step::Send(Out {
                    kind: Kind::Challenge,
                    payload: ch.encode().to_vec(),
                })
            }
            (ServerState::AwaitProof, Some(hello), Kind::Proof) => {
                let p = match Proof::decode(&frame.payload) {
                    Ok(p) => p,
                    Err(e) => return bad_payload(peer(), e),
                };
                let expect = proof(
                    self.key,
                    CLIENT_LABEL,
                    &self.server_nonce,
                    &hello.client_nonce,
                    hello.session,
                );
                if expect.verify_slice(&p.client_proof).is_err() {
                    return Step::Fail(
                        Error::AuthFailed {
                            peer: peer(),
                            detail: "the client's proof does not match our key: \
                                     the peer does not hold the same key",
                        },
                        Some(Out::abort(AbortReason::Auth, "authentication failed")),
                    );
                }
                let info = LaneInfo {
                    session: hello.session,
                    lane: hello.lane,
                    lanes: hello.lanes,
                };
                let w = Welcome {
                    session: info.session,
                    lane: info.lane,
                    lanes: info.lanes,
                };
                Step::Done(
                    info,
                    Some(Out {
                        kind: Kind::Welcome,
                        payload: w.encode().to_vec(),
                    }),
                )
            }
            (state, _, kind) => unexpected(peer(), server_state_name(state), kind),
        }
    }
}

fn server_state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::AwaitHello => "AwaitHello",
        ServerState::AwaitProof => "AwaitProof",
        ServerState::Done => "Done",
        ServerState::Failed => "Failed",
    }
}

/// Runs the client side over `stream`; the whole exchange must finish within `timeout`.
pub fn client<S: Stream>(
    stream: &mut S,
    key: &Key,
    info: LaneInfo,
    timeout: Duration,
) -> Result<LaneInfo> {
    let peer = stream.peer_name();
    let (mut hs, hello) = ClientHandshake::new(key, info, peer.clone());
    drive(stream, &peer, timeout, Some(hello), |f| hs.on_frame(f))
}

/// Runs the server side over `stream`; the whole exchange must finish within `timeout`.
pub fn server<S: Stream>(stream: &mut S, key: &Key, timeout: Duration) -> Result<LaneInfo> {
    let peer = stream.peer_name();
    let mut hs = ServerHandshake::new(key, peer.clone());
    drive(stream, &peer, timeout, None, |f| hs.on_frame(f))
}

fn drive<S: Stream>(
    stream: &mut S,
    peer: &str,
    timeout: Duration,
    first: Option<Out>,
    mut machine: impl FnMut(&Frame) -> Step,
) -> Result<LaneInfo> {
    let mut io = DeadlineIo {
        stream,
        deadline: Instant::now() + timeout,
    };
    let timed_out = || Error::HandshakeTimeout {
        peer: peer.to_string(),
        after: timeout,
    };
    let send = |io: &mut DeadlineIo<'_, S>, out: &Out| -> Result<()> {
        wire::write_frame(io, out.kind, 0, 0, &out.payload).map_err(|e| {
            if is_timeout(&e) {
                timed_out()
            } else {
                Error::HandshakeIo {
                    peer: peer.to_string(),
                    during: format!("sending {}", out.kind),
                    source: wire::FrameError::Io(e),
                }
            }
        })
    };
    if let Some(out) = first {
        send(&mut io, &out)?;
    }
    let result = loop {
        let frame = match wire::read_frame(&mut io) {
            Ok(f) => f,
            Err(e) if e.is_timeout() => break Err(timed_out()),
            Err(source) => {
                break Err(Error::HandshakeIo {
                    peer: peer.to_string(),
                    during: "waiting for the peer's next handshake frame".into(),
                    source,
                })
            }
        };
        match machine(&frame) {
            Step::Send(out) => send(&mut io, &out)?,
            Step::Done(info, out) => {
                if let Some(out) = out {
                    send(&mut io, &out)?;
                }
                break Ok(info);
            }
            Step::Fail(err, out) => {
                if let Some(out) = out {
                    // Best effort: the peer may be gone; the handshake error is what matters.
                    let _ = send(&mut io, &out);
                }
                break Err(err);
            }
        }
    };
    if result.is_ok() {
        io.stream
            .set_io_timeouts(None, None)
            .map_err(|source| Error::Socket {
                op: "clearing handshake timeouts",
                peer: peer.to_string(),
                source,
            })?;
    }
    result
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Applies what is left of one deadline to every read and write.
struct DeadlineIo<'a, S: Stream> {
    stream: &'a mut S,
    deadline: Instant,
}

impl<S: Stream> DeadlineIo<'_, S> {
    fn arm(&self, read: bool) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if read {
            self.stream.set_io_timeouts(Some(left), None)
        } else {
            self.stream.set_io_timeouts(None, Some(left))
        }
    }
}

impl<S: Stream> Read for DeadlineIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.stream.read(buf)
    }
}

impl<S: Stream> Write for DeadlineIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.stream.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.arm(false)?;
        self.stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests;
