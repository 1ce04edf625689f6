//! Text written for every request (the access line, `X-Forwarded-For`) without `core::fmt`, whose generic
//! machinery was a large share of a free request's user-space instructions (docs/performance.md has the
//! count): numbers, IP addresses, quoted strings and timestamps, appended to a byte buffer. The calendar date
//! behind a timestamp also dates the ledger's daily revenue. And the one way a configured URL is shown to
//! people (`check`, `/readyz`, logs).

use std::cell::Cell;
use std::io::Write;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends `ip` as `Display` writes it.
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        // Rare enough behind most proxies, and its compression rules are `Display`'s to keep.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

pub fn push_number(out: &mut Vec<u8>, number: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(number).as_bytes());
}

/// Appends `text` quoted and escaped as `{:?}` does, so that nothing in it can end the value or the line.
pub fn push_quoted(out: &mut Vec<u8>, text: &str) {
    let plain = text.bytes().all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{text:?}");
    }
}

/// Length of an RFC 3339 UTC timestamp to the microsecond: `2026-01-01T00:00:00.000000Z`.
pub const TIMESTAMP_LEN: usize = 27;
/// `2026-01-01T00:00:00.`: the part that changes once a second.
const SECOND_LEN: usize = 20;

thread_local! {
    /// The current second, formatted once for all the lines written within it.
    static SECOND: Cell<(u64, [u8; SECOND_LEN])> = const { Cell::new((u64::MAX, [0; SECOND_LEN])) };
}

/// The time now as the log lines show it: RFC 3339, UTC, microseconds.
pub fn timestamp_now() -> [u8; TIMESTAMP_LEN] {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    timestamp(since_epoch.as_secs(), since_epoch.subsec_micros())
}

fn timestamp(secs: u64, micros: u32) -> [u8; TIMESTAMP_LEN] {
    let (cached_secs, mut prefix) = SECOND.get();
    if cached_secs != secs {
        prefix = format_second(secs);
        SECOND.set((secs, prefix));
    }
    let mut out = [b'0'; TIMESTAMP_LEN];
    out[..SECOND_LEN].copy_from_slice(&prefix);
    let mut digits = itoa::Buffer::new();
    let micros = digits.format(micros.min(999_999)).as_bytes();
    out[TIMESTAMP_LEN - 1 - micros.len()..TIMESTAMP_LEN - 1].copy_from_slice(micros);
    out[TIMESTAMP_LEN - 1] = b'Z';
    out
}

fn format_second(secs: u64) -> [u8; SECOND_LEN] {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let in_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.";
    let mut put = |at: usize, value: u64, width: usize| {
        let mut value = value;
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year.min(9999), 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, in_day / 3600, 2);
    put(14, in_day / 60 % 60, 2);
    put(17, in_day % 60, 2);
    out
}

/// (year, month, day) of the day `days` after 1970-01-01, in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

pub use x402_chain::redacted_url;

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime as TracingTime};

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn timestamps_at_known_instants() {
        assert_eq!(text(&timestamp(0, 0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(text(&timestamp(951_825_600, 7)), "2000-02-29T12:00:00.000007Z");
        assert_eq!(text(&timestamp(1_767_225_599, 999_999)), "2025-12-31T23:59:59.999999Z");
        assert_eq!(text(&timestamp(4_107_542_400, 123_456)), "2100-03-01T00:00:00.123456Z");
    }

    #[test]
    fn timestamps_match_the_other_log_lines() {
        // tracing reads the clock itself: try again if the two readings fall in different seconds.
        for _ in 0..5 {
            let ours = timestamp_now();
            let mut theirs = String::new();
            TracingTime.format_time(&mut Writer::new(&mut theirs)).unwrap();
            if ours[..SECOND_LEN] == theirs.as_bytes()[..SECOND_LEN] {
                assert_eq!(theirs.len(), TIMESTAMP_LEN, "{theirs}");
                assert!(theirs.ends_with('Z'));
                return;
            }
        }
        panic!("our timestamps disagree with tracing's");
    }

    #[test]
    fn quoting_matches_debug() {
        for sample in ["/plain/path?a=1", "", "/a\"b", "/a\\b", "/a\nb\tc", "/é", "/\u{7f}"] {
            let mut out = Vec::new();
            push_quoted(&mut out, sample);
            assert_eq!(text(&out), format!("{sample:?}"));
        }
    }

    #[test]
    fn a_redacted_url_keeps_only_its_origin() {
        for (url, shown) in [
            ("https://base-mainnet.g.alchemy.com/v2/SECRET-KEY", "https://base-mainnet.g.alchemy.com/<redacted>"),
            ("https://facilitator.example:8443/x402?apikey=SECRET-KEY", "https://facilitator.example:8443/<redacted>"),
            ("https://user:SECRET-KEY@node.example", "https://node.example/<redacted>"),
            ("http://127.0.0.1:9", "http://127.0.0.1:9"),
            ("https://x402.org/", "https://x402.org"),
            ("not a url SECRET-KEY", "<redacted>"),
        ] {
            assert_eq!(redacted_url(url), shown, "{url}");
        }
    }

    #[test]
    fn ips_match_display() {
        for ip in
            ["127.0.0.1", "0.0.0.0", "255.255.255.255", "10.20.3.4", "100.9.10.99", "::1", "2001:db8::8a2e:370:7334"]
        {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(text(&out), ip.to_string());
        }
    }
}
