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
                entry.state = if self.approval_required.contains(&key) {
                    "Pending".into()
                } else {
                    "Registering".into()
                };
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
                // The subscription asked about: a feature belongs to it, not to the sandbox's own.
                "id": format!("/subscriptions/{}/providers/Microsoft.Features/providers/{}/features/{}", req.raw_segments[1], req.raw_segments[5], req.raw_segments[7]),
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
        let state = match self.providers.get(namespace).and_then(|p| p.registered_at) {
            // The answer to `register` itself.
            Some(_) if register => "Registering",
            Some(at) if now >= at + self.delays.provider_registration => "Registered",
            Some(_) => "Registering",
            None => "NotRegistered",
        };
        Resp::json(
            200,
            json!({
                "id": format!("/subscriptions/{}/providers/{}", req.raw_segments[1], req.raw_segments[3]),
                "namespace": req.raw_segments[3],
                "registrationState": state,
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

#[cfg(test)]
mod tests {
    use super::super::testing::{get, request, world};

    const FEATURE: &str = "/subscriptions/sub-1/providers/Microsoft.Features/providers/Microsoft.ContainerService/features/KMSPMKPreview";
    const PROVIDER: &str = "/subscriptions/sub-1/providers/Microsoft.ContainerService";

    fn state(body: serde_json::Value, pointer: &str) -> String {
        body.pointer(pointer)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn a_provider_answers_registering_to_register_then_registers() {
        let mut world = world();
        let read = |world: &mut super::World| {
            state(
                world.arm(&get(PROVIDER, "2025-04-01")).body.unwrap(),
                "/registrationState",
            )
        };
        assert_eq!(read(&mut world), "NotRegistered");
        let registered = world.arm(&request(
            "POST",
            &format!("{PROVIDER}/register"),
            "2025-04-01",
            None,
        ));
        assert_eq!(
            state(registered.body.unwrap(), "/registrationState"),
            "Registering"
        );
        assert_eq!(read(&mut world), "Registered");
    }

    #[test]
    fn a_feature_that_needs_approval_stays_pending() {
        let mut world = world();
        world.configure(&crate::faults::Faults {
            approval_required: vec!["Microsoft.ContainerService/KMSPMKPreview".into()],
            ..Default::default()
        });
        let registered = world.arm(&request(
            "POST",
            &format!("{FEATURE}/register"),
            "2021-07-01",
            None,
        ));
        assert_eq!(
            state(registered.body.unwrap(), "/properties/state"),
            "Pending"
        );
        let read = world.arm(&get(FEATURE, "2021-07-01"));
        assert_eq!(state(read.body.unwrap(), "/properties/state"), "Pending");
    }
}
