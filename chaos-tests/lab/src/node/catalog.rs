//! The lab image catalog: which container images the process kubelet can run, and how.
//!
//! | image | runs |
//! |---|---|
//! | `ghcr.io/ferry-dr/ferry-replicator` (any tag) | Ferry's replicator, built from this workspace, through `ferry-lab image ferry-replicator` |
//! | `ghcr.io/ferry-dr/ferry-controller` (any tag) | Ferry's failover controller, through `ferry-lab image ferry-controller` |
//! | `ghcr.io/ferry-dr/ferry-gate` (any tag) | the init container that holds an app's pod until its site holds the witness lease, through `ferry-lab image ferry-gate` |
//! | `ferry-lab/sqlite-writer` | the demo ledger writer, through `ferry-lab image sqlite-writer` |
//! | `postgres` (any tag) | the machine's PostgreSQL, through `ferry-lab image postgres` (initdb on an empty `PGDATA`), where PostgreSQL is installed |
//! | `busybox` (any tag) | the container's `command` and `args` as a host command (`sh -c ...`) |
//!
//! `ferry-lab` is a multi-call binary for its images, so a fresh `cargo run --bin ferry-lab`
//! has every image it needs. Registry prefixes and tags are ignored
//! (`docker.io/library/postgres:16` is `postgres`).

use std::path::PathBuf;

/// Errors resolving an image.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The image is not one the lab can run.
    #[error("image {image:?} is not in the lab image catalog (ghcr.io/ferry-dr/ferry-replicator, ghcr.io/ferry-dr/ferry-controller, ghcr.io/ferry-dr/ferry-gate, ferry-lab/sqlite-writer, postgres, busybox)")]
    UnknownImage {
        /// The image as the pod names it.
        image: String,
    },
    /// A busybox container without a command.
    #[error("image {image:?} needs a command in the lab")]
    NoCommand {
        /// The image.
        image: String,
    },
    /// The `ferry-lab` binary could not be located.
    #[error("locating the ferry-lab binary")]
    Exe(#[source] std::io::Error),
}

/// A resolved process to start: program and arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Executable.
    pub program: PathBuf,
    /// Arguments (without the program name).
    pub args: Vec<String>,
    /// The signal that asks the process to stop, as the image's `StopSignal` (OCI image
    /// config) names it for the container runtime: `TERM` unless the image says otherwise.
    pub stop_signal: &'static str,
}

/// The catalog, bound to this machine's binaries.
#[derive(Clone, Debug)]
pub struct Catalog {
    exe: PathBuf,
}

/// `docker.io/library/postgres:16` → `postgres`; `ferry-lab/sqlite-writer:v1` → `ferry-lab/sqlite-writer`.
pub fn image_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A colon after the last slash is a tag; one before it belongs to a registry host:port.
    let last_slash = without_digest.rfind('/').map(|i| i + 1).unwrap_or(0);
    let name = match without_digest[last_slash..].find(':') {
        Some(i) => &without_digest[..last_slash + i],
        None => without_digest,
    };
    name.strip_prefix("docker.io/")
        .map(|n| n.strip_prefix("library/").unwrap_or(n))
        .unwrap_or(name)
}

impl Catalog {
    /// The catalog of the running `ferry-lab` binary.
    ///
    /// # Errors
    /// [`CatalogError::Exe`] when the binary's own path cannot be found.
    pub fn discover() -> Result<Self, CatalogError> {
        Ok(Self {
            exe: std::env::current_exe().map_err(CatalogError::Exe)?,
        })
    }

    /// A catalog whose multi-call images run through `exe` (tests pass the built binary).
    pub fn with_exe(exe: PathBuf) -> Self {
        Self { exe }
    }

    /// The program a multi-call image has on its `PATH`, as a container of it would: its name
    /// (e.g. `sqlite-writer` for `ferry-lab/sqlite-writer`) and the argv that runs it, so that
    /// `pods/exec` of that name in such a container runs the image's program, not whatever the
    /// host has. `None` for images whose commands are the host's (busybox).
    pub fn image_program(&self, image: &str) -> Option<(String, Vec<String>)> {
        let name = match image_name(image) {
            "ferry-lab/sqlite-writer" => "sqlite-writer",
            "ghcr.io/ferry-dr/ferry-replicator" => "ferry-replicator",
            "ghcr.io/ferry-dr/ferry-controller" => "ferry-controller",
            "ghcr.io/ferry-dr/ferry-gate" => "ferry-gate",
            _ => return None,
        };
        let argv = vec![
            self.exe.to_string_lossy().into_owned(),
            "image".to_string(),
            name.to_string(),
        ];
        Some((name.to_string(), argv))
    }

    /// Resolves a container: its image, `command` (replaces the entrypoint) and `args`.
    ///
    /// # Errors
    /// [`CatalogError::UnknownImage`] for images outside the catalog, [`CatalogError::NoCommand`]
    /// for a busybox container without a command.
    pub fn resolve(
        &self,
        image: &str,
        command: &[String],
        args: &[String],
    ) -> Result<Launch, CatalogError> {
        let multi_call = |name: &str| {
            // The image's own argv: command (or the default entrypoint) then args; the first
            // word is the program name, which the multi-call image drops.
            let rest: Vec<String> = command.iter().skip(1).chain(args.iter()).cloned().collect();
            Launch {
                program: self.exe.clone(),
                args: ["image".to_string(), name.to_string()]
                    .into_iter()
                    .chain(rest)
                    .collect(),
                stop_signal: "TERM",
            }
        };
        match image_name(image) {
            "ferry-lab/sqlite-writer" => Ok(multi_call("sqlite-writer")),
            "ghcr.io/ferry-dr/ferry-replicator" => Ok(multi_call("ferry-replicator")),
            "ghcr.io/ferry-dr/ferry-controller" => Ok(multi_call("ferry-controller")),
            "ghcr.io/ferry-dr/ferry-gate" => Ok(multi_call("ferry-gate")),
            // The official image stops with SIGINT (fast shutdown: clients disconnected, a
            // checkpoint written); SIGTERM would wait for every client to leave.
            "postgres" => Ok(Launch {
                stop_signal: "INT",
                ..multi_call("postgres")
            }),
            "busybox" => {
                let mut argv = command.iter().chain(args.iter()).cloned();
                let program = argv.next().ok_or_else(|| CatalogError::NoCommand {
                    image: image.to_string(),
                })?;
                Ok(Launch {
                    program: PathBuf::from(program),
                    args: argv.collect(),
                    stop_signal: "TERM",
                })
            }
            _ => Err(CatalogError::UnknownImage {
                image: image.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        for (given, want) in [
            ("postgres", "postgres"),
            ("postgres:16", "postgres"),
            ("docker.io/library/postgres:16.2", "postgres"),
            ("ferry-lab/sqlite-writer:v1", "ferry-lab/sqlite-writer"),
            ("localhost:5000/busybox:1.36", "localhost:5000/busybox"),
            ("busybox@sha256:abc", "busybox"),
        ] {
            assert_eq!(image_name(given), want, "{given}");
        }
    }

    #[test]
    fn resolves_catalog_images() {
        let c = Catalog::with_exe("/bin/ferry-lab".into());
        let l = c
            .resolve("ferry-lab/sqlite-writer", &[], &["verify".into()])
            .unwrap();
        assert_eq!(l.args, ["image", "sqlite-writer", "verify"]);
        assert_eq!(l.stop_signal, "TERM");
        assert_eq!(
            c.resolve("postgres:15", &[], &[]).unwrap().stop_signal,
            "INT"
        );
        let l = c
            .resolve("busybox", &["sh".into(), "-c".into()], &["sleep 1".into()])
            .unwrap();
        assert_eq!(
            (l.program.to_str().unwrap(), l.args.as_slice()),
            ("sh", &["-c".to_string(), "sleep 1".to_string()][..])
        );
        assert!(matches!(
            c.resolve("nginx", &[], &[]),
            Err(CatalogError::UnknownImage { .. })
        ));
    }
}
