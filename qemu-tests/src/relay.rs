//! A recording relay between a migration source (over a unix socket) and a destination
//! (unix socket or TCP): it accepts the source's connection, connects to the destination,
//! copies both directions and saves each to a file (the stream, and the return path).

use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
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
}

/// A connected destination socket of either kind.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
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

impl Relay {
    /// Listens on `listen`; on the first connection, connects to `dest` and relays,
    /// recording source-to-destination bytes in `stream` and the other direction in
    /// `return_path`. Gives up waiting for the connection at `deadline`.
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
            };
            let (src2, dst2) = (src.try_clone()?, dst.try_clone()?);
            let back = std::thread::spawn(move || pump(dst2, src2, &return_path));
            let forward = pump(src, dst, &stream)?;
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
