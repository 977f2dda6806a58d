//! The ack policy and the consumer loop: ack on success, nak with delay on a transient
//! failure, and for a poison message a dead letter with its reason, then term.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use pcb_schemas::topology::StageName;
use pcb_schemas::{encode, headers_for, rejected_subject, CodecError, DeadLetter, Envelope};
use tokio::sync::Semaphore;

use crate::{metrics::Metrics, now_ms, shutdown::Shutdown};

/// A refusal: the input can never succeed, so it becomes a dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Machine-readable reason, e.g. `not-an-image`.
    pub reason_code: String,
    /// Human-readable reason naming the problem.
    pub reason: String,
    /// Image id, when known.
    pub image_id: Option<String>,
    /// Source path of the file, when known.
    pub source: String,
}

impl Rejection {
    /// A rejection of `source` for `reason_code` with a readable `reason`.
    pub fn new(reason_code: &str, reason: impl Into<String>) -> Self {
        Rejection {
            reason_code: reason_code.to_string(),
            reason: reason.into(),
            image_id: None,
            source: String::new(),
        }
    }

    /// Adds what identifies the input.
    pub fn about(mut self, image_id: Option<String>, source: impl Into<String>) -> Self {
        self.image_id = image_id;
        self.source = source.into();
        self
    }

    /// The dead letter `stage` publishes for it.
    pub fn dead_letter(
        &self,
        stage: &str,
        subject: Option<String>,
        stream_seq: Option<u64>,
    ) -> DeadLetter {
        DeadLetter {
            stage: stage.to_string(),
            reason_code: self.reason_code.clone(),
            reason: self.reason.clone(),
            image_id: self.image_id.clone(),
            source: self.source.clone(),
            moved_to: None,
            subject,
            stream_seq,
            at_ms: now_ms(),
        }
    }
}

/// What a handler decided about one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Processed: ack.
    Done,
    /// Processed, but there was nothing to do (e.g. an unlabelled image at the router): ack.
    Skipped,
    /// A transient failure (NATS unavailable, ...): nak with a delay, dead letter after the
    /// last allowed delivery.
    Retry(String),
    /// The output stream is full: nak with a delay and come back when it has room, never a
    /// dead letter (back-pressure: a full stream refuses new records, it deletes nothing).
    Backpressure(String),
    /// A poison message: dead letter with the reason, then term.
    Reject(Rejection),
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] CodecError),
    /// The server did not take or did not acknowledge the message.
    #[error("publishing to {subject}: {message}")]
    Send {
        /// Subject published to.
        subject: String,
        /// What went wrong.
        message: String,
    },
}

impl PublishError {
    /// Whether the stream refused the message for being full (its `max_bytes` or
    /// `max_msgs` reached under `discard: new`).
    pub fn is_stream_full(&self) -> bool {
        match self {
            PublishError::Send { message, .. } => is_full_message(message),
            PublishError::Encode(_) => false,
        }
    }

    /// What a consuming stage does about it: back-pressure for a full stream, a retry for
    /// anything else.
    pub fn outcome(self, what: &str) -> Outcome {
        if self.is_stream_full() {
            Outcome::Backpressure(format!("{what}: {self}"))
        } else {
            Outcome::Retry(format!("{what}: {self}"))
        }
    }
}

/// The server's words for a stream that refuses a message under `discard: new`.
pub fn is_full_message(text: &str) -> bool {
    let t = text.to_lowercase();
    t.contains("maximum bytes exceeded")
        || t.contains("maximum messages exceeded")
        || t.contains("maximum messages per subject exceeded")
}

/// Publishes `msg` with its headers and waits for JetStream's ack; the ack says whether the
/// message was a duplicate.
pub async fn publish<T: Envelope>(
    js: &jetstream::Context,
    subject: String,
    msg: &T,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let payload = encode(msg)?;
    let mut headers = HeaderMap::new();
    for (k, v) in headers_for(msg) {
        headers.insert(k, v.as_str());
    }
    let send_err = |e: &dyn std::fmt::Display| PublishError::Send {
        subject: subject.clone(),
        message: e.to_string(),
    };
    let pending = js
        .publish_with_headers(subject.clone(), headers, Bytes::from(payload))
        .await
        .map_err(|e| send_err(&e))?;
    pending.await.map_err(|e| send_err(&e))
}

/// Publishes a dead letter on `pcb.rejected.<stage>`.
pub async fn publish_dead_letter(
    js: &jetstream::Context,
    letter: &DeadLetter,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    publish(js, rejected_subject(&letter.stage), letter).await
}

/// A durable pull consumer and how to process it.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// The stage (dead letters go to `pcb.rejected.<stage>`).
    pub stage: StageName,
    /// Stream to consume.
    pub stream: String,
    /// Durable name, shared by every replica of the stage.
    pub durable: String,
    /// Subject filter within the stream.
    pub filter_subject: String,
    /// Redeliver a message not acked within this time.
    pub ack_wait: Duration,
    /// Deliveries before a failing message becomes a dead letter.
    pub max_deliver: i64,
    /// Delay before a nak'ed message is redelivered.
    pub retry_delay: Duration,
    /// Messages processed at once by this process.
    pub concurrency: usize,
}

/// Why a consumer loop stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The stream or the durable consumer is missing or could not be opened.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    /// The durable consumer could not be created or opened.
    #[error("creating consumer {durable} on {stream}: {message}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Durable name.
        durable: String,
        /// What the server said.
        message: String,
    },
    /// The message stream ended or failed for good (consumer deleted, ...).
    #[error("consumer {durable} stopped: {message}")]
    Ended {
        /// Durable name.
        durable: String,
        /// Why.
        message: String,
    },
}

/// One delivered message as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The subject it was published on.
    pub subject: String,
    /// Its payload.
    pub payload: Bytes,
    /// Its headers.
    pub headers: Option<HeaderMap>,
    /// How many times it has been delivered (1 the first time).
    pub delivered: i64,
    /// Its stream sequence.
    pub stream_seq: u64,
}

impl Delivery {
    /// The value of the schema header, when present.
    pub fn schema(&self) -> Option<&str> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(pcb_schemas::SCHEMA_HEADER))
            .map(|v| v.as_str())
    }

    /// Its record; one that does not decode as `T` is poison (it never will), so the error
    /// is the `undecodable` rejection naming the message.
    pub fn decode<T: pcb_schemas::Envelope>(&self) -> Result<T, Rejection> {
        pcb_schemas::decode(&self.payload, self.schema()).map_err(|e| {
            Rejection::new(
                "undecodable",
                format!(
                    "message #{} on {} is not a {} record: {e}",
                    self.stream_seq,
                    self.subject,
                    T::SCHEMA
                ),
            )
        })
    }
}

/// How many messages a batched handler gets at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most messages in one batch.
    pub max_batch: usize,
    /// How long a batch waits for more after its first message.
    pub max_wait: Duration,
}

impl Batching {
    /// One message at a time.
    pub const ONE: Batching = Batching {
        max_batch: 1,
        max_wait: Duration::ZERO,
    };
}

/// Runs `handler` over the consumer of `spec` until `shutdown`, settling every message by
/// the ack policy. In-flight messages finish before it returns. It returns an error, never
/// silently, when the consumer cannot go on.
pub async fn run_consumer<H, Fut>(
    js: jetstream::Context,
    spec: ConsumerSpec,
    metrics: Metrics,
    shutdown: Shutdown,
    handler: H,
) -> Result<(), ConsumeError>
where
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let handler = Arc::new(handler);
    let one = move |batch: Vec<Delivery>| {
        let handler = handler.clone();
        async move {
            let mut out = Vec::with_capacity(batch.len());
            for d in batch {
                out.push(handler(d).await);
            }
            out
        }
    };
    run_batched_consumer(js, spec, metrics, shutdown, Batching::ONE, one).await
}

/// [`run_consumer`] for a handler that takes a batch (up to `batching.max_batch` messages,
/// gathered for at most `batching.max_wait`) and answers one outcome per message, in order.
/// Each message is settled on its own by the same ack policy: a poison message in a batch
/// is dead-lettered alone while the others are answered. A handler that answers fewer
/// outcomes than messages gets the rest retried.
pub async fn run_batched_consumer<H, Fut>(
    js: jetstream::Context,
    spec: ConsumerSpec,
    metrics: Metrics,
    shutdown: Shutdown,
    batching: Batching,
    handler: H,
) -> Result<(), ConsumeError>
where
    H: Fn(Vec<Delivery>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<Outcome>> + Send + 'static,
{
    let consumer = crate::topology::open_consumer(&js, spec.stage, &spec).await?;
    let max_batch = batching.max_batch.max(1);
    let mut messages = consumer
        .stream()
        // A batched handler holds whole batches: prefetch no more than it can work on, or
        // messages would wait past their ack deadline and be redelivered elsewhere.
        .max_messages_per_batch(
            spec.concurrency.max(1) * if max_batch == 1 { 4 } else { max_batch },
        )
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| ConsumeError::Consumer {
            stream: spec.stream.clone(),
            durable: spec.durable.clone(),
            message: e.to_string(),
        })?;
    tracing::info!(stream = %spec.stream, durable = %spec.durable, filter = %spec.filter_subject, concurrency = spec.concurrency, max_batch, "consuming");
    let handler = Arc::new(handler);
    let spec = Arc::new(spec);
    let permits = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let ended = |message: String| ConsumeError::Ended {
        durable: spec.durable.clone(),
        message,
    };
    let result = loop {
        // A permit first: messages are taken only when they can be worked on.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = messages.next() => next,
        };
        while tasks.try_join_next().is_some() {}
        let first = match next {
            None => break Err(ended("message stream ended".into())),
            Some(Err(e)) => match pull_error(&spec, e) {
                Some(e) => break Err(e),
                None => continue,
            },
            Some(Ok(msg)) => msg,
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + batching.max_wait;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(m))) => batch.push(m),
                Ok(Some(Err(e))) => {
                    if let Some(e) = pull_error(&spec, e) {
                        tracing::warn!(error = %e, "consumer ending after this batch");
                    }
                    break;
                }
                _ => break,
            }
        }
        let (handler, spec, js, metrics) =
            (handler.clone(), spec.clone(), js.clone(), metrics.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let deliveries: Vec<Delivery> = batch.iter().map(delivery_of).collect();
            let meta: Vec<(i64, u64)> = deliveries
                .iter()
                .map(|d| (d.delivered, d.stream_seq))
                .collect();
            let mut outcomes = handler(deliveries).await.into_iter();
            let settled = batch.iter().zip(meta).map(|(msg, (delivered, seq))| {
                let outcome = outcomes.next().unwrap_or_else(|| {
                    Outcome::Retry("the handler gave no answer for this message".into())
                });
                settle(&js, &spec, &metrics, msg, outcome, delivered, seq)
            });
            futures::future::join_all(settled).await;
            for _ in 0..batch.len() {
                metrics.observe_processing(started.elapsed());
            }
            drop(permit);
        });
    };
    // Let the messages already taken finish, so a clean stop leaves nothing half done.
    while tasks.join_next().await.is_some() {}
    result
}

/// A pull error that ends the consumer, or `None` (logged) when it can go on.
fn pull_error(
    spec: &ConsumerSpec,
    e: jetstream::consumer::pull::MessagesError,
) -> Option<ConsumeError> {
    use jetstream::consumer::pull::MessagesErrorKind as K;
    match e.kind() {
        K::ConsumerDeleted => Some(ConsumeError::Ended {
            durable: spec.durable.clone(),
            message: e.to_string(),
        }),
        _ => {
            tracing::warn!(durable = %spec.durable, error = %e, "pull error, continuing");
            None
        }
    }
}

fn delivery_of(msg: &jetstream::Message) -> Delivery {
    let (delivered, stream_seq) = msg
        .info()
        .map(|i| (i.delivered, i.stream_sequence))
        .unwrap_or((1, 0));
    Delivery {
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        delivered,
        stream_seq,
    }
}

async fn settle(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    metrics: &Metrics,
    msg: &jetstream::Message,
    outcome: Outcome,
    delivered: i64,
    stream_seq: u64,
) {
    let outcome = match outcome {
        Outcome::Retry(error) if spec.max_deliver > 0 && delivered >= spec.max_deliver => {
            Outcome::Reject(Rejection::new(
                "retries-exhausted",
                format!("gave up after {delivered} deliveries; last error: {error}"),
            ))
        }
        other => other,
    };
    let ack = match &outcome {
        Outcome::Done | Outcome::Skipped => {
            metrics.count(outcome_label(&outcome));
            metrics.set_backpressure(false);
            AckKind::Ack
        }
        Outcome::Retry(error) => {
            tracing::warn!(stage = %spec.stage, seq = stream_seq, delivered, %error, "transient failure, will retry");
            metrics.count("retry");
            AckKind::Nak(Some(spec.retry_delay))
        }
        Outcome::Backpressure(error) => {
            metrics.count("backpressure");
            metrics.set_backpressure(true);
            // Every held message would say the same: once in a while is enough.
            if backpressure_log_due() {
                tracing::warn!(stage = %spec.stage, %error, "output stream full: holding messages until it has room (raise its limit with `pcb init`, or let its consumers catch up)");
            }
            AckKind::Nak(Some(spec.retry_delay))
        }
        Outcome::Reject(r) => {
            let letter = r.dead_letter(
                spec.stage.name(),
                Some(msg.subject.to_string()),
                Some(stream_seq),
            );
            match publish_dead_letter(js, &letter).await {
                Ok(_) => {
                    tracing::debug!(stage = %spec.stage, seq = stream_seq, reason = %r.reason, "dead-lettered");
                    metrics.count("rejected");
                    metrics.count_rejection(&r.reason_code);
                    AckKind::Term
                }
                Err(e) => {
                    tracing::warn!(stage = %spec.stage, seq = stream_seq, error = %e, "dead letter not stored, will retry");
                    metrics.count("retry");
                    AckKind::Nak(Some(spec.retry_delay))
                }
            }
        }
    };
    if let Err(e) = msg.ack_with(ack).await {
        // The message will be redelivered after ack_wait; dedup makes that harmless.
        tracing::warn!(stage = %spec.stage, seq = stream_seq, error = %e, "ack not sent");
    }
}

fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Done => "done",
        Outcome::Skipped => "skipped",
        Outcome::Retry(_) => "retry",
        Outcome::Backpressure(_) => "backpressure",
        Outcome::Reject(_) => "rejected",
    }
}

/// Whether a back-pressure warning is due: at most one every 10 s per process.
pub fn backpressure_log_due() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = LAST.load(Ordering::Relaxed);
    now >= last + 10
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_becomes_a_complete_dead_letter() {
        let r = Rejection::new("not-an-image", "bytes are not an image")
            .about(Some("abc".into()), "line1/x.jpg");
        let d = r.dead_letter("encoder", Some("pcb.images.raw".into()), Some(7));
        assert_eq!(d.stage, "encoder");
        assert_eq!(d.reason_code, "not-an-image");
        assert_eq!(d.reason, "bytes are not an image");
        assert_eq!(d.image_id.as_deref(), Some("abc"));
        assert_eq!(d.source, "line1/x.jpg");
        assert_eq!(d.subject.as_deref(), Some("pcb.images.raw"));
        assert_eq!(d.stream_seq, Some(7));
        assert!(d.at_ms > 0);
    }

    #[test]
    fn outcome_labels_are_distinct() {
        let labels = [
            outcome_label(&Outcome::Done),
            outcome_label(&Outcome::Skipped),
            outcome_label(&Outcome::Retry("x".into())),
            outcome_label(&Outcome::Reject(Rejection::new("a", "b"))),
        ];
        let mut d = labels.to_vec();
        d.dedup();
        assert_eq!(d.len(), 4);
    }
}
