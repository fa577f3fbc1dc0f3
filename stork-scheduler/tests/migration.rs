//! The migration controller against two tower-test mocks of API servers (each an in-memory
//! object store answering kube-rs's calls) and two real Strata clusters (their own etcd and
//! engines) sharing a real S3 server (s3s-fs): a namespace's volumes arrive bit-exact on the
//! other cluster, bound to PVs and PVCs there, beside copies of its other resources.

use base64::Engine as _;
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strata_e2e::cluster::Cluster;
use strata_e2e::nbd::Client;
use strata_e2e::s3::S3;
use strata_stork::migration::{storage::CloudSnaps, Migrator, RemoteKube};
use tower_test::mock;

const MIB: u64 = 1 << 20;
const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\n# the remote cluster\n";

/// An API server's objects, keyed by (group/version/plural, namespace, name), and the calls
/// it answered.
#[derive(Default)]
struct Store {
    objects: BTreeMap<(String, String, String), Value>,
    calls: Vec<(Method, String)>,
    version: u64,
}

type Shared = Arc<Mutex<Store>>;

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message})
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        obj["metadata"]["labels"][k] == v
    })
}

fn decode(s: &str) -> String {
    s.replace("%3D", "=").replace("%2C", ",").replace("%2F", "/")
}

/// (group/version/plural, namespace, name, subresource) of an API path.
fn parse(path: &str) -> Option<(String, String, String, String)> {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (gv, rest) = match seg.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let at = |i: usize| rest.get(i).map(|s| s.to_string()).unwrap_or_default();
    Some((format!("{gv}/{}", at(0)), ns, at(1), at(2)))
}

async fn answer(store: &Shared, req: Request<Body>) -> (u16, Value) {
    let (method, path, query) = (req.method().clone(), req.uri().path().to_string(), decode(req.uri().query().unwrap_or_default()));
    let body = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 1 << 24).await.unwrap();
    let mut s = store.lock().unwrap();
    s.calls.push((method.clone(), path.clone()));
    if path == "/version" {
        return (
            200,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
        );
    }
    let Some((res, ns, name, _sub)) = parse(&path) else { return (404, status(404, "NotFound", &path)) };
    let key = (res.clone(), ns.clone(), name.clone());
    s.version += 1;
    let version = s.version.to_string();
    match method {
        Method::GET if name.is_empty() => {
            let selector = query.split('&').find_map(|q| q.strip_prefix("labelSelector=")).unwrap_or_default().to_string();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, n, _), o)| *r == res && (ns.is_empty() || *n == ns) && labels_match(o, &selector))
                .map(|(_, o)| o.clone())
                .collect();
            (200, json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version}, "items": items}))
        }
        Method::GET => match s.objects.get(&key) {
            Some(o) => (200, o.clone()),
            None => (404, status(404, "NotFound", &format!("{name} not found"))),
        },
        Method::POST => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let key = (res, ns.clone(), name.clone());
            if s.objects.contains_key(&key) {
                return (409, status(409, "AlreadyExists", &format!("{name} already exists")));
            }
            if !ns.is_empty() {
                obj["metadata"]["namespace"] = json!(ns);
            }
            obj["metadata"]["uid"] = json!(format!("uid-{version}"));
            obj["metadata"]["resourceVersion"] = json!(version);
            s.objects.insert(key, obj.clone());
            (201, obj)
        }
        Method::PUT => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            if !s.objects.contains_key(&key) {
                return (404, status(404, "NotFound", &name));
            }
            obj["metadata"]["resourceVersion"] = json!(version);
            s.objects.insert(key, obj.clone());
            (200, obj)
        }
        Method::PATCH => {
            let patch: Value = serde_json::from_slice(&body).unwrap();
            let Some(obj) = s.objects.get_mut(&key) else { return (404, status(404, "NotFound", &name)) };
            merge(obj, &patch);
            (200, obj.clone())
        }
        Method::DELETE => match s.objects.remove(&key) {
            Some(o) => (200, o),
            None => (404, status(404, "NotFound", &name)),
        },
        _ => (405, status(405, "MethodNotAllowed", method.as_str())),
    }
}

/// A kube client whose API server is `store` (call inside a runtime).
fn api_server(store: Shared) -> kube::Client {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (code, body) = answer(&store, req).await;
            send.send_response(Response::builder().status(code).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap());
        }
    });
    kube::Client::new(svc, "default")
}

fn put(store: &Shared, res: &str, obj: Value) {
    let m = &obj["metadata"];
    let key = (res.to_string(), m["namespace"].as_str().unwrap_or_default().to_string(), m["name"].as_str().unwrap().to_string());
    store.lock().unwrap().objects.insert(key, obj);
}

fn get(store: &Shared, res: &str, ns: &str, name: &str) -> Option<Value> {
    store.lock().unwrap().objects.get(&(res.to_string(), ns.to_string(), name.to_string())).cloned()
}

fn secret(store: &Shared, ns: &str, name: &str, data: &[(&str, &str)]) {
    let enc = base64::engine::general_purpose::STANDARD;
    let data: serde_json::Map<String, Value> = data.iter().map(|(k, v)| (k.to_string(), json!(enc.encode(v)))).collect();
    put(
        store,
        "v1/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "type": "Opaque", "data": data}),
    );
}

fn claim(store: &Shared, ns: &str, name: &str, pv: &str, driver: &str) {
    put(
        store,
        "v1/persistentvolumeclaims",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "shop"}, "annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}, "storageClassName": "strata-repl1", "volumeName": pv},
            "status": {"phase": "Bound"}}),
    );
    put(
        store,
        "v1/persistentvolumes",
        json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "16Mi"}, "accessModes": ["ReadWriteOnce"], "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "strata-repl1", "csi": {"driver": driver, "volumeHandle": pv, "fsType": "ext4"},
                "claimRef": {"namespace": ns, "name": name, "uid": "claim-uid"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["a-1"]}]}]}}},
            "status": {"phase": "Bound"}}),
    );
}

fn credentials_key() -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("credentials.key");
    std::fs::write(&key, strata_e2e::pseudo_random(3, 32)).unwrap();
    let s = key.to_str().unwrap().to_string();
    (d, s)
}

fn cluster(n: usize, key: &str) -> Cluster {
    Cluster::start_with(n, "256MiB", &["--credentials-key-file", key])
}

/// The whole volume through engine 0's NBD.
fn image(c: &Cluster, vol: &str, size: u64) -> Vec<u8> {
    let mut n = Client::connect(&c.engines[0].nbd, vol).unwrap();
    let out = (0..size).step_by(4 * MIB as usize).flat_map(|off| n.read(off, 4 * MIB as u32).unwrap()).collect();
    n.disconnect();
    out
}

fn fill(c: &Cluster, vol: &str, size: u64, seed: u64) {
    fill_repl(c, vol, size, seed, 1)
}

fn fill_repl(c: &Cluster, vol: &str, size: u64, seed: u64, repl: u32) {
    c.sdk(0).create_full(vol, size, repl, &[]).unwrap();
    let mut n = Client::connect(&c.engines[0].nbd, vol).unwrap();
    for mib in (0..size / MIB).step_by(3) {
        assert_eq!(n.write(mib * MIB, &strata_e2e::pseudo_random(seed + mib, MIB as usize), 0), 0);
    }
    n.disconnect();
}

/// Hands out the remote mock, after checking it was given the pair's kubeconfig.
struct Remote(kube::Client);

#[async_trait::async_trait]
impl RemoteKube for Remote {
    async fn client(&self, kubeconfig: &str) -> Result<kube::Client, String> {
        assert_eq!(kubeconfig, KUBECONFIG);
        Ok(self.0.clone())
    }
}

/// This cluster's SDK, whose first `job` looks fail (an engine restarting mid-backup).
struct Flaky {
    inner: Arc<dyn CloudSnaps>,
    fails: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl CloudSnaps for Flaky {
    async fn credentials(&self) -> Result<Vec<String>, String> {
        self.inner.credentials().await
    }
    async fn create_credential(&self, c: strata_api::v1::Credential) -> Result<(), String> {
        self.inner.create_credential(c).await
    }
    async fn backup(&self, volume: &str, credential: &str, name: &str) -> Result<strata_api::v1::CloudJob, String> {
        self.inner.backup(volume, credential, name).await
    }
    async fn job(&self, id: &str) -> Result<strata_api::v1::CloudJob, String> {
        let left = self.fails.load(std::sync::atomic::Ordering::Relaxed);
        if left > 0 {
            self.fails.store(left - 1, std::sync::atomic::Ordering::Relaxed);
            return Err("Strata SDK unreachable".into());
        }
        self.inner.job(id).await
    }
    async fn restore(&self, credential: &str, id: &str, name: &str, repl: u32) -> Result<(), String> {
        self.inner.restore(credential, id, name, repl).await
    }
    async fn volume(&self, name: &str) -> Result<Option<strata_stork::migration::storage::VolumeFacts>, String> {
        self.inner.volume(name).await
    }
}

fn sdk_of(c: &Cluster) -> Arc<dyn CloudSnaps> {
    Arc::new(strata_stork::storage::Sdk::new(&c.engines[0].sdk).with_tls(c.engines[0].client_tls()))
}

/// The pair's Secrets and the ClusterPair `remote` in namespace `shop`, for cluster `b`.
fn pair(local: &Shared, s3: &S3, b: &Cluster, secret_key: &str) {
    let tls = b.engines[0].tls_dir().unwrap();
    let read = |f: &str| std::fs::read_to_string(tls.join(f)).unwrap();
    secret(local, "shop", "remote-kubeconfig", &[("kubeconfig", KUBECONFIG)]);
    secret(local, "shop", "remote-strata", &[("ca.crt", &read("ca.crt")), ("tls.crt", &read("node.crt")), ("tls.key", &read("node.key"))]);
    let store = [
        ("endpoint", s3.url.as_str()),
        ("bucket", "backups"),
        ("accessKey", "AKSTRATA"),
        ("secretKey", secret_key),
        ("pathStyle", "true"),
        ("passphrase", "migrate me"),
    ];
    secret(local, "shop", "bucket", &store);
    put(
        local,
        "stork.strata.dev/v1alpha1/clusterpairs",
        json!({"apiVersion": "stork.strata.dev/v1alpha1", "kind": "ClusterPair", "metadata": {"name": "remote", "namespace": "shop"},
            "spec": {"kubeconfigSecret": "remote-kubeconfig", "remoteStorage": {"endpoint": b.engines[0].sdk, "secret": "remote-strata"}, "objectStore": {"secret": "bucket"}}}),
    );
}

fn migration(local: &Shared, name: &str, pair: &str, start: bool) {
    put(
        local,
        "stork.strata.dev/v1alpha1/migrations",
        json!({"apiVersion": "stork.strata.dev/v1alpha1", "kind": "Migration", "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
            "spec": {"clusterPair": pair, "namespaces": ["shop"], "startApplications": start}}),
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn a_namespace_moves_to_another_cluster_with_its_volumes_bit_exact_and_its_resources() {
    let Some(s3) = S3::start() else { return };
    let (_ka, key_a) = credentials_key();
    let (_kb, key_b) = credentials_key();
    let (a, b) = (cluster(2, &key_a), cluster(2, &key_b));
    fill_repl(&a, "pvc-aaa", 16 * MIB, 100, 2);
    fill(&a, "pvc-bbb", 8 * MIB, 200);
    let want = (image(&a, "pvc-aaa", 16 * MIB), image(&a, "pvc-bbb", 8 * MIB));
    // An application keeps pvc-aaa open while it moves.
    let app = Client::connect(&a.engines[0].nbd, "pvc-aaa").unwrap();

    let (local, remote): (Shared, Shared) = Default::default();
    pair(&local, &s3, &b, "SKSTRATA");
    claim(&local, "shop", "data", "pvc-aaa", "csi.strata.dev");
    claim(&local, "shop", "logs", "pvc-bbb", "csi.strata.dev");
    claim(&local, "shop", "shared", "nfs-1", "nfs.csi.k8s.io");
    put(
        &local,
        "v1/persistentvolumeclaims",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "pending", "namespace": "shop"}, "spec": {}}),
    );
    put(
        &local,
        "v1/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "shop"}, "data": {"mode": "prod"}}),
    );
    put(
        &local,
        "v1/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt", "namespace": "shop"}, "data": {}}),
    );
    put(
        &local,
        "v1/services",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"clusterIP": "10.0.0.7", "ports": [{"port": 80}]}}),
    );
    put(
        &local,
        "apps/v1/deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop", "uid": "d-1"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}}},
            "status": {"readyReplicas": 3}}),
    );
    migration(&local, "move", "remote", false);
    // The remote cluster already runs this Deployment: it is replaced, not duplicated.
    put(
        &remote,
        "apps/v1/deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "1"}, "spec": {"replicas": 1}}),
    );

    let rt = runtime();
    let (ran, again) = rt.block_on(async {
        let m = Migrator {
            local: api_server(local.clone()),
            // The SDK does not answer the first looks at a backup: the volume still moves.
            storage: Arc::new(Flaky { inner: sdk_of(&a), fails: 5.into() }),
            remote_kube: Arc::new(Remote(api_server(remote.clone()))),
            poll: Duration::from_millis(100),
        };
        (m.tick().await.unwrap(), m.tick().await.unwrap())
    });
    assert_eq!((ran, again), (1, 0), "one Migration ran; once final it is left alone");
    drop(app);

    let st = get(&local, "stork.strata.dev/v1alpha1/migrations", "shop", "move").unwrap()["status"].clone();
    assert_eq!((st["stage"].as_str(), st["status"].as_str()), (Some("Final"), Some("Successful")), "{st:#}");
    let vols = st["volumes"].as_array().unwrap();
    let names: Vec<_> =
        vols.iter().map(|v| (v["persistentVolumeClaim"].as_str().unwrap(), v["volume"].as_str().unwrap(), v["status"].as_str().unwrap())).collect();
    assert_eq!(names, [("data", "pvc-aaa", "Successful"), ("logs", "pvc-bbb", "Successful")], "another driver's and an unbound claim stay: {st:#}");
    assert!(vols.iter().all(|v| !v["backup"].as_str().unwrap().is_empty() && v["uploadedBytes"].as_u64().unwrap() > 0), "{st:#}");
    let res: Vec<_> = st["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["name"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        res,
        [
            ("ConfigMap", "settings", "Successful"),
            ("Secret", "bucket", "Successful"),
            ("Secret", "remote-kubeconfig", "Successful"),
            ("Secret", "remote-strata", "Successful"),
            ("Service", "web", "Successful"),
            ("Deployment", "web", "Successful")
        ]
    );
    let cp = get(&local, "stork.strata.dev/v1alpha1/clusterpairs", "shop", "remote").unwrap()["status"].clone();
    assert_eq!((cp["storageStatus"].as_str(), cp["schedulerStatus"].as_str()), (Some("Ready"), Some("Ready")), "{cp}");
    // This cluster was only read, except for the two resources' status.
    let writes: Vec<_> = local.lock().unwrap().calls.iter().filter(|(m, _)| *m != Method::GET).cloned().collect();
    assert!(writes.iter().all(|(m, p)| *m == Method::PATCH && p.ends_with("/status")), "{writes:?}");

    // The data, on the other cluster, under the same names.
    assert!(image(&b, "pvc-aaa", 16 * MIB) == want.0, "pvc-aaa arrives bit-exact");
    let restored = b.wait_in_sync(0, "pvc-aaa", Duration::from_secs(30));
    assert_eq!(restored.in_sync_nodes.len(), 2, "as many replicas as the source: {restored:?}");
    assert!(image(&b, "pvc-bbb", 8 * MIB) == want.1, "pvc-bbb arrives bit-exact");
    // Its PVs and PVCs, bound to each other from the start.
    assert!(get(&remote, "v1/namespaces", "", "shop").is_some());
    let pv = get(&remote, "v1/persistentvolumes", "", "pvc-aaa").unwrap();
    assert_eq!(pv["spec"]["csi"]["volumeHandle"], "pvc-aaa");
    assert_eq!(pv["spec"]["claimRef"]["name"], "data");
    assert!(pv["spec"]["claimRef"].get("uid").is_none() && pv["spec"].get("nodeAffinity").is_none(), "{pv}");
    let pvc = get(&remote, "v1/persistentvolumeclaims", "shop", "logs").unwrap();
    assert_eq!((pvc["spec"]["volumeName"].as_str(), pvc["metadata"]["labels"]["app"].as_str()), (Some("pvc-bbb"), Some("shop")));
    assert!(pvc.get("status").is_none() && pvc["metadata"]["annotations"].get("pv.kubernetes.io/bind-completed").is_none(), "{pvc}");
    assert!(get(&remote, "v1/persistentvolumeclaims", "shop", "shared").is_none() && get(&remote, "v1/persistentvolumes", "", "nfs-1").is_none());
    // The resources: stopped applications, the cluster's own objects left behind.
    let d = get(&remote, "apps/v1/deployments", "shop", "web").unwrap();
    assert_eq!((d["spec"]["replicas"].clone(), d["metadata"]["annotations"]["stork.strata.dev/replicas"].clone()), (json!(0), json!("3")));
    assert_eq!(get(&remote, "v1/configmaps", "shop", "settings").unwrap()["data"]["mode"], "prod");
    assert!(get(&remote, "v1/configmaps", "shop", "kube-root-ca.crt").is_none());
    assert!(get(&remote, "v1/services", "shop", "web").unwrap()["spec"].get("clusterIP").is_none());
}

#[test]
fn a_missing_pair_a_bad_bucket_secret_and_a_volume_already_on_the_remote_cluster_are_reported() {
    let Some(s3) = S3::start() else { return };
    let (_ka, key_a) = credentials_key();
    let (_kb, key_b) = credentials_key();
    let (a, b) = (cluster(1, &key_a), cluster(1, &key_b));
    fill(&a, "pvc-aaa", 4 * MIB, 1);
    fill(&a, "pvc-bbb", 4 * MIB, 2);
    // The remote cluster has its own pvc-bbb: it must not be overwritten.
    fill(&b, "pvc-bbb", 4 * MIB, 3);
    let theirs = image(&b, "pvc-bbb", 4 * MIB);
    let (local, remote): (Shared, Shared) = Default::default();
    pair(&local, &s3, &b, "SKSTRATA");
    claim(&local, "shop", "data", "pvc-aaa", "csi.strata.dev");
    claim(&local, "shop", "logs", "pvc-bbb", "csi.strata.dev");
    migration(&local, "nowhere", "absent", true);
    migration(&local, "clash", "remote", true);
    let rt = runtime();
    let m = rt.block_on(async {
        Migrator {
            local: api_server(local.clone()),
            storage: sdk_of(&a),
            remote_kube: Arc::new(Remote(api_server(remote.clone()))),
            poll: Duration::from_millis(100),
        }
    });
    assert_eq!(rt.block_on(m.tick()).unwrap(), 2);
    let status = |name: &str| get(&local, "stork.strata.dev/v1alpha1/migrations", "shop", name).unwrap()["status"].clone();
    let st = status("nowhere");
    assert_eq!((st["stage"].as_str(), st["status"].as_str()), (Some("Final"), Some("Failed")));
    assert!(st["message"].as_str().unwrap().contains("ClusterPair shop/absent does not exist"), "{st}");
    let st = status("clash");
    assert_eq!(st["status"], "PartialSuccess", "{st:#}");
    assert_eq!(st["volumes"][0]["status"], "Successful");
    assert_eq!(st["volumes"][1]["status"], "Failed");
    assert!(st["volumes"][1]["reason"].as_str().unwrap().contains("already exists on the remote cluster"), "{st:#}");
    assert!(image(&b, "pvc-bbb", 4 * MIB) == theirs, "the remote cluster's own volume is untouched");
    assert!(get(&remote, "v1/persistentvolumeclaims", "shop", "logs").is_none());

    // A bucket Secret without keys: the pair says what is wrong, and the Migration fails with it.
    secret(&local, "shop", "bucket", &[("endpoint", &s3.url), ("bucket", "backups")]);
    migration(&local, "badkeys", "remote", true);
    assert_eq!(rt.block_on(m.tick()).unwrap(), 1);
    let st = status("badkeys");
    assert_eq!(st["status"], "Failed", "{st}");
    let cp = get(&local, "stork.strata.dev/v1alpha1/clusterpairs", "shop", "remote").unwrap()["status"].clone();
    assert_eq!((cp["schedulerStatus"].as_str(), cp["storageStatus"].as_str()), (Some("Ready"), Some("Error")), "{cp}");
    assert!(cp["message"].as_str().unwrap().contains("`accessKey` is missing"), "{cp}");
    assert!(st["message"].as_str().unwrap().contains("`accessKey` is missing"), "{st}");
}

#[test]
fn committed_crds_equal_stork_crdgen_output() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/strata/crds");
    for (file, yaml) in strata_stork::migration::crd::crds_yaml().unwrap() {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(committed == yaml, "{file} is stale: run `cargo run -p strata-stork --bin stork-crdgen charts/strata/crds`");
    }
}
