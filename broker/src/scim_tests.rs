//! SCIM provisioning through the control API's router (called directly, without TLS), on
//! SQLite and on a PostgreSQL started for the test (see `sekisho_tests::pg`): the lifecycle a
//! provisioning client drives, checked in the SCIM answers, in the store and in the policy the
//! data path enforces.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use sekisho_proto::api::{self, Credential};
use sekisho_proto::keys::PrivateKey;
use sekisho_proto::roles::Role;

use crate::config::ControlConfig;
use crate::control::{Control, Scope, router_for};
use crate::pki;
use crate::store::now_unix;

const POLICY: &str = r#"
[[groups]]
name = "engineering"

[[users]]
name = "root-ops"

[[sites]]
name = "hq"

[[applications]]
name = "web"
site = "hq"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [80]

[[rules]]
name = "engineering-web"
action = "allow"
groups = ["engineering"]
applications = ["web"]
"#;

/// POLICY and rules naming a directory user and a group only the directory declares.
const POLICY_NAMING: &str = r#"
[[rules]]
name = "carol-web"
action = "allow"
users = ["carol"]
applications = ["web"]

[[rules]]
name = "contractors-web"
action = "allow"
groups = ["contractors"]
applications = ["web"]
"#;

struct Harness {
    dir: PathBuf,
    control: Arc<Control>,
    router: axum::Router,
    admin: String,
    /// Whether the folder is this harness's to remove.
    owned: bool,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn id(&self) -> String {
        self.body["id"].as_str().expect("an id").to_string()
    }
}

async fn start(db: Option<&str>) -> Harness {
    let dir = std::env::temp_dir().join(format!(
        "sekisho-scim-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    pki::init(&dir, &["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    let db = db
        .map(str::to_string)
        .unwrap_or_else(|| format!("sqlite://{}/state/broker.db", dir.display()));
    start_at(&dir, &db, true).await
}

/// A control plane in `dir` (CA and policy made) on `db`; several may share both, like the
/// brokers of a cluster.
async fn start_at(dir: &Path, db: &str, owned: bool) -> Harness {
    // From its serialized form, so settings added later keep their defaults.
    let config: ControlConfig = serde_json::from_value(json!({
        "listen": "127.0.0.1:0",
        "url": "https://broker.test:8443",
        "database": db,
        "ca_key": dir.join("ca.key"),
        "key_encryption_key_file": dir.join("kek"),
        "wireguard_endpoint": "192.0.2.1:51820",
        "connector_endpoint": "192.0.2.1:4433",
        "audit_log": dir.join("audit.log"),
    }))
    .unwrap();
    let (control, _) = crate::control_tests::control_on(config, dir).await;
    let (id, secret) = control
        .store
        .create_admin_token("tester", now_unix())
        .await
        .unwrap();
    let admin = Credential::format(api::ADMIN_PREFIX, &id, &secret, None);
    let router = router_for(control.clone(), Scope::All);
    Harness {
        dir: dir.to_path_buf(),
        control,
        router,
        admin,
        owned,
    }
}

impl Harness {
    async fn raw(&self, req: Request<Body>) -> Answer {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "broker.test:8443");
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/scim+json; charset=utf-8")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        }
        .unwrap();
        self.raw(req).await
    }

    /// A SCIM token made through the admin API.
    async fn scim_token(&self, name: &str) -> (String, String) {
        let a = self
            .call(
                "POST",
                "/v1/admin/scim-tokens",
                Some(&self.admin.clone()),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        (
            a.body["id"].as_str().unwrap().to_string(),
            a.body["token"].as_str().unwrap().to_string(),
        )
    }

    /// The policy in force: whether `user` is there, disabled, and its groups.
    fn access(&self, user: &str) -> Option<(bool, Vec<String>)> {
        let p = self.control.dp.policy();
        let u = &p.users[p.user_by_name(user)? as usize];
        Some((
            u.disabled,
            u.groups
                .iter()
                .map(|&g| p.groups[g as usize].clone())
                .collect(),
        ))
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default()
    }
}

fn assert_error(a: &Answer, status: u16, scim_type: Option<&str>) {
    assert_eq!(a.status.as_u16(), status, "{}", a.body);
    assert_eq!(
        a.headers[header::CONTENT_TYPE],
        "application/scim+json",
        "{}",
        a.body
    );
    assert_eq!(
        a.body["schemas"],
        json!(["urn:ietf:params:scim:api:messages:2.0:Error"])
    );
    assert_eq!(a.body["status"], status.to_string());
    assert_eq!(a.body["scimType"].as_str(), scim_type, "{}", a.body);
}

async fn lifecycle(db: Option<&str>) {
    let h = start(db).await;
    let (token_id, token) = h.scim_token("entra").await;
    let t = Some(token.as_str());

    // Authentication: a SCIM token, nothing else.
    let a = h.call("GET", "/scim/v2/Users", None, None).await;
    assert_error(&a, 401, None);
    assert!(a.headers.contains_key(header::WWW_AUTHENTICATE));
    let admin = h.admin.clone();
    assert_error(
        &h.call("GET", "/scim/v2/Users", Some(&admin), None).await,
        401,
        None,
    );
    assert_error(
        &h.call(
            "GET",
            "/scim/v2/Users",
            Some("SKS1.nope.0123456789abcdef0123"),
            None,
        )
        .await,
        401,
        None,
    );
    // Only the admin role sees SCIM tokens.
    let (aid, asecret) = h
        .control
        .store
        .create_admin_token_with("auditor", Role::Auditor, None, now_unix())
        .await
        .unwrap();
    let auditor = Credential::format(api::ADMIN_PREFIX, &aid, &asecret, None);
    assert_eq!(
        h.call("GET", "/v1/admin/scim-tokens", Some(&auditor), None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // Discovery.
    let a = h
        .call("GET", "/scim/v2/ServiceProviderConfig", t, None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers[header::CONTENT_TYPE], "application/scim+json");
    assert_eq!(a.body["patch"]["supported"], true);
    assert_eq!(a.body["bulk"]["supported"], false);
    assert_eq!(
        a.body["meta"]["location"],
        "https://broker.test:8443/scim/v2/ServiceProviderConfig"
    );
    let a = h.call("GET", "/scim/v2/ResourceTypes", t, None).await;
    assert_eq!(a.body["totalResults"], 2);
    let a = h.call("GET", "/scim/v2/ResourceTypes/User", t, None).await;
    assert_eq!(a.body["endpoint"], "/Users");
    let a = h.call("GET", "/scim/v2/Schemas", t, None).await;
    assert_eq!(
        a.body["Resources"][0]["id"],
        "urn:ietf:params:scim:schemas:core:2.0:User"
    );
    let a = h
        .call(
            "GET",
            "/scim/v2/Schemas/urn:ietf:params:scim:schemas:core:2.0:Group",
            t,
            None,
        )
        .await;
    assert_eq!(a.body["name"], "Group");
    assert_error(&h.call("GET", "/scim/v2/Bulk", t, None).await, 404, None);
    assert_error(
        &h.call("DELETE", "/scim/v2/Users", t, None).await,
        405,
        None,
    );

    // Users, as Entra ID creates them.
    let alice_body = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "externalId": "0a1b2c",
        "userName": "alice@example.com",
        "active": true,
        "displayName": "Alice Liddell",
        "emails": [{"primary": true, "type": "work", "value": "alice@example.com"}],
        "name": {"formatted": "Alice Liddell", "familyName": "Liddell", "givenName": "Alice"},
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "R&D"},
    });
    let a = h
        .call("POST", "/scim/v2/Users", t, Some(alice_body.clone()))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let alice = a.id();
    assert!(alice.starts_with("u-"));
    assert_eq!(
        a.headers[header::LOCATION],
        format!("https://broker.test:8443/scim/v2/Users/{alice}").as_str()
    );
    assert_eq!(a.body["userName"], "alice@example.com");
    assert_eq!(a.body["active"], true);
    assert_eq!(a.body["meta"]["resourceType"], "User");
    assert_eq!(h.access("alice@example.com"), Some((false, vec![])));
    // userName is unique without regard to case.
    let mut dup = alice_body.clone();
    dup["userName"] = json!("ALICE@example.com");
    assert_error(
        &h.call("POST", "/scim/v2/Users", t, Some(dup)).await,
        409,
        Some("uniqueness"),
    );
    // A user of the policy file is taken too.
    assert_error(
        &h.call(
            "POST",
            "/scim/v2/Users",
            t,
            Some(json!({"userName": "Root-Ops"})),
        )
        .await,
        409,
        Some("uniqueness"),
    );
    for (body, kind) in [
        (json!({"userName": "has space"}), "invalidValue"),
        (json!({"displayName": "no userName"}), "invalidValue"),
        (
            json!({"userName": "x", "active": "perhaps"}),
            "invalidValue",
        ),
    ] {
        assert_error(
            &h.call("POST", "/scim/v2/Users", t, Some(body)).await,
            400,
            Some(kind),
        );
    }
    // Malformed, wrong type, too large.
    let post = |ct: &str, body: Vec<u8>| {
        Request::builder()
            .method("POST")
            .uri("/scim/v2/Users")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, ct)
            .body(Body::from(body))
            .unwrap()
    };
    assert_error(
        &h.raw(post("application/json", b"{\"userName\": ".to_vec()))
            .await,
        400,
        Some("invalidSyntax"),
    );
    assert_error(
        &h.raw(post("text/plain", b"{\"userName\": \"t\"}".to_vec()))
            .await,
        415,
        None,
    );
    let mut huge = b"{\"userName\": \"big\", \"x\": \"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 << 20));
    huge.extend(b"\"}");
    assert_error(&h.raw(post("application/json", huge)).await, 413, None);

    let bob = h
        .call(
            "POST",
            "/scim/v2/Users",
            t,
            Some(json!({"userName": "bob", "externalId": "b-1",
                "emails": [{"value": "bob@example.com", "type": "work"}]})),
        )
        .await;
    assert_eq!(bob.status, StatusCode::CREATED, "{}", bob.body);
    let bob = bob.id();
    let carol = h
        .call(
            "POST",
            "/scim/v2/Users",
            t,
            Some(json!({"userName": "carol"})),
        )
        .await
        .id();

    // Lists, filters, paging.
    let hr = &h;
    let list = move |q: &str| {
        let path = format!("/scim/v2/Users{q}");
        async move { hr.call("GET", &path, t, None).await }
    };
    let a = list("?filter=userName%20eq%20%22ALICE%40EXAMPLE.COM%22").await;
    assert_eq!(a.body["totalResults"], 1, "{}", a.body);
    assert_eq!(a.body["Resources"][0]["id"], alice.as_str());
    assert_eq!(
        a.body["schemas"],
        json!(["urn:ietf:params:scim:api:messages:2.0:ListResponse"])
    );
    let a = list("?filter=externalId%20eq%20%220a1b2c%22").await;
    assert_eq!(a.body["Resources"][0]["id"], alice.as_str());
    let a = list("?filter=emails%5Btype%20eq%20%22work%22%5D.value%20eq%20%22bob%40example.com%22")
        .await;
    assert_eq!(a.body["totalResults"], 1);
    assert_eq!(a.body["Resources"][0]["id"], bob.as_str());
    let a = list("?filter=userName%20eq%20%22nobody%22").await;
    assert_eq!(a.body["totalResults"], 0);
    assert_eq!(a.body["Resources"], json!([]));
    // Pages of one, in a stable order, cover every user once.
    let all = list("").await;
    assert_eq!(all.body["totalResults"], 3);
    let mut seen = Vec::new();
    for i in 1..=4 {
        let a = list(&format!("?startIndex={i}&count=1")).await;
        assert_eq!(
            (&a.body["totalResults"], &a.body["startIndex"]),
            (&json!(3), &json!(i))
        );
        assert_eq!(a.body["itemsPerPage"], if i <= 3 { 1 } else { 0 });
        if i <= 3 {
            assert_eq!(a.body["Resources"][0], all.body["Resources"][i - 1]);
            seen.push(a.body["Resources"][0]["id"].as_str().unwrap().to_string());
        }
    }
    seen.sort();
    let mut want = vec![alice.clone(), bob.clone(), carol.clone()];
    want.sort();
    assert_eq!(seen, want);
    assert_error(
        &list("?filter=title%20eq%20%22x%22").await,
        400,
        Some("invalidFilter"),
    );
    assert_error(
        &list("?filter=userName%20eq").await,
        400,
        Some("invalidFilter"),
    );
    assert_error(&list("?count=many").await, 400, Some("invalidValue"));
    let a = h
        .call(
            "POST",
            "/scim/v2/Users/.search",
            t,
            Some(
                json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                "filter": "userName sw \"c\"", "attributes": ["userName"]}),
            ),
        )
        .await;
    assert_eq!(a.body["totalResults"], 1, "{}", a.body);
    assert_eq!(
        a.body["Resources"][0],
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": carol, "userName": "carol"})
    );
    assert_error(
        &h.call("GET", "/scim/v2/Users/u-none", t, None).await,
        404,
        None,
    );

    // Groups: engineering (the policy file declares it) with alice; an unknown member is refused.
    let a = h
        .call(
            "POST",
            "/scim/v2/Groups",
            t,
            Some(
                json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                "displayName": "engineering", "members": [{"value": alice}]}),
            ),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let eng = a.id();
    assert_eq!(a.body["members"][0]["display"], "alice@example.com");
    assert_eq!(
        h.access("alice@example.com"),
        Some((false, vec!["engineering".to_string()]))
    );
    assert_error(
        &h.call(
            "POST",
            "/scim/v2/Groups",
            t,
            Some(json!({"displayName": "Engineering"})),
        )
        .await,
        409,
        Some("uniqueness"),
    );
    assert_error(
        &h.call(
            "POST",
            "/scim/v2/Groups",
            t,
            Some(json!({"displayName": "ghosts", "members": [{"value": "u-ghost"}]})),
        )
        .await,
        400,
        Some("invalidValue"),
    );
    let a = h
        .call(
            "GET",
            "/scim/v2/Groups?filter=displayName%20eq%20%22ghosts%22",
            t,
            None,
        )
        .await;
    assert_eq!(a.body["totalResults"], 0, "nothing was made: {}", a.body);
    let a = h
        .call(
            "POST",
            "/scim/v2/Groups",
            t,
            Some(json!({"displayName": "Sales Team"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let sales = a.id();
    let a = h
        .call(
            "GET",
            &format!("/scim/v2/Groups/{eng}?excludedAttributes=members"),
            t,
            None,
        )
        .await;
    assert!(a.body.get("members").is_none(), "{}", a.body);
    assert_eq!(a.body["displayName"], "engineering");
    let a = h
        .call(
            "GET",
            "/scim/v2/Groups?filter=displayName%20eq%20%22ENGINEERING%22&excludedAttributes=members",
            t,
            None,
        )
        .await;
    assert_eq!(a.body["totalResults"], 1);
    assert!(a.body["Resources"][0].get("members").is_none());
    let a = h
        .call("GET", &format!("/scim/v2/Users/{alice}"), t, None)
        .await;
    assert_eq!(a.body["groups"][0]["value"], eng.as_str());

    // Membership by PATCH, as Entra ID and Okta send it: access follows at once.
    let patch = |ops: Value| json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops});
    let a = h
        .call(
            "PATCH",
            &format!("/scim/v2/Groups/{eng}"),
            t,
            Some(patch(
                json!([{"op": "Add", "path": "members", "value": [{"value": bob}]}]),
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        h.access("bob"),
        Some((false, vec!["engineering".to_string()]))
    );
    let a = h
        .call(
            "PATCH",
            &format!("/scim/v2/Groups/{eng}"),
            t,
            Some(patch(
                json!([{"op": "remove", "path": format!("members[value eq \"{bob}\"]")}]),
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(h.access("bob"), Some((false, vec![])));
    let a = h
        .call(
            "PATCH",
            &format!("/scim/v2/Groups/{sales}"),
            t,
            Some(patch(json!([
                {"op": "Add", "path": "members", "value": [{"value": bob}, {"value": carol}]},
                {"op": "Remove", "path": "members", "value": [{"value": carol}]},
            ]))),
        )
        .await;
    assert_eq!(a.body["members"].as_array().unwrap().len(), 1, "{}", a.body);
    assert_eq!(
        h.access("bob"),
        Some((false, vec!["Sales Team".to_string()]))
    );
    assert_error(
        &h.call(
            "PATCH",
            &format!("/scim/v2/Groups/{sales}"),
            t,
            Some(patch(
                json!([{"op": "add", "path": "members", "value": [{"value": "u-ghost"}]}]),
            )),
        )
        .await,
        400,
        Some("invalidValue"),
    );

    // Deactivation as Entra ID sends it, then back with a string boolean.
    let a = h
        .call(
            "PATCH",
            &format!("/scim/v2/Users/{alice}"),
            t,
            Some(patch(
                json!([{"op": "Replace", "value": {"active": false}}]),
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["active"], false);
    assert_eq!(
        h.access("alice@example.com"),
        Some((true, vec!["engineering".to_string()]))
    );
    let a = h
        .call(
            "PATCH",
            &format!("/scim/v2/Users/{alice}"),
            t,
            Some(patch(
                json!([{"op": "replace", "path": "active", "value": "True"}]),
            )),
        )
        .await;
    assert_eq!(a.body["active"], true, "{}", a.body);
    assert_eq!(
        h.access("alice@example.com"),
        Some((false, vec!["engineering".to_string()]))
    );
    assert_error(
        &h.call(
            "PATCH",
            &format!("/scim/v2/Users/{alice}"),
            t,
            Some(patch(json!([{"op": "remove", "path": "userName"}]))),
        )
        .await,
        400,
        Some("invalidValue"),
    );
    assert_error(
        &h.call(
            "PATCH",
            &format!("/scim/v2/Users/{alice}"),
            t,
            Some(json!({"Operations": [{"op": "jump"}]})),
        )
        .await,
        400,
        Some("invalidSyntax"),
    );

    // A rename keeps the id and moves devices, memberships and pending enrollment tokens.
    let key = PrivateKey::generate().public().to_string();
    let a = h
        .call(
            "POST",
            "/v1/admin/devices",
            Some(&admin),
            Some(json!({"user": "alice@example.com",
                "devices": [{"name": "alice-laptop", "public_key": key}]})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let enroll = h
        .call(
            "POST",
            "/v1/admin/enrollment-tokens",
            Some(&admin),
            Some(json!({"user": "alice@example.com", "ttl_secs": 600})),
        )
        .await;
    assert_eq!(enroll.status, StatusCode::OK, "{}", enroll.body);
    let before = h.control.store.fingerprint().await.unwrap();
    let a = h
        .call(
            "PATCH",
            &format!("/scim/v2/Users/{alice}"),
            t,
            Some(patch(json!([
                {"op": "replace", "path": "userName", "value": "alice.l@example.com"},
                {"op": "replace", "path": "displayName", "value": "Alice L."},
            ]))),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.id(), alice);
    assert_eq!(a.body["userName"], "alice.l@example.com");
    assert_eq!(a.body["groups"][0]["display"], "engineering");
    assert_ne!(
        h.control.store.fingerprint().await.unwrap(),
        before,
        "brokers polling the store see the rename"
    );
    assert_eq!(h.access("alice@example.com"), None);
    assert_eq!(
        h.access("alice.l@example.com"),
        Some((false, vec!["engineering".to_string()]))
    );
    let devices = h.control.store.devices().await.unwrap();
    assert_eq!(devices[0].user, "alice.l@example.com");
    let p = h.control.dp.policy();
    assert_eq!(
        p.users[p.devices[0].user as usize].name,
        "alice.l@example.com"
    );
    drop(p);
    let a = h
        .call(
            "POST",
            "/v1/enroll/device",
            None,
            Some(json!({"token": enroll.body["token"], "name": "alice-phone",
                "public_key": PrivateKey::generate().public().to_string()})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["config"]["user"], "alice.l@example.com");
    // A case-only rename is a rename too; a taken name is refused.
    assert_error(
        &h.call(
            "PATCH",
            &format!("/scim/v2/Users/{alice}"),
            t,
            Some(patch(
                json!([{"op": "replace", "path": "userName", "value": "BOB"}]),
            )),
        )
        .await,
        409,
        Some("uniqueness"),
    );

    // PUT replaces; an omitted `active` stays as it is.
    let a = h
        .call(
            "PUT",
            &format!("/scim/v2/Users/{bob}"),
            t,
            Some(json!({"userName": "bob", "displayName": "Bob B."})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["displayName"], "Bob B.");
    assert!(a.body.get("emails").is_none() && a.body.get("externalId").is_none());
    assert_eq!(a.body["active"], true);
    let a = h
        .call(
            "PUT",
            &format!("/scim/v2/Groups/{sales}"),
            t,
            Some(json!({"displayName": "sales", "members": [{"value": carol}]})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(h.access("bob"), Some((false, vec![])));
    assert_eq!(h.access("carol"), Some((false, vec!["sales".to_string()])));

    // A policy naming carol and the directory's group contractors: neither can be renamed;
    // deleting them keeps their names for the policy.
    let contractors = h
        .call(
            "POST",
            "/scim/v2/Groups",
            t,
            Some(json!({"displayName": "contractors"})),
        )
        .await
        .id();
    h.control
        .apply_policy(
            Path::new("policy.toml"),
            &format!("{POLICY}{POLICY_NAMING}"),
            "test",
        )
        .await
        .map_err(|(_, r)| r.error)
        .unwrap();
    assert_error(
        &h.call(
            "PATCH",
            &format!("/scim/v2/Users/{carol}"),
            t,
            Some(patch(
                json!([{"op": "replace", "path": "userName", "value": "caroline"}]),
            )),
        )
        .await,
        400,
        Some("mutability"),
    );
    assert_error(
        &h.call(
            "PATCH",
            &format!("/scim/v2/Groups/{contractors}"),
            t,
            Some(patch(
                json!([{"op": "replace", "path": "displayName", "value": "vendors"}]),
            )),
        )
        .await,
        400,
        Some("mutability"),
    );
    let a = h
        .call("DELETE", &format!("/scim/v2/Groups/{contractors}"), t, None)
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_error(
        &h.call("GET", &format!("/scim/v2/Groups/{contractors}"), t, None)
            .await,
        404,
        None,
    );
    let a = h
        .call(
            "POST",
            "/scim/v2/Groups",
            t,
            Some(json!({"displayName": "contractors",
            "members": [{"value": bob}]})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "revived: {}", a.body);
    assert_ne!(a.id(), contractors);
    assert_eq!(
        h.access("bob"),
        Some((false, vec!["contractors".to_string()]))
    );
    let a = h
        .call("DELETE", &format!("/scim/v2/Users/{carol}"), t, None)
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(h.access("carol"), Some((true, vec![])), "kept, disabled");
    let a = h.call("GET", "/scim/v2/Users", t, None).await;
    assert_eq!(a.body["totalResults"], 2, "{}", a.body);

    // Deleting bob (no devices): gone. Deleting alice (devices): revoked, kept disabled, and a
    // new user of that name revives the record under a new id, devices still revoked.
    let a = h
        .call("DELETE", &format!("/scim/v2/Users/{bob}"), t, None)
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(h.access("bob"), None);
    assert!(
        !h.control
            .store
            .users()
            .await
            .unwrap()
            .iter()
            .any(|u| u.name == "bob")
    );
    let a = h
        .call("DELETE", &format!("/scim/v2/Users/{alice}"), t, None)
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_error(
        &h.call("GET", &format!("/scim/v2/Users/{alice}"), t, None)
            .await,
        404,
        None,
    );
    assert_error(
        &h.call("DELETE", &format!("/scim/v2/Users/{alice}"), t, None)
            .await,
        404,
        None,
    );
    assert_eq!(h.access("alice.l@example.com"), Some((true, vec![])));
    let devices = h.control.store.devices().await.unwrap();
    assert!(
        devices.iter().all(|d| d.revoked_at.is_some()),
        "{devices:?}"
    );
    assert!(h.control.dp.policy().devices.is_empty());
    let a = h
        .call(
            "POST",
            "/scim/v2/Users",
            t,
            Some(json!({"userName": "Alice.L@example.com", "active": false})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_ne!(a.id(), alice);
    assert_eq!(a.body["userName"], "Alice.L@example.com");
    assert_eq!(h.access("Alice.L@example.com"), Some((true, vec![])));
    assert!(
        h.control
            .store
            .devices()
            .await
            .unwrap()
            .iter()
            .all(|d| d.revoked_at.is_some() && d.user == "Alice.L@example.com")
    );
    let a = h
        .call("DELETE", &format!("/scim/v2/Groups/{eng}"), t, None)
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);

    // Audited as the token's name; the token revoked stops working at once.
    let audit = h.audit();
    for event in [
        "scim_token_created",
        "scim_user_created",
        "scim_user_updated",
        "scim_user_deleted",
        "scim_group_created",
        "scim_group_updated",
        "scim_group_deleted",
        "scim_refused",
    ] {
        assert!(
            audit.contains(&format!("\"event\":\"{event}\"")),
            "no {event} in the audit log"
        );
    }
    assert!(audit.contains("\"actor\":\"scim:entra\""));
    let a = h
        .call(
            "POST",
            &format!("/v1/admin/scim-tokens/{token_id}/revoke"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_error(&h.call("GET", "/scim/v2/Users", t, None).await, 401, None);
    let a = h
        .call("GET", "/v1/admin/scim-tokens", Some(&admin), None)
        .await;
    assert!(
        a.body[0]["revoked_at"].is_u64() && a.body[0]["used_at"].is_u64(),
        "{}",
        a.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scim_lifecycle_on_sqlite() {
    lifecycle(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scim_lifecycle_on_postgres() {
    if std::env::var_os("SEKISHO_SKIP_POSTGRES").is_some() {
        eprintln!("SEKISHO_SKIP_POSTGRES set: PostgreSQL test skipped");
        return;
    }
    let pg = sekisho_tests::pg::Postgres::start().expect(
        "cannot start a local PostgreSQL (install the postgresql package or set SEKISHO_SKIP_POSTGRES=1)",
    );
    lifecycle(Some(&pg.url())).await;
}

/// A broker that follows the store only by polling (SQLite) sees SCIM changes that leave
/// every count of the store as it was: a rename, a membership swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_broker_follows_renames_and_membership_swaps() {
    let a = start(None).await;
    let db = format!("sqlite://{}/state/broker.db", a.dir.display());
    let b = start_at(&a.dir, &db, false).await;
    let (_, token) = a.scim_token("entra").await;
    let t = Some(token.as_str());
    let dave = a
        .call(
            "POST",
            "/scim/v2/Users",
            t,
            Some(json!({"userName": "dave"})),
        )
        .await
        .id();
    let erin = a
        .call(
            "POST",
            "/scim/v2/Users",
            t,
            Some(json!({"userName": "erin"})),
        )
        .await
        .id();
    let eng = a
        .call(
            "POST",
            "/scim/v2/Groups",
            t,
            Some(json!({"displayName": "engineering", "members": [{"value": dave}]})),
        )
        .await
        .id();
    assert!(b.control.sync_from_store(false).await.unwrap());
    assert_eq!(
        b.access("dave"),
        Some((false, vec!["engineering".to_string()]))
    );
    // Swap the members: as many memberships as before.
    let r = a
        .call(
            "PUT",
            &format!("/scim/v2/Groups/{eng}"),
            t,
            Some(json!({"displayName": "engineering", "members": [{"value": erin}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        b.control.sync_from_store(false).await.unwrap(),
        "swap not seen"
    );
    assert_eq!(b.access("dave"), Some((false, vec![])));
    assert_eq!(
        b.access("erin"),
        Some((false, vec!["engineering".to_string()]))
    );
    // Rename erin twice within the same second: as many users as before, each time.
    for name in ["erin2", "erin3"] {
        let r = a
            .call(
                "PATCH",
                &format!("/scim/v2/Users/{erin}"),
                t,
                Some(json!({"Operations": [{"op": "replace", "path": "userName", "value": name}]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(
            b.control.sync_from_store(false).await.unwrap(),
            "{name} not seen"
        );
        assert_eq!(
            b.access(name),
            Some((false, vec!["engineering".to_string()]))
        );
    }
}
