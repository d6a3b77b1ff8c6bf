//! `/v1/login/…`: sign-in through the company's identity provider, for a device (enrolled on
//! first sign-in, re-authenticated later) or an admin (an admin token with the role the
//! provider's groups map to).
//!
//! The device holds the PKCE verifier (the code is worthless to whoever intercepts the loopback
//! redirect); the control plane holds the client secret, the `state` and the `nonce`, redeems the
//! code and checks the ID token. A sign-in is used once, expires after ten minutes, and nothing
//! is created before every check passed.

use super::*;
use crate::oidc::{DevicePoll, ProviderError, VerifyError};
use crate::store::{DeviceSignIn, LoginSession, SignIn, SignInRefusal, random_text};

/// How long a sign-in may take.
const LOGIN_TTL: u64 = 600;

fn provider(ctl: &Control) -> Result<&Arc<crate::oidc::Provider>, ApiErr> {
    ctl.oidc.as_ref().ok_or_else(|| {
        bad(
            StatusCode::NOT_FOUND,
            "sign-in through an identity provider is not configured on this control plane \
             ([control.oidc] in broker.toml); enroll with a one-time token instead",
        )
    })
}

fn provider_err(e: ProviderError) -> ApiErr {
    match e {
        ProviderError::Refused { .. } => bad(StatusCode::UNAUTHORIZED, e.to_string()),
        ProviderError::Unavailable(_) => {
            warn!("identity provider: {e}");
            bad(StatusCode::BAD_GATEWAY, e.to_string())
        }
    }
}

/// A loopback redirect (RFC 8252 §7.3): `http://127.0.0.1:PORT/…` or `http://[::1]:PORT/…`.
fn loopback_redirect(uri: &str) -> bool {
    url::Url::parse(uri).is_ok_and(|u| {
        u.scheme() == "http"
            && u.port().is_some()
            && matches!(u.host(), Some(url::Host::Ipv4(a)) if a.is_loopback())
                | matches!(u.host(), Some(url::Host::Ipv6(a)) if a.is_loopback())
            && u.fragment().is_none()
    })
}

/// The shortest sign-in age the policy allows anywhere: sent as `max_age`, so the provider
/// asks for the password again when its own session is older.
fn max_age(policy: &Policy) -> Option<u64> {
    policy.sign_in_max_age.iter().flatten().copied().min()
}

pub(super) async fn start(State(ctl): Ctl, body: Bytes) -> ApiResult<api::LoginStartResponse> {
    let (req, _): (api::LoginStartRequest, _) = parse_body(&body)?;
    let oidc = provider(&ctl)?;
    if !matches!(req.purpose.as_str(), "device" | "admin") {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "purpose is \"device\" or \"admin\"",
        ));
    }
    let now = now_unix();
    let mut session = LoginSession {
        id: random_text(16),
        purpose: req.purpose.clone(),
        method: req.method.clone(),
        state: random_text(24),
        nonce: random_text(24),
        redirect_uri: None,
        device_code: None,
        interval_s: 5,
        created_at: now,
        expires_at: now + LOGIN_TTL,
        used_at: None,
    };
    let policy = ctl.policy();
    let answer = match req.method.as_str() {
        "code" => {
            let redirect = req.redirect_uri.clone().unwrap_or_default();
            // A native client's loopback address, or this control plane's own console.
            if !loopback_redirect(&redirect) && redirect != super::console::callback_url(&ctl) {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "redirect_uri must be a loopback address with a port, like \
                     http://127.0.0.1:49152/callback",
                ));
            }
            let challenge = req.code_challenge.clone().unwrap_or_default();
            if challenge.len() != 43
                || !challenge
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "code_challenge must be base64url(SHA-256(verifier)), 43 characters (S256)",
                ));
            }
            let url = oidc
                .authorization_url(
                    &redirect,
                    &session.state,
                    &session.nonce,
                    &challenge,
                    max_age(&policy),
                )
                .await
                .map_err(provider_err)?;
            session.redirect_uri = Some(redirect);
            api::LoginStartResponse {
                login_id: session.id.clone(),
                authorization_url: Some(url),
                state: Some(session.state.clone()),
                user_code: None,
                verification_uri: None,
                verification_uri_complete: None,
                interval: 0,
                expires_in: LOGIN_TTL,
            }
        }
        "device" => {
            let d = oidc.device_authorization().await.map_err(provider_err)?;
            session.device_code = Some(d.device_code.clone());
            session.interval_s = d.interval.unwrap_or(5).clamp(1, 60);
            session.expires_at = now + d.expires_in.min(LOGIN_TTL);
            api::LoginStartResponse {
                login_id: session.id.clone(),
                authorization_url: None,
                state: None,
                user_code: Some(d.user_code),
                verification_uri: Some(d.verification_uri),
                verification_uri_complete: d.verification_uri_complete,
                interval: session.interval_s,
                expires_in: session.expires_at - now,
            }
        }
        _ => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "method is \"code\" (browser) or \"device\" (a code to enter elsewhere)",
            ));
        }
    };
    ctl.store.create_login(&session).await?;
    Ok(Json(answer))
}

/// Audits a refused sign-in (with the request as received, redacted) and hands the error on.
fn refused(ctl: &Control, raw: &serde_json::Value, e: ApiErr) -> ApiErr {
    warn!(reason = %e.1, "sign-in refused");
    ctl.audit(
        "sign_in",
        "-",
        serde_json::json!({"result": "refused", "reason": e.1, "request": redacted(raw.clone())}),
    );
    e
}

/// The sign-in `login_id` names, if it is still good: known, unused and not expired.
pub(super) async fn pending(
    ctl: &Control,
    login_id: &str,
    now: u64,
) -> Result<LoginSession, ApiErr> {
    let Some(session) = ctl.store.login(login_id).await? else {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "unknown sign-in: start again",
        ));
    };
    if session.used_at.is_some() {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "this sign-in was already used (a replayed authorization code?): start again",
        ));
    }
    if now > session.expires_at {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "this sign-in expired: start again",
        ));
    }
    Ok(session)
}

/// A browser's return from the provider: the state must be this sign-in's; the sign-in is
/// marked used before the provider is asked (a code is redeemed once, whatever happens), then
/// the code is redeemed with the PKCE verifier. The provider's ID token.
pub(super) async fn redeem_code(
    ctl: &Control,
    oidc: &crate::oidc::Provider,
    session: &LoginSession,
    state: Option<&str>,
    code: &str,
    verifier: &str,
    now: u64,
) -> Result<Option<String>, ApiErr> {
    // The state ties the browser's return to this sign-in (CSRF, mixed-up logins).
    if state != Some(session.state.as_str()) {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "the state the browser came back with is not this sign-in's",
        ));
    }
    if !ctl.store.use_login(&session.id, now).await? {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "this sign-in was already used (a replayed authorization code?): start again",
        ));
    }
    let redirect = session.redirect_uri.clone().unwrap_or_default();
    let tokens = oidc
        .exchange_code(code, &redirect, verifier)
        .await
        .map_err(provider_err)?;
    Ok(tokens.id_token)
}

pub(super) async fn finish(State(ctl): Ctl, body: Bytes) -> ApiResult<api::LoginFinishResponse> {
    let (req, raw): (api::LoginFinishRequest, _) = parse_body(&body)?;
    let oidc = provider(&ctl)?.clone();
    let now = now_unix();
    let refuse = |e: ApiErr| refused(&ctl, &raw, e);
    let session = pending(&ctl, &req.login_id, now).await.map_err(refuse)?;
    if session.purpose == "device" {
        let Some(d) = &req.device else {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "device (public_key, name) missing",
            ));
        };
        PublicKeyBytes::parse(&d.public_key)
            .map_err(|e| refuse(bad(StatusCode::BAD_REQUEST, format!("bad public key: {e}"))))?;
        check_name("device", &d.name).map_err(refuse)?;
    }
    let policy = ctl.policy();
    let (id_token, nonce) = match session.method.as_str() {
        "code" => {
            let (Some(code), Some(verifier)) = (&req.code, &req.code_verifier) else {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "code and code_verifier are needed",
                ));
            };
            let id_token = redeem_code(
                &ctl,
                &oidc,
                &session,
                req.state.as_deref(),
                code,
                verifier,
                now,
            )
            .await
            .map_err(refuse)?;
            (id_token, Some(session.nonce.clone()))
        }
        "device" => {
            let device_code = session.device_code.clone().unwrap_or_default();
            match oidc.poll_device(&device_code).await {
                Ok(DevicePoll::Pending { slow_down }) => {
                    let interval = if slow_down {
                        let i = (session.interval_s + 5).min(60);
                        ctl.store.slow_login(&session.id, i).await?;
                        i
                    } else {
                        session.interval_s
                    };
                    return Ok(Json(api::LoginFinishResponse {
                        status: "pending".into(),
                        interval,
                        user: None,
                        groups: Vec::new(),
                        signed_in_at: None,
                        config: None,
                        credential: None,
                        ca_pem: None,
                        admin_token: None,
                        role: None,
                        expires_at: None,
                    }));
                }
                Ok(DevicePoll::Tokens(t)) => {
                    if !ctl.store.use_login(&session.id, now).await? {
                        return Err(refuse(bad(
                            StatusCode::UNAUTHORIZED,
                            "this sign-in was already used: start again",
                        )));
                    }
                    (t.id_token, None)
                }
                Err(e) => {
                    ctl.store.use_login(&session.id, now).await?;
                    return Err(refuse(provider_err(e)));
                }
            }
        }
        other => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                format!("unknown sign-in method {other:?}"),
            ));
        }
    };
    let Some(id_token) = id_token else {
        return Err(refuse(bad(
            StatusCode::BAD_GATEWAY,
            "the identity provider returned no ID token (is the openid scope configured?)",
        )));
    };
    let identity = oidc
        .check_id_token(&id_token, nonce.as_deref(), now, max_age(&policy))
        .await
        .map_err(|e| match e {
            VerifyError::Refused(r) => refuse(bad(StatusCode::UNAUTHORIZED, r.to_string())),
            VerifyError::Provider(p) => refuse(provider_err(p)),
        })?;
    let username = identity.username.clone();
    if !valid_user_name(&username) {
        return Err(refuse(bad(
            StatusCode::FORBIDDEN,
            format!(
                "the provider's user name {username:?} ({} claim) is not a valid user name here",
                oidc.config.username_claim
            ),
        )));
    }
    let subject = format!("{} {}", identity.issuer, identity.subject);
    let (member_of, governed) = policy.identity.map_groups(&identity.groups);
    // An admin sign-in without a role is refused before anything is written.
    if session.purpose == "admin" && policy.identity.admin_role(&identity.groups).is_none() {
        return Err(refuse(bad(
            StatusCode::FORBIDDEN,
            format!(
                "{username:?} signed in, but none of their groups ({}) has an admin role \
                 ([identity] admin_roles in the policy)",
                identity.groups.join(", ")
            ),
        )));
    }
    let provider_ids: Vec<&str> = std::iter::once(identity.subject.as_str())
        .chain(identity.object_id.as_deref())
        .collect();
    let _g = ctl.change.lock().await;
    let sign_in = SignIn {
        subject: &subject,
        username: &username,
        email: identity.email.as_deref(),
        display_name: identity.display_name.as_deref(),
        member_of: &member_of,
        governed: &governed,
        create: oidc.config.create_users,
        provider_ids: &provider_ids,
        link_by_name: oidc.config.link_by_name,
    };
    // Admins too are users of the directory: a deactivated or deleted one cannot sign in, and
    // their admin tokens stop working (see `Store::admin_by_token`).
    if session.purpose == "admin" {
        let user = ctl
            .store
            .sign_in_user(&sign_in, now)
            .await?
            .map_err(|e| refuse(sign_in_refusal(e)))?;
        ctl.rebuild().await?;
        return admin_sign_in(&ctl, &oidc, &policy, &user, &identity, now)
            .await
            .map_err(refuse);
    }
    let device = req.device.clone().expect("checked above");
    // User and device in one transaction: a refused device leaves the directory as it was.
    let reserved = Reserved::of(&policy);
    let (user, dev) = ctl
        .store
        .sign_in(
            &sign_in,
            Some(DeviceSignIn {
                name: &device.name,
                public_key: &device.public_key,
                signed_in_at: identity.auth_time,
                range: policy.device_range,
                reserved: &reserved,
                class: oidc.config.device_class,
            }),
            now,
        )
        .await?
        .map_err(|e| refuse(sign_in_refusal(e)))?;
    let (dev, cred) = dev.expect("a device was asked for");
    ctl.rebuild().await?;
    let groups = ctl
        .store
        .users()
        .await?
        .into_iter()
        .find(|u| u.name == user)
        .map(|u| u.groups)
        .unwrap_or_default();
    info!(user = %user, device = %dev.name, enrolled = cred.is_some(), groups = ?groups,
        "signed in through the identity provider");
    ctl.audit(
        "sign_in",
        &user,
        serde_json::json!({"result": if cred.is_some() { "enrolled" } else { "reauthenticated" },
            "device": dev.name, "address": dev.address, "groups": groups,
            "provider_groups": identity.groups, "auth_time": identity.auth_time}),
    );
    Ok(Json(api::LoginFinishResponse {
        status: "done".into(),
        interval: 0,
        user: Some(user),
        groups,
        signed_in_at: Some(identity.auth_time),
        config: Some(ctl.device_config(&dev, Default::default())),
        credential: cred
            .as_ref()
            .map(|(id, secret)| Credential::format(DEVICE_PREFIX, id, secret, None)),
        ca_pem: cred.as_ref().map(|_| ctl.ca.cert_pem.clone()),
        admin_token: None,
        role: None,
        expires_at: None,
    }))
}

async fn admin_sign_in(
    ctl: &Control,
    oidc: &crate::oidc::Provider,
    policy: &Policy,
    user: &str,
    identity: &crate::oidc::Identity,
    now: u64,
) -> ApiResult<api::LoginFinishResponse> {
    let Some(role) = policy.identity.admin_role(&identity.groups) else {
        return Err(bad(
            StatusCode::FORBIDDEN,
            format!(
                "{:?} signed in, but none of their groups ({}) has an admin role \
                 ([identity] admin_roles in the policy)",
                identity.username,
                identity.groups.join(", ")
            ),
        ));
    };
    let expires_at = now + oidc.config.admin_session.as_secs().max(60);
    // The token is bound to the user's stable id, not the name: a user deleted and made
    // again under the same name does not bring an old token back.
    let id = ctl.store.user_id(user).await?.unwrap_or_default();
    let name = format!("sso:{user}#{id}");
    let (id, secret) = ctl
        .store
        .create_admin_token_with(&name, role, Some(expires_at), now)
        .await?;
    info!(admin = %name, role = %role, "admin signed in through the identity provider");
    let name = format!("sso:{user}");
    ctl.audit(
        "admin_sign_in",
        &name,
        serde_json::json!({"id": id, "role": role, "expires_at": expires_at,
            "provider_groups": identity.groups}),
    );
    Ok(Json(api::LoginFinishResponse {
        status: "done".into(),
        interval: 0,
        user: Some(user.to_string()),
        groups: Vec::new(),
        signed_in_at: Some(identity.auth_time),
        config: None,
        credential: None,
        ca_pem: None,
        admin_token: Some(Credential::format(ADMIN_PREFIX, &id, &secret, None)),
        role: Some(role),
        expires_at: Some(expires_at),
    }))
}

fn sign_in_refusal(e: SignInRefusal) -> ApiErr {
    let status = match e {
        SignInRefusal::NoUser(_)
        | SignInRefusal::Disabled(_)
        | SignInRefusal::Taken(_)
        | SignInRefusal::NotLinked(_) => StatusCode::FORBIDDEN,
        SignInRefusal::Device(_) | SignInRefusal::NoAddress(_) => StatusCode::CONFLICT,
    };
    bad(status, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_redirects() {
        for ok in [
            "http://127.0.0.1:49152/callback",
            "http://[::1]:8080/cb",
            "http://127.0.0.2:1/",
        ] {
            assert!(loopback_redirect(ok), "{ok}");
        }
        for no in [
            "https://127.0.0.1:49152/callback",
            "http://127.0.0.1/callback",
            "http://localhost:8080/cb",
            "http://evil.example:8080/cb",
            "http://10.0.0.1:8080/cb",
            "http://127.0.0.1:8080/cb#x",
            "javascript:alert(1)",
            "",
        ] {
            assert!(!loopback_redirect(no), "{no}");
        }
    }
}
