//! `strata-operator uninstall`: run by the chart's pre-delete hook, so that `helm uninstall`
//! works whether or not the StorageCluster was deleted first. It deletes the StorageCluster and
//! waits until the operator (still running: pre-delete hooks run before the release's objects
//! go) has finalized it — cluster-scoped objects (CSIDriver, StorageClasses, roles) removed —
//! instead of leaving it stuck on its finalizer once the operator is gone.

use crate::crd::StorageCluster;
use kube::api::{Api, DeleteParams};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("StorageCluster {0} still exists after {1} s: is the operator running? Look at `kubectl -n {2} get storagecluster {0} -o yaml` (status and finalizers)")]
    Timeout(String, u64, String),
}

/// Deletes StorageCluster `name` in `ns` (nothing to do when it is gone) and waits, polling every
/// `poll`, until it no longer exists or `timeout` passes.
pub async fn uninstall(client: kube::Client, ns: &str, name: &str, timeout: Duration, poll: Duration) -> Result<(), UninstallError> {
    let api: Api<StorageCluster> = Api::namespaced(client, ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(storagecluster = %name, "deleting the StorageCluster; waiting for the operator to finalize it"),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::info!(storagecluster = %name, "no StorageCluster to delete");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    let t0 = Instant::now();
    loop {
        if api.get_opt(name).await?.is_none() {
            tracing::info!(storagecluster = %name, "StorageCluster finalized and gone");
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            return Err(UninstallError::Timeout(name.into(), timeout.as_secs(), ns.into()));
        }
        tokio::time::sleep(poll).await;
    }
}
