//! ferry's benchmarks: criterion micro-benchmarks (`benches/`) and the whole-migration
//! matrix (`src/bin/matrix.rs`), which prints machine-readable results.
