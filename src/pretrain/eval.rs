//! Does a policy follow shapes-world prompts? Samples images for prompts drawn from the caption
//! grammar and checks them with the world's pixel-level judge (background colour from the border,
//! shape colour from the non-background pixels).


use crate::family::Family;
use crate::reward::models::RewardModels;
use crate::sampler::{sample_images, SamplerConfig};
use rand::{Rng, SeedableRng};

use crate::world::variants::{variants, Attribute};
use crate::world::{judge, Judgement, Prompt, ShapesWorld};

/// Fraction of samples judged correct, per attribute.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PromptFollowing {
    pub samples: usize,
    pub background: f64,
    pub shape_colour: f64,
    /// Both attributes right.
    pub both: f64,
}

/// Judges `n` prompts drawn from the grammar with `prompt_seed`, sampled with `seed`.
pub fn prompt_following(
    policy: &dyn Family,
    world: &ShapesWorld,
    n: usize,
    cfg: &SamplerConfig,
    prompt_seed: u64,
    seed: u64,
) -> anyhow::Result<PromptFollowing> {
    let prompts = world.prompts(prompt_seed, n);
    let texts: Vec<String> = prompts.iter().map(|p| p.caption.clone()).collect();
    let images = sample_images(policy, &texts, cfg, seed, 50)?;
    Ok(judge_all(&images, &prompts))
}

/// The judge's verdict on each of `images`, against its prompt.
pub fn judge_each(images: &[image::RgbImage], prompts: &[Prompt]) -> Vec<Judgement> {
    images.iter().zip(prompts).map(|(img, p)| judge(img, &p.spec)).collect()
}

/// The judge's verdicts on `images`, each against its prompt.
pub fn judge_all(images: &[image::RgbImage], prompts: &[Prompt]) -> PromptFollowing {
    summarise(&judge_each(images, prompts))
}

/// The fraction of `verdicts` right, per attribute.
pub fn summarise(verdicts: &[Judgement]) -> PromptFollowing {
    let count = |ok: fn(&Judgement) -> bool| verdicts.iter().filter(|j| ok(j)).count();
    let (bg, colour, both) = (count(|j| j.background_ok), count(|j| j.shape_colour_ok), count(Judgement::passed));
    let n = verdicts.len();
    let frac = |k: usize| k as f64 / n.max(1) as f64;
    PromptFollowing { samples: n, background: frac(bg), shape_colour: frac(colour), both: frac(both) }
}

/// How well a reward agrees with the judge on a set of samples: whether it ranks the samples the
/// judge passes (both attributes right) above the ones it fails. DDPO normalises rewards per
/// prompt, so this is what a reward must get right, prompt by prompt, to train prompt fidelity.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RewardAgreement {
    pub reward: f64,
    /// Mean reward of the samples the judge passes (None when there are none).
    pub reward_passed: Option<f64>,
    pub reward_failed: Option<f64>,
    /// Probability that a random passed sample scores above a random failed one (ties count
    /// half): 1 is perfect agreement, 0.5 chance. None when either group is empty.
    pub reward_auc: Option<f64>,
}

/// The agreement of `rewards[i]` with the judge's verdict `passed[i]`.
pub fn reward_agreement(rewards: &[f64], passed: &[bool]) -> RewardAgreement {
    let pick = |want: bool| -> Vec<f64> { rewards.iter().zip(passed).filter(|(_, &p)| p == want).map(|(&r, _)| r).collect() };
    let (good, bad) = (pick(true), pick(false));
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let auc = (!good.is_empty() && !bad.is_empty()).then(|| {
        let wins: f64 = good
            .iter()
            .flat_map(|g| bad.iter().map(move |b| if g > b { 1.0 } else if g == b { 0.5 } else { 0.0 }))
            .sum();
        wins / (good.len() * bad.len()) as f64
    });
    RewardAgreement { reward: mean(rewards).unwrap_or(f64::NAN), reward_passed: mean(&good), reward_failed: mean(&bad), reward_auc: auc }
}

/// Mean reward-model scores of a set of samples: what the DDPO rewards measure.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RewardScores {
    /// JPEG size at quality 95 (kB), the compressibility tasks' measure.
    pub jpeg_kb: f64,
    /// CLIP cosine similarity of each image to its own prompt (the alignment reward).
    pub alignment: f64,
    /// The aesthetic head's score.
    pub aesthetic: f64,
}

/// Scores `images` (each with its prompt) with JPEG size and the CLIP / aesthetic `models`.
pub fn reward_scores(images: &[image::RgbImage], prompts: &[String], models: &RewardModels) -> anyhow::Result<RewardScores> {
    let refs: Vec<&image::RgbImage> = images.iter().collect();
    models.prefetch(&refs)?;
    let (mut jpeg, mut alignment, mut aesthetic) = (0.0, 0.0, 0.0);
    for (img, prompt) in images.iter().zip(prompts) {
        jpeg += crate::reward::jpeg::jpeg_kb(img)?;
        alignment += models.clip_similarity(img, &[prompt.as_str()])?[0];
        aesthetic += models.aesthetic(img)?;
    }
    let n = images.len().max(1) as f64;
    Ok(RewardScores { jpeg_kb: jpeg / n, alignment: alignment / n, aesthetic: aesthetic / n })
}

/// How much a model uses its prompts: its denoising loss on one fixed batch of world images (the
/// same noise each time) with their own captions, with each image given another image's
/// caption, and with no caption. A model that follows prompts has `own` clearly below the other
/// two; `own` equal to `shuffled` means the text is ignored.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ConditioningGap {
    pub own: f64,
    pub shuffled: f64,
    pub empty: f64,
}

impl ConditioningGap {
    /// 1 - own / shuffled: the share of the loss that the right caption removes.
    pub fn gap(&self) -> f64 {
        1.0 - self.own / self.shuffled
    }
}

/// [`ConditioningGap`] of `family` on `n` images of `world` (a fixed draw).
pub fn conditioning_gap(family: &dyn Family, world: &ShapesWorld, n: usize) -> anyhow::Result<ConditioningGap> {
    let batch = FixedBatch::new(family, world, n)?;
    let mut shuffled = batch.captions.clone();
    shuffled.rotate_left(1);
    let loss = |captions: &[String]| -> anyhow::Result<f64> { Ok(batch.losses(family, captions)?.mean_all()?.to_scalar::<f32>()? as f64) };
    Ok(ConditioningGap { own: loss(&batch.captions)?, shuffled: loss(&shuffled)?, empty: loss(&vec![String::new(); n])? })
}

/// One fixed draw of world images (the same for every model), scored under any captions with the
/// same noise and timesteps, so that two captionings' losses differ only by the captions.
struct FixedBatch {
    samples: Vec<crate::world::WorldSample>,
    captions: Vec<String>,
    x0: candle_core::Tensor,
}

impl FixedBatch {
    fn new(family: &dyn Family, world: &ShapesWorld, n: usize) -> anyhow::Result<Self> {
        let samples = world.batch(0xC0_4D17, n);
        let images: Vec<image::RgbImage> = samples.iter().map(|s| s.image.clone()).collect();
        let x0 = crate::render::images_to_tensor(&images, family.device())?;
        let captions = samples.iter().map(|s| s.caption.clone()).collect();
        Ok(Self { samples, captions, x0 })
    }

    /// The per-image denoising losses (N,) under `captions`.
    fn losses(&self, family: &dyn Family, captions: &[String]) -> anyhow::Result<candle_core::Tensor> {
        Ok(crate::kernels::no_grad::with_no_grad(|| family.denoising_loss(&self.x0, captions, &mut crate::family::NoiseRng::new(7)))?)
    }
}

/// Which words of its caption a model uses: for each [`Attribute`], 1 - own / variant, where
/// `variant` is the denoising loss of the same images and noise with that one attribute of each
/// caption changed (a caption that differs in nothing else, as the small CLIP's zero-shot test
/// uses). Near 0: the model ignores that word (e.g. draws every shape as a blob).
pub fn attribute_gaps(family: &dyn Family, world: &ShapesWorld, n: usize) -> anyhow::Result<Vec<(Attribute, f64)>> {
    let batch = FixedBatch::new(family, world, n)?;
    let own = batch.losses(family, &batch.captions)?.to_vec1::<f32>()?;
    let mut pick = rand_chacha::ChaCha8Rng::seed_from_u64(0x6A95);
    Attribute::ALL
        .into_iter()
        .map(|attribute| {
            let changed: Vec<Option<String>> = batch
                .samples
                .iter()
                .map(|s| {
                    let options = variants(&s.spec, attribute);
                    (!options.is_empty()).then(|| options[pick.random_range(0..options.len())].caption())
                })
                .collect();
            let captions: Vec<String> = changed.iter().zip(&batch.captions).map(|(c, o)| c.clone().unwrap_or_else(|| o.clone())).collect();
            let variant = batch.losses(family, &captions)?.to_vec1::<f32>()?;
            let used = changed.iter().enumerate().filter(|(_, c)| c.is_some()).map(|(i, _)| i);
            let (own_sum, variant_sum) = used.fold((0.0, 0.0), |(a, b), i| (a + own[i] as f64, b + variant[i] as f64));
            Ok((attribute, if variant_sum > 0.0 { 1.0 - own_sum / variant_sum } else { f64::NAN }))
        })
        .collect()
}

/// The fixed prompts shown in pretraining sample grids.
pub fn grid_prompts(world: &ShapesWorld) -> Vec<String> {
    world.prompts(1234, 16).into_iter().map(|p: Prompt| p.caption).collect()
}

#[cfg(test)]
mod tests {
    use super::reward_agreement;

    #[test]
    fn agreement_counts_pairs_ranked_like_the_judge() {
        // Passed 3 and 1, failed 2 and 0: of the four (passed, failed) pairs, 3>2, 3>0, 1>0 win.
        let a = reward_agreement(&[3.0, 2.0, 1.0, 0.0], &[true, false, true, false]);
        assert_eq!((a.reward, a.reward_passed, a.reward_failed, a.reward_auc), (1.5, Some(2.0), Some(1.0), Some(0.75)));
        // Ties count half; one group empty leaves the group's mean and the AUC undefined.
        assert_eq!(reward_agreement(&[1.0, 1.0], &[true, false]).reward_auc, Some(0.5));
        let none = reward_agreement(&[1.0, 2.0], &[false, false]);
        assert_eq!((none.reward_passed, none.reward_auc), (None, None));
    }
}
