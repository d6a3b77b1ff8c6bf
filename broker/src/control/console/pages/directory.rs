//! Users and groups: the directory, disabling and enabling users, new users and groups.

use super::*;

pub async fn users(State(ctl): Ctl, s: Session, Query(q): Query<ListQuery>) -> Response {
    if let Some(r) = not_for_role(&s, &ctl, "GET", "/v1/admin/users") {
        return r;
    }
    let users = match ctl.store.users().await {
        Ok(u) => u,
        Err(e) => return api_failure(&s, e.into()),
    };
    let mut groups: Vec<String> = users.iter().flat_map(|u| u.groups.clone()).collect();
    groups.extend(ctl.policy().groups.iter().cloned());
    groups.sort();
    groups.dedup();
    let matching: Vec<_> = users
        .iter()
        .filter(|u| q.matches(&[&u.name, &u.groups.join(" ")]))
        .collect();
    let total = matching.len();
    let may_create = s.may("POST", "/v1/admin/users");
    let may_group = s.may("POST", "/v1/admin/groups");
    let body = html! {
        (search("/console/users", "Find users (name or group)", &q.q))
        table #user-table {
            thead { tr { th scope="col" { "User" } th scope="col" { "Groups" } th scope="col" { "State" } th scope="col" { "Actions" } } }
            tbody {
                @for u in matching.iter().skip(q.skip()).take(PAGE) {
                    @let action = if u.disabled { "enable" } else { "disable" };
                    @let api = format!("/v1/admin/users/{}/{action}", u.name);
                    tr {
                        td { a href=(format!("/console/devices?q={}", seg(&u.name))) { (u.name) } }
                        td { (u.groups.join(", ")) }
                        td { @if u.disabled { span.state.stale { "disabled" } } @else { "active" } }
                        td {
                            @if s.may("POST", &api) {
                                (button(&s, &format!("/console/users/{}/{action}", seg(&u.name)),
                                    &format!("{} {}", if u.disabled { "Enable" } else { "Disable" }, u.name),
                                    if u.disabled { "" } else { "danger" }))
                            }
                        }
                    }
                }
            }
        }
        (pager("/console/users", &[("q", &q.q)], q.page(), total))
        h2 { "Groups" }
        p #group-list { @if groups.is_empty() { "None yet." } @else { (groups.join(", ")) } }
        @if may_create {
            h2 { "New user" }
            form method="post" action="/console/users/new/create" {
                (s.csrf_field())
                label for="new-user" { "User name" }
                input #new-user name="name" required;
                label for="new-groups" { "Groups (separated by commas)" }
                input #new-groups name="groups";
                button type="submit" { "Create the user" }
            }
        }
        @if may_group {
            h2 { "New group" }
            form method="post" action="/console/groups" {
                (s.csrf_field())
                label for="new-group" { "Group name" }
                input #new-group name="name" required;
                button type="submit" { "Create the group" }
            }
        }
    };
    s.render("Users and groups", body)
}

#[derive(serde::Deserialize, Default)]
pub struct UserForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    groups: String,
}

/// `disable`, `enable`, or `create` (of the user named in the form).
pub async fn set_user(
    State(ctl): Ctl,
    UrlPath((name, action)): UrlPath<(String, String)>,
    Posted(s, f): Posted<UserForm>,
) -> Response {
    match action.as_str() {
        "disable" | "enable" => {
            let path = format!("/v1/admin/users/{name}/{action}");
            if let Err(r) = s.require(&ctl, "POST", &path) {
                return r;
            }
            let disable = action == "disable";
            match set_disabled(&ctl, &s.name, &name, disable).await {
                Ok(_) => s.done(
                    "/console/users",
                    &format!("{name} {}.", if disable { "disabled" } else { "enabled" }),
                ),
                Err(e) => api_failure(&s, e),
            }
        }
        "create" => {
            if let Err(r) = s.require(&ctl, "POST", "/v1/admin/users") {
                return r;
            }
            let req = api::CreateUser {
                name: f.name.trim().to_string(),
                groups: f
                    .groups
                    .split(',')
                    .map(|g| g.trim().to_string())
                    .filter(|g| !g.is_empty())
                    .collect(),
            };
            let body = json_body(&req);
            match create_user(State(ctl.clone()), s.admin(), body).await {
                Ok(Json(u)) => s.done("/console/users", &format!("User {} created.", u.name)),
                Err(e) => api_failure(&s, e),
            }
        }
        other => failure(
            &s,
            StatusCode::NOT_FOUND,
            &format!("no user action {other:?}"),
        ),
    }
}

#[derive(serde::Deserialize)]
pub struct GroupForm {
    name: String,
}

pub async fn create_group(State(ctl): Ctl, Posted(s, f): Posted<GroupForm>) -> Response {
    if let Err(r) = s.require(&ctl, "POST", "/v1/admin/groups") {
        return r;
    }
    let body = json_body(&api::CreateGroup {
        name: f.name.trim().to_string(),
    });
    match super::super::super::create_group(State(ctl.clone()), s.admin(), body).await {
        Ok(Json(g)) => s.done("/console/users", &format!("Group {} created.", g.name)),
        Err(e) => api_failure(&s, e),
    }
}
