//! Cloud profiles: where Resource Manager is, which token audiences each service takes, and
//! which host names are Key Vault's, so sovereign clouds work and a token never goes to a
//! host that is not its service's.

use serde::Deserialize;

/// One Azure cloud, as the client needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudProfile {
    pub name: String,
    /// Resource Manager's endpoint, e.g. `https://management.azure.com`.
    pub arm_endpoint: String,
    /// The scope of Resource Manager tokens, e.g. `https://management.azure.com/.default`.
    pub arm_scope: String,
    /// The scope of Key Vault data-plane tokens, e.g. `https://vault.azure.net/.default`.
    pub key_vault_scope: String,
    /// DNS suffixes of vaults (and managed HSMs), with their leading dot: a Key Vault token
    /// goes only to hosts under one of them.
    pub key_vault_suffixes: Vec<String>,
    /// The scope of Azure Database for PostgreSQL tokens, for a state database signed in to
    /// with `auth=entra`, e.g. `https://ossrdbms-aad.database.windows.net/.default` (the
    /// Azure CLI's `ossrdbms_resource_id` of each cloud).
    #[serde(default)]
    pub postgres_scope: Option<String>,
    /// Set for a sandbox served with TLS (`kmsflow sandbox serve --tls` writes such a
    /// profile): how its host names are reached without touching `/etc/hosts`.
    #[serde(default)]
    pub sandbox: Option<SandboxRoute>,
}

/// A sandbox's host names (Resource Manager's and the vault hosts under the profile's
/// suffixes) resolve to `address`, which must be loopback, and the certificate authority in
/// `ca_file` is trusted besides the system's. No other name is affected.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRoute {
    pub address: std::net::SocketAddr,
    pub ca_file: std::path::PathBuf,
}

impl CloudProfile {
    /// Azure's public cloud.
    pub fn public() -> CloudProfile {
        CloudProfile::known(
            "AzurePublicCloud",
            "https://management.azure.com",
            "https://vault.azure.net",
            "https://ossrdbms-aad.database.windows.net",
            &[".vault.azure.net", ".managedhsm.azure.net"],
        )
    }

    /// Azure Government.
    pub fn us_government() -> CloudProfile {
        CloudProfile::known(
            "AzureUSGovernment",
            "https://management.usgovcloudapi.net",
            "https://vault.usgovcloudapi.net",
            "https://ossrdbms-aad.database.usgovcloudapi.net",
            &[".vault.usgovcloudapi.net", ".managedhsm.usgovcloudapi.net"],
        )
    }

    /// Azure operated by 21Vianet.
    pub fn china() -> CloudProfile {
        CloudProfile::known(
            "AzureChinaCloud",
            "https://management.chinacloudapi.cn",
            "https://vault.azure.cn",
            "https://ossrdbms-aad.database.chinacloudapi.cn",
            &[".vault.azure.cn", ".managedhsm.azure.cn"],
        )
    }

    fn known(
        name: &str,
        arm: &str,
        vault: &str,
        postgres: &str,
        suffixes: &[&str],
    ) -> CloudProfile {
        CloudProfile {
            name: name.to_owned(),
            arm_endpoint: arm.to_owned(),
            arm_scope: format!("{arm}/.default"),
            key_vault_scope: format!("{vault}/.default"),
            key_vault_suffixes: suffixes.iter().map(|s| (*s).to_owned()).collect(),
            postgres_scope: Some(format!("{postgres}/.default")),
            sandbox: None,
        }
    }

    /// A profile by name (`AzurePublicCloud`, `AzureUSGovernment`, `AzureChinaCloud`, in any
    /// case), or read from a JSON file with this type's fields.
    pub fn named_or_file(given: &str) -> Result<CloudProfile, String> {
        let known = [
            CloudProfile::public(),
            CloudProfile::us_government(),
            CloudProfile::china(),
        ];
        if let Some(profile) = known.iter().find(|p| p.name.eq_ignore_ascii_case(given)) {
            return Ok(profile.clone());
        }
        let path = std::path::Path::new(given);
        if !path.exists() {
            return Err(format!(
                "unknown cloud `{given}`: use AzurePublicCloud, AzureUSGovernment, AzureChinaCloud, or a JSON profile file"
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the cloud profile `{given}`: {e}"))?;
        let profile: CloudProfile = serde_json::from_str(&text)
            .map_err(|e| format!("invalid cloud profile `{given}`: {e}"))?;
        if profile
            .key_vault_suffixes
            .iter()
            .any(|s| !s.starts_with('.') || s.len() < 3)
        {
            return Err(format!(
                "invalid cloud profile `{given}`: each Key Vault suffix starts with a dot, e.g. `.vault.azure.net`"
            ));
        }
        if let Some(route) = &profile.sandbox
            && !route.address.ip().is_loopback()
        {
            return Err(format!(
                "invalid cloud profile `{given}`: a sandbox route must be a loopback address, not {}",
                route.address
            ));
        }
        Ok(profile)
    }

    /// Whether `host` is a Key Vault host of this cloud.
    pub fn is_key_vault_host(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.key_vault_suffixes
            .iter()
            .any(|suffix| host.ends_with(&suffix.to_ascii_lowercase()) && host.len() > suffix.len())
    }
}

/// Resolves the sandbox's names to its address and every other name as the system does.
#[derive(Debug)]
pub(crate) struct SandboxResolver {
    /// Exact host names (Resource Manager's), lowercase.
    hosts: Vec<String>,
    /// Suffixes (with their leading dot) whose hosts are the sandbox's, lowercase.
    suffixes: Vec<String>,
    address: std::net::SocketAddr,
}

impl SandboxResolver {
    pub(crate) fn new(profile: &CloudProfile, arm_host: Option<&str>) -> Option<SandboxResolver> {
        let route = profile.sandbox.as_ref()?;
        Some(SandboxResolver {
            hosts: arm_host.map(str::to_ascii_lowercase).into_iter().collect(),
            suffixes: profile
                .key_vault_suffixes
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            address: route.address,
        })
    }

    fn is_sandboxed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.hosts.contains(&host)
            || self
                .suffixes
                .iter()
                .any(|s| host.ends_with(s.as_str()) && host.len() > s.len())
    }
}

impl reqwest::dns::Resolve for SandboxResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let sandbox = self.is_sandboxed(&host).then_some(self.address);
        Box::pin(async move {
            let addresses: reqwest::dns::Addrs = match sandbox {
                Some(address) => Box::new(std::iter::once(address)),
                None => Box::new(
                    tokio::net::lookup_host((host.as_str(), 0))
                        .await?
                        .collect::<Vec<_>>()
                        .into_iter(),
                ),
            };
            Ok(addresses)
        })
    }
}

impl Default for CloudProfile {
    fn default() -> Self {
        CloudProfile::public()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_vault_hosts_are_the_clouds_own() {
        let public = CloudProfile::public();
        assert!(public.is_key_vault_host("kv-1.vault.azure.net"));
        assert!(public.is_key_vault_host("KV-1.Vault.Azure.Net"));
        assert!(!public.is_key_vault_host("vault.azure.net"));
        assert!(!public.is_key_vault_host("kv-1.vault.azure.net.evil.example"));
        assert!(!public.is_key_vault_host("evilvault.azure.net"));
        assert!(!public.is_key_vault_host("kv-1.vault.usgovcloudapi.net"));
        assert!(CloudProfile::us_government().is_key_vault_host("kv-1.vault.usgovcloudapi.net"));
        assert_eq!(
            CloudProfile::named_or_file("azurechinacloud")
                .unwrap()
                .key_vault_scope,
            "https://vault.azure.cn/.default"
        );
        assert!(CloudProfile::named_or_file("AzureGermanCloud").is_err());
    }
}
