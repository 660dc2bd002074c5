//! The migration protocol: the application messages ferry sends over transport lanes.
//!
//! Transport frames carry a `tag` and an opaque payload; this module owns the tags and the
//! payload layouts of everything that is not a page batch (page batches are
//! [`crate::encode`]). Control payloads are small JSON objects (bounded by the transport's
//! frame limit); the VM state is bincode with a size limit.
//!
//! ```mermaid
//! sequenceDiagram
//!     Source->>Dest: Describe (memory layout, vCPUs)
//!     Dest-->>Source: Ready
//!     Source->>Dest: Probe* (bandwidth measurement, discarded)
//!     Source->>Dest: Pages* (live phase; every record has its epoch)
//!     Note over Source: pause VM, final harvest, last Pages, barrier
//!     Source->>Dest: Switchover (VM state, digest mode)
//!     Dest-->>Source: Digests
//!     Source->>Dest: Commit (or Abort)
//!     Dest-->>Source: Resumed
//! ```
//! Either side may send `Abort`/`Failed` with a reason at any point; the source then resumes
//! its VM (rollback) and the destination discards what it received.

use serde::{Deserialize, Serialize};

use crate::digest::VerifyMode;

/// Application message tags (source → destination: 1..15, destination → source: 16..31).
/// `0` is never valid.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Describe = 1,
    Pages = 2,
    Probe = 3,
    Switchover = 4,
    Commit = 5,
    Abort = 6,
    Ready = 16,
    Digests = 17,
    Resumed = 18,
    Failed = 19,
}

impl Tag {
    /// The tag for a raw value, or `None` for unknown values.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Describe,
            2 => Self::Pages,
            3 => Self::Probe,
            4 => Self::Switchover,
            5 => Self::Commit,
            6 => Self::Abort,
            16 => Self::Ready,
            17 => Self::Digests,
            18 => Self::Resumed,
            19 => Self::Failed,
            _ => return None,
        })
    }
}

/// Errors decoding a control message.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("unknown message tag {0}")]
    UnknownTag(u16),
    #[error("message {tag:?} is not valid {state}")]
    Unexpected { tag: Tag, state: &'static str },
    #[error("malformed {what} message")]
    Malformed {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the destination needs to build an empty VM to receive into.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Describe {
    /// `(gpa, len)` of each memory region.
    pub layout: Vec<(u64, u64)>,
    pub vcpus: u32,
    /// Policy name, for the destination's log.
    pub policy: String,
}

/// Sent once the last pages are acknowledged; the VM state follows as raw bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwitchoverHeader {
    pub final_epoch: u32,
    pub verify: VerifyMode,
    /// Bytes of digest range (pages are hashed in ranges of this many bytes).
    pub digest_range: u64,
    /// Chooses which pages `sample` verification hashes.
    pub salt: u64,
}

/// The destination's digests of its guest memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Digests {
    pub digests: Vec<u64>,
    /// Milliseconds the destination spent hashing.
    pub hash_ms: f64,
}

/// What the destination tells the source with `Ready` (an empty payload from an older one).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Ready {
    /// How long the destination took to allocate guest memory, if it did before replying.
    #[serde(default)]
    pub prealloc_ms: Option<f64>,
}

impl Ready {
    /// The payload of a `Ready`: JSON, or empty from a destination that sends no figures.
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        if b.is_empty() {
            return Ok(Self::default());
        }
        from_json("Ready", b)
    }
}

/// What the destination tells the source with `Resumed`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DestFigures {
    /// CPU seconds the destination process spent receiving (its vCPUs were not running).
    pub cpu_s: f64,
    pub pages_written: u64,
    pub stale_records: u64,
    /// From the Commit's arrival to the reply, which comes just before the vCPUs run: the
    /// end of the downtime, on the destination's clock.
    #[serde(default)]
    pub resume_ms: f64,
}

/// Encodes a JSON control message.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("control messages always serialize")
}

/// Decodes a JSON control message.
pub fn from_json<'a, T: Deserialize<'a>>(what: &'static str, b: &'a [u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(b).map_err(|e| ProtoError::Malformed {
        what,
        source: Box::new(e),
    })
}

/// Switchover payload: `u32 header_len`, JSON header, then the bincode VM state.
pub fn encode_switchover(h: &SwitchoverHeader, state: &[u8]) -> Vec<u8> {
    let head = to_json(h);
    let mut out = Vec::with_capacity(4 + head.len() + state.len());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(state);
    out
}

/// Splits a switchover payload into its header and the VM state bytes.
pub fn decode_switchover(b: &[u8]) -> Result<(SwitchoverHeader, &[u8]), ProtoError> {
    let malformed = |msg: &str| ProtoError::Malformed {
        what: "Switchover",
        source: msg.into(),
    };
    let len = b
        .get(..4)
        .map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| malformed("shorter than its length field"))?;
    let head = b
        .get(4..4 + len)
        .ok_or_else(|| malformed("header longer than the message"))?;
    Ok((from_json("Switchover", head)?, &b[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_zero_is_invalid() {
        for t in [
            Tag::Describe,
            Tag::Pages,
            Tag::Probe,
            Tag::Switchover,
            Tag::Commit,
            Tag::Abort,
            Tag::Ready,
            Tag::Digests,
            Tag::Resumed,
            Tag::Failed,
        ] {
            assert_eq!(Tag::from_u16(t as u16), Some(t));
        }
        assert_eq!(Tag::from_u16(0), None);
        assert_eq!(Tag::from_u16(7), None);
    }

    #[test]
    fn switchover_round_trip_and_truncation() {
        let h = SwitchoverHeader {
            final_epoch: 7,
            verify: VerifyMode::Full,
            digest_range: 1 << 26,
            salt: 3,
        };
        let b = encode_switchover(&h, b"state");
        let (h2, s) = decode_switchover(&b).unwrap();
        assert_eq!(h2, h);
        assert_eq!(s, b"state");
        assert!(decode_switchover(&b[..3]).is_err());
        assert!(decode_switchover(&b[..10]).is_err());
        assert!(from_json::<Describe>("Describe", b"{\"layout\":").is_err());
    }
}
