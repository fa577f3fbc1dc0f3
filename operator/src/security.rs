//! The security Secret: the cluster CA (`ca.crt`, `ca.key`), which signs each engine's node
//! certificate at pod start, and the system key (`system.key`), which signs the components' SDK
//! tokens. Made once when missing; a Secret the user made (their own CA) is used as it is.

use crate::crd::StorageCluster;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;

pub const KEYS: [&str; 3] = ["ca.crt", "ca.key", "system.key"];
/// The internal kvdb's certificate (server and peer), signed by the cluster CA.
pub const ETCD_KEYS: [&str; 2] = ["etcd.crt", "etcd.key"];

/// A new Secret's contents: a self-signed CA, a random system key and the internal kvdb's
/// certificate.
pub fn new_contents(sc: &StorageCluster) -> Result<BTreeMap<String, ByteString>, String> {
    let (cert, key) = strata_api::pki::new_ca().map_err(|e| format!("making the cluster CA: {e}"))?;
    let mut out = etcd_contents(sc, &cert, &key)?;
    out.insert("ca.crt".to_string(), ByteString(cert.into_bytes()));
    out.insert("ca.key".to_string(), ByteString(key.into_bytes()));
    out.insert("system.key".to_string(), ByteString(strata_api::pki::new_system_key().into_bytes()));
    Ok(out)
}

/// The internal kvdb's certificate, valid for every member's name and for loopback.
fn etcd_contents(sc: &StorageCluster, ca_cert: &str, ca_key: &str) -> Result<BTreeMap<String, ByteString>, String> {
    let ns = crate::render::ns(sc);
    let mut hosts: Vec<String> = (0..3).map(|i| format!("strata-etcd-{i}.strata-etcd.{ns}.svc")).collect();
    hosts.extend([format!("*.strata-etcd.{ns}.svc"), format!("*.strata-etcd.{ns}.svc.cluster.local"), "localhost".into(), "127.0.0.1".into()]);
    let (c, k) = strata_api::pki::sign(ca_cert, ca_key, "strata-etcd", &hosts).map_err(|e| format!("signing the kvdb's certificate: {e}"))?;
    Ok(BTreeMap::from([("etcd.crt".to_string(), ByteString(c.into_bytes())), ("etcd.key".to_string(), ByteString(k.into_bytes()))]))
}

/// Makes the StorageCluster's security Secret when it does not exist; refuses one that lacks a
/// key (the engines could not start with it).
pub async fn ensure(client: &Client, ns: &str, sc: &StorageCluster) -> Result<(), String> {
    let name = &sc.spec.security.secret_name;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await.map_err(|e| format!("reading Secret {ns}/{name}: {e}"))? {
        Some(s) => {
            let data = s.data.unwrap_or_default();
            let missing: Vec<&str> = KEYS.iter().copied().filter(|k| !data.contains_key(*k)).collect();
            if !missing.is_empty() {
                return Err(format!("Secret {ns}/{name} lacks {}: add them (your CA's certificate and key, a system key of 32+ bytes) or delete the Secret to have one made", missing.join(", ")));
            }
            // A Secret made by hand (the user's own CA) gets the internal kvdb's certificate,
            // signed with that CA, the first time one is needed.
            if sc.spec.kvdb.endpoints.is_empty() && ETCD_KEYS.iter().any(|k| !data.contains_key(*k)) {
                let text = |k: &str| String::from_utf8(data[k].0.clone()).map_err(|_| format!("Secret {ns}/{name}: {k} is not PEM text"));
                let add = etcd_contents(sc, &text("ca.crt")?, &text("ca.key")?)?;
                let patch = serde_json::json!({"data": add});
                api.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                    .await
                    .map_err(|e| format!("adding the kvdb's certificate to Secret {ns}/{name}: {e}"))?;
                tracing::info!(secret = %name, "signed the internal kvdb's certificate with the cluster CA");
            }
            Ok(())
        }
        None => {
            let mut s = Secret { data: Some(new_contents(sc)?), ..Default::default() };
            s.metadata.name = Some(name.clone());
            s.metadata.namespace = Some(ns.to_string());
            s.metadata.labels = Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_string(), "strata".to_string()),
                (crate::render::INSTANCE.to_string(), sc.name_any()),
            ]));
            s.metadata.owner_references = sc.controller_owner_ref(&()).map(|o| vec![o]);
            api.create(&PostParams::default(), &s).await.map_err(|e| format!("creating Secret {ns}/{name}: {e}"))?;
            tracing::info!(secret = %name, "made the cluster CA and system key");
            Ok(())
        }
    }
}

/// What the operator's own SDK calls need from the Secret.
pub struct Keys {
    pub system_key: Vec<u8>,
    pub ca_cert: Vec<u8>,
    /// The operator's client certificate and key (PEM, identity `strata-operator`), signed
    /// with the Secret's CA key for these calls: the engines take no SDK client without one.
    pub client_cert: (String, String),
}

/// The identity of the operator's own client certificate.
pub const OPERATOR_ID: &str = "strata-operator";

/// The system key and the CA certificate from the Secret, and a client certificate signed
/// with its CA key.
pub async fn keys(client: &Client, ns: &str, sc: &StorageCluster) -> Result<Keys, String> {
    let name = &sc.spec.security.secret_name;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get(name).await.map_err(|e| format!("reading Secret {ns}/{name}: {e}"))?;
    let mut d = s.data.unwrap_or_default();
    let mut take = |k: &str| d.remove(k).map(|b| b.0).ok_or_else(|| format!("Secret {ns}/{name} has no {k}"));
    let (system_key, ca_cert, ca_key) = (take("system.key")?, take("ca.crt")?, take("ca.key")?);
    let text = |b: &[u8], k: &str| String::from_utf8(b.to_vec()).map_err(|_| format!("Secret {ns}/{name}: {k} is not PEM text"));
    let client_cert = strata_api::pki::sign(&text(&ca_cert, "ca.crt")?, &text(&ca_key, "ca.key")?, OPERATOR_ID, &[])
        .map_err(|e| format!("Secret {ns}/{name}: signing the operator's client certificate: {e}"))?;
    Ok(Keys { system_key, ca_cert, client_cert })
}
