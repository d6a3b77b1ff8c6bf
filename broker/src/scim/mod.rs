//! SCIM 2.0 provisioning (RFC 7643, RFC 7644): an identity provider's provisioning client
//! (Entra ID, Okta, …) creates, renames, deactivates and deletes users and groups, and sets
//! group members, at `/scim/v2` on the control API, with a SCIM token (`SKS1.…`, made with
//! `sekisho-broker admin scim-token create`).
//!
//! SCIM resources are the store's users and groups, called by their stable ids (`u-…`, `g-…`;
//! the policy and devices go by name). Every change that can affect access goes the way the
//! admin API's do: under the control plane's change lock, written to the store, then the
//! effective policy is rebuilt and handed to the data path, which re-decides flows on their
//! next packet: a deactivated (`active: false`) or deleted user's flows are cut, a member
//! removed from a group loses what the group gave at once. Each change is audited with the
//! actor `scim:<token name>`.
//!
//! A rename (userName, displayName) keeps the stable id and moves memberships, devices and
//! pending enrollment tokens to the new name in one transaction. A rename the policy text
//! would not survive (a rule naming the user or a group only the directory declares) is
//! refused (`mutability`); so is a name the policy file's own users hold (`uniqueness`).
//!
//! DELETE of a user revokes their devices and removes their memberships; the user record goes
//! too, unless devices or the policy text name the user: then it stays, disabled and invisible
//! to SCIM (see [`crate::store::scim`]), and creating that userName again revives it
//! under a new id. Likewise for a group the policy names.
//!
//! The protocol logic (filters, PATCH, resources) is pure and lives in the submodules; this
//! module does the HTTP and the store.

mod filter;
mod patch;
mod resource;

#[cfg(test)]
#[path = "../scim_tests.rs"]
mod scim_tests;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Path as UrlPath, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tracing::{error, info};

use sekisho_proto::api::{self, Credential, SCIM_PREFIX};
use sekisho_proto::policy::{Directory, Policy};

use super::{Admin, ApiErr, ApiResult, Control, Ctl, Done, STORED_POLICY, bad, check_name};
use crate::store::scim::{
    ScimGroupRecord, ScimGroupWrite, ScimUserRecord, ScimUserWrite, ScimWriteError, UserSelect,
};
use crate::store::{new_id, now_unix};
use resource::{GroupAttrs, ListParams, UserAttrs};

/// Largest SCIM request body (a group replaced with thousands of members fits).
const SCIM_BODY: usize = 1 << 20;

/// A SCIM error answer (RFC 7644 §3.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimError {
    pub status: u16,
    pub scim_type: Option<&'static str>,
    pub detail: String,
}

impl ScimError {
    pub fn new(status: u16, scim_type: Option<&'static str>, detail: impl Into<String>) -> Self {
        ScimError {
            status,
            scim_type,
            detail: detail.into(),
        }
    }

    /// 400 with a `scimType`.
    pub fn bad(scim_type: &'static str, detail: impl Into<String>) -> Self {
        ScimError::new(400, Some(scim_type), detail)
    }

    fn not_found(detail: impl Into<String>) -> Self {
        ScimError::new(404, None, detail)
    }

    fn taken(detail: impl Into<String>) -> Self {
        ScimError::new(409, Some("uniqueness"), detail)
    }
}

impl IntoResponse for ScimError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "schemas": [resource::ERROR],
            "status": self.status.to_string(),
            "detail": self.detail,
        });
        if let Some(t) = self.scim_type {
            body["scimType"] = json!(t);
        }
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut r = scim_response(status, body);
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sekisho-scim\""),
            );
        }
        r
    }
}

impl From<anyhow::Error> for ScimError {
    fn from(e: anyhow::Error) -> Self {
        error!("SCIM internal error: {e:#}");
        ScimError::new(500, None, "internal error")
    }
}

impl From<ApiErr> for ScimError {
    fn from(e: ApiErr) -> Self {
        ScimError::new(e.0.as_u16(), None, e.1)
    }
}

type ScimResult = std::result::Result<Response, ScimError>;

/// A JSON answer as `application/scim+json`.
fn scim_response(status: StatusCode, body: Value) -> Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/scim+json"),
    );
    r
}

fn ok(body: Value) -> ScimResult {
    Ok(scim_response(StatusCode::OK, body))
}

/// 201 with the new resource and its location.
fn created(body: Value) -> ScimResult {
    let location = body["meta"]["location"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut r = scim_response(StatusCode::CREATED, body);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// The SCIM routes under `/scim/v2` and the admin API's SCIM token routes.
pub(super) fn routes() -> Router<Arc<Control>> {
    let scim = Router::new()
        .route("/ServiceProviderConfig", get(service_provider_config))
        .route("/ResourceTypes", get(resource_types))
        .route("/ResourceTypes/{name}", get(resource_type))
        .route("/Schemas", get(schemas))
        .route("/Schemas/{urn}", get(schema))
        .route("/Users", get(list_users).post(create_user))
        .route("/Users/.search", post(search_users))
        .route(
            "/Users/{id}",
            get(get_user)
                .put(put_user)
                .patch(patch_user)
                .delete(delete_user),
        )
        .route("/Groups", get(list_groups).post(create_group))
        .route("/Groups/.search", post(search_groups))
        .route(
            "/Groups/{id}",
            get(get_group)
                .put(put_group)
                .patch(patch_group)
                .delete(delete_group),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(DefaultBodyLimit::max(SCIM_BODY));
    Router::new()
        .nest("/scim/v2", scim)
        .route("/v1/admin/scim-tokens", get(list_tokens).post(create_token))
        .route("/v1/admin/scim-tokens/{id}/revoke", post(revoke_token))
}

async fn not_found() -> ScimError {
    ScimError::not_found(
        "no such SCIM endpoint (Users, Groups, ServiceProviderConfig, ResourceTypes, Schemas)",
    )
}

async fn not_allowed() -> ScimError {
    ScimError::new(405, None, "this method is not supported here")
}

// ---- Request parts

/// `Authorization: Bearer TOKEN` (the scheme in any case).
fn bearer(parts: &Parts) -> Option<&str> {
    let h = parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A caller with a valid SCIM token; holds the audit actor, `scim:<token name>`. Refusals are
/// audited (`scim_refused`).
pub struct Scim(String);

impl FromRequestParts<Arc<Control>> for Scim {
    type Rejection = ScimError;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Control>) -> Result<Self, ScimError> {
        let refuse = |why: &str| {
            let remote = parts
                .extensions
                .get::<crate::api_limits::Remote>()
                .map(|r| r.0.to_string());
            ctl.audit(
                "scim_refused",
                "-",
                json!({"method": parts.method.as_str(),
                    "path": parts.uri.path().chars().take(200).collect::<String>(),
                    "reason": why, "from": remote}),
            );
            ScimError::new(401, None, why)
        };
        let Some(text) = bearer(parts) else {
            return Err(refuse(
                "authentication required: a SCIM token (Authorization: Bearer SKS1.…)",
            ));
        };
        let cred = match Credential::parse(SCIM_PREFIX, text) {
            Ok(c) => c,
            Err(e) => return Err(refuse(&e.to_string())),
        };
        match ctl
            .store
            .scim_token(&cred.id, &cred.secret, now_unix())
            .await?
        {
            Ok(name) => Ok(Scim(format!("scim:{name}"))),
            Err(why) => Err(refuse(why)),
        }
    }
}

/// The `/scim/v2` URL as the client reached it (its Host), for `meta.location`; the
/// configured API URL when the request has no usable Host.
struct Base(String);

impl FromRequestParts<Arc<Control>> for Base {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        ctl: &Arc<Control>,
    ) -> Result<Self, std::convert::Infallible> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.len() < 256
                    && h.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
                    })
            });
        Ok(Base(match host {
            Some(h) => format!("https://{h}/scim/v2"),
            None => format!("{}/scim/v2", ctl.config.url.trim_end_matches('/')),
        }))
    }
}

/// The query parameters, in order.
struct Params(Vec<(String, String)>);

impl FromRequestParts<Arc<Control>> for Params {
    type Rejection = ScimError;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Control>) -> Result<Self, ScimError> {
        Query::<Vec<(String, String)>>::from_request_parts(parts, ctl)
            .await
            .map(|q| Params(q.0))
            .map_err(|e| ScimError::bad("invalidSyntax", e.body_text()))
    }
}

/// A JSON request body (`application/scim+json` or `application/json`), at most
/// [`SCIM_BODY`] bytes.
struct ScimBody(Value);

impl FromRequest<Arc<Control>> for ScimBody {
    type Rejection = ScimError;

    async fn from_request(req: Request, ctl: &Arc<Control>) -> Result<Self, ScimError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let essence = ct
                .to_str()
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if essence != "application/scim+json" && essence != "application/json" {
                return Err(ScimError::new(
                    415,
                    None,
                    "Content-Type must be application/scim+json or application/json",
                ));
            }
        }
        let bytes = Bytes::from_request(req, ctl)
            .await
            .map_err(|e| ScimError::new(e.status().as_u16(), None, e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ScimError::bad("invalidSyntax", "a JSON body is needed"));
        }
        serde_json::from_slice(&bytes)
            .map(ScimBody)
            .map_err(|e| ScimError::bad("invalidSyntax", format!("malformed JSON: {e}")))
    }
}

// ---- Discovery

async fn service_provider_config(_: Scim, Base(base): Base) -> ScimResult {
    ok(resource::service_provider_config(&base))
}

async fn resource_types(_: Scim, Base(base): Base) -> ScimResult {
    let all = resource::resource_types(&base);
    let n = all.len();
    ok(resource::list_response(all, n, 1))
}

async fn resource_type(_: Scim, Base(base): Base, UrlPath(name): UrlPath<String>) -> ScimResult {
    resource::resource_types(&base)
        .into_iter()
        .find(|t| {
            t["id"]
                .as_str()
                .is_some_and(|i| i.eq_ignore_ascii_case(&name))
        })
        .map_or_else(
            || Err(ScimError::not_found(format!("no resource type {name:?}"))),
            ok,
        )
}

async fn schemas(_: Scim, Base(base): Base) -> ScimResult {
    let all = resource::schemas(&base);
    let n = all.len();
    ok(resource::list_response(all, n, 1))
}

async fn schema(_: Scim, Base(base): Base, UrlPath(urn): UrlPath<String>) -> ScimResult {
    resource::schemas(&base)
        .into_iter()
        .find(|s| {
            s["id"]
                .as_str()
                .is_some_and(|i| i.eq_ignore_ascii_case(&urn))
        })
        .map_or_else(
            || Err(ScimError::not_found(format!("no schema {urn:?}"))),
            ok,
        )
}

// ---- Shared checks

fn write_err(e: ScimWriteError) -> ScimError {
    match e {
        ScimWriteError::Taken(name) => ScimError::taken(format!("the name {name:?} is taken")),
        ScimWriteError::Gone => ScimError::not_found("it was deleted meanwhile"),
        ScimWriteError::UnknownMember(id) => {
            ScimError::bad("invalidValue", format!("no user with id {id:?}"))
        }
    }
}

fn user_write(u: &UserAttrs) -> ScimUserWrite {
    ScimUserWrite {
        name: u.user_name.clone(),
        external_id: u.external_id.clone(),
        display_name: u.display_name.clone(),
        email: u.email.clone(),
        disabled: !u.active,
    }
}

/// Whether the policy text would still build with directory `dir` (the reason if not).
fn builds_with(ctl: &Control, dir: &Directory) -> Result<(), String> {
    let text = ctl
        .policy_text
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Policy::parse_with_lenient(Path::new(STORED_POLICY), &text, dir)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A user of the policy file itself (not the store) named `name` without regard to case,
/// other than `except`.
fn file_user(ctl: &Control, name: &str, except: Option<&str>) -> bool {
    ctl.policy()
        .users
        .iter()
        .any(|u| u.name.eq_ignore_ascii_case(name) && Some(u.name.as_str()) != except)
}

/// Refuses userName `new` for user `old` (None: a new user) when another record has it (in
/// any case) or, for a rename, when the policy would not survive it. Returns the name of a
/// tombstone holding it, which a new user revives.
async fn check_user_name(
    ctl: &Control,
    old: Option<&str>,
    new: &str,
) -> Result<Option<String>, ScimError> {
    let holders = ctl.store.user_names_like(new).await?;
    let others: Vec<_> = holders
        .iter()
        .filter(|h| Some(h.name.as_str()) != old)
        .collect();
    if let Some(h) = others.iter().find(|h| h.id.is_some()) {
        return Err(ScimError::taken(format!(
            "userName {new:?} is taken (by user {:?})",
            h.name
        )));
    }
    let tomb = others.first().map(|h| h.name.clone());
    if tomb.is_some() && old.is_some() {
        return Err(ScimError::taken(format!(
            "userName {new:?} is kept by a deleted user whose devices name it"
        )));
    }
    if tomb.is_none() && file_user(ctl, new, old) {
        return Err(ScimError::taken(format!(
            "userName {new:?} is a user of the policy file"
        )));
    }
    // A rename (or a revival under another case of the name) must leave a policy that builds.
    let from = old.or(tomb.as_deref());
    if let Some(from) = from
        && from != new
    {
        let mut dir = ctl.store.directory().await?;
        for u in &mut dir.users {
            if u.name == from {
                u.name = new.to_string();
            }
        }
        for d in &mut dir.devices {
            if d.user == from {
                d.user = new.to_string();
            }
        }
        builds_with(ctl, &dir).map_err(|e| {
            ScimError::bad(
                "mutability",
                format!("user {from:?} cannot be renamed to {new:?}: the policy names it ({e})"),
            )
        })?;
    }
    Ok(tomb)
}

/// As [`check_user_name`], for groups (displayName).
async fn check_group_name(
    ctl: &Control,
    old: Option<&str>,
    new: &str,
) -> Result<Option<String>, ScimError> {
    let holders = ctl.store.group_names_like(new).await?;
    let others: Vec<_> = holders
        .iter()
        .filter(|h| Some(h.name.as_str()) != old)
        .collect();
    if let Some(h) = others.iter().find(|h| h.id.is_some()) {
        return Err(ScimError::taken(format!(
            "displayName {new:?} is taken (by group {:?})",
            h.name
        )));
    }
    let tomb = others.first().map(|h| h.name.clone());
    if tomb.is_some() && old.is_some() {
        return Err(ScimError::taken(format!(
            "displayName {new:?} is kept by a deleted group the policy names"
        )));
    }
    let from = old.or(tomb.as_deref());
    if let Some(from) = from
        && from != new
    {
        let mut dir = ctl.store.directory().await?;
        for g in &mut dir.groups {
            if g == from {
                *g = new.to_string();
            }
        }
        for u in &mut dir.users {
            for g in &mut u.groups {
                if g == from {
                    *g = new.to_string();
                }
            }
        }
        builds_with(ctl, &dir).map_err(|e| {
            ScimError::bad(
                "mutability",
                format!("group {from:?} cannot be renamed to {new:?}: the policy names it ({e})"),
            )
        })?;
    }
    Ok(tomb)
}

// ---- Users

async fn users_page(ctl: &Control, base: &str, p: &ListParams) -> ScimResult {
    let f = p
        .filter
        .as_deref()
        .map(|t| filter::parse(t, &filter::USER))
        .transpose()?;
    let select = match &f {
        Some(f) => {
            if let Some(v) = filter::eq_hint(f, "username") {
                UserSelect::NameNoCase(v)
            } else if let Some(v) = filter::eq_hint(f, "id") {
                UserSelect::Id(v)
            } else if let Some(v) = filter::eq_hint(f, "externalid") {
                UserSelect::ExternalId(v)
            } else {
                UserSelect::All
            }
        }
        None => UserSelect::All,
    };
    let matched: Vec<Value> = ctl
        .store
        .scim_users(select)
        .await?
        .iter()
        .map(|u| resource::user_json(u, base))
        .filter(|j| f.as_ref().is_none_or(|f| f.matches(j, &filter::USER)))
        .collect();
    let total = matched.len();
    let page = p
        .page(matched)
        .into_iter()
        .map(|mut v| {
            p.project(&mut v);
            v
        })
        .collect();
    ok(resource::list_response(page, total, p.start_index))
}

async fn list_users(State(ctl): Ctl, _: Scim, Base(base): Base, Params(q): Params) -> ScimResult {
    users_page(&ctl, &base, &ListParams::from_query(&q)?).await
}

async fn search_users(
    State(ctl): Ctl,
    _: Scim,
    Base(base): Base,
    ScimBody(body): ScimBody,
) -> ScimResult {
    users_page(&ctl, &base, &ListParams::from_search(&body)?).await
}

async fn find_user(ctl: &Control, id: &str) -> Result<ScimUserRecord, ScimError> {
    ctl.store
        .scim_user(id)
        .await?
        .ok_or_else(|| ScimError::not_found(format!("no user {id:?}")))
}

async fn get_user(
    State(ctl): Ctl,
    _: Scim,
    Base(base): Base,
    Params(q): Params,
    UrlPath(id): UrlPath<String>,
) -> ScimResult {
    let p = ListParams::from_query(&q)?;
    let mut v = resource::user_json(&find_user(&ctl, &id).await?, &base);
    p.project(&mut v);
    ok(v)
}

async fn create_user(
    State(ctl): Ctl,
    Scim(who): Scim,
    Base(base): Base,
    ScimBody(body): ScimBody,
) -> ScimResult {
    let attrs = resource::user_from_body(&body, true)?;
    let _g = ctl.change.lock().await;
    let now = now_unix();
    let tomb = check_user_name(&ctl, None, &attrs.user_name).await?;
    let write = user_write(&attrs);
    let id = match &tomb {
        Some(old) => {
            let id = new_id("u-");
            ctl.store
                .scim_update_user(old, &write, Some(&id), now)
                .await?
                .map_err(write_err)?;
            id
        }
        None => ctl
            .store
            .scim_create_user(&write, now)
            .await?
            .map_err(write_err)?,
    };
    ctl.rebuild().await?;
    info!(user = %attrs.user_name, %id, by = %who, "SCIM: user created");
    ctl.audit(
        "scim_user_created",
        &who,
        json!({"id": id, "user": attrs.user_name, "active": attrs.active,
            "revived": tomb.is_some()}),
    );
    created(resource::user_json(&find_user(&ctl, &id).await?, &base))
}

/// Writes `new` over user `cur`, rebuilds the policy, audits; answers with the user.
async fn apply_user(
    ctl: &Control,
    who: &str,
    base: &str,
    cur: ScimUserRecord,
    new: UserAttrs,
) -> ScimResult {
    let old = UserAttrs::of(&cur);
    if new == old {
        return ok(resource::user_json(&cur, base));
    }
    if new.user_name != cur.name {
        check_user_name(ctl, Some(&cur.name), &new.user_name).await?;
    }
    ctl.store
        .scim_update_user(&cur.name, &user_write(&new), None, now_unix())
        .await?
        .map_err(write_err)?;
    ctl.rebuild().await?;
    let mut changes = serde_json::Map::new();
    if new.user_name != old.user_name {
        changes.insert("userName".into(), json!([old.user_name, new.user_name]));
    }
    if new.active != old.active {
        changes.insert("active".into(), json!([old.active, new.active]));
    }
    for (field, a, b) in [
        ("displayName", &old.display_name, &new.display_name),
        ("externalId", &old.external_id, &new.external_id),
        ("email", &old.email, &new.email),
    ] {
        if a != b {
            changes.insert(field.into(), json!("changed"));
        }
    }
    info!(user = %new.user_name, id = %cur.id, by = %who, active = new.active, "SCIM: user changed");
    ctl.audit(
        "scim_user_updated",
        who,
        json!({"id": cur.id, "user": new.user_name, "changes": changes}),
    );
    ok(resource::user_json(&find_user(ctl, &cur.id).await?, base))
}

async fn put_user(
    State(ctl): Ctl,
    Scim(who): Scim,
    Base(base): Base,
    UrlPath(id): UrlPath<String>,
    ScimBody(body): ScimBody,
) -> ScimResult {
    let _g = ctl.change.lock().await;
    let cur = find_user(&ctl, &id).await?;
    let new = resource::user_from_body(&body, !cur.disabled)?;
    apply_user(&ctl, &who, &base, cur, new).await
}

async fn patch_user(
    State(ctl): Ctl,
    Scim(who): Scim,
    Base(base): Base,
    UrlPath(id): UrlPath<String>,
    ScimBody(body): ScimBody,
) -> ScimResult {
    let ops = patch::parse(&body, &filter::USER)?;
    let _g = ctl.change.lock().await;
    let cur = find_user(&ctl, &id).await?;
    let new = patch::user(&UserAttrs::of(&cur), &ops)?;
    apply_user(&ctl, &who, &base, cur, new).await
}

async fn delete_user(State(ctl): Ctl, Scim(who): Scim, UrlPath(id): UrlPath<String>) -> ScimResult {
    let _g = ctl.change.lock().await;
    let cur = find_user(&ctl, &id).await?;
    // The record goes unless the policy text names the user (or devices do: the store
    // decides that).
    let mut dir = ctl.store.directory().await?;
    dir.users.retain(|u| u.name != cur.name);
    dir.devices.retain(|d| d.user != cur.name);
    let keep = builds_with(&ctl, &dir).is_err();
    let done = ctl
        .store
        .scim_delete_user(&cur.name, keep, now_unix())
        .await?
        .map_err(write_err)?;
    ctl.rebuild().await?;
    info!(user = %cur.name, %id, by = %who, kept = done.tombstone, devices = done.devices_revoked.len(), "SCIM: user deleted");
    ctl.audit(
        "scim_user_deleted",
        &who,
        json!({"id": id, "user": cur.name, "kept_disabled": done.tombstone,
            "devices_revoked": done.devices_revoked}),
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- Groups

async fn groups_page(ctl: &Control, base: &str, p: &ListParams) -> ScimResult {
    let f = p
        .filter
        .as_deref()
        .map(|t| filter::parse(t, &filter::GROUP))
        .transpose()?;
    let members = p.wants("members") || f.as_ref().is_some_and(|f| f.mentions("members"));
    let matched: Vec<Value> = ctl
        .store
        .scim_groups(None, members)
        .await?
        .iter()
        .map(|g| resource::group_json(g, base))
        .filter(|j| f.as_ref().is_none_or(|f| f.matches(j, &filter::GROUP)))
        .collect();
    let total = matched.len();
    let page = p
        .page(matched)
        .into_iter()
        .map(|mut v| {
            p.project(&mut v);
            v
        })
        .collect();
    ok(resource::list_response(page, total, p.start_index))
}

async fn list_groups(State(ctl): Ctl, _: Scim, Base(base): Base, Params(q): Params) -> ScimResult {
    groups_page(&ctl, &base, &ListParams::from_query(&q)?).await
}

async fn search_groups(
    State(ctl): Ctl,
    _: Scim,
    Base(base): Base,
    ScimBody(body): ScimBody,
) -> ScimResult {
    groups_page(&ctl, &base, &ListParams::from_search(&body)?).await
}

async fn find_group(ctl: &Control, id: &str, members: bool) -> Result<ScimGroupRecord, ScimError> {
    ctl.store
        .scim_group(id, members)
        .await?
        .ok_or_else(|| ScimError::not_found(format!("no group {id:?}")))
}

async fn get_group(
    State(ctl): Ctl,
    _: Scim,
    Base(base): Base,
    Params(q): Params,
    UrlPath(id): UrlPath<String>,
) -> ScimResult {
    let p = ListParams::from_query(&q)?;
    let mut v = resource::group_json(&find_group(&ctl, &id, p.wants("members")).await?, &base);
    p.project(&mut v);
    ok(v)
}

fn group_write(g: &GroupAttrs) -> ScimGroupWrite {
    ScimGroupWrite {
        name: g.display_name.clone(),
        external_id: g.external_id.clone(),
    }
}

async fn create_group(
    State(ctl): Ctl,
    Scim(who): Scim,
    Base(base): Base,
    ScimBody(body): ScimBody,
) -> ScimResult {
    let attrs = resource::group_from_body(&body)?;
    let members: Vec<String> = attrs.members.iter().map(|m| m.value.clone()).collect();
    let _g = ctl.change.lock().await;
    let now = now_unix();
    let tomb = check_group_name(&ctl, None, &attrs.display_name).await?;
    let write = group_write(&attrs);
    let id = match &tomb {
        Some(old) => {
            let id = new_id("g-");
            ctl.store
                .scim_update_group(old, &write, &members, &[], Some(&id), now)
                .await?
                .map_err(write_err)?;
            id
        }
        None => ctl
            .store
            .scim_create_group(&write, &members, now)
            .await?
            .map_err(write_err)?,
    };
    ctl.rebuild().await?;
    let group = find_group(&ctl, &id, true).await?;
    let names: Vec<&String> = group.members.iter().flatten().map(|(_, n)| n).collect();
    info!(group = %attrs.display_name, %id, by = %who, members = names.len(), "SCIM: group created");
    ctl.audit(
        "scim_group_created",
        &who,
        json!({"id": id, "group": attrs.display_name, "members": names,
            "revived": tomb.is_some()}),
    );
    created(resource::group_json(&group, &base))
}

/// Writes `new` over group `cur` (read with its members), rebuilds, audits; answers with the
/// group.
async fn apply_group(
    ctl: &Control,
    who: &str,
    base: &str,
    cur: ScimGroupRecord,
    new: GroupAttrs,
) -> ScimResult {
    let old = GroupAttrs::of(&cur);
    let before: HashSet<&str> = old.members.iter().map(|m| m.value.as_str()).collect();
    let after: HashSet<&str> = new.members.iter().map(|m| m.value.as_str()).collect();
    let add: Vec<String> = new
        .members
        .iter()
        .filter(|m| !before.contains(m.value.as_str()))
        .map(|m| m.value.clone())
        .collect();
    let remove: Vec<String> = old
        .members
        .iter()
        .filter(|m| !after.contains(m.value.as_str()))
        .map(|m| m.value.clone())
        .collect();
    let renamed = new.display_name != cur.name;
    if !renamed && new.external_id == cur.external_id && add.is_empty() && remove.is_empty() {
        return ok(resource::group_json(&cur, base));
    }
    if renamed {
        check_group_name(ctl, Some(&cur.name), &new.display_name).await?;
    }
    ctl.store
        .scim_update_group(
            &cur.name,
            &group_write(&new),
            &add,
            &remove,
            None,
            now_unix(),
        )
        .await?
        .map_err(write_err)?;
    ctl.rebuild().await?;
    let group = find_group(ctl, &cur.id, true).await?;
    let names: HashMap<&str, &str> = old
        .members
        .iter()
        .filter_map(|m| Some((m.value.as_str(), m.display.as_deref()?)))
        .chain(
            group
                .members
                .iter()
                .flatten()
                .map(|(i, n)| (i.as_str(), n.as_str())),
        )
        .collect();
    let name_of = |ids: &[String]| -> Vec<String> {
        ids.iter()
            .map(|i| names.get(i.as_str()).map_or(i.clone(), |n| n.to_string()))
            .collect()
    };
    info!(group = %new.display_name, id = %cur.id, by = %who, added = add.len(), removed = remove.len(), "SCIM: group changed");
    ctl.audit(
        "scim_group_updated",
        who,
        json!({"id": cur.id, "group": new.display_name,
            "renamed_from": renamed.then_some(&cur.name),
            "members_added": name_of(&add), "members_removed": name_of(&remove)}),
    );
    ok(resource::group_json(&group, base))
}

async fn put_group(
    State(ctl): Ctl,
    Scim(who): Scim,
    Base(base): Base,
    UrlPath(id): UrlPath<String>,
    ScimBody(body): ScimBody,
) -> ScimResult {
    let new = resource::group_from_body(&body)?;
    let _g = ctl.change.lock().await;
    let cur = find_group(&ctl, &id, true).await?;
    apply_group(&ctl, &who, &base, cur, new).await
}

async fn patch_group(
    State(ctl): Ctl,
    Scim(who): Scim,
    Base(base): Base,
    UrlPath(id): UrlPath<String>,
    ScimBody(body): ScimBody,
) -> ScimResult {
    let ops = patch::parse(&body, &filter::GROUP)?;
    let _g = ctl.change.lock().await;
    let cur = find_group(&ctl, &id, true).await?;
    let new = patch::group(&GroupAttrs::of(&cur), &ops)?;
    apply_group(&ctl, &who, &base, cur, new).await
}

async fn delete_group(
    State(ctl): Ctl,
    Scim(who): Scim,
    UrlPath(id): UrlPath<String>,
) -> ScimResult {
    let _g = ctl.change.lock().await;
    let cur = find_group(&ctl, &id, false).await?;
    let mut dir = ctl.store.directory().await?;
    dir.groups.retain(|g| *g != cur.name);
    for u in &mut dir.users {
        u.groups.retain(|g| *g != cur.name);
    }
    let keep = builds_with(&ctl, &dir).is_err();
    let kept = ctl
        .store
        .scim_delete_group(&cur.name, keep, now_unix())
        .await?
        .map_err(write_err)?;
    ctl.rebuild().await?;
    info!(group = %cur.name, %id, by = %who, kept, "SCIM: group deleted");
    ctl.audit(
        "scim_group_deleted",
        &who,
        json!({"id": id, "group": cur.name, "kept_empty": kept}),
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- SCIM tokens (admin API)

async fn list_tokens(State(ctl): Ctl, _: Admin) -> ApiResult<Vec<api::ScimTokenInfo>> {
    Ok(Json(ctl.store.scim_tokens().await?))
}

async fn create_token(
    State(ctl): Ctl,
    Admin(admin): Admin,
    Json(req): Json<api::CreateScimToken>,
) -> ApiResult<api::ScimTokenCreated> {
    check_name("SCIM token", &req.name)?;
    let (id, secret) = ctl.store.create_scim_token(&req.name, now_unix()).await?;
    info!(name = %req.name, by = %admin, "SCIM token created");
    ctl.audit(
        "scim_token_created",
        &admin,
        json!({"id": id, "name": req.name}),
    );
    Ok(Json(api::ScimTokenCreated {
        token: Credential::format(SCIM_PREFIX, &id, &secret, None),
        id,
        name: req.name,
    }))
}

async fn revoke_token(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Done> {
    if !ctl.store.revoke_scim_token(&id, now_unix()).await? {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no unrevoked SCIM token {id:?}"),
        ));
    }
    info!(%id, by = %admin, "SCIM token revoked");
    ctl.audit("scim_token_revoked", &admin, json!({"id": id}));
    Ok(Json(Done {
        done: format!("SCIM token {id} revoked"),
    }))
}
