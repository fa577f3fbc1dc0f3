//! stratactl against a real engine: tables, --json on every command, sizes and error messages.

mod common;

use common::{ctl_cluster, json_cluster, CTL};
use std::process::Command;
use strata_e2e::certs;

struct Engine {
    _proc: strata_e2e::EngineProc,
    sdk: String,
    _dir: tempfile::TempDir,
}

fn engine() -> Engine {
    engine_with(&[])
}

fn engine_with(extra: &[&str]) -> Engine {
    let dir = tempfile::Builder::new().prefix("stratactl-test-").tempdir_in("/var/tmp").unwrap();
    let proc = strata_e2e::EngineProc::start_with(dir.path(), 1, "256MiB", extra);
    Engine { sdk: proc.sdk.clone(), _proc: proc, _dir: dir }
}

fn ctl(e: &Engine, args: &[&str]) -> (bool, String, String) {
    ctl_env(e, &[], args)
}

/// stratactl with its contexts in the engine's directory (never the user's own) and `env`.
fn ctl_env(e: &Engine, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(CTL);
    c.env("STRATA_ENDPOINT", &e.sdk).env("STRATA_CONFIG_DIR", e._dir.path()).env_remove("STRATA_TOKEN").env_remove("STRATA_CONTEXT");
    let out = c.envs(env.iter().copied()).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(e: &Engine, args: &[&str]) -> String {
    let (good, out, err) = ctl(e, args);
    assert!(good, "stratactl {args:?} failed: {err}");
    out
}

fn json(e: &Engine, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ok(e, &a);
    serde_json::from_str(&out).unwrap_or_else(|err| panic!("stratactl {args:?} --json printed no JSON ({err}): {out}"))
}

#[test]
fn volume_commands_with_tables_and_json() {
    let e = engine();
    assert!(ok(&e, &["volume", "create", "a", "--size", "10M", "--label", "app=db", "--label", "tier=gold"]).contains("successfully created"));
    let b = json(&e, &["volume", "create", "b", "--size", "10MiB"]);
    assert_eq!(b["size_bytes"], 10 << 20);
    let c = json(&e, &["volume", "create", "c", "--size", "1048576", "--repl", "1"]);
    assert_eq!(c["size_bytes"], 1 << 20);
    let table = ok(&e, &["volume", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("NAME") && lines[0].contains("SIZE"), "{table}");
    let col = lines[0].find("SIZE").unwrap();
    assert!(lines[1..].iter().all(|l| l[col..].starts_with(|c: char| c.is_ascii_digit())), "SIZE column lines up: {table}");
    assert!(table.contains("app=db,tier=gold"), "{table}");
    let list = json(&e, &["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 3);
    let a = json(&e, &["volume", "inspect", "a"]);
    assert_eq!(a["labels"]["tier"], "gold");
    assert!(ok(&e, &["volume", "inspect", "a"]).contains("10 MiB"));
    let grown = json(&e, &["volume", "update", "a", "--size", "20MiB"]);
    assert_eq!(grown["size_bytes"], 20 << 20);
    assert_eq!(json(&e, &["volume", "delete", "c"])["deleted"], "c");
    let status = json(&e, &["status"]);
    assert_eq!(status["volume_count"], 2);
    assert_eq!(status["nodes"][0]["status"], "online");
    assert!(ok(&e, &["status"]).contains("Status: ok"));
    let pools = json(&e, &["service", "pool", "show"]);
    assert_eq!(pools[0]["devices"].as_array().unwrap().len(), 1);
    assert!(ok(&e, &["service", "pool", "show"]).contains("DEVICE"));
    assert_eq!(json(&e, &["cluster", "list"]).as_array().unwrap().len(), 1);
    let nodes = ok(&e, &["cluster", "list"]);
    assert!(nodes.contains("ZONE") && nodes.contains("REPLICATION"), "{nodes}");
    assert_eq!(ok(&e, &["alerts", "show"]).trim(), "No alerts.");
    let alerts = json(&e, &["alerts", "show"]);
    assert_eq!((alerts["alerts"].as_array().unwrap().len(), alerts["unreachable"].as_array().unwrap().len()), (0, 0));
}

#[test]
fn bad_input_gets_messages_that_say_what_to_do() {
    let e = engine();
    for (args, expect) in [
        (vec!["volume", "create", "x", "--size", "0"], "greater than 0"),
        (vec!["volume", "create", "x", "--size=-1G"], "negative"),
        (vec!["volume", "create", "x", "--size", "abc"], "not a number"),
        (vec!["volume", "create", "x", "--size", "10XB"], "unknown unit"),
        (vec!["volume", "create", "x", "--size", "1TiB"], "larger than the pool"),
        (vec!["volume", "create", "x", "--size", "1M", "--repl", "2"], "repl 2"),
        (vec!["volume", "create", "x", "--size", "1M", "--label", "novalue"], "key=value"),
        (vec!["volume", "inspect", "ghost"], "not found"),
        (vec!["volume", "update", "ghost", "--size", "1G"], "not found"),
        (vec!["volume", "update", "ghost"], "nothing to update"),
        (vec!["volume", "create", "x", "--size", "1M", "--repl", "0"], "1..=3"),
        (vec!["volume", "create", "x", "--size", "1M", "--repl", "4"], "1..=3"),
        (vec!["volume", "delete", "ghost"], "not found"),
    ] {
        let (good, _, err) = ctl(&e, &args);
        assert!(!good, "{args:?} should fail");
        assert!(err.to_lowercase().contains(expect), "{args:?}: expected {expect:?} in: {err}");
    }
    ok(&e, &["volume", "create", "dup", "--size", "1M"]);
    let (good, _, err) = ctl(&e, &["volume", "create", "dup", "--size", "1M"]);
    assert!(!good && err.contains("already exists"), "{err}");
    let out = Command::new(CTL).args(["--endpoint", "127.0.0.1:1", "status"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is strata-engine running"));
    // The message names what changed, and only that.
    let said = ok(&e, &["volume", "update", "dup", "--label", "tier=gold"]);
    assert!(said.contains("updated: labels tier=gold") && !said.contains("size"), "{said}");
    // Output into a pipe closed early (`| head -0`) ends stratactl without a panic.
    let mut child = Command::new(CTL)
        .env("STRATA_ENDPOINT", &e.sdk)
        .env("STRATA_CONFIG_DIR", e._dir.path())
        .args(["volume", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn host_attach_detach_and_encrypted_volumes() {
    let e = engine();
    let key = e._dir.path().join("db.key");
    std::fs::write(&key, b"a passphrase of some length").unwrap();
    let v = json(&e, &["volume", "create", "enc", "--size", "8MiB", "--secure", "--passphrase-file", key.to_str().unwrap()]);
    assert_eq!(v["secure"], true);
    assert!(ok(&e, &["volume", "inspect", "enc"]).contains("yes (AES-256-XTS)"));
    let (good, _, err) = ctl(&e, &["volume", "create", "nokey", "--size", "8MiB", "--secure"]);
    assert!(!good && err.contains("--passphrase-file"), "{err}");
    // Detach, then attach again (with the passphrase the key is loaded again).
    let d = json(&e, &["host", "detach", "enc"]);
    assert_eq!(d["attached_node"], "");
    assert!(ok(&e, &["volume", "inspect", "enc"]).contains("(detached)"));
    let a = json(&e, &["host", "attach", "enc", "--passphrase-file", key.to_str().unwrap()]);
    let me = json(&e, &["cluster", "list"])[0]["id"].clone();
    assert_eq!(a["attached_node"], me);
    assert!(ok(&e, &["host", "detach", "enc"]).contains("detached"));
    let (good, _, err) = ctl(&e, &["host", "attach", "enc", "--node", "elsewhere"]);
    assert!(!good && err.contains("not in the cluster"), "{err}");
    // ha-update on one node: a second replica cannot be placed, and says why.
    ok(&e, &["volume", "create", "plain", "--size", "8MiB"]);
    let (good, _, err) = ctl(&e, &["volume", "ha-update", "plain", "--repl", "2"]);
    assert!(!good && err.contains("to repl 2") && err.contains("already holds a replica"), "{err}");
}

#[test]
fn tokens_contexts_owners_and_collaborators() {
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("system.key");
    std::fs::write(&key, b"a cluster system key of 32+ bytes, for tests\n").unwrap();
    let key = key.to_str().unwrap();
    let e = engine_with(&["--auth-system-key-file", key]);
    let mint = |args: &[&str]| {
        let mut a = vec!["auth", "token", "--key-file", key];
        a.extend_from_slice(args);
        ok(&e, &a).trim().to_string()
    };
    let admin = mint(&["--subject", "ops", "--role", "admin"]);
    let alice = mint(&["--subject", "alice"]);
    let bob = mint(&["--subject", "bob", "--ttl", "10m"]);
    let (good, _, err) = ctl(&e, &["auth", "token", "--key-file", key, "--subject", "x", "--role", "root"]);
    assert!(!good && err.contains("admin, user or view"), "{err}");

    // No token: refused, saying how to pass one.
    let (good, _, err) = ctl(&e, &["status"]);
    assert!(!good && err.contains("not authenticated") && err.contains("--token"), "{err}");
    assert!(ok(&e, &["--token", &admin, "status"]).contains("Cluster ID"));

    // Contexts: saved with the token (never printed), used by default once current.
    assert!(ok(&e, &["context", "create", "alice", "--endpoint", &e.sdk, "--token", &alice]).contains("(current)"));
    ok(&e, &["context", "create", "admin", "--endpoint", &e.sdk, "--token", &admin]);
    let list = ok(&e, &["context", "list"]);
    assert!(list.contains("alice") && list.contains("admin") && !list.contains(&alice), "{list}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(e._dir.path().join("contexts.json")).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the context file holds tokens: owner-only");
    assert!(ok(&e, &["volume", "create", "a1", "--size", "1M", "--collaborator", "bob=read"]).contains("successfully created"));
    let v = json(&e, &["volume", "inspect", "a1"]);
    assert_eq!(v["ownership"]["owner"], "alice");
    assert_eq!(v["ownership"]["users"]["bob"], "read");

    // Bob reads but may not delete; the admin context may.
    let as_bob = [("STRATA_TOKEN", bob.as_str())];
    let (good, out, err) = ctl_env(&e, &as_bob, &["volume", "inspect", "a1"]);
    assert!(good && out.contains("bob=read"), "{err}");
    let (good, _, err) = ctl_env(&e, &as_bob, &["volume", "delete", "a1"]);
    assert!(!good && err.contains("permission denied"), "{err}");
    let (good, _, err) = ctl_env(&e, &as_bob, &["volume", "update", "a1", "--collaborator", "bob=write"]);
    assert!(!good && err.contains("permission denied"), "{err}");
    ok(&e, &["volume", "update", "a1", "--collaborator", "bob=none", "--group", "dba=write"]);
    let v = json(&e, &["volume", "inspect", "a1"]);
    assert!(v["ownership"]["users"].get("bob").is_none() && v["ownership"]["groups"]["dba"] == "write", "{v}");
    let (good, _, err) = ctl_env(&e, &as_bob, &["volume", "inspect", "a1"]);
    assert!(!good && err.contains("permission denied"), "{err}");
    ok(&e, &["context", "use", "admin"]);
    ok(&e, &["volume", "delete", "a1"]);
    let (good, _, err) = ctl(&e, &["--context", "nope", "status"]);
    assert!(!good && err.contains("no context named"), "{err}");
}

#[test]
fn an_engine_with_a_certificate_is_reached_over_tls_with_the_ca() {
    let ca = tempfile::tempdir().unwrap();
    let p = |s: &str| ca.path().join(s).to_str().unwrap().to_string();
    certs(&["init", "--dir", &p("ca")]);
    certs(&["issue", "--ca-dir", &p("ca"), "--node-id", "n1", "--out", &p("n1")]);
    let e = engine_with(&["--node-id", "n1", "--tls-dir", &p("n1")]);
    let (good, _, err) = ctl(&e, &["status"]);
    assert!(!good && err.contains("--ca-file"), "a plaintext call says to pass the CA: {err}");
    assert!(ok(&e, &["--ca-file", &p("ca/ca.crt"), "status"]).contains("Cluster ID"));
    let (good, _, err) = ctl_env(&e, &[("STRATA_CA_FILE", &p("n1/node.crt"))], &["status"]);
    assert!(!good, "a certificate that is not the CA's is no trust anchor: {err}");
    ok(&e, &["context", "create", "tls", "--endpoint", &e.sdk, "--ca-file", &p("ca/ca.crt")]);
    assert!(ok(&e, &["volume", "list"]).contains("NAME"), "the context's CA is used");
}

#[test]
fn an_engine_that_requires_client_certificates_takes_only_the_clusters() {
    let ca = tempfile::tempdir().unwrap();
    let p = |s: &str| ca.path().join(s).to_str().unwrap().to_string();
    certs(&["init", "--dir", &p("ca")]);
    certs(&["init", "--dir", &p("other")]);
    certs(&["issue", "--ca-dir", &p("ca"), "--node-id", "n1", "--out", &p("n1")]);
    certs(&["issue", "--ca-dir", &p("ca"), "--node-id", "ops", "--out", &p("ops")]);
    certs(&["issue", "--ca-dir", &p("other"), "--node-id", "ops", "--out", &p("stranger")]);
    let e = engine_with(&["--node-id", "n1", "--tls-dir", &p("n1"), "--sdk-require-client-cert"]);
    let ca_file = p("ca/ca.crt");
    let (good, _, err) = ctl(&e, &["--ca-file", &ca_file, "status"]);
    assert!(!good, "a client without a certificate was answered: {err}");
    let (good, _, err) = ctl(&e, &["--ca-file", &ca_file, "--cert-file", &p("stranger/node.crt"), "--key-file", &p("stranger/node.key"), "status"]);
    assert!(!good, "a client certificate of another CA was accepted: {err}");
    assert!(ok(&e, &["--ca-file", &ca_file, "--cert-file", &p("ops/node.crt"), "--key-file", &p("ops/node.key"), "status"]).contains("Cluster ID"));
    let (good, _, err) = ctl(&e, &["--cert-file", &p("ops/node.crt"), "--key-file", &p("ops/node.key"), "status"]);
    assert!(!good && err.contains("needs --ca-file"), "{err}");
}

#[test]
fn status_shows_the_whole_clusters_capacity_and_counts_snapshots_apart() {
    let c = strata_e2e::cluster::Cluster::start(3, "256MiB");
    c.sdk(0).create_full("a", 8 << 20, 3, &[]).unwrap();
    c.sdk(0).snapshot("a", "a-snap").unwrap();
    let (ok, out, err) = ctl_cluster(&c, 0, &["status", "--json"]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    let one = c.sdk(0).pool().total_bytes;
    assert_eq!(s["total_bytes"], 3 * one, "three pools: {s}");
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3);
    assert_eq!((s["volume_count"].as_u64(), s["snapshot_count"].as_u64()), (Some(1), Some(1)), "{s}");
}

#[test]
fn errors_under_json_are_a_json_document_with_a_stable_code_and_exit_1() {
    let e = engine_with(&[]);
    let (good, out, err) = ctl(&e, &["volume", "inspect", "nope", "--json"]);
    assert!(!good && err.is_empty(), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|x| panic!("not JSON ({x}): {out}"));
    assert_eq!(doc["error"]["code"], "not_found", "{doc}");
    assert!(doc["error"]["message"].as_str().unwrap().contains("nope"), "{doc}");
    ok(&e, &["volume", "create", "dup", "--size", "1MiB"]);
    let (good, out, _) = ctl(&e, &["volume", "create", "dup", "--size", "1MiB", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!good);
    assert_eq!(doc["error"]["code"], "already_exists", "{doc}");
    // An engine that is not there.
    let out = Command::new(CTL).env("STRATA_CONFIG_DIR", e._dir.path()).args(["--endpoint", "127.0.0.1:1", "status", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["code"], "unavailable", "{doc}");
    // Without --json: a line on stderr, nothing on stdout.
    let (good, out, err) = ctl(&e, &["volume", "inspect", "nope"]);
    assert!(!good && out.is_empty() && err.starts_with("error: not found: "), "{out} / {err}");
}

#[test]
fn volume_and_snapshot_commands_keep_to_their_kind_and_snapshots_outlive_their_volume() {
    let e = engine_with(&[]);
    ok(&e, &["volume", "create", "db", "--size", "4MiB"]);
    ok(&e, &["volume", "snapshot", "create", "db", "--name", "db-s1"]);
    let (good, _, err) = ctl(&e, &["volume", "delete", "db-s1"]);
    assert!(!good && err.contains("db-s1 is a snapshot of db") && err.contains("stratactl snapshot delete db-s1"), "{err}");
    let (good, _, err) = ctl(&e, &["volume", "snapshot", "delete", "db"]);
    assert!(!good && err.contains("db is a volume"), "{err}");
    assert_eq!(json(&e, &["volume", "snapshot", "list", "db"]).as_array().unwrap().len(), 1, "both are still there");
    ok(&e, &["volume", "delete", "db"]);
    let snaps = json(&e, &["volume", "snapshot", "list", "db"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1, "the deleted volume's snapshot is listed: {snaps}");
    let (good, _, err) = ctl(&e, &["volume", "snapshot", "list", "never-was"]);
    assert!(!good && err.contains("not found"), "{err}");
    ok(&e, &["volume", "snapshot", "delete", "db-s1"]);
}

#[test]
fn volume_locate_and_cluster_inspect() {
    let c = strata_e2e::cluster::Cluster::start(2, "256MiB");
    c.sdk(0).create_full("r2", 8 << 20, 2, &[]).unwrap();
    let run = |args: &[&str]| ctl_cluster(&c, 1, args);
    let (ok, out, err) = run(&["volume", "locate", "r2"]);
    assert!(ok && out.contains("detached: no node serves it") && out.contains("node-1") && out.contains("node-2"), "{out}{err}");
    c.sdk(0).attach("r2", false).unwrap();
    let (_, out, _) = run(&["volume", "locate", "r2", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["target"], "node-1");
    assert_eq!(doc["nbd_uri"], format!("nbd://{}/r2", c.engines[0].nbd), "{doc}");
    assert_eq!(doc["replicas"].as_array().unwrap().len(), 2);
    assert!(doc["replicas"].as_array().unwrap().iter().all(|r| r["in_sync"] == true && r["node_status"] == "online"), "{doc}");
    let (ok, out, _) = run(&["volume", "locate", "r2"]);
    assert!(ok && out.contains("target") && out.contains(&format!("nbd://{}/r2", c.engines[0].nbd)), "{out}");

    let (ok, out, _) = run(&["cluster", "inspect", "node-2", "--json"]);
    let n: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && n["id"] == "node-2" && n["status"] == "online" && n["sdk_address"] == c.engines[1].sdk.as_str(), "{n}");
    let (ok, _, err) = run(&["cluster", "inspect", "node-9"]);
    assert!(!ok && err.contains("no node \"node-9\"") && err.contains("node-1, node-2"), "{err}");
}

#[test]
fn alerts_show_filters_by_kind_and_age_and_purge_empties_every_node() {
    let mut c = strata_e2e::cluster::Cluster::start(3, "256MiB");
    c.kill9(2);
    let t0 = std::time::Instant::now();
    while !c.sdk(0).alerts().iter().any(|a| a.kind == "NodeOffline") {
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "no NodeOffline alert: {:?}", c.sdk(0).alerts());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let run = |args: &[&str]| {
        let (ok, out, err) = ctl_cluster(&c, 1, args);
        assert!(ok, "stratactl {args:?}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let count = |v: &serde_json::Value| v["alerts"].as_array().unwrap().len();
    assert!(count(&run(&["alerts", "show", "--type", "nodeoffline", "--json"])) >= 1);
    assert_eq!(count(&run(&["alerts", "show", "--type", "PoolFull", "--json"])), 0);
    assert!(count(&run(&["alerts", "show", "--since", "10m", "--json"])) >= 1);
    let purged = run(&["alerts", "purge", "--json"]);
    assert!(purged["purged"].as_u64().unwrap() >= 1, "{purged}");
    assert_eq!(purged["unreachable"].as_array().unwrap().len(), 0, "the dead node is not asked: {purged}");
    assert_eq!(count(&run(&["alerts", "show", "--json"])), 0, "nothing left on either live node");
    let file = std::fs::read_to_string(c.engines[0].dir.join("data/alerts.jsonl")).expect("node-1 keeps its alerts in a file");
    assert!(file.trim().is_empty(), "node-1's alert file still holds: {file}");
}

#[test]
fn inspect_watch_follows_a_resync_until_every_replica_is_in_sync() {
    let mut c = strata_e2e::cluster::Cluster::start(2, "256MiB");
    c.sdk(0).create_full("w", 32 << 20, 2, &[]).unwrap();
    let mut nbd = strata_e2e::nbd::Client::connect(&c.engines[0].nbd, "w").unwrap();
    c.kill9(1);
    // The first write waits out the replica timeout; then node-2 is out of sync and misses these.
    for i in 0..64u64 {
        assert_eq!(nbd.write(i * (256 << 10), &[i as u8; 64 << 10], 0), 0);
    }
    let ca = c.ca.path().join("ca.crt");
    let watch = std::process::Command::new(CTL)
        .env("STRATA_ENDPOINT", &c.engines[0].sdk)
        .env("STRATA_CONFIG_DIR", c.ca.path())
        .env_remove("STRATA_TOKEN")
        .env_remove("STRATA_CONTEXT")
        .args(["--ca-file", ca.to_str().unwrap(), "volume", "inspect", "w", "--watch", "--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    c.restart(1);
    let out = watch.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("replica node-2: out_of_sync") && stdout.contains("of 4 MiB copied"), "a line per look while node-2 is behind: {stdout}");
    let last = stdout.lines().rfind(|l| l.starts_with("In sync")).unwrap_or_default();
    assert!(last.contains("node-1") && last.contains("node-2"), "ends with the volume in sync: {stdout}");

    // With --json: an object per look, then the volume; a timeout that passes is an error.
    let (ok, out, _) = ctl_cluster(&c, 0, &["volume", "inspect", "w", "--watch", "--json"]);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(ok && first["in_sync"] == true, "{out}");
    c.kill9(1);
    assert_eq!(nbd.write(0, &[9u8; 4096], 0), 0);
    let (ok, _, err) = ctl_cluster(&c, 0, &["volume", "inspect", "w", "--watch", "--timeout", "2"]);
    assert!(!ok && err.contains("still has replicas out of sync after 2s"), "{err}");
}

#[test]
fn ha_update_wait_returns_once_the_new_replica_is_rebuilt() {
    let c = strata_e2e::cluster::Cluster::start(2, "256MiB");
    let (ok, _, err) = ctl_cluster(&c, 0, &["volume", "create", "grow", "--size", "64MiB", "--repl", "1", "--nodes", "node-1"]);
    assert!(ok, "{err}");
    let mut nbd = strata_e2e::nbd::Client::connect(&c.engines[0].nbd, "grow").unwrap();
    for i in 0..32u64 {
        assert_eq!(nbd.write(i * (1 << 20), &[i as u8 + 1; 1 << 20], 0), 0);
    }
    let (ok, _, err) = ctl_cluster(&c, 0, &["volume", "ha-update", "grow", "--repl", "2", "--timeout", "5"]);
    assert!(!ok && err.contains("--wait"), "--timeout only with --wait: {err}");
    let (ok, out, err) =
        ctl_cluster(&c, 1, &["volume", "ha-update", "grow", "--repl", "2", "--node", "node-2", "--wait", "--timeout", "120", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let in_sync: Vec<&str> = v["in_sync_nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert_eq!(in_sync.len(), 2, "the answer comes once node-2 is rebuilt: {v}");
    assert!(in_sync.contains(&"node-2"), "{v}");
}

#[test]
fn volume_stats_shows_the_io_rates_of_each_interval() {
    let c = strata_e2e::cluster::Cluster::start(1, "256MiB");
    c.sdk(0).create_full("io", 32 << 20, 1, &[]).unwrap();
    let (ok, _, err) = ctl_cluster(&c, 0, &["volume", "stats", "io", "--count", "1"]);
    assert!(!ok && err.contains("is not attached"), "{err}");
    let mut nbd = strata_e2e::nbd::Client::connect(&c.engines[0].nbd, "io").unwrap();
    // A bounded writer while the stats are read: 4 KiB writes for at most 4 seconds.
    let writer = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < std::time::Duration::from_secs(4) && n < 200_000 {
            assert_eq!(nbd.write((n % 8192) * 4096, &[7u8; 4096], 0), 0);
            n += 1;
        }
        n
    });
    let (ok, out, err) = ctl_cluster(&c, 0, &["volume", "stats", "io", "--count", "2", "--interval", "1", "--json"]);
    let written = writer.join().unwrap();
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    for r in &rows {
        let w = r["write_iops"].as_f64().unwrap();
        assert!(w > 10.0 && w <= written as f64, "write rate {w} with {written} writes in all: {r}");
        assert!(r["write_latency_ms"].as_f64().unwrap() > 0.0 && r["read_iops"] == 0.0 && r["errors"] == 0, "{r}");
    }
    let (ok, out, _) = ctl_cluster(&c, 0, &["volume", "stats", "io", "--count", "1"]);
    assert!(ok && out.lines().next().unwrap().contains("w/s") && out.lines().count() == 2, "a header and a row: {out}");
}

fn node_status(c: &strata_e2e::cluster::Cluster, via: usize, node: &str) -> String {
    let nodes = json_cluster(c, via, &["cluster", "list"]);
    nodes.as_array().unwrap().iter().find(|n| n["id"] == node).map_or("absent".into(), |n| n["status"].as_str().unwrap().to_string())
}

#[test]
fn maintenance_moves_served_volumes_away_refuses_new_ones_and_keeps_replicas_through_a_restart() {
    use strata_api::v1 as pb;
    use strata_e2e::checker::{verify, History, Writer};
    use strata_e2e::nbd::Client;
    const MIB: u64 = 1 << 20;
    let t = std::time::Duration::from_secs(30);
    // A short replica timeout: a node in maintenance must keep its replicas past it.
    let mut c = strata_e2e::cluster::Cluster::start_with(3, "256MiB", &["--replica-timeout", "2"]);
    let on = |nodes: &[&str]| nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let spec = |nodes: &[&str]| pb::VolumeSpec { size_bytes: 16 * MIB, repl: 2, nodes: on(nodes), ..Default::default() };
    c.sdk(0).create_spec("busy", spec(&["node-1", "node-3"])).unwrap();
    c.sdk(0).create_spec("idle", spec(&["node-3", "node-2"])).unwrap();
    let mut h = History::default();
    let mut w = Writer::new(Client::connect(&c.engines[0].nbd, "busy").unwrap(), 16 * MIB, 64 * 1024, 21);
    w.run(&mut h, 50, t).unwrap();
    // node-3 serves "idle" to a client: entering is refused, and nothing changes.
    let mut idle = Client::connect(&c.engines[2].nbd, "idle").unwrap();
    assert_eq!(idle.write(0, &[5u8; 65536], 0), 0);
    let (good, _, err) = ctl_cluster(&c, 0, &["service", "maintenance", "--enter", "--node", "node-3"]);
    assert!(!good && err.contains("idle (1 client(s))") && err.contains("kubectl drain"), "{err}");
    assert_eq!(node_status(&c, 0, "node-3"), "online");
    idle.disconnect();
    // Entering (sent to node-1, forwarded to node-3) moves "idle" to its other in-sync replica.
    let r = json_cluster(&c, 0, &["service", "maintenance", "--enter", "--node", "node-3"]);
    assert_eq!(r["node"]["status"], "maintenance", "{r}");
    assert_eq!(r["node"]["maintenance_reason"], "admin", "{r}");
    assert_eq!(r["moved"][0]["volume"], "idle", "{r}");
    assert_eq!(r["moved"][0]["node"], "node-2", "{r}");
    assert_eq!(c.sdk(0).inspect("idle").unwrap().attached_node, "node-2");
    assert_eq!(node_status(&c, 0, "node-3"), "maintenance");
    // It serves nothing new and takes no new replica.
    let e = c.sdk(2).attach("busy", false).unwrap_err();
    assert!(e.message().contains("node-3 is in maintenance"), "{e:?}");
    let e = c.sdk(0).create_spec("three", pb::VolumeSpec { size_bytes: MIB, repl: 3, ..Default::default() }).unwrap_err();
    assert!(e.message().contains("node-3 in maintenance"), "{e:?}");
    // The upgrade: its engine stops while writes go on; its replica is not replaced, however long.
    w.run(&mut h, 50, t).unwrap();
    c.kill9(2);
    w.run(&mut h, 100, t).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(7));
    w.run(&mut h, 50, t).unwrap();
    let v = c.sdk(0).inspect("busy").unwrap();
    assert_eq!(v.replica_nodes, on(&["node-1", "node-3"]), "the replica stays on the node in maintenance: {v:?}");
    assert_eq!(v.in_sync_nodes, on(&["node-1"]));
    c.engines[2].spawn().unwrap();
    assert_eq!(node_status(&c, 0, "node-3"), "maintenance", "maintenance outlives the restart");
    let r = json_cluster(&c, 2, &["service", "maintenance", "--exit"]);
    assert_eq!(r["node"]["status"], "online", "{r}");
    w.run(&mut h, 50, t).unwrap();
    c.wait_in_sync(0, "busy", std::time::Duration::from_secs(60));
    assert_eq!(verify(&mut w.client, &h, 16 * MIB), Vec::<String>::new(), "no acknowledged write lost");
    assert_eq!(c.replica_differences(0, "busy"), Vec::<String>::new());
    assert_eq!(c.replica_differences(0, "idle"), Vec::<String>::new());
    c.sdk(2).attach("idle", false).expect("out of maintenance, node-3 serves volumes again");
}

#[test]
fn cluster_delete_moves_every_replica_off_a_node_under_writes_then_removes_it() {
    use strata_api::v1 as pb;
    use strata_e2e::checker::{verify, History, Writer};
    use strata_e2e::nbd::Client;
    const MIB: u64 = 1 << 20;
    let t = std::time::Duration::from_secs(30);
    let mut c = strata_e2e::cluster::Cluster::start(3, "256MiB");
    let on = |nodes: &[&str]| nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let spec = |repl: u32, nodes: &[&str]| pb::VolumeSpec { size_bytes: 16 * MIB, repl, nodes: on(nodes), ..Default::default() };
    c.sdk(0).create_spec("a", spec(2, &["node-1", "node-2"])).unwrap();
    c.sdk(0).create_spec("b", spec(3, &[])).unwrap();
    c.sdk(1).create_spec("solo", spec(1, &["node-2"])).unwrap();
    // "solo" (one replica, on node-2) holds data, written through node-1, then detached.
    let mut s = Client::connect(&c.engines[0].nbd, "solo").unwrap();
    let data = strata_e2e::pseudo_random(77, 4 * MIB as usize);
    assert_eq!(s.write(MIB, &data, 0), 0);
    s.disconnect();
    c.sdk(0).detach("solo", false).unwrap();
    let mut h = History::default();
    let mut w = Writer::new(Client::connect(&c.engines[0].nbd, "a").unwrap(), 16 * MIB, 64 * 1024, 5);
    w.run(&mut h, 100, t).unwrap();
    c.sdk(0).snapshot("a", "a-snap").unwrap();

    // Refused while node-2 is up and not in maintenance, and while "b" (repl 3 on 3 nodes)
    // has nowhere to go: nothing changes.
    let (good, _, err) = ctl_cluster(&c, 0, &["cluster", "delete", "node-2"]);
    assert!(!good && err.contains("not in maintenance") && err.contains("nothing was changed"), "{err}");
    ctl_cluster(&c, 0, &["service", "maintenance", "--enter", "--node", "node-2"]);
    let (good, _, err) = ctl_cluster(&c, 0, &["cluster", "delete", "node-2"]);
    assert!(!good && err.contains("volume b (repl 3)") && !err.contains("volume a "), "{err}");
    assert_eq!(c.sdk(0).inspect("a").unwrap().replica_nodes, on(&["node-1", "node-2"]));
    let (good, _, err) = ctl_cluster(&c, 1, &["cluster", "delete", "node-2"]);
    assert!(!good && err.contains("send it to another node"), "{err}");
    c.sdk(0).ha_update("b", 2, Some("node-2")).unwrap();

    // Writes go on while the replicas move.
    let writer = std::thread::spawn(move || {
        w.run(&mut h, 400, std::time::Duration::from_secs(20)).unwrap();
        (w, h)
    });
    let r = json_cluster(&c, 0, &["cluster", "delete", "node-2"]);
    let (mut w, mut h) = writer.join().unwrap();
    assert_eq!(r["removed"], "node-2", "{r}");
    assert_eq!(r["moved"].as_array().unwrap().len(), 2, "a and solo: {r}");
    let status = c.engines[1].wait_exit(std::time::Duration::from_secs(15)).expect("the removed node's engine stops");
    assert!(!status.success() && c.engines[1].log().contains("removed from the cluster"), "{}", c.engines[1].log());
    assert_eq!(node_status(&c, 0, "node-2"), "absent");
    assert_eq!(c.sdk(0).nodes().len(), 2);

    let a = c.wait_in_sync(0, "a", std::time::Duration::from_secs(60));
    assert_eq!(a.replica_nodes, on(&["node-1", "node-3"]));
    w.run(&mut h, 50, t).unwrap();
    assert_eq!(verify(&mut w.client, &h, 16 * MIB), Vec::<String>::new(), "no acknowledged write lost");
    assert_eq!(c.replica_differences(0, "a"), Vec::<String>::new());
    let snap = c.sdk(0).inspect("a-snap").unwrap();
    assert_eq!(snap.replica_nodes, on(&["node-1"]), "the snapshot keeps its copy on node-1");
    let solo = c.sdk(0).inspect("solo").unwrap();
    assert_eq!(solo.replica_nodes.len(), 1);
    assert!(!solo.replica_nodes.contains(&"node-2".to_string()) && solo.attached_node.is_empty(), "{solo:?}");
    let mut s = Client::connect(&c.engines[0].nbd, "solo").unwrap();
    let back = s.read(MIB, 4 * MIB as u32).unwrap();
    assert!(back == data, "solo's data came along (read back {} zero bytes of {})", back.iter().filter(|b| **b == 0).count(), back.len());
}

/// fio over the engine's NBD socket: random 64 KiB writes with crc32c verify (or, with
/// `verify_only`, the verify of what an identical earlier run wrote). Its JSON job.
fn fio_verify(e: &Engine, vol: &str, size: &str, verify_only: bool) -> serde_json::Value {
    let uri = format!("--uri={}", e._proc.unix_uri(vol));
    let size = format!("--size={size}");
    let mut args = vec!["--name=drives", "--ioengine=nbd", &uri, "--rw=randwrite", "--bs=64k", &size, "--iodepth=8"];
    args.extend(["--rate=48m", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output-format=json"]);
    if verify_only {
        args.push("--verify_only=1");
    }
    let out = Command::new("fio").current_dir(e._dir.path()).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fio: {text}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(v["jobs"][0]["error"], 0, "{text}");
    v["jobs"][0].clone()
}

#[test]
fn drive_add_and_pool_expand_grow_a_running_pool_under_fio_verify() {
    let mut e = engine();
    ok(&e, &["volume", "create", "v", "--size", "192MiB"]);
    let extra = e._dir.path().join("extra.img");
    let (good, _, err) = ctl(&e, &["service", "drive", "add", extra.to_str().unwrap()]);
    assert!(!good && err.contains("does not exist: give --size"), "{err}");
    // fio writes (rate-limited, about 3 s) while the drive joins the pool.
    let adder = {
        let (sdk, dir, path) = (e.sdk.clone(), e._dir.path().to_path_buf(), extra.to_str().unwrap().to_string());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(800));
            Command::new(CTL)
                .env("STRATA_ENDPOINT", sdk)
                .env("STRATA_CONFIG_DIR", dir)
                .args(["service", "drive", "add", &path, "--size", "128MiB"])
                .output()
                .unwrap()
        })
    };
    let job = fio_verify(&e, "v", "144M", false);
    assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 144 << 20, "every block verified");
    let added = adder.join().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    assert!(String::from_utf8_lossy(&added.stdout).contains("added"), "{}", String::from_utf8_lossy(&added.stdout));
    let pools = json(&e, &["service", "drive", "show"]);
    let devices = pools[0]["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 2, "{pools}");
    let new = &devices[1];
    assert_eq!(new["path"], extra.to_str().unwrap());
    assert!(new["free_extents"].as_u64() < new["total_extents"].as_u64(), "new extents went onto the added drive: {new}");
    assert_eq!(new["failed"], false);
    // The same drive again is refused; pool expand adds a file beside the pool's files.
    let (good, _, err) = ctl(&e, &["service", "drive", "add", extra.to_str().unwrap()]);
    assert!(!good && err.contains("already in this pool"), "{err}");
    let total = pools[0]["total_bytes"].as_u64().unwrap();
    let grown = json(&e, &["service", "pool", "expand", "--size", "64MiB"]);
    assert_eq!(grown[0]["devices"].as_array().unwrap().len(), 3, "{grown}");
    assert!(grown[0]["total_bytes"].as_u64().unwrap() > total);
    assert!(grown[0]["devices"][2]["path"].as_str().unwrap().ends_with("strata-drive-2.img"), "{grown}");
    // After a restart the engine opens the added drives from the pool's record; the data verifies.
    e._proc.restart();
    e.sdk = e._proc.sdk.clone();
    assert_eq!(json(&e, &["service", "pool", "show"])[0]["devices"].as_array().unwrap().len(), 3);
    let job = fio_verify(&e, "v", "144M", true);
    assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 144 << 20, "every block verified after the restart");
}

#[test]
fn volume_usage_shows_allocated_space_snapshots_and_totals() {
    let e = engine();
    ok(&e, &["volume", "create", "u", "--size", "64MiB"]);
    ok(&e, &["volume", "create", "empty", "--size", "16MiB"]);
    let mut nbd = strata_e2e::nbd::Client::connect(&e._proc.nbd, "u").unwrap();
    assert_eq!(nbd.write(8 << 20, &vec![3u8; 4 << 20], 0), 0);
    ok(&e, &["volume", "snapshot", "create", "u", "--name", "u-snap"]);
    let all = json(&e, &["volume", "usage"]);
    let u = all["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "u").unwrap().clone();
    assert_eq!((u["size_bytes"].as_u64(), u["used_bytes"].as_u64(), u["snapshots"].as_u64()), (Some(64 << 20), Some(4 << 20), Some(1)), "{all}");
    assert_eq!(all["volumes"].as_array().unwrap().len(), 2, "snapshots are not volumes: {all}");
    assert_eq!(all["total_size_bytes"], 80 << 20);
    let table = ok(&e, &["volume", "usage"]);
    assert!(table.contains("TOTAL") && table.contains("6.2%"), "{table}");
    let one = ok(&e, &["volume", "usage", "u"]);
    assert!(one.contains("4 MiB") && !one.contains("empty") && !one.contains("TOTAL"), "{one}");
    let (good, _, err) = ctl(&e, &["volume", "usage", "nope"]);
    assert!(!good && err.contains("no volume \"nope\""), "{err}");
}

#[test]
fn a_volume_list_larger_than_grpcs_default_4_mib_is_received_whole() {
    let e = engine();
    let sdk = strata_e2e::sdk::Sdk::new(&e.sdk);
    // 80 volumes of 60 labels of 1,000 characters: about 4.8 MB in one answer (as about 16,000
    // plain volumes would be).
    let value = "x".repeat(1000);
    let keys: Vec<String> = (0..60).map(|i| format!("k{i}")).collect();
    let labels: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), value.as_str())).collect();
    for i in 0..80 {
        sdk.create_full(&format!("big-{i:02}"), 1 << 20, 1, &labels).unwrap();
    }
    let list = json(&e, &["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 80);
    assert!(list.to_string().len() > 4 << 20, "the answer passed 4 MiB");
}
