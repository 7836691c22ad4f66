//! Padded batches and the supervised loss.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::chat::EncodedExample;
use crate::model::{ForwardContext, Llama};
use crate::ops::cross_entropy_per_row;

/// Examples right-padded to the longest row of the micro-batch.
pub struct Batch {
    /// `[batch, seq]`, u32.
    pub input_ids: Tensor,
    pub lengths: Vec<usize>,
    /// Flat indices into `batch · seq` of the positions whose next token is a target.
    pub target_positions: Tensor,
    /// The token each of those positions must predict.
    pub target_ids: Tensor,
    pub n_targets: usize,
    /// Real tokens, padding excluded.
    pub n_tokens: usize,
}

impl Batch {
    pub fn new(examples: &[&EncodedExample], pad_id: u32, device: &Device) -> Result<Self> {
        let seq_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * seq_len);
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (row, example) in examples.iter().enumerate() {
            ids.extend_from_slice(&example.ids);
            ids.extend(std::iter::repeat_n(pad_id, seq_len - example.ids.len()));
            for t in 1..example.ids.len() {
                if example.targets[t] {
                    positions.push((row * seq_len + t - 1) as u32);
                    targets.push(example.ids[t]);
                }
            }
        }
        let n_targets = targets.len();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (examples.len(), seq_len), device)?,
            lengths: examples.iter().map(|e| e.ids.len()).collect(),
            target_positions: Tensor::from_vec(positions, n_targets, device)?,
            target_ids: Tensor::from_vec(targets, n_targets, device)?,
            n_targets,
            n_tokens: examples.iter().map(|e| e.ids.len()).sum(),
        })
    }
}

/// The summed negative log-likelihood of a batch's targets, and how many the model predicted
/// correctly by argmax.
pub struct BatchLoss {
    /// Scalar; divide by the number of target tokens of the whole accumulated batch.
    pub sum_nll: Tensor,
    pub n_correct: usize,
}

/// Runs the model and sums the next-token loss over target positions only. The head is applied
/// to those positions alone, which saves most of the largest matmul when prompts are long.
pub fn batch_loss(model: &Llama, batch: &Batch, ctx: &mut ForwardContext<'_>) -> Result<BatchLoss> {
    let hidden = model.hidden_states(&batch.input_ids, &batch.lengths, ctx)?;
    let hidden = hidden.index_select(&batch.target_positions, 0)?;
    let logits = model.logits(&hidden)?;
    let sum_nll = cross_entropy_per_row(&logits, &batch.target_ids)?.sum_all()?;

    let predicted = logits.argmax(D::Minus1)?;
    let n_correct = predicted
        .eq(&batch.target_ids)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    Ok(BatchLoss { sum_nll, n_correct })
}
