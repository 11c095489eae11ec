//! One owner per cluster name: a lock file that a [`crate::Cluster`] holds while it lives.
//!
//! Two test runs on one machine (two `./test`, or a developer's run beside CI) may boot a
//! cluster of the same name. Without a lock, the second `up` would tear down the first one's
//! live cluster as "leftovers". With it, the second waits until the first is done. The
//! kernel drops the lock when its process dies, so a crashed run never blocks the next one.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::Error;

const POLL: Duration = Duration::from_millis(200);

/// A held cluster lock (`<root>/<name>.lock`).
#[derive(Debug)]
pub(crate) struct ClusterLock {
    /// Keeps the lock: closing it (drop, or the process dying) releases it.
    file: File,
    path: PathBuf,
}

impl ClusterLock {
    /// Takes the lock of cluster `name` under `root`, waiting up to `timeout` while another
    /// process holds it.
    pub(crate) fn acquire(root: &Path, name: &str, timeout: Duration) -> Result<Self, Error> {
        let path = root.join(format!("{name}.lock"));
        let io_err = |e: std::io::Error| Error::Harness {
            what: format!("lock {}", path.display()),
            detail: e.to_string(),
        };
        let start = Instant::now();
        let mut said = false;
        loop {
            // A releasing holder removes the shared directory when it empties it: create it
            // on every try, and try again if it vanished between the two calls.
            fs::create_dir_all(root).map_err(io_err)?;
            let opened = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path);
            let file = match opened {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(e)),
            };
            match file.try_lock() {
                // The holder before us may have removed the file after we opened it: then
                // we hold a lock nobody else can see; open the path again.
                Ok(()) if same_file(&file, &path) => return Ok(ClusterLock { file, path }),
                Ok(()) => continue,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(io_err(e)),
            }
            if start.elapsed() >= timeout {
                return Err(Error::Busy {
                    cluster: name.to_string(),
                    lock: path,
                    waited: start.elapsed(),
                });
            }
            if !said {
                eprintln!(
                    "cluster {name} is in use by another process (lock {}); waiting up to {timeout:?}",
                    path.display()
                );
                said = true;
            }
            thread::sleep(POLL);
        }
    }

    /// Removes the lock file, then releases the lock (the cluster is gone).
    pub(crate) fn release(self) {
        // Only the holder removes the file, and waiters check that the path they locked is
        // still there, so removing it before unlocking is safe.
        let _ = fs::remove_file(&self.path);
        if let Some(root) = self.path.parent() {
            // Shared by all clusters: goes only when empty.
            let _ = fs::remove_dir(root);
        }
        drop(self.file);
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        std::env::temp_dir().join(format!("fleet-fh-lock-test-{}", std::process::id()))
    }

    #[test]
    fn a_second_holder_waits_and_gives_up_then_gets_it_after_release() {
        let root = root().join("a");
        let first = ClusterLock::acquire(&root, "c1", Duration::ZERO).expect("free lock");
        let err = ClusterLock::acquire(&root, "c1", Duration::from_millis(300))
            .expect_err("held by the first");
        assert!(matches!(err, Error::Busy { .. }), "{err}");
        // another name is independent
        let other = ClusterLock::acquire(&root, "c2", Duration::ZERO).expect("other name");
        other.release();
        first.release();
        let again = ClusterLock::acquire(&root, "c1", Duration::ZERO).expect("released");
        again.release();
        assert!(
            !root.exists(),
            "release removes the lock files and the empty dir"
        );
    }

    #[test]
    fn a_waiter_gets_the_lock_when_the_holder_releases() {
        let root = root().join("b");
        let first = ClusterLock::acquire(&root, "c", Duration::ZERO).expect("free lock");
        let r = root.clone();
        let waiter = thread::spawn(move || ClusterLock::acquire(&r, "c", Duration::from_secs(20)));
        first.release();
        let second = waiter.join().expect("no panic").expect("gets the lock");
        assert!(second.path.exists(), "the waiter's lock file is visible");
        second.release();
    }

    #[test]
    fn a_stale_lock_file_of_a_dead_holder_is_taken() {
        let root = root().join("c");
        fs::create_dir_all(&root).expect("dir");
        fs::write(root.join("c.lock"), "").expect("stale file");
        let l = ClusterLock::acquire(&root, "c", Duration::ZERO).expect("stale lock is free");
        l.release();
        assert!(!root.exists());
    }
}
