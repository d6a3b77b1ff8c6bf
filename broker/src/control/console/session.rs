//! Who is signed in: the session cookie (an admin token of the console's own), the CSRF
//! token derived from it, posted forms checked for it, the role asked for every action, and
//! the cookies the console sets.

use maud::{Markup, html};

use sekisho_proto::roles::{self, Role};

use super::*;

/// A `Set-Cookie` value for one of the console's cookies (`max_age` 0 deletes it).
pub(super) fn cookie(name: &str, value: &str, max_age: u64, same_site: &str) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age={max_age}")
}

pub(super) fn cookie_value<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
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
pub(super) fn csrf_of(cookie: &str) -> String {
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
pub(super) fn flash_cookie(msg: &str) -> String {
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

pub(super) fn flash_text(hex: &str) -> Option<String> {
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
    pub(super) token_id: String,
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
pub(super) struct CsrfField {
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

/// The response with these `Set-Cookie` values added.
pub(super) fn with_cookies(mut r: Response, cookies: &[String]) -> Response {
    for c in cookies {
        if let Ok(v) = c.parse() {
            r.headers_mut().append(axum::http::header::SET_COOKIE, v);
        }
    }
    r
}

/// A form with nothing but its CSRF token.
#[derive(serde::Deserialize)]
pub struct Nothing {}

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
