//! Runnable examples of the fleet SDK; see `examples/README.md` for the list
//! in learning order. This library part is empty: each example is a binary
//! under `src/bin/`.
