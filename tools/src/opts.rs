//! Options shared by several subcommands, and their parsing.

use std::time::Duration;

use clap::Args;
use ferry_engine::coordinator::{OnLimit, Overcommit, PolicyConfig, PolicyKind};
use ferry_engine::digest::VerifyMode;
use ferry_engine::guest::{Fill, GuestParams, Workload};
use ferry_engine::host::GuestSpec;
use ferry_engine::source::SourceConfig;
use serde::{Deserialize, Serialize};

/// Parses a size such as `4096`, `64M`, `1G`, `1GiB`, `512MiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: f64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (use K, M, G, T)")),
    };
    Ok((n * mult as f64) as u64)
}

/// Parses a rate in bytes/s (`500M`, `1G`) or bits/s (`800mbit`, `1gbit`, decimal units).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    for (suffix, mult) in [
        ("gbit", 1e9 / 8.0),
        ("mbit", 1e6 / 8.0),
        ("kbit", 1e3 / 8.0),
    ] {
        if let Some(n) = t.strip_suffix(suffix) {
            let v: f64 = n.parse().map_err(|_| format!("not a rate: {s:?}"))?;
            return Ok(v * mult);
        }
    }
    parse_size(s).map(|b| b as f64)
}

/// Parses seconds, fractional allowed (`0.5`, `3`).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("not a number of seconds: {s:?}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))
}

/// The guest to run.
#[derive(Args, Clone, Debug)]
pub struct GuestOpts {
    /// Guest memory size (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Largest memory region (one KVM slot each; a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub region: u64,
    /// What the guest does: idle, dirty-all, seq, random, hotcold.
    #[arg(long, default_value = "hotcold")]
    pub workload: Workload,
    /// Working set per vCPU (0 = all of its memory).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub wss: u64,
    /// Hot set per vCPU for hotcold (0 = a sixteenth of the working set).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub hot: u64,
    /// Page writes per second per vCPU (0 = as fast as the vCPU goes).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Initial memory content: zero, or mixed (zero, text, code and random pages).
    #[arg(long, default_value = "mixed")]
    pub fill: Fill,
    /// Seed of the fill and of the random workloads.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl GuestOpts {
    pub fn spec(&self) -> GuestSpec {
        let fill = match self.fill {
            Fill::Mixed { .. } => Fill::Mixed { seed: self.seed },
            f => f,
        };
        GuestSpec {
            mem_bytes: self.mem,
            region_bytes: self.region,
            guest: GuestParams {
                workload: self.workload,
                wss_bytes: self.wss,
                rate_pages_per_s: self.rate,
                fill,
                vcpus: self.vcpus,
                hot_bytes: self.hot,
                seed: self.seed,
                ..GuestParams::default()
            },
        }
    }
}

/// How to migrate.
#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct MigrateOpts {
    /// membound (memory-bound pre-copy with hot-page deferral and a throttled tail, the
    /// default), mplm (memory-bound pre-copy as published), timebound (TLM: mass transfer plus
    /// a dirty-page sender), precopy (classic, the baseline) or autoconverge (precopy with
    /// QEMU's vCPU throttling).
    #[arg(long, default_value = "membound")]
    pub policy: PolicyKind,
    /// Compare memory digests at switchover: full (the source hashes its pages while the VM
    /// runs and again at the pause those the dirty log saw change), reread (both sides hash
    /// all of memory in the downtime, trusting no log), sample (one page in 16), off.
    #[arg(long, default_value = "full")]
    pub verify: VerifyMode,
    /// Seconds between dirty-log harvests (default: 3 for membound and mplm, 1 for
    /// timebound).
    #[arg(long, value_parser = parse_secs)]
    pub epoch: Option<Duration>,
    /// Pages per multiplexing cycle (membound, mplm, timebound) or per chunk (precopy).
    #[arg(long, default_value_t = 100)]
    pub cycle_pages: u64,
    /// Share of each cycle given to dirty pages (mplm; membound's largest; default 0.5, 0.2
    /// for timebound).
    #[arg(long)]
    pub dirty_share: Option<f64>,
    /// Downtime target in milliseconds (precopy, autoconverge).
    #[arg(long, default_value_t = 300)]
    pub max_downtime: u64,
    /// Membound: page-transfer downtime in milliseconds above which the tail of the live phase
    /// throttles the vCPUs and resends the dirty set (within the bound).
    #[arg(long, default_value_t = 20)]
    pub target_downtime: u64,
    /// CPU over-commit: pack the vCPU threads onto this many cores during the live phase
    /// (given back at switchover).
    #[arg(long)]
    pub overcommit: Option<usize>,
    /// Progress fraction (0..1) from which --overcommit applies.
    #[arg(long, default_value_t = 0.0, requires = "overcommit")]
    pub overcommit_at: f64,
    /// Remove one core per harvest down to --overcommit, instead of all at once.
    #[arg(long, requires = "overcommit")]
    pub overcommit_step: bool,
    /// Most dirty passes (precopy) before --on-limit applies.
    #[arg(long, default_value_t = 30)]
    pub max_epochs: u32,
    /// Seconds after which --on-limit applies (default: none).
    #[arg(long, value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// What a limit does: switchover (force it) or abort (keep the VM on the source).
    #[arg(long, default_value = "switchover", value_parser = parse_on_limit)]
    pub on_limit: OnLimit,
    /// Pages per batch message.
    #[arg(long, default_value_t = 256)]
    pub batch_pages: usize,
    /// A lane: LOCAL=REMOTE:PORT (LOCAL an address or interface of this host), one TCP
    /// connection leaving through that NIC. Repeat for several NICs.
    #[arg(long)]
    pub lane: Vec<String>,
    /// A lane leaving through interface IF to --to (shorthand for --lane IF=TO). Repeat
    /// for several NICs.
    #[arg(long)]
    pub nic: Vec<String>,
    /// Without --lane: how many lanes (TCP connections) to open to --to.
    #[arg(long, default_value_t = 1)]
    pub lanes: usize,
    /// Seconds a lane's data may stay unacknowledged before the lane is declared dead and
    /// its batches are resent on the others (TCP_USER_TIMEOUT).
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub lane_timeout: Duration,
    /// Cap on the aggregate wire rate, e.g. 500M (bytes/s) or 2gbit; the bound uses the
    /// lower of the cap and the measured rate.
    #[arg(long, value_parser = parse_rate)]
    pub max_bandwidth: Option<f64>,
    /// Size of the guest-memory ranges workers are given (placement granularity).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub range: u64,
    /// Range workers on the source (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Compress pages: auto (measure each codec on a sample of pages and the lanes, use the
    /// one that moves the most pages per second, and keep measuring while the VM runs),
    /// zstd (or on), lz4, off.
    #[arg(long, default_value = "auto")]
    pub compress: ferry_engine::source::CompressMode,
    /// zstd level for page compression.
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    /// Deliberate fault, for testing rollback: gpa-outside-memory, truncated-batch, corrupt-page, drop-page.
    #[arg(long, hide = true, value_parser = parse_fault)]
    #[serde(default)]
    pub inject_fault: Option<ferry_engine::source::Fault>,
}

fn parse_on_limit(s: &str) -> Result<OnLimit, String> {
    match s {
        "switchover" => Ok(OnLimit::Switchover),
        "abort" => Ok(OnLimit::Abort),
        _ => Err(format!("{s:?}: expected switchover or abort")),
    }
}

fn parse_fault(s: &str) -> Result<ferry_engine::source::Fault, String> {
    use ferry_engine::source::Fault;
    match s {
        "gpa-outside-memory" => Ok(Fault::GpaOutsideMemory),
        "truncated-batch" => Ok(Fault::TruncatedBatch),
        "corrupt-page" => Ok(Fault::CorruptPage),
        "drop-page" => Ok(Fault::DropPage),
        _ => Err(format!("unknown fault {s:?}")),
    }
}

impl MigrateOpts {
    pub fn source_config(&self) -> anyhow::Result<SourceConfig> {
        let defaults = PolicyConfig::default();
        let overcommit = self.overcommit.map(|cores| Overcommit {
            cores,
            at: self.overcommit_at,
            stepwise: self.overcommit_step,
            from: ferry_engine::topo::current_affinity().map_or(cores, |c| c.len()),
        });
        let policy_cfg = PolicyConfig {
            cycle_pages: self.cycle_pages,
            dirty_share: self.dirty_share.unwrap_or(defaults.dirty_share),
            timebound_dirty_share: self.dirty_share.unwrap_or(defaults.timebound_dirty_share),
            epoch: self.epoch.unwrap_or(defaults.epoch),
            timebound_epoch: self.epoch.unwrap_or(defaults.timebound_epoch),
            target_downtime: Duration::from_millis(self.target_downtime),
            overcommit,
            max_downtime: Duration::from_millis(self.max_downtime),
            max_epochs: self.max_epochs,
            timeout: self.timeout,
            on_limit: self.on_limit,
            ..PolicyConfig::default()
        };
        policy_cfg.validate()?;
        if self.batch_pages == 0 || self.batch_pages > ferry_engine::encode::MAX_BATCH_PAGES {
            anyhow::bail!(
                "--batch-pages must be between 1 and {}",
                ferry_engine::encode::MAX_BATCH_PAGES
            );
        }
        let mut cfg = SourceConfig {
            policy: self.policy,
            policy_cfg,
            verify: self.verify,
            fault: self.inject_fault,
            ..SourceConfig::default()
        };
        cfg.encoder.zstd_level = self.zstd_level;
        cfg.compress = self.compress;
        cfg.max_bandwidth = self.max_bandwidth;
        if let Some(w) = self.workers {
            anyhow::ensure!(w >= 1, "--workers must be at least 1");
            cfg.workers = w;
        }
        cfg.encoder.max_pages = self.batch_pages;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_secs("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_rate("1gbit").unwrap(), 125e6);
        assert_eq!(parse_rate("500M").unwrap(), (500u64 << 20) as f64);
        assert!(parse_rate("fast").is_err());
    }
}
