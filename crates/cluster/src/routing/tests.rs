use proptest::prelude::*;

use super::*;

/// The document of the contract (DESIGN.md, "Routing document").
const EXAMPLE: &str = r#"{"default_site": "video",
 "sites": [
  {"name": "video",
   "hosts": ["www.cdn.test", "*.video.test"],
   "origins": [{"url": "http://10.0.0.1:8080", "weight": 2},
               {"url": "http://10.0.0.2:8080", "backup": true}],
   "health": {"path": "/healthz", "interval": "2s", "timeout": "1s", "fails": 2, "passes": 2},
   "shield": ["eu-west"],
   "rules": [
     {"path_suffix": ".m3u8", "ttl": "2s"},
     {"path_prefix": "/v/", "ttl": "1d", "stale_if_error": "1h", "cors": true},
     {"path_prefix": "/api/", "bypass": true},
     {"path_prefix": "/", "query": {"ignore": ["utm_*", "CMCD"]}, "negative_ttl": "10s"}],
   "signed": {"path_prefix": "/paid/", "keys": ["k1"]}}]}"#;

/// The same document in TOML.
const EXAMPLE_TOML: &str = r#"
default_site = "video"

[[sites]]
name = "video"
hosts = ["www.cdn.test", "*.video.test"]
shield = ["eu-west"]
health = { path = "/healthz", interval = "2s", timeout = "1s", fails = 2, passes = 2 }
signed = { path_prefix = "/paid/", keys = ["k1"] }

[[sites.origins]]
url = "http://10.0.0.1:8080"
weight = 2

[[sites.origins]]
url = "http://10.0.0.2:8080"
backup = true

[[sites.rules]]
path_suffix = ".m3u8"
ttl = "2s"

[[sites.rules]]
path_prefix = "/v/"
ttl = "1d"
stale_if_error = "1h"
cors = true

[[sites.rules]]
path_prefix = "/api/"
bypass = true

[[sites.rules]]
path_prefix = "/"
negative_ttl = "10s"
query = { ignore = ["utm_*", "CMCD"] }
"#;

/// A document of `sites` sites, about 400 bytes of JSON each (and characters of
/// more than one byte, where chunks must not cut).
pub(crate) fn sample(sites: usize) -> Routing {
    let sites = (0..sites)
        .map(|n| Site {
            name: format!("site-{n}"),
            hosts: vec![format!("s{n}.example.test"), format!("*.s{n}.example.test"), format!("www.s{n}.example.test")],
            origins: vec![
                OriginSpec { weight: 2, ..origin(&format!("http://10.0.{}.{}:8080", n / 256, n % 256)) },
                OriginSpec { backup: true, ..origin(&format!("https://backup-{n}.example.test")) },
            ],
            shield: vec!["eu-west".into()],
            rules: vec![
                Rule { path_suffix: Some(".m3u8".into()), ttl: Some(secs(2)), ..Rule::default() },
                Rule { path_prefix: Some(format!("/vidéo/{n}/€/")), ttl: Some(secs(86_400)), ..Rule::default() },
            ],
            ..site("", &[])
        })
        .collect();
    Routing { default_site: Some("site-0".into()), sites }
}

#[test]
fn the_sample_is_valid() {
    sample(3).validate().unwrap();
    let len = sample(600).to_json().len();
    assert!((200_000..260_000).contains(&len), "{len}");
}

fn example() -> Routing {
    Routing::from_json(EXAMPLE.as_bytes()).unwrap()
}

fn site(name: &str, hosts: &[&str]) -> Site {
    Site {
        name: name.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        origins: vec![origin("http://127.0.0.1:8080")],
        health: None,
        shield: Vec::new(),
        share: None,
        rules: Vec::new(),
        signed: None,
    }
}

fn origin(url: &str) -> OriginSpec {
    OriginSpec { url: url.into(), weight: 1, backup: false, ca: None, host: None }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn the_contract_example_reads_as_written() {
    let routing = example();
    routing.validate().unwrap();
    assert_eq!(routing.default_site.as_deref(), Some("video"));
    let video = &routing.sites[0];
    assert_eq!(video.hosts, ["www.cdn.test", "*.video.test"]);
    assert_eq!(video.origins[0], OriginSpec { url: "http://10.0.0.1:8080".into(), weight: 2, ..origin("") });
    assert_eq!(video.origins[1], OriginSpec { url: "http://10.0.0.2:8080".into(), backup: true, ..origin("") });
    assert_eq!(
        video.health,
        Some(Health { path: "/healthz".into(), interval: secs(2), timeout: secs(1), fails: 2, passes: 2 })
    );
    assert_eq!(video.shield, ["eu-west"]);
    assert_eq!(video.share, None);
    assert_eq!(video.rules.len(), 4);
    assert_eq!(video.rules[0], Rule { path_suffix: Some(".m3u8".into()), ttl: Some(secs(2)), ..Rule::default() });
    assert_eq!(
        video.rules[1],
        Rule {
            path_prefix: Some("/v/".into()),
            ttl: Some(secs(86_400)),
            stale_if_error: Some(secs(3600)),
            cors: true,
            ..Rule::default()
        }
    );
    assert!(video.rules[2].bypass);
    assert_eq!(video.rules[3].query, Some(QueryRule { ignore: vec!["utm_*".into(), "CMCD".into()] }));
    assert_eq!(video.rules[3].negative_ttl, Some(secs(10)));
    assert_eq!(video.signed, Some(Signed { path_prefix: "/paid/".into(), keys: vec!["k1".into()] }));
}

#[test]
fn toml_and_json_are_the_same_document() {
    assert_eq!(Routing::from_toml(EXAMPLE_TOML).unwrap(), example());
}

#[test]
fn defaults() {
    let routing = Routing::from_json(
        br#"{"sites":[{"name":"a","origins":[{"url":"http://o"}],"health":{},"share":"region","signed":{"keys":["k"]}}]}"#,
    )
    .unwrap();
    routing.validate().unwrap();
    let site = &routing.sites[0];
    assert_eq!(site.origins[0], origin("http://o"));
    assert_eq!(site.health, Some(Health::default()));
    assert_eq!(
        Health::default(),
        Health { path: "/".into(), interval: secs(2), timeout: secs(1), fails: 2, passes: 2 }
    );
    assert_eq!(site.share, Some(Share::Region));
    assert_eq!(site.signed.as_ref().unwrap().path_prefix, "/");
    assert!(site.hosts.is_empty() && site.rules.is_empty() && site.shield.is_empty());
    // An empty document is a document: no sites, every request 421.
    assert_eq!(Routing::from_json(b"{}").unwrap(), Routing::default());
    Routing::default().validate().unwrap();
    assert_eq!(Routing::from_toml("").unwrap(), Routing::default());
}

#[test]
fn documents_round_trip_through_json() {
    let routing = example();
    let json = routing.to_json();
    assert_eq!(Routing::from_json(json.as_bytes()).unwrap(), routing);
    // Absent fields stay absent: what `GET /v1/routing` shows reads like what was put.
    assert!(!json.contains("null") && !json.contains("\"bypass\":false"), "{json}");
    let versioned = Versioned { version: 3, by: "c1".into(), accepted_ms: 0, routing };
    let back: Versioned = serde_json::from_str(&serde_json::to_string(&versioned).unwrap()).unwrap();
    assert_eq!(back, versioned);
}

/// The message of a document that does not parse.
fn parse_error(json: &str) -> String {
    Routing::from_json(json.as_bytes()).unwrap_err().to_string()
}

#[test]
fn parse_errors_name_the_field() {
    let cases = [
        (
            r#"{"sites":[{"name":"a","origins":[{"url":"http://a"},{"url":"http://b","weight":"x"}]}]}"#,
            "sites[0].origins[1].weight: invalid type: string \"x\"",
        ),
        (r#"{"sites":[{"name":"a","origins":[],"hostz":[]}]}"#, "sites[0].hostz: unknown field `hostz`"),
        (r#"{"sites":[{"name":"a","origins":[],"rules":[{"ttl":"2 parsecs"}]}]}"#, "sites[0].rules[0].ttl: "),
        (r#"{"sites":[{"name":"a","origins":[],"share":"global"}]}"#, "sites[0].share: unknown variant `global`"),
        (r#"{"sites":[{"name":"a","origins":[{"url":"http://a","weight":-1}]}]}"#, "sites[0].origins[0].weight: "),
        (r#"{"sites":[{"origins":[]}]}"#, "sites[0]: missing field `name`"),
        (r#"{"default_site":1}"#, "default_site: invalid type: integer"),
        (r#"{"sites":[]} trailing"#, "trailing characters"),
        (r#"{"sites":["#, "EOF"),
        (r#""sites""#, "invalid type: string"),
    ];
    for (json, expected) in cases {
        let message = parse_error(json);
        assert!(message.starts_with(expected) || message.contains(expected), "{json}\n=> {message}");
    }
    let Error::RoutingSyntax { field, .. } = Routing::from_json(br#"{"sites":[{"name":1}]}"#).unwrap_err() else {
        panic!("a syntax error")
    };
    assert_eq!(field, "sites[0].name");
}

#[test]
fn toml_parse_errors_name_the_field() {
    let bad_weight = "[[sites]]\nname = \"a\"\n[[sites.origins]]\nurl = \"http://a\"\nweight = \"x\"\n";
    let message = Routing::from_toml(bad_weight).unwrap_err().to_string();
    assert!(message.starts_with("sites[0].origins[0].weight: "), "{message}");
    let unknown = "[[sites]]\nname = \"a\"\norigins = []\ncolour = \"red\"\n";
    let message = Routing::from_toml(unknown).unwrap_err().to_string();
    assert!(message.contains("colour"), "{message}");
    let broken = "[[sites]\nname = ";
    assert!(matches!(Routing::from_toml(broken), Err(Error::RoutingSyntax { .. })));
}

#[test]
fn an_oversized_document_is_refused_before_parsing() {
    let huge = vec![b' '; MAX_BYTES + 1];
    assert!(matches!(Routing::from_json(&huge), Err(Error::RoutingTooLarge { .. })));
    let huge = " ".repeat(MAX_BYTES + 1);
    assert!(matches!(Routing::from_toml(&huge), Err(Error::RoutingTooLarge { .. })));
}

/// The problems of a document, as one text to search.
fn problems(routing: &Routing) -> Vec<String> {
    routing.validate().unwrap_err()
}

fn assert_problem(problems: &[String], expected: &str) {
    assert!(problems.iter().any(|p| p.starts_with(expected)), "no {expected:?} in {problems:#?}");
}

#[test]
fn validation_names_every_bad_field() {
    let json = r#"{"default_site": "nowhere",
     "sites": [
      {"name": "video", "hosts": ["www.cdn.test", "*.*.x", "WWW.UPPER.test", "a.test:8080", "dot.test.", "*"],
       "origins": [{"url": "ftp://o"}, {"url": "http://o/path"}, {"url": "http://user:pw@o"},
                   {"url": "http://o:0"}, {"url": "http://o:99999"}, {"url": "http://"},
                   {"url": "http://ok", "weight": 0}, {"url": "http://ok2", "weight": 1001},
                   {"url": "http://ok", "ca": "x"}, {"url": "https://ok3", "ca": "not pem"},
                   {"url": "https://ok4", "host": "bad host"}],
       "health": {"path": "healthz", "interval": "10ms", "timeout": "1s", "fails": 0, "passes": 101},
       "shield": ["eu-west", "eu-west", "has space"],
       "rules": [{"path_prefix": "v/"}, {"path_suffix": ""}, {"path_prefix": "/a?b"},
                 {"ttl": "400d"}, {"bypass": true, "ttl": "1s", "query": {"ignore": ["x"]}},
                 {"query": {"ignore": []}}, {"query": {"ignore": ["", "a*b", "a=b", "ok*"]}}],
       "signed": {"path_prefix": "paid", "keys": []}},
      {"name": "video", "hosts": ["www.cdn.test"], "origins": [{"url": "http://o", "backup": true}],
       "health": {"timeout": "2s", "path": "/?a b"}, "signed": {"keys": ["", "bad key"]}},
      {"name": "Bad Name", "origins": []}]}"#;
    let problems = problems(&Routing::from_json(json.as_bytes()).unwrap());
    let expected = [
        r#"default_site: "nowhere" names no site"#,
        r#"sites[0].hosts[1]: "*.*.x" is not a host or *.wildcard"#,
        r#"sites[0].hosts[2]: "WWW.UPPER.test" must be lowercase"#,
        r#"sites[0].hosts[3]: "a.test:8080" has a port"#,
        r#"sites[0].hosts[4]: "dot.test." ends with a dot"#,
        r#"sites[0].hosts[5]: "*" is not a host"#,
        r#"sites[0].origins[0].url: "ftp://o" does not start with http:// or https://"#,
        r#"sites[0].origins[1].url: "http://o/path" has a path or query"#,
        r#"sites[0].origins[2].url: "http://user:pw@o" carries credentials"#,
        r#"sites[0].origins[3].url: "http://o:0" has no valid host[:port]"#,
        r#"sites[0].origins[4].url: "http://o:99999" has no valid host[:port]"#,
        r#"sites[0].origins[5].url: "http://" has no valid host[:port]"#,
        "sites[0].origins[6].weight: 0 is not within 1..=1000",
        "sites[0].origins[7].weight: 1001 is not within 1..=1000",
        r#"sites[0].origins[8].url: "http://ok" is also origins[6]"#,
        "sites[0].origins[8].ca: only an https origin takes a ca",
        "sites[0].origins[9].ca: holds no PEM CERTIFICATE block",
        r#"sites[0].origins[10].host: "bad host" is not a host name"#,
        r#"sites[0].health.path: "healthz" does not start with /"#,
        "sites[0].health.interval: 10ms is not within 100ms..=1h",
        "sites[0].health.timeout: 1s must be less than the interval (10ms)",
        "sites[0].health.fails: 0 is not within 1..=100",
        "sites[0].health.passes: 101 is not within 1..=100",
        r#"sites[0].shield[1]: "eu-west" is listed twice"#,
        r#"sites[0].shield[2]: "has space" is not a region name"#,
        r#"sites[0].rules[0].path_prefix: "v/" does not start with /"#,
        "sites[0].rules[1].path_suffix: is empty",
        r#"sites[0].rules[2].path_prefix: "/a?b" is not a path"#,
        "sites[0].rules[3].ttl: is more than a year (365d)",
        "sites[0].rules[4].ttl: has no effect with bypass",
        "sites[0].rules[4].query: has no effect with bypass",
        "sites[0].rules[5].query.ignore: lists no parameter",
        r#"sites[0].rules[6].query.ignore[0]: "" is not a parameter name"#,
        r#"sites[0].rules[6].query.ignore[1]: "a*b" is not a parameter name"#,
        r#"sites[0].rules[6].query.ignore[2]: "a=b" is not a parameter name"#,
        r#"sites[0].signed.path_prefix: "paid" does not start with /"#,
        "sites[0].signed.keys: lists no key id",
        r#"sites[1].name: "video" is also the name of sites[0]"#,
        r#"sites[1].hosts[0]: "www.cdn.test" is also listed by sites[0]"#,
        "sites[1].origins: at least one origin must not be a backup",
        "sites[1].health.timeout: 2s must be less than the interval (2s)",
        r#"sites[1].health.path: "/?a b" is not a path and query"#,
        r#"sites[1].signed.keys[0]: "" is not a key id"#,
        r#"sites[1].signed.keys[1]: "bad key" is not a key id"#,
        r#"sites[2].name: "Bad Name" is not a site name"#,
        "sites[2].origins: at least one origin is needed",
    ];
    for expected in expected {
        assert_problem(&problems, expected);
    }
    assert!(!problems.iter().any(|p| p.starts_with("sites[0].rules[6].query.ignore[3]")), "ok* is fine: {problems:#?}");
    assert_eq!(problems.len(), expected.len(), "nothing else: {problems:#?}");
}

#[test]
fn good_values_pass() {
    let mut routing = Routing::default();
    let mut a = site("a-1.b_c", &["a.test", "*.a.test", "127.0.0.1", "x--y.test", "_srv.test"]);
    a.origins = vec![
        origin("http://127.0.0.1:8080"),
        origin("https://[::1]:8443/"),
        OriginSpec { weight: 1000, backup: true, host: Some("origin.test:8443".into()), ..origin("https://b.test") },
        OriginSpec { host: Some("Origin.Test".into()), ..origin("http://c.test") },
    ];
    a.health = Some(Health {
        path: "/status?full=1".into(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(99),
        ..Health::default()
    });
    a.rules = vec![
        Rule { ttl: Some(Duration::ZERO), ..Rule::default() },
        Rule { ttl: Some(MAX_TTL), stale_while_revalidate: Some(secs(1)), ..Rule::default() },
        Rule { bypass: true, cors: true, path_prefix: Some("/api/".into()), ..Rule::default() },
        Rule { query: Some(QueryRule { ignore: vec!["*".into()] }), ..Rule::default() },
        Rule { path_prefix: Some("/raw/".into()), ..Rule::default() },
    ];
    routing.sites = vec![a, site("b", &[])];
    routing.default_site = Some("b".into());
    routing.validate().unwrap();
}

#[test]
fn a_private_ca_must_be_certificates_and_never_a_key() {
    let (cert, key) = cdn_node::tls::self_signed_pem(&["origin.test".into()], &[]).unwrap();
    let with_ca = |ca: String| {
        let mut a = site("a", &[]);
        a.origins = vec![OriginSpec { ca: Some(ca), ..origin("https://origin.test") }];
        Routing { default_site: None, sites: vec![a] }
    };
    with_ca(cert.clone()).validate().unwrap();
    with_ca(format!("{cert}{cert}")).validate().unwrap();
    assert_problem(&problems(&with_ca(format!("{cert}{key}"))), "sites[0].origins[0].ca: holds a private key");
    let garbled = cert.replace("MII", "MI!");
    assert_problem(&problems(&with_ca(garbled)), "sites[0].origins[0].ca: ");
    let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n".to_string();
    assert_problem(&problems(&with_ca(not_der)), "sites[0].origins[0].ca: certificate 0 is not usable as a CA");
}

#[test]
fn limits_against_abuse() {
    let mut big = site("big", &[]);
    big.hosts = (0..=MAX_PER_SITE).map(|n| format!("h{n}.test")).collect();
    big.origins = (0..=MAX_PER_SITE).map(|n| origin(&format!("http://o{n}.test"))).collect();
    big.rules = (0..=MAX_PER_SITE).map(|_| Rule::default()).collect();
    let problems = problems(&Routing { default_site: None, sites: vec![big] });
    assert_problem(&problems, "sites[0].hosts: 101 hosts, at most 100");
    assert_problem(&problems, "sites[0].origins: 101 origins, at most 100");
    assert_problem(&problems, "sites[0].rules: 101 rules, at most 100");

    let many = Routing {
        default_site: None,
        sites: (0..=MAX_SITES).map(|n| site(&format!("s{n}"), &[&format!("s{n}.test")])).collect(),
    };
    assert_problem(&self::problems(&many), "sites: 1001 sites, at most 1000");

    // Over a megabyte once encoded (long rules), though every value is fine.
    let label = "a".repeat(63);
    let long = |n: usize| Site {
        hosts: (0..100).map(|i| format!("{label}.{label}.{label}.s{n}-{i}.test")).collect(),
        rules: (0..100)
            .map(|_| Rule { path_prefix: Some(format!("/{}", "p".repeat(1000))), ..Rule::default() })
            .collect(),
        ..site(&format!("long{n}"), &[])
    };
    let problems = self::problems(&Routing { default_site: None, sites: (0..10).map(long).collect() });
    assert_eq!(problems.len(), 1, "{:?}", &problems[..problems.len().min(3)]);
    assert_problem(&problems, "(document): ");
    assert!(problems[0].ends_with("bytes encoded, at most 1048576"), "{problems:?}");

    // Problems are capped.
    let bad =
        |n: usize| Site { hosts: (0..100).map(|i| format!("BAD{n}-{i}")).collect(), ..site(&format!("s{n}"), &[]) };
    let problems = self::problems(&Routing { default_site: None, sites: (0..10).map(bad).collect() });
    assert_eq!(problems.len(), 101);
    assert_eq!(problems.last().unwrap(), "... and 900 more problems");
}

#[test]
fn hosts_route_exact_then_wildcard_then_default() {
    let mut routing = Routing {
        default_site: Some("fallback".into()),
        sites: vec![
            site("video", &["www.cdn.test", "*.video.test"]),
            site("special", &["live.video.test", "127.0.0.11"]),
            site("deep", &["*.b.video.test"]),
            site("fallback", &[]),
        ],
    };
    routing.validate().unwrap();
    let router = Router::new(routing.clone());
    let site_of = |host: &str| router.site_for(host).map(|site| site.name.as_str());
    assert_eq!(site_of("www.cdn.test"), Some("video"));
    assert_eq!(site_of("WWW.CDN.Test"), Some("video"), "case-insensitive");
    assert_eq!(site_of("www.cdn.test:8443"), Some("video"), "any port");
    assert_eq!(site_of("www.cdn.test."), Some("video"), "a trailing dot");
    assert_eq!(site_of("WWW.cdn.test.:80"), Some("video"));
    assert_eq!(site_of("a.video.test"), Some("video"), "one label under the wildcard");
    assert_eq!(site_of("A.Video.Test:8080"), Some("video"));
    assert_eq!(site_of("live.video.test"), Some("special"), "exact beats wildcard");
    assert_eq!(site_of("x.b.video.test"), Some("deep"), "the wildcard one label up");
    assert_eq!(site_of("b.video.test"), Some("video"));
    assert_eq!(site_of("x.y.a.video.test"), Some("fallback"), "a wildcard matches one label only");
    assert_eq!(site_of("video.test"), Some("fallback"), "nor its own suffix");
    assert_eq!(site_of(".video.test"), Some("fallback"));
    assert_eq!(site_of("127.0.0.11:8080"), Some("special"));
    assert_eq!(site_of("[::1]:8080"), Some("fallback"));
    assert_eq!(site_of(""), Some("fallback"));
    assert_eq!(site_of("unknown.test"), Some("fallback"));

    routing.default_site = None;
    let router = Router::from(routing);
    assert!(router.site_for("unknown.test").is_none(), "421");
    assert!(router.site_for("a.b.c.video.test").is_none());
    assert_eq!(router.site_for("a.video.test").unwrap().name, "video");
    assert_eq!(router.routing().sites.len(), 4);
    assert!(Router::default().site_for("www.cdn.test").is_none());
}

#[test]
fn the_first_matching_rule_applies() {
    let video = &example().sites[0];
    let ttl_of = |path: &str| video.rule_for(path).map(|rule| (rule.ttl, rule.bypass));
    assert_eq!(ttl_of("/live/index.m3u8"), Some((Some(secs(2)), false)));
    assert_eq!(ttl_of("/v/index.m3u8"), Some((Some(secs(2)), false)), "the playlist rule comes first");
    assert_eq!(ttl_of("/v/seg-1.ts"), Some((Some(secs(86_400)), false)));
    assert_eq!(ttl_of("/api/x"), Some((None, true)));
    assert_eq!(ttl_of("/other"), Some((None, false)), "the catch-all");
    let both = Rule { path_prefix: Some("/v/".into()), path_suffix: Some(".ts".into()), ..Rule::default() };
    assert!(both.matches("/v/a.ts"));
    assert!(!both.matches("/v/a.mp4") && !both.matches("/w/a.ts"));
    assert!(Rule::default().matches("/anything"));
    assert!(site("a", &[]).rule_for("/").is_none(), "no rules: the origin's word");
    assert!(video.needs_signature("/paid/x") && !video.needs_signature("/v/x"));
    assert!(!site("a", &[]).needs_signature("/paid/x"));
}

#[test]
fn ignored_query_parameters_are_stripped() {
    let rule = QueryRule { ignore: vec!["utm_*".into(), "CMCD".into(), "t".into()] };
    let cases = [
        ("a=1&utm_source=x&b=2", Some("a=1&b=2")),
        ("utm_source=x&utm_medium=y", None),
        ("CMCD=br%3D100&seg=3", Some("seg=3")),
        ("cmcd=1", Some("cmcd=1")),
        ("CMCDX=1", Some("CMCDX=1")),
        ("t", None),
        ("t=1&tt=2", Some("tt=2")),
        ("b=2&a=1", Some("b=2&a=1")),
        ("a=1&&b=2&", Some("a=1&b=2")),
        ("", None),
        ("&", None),
        ("utm_", None),
        ("utm=1", Some("utm=1")),
        ("x=utm_a", Some("x=utm_a")),
        ("=v", Some("=v")),
    ];
    for (query, expected) in cases {
        assert_eq!(rule.strip(query).as_deref(), expected, "{query:?}");
    }
    let everything = QueryRule { ignore: vec!["*".into()] };
    assert_eq!(everything.strip("a=1&b=2"), None);
    assert!(rule.ignores("utm_x") && rule.ignores("CMCD") && !rule.ignores("CMC"));
}

#[test]
fn newer_versions_and_ties() {
    let at = |version, by: &str| Versioned { version, by: by.into(), accepted_ms: 0, routing: Routing::default() };
    assert!(at(2, "a").supersedes(&at(1, "z")));
    assert!(at(2, "b").supersedes(&at(2, "a")), "a tie goes to the greater control node id");
    assert!(!at(2, "a").supersedes(&at(2, "a")));
    assert!(!at(1, "z").supersedes(&at(2, "a")));
}

/// Field names and values that make up documents, for the fuzzing below.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let names = prop::sample::select(vec![
        "default_site",
        "sites",
        "name",
        "hosts",
        "origins",
        "url",
        "weight",
        "backup",
        "ca",
        "host",
        "health",
        "path",
        "interval",
        "timeout",
        "fails",
        "passes",
        "shield",
        "share",
        "rules",
        "path_prefix",
        "path_suffix",
        "ttl",
        "negative_ttl",
        "stale_while_revalidate",
        "stale_if_error",
        "bypass",
        "cors",
        "query",
        "ignore",
        "signed",
        "keys",
        "x",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            "a",
            "",
            "/",
            "/v/",
            ".m3u8",
            "2s",
            "1d",
            "0s",
            "99999999999d",
            "http://o",
            "https://o:1/",
            "*.a.test",
            "*",
            "utm_*",
            "region",
            "www.cdn.test",
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----",
        ])
        .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((names.clone(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

proptest! {
    #[test]
    fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(routing) = Routing::from_json(&bytes) {
            let _ = routing.validate();
        }
        if let Ok(text) = std::str::from_utf8(&bytes) && let Ok(routing) = Routing::from_toml(text) {
            let _ = routing.validate();
        }
    }

    #[test]
    fn mangled_documents_never_panic(at in 0..EXAMPLE.len(), cut in 0usize..8, insert in ".{0,8}") {
        let mut bytes = EXAMPLE.as_bytes().to_vec();
        let end = (at + cut).min(bytes.len());
        bytes.splice(at..end, insert.bytes());
        if let Ok(routing) = Routing::from_json(&bytes) {
            let _ = routing.validate();
            let router = Router::new(routing);
            let _ = router.site_for(&insert);
        }
    }

    #[test]
    fn document_shaped_json_never_panics(value in json_value(), host in "[a-zA-Z0-9.:*\\[\\]-]{0,20}", path in "/?.{0,12}") {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Ok(routing) = Routing::from_json(&bytes) {
            let valid = routing.validate().is_ok();
            let router = Router::new(routing);
            if let Some(site) = router.site_for(&host)
                && let Some(rule) = site.rule_for(&path)
                && let Some(query) = &rule.query
            {
                let _ = query.strip(&path);
            }
            // A valid document survives its own encoding.
            if valid {
                let again = Routing::from_json(router.routing().to_json().as_bytes()).unwrap();
                prop_assert_eq!(&again, router.routing());
            }
        }
    }

    #[test]
    fn strip_keeps_what_is_not_ignored(names in prop::collection::vec("[a-c_]{1,3}", 0..6)) {
        let rule = QueryRule { ignore: vec!["a*".into(), "b".into()] };
        let query: Vec<String> = names.iter().enumerate().map(|(i, name)| format!("{name}={i}")).collect();
        let kept: Vec<&String> = query.iter().zip(&names).filter(|(_, name)| !name.starts_with('a') && *name != "b").map(|(q, _)| q).collect();
        let expected = (!kept.is_empty()).then(|| kept.iter().map(|q| q.as_str()).collect::<Vec<_>>().join("&"));
        prop_assert_eq!(rule.strip(&query.join("&")), expected);
    }
}
