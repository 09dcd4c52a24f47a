//! The RAM_DISCARD encoding study on the recorded dirty sets (`qemu-tests/data/dirty-sets/`).
//!
//! `record_dirty_sets` (ignored: runs real QEMU for minutes) re-records them;
//! `print_discard_table` (ignored) prints the comparison table; use `--release` for times.

use std::time::Duration;

use agent::wire::command::Dialect;
use agent::wire::discard::MaskRuns;
use proptest::prelude::*;
use qemu_tests::discard_study::{
    compare, data_dir, load_all, markdown_table, masks, print_table, record, DirtySet, PATTERNS,
};

fn sets() -> Vec<DirtySet> {
    let sets = load_all().expect("dirty sets load");
    assert!(sets.len() >= PATTERNS.len(), "one saved set per pattern");
    sets
}

#[test]
fn both_encodings_discard_the_same_pages() {
    for set in sets() {
        let row = compare(&set).unwrap();
        assert!(row.same_pages, "{}: 7.2 and v5 decodings differ", set.pattern);
        assert_eq!((row.pages, row.ranges), (set.pages(), set.ranges()));
    }
}

#[test]
fn computed_sizes_match_emitted_and_recorded_bytes() {
    for set in sets() {
        let row = compare(&set).unwrap();
        assert_eq!(row.bytes_72, set.discard_commands(Dialect::Qemu72).len() as u64, "{}", set.pattern);
        assert_eq!(row.bytes_v5, set.discard_commands(Dialect::SeedV5).len() as u64, "{}", set.pattern);
        // What QEMU 7.2 actually sent.
        assert_eq!((row.commands_72, row.bytes_72), (set.observed_commands, set.observed_bytes));
    }
}

#[test]
fn saved_sets_round_trip_through_text_and_stay_small() {
    for entry in std::fs::read_dir(data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "txt") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.len() < 200_000, "{}", path.display());
            let set = DirtySet::parse(&text).unwrap();
            assert_eq!(DirtySet::parse(&set.to_text("again")).unwrap(), set);
        }
    }
}

#[test]
fn table_has_a_row_per_set() {
    let rows: Vec<_> = sets().iter().map(|s| compare(s).unwrap()).collect();
    assert_eq!(markdown_table(&rows).lines().count(), rows.len() + 2);
}

/// Decodes v5 entries back to page runs, merging runs that continue across entries.
fn unmask(entries: &[(u64, u32)]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(start, mask) in entries {
        for run in MaskRuns::new(start, mask, 0) {
            let (first, pages) = run.unwrap();
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == first => last.1 += pages,
                _ => runs.push((first, pages)),
            }
        }
    }
    runs
}

#[test]
fn v5_encoding_round_trips_on_the_recorded_sets() {
    for set in sets() {
        for b in &set.blocks {
            assert_eq!(unmask(&masks(&b.runs)), b.runs, "{} {}", set.pattern, b.name);
        }
    }
}

proptest! {
    #[test]
    fn v5_encoding_round_trips(gaps in proptest::collection::vec((1u64..100, 1u64..100), 0..50)) {
        // Maximal runs: every gap at least one page.
        let mut runs = Vec::new();
        let mut page = 0;
        for (gap, len) in gaps {
            runs.push((page + gap, len));
            page += gap + len;
        }
        prop_assert_eq!(unmask(&masks(&runs)), runs);
    }
}

/// Re-records every pattern (or those named in `$DIRTY_SETS`, comma separated) with real
/// QEMU 7.2 and rewrites the data files.
#[test]
#[ignore = "runs real QEMU 7.2 migrations for several minutes"]
fn record_dirty_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let only = std::env::var("DIRTY_SETS").ok();
    std::fs::create_dir_all(data_dir()).unwrap();
    for spec in PATTERNS.iter().filter(|s| only.as_ref().is_none_or(|o| o.split(',').any(|p| p == s.pattern)))
    {
        let (set, command_line) = record(spec, tmp.path(), Duration::from_secs(240)).unwrap();
        let comment = format!(
            "{}\nqemu-system-x86_64 7.2 source: {}\nmax-bandwidth {} downtime-limit 1 postcopy-ram",
            spec.description,
            command_line.join(" "),
            spec.max_bandwidth
        );
        let text = set.to_text(&comment);
        std::fs::write(data_dir().join(format!("{}.txt", spec.pattern)), text).unwrap();
        println!("{}: {} pages in {} ranges", spec.pattern, set.pages(), set.ranges());
    }
}

#[test]
#[ignore = "prints the table (use --release for meaningful times)"]
fn print_discard_table() {
    print_table().unwrap();
}
