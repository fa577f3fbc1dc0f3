//! What the CLI's test files share: stratactl against an engine of a test cluster.
#![allow(dead_code)]

use std::process::Command;

pub const CTL: &str = env!("CARGO_BIN_EXE_stratactl");

/// stratactl against engine `i` of a test cluster (TLS under its CA, no token, contexts in the
/// CA's directory): (success, stdout, stderr).
pub fn ctl_cluster(c: &strata_e2e::cluster::Cluster, i: usize, args: &[&str]) -> (bool, String, String) {
    let ca = c.ca.path().join("ca.crt");
    let out = Command::new(CTL)
        .env("STRATA_ENDPOINT", &c.engines[i].sdk)
        .env("STRATA_CONFIG_DIR", c.ca.path())
        .env_remove("STRATA_TOKEN")
        .env_remove("STRATA_CONTEXT")
        .args(["--ca-file", ca.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `ctl_cluster` that must succeed, parsing its --json output.
pub fn json_cluster(c: &strata_e2e::cluster::Cluster, i: usize, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (good, out, err) = ctl_cluster(c, i, &a);
    assert!(good, "stratactl {args:?} failed: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stratactl {args:?} --json printed no JSON ({e}): {out}"))
}
