//! Time-of-day and weekday conditions on rules (`hours = "08:00-19:00"`, `days = ["mon",
//! "fri"]`), in the policy's time zone (`utc_offset`). A rule outside its time does not apply;
//! an allow rule that would have applied makes the denial say so.

/// When a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Bit 0 = Monday … bit 6 = Sunday.
    pub days: u8,
    /// Minutes after midnight: from (inclusive) to (exclusive); `to < from` spans midnight
    /// (the day is the one the window starts on).
    pub from: u16,
    pub to: u16,
}

pub const ALL_DAYS: u8 = 0x7f;

/// "mon" … "sun".
pub fn parse_day(s: &str) -> Option<u8> {
    let i = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .position(|d| d.eq_ignore_ascii_case(s.trim()))?;
    Some(1 << i)
}

fn minutes(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
}

/// "08:00-19:00" (to may be "24:00"; "22:00-06:00" spans midnight).
pub fn parse_hours(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let (from, to) = (minutes(a)?, minutes(b)?);
    (from != to && from < 1440).then_some((from, to))
}

impl Schedule {
    /// Whether `unix` (seconds, UTC) falls in the schedule, `offset` seconds east of UTC.
    pub fn contains(&self, unix: u64, offset: i64) -> bool {
        let t = unix as i64 + offset;
        let day = (t.div_euclid(86_400) + 3).rem_euclid(7) as u8; // 0 = Monday
        let minute = (t.rem_euclid(86_400) / 60) as u16;
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.from < self.to {
            on(day) && minute >= self.from && minute < self.to
        } else {
            // Across midnight: the evening of a listed day, or the morning after one.
            (on(day) && minute >= self.from) || (on((day + 6) % 7) && minute < self.to)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Monday 2026-11-30 00:00 UTC.
    const MONDAY: u64 = 1_795_996_800;

    #[test]
    fn office_hours_on_weekdays() {
        let (from, to) = parse_hours("08:00-19:00").unwrap();
        let s = Schedule {
            days: (0..5).map(|d| 1 << d).sum(),
            from,
            to,
        };
        let at = |day: u64, h: u64, m: u64| MONDAY + day * 86_400 + h * 3600 + m * 60;
        assert!(s.contains(at(0, 8, 0), 0));
        assert!(s.contains(at(4, 18, 59), 0));
        assert!(!s.contains(at(4, 19, 0), 0));
        assert!(!s.contains(at(0, 7, 59), 0));
        assert!(!s.contains(at(5, 12, 0), 0), "Saturday");
        // In Tokyo (UTC+9), 08:00 Monday is Sunday 23:00 UTC.
        assert!(s.contains(at(0, 0, 0) - 3600, 9 * 3600));
        assert!(!s.contains(at(0, 0, 0) - 3600, 0));
    }

    #[test]
    fn night_shifts_span_midnight() {
        let (from, to) = parse_hours("22:00-06:00").unwrap();
        let s = Schedule {
            days: parse_day("fri").unwrap(),
            from,
            to,
        };
        let fri = MONDAY + 4 * 86_400;
        assert!(s.contains(fri + 23 * 3600, 0));
        assert!(
            s.contains(fri + 86_400 + 5 * 3600, 0),
            "Saturday morning, Friday's shift"
        );
        assert!(
            !s.contains(fri + 86_400 + 23 * 3600, 0),
            "Saturday night is not Friday"
        );
        assert!(
            !s.contains(fri + 5 * 3600, 0),
            "Friday morning is Thursday's shift"
        );
    }

    #[test]
    fn bad_times_are_refused() {
        for bad in [
            "",
            "8-19",
            "08:00",
            "08:00-08:00",
            "25:00-26:00",
            "08:60-09:00",
            "a:bc-d",
        ] {
            assert_eq!(parse_hours(bad), None, "{bad:?}");
        }
        assert_eq!(parse_hours("00:00-24:00"), Some((0, 1440)));
        assert_eq!(parse_day("Sun"), Some(1 << 6));
        assert_eq!(parse_day("sunday"), None);
    }
}
