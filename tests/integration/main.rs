//! The integration tests, one module per area, linked into one test binary: one link of the
//! engine instead of one per file keeps CI's build small and fast. `tests/dist.rs` stays its own
//! binary (it needs the `mpi` feature).

#[path = "../common/mod.rs"]
mod common;

mod bench;
mod cli;
mod detector;
mod experiment;
mod faults;
mod flow;
mod golden_ddim;
mod golden_sd;
mod golden_unet;
mod gradients;
mod grpo;
mod kernels_attn;
mod kernels_bmm;
mod kernels_conv;
mod kernels_linear;
mod kernels_norm;
mod kernels_shards;
mod layers;
mod lora;
mod pretrain;
mod render;
mod repl;
mod reward_models;
mod run;
mod sampler;
mod script;
mod script_cli;
mod sd3;
mod sd3_pipeline;
mod sd_backend;
mod selftest;
mod session;
mod shapes_clip;
mod trainer;
mod vlm;
mod world;
