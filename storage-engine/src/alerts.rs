//! Alerts this node raised (checksum mismatches, repairs, scrub results), newest last. Kept in
//! memory (the last `KEEP`) and appended to `alerts.jsonl` in the data directory so they outlive
//! a restart. The same alert raised again within `COALESCE` only counts up.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;

pub const KEEP: usize = 1000;
const COALESCE_SECS: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Notify,
    Warning,
    Alarm,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Notify => "NOTIFY",
            Severity::Warning => "WARNING",
            Severity::Alarm => "ALARM",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alert {
    pub id: u64,
    /// First and last time raised (Unix seconds).
    pub first_unix: u64,
    pub last_unix: u64,
    pub count: u64,
    pub severity: Severity,
    /// What happened, e.g. `ChecksumMismatch`.
    pub kind: String,
    /// What it happened to: `volume/NAME` or `pool`.
    pub resource: String,
    pub node: String,
    pub message: String,
}

pub struct Alerts {
    node: String,
    path: Option<PathBuf>,
    list: Mutex<VecDeque<Alert>>,
}

impl Alerts {
    /// Alerts kept in memory only.
    pub fn in_memory(node: &str) -> Alerts {
        Alerts { node: node.into(), path: None, list: Mutex::new(VecDeque::new()) }
    }

    /// Alerts kept in `path` too; the ones already there are loaded (a line that does not parse
    /// is skipped with a warning).
    pub fn open(node: &str, path: PathBuf) -> Alerts {
        let mut list = VecDeque::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match serde_json::from_str::<Alert>(line) {
                    // A later line for the same id is that alert counted up.
                    Ok(a) => match list.iter_mut().find(|x: &&mut Alert| x.id == a.id) {
                        Some(x) => *x = a,
                        None => list.push_back(a),
                    },
                    Err(e) => tracing::warn!(file = %path.display(), "skipping an alert line that does not parse: {e}"),
                }
                while list.len() > KEEP {
                    list.pop_front();
                }
            }
        }
        Alerts { node: node.into(), path: Some(path), list: Mutex::new(list) }
    }

    /// Raises an alert (or counts up the same one raised within the last minute).
    pub fn raise(&self, severity: Severity, kind: &str, resource: &str, message: String) -> Alert {
        let t = crate::clock::now_unix();
        let mut l = self.list.lock();
        let same = l
            .iter_mut()
            .rev()
            .find(|a| a.kind == kind && a.resource == resource && a.message == message && t.saturating_sub(a.last_unix) < COALESCE_SECS);
        let alert = match same {
            Some(a) => {
                a.count += 1;
                a.last_unix = t;
                a.clone()
            }
            None => {
                let id = l.back().map(|a| a.id + 1).unwrap_or(1);
                let a = Alert {
                    id,
                    first_unix: t,
                    last_unix: t,
                    count: 1,
                    severity,
                    kind: kind.into(),
                    resource: resource.into(),
                    node: self.node.clone(),
                    message,
                };
                l.push_back(a.clone());
                while l.len() > KEEP {
                    l.pop_front();
                }
                a
            }
        };
        drop(l);
        match severity {
            Severity::Alarm => tracing::error!(kind, resource, "{}", alert.message),
            _ => tracing::warn!(kind, resource, "{}", alert.message),
        }
        self.append(&alert);
        alert
    }

    fn append(&self, a: &Alert) {
        let Some(path) = &self.path else { return };
        let res = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            writeln!(f, "{}", serde_json::to_string(a).map_err(std::io::Error::other)?)
        })();
        if let Err(e) = res {
            tracing::warn!(file = %path.display(), "cannot record an alert: {e}");
        }
    }

    /// Every alert kept, oldest first.
    pub fn list(&self) -> Vec<Alert> {
        self.list.lock().iter().cloned().collect()
    }

    /// Removes every alert kept (in memory and in the file); how many there were.
    pub fn purge(&self) -> Result<usize, std::io::Error> {
        let mut l = self.list.lock();
        if let Some(path) = &self.path {
            // Emptied first: a purge that cannot reach the file leaves the alerts in place.
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        }
        let n = l.len();
        l.clear();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_coalesce_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let a = Alerts::open("n1", path.clone());
        a.raise(Severity::Alarm, "ChecksumMismatch", "volume/v1", "bad block at 4096".into());
        a.raise(Severity::Alarm, "ChecksumMismatch", "volume/v1", "bad block at 4096".into());
        a.raise(Severity::Notify, "ChecksumRepaired", "volume/v1", "repaired".into());
        let l = a.list();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].count, l[0].id, l[1].id), (2, 1, 2));
        let b = Alerts::open("n1", path);
        assert_eq!(b.list(), l, "the reopened list equals the one before");
        assert_eq!(b.raise(Severity::Warning, "x", "pool", "y".into()).id, 3);
    }
}
