//! `strata-csi --mode docker`: a Docker volume plugin (the legacy plugin protocol: JSON over HTTP
//! on a unix socket in `/run/docker/plugins/`), for Docker, Swarm and every other consumer of
//! Docker's volume plugins. Volumes are cluster-wide (`global` scope): `Create` makes a Strata
//! volume from options with the StorageClass keys (`repl`, `nodes`, `io_throttle_*`, ...) plus
//! `size`; `Mount` makes this node the volume's target and mounts it through the same code as
//! the CSI node plugin (`stage`), counted per container; the last `Unmount` undoes it, so the
//! volume can follow its container to another node.
//!
//! Portworx's inline form works too: `docker run -v "name=db;size=10G;repl=2:/data"` names the
//! volume and gives its options in one go.
//!
//! The request and response shapes are pure (`Request`, `Reply`) and handled by `Plugin::handle`;
//! the HTTP layer around them is thin.

use crate::params;
use crate::sdk::Sdk;
use crate::stage::{Devices, Mount};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use strata_api::v1 as pb;
use tonic::Code;

/// Size of a volume created without a `size` option.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The media type of the plugin protocol.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// The body of a `/VolumeDriver.*` call (every field optional; each call uses some).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Request {
    pub name: String,
    /// `docker volume create --opt k=v`.
    pub opts: Option<HashMap<String, String>>,
    /// The mount's caller (a container) for Mount and Unmount.
    #[serde(rename = "ID")]
    pub id: String,
    /// The name as Docker gave it (an inline spec stays whole here; `name` is the volume's).
    #[serde(skip)]
    pub docker_name: String,
}

/// What a volume call answers: `Err` is empty on success.
#[derive(Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Reply {
    pub err: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
}

impl Reply {
    fn err(e: impl std::fmt::Display) -> Reply {
        Reply { err: e.to_string(), ..Default::default() }
    }
    fn mountpoint(p: String) -> Reply {
        Reply { mountpoint: Some(p), ..Default::default() }
    }
}

/// The volume spec a `docker volume create` asks for: `size` (default 1 GiB) and the
/// StorageClass keys; the filesystem (`fs`, default ext4) goes in its labels, where `Mount` finds
/// it. Errors name the option.
pub fn spec_from_opts(opts: &HashMap<String, String>) -> Result<pb::VolumeSpec, String> {
    let mut rest = opts.clone();
    let size = match rest.remove("size") {
        Some(s) => strata_api::units::parse_size(&s).map_err(|e| format!("option size: {s:?}: {e}"))?,
        None => DEFAULT_SIZE,
    };
    if size == 0 {
        return Err("option size: must be more than 0".into());
    }
    let p = params::parse(&rest).map_err(|e| e.to_string().replacen("StorageClass parameter", "option", 1))?;
    if p.secure {
        return Err(
            "option secure: encrypted volumes need a passphrase, which Docker's plugin protocol cannot pass safely; create them with stratactl"
                .into(),
        );
    }
    let fs = if p.fs.is_empty() { "ext4".to_string() } else { p.fs };
    Ok(pb::VolumeSpec {
        size_bytes: size,
        repl: p.repl,
        labels: p.labels.into_iter().chain([("created-by".to_string(), "docker".to_string()), ("fs".to_string(), fs)]).collect(),
        qos: Some(pb::QosLimits { rd_iops: p.rd_iops, wr_iops: p.wr_iops, rd_bw: p.rd_bw, wr_bw: p.wr_bw }),
        nodes: p.nodes,
        zones: p.zones,
        racks: p.racks,
        ..Default::default()
    })
}

/// A volume name as Docker passes it: a plain name, or Portworx's inline form
/// `name=db;size=10G;repl=2` (from `docker run -v "name=db;size=10G:/data"`), which names the
/// volume and gives its options at once. Returns the Strata volume name and the inline options.
pub fn resolve_name(raw: &str) -> Result<(String, HashMap<String, String>), String> {
    if !raw.contains('=') {
        return Ok((raw.to_string(), HashMap::new()));
    }
    let mut opts = HashMap::new();
    for part in raw.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("inline volume {raw:?}: {part:?} is not key=value"))?;
        opts.insert(k.trim().to_string(), v.trim().to_string());
    }
    let name = opts.remove("name").filter(|n| !n.is_empty()).ok_or_else(|| format!("inline volume {raw:?} has no name=..."))?;
    Ok((name, opts))
}

pub struct Plugin {
    pub sdk: Sdk,
    pub devices: Devices,
    /// Where volumes are mounted: `<root>/<volume>`.
    pub root: PathBuf,
    /// The containers using each volume mounted here (persisted in `<root>/mounts.json`, so a
    /// restarted plugin still counts them).
    mounts: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// One call at a time per volume.
    busy: crate::inflight::InFlight,
}

impl Plugin {
    pub fn new(sdk: Sdk, devices: Devices, root: PathBuf) -> Plugin {
        let mounts = std::fs::read(root.join("mounts.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Plugin { sdk, devices, root, mounts: Mutex::new(mounts), busy: Default::default() }
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Where the volume is mounted on this node, or "" when it is not (what Docker expects).
    fn mounted_at(&self, name: &str) -> String {
        let mp = self.mountpoint(name);
        if crate::attach::is_mounted(&mp) {
            mp.to_string_lossy().into_owned()
        } else {
            String::new()
        }
    }

    /// Counts container `id` as a user of the volume's mount here.
    fn add_user(&self, name: &str, id: &str) {
        let mut m = self.mounts.lock();
        m.entry(name.to_string()).or_default().insert(id.to_string());
        self.save_mounts(&m);
    }

    fn save_mounts(&self, m: &BTreeMap<String, BTreeSet<String>>) {
        let tmp = self.root.join("mounts.json.tmp");
        let r = std::fs::create_dir_all(&self.root)
            .and_then(|_| std::fs::write(&tmp, serde_json::to_vec(m).expect("plain data")))
            .and_then(|_| std::fs::rename(&tmp, self.root.join("mounts.json")));
        if let Err(e) = r {
            tracing::warn!("recording the mounts in {}: {e}", self.root.display());
        }
    }

    /// Serves one call; `path` is the URL path (`/VolumeDriver.Mount`, ...).
    pub async fn handle(&self, path: &str, mut req: Request) -> Value {
        // Docker knows an inline volume by its whole spec; Strata by the name in it.
        req.docker_name = req.name.clone();
        let inline = match resolve_name(&req.name) {
            Ok((name, opts)) => {
                req.name = name;
                opts
            }
            Err(e) => return serde_json::to_value(Reply::err(e)).expect("plain data"),
        };
        if !inline.is_empty() {
            req.opts.get_or_insert_with(HashMap::new).extend(inline);
        }
        let reply = match path {
            "/Plugin.Activate" => return json!({ "Implements": ["VolumeDriver"] }),
            "/VolumeDriver.Capabilities" => Reply { capabilities: Some(json!({ "Scope": "global" })), ..Default::default() },
            "/VolumeDriver.List" => self.list().await,
            "/VolumeDriver.Create" => self.create(&req).await,
            "/VolumeDriver.Remove" => self.remove(&req).await,
            "/VolumeDriver.Get" => self.get(&req).await,
            "/VolumeDriver.Path" => self.path(&req),
            "/VolumeDriver.Mount" => self.mount(&req).await,
            "/VolumeDriver.Unmount" => self.unmount(&req).await,
            other => Reply::err(format!("{other} is not a call of the volume plugin protocol")),
        };
        if !reply.err.is_empty() {
            tracing::warn!(call = path, volume = %req.name, "{}", reply.err);
        }
        serde_json::to_value(reply).expect("plain data")
    }

    async fn create(&self, req: &Request) -> Reply {
        if req.name.is_empty() {
            return Reply::err("a volume name is required");
        }
        let spec = match spec_from_opts(req.opts.as_ref().unwrap_or(&HashMap::new())) {
            Ok(s) => s,
            Err(e) => return Reply::err(e),
        };
        let _busy = match self.busy.begin(&req.name) {
            Ok(b) => b,
            Err(s) => return Reply::err(s.message()),
        };
        match self.sdk.inspect(&req.name).await {
            // Docker creates a volume it does not know of yet; one that exists is used as it is.
            Ok(Some(_)) => return Reply::default(),
            Ok(None) => {}
            Err(s) => return Reply::err(format!("the Strata engine: {}", s.message())),
        }
        match self.sdk.volumes().create(pb::CreateVolumeRequest { name: req.name.clone(), spec: Some(spec), passphrase: Vec::new() }).await {
            Ok(_) => Reply::default(),
            Err(s) if s.code() == Code::AlreadyExists => Reply::default(),
            Err(s) => Reply::err(format!("creating volume {}: {}", req.name, s.message())),
        }
    }

    async fn remove(&self, req: &Request) -> Reply {
        if self.mounts.lock().get(&req.name).is_some_and(|ids| !ids.is_empty()) {
            return Reply::err(format!("volume {} is mounted by a container on this node", req.name));
        }
        match self.sdk.volumes().delete(pb::DeleteVolumeRequest { name: req.name.clone(), force: false }).await {
            Ok(_) => Reply::default(),
            Err(s) if s.code() == Code::NotFound => Reply::default(),
            Err(s) => Reply::err(format!("deleting volume {}: {}", req.name, s.message())),
        }
    }

    fn path(&self, req: &Request) -> Reply {
        Reply::mountpoint(self.mounted_at(&req.name))
    }

    async fn get(&self, req: &Request) -> Reply {
        match self.sdk.inspect(&req.name).await {
            Ok(Some(v)) if v.snapshot_of.is_empty() => {
                let spec = v.spec.clone().unwrap_or_default();
                Reply {
                    volume: Some(json!({
                        "Name": req.docker_name,
                        "Mountpoint": self.mounted_at(&req.name),
                        "Status": {
                            "size_bytes": spec.size_bytes,
                            "repl": spec.repl,
                            "replicas": v.replica_nodes,
                            "in_sync": v.in_sync_nodes,
                            "attached_on": v.attached_node,
                        },
                    })),
                    ..Default::default()
                }
            }
            Ok(_) => Reply::err(format!("no volume named {}", req.name)),
            Err(s) => Reply::err(format!("the Strata engine: {}", s.message())),
        }
    }

    async fn list(&self) -> Reply {
        match self.sdk.volumes().list(pb::ListVolumesRequest::default()).await {
            Ok(r) => {
                let vols = r
                    .into_inner()
                    .volumes
                    .into_iter()
                    .filter(|v| v.snapshot_of.is_empty())
                    .map(|v| json!({ "Name": v.name, "Mountpoint": self.mounted_at(&v.name) }))
                    .collect();
                Reply { volumes: Some(vols), ..Default::default() }
            }
            Err(s) => Reply::err(format!("the Strata engine: {}", s.message())),
        }
    }

    async fn mount(&self, req: &Request) -> Reply {
        let _busy = match self.busy.begin(&req.name) {
            Ok(b) => b,
            Err(s) => return Reply::err(s.message()),
        };
        let mp = self.mountpoint(&req.name);
        if crate::attach::is_mounted(&mp) {
            self.add_user(&req.name, &req.id);
            return Reply::mountpoint(mp.to_string_lossy().into_owned());
        }
        let v = match self.sdk.inspect(&req.name).await {
            Ok(Some(v)) => v,
            Ok(None) => return Reply::err(format!("no volume named {}", req.name)),
            Err(s) => return Reply::err(format!("the Strata engine: {}", s.message())),
        };
        let fs = v.spec.as_ref().and_then(|s| s.labels.get("fs")).cloned().unwrap_or_else(|| "ext4".into());
        if let Err(s) = self.devices.attach(&self.sdk, &req.name, Vec::new()).await {
            return Reply::err(format!("attaching volume {} on this node: {}", req.name, s.message()));
        }
        if let Err(s) = self.devices.stage(&req.name, Some(Mount { fs, flags: Vec::new(), at: mp.clone() })).await {
            // Leave nothing half made: the device goes and the volume is free for another node.
            let _ = self.devices.unstage(&req.name, Some(mp.clone())).await;
            let _ = self.devices.detach(&self.sdk, &req.name).await;
            return Reply::err(format!("mounting volume {}: {}", req.name, s.message()));
        }
        self.add_user(&req.name, &req.id);
        tracing::info!(volume = %req.name, mountpoint = %mp.display(), "mounted");
        Reply::mountpoint(mp.to_string_lossy().into_owned())
    }

    async fn unmount(&self, req: &Request) -> Reply {
        let _busy = match self.busy.begin(&req.name) {
            Ok(b) => b,
            Err(s) => return Reply::err(s.message()),
        };
        let left = {
            let mut m = self.mounts.lock();
            let ids = m.entry(req.name.clone()).or_default();
            ids.remove(&req.id);
            let left = ids.len();
            if left == 0 {
                m.remove(&req.name);
            }
            self.save_mounts(&m);
            left
        };
        if left > 0 {
            return Reply::default();
        }
        let mp = self.mountpoint(&req.name);
        if let Err(s) = self.devices.unstage(&req.name, Some(mp.clone())).await {
            return Reply::err(format!("unmounting volume {}: {}", req.name, s.message()));
        }
        let _ = std::fs::remove_dir(&mp);
        if let Err(s) = self.devices.detach(&self.sdk, &req.name).await {
            return Reply::err(format!("detaching volume {}: {}", req.name, s.message()));
        }
        tracing::info!(volume = %req.name, "unmounted; this node no longer serves it");
        Reply::default()
    }
}

/// Serves the plugin on `listener` until the process ends.
pub async fn serve(listener: tokio::net::UnixListener, plugin: Arc<Plugin>) -> std::io::Result<()> {
    use http_body_util::BodyExt;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let plugin = plugin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let plugin = plugin.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    // Docker sends no body (or `{}`) for the calls without arguments.
                    let parsed = if body.iter().all(u8::is_ascii_whitespace) { Ok(Request::default()) } else { serde_json::from_slice(&body) };
                    let reply = match parsed {
                        Ok(r) => plugin.handle(&path, r).await,
                        Err(e) => {
                            serde_json::to_value(Reply::err(format!("the request is not JSON of the plugin protocol: {e}"))).expect("plain data")
                        }
                    };
                    let body = http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(&reply).expect("plain data")));
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder().header("Content-Type", CONTENT_TYPE).body(body).expect("a valid response"),
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                tracing::debug!("plugin connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn options_are_the_storage_class_keys_plus_size() {
        let s = spec_from_opts(&opts(&[("size", "10G"), ("repl", "2"), ("nodes", "a,b"), ("io_throttle_rd_iops", "100"), ("fs", "xfs")])).unwrap();
        assert_eq!((s.size_bytes, s.repl, s.nodes.clone(), s.labels["fs"].as_str()), (10 << 30, 2, vec!["a".to_string(), "b".to_string()], "xfs"));
        assert_eq!(s.qos.unwrap().rd_iops, 100);
        assert_eq!(s.labels.get("created-by").map(String::as_str), Some("docker"));
        let d = spec_from_opts(&HashMap::new()).unwrap();
        assert_eq!((d.size_bytes, d.repl, d.labels["fs"].as_str()), (DEFAULT_SIZE, 1, "ext4"));
        for (bad, names) in [
            (opts(&[("repl", "7")]), "repl"),
            (opts(&[("size", "lots")]), "size"),
            (opts(&[("size", "0")]), "size"),
            (opts(&[("colour", "blue")]), "colour"),
            (opts(&[("secure", "true")]), "secure"),
        ] {
            let e = spec_from_opts(&bad).unwrap_err();
            assert!(e.starts_with(&format!("option {names}")), "{e}");
        }
    }

    #[test]
    fn inline_names_carry_options() {
        assert_eq!(resolve_name("db").unwrap(), ("db".to_string(), HashMap::new()));
        let (n, o) = resolve_name("name=db;size=10G;repl=2").unwrap();
        assert_eq!((n.as_str(), o.len(), o["size"].as_str(), o["repl"].as_str()), ("db", 2, "10G", "2"));
        assert!(resolve_name("size=10G;repl=2").unwrap_err().contains("no name"));
        assert!(resolve_name("name=db;junk").unwrap_err().contains("not key=value"));
    }

    #[test]
    fn requests_parse_as_docker_sends_them() {
        let r: Request = serde_json::from_str(r#"{"Name":"db","ID":"c0ffee","Opts":{"size":"1G"}}"#).unwrap();
        assert_eq!((r.name.as_str(), r.id.as_str()), ("db", "c0ffee"));
        assert_eq!(r.opts.unwrap()["size"], "1G");
        let r: Request = serde_json::from_str(r#"{"Name":"db","Opts":null}"#).unwrap();
        assert!(r.opts.is_none());
        let out = serde_json::to_value(Reply::mountpoint("/m".into())).unwrap();
        assert_eq!(out, json!({"Err": "", "Mountpoint": "/m"}));
        assert_eq!(serde_json::to_value(Reply::err("no")).unwrap(), json!({"Err": "no"}));
    }
}
