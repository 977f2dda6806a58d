//! Reading a stream from start to end with a private, ordered consumer, and knowing that the
//! end was reached: a reader that decides from what it did not see (the housekeeping, which
//! deletes files no record names) must never take a stalled read for the whole stream.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull::OrderedConfig, DeliverPolicy},
};
use futures::StreamExt;

/// Longest wait for the next message before a read is given up as incomplete.
const IDLE: Duration = Duration::from_secs(10);

/// Why a stream could not be read to its end.
#[derive(Debug, thiserror::Error)]
#[error("reading {stream} ({filter}): {message}")]
pub struct ScanError {
    /// The stream.
    pub stream: String,
    /// The subject filter.
    pub filter: String,
    /// What went wrong.
    pub message: String,
}

/// Calls `each(message, stream sequence, stored at)` for every message of `stream` on
/// `filter` from `policy` on, until none is left pending (messages stored meanwhile are
/// read too), and returns how many it read; stops early when `each` returns false. An
/// error means the read did not reach the end.
pub async fn read_stream<F>(
    stream: &jetstream::stream::Stream,
    filter: &str,
    policy: DeliverPolicy,
    mut each: F,
) -> Result<u64, ScanError>
where
    F: FnMut(&jetstream::Message, u64, time::OffsetDateTime) -> bool,
{
    let name = stream.cached_info().config.name.clone();
    let err = |e: &dyn std::fmt::Display| ScanError {
        stream: name.clone(),
        filter: filter.to_string(),
        message: e.to_string(),
    };
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: policy,
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let info = consumer.info().await.map_err(|e| err(&e))?;
    if info.num_pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
    let mut read = 0u64;
    loop {
        let msg = match tokio::time::timeout(IDLE, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(err(&e)),
            Ok(None) => return Err(err(&"the consumer ended before the last message")),
            Err(_) => return Err(err(&format!("no message for {} s", IDLE.as_secs()))),
        };
        let meta = msg.info().map_err(|e| err(&e))?;
        let (seq, pending, at) = (meta.stream_sequence, meta.pending, meta.published);
        read += 1;
        if !each(&msg, seq, at) || pending == 0 {
            return Ok(read);
        }
    }
}
