//! Resource groups: create, read, delete, and what is in them.

use super::*;

impl World {
    /// Seeds a resource group.
    pub fn seed_group(&mut self, name: &str, location: &str) {
        let id = format!("/subscriptions/{}/resourceGroups/{name}", self.subscription);
        self.groups.insert(
            name.to_ascii_lowercase(),
            json!({"id": id, "name": name, "location": location, "properties": {"provisioningState": "Succeeded"}}),
        );
    }

    /// Resources - List By Resource Group: `{value: [GenericResourceExpanded], nextLink?}`.
    /// Role assignments are not resources there, as in Azure.
    pub(crate) fn resources_in_group(&self, group: &str) -> Resp {
        let prefix = format!(
            "/subscriptions/{}/resourcegroups/{group}/",
            self.subscription.to_ascii_lowercase()
        );
        let value: Vec<Value> = self
            .resources
            .iter()
            .filter(|(id, _)| id.starts_with(&prefix))
            .map(|(_, r)| {
                let mut listed = json!({
                    "id": r["id"], "name": r["name"], "type": r["type"], "location": r["location"],
                });
                if let Some(tags) = r.get("tags") {
                    listed["tags"] = tags.clone();
                }
                listed
            })
            .collect();
        Resp::json(200, json!({ "value": value }))
    }

    pub(crate) fn resource_group(&mut self, req: &Req) -> Resp {
        let name = req.raw_segments[3].clone();
        let key = name.to_ascii_lowercase();
        match req.method.as_str() {
            "GET" => match self.groups.get(&key) {
                // The sandbox keeps one set of groups for every subscription it serves; each
                // answers with the id of the subscription asked, as Azure's would.
                Some(group) => {
                    let mut group = group.clone();
                    group["id"] = json!(format!(
                        "/subscriptions/{}/resourceGroups/{}",
                        req.raw_segments[1],
                        group["name"].as_str().unwrap_or(&name)
                    ));
                    Resp::json(200, group)
                }
                None => group_not_found(&name),
            },
            "PUT" => {
                if !name_ok(&name, 1, 90, |c| c.is_alphanumeric() || "-_.()".contains(c))
                    || name.ends_with('.')
                {
                    return Resp::arm_error(
                        400,
                        "InvalidResourceGroup",
                        format!(
                            "The provided resource group name '{name}' has these invalid characters or length."
                        ),
                    );
                }
                let Some(location) = req.body.as_ref().and_then(|b| b["location"].as_str()) else {
                    return location_required();
                };
                if let Some(existing) = self.groups.get(&key)
                    && existing["location"].as_str() != Some(location)
                {
                    return Resp::arm_error(
                        409,
                        "InvalidResourceGroupLocation",
                        format!(
                            "Invalid resource group location '{location}'. The Resource group already exists in location '{}'.",
                            existing["location"].as_str().unwrap_or_default()
                        ),
                    );
                }
                let existed = self.groups.contains_key(&key);
                let stored_name = self
                    .groups
                    .get(&key)
                    .and_then(|g| g["name"].as_str().map(str::to_owned))
                    .unwrap_or(name);
                let mut group = json!({
                    "id": format!("/subscriptions/{}/resourceGroups/{stored_name}", req.raw_segments[1]),
                    "name": stored_name,
                    "location": location,
                    "properties": {"provisioningState": "Succeeded"},
                });
                if let Some(tags) = req.body.as_ref().and_then(|b| b.get("tags")) {
                    group["tags"] = tags.clone();
                }
                self.groups.insert(key, group.clone());
                Resp::json(if existed { 200 } else { 201 }, group)
            }
            "DELETE" => match self.groups.remove(&key) {
                Some(_) => {
                    let prefix = format!(
                        "/subscriptions/{}/resourcegroups/{key}/",
                        self.subscription.to_ascii_lowercase()
                    );
                    self.resources.retain(|id, _| !id.starts_with(&prefix));
                    Resp::empty(200)
                }
                None => Resp::empty(204),
            },
            _ => method_not_allowed(req),
        }
    }
}
