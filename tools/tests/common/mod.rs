//! Helpers shared by the integration tests that drive the `ferry` binary.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Fails loudly when KVM is not there: these tests never skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (KVM) and root; they do not skip"
    );
}

/// Kills and reaps a child process on every path.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most 20 s) until `ferry vm run` has opened its control socket.
pub fn wait_for_socket(sock: &Path) {
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "vm run did not open its control socket {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
