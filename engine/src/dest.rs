//! The destination side: receive a VM, write its pages, compare digests, resume it.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AwaitDescribe
//!     AwaitDescribe --> Receiving: Describe / build VM, reply Ready
//!     Receiving --> Receiving: Pages (validated, newest epoch wins) / Probe
//!     Receiving --> AwaitCommit: Switchover / restore state, reply Digests
//!     AwaitCommit --> [*]: Commit / resume VM, reply Resumed
//!     Receiving --> Failed: bad batch, unexpected message, Abort
//!     AwaitCommit --> Failed: Abort
//! ```
//! Every page record is validated (address, length, class) for the whole batch before any
//! byte of it is written; a bad batch writes nothing, is reported to the source as `Failed`
//! with the reason, and ends the migration here. The source then resumes its VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::{Incoming, SessionReceiver};

use crate::digest;
use crate::encode::{self, DecodeError};
use crate::memory::{MemoryError, PAGE_SHIFT, PAGE_SIZE};
use crate::proto::{self, Describe, Digests, ProtoError, Tag};
use crate::vm::{Serial, Vm, VmError, VmState};

/// Tuning of the destination side.
#[derive(Clone, Debug)]
pub struct DestConfig {
    /// Threads hashing at switchover (default: available cores).
    pub digest_threads: usize,
    /// Longest silence from the source before giving up (default 60 s).
    pub idle_timeout: Duration,
}

impl Default for DestConfig {
    fn default() -> Self {
        Self {
            digest_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why receiving a VM failed. Nothing was resumed here; the source keeps its VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("transport failed")]
    Transport(#[from] ferry_transport::Error),
    #[error("protocol error")]
    Proto(#[from] ProtoError),
    #[error("rejected a page batch (seq {seq})")]
    Batch {
        seq: u64,
        #[source]
        source: DecodeError,
    },
    #[error("the source aborted: {0}")]
    SourceAborted(String),
    #[error("VM operation failed")]
    Vm(#[from] VmError),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("malformed VM state")]
    State(#[source] bincode::Error),
}

/// What the destination measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DestReport {
    pub batches: u64,
    pub pages_written: u64,
    /// Records dropped because a newer epoch of the page had already arrived.
    pub stale_records: u64,
    pub hash_ms: f64,
}

/// The states of the receiver (see the module diagram).
enum State {
    AwaitDescribe,
    Receiving { vm: Vm, epochs: Vec<u32> },
    AwaitCommit { vm: Vm },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::AwaitDescribe => "before Describe",
            Self::Receiving { .. } => "while receiving pages",
            Self::AwaitCommit { .. } => "while awaiting Commit",
        }
    }
}

/// Receives one VM over `rx` and returns it running, with what was measured.
pub fn receive(
    rx: &SessionReceiver,
    serial: Arc<Serial>,
    cfg: &DestConfig,
) -> Result<(Vm, DestReport), ReceiveError> {
    let mut report = DestReport::default();
    let result = run(rx, serial, cfg, &mut report);
    if let Err(e) = &result {
        // Tell the source why, so it rolls back at once; it may already be gone.
        let _ = rx.reply(Tag::Failed as u16, error_chain(e).as_bytes());
    }
    result.map(|vm| (vm, report))
}

/// "outer: inner: innermost" for an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn run(
    rx: &SessionReceiver,
    serial: Arc<Serial>,
    cfg: &DestConfig,
    report: &mut DestReport,
) -> Result<Vm, ReceiveError> {
    let mut state = State::AwaitDescribe;
    let mut serial = Some(serial);
    loop {
        let msg: Incoming = rx.recv(cfg.idle_timeout)?;
        let tag = Tag::from_u16(msg.tag).ok_or(ProtoError::UnknownTag(msg.tag))?;
        state = match (state, tag) {
            (_, Tag::Abort) => {
                return Err(ReceiveError::SourceAborted(
                    String::from_utf8_lossy(&msg.payload).into(),
                ))
            }
            (State::AwaitDescribe, Tag::Describe) => {
                let d: Describe = proto::from_json("Describe", &msg.payload)?;
                let vm = Vm::new(
                    &d.layout,
                    d.vcpus,
                    serial.take().expect("Describe is accepted once"),
                )?;
                let epochs = vec![0u32; vm.memory().page_span() as usize];
                rx.ack(&msg)?;
                rx.reply(Tag::Ready as u16, &[])?;
                State::Receiving { vm, epochs }
            }
            (s @ State::Receiving { .. }, Tag::Probe) => {
                rx.ack(&msg)?;
                s
            }
            (State::Receiving { vm, mut epochs }, Tag::Pages) => {
                apply_batch(&vm, &mut epochs, &msg, report)?;
                rx.ack(&msg)?;
                State::Receiving { vm, epochs }
            }
            (State::Receiving { vm, .. }, Tag::Switchover) => {
                let (h, state_bytes) = proto::decode_switchover(&msg.payload)?;
                let st = VmState::from_bytes(state_bytes).map_err(ReceiveError::State)?;
                vm.restore_state(&st)?;
                rx.ack(&msg)?;
                let t = Instant::now();
                let digests = digest::digests(
                    vm.memory(),
                    h.verify,
                    h.digest_range,
                    h.salt,
                    cfg.digest_threads,
                )?;
                report.hash_ms = t.elapsed().as_secs_f64() * 1e3;
                rx.reply(
                    Tag::Digests as u16,
                    &proto::to_json(&Digests {
                        digests,
                        hash_ms: report.hash_ms,
                    }),
                )?;
                State::AwaitCommit { vm }
            }
            (State::AwaitCommit { mut vm }, Tag::Commit) => {
                rx.ack(&msg)?;
                vm.start()?;
                rx.reply(Tag::Resumed as u16, &[])?;
                return Ok(vm);
            }
            (s, tag) => {
                return Err(ProtoError::Unexpected {
                    tag,
                    state: s.name(),
                }
                .into())
            }
        };
    }
}

/// Validates a whole batch, then writes the records whose epoch is not older than what the
/// page already holds (DESIGN §4.1).
fn apply_batch(
    vm: &Vm,
    epochs: &mut [u32],
    msg: &Incoming,
    report: &mut DestReport,
) -> Result<(), ReceiveError> {
    let mem = vm.memory();
    let mut written = 0;
    let mut stale = 0;
    encode::decode_batch(
        &msg.payload,
        |gpa| mem.contains(gpa, PAGE_SIZE as u64),
        |gpa, epoch, page| {
            let slot = &mut epochs[(gpa >> PAGE_SHIFT) as usize];
            // Stored as epoch + 1 so that 0 means "nothing received yet".
            if epoch + 1 < *slot {
                stale += 1;
                return Ok(());
            }
            *slot = epoch + 1;
            written += 1;
            mem.write(gpa, page)
        },
    )
    .map_err(|source| ReceiveError::Batch {
        seq: msg.seq,
        source,
    })?;
    report.batches += 1;
    report.pages_written += written;
    report.stale_records += stale;
    Ok(())
}
