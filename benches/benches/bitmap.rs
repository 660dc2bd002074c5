//! The page bitmap of a 1 GiB guest (262 144 pages) at 1%, 10% and 100% of pages set.
//!
//! ```text
//! cargo bench -p ferry-benches --bench bitmap
//! cargo run -p ferry-benches --bin criterion_summary
//! ```
//!
//! Throughputs are in pages (bits): set bits taken or visited for `take` and `iter_ones`,
//! bits covered for `or_masked`; none for `count` (O(1)).

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use ferry_engine::bitmap::Bitmap;

/// Pages of a 1 GiB guest.
const PAGES: u64 = 262_144;
/// Pages per `take` (the engine's default batch).
const TAKE: usize = 256;
const DENSITIES: [u32; 3] = [1, 10, 100];

/// A bitmap of [`PAGES`] bits with about `percent`% set, deterministically scattered.
fn bitmap(percent: u32, seed: u64) -> Bitmap {
    if percent >= 100 {
        return Bitmap::full(PAGES);
    }
    let mut b = Bitmap::new(PAGES);
    let mut x = seed;
    for i in 0..PAGES {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if z % 100 < u64::from(percent) {
            b.set(i);
        }
    }
    b
}

fn short<M: criterion::measurement::Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap/take_sweep_1g");
    short(&mut g);
    for pct in DENSITIES {
        let full = bitmap(pct, u64::from(pct));
        g.throughput(Throughput::Elements(full.count()));
        g.bench_function(format!("{pct}pct"), |b| {
            let mut out = Vec::with_capacity(TAKE);
            b.iter_batched_ref(
                || full.clone(),
                |bm| {
                    let mut cursor = 0;
                    let mut taken = 0;
                    loop {
                        out.clear();
                        let n = bm.take(&mut cursor, TAKE, &mut out);
                        if n == 0 {
                            break;
                        }
                        taken += n;
                        black_box(&out);
                    }
                    taken
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group("bitmap/iter_ones_1g");
    short(&mut g);
    for pct in DENSITIES {
        let bm = bitmap(pct, u64::from(pct));
        g.throughput(Throughput::Elements(bm.count()));
        g.bench_function(format!("{pct}pct"), |b| {
            b.iter(|| black_box(&bm).iter_ones().fold(0u64, |a, i| a ^ i))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("bitmap/1g");
    short(&mut g);
    g.throughput(Throughput::Elements(PAGES));
    // The dirty pages (10%) of a harvest, masked by the pages still to send (50%), ORed
    // into a send set (1%). Its cost does not depend on the densities.
    let dirty = bitmap(10, 1);
    let mask = bitmap(50, 2);
    let mut send = bitmap(1, 3);
    g.bench_function("or_masked", |b| {
        b.iter(|| send.or_masked(black_box(&dirty), black_box(&mask)))
    });
    g.finish();

    // Kept up to date by every change: O(1), no throughput.
    let mut g = c.benchmark_group("bitmap/count");
    short(&mut g);
    g.bench_function("1g", |b| b.iter(|| black_box(&dirty).count()));
    g.finish();
}

criterion_group!(bitmap_benches, benches);
criterion_main!(bitmap_benches);
