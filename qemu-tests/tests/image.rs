//! The hypervisor image under QEMU TCG (AMD SVM with nested paging): its SVM self-test, a
//! postcopy migration of the pattern guest over COM1 served from real #NPF exits, and a
//! hostile stream that the image refuses with a typed error and SHUT(1) while it stays up to
//! report it.

use std::time::Duration;

use qemu_tests::image::{migrate, Emulator, Migration, SourceKind};

#[test]
fn the_pattern_guest_migrates_into_the_image_and_its_faults_are_served() {
    let (line, log) = migrate(&Migration { mem_mib: 4, ..Migration::default() }).expect("migration runs");
    assert_eq!(line["state"], "END", "{line}\n{log}");
    assert_eq!(line["vendor"], "svm");
    assert_eq!(line["guest_ok"], true, "{line}");
    assert_eq!(line["ram_equal"], true, "{line}");
    let faults = line["stage2_faults"].as_u64().unwrap();
    assert!(faults > 0, "no #NPF exit: {line}");
    assert_eq!(line["faults_served"].as_u64(), Some(faults), "every fault served: {line}");
    assert!(line["page_requests"].as_u64().unwrap() > 0, "{line}");
    assert!(
        line["source"]["requested_pages"].as_u64().unwrap() > 0,
        "the source served requests first: {line}"
    );
    assert_eq!(line["source"]["shut"], 0, "SHUT(0): {line}");
    // The log shows each fault's exit, request, arrival and resume.
    for step in ["#NPF exit, GPA", "page request for block 0", "page arrived, mapped", "VMRUN resumed vCPU 0"]
    {
        assert!(log.contains(step), "{step:?} missing from the log:\n{log}");
    }
}

#[test]
fn a_hostile_stream_is_refused_with_a_typed_error_and_shut_1() {
    // A valid start, then a RAM_DISCARD range past the block: refused at its offset.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.bin");
    std::fs::write(&file, qemu_tests::image::discard_past_the_block_stream()).unwrap();
    let m = Migration {
        source: SourceKind::File(file),
        timeout: Duration::from_secs(60),
        ..Migration::default()
    };
    let (line, log) = migrate(&m).expect("the run ends with a report");
    assert_eq!(line["state"], "error", "{line}\n{log}");
    let error = line["error"].as_str().unwrap();
    assert!(error.contains("DiscardLength") && error.starts_with("stream offset "), "{error}");
    assert_eq!(line["source"]["shut"], 1, "SHUT(1) on the return path: {line}");
    assert!(!log.contains("EXCEPTION") && !log.contains("PANIC"), "{log}");
}

/// Boots the image with `append` on its command line; its exit code and debug console.
fn boot(append: &str) -> (Option<i32>, String) {
    let image = qemu_tests::image::build_image().unwrap();
    let qemu = qemu_tests::install::qemu().unwrap();
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "256M", "-display", "none", "-no-reboot"])
        .args(["-no-user-config", "-serial", "none", "-debugcon", "stdio", "-append", append])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel"])
        .arg(&image);
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_svm_self_test_takes_a_nested_page_fault() {
    let (code, text) = boot("selftest");
    assert_eq!(code, Some(0x21), "isa-debug-exit success: {text}");
    assert!(text.contains("selftest exit 1: NestedPageFault { gpa: 2000, access: Read }"), "{text}");
    assert!(text.contains("SVM self-test passed"), "{text}");
}

#[test]
fn exceptions_and_stack_overflows_are_reported_and_end_the_run_with_a_failure_code() {
    let (code, text) = boot("selftest-ud2");
    assert_eq!(code, Some(0x23), "isa-debug-exit failure: {text}");
    assert!(text.contains("EXCEPTION vector 6 (#UD invalid opcode) at RIP 0x"), "{text}");
    // Into the unmapped guard page under the stack: #PF, then #DF on its own stack.
    let (code, text) = boot("selftest-overflow");
    assert_eq!(code, Some(0x23), "isa-debug-exit failure: {text}");
    assert!(text.contains("EXCEPTION vector 8 (#DF double fault)"), "{text}");
}

/// The same image under Bochs: Intel VMX with EPT (`corei7_skylake_x`), chosen at boot from
/// CPUID, and AMD SVM again on Bochs' `ryzen` as a second check. Guest RAM is read from the
/// stopped machine through Bochs' debugger.
#[test]
fn under_bochs_the_image_serves_ept_violations_with_vmx_and_nested_page_faults_with_svm() {
    for (cpu, vendor) in [(qemu_tests::bochs::INTEL_VMX, "vmx"), (qemu_tests::bochs::AMD_SVM, "svm")] {
        // Bochs' COM1 moves about 25 KB/s: background pages 300 ms apart usually leave the
        // guest's requests something to overtake.
        let m = Migration {
            emulator: Emulator::Bochs(cpu.into()),
            background_pause: std::time::Duration::from_millis(300),
            ..Migration::default()
        };
        let (line, log) = migrate(&m).expect("migration runs");
        assert_eq!(line["state"], "END", "{cpu}: {line}\n{log}");
        assert_eq!(line["vendor"], vendor, "{cpu}: {line}");
        assert_eq!(line["emulator"], "bochs");
        assert_eq!(line["guest_ok"], true, "{cpu}: {line}");
        assert_eq!(line["ram_equal"], true, "{cpu}: {line}");
        let faults = line["stage2_faults"].as_u64().unwrap();
        assert!(faults > 0, "{cpu}: no stage-2 fault: {line}");
        assert_eq!(line["faults_served"].as_u64(), Some(faults), "{cpu}: {line}");
        // Requests went out (whether the source still had the page to serve first depends on
        // how far its background sending ran ahead of Bochs' slow COM1 on a busy host).
        assert!(line["page_requests"].as_u64().unwrap() > 0, "{cpu}: no page request: {line}");
        assert_eq!(line["source"]["shut"], 0, "{cpu}: SHUT(0): {line}");
        // The decoded defmt log (COM2) shows the vendor's exits.
        let exit = if vendor == "vmx" { "EPT violation exit, GPA" } else { "#NPF exit, GPA" };
        assert!(log.contains(exit), "{cpu}: {exit:?} missing from the log:\n{log}");
    }
}
