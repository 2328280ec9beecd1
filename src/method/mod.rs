//! The paper's method, independent of the pipeline: sampling with truncated backprop, the
//! baseline and RID objectives, the EMA teacher, the optimizer, the fine-tuning loop with its
//! monitor and resumable checkpoints.
pub mod checkpoint;
pub mod monitor;
pub mod noise;
pub mod objective;
pub mod optim;
pub mod sampling;
pub mod train;
