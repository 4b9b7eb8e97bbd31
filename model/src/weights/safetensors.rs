//! Safetensors checkpoints: one file, a sharded index, or bytes in memory (uploads).

use super::{SourceDType, TensorInfo, TensorSource, WeightError};
use ::safetensors::{Dtype, SafeTensors};
use half::{bf16, f16};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct Entry {
    file: usize,
    info: TensorInfo,
    range: std::ops::Range<usize>,
}

/// Tensors of one or more safetensors files, read into memory.
pub struct SafetensorsCheckpoint {
    files: Vec<Vec<u8>>,
    entries: HashMap<String, Entry>,
    order: Vec<String>,
}

impl SafetensorsCheckpoint {
    /// Opens `model.safetensors.index.json` if present, else every `*.safetensors` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, WeightError> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|source| WeightError::Io {
                path: index.display().to_string(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WeightError::Safetensors {
                    path: index.display().to_string(),
                    message: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| WeightError::Safetensors {
                    path: index.display().to_string(),
                    message: "index has no weight_map object".into(),
                })?;
            for shard in map.values().filter_map(|s| s.as_str()) {
                let p = dir.join(shard);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| WeightError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    files.push(p);
                }
            }
            files.sort();
        }
        if files.is_empty() {
            return Err(WeightError::NotAModel(dir.display().to_string()));
        }
        Self::open_files(&files)
    }

    /// Reads the given files (each tensor name must appear once).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, WeightError> {
        let mut backings = Vec::new();
        for p in paths {
            backings.push((p.display().to_string(), super::read_file(p)?));
        }
        Self::from_backings(backings)
    }

    /// Parses a safetensors file held in memory (an upload).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, WeightError> {
        Self::from_backings(vec![("<upload>".to_string(), bytes)])
    }

    fn from_backings(backings: Vec<(String, Vec<u8>)>) -> Result<Self, WeightError> {
        let mut entries = HashMap::new();
        let mut order = Vec::new();
        let mut files = Vec::new();
        for (fi, (path, bytes)) in backings.into_iter().enumerate() {
            {
                let st =
                    SafeTensors::deserialize(&bytes).map_err(|e| WeightError::Safetensors {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                let base = bytes.as_ptr() as usize;
                let mut names: Vec<(String, usize)> = Vec::new();
                for (name, view) in st.tensors() {
                    let start = view.data().as_ptr() as usize - base;
                    let range = start..start + view.data().len();
                    if entries.contains_key(&name) {
                        return Err(WeightError::Safetensors {
                            path: path.clone(),
                            message: format!("tensor '{name}' appears in more than one file"),
                        });
                    }
                    names.push((name.clone(), start));
                    let info = TensorInfo {
                        shape: view.shape().to_vec(),
                        dtype: map_dtype(view.dtype()),
                    };
                    entries.insert(
                        name,
                        Entry {
                            file: fi,
                            info,
                            range,
                        },
                    );
                }
                names.sort_by_key(|n| n.1);
                order.extend(names.into_iter().map(|n| n.0));
            }
            files.push(bytes);
        }
        Ok(SafetensorsCheckpoint {
            files,
            entries,
            order,
        })
    }
}

fn map_dtype(d: Dtype) -> SourceDType {
    match d {
        Dtype::F32 => SourceDType::F32,
        Dtype::F16 => SourceDType::F16,
        Dtype::BF16 => SourceDType::Bf16,
        Dtype::F64 => SourceDType::Other("F64"),
        Dtype::I8 => SourceDType::Other("I8"),
        Dtype::U8 => SourceDType::Other("U8"),
        Dtype::I16 => SourceDType::Other("I16"),
        Dtype::I32 => SourceDType::Other("I32"),
        Dtype::I64 => SourceDType::Other("I64"),
        Dtype::BOOL => SourceDType::Other("BOOL"),
        _ => SourceDType::Other("unsupported"),
    }
}

/// Widens little-endian F32/F16/BF16 bytes to f32.
pub fn bytes_to_f32(dtype: SourceDType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        SourceDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        SourceDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        SourceDType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => return None,
    })
}

impl TensorSource for SafetensorsCheckpoint {
    fn raw_bytes(&self, name: &str) -> Option<(SourceDType, &[u8])> {
        let e = self.entries.get(name)?;
        matches!(
            e.info.dtype,
            SourceDType::F32 | SourceDType::F16 | SourceDType::Bf16
        )
        .then(|| (e.info.dtype, &self.files[e.file][e.range.clone()]))
    }

    fn tensor_infos(&self) -> Vec<(String, TensorInfo)> {
        self.order
            .iter()
            .map(|n| (n.clone(), self.entries[n].info.clone()))
            .collect()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>, WeightError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| WeightError::Missing(name.to_string()))?;
        let bytes = &self.files[e.file][e.range.clone()];
        bytes_to_f32(e.info.dtype, bytes).ok_or_else(|| WeightError::DType {
            name: name.to_string(),
            dtype: e.info.dtype.to_string(),
        })
    }
}
