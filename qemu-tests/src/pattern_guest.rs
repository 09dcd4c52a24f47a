//! The pattern guest (`guests/pattern-guest`): building it, its entry contract, its
//! guest-physical layout, and the pattern rules that say what every data page holds.
//!
//! The guest and everything it needs (page tables, GDT, its code) arrive by postcopy
//! migration from `postcopy-source` ([`crate::own_source`]). The guest reads every data page
//! once, in a scattered order, checks each word against [`expected_word`], writes word 0 of
//! the pages where [`written`] holds, and reports with a hypercall (RAX = [`RESULT_MAGIC`],
//! RBX = checksum, RCX = mismatches, RDX = pages written). [`run_guest_model`] is the same
//! algorithm over a host buffer, for checking a result.
//!
//! Guest-physical layout (identity-mapped, so the same virtual addresses):
//!
//! | address | what |
//! |---|---|
//! | 0x1000 | PML4: entry 0 → PDPT |
//! | 0x2000 | PDPT: entry 0 → PD |
//! | 0x3000 | PD: 2 MiB pages covering all guest RAM |
//! | 0x4000 | GDT: null, 64-bit code (selector 0x08), data (0x10) |
//! | 0x10000 | the guest image; its first byte is the entry point |
//! | 0x70000..0x80000 | stack (zero pages; RSP = 0x80000 at entry) |
//! | 0x100000.. | data pages ([`DATA_START`]) |
//!
//! Every other page below [`DATA_START`] is zero. The table entries have their accessed
//! (and, in the PD, dirty) bits already set, so the processor never writes them: guest RAM
//! after the run differs from what the source sent only in the pages the guest writes.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::install::objcopy;
use crate::process::run;
use crate::{bail, target_dir, workspace_root, Result};

/// Bytes per page.
pub const PAGE: u64 = 4096;
/// 64-bit words per page.
pub const WORDS: usize = 512;
/// Guest-physical (and virtual) address of the image and its entry point.
pub const IMAGE_BASE: u64 = 0x1_0000;
/// The image must end at or below this address (the stack area starts there).
pub const IMAGE_LIMIT: u64 = 0x7_0000;
/// RSP at entry; the stack grows down from here into zero pages.
pub const STACK_TOP: u64 = 0x8_0000;
/// PML4 (CR3).
pub const PML4: u64 = 0x1000;
/// The one PDPT.
pub const PDPT: u64 = 0x2000;
/// The one PD (2 MiB pages): guest RAM is at most 1 GiB.
pub const PD: u64 = 0x3000;
/// GDT base; limit [`GDT_LIMIT`].
pub const GDT: u64 = 0x4000;
/// GDT limit (three 8-byte descriptors).
pub const GDT_LIMIT: u32 = 3 * 8 - 1;
/// 64-bit code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector (DS, ES, SS, FS, GS).
pub const DATA_SELECTOR: u16 = 0x10;
/// First data page's guest-physical address (RSI at entry).
pub const DATA_START: u64 = 0x10_0000;
/// Largest guest RAM the page tables map (one PD of 2 MiB pages).
pub const MAX_RAM: u64 = 1 << 30;
/// Guest RAM is a multiple of this (the 2 MiB pages of the identity map).
pub const RAM_GRANULE: u64 = 2 << 20;
/// RAX of the guest's result hypercall: "PGRS".
pub const RESULT_MAGIC: u64 = 0x5047_5253;
/// Word 0 of a written page becomes `WRITE_MARK ^ page number`.
pub const WRITE_MARK: u64 = 0x5752_4954_0000_0000;
/// Visit stride of the guest; [`STRIDE_ALT`] when it divides the number of data pages.
pub const STRIDE: u64 = 7919;
/// The next prime after [`STRIDE`].
pub const STRIDE_ALT: u64 = 7927;

/// Page-table entry bits: present, writable, accessed; dirty and 2 MiB page in the PD.
const PTE_P_RW_A: u64 = 0x1 | 0x2 | 0x20;
const PDE_D_PS: u64 = 0x40 | 0x80;

/// The standard splitmix64 finalizer of `x + golden gamma`.
pub const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// First data page number.
pub const fn first_data_page() -> u64 {
    DATA_START / PAGE
}

/// Number of data pages in `ram_bytes` of guest RAM.
pub const fn data_pages(ram_bytes: u64) -> u64 {
    ram_bytes.saturating_sub(DATA_START) / PAGE
}

/// Absolute page `page` is a data page of `ram_bytes` of guest RAM.
pub const fn is_data_page(page: u64, ram_bytes: u64) -> bool {
    page >= first_data_page() && page < ram_bytes / PAGE
}

/// The data page holds the pattern (the others are zero).
pub const fn patterned(page: u64) -> bool {
    page.is_multiple_of(4)
}

/// The source discards the data page after precopy and sends it again (version 1) in
/// postcopy.
pub const fn dirty(page: u64) -> bool {
    page % 3 == 1
}

/// Version of the data page the source serves last.
pub const fn version(page: u64) -> u64 {
    if dirty(page) {
        1
    } else {
        0
    }
}

/// Word `w` of data page `page` in `version` of its contents.
pub const fn word_in_version(page: u64, w: u64, version: u64) -> u64 {
    if patterned(page) {
        splitmix64(page * WORDS as u64 + w + version * 0x1_0000_0000)
    } else {
        0
    }
}

/// Word `w` of data page `page` as the source serves it last (what the guest must read).
pub const fn expected_word(page: u64, w: u64) -> u64 {
    word_in_version(page, w, version(page))
}

/// The guest writes word 0 of this data page (never a patterned page).
pub const fn written(page: u64) -> bool {
    page % 16 == 2
}

/// The stride the guest visits `n` data pages with.
pub const fn stride(n: u64) -> u64 {
    if n.is_multiple_of(STRIDE) {
        STRIDE_ALT
    } else {
        STRIDE
    }
}

/// Data page `page` in `version` (little-endian words).
pub fn page_in_version(page: u64, version: u64) -> [u8; PAGE as usize] {
    let mut out = [0u8; PAGE as usize];
    if patterned(page) {
        for (w, chunk) in out.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&word_in_version(page, w as u64, version).to_le_bytes());
        }
    }
    out
}

/// Data page `page` as the source serves it last.
pub fn expected_page(page: u64) -> [u8; PAGE as usize] {
    page_in_version(page, version(page))
}

/// Data page `page` after the guest ran: [`expected_page`], with word 0 = `WRITE_MARK ^
/// page` where [`written`] holds.
pub fn page_after_guest(page: u64) -> [u8; PAGE as usize] {
    let mut out = expected_page(page);
    if written(page) {
        out[..8].copy_from_slice(&(WRITE_MARK ^ page).to_le_bytes());
    }
    out
}

/// The checksum the guest must report for `ram_bytes` of guest RAM: the wrapping sum of
/// every word of every data page as served last.
pub fn expected_checksum(ram_bytes: u64) -> u64 {
    let first = first_data_page();
    (first..first + data_pages(ram_bytes))
        .filter(|&p| patterned(p))
        .flat_map(|p| (0..WORDS as u64).map(move |w| expected_word(p, w)))
        .fold(0u64, u64::wrapping_add)
}

/// Pages the guest writes in `ram_bytes` of guest RAM.
pub fn expected_pages_written(ram_bytes: u64) -> u64 {
    let first = first_data_page();
    (first..first + data_pages(ram_bytes)).filter(|&p| written(p)).count() as u64
}

/// What the guest reports with its hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestResult {
    /// RBX: wrapping sum of every word read.
    pub checksum: u64,
    /// RCX: words that differ from the rules, plus read-backs that differ.
    pub mismatches: u64,
    /// RDX: pages written.
    pub pages_written: u64,
}

impl GuestResult {
    /// The result of a guest that found every page as the rules say.
    pub fn expected(ram_bytes: u64) -> Self {
        GuestResult {
            checksum: expected_checksum(ram_bytes),
            mismatches: 0,
            pages_written: expected_pages_written(ram_bytes),
        }
    }
}

/// The guest's algorithm over `ram`, the whole guest RAM from guest-physical 0: the same
/// visiting order, checks and writes. Returns what the guest would report.
pub fn run_guest_model(ram: &mut [u8]) -> GuestResult {
    let first = first_data_page();
    let n = data_pages(ram.len() as u64);
    let mut result = GuestResult { checksum: 0, mismatches: 0, pages_written: 0 };
    if n == 0 {
        return result;
    }
    let step = stride(n) % n;
    let mut p = 0;
    for _ in 0..n {
        let page = first + p;
        let at = (page * PAGE) as usize;
        let bytes = &mut ram[at..at + PAGE as usize];
        for (w, chunk) in bytes.chunks_exact(8).enumerate() {
            let value = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            result.checksum = result.checksum.wrapping_add(value);
            result.mismatches += u64::from(value != expected_word(page, w as u64));
        }
        if written(page) {
            bytes[..8].copy_from_slice(&(WRITE_MARK ^ page).to_le_bytes());
            result.pages_written += 1;
        }
        p = (p + step) % n;
    }
    result
}

/// Checks that `ram_bytes` is a guest RAM size the pattern guest supports: a multiple of
/// 2 MiB, from 2 MiB to 1 GiB.
pub fn check_ram_size(ram_bytes: u64) -> Result<()> {
    if !(RAM_GRANULE..=MAX_RAM).contains(&ram_bytes) || !ram_bytes.is_multiple_of(RAM_GRANULE) {
        bail!("pattern guest RAM must be a multiple of 2 MiB from 2 MiB to 1 GiB, not {ram_bytes:#x} bytes");
    }
    Ok(())
}

/// Guest RAM below [`DATA_START`] as the source sends it: page tables, GDT, the image at
/// [`IMAGE_BASE`], zeros elsewhere.
pub fn boot_area(ram_bytes: u64, image: &[u8]) -> Result<Vec<u8>> {
    check_ram_size(ram_bytes)?;
    if image.is_empty() || image.len() as u64 > IMAGE_LIMIT - IMAGE_BASE {
        bail!(
            "pattern guest image of {} bytes: must be 1 to {} bytes",
            image.len(),
            IMAGE_LIMIT - IMAGE_BASE
        );
    }
    let mut low = vec![0u8; DATA_START as usize];
    let mut put = |at: u64, value: u64| {
        low[at as usize..at as usize + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(PML4, PDPT | PTE_P_RW_A);
    put(PDPT, PD | PTE_P_RW_A);
    for i in 0..ram_bytes / RAM_GRANULE {
        put(PD + 8 * i, (i * RAM_GRANULE) | PTE_P_RW_A | PDE_D_PS);
    }
    put(GDT, 0);
    put(GDT + u64::from(CODE_SELECTOR), CODE_DESCRIPTOR);
    put(GDT + u64::from(DATA_SELECTOR), DATA_DESCRIPTOR);
    low[IMAGE_BASE as usize..IMAGE_BASE as usize + image.len()].copy_from_slice(image);
    Ok(low)
}

/// GDT descriptor of the 64-bit code segment: base 0, limit 0xFFFFF pages, type
/// execute/read accessed, S, DPL 0, present, L, G.
pub const CODE_DESCRIPTOR: u64 = 0x00AF_9B00_0000_FFFF;
/// GDT descriptor of the data segment: base 0, limit 0xFFFFF pages, type read/write
/// accessed, S, DPL 0, present, D/B, G.
pub const DATA_DESCRIPTOR: u64 = 0x00CF_9300_0000_FFFF;
/// The code segment's attributes in VMCB form (descriptor bits 40-47 and 52-55).
pub const CODE_ATTRIB: u16 = vmcb_attrib(CODE_DESCRIPTOR);
/// The data segment's attributes in VMCB form.
pub const DATA_ATTRIB: u16 = vmcb_attrib(DATA_DESCRIPTOR);

/// A GDT descriptor's attributes as the VMCB holds them: type, S, DPL, P in bits 0-7,
/// AVL, L, D/B, G in bits 8-11.
pub const fn vmcb_attrib(descriptor: u64) -> u16 {
    (((descriptor >> 40) & 0xFF) | ((descriptor >> 44) & 0xF00)) as u16
}

/// The whole guest RAM as the source serves it last (before the guest runs).
pub fn expected_ram(ram_bytes: u64, image: &[u8]) -> Result<Vec<u8>> {
    let mut ram = boot_area(ram_bytes, image)?;
    ram.reserve((ram_bytes - DATA_START) as usize);
    for page in first_data_page()..ram_bytes / PAGE {
        ram.extend_from_slice(&expected_page(page));
    }
    Ok(ram)
}

/// Builds the guest (release, `x86_64-unknown-none`) and converts it with
/// `objcopy -O binary` to a flat image loaded at [`IMAGE_BASE`]. Returns the image's path.
///
/// It builds in `<target>/pattern-guest`, a directory of its own (so it does not wait for
/// the lock of an outer `cargo test`), from the guest's directory so that its
/// `.cargo/config.toml` (static relocation model, small code model) applies; once per
/// process.
pub fn build_pattern_guest() -> Result<PathBuf> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.as_ref() {
        return Ok(path.clone());
    }
    let dir = workspace_root().join("guests/pattern-guest");
    let target = target_dir().join("pattern-guest");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(&dir)
        .args(["build", "--release", "--target", "x86_64-unknown-none", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    run(cargo, Duration::from_secs(600))?;
    let elf = target.join("x86_64-unknown-none/release/pattern-guest");
    let entry = elf_entry(&std::fs::read(&elf)?);
    if entry != Some(IMAGE_BASE) {
        bail!("{}: entry point {entry:#x?}, expected {IMAGE_BASE:#x}", elf.display());
    }
    let image = target.join("pattern-guest.bin");
    let tmp = target.join(format!("pattern-guest.bin.{}", std::process::id()));
    let mut copy = Command::new(objcopy()?);
    copy.args(["-O", "binary"]).arg(&elf).arg(&tmp);
    run(copy, Duration::from_secs(60))?;
    std::fs::rename(&tmp, &image)?;
    let len = std::fs::metadata(&image)?.len();
    if len == 0 || len > IMAGE_LIMIT - IMAGE_BASE {
        bail!("{}: {len} bytes, expected 1 to {}", image.display(), IMAGE_LIMIT - IMAGE_BASE);
    }
    *built = Some(image.clone());
    Ok(image)
}

/// The entry point of a little-endian ELF64 file.
fn elf_entry(elf: &[u8]) -> Option<u64> {
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    Some(u64::from_le_bytes(elf.get(24..32)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The first outputs of the reference generator seeded with 0 (its state advances by
        // the golden gamma before each mix, so output i is splitmix64(i * gamma)).
        let gamma = 0x9E37_79B9_7F4A_7C15u64;
        let outputs: Vec<u64> = (0..3u64).map(|i| splitmix64(i.wrapping_mul(gamma))).collect();
        assert_eq!(outputs, [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]);
    }

    #[test]
    fn rules_as_documented() {
        for page in 256..4096u64 {
            assert!(!(written(page) && patterned(page)), "page {page}");
            if !patterned(page) {
                assert!(expected_page(page).iter().all(|&b| b == 0));
            }
            assert_eq!(version(page), u64::from(page % 3 == 1));
        }
        // A dirty patterned page's two versions differ in every word (with these seeds).
        let (v0, v1) = (page_in_version(268, 0), page_in_version(268, 1));
        assert!(dirty(268) && patterned(268));
        assert!(v0.chunks(8).zip(v1.chunks(8)).all(|(a, b)| a != b));
        assert_eq!(&page_after_guest(258)[..8], &(WRITE_MARK ^ 258).to_le_bytes());
        assert!(page_after_guest(258)[8..].iter().all(|&b| b == 0));
        assert_eq!(stride(7919 * 2), STRIDE_ALT);
        assert_eq!(stride(768), STRIDE);
    }

    #[test]
    fn checksum_of_a_tiny_ram_two_ways() {
        // 2 MiB: 256 data pages, 64 patterned, 16 written.
        let ram_bytes = 2 << 20;
        let mut ram = expected_ram(ram_bytes, &[0xf4]).unwrap();
        assert_eq!(ram.len() as u64, ram_bytes);
        let by_pages = (first_data_page()..ram_bytes / PAGE)
            .flat_map(|p| {
                expected_page(p)
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect::<Vec<_>>()
            })
            .fold(0u64, u64::wrapping_add);
        assert_eq!(expected_checksum(ram_bytes), by_pages);
        assert_ne!(by_pages, 0);
        let result = run_guest_model(&mut ram);
        assert_eq!(result, GuestResult::expected(ram_bytes));
        assert_eq!(result.pages_written, 16);
        for page in first_data_page()..ram_bytes / PAGE {
            let at = (page * PAGE) as usize;
            assert_eq!(&ram[at..at + PAGE as usize], &page_after_guest(page)[..], "page {page:#x}");
        }
        // The model sees stale data: a dirty patterned page still in version 0 is counted.
        let mut stale = expected_ram(ram_bytes, &[0xf4]).unwrap();
        let page = 268u64;
        stale[(page * PAGE) as usize..][..PAGE as usize].copy_from_slice(&page_in_version(page, 0));
        assert_eq!(run_guest_model(&mut stale).mismatches, WORDS as u64);
    }

    #[test]
    fn the_visit_order_covers_every_page_once() {
        for n in [1u64, 2, 255, 256, 768, 7919, 7919 * 3] {
            let step = stride(n) % n;
            let mut seen = vec![false; n as usize];
            let mut p = 0;
            for i in 0..n {
                assert_eq!(p, (i * stride(n)) % n);
                assert!(!seen[p as usize], "n {n}: page {p} twice");
                seen[p as usize] = true;
                p = (p + step) % n;
            }
        }
    }

    #[test]
    fn boot_area_maps_all_ram_and_describes_flat_segments() {
        let low = boot_area(6 << 20, &[1, 2, 3]).unwrap();
        let word = |at: u64| u64::from_le_bytes(low[at as usize..at as usize + 8].try_into().unwrap());
        assert_eq!(word(PML4), 0x2023);
        assert_eq!(word(PDPT), 0x3023);
        assert_eq!([word(PD), word(PD + 8), word(PD + 16), word(PD + 24)], [0xE3, 0x2000E3, 0x4000E3, 0]);
        assert_eq!(CODE_ATTRIB, 0xA9B);
        assert_eq!(DATA_ATTRIB, 0xC93);
        assert_eq!(&low[IMAGE_BASE as usize..IMAGE_BASE as usize + 4], &[1, 2, 3, 0]);
        assert!(boot_area(3 << 20, &[1]).is_err());
        assert!(boot_area(2 << 20, &[]).is_err());
    }
}
