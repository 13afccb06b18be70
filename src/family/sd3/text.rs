//! SD3's frozen text conditioning, as diffusers' `StableDiffusion3Pipeline.encode_prompt` builds
//! it: two CLIP text encoders with projection (CLIP-L in `text_encoder/`, CLIP-G in
//! `text_encoder_2/`), each with its own BPE tokenizer. The sequence states are each encoder's
//! states before its last layer, concatenated on the feature axis and zero-padded to the
//! transformer's `joint_attention_dim`, followed by T5's tokens; the pooled embedding is the two
//! projected end-of-text states concatenated.
//!
//! Without a T5 encoder (`text_encoder_3` absent, as diffusers allows), its part of the sequence
//! is [`T5_TOKENS`] zero tokens, which is what the pipeline feeds the transformer then.

use anyhow::Context;
use candle_core::{DType, Device, Module, Result, Tensor};

use crate::family::sd::folder::DiffusersFolder;
use crate::family::sd::load::mmap_var_builder;
use crate::family::sd::{ClipTokenizer, MAX_LEN};
use crate::model::layers::Linear;
use crate::model::TextEncoder;

/// Length of T5's part of the sequence: the SD3 pipeline's default `max_sequence_length`,
/// which sets the zero tokens' count when T5 is absent as well.
pub const T5_TOKENS: usize = 256;

/// One CLIP text encoder with its projection (`CLIPTextModelWithProjection`) and tokenizer.
pub struct ClipWithProjection {
    encoder: TextEncoder,
    /// `text_projection`, without bias: the pooled state to the shared embedding space.
    projection: Linear,
    projection_dim: usize,
    tokenizer: ClipTokenizer,
}

impl ClipWithProjection {
    /// Loads the encoder in `folder/<encoder>` (config.json, model.safetensors) and the
    /// tokenizer in `folder/<tokenizer>`, frozen in `dtype`.
    pub fn load(folder: &DiffusersFolder, encoder: &str, tokenizer: &str, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let cfg = folder.clip_config(&format!("{encoder}/config.json"))?;
        let (config_path, json) = folder.json(&format!("{encoder}/config.json"))?;
        let projection_dim = json["projection_dim"]
            .as_u64()
            .with_context(|| format!("{}: field projection_dim missing (SD3's text encoders are CLIPTextModelWithProjection)", config_path.display()))?
            as usize;
        anyhow::ensure!(
            cfg.max_position_embeddings >= MAX_LEN,
            "{}: max_position_embeddings {} is below the CLIP tokenizer's {MAX_LEN} tokens",
            config_path.display(),
            cfg.max_position_embeddings
        );
        let weights = folder.file(&format!("{encoder}/model.safetensors"))?;
        let vb = mmap_var_builder(&weights, dtype, device)?;
        let hint = || format!("{}: a tensor is missing or has the wrong shape for {}", weights.display(), config_path.display());
        let encoder_model = TextEncoder::new(&cfg, vb.clone()).with_context(hint)?;
        let projection = Linear::new(vb.get((projection_dim, cfg.hidden_size), "text_projection.weight").with_context(hint)?, None);
        let tok_dir = folder.file(tokenizer)?;
        let tokenizer = ClipTokenizer::from_dir(&tok_dir).with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
        Ok(Self { encoder: encoder_model, projection, projection_dim, tokenizer })
    }

    /// Width of the sequence states and of the pooled embedding.
    fn widths(&self) -> (usize, usize) {
        (self.encoder.config().hidden_size, self.projection_dim)
    }

    /// The states before the last layer (N, 77, hidden) and the projected pooled embedding
    /// (N, projection_dim): the final state at each prompt's first end-of-text token.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], device: &Device) -> Result<(Tensor, Tensor)> {
        let mut ids = Vec::with_capacity(prompts.len() * MAX_LEN);
        let mut eos = Vec::with_capacity(prompts.len());
        for p in prompts {
            let row = self.tokenizer.encode(p.as_ref()).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            eos.push(row.iter().position(|&t| t == self.tokenizer.eos_id()).unwrap_or(MAX_LEN - 1) as u32);
            ids.extend(row);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), MAX_LEN), device)?;
        let (last, penultimate) = self.encoder.forward_with_penultimate(&ids)?;
        let (n, _, hidden) = last.dims3()?;
        let index = Tensor::from_vec(eos, (n, 1, 1), device)?.broadcast_as((n, 1, hidden))?.contiguous()?;
        let pooled = last.gather(&index, 1)?.squeeze(1)?;
        Ok((penultimate, self.projection.forward(&pooled)?))
    }
}

/// SD3's text conditioning from its CLIP-L and CLIP-G encoders (no T5).
pub struct Sd3TextEncoders {
    clip_l: ClipWithProjection,
    clip_g: ClipWithProjection,
    /// The transformer's `joint_attention_dim`: the width the sequence states are padded to.
    joint_dim: usize,
}

impl Sd3TextEncoders {
    /// Loads both CLIP encoders of the pipeline in `folder`, checking their widths against the
    /// transformer's `joint_attention_dim` and `pooled_projection_dim`.
    pub fn load(folder: &DiffusersFolder, joint_dim: usize, pooled_dim: usize, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let clip_l = ClipWithProjection::load(folder, "text_encoder", "tokenizer", dtype, device)?;
        let clip_g = ClipWithProjection::load(folder, "text_encoder_2", "tokenizer_2", dtype, device)?;
        let ((hl, pl), (hg, pg)) = (clip_l.widths(), clip_g.widths());
        let config = folder.dir.join("transformer/config.json");
        anyhow::ensure!(
            hl + hg <= joint_dim,
            "{}: joint_attention_dim {joint_dim} is narrower than the two CLIP encoders' states ({hl} + {hg}); the transformer and text encoders come from different models",
            config.display()
        );
        anyhow::ensure!(
            pl + pg == pooled_dim,
            "{}: pooled_projection_dim {pooled_dim} differs from the CLIP encoders' projections ({pl} + {pg}); the transformer and text encoders come from different models",
            config.display()
        );
        Ok(Self { clip_l, clip_g, joint_dim })
    }

    /// The transformer's text inputs for `prompts`, in f32: the sequence (N, 77 + [`T5_TOKENS`],
    /// joint_attention_dim) and the pooled embedding (N, pooled_projection_dim).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], device: &Device) -> Result<(Tensor, Tensor)> {
        let (seq_l, pooled_l) = self.clip_l.encode(prompts, device)?;
        let (seq_g, pooled_g) = self.clip_g.encode(prompts, device)?;
        let clip = Tensor::cat(&[&seq_l, &seq_g], 2)?.to_dtype(DType::F32)?;
        let (n, _, width) = clip.dims3()?;
        let clip = clip.pad_with_zeros(2, 0, self.joint_dim - width)?;
        let t5 = Tensor::zeros((n, T5_TOKENS, self.joint_dim), DType::F32, device)?;
        let sequence = Tensor::cat(&[&clip, &t5], 1)?;
        let pooled = Tensor::cat(&[&pooled_l, &pooled_g], 1)?.to_dtype(DType::F32)?;
        Ok((sequence, pooled))
    }
}
