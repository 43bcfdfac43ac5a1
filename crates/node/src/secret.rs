//! Secrets and the names nodes go by.

/// Whether `given` equals `expected`, in time that depends only on `expected`'s
/// length (tokens are compared with this, so timing tells an attacker nothing).
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (i, b) in expected.iter().enumerate() {
        difference |= usize::from(b ^ given.get(i).copied().unwrap_or(0));
    }
    difference == 0
}

/// The problem with a node id, if any: node ids are non-empty ASCII letters,
/// digits, `-`, `_` and `.` (they appear in headers, gossip keys and metrics).
pub fn node_id_problem(node_id: &str) -> Option<String> {
    (node_id.is_empty() || !node_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        .then(|| "node_id: must be non-empty letters, digits, '-', '_' or '.'".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-tokem", b"secret-token"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token-and-more", b"secret-token"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn node_ids() {
        assert!(node_id_problem("us-east_1.a").is_none());
        assert!(node_id_problem("").is_some());
        assert!(node_id_problem("a b").is_some());
        assert!(node_id_problem("é").is_some());
    }
}
