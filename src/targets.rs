//! `--targets FILE`: a fleet as rows of parameters, CSV with a header row or a YAML list of
//! mappings (or `targets:` holding one). Each row says where it is in the file, so every
//! problem found later names the row.

use std::path::Path;

use kmsflow_engine::rollout::TargetRow;
use serde_json::Value;

use crate::failure::Failure;

/// Reads the rows of a targets file; refuses an empty one.
pub fn read_rows(path: &Path) -> Result<Vec<TargetRow>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read `{}`: {e}", path.display())))?;
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let rows = if is_csv {
        csv_rows(&text)
    } else {
        yaml_rows(&text)
    }
    .map_err(|reason| Failure::Usage(format!("`{}`: {reason}", path.display())))?;
    if rows.is_empty() {
        return Err(Failure::Usage(format!(
            "`{}` lists no targets",
            path.display()
        )));
    }
    Ok(rows)
}

fn yaml_rows(text: &str) -> Result<Vec<TargetRow>, String> {
    let value: Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let list = value
        .get("targets")
        .cloned()
        .unwrap_or(value)
        .as_array()
        .cloned()
        .ok_or("expected a list of targets (or `targets:` holding one)")?;
    list.into_iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::Object(params) => Ok(TargetRow {
                origin: format!("entry {}", index + 1),
                params,
            }),
            _ => Err(format!(
                "entry {} is not a mapping of parameters",
                index + 1
            )),
        })
        .collect()
}

/// CSV as platform teams write it by hand or export it: a header row, comma-separated cells,
/// blank lines and `#` comments skipped. Quoted cells are refused rather than misread (no
/// parameter of a KMS runbook holds a comma).
fn csv_rows(text: &str) -> Result<Vec<TargetRow>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    let (_, header) = lines.next().ok_or("the CSV has no header row")?;
    let header: Vec<&str> = header.split(',').map(str::trim).collect();
    if let Some(empty) = header.iter().position(|c| c.is_empty()) {
        return Err(format!("column {} of the header has no name", empty + 1));
    }
    lines
        .map(|(number, line)| {
            if line.contains('"') {
                return Err(format!(
                    "row {number}: quoted cells are not supported; write the values bare"
                ));
            }
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != header.len() {
                return Err(format!(
                    "row {number} has {} cells, the header {}",
                    cells.len(),
                    header.len()
                ));
            }
            Ok(TargetRow {
                origin: format!("row {number}"),
                params: header
                    .iter()
                    .zip(cells)
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.to_string(), Value::String(v.to_owned())))
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_and_csv_rows_with_where_they_are() {
        let yaml = yaml_rows("- { resource_group: rg, cluster: a }\n- { resource_group: rg, cluster: b, expected_mode: PMK }\n").unwrap();
        assert_eq!(yaml.len(), 2);
        assert_eq!(yaml[1].params["expected_mode"], "PMK");
        assert_eq!(yaml[1].origin, "entry 2");
        let csv = csv_rows("resource_group,cluster,expected_mode\nrg,a,CMK\n# comment\n\nrg,b,\n")
            .unwrap();
        assert_eq!(csv.len(), 2);
        assert!(!csv[1].params.contains_key("expected_mode"));
        // Line numbers as an editor shows them.
        assert_eq!(csv[1].origin, "row 5");
        assert!(
            csv_rows("a,b\n1\n")
                .unwrap_err()
                .contains("row 2 has 1 cells")
        );
        assert!(csv_rows("a,b\n\"1,2\",3\n").unwrap_err().contains("quoted"));
        assert!(yaml_rows("- 3\n").unwrap_err().contains("entry 1"));
    }
}
