//! The console's pages, one module per part of the console.

use super::*;

pub mod connectors;
pub mod devices;
pub mod directory;
pub mod logs;
pub mod overview;
pub mod policy;
pub mod why;

/// A long list's query: a text filter and the page (1-based).
#[derive(serde::Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub page: Option<usize>,
}

impl ListQuery {
    pub fn page(&self) -> usize {
        self.page.unwrap_or(1).max(1)
    }

    pub fn skip(&self) -> usize {
        (self.page() - 1).saturating_mul(PAGE)
    }

    /// Whether any of `fields` contains the filter (case-insensitive).
    pub fn matches(&self, fields: &[&str]) -> bool {
        let q = self.q.trim().to_ascii_lowercase();
        q.is_empty() || fields.iter().any(|f| f.to_ascii_lowercase().contains(&q))
    }
}

/// A list's search form: one text field, `q`.
pub fn search(action: &str, label: &str, q: &str) -> Markup {
    html! {
        form.filters method="get" action=(action) role="search" {
            label for="q" { (label) }
            input #q type="search" name="q" value=(q);
            button type="submit" { "Find" }
        }
    }
}

/// The page a role may not see.
pub fn not_for_role(s: &Session, ctl: &Control, method: &str, path: &str) -> Option<Response> {
    s.require(ctl, method, path).err()
}

/// A small form with one button that posts to `action` (with the CSRF token).
pub fn button(s: &Session, action: &str, label: &str, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            (s.csrf_field())
            button type="submit" class=(class) { (label) }
        }
    }
}

/// Path segments are names checked by the API; here they are only put in URLs.
pub fn seg(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
