//! The open file limit fleetd needs: every API connection is a descriptor, and so are etcd's
//! and D-Bus's connections and the unit files the agent writes.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tracing::{info, warn};

/// Descriptors fleetd uses besides API connections (etcd, D-Bus, unit files, logs), with room
/// to spare.
pub const FILES_BESIDES_API: u64 = 256;

/// The limit to set: the soft limit raised to the hard one, or `None` when it is there already
/// (or the hard limit is unlimited, which Linux does not allow for open files anyway).
fn raised(limit: &Rlimit) -> Option<Rlimit> {
    let hard = limit.maximum?;
    match limit.current {
        Some(soft) if soft < hard => Some(Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        }),
        _ => None,
    }
}

/// Raises the soft limit on open files to the hard limit (fleet.service sets both with
/// `LimitNOFILE=`), logs the result, and warns when it leaves too little room for
/// `api_connections` API connections.
pub fn raise_open_files(api_connections: usize) {
    let before = getrlimit(Resource::Nofile);
    let now = match raised(&before) {
        Some(new) => match setrlimit(Resource::Nofile, new) {
            Ok(()) => {
                info!(
                    from = ?before.current,
                    to = ?new.current,
                    "raised the open file limit to its hard limit"
                );
                new
            }
            Err(e) => {
                warn!(error = %e, limit = ?before.current, "could not raise the open file limit");
                before
            }
        },
        None => {
            info!(soft = ?before.current, hard = ?before.maximum, "open file limit");
            before
        }
    };
    let needed = api_connections as u64 + FILES_BESIDES_API;
    if let Some(soft) = now.current
        && soft < needed
    {
        warn!(
            limit = soft,
            needed,
            "the open file limit is lower than the API's connection budgets need; raise LimitNOFILE= of fleet.service"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(current: Option<u64>, maximum: Option<u64>) -> Rlimit {
        Rlimit { current, maximum }
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let new = raised(&limit(Some(1024), Some(4096))).expect("raised");
        assert_eq!((new.current, new.maximum), (Some(4096), Some(4096)));
        assert!(raised(&limit(Some(4096), Some(4096))).is_none());
        assert!(raised(&limit(Some(1024), None)).is_none());
        assert!(raised(&limit(None, None)).is_none());
    }

    #[test]
    fn fleet_service_allows_what_the_api_budgets_need() {
        let unit = include_str!("../units/fleet.service");
        let value = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .expect("fleet.service sets LimitNOFILE=");
        let soft: u64 = value
            .split(':')
            .next()
            .and_then(|v| v.trim().parse().ok())
            .expect("a number");
        let api = fleet_api::ApiConfig::default().max_open_connections() as u64;
        assert!(
            soft >= api + FILES_BESIDES_API,
            "LimitNOFILE={soft} < {api} API connections + {FILES_BESIDES_API}"
        );
    }

    #[test]
    fn raising_in_this_process_does_not_fail() {
        raise_open_files(fleet_api::ApiConfig::default().max_open_connections());
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, now.maximum.or(now.current));
    }
}
