//! Comparing RAM images: holes, hashes, first differences.

use sha2::{Digest, Sha256};

/// Sets `ram[start..end]` to zero for each hole (clipped to the buffer).
pub fn zero_holes(ram: &mut [u8], holes: &[(u64, u64)]) {
    for &(start, end) in holes {
        let len = ram.len() as u64;
        let (s, e) = (start.min(len) as usize, end.min(len) as usize);
        ram[s..e].fill(0);
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Describes how `got` differs from `want` (None if equal): sizes, number of differing
/// 4 KiB pages and the first few of them.
pub fn diff_pages(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let mut msg = String::new();
    if want.len() != got.len() {
        msg.push_str(&format!("sizes differ: want {} got {}; ", want.len(), got.len()));
    }
    let mut bad = Vec::new();
    for (i, (a, b)) in want.chunks(4096).zip(got.chunks(4096)).enumerate() {
        if a != b {
            bad.push(i as u64 * 4096);
        }
    }
    msg.push_str(&format!("{} pages differ", bad.len()));
    if !bad.is_empty() {
        let first: Vec<String> = bad.iter().take(8).map(|a| format!("{a:#x}")).collect();
        msg.push_str(&format!(", first at {}", first.join(" ")));
    }
    Some(msg)
}
