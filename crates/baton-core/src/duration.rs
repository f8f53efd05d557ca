//! Human durations for the CLI: `500ms`, `2s`, `1m30s`, `1h`, `2.5` (seconds, as `flock -w`).

use std::time::Duration;

/// Parses a duration such as `500ms`, `2s`, `1m30s`, `1h5m`, `1.5s` or a bare number of
/// seconds (`2`, `0.25`, as `flock -w` takes). Units: `ms`, `s`, `m`, `h`, `d`.
///
/// The error is a sentence that says what was wrong, for a `baton: ` line.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration (examples: 500ms, 2s, 1m30s)".into());
    }
    let bad = |why: &str| format!("invalid duration '{text}': {why} (examples: 500ms, 2s, 1m30s)");
    // A bare number means seconds.
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = s.parse().map_err(|_| bad("not a number"))?;
        return Duration::try_from_secs_f64(secs).map_err(|_| bad("out of range"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if num_len == 0 {
            return Err(bad("expected a number before each unit"));
        }
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphabetic())
            .count();
        let (unit, after) = after.split_at(unit_len);
        let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => return Err(bad("a unit is missing after a number")),
            _ => return Err(bad(&format!("unknown unit '{unit}'"))),
        };
        let part = Duration::try_from_secs_f64(value * scale).map_err(|_| bad("out of range"))?;
        total = total.checked_add(part).ok_or_else(|| bad("out of range"))?;
        rest = after;
    }
    Ok(total)
}

/// Formats a duration compactly for humans: `850ms`, `2.5s`, `3m20s`, `1h2m`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        let tenths = (d.as_millis() % 1000) / 100;
        return if tenths == 0 {
            format!("{secs}s")
        } else {
            format!("{secs}.{tenths}s")
        };
    }
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m")
    } else if s > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{m}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h5m"), Ok(Duration::from_secs(3900)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in [
            "", "s", "5x", "1m30", "-1s", "1e9999", "ms5", "1..2s", "abc",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(2500)), "2.5s");
        assert_eq!(format_duration(Duration::from_secs(200)), "3m20s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h2m");
    }
}
