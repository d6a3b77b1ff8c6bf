//! A bad config or policy is rejected with the file, line and field named, by every binary.
//! No namespaces needed: the binaries refuse before touching the network.

use std::path::Path;
use std::process::Command;

use sekisho_tests::binaries;

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(binaries().join(bin))
        .args(args)
        .output()
        .expect("run binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sekisho-cfg-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn policy_errors_name_file_line_and_field() {
    let dir = tempdir("policy");
    let p = write(
        &dir,
        "policy.toml",
        "[[groups]]\nname = \"eng\"\n\n[[users]]\nname = \"alice\"\ngroups = [\"engg\"]\n",
    );
    let (code, err) = run("sekisho-broker", &["check-policy", &p]);
    assert_eq!(code, 2);
    assert!(err.contains("policy.toml:6:"), "{err}");
    assert!(
        err.contains("users[0].groups[0]") && err.contains("unknown group \"engg\""),
        "{err}"
    );

    let p = write(
        &dir,
        "policy2.toml",
        "[[sites]]\nname = \"dc1\"\n[[applications]]\nname = \"a\"\nsite = \"dc1\"\naddresses = [\"10.0.0.300\"]\nprotocols = [\"tcp\"]\n",
    );
    let (code, err) = run("sekisho-broker", &["check-policy", &p]);
    assert_eq!(code, 2);
    assert!(
        err.contains("policy2.toml:6:") && err.contains("applications[0].addresses[0]"),
        "{err}"
    );

    let p = write(&dir, "ok.toml", "[[sites]]\nname = \"dc1\"\n");
    let out = Command::new(binaries().join("sekisho-broker"))
        .args(["check-policy", &p])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 0 users"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn daemon_configs_name_file_line_and_field() {
    let dir = tempdir("daemons");
    let b = write(
        &dir,
        "broker.toml",
        "private_key_file = \"k\"\npolicy = \"p.toml\"\nlisten_wireguard = \"0.0.0.0:99999\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
    );
    let (code, err) = run("sekisho-broker", &["run", "--config", &b]);
    assert_eq!(code, 2);
    assert!(
        err.contains("broker.toml:3:") && err.contains("listen_wireguard"),
        "{err}"
    );

    let c = write(
        &dir,
        "client.toml",
        "[interface]\nprivate_key_file = \"k\"\naddress = \"100.118.0.2\"\nmtuu = 1400\n[broker]\nendpoint = \"x:1\"\npublic_key = \"k\"\n",
    );
    let (code, err) = run("sekisho-client", &["run", "--config", &c]);
    assert_eq!(code, 2);
    assert!(
        err.contains("client.toml:4:") && err.contains("mtuu"),
        "{err}"
    );

    let c = write(
        &dir,
        "client2.toml",
        "[interface]\nprivate_key_file = \"k\"\naddress = \"100.118.0.2\"\n[broker]\nendpoint = \"x:1\"\npublic_key = \"short\"\n",
    );
    let (code, err) = run("sekisho-client", &["run", "--config", &c]);
    assert_eq!(code, 2);
    assert!(
        err.contains("client2.toml:6:") && err.contains("broker.public_key"),
        "{err}"
    );

    let k = write(
        &dir,
        "connector.toml",
        "site = \"dc1\"\nbroker = \"10.0.0.1:4433\"\n[tls]\nca = \"a\"\ncert = \"b\"\n",
    );
    let (code, err) = run("sekisho-connector", &["--config", &k]);
    assert_eq!(code, 2);
    assert!(
        err.contains("connector.toml") && err.contains("tls") && err.contains("key"),
        "{err}"
    );

    let (code, err) = run(
        "sekisho-connector",
        &["--config", "/nonexistent/connector.toml"],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("/nonexistent/connector.toml") && err.contains("cannot read"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The documented examples parse: each binary gets past its config and stops at the first file
/// the example refers to.
#[test]
fn documented_examples_are_valid_configs() {
    let ex = sekisho_tests::workspace().join("deploy/examples");
    let (code, err) = run(
        "sekisho-broker",
        &["run", "--config", ex.join("broker.toml").to_str().unwrap()],
    );
    assert_eq!(code, 2);
    assert!(err.contains("cannot read key file"), "{err}");
    let (code, err) = run(
        "sekisho-client",
        &["run", "--config", ex.join("client.toml").to_str().unwrap()],
    );
    assert_eq!(code, 2);
    assert!(err.contains("cannot read key file"), "{err}");
    let (code, err) = run(
        "sekisho-connector",
        &["--config", ex.join("connector.toml").to_str().unwrap()],
    );
    assert_eq!(code, 2);
    assert!(err.contains("pki/ca.pem"), "{err}");
}
