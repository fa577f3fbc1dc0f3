//! The extender over HTTP with realistic ExtenderArgs, Strata and Kubernetes faked in memory.

use async_trait::async_trait;
use axum::body::Body;
use http::{Request, StatusCode};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use strata_stork::cluster::Cluster;
use strata_stork::extender::types::Pod;
use strata_stork::extender::{router, Extender, Metrics};
use strata_stork::placement::Topology;
use strata_stork::storage::{StorageNode, StorageView};
use tower::ServiceExt;

#[derive(Default)]
struct FakeCluster {
    /// claim name -> Strata volume handle (bound claims of our driver)
    claims: BTreeMap<String, String>,
    topology: BTreeMap<String, Topology>,
    events: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl Cluster for FakeCluster {
    async fn pod_volumes(&self, pod: &Pod) -> Result<Vec<String>, String> {
        Ok(pod.claims().iter().filter_map(|c| self.claims.get(c).cloned()).collect())
    }
    async fn node_topology(&self, names: &[String]) -> Result<BTreeMap<String, Topology>, String> {
        Ok(names.iter().filter_map(|n| self.topology.get(n).map(|t| (n.clone(), t.clone()))).collect())
    }
    async fn record_event(&self, _pod: &Pod, reason: &str, message: &str) -> Result<(), String> {
        self.events.lock().unwrap().push((reason.into(), message.into()));
        Ok(())
    }
    async fn pods_on_node(&self, _node: &str) -> Result<Vec<Pod>, String> {
        Ok(vec![])
    }
    async fn delete_pod(&self, _ns: &str, _name: &str) -> Result<(), String> {
        Ok(())
    }
    async fn force_delete_pod(&self, _ns: &str, _name: &str) -> Result<(), String> {
        Ok(())
    }
    async fn delete_volume_attachments(&self, _node: &str, _handles: &[String]) -> Result<Vec<String>, String> {
        Ok(vec![])
    }
}

struct FakeStorage {
    nodes: Vec<StorageNode>,
    replicas: BTreeMap<String, Vec<String>>,
}

#[async_trait]
impl StorageView for FakeStorage {
    async fn nodes(&self) -> Result<Vec<StorageNode>, String> {
        Ok(self.nodes.clone())
    }
    async fn replicas(&self, v: &str) -> Result<Vec<String>, String> {
        self.replicas.get(v).cloned().ok_or_else(|| format!("volume {v} not found"))
    }
}

fn topo(zone: &str, rack: &str) -> Topology {
    Topology { region: Some("r1".into()), zone: Some(zone.into()), rack: Some(rack.into()) }
}

fn setup() -> (Arc<FakeCluster>, axum::Router) {
    setup_with(&[("n1", "online"), ("n2", "online"), ("n3", "online"), ("n4", "offline")])
}

/// The pod's volume pvc-1111 has its replica on n1; Strata knows `nodes` in these states.
fn setup_with(nodes: &[(&str, &str)]) -> (Arc<FakeCluster>, axum::Router) {
    let mut claims = BTreeMap::new();
    claims.insert("data-web-0".to_string(), "pvc-1111".to_string());
    let topology: BTreeMap<String, Topology> =
        [("n1", topo("z1", "k1")), ("n2", topo("z1", "k1")), ("n3", topo("z2", "k2")), ("n4", topo("z1", "k1"))]
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect();
    let cluster = Arc::new(FakeCluster { claims, topology, events: Mutex::new(vec![]) });
    let node = |id: &str, status: &str| StorageNode { id: id.into(), status: status.into(), data_address: "127.0.0.1:1".into() };
    let storage = Arc::new(FakeStorage {
        nodes: nodes.iter().map(|(id, status)| node(id, status)).collect(),
        replicas: [("pvc-1111".to_string(), vec!["n1".to_string()])].into_iter().collect(),
    });
    let ext = Arc::new(Extender { cluster: cluster.clone(), storage, metrics: Arc::new(Metrics::default()) });
    (cluster, router(ext))
}

fn pod_json(claim: &str, annotations: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1", "annotations": annotations},
        "spec": {
            "containers": [{"name": "web", "image": "nginx"}],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
                {"name": "cfg", "configMap": {"name": "web"}}
            ]
        }
    })
}

fn node_list() -> serde_json::Value {
    let n = |name: &str, zone: &str, rack: &str| {
        serde_json::json!({
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/region": "r1",
                "topology.kubernetes.io/zone": zone,
                "strata.dev/rack": rack}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        })
    };
    serde_json::json!({"metadata": {"resourceVersion": "1"}, "items": [n("n1", "z1", "k1"), n("n2", "z1", "k1"), n("n3", "z2", "k2"), n("n4", "z1", "k1"), n("n5", "z1", "k1")]})
}

async fn call(app: &axum::Router, path: &str, body: String) -> (StatusCode, String) {
    let req = Request::post(path).header("content-type", "application/json").body(Body::from(body)).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn filter_with_nodes_drops_offline_and_non_strata_nodes() {
    let (_, app) = setup();
    let args = serde_json::json!({"Pod": pod_json("data-web-0", serde_json::json!({})), "Nodes": node_list()});
    let (st, body) = call(&app, "/filter", args.to_string()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = r["Nodes"]["items"].as_array().unwrap().iter().map(|n| n["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["n1", "n2", "n3"]);
    assert_eq!(r["FailedNodes"]["n4"], "Strata is offline on this node");
    assert_eq!(r["FailedNodes"]["n5"], "Strata is not running on this node");
    assert_eq!(r["Error"], "");
}

#[tokio::test]
async fn node_names_form_and_lowercase_keys_are_accepted() {
    let (_, app) = setup();
    let args = serde_json::json!({"pod": pod_json("data-web-0", serde_json::json!({})), "nodenames": ["n1", "n2", "n3", "n4"]});
    let (st, body) = call(&app, "/filter", args.to_string()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["NodeNames"], serde_json::json!(["n1", "n2", "n3"]));
    assert!(r.get("Nodes").is_none());
    let (_, body) = call(&app, "/prioritize", args.to_string()).await;
    let scores: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let s: BTreeMap<String, i64> = scores.iter().map(|h| (h["Host"].as_str().unwrap().to_string(), h["Score"].as_i64().unwrap())).collect();
    assert_eq!(s["n1"], 10);
    assert_eq!(s["n2"], 7, "same rack, from the Node objects' labels");
    assert_eq!(s["n3"], 3, "same region only");
}

#[tokio::test]
async fn prioritize_prefers_the_replica_node_and_pods_without_volumes_pass() {
    let (cluster, app) = setup();
    let args = serde_json::json!({"Pod": pod_json("data-web-0", serde_json::json!({})), "Nodes": node_list()});
    let (_, body) = call(&app, "/prioritize", args.to_string()).await;
    let scores: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let best = scores.iter().max_by_key(|h| h["Score"].as_i64().unwrap()).unwrap();
    assert_eq!(best["Host"], "n1");
    assert!(scores.iter().all(|h| (0..=10).contains(&h["Score"].as_i64().unwrap())));
    assert!(cluster.events.lock().unwrap().is_empty(), "the replica node is a candidate: nothing to explain");
    // A pod whose claim is not a Strata volume: everything passes, scores are neutral.
    let other = serde_json::json!({"Pod": pod_json("other-claim", serde_json::json!({})), "Nodes": node_list()});
    let (_, body) = call(&app, "/filter", other.to_string()).await;
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["Nodes"]["items"].as_array().unwrap().len(), 5);
    assert!(r["FailedNodes"].as_object().unwrap().is_empty());
    let (_, body) = call(&app, "/prioritize", other.to_string()).await;
    let scores: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(scores.iter().all(|h| h["Score"] == 0));
}

#[tokio::test]
async fn events_explain_why_a_pod_is_not_with_its_data() {
    let (cluster, app) = setup();
    let args = serde_json::json!({"Pod": pod_json("data-web-0", serde_json::json!({})), "NodeNames": ["n2", "n3"]});
    call(&app, "/prioritize", args.to_string()).await;
    let ev = cluster.events.lock().unwrap().clone();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, "NonOptimumScheduling");
    assert!(ev[0].1.contains("pvc-1111") && ev[0].1.contains("n1"), "{:?}", ev[0]);
    let local =
        serde_json::json!({"Pod": pod_json("data-web-0", serde_json::json!({"strata.dev/preferLocalNodeOnly": "true"})), "NodeNames": ["n1", "n2"]});
    let (_, body) = call(&app, "/filter", local.to_string()).await;
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["NodeNames"], serde_json::json!(["n1"]));
    assert!(r["FailedNodes"]["n2"].as_str().unwrap().contains("preferLocalNodeOnly"));
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_reason() {
    let (_, app) = setup();
    for (body, reason) in [
        ("{not json", "not JSON"),
        ("[]", "JSON object"),
        (r#"{"Nodes": {"items": []}}"#, "no Pod"),
        (r#"{"Pod": {"metadata": {"name": "x"}}}"#, "neither Nodes nor NodeNames"),
        (r#"{"Pod": {"spec": {"volumes": 7}}, "NodeNames": []}"#, "malformed"),
    ] {
        for path in ["/filter", "/prioritize"] {
            let (st, text) = call(&app, path, body.to_string()).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{path} {body}");
            assert!(text.contains(reason), "{path} {body}: {text}");
        }
    }
    let req = Request::get("/healthz").body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::OK);
    let req = Request::get("/metrics").body(Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let text = String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("strata_stork_bad_requests_total 10"), "{text}");
    let req = Request::post("/filters").body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::NOT_FOUND, "routes match exactly");
}

/// kube-scheduler skips an extender that answers with an Error when it is `ignorable`, and then
/// binds pods to the dead node: the filter must fail the nodes instead, and prioritize must give
/// the dead node nothing.
#[tokio::test]
async fn a_dead_replica_node_fails_closed_with_reasons_and_scores_zero() {
    // The replica's engine is offline: no node can serve the data.
    let (cluster, app) = setup_with(&[("n1", "offline"), ("n2", "online"), ("n3", "online"), ("n4", "storage_down")]);
    let args = serde_json::json!({"Pod": pod_json("data-web-0", serde_json::json!({})), "Nodes": node_list()});
    for _ in 0..3 {
        let (st, body) = call(&app, "/filter", args.to_string()).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        let r: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(r["Error"], "", "never an Error, which an ignorable extender's caller would skip");
        assert!(r["Nodes"]["items"].as_array().unwrap().is_empty(), "{body}");
        let failed = r["FailedNodes"].as_object().unwrap();
        assert_eq!(failed.len(), 5, "{body}");
        assert_eq!(failed["n1"], "Strata is offline on this node");
        assert_eq!(failed["n4"], "Strata's storage is down on this node");
        let why = failed["n2"].as_str().unwrap();
        assert!(why.contains("pvc-1111") && why.contains("no online replica"), "{why}");
    }
    let (_, body) = call(&app, "/prioritize", args.to_string()).await;
    let scores: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let s: BTreeMap<String, i64> = scores.iter().map(|h| (h["Host"].as_str().unwrap().to_string(), h["Score"].as_i64().unwrap())).collect();
    assert_eq!(s["n1"], 0, "the dead replica node scores nothing");
    assert_eq!(s["n4"], 0, "storage down scores nothing");
    let ev = cluster.events.lock().unwrap().clone();
    assert!(ev.iter().all(|(reason, _)| reason == "FailedScheduling" || reason == "NonOptimumScheduling"), "{ev:?}");
    assert!(ev.iter().any(|(_, m)| m.contains("no online replica")), "{ev:?}");

    // Only the replica's node has its storage down: it is filtered out, and with no other
    // replica online so is every other node.
    let (_, app) = setup_with(&[("n1", "storage_down"), ("n2", "online"), ("n3", "online")]);
    let (_, body) = call(&app, "/filter", args.to_string()).await;
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["FailedNodes"]["n1"], "Strata's storage is down on this node");
    assert!(r["Nodes"]["items"].as_array().unwrap().is_empty(), "its only replica is down: {body}");
    let (_, body) = call(&app, "/prioritize", args.to_string()).await;
    let scores: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(scores.iter().all(|h| h["Score"] == 0), "{body}");
}

#[tokio::test]
async fn strata_unreachable_fails_every_node_for_a_pod_with_strata_volumes() {
    let (cluster, app) = setup_with(&[("n1", "online")]);
    // A claim bound to a volume Strata does not know: its placement cannot be read.
    let mut claims = cluster.claims.clone();
    claims.insert("lost".into(), "pvc-unknown".into());
    let cluster = Arc::new(FakeCluster { claims, topology: cluster.topology.clone(), events: Mutex::new(vec![]) });
    let storage = Arc::new(FakeStorage { nodes: vec![], replicas: BTreeMap::new() });
    let app2 = router(Arc::new(Extender { cluster, storage, metrics: Arc::new(Metrics::default()) }));
    drop(app);
    let args = serde_json::json!({"Pod": pod_json("lost", serde_json::json!({})), "NodeNames": ["n1", "n2"]});
    let (_, body) = call(&app2, "/filter", args.to_string()).await;
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["Error"], "");
    assert_eq!(r["NodeNames"], serde_json::json!([]));
    assert!(r["FailedNodes"]["n1"].as_str().unwrap().contains("pvc-unknown"), "{body}");
}

/// A certificate of `ca` for `name`: (cert PEM, key PEM).
fn cert_of(ca: &(String, String), name: &str, hosts: &[&str]) -> (String, String) {
    strata_api::pki::sign(&ca.0, &ca.1, name, &hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap()
}

/// One HTTP/1.1 request over TLS to `addr` as `identity` (or no client certificate), trusting
/// `ca`: the status code, or the error that stopped the handshake or the exchange.
async fn https_call(addr: std::net::SocketAddr, ca: &str, identity: Option<&(String, String)>, path: &str, body: &str) -> Result<u16, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((c, k)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(c.as_bytes()).map(|c| c.unwrap()).collect(),
                PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("strata-stork.strata.svc").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: strata-stork\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    let code = text.split_whitespace().nth(1).ok_or_else(|| format!("no status line in {text:?}"))?;
    code.parse().map_err(|_| format!("bad status line in {text:?}"))
}

#[tokio::test]
async fn over_https_only_the_schedulers_certificate_may_filter_and_a_renewed_certificate_is_served() {
    use strata_stork::https;
    let ca = strata_api::pki::new_ca().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write_server = |ca: &(String, String)| {
        let (c, k) = cert_of(ca, "strata-stork", &["strata-stork.strata.svc"]);
        std::fs::write(dir.path().join("ca.crt"), &ca.0).unwrap();
        std::fs::write(dir.path().join("node.crt"), c).unwrap();
        std::fs::write(dir.path().join("node.key"), k).unwrap();
    };
    write_server(&ca);
    let tls = Arc::new(https::ServerTls::load(dir.path()).unwrap());
    let (_, app) = setup();
    let app = https::require_client_cert(app, https::ClientPolicy { names: vec!["strata-scheduler".into()] });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(https::serve(listener, app, tls.clone(), std::time::Duration::from_secs(3600)));

    let args = serde_json::json!({"Pod": pod_json("data-web-0", serde_json::json!({})), "Nodes": node_list()}).to_string();
    let scheduler = cert_of(&ca, "strata-scheduler", &[]);
    let csi = cert_of(&ca, "strata-csi", &[]);
    let stranger = cert_of(&strata_api::pki::new_ca().unwrap(), "strata-scheduler", &[]);
    assert_eq!(https_call(addr, &ca.0, Some(&scheduler), "/filter", &args).await, Ok(200));
    assert_eq!(https_call(addr, &ca.0, Some(&scheduler), "/prioritize", &args).await, Ok(200));
    assert_eq!(https_call(addr, &ca.0, None, "/filter", &args).await, Ok(401), "no client certificate");
    assert_eq!(https_call(addr, &ca.0, None, "/prioritize", &args).await, Ok(401), "no client certificate");
    assert_eq!(https_call(addr, &ca.0, Some(&csi), "/filter", &args).await, Ok(403), "a name not in --tls-client-name");
    assert!(https_call(addr, &ca.0, Some(&stranger), "/filter", &args).await.is_err(), "another CA's certificate");
    assert_eq!(https_call(addr, &ca.0, None, "/healthz", "").await, Ok(405), "probes reach /healthz (GET only) without a certificate");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("POST /filter HTTP/1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{args}", args.len()).as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 200"), "plain HTTP was answered");
    }

    // A new CA and certificate in the directory: served once reloaded, the old CA's client
    // refused, the new CA's scheduler accepted.
    assert_eq!(tls.reload_if_changed(), Ok(false), "nothing changed yet");
    let ca2 = strata_api::pki::new_ca().unwrap();
    write_server(&ca2);
    assert_eq!(tls.reload_if_changed(), Ok(true));
    assert!(https_call(addr, &ca.0, Some(&scheduler), "/filter", &args).await.is_err(), "the old CA no longer verifies the server");
    assert_eq!(https_call(addr, &ca2.0, Some(&cert_of(&ca2, "strata-scheduler", &[])), "/filter", &args).await, Ok(200));
    assert!(https_call(addr, &ca2.0, Some(&scheduler), "/filter", &args).await.is_err(), "the old CA's client certificate");
}

#[test]
fn plain_http_beyond_loopback_is_refused_unless_asked_for() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata-stork"))
        .args(["--listen", "0.0.0.0:0"])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("plain HTTP") && err.contains("--tls-dir") && err.contains("--allow-plain-http"), "{err}");
    // Asked for: it gets past that check (and stops at the missing Kubernetes config).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata-stork"))
        .args(["--listen", "0.0.0.0:0", "--allow-plain-http"])
        .env("KUBECONFIG", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("plain HTTP") && err.contains("Kubernetes client"), "{err}");
}
