//! Subscriptions and tenants: what `az login --identity` and the SDKs' subscription clients
//! list. The sandbox has one of each.

use super::*;

impl World {
    /// Subscriptions - List (`GET /subscriptions`) and Get (`GET /subscriptions/{id}`).
    pub(crate) fn subscriptions(&self, req: &Req, one: bool) -> Resp {
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        let body = json!({
            "id": format!("/subscriptions/{}", self.subscription),
            "subscriptionId": self.subscription,
            "tenantId": self.tenant,
            "displayName": "kmsflow sandbox",
            "state": "Enabled",
            "subscriptionPolicies": {
                "locationPlacementId": "Public_2014-09-01",
                "quotaId": "PayAsYouGo_2014-09-01",
                "spendingLimit": "Off",
            },
            "authorizationSource": "RoleBased",
            "managedByTenants": [],
            "tags": {},
        });
        if one {
            Resp::json(200, body)
        } else {
            Resp::json(200, json!({"value": [body]}))
        }
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
