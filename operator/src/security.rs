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

/// A new Secret's contents: a self-signed CA and a random system key.
pub fn new_contents() -> Result<BTreeMap<String, ByteString>, String> {
    let (cert, key) = strata_api::pki::new_ca().map_err(|e| format!("making the cluster CA: {e}"))?;
    Ok(BTreeMap::from([
        ("ca.crt".to_string(), ByteString(cert.into_bytes())),
        ("ca.key".to_string(), ByteString(key.into_bytes())),
        ("system.key".to_string(), ByteString(strata_api::pki::new_system_key().into_bytes())),
    ]))
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
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("Secret {ns}/{name} lacks {}: add them (your CA's certificate and key, a system key of 32+ bytes) or delete the Secret to have one made", missing.join(", ")))
            }
        }
        None => {
            let mut s = Secret { data: Some(new_contents()?), ..Default::default() };
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
}

/// The system key and the CA certificate from the Secret.
pub async fn keys(client: &Client, ns: &str, sc: &StorageCluster) -> Result<Keys, String> {
    let name = &sc.spec.security.secret_name;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get(name).await.map_err(|e| format!("reading Secret {ns}/{name}: {e}"))?;
    let mut d = s.data.unwrap_or_default();
    let mut take = |k: &str| d.remove(k).map(|b| b.0).ok_or_else(|| format!("Secret {ns}/{name} has no {k}"));
    Ok(Keys { system_key: take("system.key")?, ca_cert: take("ca.crt")? })
}
