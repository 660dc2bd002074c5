//! The frame format: everything that goes on a lane, and nothing else.
//!
//! Every frame is a 24-byte header followed by `len` payload bytes. All integers are
//! little-endian.
//!
//! | offset | size | field   | meaning                                                        |
//! |-------:|-----:|---------|----------------------------------------------------------------|
//! | 0      | 4    | `magic` | [`MAGIC`] = `0x5952_5246`, the bytes `"FRRY"`                   |
//! | 4      | 2    | `kind`  | [`Kind`]; `0` and unknown values are rejected                   |
//! | 6      | 2    | `tag`   | application tag of a Data frame, `0` otherwise                  |
//! | 8      | 8    | `seq`   | session-global sequence number (Data, Ack), `0` in the handshake|
//! | 16     | 4    | `len`   | payload length, at most [`MAX_PAYLOAD`] (checked before allocating) |
//! | 20     | 4    | `crc`   | CRC-32 (crc32fast) over header bytes `0..20`, then the payload  |
//!
//! The handshake kinds carry fixed-layout payloads, encoded and decoded here:
//!
//! | kind          | payload layout (offset: field)                                                 | bytes |
//! |---------------|--------------------------------------------------------------------------------|------:|
//! | 1 Hello       | 0 `version` u16, 2 `lane` u16, 4 `lanes` u16, 6 reserved u16 (0), 8 `session` u64, 16 `client_nonce` \[32\] | 48 |
//! | 2 Challenge   | 0 `version` u16, 2 reserved \[6\] (0), 8 `server_nonce` \[32\], 40 `server_proof` \[32\] | 72 |
//! | 3 Proof       | 0 `client_proof` \[32\]                                                         | 32 |
//! | 4 Welcome     | 0 `session` u64, 8 `lane` u16, 10 `lanes` u16, 12 reserved u32 (0)              | 16 |
//! | 5 Data        | opaque application bytes                                                       | 0..=[`MAX_PAYLOAD`] |
//! | 6 Ack         | empty; `seq` in the header is the acknowledged message                         | 0 |
//! | 7 Abort       | 0 `reason` u16 ([`AbortReason`]), 2 `version` u16 (sender's), 4 reserved u32 (0), 8 UTF-8 message (at most [`MAX_ABORT_MESSAGE`]) | 8.. |
//!
//! The header, the `version` field at the start of Hello, and the Abort payload are frozen
//! across protocol versions, so that two different versions can always tell each other
//! so.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

/// `"FRRY"` read as a little-endian u32.
pub const MAGIC: u32 = 0x5952_5246;
/// Header length in bytes.
pub const HEADER_LEN: usize = 24;
/// Largest payload a frame may carry (64 MiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024 * 1024;
/// The protocol version this build speaks. 2: digests are sums of per-page terms, and page
/// class 5 (LZ4).
pub const PROTOCOL_VERSION: u16 = 2;
/// Length of the handshake nonces.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 proof.
pub const PROOF_LEN: usize = 32;
/// Longest Abort message, in bytes; longer ones are cut at a character boundary.
pub const MAX_ABORT_MESSAGE: usize = 1024;

/// Frame kinds. `0` is never valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// Client → server: first handshake frame ([`Hello`]).
    Hello = 1,
    /// Server → client: nonce and server proof ([`Challenge`]).
    Challenge = 2,
    /// Client → server: client proof ([`Proof`]).
    Proof = 3,
    /// Server → client: the lane is established ([`Welcome`]).
    Welcome = 4,
    /// An application message (either direction).
    Data = 5,
    /// Receiver → sender: the message `seq` has been applied.
    Ack = 6,
    /// Either direction: the session is being abandoned ([`Abort`]).
    Abort = 7,
}

impl Kind {
    /// Decodes a kind; `None` for `0` and unknown values.
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Proof,
            4 => Kind::Welcome,
            5 => Kind::Data,
            6 => Kind::Ack,
            7 => Kind::Abort,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// EOF before the first header byte: the peer closed the connection between frames.
    #[error("connection closed by the peer")]
    Closed,
    /// EOF in the middle of a frame.
    #[error("connection closed after {got} of {want} {part} bytes (truncated frame)")]
    Truncated {
        /// `"header"` or `"payload"`.
        part: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {found:#010x}, expected {MAGIC:#010x} (is the peer a ferry endpoint?)")]
    BadMagic {
        /// What was there instead.
        found: u32,
    },
    /// The kind is `0` or unknown.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The raw kind.
        kind: u16,
    },
    /// The header announces a payload larger than [`MAX_PAYLOAD`].
    #[error("payload length {len} exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLong {
        /// The announced length.
        len: u64,
    },
    /// The CRC does not match the header and payload.
    #[error("crc mismatch on {kind} frame seq {seq}: header says {expected:#010x}, computed {computed:#010x}")]
    Crc {
        /// The frame's kind.
        kind: Kind,
        /// The frame's seq.
        seq: u64,
        /// The CRC in the header.
        expected: u32,
        /// The CRC of what arrived.
        computed: u32,
    },
    /// The underlying read failed (including timeouts: `WouldBlock`/`TimedOut`).
    #[error("reading a frame")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// True if this is an I/O timeout (a read timeout set on the stream expired).
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// A decoded, validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Application tag.
    pub tag: u16,
    /// Sequence number.
    pub seq: u64,
    /// Payload length (≤ [`MAX_PAYLOAD`]).
    pub len: u32,
    /// CRC over header bytes `0..20` and the payload.
    pub crc: u32,
}

impl Header {
    /// Decodes and validates magic, kind and length. The CRC needs the payload and is
    /// checked by [`read_frame`].
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let raw_kind = u16::from_le_bytes([b[4], b[5]]);
        let kind = Kind::from_u16(raw_kind).ok_or(FrameError::UnknownKind { kind: raw_kind })?;
        let len = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong { len: len.into() });
        }
        Ok(Header {
            kind,
            tag: u16::from_le_bytes([b[6], b[7]]),
            seq: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            len,
            crc: u32::from_le_bytes([b[20], b[21], b[22], b[23]]),
        })
    }
}

/// Encodes the header for a frame carrying `payload`, computing `len` and `crc`.
pub fn encode_header(
    kind: Kind,
    tag: u16,
    seq: u64,
    payload: &[u8],
) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or(FrameError::TooLong {
            len: payload.len() as u64,
        })?;
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    h[6..8].copy_from_slice(&tag.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    let crc = frame_crc(&h[..20], payload);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

fn frame_crc(header20: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header20);
    hasher.update(payload);
    hasher.finalize()
}

/// One received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind.
    pub kind: Kind,
    /// Application tag.
    pub tag: u16,
    /// Sequence number.
    pub seq: u64,
    /// The payload (CRC-checked).
    pub payload: Vec<u8>,
}

/// Reads one whole frame, validating magic, kind, length (before allocating) and CRC.
///
/// EOF before the first byte is [`FrameError::Closed`]; EOF later is
/// [`FrameError::Truncated`].
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, FrameError> {
    let mut hb = [0u8; HEADER_LEN];
    match read_full(r, &mut hb)? {
        0 => return Err(FrameError::Closed),
        HEADER_LEN => {}
        got => {
            return Err(FrameError::Truncated {
                part: "header",
                got,
                want: HEADER_LEN,
            })
        }
    }
    let h = Header::decode(&hb)?;
    // `h.len` is at most MAX_PAYLOAD here.
    let want = h.len as usize;
    let mut payload = vec![0u8; want];
    let got = read_full(r, &mut payload)?;
    if got < want {
        return Err(FrameError::Truncated {
            part: "payload",
            got,
            want,
        });
    }
    let computed = frame_crc(&hb[..20], &payload);
    if computed != h.crc {
        return Err(FrameError::Crc {
            kind: h.kind,
            seq: h.seq,
            expected: h.crc,
            computed,
        });
    }
    Ok(Frame {
        kind: h.kind,
        tag: h.tag,
        seq: h.seq,
        payload,
    })
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(got)
}

/// Writes one frame (header and payload in one vectored write where possible).
///
/// A payload over [`MAX_PAYLOAD`] is an `InvalidInput` error and nothing is written.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    kind: Kind,
    tag: u16,
    seq: u64,
    payload: &[u8],
) -> io::Result<()> {
    let header = encode_header(kind, tag, seq, payload)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut slices = [IoSlice::new(&header), IoSlice::new(payload)];
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    // Drops the payload slice if it is empty.
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

/// Encodes a whole frame into a buffer (tests, fuzzing, small control frames).
pub fn encode_frame(kind: Kind, tag: u16, seq: u64, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = encode_header(kind, tag, seq, payload)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Why a handshake or Abort payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The payload has the wrong length for its kind.
    #[error("{kind} payload is {len} bytes, expected {want}")]
    Length {
        /// Frame kind.
        kind: Kind,
        /// Actual length.
        len: usize,
        /// Required length (minimum for Abort).
        want: usize,
    },
    /// Reserved bytes are not zero.
    #[error("{kind} payload has non-zero reserved bytes")]
    Reserved {
        /// Frame kind.
        kind: Kind,
    },
    /// An Abort frame with a reason code this version does not know.
    #[error("unknown abort reason {0}")]
    AbortReason(u16),
    /// An Abort message longer than [`MAX_ABORT_MESSAGE`].
    #[error("abort message of {0} bytes exceeds {MAX_ABORT_MESSAGE}")]
    AbortTooLong(usize),
}

fn check_len(kind: Kind, p: &[u8], want: usize) -> Result<(), PayloadError> {
    if p.len() == want {
        Ok(())
    } else {
        Err(PayloadError::Length {
            kind,
            len: p.len(),
            want,
        })
    }
}

fn check_zero(kind: Kind, bytes: &[u8]) -> Result<(), PayloadError> {
    if bytes.iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(PayloadError::Reserved { kind })
    }
}

fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([p[at], p[at + 1]])
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

fn array32(p: &[u8], at: usize) -> [u8; 32] {
    let mut b = [0u8; 32];
    b.copy_from_slice(&p[at..at + 32]);
    b
}

/// Client → server, first frame of a lane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// This lane's index, `< lanes`.
    pub lane: u16,
    /// How many lanes the session has.
    pub lanes: u16,
    /// Session id, shared by all lanes of one session.
    pub session: u64,
    /// Fresh random nonce.
    pub client_nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// Encoded length.
    pub const LEN: usize = 48;

    /// Encodes the payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut p = [0u8; Self::LEN];
        p[0..2].copy_from_slice(&self.version.to_le_bytes());
        p[2..4].copy_from_slice(&self.lane.to_le_bytes());
        p[4..6].copy_from_slice(&self.lanes.to_le_bytes());
        p[8..16].copy_from_slice(&self.session.to_le_bytes());
        p[16..48].copy_from_slice(&self.client_nonce);
        p
    }

    /// The version field alone, readable whatever the rest of the layout (it is frozen at
    /// offset 0 across versions). `None` if the payload is shorter than 2 bytes.
    pub fn peek_version(p: &[u8]) -> Option<u16> {
        (p.len() >= 2).then(|| u16_at(p, 0))
    }

    /// Decodes a version-1 payload.
    pub fn decode(p: &[u8]) -> Result<Hello, PayloadError> {
        check_len(Kind::Hello, p, Self::LEN)?;
        check_zero(Kind::Hello, &p[6..8])?;
        Ok(Hello {
            version: u16_at(p, 0),
            lane: u16_at(p, 2),
            lanes: u16_at(p, 4),
            session: u64_at(p, 8),
            client_nonce: array32(p, 16),
        })
    }
}

/// Server → client: the server's nonce and its proof of holding the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The server's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Fresh random nonce.
    pub server_nonce: [u8; NONCE_LEN],
    /// `HMAC(key, "ferry-server" || client_nonce || server_nonce || session_le)`.
    pub server_proof: [u8; PROOF_LEN],
}

impl Challenge {
    /// Encoded length.
    pub const LEN: usize = 72;

    /// Encodes the payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut p = [0u8; Self::LEN];
        p[0..2].copy_from_slice(&self.version.to_le_bytes());
        p[8..40].copy_from_slice(&self.server_nonce);
        p[40..72].copy_from_slice(&self.server_proof);
        p
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Challenge, PayloadError> {
        check_len(Kind::Challenge, p, Self::LEN)?;
        check_zero(Kind::Challenge, &p[2..8])?;
        Ok(Challenge {
            version: u16_at(p, 0),
            server_nonce: array32(p, 8),
            server_proof: array32(p, 40),
        })
    }
}

/// Client → server: the client's proof of holding the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    /// `HMAC(key, "ferry-client" || server_nonce || client_nonce || session_le)`.
    pub client_proof: [u8; PROOF_LEN],
}

impl Proof {
    /// Encoded length.
    pub const LEN: usize = 32;

    /// Encodes the payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        self.client_proof
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Proof, PayloadError> {
        check_len(Kind::Proof, p, Self::LEN)?;
        Ok(Proof {
            client_proof: array32(p, 0),
        })
    }
}

/// Server → client: the lane is established; echoes what the server accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Session id.
    pub session: u64,
    /// Lane index.
    pub lane: u16,
    /// Lane count.
    pub lanes: u16,
}

impl Welcome {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encodes the payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut p = [0u8; Self::LEN];
        p[0..8].copy_from_slice(&self.session.to_le_bytes());
        p[8..10].copy_from_slice(&self.lane.to_le_bytes());
        p[10..12].copy_from_slice(&self.lanes.to_le_bytes());
        p
    }

    /// Decodes the payload.
    pub fn decode(p: &[u8]) -> Result<Welcome, PayloadError> {
        check_len(Kind::Welcome, p, Self::LEN)?;
        check_zero(Kind::Welcome, &p[12..16])?;
        Ok(Welcome {
            session: u64_at(p, 0),
            lane: u16_at(p, 8),
            lanes: u16_at(p, 10),
        })
    }
}

/// Why an Abort was sent. `0` is never valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum AbortReason {
    /// Application or operator request, or anything not covered below.
    Other = 1,
    /// The sender does not speak the peer's protocol version.
    Version = 2,
    /// A proof did not verify.
    Auth = 3,
    /// The peer broke the protocol (unexpected frame, bad payload).
    Protocol = 4,
}

impl AbortReason {
    fn from_u16(v: u16) -> Option<AbortReason> {
        Some(match v {
            1 => AbortReason::Other,
            2 => AbortReason::Version,
            3 => AbortReason::Auth,
            4 => AbortReason::Protocol,
            _ => return None,
        })
    }
}

/// Either direction: the sender is abandoning the lane or session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    /// Why.
    pub reason: AbortReason,
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Human-readable explanation.
    pub message: String,
}

impl Abort {
    /// Fixed part of the payload.
    pub const MIN_LEN: usize = 8;

    /// An Abort from this side, with our protocol version.
    pub fn new(reason: AbortReason, message: impl Into<String>) -> Abort {
        Abort {
            reason,
            version: PROTOCOL_VERSION,
            message: message.into(),
        }
    }

    /// Encodes the payload, cutting the message to [`MAX_ABORT_MESSAGE`] bytes at a
    /// character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(MAX_ABORT_MESSAGE);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let mut p = Vec::with_capacity(Self::MIN_LEN + end);
        p.extend_from_slice(&(self.reason as u16).to_le_bytes());
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&[0u8; 4]);
        p.extend_from_slice(&self.message.as_bytes()[..end]);
        p
    }

    /// Decodes the payload (invalid UTF-8 in the message is replaced, not rejected).
    pub fn decode(p: &[u8]) -> Result<Abort, PayloadError> {
        if p.len() < Self::MIN_LEN {
            return Err(PayloadError::Length {
                kind: Kind::Abort,
                len: p.len(),
                want: Self::MIN_LEN,
            });
        }
        let raw = u16_at(p, 0);
        let reason = AbortReason::from_u16(raw).ok_or(PayloadError::AbortReason(raw))?;
        check_zero(Kind::Abort, &p[4..8])?;
        let msg = &p[Self::MIN_LEN..];
        if msg.len() > MAX_ABORT_MESSAGE {
            return Err(PayloadError::AbortTooLong(msg.len()));
        }
        Ok(Abort {
            reason,
            version: u16_at(p, 2),
            message: String::from_utf8_lossy(msg).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
