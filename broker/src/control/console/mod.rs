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

use maud::{Markup, html};

use super::*;

mod chart;
pub mod feed;
mod layout;
mod pages;
mod session;
mod signin;

use layout::*;
use session::*;
use signin::*;

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
        .route("/console/logout", post(signin::sign_out))
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

use axum::extract::Query;

/// A request body for one of the API's handlers, called in-process.
pub(super) fn json_body<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// A device counts as online while its last handshake is this recent (WireGuard rekeys every
/// two minutes while traffic flows, and keepalives refresh it).
const ONLINE: Duration = Duration::from_secs(180);

pub(super) fn online(p: &sekisho_proto::broker::PeerInfo) -> bool {
    p.seconds_since_handshake
        .is_some_and(|t| t < ONLINE.as_secs())
}

/// Samples the data plane's totals for the charts, now and every [`feed::SAMPLE_EVERY`].
pub async fn sample_loop(dp: DataPlane, feed: Arc<feed::Feed>) {
    let mut tick = tokio::time::interval(feed::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Totals only: a full view would have every worker copy every peer each time.
        let t = dp.totals(ONLINE).await;
        let c = &t.counters;
        feed.sample(feed::Sample {
            at: now_unix(),
            allowed: c.flows.allowed,
            denied: c.flows.denied,
            bytes: c.from_clients.bytes + c.to_clients.bytes,
            peers: t.peers_online,
            flows: t.flows,
        });
    }
}
