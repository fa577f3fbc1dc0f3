//! Snapshot schedules in Portworx's `snap_schedule` syntax, shared by the CSI driver (to reject a
//! malformed StorageClass parameter) and the engine (to run them):
//!
//! ```text
//! periodic=MINUTES,KEEP            every MINUTES minutes
//! daily=HH:MM,KEEP                 every day at HH:MM (UTC)
//! weekly=WEEKDAY@HH:MM,KEEP        e.g. weekly=sunday@13:00,4
//! monthly=DAY@HH:MM,KEEP           DAY 1..31; in shorter months the last day is used
//! ```
//!
//! Several policies are separated by `;` (or whitespace). KEEP is how many snapshots of that
//! policy are retained.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    Periodic { minutes: u32 },
    Daily { at: TimeOfDay },
    Weekly { weekday: u8, at: TimeOfDay },
    Monthly { day: u8, at: TimeOfDay },
}

/// Hours and minutes, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay {
    pub hour: u8,
    pub minute: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub every: Every,
    pub keep: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError(pub String);

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::error::Error for ScheduleError {}

const WEEKDAYS: [&str; 7] = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"];

fn err<T>(msg: String) -> Result<T, ScheduleError> {
    Err(ScheduleError(msg))
}

fn parse_time(policy: &str, s: &str) -> Result<TimeOfDay, ScheduleError> {
    let Some((h, m)) = s.split_once(':') else { return err(format!("{policy}: time {s:?} must be HH:MM")) };
    let (Ok(hour), Ok(minute)) = (h.parse::<u8>(), m.parse::<u8>()) else { return err(format!("{policy}: time {s:?} must be HH:MM")) };
    if hour > 23 || minute > 59 || m.len() != 2 {
        return err(format!("{policy}: time {s:?} is not a time of day (00:00 to 23:59)"));
    }
    Ok(TimeOfDay { hour, minute })
}

fn parse_one(item: &str) -> Result<Policy, ScheduleError> {
    let Some((kind, rest)) = item.split_once('=') else {
        return err(format!("{item:?} must look like periodic=MINUTES,KEEP, daily=HH:MM,KEEP, weekly=WEEKDAY@HH:MM,KEEP or monthly=DAY@HH:MM,KEEP"));
    };
    let kind = kind.trim().to_ascii_lowercase();
    let Some((when, keep)) = rest.rsplit_once(',') else { return err(format!("{item:?}: missing ,KEEP (how many snapshots to retain)")) };
    let keep: u32 = match keep.trim().parse() {
        Ok(k) if k > 0 => k,
        _ => return err(format!("{item:?}: KEEP {keep:?} must be a whole number of at least 1")),
    };
    let when = when.trim();
    let every = match kind.as_str() {
        "periodic" => match when.parse::<u32>() {
            Ok(m) if m > 0 => Every::Periodic { minutes: m },
            _ => return err(format!("{item:?}: MINUTES {when:?} must be a whole number of at least 1")),
        },
        "daily" => Every::Daily { at: parse_time(item, when)? },
        "weekly" => {
            let Some((day, time)) = when.split_once('@') else { return err(format!("{item:?}: must be weekly=WEEKDAY@HH:MM,KEEP")) };
            let day = day.trim().to_ascii_lowercase();
            let Some(weekday) = WEEKDAYS.iter().position(|d| *d == day || d[..3] == day) else {
                return err(format!("{item:?}: {day:?} is not a weekday (sunday..saturday)"));
            };
            Every::Weekly { weekday: weekday as u8, at: parse_time(item, time)? }
        }
        "monthly" => {
            let Some((day, time)) = when.split_once('@') else { return err(format!("{item:?}: must be monthly=DAY@HH:MM,KEEP")) };
            let day = match day.trim().parse::<u8>() {
                Ok(d) if (1..=31).contains(&d) => d,
                _ => return err(format!("{item:?}: DAY {day:?} must be 1 to 31")),
            };
            Every::Monthly { day, at: parse_time(item, time)? }
        }
        other => return err(format!("{item:?}: unknown schedule {other:?} (use periodic, daily, weekly or monthly)")),
    };
    Ok(Policy { every, keep })
}

/// Parses a `snap_schedule` value into its policies.
pub fn parse(s: &str) -> Result<Vec<Policy>, ScheduleError> {
    let items: Vec<&str> = s.split(|c: char| c == ';' || c.is_whitespace()).filter(|i| !i.is_empty()).collect();
    if items.is_empty() {
        return err("snap_schedule is empty".into());
    }
    items.into_iter().map(parse_one).collect()
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month) of a day number.
fn year_month(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (days_from_civil(ny, nm, 1) - days_from_civil(y, m, 1)) as u32
}

/// The first time after `t` (unix seconds, UTC) at which the policy fires.
pub fn next_after(every: Every, t: u64) -> u64 {
    const DAY: u64 = 86_400;
    let secs = |at: TimeOfDay| at.hour as u64 * 3600 + at.minute as u64 * 60;
    match every {
        Every::Periodic { minutes } => {
            let p = minutes as u64 * 60;
            (t / p + 1) * p
        }
        Every::Daily { at } => {
            let c = t / DAY * DAY + secs(at);
            if c > t {
                c
            } else {
                c + DAY
            }
        }
        Every::Weekly { weekday, at } => {
            let day = t / DAY;
            let today = (day + 4) % 7; // 1970-01-01 was a Thursday
            let c = (day + (weekday as u64 + 7 - today) % 7) * DAY + secs(at);
            if c > t {
                c
            } else {
                c + 7 * DAY
            }
        }
        Every::Monthly { day, at } => {
            let (mut y, mut m) = year_month((t / DAY) as i64);
            loop {
                let d = (day as u32).min(days_in_month(y, m));
                let c = days_from_civil(y, m, d) as u64 * DAY + secs(at);
                if c > t {
                    return c;
                }
                (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            }
        }
    }
}

impl Every {
    /// The policy without its KEEP, as snapshots of it are labelled (`periodic=60`,
    /// `daily=12:30`, `weekly=sunday@13:00`, `monthly=31@02:05`).
    pub fn tag(&self) -> String {
        match *self {
            Every::Periodic { minutes } => format!("periodic={minutes}"),
            Every::Daily { at } => format!("daily={:02}:{:02}", at.hour, at.minute),
            Every::Weekly { weekday, at } => format!("weekly={}@{:02}:{:02}", WEEKDAYS[weekday as usize], at.hour, at.minute),
            Every::Monthly { day, at } => format!("monthly={day}@{:02}:{:02}", at.hour, at.minute),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Every::Periodic { .. } => "periodic",
            Every::Daily { .. } => "daily",
            Every::Weekly { .. } => "weekly",
            Every::Monthly { .. } => "monthly",
        }
    }
}

/// What a schedule asks for now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Snapshots to take: (name, policy tag).
    pub take: Vec<(String, String)>,
    /// Scheduled snapshots beyond their policy's KEEP, to delete.
    pub delete: Vec<String>,
}

/// The schedule's due work at `now` for volume `volume` (created at `created`), given its
/// scheduled snapshots as (name, policy tag, created). A policy fires when its next time after
/// its newest snapshot (or after the volume's creation) has come; missed times are not made up
/// one by one — one snapshot is taken. Retention counts the snapshot about to be taken.
pub fn plan(volume: &str, policies: &[Policy], created: u64, taken: &[(String, String, u64)], now: u64) -> Plan {
    let mut out = Plan::default();
    for p in policies {
        let tag = p.every.tag();
        let mut mine: Vec<(String, u64)> = taken.iter().filter(|(_, t, _)| *t == tag).map(|(n, _, c)| (n.clone(), *c)).collect();
        let last = mine.iter().map(|(_, c)| *c).max().unwrap_or(created);
        if next_after(p.every, last) <= now {
            // Names stay within the 128 characters a volume name may have.
            let base: String = volume.chars().take(96).collect();
            let name = format!("{base}.{}.{}", p.every.kind(), stamp(now));
            if !mine.iter().any(|(n, _)| *n == name) && !out.take.iter().any(|(n, _)| *n == name) {
                mine.push((name.clone(), now));
                out.take.push((name, tag.clone()));
            }
        }
        out.delete.extend(expired(p.keep, &mine));
    }
    out.delete.retain(|n| !out.take.iter().any(|(t, _)| t == n));
    out
}

/// `t` (unix seconds) as UTC (year, month, day, hour, minute, second).
fn civil(t: u64) -> (i64, u32, i64, u64, u64, u64) {
    const DAY: u64 = 86_400;
    let (y, m) = year_month((t / DAY) as i64);
    let d = (t / DAY) as i64 - days_from_civil(y, m, 1) + 1;
    (y, m, d, t % DAY / 3600, t % 3600 / 60, t % 60)
}

/// `YYYYMMDD-HHMMSS`, UTC: part of a scheduled snapshot's name.
fn stamp(t: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(t);
    format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
}

/// `t` (unix seconds) as `YYYY-MM-DD HH:MM UTC`.
pub fn format_unix(t: u64) -> String {
    let (y, m, d, hh, mm, _) = civil(t);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}

/// Of a policy's snapshots (id, created), the ids beyond its KEEP newest, to delete.
pub fn expired<I: Clone>(keep: u32, snapshots: &[(I, u64)]) -> Vec<I> {
    let mut s: Vec<&(I, u64)> = snapshots.iter().collect();
    s.sort_by_key(|x| std::cmp::Reverse(x.1));
    s.into_iter().skip(keep as usize).map(|(id, _)| id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u8, m: u8) -> TimeOfDay {
        TimeOfDay { hour: h, minute: m }
    }

    #[test]
    fn a_plan_takes_what_is_due_and_deletes_beyond_keep() {
        let p = parse("periodic=60,2; daily=12:30,1").unwrap();
        let t0 = 1_795_000_000 / 3600 * 3600; // on the hour
                                              // Nothing due right after creation.
        assert_eq!(plan("v", &p, t0 + 10, &[], t0 + 100), Plan::default());
        // An hour later the periodic policy fires once.
        let pl = plan("v", &p, t0 + 10, &[], t0 + 3600 + 5);
        assert_eq!(pl.take, vec![(format!("v.periodic.{}", stamp(t0 + 3605)), "periodic=60".to_string())]);
        assert!(pl.delete.is_empty());
        // With two kept already, the oldest goes when a third is taken; the daily one is separate.
        let taken = vec![
            ("a".to_string(), "periodic=60".to_string(), t0 + 3600),
            ("b".to_string(), "periodic=60".to_string(), t0 + 7200),
            ("d".to_string(), "daily=12:30".to_string(), t0 + 7200), // 13:00, after today's 12:30
        ];
        let pl = plan("v", &p, t0, &taken, t0 + 3 * 3600 + 1);
        assert_eq!(pl.take.len(), 1);
        assert_eq!(pl.delete, vec!["a".to_string()]);
        // Not due yet: nothing, and nothing deleted while within KEEP.
        assert_eq!(plan("v", &p, t0, &taken, t0 + 7200 + 60), Plan::default());
        // Missed runs are not made up: one snapshot after a long outage.
        assert_eq!(plan("v", &p, t0, &taken[..1], t0 + 100 * 3600).take.len(), 2, "one periodic and one daily");
        assert_eq!(Every::Weekly { weekday: 0, at: at(13, 0) }.tag(), "weekly=sunday@13:00");
    }

    #[test]
    fn formats_times_in_utc() {
        assert_eq!(format_unix(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_unix(1_795_000_000), "2026-11-18 11:06 UTC");
        assert_eq!(format_unix(951_782_400), "2000-02-29 00:00 UTC");
    }

    #[test]
    fn parses_every_form() {
        let p = parse("periodic=60,10; daily=12:30,7 weekly=Sunday@13:00,4;monthly=31@02:05,3").unwrap();
        assert_eq!(
            p,
            vec![
                Policy { every: Every::Periodic { minutes: 60 }, keep: 10 },
                Policy { every: Every::Daily { at: at(12, 30) }, keep: 7 },
                Policy { every: Every::Weekly { weekday: 0, at: at(13, 0) }, keep: 4 },
                Policy { every: Every::Monthly { day: 31, at: at(2, 5) }, keep: 3 },
            ]
        );
        assert_eq!(parse("weekly=fri@00:00,1").unwrap()[0].every, Every::Weekly { weekday: 5, at: at(0, 0) });
    }

    #[test]
    fn malformed_schedules_say_why() {
        for (s, why) in [
            ("", "empty"),
            ("hourly=5,1", "unknown schedule"),
            ("periodic=0,5", "MINUTES"),
            ("periodic=60", "KEEP"),
            ("periodic=60,0", "KEEP"),
            ("daily=25:00,1", "time of day"),
            ("daily=12:5,1", "time of day"),
            ("daily=noon,1", "HH:MM"),
            ("weekly=funday@10:00,1", "not a weekday"),
            ("weekly=10:00,1", "WEEKDAY@HH:MM"),
            ("monthly=32@10:00,1", "DAY"),
            ("monthly", "must look like"),
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn next_runs_in_utc() {
        // 2026-11-22 10:15:00 UTC is a Sunday.
        let t = days_from_civil(2026, 11, 22) as u64 * 86_400 + 10 * 3600 + 15 * 60;
        assert_eq!(next_after(Every::Periodic { minutes: 60 }, t), t + 45 * 60);
        assert_eq!(next_after(Every::Daily { at: at(12, 0) }, t), t + 105 * 60);
        assert_eq!(next_after(Every::Daily { at: at(10, 15) }, t), t + 86_400, "not at the same second again");
        assert_eq!(next_after(Every::Weekly { weekday: 0, at: at(9, 0) }, t), t + 7 * 86_400 - 75 * 60);
        assert_eq!(next_after(Every::Weekly { weekday: 1, at: at(0, 0) }, t), days_from_civil(2026, 11, 23) as u64 * 86_400);
        // Day 31 in November falls back to the 30th; then December 31st.
        let nov30 = days_from_civil(2026, 11, 30) as u64 * 86_400 + 2 * 3600;
        assert_eq!(next_after(Every::Monthly { day: 31, at: at(2, 0) }, t), nov30);
        assert_eq!(next_after(Every::Monthly { day: 31, at: at(2, 0) }, nov30), days_from_civil(2026, 12, 31) as u64 * 86_400 + 2 * 3600);
        assert_eq!(
            next_after(Every::Monthly { day: 29, at: at(0, 0) }, days_from_civil(2027, 2, 1) as u64 * 86_400),
            days_from_civil(2027, 2, 28) as u64 * 86_400
        );
    }

    #[test]
    fn calendar_math_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for d in (-1000..40_000).step_by(37) {
            let (y, m) = year_month(d);
            let first = days_from_civil(y, m, 1);
            assert!(first <= d && d < first + days_in_month(y, m) as i64);
        }
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
    }

    #[test]
    fn retention_keeps_the_newest() {
        let snaps = [("a", 10), ("b", 30), ("c", 20), ("d", 40)];
        let mut gone = expired(2, &snaps);
        gone.sort();
        assert_eq!(gone, vec!["a", "c"]);
        assert!(expired(10, &snaps).is_empty());
    }
}
