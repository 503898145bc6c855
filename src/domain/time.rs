//! Time as the domain sees it: instants are milliseconds since the UNIX epoch (UTC), and usage
//! is bucketed by UTC calendar day. The date arithmetic is the proleptic-Gregorian algorithm from
//! Howard Hinnant's `days_from_civil`, written out here because it is twenty lines and a date
//! crate would be the heaviest dependency of the domain.

use std::fmt;

/// Milliseconds since 1970-01-01T00:00:00Z.
pub type Millis = i64;

pub const MILLIS_PER_MINUTE: Millis = 60_000;
pub const MILLIS_PER_HOUR: Millis = 3_600_000;
pub const MILLIS_PER_DAY: Millis = 86_400_000;

/// A UTC calendar day, stored as days since 1970-01-01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcDate(i32);

impl UtcDate {
    /// The day containing the instant `ms`.
    pub fn from_millis(ms: Millis) -> Self {
        UtcDate(ms.div_euclid(MILLIS_PER_DAY) as i32)
    }

    pub fn from_days(days: i32) -> Self {
        UtcDate(days)
    }

    pub fn days_since_epoch(self) -> i32 {
        self.0
    }

    /// First millisecond of the day.
    pub fn start_millis(self) -> Millis {
        Millis::from(self.0) * MILLIS_PER_DAY
    }

    pub fn succ(self) -> Self {
        UtcDate(self.0 + 1)
    }

    /// Every day from `from` to `to`, both included.
    pub fn range(from: UtcDate, to: UtcDate) -> impl Iterator<Item = UtcDate> {
        (from.0..=to.0).map(UtcDate)
    }

    /// Parses exactly `YYYY-MM-DD` (four-digit year 1970-9999, real month and day).
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if !text.is_ascii() || bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return None;
        }
        let digits = |range: std::ops::Range<usize>| -> Option<u32> {
            let part = &text[range];
            if part.bytes().all(|b| b.is_ascii_digit()) {
                part.parse().ok()
            } else {
                None
            }
        };
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        if year < 1970 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month)
        {
            return None;
        }
        Some(UtcDate(days_from_civil(year as i32, month, day)))
    }

    /// (year, month, day).
    pub fn civil(self) -> (i32, u32, u32) {
        civil_from_days(self.0)
    }

    /// `YYYYMMDD`, the compact form used in storage key names.
    pub fn compact(self) -> String {
        let mut out = String::with_capacity(8);
        self.push_compact(&mut out);
        out
    }

    /// Appends `YYYYMMDD` (written digit by digit: this runs on every VerifyKey).
    pub fn push_compact(self, out: &mut String) {
        let (y, m, d) = self.civil();
        let y = y.clamp(0, 9999) as u32;
        for digit in [
            y / 1000,
            y / 100 % 10,
            y / 10 % 10,
            y % 10,
            m / 10,
            m % 10,
            d / 10,
            d % 10,
        ] {
            out.push(char::from(b'0' + digit as u8));
        }
    }
}

/// `ms` as RFC 3339 UTC with milliseconds (`2026-11-27T19:14:27.904Z`), for messages people
/// read (audit details, logs).
pub fn rfc3339(ms: Millis) -> String {
    let date = UtcDate::from_millis(ms);
    let in_day = ms - date.start_millis();
    format!(
        "{date}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / MILLIS_PER_HOUR,
        in_day % MILLIS_PER_HOUR / MILLIS_PER_MINUTE,
        in_day % MILLIS_PER_MINUTE / 1000,
        in_day % 1000
    )
}

impl fmt::Display for UtcDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(year) => 29,
        _ => 28,
    }
}

fn days_from_civil(year: i32, month: u32, day: u32) -> i32 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i32;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i32 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i32) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i32::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_known_dates_round_trip() {
        assert_eq!(UtcDate::parse("1970-01-01"), Some(UtcDate(0)));
        let d = UtcDate::parse("2024-02-29").expect("leap day");
        assert_eq!(d.to_string(), "2024-02-29");
        assert_eq!(d.compact(), "20240229");
        assert_eq!(d.succ().to_string(), "2024-03-01");
        // 2026-11-27T00:00:00Z = 1795737600 s.
        assert_eq!(
            UtcDate::parse("2026-11-27").map(|d| d.start_millis()),
            Some(1_795_737_600_000)
        );
        for days in -1000..30_000 {
            let date = UtcDate(days);
            if days >= 0 {
                assert_eq!(UtcDate::parse(&date.to_string()), Some(date));
            }
        }
    }

    #[test]
    fn rejects_malformed_and_impossible_dates() {
        for bad in [
            "",
            "2024-2-01",
            "2024-02-30",
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-01-00",
            "1969-12-31",
            "+024-01-01",
            "2024-é-01",
            "2024/01/01",
            "2024-01-01T00",
            "２０２４-01-01",
        ] {
            assert_eq!(UtcDate::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_formats_utc_with_millis() {
        assert_eq!(rfc3339(1_795_806_867_904), "2026-11-27T19:14:27.904Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn from_millis_buckets_by_utc_midnight() {
        let midnight = UtcDate::parse("2026-03-01")
            .map(|d| d.start_millis())
            .unwrap_or_default();
        assert_eq!(UtcDate::from_millis(midnight - 1).to_string(), "2026-02-28");
        assert_eq!(UtcDate::from_millis(midnight).to_string(), "2026-03-01");
    }
}
