//! UNet2DConditionModel (diffusers).
