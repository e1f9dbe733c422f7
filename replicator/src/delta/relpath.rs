//! Paths inside a file tree, relative to its root and validated so they can never leave it.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name reserved at a tree's root: the apply side parks renamed files there between removing
/// old entries and creating new ones. A source tree holding it fails to scan.
pub const STASH_DIR_NAME: &str = ".ferry-delta-stash";

/// A path relative to a file tree's root, as raw Unix bytes (file names need not be UTF-8).
///
/// Invariants, checked on construction and on deserialisation: no leading `/`, no empty
/// component (so no `//` and no trailing `/`), no `.` or `..` component, no NUL byte. The empty
/// path is the root itself. Joining a `RelPath` under any directory therefore stays inside it
/// lexically (symlinks inside the target are not resolved; see [`crate::delta::apply`]).
///
/// Ordering is bytewise, which puts a directory before everything inside it: the plan relies
/// on that to create parents first and (iterating in reverse) delete children first.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawRelPath", into = "RawRelPath")]
pub struct RelPath(Vec<u8>);

/// Serde's view of a [`RelPath`] before validation: a byte string.
#[derive(Serialize, Deserialize)]
struct RawRelPath(#[serde(with = "serde_bytes")] Vec<u8>);

/// Why bytes are not a valid [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRelPath {
    /// The path starts with `/`.
    #[error("relative path {path:?} is absolute")]
    Absolute {
        /// The offending path, lossily decoded.
        path: String,
    },
    /// The path has an empty, `.` or `..` component.
    #[error("relative path {path:?} has an empty, '.' or '..' component")]
    BadComponent {
        /// The offending path, lossily decoded.
        path: String,
    },
    /// The path contains a NUL byte.
    #[error("relative path {path:?} contains a NUL byte")]
    Nul {
        /// The offending path, lossily decoded.
        path: String,
    },
}

impl RelPath {
    /// The tree's root (the empty path).
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Validates `bytes` as a relative path.
    ///
    /// # Errors
    /// [`InvalidRelPath`] when an invariant listed on [`RelPath`] does not hold.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, InvalidRelPath> {
        let bytes = bytes.into();
        let lossy = || String::from_utf8_lossy(&bytes).into_owned();
        if bytes.is_empty() {
            return Ok(Self(bytes));
        }
        if bytes[0] == b'/' {
            return Err(InvalidRelPath::Absolute { path: lossy() });
        }
        if bytes.contains(&0) {
            return Err(InvalidRelPath::Nul { path: lossy() });
        }
        if bytes
            .split(|b| *b == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..")
        {
            return Err(InvalidRelPath::BadComponent { path: lossy() });
        }
        Ok(Self(bytes))
    }

    /// This path with one more component, `name`.
    ///
    /// # Errors
    /// [`InvalidRelPath`] when `name` is empty, `.`, `..`, or contains `/` or NUL.
    pub fn join(&self, name: &OsStr) -> Result<Self, InvalidRelPath> {
        let name = name.as_bytes();
        if name.contains(&b'/') {
            return Err(InvalidRelPath::BadComponent {
                path: String::from_utf8_lossy(name).into_owned(),
            });
        }
        let mut bytes = Vec::with_capacity(self.0.len() + 1 + name.len());
        bytes.extend_from_slice(&self.0);
        if !bytes.is_empty() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name);
        Self::new(bytes)
    }

    /// The parent directory, or `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => Some(Self(self.0[..i].to_vec())),
            None => Some(Self::root()),
        }
    }

    /// Whether this is the root (the empty path).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path as a [`Path`] (empty for the root).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// This path under `root` (`root` itself for the root).
    pub fn under(&self, root: &Path) -> PathBuf {
        if self.is_root() {
            root.to_path_buf()
        } else {
            root.join(self.as_path())
        }
    }
}

impl TryFrom<RawRelPath> for RelPath {
    type Error = InvalidRelPath;

    fn try_from(raw: RawRelPath) -> Result<Self, Self::Error> {
        Self::new(raw.0)
    }
}

impl From<RelPath> for RawRelPath {
    fn from(path: RelPath) -> Self {
        RawRelPath(path.0)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            write!(f, "{}", String::from_utf8_lossy(&self.0))
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_accepts_and_rejects() {
        let cases: &[(&[u8], bool)] = &[
            (b"", true),
            (b"a", true),
            (b"a/b/c", true),
            (b".hidden/..x/x..", true),
            (b"\xff\xfe/name", true),
            (b"/a", false),
            (b"a//b", false),
            (b"a/", false),
            (b"./a", false),
            (b"a/..", false),
            (b"..", false),
            (b"a\0b", false),
        ];
        for (bytes, ok) in cases {
            assert_eq!(
                RelPath::new(bytes.to_vec()).is_ok(),
                *ok,
                "RelPath::new({:?})",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn parent_and_join_are_inverse() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            ("a", Some("")),
            ("a/b", Some("a")),
            ("a/b/c", Some("a/b")),
        ];
        for (path, parent) in cases {
            let p = RelPath::new(path.as_bytes()).unwrap();
            let got = p.parent();
            assert_eq!(
                got.as_ref().map(|g| g.as_bytes()),
                parent.map(str::as_bytes),
                "parent of {path:?}"
            );
            if let Some(parent) = got {
                let name = p.as_path().file_name().unwrap();
                assert_eq!(parent.join(name).unwrap(), p, "join back {path:?}");
            }
        }
        assert!(RelPath::root().join(OsStr::new("a/b")).is_err());
        assert!(RelPath::root().join(OsStr::new("..")).is_err());
    }

    #[test]
    fn ordering_puts_parents_first() {
        let mut paths: Vec<RelPath> = ["a/b", "a-b", "a", "", "a/b/c", "b"]
            .iter()
            .map(|p| RelPath::new(p.as_bytes()).unwrap())
            .collect();
        paths.sort();
        for (i, p) in paths.iter().enumerate() {
            if let Some(parent) = p.parent() {
                let at = paths.iter().position(|q| *q == parent).unwrap();
                assert!(at < i, "{parent} sorts after its child {p}: {paths:?}");
            }
        }
    }

    #[test]
    fn deserialising_validates() {
        let bad = postcard::to_stdvec(&RawRelPath(b"../etc/passwd".to_vec())).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bad).is_err());
        let good = postcard::to_stdvec(&RelPath::new(b"etc/passwd".to_vec()).unwrap()).unwrap();
        assert_eq!(
            postcard::from_bytes::<RelPath>(&good).unwrap().as_bytes(),
            b"etc/passwd"
        );
    }
}
