//! The parameters the tape runs on: every tensor of a model in precision `R`, which of them
//! are trainable, and their transposes for backward.

use super::{transpose_on, GradOptions, Real};
use crate::config::ModelConfig;
use crate::kernels::rope::Rope;
use crate::kernels::Kernels;
use crate::weights::{expected_tensors, WeightError};
use std::collections::HashMap;
use std::sync::OnceLock;

/// Parameter indices of one decoder layer.
#[derive(Debug, Clone)]
pub(super) struct LayerIds {
    pub(super) attn_norm: usize,
    pub(super) q: usize,
    pub(super) k: usize,
    pub(super) v: usize,
    pub(super) qkv_bias: Option<[usize; 3]>,
    pub(super) o: usize,
    pub(super) mlp_norm: usize,
    pub(super) gate: usize,
    pub(super) up: usize,
    pub(super) down: usize,
}

/// What a parameter belongs to, which decides whether it is trainable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Embedding,
    Layer(usize),
    FinalNorm,
    LmHead,
}

/// Every parameter of a model in precision `R` (values already rounded to the run dtype), plus
/// transposed matrices for backward, built on first use. Build one per optimizer step.
pub struct TrainWeights<R: Real = f32> {
    pub(super) config: ModelConfig,
    pub(super) names: Vec<String>,
    pub(super) shapes: Vec<Vec<usize>>,
    roles: Vec<Role>,
    pub(super) values: Vec<Vec<R>>,
    transposed: Vec<OnceLock<Vec<R>>>,
    pub(super) layers: Vec<LayerIds>,
    pub(super) embed: usize,
    pub(super) norm: usize,
    pub(super) lm_head: usize,
    pub(super) rope: Rope,
}

impl<R: Real> std::fmt::Debug for TrainWeights<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainWeights")
            .field("config", &self.config)
            .field("params", &self.names.len())
            .finish()
    }
}

impl TrainWeights<f32> {
    /// f32 weights from HF-named tensors (every parameter of `config`, each exactly once).
    pub fn new(
        config: &ModelConfig,
        params: Vec<(String, Vec<usize>, Vec<f32>)>,
    ) -> Result<TrainWeights<f32>, WeightError> {
        Self::from_params(config, params)
    }
}

impl<R: Real> TrainWeights<R> {
    /// Weights in precision `R` from HF-named tensors (every parameter of `config`, each
    /// exactly once).
    pub fn from_params(
        config: &ModelConfig,
        params: Vec<(String, Vec<usize>, Vec<R>)>,
    ) -> Result<TrainWeights<R>, WeightError> {
        config.check()?;
        let mut given: HashMap<String, (Vec<usize>, Vec<R>)> = HashMap::new();
        for (name, shape, data) in params {
            if given.contains_key(&name) {
                return Err(WeightError::Unexpected(format!("{name} (given twice)")));
            }
            given.insert(name, (shape, data));
        }
        let specs = expected_tensors(config);
        let mut names = Vec::with_capacity(specs.len());
        let mut shapes = Vec::with_capacity(specs.len());
        let mut values = Vec::with_capacity(specs.len());
        for spec in specs {
            let (shape, data) = given
                .remove(&spec.name)
                .ok_or_else(|| WeightError::Missing(spec.name.clone()))?;
            if shape != spec.shape {
                return Err(WeightError::Shape {
                    name: spec.name,
                    expected: spec.shape,
                    got: shape,
                });
            }
            if data.len() != shape.iter().product::<usize>() {
                return Err(WeightError::Shape {
                    name: spec.name,
                    expected: spec.shape,
                    got: vec![data.len()],
                });
            }
            names.push(spec.name);
            shapes.push(shape);
            values.push(data);
        }
        if let Some(extra) = given.keys().min() {
            return Err(WeightError::Unexpected(extra.clone()));
        }
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let at = |n: &str| index[n];
        let mut roles = vec![Role::Embedding; names.len()];
        let layers: Vec<LayerIds> = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let id = |s: &str| at(&format!("{p}.{s}"));
                let ids = LayerIds {
                    attn_norm: id("input_layernorm.weight"),
                    q: id("self_attn.q_proj.weight"),
                    k: id("self_attn.k_proj.weight"),
                    v: id("self_attn.v_proj.weight"),
                    qkv_bias: config
                        .attention_bias
                        .then(|| ["q", "k", "v"].map(|x| id(&format!("self_attn.{x}_proj.bias")))),
                    o: id("self_attn.o_proj.weight"),
                    mlp_norm: id("post_attention_layernorm.weight"),
                    gate: id("mlp.gate_proj.weight"),
                    up: id("mlp.up_proj.weight"),
                    down: id("mlp.down_proj.weight"),
                };
                for (i, n) in names.iter().enumerate() {
                    if n.starts_with(&format!("{p}.")) {
                        roles[i] = Role::Layer(l);
                    }
                }
                ids
            })
            .collect();
        let embed = at("model.embed_tokens.weight");
        let norm = at("model.norm.weight");
        roles[norm] = Role::FinalNorm;
        // Tied: the LM head is the embedding tensor itself (see forward.rs).
        let lm_head = if config.tie_word_embeddings {
            embed
        } else {
            let id = at("lm_head.weight");
            roles[id] = Role::LmHead;
            id
        };
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.max_position_embeddings,
            config.rope_scaling.as_ref(),
        );
        Ok(TrainWeights {
            config: config.clone(),
            transposed: (0..names.len()).map(|_| OnceLock::new()).collect(),
            names,
            shapes,
            roles,
            values,
            layers,
            embed,
            norm,
            lm_head,
            rope,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Parameter names in canonical order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// A parameter's values by HF name.
    pub fn param(&self, name: &str) -> Option<&[R]> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.values[i])
    }

    pub(super) fn value(&self, id: usize) -> &[R] {
        &self.values[id]
    }

    /// Matrix `id` transposed to `[in, out]`, built on first use.
    pub(super) fn transposed(&self, kern: &Kernels, id: usize) -> &[R] {
        self.transposed[id].get_or_init(|| {
            let s = &self.shapes[id];
            transpose_on(kern, &self.values[id], s[0], s[1])
        })
    }

    /// Whether `opts` trains parameter `id`.
    pub(super) fn trainable(&self, id: usize, opts: &GradOptions) -> bool {
        let reaches_embedding = opts.first_trainable_layer == 0;
        match self.roles[id] {
            Role::Embedding if self.config.tie_word_embeddings => {
                opts.train_lm_head || (opts.train_embeddings && reaches_embedding)
            }
            Role::Embedding => opts.train_embeddings && reaches_embedding,
            Role::Layer(l) => l >= opts.first_trainable_layer,
            Role::FinalNorm => opts.train_final_norm,
            Role::LmHead => opts.train_lm_head,
        }
    }
}
