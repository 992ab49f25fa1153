//! `--sandbox`: the command runs against an in-process sandbox instead of Azure.
//!
//! The sandbox's address must be known before the tokio runtime starts, because the process
//! environment (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`) is how `azure_identity`'s own
//! managed-identity credential finds its token endpoint, and the environment may only be
//! changed while the process has one thread.

use std::path::PathBuf;

use kmsflow_sandbox::{Faults, Sandbox, SandboxOptions};

use crate::cli::{Auth, Cli};
use crate::failure::Failure;

/// A sandbox bound but not yet serving.
pub struct Prepared {
    listener: std::net::TcpListener,
    options: SandboxOptions,
    world_file: PathBuf,
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
    let state = crate::commands::state_path(cli.state.as_deref())?;
    let world_file = state.with_extension("sandbox.json");
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
    let base_url = format!("http://{address}");
    let identity_header = random_secret();
    let options = SandboxOptions {
        faults,
        identity_header: Some(identity_header.clone()),
        persist: Some(world_file.clone()),
        ..SandboxOptions::default()
    };
    let environment = [
        ("AZURE_SUBSCRIPTION_ID", options.subscription.clone()),
        ("AZURE_TENANT_ID", options.tenant.clone()),
        ("IDENTITY_ENDPOINT", format!("{base_url}/msi/token")),
        ("IDENTITY_HEADER", identity_header),
    ];
    for (name, value) in environment {
        // SAFETY: called from `main` before the runtime (or any other thread) exists.
        unsafe { std::env::set_var(name, value) };
    }
    cli.arm_endpoint = base_url;
    cli.auth = Auth::ManagedIdentity;
    Ok(Some(Prepared {
        listener,
        options,
        world_file,
    }))
}

impl Prepared {
    /// Serves on the current runtime; the sandbox stops when the returned value is dropped.
    pub fn start(self) -> Result<Sandbox, Failure> {
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .map_err(|e| Failure::Usage(format!("cannot start the sandbox: {e}")))?;
        let sandbox = Sandbox::serve(listener, self.options)
            .map_err(|e| Failure::Usage(format!("cannot start the sandbox: {e}")))?;
        eprintln!(
            "kmsflow: sandbox on {} (its world is kept in {})",
            sandbox.base_url(),
            self.world_file.display()
        );
        Ok(sandbox)
    }
}

/// A fresh `IDENTITY_HEADER` secret: 128 bits from the standard library's per-process
/// random hash keys (no extra dependency for one value).
fn random_secret() -> String {
    use std::hash::BuildHasher;
    let half = || std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{:016x}{:016x}", half(), half())
}
