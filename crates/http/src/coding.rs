//! Content codings: which one a request prefers (`Accept-Encoding`, RFC 9110
//! §12.5.3), which media types are worth compressing, and `no-transform`.
//!
//! The edge keeps at most three encodings of a representation: `br`, `gzip` and
//! `identity`. [`preferred`] folds whatever `Accept-Encoding` a client sends into
//! one of them, so the cache key of `Vary: Accept-Encoding` has three values, not
//! one per browser's spelling of the header.

use http::{HeaderMap, header};

/// The content codings the edge stores and serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    /// Brotli (RFC 7932).
    Br,
    /// gzip (RFC 1952).
    Gzip,
    /// No content coding.
    Identity,
}

impl Coding {
    /// The coding's token, as in `Content-Encoding` and `Accept-Encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Br => "br",
            Self::Gzip => "gzip",
            Self::Identity => "identity",
        }
    }
}

/// A qvalue in thousandths (RFC 9110 §12.4.2): `1000` for `q=1`, the default.
type Weight = u16;

/// What an `Accept-Encoding` says about the codings the edge has.
#[derive(Debug, Default, Clone, Copy)]
struct Accepted {
    br: Option<Weight>,
    gzip: Option<Weight>,
    identity: Option<Weight>,
    any: Option<Weight>,
}

/// The coding a request's `Accept-Encoding` prefers among `br`, `gzip` and
/// `identity`:
///
/// - each coding's weight is its own entry's `q` (default 1), else that of `*`,
///   else 0; `x-gzip` counts as `gzip` (RFC 9110 §8.4.1.3); names are
///   case-insensitive; the first entry of a coding counts;
/// - the heavier of `br` and `gzip` wins, `br` on a tie, unless neither is
///   acceptable (`q=0` or absent) or `identity` is listed with a higher weight;
/// - otherwise `identity`. An element with a malformed `q` is ignored.
///
/// With no `Accept-Encoding` at all, RFC 9110 allows any coding, but clients that
/// send none (scripts, old tools) rarely decode one: the answer is `identity`, as
/// common servers do. An `identity;q=0` still gets `identity` when nothing else is
/// acceptable (RFC 9110 §12.5.3 lets a server send it rather than a 406).
pub fn preferred(headers: &HeaderMap) -> Coding {
    let mut accepted = Accepted::default();
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else { continue };
        for element in text.split(',') {
            let Some((name, weight)) = element_weight(element) else { continue };
            let slot = if name.eq_ignore_ascii_case("br") {
                &mut accepted.br
            } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                &mut accepted.gzip
            } else if name.eq_ignore_ascii_case("identity") {
                &mut accepted.identity
            } else if name == "*" {
                &mut accepted.any
            } else {
                continue;
            };
            slot.get_or_insert(weight);
        }
    }
    let br = accepted.br.or(accepted.any).unwrap_or(0);
    let gzip = accepted.gzip.or(accepted.any).unwrap_or(0);
    let best = br.max(gzip);
    if best == 0 || accepted.identity.is_some_and(|identity| identity > best) {
        Coding::Identity
    } else if br >= gzip {
        Coding::Br
    } else {
        Coding::Gzip
    }
}

/// One `Accept-Encoding` element: its coding name and weight, or `None` when it
/// is empty or its weight is malformed.
fn element_weight(element: &str) -> Option<(&str, Weight)> {
    let mut parts = element.split(';');
    let name = parts.next()?.trim();
    if name.is_empty() {
        return None;
    }
    let mut weight = 1000;
    for param in parts {
        let (key, value) = param.split_once('=')?;
        if key.trim().eq_ignore_ascii_case("q") {
            weight = qvalue(value.trim())?;
        }
    }
    Some((name, weight))
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn qvalue(text: &str) -> Option<Weight> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths =
        frac.bytes().chain(std::iter::repeat(b'0')).take(3).fold(0, |n, b| n * 10 + Weight::from(b - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Whether a response of this `Content-Type` is worth compressing: text (HTML,
/// CSS, JavaScript, JSON, XML, SVG), streaming playlists and manifests (HLS, DASH),
/// subtitles (WebVTT, TTML), WebAssembly and uncompressed font formats. Never video,
/// audio or raster images, which their own formats compress; never
/// `text/event-stream`, which is a live stream.
pub fn compressible(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else { return false };
    match kind {
        "text" => subtype != "event-stream",
        "application" => {
            subtype.ends_with("+json")
                || subtype.ends_with("+xml")
                || matches!(
                    subtype,
                    "javascript"
                        | "x-javascript"
                        | "ecmascript"
                        | "json"
                        | "xml"
                        | "vnd.apple.mpegurl"
                        | "x-mpegurl"
                        | "wasm"
                        | "x-font-ttf"
                        | "x-font-otf"
                        | "vnd.ms-fontobject"
                )
        }
        "image" => subtype == "svg+xml",
        // HLS playlists under the m3u types some servers use.
        "audio" => matches!(subtype, "mpegurl" | "x-mpegurl"),
        "font" => matches!(subtype, "ttf" | "otf" | "collection"),
        _ => false,
    }
}

/// Whether the response's `Cache-Control` has `no-transform` (RFC 9111 §5.2.2.6):
/// an intermediary must not change its content, so it is never compressed.
pub fn no_transform(headers: &HeaderMap) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().filter_map(|value| value.to_str().ok()).any(|text| {
        let mut quoted = false;
        let mut start = 0;
        let mut names = Vec::new();
        for (i, c) in text.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    names.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        names.push(&text[start..]);
        names.into_iter().any(|part| {
            let name = part.split('=').next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("no-transform")
        })
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn pick(values: &[&str]) -> &'static str {
        preferred(&accept(values)).as_str()
    }

    #[test]
    fn accept_encoding_is_folded_into_three_codings() {
        // What browsers, tools and players send.
        assert_eq!(pick(&["gzip, deflate, br, zstd"]), "br");
        assert_eq!(pick(&["gzip, deflate"]), "gzip");
        assert_eq!(pick(&["br;q=1.0, gzip;q=0.8, *;q=0.1"]), "br");
        assert_eq!(pick(&["deflate"]), "identity");
        assert_eq!(pick(&["identity"]), "identity");
        assert_eq!(pick(&[]), "identity");
        assert_eq!(pick(&[""]), "identity");
        // q-values decide, q=0 excludes, br wins a tie.
        assert_eq!(pick(&["gzip;q=0, br"]), "br");
        assert_eq!(pick(&["br;q=0, gzip"]), "gzip");
        assert_eq!(pick(&["br;q=0.5, gzip"]), "gzip");
        assert_eq!(pick(&["gzip;q=0.5,br;q=0.500"]), "br");
        assert_eq!(pick(&["br;q=0, gzip;q=0"]), "identity");
        assert_eq!(pick(&["br;q=0.001"]), "br");
        // `*` stands for whatever is not listed.
        assert_eq!(pick(&["*"]), "br");
        assert_eq!(pick(&["*;q=0"]), "identity");
        assert_eq!(pick(&["br;q=0, *"]), "gzip");
        assert_eq!(pick(&["*, br;q=0, gzip;q=0"]), "identity");
        assert_eq!(pick(&["gzip;q=0.2, *;q=0.5"]), "br");
        // identity preferred over what the edge has.
        assert_eq!(pick(&["gzip;q=0.5, identity"]), "identity");
        assert_eq!(pick(&["gzip, identity;q=0.5"]), "gzip");
        assert_eq!(pick(&["identity;q=0"]), "identity");
        // Spelling: case, whitespace, x-gzip, several field lines, first entry counts.
        assert_eq!(pick(&["  GZIP ;  Q=1 , BR;q=0 "]), "gzip");
        assert_eq!(pick(&["x-gzip"]), "gzip");
        assert_eq!(pick(&["deflate", "br"]), "br");
        assert_eq!(pick(&["br;q=0, br"]), "identity");
        // Malformed weights drop the element, not the header.
        assert_eq!(pick(&["br;q=2, gzip"]), "gzip");
        assert_eq!(pick(&["br;q=0.5000, gzip;q=0.1"]), "gzip");
        assert_eq!(pick(&["br;q=abc"]), "identity");
        assert_eq!(pick(&["br;q=1.001, gzip;q=0.9"]), "gzip");
        assert_eq!(pick(&["br;q, gzip"]), "gzip");
        assert_eq!(pick(&["br;level=5"]), "br");
    }

    #[test]
    fn qvalues() {
        assert_eq!(qvalue("1"), Some(1000));
        assert_eq!(qvalue("1.000"), Some(1000));
        assert_eq!(qvalue("0.5"), Some(500));
        assert_eq!(qvalue("0.05"), Some(50));
        assert_eq!(qvalue("0"), Some(0));
        assert_eq!(qvalue("0."), Some(0));
        for bad in ["", "2", "1.5", "0.1234", "-0", ".5", "0.a", "+1", "01"] {
            assert_eq!(qvalue(bad), None, "{bad}");
        }
    }

    #[test]
    fn text_is_compressible_media_is_not() {
        for yes in [
            "text/html; charset=utf-8",
            "TEXT/CSS",
            "text/plain",
            "text/javascript",
            "application/javascript",
            "application/json",
            "application/ld+json",
            "application/manifest+json",
            "image/svg+xml",
            "application/xml",
            "application/rss+xml",
            "application/vnd.apple.mpegurl",
            "application/x-mpegURL",
            "audio/mpegurl",
            "application/dash+xml",
            "text/vtt",
            "application/ttml+xml",
            "application/wasm",
            "font/ttf",
        ] {
            assert!(compressible(yes), "{yes}");
        }
        for no in [
            "video/mp4",
            "video/mp2t",
            "audio/mp4",
            "audio/mpeg",
            "image/png",
            "image/jpeg",
            "image/webp",
            "application/octet-stream",
            "application/zip",
            "application/gzip",
            "font/woff2",
            "text/event-stream",
            "",
            "text",
            "html",
        ] {
            assert!(!compressible(no), "{no}");
        }
    }

    #[test]
    fn no_transform_is_found_among_directives() {
        let cc = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
            no_transform(&headers)
        };
        assert!(cc("no-transform"));
        assert!(cc("public, max-age=60, No-Transform"));
        assert!(!cc("public, max-age=60"));
        assert!(!cc("private=\"a, no-transform\", max-age=5"));
        assert!(!cc("no-transformer"));
        assert!(!no_transform(&HeaderMap::new()));
    }

    proptest! {
        /// Never panics, and never picks a coding the header excludes by name.
        #[test]
        fn preferred_never_picks_an_excluded_coding(text in "[ -~]{0,60}", q in 0u8..3) {
            let Ok(value) = HeaderValue::from_str(&text) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT_ENCODING, value);
            let _ = preferred(&headers);
            let excluded = ["br", "gzip"][usize::from(q % 2)];
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(&format!("{excluded};q=0, {text}")).unwrap_or(HeaderValue::from_static("identity")));
            prop_assert_ne!(preferred(&headers).as_str(), excluded);
        }
    }
}
