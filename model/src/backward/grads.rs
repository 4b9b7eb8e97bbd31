//! Which parameters get gradients ([`GradOptions`]) and the gradients themselves ([`Grads`]).

use super::{touched_zeros, Real, TrainWeights};

/// Which parameters get gradients.
///
/// Layers below `first_trainable_layer` are frozen and backward does not run through them, so
/// the token embedding can only learn when it is 0. A tied embedding/LM-head tensor is trainable
/// when either its head or (with `first_trainable_layer == 0`) its embedding use is, and then
/// receives every share backward reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradOptions {
    /// Lowest decoder layer that is trained.
    pub first_trainable_layer: usize,
    /// Train the token embedding.
    pub train_embeddings: bool,
    /// Train the final RMSNorm's weight.
    pub train_final_norm: bool,
    /// Train the LM head.
    pub train_lm_head: bool,
}

impl Default for GradOptions {
    /// Everything trainable.
    fn default() -> Self {
        GradOptions {
            first_trainable_layer: 0,
            train_embeddings: true,
            train_final_norm: true,
            train_lm_head: true,
        }
    }
}

/// Accumulated gradients of the trainable parameters, by HF name.
#[derive(Debug, Clone)]
pub struct Grads<R: Real = f32> {
    pub(super) options: GradOptions,
    pub(super) names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    // Indexed like the weights' parameters; None for frozen ones.
    values: Vec<Option<Vec<R>>>,
}

impl<R: Real> Grads<R> {
    /// Zero gradients for the parameters of `w` that `opts` trains.
    pub fn new(w: &TrainWeights<R>, opts: &GradOptions) -> Grads<R> {
        let values = (0..w.names.len())
            .map(|i| {
                w.trainable(i, opts)
                    .then(|| touched_zeros(w.values[i].len()))
            })
            .collect();
        Grads {
            options: *opts,
            names: w.names.clone(),
            shapes: w.shapes.clone(),
            values,
        }
    }

    /// The options these gradients were built for.
    pub fn options(&self) -> &GradOptions {
        &self.options
    }

    /// Names of the trainable parameters, in canonical order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(n, _)| n)
    }

    /// Number of trainable parameters (tensors).
    pub fn len(&self) -> usize {
        self.values.iter().filter(|v| v.is_some()).count()
    }

    /// Whether nothing is trainable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn id(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The gradient of a parameter, if it is trainable.
    pub fn get(&self, name: &str) -> Option<&[R]> {
        self.values[self.id(name)?].as_deref()
    }

    /// The gradient of a parameter, mutable (for unscaling and clipping).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut [R]> {
        let id = self.id(name)?;
        self.values[id].as_deref_mut()
    }

    /// The shape of a parameter, if it is trainable.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let id = self.id(name)?;
        self.values[id].as_ref().map(|_| self.shapes[id].as_slice())
    }

    /// (name, gradient) of every trainable parameter, in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[R])> {
        self.names
            .iter()
            .zip(&self.values)
            .filter_map(|(n, v)| v.as_deref().map(|v| (n.as_str(), v)))
    }

    /// (name, gradient) of every trainable parameter, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut [R])> {
        self.names
            .iter()
            .zip(&mut self.values)
            .filter_map(|(n, v)| v.as_deref_mut().map(|v| (n.as_str(), v)))
    }

    /// Sets every gradient to zero.
    pub fn zero(&mut self) {
        for v in self.values.iter_mut().flatten() {
            v.fill(R::ZERO);
        }
    }

    pub(super) fn slot(&mut self, id: usize) -> Option<&mut [R]> {
        self.values[id].as_deref_mut()
    }
}
