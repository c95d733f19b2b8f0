//! UTC calendar arithmetic on Unix seconds: the day and month windows of
//! quotas, and the dates the usage API accepts.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    now_unix_ms().div_euclid(1000)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    let real = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    real + skew_ms()
}

/// Fault injection for tests, debug builds only: the wall clock moved by
/// this many milliseconds, set by a request's `X-Inferd-Fault: clock=<unix
/// seconds>` (with `INFERD_FAULT_INJECTION=1`), so a test can put the
/// server just before a UTC midnight once it is up and watch a daily quota
/// reset.
#[cfg(debug_assertions)]
static SKEW_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

#[cfg(debug_assertions)]
fn skew_ms() -> i64 {
    SKEW_MS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(not(debug_assertions))]
fn skew_ms() -> i64 {
    0
}

/// Sets the wall clock to `unix` seconds now (debug builds; a no-op in release).
pub fn set_fault_now(unix: i64) {
    #[cfg(debug_assertions)]
    {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        SKEW_MS.store(unix.saturating_mul(1000) - real, std::sync::atomic::Ordering::Relaxed);
    }
    #[cfg(not(debug_assertions))]
    let _ = unix;
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day number.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// Start of the UTC day holding `t`.
pub fn day_start(t: i64) -> i64 {
    t.div_euclid(86_400) * 86_400
}

/// Start of the UTC month holding `t`.
pub fn month_start(t: i64) -> i64 {
    let (y, m, _) = civil_from_days(t.div_euclid(86_400));
    days_from_civil(y, m, 1) * 86_400
}

/// Start of the UTC month after the one holding `t`.
pub fn next_month_start(t: i64) -> i64 {
    let (y, m, _) = civil_from_days(t.div_euclid(86_400));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * 86_400
}

/// `YYYY-MM-DD` of the UTC day holding `t`.
pub fn date_string(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The latest time the usage API accepts: 9999-12-31T23:59:59Z. With the
/// epoch as the earliest, every accepted time fits milliseconds in an i64
/// many times over.
pub const MAX_TIME: i64 = 253_402_300_799;

/// Parses a time as the usage API accepts it: Unix seconds, `YYYY-MM-DD`
/// (midnight UTC) or `YYYY-MM-DDTHH:MM:SS` with an optional `Z`, from
/// 1970 to the end of 9999; anything else is `None`.
pub fn parse_time(s: &str) -> Option<i64> {
    parse_time_unbounded(s).filter(|t| (0..=MAX_TIME).contains(t))
}

fn parse_time_unbounded(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let mut parts = date.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(t) = time {
        let mut hms = t.splitn(3, ':');
        let h: i64 = hms.next()?.parse().ok()?;
        let mi: i64 = hms.next().unwrap_or("0").parse().ok()?;
        let se: f64 = hms.next().unwrap_or("0").parse().ok()?;
        if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0.0..61.0).contains(&se) {
            return None;
        }
        secs += h * 3600 + mi * 60 + se as i64;
    }
    Some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips_and_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for z in [-1000, 0, 59, 60, 11_016, 20_000, 20_512] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        // 2026-11-25T16:00:00Z
        let t = 1_795_564_800 + 16 * 3600;
        assert_eq!(date_string(t), "2026-11-25");
        assert_eq!(day_start(t), 1_795_564_800);
        assert_eq!(date_string(month_start(t)), "2026-11-01");
        assert_eq!(date_string(next_month_start(t)), "2026-12-01");
        assert_eq!(date_string(next_month_start(parse_time("2026-12-31").unwrap())), "2027-01-01");
    }

    #[test]
    fn parses_the_accepted_time_forms() {
        assert_eq!(parse_time("1795564800"), Some(1_795_564_800));
        assert_eq!(parse_time("2026-11-25"), Some(1_795_564_800));
        assert_eq!(parse_time("2026-11-25T01:02:03Z"), Some(1_795_564_800 + 3723));
        assert_eq!(parse_time("2026-13-01"), None);
        assert_eq!(parse_time("yesterday"), None);
        // Outside 1970..=9999: refused, never wrapped.
        assert_eq!(parse_time("9300000000000000"), None);
        assert_eq!(parse_time("-1"), None);
        assert_eq!(parse_time("9223372036854775807-01-01"), None);
        assert_eq!(parse_time("10000-01-01"), None);
        assert_eq!(parse_time("9999-12-31T23:59:59Z"), Some(MAX_TIME));
        assert_eq!(parse_time(&MAX_TIME.to_string()), Some(MAX_TIME));
    }
}
