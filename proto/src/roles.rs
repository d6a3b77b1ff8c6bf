//! Admin roles and what each may call on the control API, as a pure decision on the method
//! and path of a request (tested without a server).
//!
//! - `admin`: everything, admin and SCIM tokens included;
//! - `operator`: devices, users and groups, enrollment tokens (and everything read-only);
//! - `helpdesk`: devices only: list them, revoke one, issue and revoke override codes;
//! - `auditor`: read-only (GET), everywhere but the admin and SCIM tokens.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Helpdesk,
    Auditor,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Helpdesk, Role::Auditor];

    /// How much the role may do: admin > operator > helpdesk > auditor.
    pub fn rank(self) -> u8 {
        match self {
            Role::Admin => 3,
            Role::Operator => 2,
            Role::Helpdesk => 1,
            Role::Auditor => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Helpdesk => "helpdesk",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown role {s:?} (roles: admin, operator, helpdesk, auditor)")
            })
    }
}

/// The path's segments after `/v1/admin/`, or None for a path outside the admin API.
fn admin_segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix("/v1/admin/")?;
    Some(rest.split('/').filter(|s| !s.is_empty()).collect())
}

/// Whether `role` may make the admin call `method path` (`method` upper case).
pub fn permits(role: Role, method: &str, path: &str) -> bool {
    let Some(seg) = admin_segments(path) else {
        return false;
    };
    // Calls that change nothing, though they are POSTs (they carry a body): an explanation
    // and a policy check without applying it.
    let asks = method == "POST" && matches!(&seg[..], ["explain"] | ["policy", "check"]);
    let read = method == "GET" || method == "HEAD" || asks;
    let first = seg.first().copied().unwrap_or("");
    // Tokens that authorize API calls (admin and SCIM tokens): the admin role only, even to
    // list them.
    let tokens = matches!(first, "admin-tokens" | "scim-tokens");
    let devices = matches!(
        (method, &seg[..]),
        ("GET", ["devices"])
            | ("POST", ["devices", _, "revoke"])
            | ("POST", ["devices", _, "override"])
            | ("POST", ["overrides", _, "revoke"])
    );
    match role {
        Role::Admin => true,
        Role::Auditor => read && !tokens,
        Role::Helpdesk => devices,
        Role::Operator => {
            devices
                || (read && !tokens)
                || matches!(
                    (method, &seg[..]),
                    ("POST", ["devices"])
                        | ("POST", ["users"])
                        | ("POST", ["users", _, "disable"])
                        | ("POST", ["users", _, "enable"])
                        | ("POST", ["groups"])
                        | ("POST", ["enrollment-tokens"])
                        | ("POST", ["devices", _, "class"])
                )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_reaches_only_its_part_of_the_api() {
        let calls = [
            ("GET", "/v1/admin/devices"),
            ("POST", "/v1/admin/devices/alice-laptop/revoke"),
            ("POST", "/v1/admin/devices/alice-laptop/override"),
            ("POST", "/v1/admin/overrides/abc/revoke"),
            ("POST", "/v1/admin/devices"),
            ("GET", "/v1/admin/users"),
            ("POST", "/v1/admin/users"),
            ("POST", "/v1/admin/users/bob/disable"),
            ("POST", "/v1/admin/enrollment-tokens"),
            ("PUT", "/v1/admin/policy"),
            ("GET", "/v1/admin/policy"),
            ("POST", "/v1/admin/connectors/c1/revoke"),
            ("POST", "/v1/admin/signing-keys/rotate"),
            ("GET", "/v1/admin/admin-tokens"),
            ("POST", "/v1/admin/admin-tokens"),
        ];
        let allowed =
            |role: Role| -> Vec<bool> { calls.iter().map(|(m, p)| permits(role, m, p)).collect() };
        assert!(allowed(Role::Admin).iter().all(|a| *a));
        assert_eq!(
            allowed(Role::Helpdesk),
            [
                true, true, true, true, false, false, false, false, false, false, false, false,
                false, false, false
            ]
        );
        assert_eq!(
            allowed(Role::Operator),
            [
                true, true, true, true, true, true, true, true, true, false, true, false, false,
                false, false
            ]
        );
        assert_eq!(
            allowed(Role::Auditor),
            [
                true, false, false, false, false, true, false, false, false, false, true, false,
                false, false, false
            ]
        );
        // SCIM tokens, like admin tokens: the admin role only, even to list them.
        for role in [Role::Operator, Role::Helpdesk, Role::Auditor] {
            assert!(!permits(role, "GET", "/v1/admin/scim-tokens"));
            assert!(!permits(role, "POST", "/v1/admin/scim-tokens"));
            assert!(!permits(role, "POST", "/v1/admin/scim-tokens/x/revoke"));
        }
        assert!(permits(Role::Admin, "POST", "/v1/admin/scim-tokens"));
        // Asking changes nothing: an auditor may explain a decision and check a policy text
        // (the console's "Why?" and its check as you type), not apply it; helpdesk neither.
        for (m, p) in [
            ("POST", "/v1/admin/explain"),
            ("POST", "/v1/admin/policy/check"),
        ] {
            assert!(permits(Role::Auditor, m, p), "{m} {p}");
            assert!(permits(Role::Operator, m, p), "{m} {p}");
            assert!(!permits(Role::Helpdesk, m, p), "{m} {p}");
        }
        assert!(!permits(Role::Auditor, "POST", "/v1/admin/policy/checkx"));
        assert!(!permits(Role::Auditor, "POST", "/v1/admin/explain/x"));
        // Nothing outside the admin API, whatever the role.
        assert!(!permits(Role::Admin, "GET", "/v1/posture"));
        assert!(!permits(
            Role::Helpdesk,
            "POST",
            "/v1/admin/devices/x/../../policy"
        ));
    }

    #[test]
    fn roles_parse_and_print() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
