//! The paper's method, independent of the pipeline: sampling with truncated backprop, the
//! baseline and RID objectives, the EMA teacher, the optimizer.
pub mod noise;
pub mod objective;
pub mod optim;
pub mod sampling;
