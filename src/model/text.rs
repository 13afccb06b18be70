//! CLIP text transformer (transformers' `CLIPTextModel`, tensor names under `text_model.`):
//! token + position embeddings, pre-norm causal self-attention layers, final layer norm.
//! Its last hidden state is the UNet's cross-attention context.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::TextConfig;
use super::layers::{attention, linear, LayerNorm, Linear};

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        self.out_proj.forward(&attention(&q, &k, &v, self.heads, Some(mask))?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            quick_gelu: cfg.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)? + x)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick_gelu {
            (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?
        } else {
            h.gelu_erf()?
        };
        self.fc2.forward(&h)? + x
    }
}

/// The text encoder. `forward(ids)` maps (B, L) token ids to (B, L, hidden) states.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    config: TextConfig,
}

impl TextEncoder {
    /// `vb` points at the checkpoint root (the `text_model.` prefix is added here).
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let d = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                d,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// `ids`: (B, L) u32 token ids, L <= max_position_embeddings.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_penultimate(ids)?.0)
    }

    /// The final (layer-normed) states, and the states before the last layer (transformers'
    /// `hidden_states[-2]`: what SD3 feeds its transformer), for `ids` as in [`Self::forward`].
    pub fn forward_with_penultimate(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, len) = ids.dims2()?;
        let max = self.config.max_position_embeddings;
        if len > max {
            candle_core::bail!("text encoder: {len} tokens exceed max_position_embeddings {max}")
        }
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(len, ids.device())?;
        let (mut x, mut penultimate) = (x.clone(), x);
        for layer in &self.layers {
            penultimate = x.clone();
            x = layer.forward(&x, &mask)?;
        }
        Ok((self.final_layer_norm.forward(&x)?, penultimate))
    }
}

/// (L, L) additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)?.to_dtype(DType::F32)
}
