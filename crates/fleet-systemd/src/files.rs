//! The units directory on disk: atomic writes, removal and listing of fleet's unit files.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result, validate_name};

/// Where fleetd keeps the unit files it hands to systemd (fleet's default).
pub const DEFAULT_UNITS_DIRECTORY: &str = "/run/fleet/units/";

/// Unit types fleet manages; other files in the units directory are ignored.
const UNIT_TYPES: &[&str] = &[
    "service",
    "socket",
    "timer",
    "path",
    "device",
    "mount",
    "automount",
];

/// Suffix of the temporary files of an atomic write; not a unit type, so never listed.
const TMP_SUFFIX: &str = ".fleet-tmp";

/// Whether `name` ends in a unit type fleet manages (`.service`, `.socket`, `.timer`, `.path`,
/// `.device`, `.mount`, `.automount`).
pub fn recognized_unit_type(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(stem, ty)| !stem.is_empty() && UNIT_TYPES.contains(&ty))
}

/// The units directory; every path handed out has passed [`validate_name`].
#[derive(Debug, Clone)]
pub(crate) struct UnitsDir {
    dir: PathBuf,
}

impl UnitsDir {
    /// Creates the directory (mode 0755, parents too) if needed.
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
        Ok(UnitsDir { dir })
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

    /// Writes the file through a temporary file in the same directory and a rename, so systemd
    /// never reads half a unit.
    pub(crate) fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.path(name)?;
        let tmp = self.dir.join(format!(".{name}{TMP_SUFFIX}"));
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io {
                action,
                path,
                source,
            }
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io("creating temporary unit file", &tmp))?;
        let written = file
            .write_all(contents.as_bytes())
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
            if name.ends_with(TMP_SUFFIX) {
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
    use std::os::unix::fs::PermissionsExt;

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
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(dir.list().expect("list"), vec!["a.socket", "b.service"]);

        dir.remove("b.service").expect("remove");
        dir.remove("b.service").expect("remove twice");
        assert_eq!(dir.list().expect("list"), vec!["a.socket"]);
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
