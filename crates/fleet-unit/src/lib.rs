//! Unit files, unit names and the [X-Fleet] model (no IO).
