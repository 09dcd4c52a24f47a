use agent::testing::run_stream;
#[test]
fn dbg() {
    let stream = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/captures/pc-precopy-dirty.bin")).unwrap();
    let out = run_stream(&stream, 1 << 21, 1 << 21);
    println!("{:?} {:?}", out.result, out.stats);
    for (n, d) in &out.ports.memory.blocks { println!("{} {}", String::from_utf8_lossy(n), d.len()); }
    let ram = &out.ports.memory.blocks[0].1;
    std::fs::write("/tmp/pc.ram.decoded", ram).unwrap();
    let st = &ram[0x1ff000..0x1ff040];
    println!("{:02x?}", st);
}
