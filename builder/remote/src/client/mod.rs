//! OCI registries (the distribution API), through `oci-client`: manifests
//! by tag or digest, blobs streamed into and out of the store.
//!
//! - Every blob pulled goes through a [`BlobWriter`] and is committed only
//!   when its bytes hash to the digest asked for, so a registry that stops
//!   mid-transfer leaves nothing in the store.
//! - Blobs are pushed from the store's files in 8 MiB pieces, never whole
//!   in memory; a blob the repository has is skipped, one another
//!   repository of the same registry has is mounted.
//! - Plain HTTP only for hosts marked insecure and for loopback.
//! - A request whose connection fails is tried again (3 times in all);
//!   a blob starts over.
//!
//! The API is synchronous: each call runs on the runtime it was given.

pub mod auth;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::{Reference, RegistryOperation};

pub(crate) use auth::{Credential, Found};
use kiln_cache::{BlobWriter, Digest, Store, StoreError};
pub(crate) use kiln_oci::image::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Manifests larger than this are refused (distribution's own limit is 4 MiB).
const MANIFEST_MAX: usize = 4 << 20;
const PIECE: usize = 8 << 20;
/// Tries per request when the connection fails.
const ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("The registry {host} refused {who}{detail}")]
    Refused { host: String, who: String, detail: String },
    #[error("The connection to the registry {host} failed: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("`{reference}` is not in the registry")]
    NotFound { reference: String },
    #[error("The registry {host} answered in a way kiln cannot use: {detail}")]
    Protocol { host: String, detail: String },
    #[error("`{reference}` is not a registry reference ({reason}); write it as HOST/REPO:TAG or HOST/REPO@sha256:DIGEST")]
    BadReference { reference: String, reason: String },
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl kiln_oci::error::RegistryFailure for RegistryError {
    fn exit_code(&self) -> i32 {
        match self {
            RegistryError::NotFound { .. } | RegistryError::BadReference { .. } => 2,
            RegistryError::Store(StoreError::DigestMismatch { .. }) => 2,
            _ => 3,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            RegistryError::Refused { host, .. } => Some(format!(
                "check the credentials for {host}: `docker login {host}`, or KILN_REGISTRY_AUTH with a Docker config"
            )),
            RegistryError::Unreachable { host, .. } => Some(format!(
                "nothing half-transferred was kept; check that {host} is up and reachable and run the command again (a registry that speaks plain HTTP needs `--insecure-registry {host}`)"
            )),
            RegistryError::NotFound { .. } => {
                Some("check the repository, tag or digest, e.g. `skopeo list-tags docker://HOST/REPO`".into())
            }
            RegistryError::Auth(_) => Some("fix the Docker config (or KILN_REGISTRY_AUTH) it names".into()),
            RegistryError::Protocol { .. } => {
                Some("nothing was kept from this transfer; try again, and if it persists check the registry".into())
            }
            RegistryError::BadReference { .. } | RegistryError::Store(_) => None,
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl From<RegistryError> for kiln_oci::BuildError {
    fn from(e: RegistryError) -> Self {
        kiln_oci::BuildError::Registry(Box::new(e))
    }
}

/// What a [`kiln_oci::BuildError`] says of a registry, when it is one.
pub fn registry_error(e: &kiln_oci::BuildError) -> Option<&RegistryError> {
    match e {
        kiln_oci::BuildError::Registry(r) => r.as_any().downcast_ref(),
        _ => None,
    }
}

/// A repository in a registry, with a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Remote {
    pub host: String,
    pub repo: String,
    pub(crate) tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Remote {
    /// Parses `HOST/REPO[:TAG][@sha256:HEX]`. A reference without a host
    /// means Docker Hub, as with `docker pull`.
    pub fn parse(s: &str) -> Result<Remote, RegistryError> {
        Self::parse_with_default_tag(s, "latest")
    }

    /// [`Remote::parse`], with `default_tag` when the text names neither a
    /// tag nor a digest (e.g. a cache's `kiln-cache`).
    pub(crate) fn parse_with_default_tag(s: &str, default_tag: &str) -> Result<Remote, RegistryError> {
        let bad = |reason: String| RegistryError::BadReference { reference: s.to_string(), reason };
        let r: Reference = s.parse().map_err(|e: oci_client::ParseError| bad(e.to_string()))?;
        let digest = match r.digest() {
            Some(d) => Some(d.parse::<Digest>().map_err(|e| bad(e.to_string()))?),
            None => None,
        };
        // oci-client fills in `latest`; keep its tag only when the text has one.
        let name_part = s.split('@').next().unwrap_or(s);
        let named_tag = name_part.rsplit('/').next().unwrap_or(name_part).contains(':');
        let tag = match (named_tag, &digest) {
            (true, _) => r.tag().map(str::to_string),
            (false, None) => Some(default_tag.to_string()),
            (false, Some(_)) => None,
        };
        Ok(Remote { host: r.registry().to_string(), repo: r.repository().to_string(), tag, digest })
    }

    /// The same repository, naming `digest`.
    pub fn with_digest(&self, d: Digest) -> Remote {
        Remote { digest: Some(d), tag: None, ..self.clone() }
    }

    fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::with_digest(self.host.clone(), self.repo.clone(), d.to_string()),
            (None, t) => Reference::with_tag(
                self.host.clone(),
                self.repo.clone(),
                t.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }

    /// Whether plain HTTP is allowed without being asked: loopback hosts.
    pub(crate) fn is_loopback(&self) -> bool {
        let name = match self.host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => self.host.rsplit_once(':').map(|(h, _)| h).unwrap_or(&self.host),
        };
        name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Hosts (`HOST[:PORT]`) spoken to over plain HTTP; loopback always is.
    pub insecure: Vec<String>,
    /// Upload each blob in one request instead of chunks.
    pub monolithic: bool,
}

/// What pushing one blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// The repository had it.
    Present,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded: this many bytes.
    Uploaded(u64),
}

/// A manifest (or index) as the registry holds it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub(crate) bytes: Vec<u8>,
    pub digest: Digest,
    pub(crate) media_type: String,
}

/// A manifest's media type: its `mediaType`, else guessed from its shape
/// (an index lists `manifests`). `None` when it is not a JSON object.
pub(crate) fn media_type_of(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default, rename = "mediaType")]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(bytes).ok()?;
    Some(
        head.media_type
            .unwrap_or_else(|| if head.manifests.is_some() { OCI_INDEX } else { OCI_MANIFEST }.to_string()),
    )
}

/// A client for any number of registries.
pub struct Registry {
    client: oci_client::Client,
    rt: tokio::runtime::Handle,
    /// Each host's credential, looked up once.
    creds: Mutex<HashMap<String, Found>>,
    /// (host, repo, push?) already authenticated.
    authed: Mutex<HashSet<(String, String, bool)>>,
    /// Hosts spoken to over plain HTTP (loopback, `--insecure-registry`).
    http: Vec<String>,
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Registry {
    pub fn new(rt: tokio::runtime::Handle, remotes: &[Remote], opts: &RegistryOptions) -> Registry {
        // One TLS crypto provider for the process (reqwest is built without one).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut http: Vec<String> = opts.insecure.clone();
        http.extend(remotes.iter().filter(|r| r.is_loopback()).map(|r| r.host.clone()));
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(http.clone()),
            use_monolithic_push: opts.monolithic,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(300)),
            user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        Registry {
            client: oci_client::Client::new(config),
            rt,
            creds: Mutex::new(HashMap::new()),
            authed: Mutex::new(HashSet::new()),
            http,
        }
    }

    /// Runs `f` again when the connection failed (the registry restarting,
    /// a reset), up to [`ATTEMPTS`] times with growing pauses: what a CI
    /// runner needs from a registry on the other side of a network.
    fn retrying<T>(
        &self,
        host: &str,
        mut f: impl FnMut() -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut pause = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match f() {
                Err(RegistryError::Unreachable { detail, .. }) if attempt < ATTEMPTS => {
                    tracing::warn!(host, attempt, %detail, "registry connection failed; trying again");
                    std::thread::sleep(pause);
                    pause *= 4;
                    attempt += 1;
                }
                Err(RegistryError::Unreachable { host, detail }) if attempt > 1 => {
                    return Err(RegistryError::Unreachable {
                        host,
                        detail: format!("{detail} (tried {attempt} times)"),
                    })
                }
                other => return other,
            }
        }
    }

    fn credential(&self, host: &str) -> Result<Found, RegistryError> {
        if let Some(f) = self.creds.lock().expect("creds").get(host) {
            return Ok(f.clone());
        }
        let f = auth::lookup(host)?;
        tracing::debug!(host, credential = ?f.credential, from = %f.from, "registry credential");
        self.creds.lock().expect("creds").insert(host.to_string(), f.clone());
        Ok(f)
    }

    /// Turns a client error into one that says which registry and what to do.
    fn error(&self, r: &Remote, e: OciDistributionError) -> RegistryError {
        let host = r.host.clone();
        let who = || match self.creds.lock().expect("creds").get(&r.host) {
            Some(Found { credential: Credential::Anonymous, .. }) | None => {
                "anonymous access (no credentials for it were found)".to_string()
            }
            Some(Found { credential, from }) => format!("the credentials of {credential:?} from {from}"),
        };
        match e {
            OciDistributionError::UnauthorizedError { .. } => {
                RegistryError::Refused { host, who: who(), detail: String::new() }
            }
            OciDistributionError::AuthenticationFailure(why) => RegistryError::Refused {
                host,
                who: who(),
                detail: format!(" at its token server ({})", kiln_oci::error::shown(why.trim())),
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                // The registry's own words: at most 200 characters, control characters
                // escaped (a hostile registry's answer must not drive the terminal or CI).
                let text = kiln_oci::error::shown(
                    &envelope.errors.iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; "),
                );
                if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    RegistryError::Refused { host, who: who(), detail: format!(" ({text})") }
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::BlobUnknown
                    )
                }) {
                    RegistryError::NotFound { reference: r.to_string() }
                } else {
                    RegistryError::Protocol { host, detail: text }
                }
            }
            OciDistributionError::ServerError { code: 401 | 403, .. } => {
                RegistryError::Refused { host, who: who(), detail: String::new() }
            }
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => {
                RegistryError::NotFound { reference: r.to_string() }
            }
            OciDistributionError::RequestError(e) => match e.status().map(|s| s.as_u16()) {
                Some(401 | 403) => RegistryError::Refused { host, who: who(), detail: String::new() },
                Some(404) => RegistryError::NotFound { reference: r.to_string() },
                _ => {
                    // The URL without its query (upload state tokens are long and say nothing).
                    let url = e.url().map(|u| format!(" ({} {})", u.host_str().unwrap_or(""), u.path()));
                    let detail = kiln_oci::error::shown(&format!(
                        "{}{}",
                        source_chain(&e.without_url()),
                        url.unwrap_or_default()
                    ));
                    RegistryError::Unreachable { host, detail }
                }
            },
            OciDistributionError::IoError(e) => {
                RegistryError::Unreachable { host, detail: kiln_oci::error::shown(&source_chain(&e)) }
            }
            other => RegistryError::Protocol { host, detail: kiln_oci::error::shown(&source_chain(&other)) },
        }
    }

    /// Gives the client `r`'s credential and, once per repository and
    /// operation, exchanges it for a token where the registry wants one.
    async fn authenticate(&self, r: &Remote, push: bool) -> Result<(), RegistryError> {
        let key = (r.host.clone(), r.repo.clone(), push);
        if self.authed.lock().expect("authed").contains(&key) {
            return Ok(());
        }
        let found = self.credential(&r.host)?;
        let auth = match &found.credential {
            Credential::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
            Credential::Basic { user, password } => {
                oci_client::secrets::RegistryAuth::Basic(user.clone(), password.clone())
            }
            Credential::Bearer(t) => oci_client::secrets::RegistryAuth::Bearer(t.clone()),
        };
        let op = if push { RegistryOperation::Push } else { RegistryOperation::Pull };
        self.client.auth(&r.reference(), &auth, op).await.map_err(|e| self.error(r, e))?;
        self.authed.lock().expect("authed").insert(key);
        Ok(())
    }

    /// The manifest `r` names; `None` when the registry has no such tag or digest.
    /// A manifest asked for by digest is checked against it.
    pub fn manifest(&self, r: &Remote) -> Result<Option<Manifest>, RegistryError> {
        self.retrying(&r.host, || self.manifest_once(r))
    }

    /// [`Registry::manifest`] in one attempt, for checks that may fail
    /// quietly (whether a pinned tag has moved, when offline).
    pub(crate) fn manifest_once(&self, r: &Remote) -> Result<Option<Manifest>, RegistryError> {
        self.rt.block_on(async {
            self.authenticate(r, false).await?;
            let res = self
                .client
                .pull_manifest_raw(&r.reference(), &oci_client::secrets::RegistryAuth::Anonymous, ACCEPT)
                .await;
            let (bytes, _) = match res {
                Ok(v) => v,
                Err(e) => {
                    return match self.error(r, e) {
                        RegistryError::NotFound { .. } => Ok(None),
                        e => Err(e),
                    }
                }
            };
            if bytes.len() > MANIFEST_MAX {
                return Err(RegistryError::Protocol {
                    host: r.host.clone(),
                    detail: format!("the manifest of {r} is {} bytes, more than kiln accepts", bytes.len()),
                });
            }
            let digest = Digest::of(&bytes);
            if let Some(want) = &r.digest {
                if *want != digest {
                    return Err(RegistryError::Protocol {
                        host: r.host.clone(),
                        detail: format!("the manifest asked for as {want} hashes to {digest}"),
                    });
                }
            }
            let media_type = media_type_of(&bytes).ok_or_else(|| RegistryError::Protocol {
                host: r.host.clone(),
                detail: format!("the manifest of {r} is not JSON"),
            })?;
            Ok(Some(Manifest { bytes: bytes.to_vec(), digest, media_type }))
        })
    }

    /// Streams blob `d` of repository `r` into the store, checked against
    /// its digest, and against `size` when a descriptor gave one (a longer
    /// answer is cut off there). Returns the bytes downloaded (0 when the
    /// store had it); `meter` counts them as they come.
    pub fn fetch_blob(
        &self,
        store: &Store,
        r: &Remote,
        d: &Digest,
        size: Option<u64>,
        meter: &dyn kiln_oci::reporter::Meter,
    ) -> Result<u64, RegistryError> {
        if store.verify_blob(d)? {
            return Ok(0);
        }
        self.retrying(&r.host, || {
            self.rt.block_on(async {
                use futures_util::StreamExt;
                self.authenticate(r, false).await?;
                let desc = OciDescriptor { digest: d.to_string(), ..Default::default() };
                let mut stream = self
                    .client
                    .pull_blob_stream(&r.reference(), &desc)
                    .await
                    .map_err(|e| self.error(r, e))?;
                let mut w = BlobWriter::new(store)?;
                let mut n = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| self.error(r, OciDistributionError::IoError(e)))?;
                    n += chunk.len() as u64;
                    if size.is_some_and(|s| n > s) {
                        return Err(RegistryError::Protocol {
                            host: r.host.clone(),
                            detail: format!("blob {d} of {} is larger than its descriptor says", r.repo),
                        });
                    }
                    w.write_all(&chunk).map_err(StoreError::io(store.tmp_dir()))?;
                    meter.advance(chunk.len() as u64);
                }
                match w.commit_expecting(d) {
                    Ok(_) => {}
                    Err(StoreError::DigestMismatch { actual, .. }) => {
                        return Err(RegistryError::Protocol {
                            host: r.host.clone(),
                            detail: format!(
                            "blob {d} of {} hashes to {actual} ({n} bytes): it was cut short or is corrupt",
                            r.repo
                        ),
                        })
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(n)
            })
        })
    }

    /// Whether repository `r` has blob `d`.
    /// Whether the registry takes kiln's credentials for a push to `r`'s
    /// repository, asked before a build starts so refused credentials cost
    /// no build: a push token is fetched (token registries), and a blob
    /// asked for (registries that check every request). A registry that
    /// grants reading but not writing is only found out at the push.
    pub fn check_push(&self, r: &Remote) -> Result<(), RegistryError> {
        self.retrying(&r.host, || {
            self.rt.block_on(async {
                self.authenticate(r, true).await?;
                let probe = Digest::of(b"{}");
                self.client
                    .blob_exists(&r.reference(), &probe.to_string())
                    .await
                    .map_err(|e| self.error(r, e))?;
                Ok(())
            })
        })
    }

    pub(crate) fn has_blob(&self, r: &Remote, d: &Digest) -> Result<bool, RegistryError> {
        self.retrying(&r.host, || {
            self.rt.block_on(async {
                self.authenticate(r, false).await?;
                self.client.blob_exists(&r.reference(), &d.to_string()).await.map_err(|e| self.error(r, e))
            })
        })
    }

    /// Puts the store's blob `d` into repository `r`: skipped when it is
    /// there, mounted from `mount_from` (same registry) when that works,
    /// else uploaded from the file.
    pub(crate) fn push_blob(
        &self,
        store: &Store,
        r: &Remote,
        d: &Digest,
        mount_from: Option<&Remote>,
        meter: &dyn kiln_oci::reporter::Meter,
    ) -> Result<Pushed, RegistryError> {
        if self.has_blob(r, d)? {
            return Ok(Pushed::Present);
        }
        self.retrying(&r.host, || {
            self.rt.block_on(async {
                self.authenticate(r, true).await?;
                if let Some(src) = mount_from.filter(|s| s.host == r.host && s.repo != r.repo) {
                    if self.authenticate(src, false).await.is_ok()
                        && self
                            .client
                            .mount_blob(&r.reference(), &src.reference(), &d.to_string())
                            .await
                            .is_ok()
                        && self.client.blob_exists(&r.reference(), &d.to_string()).await.unwrap_or(false)
                    {
                        return Ok(Pushed::Mounted);
                    }
                }
                let file = store.open_blob(d)?;
                let size = file.metadata().map_err(StoreError::io(store.blob_path(d)))?.len();
                // The stream must be 'static: it counts what it hands over, and
                // the meter is told from here while the upload runs.
                let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                let counter = sent.clone();
                let pieces = futures_util::stream::unfold(Some(file), move |f| {
                    let counter = counter.clone();
                    async move {
                        let mut f = f?;
                        let mut buf = vec![0u8; PIECE];
                        let mut filled = 0;
                        while filled < PIECE {
                            match f.read(&mut buf[filled..]) {
                                Ok(0) => break,
                                Ok(n) => filled += n,
                                Err(e) => return Some((Err(OciDistributionError::IoError(e)), None)),
                            }
                        }
                        if filled == 0 {
                            return None;
                        }
                        buf.truncate(filled);
                        counter.fetch_add(filled as u64, std::sync::atomic::Ordering::Relaxed);
                        Some((Ok(bytes::Bytes::from(buf)), Some(f)))
                    }
                });
                let told = std::sync::atomic::AtomicU64::new(0);
                let tell = || {
                    let now = sent.load(std::sync::atomic::Ordering::Relaxed);
                    meter.advance(now.saturating_sub(told.swap(now, std::sync::atomic::Ordering::Relaxed)));
                };
                let (reference, digest) = (r.reference(), d.to_string());
                let upload = self.client.push_blob_stream(&reference, pieces, &digest, Some(size));
                let ticks = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        tell();
                    }
                };
                let pushed = tokio::select! {
                    r = upload => r,
                    never = ticks => never,
                };
                tell();
                pushed.map_err(|e| self.error(r, e))?;
                Ok(Pushed::Uploaded(size))
            })
        })
    }

    /// Every tag of `r`'s repository (`GET /v2/NAME/tags/list`, page by page).
    pub fn tags(&self, r: &Remote) -> Result<Vec<String>, RegistryError> {
        self.retrying(&r.host, || {
            self.rt.block_on(async {
                self.authenticate(r, false).await?;
                let auth = oci_client::secrets::RegistryAuth::Anonymous;
                let mut out: Vec<String> = Vec::new();
                let mut seen: HashSet<String> = HashSet::new();
                loop {
                    let last = out.last().cloned();
                    let page =
                        match self.client.list_tags(&r.reference(), &auth, Some(1000), last.as_deref()).await
                        {
                            Ok(p) => p,
                            Err(e) => {
                                return match self.error(r, e) {
                                    RegistryError::NotFound { .. } => Ok(out),
                                    e => Err(e),
                                }
                            }
                        };
                    let n = page.tags.len();
                    let before = out.len();
                    out.extend(page.tags.into_iter().filter(|t| seen.insert(t.clone())));
                    // A registry that ignores `last` answers the same page again: stop.
                    if n < 1000 || out.len() == before || out.len() > 100_000 {
                        return Ok(out);
                    }
                }
            })
        })
    }

    /// Deletes the manifest `digest` of `r`'s repository (and so every tag
    /// on it), `DELETE /v2/NAME/manifests/DIGEST`: oci-client has no
    /// delete, so the request is made here with the token the client got
    /// for a push, or the basic credentials.
    pub fn delete_manifest(&self, r: &Remote, digest: &Digest) -> Result<(), RegistryError> {
        let scheme = if self.http.contains(&r.host) { "http" } else { "https" };
        let url = format!("{scheme}://{}/v2/{}/manifests/{digest}", r.host, r.repo);
        self.retrying(&r.host, || {
            self.rt.block_on(async {
                let found = self.credential(&r.host)?;
                let auth = match &found.credential {
                    Credential::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
                    Credential::Basic { user, password } => {
                        oci_client::secrets::RegistryAuth::Basic(user.clone(), password.clone())
                    }
                    Credential::Bearer(t) => oci_client::secrets::RegistryAuth::Bearer(t.clone()),
                };
                let token = self
                    .client
                    .auth(&r.reference(), &auth, RegistryOperation::Push)
                    .await
                    .map_err(|e| self.error(r, e))?;
                let client = reqwest::Client::builder()
                    .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(Duration::from_secs(30))
                    .timeout(Duration::from_secs(60))
                    .build()
                    .map_err(|e| RegistryError::Protocol { host: r.host.clone(), detail: e.to_string() })?;
                let mut req = client.delete(&url);
                req = match (&token, &auth) {
                    (Some(t), _) => req.bearer_auth(t),
                    (None, oci_client::secrets::RegistryAuth::Basic(u, p)) => req.basic_auth(u, Some(p)),
                    (None, oci_client::secrets::RegistryAuth::Bearer(t)) => req.bearer_auth(t),
                    _ => req,
                };
                let res = req.send().await.map_err(|e| RegistryError::Unreachable {
                    host: r.host.clone(),
                    detail: kiln_oci::error::shown(&source_chain(&e)),
                })?;
                match res.status().as_u16() {
                    200..=299 | 404 => Ok(()),
                    401 | 403 => Err(RegistryError::Refused {
                        host: r.host.clone(),
                        who: format!("a delete in {} with the push credentials", r.repo),
                        detail: String::new(),
                    }),
                    405 => Err(RegistryError::Protocol {
                        host: r.host.clone(),
                        detail: "it does not allow deletes (for a distribution registry: `storage: delete: enabled: true`)".into(),
                    }),
                    code => Err(RegistryError::Protocol {
                        host: r.host.clone(),
                        detail: format!("a delete of {digest} answered HTTP {code}"),
                    }),
                }
            })
        })
    }

    /// Puts a manifest under `r`'s tag (or digest); returns its digest.
    pub(crate) fn push_manifest(
        &self,
        r: &Remote,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        self.retrying(&r.host, || {
            self.rt.block_on(async {
                self.authenticate(r, true).await?;
                let ct = media_type.parse().map_err(|_| RegistryError::Protocol {
                    host: r.host.clone(),
                    detail: format!("bad media type {media_type}"),
                })?;
                self.client
                    .push_manifest_raw(&r.reference(), bytes.to_vec(), ct)
                    .await
                    .map_err(|e| self.error(r, e))?;
                Ok(Digest::of(bytes))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a hostile registry says in its error body reaches a message cut
    /// to 200 characters, its control characters escaped: it cannot clear
    /// the terminal, add lines, or pose as a CI workflow command.
    #[test]
    fn a_registry_s_own_words_are_cut_and_escaped() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let reg = Registry::new(rt.handle().clone(), &[], &RegistryOptions::default());
        let r = Remote::parse("127.0.0.1:5000/x:1").unwrap();
        let hostile =
            format!("\u{1b}[2J\n::error::injected\r\nsha256:{}{}", "0".repeat(64), "A".repeat(5000));
        let e = reg.error(
            &r,
            OciDistributionError::RegistryError {
                envelope: oci_client::errors::OciEnvelope {
                    errors: vec![oci_client::errors::OciError {
                        code: OciErrorCode::BlobUploadInvalid,
                        message: hostile,
                        detail: serde_json::Value::Null,
                    }],
                },
                url: "http://127.0.0.1:5000/v2/x/blobs/uploads/".into(),
            },
        );
        let text = e.to_string();
        assert!(!text.contains(['\u{1b}', '\n', '\r']), "{text:?}");
        assert!(text.contains("\\u{1b}") && text.chars().count() < 400, "{text}");
    }

    #[test]
    fn registry_errors_keep_their_exit_codes_and_hints_through_build_error() {
        use kiln_oci::BuildError;
        let not_found: BuildError = RegistryError::NotFound { reference: "r/x:1".into() }.into();
        assert_eq!(not_found.exit_code(), 2);
        assert!(not_found.hint().unwrap().contains("skopeo list-tags"));
        assert!(matches!(registry_error(&not_found), Some(RegistryError::NotFound { .. })));
        let d = Digest::of(b"x");
        let missing: BuildError = RegistryError::Store(StoreError::Missing(d)).into();
        assert_eq!(missing.exit_code(), 3);
        assert!(matches!(registry_error(&missing), Some(RegistryError::Store(StoreError::Missing(_)))));
        let mismatch: BuildError =
            RegistryError::Store(StoreError::DigestMismatch { expected: d, actual: Digest::of(b"y") }).into();
        assert_eq!(mismatch.exit_code(), 2);
        let refused: BuildError =
            RegistryError::Refused { host: "h".into(), who: "kiln".into(), detail: String::new() }.into();
        assert_eq!(
            (refused.exit_code(), refused.to_string()),
            (3, "The registry h refused kiln".to_string())
        );
        assert!(refused.hint().unwrap().contains("docker login h"));
        assert!(registry_error(&BuildError::usage("x", None)).is_none());
    }

    #[test]
    fn parses_references() {
        let r = Remote::parse("127.0.0.1:5000/kiln/hello:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "kiln/hello", Some("v1"))
        );
        assert!(r.is_loopback());
        let d = Digest::of(b"x");
        let r = Remote::parse(&format!("localhost:5000/a@{d}")).unwrap();
        assert_eq!((r.tag, r.digest), (None, Some(d)));
        let r = Remote::parse("reg.example/a").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(!r.is_loopback());
        assert_eq!(Remote::parse("ghcr.io/o/r:t").unwrap().to_string(), "ghcr.io/o/r:t");
        assert!(Remote::parse("reg.example/UPPER:x").is_err());
    }
}
