//! Preview features and resource providers, and how registration progresses.

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Feature {
    pub(crate) state: String,
    #[serde(with = "stamp::optional")]
    pub(crate) registered_at: Option<Instant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Provider {
    #[serde(with = "stamp::optional")]
    pub(crate) registered_at: Option<Instant>,
}

impl World {
    /// Marks a feature registered and its provider re-registered (world files).
    pub fn seed_feature_registered(&mut self, namespace: &str, feature: &str) {
        let long_ago = Instant::now() - Duration::from_secs(3600);
        self.features.insert(
            format!(
                "{}/{}",
                namespace.to_ascii_lowercase(),
                feature.to_ascii_lowercase()
            ),
            Feature {
                state: "Registered".into(),
                registered_at: Some(long_ago),
            },
        );
        self.providers.insert(
            namespace.to_ascii_lowercase(),
            Provider {
                registered_at: Some(long_ago + Duration::from_secs(1)),
            },
        );
    }

    pub(crate) fn feature_state(&self, feature: &Feature, now: Instant) -> String {
        match feature.registered_at {
            Some(at)
                if feature.state == "Registering"
                    && now >= at + self.delays.feature_registration =>
            {
                "Registered".into()
            }
            _ => feature.state.clone(),
        }
    }

    pub(crate) fn feature(
        &mut self,
        req: &Req,
        namespace: &str,
        feature: &str,
        register: bool,
        now: Instant,
    ) -> Resp {
        let key = format!("{namespace}/{feature}");
        let display = format!("{}/{}", req.raw_segments[5], req.raw_segments[7]);
        if register {
            if req.method != "POST" {
                return method_not_allowed(req);
            }
            let entry = self.features.entry(key.clone()).or_insert(Feature {
                state: "NotRegistered".into(),
                registered_at: None,
            });
            if entry.state != "Registered" && entry.state != "Registering" {
                entry.state = "Registering".into();
                entry.registered_at = Some(now);
            }
        } else if req.method != "GET" {
            return method_not_allowed(req);
        }
        let state = self.features.get(&key).map_or_else(
            || "NotRegistered".to_owned(),
            |f| self.feature_state(f, now),
        );
        Resp::json(
            200,
            json!({
                "id": format!("/subscriptions/{}/providers/Microsoft.Features/providers/{}/features/{}", self.subscription, req.raw_segments[5], req.raw_segments[7]),
                "name": display,
                "type": "Microsoft.Features/providers/features",
                "properties": {"state": state},
            }),
        )
    }

    pub(crate) fn provider(
        &mut self,
        req: &Req,
        namespace: &str,
        register: bool,
        now: Instant,
    ) -> Resp {
        if register {
            if req.method != "POST" {
                return method_not_allowed(req);
            }
            self.providers.insert(
                namespace.to_owned(),
                Provider {
                    registered_at: Some(now),
                },
            );
        } else if req.method != "GET" {
            return method_not_allowed(req);
        }
        let registered = self
            .providers
            .get(namespace)
            .and_then(|p| p.registered_at)
            .is_some();
        Resp::json(
            200,
            json!({
                "id": format!("/subscriptions/{}/providers/{}", self.subscription, req.raw_segments[3]),
                "namespace": req.raw_segments[3],
                "registrationState": if registered { "Registered" } else { "NotRegistered" },
                "registrationPolicy": "RegistrationRequired",
                "resourceTypes": [{"resourceType": "managedClusters", "locations": ["East US", "West Europe"], "apiVersions": ["2025-10-02-preview", "2026-01-01"]}],
            }),
        )
    }

    /// Whether a preview feature is registered and its provider re-registered since.
    pub(crate) fn feature_effective(&self, namespace: &str, feature: &str, now: Instant) -> bool {
        let Some(f) = self.features.get(&format!("{namespace}/{feature}")) else {
            return false;
        };
        if self.feature_state(f, now) != "Registered" {
            return false;
        }
        let registered_at = f
            .registered_at
            .map(|at| at + self.delays.feature_registration);
        match (
            self.providers.get(namespace).and_then(|p| p.registered_at),
            registered_at,
        ) {
            (Some(provider), Some(feature)) => provider >= feature,
            (Some(_), None) => true,
            _ => false,
        }
    }
}
