//! kube-scheduler extender v1 JSON. The Go structs carry no json tags, so the wire keys are the
//! Go field names (`Pod`, `Nodes`, `NodeNames`, ...). We accept top-level keys in any case.
//! Pods and nodes are read through small structs that take only what we use, so any valid
//! Kubernetes object is accepted.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Set once the pod is being deleted (RFC 3339).
    #[serde(rename = "deletionTimestamp", skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ClaimRef {
    #[serde(rename = "claimName")]
    pub claim_name: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct PodVolume {
    pub name: String,
    #[serde(rename = "persistentVolumeClaim", skip_serializing_if = "Option::is_none")]
    pub pvc: Option<ClaimRef>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct PodSpec {
    pub volumes: Vec<PodVolume>,
    #[serde(rename = "nodeName")]
    pub node_name: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
}

impl Pod {
    pub fn claims(&self) -> Vec<String> {
        self.spec.volumes.iter().filter_map(|v| v.pvc.as_ref()).map(|c| c.claim_name.clone()).filter(|c| !c.is_empty()).collect()
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Node {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct NodeList {
    pub items: Vec<Node>,
}

/// `ExtenderArgs`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod")]
    pub pod: Pod,
    #[serde(rename = "Nodes", default)]
    pub nodes: Option<NodeList>,
    #[serde(rename = "NodeNames", default)]
    pub node_names: Option<Vec<String>>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExtenderFilterResult {
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}

/// One entry of `HostPriorityList`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

const TOP_KEYS: [&str; 3] = ["Pod", "Nodes", "NodeNames"];

/// Parses ExtenderArgs, matching the top-level keys case-insensitively.
pub fn parse_args(body: &[u8]) -> Result<ExtenderArgs, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("request body is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = v else {
        return Err("request body must be a JSON object with Pod and Nodes or NodeNames".into());
    };
    let mut norm = serde_json::Map::new();
    for (k, v) in map {
        let key = TOP_KEYS.iter().find(|t| t.eq_ignore_ascii_case(&k)).map(|t| t.to_string()).unwrap_or(k);
        norm.insert(key, v);
    }
    if !norm.contains_key("Pod") {
        return Err("ExtenderArgs has no Pod".into());
    }
    let args: ExtenderArgs = serde_json::from_value(serde_json::Value::Object(norm)).map_err(|e| format!("malformed ExtenderArgs: {e}"))?;
    if args.nodes.is_none() && args.node_names.is_none() {
        return Err("ExtenderArgs has neither Nodes nor NodeNames".into());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_in_any_case_and_objects_keep_their_fields() {
        let body = br#"{"pod":{"metadata":{"name":"web-0","namespace":"db","annotations":{"a":"b"}},
            "spec":{"volumes":[{"name":"data","persistentVolumeClaim":{"claimName":"data-web-0"}},{"name":"tmp","emptyDir":{}}]}},
            "NODES":{"metadata":{},"items":[{"metadata":{"name":"n1","labels":{"topology.kubernetes.io/zone":"z1"}}}]}}"#;
        let a = parse_args(body).unwrap();
        assert_eq!(a.pod.metadata.name, "web-0");
        assert_eq!(a.pod.claims(), vec!["data-web-0".to_string()]);
        assert_eq!(a.nodes.unwrap().items[0].metadata.labels["topology.kubernetes.io/zone"], "z1");
    }

    #[test]
    fn malformed_bodies_have_reasons() {
        assert!(parse_args(b"{nope").unwrap_err().contains("not JSON"));
        assert!(parse_args(b"[1]").unwrap_err().contains("object"));
        assert!(parse_args(br#"{"Nodes":{"items":[]}}"#).unwrap_err().contains("no Pod"));
        assert!(parse_args(br#"{"Pod":{}}"#).unwrap_err().contains("neither"));
        assert!(parse_args(br#"{"Pod":{"spec":{"volumes":"x"}},"NodeNames":[]}"#).unwrap_err().contains("malformed"));
    }

    #[test]
    fn results_use_go_field_names() {
        let r = ExtenderFilterResult { node_names: Some(vec!["a".into()]), ..Default::default() };
        let j = serde_json::to_value(&r).unwrap();
        assert!(j.get("NodeNames").is_some() && j.get("FailedNodes").is_some() && j.get("Error").is_some());
        let h = serde_json::to_value(HostPriority { host: "a".into(), score: 3 }).unwrap();
        assert_eq!(h, serde_json::json!({"Host": "a", "Score": 3}));
    }
}
