//! URI signing (RFC 9246): paths a site marks `signed` are served only to requests
//! that carry a valid signed JWT (RFC 7519) in the `URISigningPackage` query
//! parameter.
//!
//! The edge's secrets are `[[signing.keys]]` ([`SigningConfig`]); a site (the
//! routing document's `signed`, or a standalone edge's `[origin] signed`) names the
//! key ids it accepts. A request for a path under `signed.path_prefix` is checked
//! before anything else looks at it ([`Verifier::check`], called once from the
//! pipeline): the package is found, its JOSE header names a key (`kid`) the site
//! accepts with that key's algorithm (HS256, or ES256 with a public key), the
//! signature holds, and the claims pass:
//! - `exp` is required (RFC 9246 lets it be optional; this CDN does not) and must be
//!   in the future; `nbf`, when present, in the past (both with `signing.leeway`);
//! - `cdniv`, when present, is 1;
//! - `cdnicrit` lists only claims this edge processes;
//! - `aud`, when present, names `signing.audience` (RFC 7519 §4.1.3);
//! - `cdniip`, when present, is the client's address (or a prefix holding it);
//! - `cdniuc`, when present, matches the request's URI: `hash:` (SHA-256 of the URI,
//!   base64url, optionally written `sha-256;…` as in RFC 6920 §5) or `regex:` (the
//!   whole URI must match; the `regex` crate's syntax, at most 1024 bytes);
//! - `cdnistt` (signed-token renewal) is not supported: such tokens are refused, so
//!   a signer never believes a renewal happened;
//! - `iss`, `sub`, `iat`, `jti` and `cdniets` are not checked.
//!
//! The URI a container is compared with is the request's absolute URI without the
//! package, normalized as RFC 3986 §6.2.2-6.2.3 say: lowercase scheme and host (no
//! trailing dot), no default port, percent-encodings of unreserved characters
//! decoded and the others in uppercase hex, dot segments removed:
//! `https://cdn.example/paid/a.ts?x=1`.
//!
//! A valid package is taken out of the request's URI, so it never reaches the
//! cache key or the origin (two tokens for one path are one cached object); an
//! invalid one gets 403 with a generic body, the reason going to the debug log,
//! the `cdn_signing_rejected_total{reason}` counter and the response's extensions
//! ([`SigningRejected`], for the access log). Requests from other edges of the
//! cluster (a shield or owner filling for an edge that checked the client) are not
//! checked again.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use cdn_cluster::routing::{Signed, is_key_id};
use http::{HeaderMap, Request, Uri, header, uri::PathAndQuery};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::{debug, warn};

/// The query parameter that carries the package (RFC 9246's default name).
pub const PARAMETER: &str = "URISigningPackage";
/// Longest package accepted.
const MAX_PACKAGE: usize = 8 * 1024;
/// Longest `regex:` container.
const MAX_REGEX: usize = 1024;
/// Most memory a compiled `regex:` container may take.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Compiled `regex:` containers kept (a stream's token is checked once per segment).
const REGEX_CACHE: u64 = 1024;
/// Largest `signing.leeway`.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Shortest HS256 secret: the hash's output size (RFC 7518 §3.2).
const MIN_SECRET: usize = 32;
/// Claims this edge processes (what `cdnicrit` may list).
const UNDERSTOOD: [&str; 7] = ["exp", "nbf", "aud", "cdniv", "cdnicrit", "cdniip", "cdniuc"];

/// `[signing]`: the keys signed URLs are checked with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// The keys, by id (`kid`); several at once while one replaces another.
    #[serde(default)]
    pub keys: Vec<SigningKey>,
    /// Clock difference tolerated on `exp` and `nbf` (at most 5 min).
    #[serde(default, with = "humantime_serde")]
    pub leeway: Duration,
    /// This CDN's name in tokens' `aud`; without it, tokens with an `aud` are refused.
    #[serde(default)]
    pub audience: Option<String>,
}

impl SigningConfig {
    /// Every problem, each as `field.key: what is wrong`.
    pub(crate) fn problems(&self, field: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, key) in self.keys.iter().enumerate() {
            if !is_key_id(&key.id) {
                problems.push(format!(
                    "{field}.keys[{i}].id: {:?} is not a key id (1-64 of A-Z, a-z, 0-9, '.', '_', '-')",
                    key.id
                ));
            }
            if self.keys[..i].iter().any(|other| other.id == key.id) {
                problems.push(format!("{field}.keys[{i}].id: {:?} is listed twice", key.id));
            }
        }
        if self.leeway > MAX_LEEWAY {
            problems.push(format!("{field}.leeway: at most 5m"));
        }
        if self.audience.as_deref().is_some_and(str::is_empty) {
            problems.push(format!("{field}.audience: empty"));
        }
        problems
    }

    /// Whether a key of id `id` is configured.
    pub(crate) fn has(&self, id: &str) -> bool {
        self.keys.iter().any(|key| key.id == id)
    }
}

/// One key of `[[signing.keys]]`. Its secret never appears in `Debug` output.
#[derive(Clone, Deserialize)]
#[serde(try_from = "RawKey")]
pub struct SigningKey {
    /// Its id, the `kid` of the tokens it signs.
    pub id: String,
    material: Material,
}

#[derive(Clone)]
enum Material {
    /// An HMAC secret (HS256).
    Hs256(Arc<[u8]>),
    /// An EC P-256 public key, PEM (ES256).
    Es256(Arc<[u8]>),
}

impl SigningKey {
    /// An HS256 key: `secret` is its bytes (at least 32).
    pub fn hs256(id: impl Into<String>, secret: impl AsRef<[u8]>) -> Result<Self, String> {
        let secret = secret.as_ref();
        if secret.len() < MIN_SECRET {
            return Err(format!("secret: {} bytes, at least {MIN_SECRET} (RFC 7518 §3.2)", secret.len()));
        }
        Ok(Self { id: id.into(), material: Material::Hs256(secret.into()) })
    }

    /// An ES256 key: `pem` is an EC P-256 public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn es256(id: impl Into<String>, pem: impl AsRef<[u8]>) -> Result<Self, String> {
        let pem = pem.as_ref();
        DecodingKey::from_ec_pem(pem).map_err(|e| format!("public_key: not an EC public key in PEM ({e})"))?;
        Ok(Self { id: id.into(), material: Material::Es256(pem.into()) })
    }

    /// `HS256` or `ES256`.
    pub fn algorithm(&self) -> &'static str {
        match self.material {
            Material::Hs256(_) => "HS256",
            Material::Es256(_) => "ES256",
        }
    }

    fn decoding_key(&self) -> Result<(Algorithm, DecodingKey), jsonwebtoken::errors::Error> {
        Ok(match &self.material {
            Material::Hs256(secret) => (Algorithm::HS256, DecodingKey::from_secret(secret)),
            Material::Es256(pem) => (Algorithm::ES256, DecodingKey::from_ec_pem(pem)?),
        })
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `[[signing.keys]]` as written: `secret` or `secret_file` (HS256), `public_key`
/// or `public_key_file` (ES256). No `Debug`: it holds the secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    algorithm: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    public_key: Option<String>,
    public_key_file: Option<PathBuf>,
}

impl TryFrom<RawKey> for SigningKey {
    type Error = String;

    fn try_from(raw: RawKey) -> Result<Self, String> {
        let read =
            |path: &PathBuf| std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
        let id = raw.id;
        match raw.algorithm.as_deref().unwrap_or("HS256") {
            "HS256" => {
                if raw.public_key.is_some() || raw.public_key_file.is_some() {
                    return Err(format!("key {id:?}: public_key is for ES256 keys; HS256 keys have a secret"));
                }
                let text = match (raw.secret, raw.secret_file) {
                    (Some(secret), None) => secret,
                    (None, Some(path)) => read(&path).map_err(|e| format!("key {id:?}: secret_file: {e}"))?,
                    (Some(_), Some(_)) => return Err(format!("key {id:?}: give secret or secret_file, not both")),
                    (None, None) => return Err(format!("key {id:?}: needs secret or secret_file")),
                };
                let secret =
                    secret_bytes(text.trim_end_matches(['\r', '\n'])).map_err(|e| format!("key {id:?}: {e}"))?;
                Self::hs256(id.clone(), secret).map_err(|e| format!("key {id:?}: {e}"))
            }
            "ES256" => {
                if raw.secret.is_some() || raw.secret_file.is_some() {
                    return Err(format!("key {id:?}: ES256 keys have a public_key, not a secret"));
                }
                let pem = match (raw.public_key, raw.public_key_file) {
                    (Some(pem), None) => pem,
                    (None, Some(path)) => read(&path).map_err(|e| format!("key {id:?}: public_key_file: {e}"))?,
                    (Some(_), Some(_)) => {
                        return Err(format!("key {id:?}: give public_key or public_key_file, not both"));
                    }
                    (None, None) => return Err(format!("key {id:?}: needs public_key or public_key_file")),
                };
                Self::es256(id.clone(), pem).map_err(|e| format!("key {id:?}: {e}"))
            }
            other => Err(format!("key {id:?}: algorithm {other:?} is not HS256 or ES256")),
        }
    }
}

/// A secret as written: `base64:…` (standard or URL-safe alphabet, padded or not),
/// `hex:…`, or else the text's UTF-8 bytes. Errors never quote the secret.
fn secret_bytes(text: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    if let Some(encoded) = text.strip_prefix("base64:") {
        let encoded = encoded.trim();
        return [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(encoded).ok())
            .ok_or_else(|| "secret: not valid base64 after \"base64:\"".to_string());
    }
    if let Some(encoded) = text.strip_prefix("hex:") {
        let digits = encoded.trim().as_bytes();
        let nibble = |b: u8| char::from(b).to_digit(16);
        if digits.len() % 2 != 0 {
            return Err("secret: an odd number of hex digits after \"hex:\"".into());
        }
        return digits
            .chunks(2)
            .map(|pair| Some(u8::try_from(nibble(pair[0])? << 4 | nibble(pair[1])?).unwrap_or_default()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| "secret: not hex after \"hex:\"".to_string());
    }
    Ok(text.as_bytes().to_vec())
}

/// Why a signed URL was refused: a stable short reason (`expired`,
/// `bad_signature`, ...), in the 403 response's extensions for the access log and
/// in the `reason` label of `cdn_signing_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigningRejected(pub &'static str);

/// The reasons, each a label of `cdn_signing_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// No `URISigningPackage` parameter.
    Missing,
    /// Not a JWS in compact form, bad base64 or JSON, a claim of the wrong type, two
    /// packages.
    Malformed,
    /// No `kid`, or one this edge does not have or the site does not accept.
    UnknownKey,
    /// `alg` is not the key's algorithm.
    Algorithm,
    /// The signature does not verify.
    BadSignature,
    /// No `exp`.
    MissingExp,
    /// `exp` has passed.
    Expired,
    /// `nbf` has not come yet.
    NotYetValid,
    /// `cdniv` is not 1.
    Version,
    /// `cdnicrit` (or the JOSE header's `crit`) names something not processed here.
    Critical,
    /// `aud` does not name `signing.audience`.
    Audience,
    /// `cdniip` is not the client's address.
    ClientIp,
    /// `cdnistt` (signed-token renewal) is not supported.
    Renewal,
    /// `cdniuc` is neither a valid `hash:` nor a valid `regex:` container.
    Container,
    /// `cdniuc` does not match the request's URI.
    UriMismatch,
}

impl Reason {
    const ALL: [Self; 15] = [
        Self::Missing,
        Self::Malformed,
        Self::UnknownKey,
        Self::Algorithm,
        Self::BadSignature,
        Self::MissingExp,
        Self::Expired,
        Self::NotYetValid,
        Self::Version,
        Self::Critical,
        Self::Audience,
        Self::ClientIp,
        Self::Renewal,
        Self::Container,
        Self::UriMismatch,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::Algorithm => "algorithm",
            Self::BadSignature => "bad_signature",
            Self::MissingExp => "missing_exp",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Version => "version",
            Self::Critical => "critical_claim",
            Self::Audience => "audience",
            Self::ClientIp => "client_ip",
            Self::Renewal => "renewal_unsupported",
            Self::Container => "bad_container",
            Self::UriMismatch => "uri_mismatch",
        }
    }
}

/// A key ready to verify with.
struct Key {
    algorithm: &'static str,
    key: DecodingKey,
    validation: Validation,
}

/// What a request looks like to the claims.
struct Context<'a> {
    now: f64,
    peer: IpAddr,
    /// The URI the containers are compared with (normalized, without the package).
    uri: &'a str,
}

/// The edge's signed-URL checks: its keys, and the counters.
pub(crate) struct Verifier {
    keys: HashMap<String, Key>,
    leeway: f64,
    audience: Option<String>,
    /// Compiled `regex:` containers (`None`: not a valid regex), only of tokens
    /// whose signature held.
    regexes: moka::sync::Cache<String, Option<Arc<Regex>>>,
    rejected: IntCounterVec,
    accepted: IntCounter,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.keys.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

impl Verifier {
    /// The checks of an edge with `config`, their counters registered in `registry`.
    pub(crate) fn new(config: &SigningConfig, registry: &Registry) -> Result<Self, crate::Error> {
        let rejected = IntCounterVec::new(
            Opts::new("cdn_signing_rejected_total", "Requests for signed paths refused (403), by reason"),
            &["reason"],
        )?;
        let accepted =
            IntCounter::new("cdn_signing_accepted_total", "Requests for signed paths whose URI signing package held")?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(accepted.clone()))?;
        for reason in Reason::ALL {
            rejected.with_label_values(&[reason.as_str()]);
        }
        let mut keys = HashMap::new();
        for key in &config.keys {
            // Checked when the key was read; a key that fails now is left out (its
            // tokens are refused as `unknown_key`).
            match key.decoding_key() {
                Ok((algorithm, decoding)) => {
                    let mut validation = Validation::new(algorithm);
                    // The claims are checked here, against the edge's clock.
                    validation.required_spec_claims.clear();
                    validation.validate_exp = false;
                    validation.validate_nbf = false;
                    validation.validate_aud = false;
                    validation.leeway = 0;
                    keys.insert(key.id.clone(), Key { algorithm: key.algorithm(), key: decoding, validation });
                }
                Err(e) => warn!(kid = %key.id, error = %e, "signing key unusable; left out"),
            }
        }
        Ok(Self {
            keys,
            leeway: config.leeway.as_secs_f64(),
            audience: config.audience.clone(),
            regexes: moka::sync::Cache::new(REGEX_CACHE),
            rejected,
            accepted,
        })
    }

    /// Whether this edge has a key of id `id`.
    pub(crate) fn has(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// Checks `request` against its site's `signed` (none: nothing to check) and,
    /// when its path needs a signature and the package holds, takes the package
    /// out of its URI. `member` says whether headers come from another edge of the
    /// cluster (those are not checked again).
    pub(crate) fn check<B>(
        &self,
        signed: Option<&Signed>,
        request: &mut Request<B>,
        peer: IpAddr,
        tls: bool,
        now: SystemTime,
        member: impl FnOnce(&HeaderMap) -> bool,
    ) -> Result<(), SigningRejected> {
        let Some(signed) = signed else { return Ok(()) };
        if !needs_signature(signed, request.uri().path()) || member(request.headers()) {
            return Ok(());
        }
        let now = now.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        match self.verify(signed, request, peer, tls, now) {
            Ok(stripped) => {
                *request.uri_mut() = stripped;
                self.accepted.inc();
                Ok(())
            }
            Err(reason) => {
                self.rejected.with_label_values(&[reason.as_str()]).inc();
                debug!(reason = reason.as_str(), path = request.uri().path(), "signed URL refused");
                Err(SigningRejected(reason.as_str()))
            }
        }
    }

    /// The request's URI without the package, when the package holds.
    fn verify<B>(
        &self,
        signed: &Signed,
        request: &Request<B>,
        peer: IpAddr,
        tls: bool,
        now: f64,
    ) -> Result<Uri, Reason> {
        let uri = request.uri();
        let (package, rest) = split_package(uri.query())?;
        let token = percent_encoding::percent_decode_str(package).decode_utf8().map_err(|_| Reason::Malformed)?;
        if token.len() > MAX_PACKAGE {
            return Err(Reason::Malformed);
        }
        let header = jose_header(&token)?;
        let kid = header.get("kid").and_then(Value::as_str).ok_or(Reason::UnknownKey)?;
        let key = self.keys.get(kid).filter(|_| signed.keys.iter().any(|k| k == kid)).ok_or(Reason::UnknownKey)?;
        if header.get("alg").and_then(Value::as_str) != Some(key.algorithm) {
            return Err(Reason::Algorithm);
        }
        let claims = jsonwebtoken::decode::<Map<String, Value>>(&token, &key.key, &key.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey | ErrorKind::Crypto(_) => Reason::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Reason::Algorithm,
                _ => Reason::Malformed,
            })?
            .claims;
        let scheme = if tls { "https" } else { "http" };
        let authority = match uri.authority() {
            Some(authority) => authority.as_str(),
            None => request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default(),
        };
        let compared = normalized_uri(scheme, authority, uri.path(), rest.as_deref());
        self.check_claims(&claims, &Context { now, peer, uri: &compared })?;
        let path = if uri.path().is_empty() { "/" } else { uri.path() };
        let path_and_query = match &rest {
            Some(rest) => PathAndQuery::try_from(format!("{path}?{rest}")),
            None => PathAndQuery::try_from(path),
        }
        .map_err(|_| Reason::Malformed)?;
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|_| Reason::Malformed)
    }

    /// The claims' verdict (the signature has held).
    fn check_claims(&self, claims: &Map<String, Value>, cx: &Context<'_>) -> Result<(), Reason> {
        let number = |name: &str| -> Result<Option<f64>, Reason> {
            match claims.get(name) {
                None => Ok(None),
                Some(value) => value.as_f64().map(Some).ok_or(Reason::Malformed),
            }
        };
        if let Some(version) = claims.get("cdniv")
            && version.as_u64() != Some(1)
        {
            return Err(Reason::Version);
        }
        if let Some(critical) = claims.get("cdnicrit") {
            let names = critical.as_array().ok_or(Reason::Malformed)?;
            for name in names {
                let name = name.as_str().ok_or(Reason::Malformed)?;
                if !UNDERSTOOD.contains(&name) {
                    return Err(Reason::Critical);
                }
            }
        }
        let exp = number("exp")?.ok_or(Reason::MissingExp)?;
        // RFC 7519 §4.1.4: the current time must be before `exp`.
        if cx.now >= exp + self.leeway {
            return Err(Reason::Expired);
        }
        if let Some(nbf) = number("nbf")?
            && cx.now + self.leeway < nbf
        {
            return Err(Reason::NotYetValid);
        }
        if let Some(aud) = claims.get("aud") {
            let named = |wanted: &str| match aud {
                Value::String(one) => Ok(one == wanted),
                Value::Array(many) => {
                    many.iter().try_fold(false, |found, v| Ok(found || v.as_str().ok_or(Reason::Malformed)? == wanted))
                }
                _ => Err(Reason::Malformed),
            };
            match &self.audience {
                Some(ours) if named(ours)? => {}
                _ => return Err(Reason::Audience),
            }
        }
        if let Some(ip) = claims.get("cdniip") {
            let ip = ip.as_str().ok_or(Reason::Malformed)?;
            let peer = cx.peer.to_canonical();
            let matches = match ip.parse::<ipnet::IpNet>() {
                Ok(net) => net.contains(&peer),
                Err(_) => ip.parse::<IpAddr>().map_err(|_| Reason::Malformed)?.to_canonical() == peer,
            };
            if !matches {
                return Err(Reason::ClientIp);
            }
        }
        if claims.contains_key("cdnistt") || claims.get("cdnistd").is_some_and(|depth| depth.as_u64() != Some(0)) {
            return Err(Reason::Renewal);
        }
        if let Some(container) = claims.get("cdniuc") {
            let container = container.as_str().ok_or(Reason::Malformed)?;
            if !self.container_matches(container, cx.uri)? {
                return Err(Reason::UriMismatch);
            }
        }
        Ok(())
    }

    /// Whether a `cdniuc` container matches `uri`; `Err` when it is not a valid one.
    fn container_matches(&self, container: &str, uri: &str) -> Result<bool, Reason> {
        match container.split_once(':') {
            Some(("hash", value)) => {
                // RFC 6920 §5's form `sha-256;<base64url>`, or the bare value.
                let value = value.strip_prefix("sha-256;").unwrap_or(value);
                let wanted = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(value.trim_end_matches('='))
                    .map_err(|_| Reason::Container)?;
                if wanted.len() != 32 {
                    return Err(Reason::Container);
                }
                Ok(ring::digest::digest(&ring::digest::SHA256, uri.as_bytes()).as_ref() == wanted.as_slice())
            }
            Some(("regex", pattern)) => {
                if pattern.len() > MAX_REGEX {
                    return Err(Reason::Container);
                }
                let compiled = self.regexes.get_with_by_ref(pattern, || compile(pattern).map(Arc::new));
                let regex = compiled.ok_or(Reason::Container)?;
                Ok(regex.is_match(uri))
            }
            _ => Err(Reason::Container),
        }
    }
}

/// A `regex:` container, anchored: it must match the whole URI.
fn compile(pattern: &str) -> Option<Regex> {
    regex::RegexBuilder::new(&format!(r"\A(?:{pattern})\z"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .ok()
}

/// `path_and_query` with every `URISigningPackage` parameter taken out: what logs
/// may show of a request (a token is a bearer credential until it expires).
pub fn redacted(path_and_query: &str) -> Cow<'_, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return Cow::Borrowed(path_and_query);
    };
    let is_package = |pair: &&str| pair.split_once('=').map_or(*pair, |(name, _)| name) == PARAMETER;
    if !query.split('&').any(|pair| is_package(&pair)) {
        return Cow::Borrowed(path_and_query);
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !pair.is_empty() && !is_package(pair)).collect();
    if kept.is_empty() { Cow::Owned(path.to_string()) } else { Cow::Owned(format!("{path}?{}", kept.join("&"))) }
}

/// The package (as written) and the rest of the query (`None`: nothing left).
/// No package, or two: refused.
fn split_package(query: Option<&str>) -> Result<(&str, Option<String>), Reason> {
    let query = query.ok_or(Reason::Missing)?;
    let mut package = None;
    let mut rest = String::with_capacity(query.len());
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some((PARAMETER, value)) => {
                if package.replace(value).is_some() {
                    return Err(Reason::Malformed);
                }
            }
            _ if pair == PARAMETER => return Err(Reason::Malformed),
            _ => {
                if !rest.is_empty() {
                    rest.push('&');
                }
                rest.push_str(pair);
            }
        }
    }
    let package = package.ok_or(Reason::Missing)?;
    Ok((package, (!rest.is_empty()).then_some(rest)))
}

/// The JOSE header of a compact JWS, refused when it has a `crit` (RFC 7515
/// §4.1.11: no extension is understood here).
fn jose_header(token: &str) -> Result<Map<String, Value>, Reason> {
    let mut segments = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return Err(Reason::Malformed);
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).map_err(|_| Reason::Malformed)?;
    let header: Map<String, Value> = serde_json::from_slice(&json).map_err(|_| Reason::Malformed)?;
    if header.contains_key("crit") {
        return Err(Reason::Critical);
    }
    Ok(header)
}

/// Whether a request for `path` needs a signature. Decided on the path as an
/// origin might read it (percent-decoded, dot segments removed, repeated slashes
/// merged), so `/free/../paid/a` and `/%70aid/a` need one as `/paid/a` does.
fn needs_signature(signed: &Signed, path: &str) -> bool {
    if path.starts_with(signed.path_prefix.as_str()) {
        return true;
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut merged = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    remove_dot_segments(&merged).starts_with(signed.path_prefix.as_str())
}

/// `scheme://authority/path?query` normalized as RFC 3986 §6.2.2-6.2.3 say: the
/// URI the containers are compared with.
fn normalized_uri(scheme: &str, authority: &str, path: &str, query: Option<&str>) -> String {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_ascii_lowercase();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority.as_str(), None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let default = if scheme == "https" { "443" } else { "80" };
    let path = if path.is_empty() { "/" } else { path };
    let path = remove_dot_segments(&normalize_percent(path));
    let mut uri =
        String::with_capacity(scheme.len() + 3 + authority.len() + path.len() + query.map_or(0, str::len) + 1);
    uri.push_str(scheme);
    uri.push_str("://");
    uri.push_str(host);
    if let Some(port) = port.filter(|port| !port.is_empty() && *port != default) {
        uri.push(':');
        uri.push_str(port);
    }
    uri.push_str(&path);
    if let Some(query) = query {
        uri.push('?');
        uri.push_str(&normalize_percent(query));
    }
    uri
}

/// Percent-encodings of unreserved characters decoded, the others in uppercase
/// (RFC 3986 §6.2.2.1-6.2.2.2); a `%` not followed by two hex digits is left.
fn normalize_percent(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(high), Some(low)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            let byte = u8::try_from(high << 4 | low).unwrap_or_default();
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(byte));
            } else {
                out.push('%');
                out.push(char::from(bytes[i + 1]).to_ascii_uppercase());
                out.push(char::from(bytes[i + 2]).to_ascii_uppercase());
            }
            i += 3;
        } else {
            // `text` is a str: copy the whole character starting here.
            let c = text[i..].chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8().max(1);
        }
    }
    Cow::Owned(out)
}

/// RFC 3986 §5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let mut input = path;
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../").or_else(|| input.strip_prefix("./")) {
            input = rest;
        } else if input.starts_with("/./") {
            input = &input[2..];
        } else if input == "/." {
            input = "/";
        } else if input.starts_with("/../") {
            input = &input[3..];
            output.pop();
        } else if input == "/.." {
            input = "/";
            output.pop();
        } else if input == "." || input == ".." {
            input = "";
        } else {
            // The first segment, with its leading slash, up to the next slash.
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push(&input[..end]);
            input = &input[end..];
        }
    }
    output.concat()
}

/// What a token made by [`sign_url`] is valid for (its `cdniuc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cover<'a> {
    /// Exactly the URL signed (`hash:`).
    Uri,
    /// Every URI the expression matches whole (`regex:`), e.g. a stream's segments.
    Regex(&'a str),
    /// Every path under the site's `signed.path_prefix` (no `cdniuc`).
    Prefix,
}

/// `url` (absolute, `http` or `https`) with a `URISigningPackage` appended: an HS256
/// token of `key` (with `kid`), valid until `expires` and covering `cover`. What
/// `cdn sign` prints.
pub fn sign_url(url: &str, key: &SigningKey, expires: SystemTime, cover: Cover<'_>) -> Result<String, String> {
    let Material::Hs256(secret) = &key.material else {
        return Err(format!("key {:?} is an ES256 public key: sign with its private key elsewhere", key.id));
    };
    let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let scheme = uri.scheme_str().filter(|s| matches!(*s, "http" | "https"));
    let (Some(scheme), Some(authority)) = (scheme, uri.authority()) else {
        return Err(format!("{url:?} is not an absolute http:// or https:// URL"));
    };
    if split_package(uri.query()).is_ok() {
        return Err(format!("{url:?} already carries a {PARAMETER}"));
    }
    let exp = expires.duration_since(UNIX_EPOCH).map_err(|_| "expiry before 1970".to_string())?.as_secs();
    let mut claims = Map::new();
    claims.insert("exp".into(), exp.into());
    claims.insert("cdniv".into(), 1.into());
    match cover {
        Cover::Uri => {
            let normalized = normalized_uri(scheme, authority.as_str(), uri.path(), uri.query());
            let digest = ring::digest::digest(&ring::digest::SHA256, normalized.as_bytes());
            let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
            claims.insert("cdniuc".into(), format!("hash:{hash}").into());
        }
        Cover::Regex(pattern) => {
            if pattern.len() > MAX_REGEX || compile(pattern).is_none() {
                return Err(format!("{pattern:?} is not a usable regex (at most {MAX_REGEX} bytes)"));
            }
            claims.insert("cdniuc".into(), format!("regex:{pattern}").into());
        }
        Cover::Prefix => {}
    }
    let header = jsonwebtoken::Header { kid: Some(key.id.clone()), ..jsonwebtoken::Header::new(Algorithm::HS256) };
    let token = jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
        .map_err(|e| format!("signing failed: {e}"))?;
    let join = if uri.query().is_some() { '&' } else { '?' };
    Ok(format!("{url}{join}{PARAMETER}={token}"))
}

impl SigningKey {
    /// An HS256 key whose secret is written as in the config (`base64:…`, `hex:…`,
    /// or text); for `cdn sign --secret-file`.
    pub fn hs256_from_text(id: impl Into<String>, text: &str) -> Result<Self, String> {
        Self::hs256(id, secret_bytes(text.trim_end_matches(['\r', '\n']))?)
    }
}

/// Warns of key ids a routing document's site accepts that this edge lacks.
pub(crate) fn warn_missing_keys(verifier: &Verifier, site: &str, signed: Option<&Signed>) {
    for id in signed.map(|s| s.keys.as_slice()).unwrap_or_default() {
        if !verifier.has(id) {
            warn!(site, kid = %id, "the site accepts a signing key this edge does not have ([[signing.keys]]); its tokens are refused");
        }
    }
}

#[cfg(test)]
mod tests;
