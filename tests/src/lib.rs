//! Test support: network namespaces, crafted frames, BPF_PROG_TEST_RUN and the agent
//! process. The tests themselves are in `tests/tests/`.
//!
//! Every test that touches the kernel needs root; each makes its own uniquely named
//! namespaces and removes them on drop, also when the test fails.
pub mod agent;
pub mod api;
pub mod bpffs;
pub mod frames;
pub mod generator;
pub mod netns;
pub mod reference;
pub mod reference_nat;
pub mod reference_router;
pub mod reference_sg;
pub mod testrun;
pub mod topology;
pub mod traffic;
pub mod uplink_lab;
