//! Kubernetes lookups and the health monitor against a tower-test mock API server that asserts
//! the exact calls.

use async_trait::async_trait;
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use strata_stork::cluster::{Cluster, Kube};
use strata_stork::extender::types::Pod;
use strata_stork::extender::Metrics;
use strata_stork::health::{Monitor, MonitorConfig};
use strata_stork::storage::{StorageNode, StorageView};
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (kube::Client, ApiHandle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "default"), handle)
}

/// Answers the next request, asserting its method and path (and query, when given).
async fn expect(handle: &mut ApiHandle, method: Method, path: &str, query_has: Option<&str>, status: u16, body: serde_json::Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.expect("a request in time").expect("request");
    assert_eq!(req.method(), method, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    if let Some(q) = query_has {
        let query = req.uri().query().unwrap_or_default().replace("%3D", "=").replace("%2F", "/");
        assert!(query.contains(q), "query {query:?} lacks {q:?}");
    }
    send.send_response(Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap());
}

fn not_found(what: &str) -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{what} not found")})
}

fn pvc(ns: &str, name: &str, volume: Option<&str>) -> serde_json::Value {
    let mut spec = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}});
    if let Some(v) = volume {
        spec["volumeName"] = json!(v);
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn pv(name: &str, driver: &str, handle: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
           "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "csi": {"driver": driver, "volumeHandle": handle}}})
}

fn pod(ns: &str, name: &str, claims: &[&str]) -> serde_json::Value {
    let vols: Vec<_> = claims.iter().map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}})).collect();
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"nodeName": "n4", "containers": [{"name": "c", "image": "busybox"}], "volumes": vols}})
}

#[tokio::test]
async fn pod_volumes_follow_pvc_to_pv_and_skip_unbound_and_foreign_claims() {
    let (client, mut api) = mock_client();
    let kube = Kube { client };
    let p: Pod = serde_json::from_value(pod("shop", "web-0", &["data", "wffc", "nfs", "gone"])).unwrap();
    let server = tokio::spawn(async move {
        expect(&mut api, Method::GET, "/api/v1/namespaces/shop/persistentvolumeclaims/data", None, 200, pvc("shop", "data", Some("pv-1"))).await;
        expect(&mut api, Method::GET, "/api/v1/persistentvolumes/pv-1", None, 200, pv("pv-1", "csi.strata.dev", "pvc-1111")).await;
        expect(&mut api, Method::GET, "/api/v1/namespaces/shop/persistentvolumeclaims/wffc", None, 200, pvc("shop", "wffc", None)).await;
        expect(&mut api, Method::GET, "/api/v1/namespaces/shop/persistentvolumeclaims/nfs", None, 200, pvc("shop", "nfs", Some("pv-2"))).await;
        expect(&mut api, Method::GET, "/api/v1/persistentvolumes/pv-2", None, 200, pv("pv-2", "nfs.csi.k8s.io", "x")).await;
        expect(&mut api, Method::GET, "/api/v1/namespaces/shop/persistentvolumeclaims/gone", None, 404, not_found("gone")).await;
    });
    let vols = kube.pod_volumes(&p).await.unwrap();
    server.await.unwrap();
    assert_eq!(vols, vec!["pvc-1111".to_string()]);
}

/// Answers the next request with `status` and the request's own body; returns that body.
async fn echo(handle: &mut ApiHandle, method: Method, path: &str, status: u16) -> serde_json::Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.expect("a request in time").expect("request");
    assert_eq!(req.method(), method, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    let body = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 1 << 20).await.unwrap();
    send.send_response(Response::builder().status(status).body(Body::from(body.to_vec())).unwrap());
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn one_event_per_pod_and_reason_counts_repeats() {
    let (client, mut api) = mock_client();
    let kube = Kube { client };
    let mut p: Pod = serde_json::from_value(pod("shop", "web-0", &["data"])).unwrap();
    p.metadata.uid = "u-1".into();
    let server = tokio::spawn(async move {
        let path = "/api/v1/namespaces/shop/events/web-0.strata-failedscheduling";
        expect(&mut api, Method::GET, path, None, 404, not_found("event")).await;
        let ev = echo(&mut api, Method::POST, "/api/v1/namespaces/shop/events", 201).await;
        assert_eq!(ev["metadata"]["name"], "web-0.strata-failedscheduling");
        assert_eq!(ev["reason"], "FailedScheduling");
        assert_eq!(ev["involvedObject"]["name"], "web-0");
        assert_eq!(ev["involvedObject"]["kind"], "Pod");
        assert_eq!(ev["count"], 1);
        assert!(ev["message"].as_str().unwrap().contains("pvc-1111"));
        // The second attempt updates the same Event.
        expect(&mut api, Method::GET, path, None, 200, ev).await;
        let ev = echo(&mut api, Method::PUT, path, 200).await;
        assert_eq!(ev["count"], 2);
        assert!(ev["message"].as_str().unwrap().contains("still"));
    });
    kube.record_event(&p, "FailedScheduling", "volume pvc-1111 has no online replica").await.unwrap();
    kube.record_event(&p, "FailedScheduling", "volume pvc-1111 still has no online replica").await.unwrap();
    server.await.unwrap();
}

struct Nodes(std::sync::Mutex<Vec<StorageNode>>);

#[async_trait]
impl StorageView for Nodes {
    async fn nodes(&self) -> Result<Vec<StorageNode>, String> {
        let n = self.0.lock().unwrap().clone();
        if n.is_empty() {
            return Err("etcd unreachable".into());
        }
        Ok(n)
    }
    async fn replicas(&self, _v: &str) -> Result<Vec<String>, String> {
        Ok(vec![])
    }
}

fn node(id: &str, status: &str, addr: &str) -> StorageNode {
    StorageNode { id: id.into(), status: status.into(), data_address: addr.into() }
}

/// A TCP port nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    drop(l);
    a
}

#[tokio::test]
async fn monitor_deletes_exactly_the_strata_pods_after_the_grace_period() {
    let (client, mut api) = mock_client();
    let cluster = Arc::new(Kube { client });
    let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let storage = Arc::new(Nodes(std::sync::Mutex::new(vec![
        node("n1", "online", &live.local_addr().unwrap().to_string()),
        node("n4", "offline", &closed_port()),
        // Offline in the store, but its data port answers: an engine restart or a store blip.
        node("n5", "offline", &live.local_addr().unwrap().to_string()),
    ])));
    let cfg = MonitorConfig { grace: Duration::from_secs(60), probe_timeout: Duration::from_millis(500), max_evictions_per_cycle: 10 };
    let metrics = Arc::new(Metrics::default());
    let mut m = Monitor::new(cfg, cluster, storage.clone(), metrics.clone());
    let t0 = tokio::time::Instant::now();
    assert!(m.tick(t0).await.is_empty(), "inside the grace period nothing happens");
    assert!(m.tick(t0 + Duration::from_secs(30)).await.is_empty());
    let server = tokio::spawn(async move {
        let list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
            pod("shop", "db-0", &["data"]), pod("shop", "stateless", &[])]});
        expect(&mut api, Method::GET, "/api/v1/pods", Some("fieldSelector=spec.nodeName=n4"), 200, list).await;
        expect(&mut api, Method::GET, "/api/v1/namespaces/shop/persistentvolumeclaims/data", None, 200, pvc("shop", "data", Some("pv-1"))).await;
        expect(&mut api, Method::GET, "/api/v1/persistentvolumes/pv-1", None, 200, pv("pv-1", "csi.strata.dev", "pvc-1111")).await;
        expect(&mut api, Method::DELETE, "/api/v1/namespaces/shop/pods/db-0", None, 200, pod("shop", "db-0", &["data"])).await;
        api
    });
    let deleted = m.tick(t0 + Duration::from_secs(61)).await;
    let mut api = server.await.unwrap();
    assert_eq!(deleted, vec!["shop/db-0".to_string()]);
    assert_eq!(metrics.evictions.get(), 1);
    // The dead node's kubelet never confirms: the pod stays Terminating. It is not deleted
    // again every round...
    let terminating = || {
        let mut p = pod("shop", "db-0", &["data"]);
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [p]})
    };
    let server = tokio::spawn(async move {
        expect(&mut api, Method::GET, "/api/v1/pods", Some("fieldSelector=spec.nodeName=n4"), 200, terminating()).await;
        api
    });
    assert!(m.tick(t0 + Duration::from_secs(90)).await.is_empty(), "a terminating pod is not deleted again");
    let mut api = server.await.unwrap();
    // ...but once it has been terminating for the grace period it is force-deleted, and its
    // volume's VolumeAttachment on the dead node goes too (not another node's, not another driver's).
    let server = tokio::spawn(async move {
        expect(&mut api, Method::GET, "/api/v1/pods", Some("fieldSelector=spec.nodeName=n4"), 200, terminating()).await;
        expect(&mut api, Method::GET, "/api/v1/namespaces/shop/persistentvolumeclaims/data", None, 200, pvc("shop", "data", Some("pv-1"))).await;
        expect(&mut api, Method::GET, "/api/v1/persistentvolumes/pv-1", None, 200, pv("pv-1", "csi.strata.dev", "pvc-1111")).await;
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::DELETE, "/api/v1/namespaces/shop/pods/db-0"));
        let body = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 1 << 20).await.unwrap();
        let opts: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(opts["gracePeriodSeconds"], 0, "forced: {opts}");
        send.send_response(Response::builder().status(200).body(Body::from(serde_json::to_vec(&pod("shop", "db-0", &["data"])).unwrap())).unwrap());
        let va = |name: &str, node: &str, pv: &str, driver: &str| {
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": {"name": name},
            "spec": {"attacher": driver, "nodeName": node, "source": {"persistentVolumeName": pv}}})
        };
        let list = json!({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachmentList", "metadata": {}, "items": [
            va("csi-a", "n4", "pv-1", "csi.strata.dev"), va("csi-b", "n1", "pv-1", "csi.strata.dev"), va("csi-c", "n4", "pv-9", "other.csi")]});
        expect(&mut api, Method::GET, "/apis/storage.k8s.io/v1/volumeattachments", None, 200, list).await;
        expect(&mut api, Method::GET, "/api/v1/persistentvolumes/pv-1", None, 200, pv("pv-1", "csi.strata.dev", "pvc-1111")).await;
        expect(&mut api, Method::DELETE, "/apis/storage.k8s.io/v1/volumeattachments/csi-a", None, 200, va("csi-a", "n4", "pv-1", "csi.strata.dev"))
            .await;
        api
    });
    let deleted = m.tick(t0 + Duration::from_secs(122)).await;
    let mut api = server.await.unwrap();
    assert_eq!(deleted, vec!["shop/db-0 (forced)".to_string()]);
    // The store blinks: no decision, no API call (the mock would see an unexpected request).
    storage.0.lock().unwrap().clear();
    assert!(m.tick(t0 + Duration::from_secs(120)).await.is_empty());
    assert!(tokio::time::timeout(Duration::from_millis(200), api.next_request()).await.is_err(), "no API call during a blip");
}

#[tokio::test]
async fn a_node_back_within_the_grace_period_keeps_its_pods() {
    let (client, mut api) = mock_client();
    let cluster = Arc::new(Kube { client });
    let down = closed_port();
    let storage = Arc::new(Nodes(std::sync::Mutex::new(vec![node("n4", "offline", &down)])));
    let cfg = MonitorConfig { grace: Duration::from_secs(60), probe_timeout: Duration::from_millis(500), max_evictions_per_cycle: 10 };
    let mut m = Monitor::new(cfg, cluster, storage.clone(), Arc::new(Metrics::default()));
    let t0 = tokio::time::Instant::now();
    assert!(m.tick(t0).await.is_empty());
    *storage.0.lock().unwrap() = vec![node("n4", "online", &down)];
    assert!(m.tick(t0 + Duration::from_secs(40)).await.is_empty());
    *storage.0.lock().unwrap() = vec![node("n4", "offline", &down)];
    assert!(m.tick(t0 + Duration::from_secs(70)).await.is_empty(), "the clock restarted when it came back");
    assert!(tokio::time::timeout(Duration::from_millis(200), api.next_request()).await.is_err(), "no pod was listed or deleted");
}
