//! The bundled runbooks against a sandbox whose answers lie, through the binary: a gateway's
//! empty 200 or HTML 404 on the cluster's read never makes another team's cluster "absent"
//! (so it is neither written over nor deleted by `rollback --yes`), and a redirect sends
//! nothing anywhere else.

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::{Value, json};
use support::{Served, serve};

const SUBSCRIPTION: &str = "00000000-0000-4000-8000-5a4db0c5ab0c";

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A sandbox whose world holds another team's PMK cluster `aks-prod` in `rg-prod`, with
/// `faults`.
fn serve_with(dir: &Path, faults: &str) -> Served {
    let world = json!({
        "resource_groups": [{"name": "rg-prod", "location": "eastus"}],
        "features_registered": [{"namespace": "Microsoft.ContainerService", "feature": "KMSPMKPreview"}],
        "resources": [{
            "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-prod/providers/Microsoft.ContainerService/managedClusters/aks-prod"),
            "name": "aks-prod", "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "eTag": "etag-1",
            "identity": {"type": "SystemAssigned", "principalId": "11111111-1111-4111-8111-111111111111", "tenantId": "t"},
            "properties": {
                "provisioningState": "Succeeded", "resourceUID": "another-teams-cluster",
                "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0", "dnsPrefix": "aks-prod",
                "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
                "securityProfile": {"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}},
            },
        }],
    });
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    std::fs::write(dir.join("faults.yaml"), faults).unwrap();
    let world = dir.join("world.json").display().to_string();
    let faults = dir.join("faults.yaml").display().to_string();
    serve(&["--world", &world, "--faults", &faults])
}

fn cluster_writes(served: &Served) -> Vec<String> {
    served
        .requests_to("/managedClusters/")
        .into_iter()
        .filter(|r| !r.starts_with("GET "))
        .collect()
}

fn another_teams_cluster_is_there(served: &Served) -> bool {
    served.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["properties"]["resourceUID"] == "another-teams-cluster")
}

fn run_id_of(output: &Output) -> String {
    stderr(output)
        .lines()
        .find_map(|l| l.strip_prefix("kmsflow: starting run "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the first line names the run")
        .to_owned()
}

#[test]
fn a_lie_on_the_clusters_read_never_lets_pmk_new_cluster_or_its_rollback_touch_another_teams_cluster()
 {
    for answer in ["empty_200", "html_404"] {
        let dir = tempfile::tempdir().unwrap();
        let served = serve_with(
            dir.path(),
            &format!(
                "lies:\n  - {{ method: GET, path: \"*/managedClusters/aks-prod\", times: 1000, answer: {answer} }}\n"
            ),
        );
        let run = served
            .kmsflow(
                dir.path(),
                &[
                    "run",
                    "pmk-new-cluster",
                    "-p",
                    "resource_group=rg-prod",
                    "-p",
                    "cluster=aks-prod",
                ],
            )
            .output()
            .unwrap();
        let log = stderr(&run);
        assert_eq!(run.status.code(), Some(1), "{answer}: {log}");
        assert!(
            log.contains("proves nothing") && log.contains(&served.arm_endpoint),
            "{answer}: the error names who answered: {log}"
        );
        let run_id = run_id_of(&run);
        let rollback = served
            .kmsflow(dir.path(), &["rollback", &run_id])
            .output()
            .unwrap();
        assert!(rollback.status.success(), "{answer}: {}", stderr(&rollback));
        assert_eq!(cluster_writes(&served), Vec::<String>::new(), "{answer}");
        assert!(another_teams_cluster_is_there(&served), "{answer}");
        let lies = served
            .requests()
            .iter()
            .filter(|r| r["lie"] == Value::String(answer.into()))
            .count();
        assert!(
            lies > 1,
            "{answer}: the lie was told again and again ({lies})"
        );
    }
}

#[test]
fn a_redirect_of_a_create_sends_nothing_to_the_other_host_and_the_run_does_not_claim_it() {
    let elsewhere_dir = tempfile::tempdir().unwrap();
    let elsewhere = serve_with(elsewhere_dir.path(), "{}");
    let dir = tempfile::tempdir().unwrap();
    let served = serve_with(
        dir.path(),
        &format!(
            "lies:\n  - {{ method: PUT, path: \"*/resourceGroups/rg-new\", times: 1000, answer: redirect, status: 307, location: \"{}/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-new?api-version=2025-04-01\" }}\n",
            elsewhere.arm_endpoint
        ),
    );
    let run = served
        .kmsflow(
            dir.path(),
            &[
                "run",
                "pmk-new-cluster",
                "-p",
                "resource_group=rg-new",
                "-p",
                "cluster=aks-new",
            ],
        )
        .output()
        .unwrap();
    let log = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{log}");
    assert!(
        log.contains("answered 307, a redirect to") && log.contains("follows no redirect"),
        "{log}"
    );
    assert_eq!(
        elsewhere.requests().len(),
        0,
        "nothing reached the other host: {:?}",
        elsewhere.requests()
    );
    assert!(
        served.requests_to("/managedClusters/aks-new").is_empty(),
        "no cluster was asked for in a group that does not exist"
    );
}
