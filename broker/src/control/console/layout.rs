//! The pages' frame: the HTML document, dates, page links, redirects.

use std::time::UNIX_EPOCH;

use maud::{DOCTYPE, Markup, html};

use super::*;

pub(super) fn see_other(to: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(axum::http::header::LOCATION, to.to_string())],
    )
        .into_response()
}

/// A whole HTML document.
pub(super) fn document(
    status: StatusCode,
    title: &str,
    csrf: Option<&str>,
    body: Markup,
) -> Response {
    document_with(status, title, csrf, None, body)
}

/// As [`document`], moving on to `refresh` at once when given.
pub(super) fn document_with(
    status: StatusCode,
    title: &str,
    csrf: Option<&str>,
    refresh: Option<&str>,
    body: Markup,
) -> Response {
    let doc = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(c) = csrf { meta name="csrf-token" content=(c); }
                @if let Some(to) = refresh { meta http-equiv="refresh" content=(format!("0;url={to}")); }
                title { (title) " · Sekisho console" }
                link rel="stylesheet" href="/console/static/console.css";
                script src="/console/static/console.js" defer {}
            }
            body { (body) }
        }
    };
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        doc.into_string(),
    )
        .into_response()
}

/// Time as the console shows it: UTC, to the second.
pub fn when(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix))
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// Page links of a long list: "Previous" / "Next" keeping the other query parameters.
pub fn pager(base: &str, params: &[(&str, &str)], page: usize, total: usize) -> Markup {
    let pages = total.div_ceil(PAGE).max(1);
    let link = |p: usize| {
        let mut q: Vec<(&str, String)> = params
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        q.push(("page", p.to_string()));
        format!(
            "{base}?{}",
            serde_urlencoded::to_string(&q).unwrap_or_default()
        )
    };
    html! {
        nav.pager aria-label="Pages" {
            @if page > 1 { a href=(link(page - 1)) rel="prev" { "Previous" } }
            span { "Page " (page) " of " (pages) " · " (total) " in all" }
            @if page < pages { a href=(link(page + 1)) rel="next" { "Next" } }
        }
    }
}
