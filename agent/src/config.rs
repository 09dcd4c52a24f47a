//! Every capacity and fixed size of the agent, in one place.
//!
//! Each bounded structure says what happens when it is full: the stream is refused with a typed
//! error (`Defect::TooLong` or `Defect::TooMany`), never truncated silently.

/// Target page size of x86 guests (TARGET_PAGE_BITS = 12). RAM records carry flags in the low
/// `TARGET_PAGE_BITS` bits of their offset word.
pub const TARGET_PAGE_BITS: u32 = 12;
/// Target page size in bytes.
pub const TARGET_PAGE_SIZE: u64 = 1 << TARGET_PAGE_BITS;
/// The destination's host page size: every guest page is backed by one 4 KiB frame, so the
/// `host_page_summary` of POSTCOPY_ADVISE must be exactly this (no hugepage-backed blocks).
pub const HOST_PAGE_SIZE: u64 = 4096;

/// Largest record header that may have to be stitched together when it is split across the
/// ring's end: a SECTION_START header is 1+4+1+255+4+4 = 269 bytes, a RAM record word with an
/// idstr 8+1+255 = 264, a RAM_DISCARD header 5+3+255+1 = 264. Payloads (pages, device state,
/// VMDESCRIPTION) never go through it: they are handed out as slices of the ring. A header
/// that claims more is refused (`Field::RecordHeader`), so a receive ring of at least this
/// size always makes progress.
pub const BOUNCE_CAPACITY: usize = 512;

/// Guest RAM the page bitmaps cover is set by the caller's storage, not here: `Shared::new`
/// takes the `received` and `requested` bitmaps (one bit per 4 KiB page; a static array in
/// the hypervisor, 64 GiB worth in `postcopy-dest`). A block list past them is refused
/// (`Field::RamBlockList`, `Defect::TooLong`) before any memory is asked for.
///
/// RAMBlocks the destination tracks. pc/q35 have 6; more is refused (`Defect::TooMany`).
pub const MAX_BLOCKS: usize = 16;
/// Iterative sections (START/PART/END) the decoder remembers by id; 7.2 sends only `ram`.
pub const MAX_ITERATIVE_SECTIONS: usize = 4;
/// vCPUs that can wait on pages at once (one parking slot each; a fault from a vCPU index at
/// or above it is refused with `FaultError::NoSuchVcpu`).
pub const MAX_VCPUS: usize = 64;
// The set of vCPUs that may be parked is one 64-bit word.
const _: () = assert!(MAX_VCPUS <= 64);
/// Regions of the guest-physical map: pc/q35 use at most 4, a flat machine one per block.
pub const MAX_GPA_REGIONS: usize = MAX_BLOCKS;
/// Largest machine-type name accepted in CONFIGURATION ("pc-i440fx-7.2" is 13 bytes).
pub const MAX_MACHINE_NAME: usize = 64;
/// Largest PACKAGED blob accepted. QEMU 7.2 allows up to `u32::MAX`; observed blobs are
/// 201 bytes (`-machine none`) to 32,530 bytes (q35). 16 MiB leaves room for large device
/// state (many vCPUs, VGA) while bounding what a hostile stream can make us wait for.
pub const MAX_PACKAGED_LEN: u32 = 16 << 20;
/// Largest amount of opaque device state accepted over the whole stream (the PACKAGED
/// blob's FULL records, or those of a precopy completion): the sink keeps it for the
/// devices. Observed: 201 bytes (`-machine none`) to about 32 KiB (q35). More is refused
/// (`Field::DeviceState`, `Defect::TooLong`).
pub const MAX_DEVICE_STATE_LEN: u64 = 16 << 20;
/// Largest VMDESCRIPTION JSON accepted (q35: 43,642 bytes).
pub const MAX_VMDESCRIPTION_LEN: u32 = 16 << 20;
/// Largest return-path message payload the 7.2 source accepts; anything larger kills the
/// connection on the source side, so we never emit one.
pub const MAX_RP_PAYLOAD: usize = 512;
/// Return-path message buffer: header + the largest message we emit (REQ_PAGES_ID with a
/// 255-byte block name: 4 + 13 + 255).
pub const RP_MESSAGE_CAPACITY: usize = 4 + 13 + 255;
