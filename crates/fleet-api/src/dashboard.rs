//! The dashboard: a read-only view of the cluster in the browser, served beside the API when
//! `enable_dashboard` is set. Plain HTML, CSS and JavaScript compiled into the binary; the
//! page reads the v1 API and follows `/fleet/v1/events` with `EventSource`.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::handlers::error_reply;
use crate::live::{AnyBody, boxed, redirect};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The dashboard's answer for `path` (under `/dashboard`).
pub(crate) fn serve(path: &str) -> Response<AnyBody> {
    let (body, content_type) = match path {
        "/dashboard" => return redirect(crate::live::DASHBOARD_PATH),
        "/dashboard/" | "/dashboard/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/dashboard/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/dashboard/style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return boxed(error_reply(StatusCode::NOT_FOUND, "")),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // the page loads nothing but its own files and talks to this server only
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    boxed(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_its_files_and_nothing_else() {
        for (path, status, ty) in [
            ("/dashboard/", 200, Some("text/html; charset=utf-8")),
            (
                "/dashboard/app.js",
                200,
                Some("text/javascript; charset=utf-8"),
            ),
            ("/dashboard/style.css", 200, Some("text/css; charset=utf-8")),
            ("/dashboard", 301, None),
            ("/dashboard/../etc/passwd", 404, Some("application/json")),
            ("/dashboard/x.js", 404, Some("application/json")),
        ] {
            let r = serve(path);
            assert_eq!(r.status().as_u16(), status, "{path}");
            let got = r.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
            assert_eq!(got, ty, "{path}");
        }
    }
}
