//! Streaming response bodies: byte ranges of a file or of generated content, framed
//! as one part or as `multipart/byteranges`, read 64 KiB at a time as the client
//! takes them (never the whole object in memory), optionally paced to a rate.

use std::{collections::VecDeque, io, ops::Range, time::Duration};

use bytes::{Bytes, BytesMut};
use cdn_node::listener::{Body, BoxError};
use futures_util::{StreamExt as _, stream};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use tokio::{
    io::{AsyncReadExt as _, AsyncSeekExt as _},
    time::Instant,
};

use crate::generate;

/// Largest chunk read and sent at once.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Where the bytes come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// An open file.
    File(tokio::fs::File),
    /// Generated content with this seed.
    Generated {
        /// The seed (`?v=`).
        seed: u64,
    },
}

/// One part of a body: `head` (a multipart part header, or empty) then `range`.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub(crate) head: Bytes,
    pub(crate) range: Range<u64>,
}

/// A body sending each part in order, then `tail`, at most `rate` bytes per second.
pub(crate) fn stream(source: Source, parts: Vec<Part>, tail: Bytes, rate: Option<u64>) -> Body {
    let state = State {
        source,
        parts: parts.into(),
        current: 0..0,
        tail,
        cursor: None,
        pacer: rate.map(|rate| Pacer { rate, start: None, sent: 0 }),
    };
    let chunks = stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    });
    StreamBody::new(chunks.map(|item| item.map(Frame::data).map_err(BoxError::from))).boxed_unsync()
}

struct State {
    source: Source,
    parts: VecDeque<Part>,
    /// What is left of the range being sent.
    current: Range<u64>,
    tail: Bytes,
    /// Where the file's position is, when known.
    cursor: Option<u64>,
    pacer: Option<Pacer>,
}

struct Pacer {
    rate: u64,
    start: Option<Instant>,
    sent: u64,
}

impl Pacer {
    /// Chunks of about a tenth of a second's worth.
    fn chunk(&self) -> usize {
        usize::try_from(self.rate / 10).unwrap_or(CHUNK).clamp(1, CHUNK)
    }

    /// Waits until `sent` bytes are due, then counts `next` more as sent.
    async fn wait(&mut self, next: usize) {
        let start = *self.start.get_or_insert_with(Instant::now);
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        tokio::time::sleep_until(start + due).await;
        self.sent += next as u64;
    }
}

impl State {
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.current.start < self.current.end {
                let remaining = self.current.end - self.current.start;
                let max = self.pacer.as_ref().map_or(CHUNK, Pacer::chunk);
                let want = usize::try_from(remaining).unwrap_or(max).min(max);
                if let Some(pacer) = &mut self.pacer {
                    pacer.wait(want).await;
                }
                return match self.read(self.current.start, want).await {
                    Ok(bytes) => {
                        self.current.start += bytes.len() as u64;
                        Some(Ok(bytes))
                    }
                    Err(error) => {
                        // Nothing more after an error.
                        self.current = 0..0;
                        self.parts.clear();
                        self.tail = Bytes::new();
                        Some(Err(error))
                    }
                };
            }
            if let Some(part) = self.parts.pop_front() {
                self.current = part.range;
                if !part.head.is_empty() {
                    return Some(Ok(part.head));
                }
                continue;
            }
            if !self.tail.is_empty() {
                return Some(Ok(std::mem::take(&mut self.tail)));
            }
            return None;
        }
    }

    async fn read(&mut self, at: u64, want: usize) -> io::Result<Bytes> {
        match &mut self.source {
            Source::Generated { seed } => {
                let mut buf = BytesMut::zeroed(want);
                generate::fill(&mut buf, at, *seed);
                Ok(buf.freeze())
            }
            Source::File(file) => {
                if self.cursor != Some(at) {
                    file.seek(io::SeekFrom::Start(at)).await?;
                }
                let mut buf = BytesMut::with_capacity(want);
                let n = file.take(want as u64).read_buf(&mut buf).await?;
                if n == 0 {
                    self.cursor = None;
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being sent"));
                }
                self.cursor = Some(at + n as u64);
                Ok(buf.freeze())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: Body) -> Result<Vec<Vec<u8>>, BoxError> {
        let mut body = body;
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                chunks.push(data.to_vec());
            }
        }
        Ok(chunks)
    }

    fn part(head: &str, range: Range<u64>) -> Part {
        Part { head: Bytes::from(head.to_owned()), range }
    }

    #[tokio::test]
    async fn streams_file_parts_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let parts = vec![part("", 0..150_000), part("[H]", 10..20), part("", 199_990..200_000)];
        let chunks = collect(stream(Source::File(file), parts, Bytes::from_static(b"[T]"), None)).await.unwrap();
        assert!(chunks.iter().all(|c| c.len() <= CHUNK && !c.is_empty()));
        let mut want = data[..150_000].to_vec();
        want.extend_from_slice(b"[H]");
        want.extend_from_slice(&data[10..20]);
        want.extend_from_slice(&data[199_990..]);
        want.extend_from_slice(b"[T]");
        assert_eq!(chunks.concat(), want);
    }

    #[tokio::test]
    async fn a_shrunk_file_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"short").unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let result = collect(stream(Source::File(file), vec![part("", 0..100)], Bytes::new(), None)).await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn generated_content_matches_byte_at() {
        let body = stream(Source::Generated { seed: 9 }, vec![part("", 5..300_005)], Bytes::new(), None);
        let chunks = collect(body).await.unwrap();
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks.concat(), generate::content(5..300_005, 9));
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_spreads_the_body_over_time() {
        let start = Instant::now();
        let body = stream(Source::Generated { seed: 0 }, vec![part("", 0..10_000)], Bytes::new(), Some(1000));
        let chunks = collect(body).await.unwrap();
        assert_eq!(chunks.len(), 100);
        assert!(chunks.iter().all(|c| c.len() == 100));
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(9900) && elapsed < Duration::from_millis(10_100), "{elapsed:?}");
    }
}
