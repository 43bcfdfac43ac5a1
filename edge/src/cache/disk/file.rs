//! The cache file: one stored entry (a whole object, a `Vary` marker, the head of
//! a sliced object, or one slice) per file.
//!
//! ```text
//! 0   magic "CDNC"            4   format version      5   kind
//! 6   flags (bit 0: soft-purged; the one byte ever written in place, outside
//!     every checksum)         7   reserved (0)
//! 8   meta length (u32 LE)    12  block size (u32 LE)  16  body length (u64 LE)
//! 24  body offset (u64 LE)    32  checksum of the header (xxh3-64 over bytes 0..6,
//!     7..32, the meta and the block checksums)
//! 40  meta (postcard: key, head, tags, validators)
//!     one xxh3-64 per block of the body
//!     body (raw bytes: what `sendfile` sends from `body offset`)
//! ```
//!
//! A file is written whole under `tmp/` and renamed into place, so a reader sees
//! either the old file, the new one, or none. Nothing is fsynced per file: a file
//! torn by a power loss fails its checksums when read and counts as a MISS.

use std::{
    fs::File,
    hash::Hasher as _,
    io::{self, IoSlice, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::FileExt as _,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_64;

use cdn_http::policy::{Directives, Timing};

use crate::cache::store::{Entry, Head, Object, Slice, Sliced};

const MAGIC: &[u8; 4] = b"CDNC";
const VERSION: u8 = 1;
/// Bytes before the meta.
pub(super) const FIXED: usize = 40;
/// Bytes per body checksum.
const BLOCK: usize = 64 * 1024;
/// Bodies this large are mapped from their file (and start on a page boundary).
const MIN_LEN: usize = cdn_node::zerocopy::MIN_LEN;
/// The page size mappings are aligned to.
const PAGE: u64 = 4096;
/// Where the flags byte lives.
pub(super) const FLAGS_AT: u64 = 6;
/// Flag: soft-purged (revalidate before use).
pub(super) const SOFT_PURGED: u8 = 1;
/// The largest meta a reader accepts (a corrupt length must not allocate much).
const MAX_META: usize = 1 << 20;
/// The largest body a reader accepts.
const MAX_BODY: u64 = 1 << 32;

/// What a file holds (byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Object = 1,
    Vary = 2,
    Sliced = 3,
    Slice = 4,
}

impl Kind {
    pub(crate) fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Object,
            2 => Self::Vary,
            3 => Self::Sliced,
            4 => Self::Slice,
            _ => return None,
        })
    }

    /// Entries a purge by tag or URL matches by themselves (the others follow
    /// their primary key).
    pub(crate) fn has_head(self) -> bool {
        matches!(self, Self::Object | Self::Sliced)
    }
}

/// Why a file could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("missing")]
    Missing,
    #[error("i/o: {0}")]
    Io(#[source] io::Error),
    #[error("checksum mismatch in {0}")]
    Checksum(&'static str),
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The file holds another key (a hash collision, or a file replaced meanwhile).
    #[error("holds another key")]
    OtherKey,
}

impl ReadError {
    /// The `kind` label of `cdn_cache_disk_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Missing | Self::OtherKey => "missing",
            Self::Io(_) => "io",
            Self::Checksum(_) | Self::Malformed(_) => "checksum",
        }
    }
}

impl From<io::Error> for ReadError {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::NotFound { Self::Missing } else { Self::Io(error) }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    key: String,
    body: MetaBody,
}

#[derive(Debug, Serialize, Deserialize)]
enum MetaBody {
    Object(HeadMeta),
    Vary(Vec<String>),
    Sliced { head: HeadMeta, total: u64, slice: u64, etag: Option<Vec<u8>> },
    Slice { etag: Option<Vec<u8>> },
}

#[derive(Debug, Serialize, Deserialize)]
struct HeadMeta {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    request_time_us: u64,
    response_time_us: u64,
    initial_age_us: u64,
    lifetime_us: u64,
    tags: Vec<String>,
    vary: Vec<(String, String)>,
}

fn micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl HeadMeta {
    fn of(head: &Head) -> Self {
        Self {
            status: head.status.as_u16(),
            headers: head.headers.iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect(),
            request_time_us: micros(head.timing.request_time),
            response_time_us: micros(head.timing.response_time),
            initial_age_us: duration_us(head.timing.initial_age),
            lifetime_us: duration_us(head.lifetime),
            tags: head.tags.clone(),
            vary: head.vary.iter().map(|(n, v)| (n.as_str().to_string(), v.clone())).collect(),
        }
    }

    fn into_head(self, purged: bool) -> Result<Head, ReadError> {
        let status = StatusCode::from_u16(self.status).map_err(|_| ReadError::Malformed("status"))?;
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in self.headers {
            let name = HeaderName::try_from(name).map_err(|_| ReadError::Malformed("header name"))?;
            let value = HeaderValue::try_from(value).map_err(|_| ReadError::Malformed("header value"))?;
            headers.append(name, value);
        }
        let vary = self
            .vary
            .into_iter()
            .map(|(name, value)| Ok((HeaderName::try_from(name).map_err(|_| ReadError::Malformed("vary"))?, value)))
            .collect::<Result<Vec<_>, ReadError>>()?;
        let time = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
        Ok(Head {
            status,
            directives: Directives::response(&headers),
            headers,
            timing: Timing {
                request_time: time(self.request_time_us),
                response_time: time(self.response_time_us),
                initial_age: Duration::from_micros(self.initial_age_us),
            },
            lifetime: Duration::from_micros(self.lifetime_us),
            tags: self.tags,
            vary,
            purged: AtomicBool::new(purged),
        })
    }
}

/// An entry ready to be written: its header bytes and its body.
pub(crate) struct Encoded {
    pub(crate) kind: Kind,
    pub(crate) tags: Vec<String>,
    /// Header bytes, padded to the body's offset.
    header: Vec<u8>,
    /// Of which checked (the rest is padding).
    #[cfg_attr(not(test), allow(dead_code, reason = "the tests flip every checked byte"))]
    checked: usize,
    body: Bytes,
}

impl Encoded {
    /// Bytes the file takes.
    pub(crate) fn len(&self) -> u64 {
        (self.header.len() + self.body.len()) as u64
    }

    /// Writes the whole file.
    pub(crate) fn write_to(&self, file: &mut File) -> io::Result<()> {
        let mut bufs = [IoSlice::new(&self.header), IoSlice::new(&self.body)];
        let mut rest = &mut bufs[..];
        while !rest.is_empty() {
            let written = file.write_vectored(rest)?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, written);
        }
        Ok(())
    }
}

/// Encodes `entry`, stored under `key`, as a cache file.
pub(crate) fn encode(key: &str, entry: &Entry) -> Encoded {
    let (kind, body, meta_body) = match entry {
        Entry::Object(object) => (Kind::Object, object.body.clone(), MetaBody::Object(HeadMeta::of(&object.head))),
        Entry::Vary(names) => {
            (Kind::Vary, Bytes::new(), MetaBody::Vary(names.iter().map(|n| n.as_str().to_string()).collect()))
        }
        Entry::Sliced(sliced) => (
            Kind::Sliced,
            Bytes::new(),
            MetaBody::Sliced {
                head: HeadMeta::of(&sliced.head),
                total: sliced.total,
                slice: sliced.slice,
                etag: sliced.etag.as_ref().map(|v| v.as_bytes().to_vec()),
            },
        ),
        Entry::Slice(slice) => (
            Kind::Slice,
            slice.bytes.clone(),
            MetaBody::Slice { etag: slice.etag.as_ref().map(|v| v.as_bytes().to_vec()) },
        ),
    };
    let tags = match &meta_body {
        MetaBody::Object(head) | MetaBody::Sliced { head, .. } => head.tags.clone(),
        _ => Vec::new(),
    };
    let meta = postcard::to_allocvec(&Meta { key: key.to_string(), body: meta_body }).unwrap_or_default();
    let sums: Vec<u8> = body.chunks(BLOCK).flat_map(|block| XxHash3_64::oneshot(block).to_le_bytes()).collect();
    let header_len = (FIXED + meta.len() + sums.len()) as u64;
    // A body that will be mapped starts on a page of its own.
    let body_offset = if body.len() >= MIN_LEN { header_len.next_multiple_of(PAGE) } else { header_len };
    let mut header = Vec::with_capacity(body_offset as usize);
    header.extend_from_slice(MAGIC);
    header.push(VERSION);
    header.push(kind as u8);
    header.push(0);
    header.push(0);
    header.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_le_bytes());
    header.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    header.extend_from_slice(&(body.len() as u64).to_le_bytes());
    header.extend_from_slice(&body_offset.to_le_bytes());
    let sum = header_sum(&header, &meta, &sums);
    header.extend_from_slice(&sum.to_le_bytes());
    header.extend_from_slice(&meta);
    header.extend_from_slice(&sums);
    let checked = header.len();
    header.resize(body_offset as usize, 0);
    Encoded { kind, tags, header, checked, body }
}

fn header_sum(fixed: &[u8], meta: &[u8], sums: &[u8]) -> u64 {
    let mut hasher = XxHash3_64::new();
    hasher.write(&fixed[..FLAGS_AT as usize]);
    hasher.write(&fixed[FLAGS_AT as usize + 1..32]);
    hasher.write(meta);
    hasher.write(sums);
    std::hash::Hasher::finish(&hasher)
}

/// What the index needs of a file, read from its header alone.
#[derive(Debug)]
pub(crate) struct Summary {
    pub(crate) key: String,
    pub(crate) kind: Kind,
    pub(crate) tags: Vec<String>,
    pub(crate) soft_purged: bool,
}

/// A parsed header.
struct Header {
    kind: Kind,
    flags: u8,
    meta: Meta,
    sums: Vec<u64>,
    body_len: u64,
    body_offset: u64,
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or_default())
}

/// Reads and checks the header of `file`.
fn read_header(file: &File) -> Result<Header, ReadError> {
    let mut first = vec![0u8; 4096];
    let got = read_at_most(file, &mut first, 0)?;
    first.truncate(got);
    if got < FIXED {
        return Err(ReadError::Malformed("short header"));
    }
    if &first[..4] != MAGIC || first[4] != VERSION {
        return Err(ReadError::Malformed("magic or version"));
    }
    let kind = Kind::from_byte(first[5]).ok_or(ReadError::Malformed("kind"))?;
    let meta_len = u32_at(&first, 8) as usize;
    let block = u32_at(&first, 12) as usize;
    let body_len = u64_at(&first, 16);
    let body_offset = u64_at(&first, 24);
    if meta_len > MAX_META || block != BLOCK || body_len > MAX_BODY {
        return Err(ReadError::Malformed("lengths"));
    }
    let blocks = body_len.div_ceil(BLOCK as u64) as usize;
    let header_len = FIXED + meta_len + blocks * 8;
    let aligned =
        if body_len >= MIN_LEN as u64 { (header_len as u64).next_multiple_of(PAGE) } else { header_len as u64 };
    if body_offset != aligned {
        return Err(ReadError::Malformed("body offset"));
    }
    let mut buf = first;
    if buf.len() < header_len {
        let have = buf.len();
        buf.resize(header_len, 0);
        if read_at_most(file, &mut buf[have..], have as u64)? != header_len - have {
            return Err(ReadError::Malformed("short header"));
        }
    }
    let meta = &buf[FIXED..FIXED + meta_len];
    let sums = &buf[FIXED + meta_len..header_len];
    if header_sum(&buf[..32], meta, sums) != u64_at(&buf, 32) {
        return Err(ReadError::Checksum("header"));
    }
    let meta: Meta = postcard::from_bytes(meta).map_err(|_| ReadError::Malformed("meta"))?;
    let sums = sums.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    Ok(Header { kind, flags: buf[FLAGS_AT as usize], meta, sums, body_len, body_offset })
}

/// Checks the body's blocks against their checksums, reading them through one
/// block-sized buffer (an I/O error is an error here, not a fault later).
fn check_in_place(file: &File, offset: u64, len: usize, sums: &[u64]) -> Result<(), ReadError> {
    let mut buf = vec![0u8; BLOCK.min(len)];
    for (i, sum) in sums.iter().enumerate() {
        let start = i * BLOCK;
        let block = &mut buf[..BLOCK.min(len - start)];
        if read_at_most(file, block, offset + start as u64)? != block.len() {
            return Err(ReadError::Malformed("short body"));
        }
        if XxHash3_64::oneshot(block) != *sum {
            return Err(ReadError::Checksum("body"));
        }
    }
    Ok(())
}

/// Reads into `buf` from `offset` until it is full or the file ends.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The header of `file`, for the index.
pub(crate) fn summary(file: &File) -> Result<Summary, ReadError> {
    let header = read_header(file)?;
    let tags = match header.meta.body {
        MetaBody::Object(head) | MetaBody::Sliced { head, .. } => head.tags,
        _ => Vec::new(),
    };
    Ok(Summary { key: header.meta.key, kind: header.kind, tags, soft_purged: header.flags & SOFT_PURGED != 0 })
}

/// Reads the entry stored under `key` from `file`: the header is always checked,
/// the body unless `verified` (this file's body was checked since the edge
/// started; cache files never change once published). A body of
/// `zerocopy::MIN_LEN` or more is mapped from the file instead of copied (sent with
/// `sendfile` on cleartext connections); smaller ones are read. Returns the entry
/// and the body bytes read or checked.
pub(crate) fn read(file: File, key: &str, verified: bool) -> Result<(Entry, u64), ReadError> {
    let header = read_header(&file)?;
    if header.meta.key != key {
        return Err(ReadError::OtherKey);
    }
    let len = usize::try_from(header.body_len).map_err(|_| ReadError::Malformed("lengths"))?;
    if len.div_ceil(BLOCK) != header.sums.len() {
        return Err(ReadError::Malformed("block count"));
    }
    let file = Arc::new(file);
    let mapped = if len >= MIN_LEN {
        if !verified {
            check_in_place(&file, header.body_offset, len, &header.sums)?;
        }
        cdn_node::zerocopy::map_file(file.clone(), header.body_offset, len)
    } else {
        None
    };
    let bytes = match mapped {
        Some(bytes) => bytes,
        None => {
            // Read without zeroing the buffer first (read_to_end fills spare capacity).
            let mut body = Vec::with_capacity(len);
            (&*file).seek(SeekFrom::Start(header.body_offset))?;
            (&*file).take(header.body_len).read_to_end(&mut body)?;
            if body.len() != len {
                return Err(ReadError::Malformed("short body"));
            }
            for (block, sum) in body.chunks(BLOCK).zip(&header.sums) {
                if XxHash3_64::oneshot(block) != *sum {
                    return Err(ReadError::Checksum("body"));
                }
            }
            match cdn_node::zerocopy::backed_by_file(body, file.clone(), header.body_offset) {
                Ok(bytes) => bytes,
                Err(body) => Bytes::from(body),
            }
        }
    };
    let purged = header.flags & SOFT_PURGED != 0;
    let etag =
        |etag: Option<Vec<u8>>| etag.map(HeaderValue::try_from).transpose().map_err(|_| ReadError::Malformed("etag"));
    let entry = match (header.kind, header.meta.body) {
        (Kind::Object, MetaBody::Object(head)) => {
            Entry::Object(Object { head: Arc::new(head.into_head(purged)?), body: bytes })
        }
        (Kind::Vary, MetaBody::Vary(names)) => Entry::Vary(Arc::new(
            names
                .into_iter()
                .map(|n| HeaderName::try_from(n).map_err(|_| ReadError::Malformed("vary")))
                .collect::<Result<_, _>>()?,
        )),
        (Kind::Sliced, MetaBody::Sliced { head, total, slice, etag: tag }) => {
            Entry::Sliced(Arc::new(Sliced { head: Arc::new(head.into_head(purged)?), total, slice, etag: etag(tag)? }))
        }
        (Kind::Slice, MetaBody::Slice { etag: tag }) => Entry::Slice(Slice { etag: etag(tag)?, bytes }),
        _ => return Err(ReadError::Malformed("kind and meta differ")),
    };
    Ok((entry, header.body_len))
}

#[cfg(test)]
mod tests {
    use http::header;

    use super::*;

    fn head(tags: Vec<String>) -> Arc<Head> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=60"));
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        let now = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        Arc::new(Head {
            status: StatusCode::OK,
            directives: Directives::response(&headers),
            headers,
            timing: Timing { request_time: now, response_time: now, initial_age: Duration::from_secs(3) },
            lifetime: Duration::from_secs(60),
            tags,
            vary: vec![(header::ACCEPT_ENCODING, "gzip".into())],
            purged: AtomicBool::new(false),
        })
    }

    fn written(key: &str, entry: &Entry) -> File {
        let mut file = tempfile::tempfile().unwrap();
        encode(key, entry).write_to(&mut file).unwrap();
        file
    }

    fn body(len: usize) -> Bytes {
        (0..len).map(|i| (i * 31 + i / 977) as u8).collect::<Vec<_>>().into()
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let object = Entry::Object(Object { head: head(vec!["a".into(), "b".into()]), body: body(300_000) });
        let (back, got) = read(written("k", &object), "k", false).unwrap();
        let (Entry::Object(back), Entry::Object(stored)) = (back, &object) else { panic!() };
        assert_eq!(got, 300_000);
        assert_eq!(back.body, stored.body);
        assert!(cdn_node::zerocopy::is_mapped_file(&back.body), "a large body is mapped, not copied");
        assert_eq!(back.head.headers, stored.head.headers);
        assert_eq!(back.head.timing.request_time, stored.head.timing.request_time);
        assert_eq!(back.head.timing.initial_age, stored.head.timing.initial_age);
        assert_eq!(back.head.lifetime, stored.head.lifetime);
        assert_eq!(back.head.tags, ["a", "b"]);
        assert_eq!(back.head.vary, stored.head.vary);
        assert_eq!(back.head.directives.max_age, Some(60));
        assert!(cdn_node::zerocopy::locate(&back.body).is_some(), "a large body is sent from its file");

        let sliced = Entry::Sliced(Arc::new(Sliced {
            head: head(vec![]),
            total: 10 << 20,
            slice: 1 << 20,
            etag: Some(HeaderValue::from_static("\"v1\"")),
        }));
        let Entry::Sliced(back) = read(written("s", &sliced), "s", false).unwrap().0 else { panic!() };
        assert_eq!(
            (back.total, back.slice, back.etag.as_ref().unwrap().as_bytes()),
            (10 << 20, 1 << 20, &b"\"v1\""[..])
        );

        let slice = Entry::Slice(Slice { etag: None, bytes: body(1000) });
        let Entry::Slice(back) = read(written("s\u{1f}3", &slice), "s\u{1f}3", false).unwrap().0 else { panic!() };
        assert_eq!(back.bytes, body(1000));

        let vary = Entry::Vary(Arc::new(vec![header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE]));
        let Entry::Vary(names) = read(written("v", &vary), "v", false).unwrap().0 else { panic!() };
        assert_eq!(*names, [header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE]);

        let summary = summary(&written("k", &object)).unwrap();
        assert_eq!((summary.key.as_str(), summary.kind, summary.tags.len()), ("k", Kind::Object, 2));
    }

    #[test]
    fn any_flipped_byte_fails_the_read_and_the_flag_byte_is_the_only_free_one() {
        let entry = Entry::Object(Object { head: head(vec!["t".into()]), body: body(200_000) });
        let mut file = written("k", &entry);
        let len = file.metadata().unwrap().len();
        // Every byte of the header and a sample of the body.
        let positions = (0..encode("k", &entry).checked as u64).chain((len - 200_000..len).step_by(997));
        for at in positions {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, at).unwrap();
            file.write_all_at(&[byte[0] ^ 0x21], at).unwrap();
            let result = read(file.try_clone().unwrap(), "k", false);
            if at == FLAGS_AT {
                let Ok((Entry::Object(object), _)) = result else { panic!("flags byte: {result:?}") };
                assert!(object.head.purged.load(std::sync::atomic::Ordering::Relaxed));
            } else {
                assert!(result.is_err(), "byte {at} flipped and the read passed");
            }
            file.write_all_at(&byte, at).unwrap();
        }
        assert!(read(file.try_clone().unwrap(), "k", false).is_ok());
        assert!(matches!(read(file.try_clone().unwrap(), "other", false), Err(ReadError::OtherKey)));
        // Truncated anywhere: an error, not a panic.
        for cut in [0, 3, 39, 41, len / 2, len - 1] {
            file.set_len(cut).unwrap();
            assert!(read(file.try_clone().unwrap(), "k", false).is_err(), "cut at {cut}");
            file.set_len(0).unwrap();
            file.seek(SeekFrom::Start(0)).unwrap();
            encode("k", &entry).write_to(&mut file).unwrap();
        }
    }
}
