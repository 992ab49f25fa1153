//! User-assigned managed identities and their principals.

use super::*;

impl World {
    pub(crate) fn identity(&mut self, req: &Req, now: Instant) -> Resp {
        let name = req.raw_segments[7].clone();
        let id_key = req.path.trim_end_matches('/').to_ascii_lowercase();
        match req.method.as_str() {
            "GET" => match self.resources.get(&id_key) {
                Some(identity) => Resp::json(200, identity.clone()),
                None => not_found(
                    "Microsoft.ManagedIdentity/userAssignedIdentities",
                    &name,
                    &req.raw_segments[3],
                ),
            },
            "PUT" => {
                if !name_ok(&name, 3, 128, |c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_'
                }) || name.starts_with(['-', '_'])
                {
                    return Resp::arm_error(
                        400,
                        "InvalidResourceName",
                        format!("Resource name '{name}' is invalid."),
                    );
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let Some(location) = body["location"].as_str() else {
                    return location_required();
                };
                let existing = self.resources.get(&id_key).cloned();
                let (principal, client) = match &existing {
                    Some(e) => (
                        e["properties"]["principalId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        e["properties"]["clientId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                    None => (uuid(), uuid()),
                };
                // ARM returns ids of identities with a lowercase `resourcegroups`.
                let id = format!(
                    "/subscriptions/{}/resourcegroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
                    req.raw_segments[1], req.raw_segments[3]
                );
                let identity = json!({
                    "id": existing.as_ref().and_then(|e| e["id"].as_str().map(str::to_owned)).unwrap_or(id),
                    "location": location,
                    "name": name,
                    "properties": {"clientId": client, "principalId": principal, "tenantId": self.tenant},
                    "tags": body.get("tags").cloned().unwrap_or(json!({})),
                    "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                });
                if existing.is_none() {
                    self.principals.insert(principal, now);
                }
                self.resources.insert(id_key, identity.clone());
                Resp::json(if existing.is_some() { 200 } else { 201 }, identity)
            }
            "DELETE" => match self.resources.remove(&id_key) {
                Some(_) => Resp::empty(200),
                None => Resp::empty(204),
            },
            _ => method_not_allowed(req),
        }
    }

    pub(crate) fn principal_known(&self, principal: &str, now: Instant) -> bool {
        principal == self.caller
            || self
                .principals
                .get(principal)
                .is_some_and(|created| now >= *created + self.delays.principal_replication)
    }
}
