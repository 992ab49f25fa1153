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
    use super::*;

    fn get(path: &str) -> Req {
        let raw: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect();
        Req {
            method: "GET".into(),
            path: path.into(),
            segments: raw.iter().map(|s| s.to_ascii_lowercase()).collect(),
            raw_segments: raw,
            query: [("api-version".to_owned(), "2022-12-01".to_owned())].into(),
            if_match: None,
            body: None,
            caller: "caller".into(),
            origin: "https://management.sandbox.localhost:1".into(),
        }
    }

    fn world() -> World {
        World::new(
            Addressing::Hosts { port: 1 },
            "sub-1".into(),
            "tenant-1".into(),
            "caller".into(),
            Delays::default(),
        )
    }

    #[test]
    fn the_one_subscription_and_tenant_are_listed() {
        let mut world = world();
        let listed = world.arm(&get("/subscriptions"));
        assert_eq!(listed.status, 200);
        let body = listed.body.unwrap();
        assert_eq!(body["value"][0]["subscriptionId"], "sub-1");
        assert_eq!(body["value"][0]["tenantId"], "tenant-1");
        assert_eq!(world.arm(&get("/subscriptions/sub-1")).status, 200);
        assert_eq!(world.arm(&get("/subscriptions/other")).status, 404);
        let tenants = world.arm(&get("/tenants")).body.unwrap();
        assert_eq!(tenants["value"][0]["tenantId"], "tenant-1");
    }
}
