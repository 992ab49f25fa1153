//! Where the sandbox's surfaces are, and so what the absolute URLs it writes say.
//!
//! Two shapes. Without TLS everything is on one origin (`http://127.0.0.1:PORT`), vaults under
//! `/_kv/{vault}/`: any HTTP client reaches it with no setup. With TLS the sandbox has Azure's
//! shapes: Resource Manager on one host name, each vault on a host of its own under a vault
//! DNS suffix, so `vaultUri`, `kid` and `keyUri` look like Key Vault's and parse in its SDKs.
//! Both names end in `.localhost`, which RFC 6761 reserves for loopback: resolvers that follow
//! it (systemd-resolved, curl, browsers) need no setup; others need the lines
//! [`Addressing::hosts_lines`] gives.

/// The host name Resource Manager answers on (with TLS).
pub const ARM_HOST: &str = "management.sandbox.localhost";
/// The DNS suffix of vault hosts (with TLS), with its leading dot, as Azure's `.vault.azure.net`.
pub const VAULT_SUFFIX: &str = ".vault.sandbox.localhost";
/// The audience Key Vault tokens carry without TLS (the public cloud's).
pub const PUBLIC_VAULT_AUDIENCE: &str = "https://vault.azure.net";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// One plain-http origin, such as `http://127.0.0.1:8080`; vaults under `/_kv/{vault}/`.
    Paths { origin: String },
    /// https on `ARM_HOST` and `{vault}` + `VAULT_SUFFIX`, on `port`.
    Hosts { port: u16 },
}

impl Addressing {
    /// Resource Manager's endpoint, without a trailing slash.
    pub fn arm_endpoint(&self) -> String {
        match self {
            Addressing::Paths { origin } => origin.clone(),
            Addressing::Hosts { port } => format!("https://{ARM_HOST}:{port}"),
        }
    }

    /// A vault's `vaultUri`: with its trailing slash, as Azure writes it.
    pub fn vault_uri(&self, vault: &str) -> String {
        let vault = vault.to_ascii_lowercase();
        match self {
            Addressing::Paths { origin } => format!("{origin}/_kv/{vault}/"),
            Addressing::Hosts { port } => format!("https://{vault}{VAULT_SUFFIX}:{port}/"),
        }
    }

    /// The audience (AAD v1 resource) of Key Vault tokens. With host names it is the vault
    /// suffix's own origin, port included: Key Vault SDKs check that the challenge's resource
    /// is a parent domain of the vault they call, port and all.
    pub fn vault_audience(&self) -> String {
        match self {
            Addressing::Paths { .. } => PUBLIC_VAULT_AUDIENCE.to_owned(),
            Addressing::Hosts { port } => {
                format!("https://{}:{port}", VAULT_SUFFIX.trim_start_matches('.'))
            }
        }
    }

    /// The vault a request's `Host` names, if it is a vault host.
    pub fn vault_of_host(&self, host: &str) -> Option<String> {
        let Addressing::Hosts { .. } = self else {
            return None;
        };
        let host = host.to_ascii_lowercase();
        let name = host.rsplit_once(':').map_or(host.as_str(), |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host.as_str()
            }
        });
        let vault = name.strip_suffix(VAULT_SUFFIX)?;
        (!vault.is_empty() && !vault.contains('.')).then(|| vault.to_owned())
    }

    /// What the URLs this sandbox wrote carry of its address: a restarted sandbox replaces an
    /// old one's with its own, so saved vault URIs and key ids point at it.
    pub fn marker(&self) -> String {
        match self {
            Addressing::Paths { origin } => origin.clone(),
            Addressing::Hosts { port } => format!("sandbox.localhost:{port}"),
        }
    }

    /// Lines for `/etc/hosts`, for clients whose resolver does not send `.localhost` to
    /// loopback; vault names must be listed one by one (hosts files have no wildcards).
    pub fn hosts_lines(&self, vaults: &[&str]) -> Vec<String> {
        match self {
            Addressing::Paths { .. } => Vec::new(),
            Addressing::Hosts { .. } => std::iter::once(ARM_HOST.to_owned())
                .chain(
                    vaults
                        .iter()
                        .map(|v| format!("{}{VAULT_SUFFIX}", v.to_ascii_lowercase())),
                )
                .map(|host| format!("127.0.0.1 {host}"))
                .collect(),
        }
    }
}

/// Whether two vault URIs name one vault: case, a trailing slash and the port aside (a key id
/// written as the seed shows it, `https://{vault}.vault.<suffix>/keys/{name}`, has no port
/// even when the sandbox listens on one).
pub fn same_vault(a: &str, b: &str) -> bool {
    fn without_port(uri: &str) -> String {
        let uri = uri.trim_end_matches('/').to_ascii_lowercase();
        let Some((scheme, rest)) = uri.split_once("://") else {
            return uri;
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    host
                } else {
                    authority
                }
            });
        format!("{scheme}://{host}/{path}")
    }
    without_port(a) == without_port(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_hosts_are_one_label_under_the_suffix() {
        let hosts = Addressing::Hosts { port: 8443 };
        assert_eq!(
            hosts.vault_of_host("KV-1.vault.sandbox.localhost:8443"),
            Some("kv-1".into())
        );
        assert_eq!(
            hosts.vault_of_host("kv-1.vault.sandbox.localhost"),
            Some("kv-1".into())
        );
        assert_eq!(hosts.vault_of_host("vault.sandbox.localhost:8443"), None);
        assert_eq!(hosts.vault_of_host("a.b.vault.sandbox.localhost"), None);
        assert_eq!(
            hosts.vault_of_host("management.sandbox.localhost:8443"),
            None
        );
        let paths = Addressing::Paths {
            origin: "http://127.0.0.1:1".into(),
        };
        assert_eq!(paths.vault_of_host("kv-1.vault.sandbox.localhost"), None);
    }

    #[test]
    fn a_key_id_without_the_port_names_the_vault() {
        let uri = Addressing::Hosts { port: 8443 }.vault_uri("kv1");
        assert!(same_vault(&uri, "https://KV1.vault.sandbox.localhost"));
        assert!(same_vault(&uri, "https://kv1.vault.sandbox.localhost:8443"));
        assert!(!same_vault(
            &uri,
            "https://kv2.vault.sandbox.localhost:8443"
        ));
        assert!(!same_vault(&uri, "https://kv1.vault.azure.net"));
        let paths = Addressing::Paths {
            origin: "http://127.0.0.1:9".into(),
        }
        .vault_uri("kv1");
        assert!(same_vault(&paths, "http://127.0.0.1:9/_kv/kv1"));
        assert!(!same_vault(&paths, "http://127.0.0.1:9/_kv/kv2"));
    }

    #[test]
    fn urls_have_azures_shapes_with_tls() {
        let hosts = Addressing::Hosts { port: 8443 };
        assert_eq!(
            hosts.vault_uri("KV1"),
            "https://kv1.vault.sandbox.localhost:8443/"
        );
        assert_eq!(
            hosts.vault_audience(),
            "https://vault.sandbox.localhost:8443"
        );
        assert_eq!(
            hosts.arm_endpoint(),
            "https://management.sandbox.localhost:8443"
        );
        assert!(hosts.vault_uri("kv1").contains(&hosts.marker()));
        assert_eq!(
            hosts.hosts_lines(&["kv1"]),
            [
                "127.0.0.1 management.sandbox.localhost",
                "127.0.0.1 kv1.vault.sandbox.localhost"
            ]
        );
    }
}
