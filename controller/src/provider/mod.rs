//! Where instances come from: `local` (an agent process on this machine, the embedded
//! default) and `ec2`. The daemon dispatches on an instance's provider where they differ
//! (launching, terminating, stopping); everything after enrollment is the same agent.

pub mod ec2;
pub mod local;
