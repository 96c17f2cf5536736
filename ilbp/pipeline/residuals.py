"""Forward residuals without parameter copies, for VJPs that cross a jit boundary.

`jax.vjp(f, params, x)` returns a function whose pytree holds the forward's residuals:
the input activations the parameter VJP needs, and the parameters the input VJP needs
(a layer's kernel, its reshape or low-precision cast). When a jitted forward returns
them (an MPMD forward op, for its backward ops to take), every residual is a new output
buffer, so each microbatch in flight would hold another copy of the stage's parameters.

`vjp` keeps only the residuals that depend on the data (x and the other arguments: an
activation, a dropout mask, BatchNorm's batch statistics). Those that depend on the
parameters alone are dropped, and `Residuals.vjp_fn(params)` recomputes them inside the
backward op from the parameters it is given (the same values, since the parameters do
not change between a microbatch's forward and backward): it retraces the forward on
placeholder data and XLA keeps only the operations that produce them (reshapes, casts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Var

# fn(params, x, *args) -> (out, aux): a pure function that closes over no arrays.
ForwardFn = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How to rebuild the full VJP function (static: it keys the backward ops' cache)."""

    fn: ForwardFn
    wrt_x: bool  # differentiate x as well as params
    data_avals: tuple[jax.ShapeDtypeStruct, ...]  # (x, *args) flattened
    data_tree: Any
    kept: tuple[bool, ...]  # per leaf of the VJP function: stored (True) or recomputed


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Residuals:
    """The data-dependent residuals of one forward (leaves) and how to rebuild its VJP."""

    leaves: tuple[jax.Array, ...]
    recipe: _Recipe

    def tree_flatten(self):
        return self.leaves, self.recipe

    @classmethod
    def tree_unflatten(cls, recipe, leaves):
        return cls(tuple(leaves), recipe)

    def vjp_fn(self, params: Any) -> Callable:
        """The forward's VJP function, as `jax.vjp` returned it, given the same params.

        It maps ∂out to (∂params, ∂x), or to (∂params,) when x is not differentiated.
        Call it inside a jitted function (the dropped residuals are recomputed there).
        """
        r = self.recipe
        placeholders = [jnp.zeros(a.shape, a.dtype) for a in r.data_avals]
        x, *args = jax.tree.unflatten(r.data_tree, placeholders)
        _, fresh, _ = _vjp(r.fn, r.wrt_x, params, x, args)
        leaves, treedef = jax.tree.flatten(fresh)
        stored = iter(self.leaves)
        leaves = [next(stored) if kept else leaf for leaf, kept in zip(leaves, r.kept)]
        return jax.tree.unflatten(treedef, leaves)


def _vjp(fn: ForwardFn, wrt_x: bool, params: Any, x: Any, args: Any):
    if wrt_x:
        return jax.vjp(lambda p, x: fn(p, x, *args), params, x, has_aux=True)
    return jax.vjp(lambda p: fn(p, x, *args), params, has_aux=True)


def vjp(fn: ForwardFn, params: Any, x: Any, *args: Any, wrt_x: bool = True):
    """`jax.vjp(fn, params, x, has_aux=True)` (or of params alone if not `wrt_x`) whose
    residuals exclude everything computed from `params` alone.

    `fn(params, x, *args) -> (out, aux)` must close over no traced arrays: `vjp_fn`
    calls it again. Returns (out, Residuals, aux); `Residuals.vjp_fn(params)` is the
    VJP function.
    """
    out, vjp_fn, aux = _vjp(fn, wrt_x, params, x, args)
    leaves = jax.tree.leaves(vjp_fn)
    data_leaves, data_tree = jax.tree.flatten((x, *args))
    kept = _depends_on_data(fn, wrt_x, params, (x, *args))
    if len(kept) != len(leaves):
        raise AssertionError("Tracing the forward twice gave different residuals.")
    recipe = _Recipe(
        fn=fn,
        wrt_x=wrt_x,
        data_avals=tuple(jax.ShapeDtypeStruct(d.shape, d.dtype) for d in data_leaves),
        data_tree=data_tree,
        kept=kept,
    )
    return out, Residuals(tuple(r for r, k in zip(leaves, kept) if k), recipe), aux


def _depends_on_data(fn: ForwardFn, wrt_x: bool, params: Any, data: tuple) -> tuple[bool, ...]:
    """Per residual leaf of the VJP: whether it depends on any data leaf."""
    abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
    residuals = lambda p, d: jax.tree.leaves(_vjp(fn, wrt_x, p, d[0], d[1:])[1])
    jaxpr = jax.make_jaxpr(residuals)(abstract(params), abstract(data)).jaxpr
    num_params = len(jax.tree.leaves(params))
    return _tainted(jaxpr, [i >= num_params for i in range(len(jaxpr.invars))])


# Primitives that call one jaxpr on their operands, in order, once.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call")


def _tainted(jaxpr: Any, taint_in: Sequence[bool]) -> tuple[bool, ...]:
    """Which outputs of `jaxpr` depend on the inputs marked in `taint_in`. Calls and scans
    are followed inside (a layer stack's casts of its own weights stay the parameters');
    any other equation with a marked input marks all its outputs."""
    tainted = {v for v, t in zip(jaxpr.invars, taint_in) if t}
    marked = lambda v: isinstance(v, Var) and v in tainted
    for eqn in jaxpr.eqns:
        taint = [marked(v) for v in eqn.invars]
        if not any(taint):
            continue
        inner = _inner_jaxpr(eqn)
        if eqn.primitive.name == "scan":
            out = _scan_tainted(eqn, inner, taint)
        elif eqn.primitive.name in _CALLS and inner is not None:
            out = _tainted(inner, taint)
        else:
            out = [True] * len(eqn.outvars)
        tainted.update(v for v, t in zip(eqn.outvars, out) if t)
    return tuple(marked(v) for v in jaxpr.outvars)


def _inner_jaxpr(eqn: Any) -> Any:
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    inner = getattr(closed, "jaxpr", closed)
    arity_matches = inner is not None and len(getattr(inner, "invars", ())) == len(eqn.invars)
    return inner if arity_matches and len(inner.outvars) == len(eqn.outvars) else None


def _scan_tainted(eqn: Any, body: Any, taint: list[bool]) -> list[bool]:
    """A scan's outputs (carries, then stacked ys): the body's, with a carry marked once
    any iteration's carry is (a fixed point)."""
    if body is None:
        return [True] * len(eqn.outvars)
    consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
    carry = taint[consts : consts + carries]
    while True:
        out = _tainted(body, [*taint[:consts], *carry, *taint[consts + carries :]])
        new = [a or b for a, b in zip(carry, out[:carries])]
        if new == carry:
            return [*carry, *out[carries:]]
        carry = new
