//! The pure core: the domain model, its validation and the compiler to map contents.
//! No I/O, no kernel, no async, no proto types.
pub mod compile;
pub mod model;
pub mod trace;
pub mod validate;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod scale_tests;
