//! AdamW with decoupled weight decay, matching `torch.optim.AdamW`.
//!
//! The trainer owns its optimizer (rather than using `candle_nn::AdamW`, whose moments are
//! private) so the moments can be checkpointed and restored exactly.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Var>,
    first_moments: Vec<Tensor>,
    second_moments: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let zeros = |var: &Var| var.zeros_like();
        Ok(Self {
            config,
            first_moments: params.iter().map(zeros).collect::<Result<_>>()?,
            second_moments: params.iter().map(zeros).collect::<Result<_>>()?,
            params,
            step: 0,
        })
    }

    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// Applies one update with learning rate `lr`. A parameter without a gradient in `grads`
    /// is an error: it means the graph did not reach it.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let grads = self
            .params
            .iter()
            .enumerate()
            .map(|(index, var)| {
                grads.get(var).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("parameter {index} received no gradient"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.step_with(&grads, lr)
    }

    /// Applies one update from one gradient per parameter, in `params()` order.
    pub fn step_with(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        let correction1 = 1.0 - beta1.powi(self.step as i32);
        let correction2 = 1.0 - beta2.powi(self.step as i32);
        for (index, var) in self.params.iter().enumerate() {
            let grad = &grads[index];
            let m = ((&self.first_moments[index] * beta1)? + (grad * (1.0 - beta1))?)?;
            let v = ((&self.second_moments[index] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denominator = ((&v / correction2)?.sqrt()? + eps)?;
            let update = ((&m / correction1)? / denominator)?;
            let decayed = (var.as_tensor() * (1.0 - lr * weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.first_moments[index] = m;
            self.second_moments[index] = v;
        }
        Ok(())
    }
}

impl AdamW {
    /// Steps taken so far; bias correction depends on it.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Returns the first and second moments, in `params()` order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.first_moments, &self.second_moments)
    }

    /// Restores the state saved from an optimizer over the same parameters.
    pub fn restore(&mut self, step: u64, first: Vec<Tensor>, second: Vec<Tensor>) -> Result<()> {
        if first.len() != self.params.len() || second.len() != self.params.len() {
            candle_core::bail!(
                "optimizer state has {} moments for {} parameters",
                first.len(),
                self.params.len()
            );
        }
        self.step = step;
        self.first_moments = first;
        self.second_moments = second;
        Ok(())
    }
}

/// Computes the L2 norm over all gradients of `params`, as `torch.nn.utils.clip_grad_norm_` reports it.
pub fn global_grad_norm(params: &[Var], grads: &GradStore) -> Result<f64> {
    let present: Vec<Tensor> = params.iter().filter_map(|var| grads.get(var).cloned()).collect();
    grad_norm(&present)
}

/// Computes the L2 norm over a list of gradients.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for grad in grads {
        sum += grad.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}
