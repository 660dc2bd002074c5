//! ferry's engine: everything about a VM and its migration.
//!
//! The micro-VM ([`vm`]) runs guest programs ([`guest`]) in anonymous memory ([`memory`]),
//! with KVM's dirty log ([`dirty`]). The source ([`source`]) encodes pages ([`encode`]) and
//! sends them over transport lanes as the coordinator ([`coordinator`]) decides; the
//! destination ([`dest`]) validates, decodes and writes them, compares digests ([`digest`])
//! and resumes the VM. Every migration produces a [`report::Report`].

pub mod bitmap;
pub mod coordinator;
pub mod cpu;
pub mod dest;
pub mod digest;
pub mod dirty;
pub mod encode;
pub mod guest;
pub mod host;
pub mod memory;
pub mod proto;
pub mod report;
pub mod source;
mod threads;
pub mod topo;
pub mod vm;
