//! The admin console: server-rendered pages under `/console`, served where the admin API is
//! (the same TLS listener; the admin listener when `admin_listen` is set).
//!
//! - Pages are HTML made on the server with maud (escaped by construction); charts are SVG
//!   drawn on the server; one small script of our own (`console.js`) refreshes the live
//!   decisions and checks the policy as it is typed. Nothing to build but the broker.
//! - A console session is an admin token of its own, minted at sign-in (through the identity
//!   provider, the authorization code flow with PKCE coming back to `/console/callback`; or,
//!   for break-glass, by presenting an admin token), expiring after `[control.oidc]
//!   admin_session` (12 h by default; 8 h without a provider) and revoked at sign-out. It lives in a `__Host-` cookie:
//!   Secure, HttpOnly, SameSite=Strict, Path=/. The presented break-glass token itself is never
//!   stored in the browser.
//! - Every action is the admin API's call: the role is asked with [`roles::permits`] for the
//!   API's method and path (one source of truth with the API), and the API's own handler does
//!   the work, so it is validated and audited exactly like the CLI's call. Buttons a role may
//!   not use are not shown, and their POSTs are refused (audited as `admin_refused`).
//! - Every POST carries a CSRF token (derived from the session cookie, which scripts cannot
//!   read) and must come from the console's own origin (`Sec-Fetch-Site`). Every response has a
//!   strict Content-Security-Policy (nothing inline, nothing from elsewhere), no framing, no
//!   caching, no referrer.

use maud::{DOCTYPE, Markup, html};

use sekisho_proto::roles::{self, Role};

use super::*;
use crate::store::random_text;

mod chart;
pub mod feed;
mod pages;

/// The session cookie: the console's admin token.
const SESSION_COOKIE: &str = "__Host-sekisho-console";
/// A sign-in through the identity provider under way: its id and the PKCE verifier.
/// SameSite=Lax: it must come along when the provider sends the browser back.
const LOGIN_COOKIE: &str = "__Host-sekisho-login";
/// A one-time message for the next page (what an action did).
const FLASH_COOKIE: &str = "__Host-sekisho-flash";

/// How long a break-glass console session lasts when no identity provider is configured.
const DEFAULT_SESSION: u64 = 8 * 3600;

/// Rows per page of long lists.
pub const PAGE: usize = 50;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Where the identity provider sends the browser back: this control plane's URL.
pub(super) fn callback_url(ctl: &Control) -> String {
    let base = ctl.config.console_url.as_deref().unwrap_or(&ctl.config.url);
    format!("{}/console/callback", base.trim_end_matches('/'))
}

fn session_lifetime(ctl: &Control) -> u64 {
    ctl.oidc.as_ref().map_or(DEFAULT_SESSION, |o| {
        o.config.admin_session.as_secs().max(60)
    })
}

pub(super) fn routes(rate: Arc<crate::api_limits::RateGate>) -> Router<Arc<Control>> {
    use pages::*;
    // What anyone may call: a rate per source address, as for the API's sign-in.
    let signing_in = Router::new()
        .route("/console/login/sso", get(sso_start))
        .route("/console/callback", get(sso_callback))
        .route("/console/login/token", post(token_sign_in))
        .route_layer(axum::middleware::from_fn_with_state(
            rate,
            crate::api_limits::limit_unauthenticated,
        ));
    Router::new()
        .merge(signing_in)
        .route("/console", get(|| async { see_other("/console/") }))
        .route("/console/", get(overview::page))
        .route("/console/static/console.css", get(style))
        .route("/console/static/console.js", get(script))
        .route("/console/login", get(login_page))
        .route("/console/logout", post(sign_out))
        .route("/console/users", get(directory::users))
        .route("/console/users/{name}/{action}", post(directory::set_user))
        .route("/console/groups", post(directory::create_group))
        .route("/console/devices", get(devices::list))
        .route("/console/devices/{name}", get(devices::detail))
        .route("/console/devices/{name}/revoke", post(devices::revoke))
        .route("/console/devices/{name}/class", post(devices::set_class))
        .route("/console/connectors", get(connectors::list))
        .route("/console/connectors/{name}/{action}", post(connectors::act))
        .route("/console/policy", get(policy::page))
        .route("/console/policy/check", post(policy::check))
        .route("/console/policy/apply", post(policy::apply))
        .route("/console/policy/versions/{version}", get(policy::version))
        .route("/console/policy/rollback/{version}", post(policy::rollback))
        .route("/console/why", get(why::page))
        .route("/console/decisions", get(logs::decisions))
        .route("/console/decisions/rows", get(logs::decision_rows))
        .route("/console/dns", get(logs::dns))
        .route("/console/audit", get(logs::audit))
        .layer(axum::middleware::from_fn(guard))
}

/// On every console response: the security headers. Before every POST: it must come from a
/// page of this origin (browsers say so in `Sec-Fetch-Site`; a request without it is not a
/// browser's and needs the CSRF token all the same).
async fn guard(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::{HeaderValue, Method, header};
    let cross_site = req.method() == Method::POST
        && req
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"same-origin");
    let static_file = req.uri().path().starts_with("/console/static/");
    let mut res = if cross_site {
        (
            StatusCode::FORBIDDEN,
            "refused: a console form posted from another site",
        )
            .into_response()
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if static_file {
            "private, max-age=300"
        } else {
            "no-store"
        }),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    res
}

async fn style() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        include_str!("console.js"),
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(axum::http::header::LOCATION, to.to_string())],
    )
        .into_response()
}

/// A `Set-Cookie` value for one of the console's cookies (`max_age` 0 deletes it).
fn cookie(name: &str, value: &str, max_age: u64, same_site: &str) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age={max_age}")
}

fn cookie_value<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The CSRF token of a session: derived from its cookie, which only the browser holds (and
/// scripts cannot read), so a page of another site cannot know it.
fn csrf_of(cookie: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("sekisho console csrf v1\n{cookie}").as_bytes(),
    );
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A flash message travels in a cookie as hex (any text, nothing a cookie cannot hold).
fn flash_cookie(msg: &str) -> String {
    // At most 300 bytes, cut at a character's boundary.
    let mut end = msg.len().min(300);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let hex: String = msg[..end].bytes().map(|b| format!("{b:02x}")).collect();
    // Lax: a message for the sign-in page must survive the identity provider's redirect
    // back (a Strict cookie is not sent on a navigation that began on another site).
    cookie(FLASH_COOKIE, &hex, 60, "Lax")
}

fn flash_text(hex: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok().filter(|s| !s.is_empty())
}

/// A signed-in console user.
pub struct Session {
    /// The admin's name as the audit log shows it.
    pub name: String,
    pub role: Role,
    token_id: String,
    pub csrf: String,
    /// What the previous action said.
    flash: Option<String>,
    remote: Option<String>,
}

impl FromRequestParts<Arc<Control>> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Control>) -> Result<Self, Response> {
        let to_login = |why: &str| {
            with_cookies(
                see_other("/console/login"),
                &[flash_cookie(why), cookie(SESSION_COOKIE, "", 0, "Strict")],
            )
        };
        let Some(value) = cookie_value(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login("Sign in to use the console."));
        };
        let Ok(cred) = Credential::parse(ADMIN_PREFIX, value) else {
            return Err(to_login("Your session is not valid: sign in again."));
        };
        let who = match ctl
            .store
            .admin_by_token(&cred.id, &cred.secret, now_unix())
            .await
        {
            Ok(Ok(who)) => who,
            Ok(Err(why)) => {
                return Err(to_login(&format!(
                    "Your session ended ({why}): sign in again."
                )));
            }
            Err(e) => return Err(ApiErr::from(e).into_response()),
        };
        Ok(Session {
            name: who.name,
            role: who.role,
            token_id: cred.id.clone(),
            csrf: csrf_of(value),
            flash: cookie_value(&parts.headers, FLASH_COOKIE).and_then(flash_text),
            remote: parts
                .extensions
                .get::<crate::api_limits::Remote>()
                .map(|r| r.0.to_string()),
        })
    }
}

/// A posted console form: the session, its CSRF token checked, and the fields.
pub struct Posted<T>(pub Session, pub T);

#[derive(serde::Deserialize)]
struct CsrfField {
    #[serde(rename = "_csrf", default)]
    csrf: String,
}

impl<T: DeserializeOwned> axum::extract::FromRequest<Arc<Control>> for Posted<T> {
    type Rejection = Response;

    async fn from_request(
        req: axum::extract::Request,
        ctl: &Arc<Control>,
    ) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let s = Session::from_request_parts(&mut parts, ctl).await?;
        let bytes = axum::body::to_bytes(body, MAX_BODY)
            .await
            .map_err(|_| failure(&s, StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
        let header = parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let field = serde_urlencoded::from_bytes::<CsrfField>(&bytes)
            .map(|f| f.csrf)
            .unwrap_or_default();
        let presented = header.unwrap_or(field);
        if !same_secret(&presented, &s.csrf) {
            ctl.audit(
                "admin_refused",
                &s.name,
                serde_json::json!({"method": "POST", "path": parts.uri.path(),
                    "reason": "console form without its CSRF token", "from": s.remote}),
            );
            return Err(failure(
                &s,
                StatusCode::FORBIDDEN,
                "this form is stale or was not sent by the console: reload the page and try again",
            ));
        }
        let form = serde_urlencoded::from_bytes::<T>(&bytes)
            .map_err(|e| failure(&s, StatusCode::BAD_REQUEST, &format!("bad form: {e}")))?;
        Ok(Posted(s, form))
    }
}

impl Session {
    /// Whether the role may make the admin API call `method path`.
    pub fn may(&self, method: &str, path: &str) -> bool {
        roles::permits(self.role, method, path)
    }

    /// As [`Session::may`], refusing (and auditing the refusal like the API does) when not.
    // The error is the page to answer with, made once on the way out.
    #[allow(clippy::result_large_err)]
    pub fn require(&self, ctl: &Control, method: &str, path: &str) -> Result<(), Response> {
        if self.may(method, path) {
            return Ok(());
        }
        let why = format!("the {} role may not {method} {path}", self.role);
        ctl.audit(
            "admin_refused",
            &self.name,
            serde_json::json!({"method": method, "path": path.chars().take(200).collect::<String>(),
                "reason": why, "from": self.remote, "via": "console"}),
        );
        Err(failure(self, StatusCode::FORBIDDEN, &why))
    }

    /// The admin the API's handlers act for.
    pub fn admin(&self) -> Admin {
        Admin(self.name.clone())
    }

    /// A hidden field with the CSRF token, for every form.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="_csrf" value=(self.csrf); }
    }

    /// A page of the console: navigation, the signed-in admin, the message of the last
    /// action, and `body` under an `<h1>` of `title`.
    pub fn render(&self, title: &str, body: Markup) -> Response {
        self.render_status(StatusCode::OK, title, body)
    }

    pub fn render_status(&self, status: StatusCode, title: &str, body: Markup) -> Response {
        // Each page with the admin API call it stands for: shown to the roles that may make it.
        let nav = [
            ("/console/", "Overview", "GET", "/v1/admin/connectors"),
            ("/console/users", "Users", "GET", "/v1/admin/users"),
            ("/console/devices", "Devices", "GET", "/v1/admin/devices"),
            (
                "/console/connectors",
                "Connectors",
                "GET",
                "/v1/admin/connectors",
            ),
            ("/console/policy", "Policy", "GET", "/v1/admin/policy"),
            ("/console/why", "Why?", "POST", "/v1/admin/explain"),
            (
                "/console/decisions",
                "Decisions",
                "GET",
                "/v1/admin/decisions",
            ),
            ("/console/dns", "DNS blocks", "GET", "/v1/admin/dns-blocks"),
            ("/console/audit", "Audit log", "GET", "/v1/admin/audit"),
        ];
        let body = html! {
            header.top {
                a.skip href="#main" { "Skip to content" }
                span.brand { "Sekisho" }
                nav aria-label="Console" {
                    ul {
                        @for (href, label, method, api) in nav {
                            @if self.may(method, api) {
                                li { a href=(href) { (label) } }
                            }
                        }
                    }
                }
                form.signout method="post" action="/console/logout" {
                    (self.csrf_field())
                    span.who { (self.name) " · " (self.role.as_str()) }
                    button type="submit" { "Sign out" }
                }
            }
            main id="main" {
                h1 { (title) }
                @if let Some(f) = &self.flash {
                    p.flash role="status" { (f) }
                }
                (body)
            }
        };
        let res = document(status, title, Some(&self.csrf), body);
        if self.flash.is_some() {
            with_cookies(res, &[cookie(FLASH_COOKIE, "", 0, "Lax")])
        } else {
            res
        }
    }

    /// Back to `to` with a message for the next page.
    pub fn done(&self, to: &str, msg: &str) -> Response {
        with_cookies(see_other(to), &[flash_cookie(msg)])
    }
}

/// An action that failed: its status and the reason, on a page of its own.
pub fn failure(s: &Session, status: StatusCode, why: &str) -> Response {
    s.render_status(
        status,
        "That did not work",
        html! {
            p.error role="alert" { (why) }
            p { a href="/console/" { "Back to the overview" } }
        },
    )
}

/// An API handler's error as a page.
pub fn api_failure(s: &Session, e: ApiErr) -> Response {
    failure(s, e.0, &e.1)
}

/// A whole HTML document.
fn document(status: StatusCode, title: &str, csrf: Option<&str>, body: Markup) -> Response {
    document_with(status, title, csrf, None, body)
}

/// As [`document`], moving on to `refresh` at once when given.
fn document_with(
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

/// The sign-in page: the identity provider (when configured) and the break-glass token.
async fn login_page(State(ctl): Ctl, headers: axum::http::HeaderMap) -> Response {
    let flash = cookie_value(&headers, FLASH_COOKIE).and_then(flash_text);
    let body = html! {
        main id="main" .narrow {
            h1 { "Sign in to the Sekisho console" }
            @if let Some(f) = &flash { p.flash role="status" { (f) } }
            @if ctl.oidc.is_some() {
                p { a.button #sso href="/console/login/sso" { "Sign in with your identity provider" } }
            } @else {
                p.muted { "No identity provider is configured ([control.oidc] in broker.toml)." }
            }
            details open[ctl.oidc.is_none()] {
                summary { "Break-glass: sign in with an admin token" }
                form method="post" action="/console/login/token" {
                    label for="token" { "Admin token (SKA1.…)" }
                    input #token type="password" name="token" autocomplete="off" required;
                    button type="submit" { "Sign in with the token" }
                }
                p.muted { "The token itself is not kept by the browser: a console session of its own is made, with the token's role." }
            }
        }
    };
    let res = document(StatusCode::OK, "Sign in", None, body);
    if flash.is_some() {
        with_cookies(res, &[cookie(FLASH_COOKIE, "", 0, "Lax")])
    } else {
        res
    }
}

/// Starts a sign-in at the identity provider: the same sign-in the CLI's `admin login` makes,
/// coming back to the console.
async fn sso_start(State(ctl): Ctl) -> Response {
    let verifier = random_text(32);
    let challenge = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()),
    );
    let req = api::LoginStartRequest {
        purpose: "admin".into(),
        method: "code".into(),
        redirect_uri: Some(callback_url(&ctl)),
        code_challenge: Some(challenge),
    };
    let body = Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
    match super::login::start(State(ctl.clone()), body).await {
        Ok(Json(started)) => {
            let Some(url) = started.authorization_url else {
                return login_error("the identity provider gave no sign-in address");
            };
            let value = format!("{}.{}", started.login_id, verifier);
            with_cookies(see_other(&url), &[cookie(LOGIN_COOKIE, &value, 600, "Lax")])
        }
        Err(e) => login_error(&e.1),
    }
}

/// Back to the sign-in page with the reason (in the flash cookie, not the URL: a link cannot
/// put words of its own on the console's page).
fn login_error(why: &str) -> Response {
    with_cookies(
        see_other("/console/login"),
        &[
            flash_cookie(&format!("Not signed in: {why}")),
            cookie(LOGIN_COOKIE, "", 0, "Lax"),
        ],
    )
}

/// The response with these `Set-Cookie` values added.
fn with_cookies(mut r: Response, cookies: &[String]) -> Response {
    for c in cookies {
        if let Ok(v) = c.parse() {
            r.headers_mut().append(axum::http::header::SET_COOKIE, v);
        }
    }
    r
}

#[derive(serde::Deserialize)]
struct Callback {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// The provider sent the browser back: the sign-in is finished as the API's `login/finish`
/// finishes it (state, single use, PKCE, ID token, admin role, audit), and its admin token
/// becomes the console session.
async fn sso_callback(
    State(ctl): Ctl,
    headers: axum::http::HeaderMap,
    Query(cb): Query<Callback>,
) -> Response {
    // Only a sign-in this browser started is answered; whatever happens, it is over.
    let Some((login_id, verifier)) =
        cookie_value(&headers, LOGIN_COOKIE).and_then(|v| v.split_once('.'))
    else {
        return login_error(
            "this sign-in was not started in this browser (or took over ten minutes): start again",
        );
    };
    if let Some(e) = cb.error {
        // The provider's own words are not shown (a link could carry any); its error code
        // is, when it is one of OAuth's.
        let known = [
            "access_denied",
            "login_required",
            "consent_required",
            "interaction_required",
            "invalid_request",
            "unauthorized_client",
            "server_error",
            "temporarily_unavailable",
        ];
        let code = known.iter().find(|k| **k == e).copied().unwrap_or("error");
        warn!(error = %e, description = ?cb.error_description,
            "console sign-in refused by the identity provider");
        return login_error(&format!(
            "the identity provider refused the sign-in ({code})"
        ));
    }
    let req = api::LoginFinishRequest {
        login_id: login_id.to_string(),
        code: cb.code,
        state: cb.state,
        code_verifier: Some(verifier.to_string()),
        device: None,
    };
    let body = Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
    let finished = match super::login::finish(State(ctl.clone()), body).await {
        Ok(Json(f)) => f,
        Err(e) => return login_error(&e.1),
    };
    let (Some(token), Some(expires_at)) = (finished.admin_token, finished.expires_at) else {
        return login_error("the sign-in gave no admin session");
    };
    signed_in(&token, expires_at.saturating_sub(now_unix()))
}

/// The session cookie is set, and the browser moves on to the console by a page of ours: a
/// redirect straight from the provider's would not carry a SameSite=Strict cookie.
fn signed_in(token: &str, max_age: u64) -> Response {
    let body = html! {
        main id="main" .narrow {
            h1 { "Signed in" }
            p { a href="/console/" { "Continue to the console" } }
        }
    };
    with_cookies(
        document_with(StatusCode::OK, "Signed in", None, Some("/console/"), body),
        &[
            cookie(SESSION_COOKIE, token, max_age, "Strict"),
            cookie(LOGIN_COOKIE, "", 0, "Lax"),
        ],
    )
}

#[derive(serde::Deserialize)]
struct TokenForm {
    token: String,
}

/// Break-glass: an admin token is presented; a console session with its role is made.
async fn token_sign_in(
    State(ctl): Ctl,
    remote: Option<axum::Extension<crate::api_limits::Remote>>,
    axum::Form(f): axum::Form<TokenForm>,
) -> Response {
    let now = now_unix();
    let from = remote.map(|r| r.0.0.to_string());
    let refuse = |why: &str| {
        ctl.audit(
            "admin_refused",
            "-",
            serde_json::json!({"method": "POST", "path": "/console/login/token", "reason": why, "from": from}),
        );
        login_error(why)
    };
    let Ok(cred) = Credential::parse(ADMIN_PREFIX, f.token.trim()) else {
        return refuse("that is not an admin token");
    };
    let who = match ctl.store.admin_by_token(&cred.id, &cred.secret, now).await {
        Ok(Ok(who)) => who,
        Ok(Err(why)) => return refuse(why),
        Err(e) => return ApiErr::from(e).into_response(),
    };
    if who.parent.is_some() {
        return refuse("a console session's token cannot open another session");
    }
    // The session ends after the console's session lifetime, or with the presented token
    // (revoked, expired, its user disabled: see `Store::admin_by_token`), whichever is first.
    let expires_at = (now + session_lifetime(&ctl)).min(who.expires_at.unwrap_or(u64::MAX));
    let name = format!("console:{}", who.name);
    let (id, secret) = match ctl
        .store
        .create_console_session(&name, who.role, expires_at, now, &who.id)
        .await
    {
        Ok(x) => x,
        Err(e) => return ApiErr::from(e).into_response(),
    };
    info!(admin = %who.name, role = %who.role, "console sign-in with an admin token");
    ctl.audit(
        "admin_sign_in",
        &who.name,
        serde_json::json!({"id": id, "role": who.role, "expires_at": expires_at,
            "via": "console", "with_token": cred.id, "from": from}),
    );
    signed_in(
        &Credential::format(ADMIN_PREFIX, &id, &secret, None),
        expires_at.saturating_sub(now),
    )
}

/// A form with nothing but its CSRF token.
#[derive(serde::Deserialize)]
pub struct Nothing {}

/// Signs out: the session's token is revoked and the cookie deleted.
async fn sign_out(State(ctl): Ctl, Posted(s, Nothing {}): Posted<Nothing>) -> Response {
    if let Err(e) = ctl.store.revoke_admin_token(&s.token_id, now_unix()).await {
        return ApiErr::from(e).into_response();
    }
    ctl.audit(
        "admin_sign_out",
        &s.name,
        serde_json::json!({"id": s.token_id, "via": "console"}),
    );
    with_cookies(
        see_other("/console/login"),
        &[
            cookie(SESSION_COOKIE, "", 0, "Strict"),
            flash_cookie("Signed out."),
        ],
    )
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

use axum::extract::Query;
use std::time::UNIX_EPOCH;

/// Samples the data plane's totals for the charts, now and every [`feed::SAMPLE_EVERY`].
pub async fn sample_loop(dp: DataPlane, feed: Arc<feed::Feed>) {
    let mut tick = tokio::time::interval(feed::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let v = dp.view().await;
        let c = &v.counters;
        feed.sample(feed::Sample {
            at: now_unix(),
            allowed: c.flows.allowed,
            denied: c.flows.denied,
            bytes: c.from_clients.bytes + c.to_clients.bytes,
            peers: v
                .peers
                .iter()
                .filter(|p| p.seconds_since_handshake.is_some_and(|t| t < 180))
                .count(),
            flows: v.flows,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_host_only_secure_and_http_only() {
        let c = cookie(SESSION_COOKIE, "SKA1.a.b", 60, "Strict");
        assert_eq!(
            c,
            "__Host-sekisho-console=SKA1.a.b; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=60"
        );
        let mut h = axum::http::HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            "a=1; __Host-sekisho-console=SKA1.x.y".parse().unwrap(),
        );
        h.append(axum::http::header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie_value(&h, SESSION_COOKIE), Some("SKA1.x.y"));
        assert_eq!(cookie_value(&h, "b"), Some("2"));
        assert_eq!(cookie_value(&h, "__Host-sekisho"), None);
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_flash_survives_any_text() {
        assert_eq!(csrf_of("SKA1.a.b"), csrf_of("SKA1.a.b"));
        assert_ne!(csrf_of("SKA1.a.b"), csrf_of("SKA1.a.c"));
        assert_eq!(csrf_of("x").len(), 32);
        let msg = "device ü revoked; \"quoted\" <b>";
        let c = flash_cookie(msg);
        let v = c
            .strip_prefix("__Host-sekisho-flash=")
            .and_then(|r| r.split(';').next())
            .unwrap();
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(flash_text(v).as_deref(), Some(msg));
        assert_eq!(flash_text("zz"), None);
        // A long message is cut at a character's boundary, not inside one.
        let long = "é".repeat(200);
        let c = flash_cookie(&long);
        let v = c
            .strip_prefix("__Host-sekisho-flash=")
            .and_then(|r| r.split(';').next())
            .unwrap();
        assert_eq!(flash_text(v).unwrap(), "é".repeat(150));
        assert_eq!(flash_text(""), None);
    }
}
