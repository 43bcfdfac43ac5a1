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
    assert_eq!(ok("no-store", false, 200, &[("cache-control", "max-age=60")]), Err(Reason::NoStore));
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
