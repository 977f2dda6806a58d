//! `pcb status`: message counts per stream and subject, pending counts per consumer.

use std::collections::BTreeMap;

use async_nats::jetstream;
use futures::StreamExt;
use pcb_schemas::StreamKind;

/// One stream's counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamStatus {
    /// Stream name.
    pub name: String,
    /// Whether it exists.
    pub exists: bool,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Messages per subject.
    pub subjects: BTreeMap<String, u64>,
    /// Consumers on it.
    pub consumers: Vec<ConsumerStatus>,
}

/// One consumer's progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsumerStatus {
    /// Durable name.
    pub name: String,
    /// Filter subject.
    pub filter: String,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acked.
    pub ack_pending: usize,
    /// Messages delivered more than once.
    pub redelivered: usize,
}

/// Reads every pipeline stream.
pub async fn collect(js: &jetstream::Context) -> anyhow::Result<Vec<StreamStatus>> {
    let mut out = Vec::new();
    for kind in StreamKind::ALL {
        let mut st = StreamStatus {
            name: kind.name().into(),
            ..Default::default()
        };
        let Ok(mut stream) = js.get_stream(kind.name()).await else {
            out.push(st);
            continue;
        };
        st.exists = true;
        let info = stream.info().await?;
        st.messages = info.state.messages;
        st.bytes = info.state.bytes;
        let mut subjects = stream.info_with_subjects("pcb.>").await?;
        while let Some(item) = subjects.next().await {
            let (subject, n) = item?;
            st.subjects.insert(subject, n as u64);
        }
        let mut consumers = stream.consumers();
        while let Some(c) = consumers.next().await {
            let c = c?;
            st.consumers.push(ConsumerStatus {
                name: c.name.clone(),
                filter: c.config.filter_subject.clone(),
                pending: c.num_pending,
                ack_pending: c.num_ack_pending,
                redelivered: c.num_redelivered,
            });
        }
        st.consumers.sort_by(|a, b| a.name.cmp(&b.name));
        out.push(st);
    }
    Ok(out)
}

/// Messages on `subject` across `streams`.
pub fn count(streams: &[StreamStatus], subject: &str) -> u64 {
    streams.iter().filter_map(|s| s.subjects.get(subject)).sum()
}

/// Messages on every subject starting with `prefix`.
pub fn count_prefix(streams: &[StreamStatus], prefix: &str) -> u64 {
    streams
        .iter()
        .flat_map(|s| s.subjects.iter())
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

/// Whether every consumer has nothing pending or unacked.
pub fn drained(streams: &[StreamStatus]) -> bool {
    streams
        .iter()
        .flat_map(|s| s.consumers.iter())
        .all(|c| c.pending == 0 && c.ack_pending == 0)
}

/// Whether the named durables have nothing pending (the others may: their stage is not
/// running).
pub fn drained_for(streams: &[StreamStatus], durables: &[&str]) -> bool {
    streams
        .iter()
        .flat_map(|s| s.consumers.iter())
        .filter(|c| durables.contains(&c.name.as_str()))
        .all(|c| c.pending == 0 && c.ack_pending == 0)
}

/// The human-readable report.
pub fn render(streams: &[StreamStatus]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<22} {:>10} {:>14}\n",
        "stream / subject", "messages", "bytes"
    ));
    for s in streams {
        if !s.exists {
            out.push_str(&format!("{:<22} {:>10}\n", s.name, "(missing)"));
            continue;
        }
        out.push_str(&format!(
            "{:<22} {:>10} {:>14}\n",
            s.name, s.messages, s.bytes
        ));
        for (subject, n) in &s.subjects {
            out.push_str(&format!("  {:<20} {:>10}\n", subject, n));
        }
    }
    out.push_str(&format!(
        "\n{:<28} {:<22} {:>9} {:>11} {:>11}\n",
        "consumer", "filter", "pending", "ack pending", "redelivered"
    ));
    for s in streams {
        for c in &s.consumers {
            out.push_str(&format!(
                "{:<28} {:<22} {:>9} {:>11} {:>11}\n",
                format!("{}/{}", s.name, c.name),
                c.filter,
                c.pending,
                c.ack_pending,
                c.redelivered
            ));
        }
    }
    out
}
