//! Where instances come from. Only the local provider exists so far; EC2 and RunPod join
//! it behind a common trait when they arrive (a trait with one implementation would only
//! guess at the shape the cloud providers need).

pub mod local;
