//! Subscriptions and tenants: what `az login --identity` and the SDKs' subscription clients
//! list. The sandbox has one of each.

use super::*;

impl World {
    /// Whether `id` (lower case, as routed) is a subscription of this world.
    pub(crate) fn has_subscription(&self, id: &str) -> bool {
        std::iter::once(&self.subscription)
            .chain(&self.other_subscriptions)
            .any(|s| s.eq_ignore_ascii_case(id))
    }

    /// Subscriptions - List (`GET /subscriptions`) and Get (`GET /subscriptions/{id}`).
    pub(crate) fn subscriptions(&self, req: &Req, one: bool) -> Resp {
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        if one {
            let wanted = req.raw_segments.get(1).cloned().unwrap_or_default();
            let id = std::iter::once(&self.subscription)
                .chain(&self.other_subscriptions)
                .find(|s| s.eq_ignore_ascii_case(&wanted))
                .cloned()
                .unwrap_or_else(|| self.subscription.clone());
            return Resp::json(200, self.subscription_body(&id));
        }
        let value: Vec<Value> = std::iter::once(&self.subscription)
            .chain(&self.other_subscriptions)
            .map(|id| self.subscription_body(id))
            .collect();
        Resp::json(
            200,
            json!({"value": value, "count": {"type": "Total", "value": value.len()}}),
        )
    }

    fn subscription_body(&self, id: &str) -> Value {
        json!({
            "id": format!("/subscriptions/{id}"),
            "subscriptionId": id,
            "tenantId": self.tenant,
            "displayName": if id == self.subscription { "kmsflow sandbox".to_owned() } else { format!("kmsflow sandbox {}", &id[..8.min(id.len())]) },
            "state": "Enabled",
            "subscriptionPolicies": {
                "locationPlacementId": "Public_2014-09-01",
                "quotaId": "PayAsYouGo_2014-09-01",
                "spendingLimit": "Off",
            },
            "authorizationSource": "RoleBased",
            "managedByTenants": [],
            "tags": {},
        })
    }

    /// Tenants - List (`GET /tenants`).
    pub(crate) fn tenants(&self, req: &Req) -> Resp {
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        Resp::json(
            200,
            json!({"value": [{
                "id": format!("/tenants/{}", self.tenant),
                "tenantId": self.tenant,
                "tenantCategory": "Home",
                "country": "US",
                "countryCode": "US",
                "displayName": "kmsflow sandbox",
                "domains": ["kmsflowsandbox.onmicrosoft.com"],
                "defaultDomain": "kmsflowsandbox.onmicrosoft.com",
                "tenantType": "AAD",
            }]}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{get, world};

    #[test]
    fn the_one_subscription_and_tenant_are_listed() {
        let mut world = world();
        let listed = world.arm(&get("/subscriptions", "2022-12-01"));
        assert_eq!(listed.status, 200);
        let body = listed.body.unwrap();
        assert_eq!(body["value"][0]["subscriptionId"], "sub-1");
        assert_eq!(body["value"][0]["tenantId"], "tenant-1");
        assert_eq!(
            world.arm(&get("/subscriptions/sub-1", "2022-12-01")).status,
            200
        );
        assert_eq!(
            world.arm(&get("/subscriptions/other", "2022-12-01")).status,
            404
        );
        let tenants = world.arm(&get("/tenants", "2022-12-01")).body.unwrap();
        assert_eq!(tenants["value"][0]["tenantId"], "tenant-1");
    }
}
