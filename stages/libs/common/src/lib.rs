//! Shared foundation of every pipeline stage: layered config, NATS connection, idempotent
//! JetStream provisioning, the ack policy, graceful shutdown, tracing and `/metrics`.

pub mod ack;
pub mod identity;
pub mod metrics;
pub mod nats;
pub mod objects;
pub mod room;
pub mod scan;
pub mod settings;
pub mod shutdown;
pub mod stage;
pub mod sweep;
pub mod telemetry;
pub mod topology;

pub use ack::{
    publish, run_batched_consumer, run_consumer, Batching, ConsumerSpec, Outcome, Rejection,
};
pub use identity::{Identity, IdentityStore};
pub use metrics::{Metrics, MetricsConfig};
pub use nats::{connect, NatsConfig};
pub use objects::{FilesError, ImageFiles, LazyFiles};
pub use pcb_schemas::StageName;
pub use room::{make_room, Trimmed};
pub use settings::{load_config, ConfigError, Problems};
pub use shutdown::Shutdown;
pub use stage::{
    ConfigOf, ConsumerSettings, Context, NoArgs, Stage, StageFile, Validate, Validated,
};
pub use sweep::{sweep_image_files, SweepMemory, Swept};
pub use telemetry::{init_tracing, LogConfig};
pub use topology::{apply_streams, provision, require, StreamSettings, Topology};

/// Milliseconds since the Unix epoch, the time unit of every message.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The first 8 bytes as spaced hex (`ff d8 ff e0 ...`): how a refusal shows what a file
/// really starts with.
pub fn first_bytes_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
