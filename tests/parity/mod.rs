//! Parity tests: our tch models against the upstream Python implementations.
//!
//! Fixtures (weights, inputs, reference outputs) are written by `tests/parity/make_fixtures.py`
//! into `$RIL_FIXTURES/<area>/` (`make fixtures`); a missing fixture fails the test with the
//! command that makes it, never skips it.
mod aesthetic;
mod clip;
mod ddim;
mod fid_stats;
mod inception;
mod lora;
mod lora_export;
mod memory;
mod metrics;
mod optim;
mod pickscore;
mod rewards;
mod torchscript;
mod tokenizer;
mod unet;
mod vae;
mod weights;
