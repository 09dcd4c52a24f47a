//! The main path, for real: a QEMU 7.2 VM migrates postcopy through the bridge and
//! virtio-vsock into the hypervisor image (under QEMU TCG with `vhost-user-vsock-pci` and the
//! `vhost-device-vsock` daemon) and goes on running there; a guest that touches a port the
//! image does not emulate stops with a report naming it while the migration completes; a
//! hostile stream over vsock is refused with a typed error and SHUT(1).

use std::time::Duration;

use qemu_tests::image_qemu::{migrate, QemuMigration};

fn run(m: &QemuMigration) -> (serde_json::Value, String) {
    migrate(m, &mut |_| {}).expect("the run ends with a report")
}

#[test]
fn a_qemu_vm_migrates_over_vsock_into_the_image_and_keeps_running() {
    let m = QemuMigration { sink_bytes: 8 << 20, ..QemuMigration::default() };
    let (line, log) = run(&m);
    assert_eq!(line["state"], "END", "{line}\n{log}");
    assert_eq!(
        (&line["transport"], &line["vendor"], &line["guest_kind"]),
        (&"vsock".into(), &"svm".into(), &"qemu".into())
    );
    assert_eq!(line["source"]["status"], "completed", "{line}");
    assert_eq!(line["guest_stopped"], serde_json::Value::Null, "{line}");
    // The dirty guest's heartbeat moved on in the image past its value when the source stopped.
    assert_eq!(line["guest_running"], true, "{line}");
    assert!(line["guest_progress"]["advanced"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["ram_equal"], true, "{line}");
    assert!(line["guest_written_pages"].as_u64().unwrap() > 0, "the guest wrote in the image: {line}");
    assert!(line["discarded_pages"].as_u64().unwrap() > 0, "{line}");
    let faults = line["stage2_faults"].as_u64().unwrap();
    assert!(faults > 0, "no #NPF exit: {line}");
    assert_eq!(line["faults_served"].as_u64(), Some(faults), "{line}");
    assert_eq!(
        line["source"]["postcopy_requests"], line["page_requests"],
        "every request reached QEMU: {line}"
    );
    // The latency histogram counts every fault that waited.
    let waited = line["postcopy_faults"].as_u64().unwrap();
    let dist: u64 =
        line["postcopy_latency_dist_ns"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(dist, waited, "{line}");
    assert_eq!(line["sink"]["bytes"], 8 << 20, "the raw-rate sink counted every byte: {line}");
    assert!(log.contains("virtio-vsock at") && log.contains("vCPU 0 restored from qemu"), "{log}");
}

/// A boot sector (real mode): counts at 0x7e00, then writes port 0x80, which the image does
/// not emulate.
fn boot_sector() -> Vec<u8> {
    let mut code = vec![
        0xfa, // cli
        0x31, 0xc0, // xor ax, ax
        0x8e, 0xd8, // mov ds, ax
        0x66, 0xff, 0x06, 0x00, 0x7e, // loop: inc dword [0x7e00]
        0xb9, 0xff, 0xff, // mov cx, 0xffff
        0xe2, 0xfe, // loop $
        0xe6, 0x80, // out 0x80, al
        0xeb, 0xf2, // jmp loop
    ];
    code.resize(510, 0);
    code.extend([0x55, 0xaa]);
    code
}

#[test]
fn a_guest_touching_a_port_the_image_does_not_emulate_stops_with_a_report_and_the_migration_completes() {
    let dir = tempfile::tempdir().unwrap();
    let floppy = dir.path().join("boot.img");
    let mut image = boot_sector();
    image.resize(1440 * 1024, 0);
    std::fs::write(&floppy, &image).unwrap();
    let m = QemuMigration {
        mem_mib: 32,
        source_args: Some(vec![
            "-drive".into(),
            format!("file={},if=floppy,format=raw", floppy.display()),
            "-boot".into(),
            "a".into(),
        ]),
        sink_bytes: 0,
        // Postcopy at once, and a precopy too slow to finish first: the guest runs in the
        // image while pages are still missing.
        precopy_for: Duration::ZERO,
        max_bandwidth: 1 << 20,
        ..QemuMigration::default()
    };
    let (line, log) = run(&m);
    assert_eq!(line["state"], "END", "{line}\n{log}");
    assert_eq!(line["source"]["status"], "completed", "{line}");
    let stopped = line["guest_stopped"].as_str().unwrap_or_default();
    assert!(stopped.contains("OUT to I/O port 0x80"), "{line}");
    assert_eq!(line["ram_equal"], true, "{line}");
}

#[test]
fn a_hostile_stream_over_vsock_is_refused_with_a_typed_error_and_shut_1() {
    // A valid start, then a RAM_DISCARD range past the block: refused at its offset.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.bin");
    std::fs::write(&file, qemu_tests::image::discard_past_the_block_stream()).unwrap();
    let m = QemuMigration {
        stream_file: Some(file),
        sink_bytes: 0,
        timeout: Duration::from_secs(90),
        ..QemuMigration::default()
    };
    let (line, log) = run(&m);
    assert_eq!(line["state"], "error", "{line}\n{log}");
    let error = line["error"].as_str().unwrap();
    assert!(error.contains("DiscardLength") && error.starts_with("stream offset "), "{error}");
    assert_eq!(line["source"]["shut"], 1, "SHUT(1) on the return path: {line}");
    assert!(!log.contains("EXCEPTION") && !log.contains("PANIC"), "{log}");
}

#[test]
fn the_image_recovers_from_two_breaks_over_vsock_and_ram_equals_qemus_load() {
    // Postcopy slowed down so that it lasts through the breaks.
    let m = QemuMigration {
        mem_mib: 32,
        sink_bytes: 0,
        breaks: 2,
        max_postcopy_bandwidth: 4 << 20,
        ..QemuMigration::default()
    };
    let (line, log) = run(&m);
    assert_eq!(line["state"], "END", "{line}\n{log}");
    assert_eq!(line["source"]["status"], "completed", "{line}");
    assert_eq!(line["source"]["breaks"], 2, "{line}");
    let breaks = line["breaks"].as_array().unwrap();
    assert_eq!(breaks.len(), 2, "the image paused twice: {line}");
    for b in breaks {
        assert!(b["missing_pages"].as_u64().unwrap() > 0, "{b}");
    }
    assert_eq!(line["guest_running"], true, "{line}");
    assert_eq!(line["ram_equal"], true, "{line}");
    assert!(log.contains("PAUSED at stream offset") && log.contains("the source reconnected"), "{log}");
}

#[test]
fn a_source_that_never_comes_back_ends_the_image_with_a_one_line_error() {
    let m = QemuMigration {
        mem_mib: 32,
        sink_bytes: 0,
        breaks: 1,
        no_resume: true,
        recover_timeout_ms: Some(2000),
        max_postcopy_bandwidth: 4 << 20,
        ..QemuMigration::default()
    };
    let (line, log) = run(&m);
    assert_eq!(line["state"], "error", "{line}\n{log}");
    assert_eq!(line["source"]["status"], "postcopy-paused", "{line}");
    let error = line["error"].as_str().unwrap();
    assert!(
        error.starts_with(
            "the source did not come back within 2000 ms of the break: the migration is PAUSED with"
        ) && error.ends_with("pages missing"),
        "{error}"
    );
    assert!(log.contains("PAUSED at stream offset"), "{log}");
}
