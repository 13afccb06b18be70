//! SD3's frozen text conditioning, as diffusers' `StableDiffusion3Pipeline.encode_prompt` builds
//! it: two CLIP text encoders with projection (CLIP-L in `text_encoder/`, CLIP-G in
//! `text_encoder_2/`), each with its own BPE tokenizer. The sequence states are each encoder's
//! states before its last layer, concatenated on the feature axis and zero-padded to the
//! transformer's `joint_attention_dim`, followed by T5's tokens; the pooled embedding is the two
//! projected end-of-text states concatenated.
//!
//! T5 (`text_encoder_3`, a `T5EncoderModel`, with `tokenizer_3`'s sentencepiece `tokenizer.json`)
//! encodes each prompt padded to [`T5_TOKENS`] tokens, with no attention mask, as the pipeline
//! does. Without it (`text_encoder_3` null in `model_index.json`, as diffusers allows), its part
//! of the sequence is [`T5_TOKENS`] zero tokens, which is what the pipeline feeds the transformer
//! then.

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

/// T5's encoder (candle-transformers', frozen) and its sentencepiece tokenizer.
pub struct T5Text {
    /// candle-transformers' T5 encoder runs through `&mut self` (its position-bias cache).
    encoder: std::sync::Mutex<candle_transformers::models::t5::T5EncoderModel>,
    tokenizer: tokenizers::Tokenizer,
    pad_id: u32,
    /// `d_model`: the width of the states.
    width: usize,
}

impl T5Text {
    /// Loads `folder/text_encoder_3` (config.json, model.safetensors) and
    /// `folder/tokenizer_3/tokenizer.json`, frozen in `dtype`.
    pub fn load(folder: &DiffusersFolder, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let (config_path, json) = folder.json("text_encoder_3/config.json")?;
        let cfg: candle_transformers::models::t5::Config =
            serde_json::from_value(json).with_context(|| format!("{}: not a T5 encoder config", config_path.display()))?;
        let weights = folder.file("text_encoder_3/model.safetensors")?;
        let vb = mmap_var_builder(&weights, dtype, device)?;
        let encoder = candle_transformers::models::t5::T5EncoderModel::load(vb, &cfg)
            .with_context(|| format!("{}: a tensor is missing or has the wrong shape for {}", weights.display(), config_path.display()))?;
        let tok_path = folder.file("tokenizer_3/tokenizer.json")?;
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json the tokenizers library reads: {e}", tok_path.display()))?;
        let pad_id = tokenizer.token_to_id("<pad>").unwrap_or(cfg.pad_token_id as u32);
        Ok(Self { encoder: std::sync::Mutex::new(encoder), tokenizer, pad_id, width: cfg.d_model })
    }

    /// Token ids of `prompt` with T5's end token, cut or padded to [`T5_TOKENS`].
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(prompt, true).map_err(|e| candle_core::Error::Msg(format!("T5 tokenizer: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > T5_TOKENS {
            // `truncation=True` keeps the end token in the last place.
            let eos = *ids.last().expect("not empty");
            ids.truncate(T5_TOKENS);
            ids[T5_TOKENS - 1] = eos;
        }
        ids.resize(T5_TOKENS, self.pad_id);
        Ok(ids)
    }

    /// The last hidden states (N, [`T5_TOKENS`], d_model).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], device: &Device) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * T5_TOKENS);
        for p in prompts {
            ids.extend(self.token_ids(p.as_ref())?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), T5_TOKENS), device)?;
        self.encoder.lock().expect("T5 lock").forward(&ids)
    }
}

/// SD3's text conditioning from its CLIP-L and CLIP-G encoders, and T5 when the pipeline has it.
pub struct Sd3TextEncoders {
    clip_l: ClipWithProjection,
    clip_g: ClipWithProjection,
    t5: Option<T5Text>,
    /// The transformer's `joint_attention_dim`: the width the sequence states are padded to.
    joint_dim: usize,
}

impl Sd3TextEncoders {
    /// Loads both CLIP encoders of the pipeline in `folder` (and T5 when `with_t5`), checking
    /// their widths against the transformer's `joint_attention_dim` and `pooled_projection_dim`.
    pub fn load(folder: &DiffusersFolder, with_t5: bool, joint_dim: usize, pooled_dim: usize, dtype: DType, device: &Device) -> anyhow::Result<Self> {
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
        let t5 = with_t5.then(|| T5Text::load(folder, dtype, device)).transpose()?;
        if let Some(t5) = &t5 {
            let width = t5.width;
            anyhow::ensure!(
                width == joint_dim,
                "{}: joint_attention_dim {joint_dim} differs from the T5 encoder's d_model {width}; the transformer and text encoders come from different models",
                config.display()
            );
        }
        Ok(Self { clip_l, clip_g, t5, joint_dim })
    }

    /// The T5 encoder, when the pipeline has one.
    pub fn t5(&self) -> Option<&T5Text> {
        self.t5.as_ref()
    }

    /// The transformer's text inputs for `prompts`, in f32: the sequence (N, 77 + [`T5_TOKENS`],
    /// joint_attention_dim) and the pooled embedding (N, pooled_projection_dim).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], device: &Device) -> Result<(Tensor, Tensor)> {
        let (seq_l, pooled_l) = self.clip_l.encode(prompts, device)?;
        let (seq_g, pooled_g) = self.clip_g.encode(prompts, device)?;
        let clip = Tensor::cat(&[&seq_l, &seq_g], 2)?.to_dtype(DType::F32)?;
        let (n, _, width) = clip.dims3()?;
        let clip = clip.pad_with_zeros(2, 0, self.joint_dim - width)?;
        let t5 = match &self.t5 {
            Some(t5) => t5.encode(prompts, device)?.to_dtype(DType::F32)?,
            None => Tensor::zeros((n, T5_TOKENS, self.joint_dim), DType::F32, device)?,
        };
        let sequence = Tensor::cat(&[&clip, &t5], 1)?;
        let pooled = Tensor::cat(&[&pooled_l, &pooled_g], 1)?.to_dtype(DType::F32)?;
        Ok((sequence, pooled))
    }
}
