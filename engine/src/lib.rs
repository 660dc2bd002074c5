//! ferry's engine: everything about a VM and its migration.
//!
//! The micro-VM ([`vm`]) runs guest programs ([`guest`]) in memfd-backed memory ([`memory`]),
//! with KVM's dirty log ([`dirty`]). The source ([`source`]) encodes pages ([`encode`]) and sends
//! them over transport lanes as the coordinator ([`coordinator`]) decides; the destination
//! ([`dest`]) validates, decodes and writes them, and resumes the VM.

pub mod coordinator;
pub mod encode;
pub mod guest;
pub mod memory;
