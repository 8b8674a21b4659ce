//! Integration tests: drive the real `kiln` binary on real recipes in temp folders.

mod support;

mod args;
mod build;
mod cache;
mod config;
mod container;
mod context;
mod crash;
mod errors;
mod fuzz;
mod golden;
mod image;
mod interop;
mod mounts;
mod packages;
mod registry;
mod reproducible;
mod run;
mod security;
mod vm;
