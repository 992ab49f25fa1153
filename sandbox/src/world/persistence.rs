//! Saving the world to a file and loading it back, instants included.

use super::*;

/// Instants as wall-clock milliseconds, so a persisted world keeps its clocks (a principal
/// created 2 s before a crash is still 2 s old after it).
pub(crate) mod stamp {
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    fn wall_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }

    pub fn to_ms(instant: Instant) -> i64 {
        let now = Instant::now();
        if instant <= now {
            wall_ms() - (now - instant).as_millis() as i64
        } else {
            wall_ms() + (instant - now).as_millis() as i64
        }
    }

    pub fn from_ms(ms: i64) -> Instant {
        let delta = ms - wall_ms();
        let now = Instant::now();
        if delta >= 0 {
            now + Duration::from_millis(delta as u64)
        } else {
            now.checked_sub(Duration::from_millis((-delta) as u64))
                .unwrap_or(now)
        }
    }

    pub fn serialize<S: Serializer>(instant: &Instant, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i64(to_ms(*instant))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Instant, D::Error> {
        Ok(from_ms(i64::deserialize(deserializer)?))
    }

    pub mod optional {
        use std::time::Instant;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            instant: &Option<Instant>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match instant {
                Some(instant) => serializer.serialize_some(&super::to_ms(*instant)),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Instant>, D::Error> {
            Ok(Option::<i64>::deserialize(deserializer)?.map(super::from_ms))
        }
    }
}

/// Everything a world holds, in a form that survives a restart.
#[derive(Serialize, Deserialize)]
pub(crate) struct Snapshot {
    groups: BTreeMap<String, Value>,
    features: BTreeMap<String, Feature>,
    providers: BTreeMap<String, Provider>,
    resources: BTreeMap<String, Value>,
    principals: BTreeMap<String, i64>,
    assignments: BTreeMap<String, Assignment>,
    keys: Vec<(String, String, Vec<KeyVersion>)>,
    #[serde(default)]
    deleted_keys: Vec<(String, String, i64, Vec<KeyVersion>)>,
    rotation_policies: Vec<(String, String, Value)>,
    deleted_vaults: BTreeSet<String>,
    #[serde(default)]
    deleted_vault_bodies: BTreeMap<String, Value>,
    operations: BTreeMap<String, Operation>,
}

impl World {
    /// The world as JSON that [`World::restore`] reads back.
    pub fn save(&self) -> Value {
        let snapshot = Snapshot {
            groups: self.groups.clone(),
            features: self.features.clone(),
            providers: self.providers.clone(),
            resources: self.resources.clone(),
            principals: self
                .principals
                .iter()
                .map(|(k, v)| (k.clone(), stamp::to_ms(*v)))
                .collect(),
            assignments: self.assignments.clone(),
            keys: self
                .keys
                .iter()
                .map(|((v, k), versions)| (v.clone(), k.clone(), versions.clone()))
                .collect(),
            deleted_keys: self
                .deleted_keys
                .iter()
                .map(|((v, k), (at, versions))| (v.clone(), k.clone(), *at, versions.clone()))
                .collect(),
            rotation_policies: self
                .rotation_policies
                .iter()
                .map(|((v, k), p)| (v.clone(), k.clone(), p.clone()))
                .collect(),
            deleted_vaults: self.deleted_vaults.clone(),
            deleted_vault_bodies: self.deleted_vault_bodies.clone(),
            operations: self.operations.clone(),
        };
        let mut saved = serde_json::to_value(snapshot).expect("the world serializes");
        // Clients keep URLs the sandbox gave them (vault URIs, key ids): a restarted sandbox
        // should come back at the same address when it can.
        saved["base_url"] = json!(self.addressing.arm_endpoint());
        saved["address_marker"] = json!(self.addressing.marker());
        saved
    }

    /// Replaces the world's resources with a saved one. Vault URIs carry the sandbox's address,
    /// which changes between processes, so they are rewritten to this one's.
    pub fn restore(&mut self, saved: Value) -> Result<(), serde_json::Error> {
        let marker = self.addressing.marker();
        let mut text = saved.to_string();
        // Only between addresses of one shape: an origin is not a host suffix.
        if let Some(old) = saved["address_marker"]
            .as_str()
            .filter(|old| *old != marker && old.starts_with("http") == marker.starts_with("http"))
        {
            text = text.replace(old, &marker);
        }
        let snapshot: Snapshot = serde_json::from_str(&text)?;
        self.groups = snapshot.groups;
        self.features = snapshot.features;
        self.providers = snapshot.providers;
        self.resources = snapshot.resources;
        self.principals = snapshot
            .principals
            .into_iter()
            .map(|(k, v)| (k, stamp::from_ms(v)))
            .collect();
        self.assignments = snapshot.assignments;
        self.keys = snapshot
            .keys
            .into_iter()
            .map(|(v, k, versions)| ((v, k), versions))
            .collect();
        self.deleted_keys = snapshot
            .deleted_keys
            .into_iter()
            .map(|(v, k, at, versions)| ((v, k), (at, versions)))
            .collect();
        self.rotation_policies = snapshot
            .rotation_policies
            .into_iter()
            .map(|(v, k, p)| ((v, k), p))
            .collect();
        self.deleted_vaults = snapshot.deleted_vaults;
        self.deleted_vault_bodies = snapshot.deleted_vault_bodies;
        self.operations = snapshot.operations;
        Ok(())
    }
}
