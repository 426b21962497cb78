//! What `start` installs before the keeper takes over, with one rollback: a
//! step that fails after the table is in takes everything installed so far
//! away again, so a failed start leaves no half capture behind.

use super::programs::{attach_everywhere, detach_everywhere};
use super::{CaptureError, Members};
use crate::backstop::Backstop;
use crate::netfilter::{self, TablePlan};
use crate::routing::{self, RoutePlan};
use std::path::{Path, PathBuf};

/// Installed for a start that has not finished; undone on drop unless kept.
pub(super) struct Installing {
    table: Option<String>,
    route: Option<RoutePlan>,
    /// The cgroup2 root and the cgroups the backstop was attached to.
    backstop: Option<(PathBuf, Vec<String>)>,
}

impl Installing {
    /// The table, then the policy routing.
    pub(super) fn table_and_routing(
        plan: &TablePlan,
        route: &RoutePlan,
    ) -> Result<Installing, CaptureError> {
        netfilter::install(plan).map_err(CaptureError::InstallTable)?;
        let mut installing = Installing {
            table: Some(plan.table.clone()),
            route: None,
            backstop: None,
        };
        routing::install(route).map_err(CaptureError::InstallRouting)?;
        installing.route = Some(*route);
        Ok(installing)
    }

    /// The backstop on every captured cgroup.
    pub(super) fn backstop(
        &mut self,
        b: &Backstop,
        root: &Path,
        captured: &Members,
    ) -> Result<(), CaptureError> {
        attach_everywhere(b, root, captured)?;
        let paths = captured.values().map(|(p, _)| p.clone()).collect();
        self.backstop = Some((root.to_path_buf(), paths));
        Ok(())
    }

    /// The start went through: the keeper owns what is installed.
    pub(super) fn keep(mut self) {
        self.table = None;
        self.route = None;
        self.backstop = None;
    }
}

impl Drop for Installing {
    fn drop(&mut self) {
        if let Some((root, paths)) = self.backstop.take() {
            let _ = detach_everywhere(&root, paths.iter());
        }
        if let Some(route) = self.route.take() {
            let _ = routing::remove(&route);
        }
        if let Some(table) = self.table.take() {
            let _ = netfilter::remove(&table);
        }
    }
}
