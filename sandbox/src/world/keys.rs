//! Keys: the Key Vault data plane, keys read through ARM, versions, soft delete.

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeyVersion {
    pub(crate) version: String,
    pub(crate) body: Value,
}

impl World {
    /// Seeds a key (one version) in a seeded vault; returns its versionless id.
    pub fn seed_key(&mut self, vault_name: &str, key_name: &str) -> Option<String> {
        let vault = self.find_vault(vault_name)?.clone();
        let vault_uri = vault["properties"]["vaultUri"]
            .as_str()?
            .trim_end_matches('/')
            .to_owned();
        self.new_key_version(
            &vault_uri,
            &vault_name.to_ascii_lowercase(),
            key_name,
            &json!({"kty": "RSA"}),
        );
        Some(format!("{vault_uri}/keys/{key_name}"))
    }

    /// Seeds a key version with some attributes (`created`, `exp`, `enabled`) as given.
    pub fn seed_key_with(
        &mut self,
        vault_name: &str,
        key_name: &str,
        attributes: &Value,
    ) -> Option<String> {
        let id = self.seed_key(vault_name, key_name)?;
        let versions = self.keys.get_mut(&(
            vault_name.to_ascii_lowercase(),
            key_name.to_ascii_lowercase(),
        ))?;
        let latest = versions.last_mut()?;
        if let (Some(target), Some(changes)) = (
            latest.body["attributes"].as_object_mut(),
            attributes.as_object(),
        ) {
            for (key, value) in changes {
                target.insert(key.clone(), value.clone());
            }
        }
        Some(id)
    }

    /// Seeds a rotation policy on a key.
    pub fn seed_rotation_policy(&mut self, vault_name: &str, key_name: &str, policy: Value) {
        self.rotation_policies.insert(
            (
                vault_name.to_ascii_lowercase(),
                key_name.to_ascii_lowercase(),
            ),
            policy,
        );
    }

    /// Handles a Key Vault data-plane request: `/_kv/{vault}/keys/...`.
    pub fn key_vault(&mut self, req: &Req, caller: &str) -> Resp {
        let now = Instant::now();
        if req.query.get("api-version").is_none_or(|v| v.is_empty()) {
            return Resp::vault_error(400, "BadParameter", None, "api-version is required");
        }
        let version = req.query["api-version"].as_str();
        if !api_versions::KEY_VAULT_DATA.contains(&version) {
            return Resp::vault_error(
                400,
                "BadParameter",
                None,
                format!(
                    "The specified version ({version}) is not recognized. Consider using the latest supported version (7.6)."
                ),
            );
        }
        let vault_name = req.segments[1].clone();
        let Some(vault) = self.find_vault(&vault_name).cloned() else {
            // The vault's host does not resolve: what a client sees is a connection error, but
            // on loopback the nearest honest answer is 404.
            return Resp::vault_error(
                404,
                "VaultNotFound",
                None,
                format!("The vault '{vault_name}' does not exist."),
            );
        };
        // The envelopes of both denials are Key Vault's own (fidelity audit, row 20).
        if vault["properties"]["publicNetworkAccess"] == "Disabled" {
            return Resp::vault_error(
                403,
                "Forbidden",
                Some("ForbiddenByConnection"),
                "Public network access is disabled and request is not from a trusted service nor via an approved private link.",
            );
        }
        let acls = &vault["properties"]["networkAcls"];
        if acls["defaultAction"] == "Deny"
            && !acls["ipRules"].as_array().is_some_and(|r| {
                r.iter().any(|ip| {
                    ip["value"]
                        .as_str()
                        .is_some_and(|v| v.starts_with("127.0.0.1"))
                })
            })
        {
            return Resp::vault_error(403, "Forbidden", Some("ForbiddenByFirewall"), "Client address is not authorized and caller is not a trusted service.\r\nClient address: 127.0.0.1\r\nCaller: appid=sandbox;oid=".to_owned() + caller);
        }
        if vault["properties"]["enableRbacAuthorization"] != true {
            return Resp::vault_error(
                403,
                "Forbidden",
                Some("AccessDenied"),
                "The user, group or application does not have keys permissions on key vault; the vault uses access policies, and kmsflow expects RBAC authorization.",
            );
        }
        let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
        let write = req.method != "GET";
        let needed = if write {
            KeyRights::Manage
        } else {
            KeyRights::Read
        };
        let vault_id = vault["id"].as_str().unwrap_or_default().to_owned();
        // `/_kv/{vault}/keys/{key}/...` and `/_kv/{vault}/deletedkeys/{key}/...` name a key.
        let key = s
            .get(3)
            .copied()
            .filter(|_| matches!(s.get(2), Some(&"keys" | &"deletedkeys")));
        // Key Vault's RBAC denials always carry the propagation sentence (audit, row 20), whether
        // or not a grant is on its way.
        if self
            .holds_key_rights(caller, &vault_id, key, needed, now)
            .is_err()
        {
            let detail = " If role assignments, deny assignments or role definitions were changed recently, please observe propagation time.";
            return Resp::vault_error(
                403,
                "Forbidden",
                Some("ForbiddenByRbac"),
                format!(
                    "Caller is not authorized to perform action on resource.{detail}\r\nCaller: oid={caller}\r\nAction: 'Microsoft.KeyVault/vaults/keys/{}'\r\nResource: '{}'\r\nDecisionReason: 'DeniedWithNoValidRBAC'",
                    if write { "create/action" } else { "read" },
                    vault_id.to_ascii_lowercase()
                ),
            );
        }
        let vault_uri = vault["properties"]["vaultUri"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        match (req.method.as_str(), &s[2..]) {
            ("POST", ["keys", key, "create"]) => {
                if !name_ok(key, 1, 127, |c| c.is_ascii_alphanumeric() || c == '-') {
                    return Resp::vault_error(
                        400,
                        "BadParameter",
                        None,
                        format!("The key name '{key}' is invalid."),
                    );
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let kty = body["kty"].as_str().unwrap_or_default();
                if !["RSA", "RSA-HSM", "EC", "EC-HSM"].contains(&kty) {
                    return Resp::vault_error(
                        400,
                        "BadParameter",
                        None,
                        "The key type (kty) is missing or not supported.",
                    );
                }
                if self
                    .deleted_keys
                    .contains_key(&(vault_name.clone(), key.to_string()))
                {
                    return Resp::vault_error(
                        409,
                        "Conflict",
                        Some("ObjectIsDeletedButRecoverable"),
                        format!(
                            "Key {} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged.",
                            req.raw_segments[3]
                        ),
                    );
                }
                let bundle =
                    self.new_key_version(&vault_uri, &vault_name, &req.raw_segments[3], &body);
                Resp::json(200, bundle)
            }
            ("GET", ["deletedkeys", key]) => {
                match self
                    .deleted_keys
                    .get(&(vault_name.clone(), key.to_string()))
                {
                    Some((at, versions)) => Resp::json(
                        200,
                        deleted_bundle(&vault_uri, &req.raw_segments[3], *at, versions),
                    ),
                    None => deleted_key_not_found(key),
                }
            }
            ("POST", ["deletedkeys", key, "recover"]) => {
                match self
                    .deleted_keys
                    .remove(&(vault_name.clone(), key.to_string()))
                {
                    Some((_, versions)) => {
                        let latest = versions
                            .last()
                            .map(|v| v.body.clone())
                            .unwrap_or(Value::Null);
                        self.keys.insert((vault_name, key.to_string()), versions);
                        Resp::json(200, latest)
                    }
                    None => deleted_key_not_found(key),
                }
            }
            ("DELETE", ["deletedkeys", key]) => {
                match self.deleted_keys.remove(&(vault_name, key.to_string())) {
                    Some(_) => Resp::empty(204),
                    None => deleted_key_not_found(key),
                }
            }
            ("POST", ["keys", key, "rotate"]) => {
                let Some(latest) = self
                    .keys
                    .get(&(vault_name.clone(), key.to_string()))
                    .and_then(|v| v.last())
                    .cloned()
                else {
                    return key_not_found(key);
                };
                let template = json!({"kty": latest.body["key"]["kty"], "key_ops": latest.body["key"]["key_ops"], "tags": latest.body["tags"]});
                let bundle =
                    self.new_key_version(&vault_uri, &vault_name, &req.raw_segments[3], &template);
                Resp::json(200, bundle)
            }
            ("GET", ["keys", key, "versions"]) => {
                match self.keys.get(&(vault_name.clone(), key.to_string())) {
                    Some(versions) => Resp::json(
                        200,
                        json!({
                            "value": versions.iter().map(|v| json!({"kid": v.body["key"]["kid"], "attributes": v.body["attributes"], "tags": v.body["tags"]})).collect::<Vec<_>>(),
                            "nextLink": null,
                        }),
                    ),
                    None => key_not_found(key),
                }
            }
            ("PUT", ["keys", key, "rotationpolicy"]) => {
                if !self
                    .keys
                    .contains_key(&(vault_name.clone(), key.to_string()))
                {
                    return key_not_found(key);
                }
                let body = req.body.clone().unwrap_or(json!({}));
                let unix = unix_now();
                let policy = json!({
                    "id": format!("{vault_uri}/keys/{}/rotationpolicy", req.raw_segments[3]),
                    "lifetimeActions": body.get("lifetimeActions").cloned().unwrap_or(json!([])),
                    "attributes": {"expiryTime": body["attributes"]["expiryTime"], "created": unix, "updated": unix},
                });
                self.rotation_policies
                    .insert((vault_name, key.to_string()), policy.clone());
                Resp::json(200, policy)
            }
            ("GET", ["keys", key, "rotationpolicy"]) => {
                if !self
                    .keys
                    .contains_key(&(vault_name.clone(), key.to_string()))
                {
                    return key_not_found(key);
                }
                match self.rotation_policies.get(&(vault_name, key.to_string())) {
                    Some(policy) => Resp::json(200, policy.clone()),
                    // A key without a policy answers with the service's default: notify only.
                    None => Resp::json(
                        200,
                        json!({
                            "id": format!("{vault_uri}/keys/{}/rotationpolicy", req.raw_segments[3]),
                            "lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}],
                            "attributes": {},
                        }),
                    ),
                }
            }
            ("DELETE", ["keys", key]) => {
                match self.keys.remove(&(vault_name.clone(), key.to_string())) {
                    Some(versions) => {
                        self.rotation_policies
                            .remove(&(vault_name.clone(), key.to_string()));
                        // Soft-deleted, as every key in Key Vault: recoverable until purged.
                        let at = unix_now();
                        let bundle =
                            deleted_bundle(&vault_uri, &req.raw_segments[3], at, &versions);
                        self.deleted_keys
                            .insert((vault_name, key.to_string()), (at, versions));
                        Resp::json(200, bundle)
                    }
                    None => key_not_found(key),
                }
            }
            ("GET", ["keys", key]) => match self
                .keys
                .get(&(vault_name, key.to_string()))
                .and_then(|v| v.last())
            {
                Some(latest) => Resp::json(200, latest.body.clone()),
                None => key_not_found(key),
            },
            ("GET", ["keys", key, version]) => match self
                .keys
                .get(&(vault_name, key.to_string()))
                .and_then(|v| v.iter().find(|k| k.version == *version))
            {
                Some(found) => Resp::json(200, found.body.clone()),
                None => key_not_found(key),
            },
            _ => Resp::vault_error(
                400,
                "BadParameter",
                None,
                format!(
                    "{} {} is not an operation the sandbox's Key Vault serves.",
                    req.method, req.path
                ),
            ),
        }
    }

    /// The management-plane keys API (`Keys_Get`, `Keys_CreateIfNotExist`): through ARM, so
    /// the vault's firewall does not apply; a PUT never adds a version to an existing key.
    pub(crate) fn management_key(&mut self, req: &Req, vault_name: &str, key_name: &str) -> Resp {
        let lower = req.path.to_ascii_lowercase();
        let vault_key = lower.split("/keys/").next().unwrap_or_default().to_owned();
        let Some(vault) = self.resources.get(&vault_key).cloned() else {
            return not_found(
                "Microsoft.KeyVault/vaults",
                &req.raw_segments[7],
                &req.raw_segments[3],
            );
        };
        let vault_uri = vault["properties"]["vaultUri"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        // Key Vault's provider answers key reads and creates with the caller's own data-plane
        // rights: without them ARM says 400 ForbiddenByRbac (fidelity audit, row 3). The
        // firewall does not apply (ARM is a trusted caller).
        let needed = if req.method == "GET" {
            KeyRights::Read
        } else {
            KeyRights::Manage
        };
        let vault_id = vault["id"].as_str().unwrap_or_default().to_owned();
        if self
            .holds_key_rights(
                &req.caller,
                &vault_id,
                Some(key_name),
                needed,
                Instant::now(),
            )
            .is_err()
        {
            return Resp::arm_error(
                400,
                "ForbiddenByRbac",
                format!(
                    "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: name=KeyVault/ManagementPlane;oid={}\r\nVault: {vault_name};location={}\r\nAction: 'Microsoft.KeyVault/vaults/keys/{}'",
                    req.caller,
                    vault["location"].as_str().unwrap_or_default(),
                    if req.method == "GET" { "read" } else { "write" },
                ),
            );
        }
        let key = (vault_name.to_owned(), key_name.to_owned());
        match req.method.as_str() {
            "PUT" if !self.keys.contains_key(&key) => {
                let body = req.body.clone().unwrap_or(Value::Null);
                let kty = body["properties"]["kty"]
                    .as_str()
                    .unwrap_or("RSA")
                    .to_owned();
                self.new_key_version(
                    &vault_uri,
                    vault_name,
                    &req.raw_segments[9],
                    &json!({"kty": kty}),
                );
            }
            "PUT" | "GET" => {}
            _ => return method_not_allowed(req),
        }
        let Some(latest) = self.keys.get(&key).and_then(|v| v.last()) else {
            return Resp::arm_error(
                404,
                "ResourceNotFound",
                format!(
                    "The key '{}' was not found in vault '{}'.",
                    req.raw_segments[9], req.raw_segments[7]
                ),
            );
        };
        let kid = latest.body["key"]["kid"].as_str().unwrap_or_default();
        let name = kid
            .split("/keys/")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or(key_name)
            .to_owned();
        Resp::json(
            200,
            json!({
                "id": format!("{}/keys/{name}", vault["id"].as_str().unwrap_or_default()),
                "name": name,
                "type": "Microsoft.KeyVault/vaults/keys",
                "location": vault["location"],
                "properties": {
                    "attributes": latest.body["attributes"],
                    "kty": latest.body["key"]["kty"],
                    "keyOps": latest.body["key"]["key_ops"],
                    "keySize": 2048,
                    "keyUri": format!("{vault_uri}/keys/{name}"),
                    "keyUriWithVersion": kid,
                    "rotationPolicy": self.rotation_policies.get(&key).map(|p| json!({
                        "lifetimeActions": p["lifetimeActions"],
                        "attributes": p["attributes"],
                    })),
                },
            }),
        )
    }

    pub(crate) fn new_key_version(
        &mut self,
        vault_uri: &str,
        vault: &str,
        key_name: &str,
        request: &Value,
    ) -> Value {
        let version = uuid::Uuid::new_v4().simple().to_string();
        let unix = unix_now();
        let mut attributes = json!({"enabled": true, "created": unix, "updated": unix, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90});
        if let Some(exp) = request["attributes"]["exp"].as_i64() {
            attributes["exp"] = json!(exp);
        }
        if let Some(enabled) = request["attributes"]["enabled"].as_bool() {
            attributes["enabled"] = json!(enabled);
        }
        let mut key = json!({
            "kid": format!("{vault_uri}/keys/{key_name}/{version}"),
            "kty": request["kty"],
            "key_ops": request.get("key_ops").cloned().unwrap_or(json!(["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"])),
        });
        public_key_fields(&mut key, request);
        let bundle = json!({
            "key": key,
            "attributes": attributes,
            "tags": request.get("tags").cloned().unwrap_or(json!({})),
        });
        self.keys
            .entry((vault.to_owned(), key_name.to_ascii_lowercase()))
            .or_default()
            .push(KeyVersion {
                version,
                body: bundle.clone(),
            });
        bundle
    }
}

/// A DeletedKeyBundle: the latest version, where to recover it, and when it was deleted and
/// will be purged (90 days, the default retention).
pub(crate) fn deleted_bundle(
    vault_uri: &str,
    key: &str,
    deleted_at: i64,
    versions: &[KeyVersion],
) -> Value {
    let latest = versions
        .last()
        .map(|v| v.body.clone())
        .unwrap_or(Value::Null);
    json!({
        "recoveryId": format!("{vault_uri}/deletedkeys/{key}"),
        "deletedDate": deleted_at,
        "scheduledPurgeDate": deleted_at + 90 * 86_400,
        "key": latest["key"],
        "attributes": latest["attributes"],
        "tags": latest["tags"],
    })
}

pub(crate) fn deleted_key_not_found(key: &str) -> Resp {
    Resp::vault_error(
        404,
        "KeyNotFound",
        None,
        format!("Deleted Key not found: {key}"),
    )
}

pub(crate) fn key_not_found(key: &str) -> Resp {
    Resp::vault_error(
        404,
        "KeyNotFound",
        None,
        format!("A key with (name/id) {key} was not found in this key vault."),
    )
}

/// A JSON Web Key's public fields, base64url without padding as Key Vault writes them: `n`
/// and `e` for RSA (`n` as long as `key_size` asks, top bit set), `crv`, `x` and `y` for EC.
/// The bytes are random, not a key pair: the sandbox performs no cryptography, and a client
/// that encrypts with this `n` gets nothing the sandbox could decrypt.
pub(crate) fn public_key_fields(key: &mut Value, request: &Value) {
    use base64::Engine as _;
    let encode = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let random = |len: usize| (0..len).map(|_| fastrand::u8(..)).collect::<Vec<u8>>();
    let kty = request["kty"].as_str().unwrap_or("RSA");
    if kty.starts_with("EC") {
        let curve = request["crv"].as_str().unwrap_or("P-256").to_owned();
        let size = match curve.as_str() {
            "P-384" => 48,
            "P-521" => 66,
            _ => 32,
        };
        key["crv"] = json!(curve);
        key["x"] = json!(encode(random(size)));
        key["y"] = json!(encode(random(size)));
    } else {
        let bits = request["key_size"]
            .as_u64()
            .unwrap_or(2048)
            .clamp(1024, 4096) as usize;
        let mut modulus = random(bits / 8);
        modulus[0] |= 0x80;
        key["n"] = json!(encode(modulus));
        key["e"] = json!("AQAB");
    }
}
