//! `--discover`: a fleet found in Azure instead of a targets file. The managed clusters of the
//! given subscriptions (default: every one the credential can see), kept by `--where`, each
//! made a row of parameters: `subscription`, `resource_group` and `cluster` (those the runbook
//! declares), and any `--target-param NAME=TEMPLATE` rendered from the cluster's names.

use kmsflow_engine::CompiledRunbook;
use kmsflow_engine::rollout::TargetRow;
use kmsflow_steps::discover::{self, DiscoveredCluster};
use serde_json::{Map, Value};

use crate::cli::DiscoverArgs;
use crate::failure::Failure;

/// What to discover: kept with a schedule, and found again at each fire.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiscoverSpec {
    /// Empty: every subscription the credential can see.
    pub subscriptions: Vec<String>,
    pub filters: Vec<Filter>,
    pub target_params: Vec<TargetParam>,
}

impl DiscoverSpec {
    pub fn of(args: &DiscoverArgs) -> DiscoverSpec {
        DiscoverSpec {
            subscriptions: args.subscription.clone(),
            filters: args.filters.clone(),
            target_params: args.target_params.clone(),
        }
    }
}

/// Stored and parsed as the text given on the command line.
macro_rules! as_text {
    ($type:ty) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> Result<$type, D::Error> {
                String::deserialize(deserializer)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

as_text!(Filter);
as_text!(TargetParam);

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Filter::Tag { key, value } => write!(f, "tag:{key}={value}"),
            Filter::Name(glob) => write!(f, "name={glob}"),
            Filter::Location(location) => write!(f, "location={location}"),
            Filter::Version(glob) => write!(f, "version={glob}"),
            Filter::Kms(mode) => write!(f, "kms={mode}"),
        }
    }
}

impl std::fmt::Display for TargetParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.name, self.template)
    }
}

/// One `--where` condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `tag:KEY=VALUE`: the tag is set to that value (keys compare case-insensitively, as
    /// Azure's do; values exactly).
    Tag { key: String, value: String },
    /// `name=GLOB` (`*` and `?`), case-insensitive as ARM names are.
    Name(String),
    /// `location=eastus`.
    Location(String),
    /// `version=1.33*`: the current Kubernetes version.
    Version(String),
    /// `kms=none|PMK|CMK`.
    Kms(String),
}

impl std::str::FromStr for Filter {
    type Err = String;
    fn from_str(text: &str) -> Result<Filter, String> {
        let (key, value) = text.split_once('=').ok_or_else(|| {
            format!("--where `{text}`: write `tag:KEY=VALUE`, `name=GLOB`, `location=X`, `version=GLOB` or `kms=none|PMK|CMK`")
        })?;
        let value = value.trim().to_owned();
        match key.trim() {
            "name" => Ok(Filter::Name(value)),
            "location" => Ok(Filter::Location(value)),
            "version" => Ok(Filter::Version(value)),
            "kms" => match value.to_ascii_lowercase().as_str() {
                "none" => Ok(Filter::Kms("none".into())),
                "pmk" => Ok(Filter::Kms("PMK".into())),
                "cmk" => Ok(Filter::Kms("CMK".into())),
                _ => Err(format!(
                    "--where kms={value}: the modes are `none`, `PMK` and `CMK`"
                )),
            },
            tag if tag.starts_with("tag:") && tag.len() > 4 => Ok(Filter::Tag {
                key: tag[4..].to_owned(),
                value,
            }),
            other => Err(format!(
                "--where `{other}=...`: filter on `tag:KEY`, `name`, `location`, `version` or `kms`"
            )),
        }
    }
}

impl Filter {
    fn keeps(&self, cluster: &DiscoveredCluster) -> bool {
        match self {
            Filter::Tag { key, value } => cluster
                .tags
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case(key) && v.as_str() == Some(value)),
            Filter::Name(glob) => matches_glob(&glob.to_lowercase(), &cluster.name.to_lowercase()),
            Filter::Location(location) => cluster.location.eq_ignore_ascii_case(location),
            Filter::Version(glob) => matches_glob(glob, &cluster.kubernetes_version),
            Filter::Kms(mode) => cluster.kms.as_str() == mode,
        }
    }
}

/// `*` any run of characters, `?` one; everything else literally.
fn matches_glob(glob: &str, text: &str) -> bool {
    let (glob, text): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    let (mut g, mut t, mut star, mut mark) = (0, 0, None, 0);
    while t < text.len() {
        if g < glob.len() && (glob[g] == '?' || glob[g] == text[t]) {
            g += 1;
            t += 1;
        } else if g < glob.len() && glob[g] == '*' {
            star = Some(g);
            mark = t;
            g += 1;
        } else if let Some(s) = star {
            g = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|c| *c == '*')
}

/// `NAME=TEMPLATE`, e.g. `key_vault=kv-{{cluster}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetParam {
    pub name: String,
    pub template: String,
}

impl std::str::FromStr for TargetParam {
    type Err = String;
    fn from_str(text: &str) -> Result<TargetParam, String> {
        let (name, template) = text
            .split_once('=')
            .filter(|(name, _)| !name.trim().is_empty())
            .ok_or_else(|| format!("--target-param `{text}`: write NAME=TEMPLATE, e.g. `key_vault=kv-{{{{cluster}}}}`"))?;
        let param = TargetParam {
            name: name.trim().to_owned(),
            template: template.to_owned(),
        };
        param.render(&DiscoveredCluster {
            subscription: String::new(),
            resource_group: String::new(),
            name: String::new(),
            location: String::new(),
            kubernetes_version: String::new(),
            tags: Map::new(),
            kms: discover::KmsMode::None,
        })?;
        Ok(param)
    }
}

impl TargetParam {
    /// The template with `{{cluster}}`, `{{resource_group}}`, `{{subscription}}` and
    /// `{{location}}` replaced; any other placeholder is refused.
    fn render(&self, cluster: &DiscoveredCluster) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = self.template.as_str();
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("--target-param {}: an unclosed `{{{{`", self.name))?;
            let value = match after[..close].trim() {
                "cluster" => &cluster.name,
                "resource_group" => &cluster.resource_group,
                "subscription" => &cluster.subscription,
                "location" => &cluster.location,
                other => {
                    return Err(format!(
                        "--target-param {}: `{{{{{other}}}}}` is not a cluster's name; use cluster, resource_group, subscription or location",
                        self.name
                    ));
                }
            };
            out.push_str(value);
            rest = &after[close + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// The fleet `--discover` finds, as rows for `runbook`.
pub async fn rows(
    azure: kmsflow_steps::AzureConfig,
    args: &DiscoverSpec,
    runbook: &CompiledRunbook,
) -> Result<Vec<TargetRow>, Failure> {
    let azure = kmsflow_steps::Azure::new(azure);
    let client = azure.client().await.map_err(|e| {
        Failure::NotChecked(format!("cannot reach Azure to discover clusters: {e}"))
    })?;
    let listing =
        |e: kmsflow_steps::AzureError| Failure::NotChecked(format!("discovering clusters: {e}"));
    let subscriptions = if args.subscriptions.is_empty() {
        discover::subscriptions(&client).await.map_err(listing)?
    } else {
        args.subscriptions.clone()
    };
    let mut found = 0;
    let mut rows = Vec::new();
    let declared: Vec<&str> = runbook.params.iter().map(|p| p.name.as_str()).collect();
    for subscription in &subscriptions {
        let clusters = discover::clusters(&client, subscription)
            .await
            .map_err(listing)?;
        found += clusters.len();
        for cluster in clusters
            .iter()
            .filter(|c| args.filters.iter().all(|f| f.keeps(c)))
        {
            let mut params = Map::new();
            for (name, value) in [
                ("subscription", &cluster.subscription),
                ("resource_group", &cluster.resource_group),
                ("cluster", &cluster.name),
            ] {
                if declared.contains(&name) {
                    params.insert(name.to_owned(), Value::String(value.clone()));
                }
            }
            for param in &args.target_params {
                params.insert(
                    param.name.clone(),
                    Value::String(param.render(cluster).map_err(Failure::Usage)?),
                );
            }
            rows.push(TargetRow {
                origin: format!(
                    "cluster {}/{}/{}",
                    cluster.subscription, cluster.resource_group, cluster.name
                ),
                params,
            });
        }
    }
    crate::output::note!(
        "discovered {found} cluster{} in {} subscription{}; {} match{}",
        if found == 1 { "" } else { "s" },
        subscriptions.len(),
        if subscriptions.len() == 1 { "" } else { "s" },
        rows.len(),
        if rows.len() == 1 { "es" } else { "" },
    );
    if rows.is_empty() {
        return Err(Failure::Usage(
            "no cluster matched: nothing to do (check `--subscription` and `--where`)".into(),
        ));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> DiscoveredCluster {
        DiscoveredCluster {
            subscription: "s1".into(),
            resource_group: "rg-a".into(),
            name: name.into(),
            location: "eastus".into(),
            kubernetes_version: "1.33.2".into(),
            tags: serde_json::json!({"Env": "prod"})
                .as_object()
                .unwrap()
                .clone(),
            kms: discover::KmsMode::Pmk,
        }
    }

    #[test]
    fn filters_keep_what_they_name() {
        let aks = cluster("AKS-Prod-7");
        let keeps = |f: &str| f.parse::<Filter>().unwrap().keeps(&aks);
        assert!(keeps("tag:env=prod"));
        assert!(!keeps("tag:env=Prod"), "tag values compare exactly");
        assert!(keeps("name=aks-prod-*"));
        assert!(keeps("name=*-?"));
        assert!(!keeps("name=aks-dev-*"));
        assert!(keeps("location=EastUS"));
        assert!(keeps("version=1.33*"));
        assert!(!keeps("version=1.32*"));
        assert!(keeps("kms=pmk"));
        assert!(!keeps("kms=CMK"));
        assert!("kms=maybe".parse::<Filter>().is_err());
        assert!("colour=blue".parse::<Filter>().is_err());
        assert!("name".parse::<Filter>().is_err());
    }

    #[test]
    fn globs_match_without_backtracking_blowups() {
        assert!(matches_glob("a*b*c", "axxbyyc"));
        assert!(!matches_glob("a*b*c", "axxbyy"));
        assert!(matches_glob("*", ""));
        let long = "a".repeat(5_000);
        assert!(!matches_glob(&format!("{}b", "*a".repeat(50)), &long));
    }

    #[test]
    fn a_discovery_is_kept_as_the_text_it_was_given_in() {
        let spec = DiscoverSpec {
            subscriptions: vec!["s1".into()],
            filters: vec!["tag:env=prod".parse().unwrap(), "kms=pmk".parse().unwrap()],
            target_params: vec!["key_vault=kv-{{cluster}}".parse().unwrap()],
        };
        let stored = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            stored["filters"],
            serde_json::json!(["tag:env=prod", "kms=PMK"])
        );
        assert_eq!(
            serde_json::from_value::<DiscoverSpec>(stored).unwrap(),
            spec
        );
    }

    #[test]
    fn target_params_render_the_clusters_names_only() {
        let param: TargetParam = "key_vault=kv-{{cluster}}-{{ location }}".parse().unwrap();
        assert_eq!(param.render(&cluster("aks-1")).unwrap(), "kv-aks-1-eastus");
        assert!("key_vault=kv-{{params.x}}".parse::<TargetParam>().is_err());
        assert!("key_vault=kv-{{cluster".parse::<TargetParam>().is_err());
        assert!("=x".parse::<TargetParam>().is_err());
    }
}
