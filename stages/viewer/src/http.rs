//! The viewer's routes: the pages (one embedded front end), the JSON API over the index,
//! the streams and the registry, the live event stream, and uploads into the pipeline.
//! Every id, name and number from a URL is checked before use; nothing is read from disk.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State as AxState};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use pcb_schemas::{
    decode, Detection, EncodedImage, RawImage, STREAM_DETECTIONS, STREAM_IMAGES, SUBJECT_RAW,
};
use serde::Deserialize;
use serde_json::json;

use crate::index::Filter;
use crate::State;

type Shared = Arc<State>;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// An error answer: a status and a message, as JSON `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, msg.into())
    }
    fn unavailable(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, msg.into())
    }
    pub(crate) fn forbidden(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::FORBIDDEN, msg.into())
    }
    pub(crate) fn unsupported(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg.into())
    }
    /// Its status.
    pub fn status(&self) -> StatusCode {
        self.0
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The routes over `state`.
pub fn router(state: Shared) -> Router {
    let upload_limit = state.config.max_upload_bytes;
    // The front end is one page that finds its view from its own path.
    let mut pages = Router::new();
    for path in ["/", "/boards", "/review", "/models", "/upload"] {
        pages = pages.route(path, get(page));
    }
    pages
        .route("/boards/:id", get(board_page))
        .route("/assets/:file", get(asset))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/status", get(status))
        .route("/api/overview", get(overview))
        .route("/api/detections", get(detections))
        .route("/api/lines", get(lines))
        .route("/api/review", get(review_queue))
        .route("/api/boards/:id", get(board))
        .route("/api/boards/:id/labels", post(save_labels))
        .route("/api/images/:id/:which", get(image))
        .route("/api/models", get(models))
        .route(
            "/api/models/:name/promote",
            post(|s, name, headers, body| change_live(s, name, headers, body, Change::Promote)),
        )
        .route(
            "/api/models/:name/rollback",
            post(|s, name, headers, body| change_live(s, name, headers, body, Change::Rollback)),
        )
        .route("/api/training", get(training))
        .route("/api/events", get(events))
        .route(
            "/api/upload",
            post(upload).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::guard::guard,
        ))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn board_page(Path(id): Path<String>) -> Response {
    match check_image_id(&id) {
        Ok(()) => Html(INDEX_HTML).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return ApiError::not_found(format!("no asset {file:?}")).into_response(),
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

async fn fallback(uri: Uri) -> ApiError {
    let path = uri.path();
    if path.split('/').any(|part| part == ".." || part == ".")
        || path.contains("%2e%2e")
        || path.contains("%2E%2E")
    {
        ApiError::bad(format!("{path:?}: relative path segments are refused"))
    } else {
        ApiError::not_found(format!("no page or API at {path:?}"))
    }
}

/// Image ids are sha256 hex digests: anything else cannot name an image.
fn check_image_id(id: &str) -> ApiResult<()> {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{:?} is not an image id (64 hexadecimal digits)",
            truncate(id, 80)
        )))
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Names of lines, classes and models: short and plain, so they can go anywhere.
fn check_label(what: &str, s: &str, max: usize) -> ApiResult<()> {
    if s.is_empty()
        || s.chars().count() > max
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
    {
        return Err(ApiError::bad(format!(
            "{what} {:?} must be 1 to {max} letters, digits, '-', '_', '.' or spaces",
            truncate(s, 80)
        )));
    }
    Ok(())
}

async fn status(AxState(s): AxState<Shared>) -> Json<serde_json::Value> {
    let indexed = s.index.read().map(|ix| ix.len()).unwrap_or_default();
    let images = s.images.read().map(|m| m.len()).unwrap_or_default();
    Json(json!({ "indexed": indexed, "images": images }))
}

#[derive(Deserialize)]
struct WindowQuery {
    window: Option<String>,
}

async fn overview(
    AxState(s): AxState<Shared>,
    Query(q): Query<WindowQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let window = match q.window.as_deref() {
        None | Some("") => 86_400,
        Some(w) => w
            .parse::<i64>()
            .ok()
            .filter(|w| (0..=366 * 86_400).contains(w))
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "window {:?} must be seconds between 0 (all time) and one year",
                    truncate(w, 40)
                ))
            })?,
    };
    let ix = s
        .index
        .read()
        .map_err(|_| ApiError::unavailable("index poisoned"))?;
    let now = pcb_common::now_ms();
    let o = ix.overview(window, now);
    let q = queue_of(&s, &ix, 0, now);
    let mut v = serde_json::to_value(o).unwrap_or_default();
    v["review"] = json!({"waiting": q.waiting, "corrected": q.corrected});
    Ok(Json(v))
}

/// The review queue over the index, with the boards corrected so far and the shadow
/// versions' answers.
fn queue_of(s: &State, ix: &crate::index::Index, limit: usize, now: i64) -> crate::index::Queue {
    // Read under the lock, not copied: the map holds every corrected board.
    let corrected = s.corrected.read().ok();
    let shadow = s.shadow.read().ok();
    ix.queue(
        &|id| corrected.as_ref().is_some_and(|c| c.contains_key(id)),
        &|name, id| shadow.as_ref().and_then(|sh| sh.verdict_of(name, id)),
        limit,
        now,
    )
}

#[derive(Deserialize, Default)]
struct QueueQuery {
    limit: Option<String>,
}

/// The boards most worth an operator's review, most useful first.
async fn review_queue(
    AxState(s): AxState<Shared>,
    Query(q): Query<QueueQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = number(
        "limit",
        q.limit.as_deref(),
        1,
        s.config.max_page_size as i64,
    )?
    .unwrap_or(50) as usize;
    let ix = s
        .index
        .read()
        .map_err(|_| ApiError::unavailable("index poisoned"))?;
    let queue = queue_of(&s, &ix, limit, pcb_common::now_ms());
    Ok(Json(serde_json::to_value(queue).unwrap_or_default()))
}

#[derive(Deserialize, Default)]
struct ListQuery {
    line: Option<String>,
    board: Option<String>,
    verdict: Option<String>,
    class: Option<String>,
    from: Option<String>,
    to: Option<String>,
    page: Option<String>,
    page_size: Option<String>,
}

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn number(what: &str, v: Option<&str>, lo: i64, hi: i64) -> ApiResult<Option<i64>> {
    match v {
        None => Ok(None),
        Some(t) => t
            .parse::<i64>()
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "{what} {:?} must be a whole number from {lo} to {hi}",
                    truncate(t, 40)
                ))
            }),
    }
}

async fn detections(
    AxState(s): AxState<Shared>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let max = s.config.max_page_size as i64;
    let page = number("page", nonempty(&q.page), 1, 10_000_000)?.unwrap_or(1) as usize;
    let page_size = number("page_size", nonempty(&q.page_size), 1, max)?.unwrap_or(50) as usize;
    let mut f = Filter::default();
    if let Some(l) = nonempty(&q.line) {
        check_label("line", l, 64)?;
        f.line = Some(l.to_string());
    }
    if let Some(b) = nonempty(&q.board) {
        if b.chars().count() > 128 {
            return Err(ApiError::bad("board filter longer than 128 characters"));
        }
        f.board = Some(b.to_string());
    }
    if let Some(v) = nonempty(&q.verdict) {
        f.verdict = Some(v.parse().map_err(|_| {
            ApiError::bad(format!(
                "verdict {:?} is neither pass nor fail",
                truncate(v, 40)
            ))
        })?);
    }
    if let Some(c) = nonempty(&q.class) {
        check_label("class", c, 64)?;
        f.class = Some(c.to_string());
    }
    f.from = number("from", nonempty(&q.from), 0, i64::MAX)?;
    f.to = number("to", nonempty(&q.to), 0, i64::MAX)?;
    let ix = s
        .index
        .read()
        .map_err(|_| ApiError::unavailable("index poisoned"))?;
    Ok(Json(
        serde_json::to_value(ix.page(&f, page, page_size)).unwrap_or_default(),
    ))
}

async fn lines(AxState(s): AxState<Shared>) -> Json<serde_json::Value> {
    let lines = s.index.read().map(|ix| ix.lines()).unwrap_or_default();
    Json(json!({ "lines": lines, "classes": pcb_schemas::CLASS_NAMES }))
}

/// The encoded record of an image, from its stream sequence.
async fn encoded(s: &State, id: &str) -> ApiResult<Option<EncodedImage>> {
    let seq = s
        .images
        .read()
        .ok()
        .and_then(|m| m.get(id).and_then(|v| v.last().copied()));
    let Some(seq) = seq else {
        return Ok(None);
    };
    let stream =
        s.js.get_stream(STREAM_IMAGES)
            .await
            .map_err(|e| ApiError::unavailable(format!("stream {STREAM_IMAGES}: {e}")))?;
    match stream.get_raw_message(seq).await {
        Ok(m) => decode::<EncodedImage>(&m.payload, None)
            .map(Some)
            .map_err(|e| ApiError::unavailable(format!("image record {seq}: {e}"))),
        // Aged out of the stream (retention): the board's answer still shows.
        Err(_) => Ok(None),
    }
}

async fn board(
    AxState(s): AxState<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    check_image_id(&id)?;
    let found = s.index.read().ok().and_then(|ix| ix.board(&id));
    let Some((summary, seq)) = found else {
        return Err(ApiError::not_found(format!("no detection for image {id}")));
    };
    let stream =
        s.js.get_stream(STREAM_DETECTIONS)
            .await
            .map_err(|e| ApiError::unavailable(format!("stream {STREAM_DETECTIONS}: {e}")))?;
    let msg = stream.get_raw_message(seq).await.map_err(|e| {
        ApiError::not_found(format!("the detection of {id} is no longer stored: {e}"))
    })?;
    let d: Detection = decode(&msg.payload, None)
        .map_err(|e| ApiError::unavailable(format!("detection record {seq}: {e}")))?;
    let record = encoded(&s, &id).await?;
    let defects: Vec<serde_json::Value> = d
        .defects
        .iter()
        .map(|x| json!({"x1": x.x1, "y1": x.y1, "x2": x.x2, "y2": x.y2, "class": x.class, "score": x.score}))
        .collect();
    let (width, height, labels, has_template) = match &record {
        Some(r) => (
            Some(r.width),
            Some(r.height),
            r.labels.as_ref().map(|ls| {
                ls.iter()
                    .map(|l| json!({"x1": l.x1, "y1": l.y1, "x2": l.x2, "y2": l.y2, "class": l.class}))
                    .collect::<Vec<_>>()
            }),
            r.has_template(),
        ),
        None => (None, None, None, false),
    };
    let history = history(&s, &id).await;
    Ok(Json(json!({
        "summary": summary,
        "model": d.model,
        "defects": defects,
        "labels": labels,
        "history": history,
        "width": width,
        "height": height,
        "has_template": has_template,
        "token_required": s.config.token.is_some(),
        "image_url": record.as_ref().map(|_| format!("/api/images/{id}/image")),
        "template_url": has_template.then(|| format!("/api/images/{id}/template")),
    })))
}

/// Most label history entries a board page shows (the newest).
const HISTORY_SHOWN: usize = 20;

/// The board's labellings, oldest first: the record it came as, then each revision (those
/// still in the stream).
async fn history(s: &State, id: &str) -> Vec<crate::review::HistoryEntry> {
    let seqs: Vec<u64> = s
        .images
        .read()
        .ok()
        .and_then(|m| m.get(id).cloned())
        .unwrap_or_default();
    let Ok(stream) = s.js.get_stream(STREAM_IMAGES).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let skip = seqs.len().saturating_sub(HISTORY_SHOWN);
    for seq in seqs.into_iter().skip(skip) {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        if let Ok(r) = decode::<EncodedImage>(&m.payload, None) {
            out.push(crate::review::HistoryEntry::of(seq, &r));
        }
    }
    out
}

/// Saves an operator's labels for a board as a label revision on `pcb.images.raw`.
async fn save_labels(
    AxState(s): AxState<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    use crate::review::{check_boxes, revision_record, LabelsBody, Reviewer, MAX_NOTE_CHARS};
    check_image_id(&id)?;
    let body: LabelsBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!(
            "body must be JSON {{labels: [{{x1, y1, x2, y2, class}}], by, note}}: {e}"
        ))
    })?;
    authorise(&s, &headers, body.token.clone(), "save labels")?;
    check_label("by", body.by.trim(), 64)?;
    let note = body
        .note
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    if let Some(n) = note {
        if n.chars().count() > MAX_NOTE_CHARS || n.chars().any(char::is_control) {
            return Err(ApiError::bad(format!(
                "the note must be one line of at most {MAX_NOTE_CHARS} characters"
            )));
        }
    }
    let Some(record) = encoded(&s, &id).await? else {
        return Err(ApiError(
            StatusCode::GONE,
            format!("the image of {id} is no longer in {STREAM_IMAGES}: it cannot be relabelled"),
        ));
    };
    let labels = check_boxes(&body.labels, record.width, record.height).map_err(ApiError::bad)?;
    let found = s.index.read().ok().and_then(|ix| ix.board(&id));
    let reviewed = found.as_ref().and_then(|(summary, _)| {
        let (name, version) = summary.model.rsplit_once('@')?;
        Some(pcb_schemas::ModelRef {
            name: name.to_string(),
            version: version.parse().ok()?,
        })
    });
    // The answer on the page, whose boxes the labels keep or delete (the deleted ones
    // train the next model as hard negatives). An answer aged out of its stream deletes
    // nothing: the labels are saved all the same.
    let answer = match &found {
        Some((_, seq)) => answer_boxes(&s, *seq).await,
        None => Vec::new(),
    };
    let raw = revision_record(
        &record,
        labels,
        Reviewer {
            by: body.by.trim(),
            note,
            reviewed,
            at_ms: pcb_common::now_ms(),
            answer: &answer,
        },
    )
    .map_err(ApiError::unavailable)?;
    let revision = pcb_schemas::record_id(&raw.image_id, raw.labels.as_deref());
    let ack = pcb_common::publish(&s.js, SUBJECT_RAW.into(), &raw)
        .await
        .map_err(|e| ApiError::unavailable(format!("publishing the labels: {e}")))?;
    s.metrics.count("relabelled");
    tracing::debug!(image = %id, %revision, by = %body.by, "label revision published");
    Ok(Json(json!({
        "image_id": id,
        "revision": revision,
        "boxes": raw.labels.as_ref().map_or(0, Vec::len),
        // The same labels saved again within the dedup window are not stored twice.
        "status": if ack.duplicate { "unchanged" } else { "queued" },
    })))
}

/// The defects of the detection at `seq` as boxes; none (with a warning) when it cannot
/// be read, as when it has aged out of its stream.
async fn answer_boxes(s: &Shared, seq: u64) -> Vec<pcb_schemas::BoxLabel> {
    let got = async {
        let stream =
            s.js.get_stream(STREAM_DETECTIONS)
                .await
                .map_err(|e| e.to_string())?;
        let msg = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| e.to_string())?;
        decode::<Detection>(&msg.payload, None).map_err(|e| e.to_string())
    };
    match got.await {
        Ok(d) => d
            .defects
            .iter()
            .map(|x| {
                pcb_schemas::BoxLabel::new([x.x1, x.y1, x.x2, x.y2], x.class_id, x.class.clone())
            })
            .collect(),
        Err(e) => {
            tracing::warn!(seq, error = %e, "the reviewed answer could not be read: no deleted boxes recorded");
            Vec::new()
        }
    }
}

async fn image(
    AxState(s): AxState<Shared>,
    Path((id, which)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_image_id(&id)?;
    if which != "image" && which != "template" {
        return Err(ApiError::not_found(format!(
            "{:?}: only image and template",
            truncate(&which, 40)
        )));
    }
    let Some(r) = encoded(&s, &id).await? else {
        return Err(ApiError::not_found(format!(
            "image {id} is not (or no longer) in {STREAM_IMAGES}"
        )));
    };
    let (b64, file) = if which == "image" {
        (Some(&r.image_b64), r.image_ref.as_ref())
    } else {
        (r.template_b64.as_ref(), r.template_ref.as_ref())
    };
    let bytes = match (file, b64) {
        // A board too large for one message: its file is in the image files' bucket.
        // Opened per request: one lookup, beside reading megabytes.
        (Some(file), _) => pcb_common::LazyFiles::new(s.js.clone())
            .get(file)
            .await
            .map_err(|e| match e {
                pcb_common::FilesError::Gone { .. } => {
                    ApiError::not_found(format!("image {id}: {e}"))
                }
                e => ApiError::unavailable(format!("image {id}: {e}")),
            })?,
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::unavailable(format!("image {id}: bad base64 ({e})")))?,
        (None, None) => {
            return Err(ApiError::not_found(format!("image {id} has no template")));
        }
    };
    let (bytes, kind) = browser_image(bytes, &r.format)?;
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        bytes,
    )
        .into_response())
}

/// Browsers show JPEG, PNG and BMP as they are; TIFF is converted to PNG.
fn browser_image(bytes: Vec<u8>, format: &str) -> ApiResult<(Vec<u8>, &'static str)> {
    match format {
        "jpeg" => Ok((bytes, "image/jpeg")),
        "png" => Ok((bytes, "image/png")),
        "bmp" => Ok((bytes, "image/bmp")),
        _ => {
            let img = image::load_from_memory(&bytes)
                .map_err(|e| ApiError::unavailable(format!("decoding a {format} image: {e}")))?;
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)
                .map_err(|e| ApiError::unavailable(format!("encoding PNG: {e}")))?;
            Ok((out.into_inner(), "image/png"))
        }
    }
}

async fn models(AxState(s): AxState<Shared>) -> ApiResult<Json<serde_json::Value>> {
    let all = s
        .registry
        .list(None)
        .await
        .map_err(|e| ApiError::unavailable(format!("registry: {e}")))?;
    let mut by_name: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
        Default::default();
    for v in all.iter().rev() {
        by_name.entry(v.name.clone()).or_default().push(json!({
            "version": v.version,
            "created_at": v.created_at_ms,
            "map": v.map_deeppcb,
            "map50": v.map50,
            "per_class_ap": v.ap_per_class,
            "job": v.job,
            "parent": v.parent_version,
            "origin": v.origin,
        }));
    }
    let mut out = Vec::new();
    for (name, versions) in by_name {
        let live = s
            .registry
            .live(&name)
            .await
            .map_err(|e| ApiError::unavailable(format!("registry: {e}")))?;
        let shadow = s
            .registry
            .shadow(&name)
            .await
            .map_err(|e| ApiError::unavailable(format!("registry: {e}")))?
            .map(|alias| shadow_comparison(&s, &name, alias));
        let canary = s
            .registry
            .canary(&name)
            .await
            .map_err(|e| ApiError::unavailable(format!("registry: {e}")))?
            .map(|alias| canary_figures(&s, &name, live.as_ref().map(|l| l.version), alias));
        out.push(json!({
            "name": name,
            "live": live.map(|l| l.version),
            "shadow": shadow,
            "canary": canary,
            "versions": versions,
        }));
    }
    Ok(Json(
        json!({"token_required": s.config.token.is_some(), "models": out}),
    ))
}

/// Boards whose verdict would change, listed on the Models page.
const CHANGED_LISTED: usize = 20;

/// The shadow alias with its comparison against the live answers.
fn shadow_comparison(
    s: &State,
    name: &str,
    alias: pcb_model_store::ShadowAlias,
) -> serde_json::Value {
    let corrected = s.corrected.read().ok();
    let (comparison, on_corrected) = match (s.shadow.read(), s.index.read()) {
        (Ok(shadow), Ok(index)) => (
            Some(shadow.compare(
                name,
                alias.version,
                |id| index.verdict_and_classes(id),
                CHANGED_LISTED,
            )),
            Some(shadow.on_corrected(
                name,
                alias.version,
                |id| index.verdict_and_classes(id).map(|(v, _)| v),
                |id| {
                    corrected.as_ref()?.get(id).map(|(_, boxes)| {
                        if *boxes > 0 {
                            pcb_schemas::Verdict::Fail
                        } else {
                            pcb_schemas::Verdict::Pass
                        }
                    })
                },
            )),
        ),
        _ => (None, None),
    };
    json!({
        "version": alias.version,
        "since": alias.since_ms,
        "by": alias.by,
        "comparison": comparison,
        "on_corrected": on_corrected,
    })
}

/// The canary alias with what it answered since it was set, beside the live version over
/// the same period: boards, fail rate, and accuracy on the corrected boards.
fn canary_figures(
    s: &State,
    name: &str,
    live: Option<u64>,
    alias: pcb_model_store::CanaryAlias,
) -> serde_json::Value {
    let corrected = s.corrected.read().ok();
    let versions: Vec<u64> = std::iter::once(alias.version).chain(live).collect();
    let tallies = s.index.read().ok().map(|index| {
        index.versions_since(name, &versions, alias.since_ms, |id| {
            corrected.as_ref()?.get(id).map(|(_, boxes)| {
                if *boxes > 0 {
                    pcb_schemas::Verdict::Fail
                } else {
                    pcb_schemas::Verdict::Pass
                }
            })
        })
    });
    let (canary, live) = match tallies.as_deref() {
        Some([c, l]) => (Some(c.clone()), Some(l.clone())),
        Some([c]) => (Some(c.clone()), None),
        _ => (None, None),
    };
    json!({
        "version": alias.version,
        "rule": alias.rule,
        "rule_text": alias.rule.to_string(),
        "since": alias.since_ms,
        "by": alias.by,
        "canary": canary,
        "live": live,
    })
}

#[derive(Deserialize, Default)]
struct ChangeBody {
    version: Option<u64>,
    token: Option<String>,
}

/// Checks the viewer's token (when it has one): `body_token` or the `Authorization: Bearer`
/// header must carry it; `what` says what it guards.
fn authorise(
    s: &State,
    headers: &HeaderMap,
    body_token: Option<String>,
    what: &str,
) -> ApiResult<()> {
    let Some(want) = &s.config.token else {
        return Ok(());
    };
    let given = body_token.or_else(|| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
    });
    // Compared in full whatever the first difference, so timing says nothing of the token.
    let ok = given.is_some_and(|g| {
        g.len() == want.len()
            && g.bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            format!("this viewer needs its token to {what}"),
        ))
    }
}

fn parse_body(bytes: &Bytes) -> ApiResult<ChangeBody> {
    if bytes.is_empty() {
        return Ok(ChangeBody::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("body is not the expected JSON: {e}")))
}

/// Which change of the live alias a request asks for.
#[derive(Clone, Copy)]
enum Change {
    Promote,
    Rollback,
}

/// Checks the name, the token and the body, changes the live alias, and tells the
/// pipeline (`pcb.models.events`) as `pcb models` does.
async fn change_live(
    AxState(s): AxState<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
    change: Change,
) -> ApiResult<Json<serde_json::Value>> {
    let name = name.as_str();
    let body = parse_body(&body)?;
    pcb_model_store::check_name(name).map_err(|e| ApiError::bad(e.to_string()))?;
    authorise(&s, &headers, body.token.clone(), "change the live model")?;
    let (result, kind) = match change {
        Change::Promote => {
            let Some(version) = body.version else {
                return Err(ApiError::bad("promote needs {\"version\": N}"));
            };
            (
                s.registry.promote(name, version, crate::STAGE.name()).await,
                pcb_schemas::ModelEventKind::Promoted,
            )
        }
        Change::Rollback => (
            s.registry.rollback(name, crate::STAGE.name()).await,
            pcb_schemas::ModelEventKind::RolledBack,
        ),
    };
    let alias = result.map_err(|e| match e {
        pcb_model_store::RegistryError::NoHistory(m) => ApiError(
            StatusCode::CONFLICT,
            format!("{m}: nothing to roll back to"),
        ),
        pcb_model_store::RegistryError::NotFound(m) => ApiError::not_found(m),
        other => ApiError::unavailable(other.to_string()),
    })?;
    pcb_model_store::publish_event(&s.js, kind, name, alias.version, crate::STAGE.name(), None)
        .await;
    tracing::info!(
        name,
        version = alias.version,
        %kind,
        "live model changed from the viewer"
    );
    Ok(Json(json!({"name": name, "live": alias.version})))
}

async fn training(AxState(s): AxState<Shared>) -> Json<serde_json::Value> {
    let mut jobs: Vec<crate::Job> = s
        .jobs
        .read()
        .map(|j| j.values().cloned().collect())
        .unwrap_or_default();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.updated_at));
    Json(json!({ "jobs": jobs }))
}

async fn events(
    AxState(s): AxState<Shared>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = s.events.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((Ok(SseEvent::default().event(e.kind).data(e.data)), rx)),
                // A slow page misses some events; it refetches on the next one.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    // Open pages hold their stream for ever: it ends with the viewer, or a graceful stop
    // would wait on them.
    let stop = s.shutdown.clone();
    let stream = futures::StreamExt::take_until(stream, async move { stop.cancelled().await });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[derive(Deserialize, Default)]
struct UploadQuery {
    name: Option<String>,
    line: Option<String>,
}

/// An upload as JSON: the image and, for models that compare against it, its defect-free
/// template, both base64.
#[derive(Deserialize)]
struct UploadJson {
    image_b64: String,
    template_b64: Option<String>,
}

fn check_image(what: &str, name: &str, bytes: &[u8]) -> ApiResult<()> {
    let format = image::guess_format(bytes).map_err(|_| {
        ApiError::bad(format!(
            "{what} of {name:?} is not an image this pipeline reads (JPEG, PNG, BMP or TIFF)"
        ))
    })?;
    if matches!(
        format,
        image::ImageFormat::Jpeg
            | image::ImageFormat::Png
            | image::ImageFormat::Bmp
            | image::ImageFormat::Tiff
    ) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{what} of {name:?} is {format:?}; the pipeline reads JPEG, PNG, BMP or TIFF"
        )))
    }
}

async fn upload(
    AxState(s): AxState<Shared>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    authorise(&s, &headers, None, "take uploads")?;
    if body.is_empty() {
        return Err(ApiError::bad(
            "the upload is empty: send the image file as the body, or JSON {image_b64, template_b64}",
        ));
    }
    let name = nonempty(&q.name).unwrap_or("upload.png");
    if name.chars().count() > 128
        || name.contains('/')
        || name.contains('\\')
        || name.starts_with('.')
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::bad(format!(
            "file name {:?} must be a plain name of at most 128 characters",
            truncate(name, 80)
        )));
    }
    let line = nonempty(&q.line).unwrap_or("upload");
    check_label("line", line, 64)?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (image, template) = if json {
        let u: UploadJson = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("upload JSON: {e}")))?;
        let b64 = |what: &str, t: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(t.trim())
                .map_err(|e| ApiError::bad(format!("{what}_b64 is not base64: {e}")))
        };
        let image = b64("image", &u.image_b64)?;
        let template = match u.template_b64.as_deref().filter(|t| !t.trim().is_empty()) {
            Some(t) => Some(b64("template", t)?),
            None => None,
        };
        (image, template)
    } else {
        (body.to_vec(), None)
    };
    check_image("the image", name, &image)?;
    if let Some(t) = &template {
        check_image("the template", name, t)?;
    }
    let stem = std::path::Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload".into());
    let mut raw = RawImage {
        image_id: pcb_schemas::image_id(&image),
        image,
        template,
        labels: None,
        label_format: None,
        board_id: stem.clone(),
        line_id: line.to_string(),
        source: format!("upload/{name}"),
        captured_at_ms: pcb_common::now_ms(),
        split_hint: None,
        revision: None,
        image_ref: None,
        template_ref: None,
    };
    // Too large for one message once base64-encoded (the ingester's rule): the files go to
    // the image files' bucket and the record names them, as the ingester does.
    let size = raw.image.len() + raw.template.as_ref().map_or(0, Vec::len);
    if size * 4 / 3 + 64 * 1024 > s.js.client().server_info().max_payload {
        store_by_reference(&s, &mut raw).await?;
    }
    let ack = pcb_common::publish(&s.js, SUBJECT_RAW.into(), &raw)
        .await
        .map_err(|e| ApiError::unavailable(format!("publishing the upload: {e}")))?;
    s.metrics.count("uploaded");
    Ok(Json(json!({
        "image_id": raw.image_id,
        "board_id": stem,
        "status": if ack.duplicate { "duplicate" } else { "queued" },
    })))
}

/// Stores an upload's files in the image files' bucket (each once, by sha256) and leaves
/// their references in the record in their place.
async fn store_by_reference(s: &Shared, raw: &mut RawImage) -> ApiResult<()> {
    let failed = |e: pcb_common::FilesError| {
        ApiError::unavailable(format!("storing the upload's files in the bucket: {e}"))
    };
    let files = pcb_common::ImageFiles::open(&s.js).await.map_err(failed)?;
    let image = files.put(&raw.image).await.map_err(failed)?;
    let template = match &raw.template {
        Some(t) => Some(files.put(t).await.map_err(failed)?),
        None => None,
    };
    raw.image = Vec::new();
    raw.image_ref = Some(image);
    if template.is_some() {
        raw.template = None;
        raw.template_ref = template;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_labels_and_numbers_are_checked() {
        assert!(check_image_id(&"a".repeat(64)).is_ok());
        assert!(check_image_id("../../etc/passwd").is_err());
        assert!(check_image_id(&"g".repeat(64)).is_err());
        assert!(check_label("line", "line-1", 64).is_ok());
        assert!(check_label("line", "a/b", 64).is_err());
        assert!(check_label("line", &"x".repeat(65), 64).is_err());
        assert_eq!(number("page", Some("3"), 1, 10).ok(), Some(Some(3)));
        let e = number("page_size", Some("100000"), 1, 500).expect_err("absurd");
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(e.1.contains("from 1 to 500"), "{}", e.1);
        assert!(number("page", Some("-1"), 1, 10).is_err());
        assert!(number("page", Some("x"), 1, 10).is_err());
    }

    #[test]
    fn tiff_is_converted_for_browsers() {
        let img = image::RgbImage::from_pixel(4, 3, image::Rgb([10, 20, 30]));
        let mut tiff = std::io::Cursor::new(Vec::new());
        img.write_to(&mut tiff, image::ImageFormat::Tiff)
            .expect("tiff");
        let (png, kind) = browser_image(tiff.into_inner(), "tiff").expect("converted");
        assert_eq!(kind, "image/png");
        assert_eq!(
            image::guess_format(&png).expect("format"),
            image::ImageFormat::Png
        );
        let (same, kind) = browser_image(vec![1, 2, 3], "jpeg").expect("as is");
        assert_eq!((same, kind), (vec![1, 2, 3], "image/jpeg"));
    }
}
