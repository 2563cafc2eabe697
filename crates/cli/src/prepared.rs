//! What a training run needs, loaded and checked (by
//! [`crate::train::TrainArgs::prepare`]).

use mixnn_model::data::Split;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::TrainConfig;

/// What a training run needs, loaded and checked.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The model.
    pub model: ModelSpec,
    /// The train and test images, already cut to the limits.
    pub split: Split,
    /// Epochs, batch size, optimiser, seed.
    pub cfg: TrainConfig,
}
