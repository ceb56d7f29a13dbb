//! Shared argument validation: one helper per kind of check, uniform messages that name the
//! op, the argument, and what was found against what was expected.

use crate::buffer::MlxBuffer;
use crate::dtype::DType;
use crate::error::{MlxError, Result};

/// `x` must have one of `allowed` dtypes.
pub fn dtype(x: &MlxBuffer, allowed: &[DType], op: &str, arg: &str) -> Result<()> {
    if allowed.contains(&x.dtype()) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
    Err(MlxError::invalid(format!(
        "{op}: {arg} is {}, expected {}",
        x.dtype(),
        names.join(" or ")
    )))
}

/// `x` must hold exactly `n` elements.
pub fn len(x: &MlxBuffer, n: usize, op: &str, arg: &str) -> Result<()> {
    if x.len() == n {
        return Ok(());
    }
    Err(MlxError::invalid(format!(
        "{op}: {arg} has {} elements, expected {n}",
        x.len()
    )))
}

/// `x` must have exactly `shape`.
pub fn shape(x: &MlxBuffer, shape: &[usize], op: &str, arg: &str) -> Result<()> {
    if x.shape() == shape {
        return Ok(());
    }
    Err(MlxError::invalid(format!(
        "{op}: {arg} has shape {:?}, expected {shape:?}",
        x.shape()
    )))
}

/// `a` and `b` must have the same shape.
pub fn same_shape(a: &MlxBuffer, b: &MlxBuffer, op: &str, an: &str, bn: &str) -> Result<()> {
    if a.shape() == b.shape() {
        return Ok(());
    }
    Err(MlxError::invalid(format!(
        "{op}: {an} has shape {:?} but {bn} has shape {:?}",
        a.shape(),
        b.shape()
    )))
}

/// View `x` as rows of its last dimension: (rows, row length).
pub fn rows(x: &MlxBuffer, op: &str, arg: &str) -> Result<(usize, usize)> {
    let n = *x
        .shape()
        .last()
        .ok_or_else(|| MlxError::invalid(format!("{op}: {arg} has an empty shape")))?;
    if n == 0 || x.is_empty() {
        return Err(MlxError::invalid(format!(
            "{op}: {arg} has shape {:?} with a zero-size dimension",
            x.shape()
        )));
    }
    Ok((x.len() / n, n))
}

/// A size that must fit the 32-bit indices kernels use.
pub fn fits_u32(v: usize, op: &str, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| MlxError::invalid(format!("{op}: {what} = {v} exceeds 2^32-1")))
}

/// A condition on arguments, with its own message.
pub fn ensure(cond: bool, op: &str, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(MlxError::invalid(format!("{op}: {}", msg())))
    }
}
