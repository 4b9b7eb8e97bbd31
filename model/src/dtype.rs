//! Run dtypes: the storage precisions a model runs in, and rounding to them.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

/// A floating-point precision the model can run in (weights, activations and K/V).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary16.
    Float16,
    /// bfloat16 (8-bit exponent, 8 significant bits).
    Bfloat16,
    /// IEEE binary32.
    Float32,
}

impl DType {
    /// Bytes one element takes in storage.
    pub fn size_of(self) -> usize {
        match self {
            DType::Float16 | DType::Bfloat16 => 2,
            DType::Float32 => 4,
        }
    }

    /// The name vLLM and PyTorch use (`float16`, `bfloat16`, `float32`).
    pub fn name(self) -> &'static str {
        match self {
            DType::Float16 => "float16",
            DType::Bfloat16 => "bfloat16",
            DType::Float32 => "float32",
        }
    }

    /// Rounds an f32 value to this dtype and back (round to nearest, ties to even).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::Float16 => f16::from_f32(x).to_f32(),
            DType::Bfloat16 => bf16::from_f32(x).to_f32(),
            DType::Float32 => x,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for a dtype name that is not one of the supported ones.
#[derive(Debug, thiserror::Error)]
#[error("unsupported dtype '{0}' (expected float16, bfloat16 or float32)")]
pub struct UnknownDType(pub String);

impl FromStr for DType {
    type Err = UnknownDType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "float16" | "half" | "fp16" | "f16" => Ok(DType::Float16),
            "bfloat16" | "bf16" => Ok(DType::Bfloat16),
            "float32" | "float" | "fp32" | "f32" => Ok(DType::Float32),
            _ => Err(UnknownDType(s.to_string())),
        }
    }
}

/// The kind of bits an [`Elem`] holds, so kernels can pick a SIMD conversion at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    /// binary16 bits.
    F16,
    /// bfloat16 bits.
    Bf16,
    /// binary32.
    F32,
}

/// A storage element type of the run dtype: `f16`, `bf16` or `f32`.
pub trait Elem: Copy + Send + Sync + Default + PartialEq + fmt::Debug + 'static {
    /// The dtype this element stores.
    const DTYPE: DType;
    /// The bit layout, for SIMD loads.
    const KIND: ElemKind;
    /// Widens exactly to f32.
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type (nearest, ties to even).
    fn from_f32(x: f32) -> Self;
    /// Rounds an f32 value to this precision and widens it back.
    #[inline]
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
    /// `dst[i] = from_f32(src[i])` for equal-length slices.
    #[inline]
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(x);
        }
    }
    /// `dst[i] = src[i].to_f32()` for equal-length slices.
    #[inline]
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x.to_f32();
        }
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::Float16;
    const KIND: ElemKind = ElemKind::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    // half's slice conversions run 4 to 16 values per instruction where the CPU has them (a call
    // per value otherwise), with the same nearest-even rounding.
    #[inline]
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    #[inline]
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::Bfloat16;
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    // half's slice conversions run 4 to 16 values per instruction where the CPU has them (a call
    // per value otherwise), with the same nearest-even rounding.
    #[inline]
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    #[inline]
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl Elem for f32 {
    const DTYPE: DType = DType::Float32;
    const KIND: ElemKind = ElemKind::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// Rounds every element of `xs` in place to the precision of `T`.
#[inline]
pub fn round_slice<T: Elem>(xs: &mut [f32]) {
    if T::KIND != ElemKind::F32 {
        for x in xs {
            *x = T::round(*x);
        }
    }
}

/// Converts f32 values to `T` (rounding each).
pub fn to_elems<T: Elem>(xs: &[f32]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f32(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse_like_vllm() {
        assert_eq!("float16".parse::<DType>().unwrap(), DType::Float16);
        assert_eq!("half".parse::<DType>().unwrap(), DType::Float16);
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::Bfloat16);
        assert_eq!("float32".parse::<DType>().unwrap(), DType::Float32);
        assert!("int8".parse::<DType>().is_err());
    }

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-11 lies halfway between two f16 values; ties go to the even one (1.0).
        let x = 1.0 + f32::powi(2.0, -11);
        assert_eq!(DType::Float16.round(x), 1.0);
        let y = 1.0 + 3.0 * f32::powi(2.0, -11);
        assert_eq!(DType::Float16.round(y), 1.0 + f32::powi(2.0, -9));
        assert_eq!(DType::Bfloat16.round(1.0 + f32::powi(2.0, -8)), 1.0);
        assert_eq!(DType::Float32.round(x), x);
    }

    fn slices_convert_as_single_values<T: Elem>() {
        // Ties, overflow, subnormals, infinities and a length that leaves a SIMD remainder.
        let mut xs: Vec<f32> = (0..203)
            .map(|i| ((i as f32) * 0.917).sin() * 10f32.powi(i % 14 - 9))
            .collect();
        xs.extend([
            1.0 + f32::powi(2.0, -11),
            65520.0,
            1e30,
            -0.0,
            6e-8,
            f32::INFINITY,
        ]);
        let mut got = vec![T::default(); xs.len()];
        T::from_f32_slice(&xs, &mut got);
        let want: Vec<T> = xs.iter().map(|&x| T::from_f32(x)).collect();
        assert_eq!(got, want, "{:?}", T::DTYPE);
        let mut back = vec![0f32; xs.len()];
        T::to_f32_slice(&got, &mut back);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let want: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
        assert_eq!(bits(&back), bits(&want), "{:?}", T::DTYPE);
    }

    #[test]
    fn slice_conversions_match_the_single_value_ones() {
        slices_convert_as_single_values::<f16>();
        slices_convert_as_single_values::<bf16>();
        slices_convert_as_single_values::<f32>();
    }
}
