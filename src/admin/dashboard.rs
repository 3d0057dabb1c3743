//! The dashboard: a static page (HTML, JS, CSS embedded in the binary)
//! served without a token; it holds no data. The script asks for the admin
//! token and reads everything from the token-protected API.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const FAVICON: &str = "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>\
<rect width='16' height='16' rx='3' fill='#24292f'/><path d='M3 5h10v7H3z' fill='none' stroke='#fff'/>\
<path d='M3 5l5 4 5-4' fill='none' stroke='#fff'/></svg>";

/// `default-src 'self'`: no inline script or style, no third-party origin.
const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// The dashboard's routes (no token: static assets only).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/dashboard", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            "/dashboard/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/favicon.svg",
            get(|| async { asset("image/svg+xml", FAVICON) }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_has_no_inline_script_or_external_origin() {
        let page = super::INDEX;
        assert!(page.contains(r#"<script src="/dashboard/app.js""#));
        assert!(!page.contains("<script>"));
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(!super::APP_JS.contains("http://") && !super::APP_CSS.contains("http://"));
        assert!(!super::APP_JS.contains("innerHTML"));
    }
}
