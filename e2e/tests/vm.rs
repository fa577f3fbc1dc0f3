//! The kernel tier: each scenario in `e2e/vm/scenarios/` runs inside a qemu guest booted on
//! Debian's 6.12 kernel (nbd.ko, ublk_drv.ko; `e2e/vm/build.sh` fetches and caches it), with the
//! host's root read-only over 9p so the guest runs this build's binaries. Emulated (TCG): these
//! prove behaviour against a real kernel, never speed. Each scenario prints PASS as its last step.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

fn scenario(name: &str) {
    let bin = strata_e2e::engine_bin().parent().expect("the target directory").to_path_buf();
    for b in ["strata-engine", "strata-csi", "stratactl", "strata-csc"] {
        assert!(bin.join(b).exists(), "{} is missing: cargo build --workspace", bin.join(b).display());
    }
    let job = tempfile::tempdir().unwrap();
    let scenarios = repo().join("e2e/vm/scenarios");
    std::fs::write(
        job.path().join("run.sh"),
        format!("BIN={}\n. {}/common.sh\n. {}/{name}.sh\n", bin.display(), scenarios.display(), scenarios.display()),
    )
    .unwrap();
    let out = Command::new(repo().join("e2e/vm/run.sh")).arg(job.path()).arg("300").output().expect("e2e/vm/run.sh runs");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scenario {name} failed in the guest ({})", out.status);
    assert_eq!(text.lines().last(), Some("PASS"), "scenario {name} did not finish");
}

#[test]
fn kernel_nbd_lifecycle() {
    scenario("kernel-nbd-lifecycle");
}

#[test]
fn kernel_nbd_survives_an_engine_restart() {
    scenario("kernel-nbd-engine-restart");
}

#[test]
fn kernel_nbd_devices_are_adopted_by_a_restarted_node_plugin() {
    scenario("kernel-nbd-plugin-restart");
}

#[test]
fn ublk_lifecycle() {
    scenario("ublk-lifecycle");
}

#[test]
fn ublk_devices_survive_engine_helper_and_plugin_restarts() {
    scenario("ublk-recovery");
}

#[test]
fn a_ublk_device_keeps_going_while_its_target_moves_to_another_engine_and_back() {
    scenario("ublk-takeover");
}
