//! API errors in the OpenAI/vLLM shape, with the right HTTP status.

use super::protocol::{ErrorInfo, ErrorResponse};
use crate::engine::EngineError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answered as `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the client.
    pub message: String,
    /// The offending parameter.
    pub param: Option<String>,
}

impl ApiError {
    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
        }
    }

    /// 400 naming the parameter.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::bad_request(message)
        }
    }

    /// Any status with a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// The error class vLLM names for a status.
    pub fn kind(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            405 => "MethodNotAllowedError",
            408 => "TimeoutError",
            409 => "ConflictError",
            413 => "RequestTooLargeError",
            415 => "UnsupportedMediaTypeError",
            422 => "UnprocessableEntityError",
            429 => "RateLimitError",
            431 => "RequestHeaderFieldsTooLargeError",
            503 => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorInfo {
                message: self.message.clone(),
                kind: Self::kind(self.status).to_string(),
                param: self.param.clone(),
                code: self.status.as_u16(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::InvalidRequest { param, message } => {
                ApiError::invalid_param(param, message)
            }
            EngineError::ContextTooLong { .. } => {
                ApiError::invalid_param("max_tokens", e.to_string())
            }
            EngineError::CacheTooSmall { .. } => ApiError::invalid_param("prompt", e.to_string()),
            EngineError::DuplicateRequestId(_) => {
                ApiError::invalid_param("request_id", e.to_string())
            }
            EngineError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}
