//! Server-side request forgery guard for webhook URLs.
//!
//! Why: a webhook URL makes payguard send requests wherever a customer says.
//! Pointed at `127.0.0.1`, `10.x`, or the cloud metadata address
//! `169.254.169.254`, it would reach services that trust the server's network
//! position. So (`shared/spec/API.md`) only `http`/`https` URLs are taken, and
//! loopback, private, link-local and other non-public addresses are refused
//! unless the operator passes `--webhook-allow-private`.
//!
//! Guarantees:
//! - [`forbidden`] is one pure table of ranges, IPv4 and IPv6, that also looks
//!   inside IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4).
//! - [`check_url`] (at endpoint creation) refuses a host name if ANY of its
//!   addresses is forbidden, or if none resolves within [`DNS_TIMEOUT_MS`].
//! - [`SsrfResolver`] applies the same rule each time the HTTP client resolves a
//!   name, so a name that later re-points at `127.0.0.1` (DNS rebinding) is
//!   refused at send time. The connector dials exactly the addresses the
//!   resolver returned (no second lookup), so there is no gap between check and
//!   use. It does not see IP literals, which the hyper connector never
//!   resolves: the sender checks those itself.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Longest webhook URL accepted, in bytes.
pub const URL_LEN_MAX_BYTES: usize = 2048;
/// Longest wait for one name's addresses, in milliseconds.
pub const DNS_TIMEOUT_MS: u64 = 2_000;

/// Non-public IPv4 ranges as (network, prefix length).
const FORBIDDEN_V4: &[(Ipv4Addr, u32)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network", unspecified
    (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
    (Ipv4Addr::new(100, 64, 0, 0), 10),   // carrier-grade NAT
    (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local, cloud metadata
    (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
    (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation TEST-NET-1
    (Ipv4Addr::new(192, 88, 99, 0), 24),  // 6to4 relay anycast
    (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
    (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation TEST-NET-2
    (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation TEST-NET-3
    (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, and 255.255.255.255 broadcast
];

/// Non-public IPv6 ranges as (network, prefix length). The IPv4-embedding
/// prefixes (::/96, ::ffff:0:0/96, 64:ff9b::/96, 2002::/16) are handled apart.
const FORBIDDEN_V6: &[(Ipv6Addr, u32)] = &[
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),     // discard-only
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32),    // Teredo (obfuscated IPv4)
    (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48),    // benchmarking
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),    // documentation (RFC 9637)
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),     // unique local
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),    // link-local
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),    // site-local (deprecated)
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),     // multicast
];

/// Why a webhook URL is refused; the message is fit for a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("the url is longer than {URL_LEN_MAX_BYTES} bytes")]
    TooLong,
    #[error("the url is not a valid absolute URL")]
    Invalid,
    #[error("the url's scheme must be http or https, not {0}")]
    Scheme(String),
    #[error("the url has no host")]
    NoHost,
    #[error("the url must not carry a user name or password")]
    UserInfo,
    #[error("{0} is a loopback, private, link-local or reserved address")]
    ForbiddenAddress(IpAddr),
    #[error("{host} resolves to {ip}, a loopback, private, link-local or reserved address")]
    ForbiddenName { host: String, ip: IpAddr },
    #[error("{0} does not resolve to any address")]
    Unresolved(String),
    #[error("resolving {0} took longer than {DNS_TIMEOUT_MS} ms")]
    DnsTimeout(String),
}

fn in_v4(ip: Ipv4Addr, (net, prefix): (Ipv4Addr, u32)) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6(ip: Ipv6Addr, (net, prefix): (Ipv6Addr, u32)) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The IPv4 address an IPv6 address stands for, when it embeds one:
/// IPv4-compatible `::a.b.c.d` (also `::` and `::1`, which land in 0/8),
/// IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:AABB:CCDD::`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    let nat64 = (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);
    let six_to_four = (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16);
    if bits >> 32 == 0 || bits >> 32 == 0xffff || in_v6(ip, nat64) {
        Some(low32)
    } else if in_v6(ip, six_to_four) {
        Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32))
    } else {
        None
    }
}

/// True when a webhook must not be sent to `ip` (without `--webhook-allow-private`).
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => FORBIDDEN_V4.iter().any(|&range| in_v4(v4, range)),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => FORBIDDEN_V6.iter().any(|&range| in_v6(v6, range)),
        },
    }
}

/// Every address `host` resolves to, or why none may be used: any forbidden
/// address refuses the whole name (the client could pick any of them).
pub async fn resolve_allowed(
    host: &str,
    port: u16,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, UrlRefused> {
    let lookup = tokio::net::lookup_host((host, port));
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(Duration::from_millis(DNS_TIMEOUT_MS), lookup)
            .await
            .map_err(|_| UrlRefused::DnsTimeout(host.to_owned()))?
            .map_err(|_| UrlRefused::Unresolved(host.to_owned()))?
            .collect();
    if addrs.is_empty() {
        return Err(UrlRefused::Unresolved(host.to_owned()));
    }
    if !allow_private {
        refuse_any_forbidden(host, &addrs)?;
    }
    Ok(addrs)
}

/// One forbidden address among a name's addresses refuses the name: the
/// client may try them in any order, and an attacker controls the order.
fn refuse_any_forbidden(host: &str, addrs: &[SocketAddr]) -> Result<(), UrlRefused> {
    match addrs.iter().find(|a| forbidden(a.ip())) {
        Some(bad) => Err(UrlRefused::ForbiddenName {
            host: host.to_owned(),
            ip: bad.ip(),
        }),
        None => Ok(()),
    }
}

/// The URL's own checks, no DNS: length, scheme, host, no user info, and an
/// IP literal host against [`forbidden`]. The sender runs this before each send.
pub fn check_url_syntax(url: &str, allow_private: bool) -> Result<Url, UrlRefused> {
    if url.len() > URL_LEN_MAX_BYTES {
        return Err(UrlRefused::TooLong);
    }
    let parsed = Url::parse(url).map_err(|_| UrlRefused::Invalid)?;
    check_parsed(&parsed, allow_private)?;
    Ok(parsed)
}

/// [`check_url_syntax`] on an already parsed URL.
pub fn check_parsed(url: &Url, allow_private: bool) -> Result<(), UrlRefused> {
    if url.as_str().len() > URL_LEN_MAX_BYTES {
        return Err(UrlRefused::TooLong);
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlRefused::Scheme(url.scheme().to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefused::UserInfo);
    }
    let ip = match url.host() {
        None => return Err(UrlRefused::NoHost),
        Some(url::Host::Domain(_)) => return Ok(()),
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
    };
    if !allow_private && forbidden(ip) {
        return Err(UrlRefused::ForbiddenAddress(ip));
    }
    Ok(())
}

/// The check at endpoint creation: [`check_url_syntax`], then a host name must
/// resolve, to allowed addresses only.
pub async fn check_url(url: &str, allow_private: bool) -> Result<Url, UrlRefused> {
    let parsed = check_url_syntax(url, allow_private)?;
    if let Some(url::Host::Domain(name)) = parsed.host() {
        let port = parsed.port_or_known_default().unwrap_or(0);
        resolve_allowed(name, port, allow_private).await?;
    }
    Ok(parsed)
}

/// The HTTP client's resolver: the same rule as [`check_url`] on every
/// connection, so rebinding a name to a private address after creation fails.
#[derive(Debug, Clone, Copy)]
pub struct SsrfResolver {
    pub allow_private: bool,
}

impl Resolve for SsrfResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            // Port 0: the connector puts the URL's port on each address.
            let addrs = resolve_allowed(name.as_str(), 0, allow_private).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
#[path = "ssrf_tests.rs"]
mod tests;
