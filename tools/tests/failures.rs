//! Failure cases through the `ferry` binary, with real KVM, real processes and real TCP on
//! loopback (DESIGN: "Bad input ... gets a clear error and loses nothing: the VM keeps
//! running on the source"). Each test checks that the failing command exits non-zero and
//! that its message names the cause; where a source VM is involved, that it is still
//! running afterwards, its guest making progress with a clean self-check; where a
//! destination is involved, that it resumed nothing. Tests that run a VM need /dev/kvm and
//! root and fail loudly without them.
//!
//! Every process a test starts is owned by a [`Proc`], which kills and reaps it on every
//! path; sockets, keys and serial output live in a temporary directory.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_transport::handshake::version_message;
use ferry_transport::wire::{self, Abort, AbortReason, Hello, Kind};
use serde_json::Value;
use tempfile::TempDir;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Longest any single step (a process exiting, a line arriving) may take.
const STEP: Duration = Duration::from_secs(30);

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (KVM) and root; they do not skip"
    );
}

/// A child process, killed (SIGKILL, by PID) and reaped when dropped, on every path.
struct Proc {
    name: String,
    child: Child,
    stderr: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Already exited is fine: kill fails, wait reaps or returns the saved status.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `ferry ARGS` with stderr to a file in `dir` and stdout piped if `pipe_stdout`,
    /// else to a file as well.
    fn spawn(dir: &Path, name: &str, args: &[&str], pipe_stdout: bool) -> Proc {
        Self::spawn_limited(dir, name, args, pipe_stdout, None)
    }

    /// [`Proc::spawn`], the process's address space limited to `address_space` bytes
    /// (`RLIMIT_AS`) if given.
    fn spawn_limited(
        dir: &Path,
        name: &str,
        args: &[&str],
        pipe_stdout: bool,
        address_space: Option<u64>,
    ) -> Proc {
        let stderr = dir.join(format!("{name}.stderr"));
        let stdout = if pipe_stdout {
            Stdio::piped()
        } else {
            Stdio::from(File::create(dir.join(format!("{name}.stdout"))).expect("stdout file"))
        };
        let mut cmd = Command::new(FERRY);
        if let Some(bytes) = address_space {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting ferry {args:?}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit, at most `limit`; panics (and the drop kills it) if it
    /// does not.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("waiting for a child") {
                return st;
            }
            assert!(
                t.elapsed() < limit,
                "{} did not exit within {limit:?}; stderr:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics if the process has already exited.
    fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().expect("polling a child") {
            panic!(
                "{} exited early with {st}; stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
    }
}

/// The lines of a child's stdout, read by a thread, with a timeout per line. The thread
/// ends when the child's end of the pipe closes (the child exits or is killed).
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn new(out: ChildStdout) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    /// The next line, or `None` at EOF or after `limit`.
    fn next(&self, limit: Duration) -> Option<String> {
        self.0.recv_timeout(limit).ok()
    }

    /// Every line until EOF (waits at most `limit` in all).
    fn rest(&self, limit: Duration) -> Vec<String> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while let Some(l) = self.next(end.saturating_duration_since(Instant::now())) {
            out.push(l);
        }
        out
    }
}

/// A test's temporary directory and its shared key.
struct Env {
    dir: TempDir,
    key: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("temporary directory");
        let key = new_key(dir.path(), "key");
        Env { dir, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self) -> &str {
        self.key.to_str().expect("utf-8 path")
    }
}

/// Runs `ferry ARGS` to completion (at most [`STEP`]); returns status, stdout, stderr.
fn run(dir: &Path, name: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(dir, name, args, false);
    let st = p.wait(STEP);
    let out = std::fs::read_to_string(dir.join(format!("{name}.stdout"))).unwrap_or_default();
    (st, out, p.stderr())
}

/// `ferry key new DIR/NAME`.
fn new_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let (st, _, err) = run(
        dir,
        &format!("key-new-{name}"),
        &["key", "new", path.to_str().expect("utf-8 path")],
    );
    assert!(st.success(), "ferry key new failed: {err}");
    let mode = std::fs::metadata(&path)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "new key file has mode {mode:o}");
    path
}

/// A running `ferry vm run` and its control socket.
struct SourceVm {
    proc: Proc,
    control: PathBuf,
}

impl SourceVm {
    /// Starts a VM and waits until its control socket answers.
    fn start(env: &Env, guest: &[&str]) -> SourceVm {
        let control = env.path("control.sock");
        let serial = env.path("source-serial.txt");
        let mut args = vec![
            "vm",
            "run",
            "--control",
            control.to_str().expect("utf-8 path"),
            "--serial",
            serial.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(guest);
        let mut vm = SourceVm {
            proc: Proc::spawn(env.dir.path(), "vm", &args, false),
            control,
        };
        let t = Instant::now();
        while !vm.control.exists() {
            vm.proc.assert_alive();
            assert!(t.elapsed() < STEP, "the control socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = vm.status();
        assert_eq!(st["running"], true, "VM not running after start: {st}");
        vm
    }

    fn control(&self) -> &str {
        self.control.to_str().expect("utf-8 path")
    }

    /// `{"status":null}` on the control socket; returns the `status` object.
    fn status(&mut self) -> Value {
        self.proc.assert_alive();
        let mut conn = UnixStream::connect(&self.control).unwrap_or_else(|e| {
            panic!(
                "connecting to the control socket: {e}; VM stderr:\n{}",
                self.proc.stderr()
            )
        });
        conn.set_read_timeout(Some(STEP)).expect("read timeout");
        writeln!(conn, "{{\"status\":null}}").expect("writing the status request");
        let mut line = String::new();
        BufReader::new(&conn)
            .read_line(&mut line)
            .expect("reading the status reply");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "status reply {line:?} is not JSON ({e}); VM stderr:\n{}",
                self.proc.stderr()
            )
        });
        v["status"].clone()
    }

    /// The VM is still running here, its guest makes progress and its self-check is clean:
    /// two status queries 0.5 s apart.
    fn assert_keeps_running(&mut self, after: &str) {
        let a = self.status();
        std::thread::sleep(Duration::from_millis(500));
        let b = self.status();
        let ctx = || {
            format!(
                "after {after}: {a}\nthen {b}\nVM stderr:\n{}",
                self.proc.stderr()
            )
        };
        assert_eq!(a["running"], true, "VM not running {}", ctx());
        assert_eq!(b["running"], true, "VM not running {}", ctx());
        let (ga, gb) = (
            a["guest"].as_array().expect("guest array"),
            b["guest"].as_array().expect("guest array"),
        );
        assert!(!ga.is_empty() && ga.len() == gb.len(), "{}", ctx());
        for (va, vb) in ga.iter().zip(gb) {
            // An idle guest only checks its memory; the others write it too.
            let w = |v: &Value| {
                v["writes"].as_u64().expect("writes") + v["checks"].as_u64().expect("checks")
            };
            assert!(w(vb) > w(va), "guest stalled {}", ctx());
            assert_eq!(va["fails"], 0, "guest self-check failed {}", ctx());
            assert_eq!(vb["fails"], 0, "guest self-check failed {}", ctx());
        }
    }
}

/// A running `ferry listen --json` and the address it listens on.
struct Dest {
    proc: Proc,
    lines: Lines,
    addr: SocketAddr,
}

impl Dest {
    fn start(env: &Env, key: &str) -> Dest {
        Self::start_limited(env, key, None)
    }

    /// `ferry listen`, its address space limited to `address_space` bytes if given.
    fn start_limited(env: &Env, key: &str, address_space: Option<u64>) -> Dest {
        let serial = env.path("dest-serial.txt");
        let mut proc = Proc::spawn_limited(
            env.dir.path(),
            "listen",
            &[
                "listen",
                "--listen",
                "127.0.0.1:0",
                "--json",
                "--key",
                key,
                "--serial",
                serial.to_str().expect("utf-8 path"),
            ],
            true,
            address_space,
        );
        let lines = Lines::new(proc.child.stdout.take().expect("piped stdout"));
        let first = lines.next(STEP).unwrap_or_else(|| {
            panic!(
                "ferry listen printed no address; stderr:\n{}",
                proc.stderr()
            )
        });
        let v: Value = serde_json::from_str(&first).expect("first line is JSON");
        let addr = v["listening"]
            .as_str()
            .unwrap_or_else(|| panic!("first line {first:?} lacks \"listening\""))
            .parse()
            .expect("a socket address");
        Dest { proc, lines, addr }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Waits for `ferry listen` to exit; asserts it failed without resuming anything and
    /// returns its JSON result line and its stderr.
    fn expect_failure(mut self) -> (Value, String) {
        let st = self.proc.wait(STEP);
        let rest = self.lines.rest(Duration::from_secs(5));
        let err = self.proc.stderr();
        let ctx = format!("status {st}; stdout {rest:?}; stderr:\n{err}");
        assert!(!st.success(), "ferry listen succeeded: {ctx}");
        assert!(
            !err.contains("VM resumed"),
            "the destination resumed: {ctx}"
        );
        let last = rest
            .last()
            .unwrap_or_else(|| panic!("no JSON result: {ctx}"));
        let v: Value = serde_json::from_str(last).expect("result line is JSON");
        assert!(v.get("resumed").is_none(), "the destination resumed: {ctx}");
        assert!(v["error"].is_string(), "result has no error: {ctx}");
        (v, err)
    }
}

/// `ferry migrate` to completion; returns status and stderr.
fn migrate(env: &Env, vm: &SourceVm, to: &str, key: &str, extra: &[&str]) -> (ExitStatus, String) {
    let mut args = vec![
        "migrate",
        "--control",
        vm.control(),
        "--to",
        to,
        "--key",
        key,
    ];
    args.extend_from_slice(extra);
    let (st, _, err) = run(env.dir.path(), "migrate", &args);
    (st, err)
}

fn assert_mentions(text: &str, needles: &[&str], what: &str) {
    let lower = text.to_lowercase();
    assert!(
        needles.iter().all(|n| lower.contains(&n.to_lowercase())),
        "{what} should mention {needles:?}:\n{text}"
    );
}

/// A local port nothing listens on: bound, then closed.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    let a = l.local_addr().expect("local address");
    drop(l);
    a
}

fn hello(version: u16) -> Vec<u8> {
    let h = Hello {
        version,
        lane: 0,
        lanes: 1,
        session: 0x5eed,
        client_nonce: [7; 32],
    };
    wire::encode_frame(Kind::Hello, 0, 0, &h.encode()).expect("encoding Hello")
}

#[test]
fn unreachable_destination_leaves_the_vm_running() {
    require_kvm();
    let env = Env::new();
    let mut vm = SourceVm::start(&env, &["--mem", "64M", "--workload", "random"]);
    let to = closed_port().to_string();
    let t = Instant::now();
    let (st, err) = migrate(&env, &vm, &to, env.key(), &[]);
    assert!(!st.success(), "migrate to a closed port succeeded: {err}");
    assert_mentions(&err, &["connecting", &to], "migrate's error");
    assert_mentions(&err, &["keeps running on the source"], "migrate's error");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    vm.assert_keeps_running("an unreachable destination");
}

#[test]
fn wrong_key_fails_on_both_sides_and_leaves_the_vm_running() {
    require_kvm();
    let env = Env::new();
    let other = new_key(env.dir.path(), "other-key");
    let mut vm = SourceVm::start(&env, &["--mem", "64M", "--workload", "random"]);
    let dest = Dest::start(&env, env.key());
    let (st, err) = migrate(&env, &vm, &dest.addr(), other.to_str().unwrap(), &[]);
    assert!(!st.success(), "migrate with the wrong key succeeded: {err}");
    assert_mentions(&err, &["authentication", "key"], "migrate's error");
    let (res, listen_err) = dest.expect_failure();
    assert_mentions(&listen_err, &["authentication", "key"], "listen's error");
    assert_mentions(
        res["error"].as_str().unwrap(),
        &["authentication"],
        "listen's JSON",
    );
    vm.assert_keeps_running("a wrong key");
}

#[test]
fn bad_key_files_are_rejected_clearly() {
    require_kvm();
    let env = Env::new();
    let open = env.path("open-key");
    std::fs::copy(&env.key, &open).expect("copying the key");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let short = env.path("short-key");
    std::fs::write(&short, b"0123456789abcde").expect("writing a 15-byte key");
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let cases = [
        (open.to_str().unwrap(), &["mode 0644", "chmod 600"][..]),
        (short.to_str().unwrap(), &["15 bytes", "at least 16"][..]),
    ];

    for (key, needles) in cases {
        let (st, _, err) = run(
            env.dir.path(),
            "listen-bad-key",
            &["listen", "--listen", "127.0.0.1:0", "--key", key],
        );
        assert!(!st.success(), "listen accepted key {key}: {err}");
        assert_mentions(&err, needles, "listen's key error");
        assert_mentions(&err, &[key], "listen's key error");
    }

    // The source checks its key before connecting anywhere; the destination is a real
    // listener with the good key, which must see nothing.
    let mut vm = SourceVm::start(&env, &["--mem", "64M", "--workload", "random"]);
    let mut dest = Dest::start(&env, env.key());
    for (key, needles) in cases {
        let (st, err) = migrate(&env, &vm, &dest.addr(), key, &[]);
        assert!(!st.success(), "migrate accepted key {key}: {err}");
        assert_mentions(&err, needles, "migrate's key error");
        vm.assert_keeps_running(&format!("migrate with bad key {key}"));
    }
    dest.proc.assert_alive();
    assert!(
        dest.lines.next(Duration::from_millis(100)).is_none(),
        "the destination saw a connection"
    );
}

/// A protocol version this build does not speak.
const OTHER: u16 = ferry_transport::PROTOCOL_VERSION + 1;

#[test]
fn source_with_another_protocol_version_is_told_so() {
    let env = Env::new();
    let dest = Dest::start(&env, env.key());
    let mut s = TcpStream::connect(dest.addr).expect("connecting to ferry listen");
    s.set_read_timeout(Some(STEP)).expect("read timeout");
    s.write_all(&hello(OTHER)).expect("sending Hello");
    let f = wire::read_frame(&mut s).expect("a reply frame");
    assert_eq!(
        f.kind,
        Kind::Abort,
        "reply to a version-{OTHER} Hello: {f:?}"
    );
    let a = Abort::decode(&f.payload).expect("an Abort payload");
    assert_eq!(a.reason, AbortReason::Version, "{a:?}");
    assert_eq!(a.version, ferry_transport::PROTOCOL_VERSION, "{a:?}");
    assert_mentions(
        &a.message,
        &[&format!("protocol version {OTHER} not supported")],
        "the Abort",
    );
    let (res, err) = dest.expect_failure();
    assert_mentions(
        &err,
        &["protocol version mismatch", &format!("peer speaks {OTHER}")],
        "listen's error",
    );
    assert_mentions(
        res["error"].as_str().unwrap(),
        &["version"],
        "listen's JSON",
    );
}

#[test]
fn destination_with_another_protocol_version_leaves_the_vm_running() {
    require_kvm();
    let env = Env::new();
    let mut vm = SourceVm::start(&env, &["--mem", "64M", "--workload", "random"]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake destination");
    let addr = listener.local_addr().expect("local address");
    listener.set_nonblocking(true).expect("non-blocking accept");
    // The fake destination speaks another version: it reads the Hello and answers with an
    // Abort.
    let fake = std::thread::spawn(move || -> Result<u16, String> {
        let deadline = Instant::now() + STEP;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("nobody connected".into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(STEP)).map_err(|e| e.to_string())?;
        let f = wire::read_frame(&mut s).map_err(|e| format!("reading Hello: {e}"))?;
        if f.kind != Kind::Hello {
            return Err(format!("first frame is {:?}", f.kind));
        }
        let theirs = Hello::decode(&f.payload)
            .map_err(|e| e.to_string())?
            .version;
        let abort = Abort {
            reason: AbortReason::Version,
            version: OTHER,
            message: version_message(theirs, OTHER),
        };
        wire::write_frame(&mut s, Kind::Abort, 0, 0, &abort.encode()).map_err(|e| e.to_string())?;
        // Nothing may follow: the source gives up (EOF), it does not send a Proof.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the Abort", rest.len()));
        }
        Ok(theirs)
    });
    let (st, err) = migrate(&env, &vm, &addr.to_string(), env.key(), &[]);
    let theirs = fake.join().expect("fake destination thread");
    assert_eq!(theirs, Ok(ferry_transport::PROTOCOL_VERSION));
    assert!(
        !st.success(),
        "migrate to a version-{OTHER} peer succeeded: {err}"
    );
    assert_mentions(
        &err,
        &[
            "protocol version mismatch",
            &format!("this side speaks {}", ferry_transport::PROTOCOL_VERSION),
            &format!("peer speaks {OTHER}"),
        ],
        "migrate's error",
    );
    vm.assert_keeps_running("a version mismatch");
}

/// The destination dies in the live phase while the vCPUs are over-committed onto one core:
/// the VM keeps running on the source and every vCPU thread has its own affinity back.
#[test]
fn destination_killed_mid_migration_leaves_the_vm_running() {
    require_kvm();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cores >= 2,
        "over-commit needs 2 cores to be seen, have {cores}"
    );
    let env = Env::new();
    let mut vm = SourceVm::start(
        &env,
        &["--mem", "256M", "--vcpus", "2", "--workload", "dirty-all"],
    );
    // The vCPU threads start just after the control socket answers.
    let t = Instant::now();
    let before = loop {
        let a = vcpu_affinity(vm.proc.child.id());
        if a.len() == 2 || t.elapsed() > STEP {
            break a;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(before.len(), 2, "{before:?}");
    let mut dest = Dest::start(&env, env.key());
    let to = dest.addr();
    let mut mig = Proc::spawn(
        env.dir.path(),
        "migrate",
        &[
            "migrate",
            "--control",
            vm.control(),
            "--to",
            &to,
            "--key",
            env.key(),
            "--progress-json",
            "--overcommit",
            "1",
            "--overcommit-at",
            "0",
            "--max-bandwidth",
            "100M",
        ],
        true,
    );
    let events = Lines::new(mig.child.stdout.take().expect("piped stdout"));
    let t = Instant::now();
    let live = loop {
        let line = events
            .next(STEP.saturating_sub(t.elapsed()))
            .unwrap_or_else(|| {
                panic!(
                    "no live-phase progress event; migrate stderr:\n{}",
                    mig.stderr()
                )
            });
        let v: Value = serde_json::from_str(&line).expect("progress line is JSON");
        if v["progress"]["phase"] == "live" && v["progress"]["vcpu_cores"] == 1 {
            break v;
        }
    };
    let packed = vcpu_affinity(vm.proc.child.id());
    assert!(
        packed.iter().all(|(_, cpus)| !cpus.contains(['-', ','])),
        "over-committed vCPUs are not on one core: {packed:?}"
    );
    dest.proc.child.kill().expect("killing ferry listen");
    dest.proc.wait(STEP);
    let killed = Instant::now();
    let st = mig.wait(STEP);
    let err = mig.stderr();
    assert!(
        !st.success(),
        "migrate succeeded with its destination killed: {err}"
    );
    assert!(
        killed.elapsed() < STEP,
        "migrate took {:?} to notice",
        killed.elapsed()
    );
    assert_mentions(
        &err,
        &["migration failed", "keeps running on the source"],
        "migrate",
    );
    assert!(
        ["connection", "lane", "destination"]
            .iter()
            .any(|w| err.contains(w)),
        "migrate's error does not say the connection failed: {err}"
    );
    // It was killed in the live phase: nothing after it reports the migration done.
    let rest = events.rest(Duration::from_secs(5));
    assert!(
        rest.iter()
            .all(|l| !l.contains("\"done\"") && !l.contains("\"report\"")),
        "the migration completed after {live}: {rest:?}"
    );
    vm.assert_keeps_running("the destination was killed");
    assert_eq!(
        vcpu_affinity(vm.proc.child.id()),
        before,
        "vCPU affinity after the failure"
    );
}

/// A destination that cannot map the guest's memory (its address space limited to half of it,
/// as a host short of memory would refuse it) fails at Describe, before any page is sent, and
/// says why; the source rolls back.
#[test]
fn destination_without_memory_for_the_guest_leaves_the_vm_running() {
    require_kvm();
    let env = Env::new();
    let mut vm = SourceVm::start(&env, &["--mem", "256M", "--workload", "random"]);
    let dest = Dest::start_limited(&env, env.key(), Some(128 << 20));
    let (st, err) = migrate(&env, &vm, &dest.addr(), env.key(), &[]);
    assert!(!st.success(), "migrate succeeded: {err}");
    assert_mentions(
        &err,
        &[
            "the destination failed",
            "mapping",
            "cannot allocate memory",
        ],
        "migrate's error",
    );
    assert_mentions(&err, &["keeps running on the source"], "migrate's error");
    let (res, listen_err) = dest.expect_failure();
    assert_mentions(
        &listen_err,
        &["mapping", "cannot allocate memory"],
        "listen's error",
    );
    assert!(
        !listen_err.contains("panicked"),
        "ferry listen panicked: {listen_err}"
    );
    assert_mentions(
        res["error"].as_str().unwrap(),
        &["nothing was resumed"],
        "listen's JSON",
    );
    vm.assert_keeps_running("a destination without memory for the guest");
}

/// Runs a migration with `--inject-fault FAULT` against a real destination; returns the
/// destination's JSON result, its stderr and migrate's stderr, having checked both failed.
fn faulty_migration(
    env: &Env,
    vm: &mut SourceVm,
    fault: &str,
    extra: &[&str],
) -> (Value, String, String) {
    let dest = Dest::start(env, env.key());
    let args = [&["--inject-fault", fault], extra].concat();
    let (st, err) = migrate(env, vm, &dest.addr(), env.key(), &args);
    assert!(!st.success(), "migrate with fault {fault} succeeded: {err}");
    assert_mentions(&err, &["keeps running on the source"], "migrate's error");
    let (res, listen_err) = dest.expect_failure();
    vm.assert_keeps_running(&format!("fault {fault}"));
    (res, listen_err, err)
}

#[test]
fn bad_batches_are_rejected_by_the_destination() {
    require_kvm();
    let env = Env::new();
    let mut vm = SourceVm::start(&env, &["--mem", "64M", "--workload", "random"]);
    for (fault, needle) in [
        ("gpa-outside-memory", "outside guest memory"),
        ("truncated-batch", "truncated"),
    ] {
        let (res, listen_err, err) = faulty_migration(&env, &mut vm, fault, &[]);
        let why = res["error"].as_str().unwrap();
        assert_mentions(why, &["rejected a page batch", needle], "listen's JSON");
        assert_mentions(&listen_err, &[needle], "listen's stderr");
        // The source reports the destination's reason, not just a closed connection.
        assert_mentions(&err, &["the destination failed", needle], "migrate's error");
    }
}

/// Each vCPU thread's allowed CPUs (`/proc/PID/task/TID/status`), by thread name.
fn vcpu_affinity(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VM's threads") {
        let dir = task.expect("a thread").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let name = name.trim();
        if name
            .strip_prefix("vcpu")
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("")
                .trim()
                .to_owned();
            out.push((name.to_owned(), cpus));
        }
    }
    out.sort();
    out
}

/// A page corrupted in the stop-and-copy, and a page lost in the live phase (re-armed,
/// never sent; the guest is idle, so nothing sends it later): the source's digests come
/// from its memory, so either way they differ from the destination's, with `full` (the
/// source's terms read while the VM ran and the final pass hashed at the pause; the
/// destination's kept as it wrote pages) and with `reread` (both sides read all of memory).
#[test]
fn wrong_pages_fail_the_digest_comparison() {
    require_kvm();
    for (fault, workload) in [("corrupt-page", "random"), ("drop-page", "idle")] {
        let env = Env::new();
        let mut vm = SourceVm::start(&env, &["--mem", "64M", "--workload", workload]);
        for verify in ["full", "reread"] {
            let (res, _, err) = faulty_migration(&env, &mut vm, fault, &["--verify", verify]);
            assert_mentions(&err, &["differs", "rolled back"], "migrate's error");
            assert_mentions(
                res["error"].as_str().unwrap(),
                &["aborted", "source rolled back"],
                "listen's JSON",
            );
        }
    }
}

#[test]
fn garbage_on_the_listening_socket_is_rejected() {
    let env = Env::new();
    // 64 pseudo-random bytes (xorshift), then a well-formed Hello with a bad magic.
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let random: Vec<u8> = (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut bad_magic = hello(ferry_transport::PROTOCOL_VERSION);
    bad_magic[0..4].copy_from_slice(b"GRRY");

    for (what, bytes) in [("random bytes", random), ("bad magic", bad_magic)] {
        let dest = Dest::start(&env, env.key());
        let mut s = TcpStream::connect(dest.addr).expect("connecting to ferry listen");
        s.write_all(&bytes).expect("sending garbage");
        let (res, err) = dest.expect_failure();
        let why = res["error"].as_str().unwrap();
        assert_mentions(&err, &["bad magic", "is the peer a ferry endpoint"], what);
        assert_mentions(why, &["handshake", "bad magic"], what);
    }
}
