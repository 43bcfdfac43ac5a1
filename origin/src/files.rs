//! Files under the content root: request paths to files (refusing traversal), their
//! content types and validators.
//!
//! A request path is percent-decoded and split into segments; `..`, backslashes and
//! NUL are refused before the file system is touched. The joined path is then
//! canonicalized and must still lie inside the canonicalized root, so a symlink
//! pointing out of the root is not followed. A directory serves its `index.html`.

use std::{
    borrow::Cow,
    io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use percent_encoding::percent_decode_str;

/// Why a request path names no servable file.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Undecodable path: 400.
    BadRequest,
    /// Nothing to serve (including every refused path): 404.
    NotFound,
    /// The file system failed otherwise: 500.
    Io(io::Error),
}

impl From<io::Error> for Lookup {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::NotFound
            | io::ErrorKind::NotADirectory
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::InvalidFilename => Self::NotFound,
            _ => Self::Io(error),
        }
    }
}

/// A request path, decoded and checked: safe to join onto the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestPath {
    /// Non-empty segments, none of them `.` or `..`.
    pub(crate) segments: Vec<String>,
    /// Whether the path ended with `/` (it must then name a directory).
    pub(crate) trailing_slash: bool,
}

/// Decodes and checks the path of a request URI (query excluded).
pub(crate) fn parse_path(raw: &str) -> Result<RequestPath, Lookup> {
    if !raw.starts_with('/') {
        return Err(Lookup::BadRequest);
    }
    let decoded = percent_decode_str(raw).collect::<Vec<u8>>();
    let decoded = String::from_utf8(decoded).map_err(|_| Lookup::BadRequest)?;
    if decoded.contains(['\0', '\\']) {
        return Err(Lookup::NotFound);
    }
    let mut segments = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => return Err(Lookup::NotFound),
            _ => segments.push(segment.to_owned()),
        }
    }
    let trailing_slash = decoded.ends_with('/') && !segments.is_empty();
    Ok(RequestPath { segments, trailing_slash })
}

/// A file found under the root, open and ready to stream.
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) file: tokio::fs::File,
    pub(crate) metadata: std::fs::Metadata,
    /// The path the rules match, relative to the root with a leading `/`
    /// (`/` becomes `/index.html`).
    pub(crate) rule_path: String,
    /// The file's path (before resolving symlinks), for its content type.
    pub(crate) path: PathBuf,
}

/// Resolves `path` under `root` (which must be canonical) and opens the file.
pub(crate) async fn open(root: &Path, path: &RequestPath) -> Result<Found, Lookup> {
    let mut candidate = root.to_path_buf();
    candidate.extend(&path.segments);
    let mut rule_path = format!("/{}", path.segments.join("/"));
    let mut canonical = inside(root, &candidate).await?;
    if tokio::fs::metadata(&canonical).await?.is_dir() {
        candidate.push("index.html");
        if !rule_path.ends_with('/') {
            rule_path.push('/');
        }
        rule_path.push_str("index.html");
        canonical = inside(root, &candidate).await?;
    } else if path.trailing_slash {
        return Err(Lookup::NotFound);
    }
    let file = tokio::fs::File::open(&canonical).await?;
    let metadata = file.metadata().await?;
    if !metadata.is_file() {
        return Err(Lookup::NotFound);
    }
    Ok(Found { file, metadata, rule_path, path: candidate })
}

/// Canonicalizes `candidate`, requiring the result to lie inside `root`.
async fn inside(root: &Path, candidate: &Path) -> Result<PathBuf, Lookup> {
    // Whatever stops canonicalization (missing, too long, a symlink loop) means
    // there is nothing to serve.
    let canonical = tokio::fs::canonicalize(candidate).await.map_err(|_| Lookup::NotFound)?;
    if canonical.starts_with(root) { Ok(canonical) } else { Err(Lookup::NotFound) }
}

/// The strong ETag of a file, quotes included: length, modification time in
/// nanoseconds and inode, in hex.
pub(crate) fn etag(metadata: &std::fs::Metadata) -> String {
    let nanos =
        metadata.modified().ok().and_then(|time| time.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    format!("\"{:x}-{:x}-{:x}\"", metadata.len(), nanos, inode(metadata))
}

#[cfg(unix)]
fn inode(metadata: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(metadata)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

/// The file's modification time, if the platform has one and it is after 1970.
pub(crate) fn last_modified(metadata: &std::fs::Metadata) -> Option<SystemTime> {
    metadata.modified().ok().filter(|time| *time >= UNIX_EPOCH)
}

/// The `Content-Type` of a file, by extension.
pub(crate) fn content_type(path: &Path) -> Cow<'static, str> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let known = match extension.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "m4a" => "audio/mp4",
        "webm" => "video/webm",
        "m3u8" => "application/vnd.apple.mpegurl",
        "ts" => "video/mp2t",
        "mpd" => "application/dash+xml",
        "m4s" => "video/iso.segment",
        "html" | "htm" => "text/html; charset=utf-8",
        "vtt" => "text/vtt",
        "txt" => "text/plain; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        _ => "",
    };
    if !known.is_empty() {
        return Cow::Borrowed(known);
    }
    match mime_guess::from_path(path).first_raw() {
        Some(mime) if mime.starts_with("text/") => Cow::Owned(format!("{mime}; charset=utf-8")),
        Some(mime) => Cow::Borrowed(mime),
        None => Cow::Borrowed("application/octet-stream"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(raw: &str) -> Vec<String> {
        parse_path(raw).unwrap().segments
    }

    #[test]
    fn decodes_and_normalizes_paths() {
        assert_eq!(segments("/"), Vec::<String>::new());
        assert_eq!(segments("/a/b.txt"), ["a", "b.txt"]);
        assert_eq!(segments("//a/./b//"), ["a", "b"]);
        assert_eq!(segments("/a%20b/%41"), ["a b", "A"]);
        assert_eq!(segments("/.../..a/a.."), ["...", "..a", "a.."]);
        // A doubly-encoded dot-dot is a literal name, harmless.
        assert_eq!(segments("/%252e%252e/x"), ["%2e%2e", "x"]);
        assert!(parse_path("/a/").unwrap().trailing_slash);
        assert!(!parse_path("/a").unwrap().trailing_slash);
        assert!(!parse_path("/").unwrap().trailing_slash);
    }

    #[test]
    fn refuses_traversal() {
        for raw in [
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/a/..",
            "/%2e%2e/etc/passwd",
            "/%2E%2e/etc/passwd",
            "/.%2e/x",
            "/..%2fetc/passwd",
            "/..%2Fetc%2Fpasswd",
            "/a%2f..%2f..%2fx",
            "/..\\etc\\passwd",
            "/a%5c..%5cb",
            "/a%00.txt",
            "/a\0b",
        ] {
            assert!(matches!(parse_path(raw), Err(Lookup::NotFound)), "{raw}");
        }
        assert!(matches!(parse_path("/%ff%fe"), Err(Lookup::BadRequest)));
        assert!(matches!(parse_path("*"), Err(Lookup::BadRequest)));
        assert!(matches!(parse_path(""), Err(Lookup::BadRequest)));
    }

    #[tokio::test]
    async fn resolves_inside_the_root_only() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("index.html"), "home").unwrap();
        std::fs::create_dir_all(root.join("v/empty")).unwrap();
        std::fs::write(root.join("v/a.mp4"), "video").unwrap();
        std::fs::write(root.join("v/index.html"), "v home").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outside.path().join("secret"), root.join("leak")).unwrap();
            std::os::unix::fs::symlink(outside.path(), root.join("leakdir")).unwrap();
            std::os::unix::fs::symlink(root.join("v/a.mp4"), root.join("alias.mp4")).unwrap();
        }
        let open = |raw: &str| {
            let root = root.clone();
            let raw = raw.to_owned();
            async move { open(&root, &parse_path(&raw)?).await }
        };
        let found = open("/").await.unwrap();
        assert_eq!(found.rule_path, "/index.html");
        assert_eq!(found.metadata.len(), 4);
        let found = open("/v").await.unwrap();
        assert_eq!(found.rule_path, "/v/index.html");
        assert_eq!(open("/v/").await.unwrap().rule_path, "/v/index.html");
        assert_eq!(open("/v/a.mp4").await.unwrap().rule_path, "/v/a.mp4");
        for missing in ["/v/empty/", "/v/empty", "/nope", "/v/a.mp4/", "/v/a.mp4/x", "/leak", "/leakdir/secret"] {
            assert!(matches!(open(missing).await, Err(Lookup::NotFound)), "{missing}");
        }
        // A symlink inside the root to a file inside the root is fine.
        #[cfg(unix)]
        assert_eq!(open("/alias.mp4").await.unwrap().metadata.len(), 5);
        let long = format!("/{}", "a".repeat(5000));
        assert!(matches!(open(&long).await, Err(Lookup::NotFound)));
    }

    #[test]
    fn validators_change_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let first = etag(&std::fs::metadata(&path).unwrap());
        assert!(first.starts_with("\"3-") && first.ends_with('"'), "{first}");
        std::fs::write(&path, "three").unwrap();
        let second = etag(&std::fs::metadata(&path).unwrap());
        assert_ne!(first, second);
        assert!(last_modified(&std::fs::metadata(&path).unwrap()).is_some());
    }

    #[test]
    fn content_types() {
        let ct = |name: &str| content_type(Path::new(name)).into_owned();
        assert_eq!(ct("a.mp4"), "video/mp4");
        assert_eq!(ct("A.MP4"), "video/mp4");
        assert_eq!(ct("a.webm"), "video/webm");
        assert_eq!(ct("a.m3u8"), "application/vnd.apple.mpegurl");
        assert_eq!(ct("seg.ts"), "video/mp2t");
        assert_eq!(ct("a.mpd"), "application/dash+xml");
        assert_eq!(ct("a.m4s"), "video/iso.segment");
        assert_eq!(ct("index.html"), "text/html; charset=utf-8");
        assert_eq!(ct("a.vtt"), "text/vtt");
        assert_eq!(ct("a.txt"), "text/plain; charset=utf-8");
        assert_eq!(ct("a.json"), "application/json");
        assert_eq!(ct("a.png"), "image/png");
        assert_eq!(ct("a.csv"), "text/csv; charset=utf-8");
        assert_eq!(ct("noext"), "application/octet-stream");
        assert_eq!(ct("a.unknownext"), "application/octet-stream");
    }
}
