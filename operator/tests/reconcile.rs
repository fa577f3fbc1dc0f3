//! The reconciler against a tower-test mock API server that asserts the exact calls: create,
//! update on spec change, status, node-by-node upgrade (waiting while a volume resyncs), uninstall.

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use strata_operator::controller::{reconcile, Context};
use strata_operator::crd::*;
use strata_operator::render::{desired, Object};
use strata_operator::status::{EngineReport, EngineStatus, MaintenanceError};
use strata_operator::upgrade::VolumeSync;
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// The engines as the reconciler sees them: a fixed report, and the maintenance calls it made
/// ((node, enter), shared with the test).
struct Fake(Result<EngineReport, String>, Arc<std::sync::Mutex<Vec<(String, bool)>>>);

#[async_trait::async_trait]
impl EngineStatus for Fake {
    async fn report(&self, _: &StorageCluster) -> Result<EngineReport, String> {
        self.0.clone()
    }
    async fn maintenance(&self, _: &StorageCluster, node: &str, enter: bool) -> Result<(), MaintenanceError> {
        self.1.lock().unwrap().push((node.to_string(), enter));
        Ok(())
    }
}

fn report(not_in_sync: &[&str]) -> Result<EngineReport, String> {
    Ok(EngineReport {
        nodes: vec![
            NodeStatus { id: "n1".into(), state: "online".into(), version: "0.1.0".into(), maintenance: String::new() },
            NodeStatus { id: "n2".into(), state: "online".into(), version: "0.1.0".into(), maintenance: String::new() },
        ],
        sync: VolumeSync { volumes: 2, not_in_sync: not_in_sync.iter().map(|s| s.to_string()).collect() },
    })
}

fn cluster(image: &str, finalizer: bool) -> StorageCluster {
    let spec = StorageClusterSpec {
        image: image.into(),
        kvdb: Kvdb { endpoints: vec!["http://etcd:2379".into()], ..Default::default() },
        storage: Storage { files: vec![FileDevice { name: "d0".into(), size: "1GiB".into() }], ..Default::default() },
        storage_classes: vec![StorageClassSpec {
            name: "strata-repl2".into(),
            parameters: [("repl".to_string(), "2".to_string())].into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut sc = StorageCluster::new("strata", spec);
    sc.metadata.namespace = Some("strata".into());
    sc.metadata.uid = Some("uid-1".into());
    if finalizer {
        sc.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    sc
}

fn path_of(o: &Object) -> String {
    let base = if o.api.group.is_empty() { format!("/api/{}", o.api.version) } else { format!("/apis/{}/{}", o.api.group, o.api.version) };
    if o.namespaced {
        format!("{base}/namespaces/strata/{}/{}", o.api.plural, o.name)
    } else {
        format!("{base}/{}/{}", o.api.plural, o.name)
    }
}

const SC_PATH: &str = "/apis/strata.dev/v1alpha1/namespaces/strata/storageclusters/strata";

/// One expected call: method, path, and the reply body.
struct Call(Method, String, Value);

fn engine_pod(name: &str, version: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "strata", "annotations": {"strata.dev/version": version}},
           "spec": {"nodeName": format!("node-{name}"), "containers": [{"name": "engine", "image": "x"}]},
           "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

fn pod_list(pods: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})
}

/// Serves `calls` in order, asserting each request; returns the bodies the client sent.
fn serve(mut handle: ApiHandle, calls: Vec<Call>) -> tokio::task::JoinHandle<Vec<(String, Value)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        for Call(method, path, reply) in calls {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
                .expect("request");
            assert_eq!((req.method().clone(), req.uri().path().to_string()), (method.clone(), path.clone()), "unexpected call");
            if req.method() == Method::PATCH && req.uri().query().unwrap_or_default().contains("fieldManager=strata-operator") {
                assert!(req.uri().query().unwrap().contains("force=true"), "server-side apply forces our field manager");
            }
            let body = req.into_body().collect_bytes().await.unwrap();
            let sent: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let reply = if reply.is_null() { sent.clone() } else { reply };
            seen.push((path, sent));
            // A Status reply with a code is answered with that HTTP status (404: API missing).
            let code = if reply["kind"] == "Status" { reply["code"].as_u64().unwrap_or(200) as u16 } else { 200 };
            send.send_response(Response::builder().status(code).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap());
        }
        // Nothing more may be asked.
        if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await {
            panic!("unexpected extra call {} {}", req.method(), req.uri());
        }
        seen
    })
}

fn sc_json(sc: &StorageCluster) -> Value {
    serde_json::to_value(sc).unwrap()
}

const SECRET_PATH: &str = "/api/v1/namespaces/strata/secrets/strata-security";

/// The security Secret as the API server has it once made.
fn security_secret() -> Value {
    let keys = strata_operator::security::KEYS.iter().chain(strata_operator::security::ETCD_KEYS.iter());
    let data: serde_json::Map<String, Value> = keys.map(|k| (k.to_string(), json!("eA=="))).collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "strata-security", "namespace": "strata"}, "data": data})
}

/// The security Secret's check (it exists), then the applies of every desired object, in order.
fn applies(sc: &StorageCluster) -> Vec<Call> {
    let mut calls = vec![Call(Method::GET, SECRET_PATH.into(), security_secret())];
    calls.extend(desired(sc).iter().map(|o| Call(Method::PATCH, path_of(o), Value::Null)));
    calls
}

fn ctx(client: kube::Client, r: Result<EngineReport, String>) -> Arc<Context> {
    ctx_seeing(client, r, Default::default())
}

/// A context whose engines record their maintenance calls in `calls`.
fn ctx_seeing(client: kube::Client, r: Result<EngineReport, String>, calls: Arc<std::sync::Mutex<Vec<(String, bool)>>>) -> Arc<Context> {
    Arc::new(Context { client, engines: Arc::new(Fake(r, calls)), metrics: Default::default() })
}

/// One reconcile of a settled StorageCluster (finalizer on) that finds `pods` and no upgrade
/// to make: every apply, the pod list, the status. Returns the bodies sent and the context.
async fn settled_pass(sc: &StorageCluster, pods: Vec<Value>, r: Result<EngineReport, String>) -> (Vec<(String, Value)>, Arc<Context>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut calls = applies(sc);
    calls.push(Call(Method::GET, "/api/v1/namespaces/strata/pods".into(), pod_list(pods)));
    calls.push(Call(Method::PATCH, format!("{SC_PATH}/status"), sc_json(sc)));
    let server = serve(handle, calls);
    let c = ctx(kube::Client::new(svc, "strata"), r);
    reconcile(Arc::new(sc.clone()), c.clone()).await.unwrap();
    (server.await.unwrap(), c)
}

#[tokio::test]
async fn creates_everything_with_a_finalizer_and_reports_status() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "strata");
    let sc = cluster("img:0.1.0", false);
    let mut calls = vec![Call(Method::PATCH, SC_PATH.into(), sc_json(&sc))];
    calls.extend(applies(&sc));
    calls.push(Call(
        Method::GET,
        "/api/v1/namespaces/strata/pods".into(),
        pod_list(vec![engine_pod("a", "0.1.0", true), engine_pod("b", "0.1.0", true)]),
    ));
    calls.push(Call(Method::PATCH, format!("{SC_PATH}/status"), sc_json(&sc)));
    let server = serve(handle, calls);
    reconcile(Arc::new(sc.clone()), ctx(client, report(&[]))).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen[0].1["metadata"]["finalizers"], json!([FINALIZER]), "finalizer first");
    let status = &seen.last().unwrap().1["status"];
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["version"], "0.1.0");
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2);
    assert!(seen.iter().any(|(p, b)| p.ends_with("/daemonsets/strata-engine") && b["kind"] == "DaemonSet"), "the engine DaemonSet is applied");
}

#[tokio::test]
async fn a_spec_change_is_applied_and_the_upgrade_goes_one_node_at_a_time() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "strata");
    let mut sc = cluster("img:0.2.0", true);
    sc.status = Some(StorageClusterStatus { version: "0.1.0".into(), ..Default::default() });
    let mut calls = applies(&sc);
    calls.push(Call(
        Method::GET,
        "/api/v1/namespaces/strata/pods".into(),
        pod_list(vec![engine_pod("a", "0.1.0", true), engine_pod("b", "0.1.0", true)]),
    ));
    calls.push(Call(Method::DELETE, "/api/v1/namespaces/strata/pods/a".into(), engine_pod("a", "0.1.0", true)));
    calls.push(Call(Method::PATCH, format!("{SC_PATH}/status"), sc_json(&sc)));
    let server = serve(handle, calls);
    let maintenance = Arc::new(std::sync::Mutex::new(Vec::new()));
    let c = ctx_seeing(client, report(&[]), maintenance.clone());
    reconcile(Arc::new(sc.clone()), c.clone()).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(c.metrics.pods_replaced.get(), 1, "one node at a time");
    assert_eq!(*maintenance.lock().unwrap(), vec![("node-a".to_string(), true)], "its node enters maintenance before the pod goes");
    assert!(c.metrics.render().contains("strata_operator_engine_pods_replaced_total 1"));
    let ds = seen.iter().find(|(p, _)| p.ends_with("/daemonsets/strata-engine")).unwrap();
    assert_eq!(ds.1["spec"]["template"]["metadata"]["annotations"]["strata.dev/version"], "0.2.0", "the new version is applied");
    assert_eq!(ds.1["spec"]["template"]["spec"]["containers"][0]["image"], "img:0.2.0");
    let status = &seen.last().unwrap().1["status"];
    assert_eq!(status["phase"], "Upgrading");
    assert_eq!(status["version"], "0.1.0", "the version changes only when every engine runs the new one");

    // The next pass sees pod a still terminating (old version): it is not deleted again, and
    // b waits for it.
    let mut going = engine_pod("a", "0.1.0", true);
    going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let (seen, c) = settled_pass(&sc, vec![going, engine_pod("b", "0.1.0", true)], report(&[])).await;
    assert_eq!(c.metrics.pods_replaced.get(), 0, "each pod is deleted once per upgrade");
    assert_eq!(seen.last().unwrap().1["status"]["version"], "0.1.0");

    // Both on the new version: now the status says so.
    let (seen, _) = settled_pass(&sc, vec![engine_pod("a", "0.2.0", true), engine_pod("b", "0.2.0", true)], report(&[])).await;
    assert_eq!(seen.last().unwrap().1["status"]["version"], "0.2.0");

    // The maintenance the upgrade started ends once the node's new engine is ready; one an
    // admin started stays, and so does one whose node's new pod is not ready yet.
    let mut r = report(&[]).unwrap();
    r.nodes =
        ["node-a", "node-b", "node-c"].iter().map(|n| NodeStatus { id: n.to_string(), state: "maintenance".into(), ..Default::default() }).collect();
    r.nodes[0].maintenance = "upgrade".into();
    r.nodes[1].maintenance = "admin".into();
    r.nodes[2].maintenance = "upgrade".into();
    let pods = vec![engine_pod("a", "0.2.0", true), engine_pod("b", "0.2.0", true), engine_pod("c", "0.2.0", false)];
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut calls = applies(&sc);
    calls.push(Call(Method::GET, "/api/v1/namespaces/strata/pods".into(), pod_list(pods)));
    calls.push(Call(Method::PATCH, format!("{SC_PATH}/status"), sc_json(&sc)));
    let server = serve(handle, calls);
    let maintenance = Arc::new(std::sync::Mutex::new(Vec::new()));
    reconcile(Arc::new(sc.clone()), ctx_seeing(kube::Client::new(svc, "strata"), Ok(r), maintenance.clone())).await.unwrap();
    server.await.unwrap();
    assert_eq!(*maintenance.lock().unwrap(), vec![("node-a".to_string(), false)]);
}

#[tokio::test]
async fn a_service_monitor_without_the_prometheus_api_is_skipped_with_a_condition() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "strata");
    let mut sc = cluster("img:0.1.0", true);
    sc.spec.monitoring.service_monitor = true;
    let missing = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"});
    let mut calls = vec![Call(Method::GET, SECRET_PATH.into(), security_secret())];
    calls.extend(
        desired(&sc).iter().map(|o| Call(Method::PATCH, path_of(o), if o.api.kind == "ServiceMonitor" { missing.clone() } else { Value::Null })),
    );
    assert!(desired(&sc).iter().any(|o| o.api.kind == "ServiceMonitor"));
    calls.push(Call(Method::GET, "/api/v1/namespaces/strata/pods".into(), pod_list(vec![engine_pod("a", "0.1.0", true)])));
    calls.push(Call(Method::PATCH, format!("{SC_PATH}/status"), sc_json(&sc)));
    let server = serve(handle, calls);
    reconcile(Arc::new(sc.clone()), ctx(client, report(&[]))).await.expect("the reconcile goes on");
    let seen = server.await.unwrap();
    let status = &seen.last().unwrap().1["status"];
    let cond = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "OptionalObjects").unwrap().clone();
    assert_eq!(cond["status"], "False");
    assert!(cond["message"].as_str().unwrap().contains("ServiceMonitor"), "{cond}");
}

#[tokio::test]
async fn the_upgrade_waits_while_a_volume_resyncs() {
    let sc = cluster("img:0.2.0", true);
    let pods = || vec![engine_pod("a", "0.2.0", true), engine_pod("b", "0.1.0", true)];
    // Node a was upgraded and is back; b still runs 0.1.0, but volume db is resyncing: no delete.
    let (seen, _) = settled_pass(&sc, pods(), report(&["db"])).await;
    let status = &seen.last().unwrap().1["status"];
    let upgraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Upgraded").unwrap();
    assert_eq!(upgraded["reason"], "Waiting");
    assert!(upgraded["message"].as_str().unwrap().contains("db"), "{upgraded}");
    // Engines unreachable: no upgrade either, and status says why.
    let (seen, _) = settled_pass(&sc, pods(), Err("engine SDK unreachable".into())).await;
    let status = &seen.last().unwrap().1["status"];
    assert!(status["conditions"].to_string().contains("engine SDK unreachable"));
}

#[tokio::test]
async fn deletion_removes_cluster_scoped_objects_then_the_finalizer() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "strata");
    let mut sc = cluster("img:0.1.0", true);
    sc.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let status_ok = json!({"apiVersion": "v1", "kind": "Status", "status": "Success"});
    let mut calls: Vec<Call> = desired(&sc).iter().filter(|o| !o.namespaced).map(|o| Call(Method::DELETE, path_of(o), status_ok.clone())).collect();
    assert!(calls.len() >= 9, "cluster roles, bindings, CSIDriver, StorageClass");
    calls.push(Call(Method::PATCH, SC_PATH.into(), sc_json(&sc)));
    let server = serve(handle, calls);
    reconcile(Arc::new(sc.clone()), ctx(client, report(&[]))).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen.last().unwrap().1["metadata"]["finalizers"], json!([]), "finalizer released");
}

#[tokio::test]
async fn uninstall_and_wipe_waits_for_every_node_to_wipe() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "strata");
    let mut sc = cluster("img:0.1.0", true);
    sc.spec.delete_strategy = DeleteStrategy { kind: DeleteKind::UninstallAndWipe };
    sc.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let status_ok = json!({"apiVersion": "v1", "kind": "Status", "status": "Success"});
    let ds_path = "/apis/apps/v1/namespaces/strata/daemonsets";
    let wipe = |ready: i32| {
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "strata-wipe", "namespace": "strata"},
        "spec": {"selector": {}, "template": {}}, "status": {"desiredNumberScheduled": 2, "numberReady": ready, "currentNumberScheduled": 2, "numberMisscheduled": 0}})
    };
    let cluster_deletes =
        || -> Vec<Call> { desired(&sc).iter().filter(|o| !o.namespaced).map(|o| Call(Method::DELETE, path_of(o), status_ok.clone())).collect() };
    // First pass: one node still wiping: the finalizer stays.
    let mut calls = cluster_deletes();
    calls.push(Call(Method::DELETE, format!("{ds_path}/strata-engine"), status_ok.clone()));
    calls.push(Call(Method::PATCH, format!("{ds_path}/strata-wipe"), Value::Null));
    calls.push(Call(Method::GET, format!("{ds_path}/strata-wipe"), wipe(1)));
    let server = serve(handle, calls);
    reconcile(Arc::new(sc.clone()), ctx(client, report(&[]))).await.unwrap();
    server.await.unwrap();
    // Second pass: both wiped: the wipe DaemonSet goes, then the finalizer.
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "strata");
    let mut calls = cluster_deletes();
    calls.push(Call(Method::DELETE, format!("{ds_path}/strata-engine"), status_ok.clone()));
    calls.push(Call(Method::PATCH, format!("{ds_path}/strata-wipe"), Value::Null));
    calls.push(Call(Method::GET, format!("{ds_path}/strata-wipe"), wipe(2)));
    calls.push(Call(Method::DELETE, format!("{ds_path}/strata-wipe"), status_ok.clone()));
    calls.push(Call(Method::PATCH, SC_PATH.into(), sc_json(&sc)));
    let server = serve(handle, calls);
    reconcile(Arc::new(sc.clone()), ctx(client, report(&[]))).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn uninstall_deletes_the_storage_cluster_and_waits_until_it_is_finalized() {
    use strata_operator::uninstall::uninstall;
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "strata");
    let sc = cluster("img:0.1.0", true);
    let gone = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    // Deleted (the finalizer holds it), still there once, then gone.
    let calls = vec![
        Call(Method::DELETE, SC_PATH.into(), sc_json(&sc)),
        Call(Method::GET, SC_PATH.into(), sc_json(&sc)),
        Call(Method::GET, SC_PATH.into(), gone.clone()),
    ];
    let server = serve(handle, calls);
    uninstall(client, "strata", "strata", Duration::from_secs(5), Duration::from_millis(10)).await.unwrap();
    server.await.unwrap();
    // Already deleted (StorageCluster removed before `helm uninstall`): nothing to wait for.
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = serve(handle, vec![Call(Method::DELETE, SC_PATH.into(), gone)]);
    uninstall(kube::Client::new(svc, "strata"), "strata", "strata", Duration::from_secs(5), Duration::from_millis(10)).await.unwrap();
    server.await.unwrap();
    // Stuck (no operator to finalize it): a clear error after the timeout.
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let answer = tokio::spawn(async move {
        while let Ok(Some((_, send))) = tokio::time::timeout(Duration::from_secs(2), handle.next_request()).await {
            send.send_response(
                Response::builder().status(200).body(Body::from(serde_json::to_vec(&sc_json(&cluster("img:0.1.0", true))).unwrap())).unwrap(),
            );
        }
    });
    let e = uninstall(kube::Client::new(svc, "strata"), "strata", "strata", Duration::from_millis(100), Duration::from_millis(20)).await.unwrap_err();
    assert!(e.to_string().contains("is the operator running"), "{e}");
    answer.abort();
}

/// One settled pass (no pods) whose security Secret calls are `secret_calls`: the bodies sent.
async fn pass_after_secret_calls(sc: &StorageCluster, secret_calls: Vec<Call>) -> Vec<(String, Value)> {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut calls = secret_calls;
    calls.extend(applies(sc).into_iter().skip(1));
    calls.push(Call(Method::GET, "/api/v1/namespaces/strata/pods".into(), pod_list(vec![])));
    calls.push(Call(Method::PATCH, format!("{SC_PATH}/status"), sc_json(sc)));
    let server = serve(handle, calls);
    reconcile(Arc::new(sc.clone()), ctx(kube::Client::new(svc, "strata"), report(&[]))).await.unwrap();
    server.await.unwrap()
}

#[tokio::test]
async fn a_missing_security_secret_is_made_once_with_a_ca_and_a_system_key() {
    let sc = cluster("img:0.1.0", true);
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    let secret_calls =
        vec![Call(Method::GET, SECRET_PATH.into(), not_found), Call(Method::POST, "/api/v1/namespaces/strata/secrets".into(), Value::Null)];
    let seen = pass_after_secret_calls(&sc, secret_calls).await;
    let made = &seen[1].1;
    assert_eq!(made["metadata"]["name"], "strata-security");
    assert_eq!(made["metadata"]["ownerReferences"][0]["kind"], "StorageCluster");
    use base64::Engine as _;
    let field = |k: &str| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(made["data"][k].as_str().unwrap()).unwrap()).unwrap();
    assert!(field("ca.crt").starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(field("ca.key").contains("PRIVATE KEY"));
    assert!(field("system.key").len() >= 32);
    assert!(field("etcd.crt").starts_with("-----BEGIN CERTIFICATE-----"), "the internal kvdb's certificate is made too");
    // The engine DaemonSet mounts it: the CA for the init container that signs the node's
    // certificate, the system key for the engine and the CSI node plugin.
    let ds = seen.iter().find(|(p, _)| p.ends_with("/daemonsets/strata-engine")).unwrap();
    let spec = &ds.1["spec"]["template"]["spec"];
    assert_eq!(spec["initContainers"][0]["name"], "certs");
    let args = spec["containers"][0]["args"].to_string();
    assert!(args.contains("--tls-dir=/var/lib/strata/tls") && args.contains("--auth-system-key-file=/etc/strata/auth/system.key"), "{args}");
}

#[tokio::test]
async fn a_security_secret_without_its_keys_stops_the_reconcile_with_a_reason() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let sc = cluster("img:0.1.0", true);
    let partial =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "strata-security", "namespace": "strata"}, "data": {"ca.crt": "eA=="}});
    let server = serve(handle, vec![Call(Method::GET, SECRET_PATH.into(), partial)]);
    let err = reconcile(Arc::new(sc), ctx(kube::Client::new(svc, "strata"), report(&[]))).await.unwrap_err().to_string();
    server.await.unwrap();
    assert!(err.contains("lacks ca.key, system.key"), "{err}");
}

#[tokio::test]
async fn a_users_own_ca_signs_the_internal_kvdbs_certificate() {
    use base64::Engine as _;
    let mut sc = cluster("img:0.1.0", true);
    sc.spec.kvdb = Kvdb { internal: true, ..Default::default() };
    let (cert, key) = strata_api::pki::new_ca().unwrap();
    let b64 = |s: &str| json!(base64::engine::general_purpose::STANDARD.encode(s));
    let theirs = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "strata-security", "namespace": "strata"},
                        "data": {"ca.crt": b64(&cert), "ca.key": b64(&key), "system.key": b64("0123456789abcdef0123456789abcdef")}});
    let secret_calls = vec![Call(Method::GET, SECRET_PATH.into(), theirs.clone()), Call(Method::PATCH, SECRET_PATH.into(), theirs)];
    let seen = pass_after_secret_calls(&sc, secret_calls).await;
    let patch = &seen[1].1["data"];
    assert!(patch.get("ca.key").is_none(), "only the kvdb's files are added: {patch}");
    let pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(patch["etcd.crt"].as_str().unwrap()).unwrap()).unwrap();
    // Signed by their CA: a client trusting it accepts the certificate.
    let (der, ca_der) = (der_of(&pem), der_of(&cert));
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert!(parsed.verify_signature(Some(ca.public_key())).is_ok(), "the kvdb's certificate is signed by the user's CA");
}

/// The DER of the first certificate in `pem`.
fn der_of(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String =
        pem.lines().skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE")).skip(1).take_while(|l| !l.starts_with("-----END")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}
