//! Frame and payload codec tests, including property tests of the decoder.

use super::*;
use proptest::prelude::*;

fn frame(kind: Kind, tag: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    encode_frame(kind, tag, seq, payload).unwrap()
}

/// A reader that records how many bytes were asked of it.
struct Counting<'a> {
    data: &'a [u8],
    consumed: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.consumed += n;
        Ok(n)
    }
}

#[test]
fn header_layout_is_little_endian_at_documented_offsets() {
    let h = encode_header(Kind::Data, 0x0102, 0x0807_0605_0403_0201, b"abc").unwrap();
    assert_eq!(&h[0..4], b"FRRY");
    assert_eq!(&h[4..6], &[5, 0]);
    assert_eq!(&h[6..8], &[0x02, 0x01]);
    assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&h[16..20], &[3, 0, 0, 0]);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[..20]);
    hasher.update(b"abc");
    assert_eq!(
        u32::from_le_bytes(h[20..24].try_into().unwrap()),
        hasher.finalize()
    );
}

#[test]
fn round_trip_and_back_to_back_frames() {
    let mut bytes = frame(Kind::Data, 7, 42, b"hello");
    bytes.extend(frame(Kind::Ack, 0, 42, b""));
    let mut r = &bytes[..];
    let f = read_frame(&mut r).unwrap();
    assert_eq!(
        f,
        Frame {
            kind: Kind::Data,
            tag: 7,
            seq: 42,
            payload: b"hello".to_vec()
        }
    );
    let f = read_frame(&mut r).unwrap();
    assert_eq!((f.kind, f.seq, f.payload.len()), (Kind::Ack, 42, 0));
    assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
}

#[test]
fn rejects_bad_magic() {
    let mut b = frame(Kind::Data, 0, 1, b"x");
    b[0] = b'G';
    let err = read_frame(&mut &b[..]).unwrap_err();
    assert!(
        matches!(err, FrameError::BadMagic { found } if found != MAGIC),
        "{err}"
    );
}

#[test]
fn rejects_kind_zero_and_unknown_kinds() {
    for raw in [0u16, 8, 0xffff] {
        let mut b = frame(Kind::Data, 0, 1, b"");
        b[4..6].copy_from_slice(&raw.to_le_bytes());
        let err = read_frame(&mut &b[..]).unwrap_err();
        assert!(
            matches!(err, FrameError::UnknownKind { kind } if kind == raw),
            "{err}"
        );
    }
}

#[test]
fn rejects_oversized_length_before_reading_payload() {
    for len in [MAX_PAYLOAD + 1, u32::MAX] {
        let mut b = frame(Kind::Data, 0, 1, b"");
        b[16..20].copy_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&[0u8; 100]);
        let mut r = Counting {
            data: &b,
            consumed: 0,
        };
        let err = read_frame(&mut r).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { len: l } if l == u64::from(len)));
        assert_eq!(r.consumed, HEADER_LEN, "decoder read past the header");
    }
    // The limit itself is accepted by the header decoder.
    let mut b = frame(Kind::Data, 0, 1, b"");
    b[16..20].copy_from_slice(&MAX_PAYLOAD.to_le_bytes());
    assert!(Header::decode(&b[..24].try_into().unwrap()).is_ok());
    assert!(matches!(
        encode_header(Kind::Data, 0, 0, &vec![0u8; MAX_PAYLOAD as usize + 1]),
        Err(FrameError::TooLong { .. })
    ));
}

#[test]
fn distinguishes_clean_eof_from_truncated_header_and_payload() {
    assert!(matches!(read_frame(&mut &[][..]), Err(FrameError::Closed)));
    let b = frame(Kind::Data, 3, 9, b"0123456789");
    for cut in 1..HEADER_LEN {
        let err = read_frame(&mut &b[..cut]).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { part: "header", got, want: HEADER_LEN } if got == cut),
            "{err}"
        );
    }
    for cut in HEADER_LEN..b.len() {
        let err = read_frame(&mut &b[..cut]).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { part: "payload", got, want: 10 } if got == cut - HEADER_LEN),
            "{err}"
        );
    }
}

#[test]
fn rejects_any_flipped_bit_in_crc_covered_bytes() {
    let b = frame(Kind::Data, 3, 9, b"payload bytes");
    // Bytes that are not checked before the crc: tag, seq, crc itself, payload.
    let positions = (6..16).chain(20..b.len());
    for pos in positions {
        let mut c = b.clone();
        c[pos] ^= 0x10;
        let err = read_frame(&mut &c[..]).unwrap_err();
        assert!(matches!(err, FrameError::Crc { .. }), "byte {pos}: {err}");
    }
}

#[test]
fn io_errors_are_reported_as_io() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
    let err = read_frame(&mut Failing).unwrap_err();
    assert!(err.is_timeout(), "{err}");
}

#[test]
fn write_frame_matches_encode_frame() {
    let mut out = Vec::new();
    write_frame(&mut out, Kind::Data, 1, 2, b"xyz").unwrap();
    write_frame(&mut out, Kind::Ack, 0, 2, b"").unwrap();
    let mut want = frame(Kind::Data, 1, 2, b"xyz");
    want.extend(frame(Kind::Ack, 0, 2, b""));
    assert_eq!(out, want);
}

#[test]
fn handshake_payloads_round_trip_and_reject_bad_lengths_and_reserved() {
    let hello = Hello {
        version: 1,
        lane: 2,
        lanes: 3,
        session: 0xdead_beef,
        client_nonce: [7; 32],
    };
    let mut p = hello.encode();
    assert_eq!(Hello::decode(&p).unwrap(), hello);
    assert_eq!(Hello::peek_version(&p), Some(1));
    assert!(matches!(
        Hello::decode(&p[..47]),
        Err(PayloadError::Length { .. })
    ));
    p[7] = 1;
    assert!(matches!(
        Hello::decode(&p),
        Err(PayloadError::Reserved { .. })
    ));

    let ch = Challenge {
        version: 1,
        server_nonce: [1; 32],
        server_proof: [2; 32],
    };
    let mut p = ch.encode();
    assert_eq!(Challenge::decode(&p).unwrap(), ch);
    p[3] = 9;
    assert!(matches!(
        Challenge::decode(&p),
        Err(PayloadError::Reserved { .. })
    ));

    let pr = Proof {
        client_proof: [3; 32],
    };
    assert_eq!(Proof::decode(&pr.encode()).unwrap(), pr);
    assert!(Proof::decode(&[0; 33]).is_err());

    let w = Welcome {
        session: 5,
        lane: 1,
        lanes: 4,
    };
    assert_eq!(Welcome::decode(&w.encode()).unwrap(), w);
    assert!(Welcome::decode(&[0; 15]).is_err());
}

#[test]
fn abort_payload_round_trips_truncates_and_rejects_unknown_reason() {
    let a = Abort::new(AbortReason::Version, "protocol version 2 not supported");
    assert_eq!(Abort::decode(&a.encode()).unwrap(), a);
    let long = Abort::new(AbortReason::Other, "é".repeat(MAX_ABORT_MESSAGE));
    let enc = long.encode();
    assert!(enc.len() <= Abort::MIN_LEN + MAX_ABORT_MESSAGE);
    let dec = Abort::decode(&enc).unwrap();
    assert!(long.message.starts_with(&dec.message) && !dec.message.is_empty());
    let mut bad = a.encode();
    bad[0..2].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(Abort::decode(&bad), Err(PayloadError::AbortReason(0)));
    assert!(Abort::decode(&[1, 0, 1]).is_err());
    let mut huge = a.encode();
    huge.extend(std::iter::repeat_n(b'x', MAX_ABORT_MESSAGE + 1));
    assert!(matches!(
        Abort::decode(&huge),
        Err(PayloadError::AbortTooLong(_))
    ));
}

fn any_kind() -> impl Strategy<Value = Kind> {
    (1u16..=7).prop_map(|k| Kind::from_u16(k).unwrap())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut r = &bytes[..];
        // Decode until the input runs out or is rejected; must never panic.
        for _ in 0..16 {
            if read_frame(&mut r).is_err() { break; }
        }
    }

    #[test]
    fn valid_header_with_arbitrary_tail_never_panics(
        kind in 0u16..10, len in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..128)
    ) {
        let mut b = frame(Kind::Data, 0, 0, b"");
        b[4..6].copy_from_slice(&kind.to_le_bytes());
        b[16..20].copy_from_slice(&len.to_le_bytes());
        b.extend(tail);
        let _ = read_frame(&mut &b[..]);
    }

    #[test]
    fn encode_then_decode_round_trips(
        kind in any_kind(), tag in any::<u16>(), seq in any::<u64>(),
        payload in proptest::collection::vec(any::<u8>(), 0..4096)
    ) {
        let b = frame(kind, tag, seq, &payload);
        prop_assert_eq!(b.len(), HEADER_LEN + payload.len());
        let f = read_frame(&mut &b[..]).unwrap();
        prop_assert_eq!(f, Frame { kind, tag, seq, payload });
    }

    #[test]
    fn payload_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Hello::decode(&bytes);
        let _ = Hello::peek_version(&bytes);
        let _ = Challenge::decode(&bytes);
        let _ = Proof::decode(&bytes);
        let _ = Welcome::decode(&bytes);
        let _ = Abort::decode(&bytes);
    }
}
