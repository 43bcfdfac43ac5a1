//! Generated objects: `/_gen/<size>[?v=<seed>][&rate=<bytes per second>]`.
//!
//! With `generate = true` the origin serves objects of any size up to [`MAX_SIZE`]
//! without a file behind them, for tests and benchmarks. Byte `i` of the object with
//! seed `v` is [`byte_at`]`(i, v)`, so a client can check any range it receives;
//! changing `v` simulates "the object changed" (new ETag and Last-Modified). Bytes are
//! computed as they are sent, 64 KiB at a time; `rate` trickles the body.

use std::{
    ops::Range,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Largest generated object: 64 GiB.
pub const MAX_SIZE: u64 = 64 * 1024 * 1024 * 1024;

/// Last-Modified of seed 0 (2020-01-01T00:00:00Z); seed `v` adds `v mod 2^32` seconds.
const EPOCH_SECS: u64 = 1_577_836_800;

/// One 64-bit word of content: splitmix64's finalizer over the word index and seed.
fn word(index: u64, seed: u64) -> u64 {
    let mut z = index.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ 0x5DEE_CE66_D1CE_4E5B;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Byte `i` of every generated object with seed `seed` (independent of its size).
pub fn byte_at(i: u64, seed: u64) -> u8 {
    word(i / 8, seed).to_le_bytes()[(i % 8) as usize]
}

/// Bytes `range` of generated content with `seed` (allocates the whole range: for tests).
pub fn content(range: Range<u64>, seed: u64) -> Vec<u8> {
    let len = usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(usize::MAX);
    let mut buf = vec![0; len];
    fill(&mut buf, range.start, seed);
    buf
}

/// Fills `buf` with the content starting at offset `start`.
pub(crate) fn fill(buf: &mut [u8], start: u64, seed: u64) {
    let mut i = start;
    let mut bytes = word(i / 8, seed).to_le_bytes();
    for b in buf {
        if i.is_multiple_of(8) {
            bytes = word(i / 8, seed).to_le_bytes();
        }
        *b = bytes[(i % 8) as usize];
        i = i.wrapping_add(1);
    }
}

/// The strong ETag of a generated object, quotes included: `"gen-<size>-<seed>"`.
pub fn etag(size: u64, seed: u64) -> String {
    format!("\"gen-{size}-{seed}\"")
}

/// The Last-Modified of a generated object: fixed per seed, 2020-01-01 plus
/// `seed mod 2^32` seconds.
pub fn last_modified(seed: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(EPOCH_SECS + (seed & 0xFFFF_FFFF))
}

/// A parsed `/_gen/...` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Generated {
    pub(crate) size: u64,
    pub(crate) seed: u64,
    /// Bytes per second, when the body should trickle.
    pub(crate) rate: Option<u64>,
}

/// Why a `/_gen/...` request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// Not a size: 404.
    NotFound,
    /// A bad parameter or a size over the cap: 400 with this reason.
    BadRequest(String),
}

/// Parses the size segment (`1000`, `10MiB`, `1.5GB`) and the query.
pub(crate) fn parse(size: &str, query: Option<&str>) -> Result<Generated, Invalid> {
    let size = parse_size(size).ok_or(Invalid::NotFound)?;
    if size > MAX_SIZE {
        return Err(Invalid::BadRequest(format!("generated objects are at most {MAX_SIZE} bytes")));
    }
    let mut generated = Generated { size, seed: 0, rate: None };
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number =
            || value.parse::<u64>().map_err(|_| Invalid::BadRequest(format!("{key}: {value:?} is not a number")));
        match key {
            "v" => generated.seed = number()?,
            "rate" => match number()? {
                0 => return Err(Invalid::BadRequest("rate: must be at least 1 byte per second".into())),
                rate => generated.rate = Some(rate),
            },
            _ => {} // other parameters (cache busters) are ignored
        }
    }
    Ok(generated)
}

fn parse_size(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 32 || !text.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    text.parse::<bytesize::ByteSize>().ok().map(|size| size.as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_byte_at() {
        for seed in [0, 1, u64::MAX] {
            let all = content(0..1000, seed);
            assert_eq!(all.len(), 1000);
            for (i, b) in all.iter().enumerate() {
                assert_eq!(*b, byte_at(i as u64, seed));
            }
            // Any window, at any alignment, agrees with the whole.
            for start in [0, 1, 7, 8, 9, 500, 999] {
                for end in [start, start + 1, start + 13, 1000].map(|end| end.min(1000)) {
                    assert_eq!(content(start..end, seed), all[start as usize..end as usize]);
                }
            }
        }
        let (start, end) = (10, 5);
        assert!(content(start..end, 0).is_empty());
        // Far offsets work and do not overflow.
        let _ = content(MAX_SIZE - 3..MAX_SIZE, 3);
        let _ = content(u64::MAX - 3..u64::MAX, 3);
    }

    #[test]
    fn content_looks_random_and_depends_on_the_seed() {
        let a = content(0..4096, 0);
        let b = content(0..4096, 1);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 64, "seeds 0 and 1 share {same} of 4096 bytes");
        let mut counts = [0u32; 256];
        for b in &a {
            counts[*b as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0 && c < 50), "{counts:?}");
        // Not periodic at block sizes a range bug would hide behind.
        for period in [8, 64, 4096] {
            assert_ne!(content(0..64, 0), content(period..period + 64, 0));
        }
    }

    #[test]
    fn parses_sizes_and_query() {
        let ok = |size, query| parse(size, query).unwrap();
        assert_eq!(ok("1000", None), Generated { size: 1000, seed: 0, rate: None });
        assert_eq!(ok("0", None).size, 0);
        assert_eq!(ok("10MiB", None).size, 10 * 1024 * 1024);
        assert_eq!(ok("1kB", None).size, 1000);
        assert_eq!(ok("64GiB", None).size, MAX_SIZE);
        assert_eq!(ok("5", Some("v=7&rate=100&x=y&flag")), Generated { size: 5, seed: 7, rate: Some(100) });
        assert_eq!(ok("5", Some("")).seed, 0);
        for bad in ["", "abc", "-1", "MiB", "10 parsecs", "１０"] {
            assert_eq!(parse(bad, None), Err(Invalid::NotFound), "{bad}");
        }
        for (size, query) in [
            ("65GiB", None),
            ("99999999999999999999", None),
            ("1", Some("v=x")),
            ("1", Some("rate=0")),
            ("1", Some("v=-1")),
        ] {
            assert!(
                matches!(parse(size, query), Err(Invalid::BadRequest(_)) | Err(Invalid::NotFound)),
                "{size} {query:?}"
            );
        }
        assert!(matches!(parse("65GiB", None), Err(Invalid::BadRequest(_))));
        assert!(matches!(parse("1", Some("rate=0")), Err(Invalid::BadRequest(_))));
    }

    #[test]
    fn validators_follow_the_seed() {
        assert_eq!(etag(1000, 0), "\"gen-1000-0\"");
        assert_ne!(last_modified(0), last_modified(1));
        assert_eq!(httpdate::fmt_http_date(last_modified(0)), "Wed, 01 Jan 2020 00:00:00 GMT");
        let _ = httpdate::fmt_http_date(last_modified(u64::MAX));
    }
}
