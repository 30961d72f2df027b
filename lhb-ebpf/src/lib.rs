#![no_std]
// The programs live in main.rs (the bin target aya-build collects); this lib exists so
// the package has a library target for cargo metadata and the build-dependency edge.
