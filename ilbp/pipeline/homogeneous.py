"""What the SPMD executor requires of a model, checked before any work.

The SPMD executor runs one program on every stage, so it runs a StagedModel through its
`homogeneous` description (`ilbp.HomogeneousStages`, which `ilbp.models.transformer_lm`
attaches). `check_homogeneous(model)` returns that description once it has checked,
abstractly (tracing only: no compilation, no FLOPs), that the description is of this
model and that the program can run it:

- the model carries a description, of K ≥ 2 stages;
- the description is of the model's own stages and heads (not of stages or heads since
  replaced);
- no stage or head keeps state (BatchNorm statistics, RNG counters): the program carries
  none;
- no stage or head uses the step's rng in training (dropout): the program passes none;
- in the uniform layout every stage's parameters have stage 0's structure and shapes
  (equal stage depths; the last stage's output layer shaped like an aux head), so they
  stack, and they convert back to the model's layout.

Each failure is a ValueError that names what is unsupported and the alternative: the
`mpmd` executor, which runs any StagedModel.
"""

from __future__ import annotations

import jax

from ilbp.stage import BODY, HEAD, PROLOGUE, HomogeneousStages, Params, Stage, StagedModel

__all__ = ["BODY", "HEAD", "PROLOGUE", "HomogeneousStages", "check_homogeneous"]

_USE_MPMD = "Use the mpmd executor, which runs any StagedModel."


def check_homogeneous(model: StagedModel) -> HomogeneousStages:
    """`model.homogeneous`, checked as the module docstring says; ValueError otherwise."""
    hom = model.homogeneous
    if hom is None or model.num_stages < 2:
        raise ValueError(
            "The spmd executor needs homogeneous stages: a Transformer StagedModel from "
            "ilbp.models.transformer_lm with K ≥ 2 stages (or a StagedModel that carries an "
            "ilbp.HomogeneousStages). Use the mpmd executor for heterogeneous models such as "
            "the ResNets."
        )
    for what, own, described in (
        ("stages", model.stages, hom.stages),
        ("heads", model.heads, hom.heads),
    ):
        if tuple(own) != tuple(described):
            raise ValueError(
                f"The model's {what} are not the ones its homogeneous description was built "
                f"for (were they replaced after the model was built?), so the spmd executor "
                f"would run other {what}. Rebuild the description for these {what}. {_USE_MPMD}"
            )
    params = _trace_stages(model, hom.example)
    _check_uniform_layout(params, hom)
    return hom


def _abstract_key() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(lambda: jax.random.key(0))


def _trace_stages(model: StagedModel, x: jax.ShapeDtypeStruct) -> list[Params]:
    """Traces every stage and head once (init and training apply) on the model input x;
    returns the stages' abstract {"stage", "head"} params."""
    key = _abstract_key()
    params: list[Params] = []
    for k, stage in enumerate(model.stages):
        p_stage, h = _trace(stage, key, x, f"stage {k} ({stage.name})")
        params.append({"stage": p_stage})
        if k < len(model.heads):
            head = model.heads[k]
            params[k]["head"], _ = _trace(head, key, h, f"aux head {k} ({head.name})")
        x = h
    return params


def _trace(part: Stage, key, x, name: str) -> tuple[Params, jax.ShapeDtypeStruct]:
    """(abstract params, abstract output) of `part` on x; ValueError if it keeps state or
    uses the rng in training."""
    try:
        params, state = jax.eval_shape(part.init, key, x)
        closed = jax.make_jaxpr(lambda r, p, s, x: part.apply(p, s, x, r, True))(
            key, params, state, x
        )
    except Exception as e:
        raise ValueError(
            f"{name} cannot take its input of shape {x.shape} and dtype {x.dtype}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if jax.tree.leaves(state):
        raise ValueError(
            f"The spmd executor does not support model state: {name} keeps "
            f"{list(state) if isinstance(state, dict) else 'state'} (e.g. BatchNorm "
            f"statistics), which its program does not carry. {_USE_MPMD}"
        )
    rng = closed.jaxpr.invars[0]
    if any(rng in eqn.invars for eqn in closed.jaxpr.eqns):
        raise ValueError(
            f"The spmd executor does not support randomness in training (dropout): "
            f"{name} uses the step's rng, which its program does not pass. {_USE_MPMD}"
        )
    y = closed.out_avals[0]
    return params, jax.ShapeDtypeStruct(y.shape, y.dtype)


def _check_uniform_layout(params: list[Params], hom: HomogeneousStages) -> None:
    """Every stage's uniform params have stage 0's shapes and convert back to its own."""
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    uniform = [jax.eval_shape(lambda p, k=k: hom.to_uniform(p, k), p) for k, p in enumerate(params)]
    for k, u in enumerate(uniform):
        if shapes(u) != shapes(uniform[0]):
            raise ValueError(
                f"The spmd executor stacks every stage's parameters, but stage {k}'s differ "
                f"from stage 0's in the uniform layout ({PROLOGUE}/{BODY}/{HEAD}): stages of "
                f"unequal depths, or an output layer not shaped like the aux heads.\n"
                f"  stage 0: {shapes(uniform[0])}\n  stage {k}: {shapes(u)}\n{_USE_MPMD}"
            )
        back = jax.eval_shape(lambda u, k=k: hom.from_uniform(u, k), u)
        if shapes(back) != shapes(params[k]):
            raise ValueError(
                f"The homogeneous description does not convert stage {k}'s parameters back "
                f"to the model's layout: {shapes(back)} against {shapes(params[k])}. "
                f"{_USE_MPMD}"
            )
