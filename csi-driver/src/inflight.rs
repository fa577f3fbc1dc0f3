//! One operation per volume at a time: a second call while one is in flight gets ABORTED, as
//! the CSI spec asks.

use parking_lot::Mutex;
use std::collections::HashSet;
use tonic::Status;

#[derive(Default)]
pub struct InFlight {
    busy: Mutex<HashSet<String>>,
}

/// Holds a volume's mark; released on drop.
pub struct Guard<'a>(&'a InFlight, String);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.busy.lock().remove(&self.1);
    }
}

impl InFlight {
    pub fn begin(&self, id: &str) -> Result<Guard<'_>, Status> {
        if !self.busy.lock().insert(id.to_string()) {
            return Err(Status::aborted(format!("an operation on volume {id} is already in progress")));
        }
        Ok(Guard(self, id.to_string()))
    }
}
