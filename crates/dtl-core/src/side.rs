//! Trainable parts: parameters, side networks and heads.

use dfdx::prelude::*;

use crate::Result;

/// Activations as side networks see them: (batch, tokens, width) with runtime dims.
///
/// The runner converts a backbone's compile-time shaped tokens with `realize`, which checks
/// the dims and copies nothing.
pub type Act<D, T = OwnedTape<f32, D>> = Tensor<(usize, usize, usize), f32, D, T>;

/// A traced (rows, columns) matrix: pooled features entering a head, logits leaving it.
pub type Matrix<D> = Tensor<(usize, usize), f32, D, OwnedTape<f32, D>>;

/// One trainable tensor, stored flat with its logical shape.
///
/// Names follow the checkpoint layout (`side.3.a`, `fusion.weight`, `head.bias`); the
/// optimizer decides weight decay from the name.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// let dev = Cpu::default();
/// let p = Param::zeros(&dev, "head.bias", &[10]);
/// assert_eq!(p.numel(), 10);
/// assert_eq!(p.shape, vec![10]);
/// ```
#[derive(Debug, Clone)]
pub struct Param<D: Device<f32>> {
    /// Checkpoint name.
    pub name: String,
    /// Logical shape (row-major).
    pub shape: Vec<usize>,
    /// The values, flat.
    pub value: Tensor<(usize,), f32, D>,
}

impl<D: Device<f32>> Param<D> {
    /// A parameter filled with zeros.
    pub fn zeros(dev: &D, name: &str, shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            value: dev.zeros_like(&(n,)),
        }
    }

    /// A parameter with the given values; errors when their count does not match the shape.
    pub fn from_vec(dev: &D, name: &str, shape: &[usize], values: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(crate::DtlError::value_count(
                &format!("parameter `{name}`: shape {shape:?}"),
                n,
                values.len(),
            ));
        }
        Ok(Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            value: dev.tensor_from_vec(values, (n,)),
        })
    }

    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The same parameter on another device (a copy through the host).
    ///
    /// ```
    /// use dfdx::prelude::*;
    /// use dtl_core::Param;
    /// let p = Param::from_vec(&Cpu::default(), "head.bias", &[2], vec![1.0, 2.0]).unwrap();
    /// let q = p.to_device(&Cpu::default());
    /// assert_eq!((q.name.as_str(), q.value.as_vec()), ("head.bias", vec![1.0, 2.0]));
    /// ```
    pub fn to_device<E: Device<f32>>(&self, dev: &E) -> Param<E> {
        Param {
            name: self.name.clone(),
            shape: self.shape.clone(),
            value: dev.tensor_from_vec(self.value.as_vec(), (self.numel(),)),
        }
    }
}

/// Something that owns trainable parameters.
pub trait Parameters<D: Device<f32>> {
    /// The parameters, in a stable order.
    fn params(&self) -> Vec<&Param<D>>;
    /// The same parameters, mutably, in the same order.
    fn params_mut(&mut self) -> Vec<&mut Param<D>>;
    /// Total trainable scalars.
    fn parameter_count(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
}

/// A Compact Side Network: low-rank maps on tapped blocks, added back after inject blocks.
///
/// The runner drives it around the frozen backbone:
///
/// ```text
/// z = None
/// for i in 0..L:
///     if i in taps():    z = Some(side.tap(i, x_i, z))
///     x_{i+1} = Block_i(x_i)
///     if i in injects(): x_{i+1} = x_{i+1} + side.inject(i, z)
/// ```
///
/// After the first inject block, `x_i` depends on the side network's own parameters through
/// the earlier injects, so [`SideNetwork::tap`] receives it with a tape and the gradient
/// flows into it as well (exactly what autodiff of the whole model gives). Before the first
/// inject nothing upstream is trainable: the runner calls [`SideNetwork::tap_frozen`], whose
/// default forwards to `tap` with an empty tape and which a side network may override to
/// skip the gradient with respect to `x`. `z` carries the tape of the running state;
/// [`SideNetwork::inject`] receives `z` with an empty tape (the runner keeps its history).
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{Act, Param, Parameters, Result, SideNetwork};
///
/// /// Adds a learnt scalar times the tapped activations.
/// struct Scale { p: Param<Cpu> }
/// impl Parameters<Cpu> for Scale {
///     fn params(&self) -> Vec<&Param<Cpu>> { vec![&self.p] }
///     fn params_mut(&mut self) -> Vec<&mut Param<Cpu>> { vec![&mut self.p] }
/// }
/// impl SideNetwork<Cpu> for Scale {
///     fn taps(&self) -> &[usize] { &[0] }
///     fn injects(&self) -> &[usize] { &[0] }
///     fn tap(&self, _i: usize, x: Act<Cpu>, _z: Option<Act<Cpu>>) -> Result<Act<Cpu>> {
///         let s = self.p.value.retaped::<OwnedTape<f32, Cpu>>().reshape_like(&());
///         let shape = *x.shape();
///         Ok(s.broadcast_like(&shape) * x)
///     }
///     fn inject(&self, _i: usize, z: &Act<Cpu>) -> Result<Act<Cpu>> { Ok(z.with_empty_tape()) }
/// }
/// let dev = Cpu::default();
/// let side = Scale { p: Param::from_vec(&dev, "side.scale", &[1], vec![0.5]).unwrap() };
/// let x = dev.ones_like(&(1, 2, 3));
/// let z = side.tap_frozen(0, &x, None).unwrap();
/// assert_eq!(z.as_vec(), vec![0.5; 6]);
/// ```
pub trait SideNetwork<D: Device<f32>>: Parameters<D> {
    /// Blocks whose input is tapped, ascending.
    fn taps(&self) -> &[usize];
    /// Blocks after which `g(z)` is added to the block output, ascending.
    fn injects(&self) -> &[usize];
    /// Adds block `block`'s contribution computed from its input `x` to the running state `z`;
    /// `x` carries a tape and its gradient is needed.
    fn tap(&self, block: usize, x: Act<D>, z: Option<Act<D>>) -> Result<Act<D>>;
    /// [`SideNetwork::tap`] for a block before the first inject, whose input needs no
    /// gradient. The default gives `x` an empty tape and calls `tap`.
    fn tap_frozen(&self, block: usize, x: &Act<D, NoneTape>, z: Option<Act<D>>) -> Result<Act<D>> {
        self.tap(block, x.retaped::<OwnedTape<f32, D>>(), z)
    }
    /// The value to add to the output of block `block`, computed from the running state.
    fn inject(&self, block: usize, z: &Act<D>) -> Result<Act<D>>;
    /// Whether the backbone can run with no tape at all (a linear probe has no taps).
    fn is_linear_probe(&self) -> bool {
        self.taps().is_empty()
    }
}

/// A classification head on pooled, normalised features (batch, width) -> logits (batch, classes).
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{Head, Param, Parameters, Result};
/// struct Zero { classes: usize, p: Param<Cpu> }
/// impl Parameters<Cpu> for Zero {
///     fn params(&self) -> Vec<&Param<Cpu>> { vec![&self.p] }
///     fn params_mut(&mut self) -> Vec<&mut Param<Cpu>> { vec![&mut self.p] }
/// }
/// impl Head<Cpu> for Zero {
///     fn classes(&self) -> usize { self.classes }
///     fn forward(&self, f: Tensor<(usize, usize), f32, Cpu, OwnedTape<f32, Cpu>>)
///         -> Result<Tensor<(usize, usize), f32, Cpu, OwnedTape<f32, Cpu>>> {
///         let b = f.shape().0;
///         Ok(f.sum::<(usize,), Axis<1>>().broadcast_like::<_, Axis<1>>(&(b, self.classes)) * 0.0)
///     }
/// }
/// let dev = Cpu::default();
/// let h = Zero { classes: 3, p: Param::zeros(&dev, "head.bias", &[3]) };
/// let logits = h.forward(dev.ones_like(&(2, 4)).leaky_traced()).unwrap();
/// assert_eq!(logits.shape(), &(2, 3));
/// ```
pub trait Head<D: Device<f32>>: Parameters<D> {
    /// Number of classes.
    fn classes(&self) -> usize;
    /// Logits for a batch of features.
    fn forward(&self, features: Matrix<D>) -> Result<Matrix<D>>;
}
