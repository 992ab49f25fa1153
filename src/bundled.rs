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
pub const BUNDLED: &[Bundled] = bundled!["engine-drill"];

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
        let registry = crate::registry();
        for bundled in BUNDLED {
            let source = kmsflow_engine::RunbookSource::new(
                format!("bundled:{}", bundled.name),
                bundled.text,
            );
            if let Err(diagnostics) = kmsflow_engine::compile(&source, &registry) {
                panic!(
                    "{}",
                    diagnostics.render(&miette::GraphicalReportHandler::new())
                );
            }
        }
    }
}
