//! The viewer's in-memory index of detections: one compact entry per board (its latest
//! answer), aggregates per line and 5-minute bucket kept up to date as detections arrive,
//! so pages read sums of buckets instead of rescanning the stream.

use std::collections::{BTreeMap, HashMap, VecDeque};

use pcb_schemas::Detection;
use serde::Serialize;

/// Width of an aggregate bucket.
pub const BUCKET_MS: i64 = 300_000;
/// Bins of the confidence histogram over 0..1.
pub const CONFIDENCE_BINS: usize = 20;
/// Columns a heat-map row aims for.
const HEATMAP_COLUMNS: i64 = 48;

/// What a list shows of one detection.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// sha256 of the image file.
    pub image_id: String,
    /// Board identifier.
    pub board_id: String,
    /// Production line.
    pub line_id: String,
    /// Source path.
    pub source: String,
    /// Capture time, ms since the epoch.
    pub captured_at: i64,
    /// Detection time, ms since the epoch.
    pub detected_at: i64,
    /// `name@version`.
    pub model: String,
    /// `pass` or `fail`.
    pub verdict: pcb_schemas::Verdict,
    /// Number of reported defects.
    pub defects: usize,
    /// Class of the best-scoring defect.
    pub top_class: Option<String>,
    /// Its score.
    pub top_score: Option<f32>,
    /// Model milliseconds for the image.
    pub inference_ms: f64,
    /// How unsure the model is of this board: its boxes' uncertainty summed, a box scoring
    /// s counting 1 − |2s − 1| (1 at 0.5, 0 at 0 or 1). More boxes the model is torn on,
    /// more to learn from a correction.
    pub uncertainty: f32,
}

/// One board's entry: its summary and what its aggregates counted, so a newer answer for
/// the same image can take the older one's place in the sums.
#[derive(Debug, Clone)]
struct Entry {
    summary: Summary,
    /// Sequence of the detection message in its stream (for the defects' boxes).
    seq: u64,
    classes: Vec<(String, u32)>,
    confidence: [u32; CONFIDENCE_BINS],
}

/// Sums over some boards.
#[derive(Debug, Clone, Default)]
struct Cell {
    boards: u64,
    failed: u64,
    defects: u64,
    classes: HashMap<String, u64>,
    confidence: [u64; CONFIDENCE_BINS],
}

impl Cell {
    fn apply(&mut self, e: &Entry, sign: i64) {
        let add = |v: &mut u64, n: u64| {
            *v = if sign > 0 {
                v.saturating_add(n)
            } else {
                v.saturating_sub(n)
            }
        };
        add(&mut self.boards, 1);
        add(&mut self.failed, u64::from(e.summary.verdict == "fail"));
        add(&mut self.defects, e.summary.defects as u64);
        for (c, n) in &e.classes {
            add(self.classes.entry(c.clone()).or_default(), u64::from(*n));
        }
        for (i, n) in e.confidence.iter().enumerate() {
            add(&mut self.confidence[i], u64::from(*n));
        }
    }

    fn merge(&mut self, o: &Cell) {
        self.boards += o.boards;
        self.failed += o.failed;
        self.defects += o.defects;
        for (c, n) in &o.classes {
            *self.classes.entry(c.clone()).or_default() += n;
        }
        for (i, n) in o.confidence.iter().enumerate() {
            self.confidence[i] += n;
        }
    }
}

/// Filters of the board list; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exact line.
    pub line: Option<String>,
    /// Substring of the board id.
    pub board: Option<String>,
    /// `pass` or `fail`.
    pub verdict: Option<pcb_schemas::Verdict>,
    /// A class among the board's defects.
    pub class: Option<String>,
    /// Detected at or after, ms.
    pub from: Option<i64>,
    /// Detected before, ms.
    pub to: Option<i64>,
}

/// A page of the board list.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Boards matching the filter.
    pub total: usize,
    /// 1-based page.
    pub page: usize,
    /// Boards per page.
    pub page_size: usize,
    /// Pages in all.
    pub pages: usize,
    /// This page, newest first.
    pub items: Vec<Summary>,
}

/// One line's row of the heat-map.
#[derive(Debug, Clone, Serialize)]
pub struct HeatRow {
    /// The line.
    pub line: String,
    /// One cell per column.
    pub cells: Vec<HeatCell>,
}

/// A heat-map cell.
#[derive(Debug, Clone, Serialize)]
pub struct HeatCell {
    /// Boards inspected.
    pub boards: u64,
    /// Of which failed.
    pub failed: u64,
}

/// The heat-map of failures per line over time.
#[derive(Debug, Clone, Serialize)]
pub struct Heatmap {
    /// Column width.
    pub bucket_ms: i64,
    /// Column starts, ms.
    pub starts: Vec<i64>,
    /// Rows.
    pub lines: Vec<HeatRow>,
}

/// A class and its defect count.
#[derive(Debug, Clone, Serialize)]
pub struct ClassCount {
    /// Class name.
    pub class: String,
    /// Defects.
    pub count: u64,
}

/// A histogram bin.
#[derive(Debug, Clone, Serialize)]
pub struct Bin {
    /// Lower edge.
    pub lo: f64,
    /// Upper edge.
    pub hi: f64,
    /// Defects scored in it.
    pub count: u64,
}

/// The overview of a time window.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The window, seconds (0: all time).
    pub window_secs: i64,
    /// Start, ms.
    pub from_ms: i64,
    /// End, ms.
    pub to_ms: i64,
    /// Boards inspected.
    pub inspected: u64,
    /// Passed.
    pub passed: u64,
    /// Failed.
    pub failed: u64,
    /// passed / inspected.
    pub r#yield: Option<f64>,
    /// Defects reported.
    pub defects: u64,
    /// Defects per inspected board.
    pub defect_rate: Option<f64>,
    /// Classes by defect count, descending.
    pub pareto: Vec<ClassCount>,
    /// Failures per line over time.
    pub heatmap: Heatmap,
    /// Defect scores.
    pub confidence: Vec<Bin>,
    /// Latest boards, newest first.
    pub recent: Vec<Summary>,
}

/// A board whose boxes' summed uncertainty is below this is not waiting for its
/// uncertainty (one box at 0.75 or 0.25 makes 0.5).
pub const MIN_UNCERTAINTY: f32 = 0.5;
/// What a board adds to its usefulness when a shadow version's verdict differs from live's.
pub const SHADOW_DISAGREES: f64 = 0.75;
/// The review queue's look at a line: the last day against the week before it.
const DAY_MS: i64 = 86_400_000;
/// A line whose fail rate moved by more than this many standard errors has drifted.
const DRIFT_Z: f64 = 3.0;

/// A shadow version's verdict on a board, by model name and image id: the shadow's version
/// and its verdict, or None when it has not answered that board.
pub type ShadowVerdict<'a> = dyn Fn(&str, &str) -> Option<(u64, pcb_schemas::Verdict)> + 'a;

/// One board of the review queue, most useful first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueItem {
    /// The board.
    pub summary: Summary,
    /// How useful a correction of it would be (higher first).
    pub usefulness: f64,
    /// Why it is in the queue.
    pub reasons: Vec<String>,
}

/// The review queue.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Queue {
    /// Boards waiting for a review (uncertain, or of a drifted line; not corrected yet).
    pub waiting: usize,
    /// Boards corrected in the viewer, of those indexed.
    pub corrected: usize,
    /// The most useful waiting boards, first the most useful.
    pub items: Vec<QueueItem>,
    /// Lines whose fail rate in the last day moved away from the week before.
    pub drifted: Vec<Drift>,
}

/// A line's fail rate, the last day against the week before.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Drift {
    /// The line.
    pub line: String,
    /// Fail rate over the last day.
    pub recent: f64,
    /// Fail rate over the week before.
    pub before: f64,
    /// Their difference in standard errors.
    pub z: f64,
}

/// One version's answers over a period (a canary beside the live version).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VersionTally {
    /// The version.
    pub version: u64,
    /// Boards whose answer (the latest) it gave in the period.
    pub boards: u64,
    /// Of them, boards it failed.
    pub failed: u64,
    /// `failed / boards` (None: no board).
    pub fail_rate: Option<f64>,
    /// Of them, boards an operator corrected.
    pub corrected: u64,
    /// Of those, boards whose verdict the correction confirms.
    pub right: u64,
    /// `right / corrected` (None: no corrected board).
    pub accuracy: Option<f64>,
}

/// The index.
#[derive(Debug, Default)]
pub struct Index {
    /// Entries in arrival (stream) order; a replaced one leaves `None`. `by_image` holds
    /// positions counted from the first entry ever added: `base` of them were evicted.
    entries: VecDeque<Option<Entry>>,
    base: usize,
    by_image: HashMap<String, usize>,
    buckets: BTreeMap<i64, HashMap<String, Cell>>,
    lines: BTreeMap<String, u64>,
    live: usize,
}

fn bucket_of(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS) * BUCKET_MS
}

impl Index {
    /// Boards indexed.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Lines seen, sorted.
    pub fn lines(&self) -> Vec<String> {
        self.lines.keys().cloned().collect()
    }

    /// Takes a detection (message `seq` of its stream); a board's newer answer replaces its
    /// older one, an older one is ignored. Returns the board's summary when it changed.
    pub fn add(&mut self, d: &Detection, seq: u64) -> Option<Summary> {
        let entry = entry_of(d, seq);
        if let Some(&i) = self.by_image.get(&d.image_id) {
            let newer = match &self.entries[i - self.base] {
                Some(old) => {
                    (old.summary.detected_at, old.seq) <= (entry.summary.detected_at, entry.seq)
                }
                None => true,
            };
            if !newer {
                return None;
            }
            if let Some(old) = self.entries[i - self.base].take() {
                self.apply(&old, -1);
                self.live -= 1;
            }
        }
        self.apply(&entry, 1);
        let summary = entry.summary.clone();
        self.by_image
            .insert(summary.image_id.clone(), self.base + self.entries.len());
        self.entries.push_back(Some(entry));
        self.live += 1;
        Some(summary)
    }

    /// Forgets the boards whose detection message is no longer in its stream (sequence
    /// below `first_seq`: aged out or dropped for room), so the index holds what the
    /// stream holds and its memory stays flat; returns how many went.
    pub fn evict_before(&mut self, first_seq: u64) -> usize {
        let mut gone = 0;
        while let Some(front) = self.entries.front() {
            if front.as_ref().is_some_and(|e| e.seq >= first_seq) {
                break;
            }
            let pos = self.base;
            self.base += 1;
            if let Some(Some(e)) = self.entries.pop_front() {
                self.apply(&e, -1);
                self.live -= 1;
                if self.by_image.get(&e.summary.image_id) == Some(&pos) {
                    self.by_image.remove(&e.summary.image_id);
                }
                gone += 1;
            }
        }
        // Sums that reached nothing are dropped with their keys.
        self.buckets.retain(|_, cells| {
            cells.retain(|_, c| c.boards > 0);
            !cells.is_empty()
        });
        self.lines.retain(|_, n| *n > 0);
        gone
    }

    fn apply(&mut self, e: &Entry, sign: i64) {
        let cells = self
            .buckets
            .entry(bucket_of(e.summary.detected_at))
            .or_default();
        cells
            .entry(e.summary.line_id.clone())
            .or_default()
            .apply(e, sign);
        let n = self.lines.entry(e.summary.line_id.clone()).or_default();
        *n = if sign > 0 {
            *n + 1
        } else {
            n.saturating_sub(1)
        };
    }

    /// The board's summary and the sequence of its detection message.
    pub fn board(&self, image_id: &str) -> Option<(Summary, u64)> {
        let i = *self.by_image.get(image_id)?;
        self.entries[i - self.base]
            .as_ref()
            .map(|e| (e.summary.clone(), e.seq))
    }

    /// The board's live verdict and its defects per class (what a shadow version's answer
    /// is compared with).
    pub fn verdict_and_classes(
        &self,
        image_id: &str,
    ) -> Option<(pcb_schemas::Verdict, Vec<(String, u32)>)> {
        let i = *self.by_image.get(image_id)?;
        self.entries[i - self.base]
            .as_ref()
            .map(|e| (e.summary.verdict, e.classes.clone()))
    }

    /// What each of `versions` of model `name` answered among the boards detected at or
    /// after `since_ms`: boards, failed, and right on the corrected ones (`truth` gives a
    /// corrected board's verdict). One pass over the boards indexed.
    pub fn versions_since(
        &self,
        name: &str,
        versions: &[u64],
        since_ms: i64,
        truth: impl Fn(&str) -> Option<pcb_schemas::Verdict>,
    ) -> Vec<VersionTally> {
        let mut out: Vec<VersionTally> = versions
            .iter()
            .map(|&version| VersionTally {
                version,
                ..VersionTally::default()
            })
            .collect();
        for e in self.entries.iter().flatten() {
            let s = &e.summary;
            if s.detected_at < since_ms {
                continue;
            }
            let Some(version) = s
                .model
                .strip_prefix(name)
                .and_then(|v| v.strip_prefix('@'))
                .and_then(|v| v.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(t) = out.iter_mut().find(|t| t.version == version) else {
                continue;
            };
            t.boards += 1;
            t.failed += u64::from(s.verdict == pcb_schemas::Verdict::Fail);
            if let Some(truth) = truth(&s.image_id) {
                t.corrected += 1;
                t.right += u64::from(s.verdict == truth);
            }
        }
        for t in &mut out {
            t.fail_rate = (t.boards > 0).then(|| t.failed as f64 / t.boards as f64);
            t.accuracy = (t.corrected > 0).then(|| t.right as f64 / t.corrected as f64);
        }
        out
    }

    /// Lines whose fail rate over the day before `now_ms` differs from the week before that
    /// by more than [`DRIFT_Z`] standard errors (two-proportion z; at least 20 boards each).
    pub fn drifted_lines(&self, now_ms: i64) -> Vec<Drift> {
        let mut recent: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut before: HashMap<&str, (u64, u64)> = HashMap::new();
        for (start, cells) in self.buckets.range(now_ms - 8 * DAY_MS..) {
            let into = if *start >= now_ms - DAY_MS {
                &mut recent
            } else {
                &mut before
            };
            for (line, c) in cells {
                let e = into.entry(line.as_str()).or_default();
                e.0 += c.failed;
                e.1 += c.boards;
            }
        }
        let mut out = Vec::new();
        for (line, (f1, n1)) in recent {
            let Some(&(f0, n0)) = before.get(line) else {
                continue;
            };
            if n1 < 20 || n0 < 20 {
                continue;
            }
            let (p1, p0) = (f1 as f64 / n1 as f64, f0 as f64 / n0 as f64);
            let p = (f1 + f0) as f64 / (n1 + n0) as f64;
            let se = (p * (1.0 - p) * (1.0 / n1 as f64 + 1.0 / n0 as f64)).sqrt();
            let z = if se > 0.0 { (p1 - p0).abs() / se } else { 0.0 };
            if z > DRIFT_Z {
                out.push(Drift {
                    line: line.to_string(),
                    recent: p1,
                    before: p0,
                    z,
                });
            }
        }
        out.sort_by(|a, b| b.z.total_cmp(&a.z));
        out
    }

    /// The review queue: `limit` of the boards not yet corrected, most useful first (then
    /// newest), each with why.
    ///
    /// - Uncertain boards, stratified by line: within each line the waiting boards are
    ///   ranked by their [`Summary::uncertainty`], and a board counts 1 − (rank + ½) / (the
    ///   line's boards), so the top of the queue holds every line in proportion to its
    ///   boards, the most uncertain of each first (a board under [`MIN_UNCERTAINTY`] counts
    ///   nothing). Measured on DeepPCB (`tests/recipe/queue-experiment.sh`): ranking by
    ///   uncertainty alone crowded one board design into the top; the lines' proportions
    ///   keep the picks as varied as the boards.
    /// - A shadow version (`shadow(model name, image)`) giving another verdict adds
    ///   [`SHADOW_DISAGREES`].
    /// - A board of the last day from a drifted line adds 0.5.
    pub fn queue(
        &self,
        corrected: &dyn Fn(&str) -> bool,
        shadow: &ShadowVerdict<'_>,
        limit: usize,
        now_ms: i64,
    ) -> Queue {
        let drifted = self.drifted_lines(now_ms);
        let mut items = Vec::new();
        let mut corrected_n = 0;
        for e in self.entries.iter().rev().flatten() {
            let s = &e.summary;
            if corrected(&s.image_id) {
                corrected_n += 1;
                continue;
            }
            let mut usefulness = 0.0;
            let mut reasons = Vec::new();
            let name = s
                .model
                .rsplit_once('@')
                .map_or(s.model.as_str(), |(n, _)| n);
            if let Some((version, verdict)) = shadow(name, &s.image_id) {
                if verdict != s.verdict {
                    usefulness += SHADOW_DISAGREES;
                    reasons.push(format!(
                        "shadow v{version} says {verdict}, live {} says {}",
                        s.model, s.verdict
                    ));
                }
            }
            if s.detected_at >= now_ms - DAY_MS {
                if let Some(d) = drifted.iter().find(|d| d.line == s.line_id) {
                    usefulness += 0.5;
                    reasons.push(format!(
                        "line {} drifted: {:.0}% failed in the last day, {:.0}% the week before",
                        d.line,
                        d.recent * 100.0,
                        d.before * 100.0
                    ));
                }
            }
            items.push(QueueItem {
                summary: s.clone(),
                usefulness,
                reasons,
            });
        }
        // Each line's boards by uncertainty, most first; ties keep the newest first.
        let mut by_line: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            by_line
                .entry(item.summary.line_id.as_str())
                .or_default()
                .push(i);
        }
        // Each board's place in its line (1-based) and the line's waiting boards.
        let mut rank = vec![(0usize, 0usize); items.len()];
        for members in by_line.values_mut() {
            members.sort_by(|&a, &b| {
                items[b]
                    .summary
                    .uncertainty
                    .total_cmp(&items[a].summary.uncertainty)
            });
            let n = members.len();
            for (k, &i) in members.iter().enumerate() {
                rank[i] = (k + 1, n);
            }
        }
        for (i, item) in items.iter_mut().enumerate() {
            let u = item.summary.uncertainty;
            if u >= MIN_UNCERTAINTY {
                let (k, n) = rank[i];
                item.usefulness += 1.0 - (k as f64 - 0.5) / n as f64;
                item.reasons.insert(
                    0,
                    format!(
                        "uncertain: {u:.2} summed over its boxes, {k} of the {n} boards of line {} waiting",
                        item.summary.line_id
                    ),
                );
            }
        }
        items.retain(|i| i.usefulness > 0.0);
        let waiting = items.len();
        // Stable: among equals the more uncertain, then the newest (iteration order), first.
        items.sort_by(|a, b| {
            b.usefulness
                .total_cmp(&a.usefulness)
                .then(b.summary.uncertainty.total_cmp(&a.summary.uncertainty))
        });
        items.truncate(limit);
        Queue {
            waiting,
            corrected: corrected_n,
            items,
            drifted,
        }
    }

    /// One page of the boards matching `f`, newest first.
    pub fn page(&self, f: &Filter, page: usize, page_size: usize) -> Page {
        let page = page.max(1);
        let skip = (page - 1).saturating_mul(page_size);
        let mut total = 0usize;
        let mut items = Vec::new();
        for e in self.entries.iter().rev().flatten() {
            if !matches(e, f) {
                continue;
            }
            if total >= skip && items.len() < page_size {
                items.push(e.summary.clone());
            }
            total += 1;
        }
        Page {
            total,
            page,
            page_size,
            pages: total.div_ceil(page_size.max(1)).max(1),
            items,
        }
    }

    /// The overview of the last `window_secs` before `now_ms` (0: everything).
    pub fn overview(&self, window_secs: i64, now_ms: i64) -> Overview {
        let first = self
            .buckets
            .keys()
            .next()
            .copied()
            .unwrap_or(bucket_of(now_ms));
        let from = if window_secs > 0 {
            now_ms - window_secs * 1000
        } else {
            first
        };
        let mut total = Cell::default();
        for (_, cells) in self.buckets.range(bucket_of(from)..) {
            for c in cells.values() {
                total.merge(c);
            }
        }
        let mut pareto: Vec<ClassCount> = total
            .classes
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| ClassCount {
                class: c.clone(),
                count: *n,
            })
            .collect();
        pareto.sort_by(|a, b| b.count.cmp(&a.count).then(a.class.cmp(&b.class)));
        let confidence = total
            .confidence
            .iter()
            .enumerate()
            .map(|(i, n)| Bin {
                lo: i as f64 / CONFIDENCE_BINS as f64,
                hi: (i + 1) as f64 / CONFIDENCE_BINS as f64,
                count: *n,
            })
            .collect();
        let recent = self
            .entries
            .iter()
            .rev()
            .flatten()
            .take(20)
            .map(|e| e.summary.clone())
            .collect();
        let passed = total.boards - total.failed.min(total.boards);
        Overview {
            window_secs,
            from_ms: from,
            to_ms: now_ms,
            inspected: total.boards,
            passed,
            failed: total.failed,
            r#yield: (total.boards > 0).then(|| passed as f64 / total.boards as f64),
            defects: total.defects,
            defect_rate: (total.boards > 0).then(|| total.defects as f64 / total.boards as f64),
            pareto,
            heatmap: self.heatmap(from, now_ms),
            confidence,
            recent,
        }
    }

    fn heatmap(&self, from: i64, to: i64) -> Heatmap {
        let span = (to - from).max(BUCKET_MS);
        let width =
            ((span / HEATMAP_COLUMNS).max(BUCKET_MS) + BUCKET_MS - 1) / BUCKET_MS * BUCKET_MS;
        let start = bucket_of(from);
        let columns = ((to - start) / width + 1).max(1) as usize;
        let starts: Vec<i64> = (0..columns).map(|i| start + i as i64 * width).collect();
        let mut rows: BTreeMap<String, Vec<HeatCell>> = BTreeMap::new();
        for (bucket, cells) in self.buckets.range(start..) {
            let col = ((bucket - start) / width) as usize;
            if col >= columns {
                continue;
            }
            for (line, c) in cells {
                if c.boards == 0 {
                    continue;
                }
                let row = rows.entry(line.clone()).or_insert_with(|| {
                    (0..columns)
                        .map(|_| HeatCell {
                            boards: 0,
                            failed: 0,
                        })
                        .collect()
                });
                row[col].boards += c.boards;
                row[col].failed += c.failed;
            }
        }
        Heatmap {
            bucket_ms: width,
            starts,
            lines: rows
                .into_iter()
                .map(|(line, cells)| HeatRow { line, cells })
                .collect(),
        }
    }
}

fn matches(e: &Entry, f: &Filter) -> bool {
    let s = &e.summary;
    f.line.as_ref().is_none_or(|l| &s.line_id == l)
        && f.board
            .as_ref()
            .is_none_or(|b| s.board_id.contains(b.as_str()))
        && f.verdict.is_none_or(|v| s.verdict == v)
        && f.class
            .as_ref()
            .is_none_or(|c| e.classes.iter().any(|(k, _)| k == c))
        && f.from.is_none_or(|t| s.detected_at >= t)
        && f.to.is_none_or(|t| s.detected_at < t)
}

fn entry_of(d: &Detection, seq: u64) -> Entry {
    let mut classes: Vec<(String, u32)> = Vec::new();
    let mut confidence = [0u32; CONFIDENCE_BINS];
    for defect in &d.defects {
        match classes.iter_mut().find(|(c, _)| *c == defect.class) {
            Some((_, n)) => *n += 1,
            None => classes.push((defect.class.clone(), 1)),
        }
        let bin = ((defect.score.clamp(0.0, 1.0) * CONFIDENCE_BINS as f32) as usize)
            .min(CONFIDENCE_BINS - 1);
        confidence[bin] += 1;
    }
    let top = d.defects.iter().max_by(|a, b| a.score.total_cmp(&b.score));
    Entry {
        summary: Summary {
            image_id: d.image_id.clone(),
            board_id: d.board_id.clone(),
            line_id: d.line_id.clone(),
            source: d.source.clone(),
            captured_at: d.captured_at,
            detected_at: d.detected_at,
            model: format!("{}@{}", d.model.name, d.model.version),
            verdict: d.verdict,
            defects: d.defects.len(),
            top_class: top.map(|t| t.class.clone()),
            top_score: top.map(|t| t.score),
            inference_ms: d.inference_ms,
            uncertainty: d
                .defects
                .iter()
                .map(|x| 1.0 - (2.0 * x.score.clamp(0.0, 1.0) - 1.0).abs())
                .sum(),
        },
        seq,
        classes,
        confidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcb_schemas::{Defect, ModelRef};

    fn det(id: &str, line: &str, at: i64, version: u64, scores: &[(f32, &str)]) -> Detection {
        let defects: Vec<Defect> = scores
            .iter()
            .map(|(s, c)| Defect {
                x1: 1.0,
                y1: 2.0,
                x2: 3.0,
                y2: 4.0,
                class_id: 1,
                class: c.to_string(),
                score: *s,
            })
            .collect();
        Detection {
            image_id: id.into(),
            board_id: format!("board-{id}"),
            line_id: line.into(),
            source: format!("{line}/{id}.jpg"),
            captured_at: at - 1000,
            detected_at: at,
            model: ModelRef {
                name: "m".into(),
                version,
            },
            verdict: if defects.iter().any(|d| d.score >= 0.5) {
                pcb_schemas::Verdict::Fail
            } else {
                pcb_schemas::Verdict::Pass
            },
            defects,
            inference_ms: 10.0,
        }
    }

    #[test]
    fn a_canary_is_counted_beside_live_over_its_period() {
        let mut ix = Index::default();
        let t = 1_700_000_000_000;
        // Before the canary: not counted.
        ix.add(&det("old", "l1", t - 1, 1, &[(0.9, "open")]), 1);
        ix.add(&det("a", "l1", t, 1, &[(0.9, "open")]), 2);
        ix.add(&det("b", "l1", t + 1, 1, &[]), 3);
        ix.add(&det("c", "l1", t + 2, 2, &[(0.9, "open")]), 4);
        ix.add(&det("d", "l1", t + 3, 2, &[(0.9, "open")]), 5);
        ix.add(&det("e", "l1", t + 4, 2, &[]), 6);
        // Another model's version 2 is not this one's.
        let mut other = det("f", "l1", t + 5, 2, &[]);
        other.model.name = "m2".into();
        ix.add(&other, 7);
        let truth = |id: &str| match id {
            "a" | "c" => Some(pcb_schemas::Verdict::Pass),
            "b" => Some(pcb_schemas::Verdict::Pass),
            _ => None,
        };
        let t2 = ix.versions_since("m", &[2, 1], t, truth);
        assert_eq!((t2[0].version, t2[0].boards, t2[0].failed), (2, 3, 2));
        assert_eq!((t2[0].corrected, t2[0].right), (1, 0));
        assert_eq!(t2[0].accuracy, Some(0.0));
        assert_eq!((t2[1].version, t2[1].boards, t2[1].failed), (1, 2, 1));
        assert_eq!((t2[1].corrected, t2[1].right), (2, 1));
        assert_eq!(t2[1].fail_rate, Some(0.5));
    }

    #[test]
    fn the_queue_puts_uncertain_boards_first_and_leaves_out_corrected_ones() {
        let mut ix = Index::default();
        let t = 1_700_000_000_000;
        ix.add(&det("sure-fail", "l1", t, 1, &[(0.98, "short")]), 1);
        ix.add(&det("near", "l1", t + 1, 1, &[(0.52, "open")]), 2);
        // Two boxes the model is torn on weigh more than one.
        ix.add(
            &det("torn", "l1", t + 2, 1, &[(0.6, "spur"), (0.7, "open")]),
            3,
        );
        ix.add(&det("clean", "l1", t + 3, 1, &[]), 4);
        ix.add(&det("done", "l1", t + 4, 1, &[(0.5, "open")]), 5);
        let no_shadow = |_: &str, _: &str| None;
        let q = ix.queue(&|id| id == "done", &no_shadow, 10, t + 10);
        let ids: Vec<&str> = q
            .items
            .iter()
            .map(|i| i.summary.image_id.as_str())
            .collect();
        assert_eq!(ids, ["torn", "near"]);
        assert_eq!((q.waiting, q.corrected), (2, 1));
        // 0.8 + 0.6 summed; first of the line's 4 waiting boards: 1 − 0.5 / 4.
        assert!((q.items[0].summary.uncertainty - 1.4).abs() < 1e-5, "{q:?}");
        assert!((q.items[0].usefulness - 0.875).abs() < 1e-9, "{q:?}");
        assert_eq!(
            q.items[0].reasons,
            ["uncertain: 1.40 summed over its boxes, 1 of the 4 boards of line l1 waiting"]
        );
        let one = ix.queue(&|_| false, &no_shadow, 1, t + 10);
        assert_eq!((one.items.len(), one.waiting), (1, 3));
        // A shadow version that would fail the clean board puts it in (0.75), between the
        // two uncertain ones (0.875 and 0.625).
        let shadow = |name: &str, id: &str| {
            (name == "m" && id == "clean").then_some((2, pcb_schemas::Verdict::Fail))
        };
        let q = ix.queue(&|id| id == "done", &shadow, 10, t + 10);
        let ids: Vec<&str> = q
            .items
            .iter()
            .map(|i| i.summary.image_id.as_str())
            .collect();
        assert_eq!(ids, ["torn", "clean", "near"]);
        assert_eq!(
            q.items[1].reasons,
            ["shadow v2 says fail, live m@1 says pass"]
        );
    }

    #[test]
    fn the_queue_takes_every_line_in_proportion_to_its_boards() {
        let mut ix = Index::default();
        let t = 1_700_000_000_000;
        // Line l1: 8 boards, each more uncertain than any of line l2's 2 boards.
        for i in 0..8u64 {
            let s = 0.5 + 0.02 * i as f32;
            let id = format!("l1-{i}");
            ix.add(
                &det(&id, "l1", t + i as i64, 1, &[(s, "open"), (s, "short")]),
                i + 1,
            );
        }
        ix.add(&det("l2-a", "l2", t + 10, 1, &[(0.6, "spur")]), 20);
        ix.add(&det("l2-b", "l2", t + 11, 1, &[(0.2, "spur")]), 21);
        let q = ix.queue(&|_| false, &|_, _| None, 5, t + 20);
        let ids: Vec<&str> = q
            .items
            .iter()
            .map(|i| i.summary.image_id.as_str())
            .collect();
        // l1's shares 1/16, 3/16, 5/16 … and l2's 1/4: l2's best comes third, not tenth.
        assert_eq!(ids, ["l1-0", "l1-1", "l2-a", "l1-2", "l1-3"]);
        // l2-b (0.4) is under the minimum: not waiting.
        assert_eq!(q.waiting, 9);
    }

    #[test]
    fn a_line_whose_fail_rate_jumped_in_the_last_day_has_drifted() {
        let mut ix = Index::default();
        let now = 1_700_000_000_000 + 8 * DAY_MS;
        let mut seq = 0;
        let mut add = |ix: &mut Index, line: &str, at: i64, fail: bool| {
            seq += 1;
            let scores: &[(f32, &str)] = if fail { &[(0.99, "open")] } else { &[] };
            ix.add(&det(&format!("{line}-{seq}"), line, at, 1, scores), seq);
        };
        // The week before: 10% failed on both lines; the last day: l2 jumps to 60%.
        for i in 0..100 {
            let at = now - 3 * DAY_MS + i * 60_000;
            add(&mut ix, "l1", at, i % 10 == 0);
            add(&mut ix, "l2", at, i % 10 == 0);
        }
        for i in 0..50 {
            let at = now - DAY_MS / 2 + i * 60_000;
            add(&mut ix, "l1", at, i % 10 == 0);
            add(&mut ix, "l2", at, i % 10 < 6);
        }
        let d = ix.drifted_lines(now);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].line, "l2");
        assert!((d[0].recent - 0.6).abs() < 1e-9 && (d[0].before - 0.1).abs() < 1e-9);
        let q = ix.queue(&|_| false, &|_, _| None, 500, now);
        // Only the last day's boards of the drifted line (their scores are far from 0.5).
        assert_eq!(q.waiting, 50);
        assert!(q.items.iter().all(|i| i.summary.line_id == "l2"));
        assert!(
            q.items[0].reasons[0].contains("line l2 drifted: 60% failed"),
            "{:?}",
            q.items[0]
        );
    }

    #[test]
    fn overview_counts_yield_pareto_and_confidence() {
        let mut ix = Index::default();
        let t = 1_700_000_000_000;
        ix.add(&det("a", "l1", t, 1, &[(0.9, "short"), (0.2, "open")]), 1);
        ix.add(&det("b", "l1", t + 1000, 1, &[(0.3, "short")]), 2);
        ix.add(&det("c", "l2", t + 2000, 1, &[]), 3);
        let o = ix.overview(3600, t + 10_000);
        assert_eq!((o.inspected, o.passed, o.failed, o.defects), (3, 2, 1, 3));
        assert!((o.r#yield.expect("yield") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(o.pareto[0].class, "short");
        assert_eq!(o.pareto[0].count, 2);
        assert_eq!(o.confidence.iter().map(|b| b.count).sum::<u64>(), 3);
        assert_eq!(o.confidence[18].count, 1, "0.9 falls in [0.90, 0.95)");
        assert_eq!(o.recent[0].image_id, "c", "newest first");
        let rows: Vec<&str> = o.heatmap.lines.iter().map(|r| r.line.as_str()).collect();
        assert_eq!(rows, ["l1", "l2"]);
        let l1: u64 = o.heatmap.lines[0].cells.iter().map(|c| c.failed).sum();
        assert_eq!(l1, 1);
    }

    #[test]
    fn a_newer_answer_replaces_the_older_in_every_sum() {
        let mut ix = Index::default();
        let t = 1_700_000_000_000;
        ix.add(&det("a", "l1", t, 1, &[(0.9, "short")]), 1);
        assert!(ix.add(&det("a", "l1", t + 5, 2, &[]), 2).is_some());
        assert!(
            ix.add(&det("a", "l1", t + 1, 1, &[(0.9, "spur")]), 3)
                .is_none(),
            "an older answer arriving late is ignored"
        );
        let o = ix.overview(0, t + 10);
        assert_eq!((ix.len(), o.inspected, o.failed, o.defects), (1, 1, 0, 0));
        assert!(o.pareto.is_empty());
        assert_eq!(
            ix.board("a").map(|(s, seq)| (s.model, seq)),
            Some(("m@2".into(), 2))
        );
    }

    #[test]
    fn boards_the_stream_no_longer_holds_are_forgotten_with_their_sums() {
        let mut ix = Index::default();
        let t = 1_700_000_000_000;
        ix.add(&det("a", "l1", t, 1, &[(0.9, "short")]), 1);
        ix.add(&det("b", "l2", t + 1, 1, &[]), 2);
        ix.add(&det("c", "l1", t + 2, 1, &[(0.8, "open")]), 3);
        // A's newer answer comes later in the stream: A stays when its first answer goes.
        ix.add(&det("a", "l1", t + 3, 2, &[]), 4);
        assert_eq!(
            ix.evict_before(3),
            1,
            "b (seq 2) goes; a's seq 1 was replaced"
        );
        assert_eq!(ix.len(), 2);
        assert!(ix.board("b").is_none());
        assert_eq!(ix.board("a").map(|(_, seq)| seq), Some(4));
        assert_eq!(ix.lines(), ["l1"], "a line with no board left is dropped");
        let o = ix.overview(0, t + 10);
        assert_eq!((o.inspected, o.failed, o.defects), (2, 1, 1));
        assert_eq!(ix.evict_before(5), 2);
        assert!(ix.is_empty() && ix.lines().is_empty());
        assert_eq!(ix.overview(0, t + 10).inspected, 0);
        // Positions stay right after eviction.
        ix.add(&det("d", "l3", t + 4, 1, &[]), 6);
        assert_eq!(ix.board("d").map(|(_, seq)| seq), Some(6));
        assert_eq!(ix.evict_before(6), 0);
    }

    #[test]
    fn pages_filter_and_count() {
        let mut ix = Index::default();
        let t = 1_700_000_000_000;
        for i in 0..25 {
            let line = if i % 2 == 0 { "even" } else { "odd" };
            let scores: &[(f32, &str)] = if i % 5 == 0 { &[(0.8, "spur")] } else { &[] };
            ix.add(
                &det(&format!("{i:03}"), line, t + i, 1, scores),
                i as u64 + 1,
            );
        }
        let all = ix.page(&Filter::default(), 1, 10);
        assert_eq!((all.total, all.pages, all.items.len()), (25, 3, 10));
        assert_eq!(all.items[0].image_id, "024");
        let last = ix.page(&Filter::default(), 3, 10);
        assert_eq!(last.items.len(), 5);
        let odd_fail = ix.page(
            &Filter {
                line: Some("odd".into()),
                verdict: Some(pcb_schemas::Verdict::Fail),
                ..Filter::default()
            },
            1,
            10,
        );
        assert_eq!(odd_fail.total, 2, "5 and 15");
        let spur = ix.page(
            &Filter {
                class: Some("spur".into()),
                from: Some(t + 10),
                ..Filter::default()
            },
            1,
            10,
        );
        assert_eq!(spur.total, 3, "10, 15, 20");
        let board = ix.page(
            &Filter {
                board: Some("board-01".into()),
                ..Filter::default()
            },
            1,
            50,
        );
        assert_eq!(board.total, 10, "010..019");
    }
}
