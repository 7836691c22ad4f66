//! The fine-tuning job create request, parsed into a validated [`JobSpec`].
//!
//! The request is walked as JSON by hand, not derived, so every error names the exact parameter
//! (`method.supervised.hyperparameters.n_epochs`) and the allowed range, as OpenAI's do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::{FileId, JobId};

/// The default learning rate of LoRA; `learning_rate_multiplier` scales it.
pub const LORA_DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// The default learning rate of full fine-tuning; `learning_rate_multiplier` scales it.
pub const FULL_DEFAULT_LEARNING_RATE: f64 = 2e-5;
/// PEFT's shorthand for every linear layer of a decoder block.
pub const ALL_LINEAR: &str = "all-linear";
/// OpenAI's accepted range of `seed`.
pub const MAX_SEED: u64 = 2_147_483_647;
/// The linear layers of a Llama-family decoder block, by their Hugging Face names.
pub const LORA_TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A rejected create request: `param` is the dotted path of the bad field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub kind: SpecErrorKind,
    pub param: Option<String>,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecErrorKind {
    /// A missing, malformed or out-of-range value.
    Invalid,
    /// A value the API recognises but cannot serve yet (`dpo`, `distillation`).
    Unsupported,
}

impl SpecError {
    fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: SpecErrorKind::Invalid,
            param: Some(param.into()),
            message: message.into(),
        }
    }

    fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: SpecErrorKind::Unsupported,
            param: Some(param.into()),
            message: message.into(),
        }
    }

    /// Returns a stable code for the error envelope.
    pub fn code(&self) -> &'static str {
        match self.kind {
            SpecErrorKind::Invalid => "invalid_value",
            SpecErrorKind::Unsupported => "unsupported_value",
        }
    }
}

/// A validated job: every "auto" is resolved, so the job echoes exactly what it trains with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: String,
    pub training_file: FileId,
    pub validation_file: Option<FileId>,
    pub suffix: Option<String>,
    pub seed: u64,
    pub metadata: Option<BTreeMap<String, String>>,
    pub method: Method,
    pub training_type: TrainingType,
}

/// The training method, in OpenAI's `method` shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Method {
    Supervised { supervised: SupervisedMethod },
    /// Direct preference optimisation on chosen and rejected responses.
    Dpo { dpo: DpoMethod },
    /// Knowledge distillation from a teacher model into the job's model, the student.
    Distillation { distillation: DistillationMethod },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SupervisedMethod {
    pub hyperparameters: Hyperparameters,
}

/// Resolved supervised hyperparameters: OpenAI's three plus ours.
///
/// Fields added after the first release carry serde defaults, so specs stored by older versions
/// still load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub n_epochs: u32,
    /// Examples per micro-batch; an optimizer step uses `batch_size × gradient_accumulation_steps`.
    pub batch_size: u32,
    /// The multiple of the approach's default learning rate that `learning_rate` is.
    pub learning_rate_multiplier: f64,
    /// Absolute peak learning rate.
    pub learning_rate: f64,
    /// Longer examples are truncated to this many tokens.
    pub max_seq_len: u32,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Micro-batches per optimizer step.
    #[serde(default = "one_u32")]
    pub gradient_accumulation_steps: u32,
    #[serde(default)]
    pub lr_scheduler: LrScheduler,
    /// Fraction of the steps spent warming up linearly from zero, in [0, 1).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Clips the global gradient norm to this value; 0 disables clipping.
    #[serde(default = "one_f64")]
    pub max_grad_norm: f64,
    /// Evaluates the validation set every this many steps; 0 evaluates at epoch ends only.
    #[serde(default)]
    pub eval_interval: u64,
    /// Writes a checkpoint every this many steps; 0 writes none on an interval.
    #[serde(default)]
    pub checkpoint_interval: u64,
    /// Checkpoints spread evenly over the run, the last at the final step.
    #[serde(default = "one_u64")]
    pub n_checkpoints: u64,
}

/// The default strength of DPO's implicit KL penalty.
pub const DPO_DEFAULT_BETA: f64 = 0.1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoMethod {
    pub hyperparameters: DpoHyperparameters,
}

/// Resolved DPO hyperparameters: the supervised ones plus `beta`, in one flat object as OpenAI
/// echoes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoHyperparameters {
    #[serde(flatten)]
    pub common: Hyperparameters,
    /// Scales the log-probability ratios in the loss; larger keeps the policy nearer the base.
    pub beta: f64,
}

/// The default softmax temperature of distillation.
pub const DISTILLATION_DEFAULT_TEMPERATURE: f64 = 2.0;
/// The default share of the distillation term in the loss; the rest is cross-entropy.
pub const DISTILLATION_DEFAULT_KD_WEIGHT: f64 = 0.5;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillationMethod {
    /// A base model name or a succeeded job's `fine_tuned_model`.
    pub teacher_model: String,
    /// Builds the student from these decoder layers of `model`, in increasing order; `None`
    /// keeps every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_layers: Option<Vec<u32>>,
    pub hyperparameters: DistillationHyperparameters,
}

/// Resolved distillation hyperparameters: the supervised ones plus `temperature` and
/// `kd_weight`, in one flat object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillationHyperparameters {
    #[serde(flatten)]
    pub common: Hyperparameters,
    /// Softens both distributions before they are compared.
    pub temperature: f64,
    /// Weight of `T² · KL(teacher ‖ student)`; `1 − kd_weight` weighs the cross-entropy.
    pub kd_weight: f64,
}

fn one_u32() -> u32 {
    1
}

fn one_u64() -> u64 {
    1
}

fn one_f64() -> f64 {
    1.0
}

/// How the learning rate decays after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    Cosine,
    #[default]
    Linear,
    Constant,
}

impl LrScheduler {
    pub const NAMES: [&'static str; 3] = ["cosine", "linear", "constant"];

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "cosine" => Some(LrScheduler::Cosine),
            "linear" => Some(LrScheduler::Linear),
            "constant" => Some(LrScheduler::Constant),
            _ => None,
        }
    }
}

/// How the weights are trained: the `training_type` extension.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TrainingType {
    Lora(LoraConfig),
    /// Every weight is trained.
    Full,
}

impl TrainingType {
    /// Returns the learning rate that `learning_rate_multiplier` scales.
    pub fn default_learning_rate(&self) -> f64 {
        match self {
            TrainingType::Lora(_) => LORA_DEFAULT_LEARNING_RATE,
            TrainingType::Full => FULL_DEFAULT_LEARNING_RATE,
        }
    }
}

/// LoRA settings with PEFT's meaning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The rank of the adapter matrices.
    pub r: u32,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names such as `q_proj`, or `["all-linear"]` for every linear layer of a block.
    pub target_modules: Vec<String>,
    /// Scales by `alpha / √r` (rsLoRA) instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: LORA_TARGET_MODULES[..4]
                .iter()
                .map(|m| m.to_string())
                .collect(),
            use_rslora: false,
        }
    }
}

impl JobSpec {
    /// Parses a create request body. `fallback_seed` is used when the request has no `seed`,
    /// so the caller decides where randomness comes from.
    pub fn parse(body: &Value, fallback_seed: u64) -> Result<JobSpec, SpecError> {
        let body = body.as_object().ok_or_else(|| SpecError {
            kind: SpecErrorKind::Invalid,
            param: None,
            message: "the request body must be a JSON object".into(),
        })?;
        reject_unknown_keys(body, "", TOP_LEVEL_KEYS)?;

        let model = required_string(body, "model")?;
        let training_file = file_id(body, "training_file")?.ok_or_else(|| {
            SpecError::invalid(
                "training_file",
                "missing required parameter 'training_file'",
            )
        })?;
        let validation_file = file_id(body, "validation_file")?;
        let suffix = suffix(body)?;
        let seed = seed(body)?.unwrap_or(fallback_seed % (MAX_SEED + 1));
        let metadata = metadata(body)?;
        reject_integrations(body)?;
        let training_type = training_type(body)?;
        let method = method(body, training_type.default_learning_rate())?;
        if let (Method::Distillation { distillation }, TrainingType::Lora(_)) = (&method, &training_type) {
            if distillation.student_layers.is_some() {
                return Err(SpecError::invalid(
                    "training_type",
                    "method.distillation.student_layers builds a new, smaller model, which cannot take LoRA adapters; set training_type to {\"type\": \"full\"}",
                ));
            }
        }

        Ok(JobSpec {
            model,
            training_file,
            validation_file,
            suffix,
            seed,
            metadata,
            method,
            training_type,
        })
    }

    pub fn hyperparameters(&self) -> &Hyperparameters {
        match &self.method {
            Method::Supervised { supervised } => &supervised.hyperparameters,
            Method::Dpo { dpo } => &dpo.hyperparameters.common,
            Method::Distillation { distillation } => &distillation.hyperparameters.common,
        }
    }

    /// Returns the distillation settings, or `None` for other methods.
    pub fn distillation(&self) -> Option<&DistillationMethod> {
        match &self.method {
            Method::Distillation { distillation } => Some(distillation),
            _ => None,
        }
    }

    /// Returns DPO's `beta`, or `None` for other methods.
    pub fn dpo_beta(&self) -> Option<f64> {
        match &self.method {
            Method::Dpo { dpo } => Some(dpo.hyperparameters.beta),
            _ => None,
        }
    }

    /// Returns the LoRA settings, or `None` for full fine-tuning.
    pub fn lora(&self) -> Option<&LoraConfig> {
        match &self.training_type {
            TrainingType::Lora(lora) => Some(lora),
            TrainingType::Full => None,
        }
    }

    /// Names the model a successful job produces: `ft:{model}:{suffix or "studio"}:{job id}`.
    pub fn fine_tuned_model(&self, job_id: &JobId) -> String {
        let suffix = self.suffix.as_deref().unwrap_or("studio");
        format!("ft:{}:{}:{}", self.model, suffix, job_id)
    }
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "model",
    "training_file",
    "validation_file",
    "suffix",
    "seed",
    "metadata",
    "method",
    "hyperparameters",
    "integrations",
    "training_type",
];

const HYPERPARAMETER_KEYS: &[&str] = &[
    "n_epochs",
    "batch_size",
    "learning_rate_multiplier",
    "learning_rate",
    "max_seq_len",
    "weight_decay",
    "gradient_accumulation_steps",
    "lr_scheduler",
    "warmup_ratio",
    "max_grad_norm",
    "eval_interval",
    "checkpoint_interval",
    "n_checkpoints",
];

fn reject_unknown_keys(
    object: &Map<String, Value>,
    at: &str,
    known: &[&str],
) -> Result<(), SpecError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        None => Ok(()),
        Some(key) => {
            let param = join(at, &excerpt(key));
            Err(SpecError::invalid(
                param.clone(),
                format!(
                    "unknown parameter '{param}'; expected one of: {}",
                    known.join(", ")
                ),
            ))
        }
    }
}

/// The longest rejected value a message repeats whole, in characters.
const MAX_ECHOED_CHARS: usize = 80;

/// Renders a rejected value for a message: whole when short, else its start and its length,
/// so a megabyte value is not sent back in the error.
fn excerpt(value: &str) -> String {
    let length = value.chars().count();
    if length <= MAX_ECHOED_CHARS {
        return value.to_owned();
    }
    let start: String = value.chars().take(MAX_ECHOED_CHARS).collect();
    format!("{start}… ({length} characters)")
}

/// Renders a rejected JSON value like [`excerpt`], a string in quotes.
fn value_excerpt(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{}\"", excerpt(s)),
        other => excerpt(&other.to_string()),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

/// Returns the value of `key`, treating JSON `null` as absent.
fn present<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

fn required_string(object: &Map<String, Value>, key: &str) -> Result<String, SpecError> {
    match present(object, key) {
        None => Err(SpecError::invalid(
            key,
            format!("missing required parameter '{key}'"),
        )),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(SpecError::invalid(
            key,
            format!("'{key}' must not be empty"),
        )),
        Some(other) => Err(SpecError::invalid(
            key,
            format!("'{key}' must be a string, got {}", type_name(other)),
        )),
    }
}

fn file_id(object: &Map<String, Value>, key: &str) -> Result<Option<FileId>, SpecError> {
    let Some(value) = present(object, key) else {
        return Ok(None);
    };
    let Value::String(s) = value else {
        return Err(SpecError::invalid(
            key,
            format!("'{key}' must be a file id string, got {}", type_name(value)),
        ));
    };
    FileId::parse(s).map(Some).map_err(|err| {
        SpecError::invalid(
            key,
            format!("'{key}': {err}; upload the file with POST /v1/files first"),
        )
    })
}

fn suffix(object: &Map<String, Value>) -> Result<Option<String>, SpecError> {
    let Some(value) = present(object, "suffix") else {
        return Ok(None);
    };
    let Value::String(s) = value else {
        return Err(SpecError::invalid(
            "suffix",
            format!("'suffix' must be a string, got {}", type_name(value)),
        ));
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    if s.is_empty() || s.len() > 64 || !s.chars().all(allowed) {
        return Err(SpecError::invalid(
            "suffix",
            format!(
                "invalid 'suffix' \"{}\": use 1 to 64 ASCII letters, digits, '-', '_' or '.'",
                excerpt(s)
            ),
        ));
    }
    Ok(Some(s.clone()))
}

fn seed(object: &Map<String, Value>) -> Result<Option<u64>, SpecError> {
    let Some(value) = present(object, "seed") else {
        return Ok(None);
    };
    match value.as_u64() {
        Some(seed) if seed <= MAX_SEED => Ok(Some(seed)),
        _ => Err(SpecError::invalid(
            "seed",
            format!(
                "invalid 'seed' {}: expected an integer from 0 to {MAX_SEED}",
                value_excerpt(value)
            ),
        )),
    }
}

fn metadata(object: &Map<String, Value>) -> Result<Option<BTreeMap<String, String>>, SpecError> {
    let Some(value) = present(object, "metadata") else {
        return Ok(None);
    };
    let Value::Object(map) = value else {
        return Err(SpecError::invalid(
            "metadata",
            "'metadata' must be an object of string values",
        ));
    };
    if map.len() > 16 {
        return Err(SpecError::invalid(
            "metadata",
            format!("'metadata' has {} keys; at most 16 are allowed", map.len()),
        ));
    }
    let mut metadata = BTreeMap::new();
    for (key, value) in map {
        if key.chars().count() > 64 {
            return Err(SpecError::invalid(
                "metadata",
                "metadata keys must be at most 64 characters long",
            ));
        }
        let param = format!("metadata.{key}");
        // The job is stored as Postgres JSONB, which cannot hold the NUL character.
        if key.contains('\0') || matches!(value, Value::String(s) if s.contains('\0')) {
            return Err(SpecError::invalid(
                param,
                "metadata keys and values must not contain the NUL character (\\u0000)",
            ));
        }
        match value {
            Value::String(s) if s.chars().count() <= 512 => metadata.insert(key.clone(), s.clone()),
            Value::String(_) => {
                return Err(SpecError::invalid(
                    param,
                    "metadata values must be at most 512 characters long",
                ))
            }
            other => {
                return Err(SpecError::invalid(
                    param,
                    format!("metadata values must be strings, got {}", type_name(other)),
                ))
            }
        };
    }
    Ok(Some(metadata))
}

fn reject_integrations(object: &Map<String, Value>) -> Result<(), SpecError> {
    match present(object, "integrations") {
        None => Ok(()),
        Some(Value::Array(items)) if items.is_empty() => Ok(()),
        Some(_) => Err(SpecError::unsupported(
            "integrations",
            "'integrations' are not supported yet; omit the field",
        )),
    }
}

fn method(body: &Map<String, Value>, default_lr: f64) -> Result<Method, SpecError> {
    let legacy = present(body, "hyperparameters");
    let Some(method) = present(body, "method") else {
        let hyperparameters = hyperparameters(legacy, "hyperparameters", default_lr)?;
        return Ok(Method::Supervised {
            supervised: SupervisedMethod { hyperparameters },
        });
    };

    let Value::Object(method) = method else {
        return Err(SpecError::invalid(
            "method",
            "'method' must be an object like {\"type\": \"supervised\"}",
        ));
    };
    let method_type = match present(method, "type") {
        None => {
            return Err(SpecError::invalid(
                "method.type",
                "missing required parameter 'method.type'",
            ))
        }
        Some(Value::String(t)) => t.as_str(),
        Some(other) => {
            return Err(SpecError::invalid(
                "method.type",
                format!("'method.type' must be a string, got {}", type_name(other)),
            ))
        }
    };
    // OpenAI's legacy top-level hyperparameters describe a supervised job only.
    if legacy.is_some() && matches!(method_type, "dpo" | "distillation") {
        return Err(SpecError::invalid(
            "hyperparameters",
            format!("top-level 'hyperparameters' apply to supervised jobs only; move them to method.{method_type}.hyperparameters"),
        ));
    }
    match method_type {
        "supervised" => {}
        "dpo" => return dpo_method(method, default_lr),
        "distillation" => return distillation_method(method, default_lr),
        other => {
            return Err(SpecError::invalid(
                "method.type",
                format!(
                    "unknown method.type '{}'; expected one of: supervised, dpo, distillation",
                    excerpt(other)
                ),
            ))
        }
    }
    reject_unknown_keys(method, "method", &["type", "supervised"])?;

    let nested = match present(method, "supervised") {
        None => None,
        Some(Value::Object(supervised)) => {
            reject_unknown_keys(supervised, "method.supervised", &["hyperparameters"])?;
            present(supervised, "hyperparameters")
        }
        Some(_) => {
            return Err(SpecError::invalid(
                "method.supervised",
                "'method.supervised' must be an object",
            ))
        }
    };
    if nested.is_some() && legacy.is_some() {
        return Err(SpecError::invalid(
            "hyperparameters",
            "give hyperparameters either at the top level or in method.supervised.hyperparameters, not both",
        ));
    }
    let (source, at) = match nested {
        Some(nested) => (Some(nested), "method.supervised.hyperparameters"),
        None => (legacy, "hyperparameters"),
    };
    let hyperparameters = hyperparameters(source, at, default_lr)?;
    Ok(Method::Supervised {
        supervised: SupervisedMethod { hyperparameters },
    })
}

/// Parses `method.dpo.hyperparameters`: the supervised knobs plus `beta`.
fn dpo_method(method: &Map<String, Value>, default_lr: f64) -> Result<Method, SpecError> {
    reject_unknown_keys(method, "method", &["type", "dpo"])?;
    let at = "method.dpo.hyperparameters";
    let empty = Map::new();
    let object = match present(method, "dpo") {
        None => &empty,
        Some(Value::Object(dpo)) => {
            reject_unknown_keys(dpo, "method.dpo", &["hyperparameters"])?;
            match present(dpo, "hyperparameters") {
                None => &empty,
                Some(Value::Object(object)) => object,
                Some(_) => return Err(SpecError::invalid(at, format!("'{at}' must be an object"))),
            }
        }
        Some(_) => return Err(SpecError::invalid("method.dpo", "'method.dpo' must be an object")),
    };
    let known: Vec<&str> = HYPERPARAMETER_KEYS.iter().copied().chain(["beta"]).collect();
    reject_unknown_keys(object, at, &known)?;
    let mut common_keys = object.clone();
    let beta = Knobs { object, at }
        .number("beta", Range::open_closed(0.0, 10.0))?
        .unwrap_or(DPO_DEFAULT_BETA);
    common_keys.remove("beta");
    let common = hyperparameters(Some(&Value::Object(common_keys)), at, default_lr)?;
    Ok(Method::Dpo {
        dpo: DpoMethod {
            hyperparameters: DpoHyperparameters { common, beta },
        },
    })
}

/// Parses `method.distillation`: the teacher, the optional student layers, and the supervised
/// knobs plus `temperature` and `kd_weight`.
fn distillation_method(method: &Map<String, Value>, default_lr: f64) -> Result<Method, SpecError> {
    reject_unknown_keys(method, "method", &["type", "distillation"])?;
    let distillation = match present(method, "distillation") {
        Some(Value::Object(distillation)) => distillation,
        None => {
            return Err(SpecError::invalid(
                "method.distillation.teacher_model",
                "missing required parameter 'method.distillation.teacher_model'",
            ))
        }
        Some(_) => return Err(SpecError::invalid("method.distillation", "'method.distillation' must be an object")),
    };
    reject_unknown_keys(distillation, "method.distillation", &["teacher_model", "student_layers", "hyperparameters"])?;
    let teacher_model = match present(distillation, "teacher_model") {
        None => {
            return Err(SpecError::invalid(
                "method.distillation.teacher_model",
                "missing required parameter 'method.distillation.teacher_model'",
            ))
        }
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => {
            return Err(SpecError::invalid(
                "method.distillation.teacher_model",
                format!(
                    "'method.distillation.teacher_model' must be a model name, got {}",
                    value_excerpt(other)
                ),
            ))
        }
    };
    let student_layers = student_layers(distillation)?;

    let at = "method.distillation.hyperparameters";
    let empty = Map::new();
    let object = match present(distillation, "hyperparameters") {
        None => &empty,
        Some(Value::Object(object)) => object,
        Some(_) => return Err(SpecError::invalid(at, format!("'{at}' must be an object"))),
    };
    let known: Vec<&str> = HYPERPARAMETER_KEYS.iter().copied().chain(["temperature", "kd_weight"]).collect();
    reject_unknown_keys(object, at, &known)?;
    let knobs = Knobs { object, at };
    let temperature = knobs
        .number("temperature", Range::open_closed(0.0, 100.0))?
        .unwrap_or(DISTILLATION_DEFAULT_TEMPERATURE);
    let kd_weight = knobs
        .number("kd_weight", Range::closed(0.0, 1.0))?
        .unwrap_or(DISTILLATION_DEFAULT_KD_WEIGHT);
    let mut common_keys = object.clone();
    common_keys.remove("temperature");
    common_keys.remove("kd_weight");
    let common = hyperparameters(Some(&Value::Object(common_keys)), at, default_lr)?;
    Ok(Method::Distillation {
        distillation: DistillationMethod {
            teacher_model,
            student_layers,
            hyperparameters: DistillationHyperparameters {
                common,
                temperature,
                kd_weight,
            },
        },
    })
}

/// Reads `student_layers`: a non-empty, strictly increasing list of layer indices. Whether
/// they exist is known only once the model loads, so the trainer checks the upper bound.
fn student_layers(distillation: &Map<String, Value>) -> Result<Option<Vec<u32>>, SpecError> {
    const PARAM: &str = "method.distillation.student_layers";
    let value = match present(distillation, "student_layers") {
        None => return Ok(None),
        Some(Value::String(s)) if s == "auto" => return Ok(None),
        Some(value) => value,
    };
    let expected = format!("'{PARAM}' must be a non-empty, strictly increasing list of layer indices such as [0, 3, 6]");
    let Value::Array(items) = value else {
        return Err(SpecError::invalid(PARAM, format!("{expected}, got {}", value_excerpt(value))));
    };
    if items.is_empty() || items.len() > 1024 {
        return Err(SpecError::invalid(PARAM, expected));
    }
    let mut layers: Vec<u32> = Vec::with_capacity(items.len());
    for item in items {
        let layer = item.as_u64().filter(|&n| n < 1 << 16).ok_or_else(|| {
            SpecError::invalid(PARAM, format!("{expected}; {} is not a layer index", value_excerpt(item)))
        })? as u32;
        if let Some(&previous) = layers.last() {
            if layer <= previous {
                return Err(SpecError::invalid(
                    PARAM,
                    format!("{expected}; {layer} follows {previous}"),
                ));
            }
        }
        layers.push(layer);
    }
    Ok(Some(layers))
}

/// Parses the hyperparameters object at `at`; `default_lr` is the approach's default learning
/// rate, which `learning_rate_multiplier` scales.
fn hyperparameters(
    value: Option<&Value>,
    at: &str,
    default_lr: f64,
) -> Result<Hyperparameters, SpecError> {
    let empty = Map::new();
    let object = match value {
        None => &empty,
        Some(Value::Object(object)) => object,
        Some(_) => return Err(SpecError::invalid(at, format!("'{at}' must be an object"))),
    };
    reject_unknown_keys(object, at, HYPERPARAMETER_KEYS)?;

    let knobs = Knobs { object, at };
    let n_epochs = knobs.integer("n_epochs", 1, 50)?.unwrap_or(3);
    let batch_size = knobs.integer("batch_size", 1, 256)?.unwrap_or(16);
    let multiplier = knobs.number("learning_rate_multiplier", Range::open_closed(0.0, 10.0))?;
    let learning_rate = knobs.number("learning_rate", Range::open_closed(0.0, 1.0))?;
    let max_seq_len = knobs.integer("max_seq_len", 16, 32768)?.unwrap_or(1024);
    let weight_decay = knobs
        .number("weight_decay", Range::closed(0.0, 1.0))?
        .unwrap_or(0.0);
    let gradient_accumulation_steps = knobs
        .integer("gradient_accumulation_steps", 1, 1024)?
        .unwrap_or(1);
    let lr_scheduler = knobs.lr_scheduler("lr_scheduler")?.unwrap_or_default();
    let warmup_ratio = knobs
        .number("warmup_ratio", Range::closed_open(0.0, 1.0))?
        .unwrap_or(0.0);
    let max_grad_norm = knobs
        .number("max_grad_norm", Range::closed(0.0, 1e6))?
        .unwrap_or(1.0);
    let eval_interval = knobs.integer("eval_interval", 0, 1_000_000)?.unwrap_or(0);
    let checkpoint_interval = knobs
        .integer("checkpoint_interval", 0, 1_000_000)?
        .unwrap_or(0);
    let n_checkpoints = knobs.integer("n_checkpoints", 1, 100)?.unwrap_or(1);

    let (learning_rate, learning_rate_multiplier) = match (learning_rate, multiplier) {
        (Some(_), Some(_)) => {
            return Err(SpecError::invalid(
                join(at, "learning_rate"),
                format!(
                    "give either '{}' or '{}', not both",
                    join(at, "learning_rate"),
                    join(at, "learning_rate_multiplier")
                ),
            ))
        }
        (Some(lr), None) => (lr, lr / default_lr),
        (None, Some(m)) => (default_lr * m, m),
        (None, None) => (default_lr, 1.0),
    };

    Ok(Hyperparameters {
        n_epochs: n_epochs as u32,
        batch_size: batch_size as u32,
        learning_rate_multiplier,
        learning_rate,
        max_seq_len: max_seq_len as u32,
        weight_decay,
        gradient_accumulation_steps: gradient_accumulation_steps as u32,
        lr_scheduler,
        warmup_ratio,
        max_grad_norm,
        eval_interval,
        checkpoint_interval,
        n_checkpoints,
    })
}

fn training_type(body: &Map<String, Value>) -> Result<TrainingType, SpecError> {
    let Some(value) = present(body, "training_type") else {
        return Ok(TrainingType::Lora(LoraConfig::default()));
    };
    let Value::Object(object) = value else {
        return Err(SpecError::invalid(
            "training_type",
            "'training_type' must be an object like {\"type\": \"lora\"}",
        ));
    };
    match present(object, "type") {
        None => {
            return Err(SpecError::invalid(
                "training_type.type",
                "missing required parameter 'training_type.type'",
            ))
        }
        Some(Value::String(t)) if t == "lora" => {}
        Some(Value::String(t)) if t == "full" => {
            reject_unknown_keys(object, "training_type", &["type"])?;
            return Ok(TrainingType::Full);
        }
        Some(other) => {
            return Err(SpecError::invalid(
                "training_type.type",
                format!(
                    "unknown training_type.type {}; expected one of: lora, full",
                    value_excerpt(other)
                ),
            ))
        }
    }
    reject_unknown_keys(
        object,
        "training_type",
        &[
            "type",
            "r",
            "alpha",
            "dropout",
            "target_modules",
            "use_rslora",
        ],
    )?;

    let defaults = LoraConfig::default();
    let knobs = Knobs {
        object,
        at: "training_type",
    };
    let r = knobs.integer("r", 1, 256)?.map_or(defaults.r, |r| r as u32);
    let alpha = knobs
        .number("alpha", Range::open_closed(0.0, 1024.0))?
        .unwrap_or(defaults.alpha);
    let dropout = knobs
        .number("dropout", Range::closed_open(0.0, 1.0))?
        .unwrap_or(defaults.dropout);
    let target_modules = target_modules(object)?.unwrap_or(defaults.target_modules);
    let use_rslora = use_rslora(object)?;
    Ok(TrainingType::Lora(LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        use_rslora,
    }))
}

fn use_rslora(object: &Map<String, Value>) -> Result<bool, SpecError> {
    match present(object, "use_rslora") {
        None => Ok(false),
        Some(Value::String(s)) if s == "auto" => Ok(false),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(other) => Err(SpecError::invalid(
            "training_type.use_rslora",
            format!(
                "invalid 'training_type.use_rslora' {}: expected true, false or \"auto\"",
                value_excerpt(other)
            ),
        )),
    }
}

fn target_modules(object: &Map<String, Value>) -> Result<Option<Vec<String>>, SpecError> {
    const PARAM: &str = "training_type.target_modules";
    let value = match present(object, "target_modules") {
        None => return Ok(None),
        Some(Value::String(s)) if s == "auto" => return Ok(None),
        Some(Value::String(s)) if s == ALL_LINEAR => return Ok(Some(vec![ALL_LINEAR.to_owned()])),
        Some(value) => value,
    };
    let expected = format!(
        "'{PARAM}' must be \"{ALL_LINEAR}\" or a non-empty list of module names from: {}",
        LORA_TARGET_MODULES.join(", ")
    );
    let Value::Array(items) = value else {
        return Err(SpecError::invalid(PARAM, expected));
    };
    if items.is_empty() {
        return Err(SpecError::invalid(PARAM, expected));
    }
    let mut modules: Vec<String> = Vec::with_capacity(items.len());
    if items.iter().any(|item| item.as_str() == Some(ALL_LINEAR)) {
        if items.len() > 1 {
            return Err(SpecError::invalid(
                PARAM,
                format!("'{ALL_LINEAR}' already targets every linear layer; list it alone"),
            ));
        }
        return Ok(Some(vec![ALL_LINEAR.to_owned()]));
    }
    for item in items {
        let name = match item.as_str() {
            Some(name) if LORA_TARGET_MODULES.contains(&name) => name,
            _ => {
                return Err(SpecError::invalid(
                    PARAM,
                    format!(
                        "unknown target module {}; expected names from: {}",
                        value_excerpt(item),
                        LORA_TARGET_MODULES.join(", ")
                    ),
                ))
            }
        };
        if modules.iter().any(|m| m == name) {
            return Err(SpecError::invalid(
                PARAM,
                format!("target module '{name}' is listed twice"),
            ));
        }
        modules.push(name.to_owned());
    }
    Ok(Some(modules))
}

/// The numeric settings of one object; each accepts a number or `"auto"` (the default).
struct Knobs<'a> {
    object: &'a Map<String, Value>,
    at: &'a str,
}

impl Knobs<'_> {
    fn value(&self, key: &str) -> Option<&Value> {
        match present(self.object, key) {
            Some(Value::String(s)) if s == "auto" => None,
            other => other,
        }
    }

    fn integer(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, SpecError> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.error(key, value, &format!("an integer from {min} to {max}"))),
        }
    }

    fn number(&self, key: &str, range: Range) -> Result<Option<f64>, SpecError> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        match value.as_f64() {
            Some(x) if range.contains(x) => Ok(Some(x)),
            _ => Err(self.error(key, value, &format!("a number in {}", range.describe()))),
        }
    }

    fn lr_scheduler(&self, key: &str) -> Result<Option<LrScheduler>, SpecError> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        match value.as_str().and_then(LrScheduler::from_name) {
            Some(scheduler) => Ok(Some(scheduler)),
            None => Err(self.error(
                key,
                value,
                &format!("one of {}", LrScheduler::NAMES.join(", ")),
            )),
        }
    }

    fn error(&self, key: &str, value: &Value, expected: &str) -> SpecError {
        let param = join(self.at, key);
        SpecError::invalid(
            param.clone(),
            format!(
                "invalid '{param}' {}: expected {expected} or \"auto\"",
                value_excerpt(value)
            ),
        )
    }
}

#[derive(Clone, Copy)]
struct Range {
    min: f64,
    max: f64,
    min_inclusive: bool,
    max_inclusive: bool,
}

impl Range {
    fn closed(min: f64, max: f64) -> Self {
        Self {
            min,
            max,
            min_inclusive: true,
            max_inclusive: true,
        }
    }

    fn open_closed(min: f64, max: f64) -> Self {
        Self {
            min,
            max,
            min_inclusive: false,
            max_inclusive: true,
        }
    }

    fn closed_open(min: f64, max: f64) -> Self {
        Self {
            min,
            max,
            min_inclusive: true,
            max_inclusive: false,
        }
    }

    fn contains(self, x: f64) -> bool {
        let above = if self.min_inclusive {
            x >= self.min
        } else {
            x > self.min
        };
        let below = if self.max_inclusive {
            x <= self.max
        } else {
            x < self.max
        };
        x.is_finite() && above && below
    }

    fn describe(self) -> String {
        let open = if self.min_inclusive { '[' } else { '(' };
        let close = if self.max_inclusive { ']' } else { ')' };
        format!("{open}{}, {}{close}", self.min, self.max)
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Result<JobSpec, SpecError> {
        JobSpec::parse(&body, 1234)
    }

    fn minimal() -> Value {
        json!({"model": "smollm2-135m-instruct", "training_file": "file-abc"})
    }

    fn with(mut body: Value, key: &str, value: Value) -> Value {
        body.as_object_mut().unwrap().insert(key.into(), value);
        body
    }

    #[test]
    fn minimal_request_resolves_defaults() {
        let spec = parse(minimal()).unwrap();
        let hp = spec.hyperparameters();
        assert_eq!(hp.n_epochs, 3);
        assert_eq!(hp.batch_size, 16);
        assert_eq!(hp.learning_rate, 1e-4);
        assert_eq!(hp.learning_rate_multiplier, 1.0);
        assert_eq!(hp.max_seq_len, 1024);
        assert_eq!(hp.weight_decay, 0.0);
        assert_eq!(hp.gradient_accumulation_steps, 1);
        assert_eq!(hp.lr_scheduler, LrScheduler::Linear);
        assert_eq!(hp.warmup_ratio, 0.0);
        assert_eq!(hp.max_grad_norm, 1.0);
        assert_eq!(hp.eval_interval, 0);
        assert_eq!(hp.checkpoint_interval, 0);
        assert_eq!(hp.n_checkpoints, 1);
        assert_eq!(spec.lora(), Some(&LoraConfig::default()));
        assert!(!spec.lora().unwrap().use_rslora);
        assert_eq!(
            spec.lora().unwrap().target_modules,
            ["q_proj", "k_proj", "v_proj", "o_proj"]
        );
        assert_eq!(spec.seed, 1234);
    }

    #[test]
    fn given_seed_wins_over_fallback() {
        let spec = parse(with(minimal(), "seed", json!(7))).unwrap();
        assert_eq!(spec.seed, 7);
    }

    #[test]
    fn nested_hyperparameters_are_read() {
        let body = with(
            minimal(),
            "method",
            json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5, "batch_size": "auto", "learning_rate_multiplier": 2}}}),
        );
        let spec = parse(body).unwrap();
        assert_eq!(spec.hyperparameters().n_epochs, 5);
        assert_eq!(spec.hyperparameters().batch_size, 16);
        assert!((spec.hyperparameters().learning_rate - 2e-4).abs() < 1e-12);
    }

    #[test]
    fn legacy_hyperparameters_are_read() {
        let spec = parse(with(
            minimal(),
            "hyperparameters",
            json!({"n_epochs": 1, "learning_rate": 3e-4}),
        ))
        .unwrap();
        assert_eq!(spec.hyperparameters().n_epochs, 1);
        assert_eq!(spec.hyperparameters().learning_rate, 3e-4);
        assert!((spec.hyperparameters().learning_rate_multiplier - 3.0).abs() < 1e-9);
    }

    #[test]
    fn learning_rate_and_multiplier_together_are_rejected() {
        let err = parse(with(
            minimal(),
            "hyperparameters",
            json!({"learning_rate": 1e-4, "learning_rate_multiplier": 1}),
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("hyperparameters.learning_rate"));
        assert!(err.message.contains("not both"), "{}", err.message);
    }

    #[test]
    fn top_level_hyperparameters_rejected_for_dpo_and_distillation() {
        let methods = [
            json!({"type": "dpo"}),
            json!({"type": "distillation", "distillation": {"teacher_model": "teacher"}}),
        ];
        for method in methods {
            let method_type = method["type"].as_str().unwrap().to_owned();
            let body = with(with(minimal(), "method", method), "hyperparameters", json!({"n_epochs": 2}));
            let err = parse(body).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("hyperparameters"), "{method_type}");
            assert!(err.message.contains(&format!("method.{method_type}.hyperparameters")), "{}", err.message);
        }
    }

    #[test]
    fn out_of_range_knob_names_field_and_range() {
        let body = with(
            minimal(),
            "method",
            json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}),
        );
        let err = parse(body).unwrap_err();
        assert_eq!(
            err.param.as_deref(),
            Some("method.supervised.hyperparameters.n_epochs")
        );
        assert!(err.message.contains("from 1 to 50"), "{}", err.message);
    }

    #[test]
    fn wrong_type_knob_is_rejected() {
        let err = parse(with(
            minimal(),
            "hyperparameters",
            json!({"batch_size": "big"}),
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("hyperparameters.batch_size"));
    }

    #[test]
    fn unknown_hyperparameter_is_rejected() {
        let err = parse(with(minimal(), "hyperparameters", json!({"beta": 0.1}))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("hyperparameters.beta"));
    }

    #[test]
    fn unknown_top_level_key_is_rejected() {
        let err = parse(with(minimal(), "epochs", json!(3))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("epochs"));
    }

    #[test]
    fn missing_model_is_rejected() {
        let err = parse(json!({"training_file": "file-abc"})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("model"));
    }

    #[test]
    fn malformed_training_file_is_rejected() {
        let err = parse(json!({"model": "m", "training_file": "abc"})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("training_file"));
    }

    #[test]
    fn dpo_reads_beta_and_shared_hyperparameters() {
        let body = with(
            minimal(),
            "method",
            json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "max_seq_len": 256}}}),
        );
        let spec = parse(body).unwrap();
        assert_eq!(spec.dpo_beta(), Some(0.25));
        assert_eq!(spec.hyperparameters().n_epochs, 2);
        assert_eq!(spec.hyperparameters().max_seq_len, 256);
        let echoed = serde_json::to_value(&spec.method).unwrap();
        assert_eq!(echoed["type"], "dpo");
        assert_eq!(echoed["dpo"]["hyperparameters"]["beta"], 0.25);
        assert_eq!(echoed["dpo"]["hyperparameters"]["n_epochs"], 2);
        let back: Method = serde_json::from_value(echoed).unwrap();
        assert_eq!(back, spec.method);
    }

    #[test]
    fn dpo_beta_defaults_and_accepts_auto() {
        for method in [json!({"type": "dpo"}), json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}})] {
            let spec = parse(with(minimal(), "method", method)).unwrap();
            assert_eq!(spec.dpo_beta(), Some(DPO_DEFAULT_BETA));
            assert_eq!(spec.hyperparameters().n_epochs, 3);
        }
        let full = with(minimal(), "training_type", json!({"type": "full"}));
        let spec = parse(with(full, "method", json!({"type": "dpo"}))).unwrap();
        assert_eq!(spec.training_type, TrainingType::Full);
        assert_eq!(spec.hyperparameters().learning_rate, FULL_DEFAULT_LEARNING_RATE);
    }

    #[test]
    fn dpo_rejects_bad_beta_and_unknown_keys() {
        let err = parse(with(minimal(), "method", json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("method.dpo.hyperparameters.beta"));
        let err = parse(with(minimal(), "method", json!({"type": "dpo", "dpo": {"hyperparameters": {"betta": 1}}}))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("method.dpo.hyperparameters.betta"));
        let err = parse(with(minimal(), "method", json!({"type": "dpo", "supervised": {}}))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("method.supervised"));
    }

    #[test]
    fn distillation_reads_teacher_layers_and_hyperparameters() {
        let full = with(minimal(), "training_type", json!({"type": "full"}));
        let method = json!({"type": "distillation", "distillation": {
            "teacher_model": "teacher", "student_layers": [0, 3, 6],
            "hyperparameters": {"temperature": 4, "kd_weight": 0.75, "n_epochs": 2}}});
        let spec = parse(with(full, "method", method)).unwrap();
        let distillation = spec.distillation().unwrap();
        assert_eq!(distillation.teacher_model, "teacher");
        assert_eq!(distillation.student_layers, Some(vec![0, 3, 6]));
        assert_eq!(distillation.hyperparameters.temperature, 4.0);
        assert_eq!(distillation.hyperparameters.kd_weight, 0.75);
        assert_eq!(spec.hyperparameters().n_epochs, 2);
        assert_eq!(spec.hyperparameters().learning_rate, FULL_DEFAULT_LEARNING_RATE);
        let echoed = serde_json::to_value(&spec.method).unwrap();
        assert_eq!(echoed["type"], "distillation");
        assert_eq!(echoed["distillation"]["hyperparameters"]["temperature"], 4.0);
        assert_eq!(echoed["distillation"]["hyperparameters"]["n_epochs"], 2);
        let back: Method = serde_json::from_value(echoed).unwrap();
        assert_eq!(back, spec.method);
    }

    #[test]
    fn distillation_defaults_and_accepts_auto() {
        let method = json!({"type": "distillation", "distillation": {"teacher_model": "t",
            "hyperparameters": {"temperature": "auto", "kd_weight": "auto"}}});
        let spec = parse(with(minimal(), "method", method)).unwrap();
        let distillation = spec.distillation().unwrap();
        assert_eq!(distillation.student_layers, None);
        assert_eq!(distillation.hyperparameters.temperature, DISTILLATION_DEFAULT_TEMPERATURE);
        assert_eq!(distillation.hyperparameters.kd_weight, DISTILLATION_DEFAULT_KD_WEIGHT);
    }

    #[test]
    fn distillation_rejects_bad_values() {
        let cases = [
            (json!({"type": "distillation"}), "method.distillation.teacher_model"),
            (json!({"type": "distillation", "distillation": {"teacher_model": ""}}), "method.distillation.teacher_model"),
            (json!({"type": "distillation", "distillation": {"teacher_model": "t", "student_layers": [3, 1]}}), "method.distillation.student_layers"),
            (json!({"type": "distillation", "distillation": {"teacher_model": "t", "student_layers": []}}), "method.distillation.student_layers"),
            (json!({"type": "distillation", "distillation": {"teacher_model": "t", "student_layers": [0, -1]}}), "method.distillation.student_layers"),
            (json!({"type": "distillation", "distillation": {"teacher_model": "t", "hyperparameters": {"temperature": 0}}}), "method.distillation.hyperparameters.temperature"),
            (json!({"type": "distillation", "distillation": {"teacher_model": "t", "hyperparameters": {"kd_weight": 1.5}}}), "method.distillation.hyperparameters.kd_weight"),
            (json!({"type": "distillation", "distillation": {"teacher_model": "t", "hyperparameters": {"beta": 1}}}), "method.distillation.hyperparameters.beta"),
            (json!({"type": "distillation", "distillation": {"teacher_model": "t", "teacher": "u"}}), "method.distillation.teacher"),
        ];
        for (method, param) in cases {
            let body = with(with(minimal(), "training_type", json!({"type": "full"})), "method", method.clone());
            let err = parse(body).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{method}: {}", err.message);
        }
    }

    #[test]
    fn distillation_student_layers_reject_lora() {
        let method = json!({"type": "distillation", "distillation": {"teacher_model": "t", "student_layers": [0, 2]}});
        let err = parse(with(minimal(), "method", method)).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("training_type"));
        assert!(err.message.contains("\"full\""), "{}", err.message);
    }

    #[test]
    fn full_training_defaults_to_its_learning_rate() {
        let spec = parse(with(minimal(), "training_type", json!({"type": "full"}))).unwrap();
        assert_eq!(spec.training_type, TrainingType::Full);
        assert_eq!(spec.lora(), None);
        assert_eq!(spec.hyperparameters().learning_rate, 2e-5);
        assert_eq!(spec.hyperparameters().learning_rate_multiplier, 1.0);
    }

    #[test]
    fn multiplier_scales_the_approach_default() {
        let hyperparameters = json!({"learning_rate_multiplier": 2});
        let full = with(
            with(minimal(), "training_type", json!({"type": "full"})),
            "hyperparameters",
            hyperparameters.clone(),
        );
        let lora = with(minimal(), "hyperparameters", hyperparameters);
        let full_lr = parse(full).unwrap().hyperparameters().learning_rate;
        let lora_lr = parse(lora).unwrap().hyperparameters().learning_rate;
        assert!((full_lr - 4e-5).abs() < 1e-15, "{full_lr}");
        assert!((lora_lr - 2e-4).abs() < 1e-15, "{lora_lr}");
    }

    #[test]
    fn full_learning_rate_echoes_multiplier() {
        let body = with(
            with(minimal(), "training_type", json!({"type": "full"})),
            "hyperparameters",
            json!({"learning_rate": 1e-5}),
        );
        let multiplier = parse(body).unwrap().hyperparameters().learning_rate_multiplier;
        assert!((multiplier - 0.5).abs() < 1e-12, "{multiplier}");
    }

    #[test]
    fn full_training_rejects_lora_settings() {
        let err = parse(with(
            minimal(),
            "training_type",
            json!({"type": "full", "r": 8}),
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("training_type.r"));
    }

    #[test]
    fn extra_hyperparameters_are_read() {
        let spec = parse(with(
            minimal(),
            "hyperparameters",
            json!({
                "gradient_accumulation_steps": 4,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.1,
                "max_grad_norm": 0,
                "eval_interval": 5,
                "checkpoint_interval": 10,
                "n_checkpoints": 3,
            }),
        ))
        .unwrap();
        let hp = spec.hyperparameters();
        assert_eq!(hp.gradient_accumulation_steps, 4);
        assert_eq!(hp.lr_scheduler, LrScheduler::Cosine);
        assert_eq!(hp.warmup_ratio, 0.1);
        assert_eq!(hp.max_grad_norm, 0.0);
        assert_eq!(hp.eval_interval, 5);
        assert_eq!(hp.checkpoint_interval, 10);
        assert_eq!(hp.n_checkpoints, 3);
    }

    #[test]
    fn extra_hyperparameters_accept_auto() {
        let keys = [
            "gradient_accumulation_steps",
            "lr_scheduler",
            "warmup_ratio",
            "max_grad_norm",
            "eval_interval",
            "checkpoint_interval",
            "n_checkpoints",
        ];
        let all_auto: Map<String, Value> = keys
            .iter()
            .map(|key| (key.to_string(), json!("auto")))
            .collect();
        let auto = parse(with(minimal(), "hyperparameters", Value::Object(all_auto))).unwrap();
        let defaults = parse(minimal()).unwrap();
        assert_eq!(auto.hyperparameters(), defaults.hyperparameters());
    }

    #[test]
    fn extra_hyperparameter_errors_name_the_param() {
        let cases = [
            ("gradient_accumulation_steps", json!(0), "from 1 to 1024"),
            ("lr_scheduler", json!("step"), "one of cosine, linear, constant"),
            ("lr_scheduler", json!(1), "one of cosine, linear, constant"),
            ("warmup_ratio", json!(1.0), "[0, 1)"),
            ("warmup_ratio", json!(-0.1), "[0, 1)"),
            ("max_grad_norm", json!(-1), "[0, 1000000]"),
            ("eval_interval", json!(-1), "from 0 to 1000000"),
            ("checkpoint_interval", json!(1.5), "from 0 to 1000000"),
            ("n_checkpoints", json!(0), "from 1 to 100"),
        ];
        for (key, value, expected) in cases {
            let body = with(
                minimal(),
                "method",
                json!({"type": "supervised", "supervised": {"hyperparameters": {key: value}}}),
            );
            let err = parse(body).unwrap_err();
            let param = format!("method.supervised.hyperparameters.{key}");
            assert_eq!(err.param.as_deref(), Some(param.as_str()), "{key}");
            assert!(err.message.contains(expected), "{key}: {}", err.message);
        }
    }

    #[test]
    fn all_linear_targets_are_accepted() {
        for value in [json!(["all-linear"]), json!("all-linear")] {
            let spec = parse(with(
                minimal(),
                "training_type",
                json!({"type": "lora", "target_modules": value}),
            ))
            .unwrap();
            assert_eq!(spec.lora().unwrap().target_modules, ["all-linear"]);
        }
    }

    #[test]
    fn all_linear_with_other_targets_is_rejected() {
        let err = parse(with(
            minimal(),
            "training_type",
            json!({"type": "lora", "target_modules": ["all-linear", "q_proj"]}),
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("training_type.target_modules"));
        assert!(err.message.contains("list it alone"), "{}", err.message);
    }

    #[test]
    fn use_rslora_is_read_and_checked() {
        let spec = parse(with(
            minimal(),
            "training_type",
            json!({"type": "lora", "use_rslora": true}),
        ))
        .unwrap();
        assert!(spec.lora().unwrap().use_rslora);

        let err = parse(with(
            minimal(),
            "training_type",
            json!({"type": "lora", "use_rslora": "yes"}),
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("training_type.use_rslora"));
    }

    #[test]
    fn spec_stored_before_new_fields_still_loads() {
        let mut json = serde_json::to_value(parse(minimal()).unwrap()).unwrap();
        let hp = &mut json["method"]["supervised"]["hyperparameters"];
        for key in [
            "gradient_accumulation_steps",
            "lr_scheduler",
            "warmup_ratio",
            "max_grad_norm",
            "eval_interval",
            "checkpoint_interval",
            "n_checkpoints",
        ] {
            hp.as_object_mut().unwrap().remove(key);
        }
        json["training_type"].as_object_mut().unwrap().remove("use_rslora");
        let back: JobSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, parse(minimal()).unwrap());
    }

    #[test]
    fn unknown_method_type_is_invalid() {
        let err = parse(with(minimal(), "method", json!({"type": "rlhf"}))).unwrap_err();
        assert_eq!(err.kind, SpecErrorKind::Invalid);
    }

    #[test]
    fn lora_settings_are_read_and_checked() {
        let spec = parse(with(
            minimal(),
            "training_type",
            json!({"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}),
        ))
        .unwrap();
        let lora = spec.lora().unwrap();
        assert_eq!(lora.r, 16);
        assert_eq!(lora.alpha, 32.0);
        assert_eq!(lora.dropout, 0.05);
        assert_eq!(lora.target_modules, ["q_proj", "v_proj"]);

        let err = parse(with(
            minimal(),
            "training_type",
            json!({"type": "lora", "dropout": 1.0}),
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("training_type.dropout"));
        assert!(err.message.contains("[0, 1)"), "{}", err.message);

        let err = parse(with(
            minimal(),
            "training_type",
            json!({"type": "lora", "target_modules": ["lm_head"]}),
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("training_type.target_modules"));
    }

    #[test]
    fn suffix_with_colon_is_rejected() {
        let err = parse(with(minimal(), "suffix", json!("a:b"))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("suffix"));
    }

    #[test]
    fn fine_tuned_model_name_uses_suffix_or_studio() {
        let job = JobId::parse("ftjob-123").unwrap();
        let spec = parse(minimal()).unwrap();
        assert_eq!(
            spec.fine_tuned_model(&job),
            "ft:smollm2-135m-instruct:studio:ftjob-123"
        );
        let spec = parse(with(minimal(), "suffix", json!("mine"))).unwrap();
        assert_eq!(
            spec.fine_tuned_model(&job),
            "ft:smollm2-135m-instruct:mine:ftjob-123"
        );
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = parse(with(minimal(), "metadata", json!({"team": "nlp"}))).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["method"]["type"], "supervised");
        assert_eq!(json["training_type"]["type"], "lora");
        let back: JobSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn full_spec_round_trips_through_json() {
        let spec = parse(with(minimal(), "training_type", json!({"type": "full"}))).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["training_type"], json!({"type": "full"}));
        let back: JobSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }
}
