//! ferry's transport: authenticated TCP lanes carrying framed, acknowledged messages.
//!
//! It moves opaque application messages (a `u16` tag and bytes) and knows nothing about
//! VMs.
//!
//! * [`wire`]: the frame format (24-byte little-endian header with magic, kind, tag, seq,
//!   length and CRC) and the handshake payloads.
//! * [`key`]: the shared key file.
//! * [`handshake`]: mutual HMAC-SHA256 challenge-response opening every lane.
//! * [`lane`]: one authenticated stream ([`Lane`]), [`connect`], [`Listener`], and the
//!   in-memory [`mem_pair`] for tests.
//! * [`session`]: multi-lane messaging with per-lane windows, acknowledgements, resend on
//!   lane failure ([`SessionSender`], [`SessionReceiver`]).
//!
//! ```no_run
//! # fn main() -> Result<(), ferry_transport::Error> {
//! use ferry_transport::{Key, Listener, SessionConfig, SessionReceiver, SessionSender};
//! use std::time::Duration;
//!
//! let key = Key::load("/etc/ferry/key")?;
//! // Destination:
//! let listener = Listener::bind("0.0.0.0:7070".parse().unwrap())?;
//! let rx = SessionReceiver::accept(&listener, &key, SessionConfig::default(), None)?;
//! let msg = rx.recv(Duration::from_secs(30))?;
//! // ... apply msg.payload ...
//! rx.ack(&msg)?;
//! # Ok(()) }
//! # fn source(key: ferry_transport::Key) -> Result<(), ferry_transport::Error> {
//! # use ferry_transport::*;
//! // Source, three lanes:
//! let tx = SessionSender::connect("10.0.0.2:7070".parse().unwrap(), &[None; 3], &key,
//!                                 SessionConfig::default())?;
//! tx.send(1, b"pages".to_vec())?;
//! tx.barrier()?; // everything sent has been applied
//! # Ok(()) }
//! ```

pub mod error;
pub mod handshake;
pub mod key;
pub mod lane;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod session;
pub mod wire;

pub use error::{Error, Result};
pub use handshake::LaneInfo;
pub use key::{Key, KeyError};
pub use lane::{connect, mem_pair, Lane, LaneConfig, Listener, MemStream, Stream};
pub use session::{
    random_session_id, Incoming, LaneStats, SessionConfig, SessionReceiver, SessionSender,
};
pub use wire::{FrameError, Kind, MAX_PAYLOAD, PROTOCOL_VERSION};
