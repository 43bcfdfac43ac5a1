//! Zero-copy sends of cached bodies: sealed memory files and `sendfile`.
//!
//! A large body the edge stores is written once into a memory file (`memfd`),
//! sealed against any further change, and mapped read-only: the cache holds it as
//! ordinary [`Bytes`] ([`seal`]), so every protocol reads it as before. When such a
//! body goes out on a cleartext TCP connection (HTTP/1.1 or h2c), the listener
//! recognises its memory ([`locate`]) and hands the socket the file's pages with
//! `sendfile` instead of copying them in with `writev` — what nginx does with its
//! cache files. Over TLS and QUIC the bytes must be encrypted in user space, so those
//! paths copy as before.
//!
//! Each sealed body holds one file descriptor and one mapping, so their number is
//! capped (a quarter of the open-file limit, a quarter of `vm.max_map_count`); past
//! the cap, and for bodies under [`MIN_LEN`], [`seal`] returns `None` and the caller
//! keeps its heap copy.
//!
//! The edge's disk tier uses the same path for its cache files ([`map_file`],
//! [`backed_by_file`]): a body read back from disk is mapped from its file, or
//! copied with the file remembered, and cleartext sends take its pages from there.
//!
//! This module holds the workspace's only `unsafe` code: mapping the files. A memory
//! file is sound to map because it is sealed (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW |
//! F_SEAL_SEAL`) before it is mapped: the kernel then refuses every write to it and
//! every change of its size, from this process or any other, so the mapped bytes can
//! never change or vanish under a `&[u8]` (memmap2's safety condition). A cache file
//! of the disk tier cannot be sealed; it is sound to map because the disk tier never
//! writes into a published file's body or truncates it (see [`map_file`]).

#![allow(unsafe_code)]

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, IoSlice, Write as _},
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use rustix::{
    fs::{MemfdFlags, SealFlags},
    net::{SendAncillaryBuffer, SendFlags},
};
use tokio::{io::Interest, net::TcpStream};

/// Bodies shorter than this stay on the heap: one file and one mapping each would
/// cost more than the copy they save.
pub const MIN_LEN: usize = 128 * 1024;

/// Writes shorter than this go out by `writev` even from a sealed body: two system
/// calls (head, then pages) cost more than copying a few pages. HTTP/1.1 bodies go
/// out in pieces of up to 256 KiB; HTTP/2 DATA frames (16 KiB) stay below.
pub const MIN_SEND: usize = 64 * 1024;

/// Sealed bodies alive now.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Every live body by start address: its length, the file holding the same bytes,
/// where in that file they start, and whether the body is a mapping of a cache file
/// (page cache, not process memory).
type Registry = RwLock<BTreeMap<usize, (usize, Arc<File>, u64, bool)>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(RwLock::default)
}

/// How many sealed bodies may be alive at once.
fn cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let files = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1024);
        let maps = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65_530);
        usize::try_from(files.min(maps) / 4).unwrap_or(usize::MAX)
    })
}

/// Sealed bodies alive now.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The body made of `chunks` in a sealed memory file, or `None` when it is too
/// small, the cap is reached or the kernel refuses (the caller then keeps a heap
/// copy).
pub fn seal(chunks: &[Bytes]) -> Option<Bytes> {
    let len = chunks.iter().map(Bytes::len).sum::<usize>();
    if len < MIN_LEN {
        return None;
    }
    if LIVE.fetch_add(1, Ordering::Relaxed) >= cap() {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    match sealed(chunks, len) {
        Ok(map) => Some(Bytes::from_owner(Registered(map))),
        Err(error) => {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%error, len, "memory file refused; body kept on the heap");
            None
        }
    }
}

/// The sealed file holding `slice` and the slice's offset in it, when `slice` lies
/// in a sealed body's memory.
pub fn locate(slice: &[u8]) -> Option<(Arc<File>, u64)> {
    let start = slice.as_ptr() as usize;
    let map = registry().read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (&base, (len, file, file_offset, _)) = map.range(..=start).next_back()?;
    let offset = start - base;
    (offset + slice.len() <= *len).then(|| (file.clone(), file_offset + offset as u64))
}

/// `body` (read from `file` at `offset` and checked by the caller) as [`Bytes`]
/// that cleartext sends take from the file with `sendfile` instead of copying:
/// the edge's disk tier, whose cache files are written once and never changed in
/// place (a replaced or deleted file keeps its bytes for the descriptor held here).
/// `None` when the body is too small or the cap of live bodies is reached (the
/// caller then keeps `body` as plain bytes).
pub fn backed_by_file(body: Vec<u8>, file: Arc<File>, offset: u64) -> Result<Bytes, Vec<u8>> {
    if body.len() < MIN_LEN {
        return Err(body);
    }
    if LIVE.fetch_add(1, Ordering::Relaxed) >= cap() {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        return Err(body);
    }
    let body = body.into_boxed_slice();
    registry()
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(body.as_ptr() as usize, (body.len(), file, offset, false));
    Ok(Bytes::from_owner(Registered(body)))
}

/// `len` bytes of `file` from `offset` (a multiple of the page size), mapped
/// read-only: the edge's disk tier serves a checked cache file this way without
/// copying it (cleartext sends go out with `sendfile` from `file`; TLS and QUIC
/// read the pages). `None` when the cap of live bodies is reached or the kernel
/// refuses (the caller then reads the bytes instead).
///
/// The caller guarantees what memmap2 asks of a file mapping: `file` is a cache
/// file that nobody writes or truncates in that range while it is mapped. The
/// disk tier writes a cache file whole under another name and renames it into
/// place; it never writes into a published file except one flag byte in its
/// header, outside the body (a replaced or deleted file keeps its pages for this
/// mapping). A process that truncated a cache file under a running edge would make
/// reads of the lost pages fault (SIGBUS), as with any mapped cache (Varnish's file
/// storage); an I/O error while a page is read back in would too.
pub fn map_file(file: Arc<File>, offset: u64, len: usize) -> Option<Bytes> {
    if len < MIN_LEN || !offset.is_multiple_of(4096) {
        return None;
    }
    if LIVE.fetch_add(1, Ordering::Relaxed) >= cap() {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    // SAFETY: see above — the range is never written or truncated while mapped.
    let map = match unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(&*file) } {
        Ok(map) => map,
        Err(error) => {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%error, len, "cache file not mapped; read instead");
            return None;
        }
    };
    registry()
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(map.as_ptr() as usize, (len, file, offset, true));
    Some(Bytes::from_owner(Registered(map)))
}

/// Whether `body` is a mapping of a cache file ([`map_file`]): its bytes live in
/// the page cache, not in this process's memory.
pub fn is_mapped_file(body: &[u8]) -> bool {
    let start = body.as_ptr() as usize;
    let map = registry().read().unwrap_or_else(std::sync::PoisonError::into_inner);
    map.range(..=start).next_back().is_some_and(|(&base, &(len, _, _, mapped))| mapped && start - base < len.max(1))
}

/// A live body in the registry (a mapping, or memory whose bytes are also in a
/// file): taken out of it, and out of the count, when the last [`Bytes`] goes.
struct Registered<T: AsRef<[u8]>>(T);

impl<T: AsRef<[u8]>> AsRef<[u8]> for Registered<T> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

impl<T> Drop for Registered<T>
where
    T: AsRef<[u8]>,
{
    fn drop(&mut self) {
        let start = self.0.as_ref().as_ptr() as usize;
        registry().write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&start);
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes sent with `sendfile` from sealed bodies, in this process (every listener),
/// to register in a metrics registry.
pub fn sent_counter() -> prometheus::IntCounter {
    sent_bytes().clone()
}

fn sent_bytes() -> &'static prometheus::IntCounter {
    static SENT: OnceLock<prometheus::IntCounter> = OnceLock::new();
    SENT.get_or_init(|| {
        prometheus::IntCounter::new(
            "cdn_zero_copy_bytes_total",
            "Response body bytes handed to client sockets with sendfile from the cache's sealed memory files, without a copy",
        )
        .expect("valid metric")
    })
}

/// A connection's socket, which may send sealed bodies without copying them.
pub trait Sink {
    /// Writes `bufs` as `poll_write_vectored` would, sending a sealed body's pages
    /// with `sendfile`; `None` when this socket cannot (TLS encrypts in user space)
    /// or `bufs` hold no large piece of a sealed body.
    fn poll_write_zero_copy(
        &mut self,
        _cx: &mut Context<'_>,
        _bufs: &[IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

impl<S> Sink for tokio_rustls::server::TlsStream<S> {}

impl Sink for TcpStream {
    fn poll_write_zero_copy(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Option<Poll<io::Result<usize>>> {
        let (index, file, offset) = bufs.iter().enumerate().find_map(|(index, buf)| {
            let (file, offset) = if buf.len() >= MIN_SEND { locate(buf)? } else { return None };
            Some((index, file, offset))
        })?;
        let heads = &bufs[..index];
        let head_len: usize = heads.iter().map(|buf| buf.len()).sum();
        let count = bufs[index].len();
        let stream = &*self;
        let send_file = || {
            let mut offset = offset;
            Ok(rustix::fs::sendfile(stream, &*file, Some(&mut offset), count)?)
        };
        if head_len == 0 {
            let sent = poll_io(stream, cx, send_file);
            if let Poll::Ready(Ok(n)) = sent {
                sent_bytes().inc_by(n as u64);
            }
            return Some(sent);
        }
        // The head (status line and headers, a chunk size or a frame header) first,
        // held back (MSG_MORE) to leave in one segment with the pages behind it.
        let written = match poll_io(stream, cx, || {
            let flags = SendFlags::MORE | SendFlags::NOSIGNAL;
            Ok(rustix::net::sendmsg(stream, heads, &mut SendAncillaryBuffer::default(), flags)?)
        }) {
            Poll::Ready(Ok(written)) if written == head_len => written,
            other => return Some(other),
        };
        // Bytes went out: report them whatever the pages do now.
        Some(Poll::Ready(match stream.try_io(Interest::WRITABLE, send_file) {
            Ok(n) => {
                sent_bytes().inc_by(n as u64);
                Ok(written + n)
            }
            Err(_) => Ok(written),
        }))
    }
}

/// Runs the non-blocking `f` on `stream` once it is writable, until it does not
/// report `WouldBlock`.
fn poll_io(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    mut f: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_io(Interest::WRITABLE, &mut f) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            result => return Poll::Ready(result),
        }
    }
}

/// `chunks` in a new memory file, sealed and mapped read-only (registered).
fn sealed(chunks: &[Bytes], len: usize) -> io::Result<memmap2::Mmap> {
    let fd = rustix::fs::memfd_create("cdn-body", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut file = File::from(fd);
    write_all(&mut file, chunks)?;
    if file.metadata()?.len() != len as u64 {
        return Err(io::Error::other("short write to a memory file"));
    }
    rustix::fs::fcntl_add_seals(&file, SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    // SAFETY: the file is sealed (above): no process can write to it or change its
    // size any more, so the mapping stays valid and unchanged for its lifetime.
    let map = unsafe { memmap2::MmapOptions::new().len(len).populate().map(&file)? };
    let file = Arc::new(file);
    registry()
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(map.as_ptr() as usize, (len, file, 0, false));
    Ok(map)
}

/// Writes every chunk, in as few `writev` calls as the kernel allows.
fn write_all(file: &mut File, chunks: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().filter(|c| !c.is_empty()).map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let batch = rest.len().min(1024);
        let written = file.write_vectored(&rest[..batch])?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt as _;

    use super::*;

    fn chunks(len: usize) -> (Vec<Bytes>, Vec<u8>) {
        let whole: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let chunks = whole.chunks(10_000).map(Bytes::copy_from_slice).collect();
        (chunks, whole)
    }

    #[test]
    fn a_sealed_body_reads_back_and_is_found_by_its_memory() {
        let (parts, whole) = chunks(MIN_LEN * 3 + 17);
        let body = seal(&parts).expect("sealed");
        assert_eq!(&body[..], &whole[..]);

        let piece = body.slice(5000..MIN_LEN * 2);
        let (file, offset) = locate(&piece).expect("located");
        assert_eq!(offset, 5000);
        let mut back = vec![0; piece.len()];
        file.read_exact_at(&mut back, offset).unwrap();
        assert_eq!(back, &piece[..]);

        // Sealed: neither this process nor anyone else can change it.
        assert!((&*file).write_all(b"x").is_err());
        assert!(file.set_len(1).is_err());

        // Heap memory, and a range running past the mapping, are not sealed bodies.
        assert!(locate(&whole).is_none());
        let registered = body.as_ptr() as usize;
        drop((body, piece));
        assert!(!registry().read().unwrap().contains_key(&registered));
    }

    #[test]
    fn a_body_backed_by_a_file_is_found_at_its_offset_in_it() {
        let (parts, whole) = chunks(MIN_LEN + 4096);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0; 4096]).unwrap();
        write_all(&mut file, &parts).unwrap();
        let body = backed_by_file(whole.clone(), Arc::new(file), 4096).expect("backed");
        assert_eq!(&body[..], &whole[..]);
        let piece = body.slice(100..MIN_LEN);
        let (file, offset) = locate(&piece).expect("located");
        assert_eq!(offset, 4196);
        let mut back = vec![0; piece.len()];
        file.read_exact_at(&mut back, offset).unwrap();
        assert_eq!(back, &piece[..]);
        let small = backed_by_file(vec![1; 10], file, 0).unwrap_err();
        assert_eq!(small, vec![1; 10]);
    }

    #[test]
    fn a_mapped_cache_file_is_sent_from_its_offset() {
        let (parts, whole) = chunks(MIN_LEN + 5000);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[9; 4096]).unwrap();
        write_all(&mut file, &parts).unwrap();
        let file = Arc::new(file);
        assert!(map_file(file.clone(), 100, whole.len()).is_none(), "offset not page-aligned");
        let body = map_file(file, 4096, whole.len()).expect("mapped");
        assert_eq!(&body[..], &whole[..]);
        assert!(is_mapped_file(&body) && is_mapped_file(&body.slice(10..20)));
        let (_, offset) = locate(&body.slice(4096..MIN_LEN)).expect("located");
        assert_eq!(offset, 8192);
        assert!(!is_mapped_file(&whole));
    }

    #[test]
    fn small_bodies_stay_on_the_heap() {
        let (parts, _) = chunks(MIN_LEN - 1);
        assert!(seal(&parts).is_none());
        assert!(seal(&[]).is_none());
    }
}
