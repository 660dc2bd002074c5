//! Handshake tests: the sans-IO machines directly, and the drivers over in-memory streams.

use super::*;
use crate::lane::{mem_pair, MemStream};
use std::thread;

const INFO: LaneInfo = LaneInfo {
    session: 0x1234_5678_9abc,
    lane: 1,
    lanes: 3,
};
const T: Duration = Duration::from_secs(20);

fn key(b: u8) -> Key {
    Key::from_bytes(&[b; 32]).unwrap()
}

fn frame(out: &Out) -> Frame {
    Frame {
        kind: out.kind,
        tag: 0,
        seq: 0,
        payload: out.payload.clone(),
    }
}

/// Runs client (with `version`) against server over an in-memory pair.
fn run(ck: Key, sk: Key, version: u16) -> (Result<LaneInfo>, Result<LaneInfo>) {
    let (mut a, mut b): (MemStream, MemStream) = mem_pair().unwrap();
    let srv = thread::spawn(move || server(&mut b, &sk, T));
    let peer = a.peer_name();
    let (mut hs, hello) = ClientHandshake::with(&ck, INFO, peer.clone(), version, nonce());
    let c = drive(&mut a, &peer, T, Some(hello), |f| hs.on_frame(f));
    (c, srv.join().unwrap())
}

#[test]
fn sans_io_machines_agree_and_walk_their_states() {
    let k = key(1);
    let (mut c, hello) = ClientHandshake::new(&k, INFO, "server");
    let mut s = ServerHandshake::new(&k, "client");
    let Step::Send(challenge) = s.on_frame(&frame(&hello)) else {
        panic!("server did not answer Hello")
    };
    assert_eq!(s.state(), ServerState::AwaitProof);
    let Step::Send(proof) = c.on_frame(&frame(&challenge)) else {
        panic!("client did not answer Challenge")
    };
    assert_eq!(c.state(), ClientState::AwaitWelcome);
    let Step::Done(sinfo, Some(welcome)) = s.on_frame(&frame(&proof)) else {
        panic!("server did not accept Proof")
    };
    let Step::Done(cinfo, None) = c.on_frame(&frame(&welcome)) else {
        panic!("client did not accept Welcome")
    };
    assert_eq!((sinfo, cinfo), (INFO, INFO));
    assert_eq!(
        (c.state(), s.state()),
        (ClientState::Done, ServerState::Done)
    );
    // Nothing is valid after Done.
    assert!(matches!(
        s.on_frame(&frame(&proof)),
        Step::Fail(
            Error::Unexpected {
                state: "Done",
                kind: Kind::Proof,
                ..
            },
            _
        )
    ));
}

#[test]
fn replayed_proof_for_another_nonce_is_rejected() {
    let k = key(1);
    // Record a proof from one exchange...
    let (mut c, hello) = ClientHandshake::new(&k, INFO, "s");
    let mut s1 = ServerHandshake::with_nonce(&k, "c".into(), [1; 32]);
    let Step::Send(ch) = s1.on_frame(&frame(&hello)) else {
        panic!()
    };
    let Step::Send(proof) = c.on_frame(&frame(&ch)) else {
        panic!()
    };
    // ...and replay it to a server that chose another nonce.
    let mut s2 = ServerHandshake::with_nonce(&k, "c".into(), [2; 32]);
    assert!(matches!(s2.on_frame(&frame(&hello)), Step::Send(_)));
    let Step::Fail(err, Some(abort)) = s2.on_frame(&frame(&proof)) else {
        panic!()
    };
    assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
    assert_eq!(abort.kind, Kind::Abort);
}

#[test]
fn handshake_over_a_stream_succeeds() {
    let (c, s) = run(key(7), key(7), PROTOCOL_VERSION);
    assert_eq!(c.unwrap(), INFO);
    assert_eq!(s.unwrap(), INFO);
}

#[test]
fn wrong_key_fails_on_both_sides_as_auth_failure() {
    let (c, s) = run(key(1), key(2), PROTOCOL_VERSION);
    let c = c.unwrap_err();
    let s = s.unwrap_err();
    assert!(matches!(c, Error::AuthFailed { .. }), "client: {c}");
    assert!(c.to_string().contains("does not hold the same key"), "{c}");
    assert!(matches!(s, Error::AuthFailed { .. }), "server: {s}");
    assert!(s.to_string().contains("authentication"), "{s}");
}

/// A version this build does not speak.
const OTHER: u16 = PROTOCOL_VERSION + 1;

#[test]
fn version_mismatch_is_reported_on_both_sides() {
    let (c, s) = run(key(1), key(1), OTHER);
    match s.unwrap_err() {
        Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: OTHER,
        } => {}
        e => panic!("server: {e}"),
    }
    let c = c.unwrap_err();
    assert!(
        matches!(
            c,
            Error::VersionMismatch {
                ours: OTHER,
                theirs: PROTOCOL_VERSION
            }
        ),
        "client: {c}"
    );
    let msg = c.to_string();
    assert!(
        msg.contains(&format!("this side speaks {OTHER}"))
            && msg.contains(&format!("peer speaks {PROTOCOL_VERSION}")),
        "{msg}"
    );
}

#[test]
fn server_sends_the_documented_version_abort() {
    let k = key(1);
    let (_, mut hello) = ClientHandshake::with(&k, INFO, "s".into(), OTHER, [0; 32]);
    hello.payload.truncate(2); // a future Hello may have any layout after `version`
    let mut s = ServerHandshake::new(&k, "c");
    let Step::Fail(
        Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: OTHER,
        },
        Some(out),
    ) = s.on_frame(&frame(&hello))
    else {
        panic!("expected a version mismatch")
    };
    let abort = Abort::decode(&out.payload).unwrap();
    assert_eq!(abort.reason, AbortReason::Version);
    assert_eq!(
        abort.message,
        format!("protocol version {OTHER} not supported; this side speaks {PROTOCOL_VERSION}")
    );
}

#[test]
fn invalid_lane_numbers_are_rejected() {
    let k = key(1);
    for (lane, lanes) in [(0, 0), (3, 3), (9, 2)] {
        let info = LaneInfo {
            session: 1,
            lane,
            lanes,
        };
        let (_, hello) = ClientHandshake::new(&k, info, "s");
        let mut s = ServerHandshake::new(&k, "c");
        assert!(matches!(
            s.on_frame(&frame(&hello)),
            Step::Fail(Error::Rejected { .. }, Some(_))
        ));
    }
}

#[test]
fn client_turns_other_aborts_into_peer_aborted_with_the_message() {
    let k = key(1);
    let (mut c, _) = ClientHandshake::new(&k, INFO, "s");
    let abort = Out::abort(AbortReason::Other, "disk full on destination");
    match c.on_frame(&frame(&abort)) {
        Step::Fail(Error::PeerAborted(m), None) => assert_eq!(m, "disk full on destination"),
        s => panic!("{s:?}"),
    }
}

#[test]
fn silent_peer_times_out_instead_of_hanging() {
    let (mut a, _b) = mem_pair().unwrap();
    let k = key(1);
    let t0 = Instant::now();
    let err = client(&mut a, &k, INFO, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err}");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let (mut a, _b) = mem_pair().unwrap();
    let err = server(&mut a, &k, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err}");
}

#[test]
fn garbage_from_the_peer_is_a_clear_error() {
    let (mut a, mut b) = mem_pair().unwrap();
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let err = server(&mut a, &key(1), T).unwrap_err();
    let Error::HandshakeIo { source, .. } = &err else {
        panic!("{err}")
    };
    assert!(matches!(source, wire::FrameError::BadMagic { .. }), "{err}");
    assert!(crate::error::chain(&err).contains("bad magic"));
}

fn any_frame() -> impl proptest::strategy::Strategy<Value = Frame> {
    use proptest::prelude::*;
    (1u16..=7, proptest::collection::vec(any::<u8>(), 0..128)).prop_map(|(k, payload)| Frame {
        kind: Kind::from_u16(k).unwrap(),
        tag: 0,
        seq: 0,
        payload,
    })
}

proptest::proptest! {
    /// Arbitrary frame sequences never panic either machine, and never complete a
    /// handshake without the key (a forged Proof cannot match a fresh nonce).
    #[test]
    fn arbitrary_frames_never_panic_or_authenticate(
        frames in proptest::collection::vec(any_frame(), 1..6)
    ) {
        let k = key(3);
        let mut s = ServerHandshake::new(&k, "fuzz");
        let (mut c, _) = ClientHandshake::new(&k, INFO, "fuzz");
        for f in &frames {
            proptest::prop_assert!(!matches!(s.on_frame(f), Step::Done(..)));
            proptest::prop_assert!(!matches!(c.on_frame(f), Step::Done(..)));
        }
    }
}
