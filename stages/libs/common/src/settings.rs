//! Layered configuration: a TOML file under `PCB_*` environment variables, with errors that
//! name the key and the file, and validation that reports every problem at once.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Every problem found while validating a config, reported together.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Records a problem with `key`.
    pub fn push(&mut self, key: &str, problem: impl fmt::Display) {
        self.0.push(format!("{key}: {problem}"));
    }

    /// Records a problem when `bad` holds.
    pub fn check(&mut self, bad: bool, key: &str, problem: impl fmt::Display) {
        if bad {
            self.push(key, problem);
        }
    }

    /// Records "must be at least `min`" when `value` is below it (the check most numeric
    /// settings need, worded the same everywhere).
    pub fn at_least<T: PartialOrd + fmt::Display>(&mut self, key: &str, value: T, min: T) {
        self.check(value < min, key, format!("must be at least {min}"));
    }

    /// Records "must be between `lo` and `hi`" when `value` is outside (or not a number).
    pub fn between<T: PartialOrd + fmt::Display>(&mut self, key: &str, value: T, lo: T, hi: T) {
        let inside = lo <= value && value <= hi;
        self.check(!inside, key, format!("must be between {lo} and {hi}"));
    }

    /// Records "is empty" when `text` is empty or only white space.
    pub fn not_blank(&mut self, key: &str, text: &str) {
        self.check(text.trim().is_empty(), key, "is empty");
    }

    /// The keys of the problems, in the order they were found.
    pub fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .map(|p| p.split_once(": ").map_or(p.as_str(), |(k, _)| k))
            .collect()
    }

    /// Ok when nothing was recorded.
    pub fn into_result(self) -> Result<(), Problems> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist.
    #[error("config file {path} does not exist")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file or the environment holds a key or value the stage does not accept.
    #[error("invalid configuration in {origin}: {message}")]
    Parse {
        /// The file (and `PCB_*` environment) the value came from.
        origin: String,
        /// What serde or the config crate said, naming the key.
        message: String,
    },
    /// Values parsed but break the rules of the stage.
    #[error("invalid configuration in {origin}:\n{problems}")]
    Invalid {
        /// The file (and `PCB_*` environment) the values came from.
        origin: String,
        /// Every problem found.
        problems: Problems,
    },
}

impl ConfigError {
    /// Wraps validation problems with the config's origin.
    pub fn invalid(path: Option<&Path>, problems: Problems) -> Self {
        ConfigError::Invalid {
            origin: origin(path),
            problems,
        }
    }
}

fn origin(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!("{} (or PCB_* environment)", p.display()),
        None => "PCB_* environment".to_string(),
    }
}

/// Loads `T` from an optional TOML file overlaid with `PCB_<SECTION>__<KEY>` environment
/// variables (e.g. `PCB_NATS__URL`). Unknown keys are refused by `T`'s
/// `deny_unknown_fields`; the error names the key and the file.
pub fn load_config<T: DeserializeOwned + serde::Serialize + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    load_config_from_env(path, std::env::vars())
}

/// [`load_config`] with an explicit environment, for tests.
pub fn load_config_from_env<T: DeserializeOwned + serde::Serialize + Default>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(p) = path {
        if !p.exists() {
            return Err(ConfigError::Missing { path: p.into() });
        }
        builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
    }
    let vars: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("PCB_") && k.contains("__"))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("PCB")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("ingester.classes")
            .source(Some(vars)),
    );
    let parse_err = |e: config::ConfigError| ConfigError::Parse {
        origin: origin(path),
        message: e.to_string(),
    };
    // Through a JSON value so that serde_path_to_error can name the key of a bad value
    // (`streams.images.storage: unknown variant `tape``), which the config crate's own
    // deserializer does not for enums.
    let given: serde_json::Value = builder
        .build()
        .map_err(parse_err)?
        .try_deserialize()
        .map_err(parse_err)?;
    // Over the type's own defaults, key by key: a section that sets one key keeps the
    // defaults of its other keys as the whole type declares them (`[streams.images]` with
    // only `max_msgs` keeps the images stream's own retention, not a generic stream's).
    let mut value = serde_json::to_value(T::default()).map_err(|e| ConfigError::Parse {
        origin: origin(path),
        message: format!("the defaults: {e}"),
    })?;
    merge(&mut value, given);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::Parse {
            origin: origin(path),
            message: if key == "." || key.is_empty() {
                inner.to_string()
            } else {
                format!("{key}: {inner}")
            },
        }
    })
}

/// Lays `over` on `base`: objects key by key, anything else replaced.
fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn the_common_checks_word_their_problems_the_same_way() {
        let mut p = Problems::default();
        p.at_least("a.n", 0, 1);
        p.at_least("a.ok", 1, 1);
        p.between("a.f", 1.5, 0.0, 1.0);
        p.between("a.nan", f64::NAN, 0.0, 1.0);
        p.between("a.in", 0.5, 0.0, 1.0);
        p.not_blank("a.s", "  ");
        p.not_blank("a.t", "x");
        assert_eq!(p.keys(), ["a.n", "a.f", "a.nan", "a.s"]);
        assert_eq!(
            p.0,
            [
                "a.n: must be at least 1",
                "a.f: must be between 0 and 1",
                "a.nan: must be between 0 and 1",
                "a.s: is empty",
            ]
        );
    }

    #[derive(Debug, Default, Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        nats: Nats,
        #[serde(default)]
        pair: Pair,
    }

    #[derive(Debug, Default, Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Nats {
        url: String,
        #[serde(default)]
        connect_timeout_secs: u64,
    }

    /// A section whose defaults differ per field from its type's generic ones.
    #[derive(Debug, Deserialize, serde::Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Pair {
        left: Side,
        right: Side,
    }

    #[derive(Debug, Deserialize, serde::Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Side {
        size: u32,
        keep: bool,
    }

    impl Default for Side {
        fn default() -> Self {
            Side {
                size: 1,
                keep: false,
            }
        }
    }

    impl Default for Pair {
        fn default() -> Self {
            Pair {
                left: Side::default(),
                right: Side {
                    size: 2,
                    keep: true,
                },
            }
        }
    }

    #[test]
    fn a_partial_section_keeps_the_rest_of_its_own_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(&dir, "[nats]\nurl = \"x\"\n[pair.right]\nsize = 5\n");
        let c: Cfg = load_config_from_env(Some(&p), vec![]).expect("load");
        // `keep` is the right side's default (true), not a generic side's (false).
        assert_eq!(
            c.pair.right,
            Side {
                size: 5,
                keep: true
            }
        );
        assert_eq!(c.pair.left, Side::default());
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let p = dir.path().join("stage.toml");
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(&dir, "[nats]\nurl = \"nats://a:1\"\n");
        let env = vec![(
            "PCB_NATS__CONNECT_TIMEOUT_SECS".to_string(),
            "7".to_string(),
        )];
        let c: Cfg = load_config_from_env(Some(&p), env).expect("load");
        assert_eq!(c.nats.url, "nats://a:1");
        assert_eq!(c.nats.connect_timeout_secs, 7);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(&dir, "[nats]\nurl = \"x\"\nulr = \"y\"\n");
        let err = load_config_from_env::<Cfg>(Some(&p), vec![]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("ulr"), "{text}");
        assert!(text.contains("stage.toml"), "{text}");
    }

    #[test]
    fn bad_value_names_key_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            &dir,
            "[nats]\nurl = \"x\"\nconnect_timeout_secs = \"soon\"\n",
        );
        let text = load_config_from_env::<Cfg>(Some(&p), vec![])
            .unwrap_err()
            .to_string();
        assert!(text.contains("connect_timeout_secs"), "{text}");
        assert!(text.contains("stage.toml"), "{text}");
    }

    #[test]
    fn a_choice_outside_its_set_names_the_key() {
        #[derive(Debug, Default, Deserialize, serde::Serialize)]
        #[serde(deny_unknown_fields)]
        struct Log {
            // Only parsed: the test is about the error.
            #[allow(dead_code)]
            log: crate::LogConfig,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(&dir, "[log]\nformat = \"xml\"\n");
        let text = load_config_from_env::<Log>(Some(&p), vec![])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("log.format") && text.contains("xml") && text.contains("json"),
            "{text}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = load_config_from_env::<Cfg>(Some(Path::new("/nonexistent/x.toml")), vec![])
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.toml"));
    }

    #[test]
    fn problems_are_listed_together() {
        let mut p = Problems::default();
        p.check(true, "a.b", "must be positive");
        p.check(false, "a.c", "never");
        p.push("a.d", "is empty");
        let err = ConfigError::invalid(Some(Path::new("f.toml")), p.into_result().unwrap_err());
        let text = err.to_string();
        assert!(text.contains("a.b: must be positive") && text.contains("a.d: is empty"));
        assert!(!text.contains("a.c"));
    }
}
