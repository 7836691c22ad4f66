//! `POST /v1/chat/completions`: OpenAI's chat completion for a base model of the catalog or the
//! fine-tuned model of a succeeded job, whole or streamed as Server-Sent Events.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use studio_core::dataset::{Message, Role};
use studio_core::spec::TrainingType;
use studio_store::keys::final_artifact_prefix;
use studio_store::{CatalogError, Services};
use studio_train::generate::{ChatModel, Flow, SamplingParams};
use studio_train::loader::load_model;
use studio_train::TrainError;

use crate::error::ApiError;
use crate::extract::RawBody;

/// The `max_tokens` used when a request sets neither it nor `max_completion_tokens`.
const DEFAULT_MAX_TOKENS: u64 = 256;
/// Loaded models kept in memory. SmolLM2-135M takes about 540 MB in f32.
const CACHED_MODELS: usize = 2;

pub fn router() -> Router<Services> {
    Router::new().route("/v1/chat/completions", post(chat_completions))
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    messages: Vec<RequestMessage>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Not part of OpenAI's API; 0 or absent keeps every token.
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    n: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RequestMessage {
    role: String,
    content: Content,
}

/// Message content: a string, or OpenAI's list of parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A validated request.
struct Completion {
    model: String,
    messages: Vec<Message>,
    params: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    /// False when the request sets no token limit, so the default may shrink to fit the context.
    max_tokens_set: bool,
}

fn invalid(message: String, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "invalid_value")
}

fn parse_request(body: &[u8]) -> Result<Completion, ApiError> {
    let request: CompletionRequest = serde_json::from_slice(body).map_err(|err| {
        ApiError::invalid(
            format!("invalid chat completion request: {err}; send a JSON object with 'model' and 'messages'"),
            None,
            "invalid_json",
        )
    })?;
    if request.messages.is_empty() {
        return Err(invalid(
            "messages is empty; send at least one message, such as {\"role\": \"user\", \"content\": \"Hello\"}".into(),
            "messages",
        ));
    }
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| to_message(index, message))
        .collect::<Result<Vec<_>, _>>()?;

    if request.n.is_some_and(|n| n != 1) {
        return Err(invalid(
            format!(
                "n {} is not supported; only one choice per request (n = 1) is generated",
                request.n.unwrap_or(1)
            ),
            "n",
        ));
    }
    let (max_tokens, param) = match (request.max_completion_tokens, request.max_tokens) {
        (Some(value), _) => (value, "max_completion_tokens"),
        (None, Some(value)) => (value, "max_tokens"),
        (None, None) => (DEFAULT_MAX_TOKENS, "max_tokens"),
    };
    if max_tokens == 0 {
        return Err(invalid(
            format!("{param} 0 is out of range; use at least 1"),
            param,
        ));
    }

    let temperature = request.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            format!(
                "temperature {temperature} is out of range; use a value from 0 to 2 (0 is greedy)"
            ),
            "temperature",
        ));
    }
    let top_p = request.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(
            format!("top_p {top_p} is out of range; use a value above 0 and at most 1"),
            "top_p",
        ));
    }

    let stop = match request.stop {
        None => Vec::new(),
        Some(Stop::One(stop)) => vec![stop],
        Some(Stop::Many(stops)) => stops,
    };
    if stop.len() > 4 {
        return Err(invalid(
            format!("stop has {} sequences; send at most 4", stop.len()),
            "stop",
        ));
    }
    Ok(Completion {
        model: request.model,
        messages,
        params: SamplingParams {
            max_new_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
            temperature,
            top_p,
            top_k: request.top_k.unwrap_or(0),
            seed: request.seed.unwrap_or_else(random_seed),
        },
        stop,
        stream: request.stream,
        max_tokens_set: request.max_completion_tokens.is_some() || request.max_tokens.is_some(),
    })
}

/// Returns a seed for a request that sets none, so unseeded requests differ.
fn random_seed() -> u64 {
    let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

fn to_message(index: usize, message: RequestMessage) -> Result<Message, ApiError> {
    let param = format!("messages[{index}]");
    let role = match message.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(invalid(
                format!("{param}.role {other:?} is not supported; use system, user or assistant"),
                &param,
            ))
        }
    };
    let content = match message.content {
        Content::Text(text) => text,
        Content::Parts(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(piece)) => text.push_str(piece),
                    _ => {
                        return Err(invalid(
                            format!("{param}.content has a part that is not text ({part}); send text parts only"),
                            &param,
                        ))
                    }
                }
            }
            text
        }
    };
    Ok(Message {
        role,
        content,
        weight: None,
    })
}

/// The origin of a model's weights.
pub(crate) enum ModelSource {
    /// A catalog entry, optionally with a job's adapter stored under `adapter_prefix`.
    Base {
        path: std::path::PathBuf,
        adapter_prefix: Option<String>,
    },
    /// A fully fine-tuned model folder stored under the prefix.
    Folder { prefix: String },
}

/// Finds the base model or the succeeded job that `name` refers to.
pub(crate) async fn model_source(services: &Services, name: &str) -> Result<ModelSource, ApiError> {
    let catalog = services.models.clone();
    let requested = name.to_owned();
    let resolved = tokio::task::spawn_blocking(move || catalog.resolve(&requested))
        .await
        .map_err(ApiError::internal)?;
    match resolved {
        Ok(base) => {
            return Ok(ModelSource::Base {
                path: base.path,
                adapter_prefix: None,
            })
        }
        Err(CatalogError::NotFound { .. }) => {}
        Err(err) => return Err(err.into()),
    }
    // NOTE: scans every succeeded job; a store lookup by fine_tuned_model would scale better.
    let jobs = services.store.list_succeeded_jobs().await?;
    let Some(job) = jobs
        .into_iter()
        .find(|job| job.fine_tuned_model.as_deref() == Some(name))
    else {
        return Err(ApiError::not_found(
            format!("model '{name}' not found; GET /v1/models lists the base models and fine-tuned models"),
            Some("model"),
        ));
    };
    match job.spec.training_type {
        TrainingType::Lora(_) => {
            let base = services.models.resolve(&job.spec.model).map_err(|err| {
                ApiError::not_found(
                    format!("the base model of {name} is no longer installed: {err}"),
                    Some("model"),
                )
            })?;
            Ok(ModelSource::Base {
                path: base.path,
                adapter_prefix: Some(final_artifact_prefix(&job.id, "adapter")),
            })
        }
        TrainingType::Full => Ok(ModelSource::Folder {
            prefix: final_artifact_prefix(&job.id, "model"),
        }),
    }
}

/// The models loaded most recently, newest first.
// NOTE: keyed by name only, so a base model file replaced in the models folder keeps serving the
// old weights until it leaves the cache or the server restarts.
static LOADED: Mutex<Vec<(String, Arc<ChatModel>)>> = Mutex::new(Vec::new());
/// Serialises loading, so concurrent requests for one model load it once.
static LOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cached(name: &str) -> Option<Arc<ChatModel>> {
    let mut loaded = LOADED.lock().unwrap_or_else(|poison| poison.into_inner());
    let index = loaded.iter().position(|(key, _)| key == name)?;
    let entry = loaded.remove(index);
    let model = entry.1.clone();
    loaded.insert(0, entry);
    Some(model)
}

fn remember(name: &str, model: Arc<ChatModel>) {
    let mut loaded = LOADED.lock().unwrap_or_else(|poison| poison.into_inner());
    loaded.retain(|(key, _)| key != name);
    loaded.insert(0, (name.to_owned(), model));
    loaded.truncate(CACHED_MODELS);
}

/// Returns the loaded model `name`, loading it on a blocking thread when it is not cached.
async fn chat_model(services: &Services, name: &str) -> Result<Arc<ChatModel>, ApiError> {
    if let Some(model) = cached(name) {
        return Ok(model);
    }
    let _guard = LOADING.lock().await;
    if let Some(model) = cached(name) {
        return Ok(model);
    }

    let source = model_source(services, name).await?;
    // The artifacts are needed only while loading, because the weights are then in memory.
    let scratch = tempfile::tempdir()
        .map_err(|err| ApiError::internal(format!("cannot create a scratch folder: {err}")))?;
    let (path, adapter) = fetch_source(services, source, scratch.path()).await?;

    tracing::info!(model = name, "loading a model for chat completions");
    let model = tokio::task::spawn_blocking(move || load(&path, adapter.as_deref()))
        .await
        .map_err(|err| ApiError::internal(format!("the model loading task failed: {err}")))?
        .map_err(|err| load_error(name, err))?;
    drop(scratch);
    let model = Arc::new(model);
    remember(name, model.clone());
    Ok(model)
}

/// Downloads the stored artifacts of `source` into `scratch` and returns the model's path and
/// the adapter folder of a LoRA job.
pub(crate) async fn fetch_source(
    services: &Services,
    source: ModelSource,
    scratch: &Path,
) -> Result<(PathBuf, Option<PathBuf>), ApiError> {
    match source {
        ModelSource::Base {
            path,
            adapter_prefix,
        } => {
            let adapter = match adapter_prefix {
                Some(prefix) => {
                    let dir = scratch.join("adapter");
                    services.artifacts.get_dir(&prefix, &dir).await?;
                    Some(dir)
                }
                None => None,
            };
            Ok((path, adapter))
        }
        ModelSource::Folder { prefix } => {
            let dir = scratch.join("model");
            services.artifacts.get_dir(&prefix, &dir).await?;
            Ok((dir, None))
        }
    }
}

fn load(path: &Path, adapter: Option<&Path>) -> Result<ChatModel, TrainError> {
    let device = candle_core::Device::Cpu;
    let loaded = load_model(path, &device)?;
    ChatModel::from_loaded(&loaded, adapter, &device)
}

fn load_error(name: &str, err: TrainError) -> ApiError {
    match err {
        TrainError::InvalidData { message, .. } => ApiError::invalid(
            format!("model '{name}' cannot chat: {message}"),
            Some("model"),
            "model_not_supported",
        ),
        other => ApiError::internal(format!("loading model '{name}' failed: {other}")),
    }
}

fn generation_error(err: TrainError) -> ApiError {
    match err {
        TrainError::InvalidData { message, param } => {
            ApiError::invalid(message, param.as_deref(), "invalid_value")
        }
        other => ApiError::internal(format!("generation failed: {other}")),
    }
}

async fn chat_completions(
    State(services): State<Services>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let completion = parse_request(&body)?;
    let model = chat_model(&services, &completion.model).await?;
    let completion = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || fit_context(&model, completion))
            .await
            .map_err(|err| {
                ApiError::internal(format!("the prompt encoding task failed: {err}"))
            })??
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = Utc::now().timestamp();
    if completion.stream {
        return Ok(stream(model, completion, id, created));
    }

    let Completion {
        model: name,
        messages,
        params,
        stop,
        ..
    } = completion;
    let reply = tokio::task::spawn_blocking(move || {
        model
            .reply(&messages, &params, &stop, &mut |_| {})
            .map_err(generation_error)
    })
    .await
    .map_err(|err| ApiError::internal(format!("the generation task failed: {err}")))??;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": name,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.text, "refusal": null},
            "logprobs": null,
            "finish_reason": reply.finish_reason.as_str(),
        }],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }))
    .into_response())
}

/// Rejects a prompt that, with `max_tokens`, does not fit the model's context. Without a limit
/// in the request, the default shrinks to the room left.
fn fit_context(model: &ChatModel, mut completion: Completion) -> Result<Completion, ApiError> {
    let context_length = model.model.config.max_position_embeddings;
    let prompt = model
        .encode_prompt(&completion.messages)
        .map_err(generation_error)?;
    let params = &mut completion.params;
    if prompt.len() >= context_length {
        return Err(invalid(
            format!("the messages take {} tokens but the model's context holds {context_length}; send shorter messages", prompt.len()),
            "messages",
        ));
    }
    if !completion.max_tokens_set {
        params.max_new_tokens = params.max_new_tokens.min(context_length - prompt.len());
    }
    // A max_tokens near u64::MAX overflows a plain sum, so the sum saturates.
    if prompt.len().saturating_add(params.max_new_tokens) > context_length {
        return Err(invalid(
            format!(
                "the messages take {} tokens, so max_tokens {} exceeds the model's context of {context_length}; use at most {}",
                prompt.len(),
                params.max_new_tokens,
                context_length - prompt.len()
            ),
            "max_tokens",
        ));
    }
    Ok(completion)
}

/// Streams the reply as `chat.completion.chunk` events: the role first, then text pieces as
/// they are generated, then the finish reason, then `[DONE]`.
fn stream(model: Arc<ChatModel>, completion: Completion, id: String, created: i64) -> Response {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Value>(64);
    let Completion {
        model: name,
        messages,
        params,
        stop,
        ..
    } = completion;
    let chunk = {
        let (id, name) = (id.clone(), name.clone());
        move |delta: Value, finish_reason: Value| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "system_fingerprint": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            })
        }
    };
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let send = |value: Value| sender.blocking_send(value).is_ok();
        if !send(chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )) {
            return;
        }
        let result = model
            .reply_until(&messages, &params, &stop, &mut |piece| {
                if send(chunk(json!({"content": piece}), Value::Null)) {
                    Flow::Continue
                } else {
                    Flow::Stop
                }
            })
            .map_err(generation_error);
        match result {
            Ok(reply) => {
                send(chunk(json!({}), json!(reply.finish_reason.as_str())));
            }
            Err(err) => {
                tracing::error!(completion_id = %id, error = %err, "streamed chat completion failed");
                send(
                    json!({"error": {"message": err.to_string(), "type": "server_error", "param": null, "code": null}}),
                );
            }
        }
    });
    let values = futures::stream::unfold(receiver, |mut receiver| async move {
        let value = receiver.recv().await?;
        Some((value, receiver))
    });
    let events = values
        .map(|value| Ok::<_, Infallible>(Event::default().data(value.to_string())))
        .chain(futures::stream::once(async {
            Ok(Event::default().data("[DONE]"))
        }));
    Sse::new(events).into_response()
}
