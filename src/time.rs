//! RFC 3339 timestamps (UTC) for flow records and `--since`/`--until`,
//! without a date library: days from the civil date and back (the
//! proleptic Gregorian algorithm, as in Howard Hinnant's `days_from_civil`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, now.
pub fn now_unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// `2026-11-21T11:49:23.123456789Z`.
pub fn format_rfc3339(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let nanos = unix_ns % 1_000_000_000;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `2026-11-21T11:49:23Z`: to the second, for reports people read.
pub fn format_rfc3339_seconds(unix_ns: u64) -> String {
    let full = format_rfc3339(unix_ns);
    format!("{}Z", &full[..full.len() - 11])
}

/// `11:49:23.123`: the time of day (UTC) for compact output.
pub fn format_clock(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let rem = secs % 86400;
    format!("{:02}:{:02}:{:02}.{:03}", rem / 3600, rem % 3600 / 60, rem % 60, unix_ns % 1_000_000_000 / 1_000_000)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (a space may replace `T`).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)? as u32, num(8..10)? as u32);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        if frac.is_empty() {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().ok()?;
    }
    let offset_secs = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset_secs;
    u64::try_from(secs).ok().map(|s| s * 1_000_000_000 + nanos as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        let t = 1_795_261_763_123_456_789; // 2026-11-21T11:49:23.123456789Z
        assert_eq!(format_rfc3339(t), "2026-11-21T11:49:23.123456789Z");
        assert_eq!(parse_rfc3339("2026-11-21T11:49:23.123456789Z"), Some(t));
        assert_eq!(format_clock(t), "11:49:23.123");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-02-29T12:00:00Z"), Some(951_825_600_000_000_000));
    }

    #[test]
    fn parses_offsets_and_fractions() {
        let utc = parse_rfc3339("2026-11-21T11:49:23Z").unwrap();
        assert_eq!(parse_rfc3339("2026-11-21T12:49:23+01:00"), Some(utc));
        assert_eq!(parse_rfc3339("2026-11-21T10:49:23-01:00"), Some(utc));
        assert_eq!(parse_rfc3339("2026-11-21 11:49:23.5Z"), Some(utc + 500_000_000));
    }

    #[test]
    fn rejects_what_is_not_a_timestamp() {
        for bad in ["", "2026-11-21", "2026-13-21T11:49:23Z", "2026-11-21T11:49:23", "2026-11-21T11:49:23.Z", "5m"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
