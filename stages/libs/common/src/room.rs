//! Room in a stream that pushes back: `PCB_IMAGES` refuses new boards when full
//! (`discard = "new"`) and, with limits retention, keeps what its consumers have processed
//! until it ages out, so a busy line would be held back for days by boards long done with.
//! [`make_room`] removes the oldest messages that every durable consumer reading them has
//! acknowledged, and only those: a board some stage has not processed is never removed,
//! so a stalled consumer still pushes back. `pcb up` runs it every few seconds.

use async_nats::jetstream;
use pcb_schemas::StreamKind;

use crate::topology::{Topology, TopologyError};
use crate::ConsumerSpec;

/// Fill (of `max_bytes` or `max_msgs`) above which room is made. Below [`ADMIT_FILL`]: a
/// stream the ingester no longer writes to always has its processed messages removed.
pub const HIGH_WATER: f64 = 0.8;
/// Fill that making room aims for.
pub const LOW_WATER: f64 = 0.7;
/// Fill above which the ingester takes no new board into `PCB_IMAGES`: the rest is the
/// encoder's, whose records of boards already in go to the same stream. Without it the
/// stream could fill with raw records the encoder can no longer encode (its output has no
/// room), which nothing processed would ever free.
pub const ADMIT_FILL: f64 = 0.85;

/// How full a stream is: the larger share of its byte and message limits (0 when
/// unlimited).
pub fn fill(info: &async_nats::jetstream::stream::Info) -> f64 {
    let share = |have: u64, max: i64| {
        if max > 0 {
            have as f64 / max as f64
        } else {
            0.0
        }
    };
    share(info.state.bytes, info.config.max_bytes)
        .max(share(info.state.messages, info.config.max_messages))
}

/// What [`make_room`] did to one subject of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// The stream.
    pub stream: &'static str,
    /// The subject filter removed from.
    pub subject: String,
    /// Messages removed.
    pub removed: u64,
    /// Fill before, in percent of the tighter limit.
    pub fill_before_pct: u32,
}

/// How many of the oldest messages go so that a stream holding `bytes` in `msgs` falls to
/// [`LOW_WATER`] of its limits (`<= 0`: none); 0 below [`HIGH_WATER`].
pub fn to_remove(bytes: u64, msgs: u64, max_bytes: i64, max_msgs: i64) -> (u64, f64) {
    let fill = |have: u64, max: i64| {
        if max > 0 {
            have as f64 / max as f64
        } else {
            0.0
        }
    };
    let fill_now = fill(bytes, max_bytes).max(fill(msgs, max_msgs));
    if fill_now < HIGH_WATER || msgs == 0 {
        return (0, fill_now);
    }
    let excess = |have: u64, max: i64| {
        if max > 0 {
            (have as f64 - LOW_WATER * max as f64).max(0.0)
        } else {
            0.0
        }
    };
    let per_msg = bytes as f64 / msgs as f64;
    let by_bytes = if per_msg > 0.0 {
        (excess(bytes, max_bytes) / per_msg).ceil()
    } else {
        0.0
    };
    let by_msgs = excess(msgs, max_msgs).ceil();
    ((by_bytes.max(by_msgs) as u64).min(msgs), fill_now)
}

/// For every stream with `make_room` set and filled past [`HIGH_WATER`]: removes its
/// oldest messages, up to what brings it to [`LOW_WATER`], of each subject read by durable
/// consumers in `consumers`, but none past the lowest acknowledgement floor of those
/// consumers. A subject no durable reads, or whose durable cannot be read, is left alone.
pub async fn make_room(
    js: &jetstream::Context,
    topo: &Topology,
    consumers: &[ConsumerSpec],
) -> Result<Vec<Trimmed>, TopologyError> {
    let mut done = Vec::new();
    for kind in StreamKind::ALL {
        if !topo.settings(kind).make_room {
            continue;
        }
        let name = kind.name();
        let info_err = |e: &dyn std::fmt::Display| TopologyError::Info {
            stream: name.into(),
            message: e.to_string(),
        };
        let mut stream = js.get_stream(name).await.map_err(|e| info_err(&e))?;
        let info = stream.info().await.map_err(|e| info_err(&e))?.clone();
        let (n, fill) = to_remove(
            info.state.bytes,
            info.state.messages,
            info.config.max_bytes,
            info.config.max_messages,
        );
        if n == 0 {
            continue;
        }
        let readers: Vec<&ConsumerSpec> = consumers.iter().filter(|c| c.stream == name).collect();
        // Per-subject floors only when no two filters can overlap (no wildcards);
        // otherwise the lowest floor of all, over the whole stream.
        let exact = readers
            .iter()
            .all(|c| !c.filter_subject.contains(['*', '>']));
        let mut floors: Vec<(String, Option<u64>)> = Vec::new();
        for c in &readers {
            let key = if exact {
                c.filter_subject.clone()
            } else {
                ">".to_string()
            };
            let floor = match stream.consumer_info(&c.durable).await {
                Ok(ci) => Some(ci.ack_floor.stream_sequence),
                Err(e) => {
                    tracing::debug!(stream = name, durable = %c.durable, error = %e, "no floor");
                    None
                }
            };
            match floors.iter_mut().find(|(k, _)| *k == key) {
                Some((_, f)) => *f = f.zip(floor).map(|(a, b)| a.min(b)),
                None => floors.push((key, floor)),
            }
        }
        let floors: Vec<(String, u64)> = floors
            .into_iter()
            .filter_map(|(k, f)| f.map(|f| (k, f)))
            .collect();
        let Some(top) = floors.iter().map(|(_, f)| f + 1).max() else {
            continue;
        };
        // The oldest first: messages below a cut that starts at the oldest `n` and moves
        // on (the oldest may be ones not yet processed) until `n` went or nothing
        // processed is left.
        let mut removed: Vec<(String, u64)> = Vec::new();
        let mut gone = 0u64;
        let mut cut = info.state.first_sequence.saturating_add(n);
        loop {
            for (subject, floor) in &floors {
                let below = cut.min(floor + 1);
                let purge = stream.purge().sequence(below);
                let purged = if subject == ">" {
                    purge.await
                } else {
                    purge.filter(subject.clone()).await
                }
                .map_err(|e| info_err(&e))?
                .purged;
                if purged > 0 {
                    gone += purged;
                    match removed.iter_mut().find(|(s, _)| s == subject) {
                        Some((_, k)) => *k += purged,
                        None => removed.push((subject.clone(), purged)),
                    }
                }
            }
            if gone >= n || cut >= top {
                break;
            }
            cut = cut.saturating_add(n - gone).min(top);
        }
        for (subject, k) in removed {
            done.push(Trimmed {
                stream: name,
                subject,
                removed: k,
                fill_before_pct: (fill * 100.0).round() as u32,
            });
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_goes_below_the_high_water_mark() {
        assert_eq!(to_remove(790, 10, 1000, -1).0, 0);
        assert_eq!(to_remove(10, 79, -1, 100).0, 0);
        assert_eq!(to_remove(0, 0, 1000, 100).0, 0);
    }

    #[test]
    fn the_oldest_go_down_to_the_low_water_mark_of_the_tighter_limit() {
        // 950 of 1000 bytes in 10 messages of 95: 250 bytes over 70%, 3 messages.
        assert_eq!(to_remove(950, 10, 1000, -1), (3, 0.95));
        // 18 of 20 messages: 4 over 70%.
        assert_eq!(to_remove(18, 18, -1, 20).0, 4);
        // Both limits: the tighter wins.
        assert_eq!(to_remove(950, 10, 1000, 100).0, 3);
        assert_eq!(to_remove(100, 95, 10_000, 100).0, 25);
    }
}
