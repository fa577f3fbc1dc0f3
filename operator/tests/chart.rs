//! The Helm chart's defaults against the generated CRD: the StorageCluster that
//! `charts/strata/templates/storagecluster.yaml` renders from `values.yaml` must pass the CRD's
//! OpenAPI schema as the API server checks it (types, required fields, enums, bounds, no unknown
//! fields) — `helm install strata charts/strata` on defaults once failed exactly there — and the
//! internal etcd must keep its data off Strata's own StorageClasses.

use serde_json::Value;
use std::path::PathBuf;
use strata_operator::crd::*;
use strata_operator::render::desired;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/strata")
}

fn yaml_file(p: PathBuf) -> Value {
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Checks `v` against a Kubernetes structural schema; returns the violations with their paths.
fn validate(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            out.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) && schema.get("properties").is_none() {
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "" => true,
        other => panic!("{path}: schema type {other} not handled by this check"),
    };
    if !ok {
        out.push(format!("{path}: expected {ty}, got {v}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            out.push(format!("{path}: {v} is not one of {allowed:?}"));
        }
    }
    if let (Some(n), Some(min)) = (v.as_f64(), schema["minimum"].as_f64()) {
        if n < min {
            out.push(format!("{path}: {n} is below the minimum {min}"));
        }
    }
    if let (Some(n), Some(max)) = (v.as_f64(), schema["maximum"].as_f64()) {
        if n > max {
            out.push(format!("{path}: {n} is above the maximum {max}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                out.push(format!("{path}.{r}: Required value"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, child) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, child, &format!("{path}.{k}"), out),
                None => match schema.get("additionalProperties") {
                    Some(s) if s.is_object() => validate(s, child, &format!("{path}.{k}"), out),
                    _ => out.push(format!("{path}.{k}: unknown field")),
                },
            }
        }
    }
    if let (Some(items), Some(schema_items)) = (v.as_array(), schema.get("items")) {
        for (i, child) in items.iter().enumerate() {
            validate(schema_items, child, &format!("{path}[{i}]"), out);
        }
    }
}

fn crd_spec_schema() -> Value {
    let crd = yaml_file(chart().join("crds/storageclusters.strata.dev.yaml"));
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// The `spec` the chart's StorageCluster template renders from `values`: the template copies
/// whole sections (`<key>:` then `toYaml $sc.<key>`), read from the template itself so a new
/// section is covered too.
fn rendered_spec(values: &Value) -> Value {
    let sc = &values["storageCluster"];
    let template = std::fs::read_to_string(chart().join("templates/storagecluster.yaml")).unwrap();
    let mut spec = serde_json::Map::new();
    let image = format!("{}:{}", values["image"]["repository"].as_str().unwrap(), "0.1.0");
    spec.insert("image".into(), Value::String(image));
    let lines: Vec<&str> = template.lines().collect();
    let mut sections = 0;
    for w in lines.windows(2) {
        let (Some(key), Some(src)) = (w[0].strip_prefix("  ").and_then(|l| l.strip_suffix(':')), w[1].trim().strip_prefix("{{- toYaml $sc.")) else {
            continue;
        };
        let src = src.split_whitespace().next().unwrap();
        assert_eq!(key, src, "the template copies values.storageCluster.{src} into spec.{key}");
        spec.insert(key.into(), sc[src].clone());
        sections += 1;
    }
    assert!(sections >= 10, "the template's sections were read ({sections})");
    Value::Object(spec)
}

#[test]
fn the_charts_default_storage_cluster_passes_the_crd_schema() {
    let values = yaml_file(chart().join("values.yaml"));
    assert_eq!(values["storageCluster"]["create"], Value::Bool(true), "the chart creates a StorageCluster by default");
    let spec = rendered_spec(&values);
    let schema = crd_spec_schema();
    let mut errors = Vec::new();
    validate(&schema, &spec, "spec", &mut errors);
    assert!(errors.is_empty(), "helm install on defaults would be refused: {errors:#?}");
    // And the operator reads it back with every default filled in.
    let parsed: StorageClusterSpec = serde_json::from_value(spec).unwrap();
    assert!(parsed.stork.enabled && !parsed.stork.scheduler_image.is_empty(), "{:?}", parsed.stork);
    assert!(parsed.kvdb.internal && parsed.kvdb.endpoints.is_empty());
}

#[test]
fn the_schema_check_refuses_what_the_api_server_refuses() {
    let schema = crd_spec_schema();
    let mut errors = Vec::new();
    let bad = serde_json::json!({"stork": {"enabled": "yes"}, "network": {"sdkPort": 70000}, "updateStrategy": {"type": "Sometimes"}, "bogus": 1});
    validate(&schema, &bad, "spec", &mut errors);
    let all = errors.join("\n");
    for want in [
        "spec.image: Required value",
        "spec.stork.enabled: expected boolean",
        "spec.network.sdkPort: 70000 is above",
        "spec.updateStrategy.type",
        "spec.bogus: unknown field",
    ] {
        assert!(all.contains(want), "{want} missing from:\n{all}");
    }
    // A section given with only some fields (as the chart does) needs no others.
    let mut errors = Vec::new();
    validate(&schema, &serde_json::json!({"image": "x:1", "stork": {"enabled": true}}), "spec", &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn the_internal_etcd_keeps_its_data_on_the_nodes_not_on_strata_volumes() {
    let values = yaml_file(chart().join("values.yaml"));
    let spec: StorageClusterSpec = serde_json::from_value(rendered_spec(&values)).unwrap();
    let mut sc = StorageCluster::new("strata", spec);
    sc.metadata.namespace = Some("strata".into());
    let objs = desired(&sc);
    let sts = objs.iter().find(|o| o.api.kind == "StatefulSet" && o.name == "strata-etcd").expect("the internal etcd on the chart's defaults");
    let body = &sts.body;
    assert!(
        body["spec"].get("volumeClaimTemplates").is_none(),
        "no PersistentVolumeClaim (the default StorageClass is Strata's own): {}",
        body["spec"]
    );
    let vols = body["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let data = vols.iter().find(|v| v["name"] == "data").unwrap();
    assert_eq!(data["hostPath"]["path"], "/var/lib/strata/kvdb");
    let anti = &body["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname", "one member per node");
    // Nothing the operator renders asks for a volume of Strata's StorageClasses.
    let classes: Vec<String> = sc.spec.storage_classes.iter().map(|c| c.name.clone()).collect();
    for o in &objs {
        let text = o.body.to_string();
        assert!(!text.contains("volumeClaimTemplates") && !text.contains("\"persistentVolumeClaim\""), "{} {} claims a volume", o.api.kind, o.name);
        for c in &classes {
            assert!(o.api.kind == "StorageClass" || !text.contains(&format!("\"storageClassName\":\"{c}\"")), "{} uses {c}", o.name);
        }
    }
}
