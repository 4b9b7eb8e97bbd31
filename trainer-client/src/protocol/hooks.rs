//! The trainer hooks: weight updates (uploaded, from disk, multi-part), pause and resume, and
//! reading the serving weights back (`/weight_info`, `/get_weights_by_name`).

use super::Extra;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a weight update does with requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateMode {
    /// Finish them on the old weights, then swap (the server's default).
    #[default]
    Wait,
    /// End them (`finish_reason: "abort"`), then swap.
    Abort,
    /// Swap at once; they go on with the new weights (their `weight_versions` say so).
    Continue,
}

impl UpdateMode {
    /// The name the server expects.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateMode::Wait => "wait",
            UpdateMode::Abort => "abort",
            UpdateMode::Continue => "continue",
        }
    }
}

/// What `/pause` does with requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseMode {
    /// Let them finish; refuse new ones (the server's default).
    #[default]
    Wait,
    /// End them (`finish_reason: "abort"`); refuse new ones.
    Abort,
    /// Freeze them with their KV cache kept; queue new ones.
    Keep,
}

impl PauseMode {
    /// The name the server expects.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseMode::Wait => "wait",
            PauseMode::Abort => "abort",
            PauseMode::Keep => "keep",
        }
    }
}

/// Query parameters of `POST /update_weights` and `POST /finish_weight_update`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOptions {
    /// The version to serve afterwards (server default: current + 1). Leave it out on the
    /// parts of a multi-part update; give it to `/finish_weight_update`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// What happens to requests in flight (server default `wait`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<UpdateMode>,
}

/// `POST /update_weights_from_disk` (SGLang's shape, plus `mode`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateFromDiskRequest {
    /// A safetensors file or directory, or a GGUF file, under the server's
    /// `--allowed-weight-dir`.
    pub model_path: String,
    /// The version to serve afterwards (server default: current + 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// Abort in-flight requests instead of letting them finish (SGLang's switch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_all_requests: Option<bool>,
    /// Accepted for SGLang compatibility; the server always flushes the prefix cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_cache: Option<bool>,
    /// What happens to requests in flight (overrides `abort_all_requests`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<UpdateMode>,
}

/// Phase timings of a weight update, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateTimings {
    /// Reading, converting and validating the tensors.
    #[serde(default)]
    pub stage_s: f64,
    /// The part of `stage_s` spent checking names, shapes and dtypes.
    #[serde(default)]
    pub validate_s: f64,
    /// Waiting for in-flight requests (`wait` mode).
    #[serde(default)]
    pub wait_s: f64,
    /// The swap itself.
    #[serde(default)]
    pub swap_s: f64,
    /// End to end.
    #[serde(default)]
    pub total_s: f64,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The outcome of a weight update (or of staging one part of a multi-part update).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateResponse {
    /// Whether the request did what it was asked.
    pub success: bool,
    /// What happened (`staged; …` for a part of a multi-part update).
    #[serde(default)]
    pub message: String,
    /// The version serving now.
    pub weight_version: u64,
    /// Always 0 (SGLang's field).
    #[serde(default)]
    pub num_paused_requests: usize,
    /// Requests the update aborted.
    #[serde(default)]
    pub num_aborted_requests: usize,
    /// Tensors replaced (or staged so far).
    #[serde(default)]
    pub num_tensors: usize,
    /// Bytes staged in the serving dtype.
    #[serde(default)]
    pub num_bytes: usize,
    /// Phase timings.
    #[serde(default)]
    pub timings: UpdateTimings,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `{success, message}`, the answer of several hooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuccessResponse {
    /// Whether it worked.
    pub success: bool,
    /// What happened.
    #[serde(default)]
    pub message: String,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `{is_paused}`, the answer of `/pause`, `/resume` and `/is_paused`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PausedResponse {
    /// Whether generation is paused.
    pub is_paused: bool,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A tensor's name and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorShape {
    /// Hugging Face tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// `GET /weight_info` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightInfo {
    /// The version serving.
    pub weight_version: u64,
    /// Serving dtype (`float16`, `bfloat16`, `float32`).
    #[serde(default)]
    pub dtype: String,
    /// Number of tensors.
    #[serde(default)]
    pub num_tensors: usize,
    /// Bytes in the serving dtype.
    #[serde(default)]
    pub num_bytes: usize,
    /// Fingerprint of every tensor's name and bits.
    #[serde(default)]
    pub checksum: String,
    /// Tensor names and shapes.
    #[serde(default)]
    pub tensors: Vec<TensorShape>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `GET /get_weights_by_name` response: a tensor's leading rows.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    /// A 1-D tensor's leading values.
    Vector(Vec<f32>),
    /// Leading rows of a tensor of 2 or more dimensions, each row flattened.
    Rows(Vec<Vec<f32>>),
}

impl TensorValues {
    /// Every value in row-major order.
    pub fn flatten(&self) -> Vec<f32> {
        match self {
            TensorValues::Vector(v) => v.clone(),
            TensorValues::Rows(r) => r.concat(),
        }
    }
}

impl<'de> Deserialize<'de> for TensorValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde_json writes NaN and ±inf as `null`; a checking tool wants to see such weights,
        // not a decode error, so `null` is read as NaN.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Vector(Vec<Option<f32>>),
            Rows(Vec<Vec<Option<f32>>>),
        }
        let values = |v: Vec<Option<f32>>| v.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect();
        Ok(match Raw::deserialize(d)? {
            Raw::Vector(v) => TensorValues::Vector(values(v)),
            Raw::Rows(r) => TensorValues::Rows(r.into_iter().map(values).collect()),
        })
    }
}

impl Serialize for TensorValues {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TensorValues::Vector(v) => v.serialize(s),
            TensorValues::Rows(r) => r.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn update_modes_use_the_server_names() {
        let opts = UpdateOptions {
            weight_version: Some(3),
            mode: Some(UpdateMode::Continue),
        };
        assert_eq!(
            serde_json::to_value(opts).unwrap(),
            json!({"weight_version": 3, "mode": "continue"})
        );
        assert_eq!(
            serde_json::to_value(PauseMode::Keep).unwrap(),
            json!("keep")
        );
    }

    #[test]
    fn tensor_values_read_vectors_rows_and_nan() {
        let v: TensorValues = serde_json::from_value(json!([1.0, null])).unwrap();
        assert!(matches!(&v, TensorValues::Vector(x) if x[0] == 1.0 && x[1].is_nan()));
        let r: TensorValues = serde_json::from_value(json!([[1.0, 2.0], [3.0, 4.0]])).unwrap();
        assert_eq!(r.flatten(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
