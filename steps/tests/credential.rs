//! `azure_identity`'s own `ManagedIdentityCredential` against the sandbox's token endpoint
//! (App Service protocol: `IDENTITY_ENDPOINT`, `IDENTITY_HEADER`). The credential reads the
//! process environment, so this test runs alone in its own test binary.

use std::sync::Arc;

use kmsflow_sandbox::{Sandbox, SandboxOptions};
use kmsflow_steps::{AuthMode, AzureClient, AzureConfig};

#[test]
fn the_managed_identity_credential_gets_tokens_from_the_sandbox() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let sandbox = runtime
        .block_on(Sandbox::start(SandboxOptions::default()))
        .unwrap();
    for (name, value) in sandbox.env() {
        // SAFETY: this test binary has one test and sets the environment before any other
        // thread reads it; the runtime's workers do not touch the environment.
        unsafe { std::env::set_var(name, value) };
    }
    let config = AzureConfig::new(&sandbox.base_url(), AuthMode::Auto).unwrap();
    let client = Arc::new(AzureClient::new(config).unwrap());
    runtime.block_on(async {
        let caller = client.caller().await.unwrap();
        assert_eq!(caller.object_id, SandboxOptions::default().caller_object_id);
        assert_eq!(caller.principal_type, "ServicePrincipal");
        let url = client
            .arm_url(
                &[
                    "subscriptions",
                    sandbox.subscription(),
                    "resourcegroups",
                    "rg-kms",
                ],
                "2025-04-01",
            )
            .unwrap();
        assert!(
            client.get(&url).await.unwrap().is_none(),
            "an absent group reads as None"
        );
    });
    let token_requests = sandbox
        .requests()
        .iter()
        .filter(|r| r.path == "/msi/token")
        .count();
    assert_eq!(token_requests, 1, "the ARM token is cached");
}
