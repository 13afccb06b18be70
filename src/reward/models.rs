//! The reward models behind the script primitives `clip_similarity(img, text)` and
//! `aesthetic(img)`: which CLIP and aesthetic head a run uses, loaded once and shared by every
//! reward worker, with embedding caches so a script that scores every image costs one batched
//! CLIP pass per batch.
//!
//! - **Defaults:** the shipped small models, [`DEFAULT_CLIP`] and [`DEFAULT_AESTHETIC`]
//!   (`ddpo pretrain clip` / `ddpo pretrain aesthetic`).
//! - **Real weights:** `--clip PATH` names a Hugging Face CLIP (`model.safetensors` with the
//!   upstream tensor names, or its folder) whose folder also holds the BPE tokenizer
//!   (`vocab.json`, `merges.txt`); ViT-B/32 and ViT-L/14 are told apart by the patch embedding.
//!   `--aesthetic PATH` names the LAION predictor (`.pth` or `.safetensors`). A file whose
//!   `.json` beside it is a shapes CLIP config is a small CLIP instead.
//! - **VLM:** [`LazyModels::vlm`], the client of the run's vision-language model endpoint
//!   ([`ModelPaths::vlm`], from `--vlm`), made on first use; see [`super::vlm`].
//! - **Caches:** image embeddings by a hash of the pixels, text embeddings by the text.
//!   [`RewardModels::prefetch`] embeds a whole batch in one pass (the script reward calls it
//!   before scoring a batch); later lookups hit the cache.

use std::collections::HashMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::aesthetic::AestheticMlp;
use super::clip::{self, Clip};
use super::shapes_clip::ShapesClip;
use super::vlm::{Vlm, VlmConfig};
use crate::family::sd::ClipTokenizer;

/// The shipped small CLIP, relative to the working directory or the source checkout.
pub const DEFAULT_CLIP: &str = "models/shapes-clip.safetensors";
/// The shipped aesthetic head on the small CLIP's embeddings.
pub const DEFAULT_AESTHETIC: &str = "models/shapes-aesthetic.safetensors";
/// Embeddings kept per cache before it is cleared (a few epochs' worth of images).
const CACHE_LIMIT: usize = 8192;

/// Which model files a run uses (`None`: the shipped default). Saved in the run config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelPaths {
    #[serde(default)]
    pub clip: Option<PathBuf>,
    #[serde(default)]
    pub aesthetic: Option<PathBuf>,
    /// The vision-language model behind `vlm_ask` / `vlm_score` (`None`: none; those fail).
    #[serde(default)]
    pub vlm: Option<super::vlm::VlmConfig>,
}

/// A CLIP: the small shapes-world one, or real weights with their BPE tokenizer.
enum ClipBackend {
    Shapes(ShapesClip),
    Real { clip: Clip, tokenizer: ClipTokenizer },
}

impl ClipBackend {
    fn load(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let weights = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
        anyhow::ensure!(
            weights.exists(),
            "CLIP weights {} not found (run `ddpo pretrain clip --export {DEFAULT_CLIP}` for the small one, or pass --clip PATH)",
            weights.display()
        );
        if super::shapes_clip::config_path(&weights).exists() {
            return Ok(Self::Shapes(ShapesClip::load(&weights, device)?));
        }
        let config = real_config(&weights)?;
        let clip = Clip::load(&weights, config, device)?;
        let dir = weights.parent().unwrap_or(Path::new("."));
        let tokenizer = ClipTokenizer::from_dir(dir)
            .with_context(|| format!("CLIP {} needs its BPE tokenizer (vocab.json, merges.txt) in {}", weights.display(), dir.display()))?;
        Ok(Self::Real { clip, tokenizer })
    }

    fn embed_dim(&self) -> usize {
        match self {
            Self::Shapes(m) => m.config().embed_dim,
            Self::Real { clip, .. } => clip.image_embed_dim(),
        }
    }

    fn image_embeddings(&self, images: &[&RgbImage]) -> anyhow::Result<Tensor> {
        match self {
            Self::Shapes(m) => m.image_embeddings(images),
            Self::Real { clip, .. } => clip.image_embeddings(&images.iter().map(|i| (*i).clone()).collect::<Vec<_>>()),
        }
    }

    fn text_embeddings(&self, texts: &[&str]) -> anyhow::Result<Tensor> {
        match self {
            Self::Shapes(m) => m.text_embeddings(texts),
            Self::Real { clip, tokenizer } => {
                let ids = texts.iter().map(|t| tokenizer.encode(t)).collect::<anyhow::Result<Vec<_>>>()?;
                let len = ids.first().map_or(0, Vec::len);
                let flat: Vec<u32> = ids.into_iter().flatten().collect();
                clip.text_embeddings(&Tensor::from_vec(flat, (texts.len(), len), clip.device())?)
            }
        }
    }
}

/// ViT-B/32 or ViT-L/14, from the shape of the patch embedding.
fn real_config(weights: &Path) -> anyhow::Result<candle_transformers::models::clip::ClipConfig> {
    let name = "vision_model.embeddings.patch_embedding.weight";
    // SAFETY: read-only map of a file nobody writes in place.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(weights) }
        .with_context(|| format!("{} is not a readable safetensors file", weights.display()))?;
    let view = st.get(name).with_context(|| {
        format!("{} lacks tensor {name:?} (expected [768, 3, 32, 32] for ViT-B/32 or [1024, 3, 14, 14] for ViT-L/14; is it a Hugging Face CLIP?)", weights.display())
    })?;
    match view.shape() {
        [768, 3, 32, 32] => Ok(clip::vit_b32()),
        [1024, 3, 14, 14] => Ok(clip::vit_l14()),
        other => anyhow::bail!(
            "{}: tensor {name:?} has shape {other:?}; supported are [768, 3, 32, 32] (ViT-B/32) and [1024, 3, 14, 14] (ViT-L/14)",
            weights.display()
        ),
    }
}

/// The loaded models and their caches; share it behind an `Arc`.
pub struct RewardModels {
    clip: ClipBackend,
    /// The head, or why there is none (raised when a script calls `aesthetic`).
    aesthetic: Result<AestheticMlp, String>,
    images: Mutex<HashMap<u64, Arc<Vec<f32>>>>,
    texts: Mutex<HashMap<String, Arc<Vec<f32>>>>,
    /// Images embedded, for tests and logs.
    pub images_embedded: std::sync::atomic::AtomicUsize,
}

impl RewardModels {
    /// Loads the configured models (the shipped ones where a path is `None`).
    pub fn load(paths: &ModelPaths, device: &Device) -> anyhow::Result<Self> {
        let clip_path = paths.clip.clone().unwrap_or_else(|| resolve(DEFAULT_CLIP));
        let clip = ClipBackend::load(&clip_path, device)?;
        let head_path = paths.aesthetic.clone().unwrap_or_else(|| resolve(DEFAULT_AESTHETIC));
        let aesthetic = super::aesthetic::load_head(&head_path, device)
            .and_then(|mlp| {
                anyhow::ensure!(
                    mlp.input_dim() == clip.embed_dim(),
                    "aesthetic head {} reads {}-wide embeddings but CLIP {} makes {}-wide ones (pair a real CLIP ViT-L/14 with the LAION predictor via --aesthetic)",
                    head_path.display(),
                    mlp.input_dim(),
                    clip_path.display(),
                    clip.embed_dim()
                );
                Ok(mlp)
            })
            .map_err(|e| format!("{e:#}"));
        Ok(Self::new(clip, aesthetic))
    }

    /// Wraps an in-memory small CLIP (and head), e.g. in tests.
    pub fn from_shapes(clip: ShapesClip, aesthetic: Option<AestheticMlp>) -> Self {
        Self::new(ClipBackend::Shapes(clip), aesthetic.ok_or_else(|| "no aesthetic head configured".to_string()))
    }

    fn new(clip: ClipBackend, aesthetic: Result<AestheticMlp, String>) -> Self {
        Self { clip, aesthetic, images: Mutex::default(), texts: Mutex::default(), images_embedded: Default::default() }
    }

    /// Embeds every image of `images` not cached yet, in one batch.
    pub fn prefetch(&self, images: &[&RgbImage]) -> anyhow::Result<()> {
        let keys: Vec<u64> = images.iter().map(|i| image_key(i)).collect();
        let missing: Vec<(u64, &RgbImage)> = {
            let cache = self.images.lock().unwrap();
            let mut seen = std::collections::HashSet::new();
            keys.iter().zip(images).filter(|(k, _)| !cache.contains_key(k) && seen.insert(**k)).map(|(k, i)| (*k, *i)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let imgs: Vec<&RgbImage> = missing.iter().map(|(_, i)| *i).collect();
        let emb = self.clip.image_embeddings(&imgs)?.to_vec2::<f32>()?;
        self.images_embedded.fetch_add(imgs.len(), std::sync::atomic::Ordering::Relaxed);
        let mut cache = self.images.lock().unwrap();
        if cache.len() + missing.len() > CACHE_LIMIT {
            cache.clear();
        }
        for ((k, _), e) in missing.iter().zip(emb) {
            cache.insert(*k, Arc::new(e));
        }
        Ok(())
    }

    /// The L2-normalised image embedding (cached).
    pub fn image_embedding(&self, image: &RgbImage) -> anyhow::Result<Arc<Vec<f32>>> {
        let key = image_key(image);
        if let Some(e) = self.images.lock().unwrap().get(&key) {
            return Ok(e.clone());
        }
        self.prefetch(&[image])?;
        self.images.lock().unwrap().get(&key).cloned().context("image embedding cache lost an entry")
    }

    /// The L2-normalised text embeddings (cached), embedding the uncached ones in one batch.
    pub fn text_embeddings(&self, texts: &[&str]) -> anyhow::Result<Vec<Arc<Vec<f32>>>> {
        let missing: Vec<&str> = {
            let cache = self.texts.lock().unwrap();
            let mut m: Vec<&str> = texts.iter().copied().filter(|t| !cache.contains_key(*t)).collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if !missing.is_empty() {
            let emb = self.clip.text_embeddings(&missing)?.to_vec2::<f32>()?;
            let mut cache = self.texts.lock().unwrap();
            if cache.len() + missing.len() > CACHE_LIMIT {
                cache.clear();
            }
            for (t, e) in missing.iter().zip(emb) {
                cache.insert(t.to_string(), Arc::new(e));
            }
        }
        let cache = self.texts.lock().unwrap();
        // A clear by another thread between the two locks is possible but leaves entries
        // re-embeddable; the caller retries through this function.
        texts.iter().map(|t| cache.get(*t).cloned().with_context(|| format!("text {t:?} fell out of the embedding cache; retry"))).collect()
    }

    /// Cosine similarity of `image` to each of `texts`.
    pub fn clip_similarity(&self, image: &RgbImage, texts: &[&str]) -> anyhow::Result<Vec<f64>> {
        let img = self.image_embedding(image)?;
        let txt = self.text_embeddings(texts)?;
        Ok(txt.iter().map(|t| img.iter().zip(t.iter()).map(|(a, b)| (a * b) as f64).sum()).collect())
    }

    /// Cosine similarity (-1..1) of the CLIP text embeddings of `a` and `b`.
    pub fn text_similarity(&self, a: &str, b: &str) -> anyhow::Result<f64> {
        let e = self.text_embeddings(&[a, b])?;
        Ok(e[0].iter().zip(e[1].iter()).map(|(x, y)| (x * y) as f64).sum())
    }

    /// The aesthetic head's score of `image`.
    pub fn aesthetic(&self, image: &RgbImage) -> anyhow::Result<f64> {
        let mlp = self.aesthetic.as_ref().map_err(|e| anyhow::anyhow!("no aesthetic model: {e}"))?;
        let emb = self.image_embedding(image)?;
        let x = Tensor::from_slice(emb.as_slice(), (1, emb.len()), &Device::Cpu)?;
        Ok(mlp.score(&x)?.to_vec1::<f32>()?[0] as f64)
    }
}

/// The models of a run, loaded on first use (so runs and checks that never call a learned
/// primitive never read the files) and then shared. Cheap to clone.
#[derive(Clone, Default)]
pub struct LazyModels {
    paths: ModelPaths,
    device: Option<Device>,
    cell: Arc<OnceLock<Result<Arc<RewardModels>, String>>>,
    /// The VLM client, made on first use from `paths.vlm`.
    vlm: Arc<OnceLock<Result<Arc<Vlm>, String>>>,
}

impl LazyModels {
    pub fn new(paths: ModelPaths, device: Device) -> Self {
        Self { paths, device: Some(device), cell: Arc::default(), vlm: Arc::default() }
    }

    /// Already loaded models (e.g. built in memory by a test).
    pub fn ready(models: Arc<RewardModels>) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(Ok(models));
        Self { paths: ModelPaths::default(), device: None, cell: Arc::new(cell), vlm: Arc::default() }
    }

    /// The same models with `vlm` as the VLM endpoint (e.g. a test server).
    pub fn with_vlm(mut self, vlm: Option<VlmConfig>) -> Self {
        self.paths.vlm = vlm;
        self.vlm = Arc::default();
        self
    }

    /// The VLM client, made on the first call; an error when the run has no `--vlm`.
    pub fn vlm(&self) -> anyhow::Result<Arc<Vlm>> {
        self.vlm
            .get_or_init(|| {
                let config = self.paths.vlm.clone().ok_or_else(|| {
                    "no vision-language model is configured: start with --vlm URL (an OpenAI-compatible server such as vLLM or Ollama; `ddpo vlm-server` serves a test one)".to_string()
                })?;
                Vlm::new(config).map(Arc::new).map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map_err(anyhow::Error::msg)
    }

    /// Starts a new epoch's VLM budget (nothing without a VLM in use).
    pub fn begin_epoch(&self) {
        if let Some(Ok(vlm)) = self.vlm.get() {
            vlm.begin_epoch();
        }
    }

    /// The models, loading them on the first call; a load error is kept and repeated.
    pub fn get(&self) -> anyhow::Result<Arc<RewardModels>> {
        self.cell
            .get_or_init(|| {
                RewardModels::load(&self.paths, self.device.as_ref().unwrap_or(&Device::Cpu)).map(Arc::new).map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map_err(anyhow::Error::msg)
    }
}

/// A shipped model path: as given when it exists here, else inside the source checkout.
pub fn resolve(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if p.exists() {
        return p;
    }
    let in_checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if in_checkout.exists() {
        in_checkout
    } else {
        p
    }
}

/// A hash of an image's size and pixels (std's SipHash with fixed keys: stable within a process,
/// which is all an in-memory cache needs).
pub(crate) fn image_key(image: &RgbImage) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write_u32(image.width());
    h.write_u32(image.height());
    h.write(image.as_raw());
    h.finish()
}
