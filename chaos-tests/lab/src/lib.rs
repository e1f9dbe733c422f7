//! Ferry's lab: Kubernetes sites on one machine, faithful enough that Ferry runs in it
//! unchanged.
//!
//! A site is an API server ([`apiserver`]) that speaks the Kubernetes REST API over HTTP on a
//! loopback address, with its state in sled so it survives SIGKILL like etcd would. Ferry's
//! binaries reach it only through a kubeconfig and kube-rs, so they cannot tell the lab from
//! a real cluster. What the lab emulates, what it does not, and what that means for results
//! measured in it: `docs/lab.md`.

// Every request path returns `ApiError` (a full metav1.Status); its size is noise next to an
// HTTP round trip, and boxing it everywhere would only add noise to the handlers.
#![allow(clippy::result_large_err)]

pub mod apiserver;
pub mod chaos;
pub mod control_plane;
pub mod demo;
pub mod images;
pub mod install;
pub mod kubeconfig;
pub mod ledger_app;
pub mod links;
pub mod node;
pub mod scale;
pub mod site;
pub mod sites;
pub mod testing;
pub mod wait;
pub mod witnesses;
