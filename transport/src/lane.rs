//! Lanes: one authenticated byte stream carrying [frames](crate::wire).
//!
//! A lane is opened by the source with [`connect`] (TCP, optionally bound to a local
//! address so that lanes can be spread over NICs) and accepted by the destination with
//! [`Listener::accept`]; both run the [`handshake`] before returning.
//! After it, a lane carries Data, Ack and Abort frames with no further per-lane state;
//! sessions ([`SessionSender`](crate::SessionSender),
//! [`SessionReceiver`](crate::SessionReceiver)) bundle lanes.
//!
//! [`Lane`] is generic over its [`Stream`], so sessions can be tested in-process over
//! [`mem_pair`] (a Unix socket pair) with the same code as over TCP.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use crate::error::{Error, Result};
use crate::handshake::{self, LaneInfo, DEFAULT_HANDSHAKE_TIMEOUT};
use crate::key::Key;
use crate::wire::{self, Frame, Kind, MAX_PAYLOAD};

/// A byte stream a lane can run on: TCP, or [`MemStream`] in tests.
///
/// Lanes clone the stream (one handle per thread) and shut it down to wake blocked
/// readers and writers, so a stream must support both.
pub trait Stream: Read + Write + Send + Sync + 'static {
    /// Another handle to the same stream (`dup`).
    fn clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Sets (or, with `None`, clears) the read and write timeouts.
    fn set_io_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
    /// Shuts down both directions: blocked reads return EOF, writes fail.
    fn shutdown_both(&self) -> io::Result<()>;
    /// Describes the peer for error messages.
    fn peer_name(&self) -> String;
}

impl Stream for TcpStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn set_io_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }

    fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }

    fn peer_name(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "an unconnected TCP socket".into())
    }
}

/// One end of an in-process duplex stream made by [`mem_pair`].
#[derive(Debug)]
pub struct MemStream(UnixStream);

/// Two connected in-memory streams (a Unix socket pair), for tests and in-process use.
pub fn mem_pair() -> io::Result<(MemStream, MemStream)> {
    let (a, b) = UnixStream::pair()?;
    Ok((MemStream(a), MemStream(b)))
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Stream for MemStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.0.try_clone().map(MemStream)
    }

    fn set_io_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(read)?;
        self.0.set_write_timeout(write)
    }

    fn shutdown_both(&self) -> io::Result<()> {
        self.0.shutdown(Shutdown::Both)
    }

    fn peer_name(&self) -> String {
        format!("in-memory peer (fd {})", self.0.as_raw_fd())
    }
}

/// Socket settings for lanes. Defaults are documented per field.
#[derive(Clone, Debug)]
pub struct LaneConfig {
    /// Time allowed for the TCP connection to be established. Default 10 s.
    pub connect_timeout: Duration,
    /// Time allowed for the whole handshake. Default 10 s
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// Requested send and receive buffer size (`SO_SNDBUF`/`SO_RCVBUF`). Default 16 MiB.
    /// Applied only where the kernel allows that much (`net.core.wmem_max`/`rmem_max`):
    /// a fixed size turns off Linux's buffer autotuning, which beats a capped fixed size.
    /// `None` always leaves autotuning on.
    pub socket_buffer: Option<usize>,
    /// TCP keepalive: idle time before probing a silent peer; probes are then sent every
    /// third of this, three times. Default 10 s. `None` disables keepalive.
    pub keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: how long written data may stay unacknowledged by the peer's
    /// kernel before the connection is dropped (a dead host or cable). Default 30 s.
    pub user_timeout: Option<Duration>,
}

impl Default for LaneConfig {
    fn default() -> Self {
        LaneConfig {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            socket_buffer: Some(16 << 20),
            keepalive: Some(Duration::from_secs(10)),
            user_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// One authenticated stream of frames. See the [module docs](self).
#[derive(Debug)]
pub struct Lane<S: Stream = TcpStream> {
    stream: S,
    info: LaneInfo,
    peer: String,
}

impl<S: Stream> Lane<S> {
    /// Runs the client handshake on a connected stream.
    pub fn client(mut stream: S, key: &Key, info: LaneInfo, timeout: Duration) -> Result<Self> {
        let info = handshake::client(&mut stream, key, info, timeout)?;
        let peer = stream.peer_name();
        Ok(Lane { stream, info, peer })
    }

    /// Runs the server handshake on an accepted stream.
    pub fn server(mut stream: S, key: &Key, timeout: Duration) -> Result<Self> {
        let info = handshake::server(&mut stream, key, timeout)?;
        let peer = stream.peer_name();
        Ok(Lane { stream, info, peer })
    }

    /// This lane's index within its session.
    pub fn index(&self) -> u16 {
        self.info.lane
    }

    /// Session, index and lane count agreed in the handshake.
    pub fn info(&self) -> LaneInfo {
        self.info
    }

    /// The peer, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The underlying stream (e.g. to clone a handle and shut it down from a test).
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Sends one frame.
    pub fn send(&mut self, kind: Kind, tag: u16, seq: u64, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(Error::TooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        wire::write_frame(&mut self.stream, kind, tag, seq, payload).map_err(|source| Error::Send {
            lane: self.info.lane,
            source,
        })
    }

    /// Receives one frame (blocking).
    pub fn recv(&mut self) -> Result<Frame> {
        wire::read_frame(&mut self.stream).map_err(|source| Error::Recv {
            lane: self.info.lane,
            source,
        })
    }

    /// Shuts the stream down in both directions.
    pub fn shutdown(&self) -> Result<()> {
        self.stream
            .shutdown_both()
            .map_err(|source| self.socket_err("shutting down", source))
    }

    pub(crate) fn into_parts(self) -> (S, LaneInfo) {
        (self.stream, self.info)
    }

    fn socket_err(&self, op: &'static str, source: io::Error) -> Error {
        Error::Socket {
            op,
            peer: self.peer.clone(),
            source,
        }
    }
}

/// Opens a lane to `remote`, binding the local end to `local` first if given, then runs
/// the client handshake announcing `info`.
pub fn connect(
    local: Option<SocketAddr>,
    remote: SocketAddr,
    key: &Key,
    info: LaneInfo,
    config: &LaneConfig,
) -> Result<Lane<TcpStream>> {
    if let Some(l) = local {
        if l.is_ipv4() != remote.is_ipv4() {
            return Err(Error::Config(format!(
                "local address {l} and remote address {remote} are of different IP families"
            )));
        }
    }
    let peer = remote.to_string();
    let socket = Socket::new(
        Domain::for_address(remote),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(|source| Error::Connect {
        remote,
        local,
        source,
    })?;
    tune(&socket, config, &peer)?;
    if let Some(l) = local {
        socket
            .bind(&l.into())
            .map_err(|source| Error::Bind { addr: l, source })?;
    }
    socket
        .connect_timeout(&remote.into(), config.connect_timeout)
        .map_err(|source| Error::Connect {
            remote,
            local,
            source,
        })?;
    Lane::client(TcpStream::from(socket), key, info, config.handshake_timeout)
}

/// Applies [`LaneConfig`] to a socket (before connect/listen, so buffer sizes take
/// effect for the window negotiation).
fn tune(socket: &Socket, config: &LaneConfig, peer: &str) -> Result<()> {
    let err = |op: &'static str| {
        move |source| Error::Socket {
            op,
            peer: peer.to_string(),
            source,
        }
    };
    socket
        .set_tcp_nodelay(true)
        .map_err(err("setting TCP_NODELAY"))?;
    if let Some(size) = config.socket_buffer {
        if size <= kernel_max("wmem_max") {
            socket
                .set_send_buffer_size(size)
                .map_err(err("setting SO_SNDBUF"))?;
        }
        if size <= kernel_max("rmem_max") {
            socket
                .set_recv_buffer_size(size)
                .map_err(err("setting SO_RCVBUF"))?;
        }
    }
    if let Some(idle) = config.keepalive {
        let ka = TcpKeepalive::new()
            .with_time(idle)
            .with_interval((idle / 3).max(Duration::from_secs(1)))
            .with_retries(3);
        socket
            .set_tcp_keepalive(&ka)
            .map_err(err("setting TCP keepalive"))?;
    }
    if let Some(t) = config.user_timeout {
        socket
            .set_tcp_user_timeout(Some(t))
            .map_err(err("setting TCP_USER_TIMEOUT"))?;
    }
    Ok(())
}

/// `net.core.{wmem,rmem}_max`, or "no limit" if it cannot be read.
fn kernel_max(name: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(usize::MAX)
}

/// Accepts and authenticates lanes.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    addr: SocketAddr,
    config: LaneConfig,
}

impl Listener {
    /// Listens on `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr))
    /// with the default [`LaneConfig`].
    pub fn bind(addr: SocketAddr) -> Result<Listener> {
        Self::bind_with(addr, LaneConfig::default())
    }

    /// Listens on `addr`; accepted lanes use `config` (socket options, handshake timeout).
    pub fn bind_with(addr: SocketAddr, config: LaneConfig) -> Result<Listener> {
        let bind_err = |source| Error::Bind { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        // Accepted sockets inherit the buffer sizes set here.
        tune(&socket, &config, "(listener)")?;
        socket.bind(&addr.into()).map_err(bind_err)?;
        socket.listen(128).map_err(bind_err)?;
        let inner = TcpListener::from(socket);
        let addr = inner.local_addr().map_err(bind_err)?;
        Ok(Listener {
            inner,
            addr,
            config,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for a connection and runs the server handshake on it.
    ///
    /// A connection that fails the handshake is an error (the caller decides whether to
    /// keep accepting); it is never returned as a lane.
    pub fn accept(&self, key: &Key) -> Result<Lane<TcpStream>> {
        let (stream, _) = self.inner.accept().map_err(|source| Error::Accept {
            addr: self.addr,
            source,
        })?;
        self.authenticate(stream, key)
    }

    /// Like [`accept`](Self::accept), but gives up with [`Error::AcceptTimeout`] if no
    /// connection arrives within `timeout`.
    pub fn accept_timeout(&self, key: &Key, timeout: Duration) -> Result<Lane<TcpStream>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: self.inner.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one initialised pollfd that lives across the call, and
            // nfds = 1 matches it; the fd is owned by `self.inner` and stays open.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            match n {
                0 => {
                    return Err(Error::AcceptTimeout {
                        addr: self.addr,
                        after: timeout,
                    })
                }
                n if n > 0 => return self.accept(key),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(Error::Accept {
                            addr: self.addr,
                            source: e,
                        });
                    }
                }
            }
        }
    }

    fn authenticate(&self, stream: TcpStream, key: &Key) -> Result<Lane<TcpStream>> {
        let peer = stream.peer_name();
        // Options not inherited from the listening socket on every kernel.
        let sock = socket2::SockRef::from(&stream);
        sock.set_tcp_nodelay(true).map_err(|source| Error::Socket {
            op: "setting TCP_NODELAY",
            peer: peer.clone(),
            source,
        })?;
        Lane::server(stream, key, self.config.handshake_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const T: Duration = Duration::from_secs(20);

    fn key() -> Key {
        Key::from_bytes(&[5; 32]).unwrap()
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn tcp_lane_connects_authenticates_and_carries_frames() {
        let listener = Listener::bind(loopback()).unwrap();
        let addr = listener.local_addr();
        assert_ne!(addr.port(), 0);
        let srv = thread::spawn(move || {
            let mut lane = listener.accept(&key()).unwrap();
            let f = lane.recv().unwrap();
            lane.send(Kind::Ack, 0, f.seq, &[]).unwrap();
            (lane.info(), f)
        });
        let info = LaneInfo {
            session: 99,
            lane: 0,
            lanes: 1,
        };
        let local = Some("127.0.0.1:0".parse().unwrap());
        let mut lane = connect(local, addr, &key(), info, &LaneConfig::default()).unwrap();
        assert_eq!(lane.index(), 0);
        assert_eq!(
            lane.stream().read_timeout().unwrap(),
            None,
            "handshake timeout cleared"
        );
        assert_eq!(lane.stream().write_timeout().unwrap(), None);
        lane.send(Kind::Data, 3, 17, b"payload").unwrap();
        let ack = lane.recv().unwrap();
        assert_eq!((ack.kind, ack.seq), (Kind::Ack, 17));
        let (sinfo, f) = srv.join().unwrap();
        assert_eq!(sinfo, info);
        assert_eq!(
            (f.kind, f.tag, f.seq, &f.payload[..]),
            (Kind::Data, 3, 17, &b"payload"[..])
        );
        assert!(lane
            .send(Kind::Data, 0, 1, &vec![0; MAX_PAYLOAD as usize + 1])
            .is_err());
    }

    #[test]
    fn wrong_key_over_tcp_delivers_nothing() {
        let listener = Listener::bind(loopback()).unwrap();
        let addr = listener.local_addr();
        let srv = thread::spawn(move || listener.accept(&key()).map(|_| ()));
        let other = Key::from_bytes(&[6; 32]).unwrap();
        let info = LaneInfo {
            session: 1,
            lane: 0,
            lanes: 1,
        };
        let c = connect(None, addr, &other, info, &LaneConfig::default()).unwrap_err();
        assert!(matches!(c, Error::AuthFailed { .. }), "{c}");
        let s = srv.join().unwrap().unwrap_err();
        assert!(matches!(s, Error::AuthFailed { .. }), "{s}");
    }

    #[test]
    fn connect_to_a_closed_port_fails_quickly_naming_the_address() {
        let addr = {
            let l = TcpListener::bind(loopback()).unwrap();
            l.local_addr().unwrap()
        };
        let info = LaneInfo {
            session: 1,
            lane: 0,
            lanes: 1,
        };
        let t0 = Instant::now();
        let err = connect(None, addr, &key(), info, &LaneConfig::default()).unwrap_err();
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t0.elapsed()
        );
        let Error::Connect { remote, source, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(*remote, addr);
        assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn mismatched_ip_families_are_rejected_before_any_syscall() {
        let info = LaneInfo {
            session: 1,
            lane: 0,
            lanes: 1,
        };
        let err = connect(
            Some("[::1]:0".parse().unwrap()),
            "127.0.0.1:9".parse().unwrap(),
            &key(),
            info,
            &LaneConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }

    #[test]
    fn accept_timeout_gives_up() {
        let listener = Listener::bind(loopback()).unwrap();
        let err = listener
            .accept_timeout(&key(), Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, Error::AcceptTimeout { .. }), "{err}");
    }

    #[test]
    fn mem_lanes_work_like_tcp_lanes() {
        let (a, b) = mem_pair().unwrap();
        let info = LaneInfo {
            session: 5,
            lane: 2,
            lanes: 4,
        };
        let srv = thread::spawn(move || Lane::server(b, &key(), T));
        let mut c = Lane::client(a, &key(), info, T).unwrap();
        let mut s = srv.join().unwrap().unwrap();
        assert_eq!(s.info(), info);
        c.send(Kind::Data, 1, 2, b"x").unwrap();
        assert_eq!(s.recv().unwrap().payload, b"x");
        c.shutdown().unwrap();
        let err = s.recv().unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Recv {
                    lane: 2,
                    source: wire::FrameError::Closed
                }
            ),
            "{err}"
        );
    }
}
