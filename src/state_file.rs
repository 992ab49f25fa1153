//! Where the state file is: its own module, so `commands` and `sandboxed` (which keeps the
//! sandbox's world beside it) both use it without depending on each other.

use std::path::{Path, PathBuf};

use crate::failure::Failure;

/// `--state`, `$KMSFLOW_STATE`, else `kmsflow/state.db` under the user's state directory.
pub fn state_path(given: Option<&Path>) -> Result<PathBuf, Failure> {
    match given {
        Some(path) => Ok(path.to_owned()),
        None => dirs::state_dir()
            .or_else(dirs::data_local_dir)
            .map(|dir| dir.join("kmsflow").join("state.db"))
            .ok_or_else(|| {
                Failure::Usage(
                    "cannot find a state directory; pass --state or set KMSFLOW_STATE".into(),
                )
            }),
    }
}
