use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use proptest::prelude::*;

use super::*;

#[test]
fn kept_fills() {
    let ok = Ok(());
    assert_eq!(keep(ok, StatusCode::OK, Some(10), 10, false), Ok(()));
    assert_eq!(keep(ok, StatusCode::OK, Some(11), 10, false), Err(Reason::TooLarge));
    assert_eq!(keep(ok, StatusCode::OK, None, 10, false), Ok(()), "unknown length: checked as it arrives");
    assert_eq!(keep(ok, StatusCode::BAD_GATEWAY, None, 10, true), Err(Reason::ErrorOverStale));
    assert_eq!(keep(ok, StatusCode::NOT_FOUND, None, 10, true), Ok(()), "a 404 replaces a stale copy");
    assert_eq!(keep(Err(Reason::Private), StatusCode::OK, Some(11), 10, true), Err(Reason::Private));
    assert!(Reason::Private.remember() && Reason::NoStore.remember());
    assert!(!Reason::TooLarge.remember() && !Reason::ErrorOverStale.remember());
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(header::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    map
}

#[test]
fn parses_directives() {
    let d = Directives::parse("public, max-age=60, s-maxage=\"120\", stale-while-revalidate=30, stale-if-error=600");
    assert!(d.public);
    assert_eq!(d.max_age, Some(60));
    assert_eq!(d.s_maxage, Some(120));
    assert_eq!(d.stale_while_revalidate, Some(30));
    assert_eq!(d.stale_if_error, Some(600));
    let d = Directives::parse("NO-STORE, Private=\"set-cookie, x\", no-cache=\"a\"");
    assert!(d.no_store && d.private && d.no_cache);
    // Invalid or negative max-age: treated as stale; first occurrence wins.
    assert_eq!(Directives::parse("max-age=abc").max_age, Some(0));
    assert_eq!(Directives::parse("max-age=-1").max_age, Some(0));
    assert_eq!(Directives::parse("max-age=10, max-age=20").max_age, Some(10));
    assert_eq!(Directives::parse("max-age=99999999999999999999").max_age, Some(DELTA_MAX));
    assert_eq!(Directives::parse("max-stale").max_stale, Some(None));
    assert_eq!(Directives::parse("max-stale=5").max_stale, Some(Some(5)));
    let mut two = HeaderMap::new();
    two.append(header::CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
    two.append(header::CACHE_CONTROL, HeaderValue::from_static("must-revalidate"));
    let d = Directives::from_headers(&two);
    assert!(d.must_revalidate && d.max_age == Some(5));
}

#[test]
fn storability() {
    let s = Settings::default();
    let ok = |req: &str, auth: bool, status: u16, h: &[(&str, &str)]| {
        let h = headers(h);
        let resp = Directives::from_headers(&h);
        storable(&Method::GET, &Directives::parse(req), auth, StatusCode::from_u16(status).unwrap(), &h, &resp, &s)
    };
    assert_eq!(ok("", false, 200, &[("cache-control", "max-age=60")]), Ok(()));
    assert_eq!(ok("", false, 200, &[("cache-control", "no-store")]), Err(Reason::NoStore));
    assert_eq!(ok("no-store", false, 200, &[("cache-control", "max-age=60")]), Err(Reason::RequestNoStore));
    assert!(!Reason::RequestNoStore.remember(), "one client's no-store does not make the URL uncacheable");
    assert_eq!(ok("", false, 200, &[("cache-control", "private, max-age=60")]), Err(Reason::Private));
    assert_eq!(ok("", true, 200, &[("cache-control", "max-age=60")]), Err(Reason::Authorization));
    assert_eq!(ok("", true, 200, &[("cache-control", "s-maxage=60")]), Ok(()));
    assert_eq!(ok("", true, 200, &[("cache-control", "public, max-age=60")]), Ok(()));
    assert_eq!(ok("", false, 200, &[("cache-control", "max-age=60"), ("vary", "*")]), Err(Reason::VaryStar));
    assert_eq!(ok("", false, 200, &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]), Err(Reason::SetCookie));
    assert_eq!(ok("", false, 500, &[]), Err(Reason::NoFreshness));
    assert_eq!(ok("", false, 500, &[("cache-control", "max-age=5")]), Ok(()));
    assert_eq!(ok("", false, 206, &[("cache-control", "max-age=5")]), Err(Reason::Status));
    assert_eq!(ok("", false, 404, &[]), Ok(()));
    let h = headers(&[("cache-control", "max-age=60")]);
    assert_eq!(
        storable(&Method::POST, &Directives::default(), false, StatusCode::OK, &h, &Directives::from_headers(&h), &s),
        Err(Reason::Method)
    );
}

#[test]
fn lifetime_precedence() {
    let s = Settings::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let date = httpdate::fmt_http_date(now);
    let in_100 = httpdate::fmt_http_date(now + Duration::from_secs(100));
    let h = |pairs: &[(&str, &str)]| headers(pairs);
    let life = |h: &HeaderMap| freshness_lifetime(StatusCode::OK, h, &Directives::from_headers(h), now, &s);
    let all = h(&[("cache-control", "max-age=10, s-maxage=20"), ("date", &date), ("expires", &in_100)]);
    assert_eq!(life(&all), Duration::from_secs(20));
    assert_eq!(
        life(&h(&[("cache-control", "max-age=10"), ("date", &date), ("expires", &in_100)])),
        Duration::from_secs(10)
    );
    assert_eq!(life(&h(&[("date", &date), ("expires", &in_100)])), Duration::from_secs(100));
    assert_eq!(life(&h(&[("date", &date), ("expires", "0")])), Duration::ZERO);
    let lm = httpdate::fmt_http_date(now - Duration::from_secs(1000));
    assert_eq!(life(&h(&[("date", &date), ("last-modified", &lm)])), Duration::from_secs(100));
    let old = httpdate::fmt_http_date(now - Duration::from_secs(100 * 86_400));
    assert_eq!(life(&h(&[("date", &date), ("last-modified", &old)])), Duration::from_secs(86_400));
    assert_eq!(life(&h(&[("date", &date)])), Duration::ZERO);
}

#[test]
fn age_calculation() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let h = headers(&[("date", &httpdate::fmt_http_date(t0)), ("age", "30")]);
    let timing = Timing::new(&h, t0, t0 + Duration::from_secs(2));
    // corrected age value = 30 + 2 (response delay) beats apparent age 2.
    assert_eq!(timing.initial_age, Duration::from_secs(32));
    assert_eq!(timing.current_age(t0 + Duration::from_secs(12)), Duration::from_secs(42));
}

#[test]
fn evaluation() {
    let d = Directives::parse;
    let s = Duration::from_secs;
    assert_eq!(evaluate(&d(""), false, &d("max-age=60"), s(60), s(10), false), Action::Fresh);
    assert_eq!(evaluate(&d(""), false, &d("max-age=60"), s(60), s(60), false), Action::Revalidate);
    assert_eq!(evaluate(&d("no-cache"), false, &d("max-age=60"), s(60), s(1), false), Action::Revalidate);
    assert_eq!(evaluate(&d(""), true, &d("max-age=60"), s(60), s(1), false), Action::Revalidate);
    assert_eq!(evaluate(&d("max-age=0"), false, &d("max-age=60"), s(60), s(1), false), Action::Revalidate);
    assert_eq!(evaluate(&d("min-fresh=30"), false, &d("max-age=60"), s(60), s(40), false), Action::Revalidate);
    assert_eq!(evaluate(&d(""), false, &d("no-cache, max-age=60"), s(60), s(1), false), Action::Revalidate);
    let swr = d("max-age=10, stale-while-revalidate=30");
    assert_eq!(evaluate(&d(""), false, &swr, s(10), s(20), false), Action::StaleWhileRevalidate);
    assert_eq!(evaluate(&d(""), false, &swr, s(10), s(50), false), Action::Revalidate);
    let mr = d("max-age=10, stale-while-revalidate=30, must-revalidate");
    assert_eq!(evaluate(&d(""), false, &mr, s(10), s(20), false), Action::Revalidate);
    assert_eq!(evaluate(&d("max-stale"), false, &d("max-age=10"), s(10), s(1000), false), Action::StaleAllowed);
    assert_eq!(evaluate(&d("max-stale=5"), false, &d("max-age=10"), s(10), s(20), false), Action::Revalidate);
    // A soft-purged response is revalidated however fresh it is.
    assert_eq!(evaluate(&d(""), false, &d("max-age=60"), s(60), s(1), true), Action::Revalidate);
    assert_eq!(evaluate(&d("max-stale"), false, &swr, s(10), s(20), true), Action::Revalidate);
    assert!(stale_if_error(&d(""), &d("max-age=10, stale-if-error=60"), s(10), s(30)));
    assert!(!stale_if_error(&d(""), &d("max-age=10, stale-if-error=60"), s(10), s(100)));
    assert!(stale_if_error(&d("stale-if-error=600"), &d("max-age=10"), s(10), s(100)));
    assert!(!stale_if_error(&d(""), &d("max-age=10, stale-if-error=60, must-revalidate"), s(10), s(30)));
}

#[test]
fn vary() {
    assert_eq!(vary_names(&headers(&[("vary", "Accept-Encoding, accept-language")])).unwrap().len(), 2);
    assert!(vary_names(&headers(&[("vary", "accept-encoding, *")])).is_none());
    assert!(vary_names(&headers(&[])).unwrap().is_empty());
}

proptest! {
    #[test]
    fn cache_control_parsing_never_panics(text in "[ -~]{0,80}") {
        let d = Directives::parse(&text);
        if let Some(age) = d.max_age { prop_assert!(age <= DELTA_MAX); }
    }

    #[test]
    fn fresh_iff_age_below_lifetime(lifetime in 0u64..10_000, age in 0u64..10_000) {
        let action = evaluate(&Directives::default(), false, &Directives::default(), Duration::from_secs(lifetime), Duration::from_secs(age), false);
        prop_assert_eq!(action == Action::Fresh, age < lifetime);
    }
}

/// The corners a strict cache tester tries (RFC 9111 §4.2.1, §5.2, §1.2.2).
#[test]
fn malformed_and_duplicate_directives() {
    let max_age = |text: &str| Directives::parse(text).max_age;
    // Duplicates: the first occurrence counts (§4.2.1 allows "first" or "stale").
    assert_eq!(max_age("max-age=1, max-age=3600"), Some(1));
    assert_eq!(max_age("max-age=3600, MAX-AGE=1"), Some(3600));
    // Whitespace around "=" is not the syntax: the value is invalid, so stale.
    assert_eq!(max_age("max-age = 5"), Some(0));
    assert_eq!(max_age("max-age =5"), Some(0));
    assert_eq!(max_age("max-age= 5"), Some(0));
    // Not delta-seconds: stale.
    assert_eq!(max_age("max-age=5.0"), Some(0));
    assert_eq!(max_age("max-age=a100"), Some(0));
    assert_eq!(max_age("max-age=100a"), Some(0));
    assert_eq!(max_age("max-age=+5"), Some(0));
    assert_eq!(max_age("max-age="), Some(0));
    assert_eq!(max_age("max-age"), Some(0));
    assert_eq!(max_age("max-age=\"5"), Some(0));
    // The quoted form is accepted (§5.2: recipients accept both forms).
    assert_eq!(max_age("max-age=\"5\""), Some(5));
    // Whitespace around the commas is fine.
    assert_eq!(max_age("  public ,max-age=7 , "), Some(7));
    // A quoted argument may contain commas and "=".
    let d = Directives::parse("private=\"a, max-age=9\", max-age=3");
    assert!(d.private);
    assert_eq!(d.max_age, Some(3));
}

#[test]
fn age_header_corners() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let date = httpdate::fmt_http_date(t0);
    let initial = |age: &str| Timing::new(&headers(&[("date", &date), ("age", age)]), t0, t0).initial_age;
    assert_eq!(initial("30"), Duration::from_secs(30));
    assert_eq!(initial(" 30 "), Duration::from_secs(30));
    // Junk after the number, a list, a sign or a fraction: invalid, ignored (age 0).
    for bad in ["30abc", "30, 40", "-30", "30.5", "+30", "abc", ""] {
        assert_eq!(initial(bad), Duration::ZERO, "Age: {bad:?}");
    }
    assert_eq!(initial("99999999999999999999999"), Duration::from_secs(DELTA_MAX));
}

#[test]
fn cdn_cache_control_wins() {
    let s = Settings::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let date = httpdate::fmt_http_date(now);
    let in_100 = httpdate::fmt_http_date(now + Duration::from_secs(100));
    let life = |h: &HeaderMap| freshness_lifetime(StatusCode::OK, h, &Directives::response(h), now, &s);
    let store = |h: &HeaderMap| {
        storable(&Method::GET, &Directives::default(), false, StatusCode::OK, h, &Directives::response(h), &s)
    };
    // CDN-Cache-Control beats Cache-Control both ways.
    let h = headers(&[("cdn-cache-control", "max-age=60"), ("cache-control", "no-store")]);
    assert_eq!(Directives::response(&h).source, Source::CdnCacheControl);
    assert_eq!(store(&h), Ok(()));
    assert_eq!(life(&h), Duration::from_secs(60));
    let h = headers(&[("cdn-cache-control", "no-store"), ("cache-control", "max-age=60")]);
    assert_eq!(store(&h), Err(Reason::NoStore));
    let h = headers(&[("cdn-cache-control", "private"), ("cache-control", "public, max-age=60")]);
    assert_eq!(store(&h), Err(Reason::Private));
    // Expires is ignored beside a targeted field (here: heuristic freshness applies).
    let h = headers(&[("cdn-cache-control", "public"), ("date", &date), ("expires", &in_100)]);
    assert_eq!(life(&h), Duration::ZERO);
    // An invalid field is ignored as a whole: Cache-Control applies.
    for bad in ["max-age=60,", "max-age=60;;", "max-age=\"60", "Max-Age=60", "max-age=60 no-store", ""] {
        let h = headers(&[("cdn-cache-control", bad), ("cache-control", "max-age=5")]);
        assert_eq!(Directives::response(&h).source, Source::CacheControl, "{bad:?}");
        assert_eq!(life(&h), Duration::from_secs(5), "{bad:?}");
    }
    // Members violating a directive's constraints are not consumed.
    let d = |text: &str| Directives::targeted(&headers(&[("cdn-cache-control", text)])).unwrap();
    assert_eq!(d("max-age=5.0").max_age, None);
    assert_eq!(d("max-age=\"5\"").max_age, None);
    assert_eq!(d("max-age=-5").max_age, None);
    assert!(!d("no-store=3").no_store);
    assert!(!d("no-store=?0").no_store);
    assert!(d("no-store=?1").no_store);
    assert!(d("private=(\"set-cookie\")").private && d("no-cache=\"x\"").no_cache);
    // Parameters are ignored; a duplicate key: the last one (Structured Fields).
    assert_eq!(d("max-age=30;foo=bar").max_age, Some(30));
    assert_eq!(d("max-age=1, max-age=30").max_age, Some(30));
    // Every directive the issue names.
    let all = d("s-maxage=9, must-revalidate, no-cache, stale-while-revalidate=7, stale-if-error=8, proxy-revalidate");
    assert_eq!((all.s_maxage, all.stale_while_revalidate, all.stale_if_error), (Some(9), Some(7), Some(8)));
    assert!(all.must_revalidate && all.no_cache && all.proxy_revalidate);
    // Two field lines are one dictionary.
    let two = headers(&[("cdn-cache-control", "max-age=60"), ("cdn-cache-control", "must-revalidate")]);
    let t = Directives::targeted(&two).unwrap();
    assert!(t.must_revalidate && t.max_age == Some(60));
    // "none" (RFC 9213 §3.1) is valid and non-empty: Cache-Control no-store is ignored,
    // the response is stored with heuristic or no freshness.
    let h = headers(&[("cdn-cache-control", "none"), ("cache-control", "no-store")]);
    assert_eq!(store(&h), Ok(()));
}

#[test]
fn surrogate_control() {
    let s = Settings::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let life = |h: &HeaderMap| freshness_lifetime(StatusCode::OK, h, &Directives::response(h), now, &s);
    let h = headers(&[("surrogate-control", "max-age=300, content=\"ESI/1.0\""), ("cache-control", "no-store")]);
    assert_eq!(Directives::response(&h).source, Source::SurrogateControl);
    assert_eq!(life(&h), Duration::from_secs(300));
    let h = headers(&[("surrogate-control", "no-store"), ("cache-control", "max-age=60")]);
    assert!(Directives::response(&h).no_store);
    assert!(Directives::response(&headers(&[("surrogate-control", "no-store-remote")])).no_store);
    // content= alone is not a caching directive: Cache-Control applies.
    let h = headers(&[("surrogate-control", "content=\"ESI/1.0\""), ("cache-control", "max-age=5")]);
    assert_eq!(Directives::response(&h).source, Source::CacheControl);
    assert_eq!(life(&h), Duration::from_secs(5));
    // max-age=N+M: M is a stale-if-error window.
    let d = Directives::response(&headers(&[("surrogate-control", "max-age=60+600")]));
    assert_eq!((d.max_age, d.stale_if_error), (Some(60), Some(600)));
    // CDN-Cache-Control beats Surrogate-Control.
    let h = headers(&[("surrogate-control", "max-age=300"), ("cdn-cache-control", "max-age=30")]);
    assert_eq!(life(&h), Duration::from_secs(30));
}

#[test]
fn updates_leave_framing_and_cookies_alone() {
    let s = Settings::default();
    assert!(keep_on_update(&header::CONTENT_RANGE, &s));
    assert!(keep_on_update(&header::CONTENT_LENGTH, &s));
    assert!(keep_on_update(&header::SET_COOKIE, &s));
    assert!(!keep_on_update(&header::CACHE_CONTROL, &s));
    let store = Settings { store_set_cookie: true, ..Settings::default() };
    assert!(!keep_on_update(&header::SET_COOKIE, &store));
}

#[test]
fn heuristic_only_for_heuristic_statuses() {
    let s = Settings { heuristic_max: Duration::from_secs(50), ..Settings::default() };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let date = httpdate::fmt_http_date(now);
    let lm = httpdate::fmt_http_date(now - Duration::from_secs(300));
    let h = headers(&[("date", &date), ("last-modified", &lm)]);
    let life =
        |status: u16| freshness_lifetime(StatusCode::from_u16(status).unwrap(), &h, &Directives::response(&h), now, &s);
    assert_eq!(life(200), Duration::from_secs(30), "10 % of 300 s");
    assert_eq!(life(302), Duration::ZERO, "302 is not heuristically cacheable");
    let old = httpdate::fmt_http_date(now - Duration::from_secs(3000));
    let h = headers(&[("date", &date), ("last-modified", &old)]);
    assert_eq!(freshness_lifetime(StatusCode::OK, &h, &Directives::response(&h), now, &s), Duration::from_secs(50));
    // A Last-Modified in the future gives nothing.
    let future = httpdate::fmt_http_date(now + Duration::from_secs(3000));
    let h = headers(&[("date", &date), ("last-modified", &future)]);
    assert_eq!(freshness_lifetime(StatusCode::OK, &h, &Directives::response(&h), now, &s), Duration::ZERO);
}

proptest! {
    #[test]
    fn targeted_parsing_never_panics(text in "[ -~]{0,80}", cc in "[ -~]{0,40}") {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&text) { h.insert(CDN_CACHE_CONTROL, v.clone()); h.insert(SURROGATE_CONTROL, v); }
        if let Ok(v) = HeaderValue::from_str(&cc) { h.insert(header::CACHE_CONTROL, v); }
        let d = Directives::response(&h);
        for v in [d.max_age, d.s_maxage, d.stale_if_error, d.stale_while_revalidate].into_iter().flatten() {
            prop_assert!(v <= DELTA_MAX);
        }
        // A parsed targeted field always wins; otherwise Cache-Control's parse.
        if let Some(t) = Directives::targeted(&h) { prop_assert_eq!(d, t); }
    }

    #[test]
    fn targeted_max_age_round_trips(n in 0u64..1_000_000_000_000, extra in "(, (no-store|public|must-revalidate|x=1|y=\"z\"))?") {
        let h = headers(&[("cdn-cache-control", &format!("max-age={n}{extra}"))]);
        prop_assert_eq!(Directives::response(&h).max_age, Some(n.min(DELTA_MAX)));
    }

    #[test]
    fn max_age_with_spaces_or_junk_is_stale(n in 0u64..100_000, junk in "( =| = |= |\\.0|a|x| ,max-age=9)") {
        let before = matches!(junk.as_str(), " =" | " = " | "= ");
        let text = if before { format!("max-age{junk}{n}") } else { format!("max-age={n}{junk}") };
        let d = Directives::parse(&text);
        prop_assert_eq!(d.max_age, if junk == " ,max-age=9" { Some(n) } else { Some(0) }, "{}", text);
    }

    #[test]
    fn age_with_junk_is_ignored(n in 0u64..100_000, junk in "[a-z., -]{1,5}") {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(&[("date", &httpdate::fmt_http_date(t0)), ("age", &format!("{n}{junk}"))]);
        let trimmed_ok = junk.trim().is_empty();
        let expected = if trimmed_ok { n } else { 0 };
        prop_assert_eq!(Timing::new(&h, t0, t0).initial_age, Duration::from_secs(expected));
    }
}

#[test]
fn head_responses_update_or_invalidate() {
    let stored =
        headers(&[("etag", "\"a\""), ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"), ("content-length", "10")]);
    assert_eq!(head_update(&stored, &headers(&[("etag", "\"a\""), ("x-new", "1")])), HeadUpdate::Update);
    assert_eq!(head_update(&stored, &headers(&[])), HeadUpdate::Update);
    assert_eq!(head_update(&stored, &headers(&[("etag", "\"b\"")])), HeadUpdate::Invalidate);
    assert_eq!(head_update(&stored, &headers(&[("content-length", "11")])), HeadUpdate::Invalidate);
    assert_eq!(
        head_update(&stored, &headers(&[("last-modified", "Mon, 07 Nov 1994 08:49:37 GMT")])),
        HeadUpdate::Invalidate
    );
    // A validator the stored response lacks: the representation is not known to be the same.
    assert_eq!(head_update(&headers(&[]), &headers(&[("etag", "\"a\"")])), HeadUpdate::Invalidate);
}
