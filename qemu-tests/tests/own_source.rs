//! The project's own source (`postcopy-source`, `qemu_tests::own_source`) and the pattern
//! guest it migrates: the stream decodes to the RAM the pattern rules say, page requests
//! are served first, and a whole migration into `postcopy-dest` ends with SHUT(0) and that
//! RAM, byte for byte. No QEMU is needed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent::postcopy::State;
use agent::wire::return_path::RpMessage;
use agent::wire::vcpu::VcpuRecord;
use agent::wire::Parsed;
use qemu_tests::dest::{Dest, DestOptions};
use qemu_tests::own_source::{OwnSource, RunOptions, SourceReport, BLOCK};
use qemu_tests::pattern_guest::{
    self, build_pattern_guest, expected_page, first_data_page, run_guest_model, GuestResult, DATA_START, PAGE,
};

const MIB: u64 = 1 << 20;

fn source(mem_bytes: u64) -> OwnSource {
    let image =
        std::fs::read(build_pattern_guest().expect("build the pattern guest")).expect("read the image");
    OwnSource::new(mem_bytes, image).expect("a source")
}

/// Runs the source into one end of a socket pair and returns what came out of the other
/// end. `return_path` is written first, then that direction is closed.
fn capture(
    source: &OwnSource,
    return_path: &[u8],
    opts: &RunOptions,
) -> (qemu_tests::Result<SourceReport>, Vec<u8>) {
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    theirs.write_all(return_path).unwrap();
    theirs.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::scope(|s| {
        let sender = s.spawn(move || source.run(&mut ours, opts));
        let mut stream = Vec::new();
        theirs.read_to_end(&mut stream).unwrap();
        (sender.join().unwrap(), stream)
    })
}

fn rp(message: RpMessage<'_>) -> Vec<u8> {
    let mut out = [0u8; 300];
    let n = message.emit(&mut out).unwrap();
    out[..n].to_vec()
}

fn word(ram: &[u8], at: u64) -> u64 {
    u64::from_le_bytes(ram[at as usize..at as usize + 8].try_into().unwrap())
}

/// Checks decoded guest RAM on its own terms: the page tables map every 2 MiB of it to
/// itself, the image is at 0x10000, every data page is what the rules say, nothing else is
/// written, and the guest's algorithm finds no mismatch.
fn check_ram(source: &OwnSource, ram: &[u8]) {
    let mem = source.mem_bytes();
    assert_eq!(ram.len() as u64, mem);
    // Walk: CR3 0x1000 → PML4[0] → PDPT[0] → PD[i], 2 MiB pages.
    let pdpt = word(ram, 0x1000);
    assert_eq!(pdpt & 0x83, 0x03, "PML4[0] present, writable, not a large page");
    let pd = word(ram, pdpt & !0xFFF);
    assert_eq!(pd & 0x83, 0x03, "PDPT[0] present, writable, not a large page");
    let pd = pd & !0xFFF;
    for i in 0..512 {
        let entry = word(ram, pd + 8 * i);
        if i < mem / (2 * MIB) {
            assert_eq!(entry & 0x83, 0x83, "PD[{i}] present, writable, 2 MiB");
            assert_eq!(entry & 0x000F_FFFF_FFE0_0000, i * 2 * MIB, "PD[{i}] identity");
        } else {
            assert_eq!(entry, 0, "PD[{i}] beyond RAM");
        }
    }
    let image = source.image();
    assert_eq!(&ram[0x10000..0x10000 + image.len()], image, "the image at 0x10000");
    let tables_and_gdt = 0x1000..0x5000usize;
    for (i, &b) in ram[..DATA_START as usize].iter().enumerate() {
        if !tables_and_gdt.contains(&i) && !(0x10000..0x10000 + image.len()).contains(&i) {
            assert_eq!(b, 0, "byte {i:#x} below the data pages");
        }
    }
    for page in first_data_page()..mem / PAGE {
        let at = (page * PAGE) as usize;
        assert!(ram[at..at + PAGE as usize] == expected_page(page), "data page {page:#x}");
    }
    assert_eq!(ram, pattern_guest::expected_ram(mem, image).unwrap());
    let mut run = ram.to_vec();
    assert_eq!(run_guest_model(&mut run), GuestResult::expected(mem));
}

fn check_vcpu_record(source: &OwnSource, device_state: &[u8]) {
    let Ok(Parsed::Done(Some((index, record)), len)) = VcpuRecord::parse_section(device_state) else {
        panic!("device state is not one vCPU record: {device_state:02x?}");
    };
    assert_eq!((index, len), (0, device_state.len()));
    assert_eq!(record, source.vcpu_record());
    assert_eq!(record.rip.get(), pattern_guest::IMAGE_BASE);
    assert_eq!(record.cr3.get(), pattern_guest::PML4);
    assert_eq!(record.gprs[4].get(), pattern_guest::STACK_TOP, "RSP");
    assert_eq!(record.gprs[6].get(), DATA_START, "RSI");
    assert_eq!(record.gprs[7].get(), source.mem_bytes(), "RDI");
    assert_eq!(record.rflags.get() & (1 << 9), 0, "interrupts off");
    assert_eq!(record.efer.get() & 0x500, 0x500, "long mode");
}

#[test]
fn the_stream_decodes_to_the_pattern_ram_and_the_vcpu_record() {
    for mem in [2 * MIB, 4 * MIB] {
        let source = source(mem);
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("stream.bin");
        let opts = RunOptions { record: Some(record.clone()), ..RunOptions::default() };
        let (report, stream) = capture(&source, &[], &opts);
        let report = report.unwrap();
        eprintln!("{} MiB: {} stream bytes; {}", mem / MIB, stream.len(), report.to_json());
        assert_eq!(std::fs::read(&record).unwrap(), stream, "--record holds what was sent");
        assert_eq!(report.bytes_sent, stream.len() as u64);
        let pages = mem / PAGE;
        let discarded = (first_data_page()..pages).filter(|&p| pattern_guest::dirty(p)).count() as u64;
        assert_eq!(report.pages_precopy, pages);
        assert_eq!(report.discarded_pages, discarded);
        assert_eq!(report.postcopy_pages, discarded);
        assert_eq!((report.requests, report.requested_pages, report.pongs, report.shut), (0, 0, 0, None));

        // Through the agent, in a small ring that splits records everywhere.
        let outcome = agent::testing::run_stream(&stream, 8192, 3000);
        assert!(outcome.result.as_ref().is_ok_and(|p| p.finished), "{:?}", outcome.result);
        assert_eq!(outcome.state, State::End);
        assert_eq!(outcome.stats.discarded_pages, discarded);
        assert_eq!(outcome.stats.pages + outcome.stats.zero_pages, pages + discarded);
        let pongs: Vec<Vec<u8>> = (1..=4).map(|v| rp(RpMessage::Pong(v))).collect();
        assert_eq!(outcome.rp[..4], pongs[..]);
        assert_eq!(outcome.rp[4..], [rp(RpMessage::Shut(0))]);
        let block = outcome.ports.memory.block(BLOCK).expect("block ram");
        check_ram(&source, &block.bytes());
        check_vcpu_record(&source, &outcome.ports.device_state);
    }
}

/// Position of the postcopy record (named, so never a precopy one after the first) for
/// `page`.
fn postcopy_record_at(stream: &[u8], page: u64, zero: bool) -> Option<usize> {
    let flags = if zero { 0x02 } else { 0x08 };
    let mut needle = ((page * PAGE) | flags).to_be_bytes().to_vec();
    needle.push(BLOCK.len() as u8);
    needle.extend_from_slice(BLOCK);
    stream.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn requested_pages_go_first_and_stale_requests_are_ignored() {
    let source = source(2 * MIB);
    let discarded = source.discarded_pages();
    let (first, last) = (discarded[0], *discarded.last().unwrap());
    assert!(pattern_guest::patterned(first) && !pattern_guest::patterned(last));
    let mut requests = rp(RpMessage::ReqPagesId { start: last * PAGE, len: PAGE as u32, block: BLOCK });
    // The same page again (already sent by then), and a page never discarded.
    requests.extend(rp(RpMessage::ReqPages { start: last * PAGE, len: PAGE as u32 }));
    requests.extend(rp(RpMessage::ReqPages { start: 0x1000, len: PAGE as u32 }));
    // The requests are in the socket before the stream starts; the pause gives the
    // return-path thread time to hand them over, however loaded the machine is.
    let opts = RunOptions { background_pause: Duration::from_millis(2), ..RunOptions::default() };
    let (report, stream) = capture(&source, &requests, &opts);
    let report = report.unwrap();
    assert_eq!((report.requests, report.requested_pages, report.ignored_request_pages), (3, 1, 2));
    assert_eq!(report.postcopy_pages, discarded.len() as u64);
    // The last page in background order went out before the one the background sends
    // just before it.
    let before_last = discarded[discarded.len() - 2];
    let requested = postcopy_record_at(&stream, last, true).expect("the requested page");
    let zero = !pattern_guest::patterned(before_last);
    let background = postcopy_record_at(&stream, before_last, zero).expect("a background page");
    assert!(requested < background, "the requested page went out ahead of the background order");
    assert!(postcopy_record_at(&stream, first, false).is_some());
    let outcome = agent::testing::run_stream(&stream, 1 << 16, 1 << 16);
    assert!(outcome.result.as_ref().is_ok_and(|p| p.finished), "{:?}", outcome.result);
    check_ram(&source, &outcome.ports.memory.block(BLOCK).unwrap().bytes());
}

#[test]
fn malformed_requests_fail_the_migration() {
    let source = source(2 * MIB);
    let cases: [(&str, Vec<u8>); 4] = [
        ("no REQ_PAGES_ID first", rp(RpMessage::ReqPages { start: 0x100000, len: 4096 })),
        ("unknown block", rp(RpMessage::ReqPagesId { start: 0x100000, len: 4096, block: b"pc.ram" })),
        ("misaligned", rp(RpMessage::ReqPagesId { start: 0x100800, len: 4096, block: BLOCK })),
        ("outside the block", rp(RpMessage::ReqPagesId { start: 2 * MIB, len: 4096, block: BLOCK })),
    ];
    for (what, message) in cases {
        let (report, _) = capture(&source, &message, &RunOptions::default());
        assert!(report.is_err(), "{what}: {report:?}");
    }
}

#[test]
fn a_shut_from_the_destination_ends_the_run() {
    let source = source(2 * MIB);
    let (report, _) = capture(&source, &rp(RpMessage::Shut(1)), &RunOptions::default());
    assert_eq!(report.unwrap().shut, Some(1));
}

#[test]
fn a_destination_that_fails_is_reported_by_its_shut_not_as_a_send_error() {
    let source = source(4 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dest.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postcopy-dest"));
    // In the v5 dialect 7.2's POSTCOPY_ADVISE (3) is an unknown command: refused after
    // OPEN_RETURN_PATH, so with SHUT(1), while the source is still sending.
    cmd.arg("--listen").arg(format!("unix:{}", socket.display())).args(["--dialect", "v5"]);
    let mut dest = qemu_tests::process::ChildGuard::spawn("postcopy-dest", cmd, dir.path()).unwrap();
    while !socket.exists() {
        assert!(dest.try_status().unwrap().is_none(), "postcopy-dest exited: {}", dest.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut conn = connect(&socket);
    let report = source.run(&mut conn, &RunOptions::default()).unwrap();
    assert_eq!(report.shut, Some(1), "{report:?}");
    assert!(!dest.wait_or_kill(Duration::from_secs(30)).unwrap().success());
    assert!(dest.stderr().contains("CommandId"), "{}", dest.stderr());
}

/// Connects to a destination's socket (the socket file exists a moment before it listens).
fn connect(socket: &Path) -> UnixStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(conn) => return conn,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connect {}: {e}", socket.display()),
        }
    }
}

fn start_dest(dir: &Path) -> (Dest, std::path::PathBuf, std::path::PathBuf) {
    let socket = dir.join("dest.sock");
    let dump = dir.join("dump");
    let opts = DestOptions {
        listen: Some(format!("unix:{}", socket.display())),
        dump_dir: Some(dump.clone()),
        vcpus: Some(2),
        ..DestOptions::default()
    };
    (Dest::spawn(Path::new(env!("CARGO_BIN_EXE_postcopy-dest")), &opts).unwrap(), socket, dump)
}

#[test]
fn a_migration_into_postcopy_dest_serves_requests_and_ends_with_the_pattern_ram() {
    let source = source(2 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let (dest, socket, dump) = start_dest(dir.path());
    let mut conn = connect(&socket);
    let opts = RunOptions {
        background_pause: Duration::from_millis(5),
        timeout: Duration::from_secs(60),
        ..RunOptions::default()
    };
    let report = source.run(&mut conn, &opts).unwrap();
    drop(conn);
    let outcome = dest.wait(Duration::from_secs(60)).unwrap();
    let summary = outcome.expect_success().unwrap();
    eprintln!("source: {}\ndest: {summary:?}", report.to_json());
    assert_eq!(summary.state, "END");
    assert!(summary.page_requests > 0, "{summary:?}");
    assert_eq!(report.shut, Some(0));
    assert!(report.requests > 0 && report.requested_pages > 0, "{report:?}");
    assert_eq!(report.pongs, 4);
    assert_eq!(report.postcopy_pages, report.discarded_pages);
    assert_eq!(summary.bytes, report.bytes_sent);
    let ram = std::fs::read(dump.join("ram.bin")).unwrap();
    assert!(ram == source.ram(), "ram.bin differs from what the source served");
    check_ram(&source, &ram);
    check_vcpu_record(&source, &std::fs::read(dump.join("device-state.bin")).unwrap());
}

#[test]
fn the_postcopy_source_binary_migrates_into_postcopy_dest() {
    let image = build_pattern_guest().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (dest, socket, dump) = start_dest(dir.path());
    let record = dir.path().join("stream.bin");
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-source"))
        .arg("--connect")
        .arg(format!("unix:{}", socket.display()))
        .args(["--mem-mib", "4", "--background-pause-ms", "2", "--timeout-s", "60", "--guest"])
        .arg(&image)
        .arg("--record")
        .arg(&record)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}; stdout {stdout}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["shut"], 0);
    let summary = dest.wait(Duration::from_secs(60)).unwrap();
    let summary = summary.expect_success().unwrap();
    assert_eq!(summary.state, "END");
    assert_eq!(report["bytes_sent"].as_u64(), Some(std::fs::metadata(&record).unwrap().len()));
    let source = OwnSource::new(4 * MIB, std::fs::read(&image).unwrap()).unwrap();
    assert!(std::fs::read(dump.join("ram.bin")).unwrap() == source.ram());
}

/// The guest binary itself, run natively in a child process: its code and RAM at their
/// guest addresses (host paging stands in for its identity map), entered as the vCPU
/// record says. Without a hypervisor its hypercall faults (SIGILL, or SIGSEGV at the `hlt`
/// after it if the host's own hypervisor skipped it); the signal handler sends the
/// registers and the data pages back.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod native {
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

    use super::*;

    /// Where guest RAM is mapped from: the image, the stack and the data pages are above it.
    const MAP_FROM: u64 = pattern_guest::IMAGE_BASE;
    static PIPE: AtomicI32 = AtomicI32::new(-1);
    static MEM: AtomicU64 = AtomicU64::new(0);

    fn write_all(fd: i32, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // SAFETY: `bytes` is a live slice; write(2) is async-signal-safe.
            let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
            if n <= 0 {
                return;
            }
            bytes = &bytes[n as usize..];
        }
    }

    extern "C" fn on_fault(signo: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
        // SAFETY: the kernel passes the interrupted context of a SA_SIGINFO handler.
        let gregs = unsafe { &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        let reg = |r: libc::c_int| gregs[r as usize] as u64;
        let regs = [
            signo as u64,
            reg(libc::REG_RIP),
            reg(libc::REG_RAX),
            reg(libc::REG_RBX),
            reg(libc::REG_RCX),
            reg(libc::REG_RDX),
        ];
        let fd = PIPE.load(Ordering::Relaxed);
        let mut out = [0u8; 48];
        for (i, r) in regs.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&r.to_le_bytes());
        }
        write_all(fd, &out);
        let mem = MEM.load(Ordering::Relaxed);
        // SAFETY: the data pages are mapped (the child mapped MAP_FROM..mem) and the guest
        // is stopped in this handler.
        let data = unsafe {
            std::slice::from_raw_parts(DATA_START as usize as *const u8, (mem - DATA_START) as usize)
        };
        write_all(fd, data);
        // SAFETY: ends the child at once, without running any of the parent's exit code.
        unsafe { libc::_exit(0) };
    }

    /// In the forked child: only async-signal-safe calls from here on.
    fn child(ram: &[u8], write_fd: i32) -> ! {
        let mem = ram.len() as u64;
        PIPE.store(write_fd, Ordering::Relaxed);
        MEM.store(mem, Ordering::Relaxed);
        // SAFETY: maps fresh anonymous memory at an address nothing else uses (NOREPLACE
        // fails otherwise), copies guest RAM there, installs the fault handler on an
        // alternate stack, and jumps to the guest entry with the guest's stack; nothing
        // returns to Rust code of this process afterwards (the handler calls _exit).
        unsafe {
            libc::alarm(20);
            let len = (mem - MAP_FROM) as usize;
            let at = libc::mmap(
                MAP_FROM as usize as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            if at as usize != MAP_FROM as usize {
                libc::_exit(3);
            }
            std::ptr::copy_nonoverlapping(ram[MAP_FROM as usize..].as_ptr(), at.cast::<u8>(), len);
            static mut ALT_STACK: [u8; 64 << 10] = [0; 64 << 10];
            let stack = libc::stack_t {
                ss_sp: std::ptr::addr_of_mut!(ALT_STACK).cast(),
                ss_flags: 0,
                ss_size: 64 << 10,
            };
            if libc::sigaltstack(&stack, std::ptr::null_mut()) != 0 {
                libc::_exit(4);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            for signo in [libc::SIGILL, libc::SIGSEGV, libc::SIGBUS] {
                if libc::sigaction(signo, &action, std::ptr::null_mut()) != 0 {
                    libc::_exit(5);
                }
            }
            std::arch::asm!(
                "mov rsp, {stack}",
                "jmp {entry}",
                stack = in(reg) pattern_guest::STACK_TOP,
                entry = in(reg) pattern_guest::IMAGE_BASE,
                in("rdi") mem,
                in("rsi") DATA_START,
                options(noreturn),
            )
        }
    }

    #[test]
    fn the_pattern_guest_runs_natively_and_reports_the_expected_result() {
        let mem = 2 * MIB;
        let source = source(mem);
        let ram = source.ram();
        let vmmcall = source.image().windows(3).position(|w| w == [0x0f, 0x01, 0xd9]).expect("a VMMCALL")
            as u64
            + pattern_guest::IMAGE_BASE;
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills the two-element array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child makes only async-signal-safe calls (mmap, memcpy, sigaltstack,
        // sigaction, write, _exit) and never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: the child's copy of the read end; closing it cannot affect the parent.
            unsafe { libc::close(fds[0]) };
            child(&ram, fds[1]);
        }
        // SAFETY: the parent owns both ends; the write end is closed so that reading ends
        // when the child exits.
        let mut pipe = unsafe {
            libc::close(fds[1]);
            File::from_raw_fd(fds[0])
        };
        let mut out = Vec::new();
        pipe.read_to_end(&mut out).unwrap();
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
        assert_eq!(out.len() as u64, 48 + mem - DATA_START, "the handler's report");
        let reg = |i: usize| u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().unwrap());
        let (signo, rip) = (reg(0) as i32, reg(1));
        let result = GuestResult { checksum: reg(3), mismatches: reg(4), pages_written: reg(5) };
        eprintln!("signal {signo} at {rip:#x} (VMMCALL at {vmmcall:#x}), RAX {:#x}, {result:?}", reg(2));
        match (signo, rip) {
            (libc::SIGILL, r) if r == vmmcall => assert_eq!(reg(2), pattern_guest::RESULT_MAGIC),
            (libc::SIGSEGV, r) if r == vmmcall + 3 => {}
            other => panic!("the guest stopped elsewhere: signal and RIP {other:x?}"),
        }
        assert_eq!(result, GuestResult::expected(mem));
        let data = &out[48..];
        for page in first_data_page()..mem / PAGE {
            let at = ((page - first_data_page()) * PAGE) as usize;
            assert!(data[at..at + PAGE as usize] == pattern_guest::page_after_guest(page), "page {page:#x}");
        }
    }
}
