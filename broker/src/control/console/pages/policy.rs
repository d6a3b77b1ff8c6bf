//! The policy: view, edit with its tests run (as it is typed, by the console's script, and on
//! every check and apply), the diff to the policy in force, apply, history and rollback.

use super::*;

const POLICY_API: &str = "/v1/admin/policy";

/// The checks' results: the error or each test, and the diff.
fn results(checked: &api::PolicyChecked) -> Markup {
    let failed = checked.tests.iter().filter(|t| !t.passed).count();
    html! {
        @if let Some(e) = &checked.error {
            p.error role="alert" { "The policy does not load: " code { (e) } }
        } @else if failed > 0 {
            p.error role="alert" { (failed) " of " (checked.tests.len()) " policy tests fail." }
        } @else {
            p.ok { "The policy loads; " (checked.tests.len()) " policy tests pass." }
        }
        @if !checked.tests.is_empty() {
            table.tests {
                thead { tr { th scope="col" { "Test" } th scope="col" { "Result" } th scope="col" { "Detail" } } }
                tbody { @for t in &checked.tests {
                    tr class=(if t.passed { "pass" } else { "fail" }) {
                        td { (t.name) }
                        td { @if t.passed { "passes" } @else { strong { "fails" } } }
                        td { (t.detail) }
                    }
                } }
            }
        }
        @if checked.diff.is_empty() {
            p.muted { "No change from the policy in force." }
        } @else {
            details open {
                summary { "Changes from the policy in force" }
                pre.diff { @for line in checked.diff.lines() {
                    span class=(match line.chars().next() { Some('+') => "add", Some('-') => "del", Some('@') => "hunk", _ => "" }) { (line) "\n" }
                } }
            }
        }
    }
}

async fn page_with(
    ctl: &Control,
    s: &Session,
    status: StatusCode,
    text: &str,
    checked: Option<&api::PolicyChecked>,
) -> Response {
    let history = match ctl.store.policy_history(50).await {
        Ok(h) => h,
        Err(e) => return api_failure(s, e.into()),
    };
    let may_apply = s.may("PUT", POLICY_API);
    let body = html! {
        p { "In force: version " strong #policy-version { (history.first().map_or(0, |v| v.version)) } "." }
        form #policy-form method="post" action="/console/policy/check" {
            (s.csrf_field())
            label for="policy-text" { "policy.toml" }
            // HTML drops one newline right after <textarea>: one is given, so a text that
            // starts with an empty line keeps it.
            textarea #policy-text name="text" rows="24" spellcheck="false" readonly[!may_apply] { "\n" (text) }
            div.buttons {
                button type="submit" formaction="/console/policy/check" { "Check" }
                @if may_apply {
                    button type="submit" .primary #apply formaction="/console/policy/apply" { "Apply" }
                }
            }
        }
        section #policy-result aria-live="polite" aria-label="Checks" {
            @if let Some(c) = checked { (results(c)) }
        }
        h2 { "History" }
        table #history-table {
            thead { tr { th scope="col" { "Version" } th scope="col" { "Applied" } th scope="col" { "By" } th scope="col" { "Size" } th scope="col" { "Actions" } } }
            tbody { @for v in &history {
                tr {
                    td { a href=(format!("/console/policy/versions/{}", v.version)) { "version " (v.version) } }
                    td { (when(v.applied_at)) }
                    td { (v.applied_by) }
                    td.num { (v.bytes) " bytes" }
                    td { @if may_apply && Some(v.version) != history.first().map(|f| f.version) {
                        (button(s, &format!("/console/policy/rollback/{}", v.version), &format!("Roll back to version {}", v.version), ""))
                    } }
                }
            } }
        }
    };
    s.render_status(status, "Policy", body)
}

pub async fn page(State(ctl): Ctl, s: Session) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", POLICY_API) {
        return r;
    }
    let text = ctl
        .policy_text
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    page_with(&ctl, &s, StatusCode::OK, &text, None).await
}

#[derive(serde::Deserialize)]
pub struct PolicyForm {
    /// As the browser sends a textarea: lines end in CR LF (see [`PolicyForm::text`]).
    text: String,
    /// Only the results (the script checking as one types).
    #[serde(default)]
    fragment: Option<String>,
}

impl PolicyForm {
    /// The text with the line ends it was written with: browsers send every line break of a
    /// textarea as CR LF, which would otherwise change every line of the stored policy.
    fn text(&self) -> String {
        self.text.replace("\r\n", "\n")
    }
}

pub async fn check(State(ctl): Ctl, Posted(s, f): Posted<PolicyForm>) -> Response {
    if let Err(r) = s.require(&ctl, "POST", "/v1/admin/policy/check") {
        return r;
    }
    let text = f.text();
    let checked = match ctl.check_policy(&text).await {
        Ok(c) => c,
        Err(e) => return api_failure(&s, e),
    };
    if f.fragment.is_some() {
        return (
            [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
            results(&checked).into_string(),
        )
            .into_response();
    }
    page_with(&ctl, &s, StatusCode::OK, &text, Some(&checked)).await
}

/// Applies `text` as the API's `PUT /v1/admin/policy` does; a refusal shows the text again
/// with the reason and the tests.
async fn apply_text(ctl: &Control, s: &Session, label: &str, text: &str, done: &str) -> Response {
    if let Err(r) = s.require(ctl, "PUT", POLICY_API) {
        return r;
    }
    match ctl.apply_policy(Path::new(label), text, &s.name).await {
        Ok(applied) => s.done(
            "/console/policy",
            &format!(
                "{done}: policy version {} is in force ({} policy tests pass).",
                applied.version,
                applied.tests.len()
            ),
        ),
        Err((status, rejected)) => {
            let mut checked = match ctl.check_policy(text).await {
                Ok(c) => c,
                Err(e) => return api_failure(s, e),
            };
            checked.error = checked
                .error
                .or(Some(rejected.error))
                .filter(|_| rejected.tests.is_empty());
            if !rejected.tests.is_empty() {
                checked.tests = rejected.tests;
            }
            page_with(ctl, s, status, text, Some(&checked)).await
        }
    }
}

pub async fn apply(State(ctl): Ctl, Posted(s, f): Posted<PolicyForm>) -> Response {
    apply_text(&ctl, &s, "policy.toml", &f.text(), "Applied").await
}

pub async fn version(State(ctl): Ctl, s: Session, UrlPath(version): UrlPath<u64>) -> Response {
    if let Some(r) = not_for_role(
        &s,
        &ctl,
        "GET",
        &format!("/v1/admin/policy/versions/{version}"),
    ) {
        return r;
    }
    let text = match policy_version(State(ctl.clone()), s.admin(), UrlPath(version)).await {
        Ok(Json(p)) => p.text,
        Err(e) => return api_failure(&s, e),
    };
    let checked = match ctl.check_policy(&text).await {
        Ok(c) => c,
        Err(e) => return api_failure(&s, e),
    };
    let body = html! {
        p { a href="/console/policy" { "Back to the policy in force" } }
        @if s.may("PUT", POLICY_API) {
            (button(&s, &format!("/console/policy/rollback/{version}"), &format!("Roll back to version {version}"), ""))
        }
        h2 { "Differences to the policy in force" }
        (results(&checked))
        h2 { "Text" }
        pre.policy { (text) }
    };
    s.render(&format!("Policy version {version}"), body)
}

pub async fn rollback(
    State(ctl): Ctl,
    UrlPath(version): UrlPath<u64>,
    Posted(s, Nothing {}): Posted<Nothing>,
) -> Response {
    if let Err(r) = s.require(&ctl, "PUT", POLICY_API) {
        return r;
    }
    let text = match policy_version(State(ctl.clone()), s.admin(), UrlPath(version)).await {
        Ok(Json(p)) => p.text,
        Err(e) => return api_failure(&s, e),
    };
    apply_text(
        &ctl,
        &s,
        &format!("policy.toml (version {version})"),
        &text,
        &format!("Rolled back to version {version}"),
    )
    .await
}
