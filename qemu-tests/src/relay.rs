//! A recording relay between a migration source (over a unix socket) and a destination
//! (unix socket, TCP, or a guest's vsock port through vhost-device-vsock's hybrid socket):
//! it accepts the source's connection, connects to the destination, copies both directions
//! and saves each to a file (the stream, and the return path).
//!
//! With a vsock destination it is the *bridge* that stands in for QEMU migrating straight to
//! `vsock:CID:PORT` on a host with the kernel's vhost-vsock (see `docs/vsock.md`).

use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{bail, Result};

/// A relay waiting for, or carrying, one migration.
#[derive(Debug)]
pub struct Relay {
    handle: JoinHandle<Result<(u64, u64)>>,
}

/// Where the relay connects.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
    /// A guest's vsock `port`, through vhost-device-vsock's hybrid socket `uds`
    /// ([`crate::vsock::connect`], retried until the relay's deadline while the guest's
    /// driver is not up).
    Vsock {
        /// The daemon's `--uds-path`.
        uds: PathBuf,
        /// The guest's port (1234 for the image's migration stream).
        port: u32,
    },
}

/// A connected destination socket of either kind.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// A vsock stream through the daemon's hybrid socket: never half-closed (see
    /// [`Conn::shutdown_write`]).
    Vsock(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Vsock(s) => Conn::Vsock(s.try_clone()?),
        })
    }

    /// Tells the peer that no more bytes come (end of stream), keeping the other direction
    /// open. Not for vsock: vhost-device-vsock turns the host's half-close (a read of 0 on
    /// its side) into a full SHUTDOWN (receive and send) to the guest, which cuts the return
    /// path too, and the destination's last messages (SHUT, a final page request) can still
    /// be on their way after the source's last stream byte. A vsock destination finds the
    /// end from the stream's own framing (QEMU_VM_EOF) instead; the relay closes the vsock
    /// connection only when the return path is over (see [`Relay::start`]).
    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Vsock(_) => Ok(()),
        };
    }

    /// Closes both directions (wakes a thread blocked reading it).
    fn shutdown_both(&self) {
        let _ = match self {
            Conn::Unix(s) | Conn::Vsock(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) | Conn::Vsock(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) | Conn::Vsock(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) | Conn::Vsock(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

fn pump(mut from: Conn, mut to: Conn, record: &Path) -> Result<u64> {
    let mut file = BufWriter::new(std::fs::File::create(record)?);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e.into()),
        };
        file.write_all(&buf[..n])?;
        total += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    file.flush()?;
    to.shutdown_write();
    Ok(total)
}

/// After the stream's end on a vsock relay: waits until the return-path thread `back` has
/// ended (the destination closed) or the source has closed its socket entirely (POLLHUP on
/// `src`: a unix socket reports it only when both directions are shut, so a source that only
/// half-closed still gets its return path).
fn wait_return_path_over(src: &Conn, back: &JoinHandle<Result<u64>>) {
    let fd = match src {
        Conn::Unix(s) | Conn::Vsock(s) => s.as_raw_fd(),
        Conn::Tcp(s) => s.as_raw_fd(),
    };
    while !back.is_finished() {
        let mut pfd = libc::pollfd { fd, events: 0, revents: 0 };
        // SAFETY: poll(2) on one pollfd that lives on this stack frame for the call; `fd` is
        // open (owned by `src`, borrowed for the whole function). POLLHUP and POLLERR are
        // reported even with no events requested. The 20 ms timeout bounds how late the
        // return-path thread's end is noticed (it has no descriptor to wait on).
        let n = unsafe { libc::poll(&mut pfd, 1, 20) };
        if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return;
        }
    }
}

impl Relay {
    /// Listens on `listen`; on the first connection, connects to `dest` and relays,
    /// recording source-to-destination bytes in `stream` and the other direction in
    /// `return_path`. Gives up waiting for the connection at `deadline` (and, for
    /// [`Endpoint::Vsock`], for the guest to accept).
    ///
    /// It ends when both directions have: the stream when the source closes it, the return
    /// path when the destination closes it. With a vsock destination the stream's end is not
    /// passed on (no half-close, see [`Conn::shutdown_write`]); the relay then waits until the
    /// destination closes or the source has closed its socket entirely (nobody left to read
    /// the return path), and closes the vsock connection.
    pub fn start(
        listen: &Path,
        dest: Endpoint,
        stream: PathBuf,
        return_path: PathBuf,
        deadline: Instant,
    ) -> Result<Self> {
        let listener = UnixListener::bind(listen)?;
        let handle = std::thread::spawn(move || {
            listener.set_nonblocking(true)?;
            let src = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            bail!("relay: no connection from the source");
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            src.set_nonblocking(false)?;
            let src = Conn::Unix(src);
            let dst = match &dest {
                Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
                Endpoint::Tcp(a) => {
                    let s = TcpStream::connect(a)?;
                    s.set_nodelay(true)?;
                    Conn::Tcp(s)
                }
                Endpoint::Vsock { uds, port } => Conn::Vsock(crate::vsock::connect(uds, *port, deadline)?),
            };
            let (src2, dst2) = (src.try_clone()?, dst.try_clone()?);
            let vsock_end = match &dst {
                Conn::Vsock(_) => Some((src.try_clone()?, dst.try_clone()?)),
                _ => None,
            };
            let back = std::thread::spawn(move || pump(dst2, src2, &return_path));
            let forward = pump(src, dst, &stream);
            if let Some((src, dst)) = vsock_end {
                // Whatever ended the stream, end the return path too once nobody can take
                // it any more, else the return-path thread would read the vsock forever.
                if forward.is_ok() {
                    wait_return_path_over(&src, &back);
                }
                dst.shutdown_both();
            }
            let forward = forward?;
            let backward = match back.join() {
                Ok(r) => r?,
                Err(_) => bail!("relay: return-path thread panicked"),
            };
            Ok((forward, backward))
        });
        Ok(Relay { handle })
    }

    /// Waits for both directions to end; returns (stream bytes, return-path bytes).
    pub fn finish(self, timeout: Duration) -> Result<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        while !self.handle.is_finished() {
            if Instant::now() > deadline {
                bail!("relay: the connection did not close within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match self.handle.join() {
            Ok(r) => r,
            Err(_) => bail!("relay thread panicked"),
        }
    }
}

/// A migration's connections, one relay after another to the same destination, each recording
/// its stream: a postcopy recovery reconnects the source through a new one after each break.
#[derive(Debug)]
pub struct Relays {
    dir: PathBuf,
    dest: Endpoint,
    deadline: Instant,
    relays: Vec<Relay>,
    streams: Vec<PathBuf>,
}

impl Relays {
    /// No relay yet; their sockets and recordings go in `dir` (`relayN.sock`, `streamN.bin`,
    /// `rpN.bin`).
    pub fn new(dir: &Path, dest: Endpoint, deadline: Instant) -> Self {
        Relays { dir: dir.to_path_buf(), dest, deadline, relays: Vec::new(), streams: Vec::new() }
    }

    /// Starts the next relay; returns the socket the source migrates to.
    pub fn start_next(&mut self) -> Result<PathBuf> {
        let n = self.streams.len();
        let sock = self.dir.join(format!("relay{n}.sock"));
        let stream = self.dir.join(format!("stream{n}.bin"));
        let rp = self.dir.join(format!("rp{n}.bin"));
        self.relays.push(Relay::start(&sock, self.dest.clone(), stream.clone(), rp, self.deadline)?);
        self.streams.push(stream);
        Ok(sock)
    }

    /// The recorded streams, one per connection, in order.
    pub fn streams(&self) -> &[PathBuf] {
        &self.streams
    }

    /// Waits for every relay to end ([`Relay::finish`]), in order.
    pub fn finish(self, timeout: Duration) -> Vec<Result<(u64, u64)>> {
        self.relays.into_iter().map(|r| r.finish(timeout)).collect()
    }
}
