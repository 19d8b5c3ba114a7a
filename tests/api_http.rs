//! The HTTPS API end to end: a real `deskgrid serve` (libvirt's test
//! driver, so no desktop is ever free) and the real `curl` binary, which
//! verifies the server's self-signed certificate with `--cacert` the way a
//! user's script would. Logins, tokens, the broker's refusals as HTTP
//! statuses, the body limits, the rate limit, logout, a deleted user's
//! token, and `api.listen = "off"`. A real reservation over HTTPS, with
//! QEMU guests, is in `tests/desktop_grid.rs`.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{create_template, deskgrid, init_new_grid, stderr, stdout, succeeded, Server};

/// The API starts right after the control socket; generous for a loaded
/// CI machine, never reached when healthy.
const API_START_TIMEOUT: Duration = Duration::from_secs(20);

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Sets `api.listen` in the config `init` wrote (it says "auto").
fn set_api_listen(data_dir: &Path, listen: &str) {
    let path = data_dir.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("listen = \"auto\"").count(), 1, "{text}");
    std::fs::write(
        &path,
        text.replace("listen = \"auto\"", &format!("listen = {listen:?}")),
    )
    .unwrap();
}

/// `deskgrid status` as JSON.
fn status(data_dir: &Path) -> serde_json::Value {
    json(&succeeded(deskgrid(
        data_dir,
        &["--output", "json", "status"],
    )))
}

/// The API's address once the server says it listens.
fn api_address(data_dir: &Path) -> (String, String) {
    let started = Instant::now();
    loop {
        let api = status(data_dir)["api"].clone();
        if api["state"] == "listening" {
            return (
                api["address"].as_str().unwrap().to_owned(),
                api["certificate_sha256"].as_str().unwrap().to_owned(),
            );
        }
        assert!(
            started.elapsed() < API_START_TIMEOUT,
            "the API never listened: {api}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTPS exchange as curl saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", self.body))
    }

    /// The status and the error code of a JSON error.
    fn refusal(&self) -> (u16, String) {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        (
            self.status,
            self.json()["code"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

/// The API of one server, reached with curl and its certificate.
struct Api {
    base: String,
    certificate: PathBuf,
}

impl Api {
    /// `curl` with `arguments` on `path`; the raw output.
    fn curl_raw(&self, path: &str, arguments: &[&str]) -> Output {
        Command::new("curl")
            .args(["--silent", "--show-error", "--include", "--max-time", "30"])
            .arg("--cacert")
            .arg(&self.certificate)
            .args(arguments)
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("curl runs (scripts/setup-host.sh installs it)")
    }

    fn curl(&self, path: &str, arguments: &[&str]) -> Answer {
        let output = self.curl_raw(path, arguments);
        assert!(output.status.success(), "curl: {}", stderr(&output));
        parse_answer(&stdout(&output))
    }

    /// A JSON POST with optional bearer token and extra arguments.
    fn post(&self, path: &str, body: &str, token: Option<&str>, extra: &[&str]) -> Answer {
        let authorization = token.map(|token| format!("Authorization: Bearer {token}"));
        let mut arguments = vec![
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ];
        if let Some(authorization) = &authorization {
            arguments.extend(["-H", authorization.as_str()]);
        }
        arguments.extend(extra);
        self.curl(path, &arguments)
    }

    fn login(&self, user: &str, password: &str) -> Answer {
        let body = serde_json::json!({"user": user, "password": password}).to_string();
        self.post("/api/v1/login", &body, None, &[])
    }

    fn token(&self, user: &str, password: &str) -> String {
        let answer = self.login(user, password);
        assert_eq!(answer.status, 200, "{answer:?}");
        answer.json()["token"].as_str().unwrap().to_owned()
    }
}

fn parse_answer(text: &str) -> Answer {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn add_user(data_dir: &Path, name: &str, password: &str) {
    let file = data_dir.with_extension(format!("{name}.password"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    succeeded(deskgrid(
        data_dir,
        &[
            "user",
            "add",
            name,
            "--password-file",
            &file.display().to_string(),
        ],
    ));
}

fn entitle(data_dir: &Path, user: &str, template: &str) {
    succeeded(deskgrid(
        data_dir,
        &["entitle", "--user", user, "--template", template],
    ));
}

#[test]
fn the_https_api_logs_in_once_and_answers_connects_with_the_brokers_refusals() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("server");
    init_new_grid(&data_dir, "api-1");
    // Any free port: the test reads it back from `deskgrid status`.
    set_api_listen(&data_dir, "127.0.0.1:0");
    let server = Server::start(&data_dir);
    let (address, fingerprint) = api_address(&data_dir);

    // The certificate was made on first start, its key private, and the
    // fingerprint shown is the certificate's.
    let certificate = data_dir.join("api/tls-cert.pem");
    let key_mode = std::fs::metadata(data_dir.join("api/tls-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let openssl = succeeded(
        Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&certificate)
            .output()
            .unwrap(),
    );
    assert!(
        stdout(&openssl)
            .trim()
            .ends_with(&format!("={fingerprint}")),
        "openssl: {} vs status: {fingerprint}",
        stdout(&openssl)
    );
    let text_status = stdout(&succeeded(deskgrid(&data_dir, &["status"])));
    assert!(
        text_status.contains(&format!("api      https://{address}/api/v1/"))
            && text_status.contains(&fingerprint),
        "{text_status}"
    );

    let api = Api {
        base: format!("https://{address}"),
        certificate: certificate.clone(),
    };
    let port = address.rsplit_once(':').unwrap().1.to_owned();

    // The certificate verifies for the IP and for localhost (its SANs), and
    // only with --cacert: curl checks, nothing is skipped.
    assert_eq!(api.curl("/", &[]).refusal(), (404, "not-found".to_owned()));
    let by_name = Api {
        base: format!("https://localhost:{port}"),
        certificate: certificate.clone(),
    };
    assert_eq!(by_name.curl("/", &[]).status, 404);
    let unpinned = Command::new("curl")
        .args(["--silent", "--max-time", "30"])
        .arg(format!("{}/", api.base))
        .output()
        .unwrap();
    assert_eq!(unpinned.status.code(), Some(60), "self-signed: refused");
    // Plain HTTP on the TLS port: the handshake fails, the accept loop
    // goes on (every request below comes after these failed handshakes).
    let plain = Command::new("curl")
        .args(["--silent", "--max-time", "30"])
        .arg(format!("http://{address}/api/v1/login"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain HTTP answered");
    let wrong_name = Api {
        base: format!("https://elsewhere.example:{port}"),
        certificate: certificate.clone(),
    }
    .curl_raw(
        "/",
        &["--resolve", &format!("elsewhere.example:{port}:127.0.0.1")],
    );
    assert_eq!(
        wrong_name.status.code(),
        Some(60),
        "a name not in the certificate: {}",
        stderr(&wrong_name)
    );

    create_template(&data_dir, "office");
    create_template(&data_dir, "cad");
    add_user(&data_dir, "alice", "alice's long password");
    add_user(&data_dir, "carol", "carol's long password");
    add_user(&data_dir, "dave", "dave's long password");
    entitle(&data_dir, "alice", "office");
    entitle(&data_dir, "carol", "office");
    entitle(&data_dir, "carol", "cad");

    // A wrong password and an unknown user get the same answer.
    let wrong = api.login("alice", "not it");
    assert_eq!(wrong.refusal(), (401, "bad-credentials".to_owned()));
    let unknown = api.login("nobody", "alice's long password");
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.body, wrong.body);
    assert_eq!(
        wrong.json()["error"],
        "wrong user name or password",
        "the broker's message"
    );

    // A login gives a token for 8 hours.
    let login = api.login("alice", "alice's long password");
    assert_eq!(login.status, 200, "{login:?}");
    assert_eq!(login.header("cache-control"), Some("no-store"));
    let answer = login.json();
    assert_eq!(answer["user"], "alice");
    let token = answer["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|byte| byte.is_ascii_hexdigit()));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let expires_at_ms = answer["expires_at_ms"].as_u64().unwrap();
    let eight_hours_ms = 8 * 3600 * 1000;
    assert!(
        expires_at_ms > now_ms + eight_hours_ms - 60_000
            && expires_at_ms <= now_ms + eight_hours_ms + 60_000,
        "{expires_at_ms} vs {now_ms}"
    );

    // Connect with the token: no desktop exists, so "none free" and when
    // to come back; an empty body is fine with a token.
    let none_free = api.post("/api/v1/connect", "", Some(&token), &[]);
    assert_eq!(none_free.refusal(), (503, "none-free".to_owned()));
    assert_eq!(none_free.header("retry-after"), Some("15"));
    let message = none_free.json()["error"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with("no free desktop of template office: none free"),
        "{message}"
    );
    // The same with the password in the body, and the site given.
    let with_password = api.post(
        "/api/v1/connect",
        r#"{"user": "alice", "password": "alice's long password", "client_site": "default"}"#,
        None,
        &[],
    );
    assert_eq!(with_password.refusal(), (503, "none-free".to_owned()));

    // Not entitled: 403, by token or by password.
    let dave = api.token("dave", "dave's long password");
    let refused = api.post("/api/v1/connect", "{}", Some(&dave), &[]);
    assert_eq!(refused.refusal(), (403, "not-entitled".to_owned()));
    let refused = api.post(
        "/api/v1/connect",
        r#"{"user": "dave", "password": "dave's long password"}"#,
        None,
        &[],
    );
    assert_eq!(refused.refusal(), (403, "not-entitled".to_owned()));
    let refused = api.post(
        "/api/v1/connect",
        r#"{"template": "cad"}"#,
        Some(&token),
        &[],
    );
    assert_eq!(refused.refusal(), (403, "template-not-entitled".to_owned()));
    assert_eq!(refused.json()["templates"], serde_json::json!(["office"]));

    // Several templates and none chosen: 409 with the list; a choice works.
    let carol = api.token("carol", "carol's long password");
    let choose = api.post("/api/v1/connect", "", Some(&carol), &[]);
    assert_eq!(choose.refusal(), (409, "choose-template".to_owned()));
    assert_eq!(
        choose.json()["templates"],
        serde_json::json!(["cad", "office"])
    );
    let chosen = api.post(
        "/api/v1/connect",
        r#"{"template": "cad"}"#,
        Some(&carol),
        &[],
    );
    assert_eq!(chosen.refusal(), (503, "none-free".to_owned()));

    // A token nobody issued, and none at all.
    let bad = api.post("/api/v1/connect", "", Some(&"0".repeat(64)), &[]);
    assert_eq!(bad.refusal(), (401, "bad-token".to_owned()));
    assert_eq!(bad.header("www-authenticate"), Some("Bearer"));
    let nothing = api.post("/api/v1/connect", "", None, &[]);
    assert_eq!(nothing.refusal(), (401, "no-credentials".to_owned()));

    // Requests that are not what the API takes.
    let malformed = api.post(
        "/api/v1/login",
        r#"{"user": "alice", "password""#,
        None,
        &[],
    );
    assert_eq!(malformed.refusal(), (400, "malformed-request".to_owned()));
    let unknown_field = api.post(
        "/api/v1/connect",
        r#"{"templat": "cad"}"#,
        Some(&token),
        &[],
    );
    assert_eq!(
        unknown_field.refusal(),
        (400, "malformed-request".to_owned())
    );
    let body_file = temp.path().join("large.json");
    std::fs::write(
        &body_file,
        format!(
            r#"{{"user": "alice", "password": "{}"}}"#,
            "x".repeat(20 * 1024)
        ),
    )
    .unwrap();
    let large = api.post(
        "/api/v1/login",
        &format!("@{}", body_file.display()),
        None,
        &[],
    );
    assert_eq!(large.refusal(), (413, "body-too-large".to_owned()));
    let form = api.curl(
        "/api/v1/login",
        &["-X", "POST", "--data", "user=alice&password=x"],
    );
    assert_eq!(form.refusal(), (415, "not-json".to_owned()));
    let get = api.curl("/api/v1/connect", &[]);
    assert_eq!(get.refusal(), (405, "method-not-allowed".to_owned()));
    let elsewhere = api.post("/api/v2/connect", "{}", None, &[]);
    assert_eq!(elsewhere.refusal(), (404, "not-found".to_owned()));

    // Logout ends the token, and only once.
    let logout = api.post("/api/v1/logout", "", Some(&token), &[]);
    assert_eq!(logout.status, 204, "{logout:?}");
    let after = api.post("/api/v1/connect", "", Some(&token), &[]);
    assert_eq!(after.refusal(), (401, "bad-token".to_owned()));
    let again = api.post("/api/v1/logout", "", Some(&token), &[]);
    assert_eq!(again.refusal(), (401, "bad-token".to_owned()));

    // A deleted user's token stops working at once.
    let second = api.token("alice", "alice's long password");
    assert_eq!(
        api.post("/api/v1/connect", "", Some(&second), &[]).status,
        503
    );
    succeeded(deskgrid(&data_dir, &["user", "delete", "alice"]));
    let deleted = api.post("/api/v1/connect", "", Some(&second), &[]);
    assert_eq!(deleted.refusal(), (401, "bad-credentials".to_owned()));
    let deleted = api.post("/api/v1/connect", "", Some(&second), &[]);
    assert_eq!(deleted.refusal(), (401, "bad-token".to_owned()), "dropped");

    // Repeated wrong passwords from one address: 429 with Retry-After, even
    // for the right password. From another loopback address, so the
    // logins above (from 127.0.0.1) are not part of the count.
    let from_elsewhere = ["--interface", "127.0.0.3"];
    let login_from_elsewhere = |password: &str| {
        let body = serde_json::json!({"user": "carol", "password": password}).to_string();
        api.post("/api/v1/login", &body, None, &from_elsewhere)
    };
    for attempt in 0..5 {
        assert_eq!(
            login_from_elsewhere("guess").status,
            401,
            "attempt {attempt}"
        );
    }
    let limited = login_from_elsewhere("carol's long password");
    assert_eq!(limited.refusal(), (429, "too-many-attempts".to_owned()));
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(limited.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("too many attempts, retry in"));

    let output = server.stop();
    assert!(output.status.success());
    let log = stderr(&output);
    for secret in [
        "alice's long password",
        "carol's long password",
        token.as_str(),
        carol.as_str(),
    ] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
    assert!(log.contains("HTTPS API listening"), "{log}");
}

#[test]
fn an_api_switched_off_serves_nothing_and_makes_no_certificate() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("server");
    let address = init_new_grid(&data_dir, "api-off");
    set_api_listen(&data_dir, "off");
    let server = Server::start(&data_dir);
    assert_eq!(status(&data_dir)["api"]["state"], "off");
    assert!(stdout(&succeeded(deskgrid(&data_dir, &["status"]))).contains("api      off"));
    assert!(!data_dir.join("api").exists());
    // Nothing on the port "auto" would have taken (the QUIC port + 1000).
    let quic_port: u16 = address.rsplit_once(':').unwrap().1.parse().unwrap();
    let refused = Command::new("curl")
        .args(["--silent", "--max-time", "10"])
        .arg(format!("https://127.0.0.1:{}/", quic_port + 1000))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(7), "connection refused");
    assert!(server.stop().status.success());

    // A value that is none of "auto", "off" or an address is named.
    let config = data_dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("listen = \"off\"", "listen = \"everywhere\""),
    )
    .unwrap();
    let output = deskgrid(&data_dir, &["serve"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output)
            .contains("api.listen \"everywhere\" is not \"auto\", \"off\" or an IP:PORT address"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_automatic_address_in_use_is_reported_and_a_configured_one_stops_the_start() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("server");
    // Something else holds the port "auto" derives (the QUIC port + 1000).
    // A standalone server binds no QUIC port, so any QUIC port will do.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    let quic_port = taken.port() - 1000;
    let output = deskgrid(
        &data_dir,
        &[
            "init",
            "--name",
            "api-taken",
            "--listen",
            &format!("127.0.0.1:{quic_port}"),
            "--libvirt",
            "test:///default",
        ],
    );
    assert!(output.status.success(), "init: {}", stderr(&output));
    let server = Server::start(&data_dir);
    let started = Instant::now();
    let api = loop {
        let api = status(&data_dir)["api"].clone();
        if api["state"] != "off" {
            break api;
        }
        assert!(started.elapsed() < API_START_TIMEOUT, "{api}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(api["state"], "failed", "{api}");
    assert_eq!(api["address"], taken.to_string());
    let text = stdout(&succeeded(deskgrid(&data_dir, &["status"])));
    assert!(
        text.contains(&format!("api      not listening on {taken}: ")),
        "{text}"
    );
    assert!(server.stop().status.success());

    // The same address set by the admin: the start fails and says why.
    set_api_listen(&data_dir, &taken.to_string());
    let output = deskgrid(&data_dir, &["serve"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(&format!("cannot listen for the HTTPS API on {taken}")),
        "{}",
        stderr(&output)
    );
    drop(squatter);
}
