//! The Bochs harness (`qemu_tests::bochs`) with a multiboot kernel of its own: an echo kernel
//! assembled here (a flat image with the multiboot a.out kludge, so no linker is needed)
//! boots from a GRUB ISO under the Intel VMX (`corei7_skylake_x`) and AMD SVM (`ryzen`) CPU
//! models; its debug console, COM1 both ways, and reads of the machine's memory through
//! Bochs' debugger (running, and halted) are checked, and COM1's throughput is measured.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qemu_tests::bochs::{self, Bochs, Config, Display};

/// Where GRUB loads the echo kernel (its a.out kludge's load address).
const LOAD: u32 = 0x10_0000;
/// What the echo kernel's one-way commands move.
const ONE_WAY: usize = 64 * 1024;

/// A few x86 instructions, 32-bit protected mode, with labels for short jumps and absolute
/// addresses (the code runs at [`LOAD`]).
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    rel8: Vec<(usize, &'static str)>,
    rel32: Vec<(usize, &'static str)>,
    abs32: Vec<(usize, &'static str)>,
}

impl Asm {
    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn label(&mut self, name: &'static str) -> &mut Self {
        assert!(self.labels.insert(name, self.code.len()).is_none(), "label {name} twice");
        self
    }

    /// A short jump: `opcode` EB (jmp), 74 (jz) or 75 (jnz), to `name`.
    fn jump(&mut self, opcode: u8, name: &'static str) -> &mut Self {
        self.code.push(opcode);
        self.rel8.push((self.code.len(), name));
        self.code.push(0);
        self
    }

    /// A near jump (`jmp rel32`) to `name`.
    fn jump_near(&mut self, name: &'static str) -> &mut Self {
        self.code.push(0xE9);
        self.rel32.push((self.code.len(), name));
        self.emit(&[0; 4])
    }

    /// `mov dx, port`
    fn mov_dx(&mut self, port: u16) -> &mut Self {
        let [lo, hi] = port.to_le_bytes();
        self.emit(&[0x66, 0xBA, lo, hi])
    }

    /// `mov dx, port; mov al, value; out dx, al`
    fn out(&mut self, port: u16, value: u8) -> &mut Self {
        self.mov_dx(port).emit(&[0xB0, value, 0xEE])
    }

    /// Polls COM1's line status until `bit` is set (01: a byte is there, 20: room to send):
    /// `mov dx, 0x3fd; in al, dx; test al, bit; jz` back to the `in`.
    fn wait_lsr(&mut self, bit: u8) -> &mut Self {
        self.mov_dx(0x3FD).emit(&[0xEC, 0xA8, bit, 0x74, 0xFB])
    }

    /// The next byte from COM1 into AL.
    fn getc(&mut self) -> &mut Self {
        self.wait_lsr(0x01).mov_dx(0x3F8).emit(&[0xEC])
    }

    /// Sends BL on COM1 (`mov al, bl; out dx, al`).
    fn putc_bl(&mut self) -> &mut Self {
        self.wait_lsr(0x20).mov_dx(0x3F8).emit(&[0x88, 0xD8, 0xEE])
    }

    /// Writes the `len` bytes at `name` to `port`: `mov esi, addr; mov ecx, len; rep outsb`.
    fn print(&mut self, port: u16, name: &'static str, len: u32) -> &mut Self {
        self.mov_dx(port).emit(&[0xBE]);
        self.abs32.push((self.code.len(), name));
        self.emit(&[0; 4]).emit(&[0xB9]).emit(&len.to_le_bytes()).emit(&[0xF3, 0x6E])
    }

    fn finish(mut self) -> Vec<u8> {
        for (at, name) in &self.rel8 {
            let target = self.labels[name] as isize - (*at as isize + 1);
            let rel = i8::try_from(target).unwrap_or_else(|_| panic!("jump to {name} too far: {target}"));
            self.code[*at] = rel as u8;
        }
        for (at, name) in &self.rel32 {
            let target = self.labels[name] as i32 - (*at as i32 + 4);
            self.code[*at..*at + 4].copy_from_slice(&target.to_le_bytes());
        }
        for (at, name) in &self.abs32 {
            let addr = LOAD + self.labels[name] as u32;
            self.code[*at..*at + 4].copy_from_slice(&addr.to_le_bytes());
        }
        self.code
    }
}

/// The echo kernel: entered by GRUB in 32-bit protected mode with paging off; uses no stack
/// and no interrupts. It sets COM1 up (115200 baud 8N1, FIFOs on), writes `HELLO\n` on the
/// debug console (port 0xE9), then echoes every byte from COM1 back on COM1, except that
/// 0xFF escapes the byte after it:
/// * `FF 00`: "Shutdown" to port 0x8900 (Bochs ends);
/// * `FF 01`: sends [`ONE_WAY`] bytes, the `i`-th being `i as u8` (guest to host);
/// * `FF 02`: reads [`ONE_WAY`] bytes, then sends `K` (host to guest);
/// * `FF 03`: `HALT\n` on the debug console, then `cli; hlt` for good;
/// * `FF xx` otherwise: echoes `xx` (so `FF FF` echoes one 0xFF).
fn echo_kernel() -> Vec<u8> {
    let mut a = Asm::default();
    // Multiboot header with the a.out kludge (flags bit 16): header at LOAD, the whole file
    // loaded at LOAD, no bss, entry right after the 32-byte header.
    let (magic, flags) = (0x1BAD_B002u32, 1u32 << 16);
    let checksum = 0u32.wrapping_sub(magic.wrapping_add(flags));
    for word in [magic, flags, checksum, LOAD, LOAD, 0, 0, LOAD + 32] {
        a.emit(&word.to_le_bytes());
    }
    a.emit(&[0xFA, 0xFC]); // cli; cld
                           // COM1: no interrupts, DLAB, divisor 1, 8N1, FIFOs on and cleared, DTR and RTS.
    for (port, value) in
        [(0x3F9, 0), (0x3FB, 0x80), (0x3F8, 1), (0x3F9, 0), (0x3FB, 3), (0x3FA, 0xC7), (0x3FC, 3)]
    {
        a.out(port, value);
    }
    a.print(0xE9, "hello", 6);
    a.label("loop").getc();
    a.emit(&[0x3C, 0xFF]).jump(0x75, "put"); // cmp al, 0xff; jne put
    a.getc();
    for (value, target) in [(0, "shutdown"), (1, "burst"), (2, "sink"), (3, "halt")] {
        a.emit(&[0x3C, value]).jump(0x74, target); // cmp al, value; je target
    }
    a.label("put").emit(&[0x88, 0xC3]).putc_bl().jump(0xEB, "loop"); // mov bl, al
    a.label("shutdown").print(0x8900, "shutdown_word", 8);
    a.label("stay").emit(&[0xF4]).jump(0xEB, "stay"); // hlt
    a.label("halt").print(0xE9, "halted", 5);
    a.label("halt_here").emit(&[0xFA, 0xF4]).jump(0xEB, "halt_here"); // cli; hlt
                                                                      // ecx counts; `inc ecx; cmp ecx, ONE_WAY`.
    let count = [[0x41, 0x81, 0xF9].as_slice(), &(ONE_WAY as u32).to_le_bytes()].concat();
    a.label("burst").emit(&[0x31, 0xC9]); // xor ecx, ecx
    a.label("burst_next").emit(&[0x88, 0xCB]).putc_bl(); // mov bl, cl
    a.emit(&count).jump(0x75, "burst_next").jump_near("loop");
    a.label("sink").emit(&[0x31, 0xC9]);
    a.label("sink_next").getc().emit(&count).jump(0x75, "sink_next");
    a.emit(&[0xB0, b'K']).jump_near("put"); // mov al, 'K'
    a.label("hello").emit(b"HELLO\n");
    a.label("halted").emit(b"HALT\n");
    a.label("shutdown_word").emit(b"Shutdown");
    a.finish()
}

/// One Bochs at a time: two cores here, and the timings should mean something.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The echo kernel and its ISO.
fn echo_iso() -> (Vec<u8>, PathBuf) {
    let kernel = echo_kernel();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo-kernel.bin");
    std::fs::write(&path, &kernel).unwrap();
    let iso = bochs::iso(&path, "echo test").unwrap();
    (kernel, iso)
}

/// Starts Bochs with the echo kernel, connects COM1 and waits for `HELLO`; returns the
/// machine, COM1, the time from the connection (Bochs waits for it to run the BIOS) to
/// `HELLO` and the time from the start of Bochs to `HELLO`.
fn boot(config: &Config, iso: &std::path::Path) -> (Bochs, TcpStream, Duration, Duration) {
    bochs::ensure_bochs().unwrap();
    let started = Instant::now();
    let mut m = Bochs::start_with(iso, config).unwrap();
    let com1 = m.connect_com1(Duration::from_secs(10)).unwrap();
    let connected = Instant::now();
    m.wait_for("HELLO\n", connected + Duration::from_secs(30)).unwrap();
    (m, com1, connected.elapsed(), started.elapsed())
}

/// Reads `n` bytes, or what came until `timeout`.
fn read_n(com1: &TcpStream, n: usize, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut got = vec![0; n];
    let mut have = 0;
    let mut com1 = com1;
    while have < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        com1.set_read_timeout(Some(left)).unwrap();
        match com1.read(&mut got[have..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => have += k,
        }
    }
    got.truncate(have);
    got
}

/// Sends `data` (0xFF escaped) while reading the echo; what came back and the time taken.
fn echo(com1: &TcpStream, data: &[u8], timeout: Duration) -> (Vec<u8>, Duration) {
    let escaped: Vec<u8> =
        data.iter().flat_map(|&b| if b == 0xFF { vec![0xFF, 0xFF] } else { vec![b] }).collect();
    let mut writer = com1.try_clone().unwrap();
    let start = Instant::now();
    let sender = std::thread::spawn(move || writer.write_all(&escaped));
    let back = read_n(com1, data.len(), timeout);
    let took = start.elapsed();
    sender.join().unwrap().unwrap();
    (back, took)
}

/// Bytes that cover every value, 0xFF included, in no simple order (xorshift).
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 97 == 0 {
                0xFF
            } else {
                (x >> 24) as u8
            }
        })
        .collect()
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!("{what}: {} bytes of {}, first difference at {first}", got.len(), want.len());
    }
}

enum End {
    /// `cli; hlt`, then read memory from the halted machine and quit.
    Halt,
    /// "Shutdown" on port 0x8900.
    Shutdown,
}

fn echo_run(config: Config, end: End) {
    let _one = one_at_a_time();
    let cpu_model = &config.cpu_model;
    let (kernel, iso) = echo_iso();
    let (mut m, mut com1, boot, total) = boot(&config, &iso);
    eprintln!("{cpu_model}: HELLO {boot:.2?} after COM1 connected, {total:.2?} after Bochs started");
    match config.display {
        Display::Rfb => assert!((5900..=5949).contains(&m.rfb_port().unwrap()), "{:?}", m.rfb_port()),
        Display::Term => assert_eq!(m.rfb_port(), None),
    }

    let data = pattern(16 * 1024);
    let (back, took) = echo(&com1, &data, Duration::from_secs(40));
    assert_same(&back, &data, "16 KiB echoed on COM1");
    eprintln!("{cpu_model}: 16 KiB echoed in {took:.2?}");

    // The machine's memory while it runs: the kernel where GRUB loaded it, by `writemem`
    // (paging is off) and by `xp`.
    let t = Instant::now();
    assert_same(&m.read_phys(u64::from(LOAD), kernel.len()).unwrap(), &kernel, "read_phys of the kernel");
    eprintln!("{cpu_model}: read_phys of {} bytes in {:.2?}", kernel.len(), t.elapsed());
    assert_same(&m.read_phys_xp(u64::from(LOAD), 64).unwrap(), &kernel[..64], "xp of the kernel");
    assert!(!m.is_stopped());
    // ... and it runs on after the reads.
    let (back, _) = echo(&com1, b"still running", Duration::from_secs(10));
    assert_same(&back, b"still running", "echo after read_phys");

    match end {
        End::Halt => {
            com1.write_all(&[0xFF, 3]).unwrap();
            m.wait_for("HALT\n", Instant::now() + Duration::from_secs(10)).unwrap();
            let mem = m.read_phys(u64::from(LOAD), 64).unwrap();
            assert_same(&mem, &kernel[..64], "read_phys of a halted machine");
            let console = m.quit();
            assert_eq!(console, "HELLO\nHALT\n", "the console without the debugger's output");
        }
        End::Shutdown => {
            com1.write_all(&[0xFF, 0]).unwrap();
            let message = m.wait_exit(Instant::now() + Duration::from_secs(10)).unwrap();
            assert!(message.contains("Shutdown port: shutdown requested"), "{message}");
            assert_eq!(m.console(), "HELLO\n", "the console without the debugger's output");
            assert!(m.read_phys(u64::from(LOAD), 4).is_err(), "no memory after the end");
        }
    }
}

#[test]
fn the_echo_kernel_boots_and_echoes_under_the_intel_vmx_cpu_model() {
    echo_run(Config::new(bochs::INTEL_VMX, 32), End::Halt);
}

#[test]
fn the_echo_kernel_boots_and_echoes_under_the_amd_svm_cpu_model() {
    // The term display here, rfb for the Intel model.
    echo_run(Config { display: Display::Term, ..Config::new(bochs::AMD_SVM, 32) }, End::Shutdown);
}

#[test]
fn a_term_display_bochs_runs_beside_an_rfb_one() {
    let _one = one_at_a_time();
    let (_, iso) = echo_iso();
    let (rfb, rfb_com1, _, _) = boot(&Config::new(bochs::INTEL_VMX, 32), &iso);
    let term = Config { display: Display::Term, ..Config::new(bochs::INTEL_VMX, 32) };
    let (term, term_com1, _, _) = boot(&term, &iso);
    for com1 in [&rfb_com1, &term_com1] {
        let (back, _) = echo(com1, b"two at once", Duration::from_secs(10));
        assert_same(&back, b"two at once", "echo");
    }
    assert_eq!(term.quit(), "HELLO\n");
    assert_eq!(rfb.quit(), "HELLO\n");
}

#[test]
fn a_second_rfb_bochs_waits_until_the_first_has_quit() {
    let _one = one_at_a_time();
    let (_, iso) = echo_iso();
    let (first, _com1, _, _) = boot(&Config::new(bochs::INTEL_VMX, 32), &iso);
    let second = {
        let iso = iso.clone();
        // Bochs dies with the thread that started it: this one boots and quits its own.
        std::thread::spawn(move || {
            let (second, _com1, _, total) = boot(&Config::new(bochs::AMD_SVM, 32), &iso);
            (second.quit(), total)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(first.quit(), "HELLO\n");
    let (console, total) = second.join().unwrap();
    assert_eq!(console, "HELLO\n");
    assert!(total >= Duration::from_secs(2), "the second started after the first quit: {total:?}");
}

#[test]
fn com1_carries_64_kib_each_way_at_bochs_serial_speed() {
    let _one = one_at_a_time();
    let (_, iso) = echo_iso();
    let (m, mut com1, _, _) = boot(&Config::new(bochs::INTEL_VMX, 32), &iso);
    let rate = |d: Duration| ONE_WAY as f64 / d.as_secs_f64() / 1000.0;

    let data = pattern(ONE_WAY);
    let (back, echo_took) = echo(&com1, &data, Duration::from_secs(60));
    assert_same(&back, &data, "64 KiB echoed");

    let start = Instant::now();
    com1.write_all(&[0xFF, 1]).unwrap();
    let burst = read_n(&com1, ONE_WAY, Duration::from_secs(60));
    let out_took = start.elapsed();
    let want: Vec<u8> = (0..ONE_WAY).map(|i| i as u8).collect();
    assert_same(&burst, &want, "64 KiB from the guest");

    let start = Instant::now();
    com1.write_all(&[0xFF, 2]).unwrap();
    com1.write_all(&data).unwrap();
    let ack = read_n(&com1, 1, Duration::from_secs(60));
    let in_took = start.elapsed();
    assert_eq!(ack, b"K", "the guest read 64 KiB");

    eprintln!(
        "COM1 under Bochs (ips={}): echo {:.1} KB/s each way ({echo_took:.2?}), guest to host {:.1} KB/s \
         ({out_took:.2?}), host to guest {:.1} KB/s ({in_took:.2?})",
        bochs::DEFAULT_IPS,
        rate(echo_took),
        rate(out_took),
        rate(in_took)
    );
    drop(m.quit());
}

#[test]
fn the_iso_boots_the_kernel_by_its_multiboot_header_with_its_command_line_and_is_reused() {
    use bochs::Multiboot;
    assert_eq!(
        bochs::grub_cfg(Multiboot::V2, "hold selftest"),
        "set timeout=0\nmenuentry \"image\" {\n    multiboot2 /boot/image.elf hold selftest\n    boot\n}\n"
    );
    assert!(bochs::grub_cfg(Multiboot::V1, "x").contains("    multiboot /boot/image.elf x\n"));
    let kernel = echo_kernel();
    assert_eq!(bochs::multiboot_kind(&kernel), Some(Multiboot::V1));
    // A multiboot2 header (magic, i386, length 24, checksum, end tag) at 8 KiB, as the image
    // has it; a bad checksum is no header.
    let mut v2 = vec![0u8; 8192];
    let (magic, len) = (0xE852_50D6u32, 24u32);
    for word in [magic, 0, len, 0u32.wrapping_sub(magic.wrapping_add(len)), 0, 8] {
        v2.extend_from_slice(&word.to_le_bytes());
    }
    assert_eq!(bochs::multiboot_kind(&v2), Some(Multiboot::V2));
    v2[8192 + 12] ^= 1;
    assert_eq!(bochs::multiboot_kind(&v2), None);

    let (_, iso) = echo_iso();
    assert!(iso.starts_with(qemu_tests::target_dir().join("bochs")), "{}", iso.display());
    assert_eq!(echo_iso().1, iso, "the same kernel and command line: the same ISO");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.bin");
    std::fs::write(&path, &kernel).unwrap();
    assert!(bochs::iso(&path, "a\"b").is_err(), "quotes are refused");
    std::fs::write(&path, &v2).unwrap();
    assert!(bochs::iso(&path, "x").is_err(), "no multiboot header");
}

/// The first loadable segment of an ELF64 file: its physical address and its bytes.
fn first_load_segment(elf: &[u8]) -> (u64, &[u8]) {
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    assert_eq!(&elf[..5], b"\x7fELF\x02", "an ELF64 file");
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38) as usize);
    let ph = (0..phnum).map(|i| phoff + i * phentsize).find(|&ph| u32_at(ph) == 1).expect("a PT_LOAD");
    let (offset, paddr, filesz) = (u64_at(ph + 8) as usize, u64_at(ph + 0x18), u64_at(ph + 0x20) as usize);
    (paddr, &elf[offset..offset + filesz])
}

#[test]
fn the_hypervisor_image_boots_from_its_multiboot2_header_under_both_cpu_models() {
    let image = qemu_tests::image::build_image().unwrap();
    let elf = std::fs::read(&image).unwrap();
    assert_eq!(bochs::multiboot_kind(&elf), Some(bochs::Multiboot::V2));
    let _one = one_at_a_time();

    // AMD SVM: the image's self-test takes a nested page fault, then ends Bochs.
    let iso = bochs::iso(&image, "selftest").unwrap();
    let mut m = Bochs::start(&iso, bochs::AMD_SVM, 256).unwrap();
    let _com1 = m.connect_com1(Duration::from_secs(10)).unwrap();
    let message = m.wait_exit(Instant::now() + Duration::from_secs(60)).unwrap();
    let console = m.console();
    assert!(message.contains("Shutdown port: shutdown requested"), "{message}\n{console}");
    assert!(console.contains("SVM self-test passed"), "{console}");

    // Intel VMX: the image waits for a stream on COM1, in long mode with its identity map
    // (and the page under its boot stack unmapped: read_phys reads through that hole); its
    // first 64 KiB of code, read from the machine, are the ELF's. (Not the whole first
    // segment: the CPU sets the accessed bits of the boot GDT in its read-only data.)
    let iso = bochs::iso(&image, "hold").unwrap();
    let mut m = Bochs::start(&iso, bochs::INTEL_VMX, 256).unwrap();
    let _com1 = m.connect_com1(Duration::from_secs(10)).unwrap();
    m.wait_for("waiting for the migration stream on COM1", Instant::now() + Duration::from_secs(60)).unwrap();
    let (paddr, segment) = first_load_segment(&elf);
    let code = &segment[..segment.len().min(64 * 1024)];
    let t = Instant::now();
    let memory = m.read_phys(paddr, 8 << 20).unwrap();
    eprintln!("read_phys of 8 MiB of the running image in {:.2?}", t.elapsed());
    assert_eq!(memory.len(), 8 << 20);
    assert_same(&memory[..code.len()], code, "the image's code");
    let console = m.quit();
    assert!(console.starts_with("postcopy hypervisor"), "{console}");
}
