//! Civil-date arithmetic for due dates and date-field validation.
//!
//! We implement the proleptic Gregorian conversions ourselves (Howard Hinnant's
//! `days_from_civil` / `civil_from_days`) instead of pulling in `chrono`: the
//! case model only ever needs "which calendar day is this instant in Vietnam"
//! and "add N days", and a small exact algorithm is easier to audit than a
//! dependency.
//!
//! All dates are Vietnam civil dates: the commune works on Indochina Time
//! (UTC+7, no daylight saving), so a case taken at 06:30 local time on
//! 2025-03-02 must be dated 2025-03-02 even though it is still 03-01 in UTC.

/// Offset of Indochina Time from UTC, in milliseconds. Vietnam has no DST,
/// so a fixed offset is exact.
pub const VN_OFFSET_MS: i64 = 7 * 60 * 60 * 1000;

const MS_PER_DAY: i64 = 24 * 60 * 60 * 1000;

/// Days since 1970-01-01 of the civil date `y-m-d` (m 1..=12, d 1..=31).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400; // [0, 399]
    let m = i64::from(m);
    let d = i64::from(d);
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March-based month [0, 11]
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`]: the civil date `(y, m, d)` of a day number.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = if m <= 2 { y + 1 } else { y };
    // d and m are provably in range, so the narrowing casts cannot truncate.
    (y, m as u32, d as u32)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Number of days in month `m` of year `y`.
pub fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Parse a strict `YYYY-MM-DD` date and return its day number.
///
/// Strict on purpose: officers type dates by hand on field laptops, and a
/// silently misread "2024-2-30" on a birth registration is worse than an error.
pub fn parse_date(s: &str) -> Result<i64, String> {
    let b = s.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return Err(format!("'{s}' is not a date in the form YYYY-MM-DD"));
    }
    let num = |r: std::ops::Range<usize>| -> i64 {
        b[r].iter()
            .fold(0i64, |acc, c| acc * 10 + i64::from(c - b'0'))
    };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    if !(1..=12).contains(&m) {
        return Err(format!("'{s}' has month {m}, which does not exist"));
    }
    let m = m as u32;
    let dim = days_in_month(y, m);
    if d < 1 || d > i64::from(dim) {
        return Err(format!(
            "'{s}' is not a real date (that month has {dim} days)"
        ));
    }
    Ok(days_from_civil(y, m, d as u32))
}

/// Format a day number as `YYYY-MM-DD`.
pub fn format_date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The Vietnam civil day number of an instant given in Unix milliseconds.
pub fn vn_day(ms: i64) -> i64 {
    ms.saturating_add(VN_OFFSET_MS).div_euclid(MS_PER_DAY)
}

/// The Vietnam civil date (`YYYY-MM-DD`) of an instant in Unix milliseconds.
pub fn vn_date(ms: i64) -> String {
    format_date(vn_day(ms))
}

/// Due date of a case created at `created_at_ms` with a processing time of
/// `processing_days` *calendar* days (see [`crate::case::ProcedureDef`]).
pub fn due_date(created_at_ms: i64, processing_days: u32) -> String {
    format_date(vn_day(created_at_ms) + i64::from(processing_days))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_known_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(format_date(days_from_civil(2024, 2, 29)), "2024-02-29");
        for z in -800_000..800_000i64 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn parse_rejects_impossible_dates_with_reasons() {
        assert!(parse_date("2024-02-29").is_ok());
        assert!(parse_date("2023-02-29").unwrap_err().contains("28 days"));
        assert!(parse_date("1900-02-29").is_err());
        assert!(parse_date("2000-02-29").is_ok());
        assert!(parse_date("2024-13-01").unwrap_err().contains("month 13"));
        assert!(parse_date("2024-04-31").is_err());
        assert!(parse_date("2024-4-1").is_err());
        assert!(parse_date("01/04/2024").is_err());
        assert!(parse_date("2024-04-0١").is_err());
        assert!(parse_date("").is_err());
    }

    #[test]
    fn due_date_uses_vietnam_day_and_crosses_month_and_year_ends() {
        // 2024-12-31T17:30:00Z is already 2025-01-01 00:30 in Hanoi.
        let ms = days_from_civil(2024, 12, 31) * MS_PER_DAY + (17 * 60 + 30) * 60 * 1000;
        assert_eq!(vn_date(ms), "2025-01-01");
        assert_eq!(due_date(ms, 0), "2025-01-01");
        // 2024-02-20 10:00 local + 15 days crosses a leap February.
        let ms = days_from_civil(2024, 2, 20) * MS_PER_DAY + 3 * 60 * 60 * 1000;
        assert_eq!(due_date(ms, 15), "2024-03-06");
        let ms = days_from_civil(2023, 12, 25) * MS_PER_DAY;
        assert_eq!(due_date(ms, 10), "2024-01-04");
    }
}
