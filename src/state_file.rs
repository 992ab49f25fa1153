//! Where the state is: its own module, so `commands` and `sandboxed` (which keeps the
//! sandbox's world beside it) both use it without depending on each other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use kmsflow_state::{AccessToken, Location, TokenSource};
use kmsflow_steps::{AzureConfig, ScopedTokens};

use crate::failure::Failure;

/// `--state`, `$KMSFLOW_STATE`, else `kmsflow/state.db` under the user's state directory. A
/// `postgres://` URL names the team's database instead of a file.
pub fn state_location(given: Option<&Path>) -> Result<Location, Failure> {
    if let Some(url) = given
        .and_then(Path::to_str)
        .filter(|text| kmsflow_state::is_postgres_url(text))
    {
        return Location::parse(url).map_err(|e| Failure::Usage(e.to_string()));
    }
    match given {
        Some(path) => {
            check_state_file(path)?;
            Ok(Location::File(path.to_owned()))
        }
        None => default_folder().map(|dir| Location::File(dir.join("state.db"))),
    }
}

/// A database whose URL says `auth=entra` signs in with the credential the steps use
/// (`--auth`), for the cloud's Azure Database for PostgreSQL scope. Nothing for a file, or a
/// database signed in to with a password.
pub fn sign_in_with_azure(state: &Location, azure: &AzureConfig) -> Result<(), Failure> {
    let Location::Postgres(pg) = state else {
        return Ok(());
    };
    if !pg.uses_entra() {
        return Ok(());
    }
    let scope = azure.cloud.postgres_scope.as_deref().ok_or_else(|| {
        Failure::Usage(format!(
            "`{pg}` signs in with auth=entra, but the cloud profile `{}` names no \
             `postgres_scope` (the token scope of Azure Database for PostgreSQL): add it to the \
             profile",
            azure.cloud.name
        ))
    })?;
    let tokens = ScopedTokens::new(azure.auth, scope)
        .map_err(|e| Failure::Usage(format!("`{pg}` (auth=entra): {e}")))?;
    pg.use_token_source(Arc::new(EntraTokens(Arc::new(tokens))));
    Ok(())
}

/// The steps' credential as the store's token source.
struct EntraTokens(Arc<ScopedTokens>);

impl TokenSource for EntraTokens {
    fn token(&self) -> BoxFuture<'static, Result<AccessToken, String>> {
        let tokens = self.0.clone();
        Box::pin(async move {
            let (secret, expires_at) = tokens.token().await?;
            Ok(AccessToken { secret, expires_at })
        })
    }
}

/// The file the sandbox keeps its world in: beside the state file, or for a database in the
/// user's own state folder (the sandbox is this machine's, whoever shares the database).
pub fn sandbox_world_file(state: &Location) -> Result<PathBuf, Failure> {
    match state {
        Location::File(path) => Ok(path.with_extension("sandbox.json")),
        Location::Postgres(_) => Ok(default_folder()?.join("postgres.sandbox.json")),
    }
}

fn default_folder() -> Result<PathBuf, Failure> {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|dir| dir.join("kmsflow"))
        .ok_or_else(|| {
            Failure::Usage(
                "cannot find a state directory; pass --state or set KMSFLOW_STATE".into(),
            )
        })
}

/// The first bytes of every SQLite database file.
const SQLITE_HEADER: &[u8] = b"SQLite format 3\0";

/// Refuses, with what to do, a `--state` that is a folder or a file that is not a SQLite
/// database (SQLite's own "file is not a database" names neither the file nor a way out).
/// A missing file is fine: the first run creates it.
fn check_state_file(path: &Path) -> Result<(), Failure> {
    if path.is_dir() {
        return Err(Failure::Usage(format!(
            "`{}` is a folder: --state (or KMSFLOW_STATE) names the state file, e.g. `{}`",
            path.display(),
            path.join("state.db").display()
        )));
    }
    // Opening a named pipe to read its header would wait for a writer forever; a device or a
    // socket is no state file either.
    if let Ok(metadata) = std::fs::metadata(path)
        && !metadata.is_file()
    {
        return Err(Failure::Usage(format!(
            "`{}` is not a regular file (it is {}): --state (or KMSFLOW_STATE) names the state file",
            path.display(),
            kmsflow_state::describe_file_type(&metadata.file_type())
        )));
    }
    let mut header = [0u8; 16];
    let read =
        std::fs::File::open(path).and_then(|mut file| std::io::Read::read(&mut file, &mut header));
    match read {
        // Empty (SQLite makes it a database) or not there yet.
        Ok(0) | Err(_) => Ok(()),
        Ok(n) if n == SQLITE_HEADER.len() && header == SQLITE_HEADER => Ok(()),
        Ok(_) => Err(Failure::Usage(format!(
            "`{}` is not a kmsflow state file (it is not a SQLite database): point --state (or KMSFLOW_STATE) at the file kmsflow made, or move this one away",
            path.display()
        ))),
    }
}
