//! The viewer's request guards, in front of every route: a DNS-rebinding check (a viewer
//! bound to loopback answers only to loopback host names), a same-origin check and an
//! allow-list of content types on every request that changes something, and the security
//! headers on every answer. A page from another site can make the operator's browser send a
//! form POST (`text/plain`, form-encoded or multipart, no preflight) to the viewer; the
//! origin check refuses it, and the content types the viewer accepts are ones a browser
//! sends cross-site only after a preflight this viewer never grants.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::http::ApiError;
use crate::State;

/// Scripts, styles, images and requests from the viewer itself only; inline style
/// attributes (class colours) are the one exception; no framing, no plugins.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    style-src-attr 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Checks the request, runs it, and adds the security headers to the answer.
pub async fn guard(AxState(s): AxState<Arc<State>>, req: Request, next: Next) -> Response {
    let loopback = s.config.addr.ip().is_loopback();
    if let Err(e) = check(loopback, req.method(), req.uri().path(), req.headers()) {
        s.metrics.count_rejection("guard");
        let mut res = e.into_response();
        secure(res.headers_mut());
        return res;
    }
    let mut res = next.run(req).await;
    secure(res.headers_mut());
    res
}

fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Why a request is refused, if it is: `loopback` says whether the viewer listens on a
/// loopback address.
pub(crate) fn check(
    loopback: bool,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).unwrap_or("");
    // A page on evil.example whose name resolves to 127.0.0.1 reaches a loopback viewer
    // with `Host: evil.example`: only loopback names are this viewer's own.
    if loopback && !is_loopback_host(host) {
        return Err(ApiError::forbidden(format!(
            "Host {host:?} is not this viewer's (it listens on loopback: use localhost or \
             127.0.0.1)"
        )));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" {
            return Err(ApiError::forbidden(format!(
                "a {site} request cannot change this viewer"
            )));
        }
    }
    if let Some(origin) = text(header::ORIGIN) {
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !same {
            return Err(ApiError::forbidden(format!(
                "a request from {origin:?} cannot change this viewer (only its own pages can)"
            )));
        }
    }
    let kind = text(header::CONTENT_TYPE)
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let accepted = if path == "/api/upload" {
        kind == "application/json"
            || kind == "application/octet-stream"
            || kind.starts_with("image/")
    } else {
        kind == "application/json"
    };
    if accepted {
        Ok(())
    } else {
        let want = if path == "/api/upload" {
            "application/json, image/* or application/octet-stream"
        } else {
            "application/json"
        };
        Err(ApiError::unsupported(format!(
            "content type {kind:?} is not accepted here: send {want}"
        )))
    }
}

/// Whether `host` (a Host header: name or address, maybe with a port) names this machine's
/// loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [::1]:8080
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                n
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_static(k),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn status(r: Result<(), ApiError>) -> u16 {
        r.map_or_else(|e| e.status().as_u16(), |()| 200)
    }

    #[test]
    fn loopback_names_only_on_a_loopback_viewer() {
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:80",
            "127.0.0.2",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "evil.example",
            "",
            "10.0.0.1:8080",
            "localhost.evil:1",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
        let get = |host: &str| {
            check(
                true,
                &Method::GET,
                "/api/status",
                &headers(&[("host", host)]),
            )
        };
        assert_eq!(status(get("127.0.0.1:8080")), 200);
        assert_eq!(status(get("evil.example:8080")), 403);
        // Beyond loopback the token guards changes; host names are the operator's.
        let h = headers(&[("host", "pcb.factory.lan:8080")]);
        assert_eq!(status(check(false, &Method::GET, "/", &h)), 200);
    }

    #[test]
    fn changes_need_the_same_origin_and_a_non_form_content_type() {
        let post = |path: &str, pairs: &[(&'static str, &str)]| {
            status(check(true, &Method::POST, path, &headers(pairs)))
        };
        let promote = "/api/models/m/promote";
        let json = ("content-type", "application/json");
        let host = ("host", "127.0.0.1:8080");
        // No Origin at all is curl or `pcb`; a browser's own page sends its origin.
        for (extra, want) in [
            (None, 200),
            (Some(("origin", "http://127.0.0.1:8080")), 200),
            (Some(("origin", "http://evil.example")), 403),
            (Some(("sec-fetch-site", "cross-site")), 403),
            (Some(("sec-fetch-site", "same-origin")), 200),
        ] {
            let mut pairs = vec![host, json];
            pairs.extend(extra);
            assert_eq!(post(promote, &pairs), want, "{extra:?}");
        }
        for form in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
        ] {
            assert_eq!(
                post(promote, &[host, ("content-type", form)]),
                415,
                "{form}"
            );
        }
        let upload = "/api/upload";
        for ok in [
            "image/png",
            "application/octet-stream",
            "application/json; charset=utf-8",
        ] {
            assert_eq!(post(upload, &[host, ("content-type", ok)]), 200, "{ok}");
        }
        assert_eq!(post(upload, &[host, ("content-type", "text/plain")]), 415);
        assert_eq!(
            post(
                upload,
                &[host, ("content-type", "image/png"), ("origin", "null")]
            ),
            403
        );
    }
}
