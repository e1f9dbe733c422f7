//! The node's disk. CSI storage takes VolumeSnapshots and restores by copy-on-write, so a
//! snapshot of a large volume costs neither time nor space. The lab does the same when it can:
//! each site's node directory (`DIR/<site>/node`: volumes, snapshots, pod files) is an XFS
//! filesystem with `reflink=1` on a sparse image, `DIR/<site>/node.xfs`, mounted through a
//! loop device, and every copy the node makes (`cp --reflink=auto`) shares extents. That needs
//! root and `mkfs.xfs` (Debian's `xfsprogs`); without them the node keeps plain directories on
//! the lab directory's own filesystem, where every snapshot is a full copy, and `ferry-lab
//! status` says which and why.
//!
//! The mount belongs to the lab, not to the site's process: it is made before the site starts
//! and outlives a killed site (as a disk outlives a power cut); `ferry-lab down` unmounts it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::sites::SiteLayout;

/// Capacity of a node's image in bytes (sparse: only what volumes hold takes space).
pub const IMAGE_BYTES: u64 = 64 << 30;

/// The install hint when copy-on-write storage was asked for and cannot be made.
pub const INSTALL_HINT: &str =
    "copy-on-write node storage needs root and mkfs.xfs (apt-get install xfsprogs)";

/// What backs a node's storage, as chosen by `ferry-lab up --node-storage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NodeStorage {
    /// Copy-on-write where the lab can make it, plain directories otherwise.
    #[default]
    Auto,
    /// Copy-on-write (XFS with reflink on a loop device), or fail naming what is missing.
    Reflink,
    /// Plain directories: every snapshot and restore is a full copy.
    Copies,
}

impl NodeStorage {
    /// The command-line word.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStorage::Auto => "auto",
            NodeStorage::Reflink => "reflink",
            NodeStorage::Copies => "copies",
        }
    }
}

/// What a node's storage turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// XFS with reflink on the loop-mounted image at this path.
    Reflink(PathBuf),
    /// Plain directories, for this reason.
    Copies(String),
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Reflink(image) => write!(
                f,
                "copy-on-write (XFS, reflink=1, on loop image {})",
                image.display()
            ),
            Backing::Copies(reason) => write!(f, "full copies ({reason})"),
        }
    }
}

fn image(layout: &SiteLayout) -> PathBuf {
    layout.root.join("node.xfs")
}

/// Where the reason for plain directories is kept, for `ferry-lab status`.
fn note(layout: &SiteLayout) -> PathBuf {
    layout.root.join("node-storage")
}

/// Whether `path` is a mount point, from `/proc/self/mountinfo` (field 5, octal-escaped).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where program `name` is: on `PATH`, or in `/usr/sbin` or `/sbin` (root's tools).
fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Makes (or re-mounts) the site's copy-on-write node storage.
fn mount_reflink(layout: &SiteLayout) -> Result<PathBuf> {
    anyhow::ensure!(super::kubelet::is_root(), "not running as root");
    let mkfs = find_program("mkfs.xfs").context("mkfs.xfs not found")?;
    let node = layout.node();
    let image = image(layout);
    if !image.exists() {
        if std::fs::read_dir(&node).is_ok_and(|mut entries| entries.next().is_some()) {
            bail!("{} already holds plain directories", node.display());
        }
        let tmp = layout.root.join(".node.xfs.tmp");
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.set_len(IMAGE_BYTES)
            .with_context(|| format!("sizing {}", tmp.display()))?;
        drop(file);
        run(
            &mkfs.to_string_lossy(),
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                tmp.as_os_str(),
            ],
        )?;
        // Renamed once formatted: an image that exists is a filesystem.
        std::fs::rename(&tmp, &image)?;
    }
    std::fs::create_dir_all(&node).with_context(|| format!("creating {}", node.display()))?;
    run(
        "mount",
        &[
            "-o".as_ref(),
            "loop".as_ref(),
            image.as_os_str(),
            node.as_os_str(),
        ],
    )?;
    Ok(image)
}

/// Prepares the node storage of the site at `layout` before the site starts, as `wanted`
/// says; a site whose storage is mounted already (restarted after a kill) keeps it.
///
/// # Errors
/// With [`NodeStorage::Reflink`], when the image cannot be made or mounted (naming the step
/// and [`INSTALL_HINT`]); with `Auto`, only when the reason cannot be recorded.
pub fn prepare(layout: &SiteLayout, wanted: NodeStorage) -> Result<Backing> {
    if is_mount_point(&layout.node()) {
        return Ok(Backing::Reflink(image(layout)));
    }
    if image(layout).exists() {
        // The site's volumes and snapshots live in that image: never start without them.
        anyhow::ensure!(
            wanted != NodeStorage::Copies,
            "node storage: {} holds this site's volumes; it cannot start on plain directories",
            image(layout).display()
        );
        return mount_reflink(layout)
            .map(Backing::Reflink)
            .with_context(|| format!("node storage: mounting {}", image(layout).display()));
    }
    let backing = match wanted {
        NodeStorage::Copies => Backing::Copies("--node-storage copies".into()),
        NodeStorage::Reflink => Backing::Reflink(
            mount_reflink(layout).with_context(|| format!("node storage: {INSTALL_HINT}"))?,
        ),
        NodeStorage::Auto => match mount_reflink(layout) {
            Ok(image) => Backing::Reflink(image),
            Err(e) => Backing::Copies(format!("{e:#}; {INSTALL_HINT}")),
        },
    };
    match &backing {
        Backing::Copies(reason) => std::fs::write(note(layout), reason)
            .with_context(|| format!("writing {}", note(layout).display()))?,
        Backing::Reflink(_) => {
            let _ = std::fs::remove_file(note(layout));
        }
    }
    Ok(backing)
}

/// What backs the node storage of the site at `layout` now: its mount, or the reason
/// recorded when it started with plain directories.
pub fn describe(layout: &SiteLayout) -> Backing {
    if is_mount_point(&layout.node()) {
        return Backing::Reflink(image(layout));
    }
    Backing::Copies(
        std::fs::read_to_string(note(layout))
            .unwrap_or_else(|_| "not mounted: the site has not started".into()),
    )
}

/// Unmounts the node storage of the stopped site at `layout`, if mounted. The image stays:
/// the next `up` mounts it again with every volume and snapshot as it was.
///
/// # Errors
/// When `umount` fails even lazily.
pub fn release(layout: &SiteLayout) -> Result<()> {
    let node = layout.node();
    if !is_mount_point(&node) {
        return Ok(());
    }
    if run("umount", &[node.as_os_str()]).is_err() {
        // A process that outlived its site still holds a file: detach now, free when it exits.
        run("umount", &["-l".as_ref(), node.as_os_str()])?;
    }
    Ok(())
}
