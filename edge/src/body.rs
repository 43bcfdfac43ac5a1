//! Bodies that fill while they are read.
//!
//! A [`Growing`] body receives an origin response chunk by chunk; any number of
//! readers stream it concurrently, each from its own position, waiting (no polling)
//! for chunks that have not arrived. When the fill fails every reader gets the
//! error, so a client never receives a truncated body that looks complete.

use std::{
    ops::Range,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::watch;

use cdn_node::listener::BoxError;

#[derive(Debug, Default)]
struct State {
    chunks: Vec<Bytes>,
    len: u64,
    end: Option<Result<(), String>>,
}

/// A body being filled from the origin.
#[derive(Debug)]
pub(crate) struct Growing {
    state: Mutex<State>,
    progress: watch::Sender<u64>,
    /// The length announced by the origin, when it announced one.
    pub(crate) expected: Option<u64>,
}

impl Growing {
    pub(crate) fn new(expected: Option<u64>) -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), progress: watch::Sender::new(0), expected })
    }

    /// A body that has arrived whole: `bytes` (already stored).
    pub(crate) fn whole(bytes: Bytes) -> Arc<Self> {
        let growing = Self::new(Some(bytes.len() as u64));
        growing.push(bytes);
        growing.finish(Ok(()));
        growing
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a chunk and wakes the readers.
    pub(crate) fn push(&self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let mut state = self.lock();
        state.len += chunk.len() as u64;
        state.chunks.push(chunk);
        let len = state.len;
        drop(state);
        self.progress.send_replace(len);
    }

    /// Bytes received so far.
    pub(crate) fn len(&self) -> u64 {
        self.lock().len
    }

    /// Ends the body, successfully or not, and wakes the readers.
    pub(crate) fn finish(&self, result: Result<(), String>) {
        let mut state = self.lock();
        state.end = Some(result);
        let len = state.len;
        drop(state);
        self.progress.send_modify(|v| *v = len);
    }

    /// The whole body in one buffer of its own, once it finished successfully.
    ///
    /// Always a copy: a chunk from the connection shares (and would keep alive) the
    /// whole read buffer it was cut from, 8 KiB or more behind a 1 KiB body. One
    /// copy per fill is cheap; pinned buffers would multiply the cache's real size.
    /// Large bodies go into a sealed memory file, which cleartext connections send
    /// without copying ([`cdn_node::zerocopy`]).
    pub(crate) fn concat(&self) -> Option<Bytes> {
        let state = self.lock();
        if !matches!(state.end, Some(Ok(()))) {
            return None;
        }
        if let Some(sealed) = cdn_node::zerocopy::seal(&state.chunks) {
            return Some(sealed);
        }
        let mut buffer = BytesMut::with_capacity(usize::try_from(state.len).ok()?);
        for chunk in &state.chunks {
            buffer.extend_from_slice(chunk);
        }
        Some(buffer.freeze())
    }

    /// Streams `range` of the body (`None`: all of it) as it arrives.
    pub(crate) fn reader(
        self: &Arc<Self>,
        range: Option<Range<u64>>,
    ) -> impl Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
        let reader = Reader {
            growing: self.clone(),
            next_chunk: 0,
            chunk_start: 0,
            range: range.unwrap_or(0..u64::MAX),
            progress: self.progress.subscribe(),
            done: false,
        };
        futures_util::stream::unfold(reader, |mut reader| async move { reader.next().await.map(|item| (item, reader)) })
    }
}

struct Reader {
    growing: Arc<Growing>,
    next_chunk: usize,
    /// Offset in the body of `next_chunk`.
    chunk_start: u64,
    range: Range<u64>,
    progress: watch::Receiver<u64>,
    done: bool,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<Bytes, BoxError>> {
        if self.done {
            return None;
        }
        let item = self.next_inner().await;
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }

    async fn next_inner(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            if self.chunk_start >= self.range.end {
                return None;
            }
            {
                let state = self.growing.lock();
                if let Some(chunk) = state.chunks.get(self.next_chunk) {
                    let chunk = chunk.clone();
                    drop(state);
                    let start = self.chunk_start;
                    let end = start + chunk.len() as u64;
                    self.next_chunk += 1;
                    self.chunk_start = end;
                    let from = self.range.start.max(start);
                    let to = self.range.end.min(end);
                    if from < to {
                        return Some(Ok(chunk.slice((from - start) as usize..(to - start) as usize)));
                    }
                    continue;
                }
                match &state.end {
                    Some(Ok(())) => {
                        if self.range.end != u64::MAX && self.chunk_start < self.range.end {
                            return Some(Err("origin body shorter than announced".into()));
                        }
                        return None;
                    }
                    Some(Err(error)) => return Some(Err(error.clone().into())),
                    None => {}
                }
            }
            if self.progress.changed().await.is_err() {
                return Some(Err("fill abandoned".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn readers_follow_the_fill_and_see_errors() {
        let growing = Growing::new(Some(10));
        let all = growing.reader(None);
        let part = growing.reader(Some(3..7));
        let writer = growing.clone();
        tokio::spawn(async move {
            for chunk in [&b"abcd"[..], b"efgh", b"ij"] {
                tokio::task::yield_now().await;
                writer.push(Bytes::from_static(chunk));
            }
            writer.finish(Ok(()));
        });
        let all: Vec<_> = all.collect().await;
        let all: Vec<u8> = all.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        assert_eq!(all, b"abcdefghij");
        let part: Vec<u8> = part.collect::<Vec<_>>().await.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        assert_eq!(part, b"defg");
        assert_eq!(growing.concat().unwrap(), Bytes::from_static(b"abcdefghij"));

        let large: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let big = Growing::new(Some(large.len() as u64));
        for chunk in large.chunks(7000) {
            big.push(Bytes::copy_from_slice(chunk));
        }
        big.finish(Ok(()));
        let stored = big.concat().unwrap();
        assert_eq!(&stored[..], &large[..]);
        assert!(cdn_node::zerocopy::locate(&stored).is_some(), "a large body is sealed for zero-copy sends");

        let failing = Growing::new(None);
        let reader = failing.reader(None);
        failing.push(Bytes::from_static(b"ab"));
        failing.finish(Err("reset".into()));
        let items: Vec<_> = reader.collect().await;
        assert!(items[0].is_ok() && items[1].is_err());
        assert!(failing.concat().is_none());
    }
}
