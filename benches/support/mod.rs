//! What the benchmarks that drive the built binary against `kmsflow sandbox serve` share:
//! the sandbox in another process, its request log, and a command's wall time and peak
//! memory.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `kmsflow sandbox serve` with `dir/world.json` and `faults`: the child, the environment a
/// client needs, and the base URL.
pub fn serve(dir: &Path, faults: &str) -> (Child, HashMap<String, String>, String) {
    std::fs::write(dir.join("faults.yaml"), faults).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .args(["sandbox", "serve", "--world"])
        .arg(dir.join("world.json"))
        .arg("--faults")
        .arg(dir.join("faults.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base_url = lines.next().unwrap().unwrap();
    let env = lines
        .take(6)
        .map(|l| {
            let l = l.unwrap();
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    (child, env, base_url)
}

/// Peak resident memory of a process, in MiB, from /proc (0 where there is none).
pub fn peak_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs `command` to its end with stdout captured: (wall time, peak MiB, stdout). Memory is
/// sampled beside the wait, so the wall time is the process's, not a multiple of the
/// sampling interval.
pub fn measured(mut command: Command) -> (Duration, f64, String) {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut text).unwrap();
        text
    });
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(peak_mib(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    child.wait().unwrap();
    let wall = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    (wall, peak, reader.join().unwrap())
}

/// The sandbox's log of Resource Manager requests (not the token endpoint's).
pub fn requests(base_url: &str) -> Vec<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(async {
            reqwest::get(format!("{base_url}/_sandbox/requests"))
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/subscriptions/"))
        })
        .cloned()
        .collect()
}

/// The sandbox's subscription.
pub const SUBSCRIPTION: &str = "00000000-0000-4000-8000-5a4db0c5ab0c";

/// A managed cluster `name` in `rg-fleet` on Kubernetes 1.33, with `security_profile`, as a
/// world file holds it.
pub fn fleet_cluster(name: &str, security_profile: Value) -> Value {
    serde_json::json!({
        "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-fleet/providers/Microsoft.ContainerService/managedClusters/{name}"),
        "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
        "eTag": "00000000-0000-4000-8000-0000000e7a90",
        "identity": {"type": "SystemAssigned", "principalId": "00000000-0000-4000-8000-00000000c1a5", "tenantId": "sandbox"},
        "properties": {"provisioningState": "Succeeded", "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0",
            "dnsPrefix": format!("{name}-dns"),
            "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
            "securityProfile": security_profile},
    })
}
