//! The sandbox's answers have the shapes of Azure's official examples (copied verbatim from
//! Azure/azure-rest-api-specs into `tests/examples/`): every key an example's response has at
//! the top level and under `properties`, the sandbox's answer has too, except the few listed
//! with the reason they are left out.

use std::collections::BTreeSet;

use kmsflow_sandbox::{Sandbox, SandboxOptions};
use serde_json::{Value, json};

fn example(name: &str) -> Value {
    let path = format!("{}/tests/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The first response body of an example.
fn example_body(name: &str) -> Value {
    let examples = example(name);
    let responses = examples["responses"].as_object().unwrap();
    let (_, first) = responses.iter().next().unwrap();
    first["body"].clone()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn assert_shape(name: &str, ours: &Value, left_out: &[&str]) {
    let theirs = example_body(name);
    for (label, want, have) in [
        ("top level", keys(&theirs), keys(ours)),
        (
            "properties",
            keys(&theirs["properties"]),
            keys(&ours["properties"]),
        ),
    ] {
        let missing: Vec<&String> = want
            .iter()
            .filter(|k| !have.contains(*k) && !left_out.contains(&k.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{name}: {label} lacks {missing:?}\nours: {ours:#}"
        );
    }
}

struct Client {
    sandbox: Sandbox,
    http: reqwest::Client,
    arm: String,
    vault: String,
}

impl Client {
    async fn new() -> Client {
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let env: std::collections::HashMap<_, _> = sandbox.env().into_iter().collect();
        let http = reqwest::Client::new();
        let token = |resource: &'static str| {
            let http = http.clone();
            let endpoint = env["IDENTITY_ENDPOINT"].clone();
            let header = env["IDENTITY_HEADER"].clone();
            async move {
                let body: Value = http
                    .get(format!(
                        "{endpoint}?api-version=2019-08-01&resource={resource}"
                    ))
                    .header("x-identity-header", header)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                body["access_token"].as_str().unwrap().to_owned()
            }
        };
        let arm = token("https://management.azure.com").await;
        let vault = token("https://vault.azure.net").await;
        Client {
            sandbox,
            http,
            arm,
            vault,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path_or_url: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (url, token) = if path_or_url.starts_with("http") {
            (path_or_url.to_owned(), &self.vault)
        } else {
            (
                format!("{}{path_or_url}", self.sandbox.base_url()),
                &self.arm,
            )
        };
        let mut request = self.http.request(method, url).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_have_the_official_examples_keys() {
    use reqwest::Method;
    let c = Client::new().await;
    let sub = c.sandbox.subscription().to_owned();
    let rg = format!("/subscriptions/{sub}/resourcegroups/rg1?api-version=2025-04-01");
    let (status, group) = c
        .call(Method::PUT, &rg, Some(json!({"location": "eastus"})))
        .await;
    assert_eq!(status, 201);
    assert_shape("resources_CreateResourceGroup_2019-05-10.json", &group, &[]);

    let (_, feature) = c
        .call(Method::POST, &format!("/subscriptions/{sub}/providers/Microsoft.Features/providers/Microsoft.ContainerService/features/KMSPMKPreview/register?api-version=2021-07-01"), None)
        .await;
    assert_shape("features_registerFeature_2021-07-01.json", &feature, &[]);
    let (_, provider) = c
        .call(
            Method::GET,
            &format!(
                "/subscriptions/{sub}/providers/Microsoft.ContainerService?api-version=2025-04-01"
            ),
            None,
        )
        .await;
    assert_shape("resources_GetProvider_2024-03-01.json", &provider, &[]);

    let vault_request = example("keyvault_mgmt_createVaultWithNetworkAcls_2025-05-01.json")["parameters"]["parameters"].clone();
    let vault_path = format!(
        "/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/kv-example?api-version=2025-05-01"
    );
    let (status, vault) = c.call(Method::PUT, &vault_path, Some(vault_request)).await;
    assert_eq!(status, 201, "{vault}");
    // `hsmPoolResourceId` belongs to managed HSM pools, which the sandbox does not model.
    assert_shape(
        "keyvault_mgmt_createVaultWithNetworkAcls_2025-05-01.json",
        &vault,
        &["hsmPoolResourceId"],
    );

    let identity_path = format!(
        "/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-example?api-version=2023-01-31"
    );
    let (status, identity) = c
        .call(
            Method::PUT,
            &identity_path,
            Some(json!({"location": "eastus", "tags": {"key1": "value1"}})),
        )
        .await;
    assert_eq!(status, 201);
    assert_shape("msi_IdentityCreate_2023-01-31.json", &identity, &[]);

    let vault_id = vault["id"].as_str().unwrap();
    let assignment = format!(
        "{vault_id}/providers/Microsoft.Authorization/roleAssignments/05c5a614-a7d6-4502-b150-c2fb455033ff?api-version=2022-04-01"
    );
    let caller = SandboxOptions::default().caller_object_id;
    let (status, role) = c
        .call(Method::PUT, &assignment, Some(json!({"properties": {
            "roleDefinitionId": format!("/subscriptions/{sub}/providers/Microsoft.Authorization/roleDefinitions/14b46e9e-c2b7-41b4-b07b-48a6ebf60603"),
            "principalId": caller, "principalType": "User"}})))
        .await;
    assert_eq!(status, 201, "{role}");
    assert_shape(
        "authorization_RoleAssignments_CreateForResource_2022-04-01.json",
        &role,
        &[],
    );

    // The example vault denies by default; open it so the data plane answers.
    let (status, _) = c
        .call(Method::PATCH, &vault_path, Some(json!({"properties": {"networkAcls": {"defaultAction": "Allow"}, "enableRbacAuthorization": true}})))
        .await;
    assert_eq!(status, 200);
    // `vaultUri` ends with a slash, as Azure writes it.
    let vault_uri = vault["properties"]["vaultUri"]
        .as_str()
        .unwrap()
        .trim_end_matches('/');
    let (status, key) = c
        .call(
            Method::POST,
            &format!("{vault_uri}/keys/kms-key/create?api-version=7.5"),
            Some(json!({"kty": "RSA", "key_size": 2048})),
        )
        .await;
    assert_eq!(status, 200, "{key}");
    assert_shape("keyvault_data_CreateKey_7.5.json", &key, &[]);
    assert_eq!(
        keys(&key["key"]),
        keys(&example_body("keyvault_data_CreateKey_7.5.json")["key"])
    );
    let (_, versions) = c
        .call(
            Method::GET,
            &format!("{vault_uri}/keys/kms-key/versions?api-version=7.5"),
            None,
        )
        .await;
    assert_shape("keyvault_data_GetKeyVersions_7.5.json", &versions, &[]);
    let policy_request = example("keyvault_data_UpdateKeyRotationPolicy_7.5.json")["parameters"]["keyRotationPolicy"].clone();
    let (status, policy) = c
        .call(
            Method::PUT,
            &format!("{vault_uri}/keys/kms-key/rotationpolicy?api-version=7.5"),
            Some(policy_request),
        )
        .await;
    assert_eq!(status, 200, "{policy}");
    assert_shape(
        "keyvault_data_UpdateKeyRotationPolicy_7.5.json",
        &policy,
        &[],
    );

    let mut cluster_request = example("aks_ManagedClustersCreate_Update_2026-01-02-preview.json")["parameters"]["parameters"].clone();
    // The example's identity names a resource in its own subscription; use ours.
    cluster_request["identity"] = json!({"type": "UserAssigned", "userAssignedIdentities": {identity["id"].as_str().unwrap(): {}}});
    let (status, cluster) = c
        .call(Method::PUT, &format!("/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.ContainerService/managedClusters/clustername1?api-version=2025-10-02-preview"), Some(cluster_request))
        .await;
    assert_eq!(status, 201, "{cluster}");
    assert_shape(
        "aks_ManagedClustersCreate_Update_2026-01-02-preview.json",
        &cluster,
        &[],
    );
}

/// Key Vault's denials, in its own envelopes (fidelity audit, row 20).
#[tokio::test]
async fn key_vault_answers_denials_in_its_own_envelopes() {
    let client = Client::new().await;
    let subscription = client.sandbox.subscription().to_owned();
    let uris = client.sandbox.with_world(|world| {
        world.resource_group("rg", "eastus");
        ["kv-open", "kv-closed"].map(|name| {
            let uri = world.vault_uri(name);
            world.resource(json!({
                "id": format!("/subscriptions/{subscription}/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/{name}"),
                "name": name, "type": "Microsoft.KeyVault/vaults", "location": "eastus",
                "properties": {
                    "vaultUri": uri, "enableRbacAuthorization": true, "tenantId": "t",
                    "sku": {"family": "A", "name": "standard"},
                    "publicNetworkAccess": if name == "kv-closed" { "Disabled" } else { "Enabled" },
                },
            }));
            uri
        })
    });
    let key = |uri: &str| format!("{uri}keys/k?api-version=7.5");

    let anonymous = client.http.get(key(&uris[0])).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}})
    );

    let (status, body) = client
        .call(reqwest::Method::GET, &key(&uris[0]), None)
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByRbac");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("please observe propagation time"),
        "{body}"
    );

    let (status, body) = client
        .call(reqwest::Method::GET, &key(&uris[1]), None)
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByConnection");
}
