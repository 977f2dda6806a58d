//! What a stage is: the [`Stage`] trait, the one file-config wrapper every stage shares
//! (`[nats]`, `[metrics]`, `[log]` and the stage's own section, whose consumer keys form one
//! [`ConsumerSettings`] block), and the one `main` that loads, validates and runs a stage.
//! A stage's `main.rs` is `pcb_common::stage::main::<TheStage>()`.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream;
use derive_where::derive_where;
use pcb_schemas::topology::{Durable, Input, ReadMode, StageName};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::ack::ConsumerSpec;
use crate::{
    init_tracing, settings, ConfigError, LogConfig, Metrics, MetricsConfig, NatsConfig, Problems,
    Shutdown,
};

/// The keys of a consuming stage's section that configure its durable consumer; the same
/// five for every stage, so one block serves them all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Durable consumer name, shared by every replica.
    pub durable: String,
    /// Messages in flight at once in this process (0: four per CPU core).
    pub concurrency: usize,
    /// Redeliver a message not acked within this many seconds.
    pub ack_wait_secs: u64,
    /// Deliveries of a failing message before it becomes a `retries-exhausted` dead letter.
    pub max_deliver: i64,
    /// Delay before a transient failure is retried, in milliseconds.
    pub retry_delay_ms: u64,
}

impl ConsumerSettings {
    /// The keys of the block, as they appear in a stage's section.
    pub const KEYS: [&'static str; 5] = [
        "durable",
        "concurrency",
        "ack_wait_secs",
        "max_deliver",
        "retry_delay_ms",
    ];

    /// The defaults every consuming stage starts from: its durable as the topology
    /// declares it.
    pub fn defaults(stage: StageName) -> Option<ConsumerSettings> {
        stage
            .decl()
            .durable_input()
            .map(|(_, durable)| ConsumerSettings::from(durable))
    }

    /// Adds this block's problems (keys prefixed with `section`) to `p`.
    pub fn validate(&self, section: &str, p: &mut Problems) {
        let key = |k: &str| format!("{section}.{k}");
        p.not_blank(&key("durable"), &self.durable);
        p.at_least(&key("ack_wait_secs"), self.ack_wait_secs, 1);
        p.at_least(&key("max_deliver"), self.max_deliver, 1);
        p.check(self.concurrency > 4096, &key("concurrency"), "at most 4096");
    }

    /// The consumer `stage` runs with these settings (its input from the topology).
    pub fn spec(&self, stage: StageName) -> Option<ConsumerSpec> {
        let (input, _) = stage.decl().durable_input()?;
        Some(self.spec_for(stage, input))
    }

    /// The consumer of `stage` on `input` with these settings.
    pub fn spec_for(&self, stage: StageName, input: &Input) -> ConsumerSpec {
        let concurrency = if self.concurrency == 0 {
            4 * std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            self.concurrency
        };
        ConsumerSpec {
            stage,
            stream: input.stream.name().to_string(),
            durable: self.durable.clone(),
            filter_subject: input.filter.to_string(),
            ack_wait: Duration::from_secs(self.ack_wait_secs),
            max_deliver: self.max_deliver,
            retry_delay: Duration::from_millis(self.retry_delay_ms),
            concurrency,
        }
    }
}

impl From<&Durable> for ConsumerSettings {
    fn from(d: &Durable) -> ConsumerSettings {
        ConsumerSettings {
            durable: d.name.to_string(),
            concurrency: d.concurrency,
            ack_wait_secs: d.ack_wait_secs,
            max_deliver: d.max_deliver,
            retry_delay_ms: d.retry_delay_ms,
        }
    }
}

/// Which stage of the topology a type is (written by [`declare_stage!`](crate::declare_stage)).
pub trait Named {
    /// Its entry in the topology.
    const NAME: StageName;
}

/// Declares a stage crate's names in one line: the stage type, `STAGE`, and the aliases
/// `FileConfig` (its config file) and `Config` (validated); the crate then writes
/// `impl Stage for` the type.
#[macro_export]
macro_rules! declare_stage {
    ($(#[$meta:meta])* $ty:ident = $name:ident) => {
        $(#[$meta])*
        pub struct $ty;

        /// The stage's name: its durable, its dead-letter subject and its metrics label.
        pub const STAGE: $crate::StageName = $crate::StageName::$name;

        /// The stage's config file.
        pub type FileConfig = $crate::StageFile<$ty>;

        /// The stage's validated config.
        pub type Config = $crate::Validated<$ty>;

        impl $crate::stage::Named for $ty {
            const NAME: $crate::StageName = STAGE;
        }
    };
}

/// A stage's own settings (its `[<name>]` section less the consumer keys), which check
/// themselves into the typed config the stage runs with.
pub trait Validate:
    Serialize + DeserializeOwned + Default + Clone + PartialEq + fmt::Debug + Send
{
    /// The settings once validated.
    type Config: Send + 'static;

    /// Checks the settings, adding every problem (keys prefixed with the stage's name) to
    /// `p`; returns the typed config when they are sound.
    fn validate(self, p: &mut Problems) -> Option<Self::Config>;
}

/// The validated config of stage `T`.
pub type ConfigOf<T> = <<T as Stage>::Settings as Validate>::Config;

/// A pipeline stage.
pub trait Stage: Named + Sized + 'static {
    /// Its own settings.
    type Settings: Validate;
    /// Why it stopped.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Command-line flags of its own ([`NoArgs`] when it has none).
    type Args: clap::Args + Send + 'static;

    /// Applies the command-line flags to the file config before validation, adding any
    /// problem with them to `p`.
    fn apply_args(_args: &Self::Args, _file: &mut StageFile<Self>, _p: &mut Problems) {}

    /// Runs until `ctx.shutdown` (or for good, with an error).
    fn run(
        config: Validated<Self>,
        ctx: Context,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// What the binary does with its flags: [`Stage::run`] unless a flag asks for another
    /// mode (the ingester's `--once`).
    fn launch(
        _args: Self::Args,
        config: Validated<Self>,
        ctx: Context,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        Self::run(config, ctx)
    }
}

/// No flags of its own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NoArgs {}

/// What a running stage is given.
#[derive(Clone)]
pub struct Context {
    /// Its NATS connection.
    pub client: async_nats::Client,
    /// Cancelled on SIGINT/SIGTERM (or by whoever started it in-process).
    pub shutdown: Shutdown,
}

/// A stage's section: its own settings and, for a consuming stage, the consumer block, in
/// one TOML table (the keys of both side by side, as the pipeline file has always had them).
// derive_where: a derive would ask the stage type itself to be Clone, Debug and PartialEq.
#[derive_where(Clone, Debug, PartialEq)]
pub struct Section<T: Stage> {
    /// The consumer block, for a stage with a durable input.
    pub consumer: Option<ConsumerSettings>,
    /// The stage's own settings.
    pub settings: T::Settings,
}

impl<T: Stage> Default for Section<T> {
    fn default() -> Self {
        Section {
            consumer: ConsumerSettings::defaults(T::NAME),
            settings: T::Settings::default(),
        }
    }
}

impl<T: Stage> Serialize for Section<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = match serde_json::to_value(&self.settings) {
            Ok(Value::Object(m)) => m,
            Ok(_) => Map::new(),
            Err(e) => return Err(serde::ser::Error::custom(e)),
        };
        if let Some(c) = &self.consumer {
            if let Ok(Value::Object(m)) = serde_json::to_value(c) {
                map.extend(m);
            }
        }
        // An unset optional value is left out (TOML has no null), as serde does for the
        // fields of a struct.
        let mut value = Value::Object(map);
        drop_nulls(&mut value);
        value.serialize(s)
    }
}

impl<'de, T: Stage> Deserialize<'de> for Section<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut own = Map::<String, Value>::deserialize(d)?;
        let consumer = match ConsumerSettings::defaults(T::NAME) {
            None => None,
            Some(defaults) => {
                // The given consumer keys over the stage's defaults.
                let mut block = match serde_json::to_value(defaults) {
                    Ok(Value::Object(m)) => m,
                    _ => Map::new(),
                };
                for key in ConsumerSettings::KEYS {
                    if let Some(v) = own.remove(key) {
                        block.insert(key.to_string(), v);
                    }
                }
                Some(from_value::<ConsumerSettings, D::Error>(Value::Object(
                    block,
                ))?)
            }
        };
        let settings = from_value::<T::Settings, D::Error>(Value::Object(own))?;
        Ok(Section { consumer, settings })
    }
}

fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Deserializes `value`, naming the key of a bad value (`max_width: invalid type ...`).
fn from_value<T: DeserializeOwned, E: serde::de::Error>(value: Value) -> Result<T, E> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            E::custom(inner)
        } else {
            E::custom(format!("{path}: {inner}"))
        }
    })
}

/// A stage's config file: the shared sections and the stage's own.
#[derive_where(Clone, Debug, PartialEq)]
pub struct StageFile<T: Stage> {
    /// NATS connection.
    pub nats: NatsConfig,
    /// `/metrics` endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// The `[<stage>]` section.
    pub stage: Section<T>,
}

impl<T: Stage> Default for StageFile<T> {
    fn default() -> Self {
        StageFile {
            nats: NatsConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            stage: Section::default(),
        }
    }
}

impl<T: Stage> Serialize for StageFile<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("nats", &self.nats)?;
        m.serialize_entry("metrics", &self.metrics)?;
        m.serialize_entry("log", &self.log)?;
        m.serialize_entry(T::NAME.name(), &self.stage)?;
        m.end()
    }
}

impl<'de, T: Stage> Deserialize<'de> for StageFile<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        let mut file = StageFile::<T>::default();
        let name = T::NAME.name();
        for (key, value) in map {
            let in_section = |e: D::Error| D::Error::custom(format!("[{key}] {e}"));
            match key.as_str() {
                "nats" => file.nats = from_value::<_, D::Error>(value).map_err(in_section)?,
                "metrics" => file.metrics = from_value::<_, D::Error>(value).map_err(in_section)?,
                "log" => file.log = from_value::<_, D::Error>(value).map_err(in_section)?,
                k if k == name => {
                    file.stage = from_value::<_, D::Error>(value).map_err(in_section)?
                }
                other => {
                    return Err(D::Error::custom(format!(
                        "unknown section `{other}`, expected `nats`, `metrics`, `log` or `{name}`"
                    )))
                }
            }
        }
        Ok(file)
    }
}

impl<T: Stage> StageFile<T> {
    /// Loads the file (if any) under `PCB_*` environment variables.
    pub fn load(path: Option<&Path>) -> Result<StageFile<T>, ConfigError> {
        settings::load_config(path)
    }

    /// Checks every value and reports all problems at once.
    pub fn validate(self) -> Result<Validated<T>, Problems> {
        let mut p = Problems::default();
        self.nats.validate("nats", &mut p);
        self.metrics.validate("metrics", &mut p);
        self.log.validate("log", &mut p);
        let name = T::NAME.name();
        if let Some(c) = &self.stage.consumer {
            c.validate(name, &mut p);
        }
        let config = self.stage.settings.validate(&mut p);
        p.into_result()?;
        let Some(config) = config else {
            // A stage that refuses without saying why is a bug; say so rather than run.
            return Err(Problems(vec![format!("{name}: refused without a reason")]));
        };
        Ok(Validated {
            consumer: self.stage.consumer.and_then(|c| c.spec(T::NAME)),
            nats: self.nats,
            metrics: self.metrics,
            log: self.log,
            config,
        })
    }
}

/// A stage's config, validated.
pub struct Validated<T: Stage> {
    /// NATS connection.
    pub nats: NatsConfig,
    /// `/metrics`.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Its durable consumer, for a consuming stage.
    pub consumer: Option<ConsumerSpec>,
    /// Its own settings.
    pub config: ConfigOf<T>,
}

impl<T: Stage> fmt::Debug for Validated<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validated")
            .field("nats", &self.nats)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl<T: Stage> Validated<T> {
    /// The durable consumer (every consuming stage has one by construction).
    pub fn consumer(&self) -> Result<&ConsumerSpec, StartError> {
        self.consumer.as_ref().ok_or(StartError::NoConsumer {
            stage: T::NAME.name(),
        })
    }
}

/// Why a stage started in-process did not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E: std::error::Error + 'static> {
    /// Its config was refused.
    #[error("invalid configuration:\n{0}")]
    Invalid(Problems),
    /// It stopped with an error.
    #[error(transparent)]
    Run(E),
}

/// Validates `file` and runs the stage in this process (tests, benchmarks, `pcb`).
pub async fn run<T: Stage>(
    file: StageFile<T>,
    client: async_nats::Client,
    shutdown: Shutdown,
) -> Result<(), RunError<T::Error>> {
    let config = file.validate().map_err(RunError::Invalid)?;
    T::run(config, Context { client, shutdown })
        .await
        .map_err(RunError::Run)
}

#[derive(clap::Parser)]
struct Cli<A: clap::Args> {
    /// TOML config file; `PCB_<SECTION>__<KEY>` environment variables override it.
    #[arg(long, short, env = "PCB_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    args: A,
}

/// The whole `main` of a stage binary: flags, config (file, `PCB_*`, flags, validation),
/// tracing, the NATS connection and the shutdown signals, then [`Stage::launch`].
pub fn main<T: Stage>() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let name = T::NAME.name();
    let command = Cli::<T::Args>::command()
        .name(name)
        .version(env!("CARGO_PKG_VERSION"))
        .about(format!("The {name} stage: {}.", T::NAME.decl().summary));
    let cli = match Cli::<T::Args>::from_arg_matches(&command.get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let fail = |what: &str, e: &dyn fmt::Display| {
        eprintln!("error: {name} {what}: {e}");
        ExitCode::FAILURE
    };
    let mut file = match StageFile::<T>::load(cli.config.as_deref()) {
        Ok(f) => f,
        Err(e) => return fail("cannot start", &e),
    };
    let mut from_args = Problems::default();
    T::apply_args(&cli.args, &mut file, &mut from_args);
    let config = match (file.validate(), from_args.0.is_empty()) {
        (Ok(c), true) => c,
        (result, _) => {
            let mut p = from_args;
            if let Err(more) = result {
                p.0.extend(more.0);
            }
            return fail(
                "cannot start",
                &ConfigError::invalid(cli.config.as_deref(), p),
            );
        }
    };
    init_tracing(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail("cannot start its runtime", &e),
    };
    runtime.block_on(async move {
        let client = match crate::connect(&config.nats, &format!("pcb-{name}")).await {
            Ok(c) => c,
            Err(e) => return fail("cannot start", &e),
        };
        let ctx = Context {
            client,
            shutdown: Shutdown::on_signals(),
        };
        match T::launch(cli.args, config, ctx).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("failed", &ErrorChain(&e)),
        }
    })
}

/// An error with its sources, `: `-separated.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Why a stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Streams, buckets or consumers it needs are missing.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    /// The metrics endpoint could not bind.
    #[error("binding /metrics on {addr}: {source}")]
    Metrics {
        /// Configured address.
        addr: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A consuming stage was validated without its consumer block.
    #[error("{stage} has no consumer settings")]
    NoConsumer {
        /// The stage.
        stage: &'static str,
    },
}

/// Why a consuming stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// It could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Its consumer stopped.
    #[error(transparent)]
    Consume(#[from] crate::ack::ConsumeError),
}

/// The whole life of a stage that handles one message at a time: checks its topology,
/// serves `/metrics`, then runs the handler `make` builds (given the JetStream context)
/// over its durable consumer under the ack policy, until shutdown.
pub async fn consume<T, H, Fut>(
    config: &Validated<T>,
    ctx: Context,
    make: impl FnOnce(jetstream::Context) -> H,
) -> Result<(), ServeError>
where
    T: Stage,
    H: Fn(crate::ack::Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = crate::Outcome> + Send + 'static,
{
    let metrics = Metrics::new(T::NAME.name());
    let js = prepare(
        T::NAME,
        &ctx.client,
        &metrics,
        &config.metrics,
        &ctx.shutdown,
    )
    .await?;
    let consumer = config.consumer()?.clone();
    let handler = make(js.clone());
    crate::run_consumer(js, consumer, metrics, ctx.shutdown, handler).await?;
    Ok(())
}

/// Checks that the streams and buckets `stage` needs exist (they are created by `pcb init`
/// or `pcb up`, never by a stage) and serves `/metrics`; returns the JetStream context the
/// stage works with.
pub async fn prepare(
    stage: StageName,
    client: &async_nats::Client,
    metrics: &Metrics,
    metrics_cfg: &MetricsConfig,
    shutdown: &Shutdown,
) -> Result<jetstream::Context, StartError> {
    let js = jetstream::new(client.clone());
    crate::topology::require(&js, stage).await?;
    metrics
        .serve(metrics_cfg, shutdown.clone())
        .await
        .map_err(|source| StartError::Metrics {
            addr: metrics_cfg.addr.clone(),
            source,
        })?;
    Ok(js)
}

/// Whether `stage` reads `filter` through a durable consumer of its own (a test aid for
/// stages that check their wiring against the topology).
pub fn reads_durably(stage: StageName, filter: &str) -> bool {
    stage
        .decl()
        .inputs
        .iter()
        .any(|i| i.filter == filter && matches!(i.mode, ReadMode::Durable(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Own {
        /// A limit.
        limit: u32,
        /// Unset by default.
        dir: Option<String>,
    }

    struct Probe;

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    impl Named for Probe {
        const NAME: StageName = StageName::Router;
    }

    impl Validate for Own {
        type Config = u32;

        fn validate(self, p: &mut Problems) -> Option<u32> {
            p.check(self.limit > 10, "router.limit", "at most 10");
            Some(self.limit)
        }
    }

    impl Stage for Probe {
        type Settings = Own;
        type Error = Never;
        type Args = NoArgs;

        async fn run(_: Validated<Self>, _: Context) -> Result<(), Never> {
            Ok(())
        }
    }

    fn parse(text: &str) -> Result<StageFile<Probe>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = dir.path().join("router.toml");
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        settings::load_config_from_env(Some(&p), vec![]).map_err(|e| e.to_string())
    }

    #[test]
    fn consumer_keys_and_own_keys_share_the_section() {
        let f = parse("[router]\nlimit = 3\nack_wait_secs = 7\n").expect("parse");
        assert_eq!(f.stage.settings.limit, 3);
        let c = f.stage.consumer.clone().expect("consumer");
        assert_eq!(c.ack_wait_secs, 7);
        assert_eq!(c.durable, "router", "the topology's durable is the default");
        let v = f.validate().expect("valid");
        let spec = v.consumer.expect("spec");
        assert_eq!(spec.stream, "PCB_IMAGES");
        assert_eq!(spec.filter_subject, "pcb.images.encoded");
        assert_eq!(spec.ack_wait, Duration::from_secs(7));
    }

    #[test]
    fn unknown_keys_and_sections_are_named() {
        let e = parse("[router]\nlimt = 3\n").unwrap_err();
        assert!(e.contains("limt") && e.contains("router.toml"), "{e}");
        let e = parse("[routr]\nlimit = 3\n").unwrap_err();
        assert!(e.contains("routr") && e.contains("expected"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let f =
            parse("[nats]\nurl = \"\"\n[router]\nlimit = 11\nmax_deliver = 0\n").expect("parse");
        let p = f.validate().unwrap_err().to_string();
        assert!(p.contains("router.limit"), "{p}");
        assert!(p.contains("router.max_deliver"), "{p}");
        assert!(p.contains("nats.url"), "{p}");
    }

    #[test]
    fn an_unset_optional_value_is_left_out_not_lost_with_the_section() {
        let mut f = StageFile::<Probe>::default();
        let text = toml::to_string(&f).expect("an unset option serialises");
        assert!(text.contains("[router]") && !text.contains("dir"), "{text}");
        f.stage.settings.dir = Some("x".into());
        let text = toml::to_string(&f).expect("toml");
        assert!(text.contains("dir = \"x\""), "{text}");
    }

    #[test]
    fn a_section_round_trips_with_its_keys_side_by_side() {
        let f = StageFile::<Probe>::default();
        let text = toml::to_string(&f).expect("toml");
        assert!(text.contains("[router]"), "{text}");
        assert!(
            text.contains("limit = 0") && text.contains("durable = \"router\""),
            "{text}"
        );
        let back: StageFile<Probe> = parse(&text).expect("parse");
        assert_eq!(back, f);
        assert!(reads_durably(StageName::Router, "pcb.images.encoded"));
    }
}
