//! Requests between the nodes of one cluster over HTTP (an edge fetching from a
//! shield edge): a token that proves the sender knows the cluster secret, so that
//! what only a member may ask (to be answered after a purge it names) cannot be
//! asked by a client.
//!
//! The token is `<node_id> <ms> <hex HMAC-SHA256(key, "cdn-peer\n" node_id "\n" ms)>`,
//! the key derived from the cluster secret (never the secret itself). It is valid for
//! [`MAX_SKEW`] either side of the receiver's clock. It is not bound to the request
//! (a member's token replayed by someone who saw it on the wire is good for that
//! long): between edges it travels inside the cluster's network or over TLS.

use std::time::Duration;

use ring::hmac;

use crate::Secret;

/// How far a token's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(120);

/// Signs and checks peer tokens with a key derived from the cluster secret.
#[derive(Clone)]
pub struct PeerKey(hmac::Key);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(<redacted>)")
    }
}

impl PeerKey {
    /// The key of the cluster with `secret`.
    pub fn new(secret: &Secret) -> Self {
        // A key of its own: a token never helps forge gossip, nor the reverse.
        let derive = hmac::Key::new(hmac::HMAC_SHA256, secret.bytes());
        let derived = hmac::sign(&derive, b"cdn peer token key v1");
        Self(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    fn tag(&self, node_id: &str, ms: u64) -> String {
        let mut message = Vec::with_capacity(node_id.len() + 32);
        message.extend_from_slice(b"cdn-peer\n");
        message.extend_from_slice(node_id.as_bytes());
        message.push(b'\n');
        message.extend_from_slice(ms.to_string().as_bytes());
        hmac::sign(&self.0, &message).as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A token for `node_id` at `now_ms`.
    pub fn sign(&self, node_id: &str, now_ms: u64) -> String {
        format!("{node_id} {now_ms} {}", self.tag(node_id, now_ms))
    }

    /// The node id a token names, when it is genuine and current at `now_ms`.
    pub fn verify<'a>(&self, token: &'a str, now_ms: u64) -> Option<&'a str> {
        let mut parts = token.split(' ');
        let (node_id, ms, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || node_id.is_empty() || tag.len() != 64 {
            return None;
        }
        let ms: u64 = ms.parse().ok()?;
        if ms.abs_diff(now_ms) > MAX_SKEW.as_millis() as u64 {
            return None;
        }
        let bytes: Vec<u8> =
            (0..32).map(|i| u8::from_str_radix(tag.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<_>>()?;
        let mut message = Vec::with_capacity(node_id.len() + 32);
        message.extend_from_slice(b"cdn-peer\n");
        message.extend_from_slice(node_id.as_bytes());
        message.push(b'\n');
        message.extend_from_slice(ms.to_string().as_bytes());
        hmac::verify(&self.0, &message, &bytes).ok().map(|()| node_id)
    }
}

/// Seals what only members may read (the private keys of certificates the control
/// plane issues, as they travel in gossip): AES-256-GCM under a key derived from the
/// cluster secret, a random nonce per message. Gossip itself is authenticated but
/// not encrypted; this keeps keys unreadable to anyone who sees its packets.
pub struct CertSeal(ring::aead::LessSafeKey);

impl std::fmt::Debug for CertSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertSeal(<redacted>)")
    }
}

impl CertSeal {
    /// The seal of the cluster with `secret`.
    pub fn new(secret: &Secret) -> Self {
        let derive = hmac::Key::new(hmac::HMAC_SHA256, secret.bytes());
        let derived = hmac::sign(&derive, b"cdn certificate seal key v1");
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, derived.as_ref()).expect("32 bytes");
        Self(ring::aead::LessSafeKey::new(key))
    }

    /// `plain` sealed, as hex (nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, plain: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).expect("the system RNG");
        let mut data = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut data,
            )
            .expect("sealing cannot fail below 64 GiB");
        nonce.iter().chain(&data).map(|b| format!("{b:02x}")).collect()
    }

    /// What [`seal`](Self::seal) sealed; `None` when it was not sealed by this
    /// cluster's key (or was changed).
    pub fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        if !sealed.len().is_multiple_of(2) || sealed.len() < 2 * (12 + 16) {
            return None;
        }
        let bytes: Vec<u8> = (0..sealed.len() / 2)
            .map(|i| u8::from_str_radix(sealed.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        let (nonce, data) = bytes.split_at(12);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut data = data.to_vec();
        let plain = self.0.open_in_place(nonce, ring::aead::Aad::empty(), &mut data).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_in_their_cluster() {
        let seal = CertSeal::new(&Secret::new("a cluster secret of 32 bytes...."));
        let sealed = seal.seal(b"-----BEGIN PRIVATE KEY-----");
        assert!(!sealed.contains("PRIVATE"));
        assert_ne!(sealed, seal.seal(b"-----BEGIN PRIVATE KEY-----"), "a nonce of its own");
        assert_eq!(seal.open(&sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        let other = CertSeal::new(&Secret::new("another cluster secret of 32 b.."));
        assert!(other.open(&sealed).is_none());
        let mut changed = sealed.clone();
        changed.replace_range(40..41, if &sealed[40..41] == "0" { "1" } else { "0" });
        assert!(seal.open(&changed).is_none());
        for junk in ["", "zz", "00"] {
            assert!(seal.open(junk).is_none());
        }
    }

    #[test]
    fn tokens_verify_only_with_the_secret_and_in_time() {
        let key = PeerKey::new(&Secret::new("a cluster secret of 32 bytes...."));
        let token = key.sign("edge-1", 1_000_000);
        assert_eq!(key.verify(&token, 1_000_000), Some("edge-1"));
        assert_eq!(key.verify(&token, 1_000_000 + 119_000), Some("edge-1"));
        assert_eq!(key.verify(&token, 1_000_000 + 121_000), None, "too old");
        let other = PeerKey::new(&Secret::new("another cluster secret of 32 b.."));
        assert_eq!(other.verify(&token, 1_000_000), None, "another cluster");
        let forged = token.replace("edge-1", "edge-2");
        assert_eq!(key.verify(&forged, 1_000_000), None, "another node");
        for junk in ["", "edge-1", "edge-1 1000000", "edge-1 x y", "edge-1 1000000 zz", &format!("{token} extra")] {
            assert_eq!(key.verify(junk, 1_000_000), None, "{junk:?}");
        }
        assert!(!format!("{key:?}").contains("secret"));
    }
}
