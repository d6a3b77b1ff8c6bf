//! Signing in and out: through the identity provider (the API's own sign-in, coming back to
//! `/console/callback`), with a break-glass admin token, and out.

use maud::html;

use super::*;
use crate::store::random_text;

/// The sign-in page: the identity provider (when configured) and the break-glass token.
pub(super) async fn login_page(State(ctl): Ctl, headers: axum::http::HeaderMap) -> Response {
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
pub(super) async fn sso_start(State(ctl): Ctl) -> Response {
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
    let body = json_body(&req);
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

#[derive(serde::Deserialize)]
pub(super) struct Callback {
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
pub(super) async fn sso_callback(
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
    let body = json_body(&req);
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
pub(super) struct TokenForm {
    token: String,
}

/// Break-glass: an admin token is presented; a console session with its role is made.
pub(super) async fn token_sign_in(
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

/// Signs out: the session's token is revoked and the cookie deleted.
pub(super) async fn sign_out(State(ctl): Ctl, Posted(s, Nothing {}): Posted<Nothing>) -> Response {
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
