//! The OpenAPI description of the HTTP API, generated from the handlers and types.

use super::protocol::*;
use utoipa::OpenApi;

/// halfstep's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "halfstep", description = "OpenAI- and vLLM-compatible FP16 inference server with trainer hooks."),
    paths(
        super::completions::create_completion,
        super::chat::create_chat_completion,
        super::misc::list_models,
        super::misc::tokenize,
        super::misc::detokenize,
        super::misc::health,
        super::misc::ping,
        super::misc::version,
        super::hooks::score_logprobs,
        super::hooks::update_weights_from_disk,
        super::hooks::update_weights,
        super::hooks::start_weight_update,
        super::hooks::finish_weight_update,
        super::hooks::pause,
        super::hooks::resume,
        super::hooks::is_paused,
        super::hooks::weight_info,
        super::hooks::get_weights_by_name,
        super::hooks::reset_prefix_cache,
        super::hooks::mismatch_report,
        super::metrics_text,
    ),
    components(schemas(
        Prompt, Stop, StreamOptions, SamplingFields, CompletionRequest, ChatMessage,
        ChatCompletionRequest, Usage, PromptTokensDetails, CompletionLogprobs, PromptLogprob,
        WeightVersionSpan, CompletionChoice, CompletionResponse, ChatTopLogprob,
        ChatTokenLogprob, ChatLogprobs, ChatResponseMessage, ChatChoice, ChatCompletionResponse,
        ChatDelta, ChatChunkChoice, ChatCompletionChunk, ModelCard, ModelList, TokenizeRequest,
        TokenizeResponse, DetokenizeRequest, DetokenizeResponse, VersionResponse, ErrorResponse,
        ErrorInfo, super::hooks::VersionArg, super::hooks::UpdateFromDiskRequest,
        super::hooks::UpdateResponse, super::hooks::UpdateTimings, super::hooks::SuccessResponse,
        super::hooks::PausedResponse, super::hooks::WeightInfo, super::hooks::TensorShape,
        super::hooks::LogprobsRequest, super::hooks::TopLogprob, super::hooks::SequenceLogprobs,
        super::hooks::LogprobsResponse, super::hooks::MismatchReport
    )),
    tags((name = "inference", description = "Completions, chat, tokenizer"), (name = "ops", description = "Health and version"), (name = "trainer", description = "Trainer hooks: weight updates, pause/resume, weight info (admin key)"))
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `halfstep openapi` writes).
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("OpenAPI serialises");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_openapi_json_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == super::openapi_json(),
            "openapi/openapi.json is stale: run `cargo run -p halfstep-server -- openapi --output openapi/openapi.json`"
        );
    }
}
