//! Control-plane tests over real HTTPS (axum + rustls on loopback), against SQLite and against
//! a PostgreSQL server started for the test (see `sekisho_tests::pg`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sekisho_proto::api::{self, Credential, ENROLL_PREFIX};
use sekisho_proto::flow::IdleTimeouts;
use sekisho_proto::keys::{PrivateKey, PublicKeyBytes};
use sekisho_proto::posture::{TokenError, TokenVerifier};
use sekisho_sys::http::{ApiClient, CallError, ca_tls, pinned_tls};

use crate::config::ControlConfig;
use crate::control::{Control, serve};
use crate::dataplane::{DataPlane, Outputs, Settings};
use crate::pki;
use crate::store::{Store, TokenKind, now_unix};

const POLICY: &str = r#"
[[groups]]
name = "engineering"

[[sites]]
name = "hq"

[[applications]]
name = "web"
site = "hq"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [80]

[[applications]]
name = "db"
site = "hq"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [5432]
sensitivity = 3

[[posture_checks]]
name = "edr"
kind = "process_running"
process = "edr-agent"

[sensitivity]
level3 = ["edr"]

[[rules]]
name = "engineering-apps"
action = "allow"
groups = ["engineering"]
applications = ["web", "db"]

[dns]
[[dns.blocklists]]
name = "demo"
category = "malware"
path = "lists/demo.domains"
[[dns.blocklists]]
name = "other"
category = "ads"
path = "lists/other.domains"
[[dns.filters]]
groups = ["engineering"]
block = ["malware"]
"#;

const TESTS: &str = r#"
[[tests]]
name = "alice reaches the web"
user = "alice"
destination = "10.20.0.10:80"
expect = "allow"
rule = "engineering-apps"

[[tests]]
name = "no db without edr"
user = "alice"
destination = "10.20.0.10:5432"
expect = "deny"
failing_checks = ["edr"]
"#;

struct Harness {
    dir: PathBuf,
    db: String,
    control: Arc<Control>,
    dp: DataPlane,
    base: String,
    ca_pem: String,
    ca_sha256: [u8; 32],
    admin: String,
    task: tokio::task::JoinHandle<()>,
    /// Background loops started by [`Harness::follow`].
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
        for l in &self.loops {
            l.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sekisho-ctl-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The key-encryption key file of the brokers sharing database `db`.
fn test_kek_file(db: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    db.hash(&mut h);
    std::env::temp_dir().join(format!("sekisho-test-kek-{:016x}", h.finish()))
}

/// A control plane on `config` over a one-worker data plane, with the CA and policy of `dir`.
pub(crate) async fn control_on(config: ControlConfig, dir: &Path) -> (Arc<Control>, DataPlane) {
    let (policy, opened) = Control::open(&config, &dir.join("policy.toml"), &dir.join("ca.pem"))
        .await
        .unwrap();
    let key = PrivateKey::generate();
    let broker_key = key.public().to_string();
    let (log, _) = tokio::sync::mpsc::channel(16);
    let dp = DataPlane::start(
        Settings {
            key,
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 1,
            worker: sekisho_proto::broker::WorkerConfig {
                worker: sekisho_proto::broker::WorkerId(0),
                name: "test".into(),
                timeouts: IdleTimeouts::default(),
                max_flows: 1000,
                max_flows_per_device: 100,
                overlay_mtu: 1360,
            },
        },
        policy,
        Outputs {
            log,
            egress: None,
            runtime: tokio::runtime::Handle::current(),
        },
    )
    .unwrap();
    let control = Control::new(opened, dp.clone(), config, broker_key).unwrap();
    (control, dp)
}

async fn start(dir: &Path, db: &str) -> Harness {
    start_with(dir, db, Duration::from_secs(300)).await
}

/// A control plane on `db` whose posture tokens last `token_lifetime`. Several may share
/// `dir` (and so the CA) and `db`, like the brokers of a cluster.
async fn start_with(dir: &Path, db: &str, token_lifetime: Duration) -> Harness {
    if !dir.join("ca.key").exists() {
        pki::init(dir, &["127.0.0.1".to_string()]).unwrap();
        std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
        std::fs::create_dir_all(dir.join("lists")).unwrap();
        std::fs::write(dir.join("lists/demo.domains"), "blocked.example\n").unwrap();
        std::fs::write(dir.join("lists/other.domains"), "ads.example\n").unwrap();
    }
    let config = ControlConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        url: String::new(),
        console_url: None,
        database: db.to_string(),
        ca_key: dir.join("ca.key"),
        // Brokers sharing a database share the key-encryption key (as a cluster must).
        key_encryption_key_file: Some(test_kek_file(db)),
        admin_listen: None,
        name: Some("test-region".into()),
        wireguard_endpoint: "192.0.2.1:51820".into(),
        connector_endpoint: "192.0.2.1:4433".into(),
        broker_name: "broker.sekisho.internal".into(),
        posture_token_lifetime: token_lifetime,
        connector_cert_lifetime: Duration::from_secs(3600),
        admin_token_file: dir.join("admin.token"),
        audit_log: dir.join("audit.log"),
        max_connections: 4096,
        max_connections_per_address: 64,
        oidc: None,
        ssf: None,
    };
    let (control, dp) = control_on(config, dir).await;
    let (ca_pem, ca_sha256) = (control.ca().cert_pem.clone(), control.ca().sha256);
    let admin = {
        let (id, secret) = control
            .store
            .create_admin_token("tester", now_unix())
            .await
            .unwrap();
        Credential::format(api::ADMIN_PREFIX, &id, &secret, None)
    };
    let (task, bound) = serve(
        control.clone(),
        "127.0.0.1:0".parse().unwrap(),
        crate::control::Scope::All,
        &dir.join("broker.pem"),
        &dir.join("ca.pem"),
        &dir.join("broker.key"),
    )
    .await
    .unwrap();
    Harness {
        dir: dir.to_path_buf(),
        db: db.to_string(),
        control,
        dp,
        base: format!("https://{bound}"),
        ca_pem,
        ca_sha256,
        admin,
        task,
        loops: Vec::new(),
    }
}

impl Harness {
    fn client(&self, bearer: Option<&str>) -> ApiClient {
        ApiClient::new(
            &self.base,
            ca_tls(&self.ca_pem).unwrap(),
            bearer.map(str::to_string),
        )
        .unwrap()
    }

    fn admin(&self) -> ApiClient {
        self.client(Some(&self.admin))
    }

    fn enrollee(&self) -> ApiClient {
        ApiClient::new(&self.base, pinned_tls(self.ca_sha256).unwrap(), None).unwrap()
    }

    async fn token(&self, user: Option<&str>, site: Option<&str>) -> String {
        let t: api::EnrollmentTokenInfo = self
            .admin()
            .post(
                "/v1/admin/enrollment-tokens",
                &api::CreateEnrollmentToken {
                    user: user.map(Into::into),
                    site: site.map(Into::into),
                    ttl_secs: 600,
                    class: None,
                },
            )
            .await
            .unwrap();
        t.token
    }

    async fn enroll(
        &self,
        token: &str,
        name: &str,
        key: &PrivateKey,
    ) -> Result<api::EnrollDeviceResponse, CallError> {
        self.enrollee()
            .post(
                "/v1/enroll/device",
                &api::EnrollDeviceRequest {
                    token: token.into(),
                    public_key: key.public().to_string(),
                    name: name.into(),
                },
            )
            .await
    }

    async fn device_count(&self) -> usize {
        self.control.store.devices().await.unwrap().len()
    }

    /// Runs the broker's registry loop (polling every `poll`; on PostgreSQL it also starts
    /// following the store by LISTEN/NOTIFY), as the broker does.
    fn follow(&mut self, poll: Duration) {
        self.loops
            .push(tokio::spawn(self.control.clone().registry_loop(poll)));
    }

    fn generation(&self) -> u64 {
        self.dp.generation()
    }

    fn has_device(&self, key: &PublicKeyBytes, name: &str) -> bool {
        let p = self.dp.policy();
        p.device_by_key(key)
            .is_some_and(|id| p.device(id).name == name)
    }
}

/// Waits until `ok` holds, at most `limit`; returns how long it took.
async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

fn refused(r: Result<impl std::fmt::Debug, CallError>) -> (u16, String) {
    match r {
        Err(CallError::Refused { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The whole control-plane scenario; run against each backend.
async fn suite(db: &str) {
    let dir = scratch("suite");
    let h = start(&dir, db).await;
    let backend = if db.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(h.control.store.backend(), backend);
    eprintln!("control-plane suite on {backend}");

    // Unauthenticated, malformed and unknown admin credentials are refused.
    let (s, m) = refused(
        h.client(None)
            .get::<Vec<api::UserInfo>>("/v1/admin/users")
            .await,
    );
    assert_eq!(s, 401, "{m}");
    let (s, _) = refused(
        h.client(Some("nonsense"))
            .get::<Vec<api::UserInfo>>("/v1/admin/users")
            .await,
    );
    assert_eq!(s, 401);
    let forged = Credential::format(
        api::ADMIN_PREFIX,
        "AAAAAAAAAAAA",
        "BBBBBBBBBBBBBBBBBBBBBBBB",
        None,
    );
    let (s, _) = refused(
        h.client(Some(&forged))
            .get::<Vec<api::UserInfo>>("/v1/admin/users")
            .await,
    );
    assert_eq!(s, 401);

    // Users and groups.
    let u: api::UserInfo = h
        .admin()
        .post(
            "/v1/admin/users",
            &api::CreateUser {
                name: "alice".into(),
                groups: vec!["engineering".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(u.groups, vec!["engineering"]);
    let (s, m) = refused(
        h.admin()
            .post::<_, api::UserInfo>(
                "/v1/admin/users",
                &api::CreateUser {
                    name: "alice".into(),
                    groups: vec![],
                },
            )
            .await,
    );
    assert_eq!((s, m.contains("already exists")), (409, true), "{m}");

    // Enrollment: a device from nothing.
    let token = h.token(Some("alice"), None).await;
    let key = PrivateKey::generate();
    let r = h.enroll(&token, "alice-laptop", &key).await.unwrap();
    assert_eq!(r.config.address.to_string(), "100.118.0.2");
    assert_eq!(r.config.user, "alice");
    assert_eq!(r.config.routes.len(), 1, "{:?}", r.config.routes);
    assert_eq!(r.config.checks.len(), 1);
    assert!(h.dp.policy().device_by_key(&key.public()).is_some());

    // Reused, expired, made-up and malformed tokens: clear errors, nothing created.
    let (s, m) = refused(h.enroll(&token, "second", &PrivateKey::generate()).await);
    assert_eq!((s, m.as_str()), (401, "enrollment token was already used"));
    let (id, secret) = h
        .control
        .store
        .create_enrollment_token(TokenKind::Device, "alice", now_unix() - 100, 10)
        .await
        .unwrap();
    let expired = Credential::format(ENROLL_PREFIX, &id, &secret, Some(&h.ca_sha256));
    let (s, m) = refused(h.enroll(&expired, "third", &PrivateKey::generate()).await);
    assert_eq!((s, m.as_str()), (401, "enrollment token has expired"));
    let made_up = Credential::format(
        ENROLL_PREFIX,
        "madeup",
        "0123456789abcdefghijklmn",
        Some(&h.ca_sha256),
    );
    let (s, m) = refused(h.enroll(&made_up, "fourth", &PrivateKey::generate()).await);
    assert_eq!((s, m.as_str()), (401, "unknown enrollment token"));
    let wrong_secret = format!("{}.{}.{}x", ENROLL_PREFIX, id, secret);
    assert!(
        h.enroll(&wrong_secret, "fifth", &PrivateKey::generate())
            .await
            .is_err()
    );
    assert_eq!(
        h.device_count().await,
        1,
        "refused enrollments created nothing"
    );
    // A token for a device cannot enroll a connector.
    let t2 = h.token(Some("alice"), None).await;
    let (s, _) = refused(
        h.enrollee()
            .post::<_, api::EnrollConnectorResponse>(
                "/v1/enroll/connector",
                &api::EnrollConnectorRequest {
                    token: t2.clone(),
                    csr_pem: csr(),
                },
            )
            .await,
    );
    assert_eq!(s, 400);
    // ...and that refusal did not use it up.
    h.enroll(&t2, "alice-desktop", &PrivateKey::generate())
        .await
        .unwrap();
    assert_eq!(h.device_count().await, 2);

    // A token pinned to another CA fails at TLS, before anything is sent.
    let other = ApiClient::new(&h.base, pinned_tls([9; 32]).unwrap(), None).unwrap();
    let e = other
        .post::<_, api::EnrollDeviceResponse>(
            "/v1/enroll/device",
            &api::EnrollDeviceRequest {
                token: token.clone(),
                public_key: key.public().to_string(),
                name: "x".into(),
            },
        )
        .await;
    assert!(matches!(e, Err(CallError::Unreachable { .. })), "{e:?}");

    // Device credentials: posture refresh yes, admin no.
    let device = h.client(Some(&r.credential));
    let (s, m) = refused(device.get::<Vec<api::UserInfo>>("/v1/admin/users").await);
    assert_eq!(s, 403, "{m}");
    let p: api::PostureResponse = device
        .post(
            "/v1/posture",
            &api::PostureRequest {
                checks: [("edr".to_string(), true)].into(),
                dns_blocks: Default::default(),
            },
        )
        .await
        .unwrap();
    let verifier =
        TokenVerifier::from_signer(&h.control.store.signing_key(now_unix()).await.unwrap());
    let claims = verifier
        .verify(&p.token, now_unix(), &key.public())
        .unwrap();
    assert_eq!(
        (claims.user.as_str(), claims.device.as_str()),
        ("alice", "alice-laptop")
    );
    assert!(claims.passes("edr"));
    assert!(
        verifier
            .verify(&p.token, now_unix(), &PublicKeyBytes([1; 32]))
            .is_err()
    );
    let (s, _) = refused(
        h.client(None)
            .post::<_, api::PostureResponse>(
                "/v1/posture",
                &api::PostureRequest {
                    checks: Default::default(),
                    dns_blocks: Default::default(),
                },
            )
            .await,
    );
    assert_eq!(s, 401);

    // DNS settings for the device's user, and the lists its filter uses (only those).
    assert_eq!(p.config.dns.blocklists, ["demo"]);
    let dns: api::DnsSettingsResponse = device.get("/v1/device/dns").await.unwrap();
    assert_eq!(dns.lists.len(), 1);
    assert_eq!(dns.lists[0].name, "demo");
    let body = device.get_bytes("/v1/device/dns/lists/demo").await.unwrap();
    assert_eq!(body, b"blocked.example\n");
    let (s, m) = refused(device.get_bytes("/v1/device/dns/lists/other").await);
    assert_eq!(s, 404, "{m}");
    let (s, _) = refused(h.client(None).get_bytes("/v1/device/dns/lists/demo").await);
    assert_eq!(s, 401);
    // The admin edits the file: the digest changes, so clients download it again.
    std::fs::write(
        h.dir.join("lists/demo.domains"),
        "blocked.example\nlater.example\n",
    )
    .unwrap();
    let again: api::DnsSettingsResponse = device.get("/v1/device/dns").await.unwrap();
    assert_ne!(again.lists[0].sha256, dns.lists[0].sha256);
    assert_eq!(again.lists[0].bytes, 30);

    // Policy apply: failing tests refuse it; passing tests put it in force.
    let bad_tests = format!(
        "{POLICY}{}",
        TESTS.replace("expect = \"deny\"", "expect = \"allow\"")
    );
    let (s, m) = refused(
        h.admin()
            .call::<_, api::PolicyApplied>(
                sekisho_sys::http::Method::PUT,
                "/v1/admin/policy",
                Some(&api::ApplyPolicy { text: bad_tests }),
            )
            .await,
    );
    assert_eq!(s, 422, "{m}");
    assert!(m.contains("1 of 2 policy tests failed"), "{m}");
    let (s, m) = refused(
        h.admin()
            .call::<_, api::PolicyApplied>(
                sekisho_sys::http::Method::PUT,
                "/v1/admin/policy",
                Some(&api::ApplyPolicy {
                    text: "[[rules]]\nname = 1".into(),
                }),
            )
            .await,
    );
    assert_eq!(s, 422);
    assert!(m.contains("policy.toml:2:"), "{m}");
    let applied: api::PolicyApplied = h
        .admin()
        .call(
            sekisho_sys::http::Method::PUT,
            "/v1/admin/policy",
            Some(&api::ApplyPolicy {
                text: format!("{POLICY}{TESTS}"),
            }),
        )
        .await
        .unwrap();
    assert_eq!(applied.version, 2);
    assert!(applied.tests.iter().all(|t| t.passed));

    // Explain.
    let explain = |failing: Vec<String>, port: u16| api::ExplainRequest {
        user: Some("alice".into()),
        device: None,
        address: "10.20.0.10".parse().unwrap(),
        port,
        protocol: sekisho_proto::policy::Protocol::Tcp,
        failing_checks: failing,
        risk: None,
        application: None,
    };
    let e: api::Explanation = h
        .admin()
        .post("/v1/admin/explain", &explain(vec![], 80))
        .await
        .unwrap();
    assert_eq!(
        (e.rule.as_deref(), e.application.as_deref()),
        (Some("engineering-apps"), Some("web"))
    );
    let e: api::Explanation = h
        .admin()
        .post("/v1/admin/explain", &explain(vec!["edr".into()], 5432))
        .await
        .unwrap();
    assert_eq!(e.decision, sekisho_proto::policy::Action::Deny);
    assert_eq!(e.check.as_deref(), Some("edr"));

    // Connector enrollment: a certificate for the token's site, recorded by serial.
    let ct = h.token(None, Some("hq")).await;
    let c: api::EnrollConnectorResponse = h
        .enrollee()
        .post(
            "/v1/enroll/connector",
            &api::EnrollConnectorRequest {
                token: ct.clone(),
                csr_pem: csr(),
            },
        )
        .await
        .unwrap();
    assert_eq!(c.site, "hq");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(c.certificate_pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateDer| d.to_vec())
        .unwrap();
    let serial = pki::cert_serial(&der).unwrap();
    assert_eq!(
        h.control.store.connector_by_serial(&serial).await.unwrap(),
        Some((c.connector.clone(), "hq".to_string()))
    );
    let (s, _) = refused(
        h.enrollee()
            .post::<_, api::EnrollConnectorResponse>(
                "/v1/enroll/connector",
                &api::EnrollConnectorRequest {
                    token: ct,
                    csr_pem: csr(),
                },
            )
            .await,
    );
    assert_eq!(s, 401);
    // Renewal over the link: the new certificate revokes its predecessor as soon as the
    // connector has used it once (a stolen predecessor is then worth nothing); until then the
    // predecessor still opens links and may renew again, so a lost answer locks nobody out.
    let serial_of = |pem: &str| {
        let der: rustls_pki_types::CertificateDer =
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        pki::cert_serial(&der).unwrap()
    };
    let store = &h.control.store;
    let lost = serial_of(
        &h.control
            .renew_connector(&serial, "hq", &csr())
            .await
            .unwrap(),
    );
    assert!(
        store.connector_by_serial(&serial).await.unwrap().is_some(),
        "the answer was lost: the predecessor must still link"
    );
    // Asked again with the predecessor: a new certificate replaces the lost one.
    let serial2 = serial_of(
        &h.control
            .renew_connector(&serial, "hq", &csr())
            .await
            .unwrap(),
    );
    assert_ne!(serial2, lost);
    assert_eq!(store.connector_serial_valid(&lost).await.unwrap(), None);
    assert!(store.connector_by_serial(&serial2).await.unwrap().is_some());
    assert_eq!(
        store.connector_by_serial(&serial).await.unwrap(),
        None,
        "the predecessor still links after the new certificate was used"
    );
    assert!(
        h.control
            .renew_connector(&serial, "hq", &csr())
            .await
            .is_err(),
        "a replaced certificate renewed"
    );
    let before = h.control.store.fingerprint().await.unwrap();
    let _: serde_json::Value = h
        .admin()
        .post(&format!("/v1/admin/connectors/{}/revoke", c.connector), &())
        .await
        .unwrap();
    assert_ne!(
        h.control.store.fingerprint().await.unwrap(),
        before,
        "the fingerprint covers connector revocations"
    );
    assert_eq!(
        h.control.store.connector_by_serial(&serial2).await.unwrap(),
        None
    );
    assert!(
        h.control
            .renew_connector(&serial2, "hq", &csr())
            .await
            .is_err()
    );

    // Revocation: the device leaves the data path and its credential stops working.
    let _: serde_json::Value = h
        .admin()
        .post("/v1/admin/devices/alice-laptop/revoke", &())
        .await
        .unwrap();
    assert!(h.dp.policy().device_by_key(&key.public()).is_none());
    let (s, _) = refused(
        device
            .post::<_, api::PostureResponse>(
                "/v1/posture",
                &api::PostureRequest {
                    checks: Default::default(),
                    dns_blocks: Default::default(),
                },
            )
            .await,
    );
    assert_eq!(s, 401);
    // A revoked key cannot come back.
    let t3 = h.token(Some("alice"), None).await;
    let (s, m) = refused(h.enroll(&t3, "alice-laptop-2", &key).await);
    assert_eq!(s, 409, "{m}");

    // Disabling a user denies their flows.
    let _: api::UserInfo = h
        .admin()
        .post("/v1/admin/users/alice/disable", &())
        .await
        .unwrap();
    let e: api::Explanation = h
        .admin()
        .post("/v1/admin/explain", &explain(vec![], 80))
        .await
        .unwrap();
    assert_eq!(e.reason, "user disabled");

    // Restart: everything survives in the database.
    let kid = h
        .control
        .store
        .signing_key(now_unix())
        .await
        .unwrap()
        .kid()
        .to_string();
    let (dir2, db2) = (h.dir.clone(), h.db.clone());
    h.task.abort();
    drop(h.control.clone());
    let store = Store::open(&db2).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), 10);
    // The signing keys are sealed at rest: without the key-encryption key they do not open.
    assert!(store.has_sealed_signing_keys().await.unwrap());
    let e = store.signing_keys(now_unix(), 300).await.err().unwrap();
    assert!(e.to_string().contains("no key-encryption key"), "{e}");
    store.set_kek(
        crate::kek::Kek::load(None, &test_kek_file(&db2), false)
            .unwrap()
            .0,
    );
    // The broker registry: two brokers on one store, each listed once, updates in place.
    let rec = |name: &str, key: &str| crate::store::BrokerRecord {
        public_key: key.into(),
        name: name.into(),
        wireguard_endpoint: format!("{name}.example:51820"),
        connector_endpoint: format!("{name}.example:4433"),
        api_url: format!("https://{name}.example:8443"),
    };
    store.register_broker(&rec("eu", "k1"), 1).await.unwrap();
    store.register_broker(&rec("us", "k2"), 1).await.unwrap();
    store
        .register_broker(&rec("eu-west", "k1"), 2)
        .await
        .unwrap();
    let names = |since| {
        let store = &store;
        async move {
            store
                .brokers(since)
                .await
                .unwrap()
                .into_iter()
                .map(|b| b.name)
                .collect::<Vec<String>>()
        }
    };
    assert_eq!(names(0).await, ["eu-west", "us"]);
    // A broker that stopped registering has left the list.
    assert_eq!(names(2).await, ["eu-west"]);
    // The fingerprint changes with the directory.
    let before = store.fingerprint().await.unwrap();
    store.create_user("carol", &[], 3).await.unwrap();
    assert_ne!(store.fingerprint().await.unwrap(), before);
    let devices = store.devices().await.unwrap();
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .any(|d| d.name == "alice-laptop" && d.revoked_at.is_some())
    );
    assert_eq!(store.latest_policy().await.unwrap().unwrap().0, 2);
    assert_eq!(store.signing_key(now_unix()).await.unwrap().kid(), kid);
    assert!(store.users().await.unwrap()[0].disabled);
    drop(store);
    let h2 = start(&dir2, &db2).await;
    let desk = h2
        .control
        .store
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.name == "alice-desktop")
        .unwrap();
    assert!(
        h2.dp
            .policy()
            .device_by_key(&PublicKeyBytes::parse(&desk.public_key).unwrap())
            .is_some()
    );
    assert_eq!(
        h2.dp.policy().tests.len(),
        2,
        "the applied policy, not the file, is in force"
    );
    // Audit trail of the whole scenario.
    let audit = std::fs::read_to_string(dir2.join("audit.log")).unwrap();
    for event in [
        "user_created",
        "enroll_device",
        "posture",
        "policy",
        "device_revoked",
        "connector_revoked",
    ] {
        assert!(
            audit.contains(&format!("\"event\":\"{event}\"")),
            "no {event} in the audit log"
        );
    }
    assert!(
        !audit.contains(&token),
        "the enrollment token is redacted in the audit log"
    );
    // Health without the background loops: the store answers, nothing follows it by
    // LISTEN/NOTIFY, one key, this broker alone.
    assert!(h2.control.ready().await);
    let health = h2.control.health();
    assert!(health.store_ok && !health.notify_connected, "{health:?}");
    assert_eq!(
        (health.signing_keys_valid, health.brokers),
        (1, 1),
        "{health:?}"
    );
    // The fingerprint covers rotations and retirements of signing keys.
    let store = &h2.control.store;
    let before = store.fingerprint().await.unwrap();
    store.rotate_signing_key(now_unix()).await.unwrap();
    let rotated = store.fingerprint().await.unwrap();
    assert_ne!(rotated, before);
    assert_eq!(
        store
            .retire_signing_keys(now_unix() + 1000, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_ne!(store.fingerprint().await.unwrap(), rotated);
    drop(h);
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_on_sqlite() {
    let dir = scratch("sqlite");
    suite(&format!("sqlite://{}/state/broker.db", dir.display())).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_on_postgres() {
    if std::env::var_os("SEKISHO_SKIP_POSTGRES").is_some() {
        eprintln!("SEKISHO_SKIP_POSTGRES set: PostgreSQL test skipped");
        return;
    }
    let pg = sekisho_tests::pg::Postgres::start()
        .expect("cannot start a local PostgreSQL (install the postgresql package or set SEKISHO_SKIP_POSTGRES=1)");
    suite(&pg.url()).await;
    // Migration 3 on a database left by an older broker.
    sqlx::any::install_default_drivers();
    let admin = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url())
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE legacy")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    migration_keeps_the_signing_key(&pg.url().replace("/postgres?", "/legacy?")).await;
}

#[tokio::test]
async fn migrations_are_applied_once() {
    let dir = scratch("migrate");
    let url = format!("sqlite://{}/m.db", dir.display());
    let a = Store::open(&url).await.unwrap();
    assert_eq!(a.schema_version().await.unwrap(), 10);
    drop(a);
    let b = Store::open(&url).await.unwrap();
    assert_eq!(b.schema_version().await.unwrap(), 10);
    assert!(Store::open("mysql://nope").await.is_err());
    let _ = std::fs::remove_dir_all(dir);
}

/// A database as a broker before signing-key rotation (schema 2) left it, with two keys made
/// by two brokers starting at once: migration 3 keeps the key that signed (the oldest).
async fn migration_keeps_the_signing_key(url: &str) {
    sqlx::any::install_default_drivers();
    let raw = if url.starts_with("sqlite://") {
        format!("{url}?mode=rwc")
    } else {
        url.to_string()
    };
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&raw)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, \
         description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (version, description, statements) in &crate::store::MIGRATIONS[..2] {
        for sql in *statements {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        sqlx::query("INSERT INTO schema_migrations VALUES ($1, $2, 0)")
            .bind(*version)
            .bind(*description)
            .execute(&pool)
            .await
            .unwrap();
    }
    let (old, other) = (
        sekisho_proto::posture::TokenSigner::generate(),
        sekisho_proto::posture::TokenSigner::generate(),
    );
    for (k, at) in [(&old, 5i64), (&other, 7)] {
        sqlx::query("INSERT INTO signing_keys (kid, seed, created_at) VALUES ($1, $2, $3)")
            .bind(k.kid())
            .bind(base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                k.seed(),
            ))
            .bind(at)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    let store = Store::open(url).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), 10);
    assert_eq!(
        store.signing_key(now_unix()).await.unwrap().kid(),
        old.kid()
    );
    // Seeds written in the clear by an older version are sealed once a KEK is loaded.
    assert!(!store.has_sealed_signing_keys().await.unwrap());
    store.set_kek(crate::kek::Kek::from_bytes(&[3; 32]));
    assert!(store.seal_plaintext_signing_keys().await.unwrap() >= 1);
    assert!(store.has_sealed_signing_keys().await.unwrap());
    assert_eq!(
        store.signing_key(now_unix()).await.unwrap().kid(),
        old.kid()
    );
    let keys = store.signing_keys(now_unix(), 300).await.unwrap();
    let states: Vec<_> = keys.iter().map(|k| (k.kid.as_str(), k.state)).collect();
    assert_eq!(
        states,
        [
            (old.kid(), api::SigningKeyState::Active),
            (other.kid(), api::SigningKeyState::Retired)
        ]
    );
    // A rotation after the migration takes the next generation.
    let fresh = store.rotate_signing_key(now_unix()).await.unwrap();
    assert_eq!(
        store.signing_key(now_unix()).await.unwrap().kid(),
        fresh.kid()
    );
}

#[tokio::test]
async fn migration_3_keeps_the_signing_key_on_sqlite() {
    let dir = scratch("legacy");
    let url = format!("sqlite://{}/legacy.db", dir.display());
    migration_keeps_the_signing_key(&url).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Two brokers on one store, following each other: a change made through one takes effect
/// at the other. `poll` is the fallback polling interval: on PostgreSQL it is set so long
/// that only LISTEN/NOTIFY can bring the changes over in time.
async fn cluster(db: &str, poll: Duration) {
    let dir = scratch("cluster");
    let pg = db.starts_with("postgres");
    let mut a = start(&dir, db).await;
    let mut b = start(&dir, db).await;
    a.follow(poll);
    b.follow(poll);
    if pg {
        wait_for("both brokers LISTEN", Duration::from_secs(10), || {
            a.control.health().notify_connected && b.control.health().notify_connected
        })
        .await;
    }
    // Each loop's first round (registration, a first sync) is over after this; on
    // PostgreSQL the next poll is a minute away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_for("each broker sees both", Duration::from_secs(10), || {
        a.control.health().brokers == 2 && b.control.health().brokers == 2
    })
    .await;
    let limit = Duration::from_secs(10);

    // A user created through A is in B's policy.
    let _: api::UserInfo = a
        .admin()
        .post(
            "/v1/admin/users",
            &api::CreateUser {
                name: "alice".into(),
                groups: vec!["engineering".into()],
            },
        )
        .await
        .unwrap();
    let d = wait_for("alice at B", limit, || {
        b.dp.policy().user_by_name("alice").is_some()
    })
    .await;
    eprintln!("user created through A: in B's policy after {d:?}");

    // A policy applied through A is in force at B.
    let gen_b = b.generation();
    let t0 = Instant::now();
    let applied: api::PolicyApplied = a
        .admin()
        .call(
            sekisho_sys::http::Method::PUT,
            "/v1/admin/policy",
            Some(&api::ApplyPolicy {
                text: format!("{POLICY}{TESTS}"),
            }),
        )
        .await
        .unwrap();
    assert_eq!(applied.version, 2);
    wait_for("the new policy at B", limit, || {
        b.dp.policy().tests.len() == 2
    })
    .await;
    eprintln!(
        "policy applied through A: in force at B after {:?}",
        t0.elapsed()
    );
    assert!(b.generation() > gen_b);
    let text: api::ApplyPolicy = b.admin().get("/v1/admin/policy").await.unwrap();
    assert_eq!(text.text, format!("{POLICY}{TESTS}"));

    // A device enrolled through A gets a peer at B; revoked through B, it is cut at B at
    // once and at A moments later.
    let key = PrivateKey::generate();
    let token = a.token(Some("alice"), None).await;
    a.enroll(&token, "alice-laptop", &key).await.unwrap();
    let d = wait_for("the device at B", limit, || {
        b.has_device(&key.public(), "alice-laptop")
    })
    .await;
    eprintln!("device enrolled through A: a peer at B after {d:?}");
    assert!(a.has_device(&key.public(), "alice-laptop"));
    let applied_a = a.control.health().changes_applied;
    let _: serde_json::Value = b
        .admin()
        .post("/v1/admin/devices/alice-laptop/revoke", &())
        .await
        .unwrap();
    assert!(
        !b.has_device(&key.public(), "alice-laptop"),
        "revoked through B: cut at B when the call returns"
    );
    let d = wait_for("the device gone at A", limit, || {
        !a.has_device(&key.public(), "alice-laptop")
    })
    .await;
    eprintln!("device revoked through B: peer and flows gone at A after {d:?}");

    if pg {
        // The LISTEN connections die (a database restart, a failover): both brokers
        // reconnect, catch up, and follow again.
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(db)
            .await
            .unwrap();
        let listeners = || async {
            let rows = sqlx::query(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%' ORDER BY pid",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.iter()
                .map(|r| sqlx::Row::get::<i32, _>(r, 0))
                .collect::<Vec<i32>>()
        };
        let old = listeners().await;
        assert_eq!(old.len(), 2, "one LISTEN connection per broker: {old:?}");
        for pid in &old {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(*pid)
                .execute(&pool)
                .await
                .unwrap();
        }
        let t0 = Instant::now();
        loop {
            let now = listeners().await;
            if now.len() == 2 && now.iter().all(|p| !old.contains(p)) {
                break;
            }
            assert!(t0.elapsed() < limit, "no new LISTEN connections: {now:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("LISTEN connections killed: back after {:?}", t0.elapsed());
        wait_for("both brokers LISTEN again", limit, || {
            a.control.health().notify_connected && b.control.health().notify_connected
        })
        .await;
        let _: api::UserInfo = b
            .admin()
            .post("/v1/admin/users/alice/disable", &())
            .await
            .unwrap();
        let d = wait_for("alice disabled at A", limit, || {
            let p = a.dp.policy().clone();
            p.user_by_name("alice")
                .is_some_and(|u| p.users[u as usize].disabled)
        })
        .await;
        eprintln!("after the reconnection, a user disabled through B: disabled at A after {d:?}");
        pool.close().await;
    }

    let (ha, hb) = (a.control.health(), b.control.health());
    assert!(ha.changes_applied > applied_a, "{ha:?}");
    assert!(ha.store_ok && hb.store_ok, "{ha:?} {hb:?}");
    assert_eq!(ha.notify_connected, pg, "{ha:?}");
    assert_eq!(hb.notify_connected, pg, "{hb:?}");
    assert_eq!(ha.store_errors, 0, "{ha:?}");
    assert!(a.control.ready().await && b.control.ready().await);
    drop((a, b));
    let _ = std::fs::remove_dir_all(dir);
}

/// Signing-key rotation on two brokers of one store: tokens signed before a rotation verify
/// at both until the previous key's window has passed, then that key is retired everywhere.
async fn rotation(db: &str, poll: Duration) {
    let dir = scratch("rotation");
    let pg = db.starts_with("postgres");
    // Tokens last 10 s: the previous key verifies for 70 s after the rotation.
    let lifetime = Duration::from_secs(10);
    let mut a = start_with(&dir, db, lifetime).await;
    let mut b = start_with(&dir, db, lifetime).await;
    a.follow(poll);
    b.follow(poll);
    if pg {
        wait_for("both brokers LISTEN", Duration::from_secs(10), || {
            a.control.health().notify_connected && b.control.health().notify_connected
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let limit = Duration::from_secs(10);
    let _: api::UserInfo = a
        .admin()
        .post(
            "/v1/admin/users",
            &api::CreateUser {
                name: "alice".into(),
                groups: vec!["engineering".into()],
            },
        )
        .await
        .unwrap();
    let key = PrivateKey::generate();
    let token = a.token(Some("alice"), None).await;
    let enrolled = a.enroll(&token, "alice-laptop", &key).await.unwrap();
    let posture = |h: &Harness| {
        let device = h.client(Some(&enrolled.credential));
        async move {
            device
                .post::<_, api::PostureResponse>(
                    "/v1/posture",
                    &api::PostureRequest {
                        checks: [("edr".to_string(), true)].into(),
                        dns_blocks: Default::default(),
                    },
                )
                .await
                .unwrap()
        }
    };
    let dev = key.public();

    // Before: one key, active.
    let before = posture(&a).await;
    let k1 = a.control.token_verifier().kids();
    assert_eq!(k1.len(), 1);
    let iat1 = a
        .control
        .token_verifier()
        .verify(&before.token, now_unix(), &dev)
        .unwrap()
        .iat;
    assert_eq!(before.config.override_keys.len(), 1);
    let keys: Vec<api::SigningKeyInfo> = a.admin().get("/v1/admin/signing-keys").await.unwrap();
    assert_eq!(
        keys.iter()
            .map(|k| (k.kid.clone(), k.state))
            .collect::<Vec<_>>(),
        [(k1[0].clone(), api::SigningKeyState::Active)]
    );

    // Rotate through A.
    let rotated: api::SigningKeyRotated = a
        .admin()
        .post("/v1/admin/signing-keys/rotate", &())
        .await
        .unwrap();
    assert_ne!(rotated.active, k1[0]);
    let states: Vec<_> = rotated
        .keys
        .iter()
        .map(|k| (k.kid.clone(), k.state))
        .collect();
    assert_eq!(
        states,
        [
            (rotated.active.clone(), api::SigningKeyState::Active),
            (k1[0].clone(), api::SigningKeyState::Previous)
        ]
    );
    let until = rotated.keys[1].verifies_until.unwrap();
    assert_eq!(until, rotated.keys[0].created_at + 10 + 60);
    assert_eq!(a.control.token_verifier().len(), 2, "at A at once");
    let d = wait_for("the new key at B", limit, || {
        b.control.token_verifier().len() == 2
    })
    .await;
    eprintln!("signing key rotated through A: verifying at B after {d:?}");
    // The token from before verifies at both; a new one is signed with the new key and
    // verifies at both too; devices get both keys for override codes.
    for h in [&a, &b] {
        h.control
            .token_verifier()
            .verify(&before.token, iat1 + 1, &dev)
            .unwrap();
    }
    let after = posture(&b).await;
    for h in [&a, &b] {
        let c = h
            .control
            .token_verifier()
            .verify(&after.token, now_unix(), &dev)
            .unwrap();
        assert_eq!(c.kid, rotated.active);
    }
    let mut override_kids: Vec<String> = after
        .config
        .override_keys
        .iter()
        .map(|k| k.kid.clone())
        .collect();
    override_kids.sort();
    // Override codes have keys of their own: as many as the posture keys, none the same.
    let posture_kids = a.control.token_verifier().kids();
    assert_eq!(override_kids.len(), posture_kids.len());
    assert!(
        override_kids.iter().all(|k| !posture_kids.contains(k)),
        "override codes are signed with the posture keys: {override_kids:?}"
    );
    assert_eq!(a.control.health().signing_keys_valid, 2);
    assert_eq!(b.control.health().signing_keys_valid, 2);

    // The CLI lists them.
    std::fs::write(dir.join("cli.token"), &a.admin).unwrap();
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        admin: crate::admin::AdminArgs,
    }
    let cli = |words: &[&str]| {
        let mut argv = vec![
            "sekisho-broker".to_string(),
            "--server".into(),
            a.base.clone(),
            "--ca".into(),
            dir.join("ca.pem").display().to_string(),
            "--token-file".into(),
            dir.join("cli.token").display().to_string(),
        ];
        argv.extend(words.iter().map(|w| w.to_string()));
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().admin
    };
    crate::admin::run_async(cli(&["signing-key", "list"]))
        .await
        .unwrap();
    let listed: Vec<api::SigningKeyInfo> = a.admin().get("/v1/admin/signing-keys").await.unwrap();
    let table = crate::admin::signing_keys_text(&listed);
    eprintln!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].starts_with(&rotated.active) && lines[1].contains(" active "));
    assert!(
        lines[2].starts_with(&k1[0])
            && lines[2].contains(" previous ")
            && lines[2].contains("verifies until")
    );
    assert!(crate::admin::rotated_text(&rotated).contains(&k1[0]));

    // The window passes (time injected at A): the previous key is retired at A, and at B
    // as soon as it hears of it.
    assert!(
        !a.control.tick_keys(until - 1).await.unwrap(),
        "not due yet"
    );
    assert_eq!(a.control.token_verifier().len(), 2);
    assert!(a.control.tick_keys(until).await.unwrap());
    assert_eq!(
        a.control.token_verifier().kids(),
        vec![rotated.active.clone()]
    );
    let d = wait_for("the old key retired at B", limit, || {
        b.control.token_verifier().len() == 1
    })
    .await;
    eprintln!("previous key retired at A: gone at B after {d:?}");
    for h in [&a, &b] {
        assert!(
            matches!(
                h.control
                    .token_verifier()
                    .verify(&before.token, iat1 + 1, &dev),
                Err(TokenError::UnknownKey(_))
            ),
            "a token of the retired key no longer verifies"
        );
        h.control
            .token_verifier()
            .verify(&after.token, now_unix(), &dev)
            .unwrap();
        assert_eq!(h.control.health().signing_keys_valid, 1);
    }
    let listed: Vec<api::SigningKeyInfo> = b.admin().get("/v1/admin/signing-keys").await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|k| (k.kid.clone(), k.state, k.retired_at.is_some()))
            .collect::<Vec<_>>(),
        [
            (rotated.active.clone(), api::SigningKeyState::Active, false),
            (k1[0].clone(), api::SigningKeyState::Retired, true)
        ]
    );
    let table = crate::admin::signing_keys_text(&listed);
    assert!(
        table.lines().nth(2).unwrap().contains(" retired "),
        "{table}"
    );
    crate::admin::run_async(cli(&["signing-key", "rotate"]))
        .await
        .unwrap();
    assert_eq!(a.control.token_verifier().len(), 2);
    let audit = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    for event in ["signing_key_rotated", "signing_key_retired"] {
        assert!(
            audit.contains(&format!("\"event\":\"{event}\"")),
            "no {event} in the audit log"
        );
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(dir);
}

fn postgres() -> Option<sekisho_tests::pg::Postgres> {
    if std::env::var_os("SEKISHO_SKIP_POSTGRES").is_some() {
        eprintln!("SEKISHO_SKIP_POSTGRES set: PostgreSQL test skipped");
        return None;
    }
    Some(sekisho_tests::pg::Postgres::start().expect(
        "cannot start a local PostgreSQL (install the postgresql package or set SEKISHO_SKIP_POSTGRES=1)",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_follows_changes_by_notify_on_postgres() {
    let Some(pg) = postgres() else { return };
    cluster(&pg.url(), Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_follows_changes_by_polling_on_sqlite() {
    let dir = scratch("cluster-sqlite");
    cluster(
        &format!("sqlite://{}/broker.db", dir.display()),
        Duration::from_millis(200),
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_key_rotation_on_postgres() {
    let Some(pg) = postgres() else { return };
    rotation(&pg.url(), Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_key_rotation_on_sqlite() {
    let dir = scratch("rotation-sqlite");
    rotation(
        &format!("sqlite://{}/broker.db", dir.display()),
        Duration::from_millis(200),
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The API's limits: idle connections from one address take only that address's slots and go
/// after the handshake timeout, a refused enrollment with a huge field leaves a short audit
/// line, and enrollment from one address is rate limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_answering_under_idle_connections_and_floods() {
    let dir = scratch("limits");
    let h = start(&dir, &format!("sqlite://{}/state/broker.db", dir.display())).await;
    let api: std::net::SocketAddr = h.base.trim_start_matches("https://").parse().unwrap();
    // 200 idle TCP connections from another loopback address (no TLS handshake, nothing sent).
    let mut idle = Vec::new();
    for _ in 0..200 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.9:0".parse().unwrap()).unwrap();
        if let Ok(c) = s.connect(api).await {
            idle.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gate = h.control.api_gate.lock().unwrap().clone().unwrap();
    assert!(
        gate.open() <= 64,
        "{} connections held from one address",
        gate.open()
    );
    // The admin (another address) is answered at once.
    let t0 = Instant::now();
    let users: Vec<api::UserInfo> = h.admin().get("/v1/admin/users").await.unwrap();
    let took = t0.elapsed();
    eprintln!("admin call with 200 idle connections from another address: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(users);
    // The idle ones are closed after the handshake timeout.
    let closed = wait_for("idle connections closed", Duration::from_secs(10), || {
        gate.open() == 0
    })
    .await;
    eprintln!("idle connections closed after {closed:?}");
    drop(idle);

    // A refused enrollment carrying a 60 KB name: a short audit line, without the name.
    let big = "x".repeat(60_000);
    let (status, _) = refused(
        h.enrollee()
            .post::<_, api::EnrollDeviceResponse>(
                "/v1/enroll/device",
                &api::EnrollDeviceRequest {
                    token: "SKE1.nothing".into(),
                    public_key: "AAAA".into(),
                    name: big,
                },
            )
            .await,
    );
    assert_eq!(status, 401);
    let audit = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let last = audit.lines().last().unwrap();
    assert!(
        last.len() < 1000,
        "audit line of {} bytes: {last}",
        last.len()
    );
    assert!(last.contains("60000 bytes"), "{last}");

    // Enrollment from one address: 20 at once, then about 2 a second.
    let mut limited = 0;
    for _ in 0..40 {
        let r = h
            .enrollee()
            .post::<_, api::EnrollDeviceResponse>(
                "/v1/enroll/device",
                &api::EnrollDeviceRequest {
                    token: "SKE1.nothing".into(),
                    public_key: "AAAA".into(),
                    name: "n".into(),
                },
            )
            .await;
        if let Err(CallError::Refused { status: 429, .. }) = r {
            limited += 1;
        }
    }
    assert!(limited >= 15, "{limited} of 40 rate limited");
    let _ = std::fs::remove_dir_all(dir);
}

/// An enrollment that would clash with the policy text is refused with the reason and stores
/// nothing; a clash that reaches the directory anyway (another broker, an older version) is
/// left out of the policy with an error, and later changes (a revocation) still take effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_clashes_are_refused_at_enrollment_and_never_hold_up_later_changes() {
    let dir = scratch("clash");
    let h = start(&dir, &format!("sqlite://{}/state/broker.db", dir.display())).await;
    let _: api::UserInfo = h
        .admin()
        .post(
            "/v1/admin/users",
            &api::CreateUser {
                name: "alice".into(),
                groups: vec!["engineering".into()],
            },
        )
        .await
        .unwrap();
    // The policy file has its own user and device, at the device range's first free address.
    let frank = PrivateKey::generate();
    let text = format!(
        "{POLICY}\n[[users]]\nname = \"frank\"\ngroups = [\"engineering\"]\n[[devices]]\n\
         name = \"frank-laptop\"\nuser = \"frank\"\npublic_key = \"{}\"\naddress = \"100.118.0.2\"\n",
        frank.public()
    );
    let _: api::PolicyApplied = h
        .admin()
        .call(
            sekisho_sys::http::Method::PUT,
            "/v1/admin/policy",
            Some(&api::ApplyPolicy { text }),
        )
        .await
        .unwrap();
    // Its name and its key are refused, with the reason; nothing is stored.
    let before = h.device_count().await;
    for (name, key) in [
        ("frank-laptop", PrivateKey::generate()),
        ("other", frank.clone()),
    ] {
        let t = h.token(Some("alice"), None).await;
        let (s, m) = refused(h.enroll(&t, name, &key).await);
        assert_eq!(s, 409, "{name}: {m}");
        assert!(m.contains("already") && m.contains("policy"), "{m}");
    }
    assert_eq!(
        h.device_count().await,
        before,
        "a refused enrollment stored a device"
    );
    // A device that fits gets an address the file's device does not use.
    let key = PrivateKey::generate();
    let t = h.token(Some("alice"), None).await;
    let enrolled = h.enroll(&t, "alice-laptop", &key).await.unwrap();
    assert_ne!(enrolled.config.address.to_string(), "100.118.0.2");
    assert!(h.dp.policy().device_by_key(&key.public()).is_some());

    // A clashing device reaches the store past these checks (as an older broker would let it).
    let clash = h
        .control
        .store
        .register_devices(
            "alice",
            &[(
                "frank-laptop".into(),
                PrivateKey::generate().public().to_string(),
            )],
            crate::store::now_unix(),
            "100.118.0.0/16".parse().unwrap(),
            &crate::store::Reserved::default(),
        )
        .await
        .unwrap();
    assert!(
        clash.is_ok(),
        "the store alone does not know the policy file"
    );
    // alice's device is revoked: the revocation reaches the data path although the directory
    // now holds an entry the policy cannot take.
    let _: serde_json::Value = h
        .admin()
        .post("/v1/admin/devices/alice-laptop/revoke", &())
        .await
        .unwrap();
    assert!(
        h.dp.policy().device_by_key(&key.public()).is_none(),
        "a revocation was held up by an unrelated clash"
    );
    assert_eq!(h.control.health().directory_left_out, 1);
    assert!(h.dp.policy().device_by_key(&frank.public()).is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// Admin tokens have a name, a role and an expiry; each role reaches only its part of the API,
/// tokens are listed and revoked, and every refused admin call is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_have_roles_expiry_and_revocation_and_refusals_are_audited() {
    use sekisho_proto::roles::Role;
    let dir = scratch("roles");
    let h = start(&dir, &format!("sqlite://{}/state/broker.db", dir.display())).await;
    let make = |name: &str, role: Role, ttl: Option<u64>| {
        let h = &h;
        let name = name.to_string();
        async move {
            let t: api::AdminTokenCreated = h
                .admin()
                .post(
                    "/v1/admin/admin-tokens",
                    &api::CreateAdminToken {
                        name,
                        role,
                        ttl_secs: ttl,
                    },
                )
                .await
                .unwrap();
            t
        }
    };
    let helpdesk = make("hd-sam", Role::Helpdesk, Some(3600)).await;
    let auditor = make("audit-ann", Role::Auditor, None).await;
    let operator = make("ops-olu", Role::Operator, None).await;
    let brief = make("brief", Role::Admin, Some(1)).await;
    assert_eq!(helpdesk.role, Role::Helpdesk);
    assert!(helpdesk.expires_at.is_some() && auditor.expires_at.is_none());

    let status = |r: Result<serde_json::Value, CallError>| match r {
        Ok(_) => 200,
        Err(CallError::Refused { status, .. }) => status,
        Err(e) => panic!("{e:?}"),
    };
    let get = |token: &str, path: &str| {
        let c = h.client(Some(token));
        let path = path.to_string();
        async move { c.get::<serde_json::Value>(&path).await }
    };
    let user = |name: &str| api::CreateUser {
        name: name.into(),
        groups: vec![],
    };
    // helpdesk: devices only.
    assert_eq!(status(get(&helpdesk.token, "/v1/admin/devices").await), 200);
    assert_eq!(status(get(&helpdesk.token, "/v1/admin/users").await), 403);
    assert_eq!(status(get(&helpdesk.token, "/v1/admin/policy").await), 403);
    // auditor: reads, writes nothing, sees no admin tokens.
    assert_eq!(status(get(&auditor.token, "/v1/admin/users").await), 200);
    assert_eq!(status(get(&auditor.token, "/v1/admin/policy").await), 200);
    assert_eq!(
        status(get(&auditor.token, "/v1/admin/admin-tokens").await),
        403
    );
    let (s, m) = refused(
        h.client(Some(&auditor.token))
            .post::<_, api::UserInfo>("/v1/admin/users", &user("eve"))
            .await,
    );
    assert_eq!(s, 403, "{m}");
    assert!(m.contains("auditor"), "{m}");
    // operator: users and devices, not the policy nor admin tokens.
    let _: api::UserInfo = h
        .client(Some(&operator.token))
        .post("/v1/admin/users", &user("olive"))
        .await
        .unwrap();
    let (s, _) = refused(
        h.client(Some(&operator.token))
            .call::<_, api::PolicyApplied>(
                sekisho_sys::http::Method::PUT,
                "/v1/admin/policy",
                Some(&api::ApplyPolicy {
                    text: POLICY.into(),
                }),
            )
            .await,
    );
    assert_eq!(s, 403);
    assert_eq!(
        status(get(&operator.token, "/v1/admin/admin-tokens").await),
        403
    );

    // Listed by the admin (never with secrets), revoked at once, expired on time.
    let list: Vec<api::AdminTokenInfo> = h.admin().get("/v1/admin/admin-tokens").await.unwrap();
    let names: Vec<(&str, Role)> = list.iter().map(|t| (t.name.as_str(), t.role)).collect();
    assert!(
        names.contains(&("hd-sam", Role::Helpdesk)) && names.contains(&("tester", Role::Admin))
    );
    let text = serde_json::to_string(&list).unwrap();
    assert!(!text.contains(helpdesk.token.split('.').nth(2).unwrap_or("secret")));
    let _: serde_json::Value = h
        .admin()
        .post(
            &format!("/v1/admin/admin-tokens/{}/revoke", helpdesk.id),
            &(),
        )
        .await
        .unwrap();
    let (s, m) = refused(get(&helpdesk.token, "/v1/admin/devices").await);
    assert_eq!(s, 401);
    assert!(m.contains("revoked"), "{m}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (s, m) = refused(get(&brief.token, "/v1/admin/users").await);
    assert_eq!(s, 401);
    assert!(m.contains("expired"), "{m}");

    // Every refusal is in the audit log, with who (when known), what and why.
    let audit = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let refusals: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "admin_refused")
        .collect();
    assert!(refusals.len() >= 8, "{refusals:#?}");
    assert!(refusals.iter().any(|r| r["actor"] == "audit-ann"
        && r["detail"]["method"] == "POST"
        && r["detail"]["path"] == "/v1/admin/users"));
    assert!(
        refusals
            .iter()
            .any(|r| r["detail"]["reason"] == "expired admin token")
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// With `admin_listen`, the admin API answers only on its own address; the public listener
/// serves devices and enrollment and knows no admin route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_can_listen_on_its_own_address() {
    use crate::control::Scope;
    let dir = scratch("adminlisten");
    let h = start(&dir, &format!("sqlite://{}/state/broker.db", dir.display())).await;
    let serve_as = |scope| {
        let (control, dir) = (h.control.clone(), dir.clone());
        async move {
            serve(
                control,
                "127.0.0.1:0".parse().unwrap(),
                scope,
                &dir.join("broker.pem"),
                &dir.join("ca.pem"),
                &dir.join("broker.key"),
            )
            .await
            .unwrap()
        }
    };
    let (public_task, public) = serve_as(Scope::Public).await;
    let (admin_task, admin) = serve_as(Scope::Admin).await;
    let at = |addr: std::net::SocketAddr, token: Option<&str>| {
        ApiClient::new(
            &format!("https://{addr}"),
            ca_tls(&h.ca_pem).unwrap(),
            token.map(str::to_string),
        )
        .unwrap()
    };
    let users = at(admin, Some(&h.admin))
        .get::<Vec<api::UserInfo>>("/v1/admin/users")
        .await;
    assert!(users.is_ok(), "{users:?}");
    let (s, _) = refused(
        at(public, Some(&h.admin))
            .get::<Vec<api::UserInfo>>("/v1/admin/users")
            .await,
    );
    assert_eq!(s, 404, "the public listener served the admin API");
    // Enrollment is on the public listener, not on the admin one.
    let body = api::EnrollDeviceRequest {
        token: "SKE1.bogus".into(),
        public_key: PrivateKey::generate().public().to_string(),
        name: "x".into(),
    };
    let (s, _) = refused(
        at(public, None)
            .post::<_, api::EnrollDeviceResponse>("/v1/enroll/device", &body)
            .await,
    );
    assert_ne!(s, 404);
    let (s, _) = refused(
        at(admin, None)
            .post::<_, api::EnrollDeviceResponse>("/v1/enroll/device", &body)
            .await,
    );
    assert_eq!(s, 404);
    public_task.abort();
    admin_task.abort();
    let _ = std::fs::remove_dir_all(dir);
}
