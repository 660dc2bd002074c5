//! RDMA verbs (InfiniBand, RoCE), behind the `rdma` cargo feature.
//!
//! Status: this is the seam for the RDMA backend of the design (one lane per queue pair,
//! later one-sided writes into destination guest memory). What exists today is device
//! discovery through `ibverbs`, so that the verbs stack is built in CI. Nothing here has run
//! against hardware: the development and CI machines have no RDMA device and no `rdma_rxe`.

/// An RDMA device as the verbs library reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// Node GUID, hex.
    pub guid: Option<String>,
}

/// Errors of the RDMA backend.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("listing RDMA devices (ibv_get_device_list)")]
    List(#[source] std::io::Error),
}

/// The RDMA devices of this host (none is not an error, nor is a kernel without the RDMA
/// subsystem, which the verbs library reports as `ENOSYS`).
pub fn devices() -> Result<Vec<Device>, RdmaError> {
    let list = match ibverbs::devices() {
        Ok(l) => l,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(Vec::new()),
        Err(e) => return Err(RdmaError::List(e)),
    };
    Ok(list
        .iter()
        .map(|d| Device {
            name: d
                .name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            guid: d.guid().ok().map(|g| format!("{g:?}")),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: without a device the list is empty, with one it has a name. A test
    /// that needs a device selects it with `FERRY_RDMA_DEVICE` and fails loudly when it is
    /// absent.
    #[test]
    fn device_list_is_readable() {
        let devs = devices().expect("ibv_get_device_list");
        if let Ok(want) = std::env::var("FERRY_RDMA_DEVICE") {
            assert!(
                devs.iter().any(|d| d.name == want),
                "FERRY_RDMA_DEVICE={want} is not among {devs:?}"
            );
        }
        assert!(devs.iter().all(|d| !d.name.is_empty()));
    }
}
