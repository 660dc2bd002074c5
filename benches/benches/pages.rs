//! Page classification and codecs on realistic pages (the guest's mixed fill: about 25% zero,
//! 35% text, 25% code-like, 15% random pages).
//!
//! ```text
//! cargo bench -p ferry-benches --bench pages
//! cargo run -p ferry-benches --bin criterion_summary
//! ```
//!
//! Throughputs are in guest bytes (pages × 4096) per second, on the way in for encoders and
//! on the way out for decoders. Batches rotate over a few MiB of pages so that each
//! iteration reads pages that are not all in cache.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use ferry_engine::encode::{
    decode_batch, is_zero_page, BatchDecoder, BatchEncoder, Codec, EncoderConfig,
};
use ferry_engine::guest::{MixedFill, PageClass};
use ferry_engine::memory::PAGE_SIZE;

type Page = [u8; PAGE_SIZE];

/// Pages generated from the mixed fill (16 MiB).
const POOL_PAGES: u64 = 4096;
/// Pages per batch (the engine's default).
const BATCH: usize = 256;
/// Different batches per mix each benchmark rotates over.
const ROTATE: usize = 8;
const SEED: u64 = 0x5eed;

/// The pages of the pool, by class and all together in fill order.
struct Pool {
    all: Vec<Box<Page>>,
    zero: Vec<usize>,
    text: Vec<usize>,
    code: Vec<usize>,
    random: Vec<usize>,
}

impl Pool {
    fn new() -> Self {
        let fill = MixedFill::new(SEED);
        let mut pool = Pool {
            all: Vec::new(),
            zero: Vec::new(),
            text: Vec::new(),
            code: Vec::new(),
            random: Vec::new(),
        };
        for p in 0..POOL_PAGES {
            let mut page = Box::new([0u8; PAGE_SIZE]);
            let class = fill.page(p, &mut page[..]);
            let at = pool.all.len();
            pool.all.push(page);
            match class {
                PageClass::Zero => pool.zero.push(at),
                PageClass::Text => pool.text.push(at),
                PageClass::Code => pool.code.push(at),
                PageClass::Random => pool.random.push(at),
            }
        }
        pool
    }

    fn page(&self, i: usize) -> &Page {
        &self.all[i]
    }

    /// `ROTATE` batches of `BATCH` pages of one mix ("mixed": in fill order; otherwise one
    /// class only, cycling over that class's pages if it has fewer than needed).
    fn batches(&self, mix: &str) -> Vec<Vec<&Page>> {
        let indices: Vec<usize> = match mix {
            "mixed" => (0..self.all.len()).collect(),
            "zero" => self.zero.clone(),
            "text" => self.text.clone(),
            "code" => self.code.clone(),
            "random" => self.random.clone(),
            _ => unreachable!("unknown mix {mix}"),
        };
        let mut it = indices.iter().cycle();
        (0..ROTATE)
            .map(|_| {
                (0..BATCH)
                    .map(|_| self.page(*it.next().expect("a non-empty class")))
                    .collect()
            })
            .collect()
    }
}

const MIXES: [&str; 5] = ["mixed", "text", "code", "random", "zero"];
const BATCH_BYTES: u64 = (BATCH * PAGE_SIZE) as u64;

fn short<M: criterion::measurement::Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
}

fn encode(enc: &mut BatchEncoder, batch: &[&Page]) -> Vec<u8> {
    for (i, page) in batch.iter().enumerate() {
        enc.push((i * PAGE_SIZE) as u64, 0, page)
            .expect("a batch of at most max_pages aligned pages");
    }
    enc.finish().0
}

fn classify(c: &mut Criterion, pool: &Pool) {
    let mut g = c.benchmark_group("pages/is_zero_page");
    short(&mut g);
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let zero = pool.page(pool.zero[0]);
    let text = pool.page(pool.text[0]);
    g.bench_function("zero", |b| b.iter(|| is_zero_page(black_box(zero))));
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let batches = pool.batches("mixed");
    let mut n = 0;
    g.bench_function("mixed_batch", |b| {
        b.iter(|| {
            n = (n + 1) % ROTATE;
            batches[n].iter().filter(|p| is_zero_page(p)).count()
        })
    });
    g.finish();

    // A text page is non-zero from its 17th byte: the check stops at the first 64-byte
    // block, so a throughput would be meaningless.
    let mut g = c.benchmark_group("pages/is_zero_page_nonzero");
    short(&mut g);
    g.bench_function("text", |b| b.iter(|| is_zero_page(black_box(text))));
    g.finish();

    let mut g = c.benchmark_group("pages/xxh3_64");
    short(&mut g);
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function("page", |b| {
        b.iter(|| xxhash_rust::xxh3::xxh3_64(black_box(&text[..])))
    });
    g.finish();
}

fn batch_codec(c: &mut Criterion, pool: &Pool) {
    let mut g = c.benchmark_group("pages/encode_256");
    short(&mut g);
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    for mix in MIXES {
        let batches = pool.batches(mix);
        let mut enc = BatchEncoder::new(EncoderConfig::default());
        let wire = encode(&mut enc, &batches[0]).len();
        eprintln!(
            "pages: mix {mix}: a batch of {BATCH} pages encodes to {wire} bytes (ratio {:.2})",
            BATCH_BYTES as f64 / wire as f64
        );
        let mut n = 0;
        g.bench_function(mix, |b| {
            b.iter(|| {
                n = (n + 1) % ROTATE;
                encode(&mut enc, &batches[n])
            })
        });
    }
    let batches = pool.batches("mixed");
    let mut enc = BatchEncoder::new(EncoderConfig {
        dedup: false,
        ..EncoderConfig::default()
    });
    let mut n = 0;
    g.bench_function("mixed_nodedup", |b| {
        b.iter(|| {
            n = (n + 1) % ROTATE;
            encode(&mut enc, &batches[n])
        })
    });
    let lz4 = EncoderConfig {
        codec: Codec::Lz4,
        ..EncoderConfig::default()
    };
    let mut enc = BatchEncoder::new(lz4.clone());
    let wire = encode(&mut enc, &batches[0]).len();
    eprintln!(
        "pages: mix mixed, lz4: a batch of {BATCH} pages encodes to {wire} bytes (ratio {:.2})",
        BATCH_BYTES as f64 / wire as f64
    );
    g.bench_function("mixed_lz4", |b| {
        b.iter(|| {
            n = (n + 1) % ROTATE;
            encode(&mut enc, &batches[n])
        })
    });
    g.finish();

    let mut g = c.benchmark_group("pages/decode_256");
    short(&mut g);
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let mut dst = vec![0u8; BATCH * PAGE_SIZE];
    for mix in MIXES {
        let mut enc = BatchEncoder::new(EncoderConfig::default());
        let encoded: Vec<Vec<u8>> = pool
            .batches(mix)
            .iter()
            .map(|batch| encode(&mut enc, batch))
            .collect();
        let mut n = 0;
        g.bench_function(mix, |b| {
            b.iter(|| {
                n = (n + 1) % ROTATE;
                decode_batch(&encoded[n], |gpa| gpa < BATCH_BYTES, write_into(&mut dst))
                    .expect("a valid batch")
            })
        });
        if mix == "mixed" {
            // A reused decoder, on the zstd batches and on LZ4 ones.
            let mut enc = BatchEncoder::new(lz4.clone());
            let lz4_encoded: Vec<Vec<u8>> = pool
                .batches(mix)
                .iter()
                .map(|batch| encode(&mut enc, batch))
                .collect();
            for (name, batches) in [
                ("mixed_reused_decoder", &encoded),
                ("mixed_lz4", &lz4_encoded),
            ] {
                let mut dec = BatchDecoder::new();
                g.bench_function(name, |b| {
                    b.iter(|| {
                        n = (n + 1) % ROTATE;
                        dec.decode(&batches[n], |gpa| gpa < BATCH_BYTES, write_into(&mut dst))
                            .expect("a valid batch")
                    })
                });
            }
        }
    }
    g.finish();
}

/// A decoder's `apply` that writes each page into `dst` at its address.
fn write_into(
    dst: &mut [u8],
) -> impl FnMut(u64, u32, &[u8; PAGE_SIZE]) -> Result<(), Infallible> + '_ {
    |gpa, _epoch, page| {
        let at = gpa as usize;
        dst[at..at + PAGE_SIZE].copy_from_slice(page);
        Ok(())
    }
}

/// The codecs alone, page by page: zstd level 1 (every page of the batch, zero pages
/// included, as a plain per-page compressor would) and raw (copying into the output).
fn codecs(c: &mut Criterion, pool: &Pool) {
    let mut g = c.benchmark_group("pages/zstd1_compress_256");
    short(&mut g);
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let mut cctx = zstd::bulk::Compressor::new(1).expect("a zstd context");
    let mut scratch = vec![0u8; zstd::zstd_safe::compress_bound(PAGE_SIZE)];
    for mix in MIXES {
        let batches = pool.batches(mix);
        let mut n = 0;
        g.bench_function(mix, |b| {
            b.iter(|| {
                n = (n + 1) % ROTATE;
                batches[n]
                    .iter()
                    .map(|p| {
                        cctx.compress_to_buffer(&p[..], &mut scratch[..])
                            .expect("compress_bound room")
                    })
                    .sum::<usize>()
            })
        });
    }
    // The same mixed batches as one 1 MiB frame: what per-page frames cost.
    let flat: Vec<Vec<u8>> = pool
        .batches("mixed")
        .iter()
        .map(|batch| batch.iter().flat_map(|p| p.iter().copied()).collect())
        .collect();
    let mut big = vec![0u8; zstd::zstd_safe::compress_bound(BATCH * PAGE_SIZE)];
    let mut n = 0;
    g.bench_function("mixed_one_frame", |b| {
        b.iter(|| {
            n = (n + 1) % ROTATE;
            cctx.compress_to_buffer(&flat[n][..], &mut big[..])
                .expect("compress_bound room")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("pages/zstd1_decompress_256");
    short(&mut g);
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let frames: Vec<Vec<Vec<u8>>> = pool
        .batches("mixed")
        .iter()
        .map(|batch| {
            batch
                .iter()
                .map(|p| cctx.compress(&p[..]).expect("compressing a page"))
                .collect()
        })
        .collect();
    let mut dctx = zstd::bulk::Decompressor::new().expect("a zstd context");
    let mut page = vec![0u8; PAGE_SIZE];
    let mut n = 0;
    g.bench_function("mixed", |b| {
        b.iter(|| {
            n = (n + 1) % ROTATE;
            for f in &frames[n] {
                dctx.decompress_to_buffer(&f[..], &mut page[..])
                    .expect("a page frame");
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("pages/raw_copy_256");
    short(&mut g);
    g.throughput(Throughput::Bytes(BATCH_BYTES));
    let batches = pool.batches("mixed");
    let mut out = Vec::with_capacity(BATCH * PAGE_SIZE);
    let mut n = 0;
    g.bench_function("mixed", |b| {
        b.iter(|| {
            n = (n + 1) % ROTATE;
            out.clear();
            for p in &batches[n] {
                out.extend_from_slice(&p[..]);
            }
            black_box(out.len())
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let pool = Pool::new();
    eprintln!(
        "pages: pool of {} pages: {} zero, {} text, {} code, {} random",
        pool.all.len(),
        pool.zero.len(),
        pool.text.len(),
        pool.code.len(),
        pool.random.len()
    );
    classify(c, &pool);
    batch_codec(c, &pool);
    codecs(c, &pool);
}

criterion_group!(pages, benches);
criterion_main!(pages);
