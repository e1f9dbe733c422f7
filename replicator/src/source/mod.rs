//! The source side of replication: decide when ([`schedule`]) and ship a generation
//! ([`ship`]).

pub mod schedule;
pub mod ship;

pub use schedule::RpoSchedule;
pub use ship::{
    committed_state, ship, ChangedBlocks, Faults, FullScanReason, ReadMode, ShipError, ShipReport,
    ShipRequest, SourceVolume, VolumeReport, PARALLEL_VOLUMES, QUICK_CHECK_MARGIN, WINDOW_CHUNKS,
};
