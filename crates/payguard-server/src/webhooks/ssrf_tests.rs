//! Tests of the SSRF guard: every range at its edges, and the URL checks.

use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn forbidden_ipv4_ranges_at_their_edges() {
    for text in [
        "0.0.0.0",
        "0.255.255.255",
        "10.0.0.1",
        "10.255.255.255",
        "100.64.0.0",
        "100.127.255.255",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.0.1",
        "192.168.255.255",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
    ] {
        assert!(forbidden(ip(text)), "{text} must be forbidden");
    }
}

#[test]
fn public_ipv4_just_outside_the_ranges_is_allowed() {
    for text in [
        "1.1.1.1",
        "8.8.8.8",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "172.15.255.255",
        "172.32.0.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
    ] {
        assert!(!forbidden(ip(text)), "{text} must be allowed");
    }
}

#[test]
fn forbidden_ipv6_ranges() {
    for text in [
        "::",
        "::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "febf:ffff::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "3fff::1",
        "100::1",
        "2001::1",
        "2001:2::1",
        "64:ff9b:1::1",
    ] {
        assert!(forbidden(ip(text)), "{text} must be forbidden");
    }
}

#[test]
fn ipv6_forms_embedding_ipv4_are_judged_by_the_ipv4() {
    for text in [
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "::192.168.1.1",
        "64:ff9b::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "2002:c0a8:101::1",
    ] {
        assert!(forbidden(ip(text)), "{text} must be forbidden");
    }
    for text in ["::ffff:8.8.8.8", "64:ff9b::1.1.1.1", "2002:808:808::1"] {
        assert!(!forbidden(ip(text)), "{text} must be allowed");
    }
}

#[test]
fn public_ipv6_is_allowed() {
    for text in [
        "2606:4700:4700::1111",
        "2a00:1450:4001::1",
        "fbff::1",
        "fe7f::1",
    ] {
        assert!(!forbidden(ip(text)), "{text} must be allowed");
    }
}

#[tokio::test]
async fn urls_are_refused_for_their_shape() {
    let cases = [
        ("ftp://example.com/", UrlRefused::Scheme("ftp".into())),
        ("file:///etc/passwd", UrlRefused::Scheme("file".into())),
        ("not a url", UrlRefused::Invalid),
        ("https://user:pass@example.com/", UrlRefused::UserInfo),
        ("https://user@example.com/", UrlRefused::UserInfo),
    ];
    for (url, want) in cases {
        assert_eq!(check_url(url, true).await, Err(want), "{url}");
    }
    let long = format!("https://example.com/{}", "a".repeat(URL_LEN_MAX_BYTES));
    assert_eq!(check_url(&long, true).await, Err(UrlRefused::TooLong));
}

#[tokio::test]
async fn ip_literals_are_checked_directly() {
    let cases = [
        ("http://127.0.0.1:8080/hook", "127.0.0.1"),
        ("http://[::1]/", "::1"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
        (
            "https://169.254.169.254/latest/meta-data",
            "169.254.169.254",
        ),
        ("http://10.0.0.5/", "10.0.0.5"),
        // The URL parser reads these as 127.0.0.1, as a browser or curl would.
        ("http://2130706433/", "127.0.0.1"),
        ("http://0x7f.1/", "127.0.0.1"),
    ];
    for (url, addr) in cases {
        let want = Err(UrlRefused::ForbiddenAddress(ip(addr)));
        assert_eq!(check_url(url, false).await, want, "{url}");
        assert!(
            check_url(url, true).await.is_ok(),
            "{url} with allow_private"
        );
    }
    assert!(check_url("https://8.8.8.8/hook", false).await.is_ok());
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused() {
    for url in ["http://localhost:3000/hook", "http://LocalHost/hook"] {
        match check_url(url, false).await {
            Err(UrlRefused::ForbiddenName { ip, .. }) => assert!(ip.is_loopback(), "{ip}"),
            other => panic!("{url}: {other:?}"),
        }
    }
    assert!(check_url("http://localhost:3000/hook", true).await.is_ok());
    // With a trailing dot it is loopback or nothing, depending on the resolver.
    assert!(check_url("http://localhost./hook", false).await.is_err());
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_refused() {
    // `.invalid` is reserved never to resolve (RFC 2606).
    let got = check_url("https://no-such-host.invalid/", true).await;
    assert!(
        matches!(
            got,
            Err(UrlRefused::Unresolved(_) | UrlRefused::DnsTimeout(_))
        ),
        "{got:?}"
    );
}

#[tokio::test]
async fn the_client_resolver_applies_the_same_rule() {
    let name: Name = "localhost".parse().unwrap();
    let refused = SsrfResolver {
        allow_private: false,
    }
    .resolve(name)
    .await;
    let err = refused.err().expect("localhost must be refused");
    assert!(err.to_string().contains("loopback"), "{err}");

    let name: Name = "localhost".parse().unwrap();
    let allowed = SsrfResolver {
        allow_private: true,
    }
    .resolve(name)
    .await;
    let addrs: Vec<SocketAddr> = allowed.unwrap().collect();
    assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
}

#[test]
fn one_forbidden_address_among_public_ones_refuses_the_name() {
    let public: SocketAddr = "93.184.215.14:443".parse().unwrap();
    let loopback: SocketAddr = "127.0.0.1:443".parse().unwrap();
    assert_eq!(refuse_any_forbidden("example.com", &[public]), Ok(()));
    for addrs in [[public, loopback], [loopback, public]] {
        let want = UrlRefused::ForbiddenName {
            host: "example.com".into(),
            ip: loopback.ip(),
        };
        assert_eq!(refuse_any_forbidden("example.com", &addrs), Err(want));
    }
}
