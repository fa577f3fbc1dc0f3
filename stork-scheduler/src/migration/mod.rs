//! The migration controller: for each `Migration` not yet final, it connects to the remote
//! cluster of its `ClusterPair`, backs up each of the namespaces' Strata volumes to the pair's
//! bucket (named backups: asking again finds the same one, so a restarted controller resumes),
//! restores each on the remote cluster under the same volume name, creates its PV and PVC
//! there, then copies the namespaces' other resources. Progress is in the Migration's status.

pub mod crd;
pub mod objects;
pub mod storage;

use crate::cluster::DRIVER;
use async_trait::async_trait;
use crd::{ClusterPair, ClusterPairStatus, Migration, MigrationResource, MigrationStatus, MigrationVolume};
use k8s_openapi::api::core::v1 as core;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use storage::CloudSnaps;
use strata_api::v1 as pb;

/// Looks in a row at a running backup that may fail before the volume fails.
const MISSES: u32 = 30;

/// Labels the engine puts on a volume restored from the cloud.
const RESTORED_FROM: &str = "strata.dev/restored-from";
const RESTORING: &str = "strata.dev/restoring";

/// How a client of the remote cluster's API server is made from its kubeconfig.
#[async_trait]
pub trait RemoteKube: Send + Sync {
    async fn client(&self, kubeconfig: &str) -> Result<kube::Client, String>;
}

/// The kubeconfig's current context.
pub struct FromKubeconfig;

#[async_trait]
impl RemoteKube for FromKubeconfig {
    async fn client(&self, kubeconfig: &str) -> Result<kube::Client, String> {
        let kc = kube::config::Kubeconfig::from_yaml(kubeconfig).map_err(|e| format!("the remote kubeconfig does not parse: {e}"))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.map_err(|e| format!("the remote kubeconfig: {e}"))?;
        kube::Client::try_from(cfg).map_err(|e| format!("a client of the remote cluster: {e}"))
    }
}

/// A ClusterPair, connected.
struct Pair {
    kube: kube::Client,
    storage: Arc<dyn CloudSnaps>,
    credential: String,
}

pub struct Migrator {
    /// This cluster's API server.
    pub local: kube::Client,
    /// This cluster's Strata SDK, as an admin (backups of any owner's volumes).
    pub storage: Arc<dyn CloudSnaps>,
    pub remote_kube: Arc<dyn RemoteKube>,
    /// How often a running backup is looked at.
    pub poll: Duration,
}

/// A bound PVC of our driver in a migrated namespace.
struct Claim {
    pvc: Value,
    pv: Value,
    volume: String,
}

fn err(what: &str) -> impl Fn(kube::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// A name for the credential a pair's object store becomes on both clusters: the pair's name
/// and a digest of the store's settings, so a changed Secret makes a new credential.
fn credential_name(pair: &str, fields: &BTreeMap<String, String>) -> String {
    // FNV-1a: stable across builds and platforms (the name must not change with the binary).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in fields {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("pair-{pair}-{:08x}", h as u32)
}

/// A Secret's data as text.
fn secret_data(s: core::Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> =
        s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())).collect();
    out.extend(s.string_data.unwrap_or_default());
    out
}

impl Migrator {
    async fn secret(&self, ns: &str, name: &str, what: &str) -> Result<BTreeMap<String, String>, String> {
        let api: Api<core::Secret> = Api::namespaced(self.local.clone(), ns);
        let s = api.get_opt(name).await.map_err(err(&format!("reading Secret {ns}/{name}")))?;
        s.map(secret_data).ok_or_else(|| format!("the {what} Secret {ns}/{name} does not exist"))
    }

    /// Connects to a ClusterPair's cluster and makes sure both clusters hold its credential.
    async fn connect(&self, ns: &str, name: &str) -> Result<Pair, String> {
        let api: Api<ClusterPair> = Api::namespaced(self.local.clone(), ns);
        let cp = api.get_opt(name).await.map_err(err(&format!("reading ClusterPair {ns}/{name}")))?;
        let cp = cp.ok_or_else(|| format!("ClusterPair {ns}/{name} does not exist"))?;
        let result = self.connect_pair(ns, name, &cp).await;
        let status = match &result {
            Ok(p) => ClusterPairStatus {
                storage_status: "Ready".into(),
                scheduler_status: "Ready".into(),
                credential: p.credential.clone(),
                message: String::new(),
            },
            Err(failed) => failed.clone(),
        };
        if cp.status.as_ref() != Some(&status) {
            let patch = Patch::Merge(json!({"status": status}));
            if let Err(e) = api.patch_status(name, &PatchParams::default(), &patch).await {
                tracing::warn!(pair = %name, "ClusterPair status not written: {e}");
            }
        }
        result.map_err(|failed| format!("ClusterPair {ns}/{name}: {}", failed.message))
    }

    /// Connects to a pair's cluster; when that fails, the pair's status saying which side
    /// failed and why.
    async fn connect_pair(&self, ns: &str, name: &str, cp: &ClusterPair) -> Result<Pair, ClusterPairStatus> {
        let scheduler_failed = |message: String| ClusterPairStatus {
            scheduler_status: "Error".into(),
            storage_status: String::new(),
            credential: String::new(),
            message,
        };
        let storage_failed = |message: String| ClusterPairStatus {
            scheduler_status: "Ready".into(),
            storage_status: "Error".into(),
            credential: String::new(),
            message,
        };
        let kubeconfig = self.secret(ns, &cp.spec.kubeconfig_secret, "kubeconfig").await.map_err(scheduler_failed)?;
        let kubeconfig = kubeconfig
            .get("kubeconfig")
            .ok_or_else(|| scheduler_failed(format!("Secret {ns}/{} has no `kubeconfig` key", cp.spec.kubeconfig_secret)))?;
        let kube = self.remote_kube.client(kubeconfig).await.map_err(scheduler_failed)?;
        kube.apiserver_version().await.map_err(|e| scheduler_failed(format!("the remote API server does not answer: {e}")))?;
        let sdk_secret = match &cp.spec.remote_storage.secret {
            Some(s) => self.secret(ns, s, "remote storage").await.map_err(storage_failed)?,
            None => BTreeMap::new(),
        };
        let remote = remote_sdk(&cp.spec.remote_storage.endpoint, &sdk_secret).map_err(storage_failed)?;
        let store = self.secret(ns, &cp.spec.object_store.secret, "object store").await.map_err(storage_failed)?;
        let credential = credential_name(name, &store);
        let cred = object_store_credential(&credential, &store)
            .map_err(|why| storage_failed(format!("Secret {ns}/{}: {why}", cp.spec.object_store.secret)))?;
        for (side, s) in [("this cluster", &self.storage), ("the remote cluster", &remote)] {
            let have = s.credentials().await.map_err(|e| storage_failed(format!("Strata on {side}: {e}")))?;
            if !have.contains(&credential) {
                s.create_credential(cred.clone()).await.map_err(|e| storage_failed(format!("creating credential {credential} on {side}: {e}")))?;
                tracing::info!(%credential, %side, "object store credential created");
            }
        }
        Ok(Pair { kube, storage: remote, credential })
    }

    /// Runs every Migration that is not final, one after the other; how many ran.
    pub async fn tick(&self) -> Result<usize, String> {
        let all: Api<Migration> = Api::all(self.local.clone());
        let list = all.list(&ListParams::default()).await.map_err(err("listing Migrations"))?;
        let mut ran = 0;
        for m in list.items {
            if m.status.as_ref().is_some_and(|s| s.stage == "Final") {
                continue;
            }
            self.reconcile(&m).await;
            ran += 1;
        }
        Ok(ran)
    }

    /// Runs the controller for the process's life.
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            if let Err(e) = self.tick().await {
                tracing::warn!("migrations: {e}");
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn save(&self, m: &Migration, st: &MigrationStatus) {
        let api: Api<Migration> = Api::namespaced(self.local.clone(), &m.metadata.namespace.clone().unwrap_or_default());
        let name = m.metadata.name.clone().unwrap_or_default();
        if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": st}))).await {
            tracing::warn!(migration = %name, "status not written: {e}");
        }
    }

    /// Takes one Migration as far as it goes: to Final, unless the controller stops first.
    pub async fn reconcile(&self, m: &Migration) -> MigrationStatus {
        let ns = m.metadata.namespace.clone().unwrap_or_default();
        let id = format!("{ns}/{}", m.metadata.name.clone().unwrap_or_default());
        let mut st = m.status.clone().unwrap_or_default();
        st.status = "InProgress".into();
        if st.stage.is_empty() {
            st.stage = "Volumes".into();
        }
        if let Err(why) = self.stages(m, &ns, &id, &mut st).await {
            (st.stage, st.status, st.message) = ("Final".into(), "Failed".into(), why);
            self.save(m, &st).await;
            return st;
        }
        let failed = st.volumes.iter().filter(|v| v.status == "Failed").count() + st.resources.iter().filter(|r| r.status == "Failed").count();
        let done = st.volumes.iter().filter(|v| v.status == "Successful").count() + st.resources.iter().filter(|r| r.status == "Successful").count();
        st.status = match (failed, done) {
            (0, _) => "Successful",
            (_, 0) => "Failed",
            _ => "PartialSuccess",
        }
        .into();
        st.message = format!("{done} migrated, {failed} failed");
        tracing::info!(migration = %id, status = %st.status, "{}", st.message);
        self.save(m, &st).await;
        st
    }

    /// Connects to the pair, then runs the stages left: volumes, then resources. An error
    /// ends the Migration as Failed.
    async fn stages(&self, m: &Migration, ns: &str, id: &str, st: &mut MigrationStatus) -> Result<(), String> {
        let pair = self.connect(ns, &m.spec.cluster_pair).await?;
        self.save(m, st).await;
        if st.stage == "Volumes" {
            self.volumes(m, id, &pair, st).await?;
            st.stage = if m.spec.include_resources { "Resources" } else { "Final" }.into();
            self.save(m, st).await;
        }
        if st.stage == "Resources" {
            self.resources(m, id, &pair, st).await?;
            st.stage = "Final".into();
        }
        Ok(())
    }

    /// The bound PVCs of our driver in the Migration's namespaces.
    async fn claims(&self, m: &Migration) -> Result<Vec<Claim>, String> {
        let mut out = Vec::new();
        let pvs: Api<core::PersistentVolume> = Api::all(self.local.clone());
        for ns in &m.spec.namespaces {
            let api: Api<core::PersistentVolumeClaim> = Api::namespaced(self.local.clone(), ns);
            let list = api.list(&selector(&m.spec.selectors)).await.map_err(err(&format!("listing the PVCs of {ns}")))?;
            for pvc in list.items {
                let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|n| !n.is_empty()) else {
                    continue; // not bound: no data to move yet
                };
                let Some(pv) = pvs.get_opt(&pv_name).await.map_err(err(&format!("reading PV {pv_name}")))? else { continue };
                let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.clone()).filter(|c| c.driver == DRIVER) else {
                    continue; // another driver's volume
                };
                let (pvc, pv) = (serde_json::to_value(&pvc).map_err(|e| e.to_string())?, serde_json::to_value(&pv).map_err(|e| e.to_string())?);
                out.push(Claim { pvc, pv, volume: csi.volume_handle });
            }
        }
        Ok(out)
    }

    async fn volumes(&self, m: &Migration, id: &str, pair: &Pair, st: &mut MigrationStatus) -> Result<(), String> {
        let uid = m.metadata.uid.clone().unwrap_or_default();
        for c in self.claims(m).await? {
            let (ns, claim) = (c.pvc["metadata"]["namespace"].as_str().unwrap_or_default(), c.pvc["metadata"]["name"].as_str().unwrap_or_default());
            let i = match st.volumes.iter().position(|v| v.namespace == ns && v.persistent_volume_claim == claim) {
                Some(i) => i,
                None => {
                    st.volumes.push(MigrationVolume {
                        namespace: ns.into(),
                        persistent_volume_claim: claim.into(),
                        volume: c.volume.clone(),
                        status: "BackingUp".into(),
                        ..Default::default()
                    });
                    st.volumes.len() - 1
                }
            };
            if matches!(st.volumes[i].status.as_str(), "Successful" | "Failed") {
                continue;
            }
            let r = self.volume(m, id, &uid, pair, &c, st, i).await;
            let v = &mut st.volumes[i];
            match r {
                Ok(()) => (v.status, v.reason) = ("Successful".into(), String::new()),
                Err(why) => {
                    tracing::warn!(migration = %id, volume = %c.volume, "not migrated: {why}");
                    (v.status, v.reason) = ("Failed".into(), why);
                }
            }
            self.save(m, st).await;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn volume(&self, m: &Migration, id: &str, uid: &str, pair: &Pair, c: &Claim, st: &mut MigrationStatus, i: usize) -> Result<(), String> {
        // 1. The backup, taken where the volume is.
        let repl = self.storage.volume(&c.volume).await?.ok_or_else(|| format!("volume {} is not in Strata", c.volume))?.repl;
        let name = format!("migration-{uid}-{}", c.volume);
        let job = self.storage.backup(&c.volume, &pair.credential, &name).await.map_err(|e| format!("backup: {e}"))?;
        st.volumes[i].backup = job.id.clone();
        self.save(m, st).await;
        let mut misses = 0;
        loop {
            // A backup outlives a moment without the SDK (an engine restarting): only a long
            // silence fails the volume.
            let j = match self.storage.job(&job.id).await {
                Ok(j) => j,
                Err(e) if misses < MISSES => {
                    misses += 1;
                    tracing::debug!(backup = %job.id, "looking at the backup: {e}");
                    tokio::time::sleep(self.poll).await;
                    continue;
                }
                Err(e) => return Err(format!("backup {}: {e}", job.id)),
            };
            misses = 0;
            st.volumes[i].uploaded_bytes = j.uploaded_bytes;
            match j.state.as_str() {
                "done" => break,
                "failed" => return Err(format!("backup {} failed: {}", j.id, j.error)),
                _ => tokio::time::sleep(self.poll).await,
            }
        }
        // 2. The restore on the remote cluster, under the same name.
        st.volumes[i].status = "Restoring".into();
        self.save(m, st).await;
        loop {
            match pair.storage.volume(&c.volume).await.map_err(|e| format!("the remote cluster: {e}"))?.map(|v| v.labels) {
                None => {
                    // As many replicas as here: the remote cluster needs as many nodes.
                    pair.storage
                        .restore(&pair.credential, &job.id, &c.volume, repl)
                        .await
                        .map_err(|e| format!("restore on the remote cluster: {e}"))?;
                    break;
                }
                Some(l) if l.get(RESTORED_FROM) == Some(&job.id) => {
                    if l.get(RESTORING).is_none_or(|v| v.is_empty()) {
                        break;
                    }
                    tokio::time::sleep(self.poll).await; // an earlier call's restore, still writing
                }
                Some(_) => {
                    return Err(format!(
                        "volume {} already exists on the remote cluster and is not this migration's restore: delete it there, or leave this PVC out",
                        c.volume
                    ))
                }
            }
        }
        // 3. Its PV and PVC there.
        let remote = &pair.kube;
        let ns = c.pvc["metadata"]["namespace"].as_str().unwrap_or_default();
        ensure_namespace(remote, ns).await?;
        let pv_name = c.pv["metadata"]["name"].as_str().unwrap_or_default();
        let pv = objects::remote_pv(&c.pv, &c.pvc, &c.volume, id);
        let pvs: Api<core::PersistentVolume> = Api::all(remote.clone());
        match create(&pvs, &pv).await? {
            None => {}
            Some(have) if have.spec.as_ref().and_then(|s| s.csi.as_ref()).is_some_and(|c2| c2.volume_handle == c.volume) => {}
            Some(_) => return Err(format!("PV {pv_name} already exists on the remote cluster for another volume")),
        }
        let pvc = objects::remote_pvc(&c.pvc, pv_name, id);
        let pvcs: Api<core::PersistentVolumeClaim> = Api::namespaced(remote.clone(), ns);
        match create(&pvcs, &pvc).await? {
            None => {}
            Some(have) if have.spec.as_ref().and_then(|s| s.volume_name.as_deref()) == Some(pv_name) => {}
            Some(_) => {
                return Err(format!("PVC {ns}/{} already exists on the remote cluster, bound elsewhere", st.volumes[i].persistent_volume_claim))
            }
        }
        Ok(())
    }

    async fn resources(&self, m: &Migration, id: &str, pair: &Pair, st: &mut MigrationStatus) -> Result<(), String> {
        for ns in &m.spec.namespaces {
            ensure_namespace(&pair.kube, ns).await?;
            for (group, version, kind, plural) in objects::KINDS {
                let api_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
                let ar = ApiResource { group: group.into(), version: version.into(), api_version, kind: kind.into(), plural: plural.into() };
                let local: Api<DynamicObject> = Api::namespaced_with(self.local.clone(), ns, &ar);
                let remote: Api<DynamicObject> = Api::namespaced_with(pair.kube.clone(), ns, &ar);
                let list = local.list(&selector(&m.spec.selectors)).await.map_err(err(&format!("listing the {plural} of {ns}")))?;
                for obj in list.items {
                    let name = obj.metadata.name.clone().unwrap_or_default();
                    let value = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
                    let Some(copy) = objects::remote_resource(&value, kind, m.spec.start_applications, id) else { continue };
                    let r = apply(&remote, &name, copy).await;
                    let (status, reason) = match r {
                        Ok(()) => ("Successful", String::new()),
                        Err(why) => ("Failed", why),
                    };
                    let entry = MigrationResource { kind: kind.into(), namespace: ns.clone(), name, status: status.into(), reason };
                    match st.resources.iter_mut().find(|r| r.kind == entry.kind && r.namespace == entry.namespace && r.name == entry.name) {
                        Some(r) => *r = entry,
                        None => st.resources.push(entry),
                    }
                }
            }
        }
        Ok(())
    }
}

fn selector(labels: &BTreeMap<String, String>) -> ListParams {
    let lp = ListParams::default();
    if labels.is_empty() {
        return lp;
    }
    lp.labels(&labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

/// The remote SDK from a ClusterPair's endpoint and Secret.
fn remote_sdk(endpoint: &str, secret: &BTreeMap<String, String>) -> Result<Arc<dyn CloudSnaps>, String> {
    if endpoint.is_empty() {
        return Err("spec.remoteStorage.endpoint is empty".into());
    }
    let bearer = strata_api::auth::Bearer::new(secret.get("token").map(|t| t.trim())).map_err(|e| format!("the remote token: {e}"))?;
    let tls = match (secret.get("ca.crt"), secret.get("tls.crt"), secret.get("tls.key")) {
        (None, None, None) => None,
        (Some(ca), None, None) => Some(strata_api::tls::ClientTls::new(ca.as_bytes(), None)),
        (Some(ca), Some(c), Some(k)) => Some(strata_api::tls::ClientTls::new(ca.as_bytes(), Some((c.as_bytes(), k.as_bytes())))),
        _ => return Err("the remote storage Secret needs `ca.crt` for TLS, and `tls.crt` with `tls.key` for a client certificate".into()),
    };
    let tls = tls.transpose().map_err(|e| format!("the remote storage TLS: {e}"))?;
    Ok(Arc::new(crate::storage::Sdk::new(endpoint).with_bearer(bearer).with_tls(tls)))
}

/// The Strata credential of an object-store Secret.
fn object_store_credential(name: &str, s: &BTreeMap<String, String>) -> Result<pb::Credential, String> {
    let need = |k: &str| s.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).ok_or_else(|| format!("`{k}` is missing"));
    Ok(pb::Credential {
        name: name.into(),
        endpoint: need("endpoint")?,
        bucket: need("bucket")?,
        access_key: need("accessKey")?,
        secret_key: need("secretKey")?,
        region: s.get("region").cloned().unwrap_or_default(),
        path_style: s.get("pathStyle").is_some_and(|v| v.trim() == "true"),
        passphrase: s.get("passphrase").cloned().unwrap_or_default(),
        encrypted: false,
    })
}

async fn ensure_namespace(remote: &kube::Client, ns: &str) -> Result<(), String> {
    let api: Api<core::Namespace> = Api::all(remote.clone());
    let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
    create(&api, &obj).await.map(|_| ())
}

/// Creates `obj`; when an object of that name exists, returns it instead (None: created).
async fn create<K>(api: &Api<K>, obj: &Value) -> Result<Option<K>, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let typed: K = serde_json::from_value(obj.clone()).map_err(|e| format!("{name}: {e}"))?;
    match api.create(&PostParams::default(), &typed).await {
        Ok(_) => Ok(None),
        Err(e) if is_status(&e, 409) => api.get(&name).await.map(Some).map_err(err(&format!("reading {name} on the remote cluster"))),
        Err(e) => Err(format!("creating {name} on the remote cluster: {e}")),
    }
}

/// Creates `obj`, or replaces the object of its name.
async fn apply(api: &Api<DynamicObject>, name: &str, obj: Value) -> Result<(), String> {
    let Some(have) = create(api, &obj).await? else { return Ok(()) };
    let mut obj: DynamicObject = serde_json::from_value(obj).map_err(|e| e.to_string())?;
    obj.metadata.resource_version = have.metadata.resource_version;
    api.replace(name, &PostParams::default(), &obj).await.map(|_| ()).map_err(err(&format!("replacing {name} on the remote cluster")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_name_follows_the_object_store_settings() {
        let a: BTreeMap<String, String> = [("bucket".to_string(), "b".to_string()), ("secretKey".into(), "s".into())].into();
        let mut b = a.clone();
        assert_eq!(credential_name("p", &a), credential_name("p", &b));
        b.insert("secretKey".into(), "t".into());
        assert_ne!(credential_name("p", &a), credential_name("p", &b));
        assert!(credential_name("p", &a).starts_with("pair-p-"));
    }

    #[test]
    fn an_object_store_secret_without_keys_is_refused_by_name() {
        let s: BTreeMap<String, String> = [("endpoint".to_string(), "http://s3".to_string()), ("bucket".into(), "b".into())].into();
        assert_eq!(object_store_credential("c", &s).unwrap_err(), "`accessKey` is missing");
    }
}
