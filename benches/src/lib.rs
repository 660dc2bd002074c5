//! ferry's benchmarks: criterion micro-benchmarks (`benches/`, summarised as JSON lines and a
//! markdown table by `src/bin/criterion_summary.rs`) and the whole-migration matrix
//! (`src/bin/matrix.rs`), which prints machine-readable results.
