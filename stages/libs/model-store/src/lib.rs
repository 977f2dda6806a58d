//! The model registry on JetStream: metadata in a key-value bucket, weights in an object
//! store, monotonic versions per model name, a `live` alias with its history, an optional
//! `shadow` alias (a version detectors run beside the live one, answering on
//! `pcb.shadow.detections` only), an optional `canary` alias (a version that answers a
//! share of the boards, or one line's, for real), and the events on `pcb.models.events`. The registry stage writes it; the detector, the viewer
//! and `pcb models` read it (the viewer and `pcb models` also promote and roll back).

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use futures::StreamExt;
use pcb_schemas::{
    ModelEvent, ModelEventKind, ModelRef, Snapshot, KV_MODELS, OBJECTS_MODELS, SUBJECT_MODEL_EVENTS,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A bucket could not be opened or created.
    #[error("opening the registry's {bucket} bucket: {message}")]
    Open {
        /// Bucket.
        bucket: &'static str,
        /// What JetStream said.
        message: String,
    },
    /// A key could not be read or written.
    #[error("registry key {key}: {message}")]
    Key {
        /// Key.
        key: String,
        /// What JetStream said.
        message: String,
    },
    /// The weights could not be stored or read.
    #[error("registry object {object}: {message}")]
    Object {
        /// Object name.
        object: String,
        /// What JetStream said.
        message: String,
    },
    /// No such model or version.
    #[error("{0} is not in the registry")]
    NotFound(String),
    /// A stored artifact is not what its metadata says.
    #[error("{object}: sha256 {actual} does not match the registered {expected}")]
    Digest {
        /// Object name.
        object: String,
        /// Registered digest.
        expected: String,
        /// Digest of what was read.
        actual: String,
    },
    /// A name or reference that cannot be used.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// What.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// Nothing to roll back to.
    #[error("{0} has no earlier live version to roll back to")]
    NoHistory(String),
}

/// A registered model version (the JSON value of `model.<name>.v.<version>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version, from 1.
    pub version: u64,
    /// Registration time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// Object name of the weights (safetensors, torchvision key names).
    pub object: String,
    /// sha256 (hex) of the weights.
    pub sha256: String,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// The network (`pcb_vision::ModelConfig` as JSON).
    pub model_config: serde_json::Value,
    /// mAP under the DeepPCB protocol on the validation split, when evaluated.
    pub map_deeppcb: Option<f64>,
    /// mAP@0.5 (VOC), when evaluated.
    pub map50: Option<f64>,
    /// AP per class name (DeepPCB protocol), when evaluated.
    pub ap_per_class: BTreeMap<String, f64>,
    /// The full evaluation report, when evaluated.
    pub metrics: Option<serde_json::Value>,
    /// Hyperparameters of the run that produced it.
    pub hyperparameters: serde_json::Value,
    /// The data it was trained on.
    pub snapshot: Option<Snapshot>,
    /// The live version when it was registered (the model it was meant to replace).
    pub parent_version: Option<u64>,
    /// The training job, when it came from one.
    pub job: Option<String>,
    /// `trainer` or `import`.
    pub origin: String,
    /// Git revision of the training code, when known.
    pub git_revision: Option<String>,
}

/// The `live` alias of a model (the JSON value of `model.<name>.live`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveAlias {
    /// The serving version.
    pub version: u64,
    /// Earlier live versions, most recent last (what rollback returns to).
    pub history: Vec<u64>,
    /// When it was set, milliseconds since the Unix epoch.
    pub since_ms: i64,
    /// Who set it (`policy`, `cli`, ...).
    pub by: String,
}

/// The `shadow` alias of a model (the JSON value of `model.<name>.shadow`): a version that
/// detectors run beside the live one on the same images, whose answers go to
/// `pcb.shadow.detections` only. Removing the key ends the shadow period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowAlias {
    /// The shadow version.
    pub version: u64,
    /// When it was set, milliseconds since the Unix epoch.
    pub since_ms: i64,
    /// Who set it (`cli`, `viewer`, ...).
    pub by: String,
}

/// Which boards a canary version answers instead of the live one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CanaryRule {
    /// A share of the boards (above 0, at most 1), chosen by [`board_unit`]: a board always
    /// goes to the same version, whichever detector replica answers it.
    Share {
        /// The share, 0..=1.
        share: f64,
    },
    /// Every board of one line.
    Line {
        /// The line id, as the boards carry it.
        line: String,
    },
}

impl CanaryRule {
    /// Whether the canary answers the board `board_id` of line `line_id`: a hash, no call.
    pub fn selects(&self, board_id: &str, line_id: &str) -> bool {
        match self {
            CanaryRule::Share { share } => board_unit(board_id) < *share,
            CanaryRule::Line { line } => line == line_id,
        }
    }

    /// Why the rule cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), RegistryError> {
        let bad = |message: String| {
            Err(RegistryError::Invalid {
                what: "canary rule",
                message,
            })
        };
        match self {
            CanaryRule::Share { share } if !(*share > 0.0 && *share <= 1.0) => {
                bad(format!("share {share} is not above 0 and at most 1"))
            }
            CanaryRule::Line { line } if line.is_empty() => bad("an empty line id".into()),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for CanaryRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CanaryRule::Share { share } => write!(f, "{:.1}% of the boards", share * 100.0),
            CanaryRule::Line { line } => write!(f, "line {line}"),
        }
    }
}

/// Where a board falls in 0..1 for a canary's share: the first 8 bytes of the sha256 of its
/// id as a big-endian integer, its top 53 bits over 2^53 (exact in an f64). The same in any
/// language: the viewer, the tests and a line-side system can tell which boards a canary
/// answers.
pub fn board_unit(board_id: &str) -> f64 {
    let digest = Sha256::digest(board_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The `canary` alias of a model (the JSON value of `model.<name>.canary`): a version that
/// answers the boards its rule selects in place of the live one, for real (on
/// `pcb.detections` and to the lines). Removing the key ends the canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryAlias {
    /// The canary version.
    pub version: u64,
    /// The boards it answers.
    pub rule: CanaryRule,
    /// When it was set, milliseconds since the Unix epoch.
    pub since_ms: i64,
    /// Who set it (`cli`, `viewer`, ...).
    pub by: String,
}

/// What a caller knows of a new version besides its weights.
#[derive(Debug, Clone, Default)]
pub struct NewVersion {
    /// The network.
    pub model_config: serde_json::Value,
    /// The evaluation report (`pcb_evaluation::Report` as JSON), when there is one.
    pub metrics: Option<serde_json::Value>,
    /// Hyperparameters.
    pub hyperparameters: serde_json::Value,
    /// Training data.
    pub snapshot: Option<Snapshot>,
    /// Training job.
    pub job: Option<String>,
    /// `trainer` or `import`.
    pub origin: String,
    /// Git revision.
    pub git_revision: Option<String>,
}

/// Checks a model name: it becomes part of keys and object names.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid {
            what: "model name",
            message: format!("{name:?}: use 1 to 64 letters, digits, '-' or '_'"),
        })
    }
}

/// Parses `NAME@VERSION` (`VERSION` a number, or `live`).
pub fn parse_ref(s: &str) -> Result<(String, Option<u64>), RegistryError> {
    let (name, version) = match s.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    check_name(name)?;
    let version = match version {
        None | Some("live") => None,
        Some(v) => Some(
            v.trim_start_matches('v')
                .parse()
                .map_err(|_| RegistryError::Invalid {
                    what: "version",
                    message: format!("{v:?} in {s:?} is not a number (NAME@3, NAME@live)"),
                })?,
        ),
    };
    Ok((name.to_string(), version))
}

fn key_latest(name: &str) -> String {
    format!("model.{name}.latest")
}

fn key_version(name: &str, version: u64) -> String {
    format!("model.{name}.v.{version}")
}

/// The key of a model's live alias (what detectors watch).
pub fn key_live(name: &str) -> String {
    format!("model.{name}.live")
}

/// The key of a model's shadow alias (what detectors watch beside the live one).
pub fn key_shadow(name: &str) -> String {
    format!("model.{name}.shadow")
}

/// The key of a model's canary alias (what detectors watch beside the live one).
pub fn key_canary(name: &str) -> String {
    format!("model.{name}.canary")
}

/// The registry's buckets.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
    objects: object_store::ObjectStore,
}

impl Registry {
    /// Opens the buckets; they are created by the admin step (`pcb init`, `pcb up`), never
    /// here, so a missing one is named with how to create it.
    pub async fn open(js: &jetstream::Context) -> Result<Registry, RegistryError> {
        let missing = |bucket: &'static str, e: &dyn std::fmt::Display| RegistryError::Open {
            bucket,
            message: format!(
                "{e} (the bucket is created by `pcb init --nats-url URL` or `pcb up`)"
            ),
        };
        let kv = js
            .get_key_value(KV_MODELS)
            .await
            .map_err(|e| missing(KV_MODELS, &e))?;
        let objects = js
            .get_object_store(OBJECTS_MODELS)
            .await
            .map_err(|e| missing(OBJECTS_MODELS, &e))?;
        Ok(Registry { kv, objects })
    }

    /// The key-value bucket (for watching the live alias).
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, RegistryError> {
        let err = |m: String| RegistryError::Key {
            key: key.into(),
            message: m,
        };
        match self.kv.get(key).await.map_err(|e| err(e.to_string()))? {
            None => Ok(None),
            Some(b) if b.is_empty() => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| err(format!("not the expected JSON: {e}"))),
        }
    }

    /// Removes `key` and returns what it held (None, and nothing removed, when unset).
    async fn take_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, RegistryError> {
        let old = self.get_json(key).await?;
        if old.is_some() {
            self.kv.delete(key).await.map_err(|e| RegistryError::Key {
                key: key.into(),
                message: e.to_string(),
            })?;
        }
        Ok(old)
    }

    /// Refuses `version` of `name` as an alias (`what`) when it does not exist or is the
    /// live version.
    async fn not_live(
        &self,
        name: &str,
        version: u64,
        what: &'static str,
    ) -> Result<(), RegistryError> {
        self.version(name, version).await?;
        if self.live(name).await?.map(|l| l.version) == Some(version) {
            return Err(RegistryError::Invalid {
                what,
                message: format!("{name}@{version} is the live version"),
            });
        }
        Ok(())
    }

    async fn put_json<T: Serialize>(&self, key: &str, v: &T) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec_pretty(v).map_err(|e| RegistryError::Key {
            key: key.into(),
            message: e.to_string(),
        })?;
        self.kv
            .put(key, Bytes::from(bytes))
            .await
            .map_err(|e| RegistryError::Key {
                key: key.into(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// Changes the JSON value of `key` to what `change` makes of the current one, written
    /// only if nobody wrote the key since it was read (its KV revision), else read and
    /// changed again: two operators promoting at once both end up in the history.
    async fn update_json<T, F>(&self, key: &str, mut change: F) -> Result<T, RegistryError>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnMut(Option<T>) -> Result<T, RegistryError>,
    {
        let err = |m: String| RegistryError::Key {
            key: key.into(),
            message: m,
        };
        for _ in 0..32 {
            let entry = self.kv.entry(key).await.map_err(|e| err(e.to_string()))?;
            let (current, revision) = match &entry {
                Some(e) if !e.value.is_empty() => (
                    Some(
                        serde_json::from_slice(&e.value)
                            .map_err(|e| err(format!("not the expected JSON: {e}")))?,
                    ),
                    Some(e.revision),
                ),
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            let next = change(current)?;
            let bytes =
                Bytes::from(serde_json::to_vec_pretty(&next).map_err(|e| err(e.to_string()))?);
            let won = match revision {
                Some(r) => self.kv.update(key, bytes, r).await.is_ok(),
                None => self.kv.create(key, bytes).await.is_ok(),
            };
            if won {
                return Ok(next);
            }
        }
        Err(err("too many concurrent changes".into()))
    }

    /// Takes the next version number of `name`, safely against concurrent writers (the
    /// number is stored as plain JSON, e.g. `3`).
    async fn next_version(&self, name: &str) -> Result<u64, RegistryError> {
        self.update_json(&key_latest(name), |current: Option<u64>| {
            Ok(current.unwrap_or(0) + 1)
        })
        .await
    }

    /// Stores the weights and their metadata as the next version of `name`.
    pub async fn register(
        &self,
        name: &str,
        weights: &[u8],
        meta: NewVersion,
    ) -> Result<ModelVersion, RegistryError> {
        check_name(name)?;
        let parent_version = self.live(name).await?.map(|l| l.version);
        let version = self.next_version(name).await?;
        let object = format!("{name}/v{version}.safetensors");
        let sha256 = hex::encode(Sha256::digest(weights));
        let mut reader: &[u8] = weights;
        self.objects
            .put(object.as_str(), &mut reader)
            .await
            .map_err(|e| RegistryError::Object {
                object: object.clone(),
                message: e.to_string(),
            })?;
        // PR curves hold a point per detection: too big for a key-value entry, and the
        // viewer needs only the numbers.
        let mut report = meta.metrics.clone();
        if let Some(classes) = report
            .as_mut()
            .and_then(|r| r.get_mut("classes"))
            .and_then(|c| c.as_array_mut())
        {
            for c in classes {
                if let Some(obj) = c.as_object_mut() {
                    obj.remove("pr_curve");
                }
            }
        }
        let field = |k: &str| {
            report
                .as_ref()
                .and_then(|r| r.get(k))
                .and_then(|v| v.as_f64())
        };
        let mut ap_per_class = BTreeMap::new();
        if let Some(classes) = report
            .as_ref()
            .and_then(|r| r.get("classes"))
            .and_then(|c| c.as_array())
        {
            for c in classes {
                if let (Some(n), Some(ap)) = (
                    c.get("name").and_then(|v| v.as_str()),
                    c.get("ap_deeppcb").and_then(|v| v.as_f64()),
                ) {
                    ap_per_class.insert(n.to_string(), ap);
                }
            }
        }
        let v = ModelVersion {
            name: name.into(),
            version,
            created_at_ms: pcb_common::now_ms(),
            object,
            sha256,
            size_bytes: weights.len() as u64,
            model_config: meta.model_config,
            map_deeppcb: field("map_deeppcb"),
            map50: field("map50"),
            ap_per_class,
            metrics: report,
            hyperparameters: meta.hyperparameters,
            snapshot: meta.snapshot,
            parent_version,
            job: meta.job,
            origin: meta.origin,
            git_revision: meta.git_revision,
        };
        self.put_json(&key_version(name, version), &v).await?;
        Ok(v)
    }

    /// One version.
    pub async fn version(&self, name: &str, version: u64) -> Result<ModelVersion, RegistryError> {
        self.get_json(&key_version(name, version))
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("{name}@{version}")))
    }

    /// The live alias of `name`, if one was set.
    pub async fn live(&self, name: &str) -> Result<Option<LiveAlias>, RegistryError> {
        self.get_json(&key_live(name)).await
    }

    /// The shadow alias of `name`, if one is set.
    pub async fn shadow(&self, name: &str) -> Result<Option<ShadowAlias>, RegistryError> {
        self.get_json(&key_shadow(name)).await
    }

    /// Makes `version` the shadow one (replacing any other); the live version cannot be
    /// its own shadow.
    pub async fn set_shadow(
        &self,
        name: &str,
        version: u64,
        by: &str,
    ) -> Result<ShadowAlias, RegistryError> {
        self.not_live(name, version, "shadow version").await?;
        let alias = ShadowAlias {
            version,
            since_ms: pcb_common::now_ms(),
            by: by.into(),
        };
        self.put_json(&key_shadow(name), &alias).await?;
        Ok(alias)
    }

    /// Ends the shadow period of `name` (detectors stop running it); returns the alias
    /// that was set, if any.
    pub async fn clear_shadow(&self, name: &str) -> Result<Option<ShadowAlias>, RegistryError> {
        self.take_json(&key_shadow(name)).await
    }

    /// The canary alias of `name`, if one is set.
    pub async fn canary(&self, name: &str) -> Result<Option<CanaryAlias>, RegistryError> {
        self.get_json(&key_canary(name)).await
    }

    /// Makes `version` the canary answering the boards `rule` selects (replacing any other
    /// canary); the live version cannot be its own canary.
    pub async fn set_canary(
        &self,
        name: &str,
        version: u64,
        rule: CanaryRule,
        by: &str,
    ) -> Result<CanaryAlias, RegistryError> {
        rule.check()?;
        self.not_live(name, version, "canary version").await?;
        let alias = CanaryAlias {
            version,
            rule,
            since_ms: pcb_common::now_ms(),
            by: by.into(),
        };
        self.put_json(&key_canary(name), &alias).await?;
        Ok(alias)
    }

    /// Ends the canary of `name` (its boards go back to the live version); returns the alias
    /// that was set, if any.
    pub async fn clear_canary(&self, name: &str) -> Result<Option<CanaryAlias>, RegistryError> {
        self.take_json(&key_canary(name)).await
    }

    /// Every version of every model (or of `name`), ordered by name and version.
    pub async fn list(&self, name: Option<&str>) -> Result<Vec<ModelVersion>, RegistryError> {
        let err = |m: String| RegistryError::Key {
            key: "model.*".into(),
            message: m,
        };
        let mut keys = self.kv.keys().await.map_err(|e| err(e.to_string()))?;
        let mut wanted = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| err(e.to_string()))?;
            let parts: Vec<&str> = k.split('.').collect();
            if let ["model", n, "v", v] = parts.as_slice() {
                if name.is_none_or(|want| want == *n) {
                    if let Ok(v) = v.parse::<u64>() {
                        wanted.push((n.to_string(), v));
                    }
                }
            }
        }
        wanted.sort();
        let mut out = Vec::new();
        for (n, v) in wanted {
            out.push(self.version(&n, v).await?);
        }
        Ok(out)
    }

    /// Makes `version` the live one; the previous live version goes into the history. A
    /// shadow version promoted ends its shadow period (it would only shadow itself), and a
    /// canary version promoted ends the canary (every board is now its).
    pub async fn promote(
        &self,
        name: &str,
        version: u64,
        by: &str,
    ) -> Result<LiveAlias, RegistryError> {
        self.version(name, version).await?;
        let alias = self.promote_alias(name, version, by).await?;
        if self.shadow(name).await?.map(|s| s.version) == Some(version) {
            self.clear_shadow(name).await?;
        }
        if self.canary(name).await?.map(|c| c.version) == Some(version) {
            self.clear_canary(name).await?;
        }
        Ok(alias)
    }

    async fn promote_alias(
        &self,
        name: &str,
        version: u64,
        by: &str,
    ) -> Result<LiveAlias, RegistryError> {
        self.update_json(&key_live(name), |old: Option<LiveAlias>| {
            let mut history = Vec::new();
            if let Some(old) = old {
                history = old.history;
                if old.version != version {
                    history.push(old.version);
                }
            }
            Ok(LiveAlias {
                version,
                history,
                since_ms: pcb_common::now_ms(),
                by: by.into(),
            })
        })
        .await
    }

    /// Returns the live alias to the version before it.
    pub async fn rollback(&self, name: &str, by: &str) -> Result<LiveAlias, RegistryError> {
        self.update_json(&key_live(name), |live: Option<LiveAlias>| {
            let Some(mut live) = live else {
                return Err(RegistryError::NoHistory(name.into()));
            };
            let Some(previous) = live.history.pop() else {
                return Err(RegistryError::NoHistory(name.into()));
            };
            Ok(LiveAlias {
                version: previous,
                history: live.history,
                since_ms: pcb_common::now_ms(),
                by: by.into(),
            })
        })
        .await
    }

    /// The weights of a version, checked against their registered sha256.
    pub async fn weights(&self, v: &ModelVersion) -> Result<Vec<u8>, RegistryError> {
        let err = |m: String| RegistryError::Object {
            object: v.object.clone(),
            message: m,
        };
        let mut object = self
            .objects
            .get(v.object.as_str())
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut bytes = Vec::with_capacity(v.size_bytes as usize);
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| err(e.to_string()))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != v.sha256 {
            return Err(RegistryError::Digest {
                object: v.object.clone(),
                expected: v.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Overwrites a version's stored weights (tests use it to corrupt an artifact).
    pub async fn overwrite_weights(
        &self,
        v: &ModelVersion,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let mut reader: &[u8] = bytes;
        self.objects
            .put(v.object.as_str(), &mut reader)
            .await
            .map_err(|e| RegistryError::Object {
                object: v.object.clone(),
                message: e.to_string(),
            })?;
        Ok(())
    }
}

/// Publishes a registry event on `pcb.models.events` (logged, not fatal, when it fails).
pub async fn publish_event(
    js: &jetstream::Context,
    kind: ModelEventKind,
    name: &str,
    version: u64,
    by: &str,
    reason: Option<String>,
) {
    let event = ModelEvent {
        kind,
        model: ModelRef {
            name: name.into(),
            version,
        },
        by: by.into(),
        reason,
        at_ms: pcb_common::now_ms(),
    };
    if let Err(e) = pcb_common::publish(js, SUBJECT_MODEL_EVENTS.into(), &event).await {
        tracing::warn!(error = %e, %kind, name, version, "could not publish a model event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_bad_ones_say_why() {
        assert_eq!(parse_ref("pcb@3").unwrap(), ("pcb".into(), Some(3)));
        assert_eq!(parse_ref("pcb@v3").unwrap(), ("pcb".into(), Some(3)));
        assert_eq!(parse_ref("pcb@live").unwrap(), ("pcb".into(), None));
        assert_eq!(parse_ref("pcb").unwrap(), ("pcb".into(), None));
        assert!(parse_ref("pcb@x")
            .unwrap_err()
            .to_string()
            .contains("not a number"));
        assert!(parse_ref("a.b@1").is_err(), "dots would break the keys");
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn a_canary_share_is_a_hash_of_the_board_id() {
        // sha256("board-0") starts 0x7b987e48f60a2360: 0.4828; the same board always lands
        // the same.
        let u = board_unit("board-0");
        assert!((u - 0.482_795_613_110_319_7).abs() < 1e-15, "{u}");
        let share = CanaryRule::Share { share: 0.25 };
        let picked = (0..10_000)
            .filter(|i| share.selects(&format!("b{i}"), "any"))
            .count();
        assert!((2300..2700).contains(&picked), "{picked} of 10000");
        assert!(CanaryRule::Share { share: 1.0 }.selects("x", "l"));
        let line = CanaryRule::Line {
            line: "line-b".into(),
        };
        assert!(line.selects("x", "line-b") && !line.selects("x", "line-a"));
        assert!(CanaryRule::Share { share: 0.0 }.check().is_err());
        assert!(CanaryRule::Share { share: 1.5 }.check().is_err());
        assert!(CanaryRule::Share { share: f64::NAN }.check().is_err());
        assert!(CanaryRule::Line { line: "".into() }.check().is_err());
        let json = serde_json::to_string(&share).unwrap();
        assert_eq!(json, r#"{"kind":"share","share":0.25}"#);
    }
}
