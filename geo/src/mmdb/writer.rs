//! A minimal MaxMind DB writer for tests: IPv4 databases with City or Country
//! records, enough for the reader (maxminddb) to load and look up. Not part of the
//! library: the geo crate's unit tests and the root package's `tests/geo.rs`
//! include this file.
#![allow(dead_code)]

use std::net::Ipv4Addr;

/// A value of the MaxMind DB data section.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// UTF-8 string.
    Str(String),
    /// IEEE double.
    F64(f64),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Map with string keys.
    Map(Vec<(String, Self)>),
    /// Array.
    Array(Vec<Self>),
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// A GeoIP2 City record with coordinates and a country.
pub(crate) fn city(lat: f64, lon: f64, country: &str) -> Value {
    map(vec![
        ("country", map(vec![("iso_code", Value::Str(country.into()))])),
        ("location", map(vec![("latitude", Value::F64(lat)), ("longitude", Value::F64(lon))])),
    ])
}

/// A GeoIP2 Country record (no coordinates).
pub(crate) fn country(iso_code: &str) -> Value {
    map(vec![("country", map(vec![("iso_code", Value::Str(iso_code.into()))]))])
}

fn control(out: &mut Vec<u8>, type_num: u8, size: usize) {
    let (size_bits, extra): (u8, Vec<u8>) = if size < 29 {
        (size as u8, vec![])
    } else if size < 285 {
        (29, vec![(size - 29) as u8])
    } else if size < 65_821 {
        let s = size - 285;
        (30, vec![(s >> 8) as u8, s as u8])
    } else {
        let s = size - 65_821;
        (31, vec![(s >> 16) as u8, (s >> 8) as u8, s as u8])
    };
    if type_num <= 7 {
        out.push((type_num << 5) | size_bits);
    } else {
        out.push(size_bits);
        out.push(type_num - 7);
    }
    out.extend(extra);
}

fn uint(out: &mut Vec<u8>, type_num: u8, value: u64) {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    control(out, type_num, bytes.len() - first);
    out.extend_from_slice(&bytes[first..]);
}

fn encode(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Str(s) => {
            control(out, 2, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        Value::F64(f) => {
            control(out, 3, 8);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::U16(v) => uint(out, 5, u64::from(*v)),
        Value::U32(v) => uint(out, 6, u64::from(*v)),
        Value::U64(v) => uint(out, 9, *v),
        Value::Map(pairs) => {
            control(out, 7, pairs.len());
            for (key, value) in pairs {
                encode(out, &Value::Str(key.clone()));
                encode(out, value);
            }
        }
        Value::Array(items) => {
            control(out, 11, items.len());
            for item in items {
                encode(out, item);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Empty,
    Node(usize),
    Data(usize),
}

/// Writes an IPv4 database (record size 32) holding `entries` (network, prefix
/// length, record); more specific networks win over less specific ones.
pub(crate) fn write_v4(database_type: &str, entries: &[(Ipv4Addr, u8, Value)]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut offsets = Vec::new();
    for (_, _, value) in entries {
        offsets.push(data.len());
        encode(&mut data, value);
    }
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries[i].1);
    let mut nodes: Vec<[Slot; 2]> = vec![[Slot::Empty; 2]];
    for i in order {
        let (net, prefix, _) = &entries[i];
        let bits = u32::from(*net);
        let prefix = usize::from((*prefix).clamp(1, 32));
        let mut node = 0;
        for depth in 0..prefix {
            let bit = ((bits >> (31 - depth)) & 1) as usize;
            if depth + 1 == prefix {
                nodes[node][bit] = Slot::Data(offsets[i]);
                break;
            }
            node = match nodes[node][bit] {
                Slot::Node(next) => next,
                inherited => {
                    // Split an empty or less specific slot into a node of two halves.
                    nodes.push([inherited; 2]);
                    let next = nodes.len() - 1;
                    nodes[node][bit] = Slot::Node(next);
                    next
                }
            };
        }
    }
    let node_count = nodes.len();
    let mut out = Vec::new();
    for node in &nodes {
        for slot in node {
            let record = match *slot {
                Slot::Empty => node_count,
                Slot::Node(next) => next,
                Slot::Data(offset) => node_count + 16 + offset,
            };
            out.extend_from_slice(&(record as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    let metadata = map(vec![
        ("binary_format_major_version", Value::U16(2)),
        ("binary_format_minor_version", Value::U16(0)),
        ("build_epoch", Value::U64(1_700_000_000)),
        ("database_type", Value::Str(database_type.into())),
        ("description", map(vec![("en", Value::Str("cdn test database".into()))])),
        ("ip_version", Value::U16(4)),
        ("languages", Value::Array(vec![Value::Str("en".into())])),
        ("node_count", Value::U32(node_count as u32)),
        ("record_size", Value::U16(32)),
    ]);
    encode(&mut out, &metadata);
    out
}
