//! Tokens go only to their service: a Key Vault token to the cloud's vault hosts (or the
//! sandbox's own origin), never to a host a parameter names.

mod support;

use kmsflow_sandbox::Faults;
use kmsflow_state::RunStatus;
use support::Harness;

const KEY_AT: &str = r#"
name: key-at
params:
  vault_uri: { type: string }
steps:
  - id: key
    uses: azure.keyvault_key
    with: { vault_uri: "{{params.vault_uri}}", name: kms-key }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_uri_naming_another_listener_gets_no_request_and_no_token() {
    let h = Harness::new(Faults::default()).await;
    // Another program on this machine, listening: it must never see a connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let elsewhere = format!("http://{}/", listener.local_addr().unwrap());
    for vault_uri in [
        elsewhere.as_str(),
        "https://kv-1.vault.azure.net.attacker.example/",
        "http://kv-1.vault.azure.net/",
    ] {
        let summary = h.run(KEY_AT, &[("vault_uri", vault_uri)]).await;
        assert_eq!(summary.status, RunStatus::Failed, "{vault_uri}");
        let error = h.step(&summary.run_id, "key").error.unwrap();
        // Plain http off loopback is refused before that; either way nothing is sent.
        assert!(
            error.contains("refusing to send a token to") && error.contains("Key Vault host")
                || error.contains("must use https"),
            "{vault_uri}: {error}"
        );
    }
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection reached the other listener"
    );
}
