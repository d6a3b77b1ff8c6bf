//! Connectors: enrolled connectors, their links to this broker; drain, resume, revoke.

use super::*;

pub async fn list(State(ctl): Ctl, s: Session, Query(q): Query<ListQuery>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/connectors") {
        return r;
    }
    let connectors = match ctl.store.connectors().await {
        Ok(c) => c,
        Err(e) => return api_failure(&s, e.into()),
    };
    let view = ctl.dp.view().await;
    let matching: Vec<_> = connectors
        .iter()
        .filter(|c| q.matches(&[&c.name, &c.site]))
        .collect();
    let total = matching.len();
    let body = html! {
        (search("/console/connectors", "Find (connector or site)", &q.q))
        div.scroll {
        table #connector-table {
            thead { tr {
                th scope="col" { "Connector" } th scope="col" { "Site" } th scope="col" { "Link to this broker" }
                th scope="col" { "Open flows" } th scope="col" { "Certificate until" } th scope="col" { "Actions" }
            } }
            tbody {
                @for c in matching.iter().skip(q.skip()).take(PAGE) {
                    @let links: Vec<_> = view.connectors.iter().filter(|l| l.connector == c.name).collect();
                    @let api = |action: &str| format!("/v1/admin/connectors/{}/{action}", c.name);
                    @let act = |action: &str| format!("/console/connectors/{}/{action}", seg(&c.name));
                    tr data-connector=(c.name) {
                        td { (c.name) }
                        td { (c.site) }
                        td.link-state {
                            @if c.revoked_at.is_some() { "revoked" }
                            @else if c.drained_at.is_some() { span.state.draining { "drained by an admin" } " " }
                            @if c.revoked_at.is_none() && links.is_empty() { span.muted { "not linked" } }
                            @else { @for l in &links { span class=(format!("state {}", l.state.as_str())) { (l.state.as_str()) } " " } }
                        }
                        td.num { (links.iter().map(|l| l.flows).sum::<usize>()) }
                        td { (when(c.not_after)) }
                        td {
                            @if c.revoked_at.is_none() {
                                @if c.drained_at.is_none() && s.may("POST", &api("drain")) {
                                    (button(&s, &act("drain"), &format!("Drain {}", c.name), ""))
                                    " "
                                }
                                @if c.drained_at.is_some() && s.may("POST", &api("resume")) {
                                    (button(&s, &act("resume"), &format!("Resume {}", c.name), ""))
                                    " "
                                }
                                @if s.may("POST", &api("revoke")) {
                                    (button(&s, &act("revoke"), &format!("Revoke {}", c.name), "danger"))
                                }
                            }
                        }
                    }
                }
            }
        }
        }
        (pager("/console/connectors", &[("q", &q.q)], q.page(), total))
        p.muted { "Draining a connector (for maintenance) stops new flows through it on every broker; \
                   the site's other connectors take them and open flows finish. A connector also drains itself \
                   when it is stopped. Revoking ends its links at once and refuses its certificate." }
    };
    s.render("Connectors", body)
}

/// `drain`, `resume` or `revoke`.
pub async fn act(
    State(ctl): Ctl,
    UrlPath((name, action)): UrlPath<(String, String)>,
    Posted(s, Nothing {}): Posted<Nothing>,
) -> Response {
    if !matches!(action.as_str(), "drain" | "resume" | "revoke") {
        return failure(
            &s,
            StatusCode::NOT_FOUND,
            &format!("no connector action {action:?}"),
        );
    }
    if let Err(r) = s.require(
        &ctl,
        "POST",
        &format!("/v1/admin/connectors/{name}/{action}"),
    ) {
        return r;
    }
    let done = match action.as_str() {
        "drain" => set_drained(&ctl, &s.name, &name, true).await,
        "resume" => set_drained(&ctl, &s.name, &name, false).await,
        _ => revoke_connector(State(ctl.clone()), s.admin(), UrlPath(name.clone())).await,
    };
    match done {
        Ok(Json(d)) => s.done("/console/connectors", &format!("{}.", d.done)),
        Err(e) => api_failure(&s, e),
    }
}
