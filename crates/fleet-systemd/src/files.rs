//! The units directory on disk: atomic writes, removal and listing of fleet's unit files.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result, validate_name};

/// Where fleetd keeps the unit files it hands to systemd (fleet's default).
pub const DEFAULT_UNITS_DIRECTORY: &str = "/run/fleet/units/";

/// Prefix of the temporary files of an atomic write. Their names have a fixed length well
/// below NAME_MAX whatever the unit's name (a unit name may have 255 bytes, which leaves no
/// room for anything around it), start with a dot and end in no unit type, so they are never
/// listed.
const TMP_PREFIX: &str = ".fleet-tmp.";

/// Suffix of the temporary files of earlier builds (`.<unit name>.fleet-tmp`); such
/// leftovers are skipped when listing and removed with ours.
const OLD_TMP_SUFFIX: &str = ".fleet-tmp";

/// Mode of unit files: only root (systemd, PID 1) reads them, since `Environment=` lines may
/// carry secrets. For a user manager the owner is that user, who is also who reads them.
const UNIT_FILE_MODE: u32 = 0o600;

/// Numbers the temporary files of this process, so concurrent writes never share one.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether `name` is one of our temporary files.
fn is_temporary(name: &str) -> bool {
    name.starts_with(TMP_PREFIX) || (name.starts_with('.') && name.ends_with(OLD_TMP_SUFFIX))
}

/// A fresh temporary file name: the prefix, the process ID and a counter, 35 bytes in all.
fn temporary_name() -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TMP_PREFIX}{:08x}{n:016x}", std::process::id())
}

/// Whether `name` ends in a unit type fleet manages ([`fleet_unit::RECOGNIZED_TYPES`]); other
/// files in the units directory are ignored.
pub fn recognized_unit_type(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(stem, ty)| !stem.is_empty() && fleet_unit::RECOGNIZED_TYPES.contains(&ty))
}

/// Sets a regular file's mode to [`UNIT_FILE_MODE`] if it grants more; symbolic links and
/// other file types are left alone (a link's target is not ours to change).
fn make_private(path: &Path) {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "reading the mode of a unit file");
            return;
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.file_type().is_file() || mode == UNIT_FILE_MODE {
        return;
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(UNIT_FILE_MODE)) {
        Ok(()) => tracing::info!(
            path = %path.display(),
            old_mode = format_args!("{mode:04o}"),
            "unit file made readable by its owner only"
        ),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "making a unit file private")
        }
    }
}

/// The units directory; every path handed out has passed [`validate_name`].
#[derive(Debug, Clone)]
pub(crate) struct UnitsDir {
    dir: PathBuf,
}

impl UnitsDir {
    /// Creates the directory (mode 0755, parents too) if needed, removes temporary files a
    /// crash left behind (nothing writes yet, so none is in use), and narrows unit files an
    /// older fleetd wrote readable by all to [`UNIT_FILE_MODE`] (adopted units are not
    /// rewritten, so their mode would otherwise never change).
    pub(crate) fn create(dir: PathBuf) -> Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|source| Error::Io {
                action: "creating units directory",
                path: dir.clone(),
                source,
            })?;
        let units = UnitsDir { dir };
        units.sweep();
        Ok(units)
    }

    /// Removes leftover temporary files and makes recognized unit files private; failures
    /// are only logged (temporary files are never listed, and a unit file keeps working).
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path();
            if is_temporary(&name) {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "removing a leftover temporary unit file");
                }
            } else if recognized_unit_type(&name) {
                make_private(&path);
            }
        }
    }

    /// The directory itself.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of unit `name`'s file.
    pub(crate) fn path(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        Ok(self.dir.join(name))
    }

    /// Writes the file (mode 0600) through a temporary file in the same directory, an fsync
    /// and a rename, so systemd never reads half a unit.
    pub(crate) fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.path(name)?;
        let tmp = self.dir.join(temporary_name());
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io {
                action,
                path,
                source,
            }
        };
        // create_new: never through a link or into a file somebody else opened.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(UNIT_FILE_MODE)
            .open(&tmp)
            .map_err(io("creating temporary unit file", &tmp))?;
        // The mode again, exactly: the one given to open is narrowed by the umask.
        let written = file
            .set_permissions(std::fs::Permissions::from_mode(UNIT_FILE_MODE))
            .and_then(|()| file.write_all(contents.as_bytes()))
            .and_then(|()| file.sync_all());
        drop(file);
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Io {
                action: "writing temporary unit file",
                path: tmp,
                source,
            });
        }
        if let Err(source) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Io {
                action: "renaming unit file into place",
                path,
                source,
            });
        }
        Ok(path)
    }

    /// The file's text.
    pub(crate) fn read(&self, name: &str) -> Result<String> {
        let path = self.path(name)?;
        std::fs::read_to_string(&path).map_err(|source| Error::Io {
            action: "reading unit file",
            path,
            source,
        })
    }

    /// Removes the file; a file already gone is not an error.
    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                action: "removing unit file",
                path,
                source,
            }),
            _ => Ok(()),
        }
    }

    /// Sorted names of the unit files of a recognized type. Anything else is skipped with a
    /// warning, except our own temporary files (a crash between write and rename).
    pub(crate) fn list(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| Error::Io {
            action: "listing units directory",
            path: self.dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Io {
                action: "listing units directory",
                path: self.dir.clone(),
                source,
            })?;
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(path = %entry.path().display(), "ignoring non-UTF-8 file in units directory");
                continue;
            };
            if is_temporary(&name) {
                continue;
            }
            if !recognized_unit_type(&name) {
                tracing::warn!(path = %entry.path().display(), "found unrecognized file in units directory, ignoring");
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognized_types() {
        let cases = [
            ("a.service", true),
            ("a.socket", true),
            ("a.timer", true),
            ("a.path", true),
            ("a.device", true),
            ("a.mount", true),
            ("a.automount", true),
            ("a@b.service", true),
            ("a.target", false),
            ("a.slice", false),
            ("a.scope", false),
            (".service", false),
            ("service", false),
            ("a.service.fleet-tmp", false),
            ("a.service~", false),
        ];
        for (name, want) in cases {
            assert_eq!(recognized_unit_type(name), want, "{name}");
        }
    }

    #[test]
    fn write_list_remove() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = UnitsDir::create(tmp.path().join("run/fleet/units")).expect("create");
        let mode = std::fs::metadata(tmp.path().join("run/fleet/units"))
            .expect("stat dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);

        let path = dir
            .write("b.service", "[Service]\nExecStart=/bin/true\n")
            .expect("write");
        dir.write("a.socket", "[Socket]\n").expect("write");
        dir.write("b.service", "[Service]\nExecStart=/bin/false\n")
            .expect("rewrite");
        std::fs::write(tmp.path().join("run/fleet/units/notes.txt"), "x").expect("stray");
        std::fs::write(tmp.path().join("run/fleet/units/.c.service.fleet-tmp"), "x").expect("tmp");

        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "[Service]\nExecStart=/bin/false\n"
        );
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "unit files are for root's eyes only");
        assert_eq!(dir.list().expect("list"), vec!["a.socket", "b.service"]);

        dir.remove("b.service").expect("remove");
        dir.remove("b.service").expect("remove twice");
        assert_eq!(dir.list().expect("list"), vec!["a.socket"]);
    }

    #[test]
    fn longest_unit_name_is_written_and_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = UnitsDir::create(tmp.path().join("units")).expect("create");
        let name = format!("{}.service", "a".repeat(255 - ".service".len()));
        assert_eq!(name.len(), 255);
        let path = dir
            .write(&name, "[Service]\n")
            .expect("write a 255-byte name");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "[Service]\n");
        dir.write(&name, "[Service]\nType=oneshot\n")
            .expect("rewrite a 255-byte name");
        let files: Vec<String> = std::fs::read_dir(tmp.path().join("units"))
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        assert_eq!(files, vec![name.clone()]);
        assert_eq!(dir.list().expect("list"), vec![name]);
        assert!(temporary_name().len() < 64);
    }

    #[test]
    fn leftover_temporary_files_are_skipped_then_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let units = tmp.path().join("units");
        let dir = UnitsDir::create(units.clone()).expect("create");
        dir.write("a.service", "[Service]\n").expect("write");
        let leftovers = [
            units.join(temporary_name()),
            units.join(".b.service.fleet-tmp"),
        ];
        for path in &leftovers {
            std::fs::write(path, "x").expect("leftover");
        }
        assert_eq!(dir.list().expect("list"), vec!["a.service"]);
        let dir = UnitsDir::create(units.clone()).expect("create again");
        for path in &leftovers {
            assert!(!path.exists(), "{}", path.display());
        }
        assert_eq!(dir.list().expect("list"), vec!["a.service"]);
    }

    /// An older fleetd wrote unit files 0644; a restarted fleetd adopts them without writing
    /// them again, so the sweep at start must narrow them (before, they stayed 0644).
    #[test]
    fn unit_files_of_an_older_fleetd_become_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let units = tmp.path().join("units");
        std::fs::create_dir(&units).expect("mkdir");
        let mode_of = |name: &str| {
            std::fs::symlink_metadata(units.join(name))
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777
        };
        let old = ["a.service", "b@1.timer", "c.socket"];
        for name in old {
            std::fs::write(units.join(name), "[Unit]\n").expect("old unit file");
            std::fs::set_permissions(units.join(name), std::fs::Permissions::from_mode(0o644))
                .expect("chmod 0644");
        }
        std::fs::write(units.join("notes.txt"), "x").expect("stray file");
        std::fs::set_permissions(
            units.join("notes.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod stray");
        let outside = tmp.path().join("outside.conf");
        std::fs::write(&outside, "x").expect("outside");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644))
            .expect("chmod outside");
        std::os::unix::fs::symlink(&outside, units.join("d.service")).expect("symlink");

        let dir = UnitsDir::create(units.clone()).expect("create");
        for name in old {
            assert_eq!(mode_of(name), 0o600, "{name}");
        }
        assert_eq!(mode_of("notes.txt"), 0o644, "not a unit file: not ours");
        let outside_mode = std::fs::metadata(&outside)
            .expect("stat outside")
            .permissions()
            .mode();
        assert_eq!(
            outside_mode & 0o7777,
            0o644,
            "a link's target is left alone"
        );
        assert_eq!(
            dir.list().expect("list"),
            vec!["a.service", "b@1.timer", "c.socket", "d.service"]
        );
    }

    #[test]
    fn bad_names_touch_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = UnitsDir::create(tmp.path().join("units")).expect("create");
        for name in ["../escape.service", "..", ".", "", "a/b.service"] {
            assert!(
                matches!(dir.write(name, "x"), Err(Error::InvalidName { .. })),
                "{name:?}"
            );
            assert!(
                matches!(dir.remove(name), Err(Error::InvalidName { .. })),
                "{name:?}"
            );
        }
        assert!(!tmp.path().join("escape.service").exists());
        assert!(dir.list().expect("list").is_empty());
    }
}
