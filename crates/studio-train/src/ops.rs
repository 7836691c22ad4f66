//! Differentiable building blocks.
//!
//! candle 0.11's fused `rms_norm`, `softmax_last_dim` and rotary kernels record no backward
//! pass, so gradients upstream of them would silently vanish. Everything here is composed from
//! primitives whose backward candle implements, or is a custom op with its own `bwd`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D};

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension, as Hugging Face's `LlamaRMSNorm`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inverse_rms = (mean_square + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inverse_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension. The row maximum is subtracted for stability; it is detached
/// because softmax does not depend on it.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)
}

/// Log-softmax over the last dimension, stable for large logits.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// Computes the negative log-likelihood of `targets[i]` under the softmax of row `i` of
/// `logits` (`[n, vocab]`), as an `[n]` tensor.
///
/// On the CPU this is one custom op whose backward is `softmax(logits) - onehot(target)`, so
/// the graph keeps only the logits instead of the four vocabulary-wide tensors that
/// log-softmax and gather would keep. For SmolLM2 with a batch of 1024 targets each such tensor
/// is 200 MB. Elsewhere it falls back to those primitives.
pub fn cross_entropy_per_row(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !logits.device().is_cpu() {
        let log_probs = log_softmax_last_dim(logits)?;
        return log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg();
    }
    let targets = targets.to_vec1::<u32>()?;
    logits.contiguous()?.apply_op1(CrossEntropy { targets })
}

struct CrossEntropy {
    targets: Vec<u32>,
}

/// Per-row `logsumexp(x) - x[target]`, computed in f64.
fn cross_entropy_forward<T: candle_core::WithDType>(x: &[T], targets: &[u32], vocab: usize) -> Vec<T> {
    x.chunks(vocab)
        .zip(targets)
        .map(|(row, &target)| {
            let max = row.iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v.to_f64() - max).exp()).sum();
            T::from_f64(max + sum.ln() - row[target as usize].to_f64())
        })
        .collect()
}

/// `(softmax(x) - onehot(target)) · grad` for each row.
fn cross_entropy_backward<T: candle_core::WithDType>(x: &[T], targets: &[u32], vocab: usize, grad: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for ((row, &target), g) in x.chunks(vocab).zip(targets).zip(grad) {
        let g = g.to_f64();
        let max = row.iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v.to_f64() - max).exp()).sum();
        for (index, v) in row.iter().enumerate() {
            let probability = (v.to_f64() - max).exp() / sum;
            let onehot = if index == target as usize { 1.0 } else { 0.0 };
            out.push(T::from_f64((probability - onehot) * g));
        }
    }
    out
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, vocab) = layout.shape().dims2()?;
        if n != self.targets.len() {
            candle_core::bail!("cross-entropy: {n} rows but {} targets", self.targets.len());
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {vocab}");
        }
        let range = layout.start_offset()..layout.start_offset() + n * vocab;
        let output = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(cross_entropy_forward(&x[range], &self.targets, vocab)),
            CpuStorage::F64(x) => CpuStorage::F64(cross_entropy_forward(&x[range], &self.targets, vocab)),
            other => candle_core::bail!("cross-entropy: unsupported dtype {:?}", other.dtype()),
        };
        Ok((output, Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let vocab = arg.dim(1)?;
        let grad = match arg.dtype() {
            candle_core::DType::F32 => {
                let x = arg.flatten_all()?.to_vec1::<f32>()?;
                let g = grad_res.to_vec1::<f32>()?;
                Tensor::from_vec(cross_entropy_backward(&x, &self.targets, vocab, &g), arg.shape(), arg.device())?
            }
            candle_core::DType::F64 => {
                let x = arg.flatten_all()?.to_vec1::<f64>()?;
                let g = grad_res.to_vec1::<f64>()?;
                Tensor::from_vec(cross_entropy_backward(&x, &self.targets, vocab, &g), arg.shape(), arg.device())?
            }
            other => candle_core::bail!("cross-entropy: unsupported dtype {other:?}"),
        };
        Ok(Some(grad))
    }
}

/// Hugging Face's `rotate_half`: `[x1, x2] -> [-x2, x1]` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&second.neg()?, &first], D::Minus1)
}

/// `x @ weightᵀ` for a 2-D `x` and a weight that is not trained.
///
/// Backprop through a plain `matmul` also computes the gradient of the weight, a product as
/// large as the forward one, and throws it away when the weight is frozen. On the CPU this op
/// computes only the gradient of `x`; elsewhere it falls back to `matmul`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || weight.is_variable() {
        return x.matmul(&weight.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}

struct FrozenMatmul {
    /// `[out, in]`, contiguous.
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = layout.shape().dims2()?;
        let (weight_storage, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight_storage else {
            candle_core::bail!("frozen-matmul: the weight is not on the CPU");
        };
        let (out, weight_k) = weight_layout.shape().dims2()?;
        if k != weight_k {
            candle_core::bail!("frozen-matmul: input width {k} does not match weight {out}x{weight_k}");
        }
        let weight_t = weight_layout.transpose(0, 1)?;
        let result = storage.matmul(weight, (1, n, out, k), layout, &weight_t)?;
        Ok((result, Shape::from((n, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_matches_matmul_and_its_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::from_vec((0..12).map(|v| v as f32 * 0.1).collect(), (3, 4), &device)?;
        let weight = Tensor::from_vec((0..20).map(|v| (v as f32).sin()).collect(), (5, 4), &device)?;

        let frozen = frozen_linear(&x, &weight)?;
        let plain = x.matmul(&weight.t()?)?;
        let difference = (&frozen - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(difference < 1e-6, "forward differs by {difference}");

        let frozen_grad = frozen.sqr()?.sum_all()?.backward()?.get(&x).unwrap().clone();
        let plain_grad = plain.sqr()?.sum_all()?.backward()?.get(&x).unwrap().clone();
        let difference = (frozen_grad - plain_grad)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(difference < 1e-5, "gradient differs by {difference}");
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_gradient() -> Result<()> {
        let device = Device::Cpu;
        let values: Vec<f64> = (0..15).map(|v| ((v * 7) % 11) as f64 * 0.3 - 1.0).collect();
        let logits = Var::from_vec(values, (3, 5), &device)?;
        let targets = Tensor::new(&[4u32, 0, 2], &device)?;
        let weights = Tensor::new(&[1.0f64, 2.0, 0.5], &device)?;

        let fused = cross_entropy_per_row(&logits, &targets)?;
        let reference = log_softmax_last_dim(&logits)?.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let difference = (&fused - &reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(difference < 1e-12, "forward differs by {difference}");

        let fused_grad = (fused * &weights)?.sum_all()?.backward()?.get(&logits).unwrap().clone();
        let reference_grad = (reference * &weights)?.sum_all()?.backward()?.get(&logits).unwrap().clone();
        let difference = (fused_grad - reference_grad)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(difference < 1e-12, "gradient differs by {difference}");
        Ok(())
    }

    #[test]
    fn softmax_sums_to_one_with_gradient() -> Result<()> {
        let x = Var::from_vec(vec![1f32, 2., 3., 1000., 1001., 999.], (2, 3), &Device::Cpu)?;
        let y = softmax_last_dim(&x)?;
        let sums = y.sum(1)?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
        let weights = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.]], &Device::Cpu)?;
        let grads = (y * weights)?.sum_all()?.backward()?;
        let grad = grads.get(&x).expect("softmax must pass a gradient");
        assert!(grad.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
