//! Where registry credentials come from, in order:
//!
//! 1. `KILN_REGISTRY_AUTH`: a Docker config document (`{"auths": {...}}`),
//!    the form CI systems hand out (e.g. GitLab's `DOCKER_AUTH_CONFIG`);
//! 2. `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`: the
//!    host's `credHelpers` entry, then `credsStore`, then its `auths` entry;
//! 3. none: anonymous.
//!
//! Secrets never reach a log: [`Credential`]'s `Debug` shows only the user.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

/// How kiln authenticates to one registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    Anonymous,
    /// A user and password, sent as HTTP basic auth or to the token server.
    Basic {
        user: String,
        password: String,
    },
    /// A registry token used as is (`registrytoken` in a Docker config).
    Bearer(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Anonymous => write!(f, "anonymous"),
            Credential::Basic { user, .. } => write!(f, "user `{user}`"),
            Credential::Bearer(_) => write!(f, "a registry token"),
        }
    }
}

/// A credential and where it was found, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) credential: Credential,
    pub(crate) from: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("The Docker config {from} is not valid: {reason}")]
    BadConfig { from: String, reason: String },
    #[error("The credential helper `docker-credential-{helper}` failed for {host}: {reason}")]
    Helper { helper: String, host: String, reason: String },
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// The key Docker uses for a host: Docker Hub's is its legacy index URL.
fn docker_key(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        h => h,
    }
}

/// `https://host:port/v1/` → `host:port`, as Docker matches `auths` keys.
fn key_host(key: &str) -> &str {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

impl DockerConfig {
    fn parse(text: &str, from: &str) -> Result<DockerConfig, AuthError> {
        serde_json::from_str(text)
            .map_err(|e| AuthError::BadConfig { from: from.into(), reason: e.to_string() })
    }

    fn entry(&self, host: &str) -> Option<&AuthEntry> {
        let want = key_host(docker_key(host));
        self.auths
            .get(docker_key(host))
            .or_else(|| self.auths.iter().find(|(k, _)| key_host(k) == want).map(|(_, v)| v))
    }

    fn lookup(&self, host: &str, from: &str) -> Result<Option<Found>, AuthError> {
        if let Some(helper) = self.cred_helpers.get(host).or_else(|| self.cred_helpers.get(docker_key(host)))
        {
            return run_helper(helper, host);
        }
        // As Docker does: with a `credsStore`, `auths` entries are mostly empty placeholders.
        if let Some(store) = self.creds_store.as_deref().filter(|s| !s.is_empty()) {
            if let Some(f) = run_helper(store, host)? {
                return Ok(Some(f));
            }
        }
        if let Some(e) = self.entry(host) {
            let bad = |reason: &str| AuthError::BadConfig {
                from: from.into(),
                reason: format!("the entry for {host} {reason}"),
            };
            let credential = if let Some(t) = e.registrytoken.as_deref().filter(|t| !t.is_empty()) {
                Credential::Bearer(t.to_string())
            } else if e.identitytoken.as_deref().is_some_and(|t| !t.is_empty()) {
                return Err(bad("holds an identity token, which kiln cannot exchange; log in with a user and password or a registry token"));
            } else if let (Some(u), Some(p)) = (&e.username, &e.password) {
                Credential::Basic { user: u.clone(), password: p.clone() }
            } else if let Some(a) = e.auth.as_deref().filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|_| bad("has an `auth` that is not base64"))?;
                let text = String::from_utf8(raw).map_err(|_| bad("has an `auth` that is not UTF-8"))?;
                let (u, p) =
                    text.split_once(':').ok_or_else(|| bad("has an `auth` that is not `user:password`"))?;
                Credential::Basic { user: u.to_string(), password: p.to_string() }
            } else {
                return Ok(None);
            };
            return Ok(Some(Found { credential, from: from.to_string() }));
        }
        Ok(None)
    }
}

/// Asks `docker-credential-NAME get` for `host`'s credentials.
fn run_helper(name: &str, host: &str) -> Result<Option<Found>, AuthError> {
    let helper = format!("docker-credential-{name}");
    let err = |reason: String| AuthError::Helper { helper: name.into(), host: host.into(), reason };
    let mut child = Command::new(&helper)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run it ({e}); install it or remove it from the Docker config")))?;
    let server = if docker_key(host) != host { docker_key(host).to_string() } else { host.to_string() };
    let _ = child.stdin.take().expect("piped").write_all(server.as_bytes());
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        return Err(err(format!("{} ({msg})", out.status)));
    }
    #[derive(Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let r: Reply =
        serde_json::from_slice(&out.stdout).map_err(|e| err(format!("its answer is not JSON ({e})")))?;
    if r.username == "<token>" {
        return Err(err("it gave an identity token, which kiln cannot exchange".into()));
    }
    Ok(Some(Found {
        credential: Credential::Basic { user: r.username, password: r.secret },
        from: format!("docker-credential-{name}"),
    }))
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credential for `host` (`HOST[:PORT]`), from the places listed above.
pub(crate) fn lookup(host: &str) -> Result<Found, AuthError> {
    if let Ok(text) = std::env::var("KILN_REGISTRY_AUTH") {
        if !text.trim().is_empty() {
            let cfg = DockerConfig::parse(&text, "KILN_REGISTRY_AUTH")?;
            if let Some(f) = cfg.lookup(host, "KILN_REGISTRY_AUTH")? {
                return Ok(f);
            }
        }
    }
    if let Some(path) = docker_config_path() {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let from = path.display().to_string();
            if let Some(f) = DockerConfig::parse(&text, &from)?.lookup(host, &from)? {
                return Ok(f);
            }
        }
    }
    Ok(Found { credential: Credential::Anonymous, from: "no credentials".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(json: &str, host: &str) -> Option<Credential> {
        DockerConfig::parse(json, "test").unwrap().lookup(host, "test").unwrap().map(|f| f.credential)
    }

    #[test]
    fn reads_auth_user_password_and_tokens() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("ci:s3cret:with:colons");
        let cfg = format!(
            r#"{{"auths": {{"https://reg.example:5000/v1/": {{"auth": "{b64}"}},
                "other.example": {{"username": "u", "password": "p"}},
                "tok.example": {{"registrytoken": "T"}},
                "https://index.docker.io/v1/": {{"username": "hub", "password": "h"}}}}}}"#
        );
        assert_eq!(
            found(&cfg, "reg.example:5000"),
            Some(Credential::Basic { user: "ci".into(), password: "s3cret:with:colons".into() })
        );
        assert_eq!(
            found(&cfg, "other.example"),
            Some(Credential::Basic { user: "u".into(), password: "p".into() })
        );
        assert_eq!(found(&cfg, "tok.example"), Some(Credential::Bearer("T".into())));
        assert_eq!(
            found(&cfg, "docker.io"),
            Some(Credential::Basic { user: "hub".into(), password: "h".into() })
        );
        assert_eq!(found(&cfg, "nobody.example"), None);
    }

    #[test]
    fn bad_entries_are_errors_that_do_not_show_the_secret() {
        let err = DockerConfig::parse(r#"{"auths": {"r": {"auth": "not base64!"}}}"#, "cfg")
            .unwrap()
            .lookup("r", "cfg")
            .unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
        let debug = format!("{:?}", Credential::Basic { user: "u".into(), password: "hunter2".into() });
        assert!(!debug.contains("hunter2"));
    }

    #[test]
    fn the_creds_store_comes_before_empty_auths_placeholders() {
        let cfg = r#"{"auths": {"r.example": {}}, "credsStore": "kiln-no-such-store"}"#;
        let err = DockerConfig::parse(cfg, "cfg").unwrap().lookup("r.example", "cfg").unwrap_err();
        assert!(err.to_string().contains("docker-credential-kiln-no-such-store"), "{err}");
        let cfg = r#"{"auths": {"r.example": {}}}"#;
        assert_eq!(found(cfg, "r.example"), None);
    }

    #[test]
    fn a_missing_helper_is_a_clear_error() {
        let err = DockerConfig::parse(r#"{"credHelpers": {"r.example": "kiln-no-such-helper"}}"#, "cfg")
            .unwrap()
            .lookup("r.example", "cfg")
            .unwrap_err();
        assert!(err.to_string().contains("docker-credential-kiln-no-such-helper"), "{err}");
    }
}
