//! The integration tests, one binary (each test binary links libtorch, about 170 MB and two
//! seconds of linking each): the runner, the method's stage kinds, reports, the command line,
//! models against their files, and the parity suite against the PyTorch references. `make
//! hardening` is a binary of its own (tests/hardening.rs): it takes minutes and runs apart.
mod support;

mod cli;
mod custom_reward;
mod data;
mod docs;
mod lora_export;
mod method;
mod model_cli;
mod parity;
mod precision;
mod report;
mod runner;
mod sample;
mod study_pipelines;
mod tiny_world;
