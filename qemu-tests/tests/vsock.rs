//! The host side of the image's virtio-vsock transport (`qemu_tests::vsock`) and the relay's
//! vsock endpoint (the bridge from a QEMU source's unix socket to the guest's port).
//!
//! Most tests run against a fake daemon: a unix listener that speaks the hybrid handshake
//! the way vhost-device-vsock 0.3.0 does (`CONNECT <port>\n` → `OK <port>\n`, or a close
//! when no guest listens, or silence while the guest has not taken the request), and where
//! it matters, closes both ways when the host half-closes (what the real daemon does).
//! `real_daemon_gives_qemu_the_vsock_device` runs the real daemon (installing it with cargo
//! if missing) with QEMU 7.2.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qemu_tests::process::ChildGuard;
use qemu_tests::qmp::Qmp;
use qemu_tests::relay::{Endpoint, Relay};
use qemu_tests::vsock::{self, Daemon};
use serde_json::Value;

/// A fake daemon's hybrid socket, served by `serve` on a thread.
struct Fake<T> {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> Fake<T> {
    fn start(serve: impl FnOnce(UnixListener) -> T + Send + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let handle = std::thread::spawn(move || serve(listener));
        Fake { _dir: dir, uds, handle }
    }

    fn join(self) -> T {
        self.handle.join().expect("the fake daemon panicked")
    }
}

/// Accepts one connection, with timeouts so that a fake waiting for something that never
/// comes fails its test instead of hanging it.
fn accept(listener: &UnixListener) -> UnixStream {
    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(FAKE_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(FAKE_TIMEOUT)).unwrap();
    s
}

const FAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads `CONNECT <port>\n` byte by byte (as the client must not send anything after it
/// before `OK`, nothing else may be there); returns the port.
fn read_connect(s: &mut UnixStream) -> u32 {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    line.strip_prefix("CONNECT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not CONNECT: {line:?}"))
}

/// Reads until end of file; returns the bytes.
fn read_to_end(s: &mut UnixStream) -> Vec<u8> {
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    all
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

#[test]
fn connect_retries_through_a_close_and_a_silence_and_keeps_the_first_payload_byte() {
    const ATTEMPT: Duration = Duration::from_millis(300);
    let fake = Fake::start(|listener| {
        // 1: no driver yet: the daemon accepts, reads the request and closes.
        let mut s = accept(&listener);
        let first = read_connect(&mut s);
        drop(s);
        // 2: the driver is up but the guest has not taken the request: no answer. The
        // client's attempt timeout must end it (it closes; we see end of file).
        let mut s = accept(&listener);
        let second = read_connect(&mut s);
        let held = Instant::now();
        let rest = read_to_end(&mut s);
        let silent_for = held.elapsed();
        assert!(rest.is_empty(), "the client sent {rest:?} before OK");
        // 3: the guest accepts and writes at once: OK and the first payload in one write.
        let mut s = accept(&listener);
        let third = read_connect(&mut s);
        s.write_all(b"OK 1234\nHELLO").unwrap();
        let mut ping = [0u8; 4];
        s.read_exact(&mut ping).unwrap();
        s.write_all(&ping).unwrap();
        ([first, second, third], silent_for)
    });
    let start = Instant::now();
    let mut s = vsock::connect_with(&fake.uds, 1234, start + Duration::from_secs(20), ATTEMPT).unwrap();
    let mut hello = [0u8; 5];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"HELLO", "a payload byte that came with OK was lost");
    s.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping");
    let (ports, silent_for) = fake.join();
    assert_eq!(ports, [1234; 3]);
    assert!(
        silent_for >= ATTEMPT - Duration::from_millis(20),
        "the silent attempt ended after {silent_for:?}"
    );
    assert!(silent_for < ATTEMPT * 5, "the silent attempt lasted {silent_for:?}");
    eprintln!("connected after 3 attempts in {:?}", start.elapsed());
}

#[test]
fn connect_gives_up_at_the_deadline_when_the_daemon_keeps_closing() {
    let fake = Fake::start(|listener| {
        let mut attempts = 0;
        loop {
            let mut s = accept(&listener);
            // Port 0 is the test's signal to stop.
            if read_connect(&mut s) == 0 {
                return attempts;
            }
            attempts += 1;
        }
    });
    let start = Instant::now();
    let deadline = start + Duration::from_millis(800);
    let err = vsock::connect(&fake.uds, 1234, deadline).unwrap_err().to_string();
    let took = start.elapsed();
    let mut stop = UnixStream::connect(&fake.uds).unwrap();
    stop.write_all(b"CONNECT 0\n").unwrap();
    let attempts = fake.join();
    assert!(err.contains("no `OK`") && err.contains("closed"), "{err}");
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(2), "gave up after {took:?}");
    // Paced (at most one attempt per 100 ms once warmed up), but retried.
    assert!((3..=30).contains(&attempts), "{attempts} attempts: {err}");
}

#[test]
fn connect_waits_for_a_daemon_that_is_not_there_yet() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let err =
        vsock::connect(&uds, 1234, Instant::now() + Duration::from_millis(300)).unwrap_err().to_string();
    assert!(err.contains("no `OK`") && err.contains("connect"), "{err}");
    // The daemon's socket appears while a client is retrying (as between two QEMU sessions,
    // when the daemon binds it again): the client gets through. The 100 ms only makes the
    // late start likely to fall after a failed attempt; the outcome does not depend on it.
    let waiter = {
        let uds = uds.clone();
        std::thread::spawn(move || vsock::connect(&uds, 77, Instant::now() + Duration::from_secs(10)))
    };
    std::thread::sleep(Duration::from_millis(100));
    let listener = UnixListener::bind(&uds).unwrap();
    let mut s = accept(&listener);
    let port = read_connect(&mut s);
    s.write_all(format!("OK {port}\n").as_bytes()).unwrap();
    assert_eq!(port, 77);
    let mut client = waiter.join().unwrap().unwrap();
    s.write_all(b"x").unwrap();
    let mut x = [0u8; 1];
    client.read_exact(&mut x).unwrap();
    assert_eq!(&x, b"x");
}

#[test]
fn connect_fails_at_once_on_an_answer_that_is_not_ok() {
    let fake = Fake::start(|listener| {
        let mut s = accept(&listener);
        read_connect(&mut s);
        s.write_all(b"ERR no such port\n").unwrap();
    });
    let start = Instant::now();
    let err = vsock::connect(&fake.uds, 1234, start + Duration::from_secs(10)).unwrap_err().to_string();
    fake.join();
    assert!(err.contains("not `OK <n>`") && err.contains("ERR no such port"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2), "retried a protocol error for {:?}", start.elapsed());
}

/// The image's sink as a fake: reads `be64 N` and N bytes, answers `be64 reply(N)`. Returns
/// N, the bytes received, whether any was zero, and what came after the reply.
fn fake_sink(reply: fn(u64) -> u64) -> Fake<(u64, u64, bool, Vec<u8>)> {
    Fake::start(move |listener| {
        let mut s = accept(&listener);
        let port = read_connect(&mut s);
        s.write_all(format!("OK {port}\n").as_bytes()).unwrap();
        let mut len = [0u8; 8];
        s.read_exact(&mut len).unwrap();
        let n = u64::from_be_bytes(len);
        let (mut got, mut zero) = (0u64, false);
        let mut buf = vec![0u8; 1 << 16];
        while got < n {
            let want = (n - got).min(buf.len() as u64) as usize;
            let k = s.read(&mut buf[..want]).unwrap();
            // End of file before N bytes: what the real daemon shows the guest when the host
            // shuts down early (and the reply could not go back).
            assert!(k > 0, "the host closed after {got} of {n} bytes");
            zero |= buf[..k].contains(&0);
            got += k as u64;
        }
        s.write_all(&reply(got).to_be_bytes()).unwrap();
        let after = read_to_end(&mut s);
        (n, got, zero, after)
    })
}

#[test]
fn sink_rate_sends_n_non_zero_bytes_and_times_the_reply() {
    let fake = fake_sink(|n| n);
    let bytes = 8 << 20;
    let rate = vsock::sink_rate(&fake.uds, vsock::SINK_PORT, bytes, Instant::now() + Duration::from_secs(30))
        .unwrap();
    let (n, got, zero, after) = fake.join();
    assert_eq!((n, got), (bytes, bytes));
    assert!(!zero, "the sink got zero bytes: the pattern must be non-zero");
    assert!(after.is_empty(), "bytes after the reply: {}", after.len());
    assert_eq!(rate.bytes, bytes);
    assert!(rate.seconds > 0.0 && rate.mb_per_s.is_finite() && rate.mb_per_s > 0.0, "{rate:?}");
    let expect = bytes as f64 / rate.seconds / 1e6;
    assert!((rate.mb_per_s - expect).abs() < 1e-9 * expect, "{rate:?}");
    eprintln!("fake sink: {rate:?}");
}

#[test]
fn sink_rate_refuses_a_wrong_count() {
    let fake = fake_sink(|n| n - 1);
    let err = vsock::sink_rate(&fake.uds, 1235, 100_000, Instant::now() + Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    fake.join();
    assert!(err.contains("counted 99999") && err.contains("100000"), "{err}");
}

#[test]
fn sink_rate_fails_rather_than_hangs_when_the_guest_never_replies_or_stops_reading() {
    // Never replies: reads everything, then holds the connection until the host gives up.
    let fake = Fake::start(|listener| {
        let mut s = accept(&listener);
        read_connect(&mut s);
        s.write_all(b"OK 1235\n").unwrap();
        read_to_end(&mut s).len()
    });
    let start = Instant::now();
    let err = vsock::sink_rate(&fake.uds, 1235, 1 << 20, start + Duration::from_millis(800))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no `be64 count` reply"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    assert_eq!(fake.join(), 8 + (1 << 20));

    // Stops reading after 64 KiB and closes: the host's writes fail.
    let fake = Fake::start(|listener| {
        let mut s = accept(&listener);
        read_connect(&mut s);
        s.write_all(b"OK 1235\n").unwrap();
        let mut some = vec![0u8; 64 << 10];
        s.read_exact(&mut some).unwrap();
    });
    let err = vsock::sink_rate(&fake.uds, 1235, 64 << 20, Instant::now() + Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    fake.join();
    assert!(err.contains("writing stopped after") || err.contains("reply"), "{err}");
}

/// What the fake vsock destination saw.
#[derive(Debug)]
struct DestSaw {
    stream: Vec<u8>,
    half_closed: bool,
    after_shut: Vec<u8>,
}

/// A fake destination behind the daemon: refuses the first connection (no listener yet),
/// then accepts; reads `len` stream bytes, sending `req` after the first 4 KiB; once the
/// source has ended its stream (`ended`), checks that no end of file comes through (the real
/// daemon would close both ways on a host half-close, so it emulates that: drop, no SHUT),
/// then sends `shut` and reads until the relay closes.
fn fake_dest(
    len: usize,
    req: &'static [u8],
    shut: &'static [u8],
    ended: mpsc::Receiver<()>,
) -> Fake<DestSaw> {
    Fake::start(move |listener| {
        let mut s = accept(&listener);
        assert_eq!(read_connect(&mut s), 1234);
        drop(s);
        let mut s = accept(&listener);
        assert_eq!(read_connect(&mut s), 1234);
        s.write_all(b"OK 1234\n").unwrap();
        let mut stream = vec![0u8; len];
        s.read_exact(&mut stream[..4096]).unwrap();
        s.write_all(req).unwrap();
        s.read_exact(&mut stream[4096..]).unwrap();
        ended.recv().unwrap();
        // A half-close would arrive within microseconds of the source's end; 300 ms without
        // one is the evidence there is none (an absence cannot be polled for).
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut one = [0u8; 1];
        match s.read(&mut one) {
            Ok(0) => return DestSaw { stream, half_closed: true, after_shut: Vec::new() },
            Ok(_) => panic!("a stream byte after the stream's end"),
            Err(e) => assert!(matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{e}"),
        }
        s.set_read_timeout(Some(FAKE_TIMEOUT)).unwrap();
        s.write_all(shut).unwrap();
        let after_shut = read_to_end(&mut s);
        DestSaw { stream, half_closed: false, after_shut }
    })
}

fn relay_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("relay.sock"), dir.join("stream.bin"), dir.join("return.bin"))
}

#[test]
fn relay_to_vsock_keeps_the_return_path_open_after_the_stream_ends() {
    const REQ: &[u8] = b"REQ_PAGES pc.ram 0x1000";
    const SHUT: &[u8] = b"SHUT 0";
    let len = 1 << 20;
    let (ended_tx, ended_rx) = mpsc::channel();
    let dest = fake_dest(len, REQ, SHUT, ended_rx);
    let dir = tempfile::tempdir().unwrap();
    let (listen, stream_file, return_file) = relay_files(dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    let relay = Relay::start(
        &listen,
        Endpoint::Vsock { uds: dest.uds.clone(), port: 1234 },
        stream_file.clone(),
        return_file.clone(),
        deadline,
    )
    .unwrap();

    // The source: the whole stream, then the end of it (a half-close, which ends the relay's
    // stream direction) while it still waits for the destination's last message, as QEMU's
    // source waits for SHUT on its return path.
    let data = pattern(len);
    let mut src = UnixStream::connect(&listen).unwrap();
    src.write_all(&data).unwrap();
    src.shutdown(Shutdown::Write).unwrap();
    ended_tx.send(()).unwrap();
    let mut back = vec![0u8; REQ.len() + SHUT.len()];
    src.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let got_back = src.read_exact(&mut back);
    // Gone, as QEMU closes its socket after SHUT: the relay must notice and close the vsock.
    drop(src);

    let saw = dest.join();
    assert!(
        !saw.half_closed,
        "the relay half-closed the vsock connection: through the daemon that kills the return path"
    );
    got_back.expect("the source did not get REQ and SHUT on its return path");
    let (forward, backward) = relay.finish(Duration::from_secs(10)).unwrap();
    assert!(saw.stream == data, "the destination got a different stream");
    assert!(saw.after_shut.is_empty(), "{} stream bytes after the end", saw.after_shut.len());
    assert_eq!(back, [REQ, SHUT].concat());
    assert_eq!((forward, backward), (len as u64, (REQ.len() + SHUT.len()) as u64));
    assert!(std::fs::read(&stream_file).unwrap() == data, "recorded stream differs");
    assert_eq!(std::fs::read(&return_file).unwrap(), [REQ, SHUT].concat());
}

#[test]
fn relay_to_vsock_ends_when_the_destination_closes_first() {
    let fake = Fake::start(|listener| {
        let mut s = accept(&listener);
        let port = read_connect(&mut s);
        s.write_all(format!("OK {port}\n").as_bytes()).unwrap();
        let mut stream = vec![0u8; 10_000];
        s.read_exact(&mut stream).unwrap();
        // The destination's last word, then it closes (e.g. it refused the stream).
        s.write_all(b"SHUT 1").unwrap();
        stream
    });
    let dir = tempfile::tempdir().unwrap();
    let (listen, stream_file, return_file) = relay_files(dir.path());
    let relay = Relay::start(
        &listen,
        Endpoint::Vsock { uds: fake.uds.clone(), port: 1234 },
        stream_file,
        return_file,
        Instant::now() + Duration::from_secs(20),
    )
    .unwrap();
    let data = pattern(10_000);
    let mut src = UnixStream::connect(&listen).unwrap();
    src.write_all(&data).unwrap();
    // The source keeps its socket open: the return path's end (passed on as a half-close
    // towards the source) is what tells it the destination has gone.
    src.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let back = read_to_end(&mut src);
    assert_eq!(back, b"SHUT 1");
    drop(src);
    let (forward, backward) = relay.finish(Duration::from_secs(10)).unwrap();
    assert_eq!(fake.join(), data);
    assert_eq!((forward, backward), (10_000, 6));
}

/// The QEMU 7.2 machine of the real test, with its QMP socket.
fn start_qemu(dir: &Path, daemon: &Daemon) -> (ChildGuard, Qmp) {
    const MIB: u64 = 256;
    let qemu = qemu_tests::install::qemu().unwrap();
    let qmp = dir.join("qmp.sock");
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-machine", "pc", "-m", &format!("{MIB}M"), "-S", "-display", "none"])
        .args(["-nodefaults", "-no-user-config"])
        .args(daemon.qemu_args(MIB))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    let mut child = ChildGuard::spawn("qemu", cmd, dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qmp.exists() {
        if let Some(status) = child.try_status().unwrap() {
            panic!("QEMU exited at start ({status}): {}", child.stderr_tail(2000));
        }
        assert!(Instant::now() < deadline, "QEMU did not create its QMP socket in 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let qmp = Qmp::connect(&qmp, Duration::from_secs(20)).unwrap();
    (child, qmp)
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn real_daemon_gives_qemu_the_vsock_device() {
    let started = Instant::now();
    let bin = vsock::ensure_daemon().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path()).unwrap();
    assert!(daemon.uds().exists(), "no hybrid socket at {}", daemon.uds().display());

    // No QEMU yet: the daemon accepts and closes at once, every time.
    let t = Instant::now();
    let err =
        vsock::connect_with(daemon.uds(), 1234, t + Duration::from_millis(300), Duration::from_millis(200))
            .unwrap_err()
            .to_string();
    assert!(err.contains("closed"), "without a QEMU: {err}");

    let (mut qemu, mut qmp) = start_qemu(dir.path(), &daemon);
    // The daemon took the machine: it removes its vhost-user socket while a QEMU is attached.
    wait_for("the daemon to take QEMU's connection", Duration::from_secs(10), || !daemon.socket().exists());

    let buses = qmp.execute("query-pci", Value::Null).unwrap();
    let bus0 = buses.as_array().unwrap().iter().find(|b| b["bus"] == 0).expect("no PCI bus 0");
    let found =
        bus0["devices"].as_array().unwrap().iter().find(|d| {
            d["id"]["vendor"].as_u64() == Some(0x1af4) && d["id"]["device"].as_u64() == Some(0x1053)
        });
    let dev = found.unwrap_or_else(|| panic!("no 1af4:1053 on bus 0: {bus0}"));
    eprintln!("vhost-user-vsock-pci: slot {} function {} ({})", dev["slot"], dev["function"], dev["qdev_id"]);

    // Paused (-S): no driver, so the daemon has no guest memory yet and closes again.
    let t = Instant::now();
    let err =
        vsock::connect_with(daemon.uds(), 1234, t + Duration::from_millis(300), Duration::from_millis(200))
            .unwrap_err()
            .to_string();
    assert!(err.contains("closed"), "QEMU paused: {err}");

    qmp.execute("quit", Value::Null).unwrap();
    let status = qemu.wait_or_kill(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "QEMU quit with {status}: {}", qemu.stderr_tail(2000));
    // Served one QEMU and ready for the next: the socket is back, the daemon still runs.
    wait_for("the daemon to listen again", Duration::from_secs(10), || daemon.socket().exists());
    assert!(daemon.running().unwrap(), "the daemon ended with QEMU: {}", daemon.stderr());
    daemon.stop(Duration::from_secs(10)).unwrap();
    eprintln!("{} with QEMU 7.2: {:?}", bin.display(), started.elapsed());
}
