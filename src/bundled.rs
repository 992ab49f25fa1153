//! Runbooks compiled into the binary, so `kmsflow run NAME` works on a fresh machine.

/// A bundled runbook: its name (the file stem) and its text.
pub struct Bundled {
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! bundled {
    ($($name:literal),+ $(,)?) => {
        &[$(Bundled { name: $name, text: include_str!(concat!("../runbooks/", $name, ".yaml")) }),+]
    };
}

/// Every runbook under `runbooks/` (a test keeps this list and the folder in step).
pub const BUNDLED: &[Bundled] = bundled![
    "register-kms-feature",
    "pmk-new-cluster",
    "pmk-existing-cluster",
    "cmk-private-vault-new-cluster",
    "cmk-private-vault-existing-cluster",
    "cmk-public-vault-new-cluster",
    "cmk-public-vault-existing-cluster",
    "verify-kms",
    "migrate-pmk-to-cmk",
    "migrate-cmk-to-pmk",
    "rotation-check",
    "engine-drill",
];

/// Fragments the bundled runbooks include, by their path under `runbooks/`.
pub const FRAGMENTS: &[Bundled] = bundled!["fragments/cmk-key-vault"];

/// Finds fragments: beside the including runbook file, or in the binary for bundled runbooks.
pub struct Fragments;

impl kmsflow_engine::FragmentResolver for Fragments {
    fn resolve(&self, including: &str, path: &str) -> Option<kmsflow_engine::RunbookSource> {
        if let Some(base) = including.strip_prefix("bundled:") {
            // Relative to the including runbook, as for files.
            let joined = std::path::Path::new(base)
                .parent()
                .unwrap_or(std::path::Path::new(""))
                .join(path);
            let joined = joined.to_string_lossy();
            let name = joined.trim_end_matches(".yaml");
            return FRAGMENTS.iter().find(|f| f.name == name).map(|f| {
                kmsflow_engine::RunbookSource::new(format!("bundled:{}.yaml", f.name), f.text)
            });
        }
        let folder = std::path::Path::new(including)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let file = folder.join(path);
        // The engine refused `..` and absolute paths already; a symbolic link must not lead
        // out of the folder either.
        let inside = match (file.canonicalize(), folder.canonicalize()) {
            (Ok(file), Ok(folder)) => file.starts_with(folder),
            _ => false,
        };
        if !inside {
            return None;
        }
        let text = std::fs::read_to_string(&file).ok()?;
        Some(kmsflow_engine::RunbookSource::new(
            file.display().to_string(),
            text,
        ))
    }
}

/// The bundled runbook called `name`.
pub fn find(name: &str) -> Option<&'static Bundled> {
    BUNDLED.iter().find(|b| b.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runbook_file_is_bundled_and_compiles() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks");
        let mut on_disk: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                (path.extension()? == "yaml")
                    .then(|| path.file_stem()?.to_str().map(str::to_owned))?
            })
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = BUNDLED.iter().map(|b| b.name.to_owned()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "runbooks/ and BUNDLED differ");
        let mut fragments: Vec<String> = std::fs::read_dir(folder.join("fragments"))
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                format!("fragments/{}", path.file_stem().unwrap().to_string_lossy())
            })
            .collect();
        fragments.sort();
        let mut listed: Vec<String> = FRAGMENTS.iter().map(|b| b.name.to_owned()).collect();
        listed.sort();
        assert_eq!(
            fragments, listed,
            "runbooks/fragments/ and FRAGMENTS differ"
        );
        let registry = crate::registry();
        for bundled in BUNDLED {
            let source = kmsflow_engine::RunbookSource::new(
                format!("bundled:{}", bundled.name),
                bundled.text,
            );
            if let Err(diagnostics) = kmsflow_engine::compile_with(&source, &registry, &Fragments) {
                panic!(
                    "{}",
                    diagnostics.render(&miette::GraphicalReportHandler::new())
                );
            }
        }
    }
}
