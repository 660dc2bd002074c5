//! Proof of equality: digests of guest memory per range, hashed in parallel on both sides
//! at switchover (DESIGN §4.4).

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

/// How much of guest memory is compared at switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// Every page (the default: the demo and the tests use it).
    #[default]
    Full,
    /// One page in [`SAMPLE_STRIDE`], at an offset that changes with every migration.
    Sample,
    /// No comparison.
    Off,
}

/// With [`VerifyMode::Sample`], one page in this many is hashed.
pub const SAMPLE_STRIDE: u64 = 16;

impl FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "sample" => Ok(Self::Sample),
            "off" => Ok(Self::Off),
            _ => Err(format!("unknown verify mode {s:?} (full, sample, off)")),
        }
    }
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Sample => "sample",
            Self::Off => "off",
        })
    }
}

/// Hashes guest memory in ranges of `range_bytes` (each range is cut at region ends), on
/// `threads` threads. With `Sample`, only pages whose index ≡ `salt` (mod SAMPLE_STRIDE).
pub fn digests(
    mem: &GuestMemory,
    mode: VerifyMode,
    range_bytes: u64,
    salt: u64,
    threads: usize,
) -> Result<Vec<u64>, MemoryError> {
    if mode == VerifyMode::Off {
        return Ok(Vec::new());
    }
    let range_bytes = range_bytes.max(PAGE_SIZE as u64) / PAGE_SIZE as u64 * PAGE_SIZE as u64;
    let mut ranges = Vec::new();
    for r in mem.regions() {
        let mut gpa = r.gpa();
        while gpa < r.gpa() + r.len() {
            let len = range_bytes.min(r.gpa() + r.len() - gpa);
            ranges.push((gpa, len));
            gpa += len;
        }
    }
    let mut out = vec![0u64; ranges.len()];
    let threads = threads.max(1).min(ranges.len().max(1));
    let per = ranges.len().div_ceil(threads);
    std::thread::scope(|s| -> Result<(), MemoryError> {
        let handles: Vec<_> = ranges
            .chunks(per.max(1))
            .zip(out.chunks_mut(per.max(1)))
            .map(|(rs, os)| {
                s.spawn(move || -> Result<(), MemoryError> {
                    let mut page = vec![0u8; PAGE_SIZE];
                    for (&(gpa, len), o) in rs.iter().zip(os.iter_mut()) {
                        let mut h = Xxh3::new();
                        let mut off = 0;
                        while off < len {
                            let p = (gpa + off) / PAGE_SIZE as u64;
                            if mode == VerifyMode::Full || p % SAMPLE_STRIDE == salt % SAMPLE_STRIDE
                            {
                                mem.read(gpa + off, &mut page)?;
                                h.update(&p.to_le_bytes());
                                h.update(&page);
                            }
                            off += PAGE_SIZE as u64;
                        }
                        *o = h.digest();
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("digest thread panicked")?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Indices of the ranges whose digests differ (all of them if the counts differ).
pub fn mismatches(a: &[u64], b: &[u64]) -> Vec<usize> {
    if a.len() != b.len() {
        return (0..a.len().max(b.len())).collect();
    }
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_see_a_one_byte_change() {
        let m = GuestMemory::new(&[(0, 8 << 20), (16 << 20, 4 << 20)]).unwrap();
        let a = digests(&m, VerifyMode::Full, 1 << 20, 0, 2).unwrap();
        assert_eq!(a.len(), 12);
        m.write(17 << 20, &[1]).unwrap();
        let b = digests(&m, VerifyMode::Full, 1 << 20, 0, 2).unwrap();
        assert_eq!(mismatches(&a, &b), vec![9]);
        let s1 = digests(&m, VerifyMode::Sample, 1 << 20, 0, 1).unwrap();
        // Page (17 MiB / 4 KiB) = 4352 ≡ 0 (mod 16): sampled with salt 0, not with salt 1.
        m.write(17 << 20, &[2]).unwrap();
        let s2 = digests(&m, VerifyMode::Sample, 1 << 20, 0, 1).unwrap();
        assert_eq!(mismatches(&s1, &s2), vec![9]);
        assert!(digests(&m, VerifyMode::Off, 1 << 20, 0, 1)
            .unwrap()
            .is_empty());
    }
}
