//! `--sandbox`: the command runs against an in-process sandbox instead of Azure.
//!
//! The sandbox's address must be known before the tokio runtime starts, because the process
//! environment (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`) is how `azure_identity`'s own
//! managed-identity credential finds its token endpoint, and the environment may only be
//! changed while the process has one thread.

use std::path::PathBuf;

use kmsflow_sandbox::{Addressing, Faults, Sandbox, SandboxOptions, VAULT_SUFFIX};

use crate::cli::{Auth, Cli};
use crate::failure::Failure;

/// A sandbox bound but not yet serving.
pub struct Prepared {
    listener: std::net::TcpListener,
    options: SandboxOptions,
    world_file: PathBuf,
    /// Where the authority's certificate is written once the sandbox has made it.
    ca_file: PathBuf,
    /// The runbook the command runs, to seed a fresh world with what it expects to exist.
    runbook: Option<String>,
}

/// Names the bundled runbooks need, so `--sandbox` runs without any `-p`.
pub fn default_names() -> serde_json::Map<String, serde_json::Value> {
    [
        ("resource_group", "rg-kms-sandbox"),
        ("cluster", "aks-sandbox"),
        ("key_vault", "kv-kms-sandbox"),
        ("key_name", "kms-key"),
        ("identity", "id-kms-sandbox"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
    .collect()
}

/// Binds the sandbox's port, points this process's Azure settings at it, and returns what
/// [`Prepared::start`] needs; `None` when the command has no `--sandbox`.
pub fn prepare(cli: &mut Cli) -> Result<Option<Prepared>, Failure> {
    let Some(args) = cli.command.sandbox() else {
        return Ok(None);
    };
    let faults = match &args.sandbox_faults {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("cannot read `{}`: {e}", path.display())))?;
            Faults::from_yaml(&text).map_err(|e| {
                Failure::Usage(format!("invalid faults file `{}`: {e}", path.display()))
            })?
        }
        None => Faults::default(),
    };
    let given = cli.command.state_args().and_then(|s| s.state.clone());
    let state = crate::state_file::state_location(given.as_deref())?;
    let world_file = crate::state_file::sandbox_world_file(&state)?;
    // The world is saved beside the state before the store first opens (and makes the folder).
    kmsflow_state::create_private_folder(&world_file).map_err(|e| {
        Failure::Usage(format!(
            "cannot create the state folder for `{}`: {e}; pass --state FILE (or set \
             KMSFLOW_STATE) to keep the state somewhere this user may write",
            world_file.display()
        ))
    })?;
    hold_the_sandbox(&world_file)?;
    // Come back on the port the saved world used: runs keep the vault URIs and key ids it
    // handed out, as they would keep Azure's.
    let previous_port = std::fs::read_to_string(&world_file)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|saved| {
            saved["base_url"]
                .as_str()
                .and_then(|u| u.rsplit(':').next()?.parse::<u16>().ok())
        });
    let listener = previous_port
        .and_then(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
        .map_or_else(|| std::net::TcpListener::bind(("127.0.0.1", 0)), Ok)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Failure::Usage(format!("cannot start the sandbox on 127.0.0.1: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| Failure::Usage(format!("cannot start the sandbox: {e}")))?;
    // https on Azure's host shapes, as `sandbox serve --tls`: the steps meet vault URIs and
    // key ids shaped like Key Vault's, and their client trusts this run's authority only for
    // the sandbox's names (the cloud profile beside the state says which).
    let ca_file = world_file
        .with_extension("")
        .with_extension("sandbox-ca.pem");
    let profile_file = world_file
        .with_extension("")
        .with_extension("sandbox-cloud.json");
    write_private(
        &profile_file,
        &serde_json::to_string_pretty(&client_profile(address, &ca_file))
            .expect("a profile serializes"),
    )?;
    let identity_header = random_secret();
    let options = SandboxOptions {
        faults,
        identity_header: Some(identity_header.clone()),
        persist: Some(world_file.clone()),
        tls: true,
        ..SandboxOptions::default()
    };
    let environment = [
        ("AZURE_SUBSCRIPTION_ID", options.subscription.clone()),
        ("AZURE_TENANT_ID", options.tenant.clone()),
        // Plain http on loopback, as App Service's identity endpoint is.
        ("IDENTITY_ENDPOINT", format!("http://{address}/msi/token")),
        ("IDENTITY_HEADER", identity_header),
    ];
    for (name, value) in environment {
        // SAFETY: called from `main` before the runtime (or any other thread) exists.
        unsafe { std::env::set_var(name, value) };
    }
    if let Some(azure) = cli.command.azure_args_mut() {
        azure.arm_endpoint = Some(
            Addressing::Hosts {
                port: address.port(),
            }
            .arm_endpoint(),
        );
        azure.cloud = profile_file.display().to_string();
        azure.auth = Auth::ManagedIdentity;
    }
    let runbook = match &cli.command {
        crate::cli::Command::Check { .. } => Some("verify-kms".to_owned()),
        crate::cli::Command::Run { runbook, .. } | crate::cli::Command::Plan { runbook, .. } => {
            std::path::Path::new(runbook.trim_start_matches("bundled:"))
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        }
        _ => None,
    };
    Ok(Some(Prepared {
        listener,
        options,
        world_file,
        ca_file,
        runbook,
    }))
}

impl Prepared {
    /// Serves on the current runtime; the sandbox stops when the returned value is dropped.
    pub fn start(self) -> Result<Sandbox, Failure> {
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .map_err(|e| Failure::Usage(format!("cannot start the sandbox: {e}")))?;
        let fresh = !self.world_file.exists();
        let sandbox = Sandbox::serve(listener, self.options)
            .map_err(|e| Failure::Usage(format!("cannot start the sandbox: {e}")))?;
        write_private(&self.ca_file, sandbox.ca_pem().unwrap_or_default())?;
        if fresh {
            seed_for(&sandbox, self.runbook.as_deref().unwrap_or_default());
            // Kept at once: a run killed before its first write resumes against this world.
            sandbox.save();
        }
        crate::output::note!(
            "sandbox on {} (its world is kept in {})",
            sandbox.base_url(),
            self.world_file.display()
        );
        Ok(sandbox)
    }
}

/// Takes the sandbox of this state for the rest of the process, or refuses: two `--sandbox`
/// commands on one state would each start a sandbox with its own certificate authority and
/// port, and overwrite each other's world, authority and cloud profile beside the state (the
/// first then meets a certificate it cannot verify).
fn hold_the_sandbox(world_file: &std::path::Path) -> Result<(), Failure> {
    use std::io::{Read, Seek, Write};
    static HELD: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    let lock_file = world_file.with_extension("").with_extension("sandbox.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_file)
        .map_err(|e| Failure::Usage(format!("cannot open `{}`: {e}", lock_file.display())))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the command that is refused.
            let holder = format!(
                "pid {}: {}",
                std::process::id(),
                std::env::args().collect::<Vec<_>>().join(" ")
            );
            let _ = file
                .set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(holder.as_bytes()));
            let _ = HELD.set(file);
            Ok(())
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(Failure::SandboxHeld(format!(
                "another `--sandbox` command ({}) is using the sandbox kept beside this state (`{}`): its world, port and certificate authority are its own until it ends; wait for it, or give this one its own --state",
                holder.trim(),
                world_file.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(Failure::Usage(format!(
            "cannot lock `{}`: {e}",
            lock_file.display()
        ))),
    }
}

/// The cloud profile (`--cloud FILE`) that points kmsflow at a TLS sandbox on `address`:
/// Resource Manager and the vault hosts resolve there, and `ca_file` is trusted for them.
pub fn client_profile(
    address: std::net::SocketAddr,
    ca_file: &std::path::Path,
) -> serde_json::Value {
    let addressing = Addressing::Hosts {
        port: address.port(),
    };
    serde_json::json!({
        "name": "kmsflow sandbox",
        "arm_endpoint": addressing.arm_endpoint(),
        // The sandbox takes Resource Manager tokens of the public cloud's audience.
        "arm_scope": "https://management.azure.com/.default",
        "key_vault_scope": format!("{}/.default", addressing.vault_audience()),
        "key_vault_suffixes": [VAULT_SUFFIX],
        // A state database is not sandboxed: `auth=entra` asks for the public cloud's audience.
        "postgres_scope": "https://ossrdbms-aad.database.windows.net/.default",
        "sandbox": {"address": address.to_string(), "ca_file": ca_file},
    })
}

/// Writes a file only its owner can read, replacing it whole.
pub fn write_private(path: &std::path::Path, text: &str) -> Result<(), Failure> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()))
        .map_err(|e| Failure::Usage(format!("cannot write `{}`: {e}", path.display())))
}

/// A fresh `IDENTITY_HEADER` secret: 128 bits from the standard library's per-process
/// random hash keys (no extra dependency for one value).
fn random_secret() -> String {
    use std::hash::BuildHasher;
    let half = || std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{:016x}{:016x}", half(), half())
}

/// What a bundled runbook expects to exist already: an existing cluster (Kubernetes 1.33, no
/// KMS) for the `existing` runbooks, a PMK cluster for `migrate-pmk-to-cmk` and `verify-kms`,
/// and a CMK cluster with its vault, key, identity and roles for `migrate-cmk-to-pmk`.
pub fn seed_for(sandbox: &Sandbox, runbook: &str) {
    use serde_json::json;
    let names = default_names();
    let name = |key: &str| names[key].as_str().unwrap_or_default().to_owned();
    let (group, cluster) = (name("resource_group"), name("cluster"));
    let mode = match runbook {
        "pmk-existing-cluster"
        | "cmk-private-vault-existing-cluster"
        | "cmk-public-vault-existing-cluster" => "none",
        "migrate-pmk-to-cmk" | "verify-kms" => "pmk",
        "migrate-cmk-to-pmk" => "cmk",
        _ => return,
    };
    sandbox.with_world(|world| {
        let subscription = world.subscription().to_owned();
        world.resource_group(&group, "eastus");
        let mut identity = json!({"type": "SystemAssigned", "principalId": "00000000-0000-4000-8000-00000000c1a5", "tenantId": "sandbox"});
        let mut profile = json!({"kubernetesResourceObjectEncryptionProfile": null, "azureKeyVaultKms": null});
        if mode != "none" {
            world.feature_registered("Microsoft.ContainerService", "KMSPMKPreview");
            profile["kubernetesResourceObjectEncryptionProfile"] = json!({"infrastructureEncryption": "Enabled"});
        }
        if mode == "cmk" {
            let group_id = format!("/subscriptions/{subscription}/resourceGroups/{group}");
            let vault_name = name("key_vault");
            let vault_id = format!("{group_id}/providers/Microsoft.KeyVault/vaults/{vault_name}");
            let vault_uri = world.vault_uri(&vault_name);
            world.resource(json!({
                "id": vault_id, "name": vault_name, "type": "Microsoft.KeyVault/vaults", "location": "eastus", "tags": {},
                "properties": {
                    "tenantId": "00000000-0000-4000-8000-7e4a47000001", "sku": {"family": "A", "name": "standard"},
                    "enableRbacAuthorization": true, "enableSoftDelete": true, "softDeleteRetentionInDays": 90,
                    "publicNetworkAccess": "Enabled", "accessPolicies": [], "vaultUri": vault_uri, "provisioningState": "Succeeded",
                    "networkAcls": {"bypass": "AzureServices", "defaultAction": "Allow", "ipRules": [], "virtualNetworkRules": []},
                },
            }));
            let key_id = world.key(&vault_name, &name("key_name")).unwrap_or_default();
            let identity_name = name("identity");
            let identity_id = format!("/subscriptions/{subscription}/resourcegroups/{group}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{identity_name}");
            let principal = "00000000-0000-4000-8000-00000000a1d0";
            world.resource(json!({
                "id": identity_id, "name": identity_name, "location": "eastus", "tags": {},
                "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                "properties": {"clientId": "00000000-0000-4000-8000-00000000c11e", "principalId": principal, "tenantId": "sandbox"},
            }));
            world.role_assignment(&vault_id, principal, "12338af0-0e69-4776-bea7-57ae8d297424");
            world.role_assignment(&vault_id, principal, "f25e0fa2-a7c8-4377-a976-54943a77a395");
            identity = json!({"type": "UserAssigned", "userAssignedIdentities": {identity_id: {"clientId": "00000000-0000-4000-8000-00000000c11e", "principalId": principal}}});
            profile["azureKeyVaultKms"] = json!({"enabled": true, "keyId": key_id, "keyVaultNetworkAccess": "Public", "keyVaultResourceId": vault_id});
        }
        world.resource(json!({
            "id": format!("/subscriptions/{subscription}/resourceGroups/{group}/providers/Microsoft.ContainerService/managedClusters/{cluster}"),
            "name": cluster, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "eTag": "00000000-0000-4000-8000-0000000e7a90",
            "identity": identity,
            "properties": {
                "provisioningState": "Succeeded", "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0",
                "dnsPrefix": format!("{cluster}-dns"),
                "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
                "securityProfile": profile,
            },
        }));
    });
}
