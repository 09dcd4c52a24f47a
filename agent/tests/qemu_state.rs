//! `agent::qemu_state` against real QEMU 7.2 streams (`tests/captures/`): the layouts equal
//! the VMDESCRIPTION JSON QEMU wrote, the decoded values are the dirty guest's, and hostile
//! device state gives typed errors.

use agent::qemu_state::{find, CpuCommon, Device, Found, Timers, VmField, VmKind, VmStruct, X86Cpu, I8254};
use agent::testing::run_stream;
use agent::{Defect, Error, Field};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn capture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/captures/{name}.bin", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The device state the image holds: what the engine hands its `DeviceStateSink` (the FULL
/// records after the last RAM section, or those of the PACKAGED blob).
fn device_state(name: &str) -> Vec<u8> {
    let out = run_stream(&capture(name), 1 << 20, 1 << 20);
    assert!(out.result.unwrap_or_else(|e| panic!("{name}: {e}")).finished);
    out.ports.device_state
}

/// The VMDESCRIPTION after the final EOF of a precopy stream: `00 06 <be32 len> <JSON>`.
fn vmdescription(stream: &[u8]) -> Value {
    let at = (0..stream.len() - 6)
        .rev()
        .find(|&i| {
            let len = u32::from_be_bytes(stream[i + 2..i + 6].try_into().unwrap()) as usize;
            stream[i..i + 2] == [0, 6] && i + 6 + len == stream.len() && stream[i + 6] == b'{'
        })
        .expect("VMDESCRIPTION at the end");
    serde_json::from_slice(&stream[at + 6..]).unwrap()
}

/// Our description in the JSON's shape (vmstate.c's `vmsd_desc_field_start/end`).
fn describe(s: &VmStruct) -> Value {
    json!({ "vmsd_name": s.name, "version": s.version, "fields": s.fields.iter().map(describe_field).collect::<Vec<_>>() })
}

fn describe_field(f: &VmField) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), f.name.into());
    if let Some(n) = f.count {
        m.insert("array_len".into(), n.into());
    }
    m.insert("type".into(), f.kind.json_type().into());
    match f.kind {
        VmKind::Struct(s) => {
            m.insert("struct".into(), describe(s));
        }
        VmKind::Tmp(s) => {
            if let Value::Object(inner) = describe(s) {
                m.extend(inner);
            }
        }
        _ => {}
    }
    m.insert("size".into(), f.size.into());
    Value::Object(m)
}

/// Holds `T`'s layout (and the subsections the stream sent) against the JSON's device.
fn check_against_json<T: Device>(json: &Value) -> Vec<String> {
    let idstr = std::str::from_utf8(T::IDSTR).unwrap();
    let dev = json["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == idstr && d["instance_id"] == 0)
        .unwrap_or_else(|| panic!("{idstr} in the JSON"));
    let mut expected = dev.as_object().unwrap().clone();
    for key in ["name", "instance_id", "subsections"] {
        expected.remove(key);
    }
    assert_eq!(describe(T::LAYOUT), Value::Object(expected), "{idstr}: fields differ from QEMU's");
    let mut names = Vec::new();
    for sub in dev["subsections"].as_array().into_iter().flatten() {
        let name = sub["vmsd_name"].as_str().unwrap();
        let ours = T::SUBSECTIONS.iter().find(|s| s.name == name);
        let ours = ours.unwrap_or_else(|| panic!("{idstr}: QEMU sent subsection {name}, unknown here"));
        assert_eq!(&describe(ours), sub, "{name}: fields differ from QEMU's");
        names.push(name.to_string());
    }
    names
}

#[test]
fn layouts_equal_the_vmdescription_of_real_streams() {
    for name in ["pc-precopy-dirty", "q35-precopy"] {
        let json = vmdescription(&capture(name));
        let cpu_subs = check_against_json::<X86Cpu>(&json);
        assert_eq!(cpu_subs, ["cpu/poll_control_msr", "cpu/msr_smi_count"], "{name}");
        assert!(check_against_json::<CpuCommon>(&json).is_empty());
        assert!(check_against_json::<Timers>(&json).is_empty());
        assert!(check_against_json::<I8254>(&json).is_empty());
        // The decoder finds, in the same stream, exactly the subsections the JSON lists.
        let cpu = X86Cpu::find(&device_state(name), 0).unwrap().unwrap();
        assert_eq!(cpu.subsection_names().collect::<Vec<_>>(), cpu_subs, "{name}");
    }
}

const PIT_HZ: i128 = 1_193_182;

/// QEMU's `pit_get_count` for a mode-2 channel at virtual time `now`.
fn qemu_mode2_count(count: i32, load: i64, now: i64) -> i64 {
    let d = (i128::from(now - load) * PIT_HZ / 1_000_000_000) as i64;
    i64::from(count) - d % i64::from(count)
}

struct Decoded {
    cpu: Found<X86Cpu>,
    common: CpuCommon,
    timers: Timers,
    pit: I8254,
}

fn decode(name: &str) -> Decoded {
    let state = device_state(name);
    Decoded {
        cpu: find::<X86Cpu>(&state, 0).unwrap().expect("cpu 0"),
        common: CpuCommon::find(&state, 0).unwrap().expect("cpu_common 0"),
        timers: Timers::find(&state, 0).unwrap().expect("timer"),
        pit: I8254::find(&state, 0).unwrap().expect("i8254"),
    }
}

/// The dirty guest: 32-bit protected mode, flat segments, no paging, interrupts off, polling
/// PIT channel 0 (mode 2, reload 65536), on pc and q35, precopy and postcopy.
#[test]
fn real_captures_decode_to_the_dirty_guests_state() {
    for name in ["pc-precopy-dirty", "q35-precopy", "pc-postcopy", "q35-postcopy"] {
        let Decoded { cpu: found, common, timers, pit } = decode(name);
        let cpu = found.value;
        assert_eq!(found.len, 17 + 1882 + 5, "{name}: header, body, footer");
        assert_eq!(cpu.cr0 & 1, 1, "{name}: PE");
        assert_eq!(cpu.cr0 & 1 << 31, 0, "{name}: no paging");
        assert_eq!((cpu.cr3, cpu.cr4, cpu.efer), (0, 0, 0), "{name}");
        assert!((0x10_0000..0x20_0000).contains(&cpu.rip), "{name}: RIP {:#x} in the guest image", cpu.rip);
        assert_eq!(cpu.rflags & 1 << 9, 0, "{name}: interrupts off");
        let cs = cpu.cs();
        assert_eq!((cs.selector, cs.base, cs.limit), (8, 0, 0xffff_ffff), "{name}");
        assert!(cs.present() && cs.big() && !cs.long() && cs.dpl() == 0, "{name}: 32-bit ring-0 code");
        assert_eq!(cs.vmcb_attrib(), 0xc9a, "{name}");
        for i in [0, 2, 3, 4, 5] {
            let s = cpu.segs[i];
            assert_eq!((s.selector, s.base, s.limit, s.flags), (0x10, 0, 0xffff_ffff, 0xcf9300), "{name}");
        }
        assert_eq!(cpu.gdt.limit, 39, "{name}: five descriptors");
        assert_eq!(cpu.a20_mask, -1, "{name}");
        assert_eq!((cpu.fpu.fcw, cpu.fpu.mxcsr), (0x37f, 0x1f80), "{name}: reset FPU");
        assert_eq!((cpu.events.interrupt_injected, cpu.events.exception_nr), (-1, -1), "{name}");
        assert_eq!(cpu.events.exception, None);
        assert_eq!(cpu.pat, 0x0007_0406_0007_0406, "{name}");
        assert_eq!(cpu.msrs.poll_control, 0, "{name}: TCG's value, hence the subsection");
        assert!(cpu.msrs.smi_count > 0, "{name}");
        assert!(cpu.has_subsection("cpu/msr_smi_count"));
        assert_eq!(common.halted, 0, "{name}");
        assert_eq!(common.interrupt_request & 2, 2, "{name}: IRQ0 raised, interrupts off");

        let [ch0, ch1, ch2] = pit.channels;
        assert_eq!((ch0.mode, ch0.count, ch0.rw_mode, ch0.bcd, ch0.gate), (2, 0x10000, 3, 0, 1), "{name}");
        assert_eq!((ch1.mode, ch2.mode, ch2.gate), (3, 3, 0), "{name}: BIOS defaults");
        let clock = timers.clock_at_stop_ns();
        assert!(0 < ch0.count_load_time && ch0.count_load_time < clock, "{name}");
        // IRQ0's next edge may be before the stop (pc-postcopy: 2.6 ms overdue): QEMU's timer
        // had not run yet; its post_load re-arms it there, so it fires at once on resume.
        assert!(ch0.next_transition_time > ch0.count_load_time, "{name}");
        // The guest's last read (latched, then read lo/hi into EAX) is at most a few ticks
        // before the stop: QEMU's formula at the stop's virtual time agrees.
        let now = qemu_mode2_count(ch0.count, ch0.count_load_time, clock);
        let behind = (i64::from(ch0.latched_count) - now).rem_euclid(0x10000);
        assert!(behind < 64, "{name}: latched {} vs {now} at the stop", ch0.latched_count);
        assert_eq!(cpu.regs[0], u64::from(ch0.latched_count), "{name}: EAX holds the last count read");
        eprintln!(
            "{name}: rip {:#x} cr0 {:#x} efer {:#x} cs {:#x}/{:#x}/{:#x}/{:#x} subsections {:?} \
             pit0 mode {} count {} latched {} load {} next {} clock {} ticks_offset {} formula {now}",
            cpu.rip,
            cpu.cr0,
            cpu.efer,
            cs.selector,
            cs.base,
            cs.limit,
            cs.flags,
            cpu.subsection_names().collect::<Vec<_>>(),
            ch0.mode,
            ch0.count,
            ch0.latched_count,
            ch0.count_load_time,
            ch0.next_transition_time,
            clock,
            timers.cpu_ticks_offset,
        );
    }
}

/// The precopy captures stopped right after the guest's read: exact agreement.
#[test]
fn precopy_latch_is_qemus_formula_at_the_stop() {
    for name in ["pc-precopy-dirty", "q35-precopy"] {
        let d = decode(name);
        let ch0 = d.pit.channels[0];
        let now = qemu_mode2_count(ch0.count, ch0.count_load_time, d.timers.clock_at_stop_ns());
        assert_eq!(now, i64::from(ch0.latched_count), "{name}");
    }
}

fn all_four(state: &[u8]) -> [Result<bool, Error>; 4] {
    [
        find::<X86Cpu>(state, 0).map(|f| f.is_some()),
        find::<CpuCommon>(state, 0).map(|f| f.is_some()),
        find::<Timers>(state, 0).map(|f| f.is_some()),
        find::<I8254>(state, 0).map(|f| f.is_some()),
    ]
}

fn cut_everywhere<T: Device>(state: &[u8]) {
    let f = find::<T>(state, 0).unwrap().unwrap();
    let name_end = f.offset + 6 + T::IDSTR.len();
    for cut in f.offset..f.offset + f.len {
        match find::<T>(&state[..cut], 0) {
            Ok(None) => assert!(cut < name_end, "cut {cut}: header whole, yet nothing"),
            Err(e) => assert_eq!(e.defect, Defect::Truncated, "cut {cut}: {e}"),
            Ok(Some(_)) => panic!("cut {cut}: decoded a cut record"),
        }
    }
}

#[test]
fn every_cut_is_a_typed_truncation() {
    let state = device_state("pc-precopy-dirty");
    cut_everywhere::<X86Cpu>(&state);
    cut_everywhere::<CpuCommon>(&state);
    cut_everywhere::<Timers>(&state);
    cut_everywhere::<I8254>(&state);
    // One cut named: inside CR3.
    let f = find::<X86Cpu>(&state, 0).unwrap().unwrap();
    let body = f.offset + 17;
    let e = find::<X86Cpu>(&state[..body + 475], 0).unwrap_err();
    assert_eq!(format!("{:?}", e.field), "VmState(cpu.env.cr[3])");
    assert_eq!(e.offset, (body + 472) as u64);
}

#[test]
fn footer_and_version_are_checked() {
    let state = device_state("pc-precopy-dirty");
    let f = find::<X86Cpu>(&state, 0).unwrap().unwrap();
    let footer = f.offset + f.len - 5;
    let mut bad = state.clone();
    bad[footer] = 0x7f;
    let e = find::<X86Cpu>(&bad, 0).unwrap_err();
    assert_eq!((e.offset, e.field), (footer as u64, Field::SectionFooter));
    assert_eq!(e.defect, Defect::BadValue { found: 0x7f, expected: 0x7e });
    let mut bad = state.clone();
    bad[footer + 4] ^= 1;
    let e = find::<X86Cpu>(&bad, 0).unwrap_err();
    assert_eq!(e.field, Field::SectionFooter);
    assert_eq!(
        e.defect,
        Defect::BadValue { found: u64::from(f.section_id ^ 1), expected: f.section_id.into() }
    );
    let mut bad = state.clone();
    bad[f.offset + 16] = 13;
    let e = find::<X86Cpu>(&bad, 0).unwrap_err();
    assert_eq!((e.offset, e.field), ((f.offset + 13) as u64, Field::SectionVersion));
    assert_eq!(e.defect, Defect::BadValue { found: 13, expected: 12 });
    // Another instance is not there.
    assert_eq!(find::<X86Cpu>(&state, 1), Ok(None));
}

#[test]
fn an_unknown_subsection_is_named() {
    let state = device_state("pc-precopy-dirty");
    let f = find::<X86Cpu>(&state, 0).unwrap().unwrap();
    let record = &state[f.offset..f.offset + f.len];
    let at = f.offset + record.windows(17).position(|w| w == b"cpu/msr_smi_count").unwrap();
    let mut bad = state.clone();
    bad[at + 12] = b'X';
    let e = find::<X86Cpu>(&bad, 0).unwrap_err();
    assert_eq!(e.offset, (at - 2) as u64, "at the subsection's 05");
    assert_eq!(format!("{:?}", e.field), "VmState(cpu (subsection header))");
    let Defect::UnknownSubsection(name) = e.defect else { panic!("{e}") };
    assert_eq!(name.kept(), b"cpu/msr_smi_Xount");
    assert!(format!("{e}").ends_with("unknown subsection cpu/msr_smi_Xount"), "{e}");
    // A subsection of another version.
    let mut bad = state.clone();
    bad[at + 17 + 3] = 2;
    let e = find::<X86Cpu>(&bad, 0).unwrap_err();
    assert_eq!(format!("{:?}", e.field), "VmState(cpu/msr_smi_count (subsection header))");
    assert_eq!(e.defect, Defect::BadValue { found: 2, expected: 1 });
}

/// The subsection name kept in a `Defect` does not make errors bigger (they are returned
/// by every decoding step).
#[test]
fn errors_stay_small() {
    assert_eq!(std::mem::size_of::<Defect>(), 32);
    assert_eq!(std::mem::size_of::<Error>(), 48);
}

/// A FULL record `dummy` whose body is `body`.
fn dummy_record(body: &[u8]) -> Vec<u8> {
    let mut r = vec![4, 0, 0, 0, 99, 5];
    r.extend_from_slice(b"dummy");
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    r.extend_from_slice(body);
    r.extend_from_slice(&[0x7e, 0, 0, 0, 99]);
    r
}

#[test]
fn a_header_inside_another_body_is_not_the_record() {
    let state = device_state("pc-precopy-dirty");
    let real = find::<X86Cpu>(&state, 0).unwrap().unwrap();
    let header = &state[real.offset..real.offset + 17];
    let without: Vec<u8> = [&state[..real.offset], &state[real.offset + real.len..]].concat();

    // Header bytes after a footer-like `7e`, then 300 bytes that are not a cpu body.
    let mut fake = vec![0x7e, 0, 0, 0, 1];
    fake.extend_from_slice(header);
    fake.extend_from_slice(&[0xa5; 300]);
    let dummy = dummy_record(&fake);

    let with_real = [&dummy[..], &state].concat();
    let f = find::<X86Cpu>(&with_real, 0).unwrap().expect("the real record");
    assert_eq!((f.offset, f.value), (dummy.len() + real.offset, real.value));

    let only_fake = [&dummy[..], &without].concat();
    let e = find::<X86Cpu>(&only_fake, 0).unwrap_err();
    assert!(matches!(e.field, Field::SectionFooter | Field::VmState(_)), "{e}");

    // Not at a record boundary: not even a candidate.
    let mut inside = vec![0x11; 5];
    inside.extend_from_slice(header);
    inside.extend_from_slice(&[0xa5; 300]);
    assert_eq!(find::<X86Cpu>(&[&dummy_record(&inside)[..], &without].concat(), 0), Ok(None));

    // A whole valid copy inside a body: two records decode, which one is meant is unknown.
    let mut copy = vec![0x7e, 0, 0, 0, 1];
    copy.extend_from_slice(&state[real.offset..real.offset + real.len]);
    let twice = [&dummy_record(&copy)[..], &state].concat();
    let e = find::<X86Cpu>(&twice, 0).unwrap_err();
    assert_eq!((e.field, e.defect), (Field::SectionIdstr, Defect::TooMany { cap: 1 }));
}

#[test]
fn every_capture_holds_the_four_sections_once() {
    for name in ["pc-precopy-dirty", "q35-precopy", "pc-postcopy", "q35-postcopy"] {
        let state = device_state(name);
        assert_eq!(all_four(&state).map(Result::unwrap), [true; 4], "{name}");
    }
    // `-machine none` has a timer and no vCPU state.
    let state = device_state("none-precopy");
    assert_eq!(all_four(&state).map(Result::unwrap), [false, false, true, false]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Mutated, cut or extended device state: typed results, never a panic.
    #[test]
    fn hostile_device_state_never_panics(
        muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let state = device_state_cached();
        let f = find::<X86Cpu>(state, 0).unwrap().unwrap();
        // Mutate inside the cpu record and around it, where it matters.
        let window = f.offset.saturating_sub(64)..(f.offset + f.len + 64).min(state.len());
        let mut s = state[window.clone()].to_vec();
        for (i, v) in &muts {
            let i = i.index(s.len());
            s[i] = *v;
        }
        s.truncate(cut.index(s.len() + 1));
        s.extend_from_slice(&tail);
        let _ = all_four(&s);
        let _ = all_four(&tail);
    }
}

fn device_state_cached() -> &'static [u8] {
    static STATE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    STATE.get_or_init(|| device_state("pc-precopy-dirty"))
}
