//! The policies' forecasts, as the executor asks for them every 100 ms: one forecast, and one
//! with its range (`coordinator::forecast_range`, two forecasts more), halfway through a
//! simulated migration of a 512 MiB guest (131 072 pages) that sweeps all of memory at half
//! the link's rate, the dirty log read between harvests (the sweep followed in its order).
//!
//! ```text
//! cargo bench -p ferry-benches --bench forecast
//! cargo run -p ferry-benches --bin criterion_summary
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ferry_engine::coordinator::sim::{simulate, DirtyModel, Recorder, SimConfig};
use ferry_engine::coordinator::{
    forecast_range, make_policy, Policy, PolicyConfig, PolicyKind, Progress, WriteModel,
};

/// Pages of a 512 MiB guest.
const PAGES: u64 = 131_072;
/// Wire bytes per second of a 1 Gbit/s link.
const LINK: f64 = 118e6;
/// Wire bytes per page (mixed fill, zstd).
const BYTES_PER_PAGE: f64 = 1600.0;

/// `kind`'s policy as it stood halfway through the migration, and the progress it then saw.
fn halfway(kind: PolicyKind) -> (Box<dyn Policy>, Progress) {
    let cfg = PolicyConfig::default();
    let rate = 0.5 * LINK / BYTES_PER_PAGE;
    let sim = SimConfig {
        pages: PAGES,
        bandwidth: LINK,
        bytes_per_page: BYTES_PER_PAGE,
        dirty: DirtyModel::Sequential {
            rate,
            working_set: PAGES,
        },
        writes: Some(WriteModel {
            rate: 0.0,
            wss: 0.0,
            drift: rate,
            memory: PAGES as f64,
            touched: None,
        }),
        read_log: true,
        warmup: Duration::from_millis(500),
        max_time: Duration::from_secs(60),
        ..SimConfig::default()
    };
    let mut rec = Recorder::new(make_policy(kind, &cfg));
    simulate(sim, &mut rec);
    let mut policy = make_policy(kind, &cfg);
    for (p, d) in &rec.log {
        if policy.forecast(p).fraction_done >= 0.5 {
            return (policy, p.clone());
        }
        assert_eq!(&policy.decide(p), d);
    }
    panic!("{kind}: never halfway");
}

fn forecasts(c: &mut Criterion) {
    let mut group = c.benchmark_group("forecast");
    for kind in PolicyKind::ALL {
        let (policy, p) = halfway(kind);
        group.bench_function(format!("{kind}/one"), |b| {
            b.iter(|| black_box(policy.forecast(black_box(&p))))
        });
        group.bench_function(format!("{kind}/with_range"), |b| {
            b.iter(|| {
                let f = policy.forecast(black_box(&p));
                black_box(forecast_range(&*policy, &p, &f))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forecasts);
criterion_main!(benches);
