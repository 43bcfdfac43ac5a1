//! Compression at the edge: text the origin sends uncompressed is compressed once,
//! when its fill lands, and kept as `Vary: Accept-Encoding` variants.
//!
//! A fill whose response is a [`candidate`] (a 200 of a compressible type, no
//! `Content-Encoding`, no `no-transform`, not too small) streams to its clients as
//! the origin sent it, with `Accept-Encoding` added to its `Vary`. When the body is
//! complete, [`store`] compresses it with gzip and brotli (on a blocking thread) and
//! stores three variants of the URL: `identity`, `gzip` and `br`. Every later
//! request is a lookup of the variant its `Accept-Encoding` prefers
//! (`cdn_http::coding::preferred`, which the cache key's `vary_values` uses), so a
//! HIT costs what it costs for any other variant: no compression on the HIT path.
//!
//! A compressed variant is another representation, so its `ETag` is made weak
//! (`"x"` → `W/"x"`, as nginx does): `If-None-Match` (weak comparison) matches it and
//! the identity's tag alike, while `If-Range` and `If-Match` (strong comparison)
//! never take bytes of one encoding for those of another. Revalidating it sends the
//! weak tag, which an origin compares weakly (RFC 9110 §13.1.2).
//!
//! Sliced objects (larger than a slice, from an origin that serves ranges) are never
//! compressed: they are never whole in memory.

use std::{io::Write as _, sync::Arc};

use bytes::Bytes;
use cdn_http::coding::{self, Coding};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use prometheus::{IntCounterVec, Opts, Registry};
use tracing::{debug, warn};

use crate::cache::{Cache, Head, Object};

/// Brotli quality: fast enough to compress a fill as it lands, most of the gain.
const BROTLI_QUALITY: i32 = 5;
/// Brotli window (log2): 4 MiB, the common default.
const BROTLI_WINDOW: i32 = 22;
/// gzip level: zlib's default.
const GZIP_LEVEL: u32 = 6;

/// Digest fields computed over the identity body (`Repr-Digest` and
/// `Content-Digest` of RFC 9530, and the older `Digest` and `Content-MD5`): wrong
/// for an encoded one, so a compressed variant drops them.
const DIGESTS: [&str; 4] = ["repr-digest", "content-digest", "digest", "content-md5"];

/// What the edge compresses (`[cache] compress`, `compress_min`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Whether the edge compresses at all.
    pub(crate) enabled: bool,
    /// Bodies smaller than this are kept as they are.
    pub(crate) min_size: u64,
}

impl Settings {
    /// The settings of an edge's `[cache]` section.
    pub(crate) fn from_config(cache: &crate::config::Cache) -> Self {
        Self { enabled: cache.compress, min_size: cache.compress_min.as_u64() }
    }
}

/// `cdn_compressed_total` and `cdn_compressed_saved_bytes_total`, by encoding.
#[derive(Clone)]
pub(crate) struct Counters {
    compressed: IntCounterVec,
    saved: IntCounterVec,
}

impl Counters {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let compressed = IntCounterVec::new(
            Opts::new("cdn_compressed_total", "Compressed variants the edge made and stored, by encoding"),
            &["encoding"],
        )?;
        let saved = IntCounterVec::new(
            Opts::new(
                "cdn_compressed_saved_bytes_total",
                "Bytes the edge's compressed variants are smaller than their identity bodies, by encoding",
            ),
            &["encoding"],
        )?;
        registry.register(Box::new(compressed.clone()))?;
        registry.register(Box::new(saved.clone()))?;
        Ok(Self { compressed, saved })
    }

    fn count(&self, coding: Coding, identity: usize, encoded: usize) {
        self.compressed.with_label_values(&[coding.as_str()]).inc();
        self.saved.with_label_values(&[coding.as_str()]).inc_by(identity.saturating_sub(encoded) as u64);
    }
}

/// Whether a response is one the edge compresses: compression on, status 200, a
/// compressible `Content-Type`, no `Content-Encoding` (already encoded bodies are
/// left alone), no `Content-Range`, no `Cache-Control: no-transform`, and a length
/// (when known) of at least the minimum.
pub(crate) fn candidate(settings: &Settings, status: StatusCode, headers: &HeaderMap, len: Option<u64>) -> bool {
    settings.enabled
        && status == StatusCode::OK
        && !headers.contains_key(header::CONTENT_ENCODING)
        && !headers.contains_key(header::CONTENT_RANGE)
        && headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(coding::compressible)
        && !coding::no_transform(headers)
        && len.is_none_or(|len| len >= settings.min_size)
}

/// On a fill's response head: when the response will be compressed, its `Vary`
/// gains `Accept-Encoding` (what the edge serves from now on depends on it), also
/// on the identity response streamed while the fill runs.
pub(crate) fn prepare(settings: &Settings, status: StatusCode, headers: &mut HeaderMap, len: Option<u64>) {
    if candidate(settings, status, headers, len) {
        add_vary(headers);
    }
}

/// Stores a whole object that a fill received: as it is, or (a [`candidate`]) as
/// its identity, gzip and brotli variants. A coding that does not make the body
/// smaller is stored with the identity body; when neither does, the object is
/// stored as it is. While the variants are made, the object as it came is in
/// memory, so requests in between are HITs (of the identity body).
pub(crate) async fn store(
    cache: &Cache,
    counters: &Counters,
    settings: &Settings,
    key: &str,
    object: Object,
    epoch: u64,
) {
    let len = object.body.len();
    if !candidate(settings, object.head.status, &object.head.headers, Some(len as u64)) {
        return cache.insert(key, object, epoch).await;
    }
    // Found (as it came) while the variants are made: the next request is a HIT.
    cache.insert_memory(key, object.clone(), epoch).await;
    let body = object.body.clone();
    let (gzip, br) = match tokio::task::spawn_blocking(move || (gzip(&body), brotli(&body))).await {
        Ok(encoded) => encoded,
        Err(e) => {
            warn!(%key, error = %e, "compression failed; storing the identity body");
            return cache.insert(key, object, epoch).await;
        }
    };
    let smaller = |encoded: std::io::Result<Vec<u8>>| match encoded {
        Ok(encoded) => (encoded.len() < len).then(|| Bytes::from(encoded)),
        Err(e) => {
            warn!(%key, error = %e, "compression failed");
            None
        }
    };
    let (gzip, br) = (smaller(gzip), smaller(br));
    if gzip.is_none() && br.is_none() {
        debug!(%key, len, "compression saves nothing; stored as it is");
        return cache.insert(key, object, epoch).await;
    }
    let mut made = Vec::new();
    for (coding, encoded) in [(Coding::Identity, None), (Coding::Gzip, gzip), (Coding::Br, br)] {
        if let Some(encoded) = &encoded {
            made.push((coding, encoded.len()));
        }
        cache.insert(key, variant(&object, coding, encoded), epoch).await;
    }
    // Counted once stored: a variant counted can be looked up.
    for (coding, encoded) in made {
        counters.count(coding, len, encoded);
    }
}

/// The object stored for requests preferring `coding`: `encoded` (with its
/// `Content-Encoding`, length and a weak `ETag`) or, without it, the identity body.
fn variant(object: &Object, coding: Coding, encoded: Option<Bytes>) -> Object {
    let stored = &object.head;
    let mut headers = stored.headers.clone();
    add_vary(&mut headers);
    let mut vary = stored.vary.clone();
    match vary.iter_mut().find(|(name, _)| name == header::ACCEPT_ENCODING) {
        Some(slot) => slot.1 = coding.as_str().to_string(),
        None => vary.push((header::ACCEPT_ENCODING, coding.as_str().to_string())),
    }
    let body = match encoded {
        Some(encoded) => {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding.as_str()));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(encoded.len()));
            // Digests of the identity body do not hold for the encoded one (RFC 9530).
            for name in DIGESTS {
                headers.remove(name);
            }
            if let Some(etag) = headers.remove(header::ETAG)
                && let Some(weak) = weak_etag(&etag)
            {
                headers.insert(header::ETAG, weak);
            }
            encoded
        }
        None => object.body.clone(),
    };
    let head = Head {
        status: stored.status,
        headers,
        timing: stored.timing,
        directives: stored.directives.clone(),
        lifetime: stored.lifetime,
        tags: stored.tags.clone(),
        vary,
        purged: std::sync::atomic::AtomicBool::new(stored.purged.load(std::sync::atomic::Ordering::Acquire)),
    };
    Object { head: Arc::new(head), body }
}

/// The headers a fill sends up: `Accept-Encoding` replaced by the one coding the
/// client's prefers (`br`, `gzip` or `identity`). The answer is stored under that
/// coding's variant, so it must be one every client of that variant can decode (a
/// `zstd` or `deflate` answer to `gzip, zstd` would reach clients that sent `gzip`).
pub(crate) fn fill_accept_encoding(headers: &mut HeaderMap) {
    let coding = coding::preferred(headers);
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(coding.as_str()));
}

/// After a 304 refreshed a stored response's headers (RFC 9111 §4.3.4): what the
/// edge changed in a variant it compressed stays changed. `Vary` keeps
/// `Accept-Encoding` and a weak `ETag` of an encoded body stays weak (the origin's
/// 304 carries the identity's strong tag).
pub(crate) fn keep_on_refresh(stale: &HeaderMap, headers: &mut HeaderMap) {
    if vary_lists_accept_encoding(stale) {
        add_vary(headers);
    }
    let stale_weak = stale.get(header::ETAG).is_some_and(|etag| etag.as_bytes().starts_with(b"W/"));
    if stale_weak
        && stale.contains_key(header::CONTENT_ENCODING)
        && let Some(etag) = headers.get(header::ETAG)
        && let Some(weak) = weak_etag(etag)
    {
        headers.insert(header::ETAG, weak);
    }
}

/// `"x"` → `W/"x"`; a weak tag stays as it is; anything else is no entity-tag.
fn weak_etag(etag: &HeaderValue) -> Option<HeaderValue> {
    let bytes = etag.as_bytes();
    if bytes.starts_with(b"W/\"") {
        return Some(etag.clone());
    }
    if bytes.len() < 2 || !bytes.starts_with(b"\"") || !bytes.ends_with(b"\"") {
        return None;
    }
    let mut weak = Vec::with_capacity(bytes.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(bytes);
    HeaderValue::from_bytes(&weak).ok()
}

fn vary_lists_accept_encoding(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// Adds `Accept-Encoding` to `Vary` (one field line, after the origin's names).
fn add_vary(headers: &mut HeaderMap) {
    if vary_lists_accept_encoding(headers) {
        return;
    }
    let names: Vec<&str> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let value =
        if names.is_empty() { "Accept-Encoding".to_string() } else { format!("{}, Accept-Encoding", names.join(", ")) };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(header::VARY, value);
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 3), flate2::Compression::new(GZIP_LEVEL));
    encoder.write_all(body)?;
    encoder.finish()
}

fn brotli(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let params = brotli::enc::BrotliEncoderParams {
        quality: BROTLI_QUALITY,
        lgwin: BROTLI_WINDOW,
        size_hint: body.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(body.len() / 3);
    brotli::BrotliCompress(&mut &body[..], &mut out, &params)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::cache::store::test_head;

    fn settings() -> Settings {
        Settings { enabled: true, min_size: 256 }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn settings_from_config() {
        let cache: crate::config::Cache = toml::from_str("").unwrap();
        let on = Settings::from_config(&cache);
        assert!(on.enabled);
        assert_eq!(on.min_size, 256);
        let cache: crate::config::Cache = toml::from_str("compress = false\ncompress_min = \"1KiB\"").unwrap();
        let off = Settings::from_config(&cache);
        assert!(!off.enabled);
        assert_eq!(off.min_size, 1024);
        assert!(toml::from_str::<crate::config::Cache>("compress_min = \"lots\"").is_err());
    }

    #[test]
    fn what_is_compressed() {
        let ok = StatusCode::OK;
        let html = headers(&[("content-type", "text/html; charset=utf-8")]);
        assert!(candidate(&settings(), ok, &html, Some(1000)));
        assert!(candidate(&settings(), ok, &html, None), "length unknown: decided when the body is whole");
        assert!(!candidate(&settings(), ok, &html, Some(255)), "below the minimum");
        assert!(!candidate(&Settings { enabled: false, ..settings() }, ok, &html, Some(1000)));
        assert!(!candidate(&settings(), StatusCode::NOT_FOUND, &html, Some(1000)));
        let video = headers(&[("content-type", "video/mp4")]);
        assert!(!candidate(&settings(), ok, &video, Some(1000)));
        assert!(!candidate(&settings(), ok, &HeaderMap::new(), Some(1000)), "no type");
        let encoded = headers(&[("content-type", "text/css"), ("content-encoding", "gzip")]);
        assert!(!candidate(&settings(), ok, &encoded, Some(1000)));
        let no_transform = headers(&[("content-type", "text/css"), ("cache-control", "max-age=60, no-transform")]);
        assert!(!candidate(&settings(), ok, &no_transform, Some(1000)));
    }

    #[test]
    fn vary_and_etag() {
        let mut h = headers(&[("vary", "Origin"), ("vary", "accept-language")]);
        add_vary(&mut h);
        assert_eq!(h.get_all("vary").iter().collect::<Vec<_>>(), ["Origin, accept-language, Accept-Encoding"]);
        let mut h = headers(&[("vary", "accept-encoding")]);
        add_vary(&mut h);
        assert_eq!(h["vary"], "accept-encoding");
        let mut h = HeaderMap::new();
        add_vary(&mut h);
        assert_eq!(h["vary"], "Accept-Encoding");
        assert_eq!(weak_etag(&HeaderValue::from_static("\"v1\"")).unwrap(), "W/\"v1\"");
        assert_eq!(weak_etag(&HeaderValue::from_static("W/\"v1\"")).unwrap(), "W/\"v1\"");
        assert!(weak_etag(&HeaderValue::from_static("v1")).is_none());
        assert!(weak_etag(&HeaderValue::from_static("\"")).is_none());
        // A 304 for a compressed variant brings the identity's strong tag and no Vary.
        let stale = headers(&[("etag", "W/\"v1\""), ("content-encoding", "br"), ("vary", "Accept-Encoding")]);
        let mut refreshed = headers(&[("etag", "\"v1\"")]);
        keep_on_refresh(&stale, &mut refreshed);
        assert_eq!(refreshed["etag"], "W/\"v1\"");
        assert_eq!(refreshed["vary"], "Accept-Encoding");
        // The identity variant keeps the strong tag.
        let stale = headers(&[("etag", "\"v1\""), ("vary", "Accept-Encoding")]);
        let mut refreshed = headers(&[("etag", "\"v2\"")]);
        keep_on_refresh(&stale, &mut refreshed);
        assert_eq!(refreshed["etag"], "\"v2\"");
    }

    #[tokio::test]
    async fn a_fill_is_stored_as_three_variants_that_decode_to_the_original() {
        let cache = Cache::new(1 << 24, None);
        let counters = Counters::register(&Registry::new()).unwrap();
        let text: String = (0..200).map(|i| format!("<p>line {i} of the page</p>\n")).collect();
        let mut head = test_head(vec![], vec![]);
        head.headers = headers(&[("content-type", "text/html"), ("etag", "\"p1\""), ("repr-digest", "sha-256=:x:")]);
        let object = Object { head: Arc::new(head), body: Bytes::from(text.clone()) };
        store(&cache, &counters, &settings(), "k", object, cache.epoch()).await;
        let found = |ae: &'static str| {
            let cache = &cache;
            async move {
                let request = headers(&[("accept-encoding", ae)]);
                match cache.lookup("k", &request).await {
                    Some((crate::cache::Found::Object(object), _)) => object,
                    other => panic!("{ae}: {other:?}"),
                }
            }
        };
        let identity = found("identity").await;
        assert_eq!(identity.body, text.as_bytes());
        assert_eq!(identity.head.headers["etag"], "\"p1\"");
        assert_eq!(identity.head.headers["vary"], "Accept-Encoding");
        assert!(!identity.head.headers.contains_key("content-encoding"));

        let gz = found("gzip, deflate").await;
        assert_eq!(gz.head.headers["content-encoding"], "gzip");
        assert_eq!(gz.head.headers["etag"], "W/\"p1\"");
        assert!(!gz.head.headers.contains_key("repr-digest"));
        assert_eq!(identity.head.headers["repr-digest"], "sha-256=:x:");
        assert_eq!(gz.head.headers["content-length"], gz.body.len().to_string().as_str());
        let mut decoded = String::new();
        flate2::read::GzDecoder::new(&gz.body[..]).read_to_string(&mut decoded).unwrap();
        assert_eq!(decoded, text);

        let br = found("gzip;q=0.5, br").await;
        assert_eq!(br.head.headers["content-encoding"], "br");
        let mut decoded = String::new();
        brotli::Decompressor::new(&br.body[..], 4096).read_to_string(&mut decoded).unwrap();
        assert_eq!(decoded, text);
        assert!(br.body.len() < gz.body.len() && gz.body.len() < text.len());
        assert_eq!(counters.compressed.with_label_values(&["br"]).get(), 1);
        assert_eq!(counters.saved.with_label_values(&["gzip"]).get(), (text.len() - gz.body.len()) as u64);
    }

    #[tokio::test]
    async fn incompressible_bodies_are_stored_as_they_are() {
        let cache = Cache::new(1 << 24, None);
        let counters = Counters::register(&Registry::new()).unwrap();
        // Bytes that do not compress (a xorshift sequence), labelled as text.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut head = test_head(vec![], vec![]);
        head.headers = headers(&[("content-type", "text/plain")]);
        let object = Object { head: Arc::new(head), body: Bytes::from(noise.clone()) };
        store(&cache, &counters, &settings(), "k", object, cache.epoch()).await;
        let request = headers(&[("accept-encoding", "br")]);
        let Some((crate::cache::Found::Object(object), _)) = cache.lookup("k", &request).await else { panic!() };
        assert_eq!(object.body, noise);
        assert!(object.head.vary.is_empty());
        assert_eq!(counters.compressed.with_label_values(&["br"]).get(), 0);
    }
}
