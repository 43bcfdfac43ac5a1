use std::net::Ipv4Addr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const OTHER: &[u8] = b"fedcba9876543210fedcba9876543210";
const NOW: u64 = 1_800_000_000;

fn verifier_with(config: SigningConfig) -> (Verifier, Registry) {
    let registry = Registry::new();
    (Verifier::new(&config, &registry).unwrap(), registry)
}

fn verifier() -> Verifier {
    let keys = vec![SigningKey::hs256("k1", SECRET).unwrap(), SigningKey::hs256("k2", OTHER).unwrap()];
    verifier_with(SigningConfig { keys, ..SigningConfig::default() }).0
}

fn paid(keys: &[&str]) -> Signed {
    Signed { path_prefix: "/paid/".into(), keys: keys.iter().map(|k| k.to_string()).collect() }
}

/// An HS256 token made by the crate, `kid` in its header.
fn token(kid: &str, secret: &[u8], claims: &Value) -> String {
    let header = Header { kid: Some(kid.into()), ..Header::new(Algorithm::HS256) };
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// A token made by hand: any header, HMAC-SHA256 over it.
fn raw_token(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, input.as_bytes())))
}

fn fresh() -> Value {
    json!({"exp": NOW + 60})
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Checks a request for `target` (Host `cdn.test`, plain HTTP, from 192.0.2.7) at
/// `NOW`: the URI left for the cache and the origin, or the reason.
fn check_with(v: &Verifier, signed: &Signed, target: &str, now: SystemTime) -> Result<String, &'static str> {
    let mut request = Request::get(target).header("host", "cdn.test").body(()).unwrap();
    v.check(Some(signed), &mut request, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), false, now, |_| false)
        .map(|()| request.uri().to_string())
        .map_err(|rejected| rejected.0)
}

fn check(v: &Verifier, target: &str) -> Result<String, &'static str> {
    check_with(v, &paid(&["k1", "k2"]), target, at(NOW))
}

fn with_token(path: &str, token: &str) -> String {
    format!("{path}?{PARAMETER}={token}")
}

#[test]
fn a_valid_package_is_taken_out_of_the_uri() {
    let v = verifier();
    let t = token("k1", SECRET, &fresh());
    assert_eq!(check(&v, &with_token("/paid/a.mp4", &t)), Ok("/paid/a.mp4".into()));
    // Other parameters stay, in their order.
    assert_eq!(check(&v, &format!("/paid/a.mp4?x=1&{PARAMETER}={t}&y=2")), Ok("/paid/a.mp4?x=1&y=2".into()));
    // The second key of the rotation works too.
    assert_eq!(check(&v, &with_token("/paid/a.mp4", &token("k2", OTHER, &fresh()))), Ok("/paid/a.mp4".into()));
    // Absolute-form (and HTTP/2's :authority) keeps its authority.
    let mut request = Request::get(format!("http://cdn.test/paid/a?{PARAMETER}={t}")).body(()).unwrap();
    v.check(Some(&paid(&["k1"])), &mut request, Ipv4Addr::LOCALHOST.into(), false, at(NOW), |_| false).unwrap();
    assert_eq!(request.uri().to_string(), "http://cdn.test/paid/a");
    // Paths outside the prefix, and sites without `signed`, are not checked at all.
    assert_eq!(check(&v, "/free/a.mp4?x=1"), Ok("/free/a.mp4?x=1".into()));
    let mut request = Request::get("/paid/a").body(()).unwrap();
    assert!(v.check(None, &mut request, Ipv4Addr::LOCALHOST.into(), false, at(NOW), |_| false).is_ok());
    // Nor are other edges of the cluster.
    let mut request = Request::get("/paid/a").body(()).unwrap();
    assert!(v.check(Some(&paid(&["k1"])), &mut request, Ipv4Addr::LOCALHOST.into(), false, at(NOW), |_| true).is_ok());
}

#[test]
fn the_package_and_the_key() {
    let v = verifier();
    assert_eq!(check(&v, "/paid/a"), Err("missing"));
    assert_eq!(check(&v, "/paid/a?x=1"), Err("missing"));
    for garbage in ["abc", "a.b", "a.b.c", "a.b.c.d", "%zz", "", "W10.e30.e30"] {
        assert_eq!(check(&v, &with_token("/paid/a", garbage)), Err("malformed"), "{garbage:?}");
    }
    let t = token("k1", SECRET, &fresh());
    assert_eq!(check(&v, &format!("/paid/a?{PARAMETER}={t}&{PARAMETER}={t}")), Err("malformed"), "two packages");
    assert_eq!(check(&v, &format!("/paid/a?{PARAMETER}")), Err("malformed"));
    // A token longer than any real one.
    assert_eq!(check(&v, &with_token("/paid/a", &"a".repeat(MAX_PACKAGE + 1))), Err("malformed"));
    // A header of `{}`; no kid; an unknown kid; a kid this edge has but the site
    // does not accept.
    assert_eq!(check(&v, &with_token("/paid/a", "e30.e30.e30")), Err("unknown_key"));
    let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &fresh(), &EncodingKey::from_secret(SECRET));
    assert_eq!(check(&v, &with_token("/paid/a", &no_kid.unwrap())), Err("unknown_key"));
    assert_eq!(check(&v, &with_token("/paid/a", &token("k9", SECRET, &fresh()))), Err("unknown_key"));
    let only_k2 = paid(&["k2"]);
    assert_eq!(check_with(&v, &only_k2, &with_token("/paid/a", &t), at(NOW)), Err("unknown_key"));
    // The right kid with the wrong secret; a payload changed after signing.
    assert_eq!(check(&v, &with_token("/paid/a", &token("k1", OTHER, &fresh()))), Err("bad_signature"));
    let (head, rest) = t.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let tampered = format!("{head}.{}.{signature}", URL_SAFE_NO_PAD.encode(json!({"exp": NOW + 9999}).to_string()));
    assert_eq!(check(&v, &with_token("/paid/a", &tampered)), Err("bad_signature"));
    // Another algorithm than the key's, and none at all.
    let hs384 = Header { kid: Some("k1".into()), ..Header::new(Algorithm::HS384) };
    let hs384 = jsonwebtoken::encode(&hs384, &fresh(), &EncodingKey::from_secret(SECRET)).unwrap();
    assert_eq!(check(&v, &with_token("/paid/a", &hs384)), Err("algorithm"));
    let none = raw_token(&json!({"alg": "none", "kid": "k1"}), &fresh(), SECRET);
    assert_eq!(check(&v, &with_token("/paid/a", &none)), Err("algorithm"));
    // A JOSE header extension nobody here understands (RFC 7515 §4.1.11).
    let crit = raw_token(&json!({"alg": "HS256", "kid": "k1", "crit": ["b64"], "b64": false}), &fresh(), SECRET);
    assert_eq!(check(&v, &with_token("/paid/a", &crit)), Err("critical_claim"));
    // The same header by hand, without crit: accepted (the hand-made HMAC is right).
    let plain = raw_token(&json!({"alg": "HS256", "kid": "k1"}), &fresh(), SECRET);
    assert!(check(&v, &with_token("/paid/a", &plain)).is_ok());
    // A percent-encoded package is decoded first.
    let encoded = t.replace('.', "%2E");
    assert!(check(&v, &with_token("/paid/a", &encoded)).is_ok());
}

#[test]
fn times() {
    let v = verifier();
    let go = |claims: Value, now: u64| {
        check_with(&v, &paid(&["k1"]), &with_token("/paid/a", &token("k1", SECRET, &claims)), at(now))
    };
    assert_eq!(go(json!({}), NOW), Err("missing_exp"));
    assert_eq!(go(json!({"nbf": NOW - 10}), NOW), Err("missing_exp"));
    assert_eq!(go(json!({"exp": "tomorrow"}), NOW), Err("malformed"));
    assert_eq!(go(json!({"exp": NOW - 1}), NOW), Err("expired"));
    assert_eq!(go(json!({"exp": NOW}), NOW), Err("expired"), "exp is the first instant it is invalid");
    assert!(go(json!({"exp": NOW + 1}), NOW).is_ok());
    assert!(go(json!({"exp": NOW as f64 + 0.5}), NOW).is_ok(), "NumericDate may have a fraction");
    assert_eq!(go(json!({"exp": NOW + 60, "nbf": NOW + 30}), NOW), Err("not_yet_valid"));
    assert!(go(json!({"exp": NOW + 60, "nbf": NOW + 30}), NOW + 30).is_ok());
    assert_eq!(go(json!({"exp": NOW + 60, "nbf": "soon"}), NOW), Err("malformed"));
    // iat is not checked, whatever it says.
    assert!(go(json!({"exp": NOW + 60, "iat": NOW + 3600}), NOW).is_ok());
    // With leeway, a token a little past its exp (or before its nbf) still passes.
    let keys = vec![SigningKey::hs256("k1", SECRET).unwrap()];
    let (lenient, _) = verifier_with(SigningConfig { keys, leeway: Duration::from_secs(30), audience: None });
    let go = |claims: Value| {
        check_with(&lenient, &paid(&["k1"]), &with_token("/paid/a", &token("k1", SECRET, &claims)), at(NOW))
    };
    assert!(go(json!({"exp": NOW - 20})).is_ok());
    assert_eq!(go(json!({"exp": NOW - 40})), Err("expired"));
    assert!(go(json!({"exp": NOW + 60, "nbf": NOW + 20})).is_ok());
    assert_eq!(go(json!({"exp": NOW + 60, "nbf": NOW + 40})), Err("not_yet_valid"));
}

#[test]
fn cdni_claims() {
    let v = verifier();
    let go = |claims: Value| check(&v, &with_token("/paid/a", &token("k1", SECRET, &claims)));
    let exp = NOW + 60;
    assert!(go(json!({"exp": exp, "cdniv": 1})).is_ok());
    assert_eq!(go(json!({"exp": exp, "cdniv": 2})), Err("version"));
    assert_eq!(go(json!({"exp": exp, "cdniv": "1"})), Err("version"));
    assert!(go(json!({"exp": exp, "cdnicrit": ["exp", "cdniuc"], "cdniuc": "regex:.*"})).is_ok());
    assert_eq!(go(json!({"exp": exp, "cdnicrit": ["jti"], "jti": "x"})), Err("critical_claim"));
    assert_eq!(go(json!({"exp": exp, "cdnicrit": "exp"})), Err("malformed"));
    // Unknown claims that are not critical are ignored.
    assert!(go(json!({"exp": exp, "iss": "shop", "sub": "u1", "jti": "n1", "cdniets": 30, "x-mine": 1})).is_ok());
    // Signed-token renewal is not done: such tokens are refused.
    assert_eq!(go(json!({"exp": exp, "cdnistt": 1, "cdniets": 30})), Err("renewal_unsupported"));
    assert_eq!(go(json!({"exp": exp, "cdnistd": 2})), Err("renewal_unsupported"));
    assert!(go(json!({"exp": exp, "cdnistd": 0})).is_ok());
    // The client's address, alone or as a prefix.
    assert!(go(json!({"exp": exp, "cdniip": "192.0.2.7"})).is_ok());
    assert!(go(json!({"exp": exp, "cdniip": "192.0.2.0/24"})).is_ok());
    assert!(go(json!({"exp": exp, "cdniip": "::ffff:192.0.2.7"})).is_ok());
    assert_eq!(go(json!({"exp": exp, "cdniip": "192.0.2.8"})), Err("client_ip"));
    assert_eq!(go(json!({"exp": exp, "cdniip": "2001:db8::/32"})), Err("client_ip"));
    assert_eq!(go(json!({"exp": exp, "cdniip": "somewhere"})), Err("malformed"));
    // aud: refused unless it names this CDN.
    assert_eq!(go(json!({"exp": exp, "aud": "cdn.example"})), Err("audience"));
    let keys = vec![SigningKey::hs256("k1", SECRET).unwrap()];
    let config = SigningConfig { keys, audience: Some("cdn.example".into()), ..SigningConfig::default() };
    let (named, _) = verifier_with(config);
    let go = |claims: Value| check(&named, &with_token("/paid/a", &token("k1", SECRET, &claims)));
    assert!(go(json!({"exp": exp, "aud": "cdn.example"})).is_ok());
    assert!(go(json!({"exp": exp, "aud": ["other", "cdn.example"]})).is_ok());
    assert!(go(json!({"exp": exp})).is_ok());
    assert_eq!(go(json!({"exp": exp, "aud": ["other"]})), Err("audience"));
    assert_eq!(go(json!({"exp": exp, "aud": 7})), Err("malformed"));
}

fn sha256(uri: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, uri.as_bytes()))
}

#[test]
fn uri_containers() {
    let v = verifier();
    let go = |target: &str, container: &str| {
        let t = token("k1", SECRET, &json!({"exp": NOW + 60, "cdniuc": container}));
        let target = if target.contains('?') { format!("{target}&{PARAMETER}={t}") } else { with_token(target, &t) };
        check(&v, &target)
    };
    // One regex covers every segment of a stream, and nothing else.
    let stream = r"regex:http://cdn\.test/paid/stream/(index\.m3u8|seg-[0-9]+\.ts)";
    for segment in ["/paid/stream/index.m3u8", "/paid/stream/seg-1.ts", "/paid/stream/seg-42.ts"] {
        assert_eq!(go(segment, stream), Ok(segment.to_string()));
    }
    assert_eq!(go("/paid/other/seg-1.ts", stream), Err("uri_mismatch"));
    // The whole URI must match, not a part of it.
    assert_eq!(go("/paid/stream/seg-1.ts.evil", stream), Err("uri_mismatch"));
    assert_eq!(go("/paid/a", "regex:/paid/a"), Err("uri_mismatch"));
    // The query (without the package) is part of the URI.
    assert!(go("/paid/a?q=1", r"regex:http://cdn\.test/paid/a\?q=1").is_ok());
    assert_eq!(go("/paid/a?q=2", r"regex:http://cdn\.test/paid/a\?q=1"), Err("uri_mismatch"));
    // hash: SHA-256 of the URI, bare or in RFC 6920's form.
    let hash = format!("hash:{}", sha256("http://cdn.test/paid/a.mp4"));
    assert_eq!(go("/paid/a.mp4", &hash), Ok("/paid/a.mp4".into()));
    assert_eq!(go("/paid/b.mp4", &hash), Err("uri_mismatch"));
    assert!(go("/paid/a.mp4", &format!("hash:sha-256;{}", sha256("http://cdn.test/paid/a.mp4"))).is_ok());
    assert!(go("/paid/a.mp4?x=1", &format!("hash:{}", sha256("http://cdn.test/paid/a.mp4?x=1"))).is_ok());
    // The URI compared is normalized.
    assert!(go("/paid/x/../%7Ea.mp4", &format!("hash:{}", sha256("http://cdn.test/paid/~a.mp4"))).is_ok());
    // Bad containers.
    for bad in ["hash:", "hash:abc", "hash:!!!", "regex:(", "glob:/paid/*", "/paid/a", "regex:a{1000}{1000}"] {
        assert_eq!(go("/paid/a", bad), Err("bad_container"), "{bad}");
    }
    assert_eq!(go("/paid/a", &format!("regex:{}", "a".repeat(MAX_REGEX + 1))), Err("bad_container"));
    let number = token("k1", SECRET, &json!({"exp": NOW + 60, "cdniuc": 7}));
    assert_eq!(check(&v, &with_token("/paid/a", &number)), Err("malformed"));
}

#[test]
fn logs_see_no_package() {
    assert_eq!(redacted("/paid/a.mp4"), "/paid/a.mp4");
    assert_eq!(redacted("/paid/a.mp4?x=1"), "/paid/a.mp4?x=1");
    assert_eq!(redacted("/paid/a.mp4?URISigningPackage=eyJ.x.y"), "/paid/a.mp4");
    assert_eq!(redacted("/paid/a.mp4?x=1&URISigningPackage=eyJ.x.y&y=2"), "/paid/a.mp4?x=1&y=2");
    assert_eq!(redacted("/a?URISigningPackage=1&URISigningPackage"), "/a");
    assert!(matches!(redacted("/a?b=1"), Cow::Borrowed(_)));
}

#[test]
fn normalization() {
    assert_eq!(normalized_uri("http", "CDN.Test.", "/a", None), "http://cdn.test/a");
    assert_eq!(normalized_uri("http", "cdn.test:80", "", None), "http://cdn.test/");
    assert_eq!(normalized_uri("https", "cdn.test:443", "/a", Some("b=%7e%2f")), "https://cdn.test/a?b=~%2F");
    assert_eq!(normalized_uri("https", "cdn.test:8443", "/a", None), "https://cdn.test:8443/a");
    assert_eq!(normalized_uri("http", "[::1]:8080", "/a", None), "http://[::1]:8080/a");
    assert_eq!(normalized_uri("http", "[::1]", "/a", None), "http://[::1]/a");
    assert_eq!(normalized_uri("http", "h", "/a/./b/../c/%41%zz%", None), "http://h/a/c/A%zz%");
    assert_eq!(remove_dot_segments("/a/b/c/./../../g"), "/a/g");
    assert_eq!(remove_dot_segments("mid/content=5/../6"), "mid/6");
    assert_eq!(remove_dot_segments("/.."), "/");
    assert_eq!(remove_dot_segments("/a/.."), "/");
    assert_eq!(normalize_percent("/é%c3%a9"), "/é%C3%A9");
}

#[test]
fn which_paths_need_a_signature() {
    let signed = paid(&["k1"]);
    for path in ["/paid/a", "/paid/", "/free/../paid/a", "/%70aid/a", "//paid/a", "/./paid/a", "/paid%2fa"] {
        assert!(needs_signature(&signed, path), "{path}");
    }
    for path in ["/free/a", "/paid", "/PAID/a", "/", ""] {
        assert!(!needs_signature(&signed, path), "{path}");
    }
    let whole = Signed { path_prefix: "/".into(), keys: vec!["k1".into()] };
    assert!(needs_signature(&whole, "/anything"));
    // A path that needs one is refused without a package.
    let v = verifier();
    assert_eq!(check(&v, "/free/../paid/a"), Err("missing"));
}

#[test]
fn es256() {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    // SubjectPublicKeyInfo of a P-256 key: a fixed prefix, then the point.
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
        0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    spki.extend_from_slice(ring::signature::KeyPair::public_key(&pair).as_ref());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let key = SigningKey::es256("ec1", &pem).unwrap();
    assert_eq!(key.algorithm(), "ES256");
    let keys = vec![key, SigningKey::hs256("k1", SECRET).unwrap()];
    let (v, _) = verifier_with(SigningConfig { keys, ..SigningConfig::default() });
    let signed = paid(&["ec1", "k1"]);
    let header = Header { kid: Some("ec1".into()), ..Header::new(Algorithm::ES256) };
    let t = jsonwebtoken::encode(&header, &fresh(), &EncodingKey::from_ec_der(pkcs8.as_ref())).unwrap();
    assert_eq!(check_with(&v, &signed, &with_token("/paid/a", &t), at(NOW)), Ok("/paid/a".into()));
    // Another key pair's signature does not verify.
    let other = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let forged = jsonwebtoken::encode(&header, &fresh(), &EncodingKey::from_ec_der(other.as_ref())).unwrap();
    assert_eq!(check_with(&v, &signed, &with_token("/paid/a", &forged), at(NOW)), Err("bad_signature"));
    // An HMAC made with the public key as its secret (algorithm confusion) is refused.
    let confused = raw_token(&json!({"alg": "HS256", "kid": "ec1"}), &fresh(), pem.as_bytes());
    assert_eq!(check_with(&v, &signed, &with_token("/paid/a", &confused), at(NOW)), Err("algorithm"));
    assert!(SigningKey::es256("ec2", "not a key").is_err());
}

#[test]
fn reasons_are_counted() {
    let keys = vec![SigningKey::hs256("k1", SECRET).unwrap()];
    let (v, registry) = verifier_with(SigningConfig { keys, ..SigningConfig::default() });
    let counted = |reason: &str| {
        let families = registry.gather();
        let family = families.iter().find(|f| f.name() == "cdn_signing_rejected_total").unwrap();
        family
            .get_metric()
            .iter()
            .find(|m| m.get_label().iter().any(|l| l.value() == reason))
            .map_or(0.0, |m| m.get_counter().get_value())
    };
    assert_eq!(counted("expired"), 0.0, "every reason is exported from the start");
    let expired = token("k1", SECRET, &json!({"exp": NOW - 1}));
    assert_eq!(check_with(&v, &paid(&["k1"]), &with_token("/paid/a", &expired), at(NOW)), Err("expired"));
    assert_eq!(check_with(&v, &paid(&["k1"]), "/paid/a", at(NOW)), Err("missing"));
    assert_eq!(counted("expired"), 1.0);
    assert_eq!(counted("missing"), 1.0);
    let good = token("k1", SECRET, &fresh());
    assert!(check_with(&v, &paid(&["k1"]), &with_token("/paid/a", &good), at(NOW)).is_ok());
    assert_eq!(v.accepted.get(), 1);
    let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    let mut unique = labels.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), labels.len(), "reasons are distinct");
}

#[test]
fn keys_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k3.secret");
    std::fs::write(&file, "base64:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
    let text = format!(
        r#"
        leeway = "5s"
        [[keys]]
        id = "k1"
        secret = "0123456789abcdef0123456789abcdef"
        [[keys]]
        id = "k2"
        secret = "hex:{}"
        [[keys]]
        id = "k3"
        secret_file = "{}"
        "#,
        SECRET.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        file.display()
    );
    let config: SigningConfig = toml::from_str(&text).unwrap();
    assert!(config.problems("signing").is_empty());
    assert_eq!(config.leeway, Duration::from_secs(5));
    let (v, _) = verifier_with(config.clone());
    for kid in ["k1", "k2", "k3"] {
        let t = token(kid, SECRET, &fresh());
        assert!(check_with(&v, &paid(&[kid]), &with_token("/paid/a", &t), at(NOW)).is_ok(), "{kid}");
    }
    // The secret never shows in Debug output.
    let debug = format!("{config:?}");
    assert!(!debug.contains("0123456789abcdef") && debug.contains("<redacted>") && debug.contains("k3"), "{debug}");
    // Bad keys are refused with a reason that does not quote the secret.
    for (bad, why) in [
        ("id = \"k\"\nsecret = \"short\"", "at least 32"),
        ("id = \"k\"\nsecret = \"base64:!!!\"", "base64"),
        ("id = \"k\"\nsecret = \"hex:abc\"", "odd"),
        ("id = \"k\"\nsecret = \"hex:zz\"", "hex"),
        ("id = \"k\"", "needs secret"),
        ("id = \"k\"\nsecret = \"0123456789abcdef0123456789abcdef\"\nsecret_file = \"/x\"", "not both"),
        ("id = \"k\"\nsecret_file = \"/nonexistent/secret\"", "cannot read"),
        ("id = \"k\"\nalgorithm = \"RS256\"\nsecret = \"0123456789abcdef0123456789abcdef\"", "not HS256 or ES256"),
        ("id = \"k\"\nalgorithm = \"ES256\"\nsecret = \"0123456789abcdef0123456789abcdef\"", "public_key"),
        ("id = \"k\"\nalgorithm = \"ES256\"\npublic_key = \"nope\"", "EC public key"),
    ] {
        let error = toml::from_str::<SigningConfig>(&format!("[[keys]]\n{bad}\n")).unwrap_err().to_string();
        assert!(error.contains(why), "{bad}: {error}");
        assert!(!error.contains("0123456789abcdef"), "{error}");
    }
    // Ids, duplicates, leeway, audience.
    let mut config = SigningConfig {
        keys: vec![
            SigningKey::hs256("k1", SECRET).unwrap(),
            SigningKey::hs256("k1", OTHER).unwrap(),
            SigningKey::hs256("bad id", SECRET).unwrap(),
        ],
        leeway: Duration::from_secs(600),
        audience: Some(String::new()),
    };
    let problems = config.problems("signing");
    for what in ["keys[1].id: \"k1\" is listed twice", "keys[2].id: \"bad id\" is not a key id", "leeway", "audience"] {
        assert!(problems.iter().any(|p| p.contains(what)), "{what} in {problems:?}");
    }
    config.keys.truncate(1);
    assert!(config.has("k1") && !config.has("k2"));
}

#[test]
fn an_edge_config_with_signed_origin_paths() {
    let base = "node_id = \"e\"\n[listen]\nhttp = \"127.0.0.1:0\"\n[origin]\nurl = \"http://127.0.0.1:1\"\n";
    let good = format!(
        "{base}signed = {{ path_prefix = \"/paid/\", keys = [\"k1\"] }}\n[[signing.keys]]\nid = \"k1\"\nsecret = \"{}\"\n",
        std::str::from_utf8(SECRET).unwrap()
    );
    let config: crate::Config = toml::from_str(&good).unwrap();
    config.validate().unwrap();
    assert_eq!(config.origin.unwrap().signed.unwrap().keys, ["k1"]);
    // A key the edge does not have, and a bad prefix.
    let bad = format!("{base}signed = {{ path_prefix = \"paid\", keys = [\"k9\"] }}\n");
    let config: crate::Config = toml::from_str(&bad).unwrap();
    let problems = config.validate().unwrap_err().problems;
    assert!(problems.iter().any(|p| p.starts_with("origin.signed.path_prefix")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("origin.signed.keys[0]: \"k9\" is not in")), "{problems:?}");
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn segment() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a", "b.ts", ".", "..", "%2E", "%2e", "%2E%2E", "%41", "%2F", "%2f", "~", "%7e", "", "x%20y",
        ])
    }

    proptest! {
        /// Nothing a client sends makes the checks panic.
        #[test]
        fn any_input_is_answered(path in "/\\PC{0,40}", query in "\\PC{0,60}", host in "\\PC{0,20}") {
            let _ = normalized_uri("https", &host, &path, Some(&query));
            let _ = needs_signature(&paid(&["k1"]), &path);
            let _ = split_package(Some(&query));
            let v = verifier();
            if let Ok(target) = format!("{path}?{query}").parse::<Uri>() {
                let mut request = Request::get(target).header("host", "cdn.test").body(()).unwrap();
                let _ = v.check(Some(&paid(&["k1"])), &mut request, Ipv4Addr::LOCALHOST.into(), true, at(NOW), |_| false);
            }
        }

        /// Normalizing a normalized URI changes nothing, and it holds no dot segment.
        #[test]
        fn normalization_is_idempotent(segments in prop::collection::vec(segment(), 0..8)) {
            let path = format!("/{}", segments.join("/"));
            let once = normalized_uri("http", "h", &path, None);
            let again = normalized_uri("http", "h", &once["http://h".len()..], None);
            prop_assert_eq!(&once, &again);
            prop_assert!(!once.contains("/./") && !once.contains("/../") && !once.ends_with("/.") && !once.ends_with("/.."));
        }

        /// Wherever the package is, the rest of the query comes back in its order.
        #[test]
        fn the_package_comes_out_of_any_query(names in prop::collection::vec("[a-z]{1,3}(=[a-z0-9]{0,3})?", 0..6), at in 0usize..6) {
            let mut pairs = names.clone();
            pairs.insert(at.min(pairs.len()), format!("{PARAMETER}=tok"));
            let query = pairs.join("&");
            let (package, rest) = split_package(Some(&query)).unwrap();
            prop_assert_eq!(package, "tok");
            prop_assert_eq!(rest, (!names.is_empty()).then(|| names.join("&")));
        }
    }
}
