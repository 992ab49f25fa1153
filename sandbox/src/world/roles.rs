//! Role assignments and the built-in role definitions they name.

use super::*;

/// Built-in role definitions the sandbox knows, by GUID.
pub const ROLES: &[(&str, &str)] = &[
    (
        "14b46e9e-c2b7-41b4-b07b-48a6ebf60603",
        "Key Vault Crypto Officer",
    ),
    (
        "12338af0-0e69-4776-bea7-57ae8d297424",
        "Key Vault Crypto User",
    ),
    (
        "f25e0fa2-a7c8-4377-a976-54943a77a395",
        "Key Vault Contributor",
    ),
    ("21090545-7ca7-4776-b22c-e363652d74d2", "Key Vault Reader"),
    (
        "8b54135c-b56d-4d72-a534-26097cfdc8d8",
        "Key Vault Data Access Administrator",
    ),
    ("b24988ac-6180-42a0-ab88-20f7382dd24c", "Contributor"),
    ("acdd72a7-3385-48ef-bd42-f606fba81ae7", "Reader"),
];

pub(crate) const CRYPTO_OFFICER: &str = "14b46e9e-c2b7-41b4-b07b-48a6ebf60603";

pub(crate) const CRYPTO_USER: &str = "12338af0-0e69-4776-bea7-57ae8d297424";

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
                if !ROLES.iter().any(|(guid, _)| *guid == role) {
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

    pub(crate) fn list_assignments(&self, scope: &str, req: &Req) -> Resp {
        let scope_key = scope.to_ascii_lowercase();
        let principal_filter = req.query.get("$filter").and_then(|f| {
            let rest = f.strip_prefix("principalId eq '")?;
            Some(rest.trim_end_matches('\'').to_owned())
        });
        let value: Vec<Value> = self
            .assignments
            .values()
            .filter(|a| a.scope == scope_key || scope_key.starts_with(&format!("{}/", a.scope)))
            .filter(|a| principal_filter.as_ref().is_none_or(|p| *p == a.principal))
            .map(|a| a.body.clone())
            .collect();
        Resp::json(200, json!({"value": value}))
    }

    /// Whether `principal` holds one of `roles` on the vault (or a scope above it), and the
    /// assignment has propagated.
    pub(crate) fn holds_role(
        &self,
        principal: &str,
        vault_id: &str,
        roles: &[&str],
        now: Instant,
    ) -> Result<(), bool> {
        let vault_key = vault_id.to_ascii_lowercase();
        let mut pending = false;
        for a in self.assignments.values() {
            let covers = vault_key == a.scope || vault_key.starts_with(&format!("{}/", a.scope));
            if covers && a.principal == principal && roles.contains(&a.role.as_str()) {
                if now >= a.created + self.delays.rbac_propagation {
                    return Ok(());
                }
                pending = true;
            }
        }
        Err(pending)
    }
}
