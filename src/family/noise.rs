//! Seeded Gaussian noise, so that one `--seed` reproduces a run and a checkpoint can store the
//! generator's position and resume the same stream (candle's CPU `randn` is not seedable).

use candle_core::{Device, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// A seedable, resumable source of standard-normal tensors.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    rng: ChaCha8Rng,
}

/// The serialisable position of a [`NoiseRng`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseRngState {
    /// The generator's 256-bit key (derived from the user's seed).
    pub key: [u8; 32],
    pub stream: u64,
    pub word_pos: u128,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Stream `stream` of the generator seeded with `seed`: independent of the other streams,
    /// so a piece of work (one sampling batch) draws the same noise whichever process runs it.
    pub fn with_stream(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self { rng }
    }

    /// A standard-normal f32 tensor of `shape`.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count()).map(|_| self.rng.sample(StandardNormal)).collect();
        Tensor::from_vec(data, shape, device)
    }

    /// The underlying generator, for other seeded draws (timesteps, shuffles).
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Where the generator stands; pair with [`NoiseRng::restore`].
    pub fn state(&self) -> NoiseRngState {
        NoiseRngState {
            key: self.rng.get_seed(),
            stream: self.rng.get_stream(),
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// Rebuilds a generator at a saved position.
    pub fn restore(state: NoiseRngState) -> Self {
        let mut rng = ChaCha8Rng::from_seed(state.key);
        rng.set_stream(state.stream);
        rng.set_word_pos(state.word_pos);
        Self { rng }
    }
}
