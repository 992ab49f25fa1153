//! Role assignments and the built-in role definitions they name.

use super::*;

/// What a role lets its holder do with a vault's keys through the data plane, in increasing
/// order: each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum KeyRights {
    None,
    /// Read keys' metadata (`keys/read`).
    Read,
    /// Read, and encrypt and decrypt with them: what AKS's KMS plugin does.
    Crypto,
    /// Everything on keys: create, rotate, delete, recover, rotation policies.
    Manage,
}

/// A built-in role definition: its GUID (the same in every tenant), name and what it grants.
pub(crate) struct BuiltIn {
    pub(crate) id: &'static str,
    pub(crate) name: &'static str,
    pub(crate) description: &'static str,
    pub(crate) keys: KeyRights,
}

const fn role(
    id: &'static str,
    name: &'static str,
    description: &'static str,
    keys: KeyRights,
) -> BuiltIn {
    BuiltIn {
        id,
        name,
        description,
        keys,
    }
}

/// The built-in roles a KMS flow can meet (GUIDs and names from Azure's built-in roles list).
/// Key rights follow each role's data actions; the management-plane roles (Owner,
/// Contributor, Key Vault Contributor) grant none, as in Azure.
pub(crate) const BUILT_IN: &[BuiltIn] = &[
    role(
        "8e3af657-a8ff-443c-a75c-2fe8c4bcb635",
        "Owner",
        "Grants full access to manage all resources, including the ability to assign roles in Azure RBAC.",
        KeyRights::None,
    ),
    role(
        "b24988ac-6180-42a0-ab88-20f7382dd24c",
        "Contributor",
        "Grants full access to manage all resources, but does not allow you to assign roles in Azure RBAC.",
        KeyRights::None,
    ),
    role(
        "acdd72a7-3385-48ef-bd42-f606fba81ae7",
        "Reader",
        "View all resources, but does not allow you to make any changes.",
        KeyRights::None,
    ),
    role(
        "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9",
        "User Access Administrator",
        "Lets you manage user access to Azure resources.",
        KeyRights::None,
    ),
    role(
        "00482a5a-887f-4fb3-b363-3b7fe8e74483",
        "Key Vault Administrator",
        "Perform all data plane operations on a key vault and all objects in it, including certificates, keys, and secrets.",
        KeyRights::Manage,
    ),
    role(
        CRYPTO_OFFICER,
        "Key Vault Crypto Officer",
        "Perform any action on the keys of a key vault, except manage permissions.",
        KeyRights::Manage,
    ),
    role(
        CRYPTO_USER,
        "Key Vault Crypto User",
        "Perform cryptographic operations using keys.",
        KeyRights::Crypto,
    ),
    // Its data actions are keys/read, wrapKey and unwrapKey, not encrypt and decrypt.
    role(
        "e147488a-f6f5-4113-8e2d-b22465e65bf6",
        "Key Vault Crypto Service Encryption User",
        "Read metadata of keys and perform wrap/unwrap operations.",
        KeyRights::Read,
    ),
    role(
        "21090545-7ca7-4776-b22c-e363652d74d2",
        "Key Vault Reader",
        "Read metadata of key vaults and its certificates, keys, and secrets.",
        KeyRights::Read,
    ),
    role(
        "f25e0fa2-a7c8-4377-a976-54943a77a395",
        "Key Vault Contributor",
        "Manage key vaults, but does not allow you to assign roles in Azure RBAC, and does not allow you to access secrets, keys, or certificates.",
        KeyRights::None,
    ),
    role(
        "8b54135c-b56d-4d72-a534-26097cfdc8d8",
        "Key Vault Data Access Administrator",
        "Manage access to Azure Key Vault by adding or removing role assignments for the Key Vault Administrator, Key Vault Certificates Officer, Key Vault Crypto Officer, Key Vault Crypto Service Encryption User, Key Vault Crypto User, Key Vault Reader, Key Vault Secrets Officer, or Key Vault Secrets User roles.",
        KeyRights::None,
    ),
    role(
        "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
        "Key Vault Secrets Officer",
        "Perform any action on the secrets of a key vault, except manage permissions.",
        KeyRights::None,
    ),
    role(
        "4633458b-17de-408a-b874-0445c86b69e6",
        "Key Vault Secrets User",
        "Read secret contents.",
        KeyRights::None,
    ),
    role(
        "f1a07417-d97a-45cb-824c-7a7467783830",
        "Managed Identity Operator",
        "Read and Assign User Assigned Identity",
        KeyRights::None,
    ),
    role(
        "e40ec5ca-96e0-45a2-b4ff-59039f2c2b59",
        "Managed Identity Contributor",
        "Create, Read, Update, and Delete User Assigned Identity",
        KeyRights::None,
    ),
    role(
        "ed7f3fbd-7b88-4dd4-9017-9adb7ce333f8",
        "Azure Kubernetes Service Contributor Role",
        "Grants access to read and write Azure Kubernetes Service clusters",
        KeyRights::None,
    ),
];

pub(crate) const CRYPTO_OFFICER: &str = "14b46e9e-c2b7-41b4-b07b-48a6ebf60603";

pub(crate) const CRYPTO_USER: &str = "12338af0-0e69-4776-bea7-57ae8d297424";

pub(crate) fn built_in(id: &str) -> Option<&'static BuiltIn> {
    BUILT_IN.iter().find(|r| r.id.eq_ignore_ascii_case(id))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Assignment {
    pub(crate) body: Value,
    pub(crate) scope: String,
    pub(crate) principal: String,
    pub(crate) role: String,
    #[serde(with = "stamp")]
    pub(crate) created: Instant,
}

impl World {
    /// Seeds a role assignment, propagated long ago.
    pub fn seed_assignment(&mut self, scope: &str, principal: &str, role: &str) {
        let name = uuid();
        let id = format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}");
        let body = json!({
            "properties": {
                "roleDefinitionId": format!("/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{role}", self.subscription),
                "principalId": principal,
                "principalType": "ServicePrincipal",
                "scope": scope,
            },
            "id": id,
            "type": "Microsoft.Authorization/roleAssignments",
            "name": name,
        });
        self.assignments.insert(
            id.to_ascii_lowercase(),
            Assignment {
                body,
                scope: scope.to_ascii_lowercase(),
                principal: principal.to_owned(),
                role: role.to_ascii_lowercase(),
                created: Instant::now() - Duration::from_secs(3600),
            },
        );
    }

    pub(crate) fn role_assignment(&mut self, scope: &str, req: &Req, now: Instant) -> Resp {
        let position = req
            .segments
            .iter()
            .rposition(|s| s == "roleassignments")
            .expect("routed here");
        let name = req.raw_segments[position + 1].clone();
        let id = format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}");
        let key = id.to_ascii_lowercase();
        match req.method.as_str() {
            "GET" => match self.assignments.get(&key) {
                Some(a) => Resp::json(200, a.body.clone()),
                None => Resp::arm_error(
                    404,
                    "RoleAssignmentNotFound",
                    format!("The role assignment '{name}' is not found."),
                ),
            },
            "DELETE" => match self.assignments.remove(&key) {
                Some(a) => Resp::json(200, a.body),
                None => Resp::empty(204),
            },
            "PUT" => {
                if uuid::Uuid::parse_str(&name).is_err() {
                    return Resp::arm_error(
                        400,
                        "InvalidRoleAssignmentId",
                        format!(
                            "The role assignment ID '{name}' is not valid. The role assignment ID must be a GUID."
                        ),
                    );
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let properties = &body["properties"];
                let (Some(role_definition), Some(principal)) = (
                    properties["roleDefinitionId"].as_str(),
                    properties["principalId"].as_str(),
                ) else {
                    return Resp::arm_error(
                        400,
                        "InvalidRequest",
                        "roleDefinitionId and principalId are required.",
                    );
                };
                let role = role_definition
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if built_in(&role).is_none() {
                    return Resp::arm_error(
                        400,
                        "RoleDefinitionDoesNotExist",
                        format!("The specified role definition with ID '{role}' does not exist."),
                    );
                }
                if scope
                    .to_ascii_lowercase()
                    .contains("/providers/microsoft.keyvault/vaults/")
                    && !self.resources.contains_key(&scope.to_ascii_lowercase())
                {
                    return Resp::arm_error(
                        404,
                        "ResourceNotFound",
                        format!("The scope '{scope}' does not exist."),
                    );
                }
                if !self.principal_known(principal, now) {
                    return Resp::arm_error(
                        400,
                        "PrincipalNotFound",
                        format!(
                            "Principal {principal} does not exist in the directory {}. Check that you have the correct principal ID. If you are creating this principal and then immediately assigning a role, this error might be related to a replication delay. In this case, set the role assignment principalType property to a value, such as ServicePrincipal, User, or Group.  See https://aka.ms/docs-principaltype",
                            self.tenant
                        ),
                    );
                }
                let scope_key = scope.to_ascii_lowercase();
                if let Some(existing) = self.assignments.get(&key) {
                    if existing.principal == principal && existing.role == role {
                        return Resp::json(200, existing.body.clone());
                    }
                    return Resp::arm_error(
                        409,
                        "RoleAssignmentUpdateNotPermitted",
                        "Tenant ID, application ID, principal ID, and scope are not allowed to be updated.",
                    );
                }
                if self
                    .assignments
                    .values()
                    .any(|a| a.scope == scope_key && a.principal == principal && a.role == role)
                {
                    return Resp::arm_error(
                        409,
                        "RoleAssignmentExists",
                        "The role assignment already exists.",
                    );
                }
                let stored = json!({
                    "properties": {
                        "roleDefinitionId": role_definition,
                        "principalId": principal,
                        "principalType": properties["principalType"].as_str().unwrap_or("User"),
                        "scope": scope,
                    },
                    "id": id,
                    "type": "Microsoft.Authorization/roleAssignments",
                    "name": name,
                });
                self.assignments.insert(
                    key,
                    Assignment {
                        body: stored.clone(),
                        scope: scope_key,
                        principal: principal.to_owned(),
                        role,
                        created: now,
                    },
                );
                Resp::json(201, stored)
            }
            _ => method_not_allowed(req),
        }
    }

    /// Role Assignments - List For Scope. As in ARM: `$filter=atScope()` lists the
    /// assignments at or above the scope; no filter, or `principalId eq '{id}'` /
    /// `assignedTo('{id}')`, lists those at, above and below it (so a grant on one key shows
    /// when the vault is asked, and the caller must judge each one's scope).
    pub(crate) fn list_assignments(&self, scope: &str, req: &Req) -> Resp {
        let scope_key = scope.to_ascii_lowercase();
        let filter = req.query.get("$filter").map(|f| f.trim().to_owned());
        let principal_filter = filter.as_deref().and_then(|f| {
            let rest = f
                .strip_prefix("principalId eq '")
                .or_else(|| f.strip_prefix("assignedTo('"))?;
            Some(rest.trim_end_matches(['\'', ')']).to_owned())
        });
        let at_or_above_only = filter.as_deref() == Some("atScope()");
        // Cheapest test first, and no allocation per assignment: a world of thousands of
        // assignments answers every list in the time a real one would, not in milliseconds
        // of the CPU its client shares.
        let value: Vec<Value> = self
            .assignments
            .values()
            .filter(|a| principal_filter.as_ref().is_none_or(|p| *p == a.principal))
            .filter(|a| {
                let at_or_above = a.scope == scope_key || is_under(&scope_key, &a.scope);
                let below = is_under(&a.scope, &scope_key);
                at_or_above || (below && !at_or_above_only)
            })
            .map(|a| a.body.clone())
            .collect();
        Resp::json(200, json!({"value": value}))
    }

    /// Whether `principal` holds one of `roles` on the vault (or a scope above it), and the
    /// assignment has propagated.
    /// Whether `principal` holds `needed` on the vault's keys through an assignment at or
    /// above the vault, or on `key` itself; `Err(true)` when one would but has not
    /// propagated yet.
    pub(crate) fn holds_key_rights(
        &self,
        principal: &str,
        vault_id: &str,
        key: Option<&str>,
        needed: KeyRights,
        now: Instant,
    ) -> Result<(), bool> {
        let vault_key = vault_id.to_ascii_lowercase();
        let key_scope = key.map(|k| format!("{vault_key}/keys/{}", k.to_ascii_lowercase()));
        let mut pending = false;
        for a in self
            .assignments
            .values()
            .filter(|a| a.principal == principal)
        {
            let covers = vault_key == a.scope
                || is_under(&vault_key, &a.scope)
                || key_scope.as_ref() == Some(&a.scope);
            let grants = built_in(&a.role).map_or(KeyRights::None, |r| r.keys);
            if covers && grants >= needed {
                if now >= a.created + self.delays.rbac_propagation {
                    return Ok(());
                }
                pending = true;
            }
        }
        Err(pending)
    }
}

/// Whether `scope` lies strictly below `ancestor` (`/a/b/c` under `/a/b`, not `/a/bc`).
fn is_under(scope: &str, ancestor: &str) -> bool {
    scope
        .strip_prefix(ancestor)
        .is_some_and(|rest| rest.starts_with('/'))
}

impl World {
    /// Role Definitions - List (`$filter=roleName eq '...'` as `az role assignment create
    /// --role NAME` sends it; other filters list every definition) and Get, at any scope.
    /// Built-in definitions are the same at every scope; their ids are written under the
    /// subscription, as ARM writes them.
    pub(crate) fn role_definitions(&self, req: &Req, id: Option<&str>) -> Resp {
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        match id {
            Some(id) => match built_in(id) {
                Some(role) => Resp::json(200, self.role_definition(role)),
                None => Resp::arm_error(
                    404,
                    "RoleDefinitionDoesNotExist",
                    format!("The specified role definition with ID '{id}' does not exist."),
                ),
            },
            None => {
                let wanted = req.query.get("$filter").and_then(|f| {
                    let name = f.trim().strip_prefix("roleName eq '")?;
                    Some(name.strip_suffix('\'')?.to_owned())
                });
                let value: Vec<Value> = BUILT_IN
                    .iter()
                    // ARM compares role names without regard to case.
                    .filter(|r| {
                        wanted
                            .as_ref()
                            .is_none_or(|w| r.name.eq_ignore_ascii_case(w))
                    })
                    .map(|r| self.role_definition(r))
                    .collect();
                Resp::json(200, json!({"value": value}))
            }
        }
    }

    fn role_definition(&self, role: &BuiltIn) -> Value {
        // The key-related data actions only: the sandbox models no other data.
        let data_actions: &[&str] = match role.keys {
            KeyRights::None => &[],
            KeyRights::Read => &["Microsoft.KeyVault/vaults/keys/read"],
            KeyRights::Crypto => &[
                "Microsoft.KeyVault/vaults/keys/read",
                "Microsoft.KeyVault/vaults/keys/encrypt/action",
                "Microsoft.KeyVault/vaults/keys/decrypt/action",
                "Microsoft.KeyVault/vaults/keys/wrap/action",
                "Microsoft.KeyVault/vaults/keys/unwrap/action",
            ],
            KeyRights::Manage => &["Microsoft.KeyVault/vaults/keys/*"],
        };
        json!({
            "id": format!("/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{}", self.subscription, role.id),
            "type": "Microsoft.Authorization/roleDefinitions",
            "name": role.id,
            "properties": {
                "roleName": role.name,
                "type": "BuiltInRole",
                "description": role.description,
                "assignableScopes": ["/"],
                "permissions": [{"actions": [], "notActions": [], "dataActions": data_actions, "notDataActions": []}],
                "createdOn": "2020-01-01T00:00:00.0000000Z",
                "updatedOn": "2020-01-01T00:00:00.0000000Z",
                "createdBy": null,
                "updatedBy": null,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{get, world};

    #[test]
    fn role_definitions_are_found_by_name_and_id() {
        let mut world = world();
        let scope = "/subscriptions/sub-1/resourceGroups/g/providers/Microsoft.KeyVault/vaults/kv";
        let listed = world.arm(&get(
            &format!("{scope}/providers/Microsoft.Authorization/roleDefinitions?$filter=roleName eq 'key vault crypto user'"),
            "2022-04-01",
        ));
        let value = listed.body.unwrap()["value"].clone();
        assert_eq!(value.as_array().unwrap().len(), 1, "{value}");
        assert_eq!(value[0]["name"], "12338af0-0e69-4776-bea7-57ae8d297424");
        assert_eq!(value[0]["properties"]["roleName"], "Key Vault Crypto User");
        assert_eq!(value[0]["properties"]["type"], "BuiltInRole");
        let admin = world.arm(&get(
            "/subscriptions/sub-1/providers/Microsoft.Authorization/roleDefinitions/00482a5a-887f-4fb3-b363-3b7fe8e74483",
            "2022-04-01",
        ));
        assert_eq!(
            admin.body.unwrap()["properties"]["roleName"],
            "Key Vault Administrator"
        );
        let unknown = world.arm(&get(
            "/subscriptions/sub-1/providers/Microsoft.Authorization/roleDefinitions/00000000-0000-0000-0000-000000000000",
            "2022-04-01",
        ));
        assert_eq!(unknown.status, 404);
        assert_eq!(
            unknown.body.unwrap()["error"]["code"],
            "RoleDefinitionDoesNotExist"
        );
    }

    #[test]
    fn assignments_below_the_scope_are_listed_unless_at_scope_is_asked() {
        let mut world = world();
        let vault = "/subscriptions/sub-1/resourceGroups/g/providers/Microsoft.KeyVault/vaults/kv";
        world.seed_assignment(&format!("{vault}/keys/k"), "p1", super::CRYPTO_USER);
        world.seed_assignment("/subscriptions/sub-1", "p1", super::CRYPTO_OFFICER);
        let list = |world: &mut super::World, filter: &str| {
            let body = world
                .arm(&get(
                    &format!(
                        "{vault}/providers/Microsoft.Authorization/roleAssignments?$filter={filter}"
                    ),
                    "2022-04-01",
                ))
                .body
                .unwrap();
            body["value"].as_array().unwrap().len()
        };
        assert_eq!(list(&mut world, "principalId eq 'p1'"), 2);
        assert_eq!(list(&mut world, "atScope()"), 1);
        assert_eq!(list(&mut world, "principalId eq 'p2'"), 0);
    }
}
