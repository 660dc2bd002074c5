//! Encoder and decoder tests: round trips, malformed batches, arbitrary input.

use super::*;
use proptest::prelude::*;

const MEM: u64 = 64 << 20;

fn in_mem(gpa: u64) -> bool {
    gpa < MEM
}

/// A page of a given kind: 0 zero, 1 compressible text-like, 2 random, 3 one set byte.
fn page(kind: u8, seed: u64) -> Box<[u8; PAGE_SIZE]> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    let mut x = seed | 1;
    for (i, b) in p.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = match kind {
            0 => 0,
            1 => b"ferry moves pages "[(i + seed as usize) % 18] ^ (i / 512) as u8,
            2 => x as u8,
            _ => u8::from(i == (seed as usize % PAGE_SIZE)),
        };
    }
    p
}

type Decoded = Vec<(u64, u32, Box<[u8; PAGE_SIZE]>)>;

fn decode_all(batch: &[u8]) -> Result<(BatchStats, Decoded), DecodeError> {
    let mut got = Vec::new();
    let stats = decode_batch(batch, in_mem, |gpa, epoch, p: &[u8; PAGE_SIZE]| {
        got.push((gpa, epoch, Box::new(*p)));
        Ok::<(), io::Error>(())
    })?;
    Ok((stats, got))
}

fn encode(pages: &[(u64, u32, Box<[u8; PAGE_SIZE]>)], cfg: EncoderConfig) -> (Vec<u8>, BatchStats) {
    let mut enc = BatchEncoder::new(cfg);
    for (gpa, epoch, p) in pages {
        enc.push(*gpa, *epoch, p).unwrap();
    }
    enc.finish()
}

fn sample() -> Vec<(u64, u32, Box<[u8; PAGE_SIZE]>)> {
    vec![
        (0x1000, 1, page(1, 3)),
        (0x2000, 1, page(0, 0)),
        (0x3000, 2, page(2, 9)),
        (0x4000, 2, page(1, 3)),
        (0x5000, 3, page(2, 9)),
    ]
}

#[test]
fn classifies_and_round_trips() {
    let pages = sample();
    let mut enc = BatchEncoder::new(EncoderConfig::default());
    let classes: Vec<_> = pages
        .iter()
        .map(|(g, e, p)| enc.push(*g, *e, p).unwrap())
        .collect();
    use PageClass::*;
    assert_eq!(classes, [Zstd, Zero, Raw, Dup, Dup]);
    assert_eq!(enc.len(), 5);
    let (batch, stats) = enc.finish();
    assert!(enc.is_empty());
    assert_eq!(stats.wire_bytes, batch.len() as u64);
    assert_eq!((stats.zero.pages, stats.duplicate.pages), (1, 2));
    assert_eq!((stats.compressed.pages, stats.raw.pages), (1, 1));
    assert_eq!(stats.raw.bytes, (RECORD_HEADER_LEN + PAGE_SIZE) as u64);
    assert_eq!(stats.duplicate.bytes, 2 * (RECORD_HEADER_LEN + 4) as u64);
    let (dstats, got) = decode_all(&batch).unwrap();
    assert_eq!(dstats, stats);
    assert_eq!(got, pages);
    assert!(stats.compression_ratio() > 1.0);

    // Without dedup the duplicates travel in full.
    let (batch, stats) = encode(
        &pages,
        EncoderConfig {
            dedup: false,
            ..Default::default()
        },
    );
    assert_eq!(
        (
            stats.duplicate.pages,
            stats.raw.pages,
            stats.compressed.pages
        ),
        (0, 2, 2)
    );
    assert_eq!(decode_all(&batch).unwrap().1, pages);
}

#[test]
fn batches_reuse_buffers_and_stats_add() {
    let mut enc = BatchEncoder::new(EncoderConfig {
        max_pages: 2,
        ..Default::default()
    });
    let p = page(2, 1);
    enc.push(0, 0, &p).unwrap();
    enc.push(4096, 0, &p).unwrap();
    assert!(enc.is_full());
    assert!(matches!(
        enc.push(8192, 0, &p),
        Err(EncodeError::Full { max: 2 })
    ));
    let mut buf = Vec::new();
    let mut total = enc.finish_into(&mut buf);
    assert_eq!(total.duplicate.pages, 1);
    // The next batch knows nothing of the previous one's pages.
    assert_eq!(enc.push(8192, 1, &p).unwrap(), PageClass::Raw);
    let (second, s2) = enc.finish();
    total += s2;
    assert_eq!(total.raw.pages, 2);
    assert_eq!(total.batches, 2);
    assert_eq!(total.wire_bytes, (buf.len() + second.len()) as u64);
    assert_eq!(total.pages(), 3);
    let json = serde_json::to_value(total).unwrap();
    for key in ["zero", "duplicate", "compressed", "raw", "lz4"] {
        assert!(json[key]["pages"].is_u64(), "{json}");
    }
    assert!(matches!(
        enc.push(100, 0, &p),
        Err(EncodeError::UnalignedGpa { gpa: 100 })
    ));
    // An empty batch is valid.
    let (empty, _) = enc.finish();
    assert_eq!(decode_all(&empty).unwrap().1.len(), 0);
}

#[test]
fn config_is_clamped() {
    let mut enc = BatchEncoder::new(EncoderConfig {
        zstd_level: 1000,
        dedup: true,
        max_pages: usize::MAX,
        codec: Codec::Zstd,
    });
    assert_eq!(enc.config().max_pages, MAX_BATCH_PAGES);
    assert!(enc.config().zstd_level <= 22);
    assert_eq!(enc.push(0, 0, &page(1, 0)).unwrap(), PageClass::Zstd);
    let (batch, _) = enc.finish();
    assert_eq!(decode_all(&batch).unwrap().1[0].2, page(1, 0));
    let enc = BatchEncoder::new(EncoderConfig {
        max_pages: 0,
        ..Default::default()
    });
    assert_eq!(enc.config().max_pages, 1);
}

#[test]
fn the_codec_can_change_within_a_batch() {
    let mut enc = BatchEncoder::new(EncoderConfig::default());
    assert_eq!(enc.push(0, 0, &page(1, 0)).unwrap(), PageClass::Zstd);
    enc.set_codec(Codec::Raw);
    assert_eq!(enc.push(4096, 0, &page(1, 1)).unwrap(), PageClass::Raw);
    assert_eq!(enc.push(8192, 0, &page(0, 0)).unwrap(), PageClass::Zero);
    enc.set_codec(Codec::Lz4);
    assert_eq!(enc.push(12288, 0, &page(1, 2)).unwrap(), PageClass::Lz4);
    // Random content does not shrink: raw whatever the codec.
    assert_eq!(enc.push(16384, 0, &page(2, 3)).unwrap(), PageClass::Raw);
    let (batch, stats) = enc.finish();
    assert_eq!(
        (stats.compressed.pages, stats.lz4.pages, stats.raw.pages),
        (1, 1, 2)
    );
    let got = decode_all(&batch).unwrap().1;
    assert_eq!(got[1].2, page(1, 1));
    assert_eq!(got[3].2, page(1, 2));
    assert_eq!(got[4].2, page(2, 3));
}

#[test]
fn zero_check() {
    assert!(is_zero_page(&page(0, 0)));
    for at in [0, 15, 16, 63, 64, 2048, PAGE_SIZE - 1] {
        assert!(!is_zero_page(&page(3, at as u64)), "byte {at}");
    }
}

/// Patches the record header of record `index` (records of the sample batch are located
/// by walking it).
fn record_offset(batch: &[u8], index: usize) -> usize {
    let mut at = BATCH_HEADER_LEN;
    for _ in 0..index {
        at += RECORD_HEADER_LEN + le_u32(&batch[at + 16..at + 20]) as usize;
    }
    at
}

fn reject(batch: &[u8]) -> DecodeError {
    let mut applied = 0;
    let err = decode_batch(batch, in_mem, |_, _, _| {
        applied += 1;
        Ok::<(), io::Error>(())
    })
    .unwrap_err();
    assert_eq!(applied, 0, "{err}");
    err
}

#[test]
fn malformed_batches_are_rejected_whole() {
    let (good, _) = encode(&sample(), EncoderConfig::default());
    let rec = |i| record_offset(&good, i);
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    use DecodeError as E;
    assert!(matches!(
        reject(&good[..5]),
        E::Truncated {
            at: Part::Header,
            ..
        }
    ));
    assert!(matches!(
        reject(&patched(4, &[1])),
        E::BadFlags { flags: 1 }
    ));
    assert!(matches!(
        reject(&patched(0, &4097u32.to_le_bytes())),
        E::TooManyPages { count: 4097, .. }
    ));
    assert!(matches!(
        reject(&patched(0, &4000u32.to_le_bytes())),
        E::Truncated {
            at: Part::Header,
            ..
        }
    ));
    assert!(matches!(
        reject(&patched(0, &6u32.to_le_bytes())),
        E::Truncated {
            at: Part::RecordHeader { index: 5 },
            ..
        }
    ));
    let r4 = rec(4);
    assert!(matches!(
        reject(&patched(r4 + 12, &[0])),
        E::UnknownClass {
            index: 4,
            class: 0,
            ..
        }
    ));
    assert!(matches!(
        reject(&patched(r4 + 12, &[9])),
        E::UnknownClass {
            index: 4,
            class: 9,
            ..
        }
    ));
    assert!(matches!(
        reject(&patched(r4 + 14, &[1])),
        E::Reserved {
            index: 4,
            gpa: 0x5000
        }
    ));
    assert!(matches!(
        reject(&patched(r4, &0x5008u64.to_le_bytes())),
        E::UnalignedGpa {
            index: 4,
            gpa: 0x5008
        }
    ));
    assert!(matches!(
        reject(&patched(r4, &MEM.to_le_bytes())),
        E::GpaOutsideMemory { index: 4, gpa: MEM }
    ));
    // Last record is a duplicate: bad lengths and indices.
    assert!(matches!(
        reject(&patched(r4 + 16, &5u32.to_le_bytes())),
        E::BadLength {
            index: 4,
            len: 5,
            class: PageClass::Dup,
            ..
        }
    ));
    assert!(matches!(
        reject(&patched(r4 + 20, &4u32.to_le_bytes())),
        E::BadDupIndex {
            index: 4,
            target: 4,
            ..
        }
    ));
    assert!(matches!(
        reject(&patched(r4 + 20, &u32::MAX.to_le_bytes())),
        E::BadDupIndex { .. }
    ));
    // Zero page with a payload; raw page with a short length.
    assert!(matches!(
        reject(&patched(rec(1) + 16, &1u32.to_le_bytes())),
        E::BadLength {
            index: 1,
            class: PageClass::Zero,
            ..
        }
    ));
    assert!(matches!(
        reject(&patched(rec(2) + 16, &4095u32.to_le_bytes())),
        E::BadLength {
            index: 2,
            class: PageClass::Raw,
            ..
        }
    ));
    // Corrupt zstd frame (record 0), and one that is a valid frame of the wrong size.
    assert!(matches!(
        reject(&patched(rec(0) + RECORD_HEADER_LEN, &[0xff; 4])),
        E::Zstd {
            index: 0,
            gpa: 0x1000,
            ..
        }
    ));
    let small = zstd::bulk::compress(&[7u8; 100], 1).unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    put_record(&mut b, 0, 0, PageClass::Zstd, &small);
    assert!(matches!(
        reject(&b),
        E::ZstdSize {
            index: 0,
            size: 100,
            ..
        }
    ));
    let big = zstd::bulk::compress(&[7u8; PAGE_SIZE + 1], 1).unwrap();
    b.truncate(BATCH_HEADER_LEN);
    put_record(&mut b, 0, 0, PageClass::Zstd, &big);
    assert!(matches!(reject(&b), E::Zstd { index: 0, .. }));
    // LZ4: a corrupt block, and valid blocks of the wrong size.
    b.truncate(BATCH_HEADER_LEN);
    put_record(&mut b, 0, 0, PageClass::Lz4, &[0xff; 40]);
    assert!(matches!(reject(&b), E::Lz4 { index: 0, .. }));
    for len in [100, PAGE_SIZE + 1] {
        b.truncate(BATCH_HEADER_LEN);
        put_record(
            &mut b,
            0,
            0,
            PageClass::Lz4,
            &lz4_flex::block::compress(&vec![7u8; len]),
        );
        assert!(matches!(reject(&b), E::Lz4 { index: 0, .. }), "{len}");
    }
    // Trailing bytes and a payload cut short.
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(reject(&long), E::TrailingBytes { extra: 1 }));
    assert!(matches!(
        reject(&good[..good.len() - 1]),
        E::Truncated {
            at: Part::Payload {
                index: 4,
                gpa: 0x5000
            },
            ..
        }
    ));
    assert!(matches!(
        reject(&good[..rec(3) + 3]),
        E::Truncated {
            at: Part::RecordHeader { index: 3 },
            ..
        }
    ));
}

#[test]
fn gpa_outside_memory_applies_nothing() {
    let (batch, _) = encode(&sample(), EncoderConfig::default());
    let mut applied = 0;
    let err = decode_batch(
        batch.as_slice(),
        |gpa| gpa < 0x5000,
        |_, _, _| {
            applied += 1;
            Ok::<(), io::Error>(())
        },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        DecodeError::GpaOutsideMemory {
            index: 4,
            gpa: 0x5000
        }
    ));
    assert_eq!(applied, 0);
    assert!(err.to_string().contains("record 4") && err.to_string().contains("0x5000"));
}

#[test]
fn apply_errors_stop_decoding() {
    let (batch, _) = encode(&sample(), EncoderConfig::default());
    let mut applied = 0;
    let err = decode_batch(&batch, in_mem, |gpa, _, _| {
        applied += 1;
        if gpa == 0x3000 {
            Err("disk on fire")
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(matches!(
        err,
        DecodeError::Apply {
            index: 2,
            gpa: 0x3000,
            ..
        }
    ));
    assert_eq!(applied, 3);
}

fn arb_pages() -> impl Strategy<Value = Vec<(u64, u32, u8, u64)>> {
    // (page number, epoch, kind, seed); small seed ranges make duplicates frequent.
    proptest::collection::vec((0u64..(MEM / 4096), any::<u32>(), 0u8..4, 0u64..4), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(
        spec in arb_pages(),
        dedup in any::<bool>(),
        level in 1i32..4,
        codec in prop::sample::select(Codec::ALL.to_vec()),
    ) {
        let pages: Vec<_> = spec
            .iter()
            .map(|&(pn, epoch, kind, seed)| (pn * 4096, epoch, page(kind, seed)))
            .collect();
        let cfg = EncoderConfig { dedup, zstd_level: level, max_pages: MAX_BATCH_PAGES, codec };
        let (batch, stats) = encode(&pages, cfg);
        prop_assert_eq!(stats.pages(), pages.len() as u64);
        prop_assert_eq!(stats.wire_bytes, batch.len() as u64);
        prop_assert!(batch.len() <= max_encoded_len(pages.len()));
        let (dstats, got) = decode_all(&batch).unwrap();
        prop_assert_eq!(dstats, stats);
        prop_assert_eq!(got, pages);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut applied = 0;
        let r = decode_batch(&bytes, in_mem, |_, _, _| { applied += 1; Ok::<(), io::Error>(()) });
        if r.is_err() {
            prop_assert_eq!(applied, 0);
        }
    }

    /// Corrupting a valid batch anywhere either still decodes or fails with nothing applied.
    #[test]
    fn corrupted_batches_apply_nothing(
        spec in arb_pages(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let pages: Vec<_> = spec
            .iter()
            .map(|&(pn, epoch, kind, seed)| (pn * 4096, epoch, page(kind, seed)))
            .collect();
        let (mut batch, _) = encode(&pages, EncoderConfig::default());
        for (at, v) in edits {
            let i = at.index(batch.len());
            batch[i] = v;
        }
        if truncate {
            batch.truncate(cut.index(batch.len()));
        }
        let mut applied = 0;
        let r = BatchDecoder::new().decode(&batch, in_mem, |_, _, _| {
            applied += 1;
            Ok::<(), io::Error>(())
        });
        match r {
            Ok(stats) => prop_assert_eq!(applied as u64, stats.pages()),
            Err(_) => prop_assert_eq!(applied, 0),
        }
    }
}
