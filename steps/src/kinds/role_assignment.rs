use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{self, outputs, pattern};
use crate::azure::Azure;

const API: &str = "2022-04-01";

/// Built-in roles kmsflow's runbooks assign, by name.
pub const ROLES: &[(&str, &str)] = &[
    (
        "Key Vault Crypto Officer",
        "14b46e9e-c2b7-41b4-b07b-48a6ebf60603",
    ),
    (
        "Key Vault Crypto User",
        "12338af0-0e69-4776-bea7-57ae8d297424",
    ),
    (
        "Key Vault Contributor",
        "f25e0fa2-a7c8-4377-a976-54943a77a395",
    ),
    ("Key Vault Reader", "21090545-7ca7-4776-b22c-e363652d74d2"),
    (
        "Key Vault Administrator",
        "00482a5a-887f-4fb3-b363-3b7fe8e74483",
    ),
    (
        "Key Vault Data Access Administrator",
        "8b54135c-b56d-4d72-a534-26097cfdc8d8",
    ),
    ("Contributor", "b24988ac-6180-42a0-ab88-20f7382dd24c"),
    ("Reader", "acdd72a7-3385-48ef-bd42-f606fba81ae7"),
];

/// A role assignment with a deterministic name (UUIDv5 of scope, principal and role), so a
/// retry PUTs the same assignment instead of a duplicate.
pub struct RoleAssignment(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    scope: String,
    role: String,
    principal: String,
    #[serde(default)]
    principal_type: Option<String>,
}

static SPEC: KindSpec = KindSpec {
    name: "azure.role_assignment",
    summary: "Assigns a role (a built-in name such as `Key Vault Crypto Officer`, or a role definition GUID) to a principal (`me` for the caller, else an object id) at a scope (an ARM id). An equivalent assignment that already exists counts as done. A brand-new identity's `PrincipalNotFound` is retried. Rollback removes only the assignment this run created.",
    params: &[
        ParamSpec::required("scope", ValueType::String, "the ARM id to assign at (e.g. a vault's `id` output)").pattern(pattern::RESOURCE_ID),
        ParamSpec::required("role", ValueType::String, "a built-in role name or a role definition GUID"),
        ParamSpec::required("principal", ValueType::String, "`me`, or the principal's object id"),
        ParamSpec::optional("principal_type", ValueType::String, "`User`, `ServicePrincipal` (default for object ids) or `Group`; for `me`, taken from the token").one_of(&["User", "ServicePrincipal", "Group"]),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec { name: "id", description: "the assignment's ARM id" },
        OutputSpec { name: "name", description: "its name (a GUID)" },
        OutputSpec { name: "principal_id", description: "the principal's object id" },
        OutputSpec { name: "role_definition_id", description: "the role definition's GUID" },
    ]),
    may_be_irreversible: false,
};

/// The role's definition GUID.
pub fn role_guid(role: &str) -> Result<String, StepError> {
    if uuid::Uuid::parse_str(role).is_ok() {
        return Ok(role.to_ascii_lowercase());
    }
    ROLES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(role))
        .map(|(_, guid)| (*guid).to_owned())
        .ok_or_else(|| {
            StepError::permanent(format!(
                "unknown role `{role}`; use a role definition GUID or one of: {}",
                ROLES
                    .iter()
                    .map(|(n, _)| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// The deterministic assignment name for (scope, principal, role).
pub fn assignment_name(scope: &str, principal: &str, role_guid: &str) -> String {
    let key = format!(
        "{}|{}|{}",
        scope.to_ascii_lowercase(),
        principal.to_ascii_lowercase(),
        role_guid
    );
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes()).to_string()
}

fn assignment_outputs(body: &Value) -> Map<String, Value> {
    let role = body["properties"]["roleDefinitionId"]
        .as_str()
        .unwrap_or_default();
    outputs([
        ("id", body["id"].clone()),
        ("name", body["name"].clone()),
        ("principal_id", body["properties"]["principalId"].clone()),
        (
            "role_definition_id",
            json!(role.rsplit('/').next().unwrap_or_default()),
        ),
    ])
}

impl RoleAssignment {
    /// The principal's object id and type.
    async fn principal(&self, p: &Params) -> Result<(String, String), StepError> {
        if p.principal == "me" {
            let caller = self.0.client().await?.caller().await?;
            return Ok((
                caller.object_id,
                p.principal_type.clone().unwrap_or(caller.principal_type),
            ));
        }
        if uuid::Uuid::parse_str(&p.principal).is_err() {
            return Err(StepError::permanent(format!(
                "`principal` must be `me` or an object id (a GUID), not `{}`",
                p.principal
            )));
        }
        Ok((
            p.principal.to_ascii_lowercase(),
            p.principal_type
                .clone()
                .unwrap_or_else(|| "ServicePrincipal".into()),
        ))
    }

    fn url(
        client: &crate::AzureClient,
        scope: &str,
        name: Option<&str>,
    ) -> Result<url::Url, StepError> {
        let mut segments = common::id_segments(scope)?;
        segments.extend(["providers", "Microsoft.Authorization", "roleAssignments"]);
        if let Some(name) = name {
            segments.push(name);
        }
        Ok(client.arm_url(&segments, API)?)
    }
}

#[async_trait]
impl StepKind for RoleAssignment {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let role = role_guid(&p.role)?;
        let (principal, principal_type) = self.principal(&p).await?;
        let name = assignment_name(&p.scope, &principal, &role);
        let client = self.0.client().await?;
        let mut existing =
            common::read(&client, &Self::url(&client, &p.scope, Some(&name))?).await?;
        if existing.is_null() {
            // The same grant may exist under another name (made by hand, or by another tool).
            let mut list = Self::url(&client, &p.scope, None)?;
            list.query_pairs_mut()
                .append_pair("$filter", &format!("principalId eq '{principal}'"));
            let listed = common::read_list(&client, &list).await?;
            existing = listed
                .iter()
                .find(|a| {
                    let props = &a["properties"];
                    props["principalId"]
                        .as_str()
                        .is_some_and(|id| id.eq_ignore_ascii_case(&principal))
                        && props["roleDefinitionId"]
                            .as_str()
                            .is_some_and(|r| r.to_ascii_lowercase().ends_with(&role))
                        && props["scope"]
                            .as_str()
                            .is_some_and(|s| s.eq_ignore_ascii_case(&p.scope))
                })
                .cloned()
                .unwrap_or(Value::Null);
        }
        Ok(
            json!({"assignment": existing, "principal": principal, "principal_type": principal_type, "name": name, "role": role}),
        )
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        if before["assignment"].is_null() {
            return Ok(StepPlan::change(Change::Create {
                summary: format!(
                    "assign {} to {} at {}",
                    p.role,
                    before["principal"].as_str().unwrap_or(&p.principal),
                    p.scope
                ),
            }));
        }
        Ok(StepPlan::unchanged(assignment_outputs(
            &before["assignment"],
        )))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let segments = common::id_segments(&p.scope)?;
        let name = before["name"].as_str().unwrap_or_default();
        let url = Self::url(&client, &p.scope, Some(name))?;
        let body = json!({"properties": {
            "roleDefinitionId": format!("/{}/providers/Microsoft.Authorization/roleDefinitions/{}", segments[..2].join("/"), before["role"].as_str().unwrap_or_default()),
            "principalId": before["principal"],
            "principalType": before["principal_type"],
        }});
        match common::put_proven(&client, &url, &Value::Null, &body, false).await {
            Ok((result, existed)) => Ok(common::applied(assignment_outputs(&result), existed)),
            Err(error) if error.to_string().contains("RoleAssignmentExists") => {
                // Someone made the same grant meanwhile: it is there, which is what we wanted,
                // and it is theirs.
                let listed = self.observe(cx).await?;
                Ok(Applied {
                    outputs: assignment_outputs(&listed["assignment"]),
                    outcome: Some(Outcome::Unchanged),
                    note: Some("an equivalent role assignment appeared before this step's; it is someone else's".into()),
                })
            }
            Err(error) => Err(error),
        }
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        if outcome != Outcome::Created {
            return Ok(Undo::NothingToUndo);
        }
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        // Only our deterministic name: never an equivalent assignment someone else made.
        let url = Self::url(&client, &p.scope, before["name"].as_str())?;
        common::delete(&client, &url).await?;
        Ok(Undo::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_case_insensitive_in_scope() {
        let a = assignment_name("/subscriptions/S/resourceGroups/RG", "abc", "role");
        let b = assignment_name("/subscriptions/s/resourcegroups/rg", "ABC", "role");
        assert_eq!(a, b);
        assert_ne!(
            a,
            assignment_name("/subscriptions/s/resourcegroups/rg", "abc", "other")
        );
        assert_eq!(
            role_guid("key vault crypto officer").unwrap(),
            "14b46e9e-c2b7-41b4-b07b-48a6ebf60603"
        );
        assert!(role_guid("Owner of everything").is_err());
    }
}
