//! Which api-versions each surface accepts, and what ARM answers for any other.
//!
//! The lists hold every version the references name for the type: the steps', core az's and
//! the official examples', the Azure SDK for Python defaults the conformance suite meets, and
//! the spec folders the REST contract (`shared/reference/azure-rest-contract.md`) saw. Real ARM
//! lists more; a version missing here that Azure accepts is a gap to fill from the provider's
//! own `apiVersions`, not a rule.

use super::*;

/// Key Vault's data plane (REST contract §2: the stable folders of `keyvault/data-plane`).
pub(crate) const KEY_VAULT_DATA: &[&str] = &[
    "7.0",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "2025-06-01",
    "2025-07-01",
];

/// The api-version AKS writes into its operation status URLs, whatever the request's (the
/// audit, row 21: Azure SDK for .NET test recordings show `2016-03-30`).
pub(crate) const AKS_OPERATIONS: &str = "2016-03-30";

/// A surface, as api-versions are registered: one resource provider, or ARM itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Surface {
    /// ARM's own: subscriptions and tenants.
    Subscriptions,
    /// `Microsoft.Resources`: resource groups, their resources, providers.
    Resources,
    Features,
    Authorization,
    KeyVault,
    ManagedIdentity,
    ContainerService,
}

impl Surface {
    /// The surface a request's path is on: the last `providers/{namespace}` pair names the
    /// provider (role assignments under a vault are `Microsoft.Authorization`'s).
    pub(crate) fn of(segments: &[String]) -> Surface {
        let at = |i: usize| segments.get(i).map(String::as_str);
        // Feature paths name the feature's provider after Microsoft.Features'.
        if at(3) == Some("microsoft.features") {
            return Surface::Features;
        }
        // `GET /subscriptions/{s}/providers/{ns}` and `POST .../{ns}/register`.
        if at(2) == Some("providers") && (segments.len() == 4 || at(4) == Some("register")) {
            return Surface::Resources;
        }
        let namespace = segments
            .windows(2)
            .rev()
            .find(|w| w[0] == "providers")
            .map(|w| w[1].as_str());
        match namespace {
            Some("microsoft.authorization") => Surface::Authorization,
            Some("microsoft.keyvault") => Surface::KeyVault,
            Some("microsoft.managedidentity") => Surface::ManagedIdentity,
            Some("microsoft.containerservice") => Surface::ContainerService,
            Some(_) => Surface::Resources,
            None if segments.len() <= 2 => Surface::Subscriptions,
            None => Surface::Resources,
        }
    }

    pub(crate) fn versions(self) -> &'static [&'static str] {
        match self {
            Surface::Subscriptions => &[
                "2016-06-01",
                "2019-06-01",
                "2019-11-01",
                "2020-01-01",
                "2021-01-01",
                "2022-12-01",
            ],
            Surface::Resources => &[
                "2019-05-10",
                "2020-06-01",
                "2021-04-01",
                "2022-09-01",
                "2023-07-01",
                "2024-03-01",
                "2024-07-01",
                "2024-11-01",
                "2025-03-01",
                "2025-04-01",
            ],
            Surface::Features => &["2015-12-01", "2021-07-01"],
            Surface::Authorization => &[
                "2015-07-01",
                "2018-01-01-preview",
                "2020-04-01-preview",
                "2022-04-01",
                "2022-05-01-preview",
            ],
            Surface::KeyVault => &[
                "2019-09-01",
                "2021-10-01",
                "2022-07-01",
                "2023-02-01",
                "2023-07-01",
                "2024-11-01",
                "2025-05-01",
                "2026-02-01",
                "2026-04-01",
                "2026-05-15",
            ],
            Surface::ManagedIdentity => &[
                "2018-11-30",
                "2023-01-31",
                "2024-11-30",
                "2026-04-30",
                "2026-05-31",
            ],
            Surface::ContainerService => &[
                "2024-09-01",
                "2025-01-01",
                "2025-04-01",
                "2025-07-01",
                "2025-10-01",
                "2026-01-01",
                "2026-02-01",
                "2026-03-01",
                "2026-08-01",
                "2025-06-02-preview",
                "2025-07-02-preview",
                "2025-08-02-preview",
                "2025-09-02-preview",
                "2025-10-02-preview",
                "2026-01-02-preview",
            ],
        }
    }

    /// Whether ARM answers an unknown version itself (`InvalidApiVersionParameter`) or after
    /// looking for a provider registration that has it (`NoRegisteredProviderFound`).
    fn is_arms_own(self) -> bool {
        matches!(
            self,
            Surface::Subscriptions
                | Surface::Resources
                | Surface::Features
                | Surface::Authorization
        )
    }
}

/// `None` if `version` is one `surface` takes; else ARM's 400 naming the supported ones.
pub(crate) fn check(surface: Surface, version: &str, req: &Req) -> Option<Resp> {
    let versions = surface.versions();
    if versions.contains(&version) {
        return None;
    }
    let status_url = req
        .segments
        .iter()
        .any(|s| s == "operations" || s == "operationresults");
    if surface == Surface::ContainerService && status_url && version == AKS_OPERATIONS {
        return None;
    }
    let supported = versions
        .iter()
        .rev()
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    Some(if surface.is_arms_own() {
        Resp::arm_error(
            400,
            "InvalidApiVersionParameter",
            format!(
                "The api-version '{version}' is invalid. The supported versions are '{supported}'."
            ),
        )
    } else {
        // The type after the last `providers/{namespace}`, as the client wrote it.
        let kind = req
            .segments
            .iter()
            .rposition(|s| s == "providers")
            .and_then(|at| req.raw_segments.get(at + 2))
            .cloned()
            .unwrap_or_default();
        Resp::arm_error(
            400,
            "NoRegisteredProviderFound",
            format!(
                "No registered resource provider found for location 'eastus' and API version '{version}' for type '{kind}'. The supported api-versions are '{supported}'."
            ),
        )
    })
}

/// Whether an AKS api-version defines `securityProfile.kubernetesResourceObjectEncryptionProfile`
/// (KMS data encryption). The stable 2026-01-01 lacks it (REST contract §2), and the Python
/// SDK's models for the stable 2026-08-01 (azure-mgmt-containerservice 41.8.0) have it. The Go
/// SDK shows it first in a preview released in September 2025, so the previews from
/// 2025-08-02-preview on are taken to have it. Both boundaries are inferred from SDKs, not
/// published.
pub(crate) fn has_kms_data_encryption(version: &str) -> bool {
    if version.ends_with("-preview") {
        version >= "2025-08-02-preview"
    } else {
        version >= "2026-08-01"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> Vec<String> {
        path.trim_matches('/')
            .split('/')
            .map(|s| s.to_ascii_lowercase())
            .collect()
    }

    #[test]
    fn the_last_provider_names_the_surface() {
        let vault = "/subscriptions/s/resourceGroups/g/providers/Microsoft.KeyVault/vaults/kv";
        assert_eq!(Surface::of(&segments(vault)), Surface::KeyVault);
        assert_eq!(
            Surface::of(&segments(&format!(
                "{vault}/providers/Microsoft.Authorization/roleAssignments/x"
            ))),
            Surface::Authorization
        );
        assert_eq!(
            Surface::of(&segments(
                "/subscriptions/s/providers/Microsoft.ContainerService/register"
            )),
            Surface::Resources
        );
        assert_eq!(
            Surface::of(&segments("/subscriptions")),
            Surface::Subscriptions
        );
        assert_eq!(
            Surface::of(&segments(
                "/subscriptions/s/providers/Microsoft.Features/providers/Microsoft.ContainerService/features/KMSPMKPreview"
            )),
            Surface::Features
        );
        assert_eq!(
            Surface::of(&segments("/subscriptions/s/resourcegroups/g")),
            Surface::Resources
        );
    }

    #[test]
    fn other_versions_are_refused_with_the_supported_list() {
        use super::super::testing::{get, world};
        let mut world = world();
        let group = world.arm(&get("/subscriptions/sub-1/resourcegroups/g", "2099-01-01"));
        assert_eq!(group.status, 400);
        let error = &group.body.unwrap()["error"];
        assert_eq!(error["code"], "InvalidApiVersionParameter");
        assert!(error["message"].as_str().unwrap().contains("2025-04-01"));
        let vault = world.arm(&get(
            "/subscriptions/sub-1/resourcegroups/g/providers/Microsoft.KeyVault/vaults/kv",
            "2099-01-01",
        ));
        let error = &vault.body.unwrap()["error"];
        assert_eq!(error["code"], "NoRegisteredProviderFound");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("for type 'vaults'")
        );
        assert!(error["message"].as_str().unwrap().contains("2025-05-01"));
        let known = world.arm(&get("/subscriptions/sub-1/resourcegroups/g", "2025-04-01"));
        assert_eq!(known.status, 404, "a known version reaches the handler");
    }

    #[test]
    fn kms_data_encryption_is_in_recent_previews_only() {
        assert!(has_kms_data_encryption("2025-10-02-preview"));
        assert!(!has_kms_data_encryption("2026-01-01"));
        assert!(has_kms_data_encryption("2026-08-01"));
        assert!(!has_kms_data_encryption("2025-06-02-preview"));
    }
}
