//! Optimisation with state the project owns, so that a checkpoint can hold everything needed to
//! continue a run exactly: AdamW (candle's keeps its moments private), global gradient-norm
//! clipping, and an exponential moving average of the weights.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};

/// AdamW hyper-parameters (PyTorch's names and defaults, the DDPO reference's weight decay).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimiser steps over which the learning rate ramps linearly up to `lr` (0: none). Adam's
    /// first steps move every weight by about `lr` whatever its gradient's noise (the moments
    /// are estimated from one or two gradients), which visibly degrades a pretrained model.
    #[serde(default)]
    pub warmup_steps: usize,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-4, warmup_steps: 0 }
    }
}

/// AdamW over named variables. Moments are stored by name so they save and load with the weights.
pub struct AdamW {
    pub config: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    /// `vars`: the trainable variables with stable names (e.g. from `VarMap::data()`), sorted so
    /// the update order is deterministic.
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        let v = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        Ok(Self { config, vars, m, v, step: 0 })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The learning rate of the next step: `lr`, scaled down during the warm-up.
    pub fn current_lr(&self) -> f64 {
        let c = &self.config;
        if c.warmup_steps == 0 {
            return c.lr;
        }
        c.lr * ((self.step + 1) as f64 / c.warmup_steps as f64).min(1.0)
    }

    /// The gradients of this optimiser's variables, in its variable order.
    pub fn collect(&self, grads: &GradStore) -> Grads {
        self.vars.iter().map(|(_, v)| grads.get(v.as_tensor()).cloned()).collect()
    }

    /// The summed gradients of several backward passes (e.g. one per batch shard), in this
    /// optimiser's variable order.
    pub fn collect_sum<'a>(&self, stores: impl IntoIterator<Item = &'a GradStore>) -> Result<Grads> {
        let mut sum = Grads::new();
        for store in stores {
            accumulate(&mut sum, &self.collect(store), 1.0)?;
        }
        Ok(sum)
    }

    /// One update from `grads` (in variable order); variables without a gradient are left untouched.
    pub fn step(&mut self, grads: &Grads) -> Result<()> {
        let lr = self.current_lr();
        self.step += 1;
        let c = AdamWConfig { lr, ..self.config };
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            var.set(&(decayed - (update * c.lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments and step count as named tensors (`adam.m.<name>`, `adam.v.<name>`, `adam.step`).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("adam.m.{name}"), self.m[i].clone());
            out.insert(format!("adam.v.{name}"), self.v[i].clone());
        }
        let step = Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?;
        out.insert("adam.step".into(), step);
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] saved; every variable's moments must be present.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let device = self.m.first().map(|t| t.device().clone()).unwrap_or(candle_core::Device::Cpu);
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .ok_or_else(|| anyhow::anyhow!("optimizer state has no tensor {k}"))
                    .and_then(|t| Ok(t.to_device(&device)?))
            };
            self.m[i] = get(format!("adam.m.{name}"))?;
            self.v[i] = get(format!("adam.v.{name}"))?;
        }
        let step = tensors
            .get("adam.step")
            .ok_or_else(|| anyhow::anyhow!("optimizer state has no adam.step"))?;
        self.step = step.to_vec1::<i64>()?[0] as usize;
        Ok(())
    }
}

/// Gradients aligned with an optimiser's variables (`None`: the variable got no gradient).
pub type Grads = Vec<Option<Tensor>>;

/// Adds `more` into `acc` scaled by `scale` (gradient accumulation over several backward passes).
pub fn accumulate(acc: &mut Grads, more: &Grads, scale: f64) -> Result<()> {
    if acc.is_empty() {
        acc.resize(more.len(), None);
    }
    for (a, m) in acc.iter_mut().zip(more) {
        if let Some(m) = m {
            let m = if scale == 1.0 { m.clone() } else { (m * scale)? };
            *a = Some(match a.take() {
                Some(prev) => (prev + m)?,
                None => m,
            });
        }
    }
    Ok(())
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.iter().flatten() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Exponential moving average of named weights (used for the shipped pretrained model).
pub struct Ema {
    pub decay: f64,
    pub weights: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let weights = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, weights })
    }

    /// ema = d * ema + (1 - d) * current after optimiser step `step` (0-based), with the usual
    /// warm-up d = min(decay, (1 + step) / (10 + step)): without it the average would remember
    /// the random initialisation for thousands of steps. `vars` in construction order.
    pub fn update(&mut self, vars: &[(String, Var)], step: usize) -> Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for ((_, ema), (_, var)) in self.weights.iter_mut().zip(vars) {
            // Detached: a tracked variable in the sum would chain every step's average to the
            // previous one through the autograd graph, keeping all of them alive (~10 MB a step
            // for the default model, until the pretraining run was OOM-killed).
            *ema = ((&*ema * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ema_weights_are_detached_from_the_variables() {
        let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut ema = Ema::new(&vars, 0.9).unwrap();
        for step in 0..3 {
            var.set(&(var.as_tensor() + 1.0).unwrap()).unwrap();
            ema.update(&vars, step).unwrap();
        }
        // A tracked average would reach the variable through the autograd graph (and keep every
        // earlier average alive with it).
        let grads = ema.weights[0].1.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(var.as_tensor()).is_none());
        let d: Vec<f64> = (0..3).map(|s| 0.9f64.min((1.0 + s as f64) / (10.0 + s as f64))).collect();
        let mut want = 1.0f64;
        for (s, d) in d.iter().enumerate() {
            want = d * want + (1.0 - d) * (2.0 + s as f64);
        }
        let got = ema.weights[0].1.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-5, "ema {got}, want {want}");
    }

    #[test]
    fn warmup_ramps_the_first_steps() {
        // With one weight and a constant gradient Adam moves it by exactly the step's lr.
        let var = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let config = AdamWConfig { lr: 0.1, weight_decay: 0.0, eps: 0.0, warmup_steps: 4, ..Default::default() };
        let mut opt = AdamW::new(vec![("w".to_string(), var.clone())], config).unwrap();
        let grad = vec![Some(Tensor::new(&[1.0f32], &Device::Cpu).unwrap())];
        let mut moves = Vec::new();
        for _ in 0..6 {
            let before = var.as_tensor().to_vec1::<f32>().unwrap()[0];
            opt.step(&grad).unwrap();
            moves.push(before - var.as_tensor().to_vec1::<f32>().unwrap()[0]);
        }
        let want = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1];
        for (got, want) in moves.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "moves {moves:?}, want {want:?}");
        }
    }
}
